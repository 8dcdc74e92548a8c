"""The carried wheels plus the GPU machine's own packages cover every import of the service, the worker, the
CLI and the benchmarks, so a wheel `scripts/gpu_wheels.sh` would not carry fails here and not on the GPU."""

from __future__ import annotations

import ast
import importlib.metadata as md
import sys
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from bench.gpu_stack import DEVICE_HAS, ROOTS

ROOT = Path(__file__).resolve().parents[2]
# The GPU machine's interpreter (KINDS.md: Python 3.12 on Linux x86_64), for the requirements' markers.
TARGET = {**default_environment(), "python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
          "platform_system": "Linux", "platform_machine": "x86_64", "implementation_name": "cpython"}  # fmt: skip
# Everything `make gpu-check` runs: the service, the worker's three processes, the CLI and the benchmarks.
PACKAGES = ("api", "shared", "worker", "cli", "client", "launcher", "bench")
# Imported only where present, each behind its own check (a machine without it takes the other path).
OPTIONAL = {"flash_attn", "wandb", "liger_kernel"}


def _carried() -> set[str]:
    """ROOTS followed through their requirements (as installed here, which is what the script downloads),
    stopping at what the machine has."""
    seen: set[str] = set()
    queue = [Requirement(r) for r in ROOTS]
    while queue:
        req = queue.pop()
        name = canonicalize_name(req.name)
        if name in DEVICE_HAS or name in seen:
            continue
        seen.add(name)
        try:
            requires = md.requires(name) or []
        except md.PackageNotFoundError:  # not installed here (a GPU-only package): its wheel brings its own
            continue
        for line in requires:
            sub = Requirement(line)
            extras = req.extras | {""}
            if sub.marker is None or any(sub.marker.evaluate({**TARGET, "extra": e}) for e in extras):
                queue.append(sub)
    return seen


def _imported_modules() -> set[str]:
    """Top-level modules named by any import statement in the project's source, lazy ones inside functions too."""
    names: set[str] = set()
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    names.update(alias.name.split(".")[0] for alias in node.names)
                elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                    names.add(node.module.split(".")[0])
    return {n for n in names if n not in sys.stdlib_module_names and not (ROOT / n).is_dir() and n not in OPTIONAL}


def test_every_import_is_carried_or_on_the_gpu_machine() -> None:
    available = _carried() | DEVICE_HAS
    owners = md.packages_distributions()
    modules = _imported_modules()
    assert {"fastapi", "celery", "standardwebhooks", "torch", "peft", "trl"} <= modules  # it looked
    unknown = sorted(m for m in modules if m not in owners)
    assert not unknown, f"imported but installed nowhere here, so its wheel cannot be checked: {unknown}"
    missing = {m: owners[m] for m in modules if not {canonicalize_name(d) for d in owners[m]} & available}
    assert not missing, f"imported but neither carried (bench/gpu_stack.py ROOTS) nor on the GPU machine: {missing}"

"""The offline half of the dependency audit: floors above the known multipart CVEs, and an installed stack that
meets every floor. The online half, pip-audit against a vulnerability database, is `scripts/audit.sh`
(`make audit`); here we check that it audits every requirement pyproject.toml declares."""

from __future__ import annotations

import re
import subprocess
import tomllib
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]

# Releases fixing the multipart-parsing CVEs named in docs/reliability.md.
SECURITY_FLOORS = {"python-multipart": "0.0.30", "starlette": "1.3.1"}


def _project() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _requirements(*, core_only: bool = False) -> list[Requirement]:
    project = _project()
    extras = [] if core_only else [r for group in project.get("optional-dependencies", {}).values() for r in group]
    return [Requirement(r) for r in [*project["dependencies"], *extras]]


def _floor(req: Requirement) -> Version:
    floors = [Version(s.version) for s in req.specifier if s.operator == ">="]
    assert floors, f"{req} has no '>=' floor to audit"
    return max(floors)


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_every_requirement_has_a_floor_and_the_audit_covers_it() -> None:
    out = subprocess.run(
        ["bash", str(ROOT / "scripts" / "audit.sh"), "--floors"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    audited = dict(line.split("==") for line in out)
    for req in _requirements():
        assert Version(audited[_canonical(req.name)]) == _floor(req), req


@pytest.mark.parametrize(("name", "minimum"), sorted(SECURITY_FLOORS.items()))
def test_floors_exclude_releases_with_known_multipart_cves(name: str, minimum: str) -> None:
    floors = [_floor(r) for r in _requirements() if _canonical(r.name) == name]
    assert floors, f"{name} must be pinned explicitly, not left to whatever FastAPI pulls in"
    assert all(f >= Version(minimum) for f in floors), (name, floors)


def test_the_installed_stack_meets_every_floor() -> None:
    """What the tests run on is what pyproject promises (the worker extras only where installed)."""
    core = {_canonical(r.name) for r in _requirements(core_only=True)}
    for req in _requirements():
        try:
            installed = Version(version(req.name))
        except PackageNotFoundError:
            assert _canonical(req.name) not in core, f"{req.name} is a core dependency and is not installed"
            continue
        assert installed >= _floor(req), f"{req.name} {installed} is below the floor {_floor(req)}"

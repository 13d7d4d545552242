# One virtualenv for everything; created on first use, reused afterwards.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.psamf-installed

.PHONY: demo test test-fast test-quick bench clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# CPU torch first (pinned), so the package's own torch>=2.4 range is already satisfied. --no-compile: Python
	# byte-compiles the modules it imports on first use; compiling all of torch and Ray up front costs minutes.
	$(PY) -m pip install -q --no-compile torch==2.13.0
	$(PY) -m pip install -q --no-compile -e ".[test,tune,cluster]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/psamf demo

test: $(STAMP)
	$(PY) -m pytest

test-fast: $(STAMP)
	$(PY) -m pytest -m "not integration"

test-quick: $(STAMP)
	$(PY) -m pytest -m "not slow"

clean:
	rm -rf data/demo runs/demo outputs .pytest_cache

# One virtualenv for everything; created on first use, reused afterwards.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.psamf-installed

.PHONY: demo test test-fast bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# CPU torch first (pinned), so the package's own torch>=2.4 range is already satisfied
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test,tune]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/psamf demo

test: $(STAMP)
	$(PY) -m pytest

test-fast: $(STAMP)
	$(PY) -m pytest -m "not integration"

clean:
	rm -rf data/demo runs/demo outputs .pytest_cache

# One virtualenv for everything; created on first use, reused afterwards.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.psamf-installed
# pytest-xdist workers for `make test*`: 0 (the default) runs every test in one process; N > 0 sends whole modules
# to N processes (a module's Ray head or cluster starts once). On the 2-core CI machine two processes were no
# faster on average and far less steady than one (docs/benchmarks.md, "Test-suite time"); more cores gain more.
TEST_WORKERS ?= 0
PYTEST := $(PY) -m pytest -n $(TEST_WORKERS) --dist loadscope

.PHONY: demo test test-fast test-quick bench clean

# CPU torch first (pinned), so the package's own torch>=2.4 range is already satisfied. pip byte-compiles what it
# installs (about a minute on 2 cores). Keep it so: where PYTHONDONTWRITEBYTECODE is set, as on the CI machine,
# Python never writes a .pyc on import, and every Ray worker process would compile torch, transformers and Ray
# from source again (16 s against 6 s to import them; docs/benchmarks.md).
$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test,tune,cluster]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/psamf demo

test: $(STAMP)
	$(PYTEST)

test-fast: $(STAMP)
	$(PYTEST) -m "not integration"

test-quick: $(STAMP)
	$(PYTEST) -m "not slow"

clean:
	rm -rf data/demo runs/demo outputs .pytest_cache

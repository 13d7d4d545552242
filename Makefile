# One virtualenv for everything; created on first use, reused afterwards.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.psamf-installed
# pytest-xdist workers for `make test*`: whole modules to each (a module's Ray head or cluster starts once), 2 by
# default, which is what a 2-core machine gains from (much of a Ray test is waiting on process starts); 0 runs
# everything in one process
TEST_WORKERS ?= 2
PYTEST := $(PY) -m pytest -n $(TEST_WORKERS) --dist loadscope

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
	$(PYTEST)

test-fast: $(STAMP)
	$(PYTEST) -m "not integration"

test-quick: $(STAMP)
	$(PYTEST) -m "not slow"

clean:
	rm -rf data/demo runs/demo outputs .pytest_cache

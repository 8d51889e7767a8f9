# Two entry points for a fresh Debian machine with Python 3.11+ and a C compiler:
#   make demo   virtualenv, install, back up a sample SQLite database, restore and compare
#   make test   virtualenv, install, lint, type-check, run the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
DEMO   ?= .demo
# The shared snapshot generator sits beside this checkout; a small stdlib fallback
# stands in where it does not.
GEN_SNAPSHOT ?= ../shared/data/gen_snapshot.py
DEMO_SIZE ?= 64MiB
# Everything, the slow kill tests included (CI runs this); `make test-quick` skips them.
PYTEST_ARGS ?=
# Test processes (pytest-xdist): one per core. Each starts its own PostgreSQL and S3 API
# servers on free loopback ports when its tests need them. PYTEST_JOBS=0: one process.
PYTEST_JOBS ?= auto

SOURCES := $(shell find dedupe csrc -name '*.py' -o -name '*.pyx' -o -name '*.pyi' -o -name '*.c' -o -name '*.h') pyproject.toml setup.py

.PHONY: demo test test-quick mutants lint clean venv

venv: $(VENV)/.installed

$(VENV)/.installed: $(SOURCES)
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "dedupe needs Python 3.11+"'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q ".[test]"
	@touch $@

demo: venv
	rm -rf $(DEMO) && mkdir -p $(DEMO)
	@if [ -f "$(GEN_SNAPSHOT)" ]; then \
	  echo "== making a $(DEMO_SIZE) SQLite database and one day of traffic on it"; \
	  $(BIN)/python $(GEN_SNAPSHOT) sqlite --size $(DEMO_SIZE) --seed 1 $(DEMO)/day1.db && \
	  $(BIN)/python $(GEN_SNAPSHOT) mutate --seed 2 $(DEMO)/day1.db $(DEMO)/day2.db; \
	else \
	  echo "== $(GEN_SNAPSHOT) not found: making a small sample database"; \
	  $(BIN)/python bench/sample_db.py $(DEMO)/day1.db $(DEMO)/day2.db; \
	fi
	$(BIN)/python bench/demo.py --workdir $(DEMO)

test: venv
	$(BIN)/ruff check dedupe tests bench
	$(BIN)/lint-imports
	$(BIN)/mypy
	# PYTHONSAFEPATH: child `python -m dedupe` processes must import the installed package,
	# not the unbuilt source tree in the working directory.
	PYTHONSAFEPATH=1 $(BIN)/pytest -n $(PYTEST_JOBS) $(PYTEST_ARGS)

test-quick: PYTEST_ARGS = -m "not slow"
test-quick: test

# Mutation testing (mutmut, configured in pyproject.toml): a habit, not a CI step (hours).
# The native modules are built in place so that mutmut's copy of the tree imports them.
# `mutmut run` with a name that matches no mutant only generates mutants/ and the coverage
# statistics (then stops on its assertion that nothing matched: expected, hence `|| true`);
# bench/mutants.py then runs each mutant in a fresh process (mutmut's own forked children
# deadlock on this code: see that file). Results: mutants/results.jsonl.
MUTATED ?= dedupe/engine/prune.py dedupe/engine/restore.py $(wildcard dedupe/store/*.py dedupe/crypto/*.py)
mutants: venv
	$(BIN)/pip install -q mutmut
	$(BIN)/python setup.py -q build_ext --inplace
	$(BIN)/mutmut run "generate.only" || true
	for module in $(MUTATED); do $(BIN)/python bench/mutants.py $$module || exit 1; done

clean:
	rm -rf $(VENV) $(DEMO) mutants build dist *.egg-info dedupe/chunking/_fastcdc.c dedupe/chunking/*.so

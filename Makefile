# Two commands do everything on a fresh machine with Python 3.11 and pip:
#   make demo   install into .venv and run the default pipeline (config.yaml)
#   make test   install into .venv and run the test suite
#   make install  only install (then: .venv/bin/snakemake --cores 2 ...; no activation needed)
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
CORES  ?= 2
# pytest workers of `make test` / `make test-slow` (pytest-xdist; 0 = in one process)
TEST_WORKERS ?= 2
# Rules call the `eps` command: put the virtual environment's bin first on PATH.
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: install demo test test-slow lint dry-run bench clean

$(BIN)/eps: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/pip install -q -e '.[test]'
	touch $(BIN)/eps

install: $(BIN)/eps

demo: $(BIN)/eps
	$(BIN)/snakemake --cores $(CORES) --configfile config.yaml

test: $(BIN)/eps
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS)

test-slow: $(BIN)/eps
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) -m slow

lint: $(BIN)/eps
	$(BIN)/ruff check .
	$(BIN)/snakefmt --check Snakefile workflow/
	$(BIN)/snakemake --lint --configfile config.yaml

dry-run: $(BIN)/eps
	$(BIN)/snakemake -n --configfile config.yaml

# Every bench/*.py (docs/benchmarks.md); each prints its figures and, last, a SUMMARY line.
# BENCH_ARGS=--quick for a small run.
bench: $(BIN)/eps
	@set -e; for b in $(sort $(filter-out bench/_%,$(wildcard bench/*.py))); do \
		$(BIN)/python $$b $(BENCH_ARGS); echo; done

clean:
	rm -rf results .snakemake

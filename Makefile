# `make demo` and `make test` work on a fresh machine: each sets up what it needs.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test lint unit system-deps bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $@

system-deps:
	bash .ci/system-deps

demo: $(BIN)/.installed
	$(BIN)/drainproxy demo

lint: $(BIN)/.installed
	$(BIN)/ruff check drainproxy tests bench
	$(BIN)/ruff format --check drainproxy tests bench
	$(BIN)/mypy

test: system-deps lint
	$(BIN)/pytest

bench: $(BIN)/.installed system-deps
	$(BIN)/python bench/run.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache

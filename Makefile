# Strata: `make` builds .venv with the project installed editable;
# `make demo` runs the demo on the embedded default store; `make test` runs
# the whole suite (what CI runs). `make bench` runs the benchmarks.

PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: all venv demo test bench lint clean

all: venv

venv: $(STAMP)

$(STAMP): pyproject.toml
	@command -v $(PY) >/dev/null || { echo "python3 is required"; exit 1; }
	@$(PY) -c 'import venv, ensurepip' 2>/dev/null || { \
	  echo "installing python3-venv"; \
	  $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq python3-venv; }
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	@touch $(STAMP)

demo: venv
	$(BIN)/python -m engine.demo

test: venv lint
	$(BIN)/python -m pytest -q tests

bench: venv
	$(BIN)/python -m pytest -q bench --benchmark-only -p no:cacheprovider

lint: venv
	$(BIN)/ruff check engine tests bench
	$(BIN)/mypy --no-error-summary

clean:
	rm -rf $(VENV) .strata .pytest_cache .benchmarks .hypothesis

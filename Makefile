# Strata: `make` builds .venv with the project installed editable;
# `make demo` runs the demo on the embedded default store; `make test` runs
# the whole suite (what CI runs). `make bench` runs the benchmarks;
# `make torture` the long fault-injection runs, printing their figures.

PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# root runs apt-get itself; anyone else through sudo
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
APT := $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends
PG_BIN := $(shell pg_config --bindir 2>/dev/null)

.PHONY: all venv system demo test test-shuffled bench torture lint clean

all: venv

# System packages the page server and its tests need: FUSE 3 and PostgreSQL 15;
# libfuse 2 as well, so that the suite shows Strata loads libfuse 3 where both
# are installed (as on many desktops); Ceph's monitor, OSD and RADOS Gateway, the
# third S3 server the object-store tests run against (tests/s3servers.py).
system:
	@if ! command -v fusermount3 >/dev/null || ! [ -e /usr/include/fuse3/fuse.h ] \
	   || ! /sbin/ldconfig -p | grep -q 'libfuse\.so\.2' \
	   || ! [ -x "$(PG_BIN)/postgres" ] || ! [ -x "$(PG_BIN)/pg_amcheck" ] \
	   || ! command -v radosgw >/dev/null || ! command -v ceph-osd >/dev/null; then \
	  echo "installing fuse3, libfuse3-dev, libfuse2, PostgreSQL 15 and Ceph RGW (apt)"; \
	  $(SUDO) apt-get update -qq && $(APT) fuse3 libfuse3-dev libfuse2 postgresql-15 postgresql-client-15 \
	    postgresql-contrib ceph-mon ceph-osd radosgw ceph-common; fi

venv: $(STAMP)

$(STAMP): pyproject.toml
	@command -v $(PY) >/dev/null || { echo "python3 is required"; exit 1; }
	@$(PY) -c 'import venv, ensurepip' 2>/dev/null || { \
	  echo "installing python3-venv"; \
	  $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq python3-venv; }
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# (compat: a path in a .pth, no import-hook finder at every Python start, 11 ms of a CLI call; setuptools
	# calls the mode transitional: where it is gone, the default editable install)
	$(BIN)/pip install -q -e '.[dev]' --config-settings editable_mode=compat 2>/dev/null || $(BIN)/pip install -q -e '.[dev]'
	@touch $(STAMP)

demo: venv system
	$(BIN)/python -m pageserver.clients.demo

test: venv system lint
	$(BIN)/python -m pytest -q tests

# the suite in a random order (modules shuffled, and tests within each): no test may
# depend on another having run first
test-shuffled: venv system
	$(BIN)/python -m pytest -q tests --random-order

bench: venv system
	$(BIN)/python -m pytest -q bench --benchmark-only -p no:cacheprovider

torture: venv system
	TORTURE=1 $(BIN)/python -m pytest -q -s -p no:cacheprovider tests/test_fault_sweep.py tests/test_failpoints.py \
	  tests/test_kill_service.py tests/test_gc_pressure.py tests/test_datadir_races.py tests/test_control_stress.py \
	  tests/test_remote.py tests/test_remote_service.py

lint: venv
	$(BIN)/ruff check engine pageserver tests bench
	$(BIN)/mypy --no-error-summary
	$(BIN)/lint-imports --no-cache

clean:
	rm -rf $(VENV) .strata .pytest_cache .benchmarks .hypothesis

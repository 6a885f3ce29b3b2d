# make test: create .venv if missing, install pinned deps, run the whole test suite (two pytest
#   workers, a test file per worker at a time: much of the suite waits on Ray, subprocesses
#   and sockets rather than computing; tests/conftest.py starts the longest files first).
# make test-fast: the same without the end-to-end, Ray, Serve and browser tests (-m "not slow").
# make lint: ruff and a type check (mypy) of the packages.
# make demo: the same install, then ingest -> build -> serve -> a query on bundled samples.
# make install GPU=1: the same with a CUDA torch (see below).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# GPU=1: the registry's CUDA build of the same torch and torchvision instead of the local CPU
# wheel (about 5.5 GB more). The venv remembers it: later make calls keep it; `make clean` to drop.
GPU ?= $(shell test -f $(VENV)/.gpu && echo 1)
ifeq ($(GPU),1)
FLAVOUR := gpu
CONSTRAINTS := $(VENV)/constraints-gpu.txt
PIP_ENV := PIP_FIND_LINKS=" "
else
FLAVOUR := cpu
CONSTRAINTS := constraints.txt
PIP_ENV :=
endif
STAMP := $(VENV)/.installed-$(FLAVOUR)
CHROMIUM := /usr/bin/chromium
export RAY_AUTH_MODE := disabled
export RAY_USAGE_STATS_ENABLED := 0
export HF_HUB_OFFLINE ?= 1

.PHONY: test test-fast lint demo install clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
ifeq ($(GPU),1)
	sed 's/^\(torch==[^+]*\)+cpu$$/\1/' constraints.txt > $(CONSTRAINTS)
	touch $(VENV)/.gpu
endif
	$(PIP_ENV) $(PY) -m pip install -q --disable-pip-version-check -c $(CONSTRAINTS) -e ".[test,bench]"
	touch $(STAMP)

PYTEST := $(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder

test: $(STAMP) $(CHROMIUM)
	$(PYTEST) tests

test-fast: $(STAMP)
	$(PYTEST) -m "not slow" tests

LINT_STAMP := $(VENV)/.lint-stamp
$(LINT_STAMP): $(STAMP)
	$(PIP_ENV) $(PY) -m pip install -q --disable-pip-version-check -c $(CONSTRAINTS) -e ".[lint]"
	touch $(LINT_STAMP)

lint: $(LINT_STAMP)
	$(VENV)/bin/ruff check memescale serve ray_jobs bench tests
	$(VENV)/bin/mypy

# The page's browser test drives Debian's chromium, never a downloaded browser.
$(CHROMIUM):
	DEBIAN_FRONTEND=noninteractive apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium

demo: $(STAMP)
	$(PY) -m memescale.demo

clean:
	rm -rf $(VENV) demo-out .pytest_cache

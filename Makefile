# make test: create .venv if missing, install pinned deps, run the whole test suite.
# make test-fast: the same without the end-to-end, Ray, Serve and browser tests (-m "not slow").
# make lint: ruff and a type check (mypy) of the packages.
# make demo: the same install, then ingest -> build -> serve -> a query on bundled samples.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
CHROMIUM := /usr/bin/chromium
export RAY_AUTH_MODE := disabled
export RAY_USAGE_STATS_ENABLED := 0
export HF_HUB_OFFLINE ?= 1

.PHONY: test test-fast lint demo install clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[test,bench]"
	touch $(STAMP)

test: $(STAMP) $(CHROMIUM)
	$(PY) -m pytest -q tests

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests

LINT_STAMP := $(VENV)/.lint-stamp
$(LINT_STAMP): $(STAMP)
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[lint]"
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

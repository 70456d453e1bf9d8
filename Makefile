# One command each: `make setup`, `make demo`, `make test`, `make test-all`.
# Every target that runs code first makes sure .venv matches requirements.txt.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.stamp
# Hash of what defines the environment: rebuild only when it changes.
ENV_HASH := $(shell cat requirements.txt setup.cfg pyproject.toml | sha256sum | cut -c1-16)
# detectron2 is not on PyPI under its own name; sal-detectron2 is a wheel of official detectron2
# (see README "Installing detectron2"). Its file is tagged cp310, so it goes straight into site-packages.
DETECTRON2 := sal-detectron2==0.7.2

.PHONY: setup demo test test-all bench clean

setup:
	@if [ -f $(STAMP) ] && [ "$$(cat $(STAMP))" = "$(ENV_HASH)" ]; then \
		echo "setup: .venv is up to date ($(ENV_HASH))"; \
	else \
		set -e; \
		echo "setup: building .venv ($(ENV_HASH))"; \
		[ -x $(PY) ] || $(PYTHON) -m venv $(VENV); \
		$(PY) -m pip install -q --upgrade pip; \
		$(PY) -m pip install -q -r requirements.txt; \
		SITE=$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'); \
		$(PY) -m pip install -q --no-deps --only-binary=:all: --python-version 3.10 --upgrade \
			--target "$$SITE" $(DETECTRON2); \
		$(PY) -m pip install -q --no-deps --no-build-isolation -e .; \
		echo "$(ENV_HASH)" > $(STAMP); \
		echo "setup: done"; \
	fi

demo: setup
	$(PY) scripts/demo.py

test: setup
	$(PY) -m pytest -m "not slow" -q

test-all: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) benchmarks/run_all.py

clean:
	rm -rf $(VENV) output .pytest_cache

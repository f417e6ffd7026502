# psiopt: `make test` (lint + tests) and `make demo` (the main job).  Both create .venv if missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test demo bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

test: $(STAMP)
	$(VENV)/bin/ruff check src tests
	$(PY) -m pytest -q

demo: $(STAMP)
	$(PY) -m psiopt.demo

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache src/*.egg-info

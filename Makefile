# psiopt: `make test` (lint + tests) and `make demo` (the main job).  Both create .venv if missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test demo bench gpu-check clean

# constraints.txt pins this machine's torch build (a CPU wheel from a local file); the package
# itself accepts a range of torch versions.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $(STAMP)

test: $(STAMP)
	$(VENV)/bin/ruff check src tests
	$(PY) -m pytest -q

DEMO_OPTIMIZERS := sgd,adam,sgdg,psi-sgd,psi-sgdm,un-sgd,adamsrt
FASHION := /usr/share/datasets/fashion-mnist

demo: $(STAMP)
	@test -d $(FASHION) || { if [ "$$(id -u)" = 0 ]; then SUDO=; \
	  elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then SUDO="sudo -n"; \
	  else SUDO=none; fi; [ "$$SUDO" != none ] && $$SUDO apt-get update -q \
	  && $$SUDO apt-get install -y -q dataset-fashion-mnist; } \
	  || echo "could not install dataset-fashion-mnist; the demo falls back to synthetic data"
	$(VENV)/bin/psiopt compare --dataset fashion-mnist --fallback-dataset synthetic --model mlp-bn \
	  --optimizers $(DEMO_OPTIMIZERS) --seeds 1 --epochs 20 --milestones 10,15 --out runs/demo

bench: $(STAMP)
	$(PY) -m pip install --quiet -c constraints.txt -e ".[compare]" || echo "adamp/geoopt not installed: peers skipped"
	$(VENV)/bin/psiopt bench

# On a GPU machine (CUDA build of torch and psiopt installed, e.g. `pip install -e .`): the CUDA
# tests (a skipped one fails), `psiopt bench --device cuda`, a short CUDA training run; writes
# gpu-report.md and exits 1 on any failure.  No $(STAMP): constraints.txt pins a CPU torch.
gpu-check:
	scripts/gpu_check.sh

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache src/*.egg-info

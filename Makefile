# mm1_jax: `make test` sets up .venv (Python 3.11) on first use, then runs pytest.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --disable-pip-version-check
# The runtime environment (train, evaluate, generate, convert), and the test-only
# packages on top (torch CPU, transformers, onnxruntime, pytest, ...).
RUNTIME := $(VENV)/.installed-runtime
DEV := $(VENV)/.installed-dev

.PHONY: setup setup-dev test train summary bench pretrained clean

setup: $(RUNTIME)
setup-dev: $(DEV)

# Each re-installs whenever its requirements files change.
$(RUNTIME): requirements.txt requirements-nodeps.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) -r requirements.txt
	$(PIP) --no-deps -r requirements-nodeps.txt
	touch $@

$(DEV): $(RUNTIME) requirements-dev.txt requirements-dev-nodeps.txt
	$(PIP) -r requirements.txt -r requirements-dev.txt
	$(PIP) --no-deps -r requirements-dev-nodeps.txt
	touch $@

# Two workers, whole files per worker (module fixtures stay shared).
test: setup-dev
	$(PY) -m mm1_jax.data.sources
	$(PY) -m pytest -n 2 --dist loadfile --durations=15

# The default experiment: tiny MM1 (ViT + C-Abstractor + MoE LLM) on mm1_pretrain.
WORKDIR ?= workdirs/tiny
train: setup
	$(PY) -m mm1_jax.train --config=configs/tiny.py --workdir=$(WORKDIR)

# Parameter counts, FLOPs and memory of a config: make summary CONFIG=configs/mm1_30b.py
CONFIG ?= configs/mm1_3b.py
summary: setup
	$(PY) -m mm1_jax.summary --config=$(CONFIG)

# The pretrained towers of configs/mm1_smol.py, converted from the installed
# packages (SmolLM2-135M GGUF, DINOv2-S/14 ONNX): make pretrained
pretrained: checkpoints/dinov2_s14 checkpoints/smollm2_135m
checkpoints/dinov2_s14: | setup
	$(PY) -m mm1_jax.convert --source=dinov2_small --output=$@
checkpoints/smollm2_135m: | setup
	$(PY) -m mm1_jax.convert --source=smollm2 --output=$@ --vocab_size=49216

bench: setup
	$(PY) benchmarks/model_forward.py --config=configs/tiny.py

clean:
	rm -rf $(VENV) .pytest_cache

# mm1_jax: `make test` sets up .venv (Python 3.11) on first use, then runs pytest.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --disable-pip-version-check
# The runtime environment (train, evaluate, generate, convert), and the test-only
# packages on top (torch CPU, transformers, onnxruntime, pytest, ...).
RUNTIME := $(VENV)/.installed-runtime
DEV := $(VENV)/.installed-dev
# The emoji dataset's images (mm1_jax/data/sources/emoji.py): an npm package, fetched
# once into the venv; nothing downloads when training or testing runs.
EMOJI_PACKAGE := emoji-datasource-google@16.0.0
EMOJI_TARBALL := $(VENV)/share/mm1_jax/emoji-datasource-google-16.0.0.tgz

.PHONY: setup setup-dev test train summary bench pretrained clean

setup: $(RUNTIME)
setup-dev: $(DEV)

# Each re-installs whenever its requirements files change. The tarball is order-only:
# fetched whenever it is missing (an existing venv too), never a cause to re-install.
$(RUNTIME): requirements.txt requirements-nodeps.txt | $(EMOJI_TARBALL)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) -r requirements.txt
	$(PIP) --no-deps -r requirements-nodeps.txt
	touch $@

# npm pack writes the tarball into the current folder; it lands under a temporary
# name first, so an interrupted fetch leaves no partial file for make to trust.
$(EMOJI_TARBALL):
	@command -v npm >/dev/null 2>&1 || { echo "npm not found: install Node.js/npm (the emoji dataset's tarball comes from the npm registry), then run make setup again" >&2; exit 1; }
	rm -rf $@.partial && mkdir -p $@.partial
	cd $@.partial && npm pack --silent $(EMOJI_PACKAGE) >/dev/null
	mv $@.partial/$(notdir $@) $@ && rm -rf $@.partial

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

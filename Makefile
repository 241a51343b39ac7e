# rlvr-ray: two commands on a fresh machine.
#   make demo   set up .venv, build the lab checkpoint families, scan them, print the headline
#   make test   set up .venv with the dev tools and run the tests (slow ones: make test-slow)
PY ?= python3
# where torch comes from; e.g. make setup TORCH_INDEX=https://download.pytorch.org/whl/cpu for
# the CPU-only build (on Linux, PyPI's torch is the CUDA one). Default: pip's configured index.
TORCH_INDEX ?=
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# the versions the tests run on (pyproject.toml declares ranges)
	$(BIN)/pip install -q torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/pip install -q -e '.[lab,report,dev]' 'ray[default]==2.60.0'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/rlvr-ray demo --out demo-out

test: $(STAMP)
	$(BIN)/ruff check rlvr_ray tests jobs benchmarks
	$(BIN)/pytest -q

test-slow: $(STAMP)
	$(BIN)/pytest -q -m slow

.PHONY: setup demo test test-slow

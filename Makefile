# rlvr-ray: two commands on a fresh machine.
#   make demo   set up .venv, build the lab checkpoint families, scan them, print the headline
#   make test   set up .venv with the dev tools and run the tests (slow ones: make test-slow)
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# the CPU wheel of torch; an unpinned torch would pull a multi-GB CUDA build
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[lab,report,dev]'
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

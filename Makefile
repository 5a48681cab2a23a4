# `make demo` and `make test` are all a fresh clone needs (see README.md).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv demo test lint leaderboard clean

venv: $(STAMP)

# torch goes in first and is then held by constraints.txt, so nothing later pulls a CUDA
# build (or torchvision, which breaks diffusers/peft imports beside CPU torch 2.13).
$(STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e '.[dev,world,plots]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/ddistill demo

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

lint: $(STAMP)
	$(BIN)/ruff check diffusion_distill tests benchmarks examples

leaderboard: $(STAMP)
	$(BIN)/python benchmarks/leaderboard.py

clean:
	rm -rf $(VENV) runs .pytest_cache

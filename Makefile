# Two commands do all the set-up: `make demo` (install + the main job), `make test` (dev install + tests).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: demo test lint docs sweep bench

$(BIN)/surgeon: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e .
	touch $@

$(VENV)/.dev: $(BIN)/surgeon
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

demo: $(BIN)/surgeon
	$(BIN)/surgeon patch resnet50 --policy spd --out out/resnet50-spd --force

test: $(VENV)/.dev
	$(BIN)/python -m pytest -n 2 -q

lint: $(VENV)/.dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy surgeon
	$(BIN)/python -m pytest -q -n 0 tests/test_architecture.py

# every generated page (docs/coverage.md, docs/benchmarks.md, the README's coverage sentence)
# rendered again from the committed records; run after any change to surgeon/ or configs/
docs: $(VENV)/.dev
	$(BIN)/python scripts/pages.py

# Two commands do all the set-up: `make demo` and `make test`.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
TORCH   ?= torch==2.14.1 torchvision==0.29.1

.PHONY: install demo test lint format bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# Re-install only when the project metadata changed (idempotent).
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/python -m dssn.demo

test: install
	$(BIN)/python -m pytest -q tests

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: install
	$(BIN)/python benchmarks/step.py
	$(BIN)/python benchmarks/data.py
	$(BIN)/python benchmarks/scaling.py
	$(BIN)/python benchmarks/ddp_cpu.py
	$(BIN)/python benchmarks/search.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache

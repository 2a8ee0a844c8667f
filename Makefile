# The two set-up commands of the README: `make demo` and `make test`. Each creates/refreshes .venv.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv demo test test-all lint format clean bench-quick

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch/torchvision are pinned at install time: both lie on local disk; PyPI's torchvision does not
	# import beside the local CPU torch 2.13 (see DEVELOPERS.md).
	$(BIN)/python -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m jobs.demo

test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not gpu" --timeout 900 --durations=30

test-all: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check pipeline model jobs tests benchmarks
	$(BIN)/ruff format --check pipeline model jobs tests benchmarks

format: $(STAMP)
	$(BIN)/ruff format pipeline model jobs tests benchmarks
	$(BIN)/ruff check --fix pipeline model jobs tests benchmarks

clean:
	rm -rf $(VENV) demo_out .pytest_cache

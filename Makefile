# The two set-up commands of the README: `make demo` and `make test`. Each creates/refreshes .venv.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv demo test test-all lint format clean bench-quick studies

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

# The four CPU studies one after the other (data generated on first use, then shared through studies/_cpu_shared);
# docs/studies/README.md holds what they measured and how long they took.
STUDIES := scratch_vs_pretrained masking_ratio quality_vs_quantity domain_shift
studies: $(STAMP)
	@for s in $(STUDIES); do \
	  start=$$(date +%s); $(BIN)/vmae study --config configs/study/$$s.yaml || exit 1; \
	  echo "study $$s: $$(( $$(date +%s) - start )) s"; done

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

# make test   the README's test command: .venv, dependencies, a broker, lint, pytest
# make bench  this layer beside InMemoryChannelLayer and channels_redis, one run
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: test lint format bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test,bench]'
	touch $@

test: $(BIN)/.installed
	scripts/ensure-broker
	$(MAKE) --no-print-directory lint
	$(BIN)/python -m pytest

lint: $(BIN)/.installed
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

format: $(BIN)/.installed
	$(BIN)/ruff check --fix src tests bench
	$(BIN)/ruff format src tests bench

bench: $(BIN)/.installed
	scripts/ensure-broker
	$(BIN)/python bench/compare.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache .ruff_cache

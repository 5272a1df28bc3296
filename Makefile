# make demo   the chat demo on two servers (http://127.0.0.1:8001/ and :8002/); Ctrl-C stops it
# make test   the README's test command: .venv, dependencies, Chromium, a broker, lint, types, docs, pytest
# make test-brokers the integration tests (both loops, clusters, Django, runworker) against RabbitMQ 4.x
#             with Khepri and 4.3's defaults: scripts/rabbitmq4 builds it once (Debian 13's 4.0.5, about
#             500 MB in /var/cache/channels-rabbitmq) and runs its nodes beside the system broker
# make test-matrix  the unit and core integration tests on Python 3.10-3.13 x Django 5.2 and 6.1 (nox)
# make dist   the sdist and the wheel in dist/, checked (twine check --strict, scripts/check-dist)
# make bench  this layer beside InMemoryChannelLayer and channels_redis, one run
# make docs   the documentation site (docs/, mkdocs.yml) built with --strict into build/site
# make bench-plots  scaling curves of this layer and its peers (message size, groups, channels,
#             server processes) as PNG files and JSON in docs/img/bench/; about 15 minutes
#             (python -m bench --axes all --rounds 3; not part of make test; e.g. make bench-plots
#             BENCH_PLOTS_ARGS="--rounds 1 --axes size")
# make soak   5 minutes of traffic and random faults on a private 3-node cluster, then a ledger table
#             (not part of make test; e.g. make soak SOAK_ARGS="--seconds 60 --seed 7")
# Each starts a private RabbitMQ node (scripts/with-broker) when nothing answers at AMQP_URL.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
LINTED := src tests testbed bench example soak scripts/with-broker scripts/check-dist scripts/rabbitmq4 \
	scripts/amqp-rtt-floor noxfile.py

# Tests wait on the broker, servers and rabbitmqctl far more than they compute: 4 workers on 2 cores,
# each with whole files (module fixtures: a cluster, a node) and a vhost of its own.
PYTEST_WORKERS ?= -n 4 --dist loadfile
# What the 4.x leg runs: every integration test but those of this machine's own set-up (the
# scripts/with-broker bootstrap, the Chromium demo) and the benchmarks, which measure, not check.
BROKER_TESTS := tests/integration --ignore=tests/integration/test_with_broker.py \
	--ignore=tests/integration/test_demo_browser.py --ignore=tests/integration/test_bench.py \
	--ignore=tests/integration/test_bench_axes.py --ignore=tests/integration/test_bench_e2e.py

.PHONY: demo test test-brokers test-matrix dist lint typecheck docs format bench bench-plots soak clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test,bench,demo,docs,prometheus,dev]'
	touch $@

demo: $(BIN)/.installed
	$(BIN)/python scripts/with-broker -- $(BIN)/python example/serve.py

test: $(BIN)/.installed
	scripts/ensure-chromium
	$(MAKE) --no-print-directory lint
	$(MAKE) --no-print-directory typecheck
	$(MAKE) --no-print-directory docs
	$(BIN)/python scripts/with-broker -- $(BIN)/python -m pytest $(PYTEST_WORKERS) $(PYTEST_ARGS)

test-brokers: $(BIN)/.installed
	$(BIN)/python scripts/rabbitmq4 run -- $(BIN)/python -m pytest $(PYTEST_WORKERS) $(BROKER_TESTS) $(PYTEST_ARGS)

test-matrix: $(BIN)/.installed
	$(BIN)/python scripts/with-broker -- $(BIN)/nox $(NOX_ARGS)

dist: $(BIN)/.installed
	rm -rf dist build
	$(BIN)/python -m build --outdir dist .
	$(BIN)/twine check --strict dist/*
	$(BIN)/python scripts/check-dist dist

lint: $(BIN)/.installed
	$(BIN)/ruff check $(LINTED)
	$(BIN)/ruff format --check $(LINTED)
	$(BIN)/lint-imports

typecheck: $(BIN)/.installed
	$(BIN)/mypy

# NO_MKDOCS_2_WARNING silences Material's end-of-life banner; --strict fails on any warning.
docs: $(BIN)/.installed
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

format: $(BIN)/.installed
	$(BIN)/ruff check --fix $(LINTED)
	$(BIN)/ruff format $(LINTED)

bench: $(BIN)/.installed
	$(BIN)/python scripts/with-broker -- $(BIN)/python -m bench $(BENCH_ARGS)

bench-plots: $(BIN)/.installed
	$(BIN)/python scripts/with-broker -- $(BIN)/python -m bench --axes all --rounds 3 $(BENCH_PLOTS_ARGS)

soak: $(BIN)/.installed
	$(BIN)/python scripts/with-broker -- $(BIN)/python -m soak.run $(SOAK_ARGS)

clean:
	rm -rf $(VENV) .nox build dist src/*.egg-info .pytest_cache .ruff_cache .hypothesis artifacts

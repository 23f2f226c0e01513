# Everything a fresh machine needs: `make demo` and `make test` set up what they use first.
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV   := .venv
PY     := $(VENV)/bin/python
INGEST := $(VENV)/bin/ingest
UV_VERSION := 0.13.9
# DAGSTER_HOME must be absolute: this repo's dagster_home/ (SQLite storage, committed dagster.yaml).
export DAGSTER_HOME := $(CURDIR)/dagster_home

.PHONY: help setup stack down demo test chaos ui bench lint fmt clean

help:
	@echo "make demo   - set up, start the brokers, ingest the shipped pipelines end to end, print the tables"
	@echo "make test   - set up, start the brokers, run the whole test suite (with the chaos suite's fast subset)"
	@echo "make chaos  - the full fault-injection matrix (kills, broker restarts, concurrent runs, poison) and its table"
	@echo "make ui     - the Dagster UI (dagster dev) on http://localhost:3000"
	@echo "make bench  - throughput vs the bare clients, per-batch overhead, memory, freshness (BENCH=\"memory --quick\" for a part)"
	@echo "make down   - stop the brokers this stack started"

# Python deps from the lock file (uv is installed from PyPI if missing), compiled to bytecode once: uv leaves
# that to the first import, which never writes it when PYTHONDONTWRITEBYTECODE is set, and then every
# process (`ingest run`, the daemon, each run) compiles Dagster from source again (~4.6 s of its start-up).
$(VENV)/.installed: pyproject.toml uv.lock
	@python3 -m uv --version >/dev/null 2>&1 || python3 -m pip install -q --root-user-action=ignore "uv==$(UV_VERSION)"
	python3 -m uv sync --frozen --compile-bytecode
	@touch $@

# System packages (nats-server, mosquitto; apt-get when root), Kafka's jars and the schema registry (Maven Central).
setup: $(VENV)/.installed
	@$(PY) -m compileall -q ingest_defs  # this package's bytecode too (only what changed)
	$(PY) -c "from ingest_defs.stack import manager, registry; manager.ensure_system_packages(); manager.ensure_kafka_jars(); registry.ensure_dist()"
	$(PY) -m ingest_defs.assets.dbt parse  # dbt/target/manifest.json: the code location loads it, never parses
	@# dagster_home's SQLite storages, made once here: two processes making them at once (a daemon and a
	@# webserver, two `ingest run`s) can both stamp the schema version and leave it unusable (dagster#27390)
	$(PY) -c "from dagster import DagsterInstance; DagsterInstance.get().dispose()"

stack: setup
	$(INGEST) stack up

down:
	$(INGEST) stack down

demo: stack
	$(INGEST) validate
	$(INGEST) produce iot_temperature --count 0   # registers the MQTT session first: the broker queues from now on
	$(INGEST) produce user_activity --count 20000 --bad-fraction 0.01 --seed 7
	$(INGEST) produce page_events --count 5000 --bad-fraction 0.01 --seed 7 --key page_loaded
	$(INGEST) produce jobs --count 3000 --bad-fraction 0.01 --seed 7 --key finished
	$(INGEST) produce iot_temperature --count 5000 --bad-fraction 0.01 --seed 7
	$(INGEST) produce orders --count 5000 --bad-fraction 0.01 --seed 7   # Avro via the schema registry
	$(INGEST) run all
	$(INGEST) status
	$(INGEST) show all --rows 5
	$(PY) -m ingest_defs.assets.dbt build --show 5  # dbt build (LAKE_ROOT, DBT_PROFILES_DIR set), gold rows

# The secure-stack tests start `ingest stack up --secure` themselves (and stop it after). The S3 server
# (built once with `go install` from the Go module proxy) and PostgreSQL start here, before pytest's
# per-test timeout runs; their tests reuse them.
test: stack
	$(INGEST) stack up --s3 --postgres
	$(PY) -m pytest ingest_tests -q -p no:cacheprovider --durations=15 -m "not chaos"

chaos: stack
	$(PY) -m pytest ingest_tests/chaos -q -p no:cacheprovider --durations=10

ui: stack
	$(VENV)/bin/dagster dev -w workspace.yaml

bench: stack
	$(PY) -m ingest_defs.bench $(BENCH)

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check ingest_defs ingest_tests

clean:
	rm -rf lake dagster_home/storage dagster_home/history dagster_home/schedules dagster_home/logs

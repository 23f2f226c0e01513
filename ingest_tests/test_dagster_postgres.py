"""Dagster as production runs it: `dagster-daemon` and `dagster-webserver` on PostgreSQL (the committed
deploy/dagster.postgres.yaml, queued run coordinator, pools), the lake on the S3 server.

Three pipelines, one per broker, are ingested by their sensors (several runs at once) while a backfill
launched through the webserver's GraphQL API (the call the UI makes) replays one of them. Target ∪
quarantine must equal what was produced, by payload, and no two runs of one pipeline may overlap.
The stack's PostgreSQL is started once per session (`ingest stack up --postgres`); each test gets a
database of its own.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections import Counter
from pathlib import Path

import dagster as dg
import polars as pl
import pytest

from ingest_defs.assets.ingestion import job_name, quarantine_key, target_key
from ingest_defs.config import REPO_ROOT, PipelineSpec, parse_pipeline
from ingest_defs.ledger import Ledger
from ingest_defs.partitions import partition_key_at
from ingest_defs.resources.brokers import source_for
from ingest_defs.stack import manager, postgres
from ingest_tests.conftest import USER_ACTIVITY_SCHEMA, landed, unique, write_pipelines_file
from ingest_tests.test_backfill_ui import BIN, LAUNCH, free_port, graphql, wait_until

pytestmark = pytest.mark.usefixtures("stack")
BROKERS = ("kafka", "nats", "mqtt")


@pytest.fixture(scope="session")
def postgres_server() -> dict[str, str]:
    """The stack's PostgreSQL, started once per session if it is not up: what dagster.postgres.yaml reads."""
    layout = postgres.Layout(manager.stack_dir() / "postgres")
    if os.environ.get("INGEST_STACK_EXTERNAL") == "1":
        return {k: os.environ[k] for k in os.environ if k.startswith("DAGSTER_POSTGRES_")}
    if manager.status(with_postgres=True, brokers=False) != 0:
        assert manager.up(with_postgres=True, brokers=False) == 0, "could not start PostgreSQL"
    return {**postgres.client_env(), "DAGSTER_POSTGRES_PASSWORD": postgres.load_password(layout)}


@pytest.fixture
def dagster_database(postgres_server: dict[str, str]) -> dict[str, str]:
    """A fresh database for this test's Dagster instance."""
    import psycopg2

    name = unique("dagster").lower()
    conn = psycopg2.connect(host=postgres_server["DAGSTER_POSTGRES_HOSTNAME"],
                            port=int(postgres_server["DAGSTER_POSTGRES_PORT"]),
                            user=postgres_server["DAGSTER_POSTGRES_USER"],
                            password=postgres_server["DAGSTER_POSTGRES_PASSWORD"], dbname="postgres")
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(f'create database "{name}"')
    conn.close()
    return {**postgres_server, "DAGSTER_POSTGRES_DB": name}


def pipeline(broker: str) -> PipelineSpec:
    name = unique(f"pg{broker[0]}")
    source = {"kafka": {"topic": f"t_{name}", "partitions": 2},
              "nats": {"stream": f"S_{name}", "subject": f"{name}.*"},
              "mqtt": {"topics": [f"pg/{name}/+"], "session_expiry_seconds": 3600}}[broker]
    return parse_pipeline(name, {"source": {broker: source}, "schema": USER_ACTIVITY_SCHEMA, "table": f"bronze/{name}",
                                 "keep_raw": True, "batch": {"max_messages": 150, "idle_ms": 300},
                                 "trigger": {"sensor": {"interval_seconds": 1}}})


def payloads(spec: PipelineSpec, start: int, count: int) -> list[bytes]:
    """Unique payloads (the spec's name and a sequence number), every 10th one failing the schema."""
    return [json.dumps({"id": i, "event": "click" if i % 10 else "purchase", "value": i,
                        "tag": f"{spec.name}-{i}"}).encode() for i in range(start, start + count)]


def publish(spec: PipelineSpec, batch: list[bytes]) -> None:
    source = source_for(spec)
    try:
        source.ensure_exists()  # the topic/stream; the MQTT session before anything is published
        assert source.publish(batch, [None] * len(batch)) == len(batch)
    finally:
        source.close()


def landed_payloads(spec: PipelineSpec) -> Counter[bytes]:
    target, quarantine = landed(spec)
    return Counter(bytes(r) for frame in (target, quarantine) if not frame.is_empty() for r in frame["_raw"].to_list())


def live_messages(spec: PipelineSpec) -> int:
    ledger = Ledger.of(spec).frame(pl.col("mode") == "live")
    return 0 if ledger.is_empty() else int(ledger["count"].sum())


@pytest.mark.timeout(1800)  # ~2 min on a quiet machine; two services and a dozen run processes on 2 cores
def test_daemon_and_webserver_on_postgres_run_three_pipelines_and_a_backfill(
        s3_lake, dagster_database, tmp_path: Path):
    specs = {broker: pipeline(broker) for broker in BROKERS}
    produced = {b: payloads(s, 0, 400) for b, s in specs.items()}
    for b, spec in specs.items():
        publish(spec, produced[b])
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(REPO_ROOT / "deploy" / "dagster.postgres.yaml", home / "dagster.yaml")
    pipelines = write_pipelines_file(tmp_path / "pipelines.yaml", list(specs.values()))
    env = {**os.environ, **dagster_database, "DAGSTER_HOME": str(home), "INGEST_PIPELINES": str(pipelines)}
    os.environ.update(dagster_database)  # this process reads the same instance
    instance = dg.DagsterInstance.from_config(str(home))  # creates Dagster's tables before the two services start
    port = free_port()
    workspace = ["-w", str(REPO_ROOT / "workspace.yaml")]
    with open(tmp_path / "daemon.log", "w") as daemon_log, open(tmp_path / "webserver.log", "w") as web_log:
        procs = [subprocess.Popen([str(BIN / "dagster-daemon"), "run", *workspace], cwd=REPO_ROOT, env=env,
                                  stdout=daemon_log, stderr=subprocess.STDOUT),
                 subprocess.Popen([str(BIN / "dagster-webserver"), "-h", "127.0.0.1", "-p", str(port), *workspace],
                                  cwd=REPO_ROOT, env=env, stdout=web_log, stderr=subprocess.STDOUT)]
    try:
        assert type(instance.run_storage).__name__ == "PostgresRunStorage"
        assert type(instance.run_coordinator).__name__ == "QueuedRunCoordinator"
        kafka = specs["kafka"]
        wait_until(lambda: live_messages(kafka) > 0, 600, "the Kafka sensor's first runs")
        # more messages for every pipeline while a backfill of today replays the Kafka pipeline
        for b, spec in specs.items():
            more = payloads(spec, 400, 300)
            publish(spec, more)
            produced[b] += more
        keys = [{"path": list(target_key(kafka).path)}, {"path": list(quarantine_key(kafka).path)}]
        launched = graphql(port, LAUNCH, {"params": {"partitionNames": [partition_key_at(kafka)],
                                                     "assetSelection": keys, "fromFailure": False}})
        result = launched["launchPartitionBackfill"]
        assert result["__typename"] == "LaunchBackfillSuccess", result
        backfill_id = result["backfillId"]

        def backfill_run_done() -> str | None:
            runs = instance.get_runs(dg.RunsFilter(tags={"dagster/backfill": backfill_id}))
            done = [r.status for r in runs if r.status in (dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE,
                                                            dg.DagsterRunStatus.CANCELED)]
            return done[0].value if done and len(done) == len(runs) else None

        assert wait_until(backfill_run_done, 300, "the backfill's run to finish") == "SUCCESS"
        for b, spec in specs.items():
            wait_until(lambda s=spec, b=b: live_messages(s) == len(produced[b]), 300, f"the {b} sensor's runs")
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()

    for b, spec in specs.items():
        assert landed_payloads(spec) == Counter(produced[b]), f"{b}: target ∪ quarantine differs from what was produced"
    replays = Ledger.of(kafka).frame(pl.col("mode") == "replay")
    assert not replays.is_empty() and set(replays["generation"]) == {backfill_id}

    # A run is in flight from the moment the coordinator launches it (its pool slot taken) to its end. Runs that
    # never started (a launch that timed out on a loaded machine fails the run; the sensor re-plans) hold nothing.
    # A run a sensor asked for lingers (60 s by default) after its messages landed: one still in flight when
    # the services stop has no end yet, and holds its slot until now.
    now = time.time()
    spans: dict[str, list[tuple[float, float]]] = {}
    for r in (r for r in instance.get_run_records() if r.start_time):
        launched = [e.timestamp for e in instance.all_logs(r.dagster_run.run_id, of_type=dg.DagsterEventType.RUN_STARTING)]
        for spec in specs.values():
            if r.dagster_run.job_name == job_name(spec) or target_key(spec) in (r.dagster_run.asset_selection or ()):
                spans.setdefault(spec.name, []).append((min(launched, default=r.start_time), r.end_time or now))
    instance.dispose()
    for name, runs in spans.items():  # one batch per pipeline at a time (the pools, on Postgres)
        runs.sort()
        for (_, end), (start, _) in zip(runs, runs[1:], strict=False):
            assert start >= end, f"two runs of {name} were in flight at once"
    assert set(spans) == {s.name for s in specs.values()}
    every = sorted((start, end, name) for name, runs in spans.items() for start, end in runs)
    concurrent = [(a[2], b[2]) for i, a in enumerate(every) for b in every[i + 1:] if b[0] < a[1]]
    assert concurrent, "runs of different pipelines were never in flight at the same time"

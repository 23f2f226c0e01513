"""The control room: the webserver loads the code location, and a backfill launched through its GraphQL API
(`launchPartitionBackfill`, the call the UI makes) is run by the daemon, serialised with the sensor's live
micro-batches by the pipeline's pool, and leaves the expected rows."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import dagster as dg
import polars as pl
import pytest

from ingest_defs.assets.ingestion import job_name, quarantine_key, target_key
from ingest_defs.config import REPO_ROOT
from ingest_defs.partitions import partition_key_at
from ingest_defs.samples import make_samples
from ingest_tests.conftest import (
    USER_ACTIVITY_SCHEMA,
    assert_exactly_once,
    kafka_spec,
    landed,
    write_pipelines_file,
)
from ingest_tests.test_backfill import STRICT_EVENTS, ledger_frame, with_schema
from ingest_tests.test_kafka_pipeline import produce

pytestmark = pytest.mark.usefixtures("stack")
BIN = Path(sys.executable).parent

LAUNCH = """mutation($params: LaunchBackfillParams!) {
  launchPartitionBackfill(backfillParams: $params) {
    __typename
    ... on LaunchBackfillSuccess { backfillId }
    ... on PythonError { message }
    ... on PartitionSetNotFoundError { message }
    ... on UnauthorizedError { message }
  }
}"""
STATUS = """query($id: String!) {
  partitionBackfillOrError(backfillId: $id) {
    __typename
    ... on PartitionBackfill { status }
    ... on PythonError { message }
  }
}"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def graphql(port: int, query: str, variables: dict[str, Any] | None = None) -> dict[str, Any]:
    body = json.dumps({"query": query, "variables": variables or {}}).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}/graphql", data=body,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        doc = json.loads(response.read())
    assert "errors" not in doc, doc["errors"]
    return doc["data"]


def wait_until(predicate, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(1)
    raise AssertionError(f"timed out waiting for {what}")


def test_backfill_launched_through_the_webserver_graphql_api(lake, tmp_path: Path):
    strict = kafka_spec(partitions=2, schema=STRICT_EVENTS, batch={"max_messages": 300},
                        trigger={"sensor": {"interval_seconds": 1}})
    fixed = with_schema(strict, USER_ACTIVITY_SCHEMA)
    first = make_samples(fixed, 800, bad_fraction=0.02, seed=71)
    produced = produce(strict, first.payloads, first.keys)
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(REPO_ROOT / "dagster_home" / "dagster.yaml", home / "dagster.yaml")
    pipelines = write_pipelines_file(tmp_path / "pipelines.yaml", [strict])
    env = {**os.environ, "DAGSTER_HOME": str(home), "INGEST_PIPELINES": str(pipelines), "LAKE_ROOT": str(lake)}
    port = free_port()
    workspace = ["-w", str(REPO_ROOT / "workspace.yaml")]
    # Creates the SQLite storages before the two services start: two processes creating them at once can both
    # stamp the schema version, and each then fails at start-up with "more than one head present".
    instance = dg.DagsterInstance.from_config(str(home))
    with open(tmp_path / "daemon.log", "w") as daemon_log, open(tmp_path / "webserver.log", "w") as web_log:
        procs = [subprocess.Popen([str(BIN / "dagster-daemon"), "run", *workspace], cwd=REPO_ROOT, env=env,
                                  stdout=daemon_log, stderr=subprocess.STDOUT),
                 subprocess.Popen([str(BIN / "dagster-webserver"), "-h", "127.0.0.1", "-p", str(port), *workspace],
                                  cwd=REPO_ROOT, env=env, stdout=web_log, stderr=subprocess.STDOUT)]
    try:
        def loaded() -> bool:
            for proc, log in zip(procs, ("daemon.log", "webserver.log"), strict=True):
                if proc.poll() is not None:  # a service that died is a failure now, with its log, not a timeout
                    tail = "\n".join((tmp_path / log).read_text().splitlines()[-30:])
                    raise AssertionError(f"{proc.args[0]} exited ({proc.returncode}):\n{tail}")
            try:
                data = graphql(port, "{ workspaceOrError { ... on Workspace { locationEntries { "
                                     "locationOrLoadError { __typename } } } } }")
            except OSError:
                return False
            entries = data["workspaceOrError"]["locationEntries"]
            return bool(entries) and entries[0]["locationOrLoadError"]["__typename"] == "RepositoryLocation"

        wait_until(loaded, 120, "the webserver to load the code location")
        # the sensor (running by default) ingests the backlog with the too strict schema
        wait_until(lambda: ledger_frame(strict)["count"].sum() == len(produced) if not ledger_frame(strict).is_empty()
                   else False, 120, "the sensor's live runs to ingest the backlog")
        _, quarantine = landed(strict)
        assert quarantine.filter(pl.col("_error").str.contains("event")).height > 50

        # the schema fix is deployed; more messages arrive while a backfill of today runs from the UI's API
        write_pipelines_file(pipelines, [fixed])
        reload = graphql(port, 'mutation { reloadWorkspace { __typename } }')
        assert reload["reloadWorkspace"]["__typename"] == "Workspace"
        second = make_samples(fixed, 600, bad_fraction=0.02, seed=72, start_id=800)
        produced |= produce(strict, second.payloads, second.keys)
        keys = [{"path": list(target_key(fixed).path)}, {"path": list(quarantine_key(fixed).path)}]
        launched = graphql(port, LAUNCH, {"params": {"partitionNames": [partition_key_at(fixed)],
                                                     "assetSelection": keys, "fromFailure": False}})
        result = launched["launchPartitionBackfill"]
        assert result["__typename"] == "LaunchBackfillSuccess", result
        backfill_id = result["backfillId"]

        def backfill_run_done() -> str | None:
            # the run the daemon launched for the backfill (the backfill's own status follows one daemon
            # iteration, 30 s, later)
            runs = instance.get_runs(dg.RunsFilter(tags={"dagster/backfill": backfill_id}))
            done = [r.status for r in runs if r.status in (dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE,
                                                            dg.DagsterRunStatus.CANCELED)]
            return done[0].value if done and len(done) == len(runs) else None

        assert wait_until(backfill_run_done, 180, "the backfill's run to finish") == "SUCCESS"
        status = graphql(port, STATUS, {"id": backfill_id})["partitionBackfillOrError"]
        assert status["__typename"] == "PartitionBackfill", status
        wait_until(lambda: ledger_frame(fixed).filter(pl.col("mode") == "live")["count"].sum() == len(produced),
                   120, "the sensor to ingest the new messages")
    finally:
        instance.dispose()
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()

    target, quarantine = assert_exactly_once(fixed, produced)
    assert not quarantine["_error"].str.contains("isin").any()  # the clicks moved to the target
    replays = ledger_frame(fixed).filter(pl.col("mode") == "replay")
    assert set(replays["generation"]) == {backfill_id} and set(replays["status"]) == {"committed"}
    # one batch per pipeline at a time: no two runs of the job overlapped
    with dg.DagsterInstance.from_config(str(home)) as instance:
        records = [r for r in instance.get_run_records()  # sensor runs of the job and the backfill's asset run
                   if r.dagster_run.job_name == job_name(fixed)
                   or target_key(fixed) in (r.dagster_run.asset_selection or ())]
        spans = sorted((r.start_time, r.end_time) for r in records if r.start_time and r.end_time)
        assert any(r.dagster_run.tags.get("dagster/backfill") == backfill_id for r in records)
        assert len(spans) >= 2
        for (_, end), (start, _) in zip(spans, spans[1:], strict=False):
            assert start >= end, "two runs of one pipeline overlapped"

"""Shared fixtures: the real broker stack (one per session), a lake and a Dagster instance per test,
and helpers that build a pipeline on a topic of its own and run it through its Dagster job."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import polars as pl
import pytest

from ingest_defs.assets.ingestion import job_name, op_name
from ingest_defs.config import REPO_ROOT, PipelineSpec, dump_pipelines, parse_pipeline
from ingest_defs.factory import build_definitions
from ingest_defs.storage import Location, location, table_location

_counter = itertools.count()


@pytest.fixture(scope="session")
def stack() -> Iterator[None]:
    """The brokers on their default ports: reuse the stack `make test` started, or start it."""
    from ingest_defs.stack import manager

    if os.environ.get("INGEST_STACK_EXTERNAL") == "1":  # brokers provided by the caller
        yield
        return
    if manager.status() != 0:
        assert manager.up() == 0, "could not start the broker stack"
    yield


@pytest.fixture(scope="session")
def s3_server() -> dict[str, str]:
    """The stack's S3 server (versitygw), started once per session if it is not up: its client settings."""
    from ingest_defs.stack import manager, s3

    if os.environ.get("INGEST_STACK_EXTERNAL") == "1":  # a server the caller runs: its AWS_* settings
        names = ("AWS_ENDPOINT_URL", "AWS_REGION", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
        return {"INGEST_S3_BUCKET": s3.bucket(), **{k: os.environ[k] for k in names if k in os.environ}}
    if manager.status(with_s3=True, brokers=False) != 0:
        assert manager.up(with_s3=True, brokers=False) == 0, "could not start the S3 server"
    return {**s3.client_env(), **s3.load_secrets(s3.Layout(manager.stack_dir() / "s3"))}


@pytest.fixture
def s3_lake(s3_server: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> str:
    """LAKE_ROOT on the stack's S3 server (a prefix of its own), with the AWS_* settings in the environment."""
    for key, value in s3_server.items():
        monkeypatch.setenv(key, value)
    root = f"s3://{s3_server['INGEST_S3_BUCKET']}/tests/{unique('lake')}"
    monkeypatch.setenv("LAKE_ROOT", root)
    return root


@pytest.fixture
def lake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "lake"
    monkeypatch.setenv("LAKE_ROOT", str(root))
    return root


@pytest.fixture
def instance() -> Iterator[dg.DagsterInstance]:
    with dg.instance_for_test() as inst:
        yield inst


def unique(prefix: str) -> str:
    return f"{prefix}_{os.getpid()}_{next(_counter)}_{uuid.uuid4().hex[:6]}"


USER_ACTIVITY_SCHEMA = {
    "columns": {
        "id": {"dtype": "int64", "nullable": False, "checks": {"ge": 0}},
        "event": {"dtype": "string", "checks": {"isin": ["user_activity", "click"]}},
        "value": {"dtype": "int64"},
    }
}


def kafka_spec(name: str | None = None, partitions: int = 3, **overrides: Any) -> PipelineSpec:
    """A user_activity-like pipeline on a fresh topic of its own."""
    name = name or unique("kp")
    raw: dict[str, Any] = {
        "source": {"kafka": {"topic": f"t_{name}", "partitions": partitions}},
        "schema": USER_ACTIVITY_SCHEMA,
        "table": f"bronze/{name}",
        "batch": {"max_messages": 1000},
        "trigger": {"sensor": {"interval_seconds": 5}},
    }
    raw.update(overrides)
    return parse_pipeline(name, raw)


def write_pipelines_file(path: Path, specs: list[PipelineSpec]) -> Path:
    path.write_text(dump_pipelines(specs))
    return path


def cli_env(specs: PipelineSpec | list[PipelineSpec], tmp_path: Path, lake: Path | None = None, home: str = "dh",
            **extra: str) -> dict[str, str]:
    """The environment of an `ingest` child process (`ingest_cli`): a pipelines file of `specs`, a Dagster home
    `tmp_path/home` whose SQLite storage is created here, once (a daemon, a webserver or two commands creating
    it at the same time can stamp two schema heads and leave the home unusable: dagster#27390), the lake when
    given, and `extra` (faults, broker URLs) on top."""
    specs = [specs] if isinstance(specs, PipelineSpec) else specs
    home_dir = tmp_path / home
    if not home_dir.exists():
        home_dir.mkdir()
        dg.DagsterInstance.from_config(str(home_dir)).dispose()
    env = {"INGEST_PIPELINES": str(write_pipelines_file(tmp_path / f"pipelines-{home}.yaml", specs)),
           "DAGSTER_HOME": str(home_dir)}
    if lake is not None:
        env["LAKE_ROOT"] = str(lake)
    return {**env, **extra}


def run_job(spec: PipelineSpec, instance: dg.DagsterInstance, **config: Any) -> dg.ExecuteInProcessResult:
    """One run of the pipeline's job, in process (the same job a sensor launches)."""
    defs = build_definitions({spec.name: spec})
    job = defs.resolve_job_def(job_name(spec))
    return job.execute_in_process(
        run_config={"ops": {op_name(spec): {"config": config}},
                    "loggers": {"console": {"config": {"log_level": "ERROR"}}}},
        instance=instance, raise_on_error=False)


def run_until_caught_up(spec: PipelineSpec, instance: dg.DagsterInstance, max_runs: int = 50,
                        **config: Any) -> list[dg.ExecuteInProcessResult]:
    results = []
    for _ in range(max_runs):
        result = run_job(spec, instance, max_batches=1, **config)
        assert result.success, failure_message(result)
        results.append(result)
        mat = materialization(result, spec)
        if mat["messages"] == 0 and mat["lag"] == 0:
            return results
    raise AssertionError(f"{spec.name} not caught up after {max_runs} runs")


def materialization(result: dg.ExecuteInProcessResult, spec: PipelineSpec) -> dict[str, Any]:
    from ingest_defs.assets.ingestion import target_key

    mats = [m for m in result.asset_materializations_for_node(op_name(spec)) if m.asset_key == target_key(spec)]
    assert mats, "no materialization of the target table"
    return {k: v.value for k, v in mats[-1].metadata.items()}


def failure_message(result: dg.ExecuteInProcessResult) -> str:
    for event in result.all_events:
        if event.is_failure:
            data = event.event_specific_data
            error = getattr(data, "error", None)
            if error is not None:
                return error.to_string()
    return "run failed"


def read_table(uri: str | Location) -> pl.DataFrame:
    """A whole table (local or S3, through ingest_defs.storage), or an empty frame when there is none."""
    where = uri if isinstance(uri, Location) else location(uri)
    return where.read() if where.exists() else pl.DataFrame()


def landed(spec: PipelineSpec) -> tuple[pl.DataFrame, pl.DataFrame]:
    return read_table(table_location(spec, "target")), read_table(table_location(spec, "quarantine"))


def offsets_of(frame: pl.DataFrame) -> list[tuple[int, int]]:
    if frame.is_empty():
        return []
    return list(zip(frame["_partition"].to_list(), frame["_offset"].to_list(), strict=True))


def assert_exactly_once(spec: PipelineSpec, produced: set[tuple[int, int]]) -> tuple[pl.DataFrame, pl.DataFrame]:
    """target ∪ quarantine holds each produced (partition, offset) exactly once, and nothing else."""
    target, quarantine = landed(spec)
    t, q = offsets_of(target), offsets_of(quarantine)
    assert len(t) == len(set(t)), f"doubled in target: {len(t) - len(set(t))}"
    assert len(q) == len(set(q)), f"doubled in quarantine: {len(q) - len(set(q))}"
    assert not set(t) & set(q), f"in both tables: {sorted(set(t) & set(q))[:5]}"
    union = set(t) | set(q)
    assert union == produced, f"lost {len(produced - union)}, unexpected {len(union - produced)}"
    return target, quarantine


def assert_gap_policy(spec: PipelineSpec, instance: dg.DagsterInstance, lost: set[tuple[int, int]],
                      kept: set[tuple[int, int]]) -> None:
    """The broker dropped `lost` before ingestion: on_gap=fail names the range and fails; skip records it."""
    failed = run_job(spec, instance)
    assert not failed.success
    message = failure_message(failed)
    first, last = min(o for _, o in lost), max(o for _, o in lost)
    assert f"offsets {first}..{last} ({len(lost)} messages)" in message
    assert "on_gap" in message
    skipping = spec.model_copy(update={"on_gap": "skip"})
    result = run_job(skipping, instance)
    assert result.success, failure_message(result)
    assert f"{len(lost)} messages" in json.dumps(materialization(result, skipping)["gaps"])


def ingest_cli(args: list[str], env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    """The `ingest` command in a child process (crash tests SIGKILL it at a fault point)."""
    return subprocess.run([sys.executable, "-m", "ingest_defs", *args], env={**os.environ, **env},
                          capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT)


def wait_for(predicate, timeout: float = 30.0, interval: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError("condition not met in time")

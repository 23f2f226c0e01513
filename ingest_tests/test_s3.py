"""The lake on the stack's S3-compatible server (versitygw): the same pipelines, the same guarantees.

The server is the real one `ingest stack up --s3` runs (started once per session by the `s3_server`
fixture); each test puts its lake under a prefix of its own (`LAKE_ROOT=s3://lake/tests/...`). A lost commit
race on S3 must look like one on local disk (delta-rs's CommitFailedError), which needs the server to
answer a conditional PutObject (`If-None-Match: *`) on an existing key with 412 — checked first, raw.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import boto3
import duckdb
import polars as pl
import pyarrow as pa
import pytest
from botocore.config import Config
from deltalake import CommitProperties, Transaction, write_deltalake

from ingest_defs.assets.dbt import dbt_env, dbt_executable
from ingest_defs.config import REPO_ROOT
from ingest_defs.ledger import Ledger
from ingest_defs.maintenance import maintain_table
from ingest_defs.samples import make_samples
from ingest_defs.stack import manager
from ingest_defs.storage import location, table_location
from ingest_tests.conftest import (
    assert_exactly_once,
    cli_env,
    failure_message,
    ingest_cli,
    kafka_spec,
    landed,
    run_job,
    run_until_caught_up,
    unique,
    wait_for,
)
from ingest_tests.s3_faults import FaultProxy
from ingest_tests.test_kafka_pipeline import group_offsets, produce

pytestmark = pytest.mark.usefixtures("stack")


def s3_client(server: dict[str, str]):
    return boto3.client("s3", endpoint_url=server["AWS_ENDPOINT_URL"], region_name=server["AWS_REGION"],
                        aws_access_key_id=server["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=server["AWS_SECRET_ACCESS_KEY"],
                        config=Config(retries={"max_attempts": 1}, max_pool_connections=16,
                                      request_checksum_calculation="when_required",
                                      response_checksum_validation="when_required"))


# ---------------------------------------------------------------- the server's conditional writes
def at_once(actions: list[Callable[[], Any]]) -> list[Any]:
    """Run the actions in threads released together by a barrier: each one's result or the exception it raised."""
    barrier = threading.Barrier(len(actions))
    out: list[Any] = [None] * len(actions)

    def run(i: int) -> None:
        barrier.wait()
        try:
            out[i] = actions[i]()
        except Exception as exc:  # noqa: BLE001 - the caller inspects it
            out[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(actions))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


@pytest.mark.parametrize("writers,rounds", [(2, 20), (6, 5)])
def test_conditional_put_race_has_exactly_one_winner(s3_server, writers: int, rounds: int):
    """Writers PUT the same new key at once with If-None-Match: *: one 200, the others 412, the winner's bytes."""
    clients = [s3_client(s3_server) for _ in range(writers)]
    bucket, prefix = s3_server["INGEST_S3_BUCKET"], unique("race")
    for r in range(rounds):
        key = f"{prefix}/{r:05d}.json"
        bodies = [f"writer {i} ".encode() + b"x" * (1000 * (i + 1)) for i in range(writers)]
        results = at_once([partial(c.put_object, Bucket=bucket, Key=key, Body=b, IfNoneMatch="*")
                           for c, b in zip(clients, bodies, strict=True)])
        status = [r["ResponseMetadata"]["HTTPStatusCode"] if isinstance(r, dict)
                  else r.response["ResponseMetadata"]["HTTPStatusCode"] for r in results]
        assert sorted(status) == [200] + [412] * (writers - 1), (status, results)
        winner = status.index(200)
        assert clients[0].get_object(Bucket=bucket, Key=key)["Body"].read() == bodies[winner]


def test_delta_commit_race_on_one_version_has_one_winner(s3_lake):
    """delta-rs on S3: two writers commit on the same snapshot with the same app id; one wins, the other gets
    CommitFailedError (as on local disk), and the table holds the winner's row only."""
    where = location(f"{s3_lake}/race")
    where.write(pa.table({"w": pa.array([], pa.int64()), "r": pa.array([], pa.int64())}), mode="error")
    for r in range(4):
        commit = CommitProperties(app_transactions=[Transaction("app", r)])
        results = at_once([partial(write_deltalake, where.open(), pa.table({"w": [i], "r": [r]}), mode="append",
                                   commit_properties=commit) for i in range(2)])
        assert sorted(type(x).__name__ for x in results) == ["CommitFailedError", "NoneType"], results
    table = where.open()
    assert table.transaction_version("app") == 3
    assert sorted(where.read()["r"].to_list()) == [0, 1, 2, 3]


# ---------------------------------------------------------------- the pipeline end to end on S3
def test_kafka_pipeline_on_s3_end_to_end(s3_lake, s3_server, instance, tmp_path: Path):
    spec = kafka_spec(partitions=2, batch={"max_messages": 400})
    samples = make_samples(spec, 2000, bad_fraction=0.03, seed=11)
    produced = produce(spec, samples.payloads, samples.keys)
    run_until_caught_up(spec, instance)
    target, quarantine = assert_exactly_once(spec, produced)
    assert quarantine.height > 0 and quarantine["_error"].null_count() == 0
    assert table_location(spec).uri.startswith("s3://") and table_location(spec).exists()

    # the ledger: one row per source partition and batch, covering every message
    ledger = Ledger.of(spec).frame()
    assert ledger["count"].sum() == len(produced)
    assert set(ledger["target_version"].to_list()) <= set(range(table_location(spec).open().version() + 1))

    # the CLI over the S3 lake
    env = cli_env(spec, tmp_path, COLUMNS="250")  # rich tables unwrapped
    outputs = []
    for args in (["status", spec.name], ["show", spec.name, "--rows", "3"], ["batches", spec.name],
                 ["maintain", spec.name]):
        proc = ingest_cli(args, env)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        outputs.append(proc.stdout + proc.stderr)
    status, show, batches, maintain = outputs
    assert "s3://" in show and f"rows: {target.height}" in show and f"quarantined: {quarantine.height}" in show
    both = pl.concat([target.select("_partition", "_offset"), quarantine.select("_partition", "_offset")])
    ends = both.group_by("_partition").agg(pl.col("_offset").max()).sort("_partition").rows()
    row = next(line for line in status.splitlines() if spec.name in line)
    assert all(f"{p}:{o}" in row for p, o in ends) and "unavailable" not in status, status  # Delta position
    assert ledger["batch_id"].n_unique() == sum(b in batches for b in ledger["batch_id"].unique().to_list())
    assert spec.name in maintain

    # replay every batch from the broker: the same rows, replaced in place
    before = target.sort("_partition", "_offset")
    replay = ingest_cli(["replay", spec.name, "--from", "0", "--to", "5000"], env)
    assert replay.returncode == 0, replay.stdout + replay.stderr
    target, _ = assert_exactly_once(spec, produced)
    assert target.sort("_partition", "_offset").drop("_ingested_at").equals(before.drop("_ingested_at"))
    replays = Ledger.of(spec).frame(pl.col("mode") == "replay")
    assert replays["batch_id"].n_unique() == ledger["batch_id"].n_unique()

    secret = s3_server["AWS_SECRET_ACCESS_KEY"]
    assert all(secret not in text for text in [*outputs, replay.stdout, replay.stderr])


def test_maintenance_on_s3_compacts_checkpoints_cleans_and_vacuums(s3_lake, instance):
    spec = kafka_spec(partitions=1, batch={"max_messages": 50})
    produced = produce(spec, make_samples(spec, 600, bad_fraction=0.0, seed=12).payloads)
    run_until_caught_up(spec, instance)
    where = table_location(spec)
    files_before = len(where.files())
    assert files_before >= 10
    report = maintain_table(where, spec.maintenance, vacuum_retention_hours=0)
    assert report.before.files == files_before and report.after.files == 1
    assert report.vacuumed_files == files_before  # the compacted files, deleted from the bucket
    assert where.files() == [u.rsplit("/", 1)[-1] for u in where.open().file_uris()]
    assert where.files("checkpoint.parquet", log=True), "a checkpoint in _delta_log/"
    assert_exactly_once(spec, produced)
    table = where.open()
    assert table.transaction_version(f"{spec.name}/kafka/{spec.source.kafka.topic}/0") == 599
    assert location(where.uri).open(version=report.checkpoint_version - 1) is not None  # time travel still works


@pytest.mark.parametrize("point", ["before_ledger", "during_target_commit", "after_target_commit"])
def test_crash_at_a_fault_point_on_s3_then_resume(s3_lake, instance, tmp_path: Path, point: str):
    spec = kafka_spec(partitions=2, batch={"max_messages": 300})
    samples = make_samples(spec, 800, bad_fraction=0.05, seed=13)
    produced = produce(spec, samples.payloads, samples.keys)
    crashed = ingest_cli(["run", spec.name, "--max-batches", "1"], cli_env(spec, tmp_path, INGEST_FAULT=point))
    assert crashed.returncode == -signal.SIGKILL, crashed.stdout + crashed.stderr
    if point != "before_ledger":  # that one is on the writer thread, while the main thread may be acknowledging
        assert group_offsets(spec) == {}  # nothing acknowledged
    if point == "during_target_commit":
        target, _ = landed(spec)
        assert target.is_empty()
        assert table_location(spec).files(), "the killed commit's data file is in the bucket, unreferenced"
    run_until_caught_up(spec, instance)
    assert_exactly_once(spec, produced)
    ledger = Ledger.of(spec).frame()
    assert ledger["count"].sum() == len(produced)  # before_ledger: the missing row was rebuilt


# ---------------------------------------------------------------- concurrency and failures of the server
def test_two_writers_race_on_one_table_version(s3_lake, instance, tmp_path: Path):
    """Run A reads its fence, then waits just before its target commit; run B commits the same range; A's
    commit then loses the race on S3 (conditional PUT → delta-rs conflict), A re-plans, nothing doubles."""
    spec = kafka_spec(partitions=1, batch={"max_messages": 1000})
    samples = make_samples(spec, 500, bad_fraction=0.04, seed=14)
    produced = produce(spec, samples.payloads, samples.keys)
    marker = tmp_path / "stalled"
    env = cli_env(spec, tmp_path, INGEST_FAULT="stall:after_quarantine_commit", INGEST_FAULT_FILE=str(marker))
    first = subprocess.Popen([sys.executable, "-m", "ingest_defs", "run", spec.name],
                             env={**os.environ, **env}, cwd=REPO_ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(marker.exists, timeout=180)
        version_seen_by_first = table_location(spec).open().version()
        second = run_job(spec, instance)  # the same range, committed while the first one waits
        assert second.success, failure_message(second)
        assert table_location(spec).open().version() > version_seen_by_first
        marker.unlink()
        out, _ = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
            first.communicate()
    assert first.returncode == 0, out
    assert "another writer committed the same ranges first" in out, out
    assert_exactly_once(spec, produced)


def test_s3_server_killed_during_target_commit_then_restarted(s3_lake, s3_server, instance, tmp_path: Path):
    if os.environ.get("INGEST_STACK_EXTERNAL") == "1":
        pytest.skip("the S3 server is external: this test cannot kill it")
    spec = kafka_spec(partitions=2, batch={"max_messages": 1000})
    samples = make_samples(spec, 600, bad_fraction=0.05, seed=15)
    produced = produce(spec, samples.payloads, samples.keys)
    marker = tmp_path / "stalled"
    env = cli_env(spec, tmp_path, INGEST_FAULT="stall:during_target_commit", INGEST_FAULT_FILE=str(marker),
                  LAKE_S3_MAX_RETRIES="2", LAKE_S3_RETRY_TIMEOUT="5s", LAKE_S3_CONNECT_TIMEOUT="1s")
    run = subprocess.Popen([sys.executable, "-m", "ingest_defs", "run", spec.name, "--max-batches", "1"],
                           env={**os.environ, **env}, cwd=REPO_ROOT, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    server = next(b for b in manager._service_brokers(True, False) if b.name == "s3")
    try:
        wait_for(marker.exists, timeout=180)  # quarantine committed, the target's data file written, no log entry
        pid = manager._our_pid(server)
        assert pid is not None, "the S3 server was not started by this stack"
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: not manager._alive(pid), timeout=30)
        marker.unlink()
        out, _ = run.communicate(timeout=300)
    finally:
        if run.poll() is None:
            run.kill()
            run.communicate()
        assert manager.up(with_s3=True, brokers=False) == 0
    assert run.returncode != 0, out
    assert f"the object store at {s3_server['AWS_ENDPOINT_URL']} failed" in out, out
    assert s3_server["AWS_SECRET_ACCESS_KEY"] not in out
    assert group_offsets(spec) == {}  # nothing acknowledged
    target, _ = landed(spec)
    assert target.is_empty()
    run_until_caught_up(spec, instance)
    assert_exactly_once(spec, produced)


@pytest.fixture
def proxy(s3_server, monkeypatch: pytest.MonkeyPatch):
    """The S3 server behind a fault-injecting proxy; AWS_ENDPOINT_URL points at the proxy."""
    p = FaultProxy(s3_server["AWS_ENDPOINT_URL"]).start()
    monkeypatch.setenv("AWS_ENDPOINT_URL", p.endpoint)
    monkeypatch.setenv("LAKE_S3_MAX_RETRIES", "3")
    monkeypatch.setenv("LAKE_S3_RETRY_TIMEOUT", "20s")
    yield p
    p.stop()


def test_503_answers_are_retried_and_the_batch_lands(s3_lake, proxy: FaultProxy, instance):
    spec = kafka_spec(partitions=1, batch={"max_messages": 1000})
    produced = produce(spec, make_samples(spec, 300, bad_fraction=0.05, seed=16).payloads)
    run_until_caught_up(spec, instance)  # creates the tables
    more = produce(spec, make_samples(spec, 200, bad_fraction=0.05, seed=17).payloads)
    proxy.configure(fail_next=3, clear=True)  # the next three requests, whatever they are, get 503 Slow Down
    result = run_job(spec, instance)
    assert result.success, failure_message(result)
    assert sum(s.status == 503 for s in proxy.seen()) == 3
    assert_exactly_once(spec, produced | more)


@pytest.mark.parametrize("fault", ["503", "slow"])
def test_a_failing_or_slow_server_fails_the_run_clearly_within_the_retry_budget(
        s3_lake, s3_server, proxy: FaultProxy, instance, monkeypatch: pytest.MonkeyPatch, fault: str):
    spec = kafka_spec(partitions=1, batch={"max_messages": 1000})
    produced = produce(spec, make_samples(spec, 200, bad_fraction=0.0, seed=18).payloads)
    run_until_caught_up(spec, instance)
    more = produce(spec, make_samples(spec, 100, bad_fraction=0.0, seed=19).payloads)
    if fault == "503":
        proxy.configure(always_503=True, clear=True)
    else:
        monkeypatch.setenv("LAKE_S3_TIMEOUT", "1s")
        proxy.configure(delay_seconds=2.5, clear=True)  # every answer arrives after the client gave up on it
    result = run_job(spec, instance)
    seen = proxy.seen()
    proxy.configure()
    assert not result.success
    message = failure_message(result)
    assert f"the object store at {proxy.endpoint} failed" in message, message
    assert "max_retries" in message and s3_server["AWS_SECRET_ACCESS_KEY"] not in message
    # bounded: the first request that failed was tried 1 + LAKE_S3_MAX_RETRIES times, no more
    first = seen[0]
    assert 1 < sum(1 for s in seen if (s.method, s.path) == (first.method, first.path)) <= 1 + 3
    assert group_offsets(spec) == {0: 200}  # the failed batch acknowledged nothing
    run_until_caught_up(spec, instance)
    assert_exactly_once(spec, produced | more)


# ---------------------------------------------------------------- dbt over the S3 lake
def test_dbt_reads_the_s3_lake_through_the_delta_plugin(s3_lake, s3_server, instance, tmp_path: Path):
    spec = kafka_spec(name=unique("s3dbt"), partitions=1, table="bronze/user_activity")
    samples = make_samples(spec, 300, bad_fraction=0.0, seed=20)
    produced = produce(spec, samples.payloads, samples.keys)
    run_until_caught_up(spec, instance)
    target, _ = assert_exactly_once(spec, produced)
    warehouse = tmp_path / "warehouse.duckdb"
    env = {**os.environ, **dbt_env(s3_lake), "DBT_DUCKDB_PATH": str(warehouse), "DBT_TARGET_PATH": str(tmp_path / "t")}
    build = subprocess.run([dbt_executable(), "build", "--select", "+gold_user_activity_1m"], env=env, cwd=REPO_ROOT,
                           capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stdout[-4000:] + build.stderr[-2000:]
    assert s3_server["AWS_SECRET_ACCESS_KEY"] not in build.stdout + build.stderr
    with duckdb.connect(str(warehouse), read_only=True) as con:
        events, version = con.execute("select sum(event_count), max(bronze_version) from gold.user_activity_1m").fetchone()
    assert events == target.height
    assert version == table_location(spec).open().version()
    assert not (Path(REPO_ROOT) / "dbt" / "s3:").exists()

"""Table maintenance: compaction, checkpoints, log cleanup and vacuum beside live batches, losing nothing."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import dagster as dg
import polars as pl
import pytest
from confluent_kafka import Producer
from deltalake import CommitProperties, DeltaTable, Transaction, write_deltalake

from ingest_defs.config import MaintenanceSpec
from ingest_defs.factory import build_definitions
from ingest_defs.jobs.maintenance import maintenance_job_name
from ingest_defs.ledger import Ledger, ledger_rows
from ingest_defs.maintenance import LOG_CLEANUP_EVERY, maintain_table
from ingest_defs.resources.brokers import DEFAULT_KAFKA, source_for
from ingest_defs.samples import make_samples
from ingest_defs.sink import DeltaTableSink
from ingest_defs.sources.base import PartitionRange
from ingest_tests.conftest import (
    assert_exactly_once,
    failure_message,
    kafka_spec,
    materialization,
    run_job,
    write_pipelines_file,
)

BOOTSTRAP = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", DEFAULT_KAFKA)
DAY = 24 * 3600


def _age(paths: list[Path], seconds: float) -> None:
    """Make files look older: log cleanup and vacuum judge age by modification time."""
    when = time.time() - seconds
    for path in paths:
        if path.exists():
            os.utime(path, (when, when))


@pytest.mark.usefixtures("stack")
def test_maintenance_beside_live_batches_loses_and_doubles_nothing(lake, instance):
    spec = kafka_spec(partitions=2, batch={"max_messages": 40},
                      maintenance={"target_file_size_mb": 1, "time_travel_hours": 1})
    source = source_for(spec)
    source.ensure_exists()
    source.close()
    produced: set[tuple[int, int]] = set()
    payloads = make_samples(spec, 1200, bad_fraction=0.05, seed=3).payloads
    done_producing = threading.Event()

    def produce() -> None:
        producer = Producer({"bootstrap.servers": BOOTSTRAP, "linger.ms": 2, "enable.idempotence": True})

        def on_delivery(err, msg):
            assert err is None, err
            produced.add((msg.partition(), msg.offset()))

        for start in range(0, len(payloads), 60):  # a steady trickle, so live batches keep coming
            for value in payloads[start:start + 60]:
                producer.produce(spec.source.kafka.topic, value=value, on_delivery=on_delivery)
            producer.flush(30)
            time.sleep(0.05)
        done_producing.set()

    # Maintenance runs in its own thread (a separate run in production) while the main thread ingests.
    reports: list = []
    maintenance_errors: list[BaseException] = []
    stop = threading.Event()

    def maintain() -> None:
        try:
            while not stop.is_set():
                for uri in (spec.table_uri(), spec.quarantine_uri(), spec.ledger_uri()):
                    reports.append(maintain_table(uri, spec.maintenance))
                time.sleep(0.2)
        except BaseException as exc:  # reported below, with the rows check
            maintenance_errors.append(exc)

    threads = [threading.Thread(target=produce), threading.Thread(target=maintain)]
    for t in threads:
        t.start()
    ingest_failures: list[str] = []
    try:
        for _ in range(200):
            finished = done_producing.is_set()
            result = run_job(spec, instance, max_batches=3)
            if not result.success:
                ingest_failures.append(failure_message(result))
                break
            if finished and materialization(result, spec)["lag"] == 0:
                break
    finally:
        stop.set()
        for t in threads:
            t.join(120)

    assert not ingest_failures, ingest_failures[0]
    target, quarantine = assert_exactly_once(spec, produced)
    assert quarantine.height > 0 and target.height > 0
    assert not maintenance_errors, repr(maintenance_errors[0])
    ran = [r for r in reports if r.before is not None]
    assert any(r.files_compacted for r in ran), f"no pass of {len(ran)} compacted anything"
    assert all(r.vacuumed_files == 0 for r in ran)  # time travel kept: nothing younger than an hour is vacuumed
    assert list(Path(spec.table_uri(), "_delta_log").glob("*.checkpoint.parquet"))

    # The scheduled job does the same and shows files and bytes before/after on each table's asset.
    job = build_definitions({spec.name: spec}).resolve_job_def(maintenance_job_name(spec))
    result = job.execute_in_process(instance=instance, raise_on_error=False)
    assert result.success, failure_message(result)
    observed = {e.asset_key.path[-1]: e.event_specific_data.asset_observation.metadata
                for e in result.all_events if e.event_type == dg.DagsterEventType.ASSET_OBSERVATION}
    assert set(observed) == {spec.asset_key_path[-1], spec.quarantine_key_path[-1]}
    for metadata in observed.values():
        assert {"files_before", "files_after", "bytes_before", "bytes_after"} <= set(metadata)
    assert_exactly_once(spec, produced)  # and still exactly once after the last pass


def test_log_cleanup_and_vacuum_keep_the_offsets_and_the_rows(tmp_path: Path):
    uri = str(tmp_path / "t")
    for i in range(30):  # 30 small batches, each recording its offset like a pipeline does
        write_deltalake(uri, pl.DataFrame({"_offset": [i], "v": [f"row-{i}"]}).to_arrow(), mode="append",
                        commit_properties=CommitProperties(app_transactions=[Transaction("p/kafka/t/0", i)]))
    log = Path(uri, "_delta_log")
    # what a writer killed between its data file and its log entry leaves behind
    orphan = Path(uri, "part-00000-killed-mid-commit-c000.snappy.parquet")
    orphan.write_bytes(Path(sorted(Path(uri).glob("*.parquet"))[0]).read_bytes())
    data_files = sorted(Path(uri).glob("*.parquet"))
    _age([*log.glob("*.json"), *data_files], 3 * DAY)  # everything so far is three days old

    settings = MaintenanceSpec(time_travel_hours=48)
    report = maintain_table(uri, settings)
    assert report.before.files == 30 and report.after.files == 1
    assert not orphan.exists(), "an old file no commit references was kept"
    assert report.files_compacted == 30
    assert report.vacuumed_files == 1  # the orphan; the compacted files left the table just now: kept for time travel
    table = DeltaTable(uri)
    assert table.transaction_version("p/kafka/t/0") == 29
    assert sorted(pl.from_arrow(table.to_pyarrow_table())["_offset"].to_list()) == list(range(30))
    assert DeltaTable(uri, version=29).version() == 29  # time travel to before the compaction still works

    # Two days later: the removed files and the old log entries have expired.
    _age([*data_files, *log.glob("*.json")], 3 * DAY)
    report = maintain_table(uri, settings, vacuum_retention_hours=0)
    assert report.vacuumed_files == 30
    assert sorted(p.name for p in Path(uri).glob("*.parquet")) == [Path(u).name for u in DeltaTable(uri).file_uris()]
    assert not (log / "00000000000000000000.json").exists(), "expired log entries were not cleaned up"
    table = DeltaTable(uri)
    assert table.transaction_version("p/kafka/t/0") == 29  # offsets live on in the checkpoint
    assert sorted(pl.from_arrow(table.to_pyarrow_table())["v"].to_list()) == sorted(f"row-{i}" for i in range(30))
    config = table.metadata().configuration
    assert config["delta.logRetentionDuration"] == "interval 48 hours"
    assert config["delta.checkpointInterval"] == "10"


def test_a_long_log_on_local_disk_is_reported_with_the_fix(tmp_path: Path, monkeypatch):
    """delta-rs lists all of `_delta_log` on local disk per commit: maintenance counts what cleanup kept and
    warns, naming the setting, once it is long; an expired log cleaned up ends the warning."""
    import ingest_defs.maintenance as maintenance

    uri = str(tmp_path / "t")
    for i in range(30):
        write_deltalake(uri, pl.DataFrame({"v": [i]}).to_arrow(), mode="append")
    monkeypatch.setattr(maintenance, "LOG_ENTRIES_WARNING", 20)
    settings = MaintenanceSpec(time_travel_hours=48)
    report = maintain_table(uri, settings)
    entries = len(list(Path(uri, "_delta_log").iterdir()))
    assert report.log_entries == entries and entries > 30  # 30 commits are young: all kept for time travel
    assert report.metadata()["log_entries"] == entries
    warning = report.log_warning("orders", settings)
    assert warning is not None and "pipeline 'orders'" in warning and f"{entries:,} entries" in warning
    assert "maintenance.time_travel_hours=48" in warning

    _age(list(Path(uri, "_delta_log").glob("*.json")), 3 * DAY)  # two days past the time-travel period
    report = maintain_table(uri, settings)
    assert report.log_entries is not None and report.log_entries < 20
    assert report.log_warning("orders", settings) is None


def test_batch_commits_clean_up_the_log_on_one_commit_in_ten(lake):
    """delta-rs's cleanup after each commit lists and stats all of `_delta_log` (O(log) per batch): batch
    commits to the target and the ledger clean up expired entries only when they write a version that is a
    multiple of LOG_CLEANUP_EVERY, so the log stays bounded without paying that on every batch."""
    spec = kafka_spec()
    target, ledger = DeltaTableSink.of(spec, "target"), Ledger.of(spec)
    frame = pl.DataFrame({"_offset": [0], "v": ["a"]})
    target.ensure_exists(frame, {"topic_id": "t"})
    offsets = iter(range(1000))
    in_target: list[int] = []

    def commit_target() -> int:
        offset = next(offsets)
        in_target.append(offset)
        committed = target.append(frame.with_columns(pl.lit(offset, pl.Int64).alias("_offset")),
                                  {"p/kafka/t/0": offset}, {})
        assert committed.version == DeltaTable(target.uri).version()  # no refresh needed after our own commit
        return committed.version

    def commit_ledger() -> int:
        offset = next(offsets)
        assert ledger.append([_ledger_row(spec, offset)], covered={"p/kafka/t/0": offset})
        return DeltaTable(ledger.uri).version()

    assert LOG_CLEANUP_EVERY == 10
    for uri, commit in ((target.uri, commit_target), (ledger.uri, commit_ledger)):
        while commit() < 3:
            pass
        DeltaTable(uri).alter.set_table_properties({"delta.logRetentionDuration": "interval 1 hours",
                                                     "delta.checkpointInterval": "2"})
        log = Path(uri, "_delta_log")
        _age(list(log.glob("*.json")), DAY)  # every entry so far has expired
        while (version := commit()) < 9:  # checkpoints at every second version, no cleanup
            assert (log / f"{0:020}.json").exists(), f"{uri}: version {version} cleaned up the log"
        assert commit() == 10
        assert not (log / f"{0:020}.json").exists(), f"{uri}: version 10 did not clean up the expired log"
        assert DeltaTable(uri).transaction_version("p/kafka/t/0") is not None
    assert sorted(pl.read_delta(target.uri)["_offset"].to_list()) == in_target


def _ledger_row(spec, offset: int) -> dict:
    return ledger_rows(pipeline=spec.name, batch_id=f"b{offset}", partition_key="2026-12-02", mode="live",
                       status="committed", trigger="test", run_id=None, generation=None,
                       covered=[PartitionRange("p/kafka/t/0", 0, offset, offset)], stats={}, rows_written=1,
                       rows_quarantined=0, target_version=offset, quarantine_version=None,
                       ingested_at=None, started_at=None, qos0_messages=None)[0]


def test_tables_a_pipeline_creates_start_with_its_maintenance_settings(lake):
    """Not only after the first maintenance run (hourly, or never when it is disabled): with delta-rs's default
    checkpoint interval of 100, every open and commit of a new table replays up to 99 JSON commits."""
    spec = kafka_spec(maintenance={"time_travel_hours": 5, "checkpoint_interval": 7})
    target = DeltaTableSink.of(spec, "target")
    target.ensure_exists(pl.DataFrame({"v": ["a"]}), {"kafka.topic": spec.source.kafka.topic})
    ledger = Ledger.of(spec)
    assert ledger.append([_ledger_row(spec, 0)], covered={"p/kafka/t/0": 0})
    for uri in (target.uri, ledger.uri):
        config = DeltaTable(uri).metadata().configuration
        assert config["delta.checkpointInterval"] == "7", uri
        assert config["delta.logRetentionDuration"] == "interval 5 hours", uri
        assert config["delta.deletedFileRetentionDuration"] == "interval 5 hours", uri
    assert DeltaTable(target.uri).metadata().configuration["ingest.kafka.topic"] == spec.source.kafka.topic
    # the ledger keeps file statistics for the columns it is filtered by only (cheaper opens and commits)
    add = pl.DataFrame(DeltaTable(ledger.uri).get_add_actions(flatten=True)).row(0, named=True)
    assert add["min.batch_id"] == "b0" and "min.range_start" not in add


def test_ledger_filters_on_columns_without_statistics_find_every_row_across_checkpoints(lake):
    """The ledger keeps statistics for four columns; filters on the others (ranges, partition, status) must
    still find every row, in files written before and after its checkpoints (every 10 commits)."""
    spec = kafka_spec()
    ledger = Ledger.of(spec)
    for offset in range(25):
        assert ledger.append([_ledger_row(spec, offset)], covered={"p/kafka/t/0": offset})
    assert len(list(Path(ledger.uri, "_delta_log").glob("*.checkpoint.parquet"))) == 2
    hits = ledger.live_batches((pl.col("range_end") >= 5) & (pl.col("range_start") <= 14))
    assert [b.batch_id for b in hits] == [f"b{i}" for i in range(5, 15)]
    assert len(ledger.live_batches(pl.col("source_partition") == 0)) == 25
    assert ledger.frame(pl.col("status") == "committed").height == 25


def test_maintenance_of_a_table_not_created_yet_is_a_no_op(tmp_path: Path):
    report = maintain_table(str(tmp_path / "nothing"), MaintenanceSpec())
    assert report.before is None
    assert report.metadata()["skipped"] == "the table does not exist yet"


def test_ingest_maintain_compacts_only_the_named_pipeline(lake, tmp_path: Path, monkeypatch):
    from ingest_defs import cli

    named, other = kafka_spec(), kafka_spec()
    for spec in (named, other):
        for i in range(5):
            write_deltalake(spec.table_uri(), pl.DataFrame({"_offset": [i]}).to_arrow(), mode="append")
    monkeypatch.setenv("INGEST_PIPELINES", str(write_pipelines_file(tmp_path / "p.yaml", [named, other])))
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    assert cli.main(["maintain", named.name]) == 0
    assert len(DeltaTable(named.table_uri()).file_uris()) == 1
    assert len(DeltaTable(other.table_uri()).file_uris()) == 5

"""Shards without a broker: the partition assignment, the config refusals, and concurrent commits into one
real Delta table (threads and processes racing), the retry on a lost race, the retry cap, and the ledger's
per-partition fence between a live batch and a repair."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import threading
from pathlib import Path

import polars as pl
import pytest
from deltalake import DeltaTable, write_deltalake
from deltalake.exceptions import CommitFailedError

from ingest_defs.config import ConfigError, MaintenanceSpec, parse_pipeline
from ingest_defs.ledger import Ledger, ledger_rows
from ingest_defs.maintenance import maintain_table
from ingest_defs.shards import Shard, assignment, shard_of_app_id, shards_of
from ingest_defs.sink import (
    CommitContentionError,
    ConcurrentBatchError,
    DeltaTableSink,
    commit_with_retries,
)
from ingest_defs.sources.base import PartitionRange
from ingest_tests.conftest import USER_ACTIVITY_SCHEMA


# ---------------------------------------------------------------- assignment
def test_each_partition_has_exactly_one_shard_and_new_partitions_keep_the_old_ones_in_place():
    before = assignment(range(12), 3)
    assert before == {0: [0, 3, 6, 9], 1: [1, 4, 7, 10], 2: [2, 5, 8, 11]}
    after = assignment(range(16), 3)  # four partitions added to the topic
    for shard, owned in before.items():
        assert after[shard][:len(owned)] == owned  # nothing moved: no shard takes over another's partition
    assert sorted(p for owned in after.values() for p in owned) == list(range(16))
    assert {p: i for i, owned in after.items() for p in owned}[13] == 1
    assert assignment([0, 1], 4) == {0: [0], 1: [1], 2: [], 3: []}  # more shards than partitions: idle shards
    assert Shard(1, 3).partitions([0, 1, 4, 5, 7]) == [1, 4, 7] and Shard(1, 3).label == "1/3"
    assert shard_of_app_id("p/kafka/topic.with/slash/13", 3) == 1
    assert shard_of_app_id("p/nats/stream", 3) is None
    with pytest.raises(ValueError, match="does not exist"):
        Shard(3, 3)


def test_shards_is_a_kafka_setting_and_nats_or_mqtt_refuse_it_saying_why():
    kafka = parse_pipeline("sharded", {"source": {"kafka": {"topic": "t", "partitions": 12}},
                                       "schema": USER_ACTIVITY_SCHEMA, "table": "bronze/sharded", "shards": 3})
    assert [s.label for s in shards_of(kafka)] == ["0/3", "1/3", "2/3"]
    assert shards_of(parse_pipeline("one", {"source": {"kafka": {"topic": "t"}}, "schema": USER_ACTIVITY_SCHEMA,
                                            "table": "bronze/one"})) == [Shard(0, 1)]
    for source, why in (({"nats": {"stream": "s", "subject": "s.*"}}, "one ordered sequence"),
                        ({"mqtt": {"topics": ["a/#"]}}, "one connection per client id")):
        with pytest.raises(ConfigError) as err:
            parse_pipeline("p", {"source": source, "schema": USER_ACTIVITY_SCHEMA, "table": "bronze/p", "shards": 2})
        assert err.value.key == "shards" and why in str(err.value) and "Fix:" in str(err.value)
    with pytest.raises(ConfigError, match="shards"):
        parse_pipeline("p", {"source": {"kafka": {"topic": "t"}}, "schema": USER_ACTIVITY_SCHEMA,
                             "table": "bronze/p", "shards": 0})


# ---------------------------------------------------------------- concurrent commits
def rows(writer: int, batch: int, n: int = 50, extra: bool = False) -> pl.DataFrame:
    frame = pl.DataFrame({"_partition": [writer] * n, "_offset": [batch * n + i for i in range(n)]})
    return frame.with_columns(pl.lit("x").alias("country")) if extra else frame


def commit_batches(uri: str, writer: int, batches: int, evolve_at: int | None = None) -> int:
    """One shard's writer: `batches` appends on its own app id, fenced and retried like the lifecycle's."""
    sink = DeltaTableSink(uri, "p", "target")
    retries = 0
    for b in range(batches):
        app_id = f"p/kafka/t/{writer}"
        stored = sink.versions([app_id])[app_id]
        assert stored == (None if b == 0 else (b * 50) - 1), "each batch starts where this writer's last one ended"
        frame = rows(writer, b, extra=evolve_at is not None and b >= evolve_at)  # schema evolution: a metadata change
        retries += sink.append(frame, {app_id: (b + 1) * 50 - 1}, {"ingest.batch_id": f"{writer}-{b}"}).retries
    return retries


# The same writer in a process of its own (only polars, deltalake and the sink imported: a fast start).
PROCESS_WRITER = """
import sys, polars as pl
from ingest_defs.sink import DeltaTableSink
uri, writer, batches, evolve_at = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
sink = DeltaTableSink(uri, "p", "target")
for b in range(batches):
    app_id = f"p/kafka/t/{writer}"
    assert sink.versions([app_id])[app_id] == (None if b == 0 else b * 50 - 1)
    frame = pl.DataFrame({"_partition": [writer] * 50, "_offset": [b * 50 + i for i in range(50)]})
    if 0 <= evolve_at <= b:
        frame = frame.with_columns(pl.lit("x").alias("country"))
    sink.append(frame, {app_id: (b + 1) * 50 - 1}, {"ingest.batch_id": f"{writer}-{b}"})
"""


def assert_every_row_once(uri: str, writers: int, batches: int) -> None:
    table = DeltaTable(uri)
    frame = pl.read_delta(uri)
    assert frame.height == writers * batches * 50
    assert frame.select("_partition", "_offset").n_unique() == frame.height, "a row was written twice"
    for w in range(writers):
        assert table.transaction_version(f"p/kafka/t/{w}") == batches * 50 - 1


def test_shards_racing_in_threads_beside_maintenance_land_every_batch_once(tmp_path: Path):
    uri = str(tmp_path / "t")
    DeltaTableSink(uri, "p", "target").ensure_exists(rows(0, 0), {})
    stop = threading.Event()
    churned = []

    def maintenance() -> None:
        # the maintenance job's work (compaction, checkpoint, log cleanup, vacuum) in a loop, and a change of
        # table properties now and then: every append racing that one must retry on the new snapshot
        n = 0
        while not stop.is_set():
            try:
                if n % 2:
                    maintain_table(uri, MaintenanceSpec(checkpoint_interval=10 + n % 4))
                else:
                    DeltaTable(uri).alter.set_table_properties({"delta.checkpointInterval": str(10 + n % 4)})
                n += 1
            except CommitFailedError:
                pass  # it lost to a writer's schema change: the maintenance job retries the same way
            stop.wait(0.03)
        churned.append(n)

    retries: list[int] = []
    writers = [threading.Thread(target=lambda w=w: retries.append(commit_batches(uri, w, 15, evolve_at=10 if w == 0 else None)))
               for w in range(4)]
    churn = threading.Thread(target=maintenance)
    churn.start()
    for t in writers:
        t.start()
    for t in writers:
        t.join()
    stop.set()
    churn.join()
    assert len(retries) == 4 and churned[0] >= 2  # maintenance passes and property changes both ran
    assert_every_row_once(uri, 4, 15)
    assert "country" in [f.name for f in DeltaTable(uri).schema().fields]


def test_shards_racing_in_processes_land_every_batch_once(tmp_path: Path):
    uri = str(tmp_path / "t")
    DeltaTableSink(uri, "p", "target").ensure_exists(rows(0, 0), {})
    writers = [subprocess.Popen([sys.executable, "-c", PROCESS_WRITER, uri, str(w), "12", "6" if w == 1 else "-1"],
                                stderr=subprocess.PIPE, text=True) for w in range(3)]
    for w in writers:
        _, err = w.communicate(timeout=120)
        assert w.returncode == 0, err
    assert_every_row_once(uri, 3, 12)


def test_a_commit_lost_to_a_metadata_change_is_retried_on_the_new_snapshot(tmp_path: Path):
    uri = str(tmp_path / "t")
    sink = DeltaTableSink(uri, "p", "target")
    sink.ensure_exists(rows(0, 0), {})
    sink.versions(["p/kafka/t/0"])  # the fence: our snapshot
    DeltaTable(uri).alter.set_table_properties({"delta.checkpointInterval": "10"})  # another writer, after it
    write_deltalake(uri, rows(1, 0).to_arrow(), mode="append")  # and a plain append: rebased by delta-rs itself
    committed = sink.append(rows(0, 0), {"p/kafka/t/0": 49}, {})
    assert committed.retries == 1 and committed.rows == 50
    assert DeltaTable(uri).transaction_version("p/kafka/t/0") == 49 and pl.read_delta(uri).height == 100


def test_a_commit_on_one_of_our_own_app_ids_is_someone_else_doing_the_batch_never_retried(tmp_path: Path):
    uri = str(tmp_path / "t")
    ours, theirs = DeltaTableSink(uri, "p", "target"), DeltaTableSink(uri, "p", "target")
    ours.ensure_exists(rows(0, 0), {})
    ours.versions(["p/kafka/t/0"])
    theirs.versions(["p/kafka/t/0"])
    theirs.append(rows(0, 0), {"p/kafka/t/0": 49}, {})  # the same partition's batch, by another run
    with pytest.raises(ConcurrentBatchError):
        ours.append(rows(0, 0), {"p/kafka/t/0": 49}, {})
    assert pl.read_delta(uri).height == 50  # written once


def test_the_retry_cap_ends_in_a_clear_failure_and_nothing_is_written(tmp_path: Path):
    uri = str(tmp_path / "t")
    write_deltalake(uri, rows(0, 0).clear().to_arrow())
    stale = DeltaTable(uri)
    other = DeltaTable(uri)
    attempts = []

    def attempt() -> None:  # another writer changes the metadata between our snapshot and every commit
        attempts.append(1)
        other.update_incremental()
        other.alter.set_table_properties({"delta.checkpointInterval": str(10 + len(attempts))})
        write_deltalake(stale, rows(0, 0).to_arrow(), mode="append")

    with pytest.raises(CommitContentionError) as err:
        commit_with_retries(attempt, stale.update_incremental, "pipeline 'p': committing", attempts=3)
    assert len(attempts) == 3
    assert "gave up after 3 attempts" in str(err.value) and "broker keeps its messages" in str(err.value)
    assert pl.read_delta(uri).height == 0


# ---------------------------------------------------------------- the ledger's fence
def _live_record(ledger: Ledger, batch_id: str, r: PartitionRange) -> bool:
    """A live batch's ledger row for range `r`, fenced on its app id as the batch runner records it."""
    return ledger.append(ledger_rows(
        pipeline="p", batch_id=batch_id, partition_key="2026-12-01", mode="live", status="committed",
        trigger="test", run_id="", generation=None, covered=[r], stats={}, rows_written=r.count,
        rows_quarantined=0, target_version=None, quarantine_version=None, ingested_at=None), covered={r.app_id: r.end})


def test_a_repair_racing_a_live_batch_records_it_once_and_a_shard_never_repairs_anothers_batch(tmp_path: Path):
    target_uri, ledger_uri = str(tmp_path / "t"), str(tmp_path / "t_ledger")
    target = DeltaTableSink(target_uri, "p", "target")
    target.ensure_exists(pl.DataFrame({"_partition": [0], "_offset": [0], "_batch_id": ["b"],
                                       "_timestamp": [None]}, schema_overrides={"_partition": pl.Int32,
                                                                                "_timestamp": pl.Datetime("us", "UTC")}), {})

    def commit(batch_id: str, partition: int, start: int, end: int) -> PartitionRange:
        r = PartitionRange(f"p/kafka/t/{partition}", partition, start, end)
        frame = pl.DataFrame({"_partition": [partition] * r.count, "_offset": list(range(start, end + 1)),
                              "_batch_id": [batch_id] * r.count, "_timestamp": [None] * r.count},
                             schema_overrides={"_partition": pl.Int32, "_timestamp": pl.Datetime("us", "UTC")})
        target.versions([r.app_id])
        target.append(frame, {r.app_id: end}, {"ingest.batch_id": batch_id, "ingest.mode": "live",
                                               "ingest.ranges": json.dumps([r.as_dict()]), "ingest.trigger": "test"})
        return r

    shard0, shard1 = Ledger(ledger_uri, "p"), Ledger(ledger_uri, "p")
    first = commit("b0", 0, 0, 9)
    assert _live_record(shard0, "b0", first)
    # shard 1's batch is committed to the target and not yet to the ledger (in flight) ...
    inflight = commit("b1", 1, 0, 4)
    # ... shard 0's next run repairs only its own partitions: it must not rebuild shard 1's row
    assert shard0.repair(target.table(), str(tmp_path / "q"), ["p/kafka/t/0", "p/kafka/t/2"]) == []
    # a replay repairs every partition and rebuilds it (the shard's process may have died) ...
    assert Ledger(ledger_uri, "p").repair(target.table(), str(tmp_path / "q"), [f"p/kafka/t/{i}" for i in range(3)]) == ["b1"]
    # ... and the live shard, arriving late, finds its offsets recorded: no second row
    assert not _live_record(shard1, "b1", inflight)
    ledger = pl.read_delta(ledger_uri)
    assert sorted(ledger["batch_id"].to_list()) == ["b0", "b1"]
    assert DeltaTable(ledger_uri).transaction_version("p/kafka/t/1") == 4
    # and nothing is behind any more: a repair finds nothing to scan
    assert shard1.repair(target.table(), str(tmp_path / "q"), ["p/kafka/t/1"]) == []


def test_the_versions_a_ledger_remembers_between_its_appends_are_the_tables_at_every_step(tmp_path: Path):
    """A ledger remembers its app ids' versions per ledger version instead of looking each up again on every
    append. Two writers appending in a random order, on shared and on their own ids: what each reports, at
    its own snapshot and at the latest, is what the table holds at that version."""
    uri = str(tmp_path / "t_ledger")
    rng = random.Random(11)
    writers = [Ledger(uri, "p"), Ledger(uri, "p")]
    ids = [f"p/kafka/t/{p}" for p in range(4)]
    ends = dict.fromkeys(ids, -1)
    for step in range(40):
        w = rng.randrange(2)
        app_id = rng.choice(ids[:2] + [ids[2 + w]])  # two shared ids, one of each writer's own
        start = ends[app_id] + 1 if rng.random() < 0.8 else max(0, ends[app_id] - 5)  # sometimes lower offsets
        r = PartitionRange(app_id, int(app_id[-1]), start, start + rng.randrange(1, 10))
        _live_record(writers[w], f"b{step}", r)
        ends[app_id] = max(ends[app_id], r.end)
        for ledger in writers:
            at = ledger.table(refresh=False)
            if at is None:
                continue
            truth = DeltaTable(uri, version=at.version())
            assert ledger.recorded(ids, refresh=False) == {a: truth.transaction_version(a) for a in ids}, step
    latest = DeltaTable(uri)
    for ledger in writers:
        assert ledger.recorded(ids) == {a: latest.transaction_version(a) for a in ids}
    assert {a: latest.transaction_version(a) for a in ids} == {a: e if e >= 0 else None for a, e in ends.items()}


def test_the_versions_a_sink_remembers_between_its_commits_are_the_tables_at_every_step(tmp_path: Path):
    """The same for a target table: two writers committing batches fenced on the versions they read, in a
    random order; a batch whose ids another writer moved fails (ConcurrentBatchError), every other lands."""
    uri = str(tmp_path / "t")
    rng = random.Random(5)
    writers = [DeltaTableSink(uri, "p", "target"), DeltaTableSink(uri, "p", "target")]
    ids = [f"p/kafka/t/{p}" for p in range(4)]
    frame = pl.DataFrame({"x": [1]})
    writers[0].ensure_exists(frame, {})
    expected: dict[str, int | None] = dict.fromkeys(ids)
    for step in range(40):
        w = rng.randrange(2)
        sink = writers[w]
        chosen = rng.sample(ids[:2] + [ids[2 + w]], rng.randrange(1, 3))
        fence = sink.versions(chosen, refresh=rng.random() < 0.5)  # sometimes a snapshot another writer moved
        txns = {a: (fence[a] or 0) + rng.randrange(1, 10) for a in chosen}
        try:
            sink.append(frame, txns, {})  # fenced on the snapshot `versions()` just read
            expected.update(txns)
        except ConcurrentBatchError:
            pass
        for other in writers:
            at = other.table(refresh=False)
            truth = DeltaTable(uri, version=at.version())
            assert other.versions(ids, refresh=False) == {a: truth.transaction_version(a) for a in ids}, step
    for sink in writers:
        assert sink.versions(ids) == expected


def test_a_ledger_append_on_a_stale_snapshot_neither_doubles_a_record_nor_fails_on_a_lower_one(tmp_path: Path):
    """A live batch's ledger append commits on the snapshot its run read at the start (no listing of the log
    per batch). Records made meanwhile by another writer on the same app ids must still be seen: the same
    offsets are not recorded twice, and a record of lower offsets is no reason to fail the batch."""
    uri = str(tmp_path / "t_ledger")

    live, other = Ledger(uri, "p"), Ledger(uri, "p")
    assert _live_record(live, "b0", PartitionRange("p/kafka/t/0", 0, 0, 9))
    live_version = live.table(refresh=False).version()  # the live run's snapshot, read once
    # another writer (a replay's repair) records the live run's next batch first: the live append finds it
    assert _live_record(other, "b1", PartitionRange("p/kafka/t/0", 0, 10, 19))
    assert live.table(refresh=False).version() == live_version  # still stale
    assert not _live_record(live, "b1", PartitionRange("p/kafka/t/0", 0, 10, 19))
    # another writer records lower offsets of the same id than the live batch covers: the live batch records
    assert _live_record(other, "b2", PartitionRange("p/kafka/t/0", 0, 20, 24))
    assert _live_record(live, "b3", PartitionRange("p/kafka/t/0", 0, 25, 29))
    rows = pl.read_delta(uri)
    assert sorted(rows["batch_id"].to_list()) == ["b0", "b1", "b2", "b3"]
    assert DeltaTable(uri).transaction_version("p/kafka/t/0") == 29

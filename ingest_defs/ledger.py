"""The batch ledger: one Delta table per pipeline (`<table>_ledger` next to the target) with one row per
source partition of every committed batch — its exact range, message count, first/last offset and broker
timestamp, trigger, mode, ingestion-time partition, Delta versions and Dagster run id.

Backfills find a partition's batches here (commit metadata is not in checkpoints and log cleanup removes
it, so it cannot be the record). Replays add rows with `mode = replay` and the same batch id.

When it is written: after the target commit (for bounded sources on the writer thread while the broker
acknowledgement goes out, which needs only the target commit; otherwise before it), in a commit of its own
carrying the batch's own transaction ids — the target's per-partition app ids, each at the last offset the
batch covered — so the ledger is fenced exactly like the target: a batch's rows are recorded once, however
many writers try (shards of one pipeline write disjoint ids; a repair racing a live batch on the same ids
loses with delta-rs's "Concurrent transaction" and finds the rows there). A crash between the target
commit and the ledger commit leaves a batch without its rows; `repair()` (run at the start of every live
run, for the run's own partitions, and of every replay) compares each partition's target version with the
ledger's, and only where the target is ahead scans the target's recent commits for live batches without a
ledger row, rebuilding them from the commit's metadata (ranges, trigger, run id) and the rows holding that
`_batch_id` in target and quarantine (count, first/last offset and timestamp). The next plan runs right
after, so the commit metadata it needs is always still in the log. Ledgers written before this kept one
`{pipeline}/ledger` id (the target version recorded): it still bounds the scan of such a table.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import polars as pl
from deltalake import CommitProperties, DeltaTable, Transaction, write_deltalake

from ingest_defs.maintenance import commit_hooks, table_properties
from ingest_defs.sink import ConcurrentBatchError, TxnVersions, commit_with_retries
from ingest_defs.sources.base import PartitionRange
from ingest_defs.storage import Location, location, table_location

TS = pl.Datetime("us", "UTC")
LEDGER_SCHEMA: dict[str, pl.DataType] = {
    "pipeline": pl.String(),
    "batch_id": pl.String(),
    "partition_key": pl.String(),  # the ingestion-time partition (UTC) the batch belongs to
    "mode": pl.String(),  # live | replay
    "status": pl.String(),  # committed | not replayed: <why>
    "trigger": pl.String(),
    "run_id": pl.String(),
    "generation": pl.String(),  # replays: the backfill generation (Dagster backfill id or replay id)
    "app_id": pl.String(),
    "source_partition": pl.Int32(),
    "range_start": pl.Int64(),  # inclusive covered range (may hold offsets without messages)
    "range_end": pl.Int64(),
    "count": pl.Int64(),  # messages read in the range
    "first_offset": pl.Int64(),
    "last_offset": pl.Int64(),
    "first_timestamp": TS,  # broker timestamps (Kafka record time, JetStream stored time, MQTT receive time)
    "last_timestamp": TS,
    "rows_written": pl.Int64(),  # whole batch (all source partitions)
    "rows_quarantined": pl.Int64(),
    "target_version": pl.Int64(),
    "quarantine_version": pl.Int64(),
    "ingested_at": TS,  # `_ingested_at` of the batch's rows (replays keep it)
    "committed_at": TS,
    "started_at": TS,  # live batches: when the batch began reading (batch duration = committed_at - started_at)
    # MQTT: messages delivered at QoS 0 (at most once; null for other sources). Added after the first
    # release: ledgers written before it gain the column on their next append (older rows null).
    "qos0_messages": pl.Int64(),
}


@dataclass(frozen=True)
class PartitionStats:
    """What one batch read from one source partition."""

    count: int
    first_offset: int | None
    last_offset: int | None
    first_ts: datetime | None
    last_ts: datetime | None


@dataclass
class LedgerBatch:
    """One committed live batch, as a backfill sees it."""

    batch_id: str
    partition_key: str
    ranges: list[PartitionRange]
    stats: dict[str, PartitionStats]  # by app id
    ingested_at: datetime | None
    target_version: int
    run_id: str = ""
    trigger: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def messages(self) -> int:
        return sum(s.count for s in self.stats.values())


def partition_stats(frame: pl.DataFrame) -> dict[int, PartitionStats]:
    """Per source partition of a frame with `_partition`, `_offset`, `_timestamp` columns."""
    if frame.height == 0:
        return {}
    agg = frame.group_by("_partition").agg(
        pl.len().alias("count"), pl.col("_offset").min().alias("first"), pl.col("_offset").max().alias("last"),
        pl.col("_timestamp").min().alias("first_ts"), pl.col("_timestamp").max().alias("last_ts"))
    return {row["_partition"]: PartitionStats(row["count"], row["first"], row["last"], row["first_ts"], row["last_ts"])
            for row in agg.iter_rows(named=True)}


# File statistics only for four columns (lookups by batch id, partition and app id). delta-rs parses every
# file's statistics since the last checkpoint on each open and commit: with all 25 columns an append took
# 91 ms after 150 uncompacted files, with these four 43 ms (measured; a ledger gets ~360 files an hour of
# 10 s batches). Filters on other columns (ranges, timestamps, status) read every file: a ledger is small.
STATS_COLUMNS_PROP = "delta.dataSkippingStatsColumns"
LEDGER_STATS_COLUMNS = "batch_id,partition_key,mode,app_id"
# A live append commits on the ledger snapshot last read or written if it is this recent (no listing of the
# log per batch); an older one is refreshed first.
SNAPSHOT_REUSE_SECONDS = 60.0


class Ledger:
    """The ledger table of one pipeline."""

    def __init__(self, uri: str | Location, pipeline: str, storage_options: dict[str, str] | None = None,
                 partition_of: Callable[[datetime], str] | None = None, properties: dict[str, str] | None = None):
        self.location = uri if isinstance(uri, Location) else location(uri, storage_options)
        self.uri, self.pipeline, self.storage_options = self.location.uri, pipeline, self.location.options
        # the partition of a commit time, for commits made before the ledger existed (no partition in metadata)
        self.partition_of = partition_of
        self.legacy_app_id = f"{pipeline}/ledger"  # before per-partition ids: the target version recorded
        self.properties = properties or {}  # Delta table properties the ledger starts with when this creates it
        self._table: DeltaTable | None = None
        self._read_at = 0.0  # monotonic time the snapshot was last read or moved by our own append
        self._txn_versions = TxnVersions()  # looked up once per ledger version, not once per append

    @classmethod
    def of(cls, spec: Any, partition_of: Callable[[datetime], str] | None = None) -> Ledger:
        """The pipeline's ledger table, with the pipeline's storage options and, when this creates it, the
        maintenance settings as table properties."""
        return cls(table_location(spec, "ledger"), spec.name, partition_of=partition_of,
                   properties={**table_properties(spec.maintenance), STATS_COLUMNS_PROP: LEDGER_STATS_COLUMNS})

    def table(self, refresh: bool = True) -> DeltaTable | None:
        """The ledger table at its latest version (opened once, then refreshed incrementally), or as last
        read with `refresh=False`."""
        if self._table is None:
            self._table = self.location.open()
            self._read_at = time.monotonic()
        elif refresh:
            with self.location.failures("reading"):
                self._table.update_incremental()
            self._read_at = time.monotonic()
        return self._table

    def recorded(self, app_ids: Iterable[str], refresh: bool = True) -> dict[str, int | None]:
        """Per source app id, the last offset whose batch the ledger records (None: none yet)."""
        return self._txn_versions.of(self.table(refresh), app_ids)

    # ------------------------------------------------------------ writing
    def append(self, rows: list[dict[str, Any]], covered: dict[str, int] | None = None) -> bool:
        """One commit. A live batch's rows pass `covered` (app id → last offset covered): the commit carries
        those transactions and is skipped if the ledger already records them (a repair got there first).
        Returns whether rows were written."""
        if not rows:
            return False
        frame = pl.DataFrame(rows, schema=LEDGER_SCHEMA)
        covered = covered or {}
        state: dict[str, Any] = {}

        def prepare(refresh: bool = True) -> None:
            state["table"] = table = self.table(refresh)
            stored = self._txn_versions.of(table, covered)
            if covered and all(v is not None and v >= covered[a] for a, v in stored.items()):
                raise ConcurrentBatchError("already recorded")
            # transaction_version is not monotonic: never write a lower version than the ledger holds
            state["txns"] = {a: end if stored[a] is None else max(end, stored[a]) for a, end in covered.items()}
            state["props"] = CommitProperties(app_transactions=[Transaction(a, v) for a, v in state["txns"].items()]
                                              or None, custom_metadata={"ingest.pipeline": self.pipeline})

        def attempt() -> None:
            table = state["table"]
            # merge: a ledger made before a column was added gains it (older rows read as null)
            if table is None:
                self.location.write(frame.to_arrow(), mode="append", commit_properties=state["props"],
                                    schema_mode="merge", configuration=self.properties or None)
            else:
                with self.location.failures("committing to the ledger table"):
                    write_deltalake(table, frame.to_arrow(), mode="append", schema_mode="merge",
                                    commit_properties=state["props"],
                                    post_commithook_properties=commit_hooks(table.version() + 1))

        # The first try commits on the snapshot the ledger was last read or written at (a run opens it at its
        # start, each append moves it), saving a listing of its log per batch. A record made meanwhile by another
        # writer of these app ids fails that commit on its transaction; the second try starts from a refreshed
        # snapshot. A commit lost to other app ids is retried inside commit_with_retries.
        # An old snapshot is refreshed first all the same: log cleanup may have removed the commits after it.
        recent = time.monotonic() - self._read_at < SNAPSHOT_REUSE_SECONDS
        for fresh in (not recent, True):
            try:
                prepare(refresh=fresh)
                commit_with_retries(attempt, prepare,
                                    f"pipeline '{self.pipeline}': recording batches in the ledger {self.uri}")
                self._read_at = time.monotonic()  # write_deltalake moved the table to the version it wrote
                self._txn_versions.committed(self._table, state["txns"])
                return True
            except ConcurrentBatchError:
                # Another writer (a repair, or a second run of these partitions) recorded offsets of these ids.
                now = self.recorded(covered)
                if covered and all(v is not None and v >= covered[a] for a, v in now.items()):
                    return False  # ... all of this batch's
                if fresh:
                    raise
        raise AssertionError("unreachable")

    # ------------------------------------------------------------ reading
    def frame(self, filters: pl.Expr | None = None) -> pl.DataFrame:
        if self.table() is None:
            return pl.DataFrame(schema=LEDGER_SCHEMA)
        scan = self.location.scan()
        if filters is not None:
            scan = scan.filter(filters)
        with self.location.failures("reading"):
            return scan.collect()

    def live_batches(self, filters: pl.Expr | None = None) -> list[LedgerBatch]:
        """Committed live batches (optionally filtered), oldest first."""
        expr = (pl.col("mode") == "live") & (pl.col("status") == "committed")
        return batches_from_rows(self.frame(expr if filters is None else expr & filters))

    # ------------------------------------------------------------ repair
    def repair(self, target: DeltaTable | None, quarantine: str | Location, app_ids: Iterable[str],
               max_commits: int = 1000, target_location: Location | None = None, refresh: bool = True) -> list[str]:
        """Record live batches on `app_ids` the target committed but the ledger missed (a crash between the
        two commits). A live run passes its own partitions' ids, so it never touches another shard's batch
        in flight; a replay passes all of them, and the ledger's fence settles a race with a live batch.
        `refresh=False`: the ledger was read just before (a run's start), no listing of its log again."""
        if target is None:
            return []
        app_ids = list(app_ids)
        recorded = self.recorded(app_ids, refresh)
        behind = {a: recorded[a] for a in app_ids
                  if (v := target.transaction_version(a)) is not None and (recorded[a] is None or v > recorded[a])}
        if not behind:
            return []
        legacy = self.table(refresh=False)  # as `recorded` just read it
        low = -1
        if legacy is not None and (old := legacy.transaction_version(self.legacy_app_id)) is not None:
            low = old  # a ledger of the single-writer era records every target commit up to this version
        current = target.version()
        if current <= low:
            return []
        commits = [c for c in target.history(min(current - low, max_commits))
                   if c.get("version", -1) > low and c.get("ingest.batch_id") and c.get("ingest.mode") == "live"
                   and _covers(c, behind)]
        if not commits:
            return []
        ids = [c["ingest.batch_id"] for c in commits]
        known = set(self.frame(pl.col("batch_id").is_in(ids) & (pl.col("mode") == "live"))["batch_id"].to_list())
        missing = [c for c in commits if c["ingest.batch_id"] not in known]
        if not missing:
            return []
        quarantine = quarantine if isinstance(quarantine, Location) else location(quarantine)
        target_location = target_location or location(target.table_uri)
        stats = self._stats_of([c["ingest.batch_id"] for c in missing], target, target_location, quarantine)
        rows: list[dict[str, Any]] = []
        covered: dict[str, int] = {}
        for commit in sorted(missing, key=lambda c: c["version"]):
            rebuilt = self._rebuild(commit, stats.get(commit["ingest.batch_id"], {}))
            rows.extend(rebuilt)
            for row in rebuilt:
                covered[row["app_id"]] = max(covered.get(row["app_id"], -1), row["range_end"])
        if not self.append(rows, covered=covered):
            return []  # a live batch recorded them meanwhile
        return [c["ingest.batch_id"] for c in missing]

    def _stats_of(self, batch_ids: list[str], target: DeltaTable, target_location: Location,
                  quarantine: Location) -> dict[str, dict[int, PartitionStats]]:
        """Per batch and source partition, from the rows holding those batch ids (one scan per table)."""
        cols = ["_batch_id", "_partition", "_offset", "_timestamp"]
        # the target at the snapshot repair is looking at
        scans = [pl.scan_delta(target, storage_options=target_location.polars_options())]
        if quarantine.exists():
            scans.append(quarantine.scan())
        with quarantine.failures("reading"):
            rows = pl.concat([scan.filter(pl.col("_batch_id").is_in(batch_ids)).select(cols).collect() for scan in scans])
        return {batch_id: partition_stats(group) for (batch_id,), group in rows.group_by("_batch_id")}

    def _rebuild(self, commit: dict[str, Any], stats: dict[int, PartitionStats]) -> list[dict[str, Any]]:
        ranges = [PartitionRange(**r) for r in json.loads(commit.get("ingest.ranges", "[]"))]
        qv = commit.get("ingest.quarantine_version")
        committed_at = datetime.fromtimestamp(commit["timestamp"] / 1000, UTC)
        partition_key = commit.get("ingest.partition_key") or (self.partition_of(committed_at) if self.partition_of else "")
        return ledger_rows(
            pipeline=self.pipeline, batch_id=commit["ingest.batch_id"],
            partition_key=partition_key, mode="live", status="committed",
            trigger=commit.get("ingest.trigger") or "", run_id=commit.get("ingest.run_id") or "", generation=None,
            covered=ranges, stats=stats, rows_written=None, rows_quarantined=None,
            target_version=commit["version"], quarantine_version=int(qv) if qv else None,
            ingested_at=_parse_ts(commit.get("ingest.ingested_at")), committed_at=committed_at,
            qos0_messages=json.loads(commit.get("ingest.counters") or "{}").get("qos0_messages"))


def ledger_rows(*, pipeline: str, batch_id: str, partition_key: str, mode: str, status: str, trigger: str,
                run_id: str, generation: str | None, covered: Iterable[PartitionRange],
                stats: dict[int, PartitionStats], rows_written: int | None, rows_quarantined: int | None,
                target_version: int | None, quarantine_version: int | None, ingested_at: datetime | None,
                committed_at: datetime | None = None, started_at: datetime | None = None,
                qos0_messages: int | None = None) -> list[dict[str, Any]]:
    """The ledger rows of one batch: one per source partition it covered."""
    committed_at = committed_at or datetime.now(UTC)
    out = []
    for r in covered:
        if r.count <= 0:
            continue
        s = stats.get(r.partition, PartitionStats(0, None, None, None, None))
        out.append({
            "pipeline": pipeline, "batch_id": batch_id, "partition_key": partition_key, "mode": mode,
            "status": status, "trigger": trigger, "run_id": run_id, "generation": generation, "app_id": r.app_id,
            "source_partition": r.partition, "range_start": r.start, "range_end": r.end, "count": s.count,
            "first_offset": s.first_offset, "last_offset": s.last_offset, "first_timestamp": s.first_ts,
            "last_timestamp": s.last_ts, "rows_written": rows_written, "rows_quarantined": rows_quarantined,
            "target_version": target_version, "quarantine_version": quarantine_version,
            "ingested_at": ingested_at, "committed_at": committed_at, "started_at": started_at,
            "qos0_messages": qos0_messages,
        })
    return out


def batches_from_rows(frame: pl.DataFrame) -> list[LedgerBatch]:
    batches: dict[str, LedgerBatch] = {}
    for row in frame.sort("target_version", "batch_id", "source_partition").iter_rows(named=True):
        batch = batches.get(row["batch_id"])
        if batch is None:
            batch = batches[row["batch_id"]] = LedgerBatch(
                batch_id=row["batch_id"], partition_key=row["partition_key"], ranges=[], stats={},
                ingested_at=row["ingested_at"], target_version=row["target_version"], run_id=row["run_id"] or "",
                trigger=row["trigger"] or "")
        r = PartitionRange(row["app_id"], row["source_partition"], row["range_start"], row["range_end"])
        if r not in batch.ranges:
            batch.ranges.append(r)
            batch.stats[r.app_id] = PartitionStats(row["count"], row["first_offset"], row["last_offset"],
                                                   row["first_timestamp"], row["last_timestamp"])
    return list(batches.values())


def _covers(commit: dict[str, Any], behind: dict[str, int | None]) -> bool:
    """Whether a target commit covers offsets beyond what the ledger records (`behind`: app id → offset)."""
    for r in json.loads(commit.get("ingest.ranges", "[]")):
        if r["app_id"] in behind and r["end"] >= r["start"]:
            floor = behind[r["app_id"]]
            if floor is None or r["end"] > floor:
                return True
    return False


def _parse_ts(text: str | None) -> datetime | None:
    return datetime.fromisoformat(text) if text else None

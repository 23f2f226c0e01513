"""Backfills and replays: re-ingest committed batches with the *current* schema and replace their rows.

A replay takes batches from the ledger (a backfill: every live batch of some ingestion-time partitions;
`ingest replay`: the batches overlapping an explicit offset or time range) and, for each batch, in order:

1. re-reads exactly the batch's recorded ranges — from the broker for Kafka and NATS Limits streams, from
   the lake (`_raw` of the target and quarantine rows) for MQTT and NATS WorkQueue/Interest streams, whose
   brokers delete what was acknowledged;
2. checks what it read against the ledger (message count, first and last offset per source partition).
   Anything else (retention, compaction, a purge) is reported for that batch and nothing is changed;
3. decodes and validates with the current schema, keeping the batch id and `_ingested_at` of the original
   rows (a replay of unchanged data reproduces the rows exactly);
4. replaces the batch's rows in the target, then in the quarantine: one Delta commit each, an overwrite
   whose predicate is the batch id or its offset ranges. Target first: a crash in between can leave a row in
   both tables (repaired by resuming), never in neither;
5. appends `mode = replay` rows to the ledger.

Commits carry `Transaction("backfill/{pipeline}/{partition}/{generation}", n)` (n = the batch's place in the
partition's list), never a live app id, so the live position never moves. A replay with the same generation
(a retried Dagster backfill) skips batches both tables already record; another generation replays again and
produces the same tables.

Live batches can commit meanwhile: they write offsets above every ledger range and another batch id, so the
predicate never matches their rows (and the live plan only looks at live app ids).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import polars as pl
from confluent_kafka import KafkaException

from ingest_defs.config import PipelineSpec
from ingest_defs.decode import QUARANTINE_SCHEMA
from ingest_defs.ledger import Ledger, LedgerBatch, ledger_rows, partition_stats
from ingest_defs.lifecycle import BatchContext, BatchResult, BatchRunner
from ingest_defs.sink import DeltaTableSink
from ingest_defs.sources.base import PartitionRange, Plan, RawBatch, Source, SourceError

NO_BYTE_LIMIT = 1 << 62
_SAFE_ID = re.compile(r"^[A-Za-z0-9_-]+$")


def replays_from_broker(spec: PipelineSpec) -> bool:
    """Kafka and NATS Limits streams keep messages after ingestion; the others replay from the lake."""
    nats = spec.source.nats
    return spec.source.kafka is not None or (nats is not None and nats.retention == "limits")


def backfill_app_id(spec: PipelineSpec, partition_key: str, generation: str) -> str:
    return f"backfill/{spec.name}/{partition_key}/{generation}"


@dataclass
class ReplayOutcome:
    batch_id: str
    partition_key: str
    ranges: list[PartitionRange]
    status: str  # replaced | not replayed | already replayed
    reason: str = ""
    messages: int = 0
    rows_written: int = 0
    rows_quarantined: int = 0
    target_version: int | None = None
    quarantine_version: int | None = None
    reasons: dict[str, int] = field(default_factory=dict)

    def describe(self) -> str:
        ranges = ", ".join(f"p{r.partition}:{r.start}..{r.end}" for r in self.ranges)
        if self.status == "replaced":
            return (f"batch {self.batch_id} [{self.partition_key}] {ranges}: {self.messages} msgs → "
                    f"{self.rows_written} rows, {self.rows_quarantined} quarantined (delta v{self.target_version})")
        return f"batch {self.batch_id} [{self.partition_key}] {ranges}: {self.status}: {self.reason}"


class Replayer:
    """Replays ledger batches of one pipeline (see the module docstring)."""

    def __init__(self, spec: PipelineSpec, source: Source, target: DeltaTableSink, quarantine: DeltaTableSink,
                 ledger: Ledger, ctx: BatchContext, generation: str):
        if not _SAFE_ID.match(generation):
            generation = re.sub(r"[^A-Za-z0-9_-]", "_", generation)
        self.spec, self.source, self.target, self.quarantine, self.ledger = spec, source, target, quarantine, ledger
        self.ctx, self.generation = ctx, generation
        self.runner = BatchRunner(spec, source, target, quarantine, ctx)
        self.from_broker = replays_from_broker(spec)

    # ------------------------------------------------------------ which batches
    def batches_for_partitions(self, partition_keys: list[str]) -> list[LedgerBatch]:
        self.ledger.repair(self.target.table(refresh=True), self.quarantine.location, self._app_ids(),
                           target_location=self.target.location)
        return self.ledger.live_batches(pl.col("partition_key").is_in(partition_keys))

    def batches_for_range(self, low: int | datetime, high: int | datetime,
                          source_partition: int | None = None) -> list[LedgerBatch]:
        """Live batches overlapping an offset range (ints) or a broker-time range (datetimes), inclusive."""
        self.ledger.repair(self.target.table(refresh=True), self.quarantine.location, self._app_ids(),
                           target_location=self.target.location)
        if isinstance(low, datetime) and isinstance(high, datetime):
            overlap = (pl.col("last_timestamp") >= low) & (pl.col("first_timestamp") <= high)
        else:
            overlap = (pl.col("range_end") >= low) & (pl.col("range_start") <= high)
        if source_partition is not None:
            overlap = overlap & (pl.col("source_partition") == source_partition)
        hits = self.ledger.live_batches(overlap)
        ids = [b.batch_id for b in hits]
        # whole batches: every source partition of a batch that overlaps
        return self.ledger.live_batches(pl.col("batch_id").is_in(ids)) if ids else []

    def _app_ids(self) -> list[str]:
        """Every partition of the source (all shards): the ledger's fence settles a race with a live batch."""
        return [p.app_id for p in self.source.state()]

    # ------------------------------------------------------------ replaying
    def replay(self, batches: list[LedgerBatch],
               progress: Callable[[ReplayOutcome], None] | None = None) -> list[ReplayOutcome]:
        seq: dict[str, int] = {}
        outcomes = []
        for batch in batches:
            seq[batch.partition_key] = seq.get(batch.partition_key, 0) + 1
            outcome = self.replay_batch(batch, seq[batch.partition_key])
            outcomes.append(outcome)
            self.ctx.info(f"{self.spec.name} replay: {outcome.describe()}")
            if progress:
                progress(outcome)
        return outcomes

    def replay_batch(self, batch: LedgerBatch, n: int) -> ReplayOutcome:
        outcome = ReplayOutcome(batch.batch_id, batch.partition_key, batch.ranges, "replaced")
        if not _SAFE_ID.match(batch.batch_id):
            raise ValueError(f"unexpected batch id {batch.batch_id!r} in the ledger")
        app_id = backfill_app_id(self.spec, batch.partition_key, self.generation)
        if self._already_done(app_id, n):
            outcome.status, outcome.reason = "already replayed", f"generation {self.generation} did it"
            return outcome
        raw, carried, problem = self._read(batch)
        if problem:
            outcome.status, outcome.reason = "not replayed", problem
            self._record(batch, outcome, None)
            return outcome
        assert raw is not None
        result = BatchResult(batch_id=batch.batch_id, planned=batch.ranges)
        good, bad = self.runner._rows(raw, result, ingested_at=batch.ingested_at)
        if carried is not None and carried.height:
            good = pl.concat([good, carried], how="diagonal_relaxed")
        outcome.messages = len(raw) + (carried.height if carried is not None else 0)
        outcome.reasons = dict(result.reasons)
        predicate = replace_predicate(batch)
        meta = {"ingest.pipeline": self.spec.name, "ingest.batch_id": batch.batch_id, "ingest.mode": "replay",
                "ingest.run_id": self.ctx.run_id or None, "ingest.trigger": self.ctx.trigger,
                "ingest.generation": self.generation, "ingest.partition_key": batch.partition_key}
        identity = self.runner.identity()
        self.quarantine.ensure_exists(bad if bad.height else pl.DataFrame(schema=QUARANTINE_SCHEMA), identity)
        committed = self.target.replace(good, predicate, {app_id: n}, meta)
        outcome.target_version, outcome.rows_written = committed.version, committed.rows
        committed = self.quarantine.replace(bad, predicate, {app_id: n}, meta)
        outcome.quarantine_version, outcome.rows_quarantined = committed.version, committed.rows
        self._record(batch, outcome, result)
        return outcome

    def _already_done(self, app_id: str, n: int) -> bool:
        t, q = self.target.versions([app_id])[app_id], self.quarantine.versions([app_id])[app_id]
        return t is not None and t >= n and q is not None and q >= n

    # ------------------------------------------------------------ reading
    def _read(self, batch: LedgerBatch) -> tuple[RawBatch | None, pl.DataFrame | None, str]:
        """(messages to re-validate, target rows carried over unchanged, problem or "")."""
        if self.from_broker:
            raw, problem = self._read_broker(batch)
            return raw, None, problem
        return self._read_lake(batch)

    def _read_broker(self, batch: LedgerBatch) -> tuple[RawBatch | None, str]:
        ranges = [r for r in batch.ranges if r.count]
        held = {s.app_id: s for s in self.source.state()}
        for r in ranges:
            want, have = batch.stats[r.app_id], held.get(r.app_id)
            if want.count and (have is None or have.first is None or have.first > want.first_offset
                               or have.last is None or have.last < want.last_offset):
                first = "-" if have is None or have.first is None else have.first
                last = "-" if have is None or have.last is None else have.last
                return None, (f"the broker no longer holds {r.app_id} offsets {want.first_offset}..{want.last_offset} "
                              f"(it holds {first}..{last}: retention or a purge removed them); nothing was changed "
                              "for this batch")
        try:
            raw = self.source.read(Plan(ranges=ranges, bounded=True), NO_BYTE_LIMIT)
        except (SourceError, KafkaException) as exc:
            return None, f"the broker could not re-read the range ({exc}); nothing was changed for this batch"
        problem = _compare(batch, raw)
        return (None, problem) if problem else (raw, "")

    def _read_lake(self, batch: LedgerBatch) -> tuple[RawBatch | None, pl.DataFrame | None, str]:
        expr = _range_expr(batch)
        target = self.target.location.scan().filter(expr).collect() if self.target.table() else pl.DataFrame()
        quarantine = (self.quarantine.location.scan().filter(expr).collect()
                      if self.quarantine.table() else pl.DataFrame())
        carried = None
        if target.height and ("_raw" not in target.columns or target["_raw"].null_count()):
            # `keep_raw: false`: these rows cannot be re-validated; they are kept as they are.
            has_raw = pl.col("_raw").is_not_null() if "_raw" in target.columns else pl.lit(False)
            carried, target = target.filter(~has_raw), target.filter(has_raw)
        frames = [f for f in (target, quarantine) if f.height]
        rows = pl.concat(frames, how="diagonal_relaxed").sort("_partition", "_offset") if frames else pl.DataFrame(
            schema={"_partition": pl.Int32, "_offset": pl.Int64, "_timestamp": pl.Datetime("us", "UTC")})
        everything = pl.concat([f.select("_partition", "_offset", "_timestamp") for f in (rows, carried)
                                if f is not None and f.height]) if rows.height or carried is not None else rows
        problem = _compare_stats(batch, partition_stats(everything), "the lake")
        if problem:
            return None, None, problem
        return _raw_batch(rows, batch), carried, ""

    # ------------------------------------------------------------ ledger
    def _record(self, batch: LedgerBatch, outcome: ReplayOutcome, result: BatchResult | None) -> None:
        stats = result.stats if result is not None else {
            r.partition: batch.stats[r.app_id] for r in batch.ranges if r.app_id in batch.stats}
        status = "committed" if outcome.status == "replaced" else f"not replayed: {outcome.reason}"
        self.ledger.append(ledger_rows(
            pipeline=self.spec.name, batch_id=batch.batch_id, partition_key=batch.partition_key, mode="replay",
            status=status, trigger=self.ctx.trigger, run_id=self.ctx.run_id, generation=self.generation,
            covered=batch.ranges, stats=stats, rows_written=outcome.rows_written,
            rows_quarantined=outcome.rows_quarantined, target_version=outcome.target_version,
            quarantine_version=outcome.quarantine_version, ingested_at=batch.ingested_at,
            committed_at=datetime.now(UTC)))


def replace_predicate(batch: LedgerBatch) -> str:
    """SQL predicate of a batch's rows: its batch id, or its offsets (also catches rows a crashed earlier
    attempt at the same range left in the quarantine under another batch id)."""
    parts = [f"(_partition = {r.partition} AND _offset >= {r.start} AND _offset <= {r.end})"
             for r in batch.ranges if r.count]
    return " OR ".join([f"_batch_id = '{batch.batch_id}'", *parts])


def _range_expr(batch: LedgerBatch) -> pl.Expr:
    expr = pl.col("_batch_id") == batch.batch_id
    for r in batch.ranges:
        if r.count:
            expr = expr | ((pl.col("_partition") == r.partition) & pl.col("_offset").is_between(r.start, r.end))
    return expr


def _compare(batch: LedgerBatch, raw: RawBatch) -> str:
    frame = pl.DataFrame({
        "_partition": raw.partitions if isinstance(raw.partitions, list) else [raw.partitions] * len(raw),
        "_offset": raw.offsets, "_timestamp": [None] * len(raw)},
        schema={"_partition": pl.Int32, "_offset": pl.Int64, "_timestamp": pl.Datetime("us", "UTC")})
    return _compare_stats(batch, partition_stats(frame), "the broker")


def _compare_stats(batch: LedgerBatch, stats: dict[int, Any], where: str) -> str:
    for r in batch.ranges:
        want = batch.stats.get(r.app_id)
        have = stats.get(r.partition)
        if want is None:
            continue
        n = have.count if have else 0
        span = (have.first_offset, have.last_offset) if have else (None, None)
        if n != want.count or (want.count and span != (want.first_offset, want.last_offset)):
            return (f"{where} now holds {n} messages ({_span(*span)}) in {r.app_id} {r.start}..{r.end}, the ledger "
                    f"recorded {want.count} ({_span(want.first_offset, want.last_offset)}): retention, compaction or "
                    "a purge changed the range; nothing was changed for this batch")
    return ""


def _span(first: int | None, last: int | None) -> str:
    return "none" if first is None else f"offsets {first}..{last}"


def _raw_batch(rows: pl.DataFrame, batch: LedgerBatch) -> RawBatch:
    """Rows from the lake back into a RawBatch (payloads from `_raw`, standard columns as stored)."""
    n = rows.height
    headers = None
    if "_headers" in rows.columns and rows["_headers"].null_count() < n:
        headers = [[(h["key"], h["value"]) for h in hs] if hs is not None else None
                   for hs in rows["_headers"].to_list()]
    ts = rows["_timestamp"].dt.epoch("ms").to_list() if "_timestamp" in rows.columns else None
    extra = {c: rows[c] for c in rows.columns if c.startswith("_mqtt")}
    return RawBatch(
        payloads=rows["_raw"].to_list() if n else [], offsets=rows["_offset"].to_list(),
        partitions=rows["_partition"].to_list(), streams=rows["_stream"].to_list() if n else [],
        keys=rows["_key"].to_list() if n else None, headers=headers, timestamps_ms=ts,
        covered=batch.ranges, nbytes=0, extra_columns=extra)

"""`ingest metrics serve`: a Prometheus exporter for the pipelines of the pipelines file.

Every scrape computes the figures from where the truth lives, nothing is kept in this process that a
restart could lose:

* **gauges** from the broker and the Delta tables, by the same function `ingest status` uses
  (`ingest_defs.status.pipeline_figures`): broker start/end, Delta position, lag, a gap the next batch will
  meet, the last live batch's commit time, rows in the target and quarantine tables;
* **counters and the batch-duration histogram** from the batch ledger, as totals over its rows, so they
  only ever grow and survive exporter restarts. They count *live* batches: a replay replaces rows but never
  takes anything off `ingest_rows_written_total`; replays have counters of their own.

Cost per scrape (see the README for figures): per pipeline one broker bounds query (clients stay open
across scrapes), a refresh of the target and ledger Delta logs (incremental), and the ledger files added
since the last scrape (aggregated once per file and cached; a compaction's new files are read once and the
removed files' aggregates dropped, since they hold the same rows). A pipeline whose broker or table fails
gets `ingest_pipeline_up 0` and its error in the log; the others are unaffected. Pipelines are read in
parallel, each on its own thread, within `timeout` seconds per scrape.

Extension points: labels of a partition series come from `partition_labels()` (a `shard` label goes there
and in `PARTITION_LABELS`); per-partition counters summed from a ledger column are listed in
`PARTITION_COUNTERS` (a column the ledger does not have yet is simply not exported).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

import polars as pl
from prometheus_client import CollectorRegistry, ProcessCollector, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from ingest_defs.config import PipelineSpec
from ingest_defs.ledger import LEDGER_SCHEMA, Ledger
from ingest_defs.sink import DeltaTableSink
from ingest_defs.sources.base import Source
from ingest_defs.status import PipelineFigures, pipeline_figures

logger = logging.getLogger("ingest.metrics")

PORT_ENV = "INGEST_METRICS_PORT"
DEFAULT_PORT = 9464
DEFAULT_TIMEOUT_SECONDS = 8.0  # below Prometheus's default scrape_timeout (10 s)
# Batch durations (read start → ledger commit) from a micro-batch of a few ms to a 5-minute catch-up batch.
DURATION_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)

PIPELINE_LABELS = ("pipeline", "source")
PARTITION_LABELS = (*PIPELINE_LABELS, "partition")  # add "shard" here and in partition_labels()


def default_port() -> int:
    value = os.environ.get(PORT_ENV)
    return int(value) if value else DEFAULT_PORT


def pipeline_labels(spec: PipelineSpec) -> tuple[str, ...]:
    return (spec.name, spec.source.kind)


def partition_labels(spec: PipelineSpec, partition: int) -> tuple[str, ...]:
    """Label values of one source partition's series, in PARTITION_LABELS order."""
    return (*pipeline_labels(spec), str(partition))


@dataclass(frozen=True)
class PartitionCounter:
    """A per-partition counter: the sum of one ledger column over the live batches' rows."""

    name: str  # without _total
    column: str
    help: str
    sources: frozenset[str] | None = None  # the source kinds it means something for (None: all)


PARTITION_COUNTERS: tuple[PartitionCounter, ...] = (
    PartitionCounter("ingest_messages", "count", "Messages read by live batches (target and quarantine rows)."),
    PartitionCounter("ingest_qos0_messages", "qos0_messages", "Messages live batches received at MQTT QoS 0: at "
                     "most once (no PUBACK, no redelivery; a crash before the commit loses them).",
                     frozenset({"mqtt"})),
)


# ---------------------------------------------------------------------------- ledger totals
@dataclass
class PartitionTotals:
    sums: dict[str, int] = field(default_factory=dict)  # PartitionCounter.column → sum
    range_min: int | None = None  # lowest range_start of a live batch
    range_max: int | None = None  # highest range_end
    range_len: int = 0  # offsets covered by live batches (their ranges never overlap)

    @property
    def gap_messages(self) -> int:
        """Offsets between the first and the last live batch that no batch covered: skipped gaps (`on_gap: skip`)."""
        if self.range_min is None or self.range_max is None:
            return 0
        return max(0, self.range_max - self.range_min + 1 - self.range_len)

    def merge(self, other: PartitionTotals) -> PartitionTotals:
        return PartitionTotals(
            sums={k: self.sums.get(k, 0) + other.sums.get(k, 0) for k in self.sums.keys() | other.sums.keys()},
            range_min=_opt(min, self.range_min, other.range_min), range_max=_opt(max, self.range_max, other.range_max),
            range_len=self.range_len + other.range_len)


@dataclass
class LedgerTotals:
    """Totals over ledger rows. Additive (`merge`), so each ledger file is aggregated once and cached."""

    partitions: dict[int, PartitionTotals] = field(default_factory=dict)
    batches: int = 0
    rows_written: int = 0
    rows_quarantined: int = 0
    duration_counts: list[int] = field(default_factory=lambda: [0] * (len(DURATION_BUCKETS) + 1))  # per bucket
    duration_sum: float = 0.0
    replay_batches: Counter[str] = field(default_factory=Counter)  # replaced | not_replayed
    replay_rows_written: int = 0
    replay_rows_quarantined: int = 0
    replay_generations: frozenset[str] = frozenset()
    columns: frozenset[str] = frozenset()  # the ledger columns seen (which PARTITION_COUNTERS exist)

    def merge(self, other: LedgerTotals) -> LedgerTotals:
        parts = dict(self.partitions)
        for p, t in other.partitions.items():
            parts[p] = parts[p].merge(t) if p in parts else t
        return LedgerTotals(
            partitions=parts, batches=self.batches + other.batches,
            rows_written=self.rows_written + other.rows_written,
            rows_quarantined=self.rows_quarantined + other.rows_quarantined,
            duration_counts=[a + b for a, b in zip(self.duration_counts, other.duration_counts, strict=True)],
            duration_sum=self.duration_sum + other.duration_sum,
            replay_batches=self.replay_batches + other.replay_batches,
            replay_rows_written=self.replay_rows_written + other.replay_rows_written,
            replay_rows_quarantined=self.replay_rows_quarantined + other.replay_rows_quarantined,
            replay_generations=self.replay_generations | other.replay_generations,
            columns=self.columns | other.columns)

    @property
    def duration_count(self) -> int:
        return sum(self.duration_counts)

    def cumulative_buckets(self) -> list[tuple[str, float]]:
        out, running = [], 0
        for bound, n in zip((*DURATION_BUCKETS, float("inf")), self.duration_counts, strict=True):
            running += n
            out.append(("+Inf" if bound == float("inf") else repr(float(bound)), float(running)))
        return out


def _opt(fn: Callable[[int, int], int], a: int | None, b: int | None) -> int | None:
    return b if a is None else a if b is None else fn(a, b)


LEDGER_COLUMNS = ("batch_id", "mode", "status", "generation", "source_partition", "range_start", "range_end",
                  "rows_written", "rows_quarantined", "committed_at", "started_at")


def ledger_totals(frame: pl.DataFrame) -> LedgerTotals:
    """Totals of some ledger rows (e.g. one file's). Pure: the unit tests feed it frames.

    Batch-level figures (rows written and quarantined, duration) are repeated on each of a batch's partition
    rows, and one batch's rows are one commit and so one file: they are taken once per batch here. (Only a
    compaction into files larger than `target_file_size_mb` could split a batch; ledger rows are ~200 bytes.)"""
    columns = frozenset(frame.columns)
    for name in {*LEDGER_COLUMNS, *(c.column for c in PARTITION_COUNTERS)} - columns:
        # a column older ledgers do not have
        frame = frame.with_columns(pl.lit(None, dtype=LEDGER_SCHEMA.get(name, pl.Int64())).alias(name))
    live = frame.filter((pl.col("mode") == "live") & (pl.col("status") == "committed"))
    totals = LedgerTotals(columns=columns)
    if live.height:
        per_partition = live.group_by("source_partition").agg(
            *(pl.col(c.column).cast(pl.Int64).sum().alias(c.column) for c in PARTITION_COUNTERS),
            pl.col("range_start").min().alias("range_min"), pl.col("range_end").max().alias("range_max"),
            (pl.col("range_end") - pl.col("range_start") + 1).sum().alias("range_len"))
        for row in per_partition.iter_rows(named=True):
            totals.partitions[row["source_partition"]] = PartitionTotals(
                sums={c.column: int(row[c.column] or 0) for c in PARTITION_COUNTERS},
                range_min=row["range_min"], range_max=row["range_max"], range_len=int(row["range_len"]))
        batches = live.group_by("batch_id").agg(
            pl.col("rows_written").first(), pl.col("rows_quarantined").first(),
            ((pl.col("committed_at") - pl.col("started_at")).dt.total_microseconds() / 1e6).first().alias("seconds"))
        totals.batches = batches.height
        # Rows of a batch whose ledger row was rebuilt after a crash are unknown (null): not counted.
        totals.rows_written = int(batches["rows_written"].sum() or 0)
        totals.rows_quarantined = int(batches["rows_quarantined"].sum() or 0)
        seconds = batches["seconds"].drop_nulls().clip(lower_bound=0.0)
        totals.duration_sum = float(seconds.sum() or 0.0)
        for s in seconds.to_list():
            totals.duration_counts[_bucket(s)] += 1
    replays = frame.filter(pl.col("mode") == "replay")
    if replays.height:
        per_batch = replays.group_by("batch_id", "generation").agg(
            pl.col("status").first(), pl.col("rows_written").first(), pl.col("rows_quarantined").first())
        replaced = per_batch.filter(pl.col("status") == "committed")
        totals.replay_batches = Counter({"replaced": replaced.height, "not_replayed": per_batch.height - replaced.height})
        totals.replay_rows_written = int(replaced["rows_written"].sum() or 0)
        totals.replay_rows_quarantined = int(replaced["rows_quarantined"].sum() or 0)
        totals.replay_generations = frozenset(g for g in per_batch["generation"].to_list() if g)
    return totals


def _bucket(seconds: float) -> int:
    for i, bound in enumerate(DURATION_BUCKETS):
        if seconds <= bound:
            return i
    return len(DURATION_BUCKETS)


class LedgerReader:
    """A pipeline's ledger totals, read incrementally: nothing when the ledger's version has not changed,
    else only the data files that are new since the last read (each aggregated once, all in one scan)."""

    def __init__(self, ledger: Ledger):
        self.ledger = ledger
        self._version: int | None = None
        self._files: dict[str, LedgerTotals] = {}
        self._total = LedgerTotals()
        self.files_read = 0  # for tests and the cost figures

    def totals(self) -> LedgerTotals:
        table = self.ledger.table()  # opened once, then refreshed incrementally
        if table is None:
            return self._total
        version = table.version()
        if version == self._version:
            return self._total
        uris = table.file_uris()  # from the log; cheap (a dataset of the whole table is not: ~3 ms a file)
        current, columns = set(uris), frozenset(table.schema().to_arrow().names)
        # Files a compaction (or any rewrite) removed: their rows are in the files it added, read below.
        self._files = {uri: t for uri, t in self._files.items() if uri in current}
        new = [uri for uri in uris if uri not in self._files]
        if new:
            wanted = dict.fromkeys((*LEDGER_COLUMNS, *(c.column for c in PARTITION_COUNTERS)))
            schema = {c: LEDGER_SCHEMA.get(c, pl.Int64()) for c in wanted}
            rows = pl.scan_parquet(new, schema=schema, missing_columns="insert", extra_columns="ignore",
                                   include_file_paths=_FILE, storage_options=self.ledger.storage_options).collect()
            by_file = rows.partition_by(_FILE, as_dict=True, include_key=False)
            for uri in new:
                frame = by_file.get((uri,), pl.DataFrame(schema=schema))
                self._files[uri] = replace(ledger_totals(frame), columns=columns)
            self.files_read += len(new)
        total = LedgerTotals(columns=columns)
        for t in self._files.values():
            total = total.merge(t)
        self._version, self._total = version, total
        return total


_FILE = "__ledger_file"


# ---------------------------------------------------------------------------- one pipeline
@dataclass
class Snapshot:
    """What one scrape learned about one pipeline."""

    figures: PipelineFigures | None = None  # None: broker or tables failed (see errors)
    ledger: LedgerTotals | None = None  # the last good totals (counters stay up through a failure)
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0


class PipelineProbe:
    """Reads one pipeline's figures on its own thread, keeping its broker client and tables open."""

    def __init__(self, spec: PipelineSpec, source_factory: Callable[[PipelineSpec], Source]):
        self.spec = spec
        self._source_factory = source_factory
        self._source: Source | None = None
        self.target = DeltaTableSink.of(spec, "target")
        self.quarantine = DeltaTableSink.of(spec, "quarantine")
        self.ledger = LedgerReader(Ledger.of(spec))
        self._ledger_totals: LedgerTotals | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"metrics-{spec.name}")
        self._future: Future[Snapshot] | None = None
        self._started = 0.0
        self._last_errors: list[str] = []
        self._read_once = False  # a read has finished (before that, a slow scrape is the start-up)

    def begin(self) -> Future[Snapshot]:
        """Start a read, unless the previous one is still running (a hung broker): then that one is awaited."""
        if self._future is None or self._future.done():
            self._started = time.monotonic()
            self._future = self._executor.submit(self._read)
        return self._future

    def snapshot(self, future: Future[Snapshot]) -> Snapshot:
        """The read's result, or (not finished within the scrape's timeout) a failed snapshot."""
        if future.done():
            snap = future.result()
            self._read_once = True
        else:
            busy = time.monotonic() - self._started
            why = ("first read not finished (connecting, reading the ledger)" if not self._read_once else
                   "still reading when the scrape's timeout passed (broker or storage not answering)")
            snap = Snapshot(ledger=self._ledger_totals, seconds=busy, errors=[why])
        self._log_change(snap.errors)
        return snap

    def _read(self) -> Snapshot:
        t0 = time.monotonic()
        snap = Snapshot()
        try:
            if self._source is None:
                self._source = self._source_factory(self.spec)
            snap.figures = pipeline_figures(self._source, self.target, self.quarantine)
        except Exception as exc:  # noqa: BLE001 - reported as this pipeline's error, the scrape goes on
            snap.errors.append(f"broker or tables: {_one_line(exc)}")
            self._drop_source()  # reconnect on the next scrape
        try:
            self._ledger_totals = self.ledger.totals()
        except Exception as exc:  # noqa: BLE001
            snap.errors.append(f"ledger {self.spec.ledger_uri()}: {_one_line(exc)}")
        snap.ledger = self._ledger_totals
        snap.seconds = time.monotonic() - t0
        return snap

    def _log_change(self, errors: list[str]) -> None:
        # Log when the error changes, not on every scrape; starting up is not a problem.
        if errors and errors != self._last_errors:
            level = logging.WARNING if self._read_once else logging.INFO
            logger.log(level, "metrics: pipeline %s: %s", self.spec.name, "; ".join(errors))
        elif not errors and self._last_errors:
            logger.info("metrics: pipeline %s: readable again", self.spec.name)
        self._last_errors = errors

    def _drop_source(self) -> None:
        source, self._source = self._source, None
        if source is not None:
            try:
                source.close()
            except Exception as exc:  # noqa: BLE001
                logger.debug("closing the source of %s: %r", self.spec.name, exc)

    def close(self) -> None:
        self._executor.submit(self._drop_source)
        self._executor.shutdown(wait=False)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:500]


# ---------------------------------------------------------------------------- the collector
class IngestCollector(Collector):
    """Computes every metric at scrape time (the prometheus_client pattern for exporters)."""

    def __init__(self, specs: Iterable[PipelineSpec], source_factory: Callable[[PipelineSpec], Source] | None = None,
                 timeout: float = DEFAULT_TIMEOUT_SECONDS):
        if source_factory is None:
            from ingest_defs.resources.brokers import source_for  # the brokers' settings from the environment

            source_factory = source_for
        self.specs = list(specs)
        self.probes = [PipelineProbe(spec, source_factory) for spec in self.specs]
        self.timeout = timeout
        self._lock = threading.Lock()  # one scrape at a time; a second one waits and reads fresh figures
        self.last_scrape_seconds = 0.0
        self.last_snapshots: list[Snapshot] = []

    def warm_up(self) -> None:
        """Connect to the brokers and read the ledgers now, so the first scrape does not pay for it."""
        for probe in self.probes:
            probe.begin()

    def describe(self) -> list[Metric]:
        return []  # no scrape at registration; names are not checked for clashes in our own registry

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            t0 = time.monotonic()
            futures = [probe.begin() for probe in self.probes]
            wait(futures, timeout=self.timeout)
            snapshots = [probe.snapshot(f) for probe, f in zip(self.probes, futures, strict=True)]
            families = build_families(self.specs, snapshots, now=datetime.now(UTC))
            self.last_scrape_seconds, self.last_snapshots = time.monotonic() - t0, snapshots
        scrape = GaugeMetricFamily("ingest_exporter_scrape_duration_seconds",
                                   "Seconds this exporter took to compute the last scrape (all pipelines).")
        scrape.add_metric([], self.last_scrape_seconds)
        yield from families
        yield scrape

    def close(self) -> None:
        for probe in self.probes:
            probe.close()


def build_families(specs: Sequence[PipelineSpec], snapshots: Sequence[Snapshot], now: datetime) -> list[Metric]:
    """The metric families of one scrape (pure: no I/O)."""
    pl_labels, part_labels = list(PIPELINE_LABELS), list(PARTITION_LABELS)
    g = {name: GaugeMetricFamily(name, doc, labels=labels) for name, doc, labels in (
        ("ingest_pipeline_up", "1 if the pipeline's broker, tables and ledger were read in this scrape, else 0 "
                               "(the exporter's log says why).", pl_labels),
        ("ingest_pipeline_scrape_duration_seconds", "Seconds spent reading this pipeline in this scrape.", pl_labels),
        ("ingest_broker_start_offset", "First offset (Kafka) or stream sequence (NATS) the broker still holds.",
         part_labels),
        ("ingest_broker_end_offset", "Last offset available on the broker (Kafka: last stable offset - 1; NATS: "
                                     "the stream's last sequence).", part_labels),
        ("ingest_delta_position_offset", "Last offset covered by the target table (its Delta transaction version).",
         part_labels),
        ("ingest_lag_messages", "Messages on the broker not yet in Delta (absent for MQTT: the broker cannot tell).",
         part_labels),
        ("ingest_pending_gap_messages", "Offsets the broker deleted before they were ingested, ahead of the Delta "
                                        "position: the next batch meets a gap (on_gap).", part_labels),
        ("ingest_last_batch_timestamp_seconds", "Unix time of the target's last live batch commit.", pl_labels),
        ("ingest_last_batch_age_seconds", "Seconds since the target's last live batch commit.", pl_labels),
    )}
    table_rows = GaugeMetricFamily("ingest_table_rows", "Rows in the pipeline's Delta table now (replays and "
                                   "schema fixes can move rows between target and quarantine).",
                                   labels=[*pl_labels, "table"])
    info = InfoMetricFamily("ingest_pipeline", "The pipeline's source and tables.", labels=["pipeline"])
    c = {name: CounterMetricFamily(name, doc, labels=labels) for name, doc, labels in (
        ("ingest_batches", "Live batches committed (from the batch ledger).", pl_labels),
        ("ingest_rows_written", "Rows live batches wrote to the target table. Replays do not change it.", pl_labels),
        ("ingest_rows_quarantined", "Rows live batches wrote to the quarantine table. Replays do not change it.",
         pl_labels),
        ("ingest_gap_messages", "Offsets skipped because the broker had deleted them before ingestion (on_gap: "
                                "skip), from the live batches' ranges.", part_labels),
        ("ingest_replays", "Replays and backfills run (generations that recorded at least one batch).", pl_labels),
        ("ingest_replay_rows_written", "Rows replays wrote to the target table (replacing the batch's rows).",
         pl_labels),
        ("ingest_replay_rows_quarantined", "Rows replays wrote to the quarantine table.", pl_labels),
    )}
    replay_batches = CounterMetricFamily("ingest_replay_batches", "Batches replays replaced, or could not replay "
                                         "(the broker no longer held them).", labels=[*pl_labels, "status"])
    partition_counters = [(pc, CounterMetricFamily(pc.name, pc.help, labels=part_labels)) for pc in PARTITION_COUNTERS]
    duration = HistogramMetricFamily("ingest_batch_duration_seconds", "Live batch duration, from the start of its "
                                     "read to its ledger commit.", labels=pl_labels)
    for spec, snap in zip(specs, snapshots, strict=True):
        labels = list(pipeline_labels(spec))
        g["ingest_pipeline_up"].add_metric(labels, 0.0 if snap.errors else 1.0)
        g["ingest_pipeline_scrape_duration_seconds"].add_metric(labels, snap.seconds)
        info.add_metric([spec.name], {"source": spec.source.kind, "stream": _stream_of(spec),
                                      "table": spec.table_uri()})
        fig = snap.figures
        if fig is not None:
            for p in fig.partitions:
                plabels = list(partition_labels(spec, p.partition))
                for name, value in (("ingest_broker_start_offset", p.broker_start),
                                    ("ingest_broker_end_offset", p.broker_end),
                                    ("ingest_delta_position_offset", p.position), ("ingest_lag_messages", p.lag)):
                    if value is not None:
                        g[name].add_metric(plabels, float(value))
                if p.lag is not None:
                    g["ingest_pending_gap_messages"].add_metric(plabels, float(p.pending_gap))
            if fig.last_batch_at is not None:
                g["ingest_last_batch_timestamp_seconds"].add_metric(labels, fig.last_batch_at.timestamp())
                g["ingest_last_batch_age_seconds"].add_metric(labels, max(0.0, (now - fig.last_batch_at).total_seconds()))
            table_rows.add_metric([*labels, "target"], float(fig.target_rows))
            table_rows.add_metric([*labels, "quarantine"], float(fig.quarantined_rows))
        led = snap.ledger
        if led is None:
            continue
        c["ingest_batches"].add_metric(labels, led.batches)
        c["ingest_rows_written"].add_metric(labels, led.rows_written)
        c["ingest_rows_quarantined"].add_metric(labels, led.rows_quarantined)
        c["ingest_replays"].add_metric(labels, len(led.replay_generations))
        c["ingest_replay_rows_written"].add_metric(labels, led.replay_rows_written)
        c["ingest_replay_rows_quarantined"].add_metric(labels, led.replay_rows_quarantined)
        for status in ("replaced", "not_replayed"):
            replay_batches.add_metric([*labels, status], led.replay_batches.get(status, 0))
        duration.add_metric(labels, led.cumulative_buckets(), led.duration_sum)
        for partition, totals in sorted(led.partitions.items()):
            plabels = list(partition_labels(spec, partition))
            c["ingest_gap_messages"].add_metric(plabels, totals.gap_messages)
            for pc, family in partition_counters:
                if pc.column in led.columns and (pc.sources is None or spec.source.kind in pc.sources):
                    family.add_metric(plabels, totals.sums.get(pc.column, 0))
    return [*g.values(), table_rows, info, *c.values(), replay_batches, *(f for _, f in partition_counters), duration]


def _stream_of(spec: PipelineSpec) -> str:
    """The topic, stream or topic filters the pipeline reads (for the info metric)."""
    source: Any = getattr(spec.source, spec.source.kind)
    if spec.source.kind == "kafka":
        return source.topic
    if spec.source.kind == "nats":
        return f"{source.stream}:{source.subject}"
    return ",".join(source.topics)


# ---------------------------------------------------------------------------- serving
@dataclass
class Exporter:
    collector: IngestCollector
    registry: CollectorRegistry
    server: Any
    thread: threading.Thread

    @property
    def port(self) -> int:
        return int(self.server.server_port)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.collector.close()


def registry_for(collector: IngestCollector, process_metrics: bool = True) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    if process_metrics:
        ProcessCollector(registry=registry)  # the exporter's own CPU and memory
    return registry


def start(specs: Iterable[PipelineSpec], port: int | None = None, host: str = "0.0.0.0",
          timeout: float = DEFAULT_TIMEOUT_SECONDS,
          source_factory: Callable[[PipelineSpec], Source] | None = None) -> Exporter:
    """Serve /metrics on a background thread (port 0: any free port)."""
    collector = IngestCollector(specs, source_factory, timeout)
    registry = registry_for(collector)
    server, thread = start_http_server(default_port() if port is None else port, host, registry)
    collector.warm_up()
    return Exporter(collector, registry, server, thread)


def serve_forever(specs: Sequence[PipelineSpec], port: int | None, host: str, timeout: float) -> int:
    """`ingest metrics serve`: serve until SIGINT/SIGTERM."""
    import signal

    ours = logging.getLogger("ingest")  # our lines at INFO; other libraries keep their WARNING default
    if not ours.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        ours.addHandler(handler)
        ours.setLevel(logging.INFO)
    exporter = start(specs, port, host, timeout)
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    logger.info("metrics: serving http://%s:%d/metrics for %d pipelines (%s)", host, exporter.port, len(specs),
                ", ".join(s.name for s in specs))
    try:
        stopping.wait()
    except KeyboardInterrupt:
        pass
    finally:
        exporter.stop()
    return 0


def exposition_once(specs: Sequence[PipelineSpec], timeout: float) -> tuple[str, float]:
    """One scrape's text (`ingest metrics show`) and the seconds it took."""
    from prometheus_client import generate_latest

    collector = IngestCollector(specs, timeout=timeout)
    try:
        registry = registry_for(collector, process_metrics=False)
        t0 = time.monotonic()
        text = generate_latest(registry).decode()
        return text, time.monotonic() - t0
    finally:
        collector.close()

"""Where a pipeline stands: the figures `ingest status` prints and the Prometheus exporter publishes.

One pure function computes them for both (`figures_of`, fed by `pipeline_figures`), so the table on the
terminal, `ingest status --json` and the graph in Grafana can never disagree. The inputs are the broker's
bounds (the source's `state()`), the target table's transaction versions, the target's last live commit and
the row counts of both tables (from the Delta log's file statistics, not a scan). Nothing here writes or
acknowledges anything.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from deltalake import DeltaTable

from ingest_defs.sink import DeltaTableSink
from ingest_defs.sources.base import PartitionState, Source

if TYPE_CHECKING:
    from ingest_defs.config import PipelineSpec

LAST_COMMIT_LOOKBACK = 20  # commits searched for the last live batch (replays and maintenance commit too)


@dataclass(frozen=True)
class PartitionFigures:
    """One source partition (Kafka partition; 0 for a NATS stream or an MQTT session)."""

    app_id: str
    partition: int
    broker_start: int | None  # first offset the broker still holds (None: empty or unknown)
    broker_end: int | None  # last offset available (None: empty or unknown)
    position: int | None  # Delta transaction version: last offset covered (None: never written)
    lag: int | None  # messages on the broker not yet in Delta (None: the broker cannot tell, e.g. MQTT)

    @property
    def pending_gap(self) -> int:
        """Messages the broker deleted before they were ingested, which the next batch will meet (`on_gap`)."""
        if self.position is None or self.broker_start is None:
            return 0
        return max(0, self.broker_start - 1 - self.position)


@dataclass(frozen=True)
class PipelineFigures:
    pipeline: str
    source: str  # kafka | nats | mqtt
    partitions: list[PartitionFigures]
    last_batch_at: datetime | None  # commit time of the target's last live batch (None: none in the lookback)
    target_rows: int
    quarantined_rows: int

    @property
    def lag(self) -> int:
        """Messages left over all partitions whose lag is known (what `ingest status` prints)."""
        return sum(p.lag for p in self.partitions if p.lag is not None)


def partition_lag(broker_start: int | None, broker_end: int | None, position: int | None) -> int:
    """Messages after the Delta position up to the broker's end (from the start of retention if never written)."""
    if broker_end is None:
        return 0
    floor = (broker_start - 1 if broker_start is not None else -1) if position is None else position
    return max(0, broker_end - floor)


def figures_of(pipeline: str, source_kind: str, states: Iterable[PartitionState],
               versions: Mapping[str, int | None], last_batch_at: datetime | None, target_rows: int,
               quarantined_rows: int, knows_bounds: bool = True) -> PipelineFigures:
    """The figures of one pipeline from the broker's bounds and the target table's versions (pure)."""
    partitions = [
        PartitionFigures(s.app_id, s.partition, s.first, s.last, versions.get(s.app_id),
                         partition_lag(s.first, s.last, versions.get(s.app_id)) if knows_bounds else None)
        for s in states
    ]
    return PipelineFigures(pipeline, source_kind, partitions, last_batch_at, target_rows, quarantined_rows)


def pipeline_figures(source: Source, target: DeltaTableSink, quarantine: DeltaTableSink) -> PipelineFigures:
    """The pipeline's figures now. Raises if the broker or a table cannot be read (the caller says which)."""
    states = source.state()
    versions = target.versions([s.app_id for s in states])
    table = target.table(refresh=False)  # refreshed by versions() above
    return figures_of(
        target.pipeline, source.kind, states, versions,
        last_batch_at=None if table is None else last_live_commit(table),
        target_rows=0 if table is None else int(table.count()),
        quarantined_rows=quarantine.row_count(),
        knows_bounds=getattr(source, "reports_bounds", True))  # a source that does not say: it does


@dataclass(frozen=True)
class PipelineStatus:
    """What `ingest status` shows for one pipeline: its figures, or why they could not be read."""

    pipeline: str
    source: str
    figures: PipelineFigures | None = None
    error: str | None = None
    note: str | None = None  # what the source adds (MQTT: messages the broker says it dropped)
    shards: int = 1  # a sharded Kafka pipeline: shard i owns the partitions p with p % shards == i

    @property
    def lag_by_shard(self) -> dict[int, int] | None:
        """Messages behind per shard (None for an unsharded pipeline or one that could not be read)."""
        if self.shards == 1 or self.figures is None:
            return None
        lags = dict.fromkeys(range(self.shards), 0)
        for p in self.figures.partitions:
            lags[p.partition % self.shards] += p.lag or 0
        return lags

    def as_dict(self) -> dict[str, Any]:
        """The `--json` document: the figures flat beside the name, or the error."""
        out: dict[str, Any] = {"pipeline": self.pipeline, "source": self.source, "error": self.error,
                               "note": self.note, "lag_by_shard": self.lag_by_shard}
        if self.figures is not None:
            figures = asdict(self.figures)
            figures.pop("pipeline"), figures.pop("source")
            figures["lag"] = self.figures.lag
            figures["last_batch_at"] = self.figures.last_batch_at.isoformat() if self.figures.last_batch_at else None
            out.update(figures)
        return out


def read_status(spec: PipelineSpec) -> PipelineStatus:
    """Ask the broker and the tables; a pipeline that cannot be read gets its error, not an exception."""
    from ingest_defs.resources.brokers import source_for

    source = source_for(spec)
    try:
        figures = pipeline_figures(source, DeltaTableSink.of(spec, "target"),
                                   DeltaTableSink.of(spec, "quarantine"))
        note = source.status_note() if hasattr(source, "status_note") else None
        return PipelineStatus(spec.name, spec.source.kind, figures, note=note, shards=spec.shards)
    except Exception as exc:  # one broken pipeline must not hide the others
        return PipelineStatus(spec.name, spec.source.kind, error=str(exc))
    finally:
        source.close()


def last_live_commit(table: DeltaTable, lookback: int = LAST_COMMIT_LOOKBACK) -> datetime | None:
    """Commit time of the newest live batch among the last `lookback` commits (replay commits do not count)."""
    for entry in table.history(lookback):
        if entry.get("ingest.batch_id") and entry.get("ingest.mode") != "replay":
            return datetime.fromtimestamp(entry["timestamp"] / 1000, UTC)
    return None

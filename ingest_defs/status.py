"""Where a pipeline stands: broker end, Delta position and lag per source partition, last batch, quarantine.

`pipeline_status` is a pure function of what the broker and the tables say, so `ingest status` (tables and
`--json`) and the metrics exporter compute the same figures the same way; `read_status` gathers its inputs.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from ingest_defs.config import PipelineSpec
from ingest_defs.sources.base import PartitionState


@dataclass(frozen=True)
class PartitionStatus:
    partition: int
    app_id: str
    broker_first: int | None  # first offset/sequence the broker still holds (None: empty)
    broker_last: int | None  # last offset/sequence available (None: empty)
    delta_version: int | None  # last offset covered by the target table (None: nothing ingested)
    lag: int  # messages on the broker beyond the Delta position


@dataclass(frozen=True)
class PipelineStatus:
    pipeline: str
    source: str
    partitions: list[PartitionStatus] = field(default_factory=list)
    lag: int = 0
    last_batch_at: datetime | None = None  # commit time of the last live batch, UTC
    quarantined: int = 0  # rows in the quarantine table
    error: str | None = None  # why the figures could not be read (the broker or a table is unavailable)

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["last_batch_at"] = self.last_batch_at.isoformat() if self.last_batch_at else None
        return out


def partition_lag(state: PartitionState, version: int | None) -> int:
    """Messages the broker holds beyond the stored version (all it holds when nothing was ingested)."""
    if state.last is None:
        return 0
    floor = (state.first - 1) if version is None else version
    return max(0, state.last - floor)


def pipeline_status(pipeline: str, source: str, states: Iterable[PartitionState],
                    versions: Mapping[str, int | None], last_batch_at: datetime | None,
                    quarantined: int) -> PipelineStatus:
    """The figures of one pipeline from the broker's bounds and the target table's versions."""
    parts = [PartitionStatus(s.partition, s.app_id, s.first, s.last, versions.get(s.app_id),
                             partition_lag(s, versions.get(s.app_id))) for s in states]
    return PipelineStatus(pipeline, source, parts, sum(p.lag for p in parts), last_batch_at, quarantined)


def read_status(spec: PipelineSpec) -> PipelineStatus:
    """Ask the broker and the tables; a pipeline that cannot be read gets its error, not an exception."""
    from ingest_defs.resources.brokers import source_for
    from ingest_defs.sink import DeltaTableSink

    target = DeltaTableSink(spec.table_uri(), spec.name, "target")
    quarantine = DeltaTableSink(spec.quarantine_uri(), spec.name, "quarantine")
    source = source_for(spec)
    try:
        states = source.state()
        versions = target.versions([s.app_id for s in states])
        return pipeline_status(spec.name, spec.source.kind, states, versions, last_batch_time(target),
                               quarantine.row_count())
    except Exception as exc:  # one broken pipeline must not hide the others
        return PipelineStatus(spec.name, spec.source.kind, error=str(exc))
    finally:
        source.close()


def last_batch_time(sink: Any) -> datetime | None:
    """Commit time of the last live batch in a table's recent history (replays do not count)."""
    table = sink.table()
    if table is None:
        return None
    for entry in table.history(20):
        if entry.get("ingest.batch_id") and entry.get("ingest.mode") != "replay":
            return datetime.fromtimestamp(entry["timestamp"] / 1000, UTC)
    return None

"""The one small protocol every broker source implements: plan a range, read a range, acknowledge a range.

Offsets are inclusive. A source's "version" for an app id is the last offset it has *covered* (read or
deliberately passed over), which is what the Delta transaction for that app id records.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

StoredVersion = Callable[[str], int | None]
"""Looks up the last covered offset recorded in the target table for an app id (None: never written)."""


class SourceError(RuntimeError):
    """A broker-side condition the pipeline must not paper over (missing topic, recreated topic, ...)."""


@dataclass(frozen=True)
class PartitionRange:
    """An inclusive offset range of one source partition, keyed by the Delta transaction app id."""

    app_id: str
    partition: int
    start: int
    end: int

    @property
    def count(self) -> int:
        return max(0, self.end - self.start + 1)

    def as_dict(self) -> dict[str, Any]:
        return {"app_id": self.app_id, "partition": self.partition, "start": self.start, "end": self.end}


@dataclass(frozen=True)
class Gap:
    """Offsets the broker no longer holds that were never ingested (retention, purge, lost session)."""

    app_id: str
    partition: int
    first_lost: int
    last_lost: int
    reason: str

    def describe(self) -> str:
        n = self.last_lost - self.first_lost + 1
        return (f"{self.app_id}: offsets {self.first_lost}..{self.last_lost} ({n} messages) were removed by the "
                f"broker before ingestion ({self.reason})")


@dataclass
class Plan:
    """What a batch will read. `ranges` is empty when there is nothing to do."""

    ranges: list[PartitionRange]
    gaps: list[Gap] = field(default_factory=list)
    lag_after: int = 0  # messages available beyond this plan
    # Sources whose broker decides what comes next (MQTT, NATS work queues) plan "from version V, at
    # most N": then bounded is False and ranges hold one open range whose end is start + N - 1.
    bounded: bool = True

    @property
    def total(self) -> int:
        return sum(r.count for r in self.ranges)

    @property
    def empty(self) -> bool:
        return not self.ranges


@dataclass
class RawBatch:
    """Messages read for one batch, column by column (no per-message objects kept)."""

    payloads: list[bytes]
    offsets: list[int]
    partitions: list[int] | int
    streams: list[str] | str
    keys: list[bytes | None] | None
    headers: list[list[tuple[str, bytes | None]] | None] | None
    timestamps_ms: list[int | None] | None
    covered: list[PartitionRange]
    nbytes: int = 0
    # Source-specific extra columns (e.g. MQTT fingerprints), same length as payloads.
    extra_columns: dict[str, Sequence[Any]] = field(default_factory=dict)
    # What `acknowledge` needs (e.g. pending MQTT message ids); opaque to the lifecycle.
    ack_token: Any = None
    # Messages left on the broker after this batch, when the source knows better than the plan did
    # (unbounded plans: NATS work queues report num_pending; None: derive it from the plan).
    lag_after: int | None = None
    # Source-specific counts of this batch (e.g. MQTT `qos0_messages`): materialization metadata, ledger.
    counters: dict[str, int] = field(default_factory=dict)
    # What the run log should warn about for this batch (e.g. MQTT QoS 0 messages are at most once).
    warnings: list[str] = field(default_factory=list)
    # Why an open batch (unbounded plan) ended: max_messages, max_bytes, idle, max_wait, connection_lost.
    ended_by: str | None = None

    def __len__(self) -> int:
        return len(self.payloads)


@dataclass(frozen=True)
class PartitionState:
    """What the broker holds for one partition, for `ingest status` and lag metrics."""

    app_id: str
    partition: int
    first: int | None  # first offset still held (None: empty)
    last: int | None  # last offset available (None: empty)


class Source(Protocol):
    """A broker source. Everything broker-specific lives behind these methods."""

    kind: str
    # False when the broker cannot tell its bounds or queue depth (MQTT): lag is then unknown, not 0.
    reports_bounds: bool

    def plan(self, stored: StoredVersion, max_messages: int) -> Plan:
        """Fix exact inclusive ranges per partition from the broker's bounds and the stored versions.

        Never reads payloads, never commits or acknowledges."""
        ...

    def read(self, plan: Plan, max_bytes: int) -> RawBatch:
        """Read exactly the planned ranges (or fewer if max_bytes ends them early) and report coverage."""
        ...

    def acknowledge(self, batch: RawBatch) -> None:
        """Tell the broker the batch is durable in Delta (group commit / JetStream ack / PUBACK)."""
        ...

    def state(self) -> list[PartitionState]:
        """The broker's current bounds per partition."""
        ...

    def identity(self) -> dict[str, str]:
        """Stable facts identifying the source (e.g. topic id); stored as Delta table properties."""
        ...

    def publish(self, payloads: Sequence[bytes], keys: Sequence[bytes | None] | None = None) -> int:
        """Produce test or demo messages to the source; returns how many were acknowledged by the broker."""
        ...

    def ensure_exists(self) -> None:
        """Create the topic/stream if missing (used by `ingest produce`, the demo and tests; never by a batch)."""
        ...

    def close(self) -> None: ...


class Draining(Protocol):
    """Optional, for sources whose broker forgets what it has sent (MQTT QoS 0): at the end of a run, stop
    the delivery and hand over what was delivered but not taken, as one more batch to commit (nothing to
    acknowledge). Without it, closing the connection would lose those messages."""

    def drain(self) -> RawBatch | None: ...

"""The one small protocol every broker source implements: plan a range, read a range, acknowledge a range.

Offsets are inclusive. A source's "version" for an app id is the last offset it has *covered* (read or
deliberately passed over), which is what the Delta transaction for that app id records.
"""

from __future__ import annotations

from array import array
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import accumulate
from typing import TYPE_CHECKING, Any, Protocol, overload

if TYPE_CHECKING:
    import polars as pl

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


INT32_MAX = 2**31 - 1


class PackedPayloads(Sequence[bytes]):
    """A batch's payloads packed newline-separated into a few buffers (one per read chunk) instead of one
    Python `bytes` per message: ~105 bytes of a 150-byte JSON message instead of ~150 plus a list slot.

    It is a read-only sequence of `bytes` (indexing and iteration give exactly what a list would), and
    `joined()` is `b"\\n".join(payloads)` ready-made: what the JSON fast path reads."""

    __slots__ = ("_chunks", "_lengths", "_starts")

    def __init__(self, values: Sequence[bytes] = ()) -> None:
        self._chunks: list[bytes] = []
        self._lengths = array("I")  # 4 bytes a message (Kafka and NATS cap messages far below 4 GiB)
        self._starts: array[int] | None = None  # built on first random access
        self.extend(values)

    @classmethod
    def of_joined(cls, data: bytes, lengths: array[int]) -> PackedPayloads:
        """Payloads already joined by newlines into `data`, with each one's length (`lengths`, typecode "I")."""
        packed = cls()
        if lengths:
            packed._chunks.append(data)
            packed._lengths = lengths
        return packed

    def extend(self, values: Sequence[bytes]) -> None:
        if values:
            self._chunks.append(b"\n".join(values))
            self._lengths.extend(map(len, values))
            self._starts = None

    def joined(self) -> bytes:
        """All payloads joined by newlines (one buffer from now on)."""
        if len(self._chunks) > 1:
            self._chunks = [b"\n".join(self._chunks)]
        return self._chunks[0] if self._chunks else b""

    @property
    def nbytes(self) -> int:
        return sum(self._lengths)

    def has_empty(self) -> bool:
        return bool(self._lengths) and min(self._lengths) == 0

    def binary_series(self, name: str) -> pl.Series:
        """The payloads as a polars Binary column over the packed buffer, not a copy of it: Arrow binary views
        (16 bytes a payload, which point into the buffer, or hold a payload of up to 12 bytes themselves)."""
        import numpy as np  # here, not at import: light commands never load them
        import polars as pl
        import pyarrow as pa

        n = len(self._lengths)
        data = self.joined()
        if not n:
            return pl.Series(name, [], dtype=pl.Binary)
        if len(data) > INT32_MAX:  # a view addresses its buffer with 32-bit offsets
            return pl.Series(name, list(self), dtype=pl.Binary)
        lengths = np.frombuffer(self._lengths, dtype=np.uint32).astype("<i4")
        starts = np.zeros(n, dtype="<i4")
        np.cumsum(lengths[:-1] + 1, out=starts[1:])  # one newline between payloads
        buffer = np.frombuffer(data, dtype=np.uint8)
        views = np.zeros((n, 16), dtype=np.uint8)  # length, then 12 bytes inline or prefix, buffer 0, offset
        as_int32 = views.view("<i4")
        as_int32[:, 0] = lengths
        inline = lengths <= 12
        if inline.any() and len(data):
            at = np.minimum(starts[inline, None] + np.arange(12), len(data) - 1)
            head = buffer[at]
            head[np.arange(12) >= lengths[inline, None]] = 0  # the bytes past a short payload are zero
            views[inline, 4:] = head
        pointed = ~inline
        if pointed.any():
            views[pointed, 4:8] = buffer[starts[pointed, None] + np.arange(4)]
            as_int32[pointed, 3] = starts[pointed]
        column = pa.Array.from_buffers(pa.binary_view(), n, [None, pa.py_buffer(views), pa.py_buffer(data)])
        return pl.Series(_ArrowCData(column)).alias(name)

    def __len__(self) -> int:
        return len(self._lengths)

    @overload
    def __getitem__(self, index: int) -> bytes: ...
    @overload
    def __getitem__(self, index: slice) -> list[bytes]: ...
    def __getitem__(self, index: int | slice) -> bytes | list[bytes]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        n = len(self._lengths)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError("payload index out of range")
        if self._starts is None:
            self._starts = array("q", accumulate((length + 1 for length in self._lengths[:-1]), initial=0))
        start = self._starts[index]
        return self.joined()[start:start + self._lengths[index]]

    def __iter__(self) -> Iterator[bytes]:
        data, pos = self.joined(), 0
        for length in self._lengths:
            yield data[pos:pos + length]
            pos += length + 1


class _ArrowCData:
    """An Arrow array seen only through the Arrow C data interface (the PyCapsule protocol polars reads).
    Handed a pyarrow array, polars imports `pyarrow.compute` to look for chunked dictionaries first: 3 MB of
    private memory in the first batch, for a column that is neither."""

    __slots__ = ("_array",)

    def __init__(self, array: Any) -> None:
        self._array = array

    def __arrow_c_array__(self, requested_schema: object | None = None) -> tuple[object, object]:
        return self._array.__arrow_c_array__(requested_schema)


def joined_payloads(payloads: Sequence[bytes]) -> bytes:
    """`b"\\n".join(payloads)`, taken ready-made from packed payloads."""
    return payloads.joined() if isinstance(payloads, PackedPayloads) else b"\n".join(payloads)


def payload_series(name: str, payloads: Sequence[bytes]) -> pl.Series:
    """A batch's payloads as a Binary column."""
    if isinstance(payloads, PackedPayloads):
        return payloads.binary_series(name)
    import polars as pl

    return pl.Series(name, payloads, dtype=pl.Binary)


def all_nonempty(payloads: Sequence[bytes]) -> bool:
    """`all(payloads)` without a Python object per packed payload."""
    return not payloads.has_empty() if isinstance(payloads, PackedPayloads) else all(payloads)


@dataclass
class RawBatch:
    """Messages read for one batch, column by column (no per-message objects kept).

    Columns are sequences: plain lists, or packed forms (`PackedPayloads`; numpy arrays of offsets and
    timestamps; a pyarrow binary array of keys) that polars takes without a Python object per message."""

    payloads: Sequence[bytes]
    offsets: Sequence[int]
    partitions: list[int] | int
    streams: list[str] | str
    keys: Sequence[bytes | None] | None
    headers: list[list[tuple[str, bytes | None]] | None] | None
    timestamps_ms: Sequence[int | None] | None
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

    # Set by release_columns(): how many messages the batch had once its columns are gone.
    released_length: int | None = None

    def __len__(self) -> int:
        return len(self.payloads) if self.released_length is None else self.released_length

    def release_columns(self) -> None:
        """Let go of the message columns once the batch's frames are built from them. What remains (ranges,
        ack token, counters) is all that the commit and the acknowledgement read, and the next batch is
        being read meanwhile: its columns and this one's need not be held at once."""
        self.released_length = len(self)
        self.payloads, self.offsets, self.keys, self.headers, self.timestamps_ms = (), (), None, None, None
        self.extra_columns = {}
        if isinstance(self.streams, list):  # one per message (a single stream or partition is kept)
            self.streams = []
        if isinstance(self.partitions, list):
            self.partitions = []


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

"""Packed batch columns (no Python object per message) behave exactly like the lists they replace."""

import io
import json
import random
from datetime import UTC, datetime

import numpy as np
import polars as pl
import pytest

from ingest_defs.decode import ROW, decode_payloads, standard_columns
from ingest_defs.sources.base import (
    PackedPayloads,
    PartitionRange,
    RawBatch,
    all_nonempty,
    joined_payloads,
    payload_series,
)
from ingest_defs.sources.kafka import _PackedKeys, prefetch_settings

SCHEMA = {"id": pl.Int64(), "event": pl.String()}


def _payloads() -> list[bytes]:
    out = [json.dumps({"id": i, "event": "click"}).encode() for i in range(50)]
    out[7] = b""  # empty
    out[9] = b'{"id": 9,\n "event": "x"}'  # a raw newline inside a message
    out[11] = b"\xff not json"
    return out


def _packed(values: list[bytes], chunk: int = 8) -> PackedPayloads:
    packed = PackedPayloads()
    for i in range(0, len(values), chunk):
        packed.extend(values[i:i + chunk])
    return packed


@pytest.mark.parametrize("chunk", [1, 8, 1000])
def test_packed_payloads_read_like_the_list(chunk: int):
    values = _payloads()
    packed = _packed(values, chunk)
    assert len(packed) == len(values)
    assert list(packed) == values
    assert [packed[i] for i in range(len(values))] == values
    assert packed[-1] == values[-1] and packed[3:12:2] == values[3:12:2]
    assert joined_payloads(packed) == b"\n".join(values)
    assert packed.nbytes == sum(map(len, values))
    assert not all_nonempty(packed) and all_nonempty(_packed([v for v in values if v]))
    assert list(packed) == values  # still the same after the buffers were joined into one
    with pytest.raises(IndexError):
        packed[len(values)]


def test_decoding_packed_payloads_equals_decoding_the_list():
    values = _payloads()
    from_list, from_packed = decode_payloads(values, SCHEMA), decode_payloads(_packed(values), SCHEMA)
    assert from_packed.failures == from_list.failures and set(from_list.failures) == {7, 11}
    assert from_packed.rows.equals(from_list.rows)
    clean = [v for i, v in enumerate(values) if i not in (7, 9, 11)]
    fast = decode_payloads(_packed(clean), SCHEMA)  # the fast path reads the packed buffer as it is
    assert fast.failures == {} and fast.rows["id"].to_list() == [json.loads(v)["id"] for v in clean]


@pytest.mark.parametrize("chunks", [
    [[b"k1", b"k22"], [b"", b"k4"]],  # every message keyed (an empty key is a key, not null)
    [[None, None], [None]],  # no keys at all
    [[b"a", None], [b"c"]],  # mixed
    [[None], [b"b", b"c"]],  # keys start later
])
def test_packed_keys_give_the_same_column(chunks: list[list[bytes | None]]):
    keys = _PackedKeys()
    for chunk in chunks:
        keys.extend(chunk)
    flat = [k for chunk in chunks for k in chunk]
    column = keys.column(len(flat))
    if all(k is None for k in flat):
        assert column is None
    else:
        assert pl.Series("_key", column, dtype=pl.Binary).to_list() == flat


def test_standard_columns_take_packed_columns():
    n = 5
    raw = RawBatch(payloads=_packed([b"{}"] * n), offsets=np.arange(10, 10 + n, dtype=np.int64), partitions=3,
                   streams="t", keys=None, headers=None, timestamps_ms=np.array([1, -1, 3, 4, 5], dtype=np.int64),
                   covered=[PartitionRange("p/kafka/t/3", 3, 10, 14)])
    std = standard_columns(raw, "kafka", "b", datetime.now(UTC))
    assert std["_offset"].to_list() == list(range(10, 15)) and std["_partition"].to_list() == [3] * n
    assert std["_timestamp"].null_count() == 1 and std[ROW].to_list() == list(range(n))


@pytest.mark.parametrize("streams", [["sensors/site-01/temperature", "s/2", "sensors/site-01/temperature"] * 400,
                                     [f"sensors/site-{i:04d}/humidity" for i in range(50)], ["t"], []])
def test_a_stream_per_message_keeps_each_distinct_name_once(streams):
    """MQTT topics and NATS subjects repeat from message to message: the `_stream` column stores each distinct
    name once (rows are views of it), with exactly the values of the list."""
    n = len(streams)
    raw = RawBatch(payloads=_packed([b"{}"] * n), offsets=np.arange(n, dtype=np.int64), partitions=0,
                   streams=list(streams), keys=None, headers=None, timestamps_ms=None,
                   covered=[PartitionRange("p/mqtt/c", 0, 0, n - 1)])
    column = standard_columns(raw, "mqtt", "b", datetime.now(UTC))["_stream"]
    assert column.dtype == pl.String and column.to_list() == streams
    stored = column.to_arrow(compat_level=pl.CompatLevel.newest())
    assert stored.nbytes <= 16 * n + sum(len(s.encode()) for s in set(streams))


def test_prefetch_follows_the_batch():
    assert prefetch_settings(1 << 20)["queued.max.messages.kbytes"] == 1024
    assert prefetch_settings(64 << 20)["queued.max.messages.kbytes"] == 1024  # the default batch
    assert prefetch_settings(256 << 20)["queued.max.messages.kbytes"] == 4096
    assert prefetch_settings(1 << 40)["queued.max.messages.kbytes"] == 8192


def test_a_fetch_of_every_partition_asks_about_one_queue_of_bytes():
    """The per-partition fetch shares the queue's bytes over the partitions read: one partition keeps
    librdkafka's 1 MB, 64 partitions ask 32 kB each (at 1 MB each, a fetch of 64 brought 64× the queue,
    mostly parsed and thrown away when ranges ended), never below 32 kB, never above 1 MB."""
    fetch = "max.partition.fetch.bytes"
    assert prefetch_settings(64 << 20, 1)[fetch] == 1 << 20
    assert prefetch_settings(64 << 20, 4)[fetch] == 256 << 10
    assert prefetch_settings(64 << 20, 64)[fetch] == 32 << 10
    assert prefetch_settings(64 << 20, 1000)[fetch] == 32 << 10
    assert prefetch_settings(1 << 40, 64)[fetch] == 128 << 10  # an 8 MB queue over 64 partitions
    assert prefetch_settings(1 << 40, 0)[fetch] == 1 << 20


def test_a_full_prefetch_queue_is_refilled_without_the_default_one_second_backoff():
    """The small queue fills many times per batch; each time librdkafka waits `fetch.queue.backoff.ms`
    before fetching that partition again (1 s by default: a stall per refill). It must stay far below the
    read's consume timeout and not be left to the default."""
    backoff = prefetch_settings(100 << 20)["fetch.queue.backoff.ms"]
    assert 0 < backoff <= 50


def test_prefetch_settings_accept_a_large_message_max_bytes():
    """A pipeline that allows large messages (message.max.bytes above the prefetch) still gets a consumer."""
    from confluent_kafka import Consumer

    consumer = Consumer({"bootstrap.servers": "localhost:1", "group.id": "g", **prefetch_settings(8 << 20),
                         "message.max.bytes": 10_000_000})
    consumer.close()


def test_packed_payloads_become_a_binary_column_without_losing_a_byte():
    rng = random.Random(7)
    alphabet = [b"a", b"\n", b"\x00", b"\xff", b"{", b"\\"]  # newlines inside payloads too
    chunks = [[b"".join(rng.choices(alphabet, k=rng.randrange(0, 40))) for _ in range(rng.randrange(1, 30))]
              for _ in range(5)]
    chunks.append([b"x" * n for n in (11, 12, 13, 4, 3, 0)])  # a view holds ≤ 12 bytes itself, points beyond
    packed = PackedPayloads()
    for chunk in chunks:
        packed.extend(chunk)
    every = [p for chunk in chunks for p in chunk]
    column = payload_series("_raw", packed)
    assert column.dtype == pl.Binary and column.name == "_raw"
    assert column.to_list() == every
    order = list(range(len(every)))
    rng.shuffle(order)
    assert column.gather(order).to_list() == [every[i] for i in order]
    stored = io.BytesIO()  # as the sink writes it
    pl.DataFrame([column]).write_parquet(stored)
    stored.seek(0)
    assert pl.read_parquet(stored).get_column("_raw").to_list() == every
    assert payload_series("_raw", every).to_list() == every  # a plain list: the same column
    assert payload_series("_raw", PackedPayloads()).to_list() == []

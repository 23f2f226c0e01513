"""Poison messages through a real Kafka broker into real Delta tables: each nasty message sits in the
middle of a batch, lands in the quarantine with its reason, and the partition moves on, exactly once."""

from __future__ import annotations

import json
import os

import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic

from ingest_defs.resources.brokers import DEFAULT_KAFKA
from ingest_tests.conftest import assert_exactly_once, kafka_spec, run_until_caught_up

pytestmark = pytest.mark.usefixtures("stack")
BOOTSTRAP = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", DEFAULT_KAFKA)

# Each of these once stopped a batch, or changed a value, or came back with parser internals.
POISON = {
    b'{"id":1,"x":' + b"[" * 50_000 + b"]" * 50_000 + b"}": "nested deeper than 1024 levels",
    b'{"id":1,"event":"click","value":NaN}': "NaN is not valid JSON",
    b'{"id":1,"event":"click","value":1e400}': "number out of range",
    b'{"id":1,"other":' + b"7" * 5000 + b"}": "number out of range: an integer of 5000 digits",
    b'{"id":1,"event":"click\\ud800"}': "invalid escape \\ud800",
    b'{"id":1,"id":2,"event":"click"}': "duplicate key 'id'",
    b'\xef\xbb\xbf{"id":1,"event":"click"}': "byte order mark",
    b'{"id":1,"event":"cl\x01ick"}': "invalid JSON: Invalid control character",
    b'{"id":1,"event":"\xed\xa0\x80"}': "not UTF-8",
    b"[1,2,3]": "not an object",
    b'{"id":-5,"event":"click"}': "check failed: id",
}
FUTURE_MS = 2**62  # a CreateTime the topic allows but no Delta timestamp can hold (polars panicked on it)


def good(i: int) -> bytes:
    return json.dumps({"id": i, "event": "click", "value": i}).encode()


def produce(topic: str, messages: list[tuple[bytes, int | None]]) -> list[tuple[int, int]]:
    producer = Producer({"bootstrap.servers": BOOTSTRAP, "enable.idempotence": True})
    acked: list[tuple[int, int]] = []

    def on_delivery(err, msg):
        assert err is None, err
        acked.append((msg.partition(), msg.offset()))

    for value, timestamp in messages:
        producer.produce(topic, value=value, on_delivery=on_delivery, **({"timestamp": timestamp} if timestamp else {}))
    producer.flush(30)
    assert len(acked) == len(messages)
    return sorted(acked)


def test_poison_in_the_middle_of_a_batch_is_quarantined_and_the_partition_moves_on(lake, instance):
    spec = kafka_spec(partitions=1, batch={"max_messages": 5000})
    topic = spec.source.kafka.topic
    admin = AdminClient({"bootstrap.servers": BOOTSTRAP})
    # Kafka 4 refuses timestamps more than an hour ahead unless the topic allows them: this one does.
    admin.create_topics([NewTopic(topic, 1, 1, config={"message.timestamp.after.max.ms": str(2**63 - 1)})])[topic].result(30)

    poison = list(POISON)
    messages = [(good(i), None) for i in range(200)]
    messages += [(p, None) for p in poison] + [(good(1000), FUTURE_MS)]
    messages += [(good(i), None) for i in range(200, 400)]
    offsets = produce(topic, messages)
    run_until_caught_up(spec, instance)
    target, quarantine = assert_exactly_once(spec, set(offsets))

    # exactly the poison messages are quarantined, each with its reason and its exact bytes
    reasons = {bytes(r): e for r, e in zip(quarantine["_raw"].to_list(), quarantine["_error"].to_list(), strict=True)}
    assert len(reasons) == len(poison) + 1
    for payload, expected in POISON.items():
        assert expected in reasons[payload], (expected, reasons[payload])
        assert "TapeError" not in reasons[payload] and "InternalError" not in reasons[payload]
    assert "broker timestamp out of range" in reasons[good(1000)]
    assert sorted(target["id"].to_list()) == list(range(400))

    # the partition has moved on: new messages after the poison are ingested, nothing doubled
    more = produce(topic, [(good(i), None) for i in range(400, 450)])
    run_until_caught_up(spec, instance)
    target, _ = assert_exactly_once(spec, set(offsets) | set(more))
    assert sorted(target["id"].to_list()) == list(range(450))


UNSIGNED_SCHEMA = {"columns": {"id": {"dtype": "int64"}, "u8": {"dtype": "uint8"}, "u16": {"dtype": "uint16"},
                               "u32": {"dtype": "uint32"}, "u64": {"dtype": "uint64"}}}


def test_unsigned_values_above_the_signed_range_land_and_out_of_range_ones_are_quarantined(lake, instance):
    """Delta has no unsigned types: a uint32 of 3e9 once failed every retry of its batch's commit."""
    spec = kafka_spec(partitions=1, schema=UNSIGNED_SCHEMA)
    tops = {"u8": 2**8 - 1, "u16": 2**16 - 1, "u32": 2**32 - 1, "u64": 2**64 - 1}
    rows = [{"id": i, "u8": i % 256, "u16": i, "u32": i, "u64": i} for i in range(50)]
    rows += [{"id": 50, **tops}, {"id": 51, "u8": 200, "u16": 40_000, "u32": 3_000_000_000, "u64": 2**63 + 1}]
    too_big = {"u8": 256, "u16": 2**16, "u32": 2**32, "u64": 2**64}
    bad = [json.dumps({"id": 100 + n, **{**tops, col: value}}).encode() for n, (col, value) in enumerate(too_big.items())]
    offsets = produce(spec.source.kafka.topic, [(json.dumps(r).encode(), None) for r in rows] + [(b, None) for b in bad])
    run_until_caught_up(spec, instance)
    target, quarantine = assert_exactly_once(spec, set(offsets))

    landed = {r["id"]: r for r in target.select("id", *tops).to_dicts()}
    assert landed == {r["id"]: r for r in rows}  # every value exact, the largest ones too
    assert sorted(bytes(r) for r in quarantine["_raw"].to_list()) == sorted(bad)
    assert all("out of range" in e for e in quarantine["_error"].to_list()), quarantine["_error"].to_list()

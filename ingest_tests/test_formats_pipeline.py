"""Avro, Protobuf and JSON Schema pipelines against the stack's real schema registry (Apicurio) and Kafka
(and one over NATS): type-exact landing, v1 → v2 evolution in one table, every kind of bad input in
quarantine with its reason, `ingest produce` samples, a declared column that disagrees with the registry,
and a replay that decodes each message with the schema id it carries."""

from __future__ import annotations

import json
import os
import uuid
from typing import Any

import polars as pl
import pytest

from ingest_defs.config import ConfigError, parse_pipeline
from ingest_defs.formats.confluent import frame_message
from ingest_defs.formats.registry import SchemaRejected, registry_for
from ingest_defs.resources.brokers import source_for
from ingest_defs.samples import make_samples
from ingest_tests.conftest import (
    assert_exactly_once,
    failure_message,
    ingest_cli,
    landed,
    run_job,
    run_until_caught_up,
    unique,
    write_pipelines_file,
)
from ingest_tests.formats_cases import (
    AVRO_INCOMPATIBLE,
    AVRO_V1,
    FORMATS,
    JSON_V1,
    PROTO_V1,
    Producer,
    bad_payloads,
    landed_row,
    record,
)
from ingest_tests.test_kafka_pipeline import group_offsets, produce

pytestmark = pytest.mark.usefixtures("stack")

LANDED_TYPES = {
    "amount": {"avro": pl.Decimal(12, 2), "protobuf": pl.Float64, "json_schema": pl.Float64},
    "placed_at": pl.Datetime("us", "UTC"), "day": pl.Date, "status": pl.String,
    "customer": pl.Struct({"name": pl.String, "vip": pl.Boolean}), "tags": pl.List(pl.String), "note": pl.String,
}


def registry_spec(fmt: str, name: str | None = None, **overrides: Any):
    name = name or unique(f"reg_{fmt}")
    raw: dict[str, Any] = {"source": {"kafka": {"topic": f"t_{name}", "partitions": 1}}, "format": fmt,
                           "schema": {"columns": {"id": {"nullable": False, "checks": {"ge": 0}}}},
                           "table": f"bronze/{name}", "batch": {"max_messages": 1000}}
    raw.update(overrides)
    return parse_pipeline(name, raw)


def payload_rows(frame: pl.DataFrame, columns: list[str]) -> list[dict[str, Any]]:
    return frame.sort("id").select(columns).to_dicts()


@pytest.mark.parametrize("fmt", FORMATS)
def test_lands_type_exact_evolves_and_quarantines_every_bad_input(lake, instance, fmt: str):
    spec = registry_spec(fmt)
    topic = spec.source.kafka.topic
    v1 = Producer(fmt, topic, 1)
    records = [record(i) for i in range(40)]
    goods = [v1(r) for r in records]
    bad = bad_payloads(fmt, goods[0])
    failed_check = v1(record(-5))  # id -5: fails the declared `ge: 0`
    produced = produce(spec, goods[:20] + list(bad) + [failed_check] + goods[20:])
    run_until_caught_up(spec, instance)
    target, quarantine = assert_exactly_once(spec, produced)

    expected = [landed_row(fmt, r) for r in records]
    columns = list(expected[0])
    assert payload_rows(target, columns) == expected
    for column, dtype in LANDED_TYPES.items():
        if column in target.columns:
            assert target.schema[column] == (dtype[fmt] if isinstance(dtype, dict) else dtype), column
    assert target.schema["id"] == pl.Int64
    reasons = dict(zip(quarantine["_raw"].to_list(), quarantine["_error"].to_list(), strict=True))
    assert set(reasons) == {*bad, failed_check}
    for payload, piece in bad.items():
        assert piece in reasons[payload], (piece, reasons[payload])
    assert reasons[failed_check].startswith("check failed: id")

    # v2 (an added optional field) evolves the same table on the next batch; v1 rows get null
    v2 = Producer(fmt, topic, 2)
    newer = [record(i, channel=True) for i in range(100, 110)]
    produced |= produce(spec, [v2(r) for r in newer] + [v1(record(200))])
    run_until_caught_up(spec, instance)
    target, quarantine = assert_exactly_once(spec, produced)
    assert target.schema["channel"] == pl.String
    assert payload_rows(target, [*columns, "channel"]) == (
        [{**row, "channel": None} for row in expected] + [landed_row(fmt, r) for r in newer]
        + [{**landed_row(fmt, record(200)), "channel": None}])
    assert quarantine.height == len(bad) + 1
    assert group_offsets(spec) == {0: max(o for _, o in produced) + 1}


@pytest.mark.parametrize("fmt", FORMATS)
def test_the_registry_refuses_an_incompatible_version(fmt: str):
    """Global compatibility is BACKWARD (set by the stack): changing a field's type is refused."""
    subject = f"incompat_{uuid.uuid4().hex[:8]}-value"
    spec = registry_spec(fmt)
    registry = registry_for(spec.registry, spec.name)
    first, changed, kind = {
        "avro": (json.dumps(AVRO_V1), json.dumps(AVRO_INCOMPATIBLE), "AVRO"),
        "json_schema": (json.dumps(JSON_V1), json.dumps({**JSON_V1, "properties": {
            **JSON_V1["properties"], "id": {"type": "string"}}}), "JSON"),
        "protobuf": (PROTO_V1, PROTO_V1.replace("int64 id = 1;", "string id = 1;"), "PROTOBUF"),
    }[fmt]
    registry.register(subject, first, kind)
    with pytest.raises(SchemaRejected, match="HTTP 409"):
        registry.register(subject, changed, kind)


@pytest.mark.parametrize("fmt", FORMATS)
def test_ingest_produce_samples_register_the_schema_file_and_land(lake, instance, tmp_path, fmt: str):
    """`ingest produce` encodes samples from `schema_registry.schema_file` (Protobuf as .proto text: the
    registry hands it back as text, compiled with protoc) and registers it; each bad kind is quarantined."""
    schema = tmp_path / {"avro": "o.avsc", "protobuf": "o.proto", "json_schema": "o.json"}[fmt]
    schema.write_text({"avro": json.dumps(AVRO_V1), "protobuf": PROTO_V1, "json_schema": json.dumps(JSON_V1)}[fmt])
    spec = registry_spec(fmt, schema_registry={"schema_file": str(schema)})
    samples = make_samples(spec, 200, bad_fraction=0.05, seed=3)
    produced = produce(spec, samples.payloads, samples.keys)
    run_until_caught_up(spec, instance)
    target, quarantine = assert_exactly_once(spec, produced)
    assert target.height == 200 - len(samples.bad)
    assert sorted(target["id"].to_list()) == sorted(i for i in range(200) if i not in samples.bad)
    kinds = {kind: quarantine.filter(pl.col("_raw") == samples.payloads[i])["_error"].item()
             for i, kind in samples.bad.items()}
    assert kinds["bad_magic"].startswith("not Confluent wire format")
    assert kinds["unknown_id"].startswith("unknown schema id")
    assert kinds["failed_check"].startswith("check failed: id")


def test_avro_over_nats_carries_the_wire_format(lake, instance):
    """Formats never know the broker: the same Avro messages through a JetStream limits stream."""
    name = unique("reg_nats")
    stream = f"S{uuid.uuid4().hex[:8].upper()}"
    spec = parse_pipeline(name, {"source": {"nats": {"stream": stream, "subject": f"{stream.lower()}.>"}},
                                 "format": "avro", "table": f"bronze/{name}", "batch": {"max_messages": 100}})
    producer = Producer("avro", stream, 1)  # subject <stream>-value: the NATS stream is the "topic"
    records = [record(i) for i in range(250)]
    payloads = [producer(r) for r in records] + [b"not avro"]
    source = source_for(spec)
    source.ensure_exists()
    source.publish(payloads)
    source.close()
    run_until_caught_up(spec, instance)
    target, quarantine = assert_exactly_once(spec, {(0, seq) for seq in range(1, len(payloads) + 1)})
    assert payload_rows(target, list(landed_row("avro", records[0]))) == [landed_row("avro", r) for r in records]
    assert quarantine["_error"].to_list() == ["not Confluent wire format: magic byte 0x6e, expected 0x00"]
    assert set(target["_source"].to_list()) == {"nats"}


def test_a_declared_column_that_disagrees_with_the_registry_fails_the_first_run(lake, instance):
    spec = registry_spec("avro", schema={"columns": {"amount": {"dtype": "float64"}}})
    produce(spec, [Producer("avro", spec.source.kafka.topic, 1)(record(1))])
    result = run_job(spec, instance)
    assert not result.success
    message = failure_message(result)
    assert "schema.columns.amount.dtype" in message and "Decimal(precision=12, scale=2)" in message
    target, quarantine = landed(spec)
    assert target.is_empty() and quarantine.is_empty()  # nothing committed
    assert group_offsets(spec) == {}


def test_replay_decodes_each_message_with_the_id_it_carries(lake, instance, tmp_path):
    """A batch of v1 messages replayed after v2 was registered: decoded with schema v1 (the id in each
    message), read as the newest version (the new field null), the batch's rows replaced exactly."""
    spec = registry_spec("avro")
    topic = spec.source.kafka.topic
    records = [record(i) for i in range(30)]
    produced = produce(spec, [Producer("avro", topic, 1)(r) for r in records] + [b"\x00\x00"])
    run_until_caught_up(spec, instance)
    before, _ = assert_exactly_once(spec, produced)
    Producer("avro", topic, 2)(record(99, channel=True))  # registers v2 only; nothing produced
    env = {"INGEST_PIPELINES": str(write_pipelines_file(tmp_path / "p.yaml", [spec])), "LAKE_ROOT": str(lake)}
    replay = ingest_cli(["replay", spec.name, "--from", "0", "--to", "30"], env)
    assert replay.returncode == 0, replay.stdout + replay.stderr
    after, quarantine = assert_exactly_once(spec, produced)
    assert after.schema["channel"] == pl.String and after["channel"].null_count() == 30
    columns = list(landed_row("avro", records[0]))
    assert payload_rows(after, columns) == payload_rows(before, columns) == [landed_row("avro", r) for r in records]
    assert after["_batch_id"].to_list() == before["_batch_id"].to_list()
    assert quarantine["_error"].str.contains("shorter than the 5-byte header").all()


def test_unknown_subject_is_quarantined_not_a_crash(lake, instance):
    spec = registry_spec("avro", schema_registry={"subject": f"nobody-{uuid.uuid4().hex[:6]}"})
    body = Producer("avro", spec.source.kafka.topic, 1)(record(1))
    produced = produce(spec, [body, frame_message(int.from_bytes(body[1:5], "big"), body[5:])])
    run_until_caught_up(spec, instance)
    target, quarantine = assert_exactly_once(spec, produced)
    assert target.is_empty()
    assert quarantine["_error"].str.contains("no subject 'nobody-").all()


def test_registry_url_and_credentials_never_leak(lake, instance, monkeypatch):
    """A registry that refuses or cannot be reached fails the run naming the URL, never a password."""
    monkeypatch.setenv("REG_TEST_PASSWORD", "s3cr3t-" + uuid.uuid4().hex[:6])
    spec = registry_spec("avro", schema_registry={"url": "http://127.0.0.1:9/apis/ccompat/v7", "max_retries": 0,
                                                  "timeout_seconds": 2,
                                                  "security": {"username": "u", "password": "${REG_TEST_PASSWORD}"}})
    produce(spec, [Producer("avro", spec.source.kafka.topic, 1)(record(1))])
    result = run_job(spec, instance)
    assert not result.success
    message = failure_message(result)
    assert "schema registry http://127.0.0.1:9/apis/ccompat/v7" in message
    assert os.environ["REG_TEST_PASSWORD"] not in message
    assert group_offsets(spec) == {}
    with pytest.raises(ConfigError):
        parse_pipeline("x", {"source": {"kafka": {"topic": "t"}}, "format": "avro", "table": "t",
                             "schema_registry": {"security": {"username": "u", "password": "plain"}}})

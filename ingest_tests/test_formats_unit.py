"""Registry formats without brokers: the Avro fast path against the per-message path, the framing, the
protobuf wire details, schema constructs refused with the field's name, and the configuration."""

from __future__ import annotations

import datetime as dt
import io
import json
import random
from decimal import Decimal
from pathlib import Path

import fastavro
import polars as pl
import pytest

from ingest_defs.config import ConfigError, parse_pipeline
from ingest_defs.decode import ROW
from ingest_defs.formats.avro import AvroCodec
from ingest_defs.formats.confluent import Unsupported, frame_message, split_frames
from ingest_defs.formats.json_schema import JsonSchemaCodec
from ingest_defs.formats.protobuf import ProtobufCodec, _message_indexes
from ingest_defs.formats.registry import RegisteredSchema

WIDE = {"type": "record", "name": "Wide", "namespace": "t", "fields": [
    {"name": "id", "type": "long"},
    {"name": "small", "type": "int"},
    {"name": "ratio", "type": "float"},
    {"name": "score", "type": "double"},
    {"name": "ok", "type": "boolean"},
    {"name": "blob", "type": "bytes"},
    {"name": "code", "type": {"type": "fixed", "name": "Code", "size": 3}},
    {"name": "amount", "type": {"type": "bytes", "logicalType": "decimal", "precision": 12, "scale": 2}},
    {"name": "big", "type": {"type": "fixed", "name": "Big", "size": 9, "logicalType": "decimal", "precision": 20, "scale": 4}},
    {"name": "at", "type": {"type": "long", "logicalType": "timestamp-millis"}},
    {"name": "at_us", "type": {"type": "long", "logicalType": "timestamp-micros"}},
    {"name": "local", "type": {"type": "long", "logicalType": "local-timestamp-millis"}},
    {"name": "day", "type": {"type": "int", "logicalType": "date"}},
    {"name": "clock", "type": {"type": "int", "logicalType": "time-millis"}},
    {"name": "key", "type": {"type": "string", "logicalType": "uuid"}},
    {"name": "status", "type": {"type": "enum", "name": "Status", "symbols": ["NEW", "PAID", "SHIPPED"]}},
    {"name": "note", "type": ["null", "string"], "default": None},
    {"name": "maybe", "type": ["long", "null"]},
    {"name": "tags", "type": {"type": "array", "items": "string"}},
    {"name": "lines", "type": {"type": "array", "items": {"type": "record", "name": "Line", "fields": [
        {"name": "sku", "type": "string"}, {"name": "qty", "type": "int"}]}}},
    {"name": "customer", "type": ["null", {"type": "record", "name": "Customer", "fields": [
        {"name": "name", "type": "string"}, {"name": "since", "type": {"type": "long", "logicalType": "timestamp-millis"}}]}]},
]}


def wide_record(i: int, rng: random.Random) -> dict:
    at = dt.datetime(2026, 1, 1, tzinfo=dt.UTC) + dt.timedelta(milliseconds=rng.randint(0, 10**10))
    return {
        "id": i, "small": rng.randint(-2**31, 2**31 - 1), "ratio": 1.5, "score": rng.uniform(-1e12, 1e12),
        "ok": i % 2 == 0, "blob": rng.randbytes(rng.randint(0, 200)), "code": b"abc",
        "amount": Decimal(rng.randint(-10**11, 10**11)).scaleb(-2), "big": Decimal(rng.randint(-10**15, 10**15)).scaleb(-4),
        "at": at, "at_us": at + dt.timedelta(microseconds=rng.randint(0, 999)), "local": at.replace(tzinfo=None),
        "day": at.date(), "clock": dt.time(rng.randint(0, 23), rng.randint(0, 59), rng.randint(0, 59)),
        "key": "0b1e8f6a-4a39-4e5e-9c1a-6f0c8d2f3a11", "status": ["NEW", "PAID", "SHIPPED"][i % 3],
        "note": None if i % 3 else "x" * rng.randint(0, 300), "maybe": None if i % 4 else rng.randint(-10**15, 10**15),
        "tags": ["t"] * (i % 4), "lines": [{"sku": f"s{j}", "qty": j} for j in range(i % 3)],
        "customer": None if i % 5 == 0 else {"name": "c", "since": at},
    }


def encode(parsed_schema, record: dict) -> bytes:
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, parsed_schema, record)
    return buf.getvalue()


def avro_frames(schema: dict, records: list[dict], schema_id: int = 7) -> pl.Series:
    parsed = fastavro.parse_schema(schema)
    return pl.Series([frame_message(schema_id, encode(parsed, r)) for r in records], dtype=pl.Binary)


def parsed_avro(schema: dict, schema_id: int = 7):
    return AvroCodec().parse(RegisteredSchema(schema_id, "AVRO", json.dumps(schema)), None)


def test_avro_fast_path_lands_exact_types_and_equals_the_per_message_path() -> None:
    rng = random.Random(3)
    records = [wide_record(i, rng) for i in range(2000)]
    frames = avro_frames(WIDE, records)
    codec, writer = AvroCodec(), parsed_avro(WIDE)
    assert writer.native.batch_ok
    fast, failures = codec.decode(frames, writer, writer)
    assert failures == {}
    writer.native.batch_ok = False  # the isolating path, message by message (fastavro)
    slow, failures = codec.decode(frames, writer, writer)
    assert failures == {}
    assert fast.schema == slow.schema
    assert fast.equals(slow)
    assert dict(fast.drop(ROW).schema) == {
        "id": pl.Int64, "small": pl.Int32, "ratio": pl.Float32, "score": pl.Float64, "ok": pl.Boolean,
        "blob": pl.Binary, "code": pl.Binary, "amount": pl.Decimal(12, 2), "big": pl.Decimal(20, 4),
        "at": pl.Datetime("us", "UTC"), "at_us": pl.Datetime("us", "UTC"), "local": pl.Datetime("us"),
        "day": pl.Date, "clock": pl.Int64, "key": pl.String, "status": pl.String, "note": pl.String,
        "maybe": pl.Int64, "tags": pl.List(pl.String),
        "lines": pl.List(pl.Struct({"sku": pl.String, "qty": pl.Int32})),
        "customer": pl.Struct({"name": pl.String, "since": pl.Datetime("us", "UTC")}),
    }
    row = fast.row(7, named=True)
    want = records[7]
    assert row["amount"] == want["amount"] and row["big"] == want["big"]
    assert row["at"] == want["at"].replace(microsecond=want["at"].microsecond // 1000 * 1000)
    assert row["clock"] == ((want["clock"].hour * 60 + want["clock"].minute) * 60 + want["clock"].second) * 1_000_000
    assert row["customer"]["name"] == "c" and row["lines"] == want["lines"] and row["status"] == want["status"]


def test_avro_bodies_that_shift_their_neighbours_are_caught_by_the_size_check() -> None:
    """Moving one byte from a message to the next leaves the concatenation (and so polars' read) unchanged;
    only the per-row size check sees that neither message is its own record."""
    schema = {"type": "record", "name": "N", "fields": [{"name": "a", "type": "long"}, {"name": "b", "type": "long"}]}
    parsed = fastavro.parse_schema(schema)
    bodies = [encode(parsed, {"a": i, "b": i * 1000}) for i in range(500)]
    bodies[100], bodies[101] = bodies[100][:-1], bodies[100][-1:] + bodies[101]
    bodies[300] = bodies[300] + b"\x02"  # a byte appended: a valid varint for polars, garbage for the next row
    frames = pl.Series([frame_message(1, b) for b in bodies], dtype=pl.Binary)
    writer = parsed_avro(schema, 1)
    frame, failures = AvroCodec().decode(frames, writer, writer)
    assert set(failures) == {100, 101, 300}
    assert "truncated" in failures[100] and "left after the record" in failures[101]
    assert frame.height == 497 and frame.get_column("a").to_list() == [i for i in range(500) if i not in (100, 101, 300)]


def test_avro_maps_and_nullable_enums_take_the_per_message_path() -> None:
    schema = {"type": "record", "name": "M", "fields": [
        {"name": "id", "type": "long"}, {"name": "counts", "type": {"type": "map", "values": "long"}},
        {"name": "kind", "type": ["null", {"type": "enum", "name": "K", "symbols": ["A", "B"]}]}]}
    writer = parsed_avro(schema)
    assert not writer.native.batch_ok
    frame, failures = AvroCodec().decode(avro_frames(schema, [{"id": 1, "counts": {"x": 2}, "kind": "B"},
                                                              {"id": 2, "counts": {}, "kind": None}]), writer, writer)
    assert failures == {}
    assert frame.get_column("counts").to_list() == [[{"key": "x", "value": 2}], []]
    assert frame.get_column("kind").to_list() == ["B", None]


def test_avro_resolution_to_the_newest_version_adds_defaults_and_widens() -> None:
    v1 = {"type": "record", "name": "R", "fields": [{"name": "id", "type": "int"}, {"name": "gone", "type": "string"}]}
    v2 = {"type": "record", "name": "R", "fields": [
        {"name": "id", "type": "long"}, {"name": "channel", "type": "string", "default": "web"},
        {"name": "note", "type": ["null", "string"], "default": None}]}
    writer, reader = parsed_avro(v1, 1), parsed_avro(v2, 2)
    frame, failures = AvroCodec().decode(avro_frames(v1, [{"id": 5, "gone": "x"}], 1), writer, reader)
    assert failures == {}
    assert frame.drop(ROW).to_dicts() == [{"id": 5, "channel": "web", "note": None}]
    assert frame.schema["id"] == pl.Int64


@pytest.mark.parametrize("field_type, what", [
    (["string", "long"], "union of string and long"),
    ({"type": "long", "logicalType": "timestamp-nanos"}, "timestamp-nanos"),
    ({"type": "bytes", "logicalType": "decimal", "precision": 40, "scale": 2}, "precision 40"),
])
def test_avro_constructs_that_cannot_land_are_refused_naming_the_field(field_type, what) -> None:
    schema = {"type": "record", "name": "R", "fields": [{"name": "inner", "type": {
        "type": "record", "name": "I", "fields": [{"name": "bad", "type": field_type}]}}]}
    with pytest.raises(Unsupported) as info:
        parsed_avro(schema)
    assert "inner.bad" in str(info.value) and what in str(info.value)


def test_recursive_types_are_refused() -> None:
    avro = {"type": "record", "name": "Node", "fields": [{"name": "next", "type": ["null", "Node"]}]}
    with pytest.raises(Unsupported, match="recursive"):
        parsed_avro(avro)
    proto = 'syntax = "proto3"; message Tree { string name = 1; repeated Tree children = 2; }'
    with pytest.raises(Unsupported, match="'children': recursive message Tree"):
        ProtobufCodec().parse(RegisteredSchema(1, "PROTOBUF", proto), None)
    js = {"type": "object", "properties": {"a": {"oneOf": [{"type": "string"}, {"type": "integer"}]}}}
    with pytest.raises(Unsupported, match="field 'a': oneOf of several types"):
        JsonSchemaCodec().parse(RegisteredSchema(1, "JSON", json.dumps(js)), None)


def test_frames_that_are_not_the_wire_format_get_their_reason() -> None:
    frames = pl.Series([frame_message(258, b"x"), b"{\"a\": 1}", b"\x00\x00", b""], dtype=pl.Binary)
    ids, failures = split_frames(frames)
    assert ids.to_list() == [258, None, None, None]
    assert failures[1] == "not Confluent wire format: magic byte 0x7b, expected 0x00"
    assert "2 byte(s), shorter than the 5-byte header" in failures[2]
    assert "0 byte(s)" in failures[3]


def test_protobuf_message_indexes() -> None:
    head = frame_message(1, b"")
    assert _message_indexes(head + b"\x00rest") == ([0], 6)
    assert _message_indexes(head + b"\x04\x02\x06rest") == ([1, 3], 8)  # zigzag: 2 entries, 1 and 3
    assert _message_indexes(head + b"\x04\x02")[0] is None  # cut short
    assert _message_indexes(head + b"\x02\x0e") == ([7], 7)


def test_protobuf_types_from_proto_text() -> None:
    proto = """syntax = "proto3";
package t;
import "google/protobuf/timestamp.proto";
import "google/protobuf/wrappers.proto";
message Order {
  enum Status { NEW = 0; PAID = 1; }
  int64 id = 1; uint64 big = 2; uint32 small = 3; Status status = 4; google.protobuf.Timestamp at = 5;
  map<string, double> prices = 6; repeated Line lines = 7; oneof pay { string card = 8; int64 voucher = 9; }
  optional bool gift = 10; google.protobuf.Int64Value maybe = 11; bytes raw = 12; float f = 13;
}
message Line { string sku = 1; int32 qty = 2; }
"""
    parsed = ProtobufCodec().parse(RegisteredSchema(1, "PROTOBUF", proto), None)
    assert parsed.record_name == "t.Order"
    assert parsed.dtypes == {
        "id": pl.Int64, "big": pl.Decimal(20, 0), "small": pl.Int64, "status": pl.String,
        "at": pl.Datetime("us", "UTC"), "prices": pl.List(pl.Struct({"key": pl.String, "value": pl.Float64})),
        "lines": pl.List(pl.Struct({"sku": pl.String, "qty": pl.Int32})), "card": pl.String, "voucher": pl.Int64,
        "gift": pl.Boolean, "maybe": pl.Int64, "raw": pl.Binary, "f": pl.Float32,
    }


def test_json_schema_types_refs_and_required() -> None:
    schema = {"title": "T", "type": "object", "required": ["id"], "$defs": {"Who": {
        "type": "object", "properties": {"name": {"type": "string"}}}},
        "properties": {"id": {"type": "integer"}, "when": {"type": "string", "format": "date-time"},
                       "day": {"type": "string", "format": "date"}, "who": {"$ref": "#/$defs/Who"},
                       "tags": {"type": "array", "items": {"type": "string"}}, "n": {"type": ["number", "null"]}}}
    codec = JsonSchemaCodec()
    parsed = codec.parse(RegisteredSchema(4, "JSON", json.dumps(schema)), None)
    assert parsed.dtypes == {"id": pl.Int64, "when": pl.Datetime("us", "UTC"), "day": pl.Date,
                             "who": pl.Struct({"name": pl.String}), "tags": pl.List(pl.String), "n": pl.Float64}
    bodies = [b'{"id": 1, "when": "2026-01-02T03:04:05.123456Z", "day": "2026-01-02", "who": {"name": "a"}}',
              b'{"when": "2026-01-02T03:04:05+02:00"}', b'{"id": 3, "when": "not a time"}', b'{"id": 4,']
    frames = pl.Series([frame_message(4, b) for b in bodies], dtype=pl.Binary)
    frame, failures = codec.decode(frames, parsed, parsed)
    assert frame.get_column("id").to_list() == [1]
    assert frame.get_column("when").to_list() == [dt.datetime(2026, 1, 2, 3, 4, 5, 123456, tzinfo=dt.UTC)]
    assert "missing required field(s) id" in failures[1]
    assert 2 in failures and failures[3].startswith("invalid JSON")


# ------------------------------------------------------------ configuration
def registry_pipeline(tmp_path: Path, **extra) -> dict:
    return {"source": {"kafka": {"topic": "t"}}, "format": "avro", "table": str(tmp_path / "t"), **extra}


def test_registry_pipelines_need_no_columns_and_declared_ones_must_agree_with_the_schema_file(tmp_path: Path) -> None:
    spec = parse_pipeline("p", registry_pipeline(tmp_path))
    assert spec.uses_registry and spec.payload_schema == {}
    schema = tmp_path / "order.avsc"
    schema.write_text(json.dumps({"type": "record", "name": "O", "fields": [{"name": "id", "type": "long"}]}))
    ok = registry_pipeline(tmp_path, schema_registry={"schema_file": str(schema)},
                           schema={"columns": {"id": {"dtype": "int64", "checks": {"ge": 0}}}})
    assert parse_pipeline("p", ok).registry.schema_file == str(schema)
    with pytest.raises(ConfigError) as info:
        parse_pipeline("p", {**ok, "schema": {"columns": {"id": {"dtype": "int32"}}}})
    assert info.value.key == "schema.columns.id.dtype" and "declare `dtype: int64`" in str(info.value)
    with pytest.raises(ConfigError) as info:
        parse_pipeline("p", {**ok, "schema": {"columns": {"total": {"checks": {"ge": 0}}}}})
    assert info.value.key == "schema.columns.total" and "'total' is not a field" in str(info.value)
    schema.write_text(json.dumps({"type": "record", "name": "O", "fields": [{"name": "u", "type": ["int", "string"]}]}))
    with pytest.raises(ConfigError) as info:
        parse_pipeline("p", {**ok, "schema": {}})
    assert info.value.key == "schema_registry.schema_file" and "field 'u'" in str(info.value)


def test_registry_config_mistakes_name_key_and_fix(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        parse_pipeline("p", registry_pipeline(tmp_path, schema_registry={"security": {"username": "u", "password": "pw"}}))
    assert "schema_registry.security.password" in str(info.value) and "${" in str(info.value)
    with pytest.raises(ConfigError) as info:
        parse_pipeline("p", {**registry_pipeline(tmp_path), "source": {"mqtt": {"topics": ["a/b"]}}})
    assert info.value.key == "schema_registry.topic"
    with pytest.raises(ConfigError) as info:
        parse_pipeline("p", {"source": {"kafka": {"topic": "t"}}, "table": str(tmp_path / "j")})
    assert info.value.key == "schema" and "schema registry" in info.value.fix
    with pytest.raises(ConfigError) as info:
        parse_pipeline("p", registry_pipeline(tmp_path, format="protobuf", schema={"model": "x:Y"}))
    assert info.value.key == "schema.model"

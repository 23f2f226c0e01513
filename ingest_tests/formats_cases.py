"""One case per registry format for the pipeline and stack tests: a v1 and a v2 schema (v2 adds an
optional `channel`), records, what they land as, and bad payloads with the reason each must get.

Messages are produced with confluent-kafka's own serializers (AvroSerializer, ProtobufSerializer,
JSONSerializer), which register the schema under `<topic>-value`: the wire format is theirs, not ours."""

from __future__ import annotations

import datetime as dt
import json
import os
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroSerializer
from confluent_kafka.schema_registry.json_schema import JSONSerializer
from confluent_kafka.schema_registry.protobuf import ProtobufSerializer
from confluent_kafka.serialization import MessageField, SerializationContext

from ingest_defs.formats.confluent import frame_message
from ingest_defs.formats.protobuf import ProtobufCodec
from ingest_defs.formats.registry import RegisteredSchema
from ingest_defs.stack.registry import DEFAULT_URL

FORMATS = ("avro", "protobuf", "json_schema")
UNKNOWN_ID = 0x7FFFFFF1
T0 = dt.datetime(2026, 3, 1, 12, 0, tzinfo=dt.UTC)


def registry_url() -> str:
    return os.environ.get("SCHEMA_REGISTRY_URL") or DEFAULT_URL


def client() -> SchemaRegistryClient:
    return SchemaRegistryClient({"url": registry_url()})


AVRO_V1 = {"type": "record", "name": "Order", "namespace": "shop", "fields": [
    {"name": "id", "type": "long"},
    {"name": "amount", "type": {"type": "bytes", "logicalType": "decimal", "precision": 12, "scale": 2}},
    {"name": "placed_at", "type": {"type": "long", "logicalType": "timestamp-millis"}},
    {"name": "day", "type": {"type": "int", "logicalType": "date"}},
    {"name": "status", "type": {"type": "enum", "name": "Status", "symbols": ["NEW", "PAID"]}},
    {"name": "customer", "type": {"type": "record", "name": "Customer", "fields": [
        {"name": "name", "type": "string"}, {"name": "vip", "type": "boolean"}]}},
    {"name": "tags", "type": {"type": "array", "items": "string"}},
    {"name": "note", "type": ["null", "string"], "default": None},
]}
AVRO_V2 = {**AVRO_V1, "fields": [*AVRO_V1["fields"], {"name": "channel", "type": ["null", "string"], "default": None}]}
AVRO_INCOMPATIBLE = {**AVRO_V1, "fields": [{"name": "id", "type": "string"}]}

# A closed content model: adding an optional property to an open one is incompatible under BACKWARD
# (Confluent's rules, and Apicurio's: "property schemas narrowed").
JSON_V1 = {"$schema": "http://json-schema.org/draft-07/schema#", "title": "Order", "type": "object",
           "additionalProperties": False, "required": ["id", "placed_at"], "properties": {
               "id": {"type": "integer"}, "amount": {"type": "number"},
               "placed_at": {"type": "string", "format": "date-time"}, "day": {"type": "string", "format": "date"},
               "status": {"type": "string", "enum": ["NEW", "PAID"]},
               "customer": {"type": "object", "properties": {"name": {"type": "string"}, "vip": {"type": "boolean"}}},
               "tags": {"type": "array", "items": {"type": "string"}}, "note": {"type": ["string", "null"]}}}
JSON_V2 = {**JSON_V1, "properties": {**JSON_V1["properties"], "channel": {"type": ["string", "null"]}}}

PROTO_V1 = """syntax = "proto3";
package shop;
import "google/protobuf/timestamp.proto";
message Order {
  enum Status { NEW = 0; PAID = 1; }
  message Customer { string name = 1; bool vip = 2; }
  int64 id = 1; double amount = 2; google.protobuf.Timestamp placed_at = 3; Status status = 4;
  Customer customer = 5; repeated string tags = 6; optional string note = 7; map<string, int64> counts = 8;
%s}
"""
PROTO_V2 = PROTO_V1 % "  optional string channel = 9;\n"
PROTO_V1 = PROTO_V1 % ""


def record(i: int, channel: bool = False) -> dict[str, Any]:
    """A logical order; each format's producer turns it into its own message."""
    out = {"id": i, "amount": Decimal(i * 137 % 100000).scaleb(-2), "placed_at": T0 + dt.timedelta(milliseconds=i * 1001),
           "day": (T0 + dt.timedelta(days=i % 40)).date(), "status": "PAID" if i % 2 else "NEW",
           "customer": {"name": f"c{i % 7}", "vip": i % 3 == 0}, "tags": [f"t{j}" for j in range(i % 3)],
           "note": None if i % 4 else f"note {i}"}
    if channel:
        out["channel"] = "web" if i % 2 else None
    return out


@dataclass
class Producer:
    """Serializes records of one schema version for one topic (registering the schema on first use)."""

    fmt: str
    topic: str
    version: int

    def __post_init__(self) -> None:
        sr = client()
        self.ctx = SerializationContext(self.topic, MessageField.VALUE)
        if self.fmt == "avro":
            self._ser = AvroSerializer(sr, json.dumps(AVRO_V2 if self.version == 2 else AVRO_V1))
        elif self.fmt == "json_schema":
            self._ser = JSONSerializer(json.dumps(JSON_V2 if self.version == 2 else JSON_V1), sr)
        else:
            parsed = ProtobufCodec().parse(RegisteredSchema(0, "PROTOBUF", PROTO_V2 if self.version == 2 else PROTO_V1), None)
            self._cls = parsed.native.cls(parsed.native.message)
            self._ser = ProtobufSerializer(self._cls, sr, {"use.deprecated.format": False})

    def __call__(self, rec: dict[str, Any]) -> bytes:
        if self.fmt == "avro":
            return self._ser(rec, self.ctx)
        if self.fmt == "json_schema":
            doc = {**rec, "amount": float(rec["amount"]), "placed_at": rec["placed_at"].isoformat(),
                   "day": rec["day"].isoformat()}
            return self._ser(doc, self.ctx)
        msg = self._cls(id=rec["id"], amount=float(rec["amount"]), status=rec["status"], tags=rec["tags"])
        msg.placed_at.FromDatetime(rec["placed_at"])
        msg.customer.name, msg.customer.vip = rec["customer"]["name"], rec["customer"]["vip"]
        if rec["note"] is not None:
            msg.note = rec["note"]
        msg.counts["n"] = rec["id"]
        if rec.get("channel") is not None:
            msg.channel = rec["channel"]
        return self._ser(msg, self.ctx)


def landed_row(fmt: str, rec: dict[str, Any]) -> dict[str, Any]:
    """What `rec` must land as (the payload columns of its target row)."""
    out = dict(rec)
    if fmt == "protobuf":
        out["amount"] = float(rec["amount"])
        out.pop("day")
        out["counts"] = [{"key": "n", "value": rec["id"]}]
    if fmt == "json_schema":
        out["amount"] = float(rec["amount"])
    return out


def bad_payloads(fmt: str, good: bytes) -> dict[bytes, str]:
    """Bad messages of this format → a piece of the reason each must get in quarantine."""
    header, body = good[:5], good[5:]
    bad = {
        b'{"id": 1}': "not Confluent wire format: magic byte 0x7b",
        b"\x00\x00": "shorter than the 5-byte header",
        frame_message(UNKNOWN_ID, body): f"unknown schema id {UNKNOWN_ID}",
    }
    if fmt == "avro":
        bad[good[:-4]] = "corrupt Avro body"
        bad[good + b"\x02"] = "left after the record"
    elif fmt == "protobuf":
        bad[header + b"\x02\x0e" + body[1:]] = "message index [7] does not exist"
        bad[header + b"\x00" + b"\xff\xff\xff\xff"] = "corrupt Protobuf body"
    else:
        bad[good[:-3]] = "invalid JSON"
        bad[header + b'{"placed_at": "2026-01-01T00:00:00Z"}'] = "missing required field(s) id"
    return bad

"""`format: protobuf` — Confluent Protobuf bodies: after the 5-byte header, the message-index array
(zigzag varints; a single 0 means the file's first message) and the serialized message.

The registry route: Apicurio Registry 3.3.3 answers the Confluent deserializer's
`GET /schemas/ids/N?format=serialized` wrongly (HTTP 500 for a schema registered by the Python client, raw
descriptor bytes instead of base64 for one registered as `.proto` text), so confluent-kafka's
ProtobufDeserializer cannot be used against it. This module asks for the plain schema
(`GET /schemas/ids/N`), which Apicurio returns as registered: `.proto` text — compiled here with protoc from
grpcio-tools into descriptors (imports of other registered schemas are fetched by their references; the
well-known google/protobuf/*.proto come with grpcio-tools) — or a base64 FileDescriptorProto (what the
Confluent serializers register), used as it is. Each schema id gets its own descriptor pool, so two
versions of one .proto file never clash.

A pipeline lands one message type: `schema_registry.message` (full name), else the first message of the
reader schema; a message whose index names another type is quarantined. Decoding is per message (upb, in C)
with the columns gathered field by field.

Landing types: double/float → Float64/Float32, int32/sint32/sfixed32 → Int32, int64/sint64/sfixed64 →
Int64, uint32/fixed32 → Int64, uint64/fixed64 → Decimal(20, 0) (Delta has no unsigned types), bool, string,
bytes → binary, enum → string (its name), message → struct, repeated → list, map → list<struct<key,
value>>, oneof → one nullable column per member (null unless it is the member set),
google.protobuf.Timestamp → timestamp (UTC, µs), wrapper types (StringValue, Int64Value, ...) → nullable
scalars; proto3 `optional` fields are null when unset, other scalars carry proto3's default. Refused:
recursive messages, proto2 groups.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import importlib
import operator
import random
import subprocess
import sys
import tempfile
from decimal import Decimal
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
from google.protobuf import descriptor_pb2, descriptor_pool, json_format, message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import DecodeError

from ingest_defs.decode import ROW
from ingest_defs.formats.confluent import HEADER, Parsed, Unsupported, conform, zigzag_varint
from ingest_defs.formats.registry import RegisteredSchema, Registry

F = FieldDescriptor
SCALARS: dict[int, pl.DataType] = {
    F.TYPE_DOUBLE: pl.Float64(), F.TYPE_FLOAT: pl.Float32(),
    F.TYPE_INT64: pl.Int64(), F.TYPE_SINT64: pl.Int64(), F.TYPE_SFIXED64: pl.Int64(),
    F.TYPE_INT32: pl.Int32(), F.TYPE_SINT32: pl.Int32(), F.TYPE_SFIXED32: pl.Int32(),
    F.TYPE_UINT32: pl.Int64(), F.TYPE_FIXED32: pl.Int64(),
    F.TYPE_UINT64: pl.Decimal(20, 0), F.TYPE_FIXED64: pl.Decimal(20, 0),
    F.TYPE_BOOL: pl.Boolean(), F.TYPE_STRING: pl.String(), F.TYPE_BYTES: pl.Binary(), F.TYPE_ENUM: pl.String(),
}
TIMESTAMP = "google.protobuf.Timestamp"
WRAPPERS: dict[str, pl.DataType] = {
    "google.protobuf.DoubleValue": pl.Float64(), "google.protobuf.FloatValue": pl.Float32(),
    "google.protobuf.Int64Value": pl.Int64(), "google.protobuf.UInt64Value": pl.Decimal(20, 0),
    "google.protobuf.Int32Value": pl.Int32(), "google.protobuf.UInt32Value": pl.Int64(),
    "google.protobuf.BoolValue": pl.Boolean(), "google.protobuf.StringValue": pl.String(),
    "google.protobuf.BytesValue": pl.Binary(),
}
EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


class ProtoSchema:
    """One schema id: its descriptor pool, its file, and message classes by descriptor."""

    def __init__(self, pool: descriptor_pool.DescriptorPool, file_name: str, message: Descriptor):
        self.pool = pool
        self.file = pool.FindFileByName(file_name)
        self.message = message
        self._classes: dict[str, Any] = {}
        self._by_index: dict[tuple[int, ...], Descriptor | None] = {}

    def by_index(self, indexes: list[int]) -> Descriptor | None:
        key = tuple(indexes)
        if key not in self._by_index:
            self._by_index[key] = self._find(indexes)
        return self._by_index[key]

    def _find(self, indexes: list[int]) -> Descriptor | None:
        types = list(self.file.message_types_by_name.values())
        found = None
        for index in indexes:
            if not 0 <= index < len(types):
                return None
            found = types[index]
            types = list(found.nested_types)
        return found

    def cls(self, descriptor: Descriptor) -> Any:
        if descriptor.full_name not in self._classes:
            self._classes[descriptor.full_name] = message_factory.GetMessageClass(descriptor)
        return self._classes[descriptor.full_name]


class ProtobufCodec:
    schema_type = "PROTOBUF"

    def __init__(self, message: str | None = None):
        self.message = message

    # ------------------------------------------------------------ schemas
    def parse(self, schema: RegisteredSchema, registry: Registry | None) -> Parsed:
        files, main = _file_descriptors(schema, registry)
        pool = descriptor_pool.DescriptorPool()
        for proto in files:
            pool.Add(proto)
        file = pool.FindFileByName(main)
        tops = list(file.message_types_by_name.values())
        if not tops:
            raise Unsupported("", f"{main} defines no message")
        if self.message:
            try:
                message = pool.FindMessageTypeByName(self.message)
            except KeyError:
                raise Unsupported("", f"no message {self.message} in {main} (schema_registry.message); it has "
                                      f"{', '.join(m.full_name for m in tops)}") from None
        else:
            message = tops[0]
        dtypes = {f.name: _dtype(f, f.name, [message.full_name]) for f in message.fields}
        return Parsed(schema.id, dtypes, record_name=message.full_name, native=ProtoSchema(pool, main, message))

    # ------------------------------------------------------------ decoding
    def decode(self, frames: pl.Series, writer: Parsed, reader: Parsed) -> tuple[pl.DataFrame, dict[int, str]]:
        proto: ProtoSchema = writer.native
        want = reader.record_name
        failures: dict[int, str] = {}
        messages, kept = [], []
        cls = None
        for i, frame in enumerate(frames.to_list()):
            indexes, offset = _message_indexes(frame)
            if indexes is None:
                failures[i] = f"corrupt Protobuf body (schema id {writer.schema_id}): the message-index array is truncated"
                continue
            descriptor = proto.by_index(indexes)
            if descriptor is None:
                tops = ", ".join(m.full_name for m in proto.file.message_types_by_name.values())
                failures[i] = (f"Protobuf message index {indexes} does not exist in schema id {writer.schema_id} "
                               f"(its messages: {tops})")
                continue
            if descriptor.full_name != want:
                failures[i] = (f"Protobuf message {descriptor.full_name} (schema id {writer.schema_id}) is not the "
                               f"pipeline's message type {want}")
                continue
            cls = cls or proto.cls(descriptor)
            try:
                messages.append(cls.FromString(frame[offset:]))
            except (DecodeError, RuntimeError, ValueError) as exc:
                failures[i] = f"corrupt Protobuf body (schema id {writer.schema_id}): {str(exc) or type(exc).__name__}"
                continue
            kept.append(i)
        if not messages:
            return pl.DataFrame(schema={**reader.dtypes, ROW: pl.UInt32}), failures
        message = messages[0].DESCRIPTOR  # the writer's version of the pipeline's message type
        dtypes = {f.name: _dtype(f, f.name, [message.full_name]) for f in message.fields}
        # pyarrow builds nested columns from Python values far faster than polars' constructor does
        frame = pl.from_arrow(pa.table({f.name: pa.array(_column(messages, f), type=_arrow_type(dtypes[f.name]))
                                        for f in message.fields}))
        frame = frame.cast(dtypes) if frame.schema != dtypes else frame
        frame = frame.with_columns(pl.Series(ROW, kept, dtype=pl.UInt32))
        return conform(frame, dtypes, reader), failures

    # ------------------------------------------------------------ producing
    def sample(self, parsed: Parsed, rng: random.Random, n: int) -> dict[str, Any]:
        return _sample_message(parsed.native.message, rng, n)

    def encode(self, parsed: Parsed, record: dict[str, Any]) -> bytes:
        """Message-index array (the message's path in its file) + the serialized message."""
        proto: ProtoSchema = parsed.native
        message = json_format.ParseDict(record, proto.cls(proto.message)())
        return message_index_bytes(proto, proto.message) + message.SerializeToString()


def _arrow_type(dtype: pl.DataType) -> pa.DataType:
    return pl.Series([], dtype=dtype).to_arrow().type


# ------------------------------------------------------------ wire details
def _message_indexes(frame: bytes) -> tuple[list[int] | None, int]:
    """(indexes, offset of the message) after the 5-byte header; None when the array is cut short."""
    pos = HEADER
    if len(frame) > pos and frame[pos] == 0:
        return [0], pos + 1
    values = []
    count = None
    while count is None or len(values) < count:
        shift = result = 0
        while True:
            if pos >= len(frame):
                return None, pos
            byte = frame[pos]
            pos += 1
            result |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
            if shift > 63:
                return None, pos
        value = (result >> 1) ^ -(result & 1)
        if count is None:
            count = value
            if count < 0 or count > 64:
                return [count], pos  # no such message index: reported as a missing message
            if count == 0:
                return [0], pos
        else:
            values.append(value)
    return values, pos


def message_index_bytes(proto: ProtoSchema, message: Descriptor) -> bytes:
    path = []
    d: Descriptor | None = message
    while d is not None:
        siblings = list(d.containing_type.nested_types) if d.containing_type else list(proto.file.message_types_by_name.values())
        path.append(siblings.index(d))
        d = d.containing_type
    path.reverse()
    if path == [0]:
        return b"\x00"
    return b"".join(zigzag_varint(v) for v in [len(path), *path])


# ------------------------------------------------------------ schema text → descriptors
def _file_descriptors(schema: RegisteredSchema, registry: Registry | None) -> tuple[list[descriptor_pb2.FileDescriptorProto], str]:
    """All file descriptors the schema needs, dependencies first, and the main file's name."""
    proto = _as_descriptor(schema.text)
    if proto is not None:  # a base64 FileDescriptorProto (registered by a Confluent serializer)
        deps: list[descriptor_pb2.FileDescriptorProto] = []
        refs = {r.name: r for r in schema.references}
        for dep in proto.dependency:
            if dep in refs:
                found = registry.version(refs[dep].subject, refs[dep].version) if registry is not None else None
                if found is None:
                    raise Unsupported("", f"import {dep}: its reference is not in the registry")
                files, _ = _file_descriptors(found, registry)
                deps += files
            else:
                deps.append(_well_known(dep))
        return _unique(deps + [proto]), proto.name
    sources: dict[str, str] = {"schema.proto": schema.text}
    _collect_references(schema, registry, sources)
    return _compile(sources), "schema.proto"


def _as_descriptor(text: str) -> descriptor_pb2.FileDescriptorProto | None:
    stripped = text.strip()
    if not stripped or any(c.isspace() for c in stripped) or "syntax" in stripped[:20]:
        return None
    try:
        raw = base64.b64decode(stripped, validate=True)
        proto = descriptor_pb2.FileDescriptorProto.FromString(raw)
    except (binascii.Error, ValueError, DecodeError):
        return None
    return proto if proto.name else None


def _well_known(name: str) -> descriptor_pb2.FileDescriptorProto:
    if not name.startswith("google/protobuf/"):
        raise Unsupported("", f"import {name} has no reference in the registry")
    module = importlib.import_module("google.protobuf." + name.removeprefix("google/protobuf/").removesuffix(".proto") + "_pb2")
    return descriptor_pb2.FileDescriptorProto.FromString(module.DESCRIPTOR.serialized_pb)


def _collect_references(schema: RegisteredSchema, registry: Registry | None, sources: dict[str, str]) -> None:
    for ref in schema.references:
        if ref.name in sources:
            continue
        found = registry.version(ref.subject, ref.version) if registry is not None else None
        if found is None:
            raise Unsupported("", f"import {ref.name}: {ref.subject} v{ref.version} is not in the registry")
        sources[ref.name] = found.text
        _collect_references(found, registry, sources)


def _compile(sources: dict[str, str]) -> list[descriptor_pb2.FileDescriptorProto]:
    """protoc (grpcio-tools) → descriptors of the files and everything they import."""
    import grpc_tools

    include = Path(grpc_tools.__file__).parent / "_proto"
    with tempfile.TemporaryDirectory(prefix="ingest-proto-") as tmp:
        for name, text in sources.items():
            path = Path(tmp, name)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        out = Path(tmp, "out.pb")
        proc = subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{tmp}", f"-I{include}", "--include_imports",
                               f"--descriptor_set_out={out}", "schema.proto"], capture_output=True, text=True, cwd=tmp)
        if proc.returncode != 0:
            raise ValueError(f"protoc: {proc.stderr.strip()[:300]}")
        return list(descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file)


def _unique(files: list[descriptor_pb2.FileDescriptorProto]) -> list[descriptor_pb2.FileDescriptorProto]:
    seen, out = set(), []
    for f in files:
        if f.name not in seen:
            seen.add(f.name)
            out.append(f)
    return out


# ------------------------------------------------------------ landing types and values
def _is_map(field: FieldDescriptor) -> bool:
    return field.type == F.TYPE_MESSAGE and field.message_type.GetOptions().map_entry


def _dtype(field: FieldDescriptor, path: str, stack: list[str]) -> pl.DataType:
    if _is_map(field):
        key, value = field.message_type.fields_by_name["key"], field.message_type.fields_by_name["value"]
        return pl.List(pl.Struct({"key": _single(key, f"{path}.key", stack), "value": _single(value, f"{path}.value", stack)}))
    inner = _single(field, path, stack)
    return pl.List(inner) if field.is_repeated else inner


def _single(field: FieldDescriptor, path: str, stack: list[str]) -> pl.DataType:
    if field.type == F.TYPE_GROUP:
        raise Unsupported(path, "a proto2 group")
    if field.type != F.TYPE_MESSAGE:
        return SCALARS[field.type]
    name = field.message_type.full_name
    if name == TIMESTAMP:
        return pl.Datetime("us", "UTC")
    if name in WRAPPERS:
        return WRAPPERS[name]
    if name in stack:
        raise Unsupported(path, f"recursive message {name} (a Delta column has a fixed depth)")
    fields = {f.name: _dtype(f, f"{path}.{f.name}", [*stack, name]) for f in field.message_type.fields}
    if not fields:
        raise Unsupported(path, f"message {name} without fields")
    return pl.Struct(fields)


def _converter(field: FieldDescriptor) -> Any:
    """Value of one (non-repeated) field's type → landing value."""
    if field.type == F.TYPE_ENUM:
        values = field.enum_type.values_by_number
        return lambda v: values[v].name if v in values else str(v)
    if field.type in (F.TYPE_UINT64, F.TYPE_FIXED64):
        return Decimal
    if field.type != F.TYPE_MESSAGE:
        return None
    name = field.message_type.full_name
    if name == TIMESTAMP:
        return lambda ts: EPOCH + dt.timedelta(seconds=ts.seconds, microseconds=ts.nanos // 1000)
    if name in WRAPPERS:
        inner = _converter(field.message_type.fields_by_name["value"])
        return (lambda w: inner(w.value)) if inner else (lambda w: w.value)
    return _message_converter(field.message_type)


def _message_converter(descriptor: Descriptor) -> Any:
    getters = [(f.name, _getter(f)) for f in descriptor.fields]
    return lambda m: {name: get(m) for name, get in getters}


def _getter(field: FieldDescriptor) -> Any:
    """message → the landing value of one field."""
    name = field.name
    if _is_map(field):
        key = _converter(field.message_type.fields_by_name["key"])
        value = _converter(field.message_type.fields_by_name["value"])
        k = key or (lambda x: x)
        v = value or (lambda x: x)
        return lambda m: [{"key": k(a), "value": v(b)} for a, b in getattr(m, name).items()]
    conv = _converter(field)
    if field.is_repeated:
        return (lambda m: [conv(x) for x in getattr(m, name)]) if conv else (lambda m: list(getattr(m, name)))
    present = field.type == F.TYPE_MESSAGE or field.containing_oneof is not None or field.has_presence
    if present:
        if conv:
            return lambda m: conv(getattr(m, name)) if m.HasField(name) else None
        return lambda m: getattr(m, name) if m.HasField(name) else None
    return (lambda m: conv(getattr(m, name))) if conv else operator.attrgetter(name)


def _column(messages: list[Any], field: FieldDescriptor) -> list[Any]:
    get = _getter(field)
    if isinstance(get, operator.attrgetter):  # a plain scalar: the fastest form
        return list(map(get, messages))
    return [get(m) for m in messages]


def _sample_message(descriptor: Descriptor, rng: random.Random, n: int, depth: int = 0) -> dict[str, Any]:
    out: dict[str, Any] = {}
    done_oneofs: set[str] = set()
    for f in descriptor.fields:
        if f.containing_oneof is not None:
            if f.containing_oneof.name in done_oneofs:
                continue
            done_oneofs.add(f.containing_oneof.name)
        if _is_map(f):
            value_field = f.message_type.fields_by_name["value"]
            out[f.json_name] = {f"k{i}": _sample_value(value_field, rng, n, depth) for i in range(rng.randint(0, 2))}
        elif f.is_repeated:
            out[f.json_name] = [_sample_value(f, rng, n, depth) for _ in range(rng.randint(0, 3))]
        else:
            out[f.json_name] = _sample_value(f, rng, n, depth)
    return out


def _sample_value(f: FieldDescriptor, rng: random.Random, n: int, depth: int) -> Any:
    if f.type == F.TYPE_MESSAGE:
        name = f.message_type.full_name
        if name == TIMESTAMP:
            return dt.datetime.now(dt.UTC).isoformat().replace("+00:00", "Z")
        if name in WRAPPERS:
            return _sample_value(f.message_type.fields_by_name["value"], rng, n, depth)
        return _sample_message(f.message_type, rng, n, depth + 1)
    if f.type == F.TYPE_ENUM:
        return rng.choice([v.name for v in f.enum_type.values])
    if f.type == F.TYPE_BOOL:
        return rng.random() < 0.5
    if f.type == F.TYPE_STRING:
        return rng.choice(["alpha", "beta", "gamma", "delta"])
    if f.type == F.TYPE_BYTES:
        return base64.b64encode(rng.randbytes(6)).decode()
    if f.type in (F.TYPE_DOUBLE, F.TYPE_FLOAT):
        return round(rng.uniform(-40, 60), 2)
    if f.name == "id" and depth == 0:
        return n
    return rng.randint(0, 1000)

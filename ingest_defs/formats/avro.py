"""`format: avro` — Confluent Avro bodies (schemaless datums of the writer schema).

Fast path: one writer schema's bodies, concatenated into one data block behind an Avro object-container
header that carries the writer schema, are decoded by polars' native Avro reader in one call (~1M rows/s,
outside the GIL) instead of a Python call per message. Concatenated datums have no lengths, so a body with
bytes missing or left over would shift its neighbours without an error; the fast path therefore computes,
column by column, the encoded size of every decoded row (what a canonical encoder writes: zigzag varints,
length-prefixed strings and bytes, one block per array, minimal decimals) and accepts the read only when
each equals its message's body length — i.e. every row was read from exactly its own bytes. Anything else
(a read error, a size that differs, a non-canonical encoder) goes to the isolating path: the span is bisected
with the same reader, and spans of up to SMALL_SPAN messages are decoded one by one with fastavro, where a
bad body becomes a quarantine reason. Schemas polars cannot read (maps, nullable enums, times inside nested
types) always take the per-message path.

Landing types: see TYPE_MAPPING in the README (long → Int64, decimal → Decimal(p, s), timestamp-millis/micros
→ timestamp (UTC, µs), local-timestamp → timestamp_ntz, date, time → Int64 µs after midnight (Delta has no
time type), enum → string, fixed/bytes → binary, record → struct, array → list, map → list<struct<key,
value>>, [null, T] → nullable T). Unions of several non-null types, recursive records and timestamp-nanos
are refused.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import json
import os
import random
import re
import sys
import tempfile
import threading
import uuid
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import fastavro
import polars as pl

from ingest_defs.decode import ROW
from ingest_defs.formats.confluent import HEADER, Parsed, Unsupported, conform, zigzag_varint
from ingest_defs.formats.registry import RegisteredSchema, Registry

SMALL_SPAN = 32
SYNC = b"ingest-sync-mark"  # 16 bytes: the container's sync marker (any fixed value will do)
PRIMITIVES = {"null", "boolean", "int", "long", "float", "double", "bytes", "string"}
PRIMITIVE_DTYPES: dict[str, pl.DataType] = {
    "boolean": pl.Boolean(), "int": pl.Int32(), "long": pl.Int64(), "float": pl.Float32(), "double": pl.Float64(),
    "bytes": pl.Binary(), "string": pl.String(),
}
TS_UTC = pl.Datetime("us", "UTC")
TS_NTZ = pl.Datetime("us")


class AvroSchema:
    """A writer/reader schema: fastavro's parsed form, the container header, and the walk's findings."""

    def __init__(self, parsed: Any, batch_ok: bool):
        self.parsed = parsed
        self.batch_ok = batch_ok
        buf = io.BytesIO()
        fastavro.writer(buf, parsed, [], sync_marker=SYNC)
        self.header = buf.getvalue()


class AvroCodec:
    schema_type = "AVRO"

    # ------------------------------------------------------------ schemas
    def parse(self, schema: RegisteredSchema, registry: Registry | None) -> Parsed:
        named: dict[str, Any] = {}
        for ref in schema.references:
            found = registry.version(ref.subject, ref.version) if registry is not None else None
            if found is None:
                raise Unsupported("", f"reference {ref.name} ({ref.subject} v{ref.version}) is not in the registry")
            fastavro.parse_schema(json.loads(found.text), named_schemas=named)
        try:
            raw = json.loads(schema.text)
        except ValueError:
            raw = schema.text  # a bare primitive name
        parsed = fastavro.parse_schema(raw, named_schemas=dict(named), expand=True)
        walk = _Walk()
        if not isinstance(parsed, dict) or parsed.get("type") != "record":
            raise Unsupported("", f"the top-level schema is {_type_name(parsed)}, not a record (each field becomes a column)")
        walk.stack.append(parsed.get("name", ""))
        dtypes = {f["name"]: walk.dtype(f["type"], f["name"], top=True) for f in parsed["fields"]}
        defaults = {f["name"]: f.get("default") for f in parsed["fields"] if "default" in f}
        return Parsed(schema.id, dtypes, record_name=parsed.get("name"), defaults=defaults,
                      native=AvroSchema(parsed, walk.batch_ok))

    # ------------------------------------------------------------ decoding
    def decode(self, frames: pl.Series, writer: Parsed, reader: Parsed) -> tuple[pl.DataFrame, dict[int, str]]:
        bodies = frames.bin.slice(HEADER)
        failures: dict[int, str] = {}
        avro: AvroSchema = writer.native
        if avro.batch_ok:
            parts = _decode_span(bodies, list(range(len(bodies))), writer, failures, whole=True)
        else:
            parts = [_decode_each(bodies, list(range(len(bodies))), writer, failures)]
        parts = [p for p in parts if p.height]
        frame = pl.concat(parts, how="vertical") if parts else pl.DataFrame(schema={**writer.dtypes, ROW: pl.UInt32})
        if len(parts) > 1:
            frame = frame.sort(ROW)
        return conform(frame, writer.dtypes, reader), failures

    # ------------------------------------------------------------ producing (ingest produce, tests)
    def sample(self, parsed: Parsed, rng: random.Random, n: int) -> dict[str, Any]:
        return {f["name"]: _sample(f["type"], rng, n, f["name"]) for f in parsed.native.parsed["fields"]}

    def encode(self, parsed: Parsed, record: dict[str, Any]) -> bytes:
        buf = io.BytesIO()
        fastavro.schemaless_writer(buf, parsed.native.parsed, record)
        return buf.getvalue()


# ------------------------------------------------------------ the fast path and its isolating fallback
def _decode_span(bodies: pl.Series, idx: list[int], writer: Parsed, failures: dict[int, str],
                 whole: bool = False) -> list[pl.DataFrame]:
    if not idx:
        return []
    if len(idx) <= SMALL_SPAN and not whole:
        return [_decode_each(bodies, idx, writer, failures)]
    span = bodies if whole else bodies.gather(idx)
    frame = _read_block(span, writer)
    if frame is not None:
        rows = pl.int_range(0, len(idx), dtype=pl.UInt32, eager=True) if whole else pl.Series(idx, dtype=pl.UInt32)
        return [frame.with_columns(rows.alias(ROW))]
    if len(idx) <= SMALL_SPAN:
        return [_decode_each(bodies, idx, writer, failures)]
    mid = len(idx) // 2
    return _decode_span(bodies, idx[:mid], writer, failures) + _decode_span(bodies, idx[mid:], writer, failures)


def _read_block(bodies: pl.Series, writer: Parsed) -> pl.DataFrame | None:
    """All bodies in one native read, or None when the read fails or any row was not read from exactly its
    own bytes."""
    avro: AvroSchema = writer.native
    sizes = bodies.bin.size()
    data = _contiguous(bodies)
    container = b"".join((avro.header, zigzag_varint(len(bodies)), zigzag_varint(len(data)), data, SYNC))
    try:
        with _panic_output_kept_off_stderr():
            frame = pl.read_avro(io.BytesIO(container))
    except BaseException as exc:  # noqa: BLE001 - polars raises ComputeError, or a PanicException (BaseException)
        if isinstance(exc, KeyboardInterrupt | SystemExit):
            raise
        return None
    if frame.height != len(bodies):
        return None
    fields = avro.parsed["fields"]
    predicted = pl.sum_horizontal(*[_size(pl.col(f["name"]), f["type"]) for f in fields]) if fields else pl.lit(0)
    try:
        exact = frame.select((predicted == pl.Series(sizes).cast(pl.Int64)).all()).item()
    except pl.exceptions.PolarsError:
        return None
    if not exact:
        return None
    return frame.select([_land(pl.col(f["name"]), f["type"], writer.dtypes[f["name"]]).alias(f["name"]) for f in fields])


_STDERR_LOCK = threading.Lock()


@contextlib.contextmanager
def _panic_output_kept_off_stderr() -> Iterator[None]:
    """polars' Avro reader panics on some corrupt input (a length read from misaligned bytes); the panic
    arrives here as an exception and the bisection isolates the message, but Rust's panic hook has already
    written it — with a backtrace when RUST_BACKTRACE is set — to file descriptor 2. Hold fd 2 in a file
    while reading, then pass on everything but the panic report."""
    with _STDERR_LOCK, tempfile.TemporaryFile() as held:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            text = held.read()
            if text:
                kept = _without_panic_reports(text)
                if kept:
                    os.write(2, kept)


def _without_panic_reports(text: bytes) -> bytes:
    """Drop Rust panic reports (`thread ... panicked at ...:`, the message line, the note or backtrace)."""
    kept, skip_message = [], False
    for line in text.splitlines(keepends=True):
        stripped = line.strip()
        if b"panicked at" in line:
            skip_message = True
            continue
        if skip_message:
            skip_message = False
            continue
        if not stripped or stripped.startswith((b"note: ", b"stack backtrace:", b"at ")) or re.match(rb"^\d+: ", stripped):
            continue
        kept.append(line)
    return b"".join(kept)


def _contiguous(bodies: pl.Series) -> bytes:
    arrow = bodies.to_arrow()
    _validity, offsets, data = arrow.buffers()[:3]
    width = 8 if str(arrow.type) == "large_binary" else 4
    start = int.from_bytes(offsets.to_pybytes()[arrow.offset * width:(arrow.offset + 1) * width], "little", signed=True)
    total = int(bodies.bin.size().sum() or 0)
    return data.to_pybytes()[start:start + total] if data is not None else b""


def _land(expr: pl.Expr, t: Any, dtype: pl.DataType) -> pl.Expr:
    """polars' reading of a top-level field → its landing type (Delta has no time type: µs after midnight)."""
    base = _unwrap_nullable(t)
    if isinstance(base, dict) and base.get("logicalType") in ("time-millis", "time-micros"):
        return expr.cast(pl.Int64) // 1000
    return expr.cast(dtype)


def _decode_each(bodies: pl.Series, idx: list[int], writer: Parsed, failures: dict[int, str]) -> pl.DataFrame:
    """The isolating path: one fastavro call per message; a body must be read to its last byte."""
    avro: AvroSchema = writer.native
    rows, kept = [], []
    for i in idx:
        body = bodies[i]
        buf = io.BytesIO(body)
        try:
            record = fastavro.schemaless_reader(buf, avro.parsed, None)
        except Exception as exc:  # noqa: BLE001 - any decoding error is this message's reason
            failures[i] = f"corrupt Avro body (schema id {writer.schema_id}): {_reason(exc)}"
            continue
        left = len(body) - buf.tell()
        if left:
            failures[i] = (f"corrupt Avro body (schema id {writer.schema_id}): {left} byte(s) left after the record "
                           "(a body of another schema, or bytes appended)")
            continue
        try:
            rows.append({f["name"]: _py(record.get(f["name"]), f["type"]) for f in avro.parsed["fields"]})
        except (TypeError, ValueError, AttributeError) as exc:
            failures[i] = f"corrupt Avro body (schema id {writer.schema_id}): {_reason(exc)}"
            continue
        kept.append(i)
    frame = pl.DataFrame(rows, schema=writer.dtypes) if rows else pl.DataFrame(schema=writer.dtypes)
    return frame.with_columns(pl.Series(ROW, kept, dtype=pl.UInt32))


def _reason(exc: Exception) -> str:
    if isinstance(exc, EOFError | IndexError) or "unpack requires" in str(exc):
        return "truncated (the body ends inside a field)"
    return f"{type(exc).__name__}: {str(exc)[:200] or 'cannot decode'}"


def _py(value: Any, t: Any) -> Any:
    """fastavro's value → the landing value (times as µs, maps as key/value lists, uuids as text)."""
    if value is None:
        return None
    if isinstance(t, list):
        return _py(value, _unwrap_nullable(t))
    if isinstance(t, str):
        return value
    kind, logical = t.get("type"), t.get("logicalType")
    if logical in ("time-millis", "time-micros"):
        if isinstance(value, dt.time):
            return ((value.hour * 60 + value.minute) * 60 + value.second) * 1_000_000 + value.microsecond
        return value * (1000 if logical == "time-millis" else 1)
    if isinstance(value, uuid.UUID):
        return str(value)
    if kind == "record":
        return {f["name"]: _py(value.get(f["name"]), f["type"]) for f in t["fields"]}
    if kind == "array":
        return [_py(v, t["items"]) for v in value]
    if kind == "map":
        return [{"key": k, "value": _py(v, t["values"])} for k, v in value.items()]
    return value


# ------------------------------------------------------------ encoded sizes (the fast path's check)
def _varint_size(value: pl.Expr) -> pl.Expr:
    """Bytes of the zigzag varint of an integer expression: 7 bits a byte, at least one."""
    v = value.cast(pl.Int64)
    zz = pl.when(v >= 0).then(v.cast(pl.UInt64) * 2).otherwise((-(v + 1)).cast(pl.UInt64) * 2 + 1)
    bits = 64 - zz.bitwise_leading_zeros().cast(pl.Int64)
    return pl.max_horizontal((bits + 6) // 7, pl.lit(1, dtype=pl.Int64))


def _twos_complement_size(unscaled: pl.Expr) -> pl.Expr:
    """Bytes of the minimal big-endian two's complement of an integer (how decimals are written)."""
    magnitude = pl.when(unscaled >= 0).then(unscaled).otherwise(unscaled.not_())
    bits = 128 - magnitude.bitwise_leading_zeros().cast(pl.Int64)
    return bits // 8 + 1


def _size(expr: pl.Expr, t: Any) -> pl.Expr:
    if isinstance(t, list):
        (null_at,) = [i for i, branch in enumerate(t) if branch == "null"] or [None]
        others = [(i, branch) for i, branch in enumerate(t) if branch != "null"]
        (at, branch), = others
        value = pl.lit(_varint_len(at), dtype=pl.Int64) + _size(expr, branch)
        if null_at is None:
            return value
        return pl.when(expr.is_null()).then(pl.lit(_varint_len(null_at), dtype=pl.Int64)).otherwise(value)
    kind = t if isinstance(t, str) else t["type"]
    logical = None if isinstance(t, str) else t.get("logicalType")
    if kind == "null":
        return pl.lit(0, dtype=pl.Int64)
    if kind == "boolean":
        return pl.lit(1, dtype=pl.Int64)
    if kind == "float":
        return pl.lit(4, dtype=pl.Int64)
    if kind == "double":
        return pl.lit(8, dtype=pl.Int64)
    if kind in ("int", "long"):
        return _varint_size(_raw_integer(expr, logical))
    if kind == "fixed":
        return pl.lit(t["size"], dtype=pl.Int64)
    if kind == "string":
        n = expr.str.len_bytes().cast(pl.Int64)
        return _varint_size(n) + n
    if kind == "bytes":
        if logical == "decimal":
            n = _twos_complement_size(expr.cast(pl.Decimal(38, t.get("scale", 0))).to_physical())
        else:
            n = expr.bin.size().cast(pl.Int64)
        return _varint_size(n) + n
    if kind == "enum":
        index = expr.cast(pl.String).replace_strict({s: i for i, s in enumerate(t["symbols"])}, return_dtype=pl.Int64)
        return _varint_size(index)
    if kind == "record":
        fields = [_size(expr.struct.field(f["name"]), f["type"]) for f in t["fields"]]
        return pl.sum_horizontal(*fields) if fields else pl.lit(0, dtype=pl.Int64)
    if kind == "array":
        count = expr.list.len().cast(pl.Int64)
        items = expr.list.eval(_size(pl.element(), t["items"])).list.sum().cast(pl.Int64)
        return pl.when(count > 0).then(_varint_size(count)).otherwise(0) + items + 1
    raise ValueError(f"no size for {kind}")  # maps never take the fast path


def _raw_integer(expr: pl.Expr, logical: str | None) -> pl.Expr:
    if logical == "date":
        return expr.cast(pl.Int32)
    if logical == "time-millis":
        return expr.cast(pl.Int64) // 1_000_000
    if logical == "time-micros":
        return expr.cast(pl.Int64) // 1000
    if logical in ("timestamp-millis", "local-timestamp-millis"):
        return expr.dt.epoch("ms")
    if logical in ("timestamp-micros", "local-timestamp-micros"):
        return expr.dt.epoch("us")
    return expr


def _varint_len(n: int) -> int:
    return len(zigzag_varint(n))


# ------------------------------------------------------------ landing types
def _unwrap_nullable(t: Any) -> Any:
    if isinstance(t, list):
        others = [b for b in t if b != "null"]
        return others[0] if len(others) == 1 else t
    return t


def _type_name(t: Any) -> str:
    if isinstance(t, list):
        return "a union of " + " and ".join(_type_name(b) for b in t)
    if isinstance(t, dict):
        name = t.get("logicalType") or t.get("type")
        return f"{name} '{t['name']}'" if "name" in t else str(name)
    return str(t)


class _Walk:
    """Avro type → polars landing dtype; notes what polars' reader cannot do (then: per-message decoding)."""

    def __init__(self) -> None:
        self.batch_ok = True
        self.stack: list[str] = []

    def dtype(self, t: Any, path: str, top: bool = False, nested: bool = False) -> pl.DataType:
        if isinstance(t, list):
            others = [b for b in t if b != "null"]
            if len(others) != 1:
                raise Unsupported(path, f"{_type_name(t)} (only [\"null\", T] unions map to one nullable column)")
            inner = others[0]
            if isinstance(inner, dict) and inner.get("type") == "enum":
                self.batch_ok = False  # polars panics on a nullable enum
            return self.dtype(inner, path, top, nested)
        if isinstance(t, str):
            if t == "null":
                raise Unsupported(path, "type null alone (a column that is always null)")
            if t in PRIMITIVE_DTYPES:
                return PRIMITIVE_DTYPES[t]
            if t in self.stack:
                raise Unsupported(path, f"recursive type '{t}' (a Delta column has a fixed depth)")
            raise Unsupported(path, f"unknown named type '{t}'")
        kind, logical = t.get("type"), t.get("logicalType")
        if logical == "decimal" and kind in ("bytes", "fixed"):
            precision, scale = int(t.get("precision", 0)), int(t.get("scale", 0))
            if not 0 < precision <= 38:
                raise Unsupported(path, f"decimal precision {precision} (Delta decimals have 1 to 38 digits)")
            return pl.Decimal(precision, scale)
        if logical in ("timestamp-millis", "timestamp-micros") and kind == "long":
            return TS_UTC
        if logical in ("local-timestamp-millis", "local-timestamp-micros") and kind == "long":
            return TS_NTZ
        if logical in ("timestamp-nanos", "local-timestamp-nanos"):
            raise Unsupported(path, f"{logical} (Delta timestamps are microseconds)")
        if logical == "date" and kind == "int":
            return pl.Date()
        if logical in ("time-millis", "time-micros"):
            if nested or not top:
                self.batch_ok = False  # polars' Time inside a struct/list: converted per message
            return pl.Int64()
        if kind in PRIMITIVE_DTYPES:
            return PRIMITIVE_DTYPES[kind]  # string/uuid, bytes, and unknown logical types over a primitive
        if kind == "enum":
            return pl.String()
        if kind == "fixed":
            return pl.Binary()
        if kind == "array":
            return pl.List(self.dtype(t["items"], f"{path}[]", nested=True))
        if kind == "map":
            self.batch_ok = False  # polars' Avro reader has no maps
            return pl.List(pl.Struct({"key": pl.String(), "value": self.dtype(t["values"], f"{path}{{}}", nested=True)}))
        if kind == "record":
            name = t.get("name", "")
            if name in self.stack:
                raise Unsupported(path, f"recursive record '{name}' (a Delta column has a fixed depth)")
            self.stack.append(name)
            try:
                fields = {f["name"]: self.dtype(f["type"], f"{path}.{f['name']}", nested=True) for f in t["fields"]}
            finally:
                self.stack.pop()
            if not fields:
                raise Unsupported(path, f"record '{name}' without fields")
            return pl.Struct(fields)
        raise Unsupported(path, f"type {kind}")


# ------------------------------------------------------------ samples for `ingest produce`
def _sample(t: Any, rng: random.Random, n: int, name: str) -> Any:
    if isinstance(t, list):
        others = [b for b in t if b != "null"]
        if "null" in t and rng.random() < 0.2:
            return None
        return _sample(others[0], rng, n, name)
    kind = t if isinstance(t, str) else t["type"]
    logical = None if isinstance(t, str) else t.get("logicalType")
    now = dt.datetime.now(dt.UTC)
    if logical == "decimal":
        scale = int(t.get("scale", 0))
        digits = min(int(t.get("precision", 9)) - scale, 6)
        return Decimal(rng.randint(0, 10 ** (digits + scale) - 1)).scaleb(-scale)
    if logical in ("timestamp-millis", "timestamp-micros"):
        return now.replace(microsecond=now.microsecond // 1000 * 1000) if logical.endswith("millis") else now
    if logical in ("local-timestamp-millis", "local-timestamp-micros"):
        return now.replace(tzinfo=None, microsecond=now.microsecond // 1000 * 1000)
    if logical == "date":
        return now.date()
    if logical in ("time-millis", "time-micros"):
        return dt.time(rng.randint(0, 23), rng.randint(0, 59), rng.randint(0, 59))
    if logical == "uuid":
        return str(uuid.UUID(int=rng.getrandbits(128)))
    if kind == "boolean":
        return rng.random() < 0.5
    if kind in ("int", "long"):
        return n if name == "id" else rng.randint(0, 1000)  # unique ids make produced and landed comparable
    if kind in ("float", "double"):
        return round(rng.uniform(-40, 60), 2)
    if kind == "string":
        return rng.choice(["alpha", "beta", "gamma", "delta"])
    if kind == "bytes":
        return rng.randbytes(8)
    if kind == "fixed":
        return rng.randbytes(t["size"])
    if kind == "enum":
        return rng.choice(t["symbols"])
    if kind == "array":
        return [_sample(t["items"], rng, n, name) for _ in range(rng.randint(0, 3))]
    if kind == "map":
        return {f"k{i}": _sample(t["values"], rng, n, name) for i in range(rng.randint(0, 3))}
    if kind == "record":
        return {f["name"]: _sample(f["type"], rng, n, f["name"]) for f in t["fields"]}
    return None

"""Payload bytes → a Polars frame with the standard columns; messages that cannot be decoded become
quarantine rows with the reason. One bad message never fails or silently changes the rest of its batch.

Fast path: join payloads with newlines and `pl.read_ndjson(schema=...)` (~3M rows/s). It fails the whole
call on one bad value, so on any error a per-message screen (UTF-8, JSON, object, field types) takes out
the usual bad messages, the rest are decoded by the same reader, and whatever it still rejects is isolated
by bisection: good messages always get exactly the fast path's semantics.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import polars as pl

from ingest_defs.sources.base import RawBatch

ROW = "__row"  # position of the message in its RawBatch; dropped before writing
HEADER_DTYPE = pl.List(pl.Struct({"key": pl.String, "value": pl.Binary}))
TS_DTYPE = pl.Datetime("us", "UTC")
SMALL_SPAN = 32  # below this, decode message by message instead of bisecting further

STANDARD_SCHEMA: dict[str, pl.DataType] = {
    "_source": pl.String(),
    "_stream": pl.String(),
    "_partition": pl.Int32(),
    "_offset": pl.Int64(),
    "_key": pl.Binary(),
    "_headers": HEADER_DTYPE,
    "_timestamp": TS_DTYPE,
    "_batch_id": pl.String(),
    "_ingested_at": TS_DTYPE,
}
QUARANTINE_SCHEMA: dict[str, pl.DataType] = {**STANDARD_SCHEMA, "_error": pl.String(), "_raw": pl.Binary()}


@dataclass
class Decoded:
    rows: pl.DataFrame  # payload columns + standard columns + ROW, one row per decoded message
    failures: dict[int, str]  # batch position → reason, for messages that could not be decoded


def decode_payloads(payloads: list[bytes], schema: dict[str, pl.DataType], strict: bool = False) -> Decoded:
    """Decode JSON object payloads into the payload schema's columns (plus ROW)."""
    failures: dict[int, str] = {}
    n = len(payloads)
    joined = b"\n".join(payloads)
    if n and all(payloads) and joined.count(b"\n") == n - 1:
        # Common case: no empty message, no raw newline inside one. One read, no Python loop.
        try:
            frame = pl.read_ndjson(io.BytesIO(joined), schema=schema)
            if frame.height == n:
                rows = frame.with_columns(pl.int_range(0, n, dtype=pl.UInt32).alias(ROW))
                if strict:
                    rows = _reject_extra_fields(payloads, rows, schema, failures)
                return Decoded(rows=rows, failures=failures)
        except pl.exceptions.PolarsError:
            pass
    del joined
    # Slow path: a cheap per-message screen (UTF-8, JSON, object, field types) isolates the usual bad
    # messages; the survivors are decoded by the same reader as the fast path, and anything the screen
    # let through that the reader still rejects is isolated by bisection.
    candidates: list[int] = []
    payloads = list(payloads)
    for i, payload in enumerate(payloads):
        if not payload:
            failures[i] = "empty value"
            continue
        reason = _screen(payload, schema)
        if reason is not None:
            failures[i] = reason
            continue
        if b"\n" in payload:  # a raw newline would split the message in NDJSON: re-encode on one line
            payloads[i] = _compact(payload)
        candidates.append(i)
    frames = _decode_span(payloads, candidates, schema, failures)
    rows = pl.concat(frames, how="vertical") if frames else _empty_rows(schema)
    if strict and rows.height:
        rows = _reject_extra_fields(payloads, rows, schema, failures)
    return Decoded(rows=rows.sort(ROW) if len(frames) > 1 else rows, failures=failures)


def _read(payloads: list[bytes], idx: list[int], schema: dict[str, pl.DataType]) -> pl.DataFrame:
    buf = io.BytesIO(b"\n".join(payloads[i] for i in idx))
    frame = pl.read_ndjson(buf, schema=schema)
    if frame.height != len(idx):  # e.g. a whitespace-only message is skipped by the reader
        raise pl.exceptions.ComputeError(f"decoded {frame.height} rows from {len(idx)} messages")
    return frame.with_columns(pl.Series(ROW, idx, dtype=pl.UInt32))


def _decode_span(payloads: list[bytes], idx: list[int], schema: dict[str, pl.DataType],
                 failures: dict[int, str]) -> list[pl.DataFrame]:
    if not idx:
        return []
    try:
        return [_read(payloads, idx, schema)]
    except (pl.exceptions.ComputeError, pl.exceptions.PolarsError):
        pass
    if len(idx) == 1:
        failures[idx[0]] = _explain(payloads[idx[0]], schema)
        return []
    if len(idx) <= SMALL_SPAN:
        out = []
        for i in idx:
            out.extend(_decode_span(payloads, [i], schema, failures))
        return out
    mid = len(idx) // 2
    return _decode_span(payloads, idx[:mid], schema, failures) + _decode_span(payloads, idx[mid:], schema, failures)


def _empty_rows(schema: dict[str, pl.DataType]) -> pl.DataFrame:
    return pl.DataFrame(schema={**schema, ROW: pl.UInt32})


def _compact(payload: bytes) -> bytes:
    return json.dumps(json.loads(payload), separators=(",", ":"), ensure_ascii=False).encode()


def _reject_extra_fields(payloads: list[bytes], rows: pl.DataFrame, schema: dict[str, pl.DataType],
                         failures: dict[int, str]) -> pl.DataFrame:
    """strict: true — a message with fields outside the schema goes to quarantine."""
    bad: dict[int, str] = {}
    for i in rows.get_column(ROW).to_list():
        obj = json.loads(payloads[i])
        extra = sorted(set(obj) - set(schema))
        if extra:
            bad[i] = f"unexpected fields: {', '.join(extra)} (schema.strict is true)"
    if not bad:
        return rows
    failures.update(bad)
    return rows.filter(~pl.col(ROW).is_in(list(bad)))


# ------------------------------------------------------------ explaining a failure (one message)
_JSON_TYPES = {dict: "object", list: "array", str: "string", bool: "boolean", int: "integer", float: "number"}


def _screen(payload: bytes, schema: dict[str, pl.DataType]) -> str | None:
    """Why this payload cannot decode into the schema, or None if it looks decodable."""
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        return f"not UTF-8: {exc.reason} at byte {exc.start}"
    if not text.strip():
        return "empty value"
    try:
        obj = json.loads(text)
    except ValueError as exc:
        return f"invalid JSON: {exc}"
    if not isinstance(obj, dict):
        return f"not an object: the payload is a JSON {_JSON_TYPES.get(type(obj), 'null')}"
    for name, dtype in schema.items():
        value = obj.get(name)
        if value is not None and not _fits(value, dtype):
            return f"wrong type: field '{name}' is {_JSON_TYPES.get(type(value), 'null')} {_short(value)}, schema says {dtype}"
    return None


def _explain(payload: bytes, schema: dict[str, pl.DataType]) -> str:
    reason = _screen(payload, schema)
    if reason is not None:
        return reason
    try:
        pl.read_ndjson(io.BytesIO(payload), schema=schema)
    except pl.exceptions.PolarsError as exc:
        return f"cannot decode: {str(exc).splitlines()[0]}"
    return "cannot decode"


def _fits(value: Any, dtype: pl.DataType) -> bool:
    if dtype.is_integer():
        return isinstance(value, int) and not isinstance(value, bool) and _int_in_range(value, dtype)
    if dtype.is_float():
        return isinstance(value, int | float) and not isinstance(value, bool)
    if dtype == pl.Boolean:
        return isinstance(value, bool)
    if dtype in (pl.Date, pl.Datetime) or isinstance(dtype, pl.Datetime):
        return isinstance(value, str)
    return True


def _int_in_range(value: int, dtype: pl.DataType) -> bool:
    bits = {pl.Int8: 8, pl.Int16: 16, pl.Int32: 32, pl.Int64: 64, pl.UInt8: 8, pl.UInt16: 16,
            pl.UInt32: 32, pl.UInt64: 64}
    for cls, n in bits.items():
        if dtype == cls:
            if dtype.is_unsigned_integer():
                return 0 <= value < 2**n
            return -(2 ** (n - 1)) <= value < 2 ** (n - 1)
    return True


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


# ------------------------------------------------------------ standard columns
def standard_columns(raw: RawBatch, source: str, batch_id: str, ingested_at: datetime) -> pl.DataFrame:
    """One row per message in `raw`: the standard columns, plus source extras, plus ROW."""
    n = len(raw)
    columns: dict[str, pl.Series] = {
        "_source": pl.Series("_source", [source], dtype=pl.String).new_from_index(0, n) if n else pl.Series("_source", [], dtype=pl.String),
        "_stream": _repeat_or_series("_stream", raw.streams, n, pl.String),
        "_partition": _repeat_or_series("_partition", raw.partitions, n, pl.Int32),
        "_offset": pl.Series("_offset", raw.offsets, dtype=pl.Int64),
        "_key": pl.Series("_key", raw.keys if raw.keys is not None else [None] * n, dtype=pl.Binary),
        "_headers": _headers_series(raw.headers, n),
        "_timestamp": _timestamps(raw.timestamps_ms, n),
        "_batch_id": pl.Series("_batch_id", [batch_id], dtype=pl.String).new_from_index(0, n) if n else pl.Series("_batch_id", [], dtype=pl.String),
        "_ingested_at": pl.Series("_ingested_at", [ingested_at], dtype=TS_DTYPE).new_from_index(0, n) if n else pl.Series("_ingested_at", [], dtype=TS_DTYPE),
    }
    frame = pl.DataFrame(columns)
    extras = {name: pl.Series(name, values) for name, values in raw.extra_columns.items()}
    if extras:
        frame = frame.with_columns(**extras)
    return frame.with_columns(pl.int_range(0, n, dtype=pl.UInt32).alias(ROW))


def _repeat_or_series(name: str, value: Any, n: int, dtype: pl.DataType) -> pl.Series:
    if isinstance(value, list):
        return pl.Series(name, value, dtype=dtype)
    return pl.Series(name, [value], dtype=dtype).new_from_index(0, n) if n else pl.Series(name, [], dtype=dtype)


def _headers_series(headers: list[Any] | None, n: int) -> pl.Series:
    if headers is None or not any(headers):
        return pl.Series("_headers", [None] * n, dtype=HEADER_DTYPE)
    values = [[{"key": k, "value": v} for k, v in h] if h else None for h in headers]
    return pl.Series("_headers", values, dtype=HEADER_DTYPE)


def _timestamps(timestamps_ms: list[int | None] | None, n: int) -> pl.Series:
    if timestamps_ms is None:
        return pl.Series("_timestamp", [None] * n, dtype=TS_DTYPE)
    ms = pl.Series("_timestamp", timestamps_ms, dtype=pl.Int64)
    ms = pl.select(pl.when(ms >= 0).then(ms).alias("_timestamp")).to_series()  # Kafka: -1 = no timestamp
    return ms.cast(pl.Datetime("ms")).dt.replace_time_zone("UTC").cast(TS_DTYPE)

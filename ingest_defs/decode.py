"""Payload bytes → a Polars frame with the standard columns; messages that cannot be decoded become
quarantine rows with the reason. No message, whatever its content, fails or silently changes its batch.

Fast path: join payloads with newlines and `pl.read_ndjson(schema=...)` (~3M rows/s). Polars' reader
(simd-json) refuses most bad input itself, but reads a few things differently from a careful reader: a
lone `\\ud800` escape becomes U+0000, a duplicate key takes its *first* value where JSON readers
generally take the last, and an out-of-range float32 becomes infinity. So a clean batch also gets a few
byte scans (no per-message Python work) that name the messages needing a careful look; only those are
parsed again in Python.

Isolating path (on any error of the fast path): every message goes through `inspect`, a careful
per-message check that never raises (UTF-8, BOM, nesting depth, JSON syntax, NaN/Infinity, number ranges,
lone surrogates, duplicate keys, object, field types), the survivors are read by the same reader as the
fast path, and whatever it still rejects is isolated by bisection. Good messages always get exactly the
fast path's values, and a message's outcome never depends on its neighbours.
"""

from __future__ import annotations

import ctypes
import functools
import io
import itertools
import json
import math
import re
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import polars as pl
from polars.exceptions import PanicException

from ingest_defs.sources.base import RawBatch, all_nonempty, joined_payloads

ROW = "__row"  # position of the message in its RawBatch; dropped before writing
HEADER_DTYPE = pl.List(pl.Struct({"key": pl.String, "value": pl.Binary}))
TS_DTYPE = pl.Datetime("us", "UTC")
SMALL_SPAN = 32  # below this, decode message by message instead of bisecting further
MAX_DEPTH = 1024  # polars' JSON reader refuses deeper documents (the top-level object is level 1)
INT_MIN, INT_MAX = -(2**127), 2**128 - 1  # integer literals polars' JSON reader accepts at all
# The latest broker time kept: 9999-12-31T23:59:59.999Z. Delta holds later ones, but Python's datetime
# (the ledger, the CLI, dbt's adapters) stops at year 9999.
MAX_TIMESTAMP_MS = 253_402_300_799_999

# Everything a reader may raise on one message's content: a pyo3 PanicException is not an Exception.
CONTENT_ERRORS: tuple[type[BaseException], ...] = (Exception, PanicException)

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


def decode_payloads(payloads: Sequence[bytes], schema: dict[str, pl.DataType], strict: bool = False) -> Decoded:
    """Decode JSON object payloads into the payload schema's columns (plus ROW)."""
    failures: dict[int, str] = {}
    rows = _fast_path(payloads, schema, failures)
    if rows is None:
        failures.clear()
        rows = _isolating_path(payloads, schema, failures)
    if strict and rows.height:
        rows = _reject_extra_fields(payloads, rows, schema, failures)
    return Decoded(rows=rows, failures=failures)


def _fast_path(payloads: list[bytes], schema: dict[str, pl.DataType],
               failures: dict[int, str]) -> pl.DataFrame | None:
    """One read of the whole batch, or None when the batch needs the isolating path."""
    n = len(payloads)
    if not n or not all_nonempty(payloads):
        return None
    joined = joined_payloads(payloads)
    if joined.count(b"\n") != n - 1:  # a raw newline inside a message would split it
        return None
    try:
        frame = pl.read_ndjson(io.BytesIO(joined), schema=_read_schema(schema))
    except CONTENT_ERRORS:
        return None
    if frame.height != n:  # e.g. a whitespace-only message is skipped by the reader
        return None
    try:
        rows = frame.with_columns(pl.int_range(0, n, dtype=pl.UInt32).alias(ROW))
        for i in _suspects(joined, payloads, rows, schema):
            reason = inspect(payloads[i], schema)
            if reason is not None:
                failures[i] = reason
        return _narrow(rows, schema, failures)
    except CONTENT_ERRORS:  # whatever breaks here on odd content, the isolating path looks at each message
        return None


def _isolating_path(payloads: list[bytes], schema: dict[str, pl.DataType],
                    failures: dict[int, str]) -> pl.DataFrame:
    """Per-message screen, then the fast path's reader on the survivors, bisecting what it still rejects."""
    candidates: list[int] = []
    lines = list(payloads)
    for i, payload in enumerate(payloads):
        reason = inspect(payload, schema)
        if reason is not None:
            failures[i] = reason
            continue
        if b"\n" in payload:
            # Valid JSON (inspect said so) has raw newlines only between tokens: a space is the same JSON.
            lines[i] = payload.replace(b"\n", b" ")
        candidates.append(i)
    frames = _decode_span(lines, candidates, schema, failures)
    rows = pl.concat(frames, how="vertical") if frames else _empty_rows(schema)
    rows = _narrow(rows, schema, failures)
    return rows.sort(ROW) if len(frames) > 1 else rows


def _read_schema(schema: dict[str, pl.DataType]) -> dict[str, pl.DataType]:
    """The schema the reader gets: narrow numbers read as 64-bit and range-checked after (`_narrow`).
    Read directly, an int8 field holding 300 panics inside polars and a float32 one holding 1e300
    becomes infinity."""
    return {name: _wide(dtype) for name, dtype in schema.items()}


def _wide(dtype: pl.DataType) -> pl.DataType:
    if dtype.is_integer() and dtype not in (pl.Int64, pl.UInt64):
        return pl.Int64()
    if dtype == pl.Float32:
        return pl.Float64()
    return dtype


def _narrow(rows: pl.DataFrame, schema: dict[str, pl.DataType], failures: dict[int, str]) -> pl.DataFrame:
    """Range-check the fields read wider than their type, cast them, and drop rows that failed."""
    narrow = [name for name, dtype in schema.items() if _wide(dtype) != dtype]
    for name in narrow:
        dtype, column = schema[name], rows.get_column(name)
        if dtype == pl.Float32:
            out = column.is_finite() & column.cast(pl.Float32).is_infinite()
        else:
            low, high = _int_bounds(dtype)
            out = column.is_not_null() & ~column.is_between(low, high)
        bad = rows.filter(out)
        for i, value in zip(bad.get_column(ROW).to_list(), bad.get_column(name).to_list(), strict=True):
            failures.setdefault(i, _out_of_range(name, value, dtype))
    if failures:
        rows = rows.filter(~pl.col(ROW).is_in(list(failures)))
    if narrow:
        rows = rows.with_columns(pl.col(name).cast(schema[name]) for name in narrow)
    return rows


def _int_bounds(dtype: pl.DataType) -> tuple[int, int]:
    bits = {pl.Int8: 8, pl.Int16: 16, pl.Int32: 32, pl.Int64: 64, pl.UInt8: 8, pl.UInt16: 16,
            pl.UInt32: 32, pl.UInt64: 64}
    for cls, n in bits.items():
        if dtype == cls:
            return (0, 2**n - 1) if dtype.is_unsigned_integer() else (-(2 ** (n - 1)), 2 ** (n - 1) - 1)
    return INT_MIN, INT_MAX


def _out_of_range(name: str, value: Any, dtype: pl.DataType | str) -> str:
    return f"number out of range for {str(dtype).lower()}: field '{name}' is {_short(value)}"


def _read(lines: list[bytes], idx: list[int], schema: dict[str, pl.DataType]) -> pl.DataFrame:
    frame = pl.read_ndjson(io.BytesIO(b"\n".join(lines[i] for i in idx)), schema=_read_schema(schema))
    if frame.height != len(idx):  # e.g. a whitespace-only message is skipped by the reader
        raise pl.exceptions.ComputeError(f"decoded {frame.height} rows from {len(idx)} messages")
    return frame.with_columns(pl.Series(ROW, idx, dtype=pl.UInt32))


def _decode_span(lines: list[bytes], idx: list[int], schema: dict[str, pl.DataType],
                 failures: dict[int, str]) -> list[pl.DataFrame]:
    if not idx:
        return []
    try:
        return [_read(lines, idx, schema)]
    except CONTENT_ERRORS:
        pass
    if len(idx) == 1:
        failures[idx[0]] = _explain(lines[idx[0]], schema)
        return []
    if len(idx) <= SMALL_SPAN:
        out = []
        for i in idx:
            out.extend(_decode_span(lines, [i], schema, failures))
        return out
    mid = len(idx) // 2
    return _decode_span(lines, idx[:mid], schema, failures) + _decode_span(lines, idx[mid:], schema, failures)


def _empty_rows(schema: dict[str, pl.DataType]) -> pl.DataFrame:
    return pl.DataFrame(schema={**_read_schema(schema), ROW: pl.UInt32})


def _reject_extra_fields(payloads: list[bytes], rows: pl.DataFrame, schema: dict[str, pl.DataType],
                         failures: dict[int, str]) -> pl.DataFrame:
    """strict: true — a message with fields outside the schema goes to quarantine."""
    bad: dict[int, str] = {}
    for i in rows.get_column(ROW).to_list():
        try:
            keys = set(_parse(payloads[i].decode("utf-8"), watch_keys=False)[0])
        except CONTENT_ERRORS as exc:  # the reader took it, so this should not happen; never fail the batch
            bad[i] = f"cannot check fields: {_describe_exception(exc)}"
            continue
        extra = sorted(keys - set(schema))
        if extra:
            bad[i] = f"unexpected fields: {', '.join(extra)} (schema.strict is true)"
    if not bad:
        return rows
    failures.update(bad)
    return rows.filter(~pl.col(ROW).is_in(list(bad)))


# ------------------------------------------------------------ finding messages the fast path may misread
def _suspects(joined: bytes, payloads: list[bytes], rows: pl.DataFrame,
              schema: dict[str, pl.DataType]) -> list[int]:
    """Positions of messages the fast path may have read differently from `inspect`: a duplicate schema
    key, a lone surrogate escape, a key spelled with escapes. Never misses one. On a clean batch it costs a
    memchr and a colon count when the messages hold just the schema's fields, else one substring count per
    schema field; no per-message Python work either way."""
    tokens, escapes = _key_tokens(tuple(schema))
    if tokens is None:
        return list(range(len(payloads)))  # field names with quotes or backslashes: check every message
    per_row: list[pl.Series] = []
    lines: pl.Series | None = None

    def line_series() -> pl.Series:
        nonlocal lines
        if lines is None:
            lines = pl.Series(payloads, dtype=pl.Binary).cast(pl.String)  # the reader checked UTF-8
        return lines

    if b"\\" in joined and escapes.search(joined):
        per_row.append(line_series().str.contains(escapes.pattern.decode()))
    elif _one_key_per_value(joined, rows, schema):
        return []
    for name, token in zip(schema, tokens, strict=True):
        # Every non-null value needs its key once: more occurrences than that may hide a duplicate key
        # (or are explicit nulls, or the name inside a string): then find the messages holding it twice.
        if joined.count(token) > rows.height - rows.get_column(name).null_count():
            per_row.append(line_series().str.count_matches(token.decode(), literal=True) > 1)
    if not per_row:
        return []
    return pl.select(pl.any_horizontal(per_row)).to_series().arg_true().to_list()


def _one_key_per_value(joined: bytes, rows: pl.DataFrame, schema: dict[str, pl.DataType]) -> bool:
    """True when the batch provably holds no duplicate key, in one single-byte count: every key has exactly
    one structural colon, so if the colons are exactly one per non-null value plus those inside the string
    values, there is no other key at all (no duplicate, extra or nested one). Needs no escapes (a `\\u003a`
    would hide a colon: the caller checks) and no date or datetime fields (their text is not kept)."""
    if any(dtype in (pl.Date, pl.Datetime) or isinstance(dtype, pl.Datetime) for dtype in schema.values()):
        return False
    values = sum(rows.height - rows.get_column(name).null_count() for name in schema)
    in_strings = sum(int(rows.get_column(name).str.count_matches(":", literal=True).sum() or 0)
                     for name, dtype in schema.items() if dtype == pl.String)
    return joined.count(b":") == values + in_strings


@functools.lru_cache(maxsize=64)
def _key_tokens(names: tuple[str, ...]) -> tuple[list[bytes] | None, re.Pattern[bytes]]:
    """Each field name as it appears literally in JSON, and the escapes that could spell it (or a lone
    surrogate) otherwise: \\ud800-\\udfff and escaped ASCII always, any \\u escape for non-ASCII names,
    an escaped slash for names with a slash."""
    alternatives = [rb"\\u(?:[dD][89a-fA-F]|00[0-7])"]
    if any(not name.isascii() for name in names):
        alternatives.append(rb"\\u")
    if any("/" in name for name in names):
        alternatives.append(rb"\\/")
    pattern = re.compile(b"|".join(alternatives))
    if any('"' in name or "\\" in name or not name.isprintable() for name in names):
        return None, pattern
    return [f'"{name}"'.encode() for name in names], pattern


# ------------------------------------------------------------ inspecting one message (never raises)
class _Reject(Exception):  # noqa: N818 - raised from the JSON parser hooks with the reason for the person
    """A reason this message cannot be decoded; raised from inside the JSON parser's hooks."""


_JSON_TYPES = {dict: "object", list: "array", str: "string", bool: "boolean", int: "integer", float: "number"}
_JSON_WS = b" \t\r\n"


def inspect(payload: bytes, schema: dict[str, pl.DataType]) -> str | None:
    """Why this payload cannot decode into the schema, or None if it can. Never raises: whatever goes
    wrong while looking at one message becomes that message's reason."""
    try:
        return _inspect(payload, _fields(tuple(schema.items())))
    except CONTENT_ERRORS as exc:
        return f"cannot decode: {_describe_exception(exc)}"


@dataclass(frozen=True)
class _Field:
    """What `inspect` checks of one schema field, worked out once per schema (polars dtype tests are slow)."""

    name: str
    token: str  # the key as it appears literally in JSON
    kind: str  # int | float | float32 | bool | text (date, datetime: a string) | any (a string column)
    low: int = 0
    high: int = 0
    dtype: str = ""


@functools.lru_cache(maxsize=64)
def _fields(schema: tuple[tuple[str, pl.DataType], ...]) -> tuple[_Field, ...]:
    fields = []
    for name, dtype in schema:
        if dtype.is_integer():
            low, high = _int_bounds(dtype)
            fields.append(_Field(name, json.dumps(name), "int", low, high, str(dtype)))
        elif dtype == pl.Float32:
            fields.append(_Field(name, json.dumps(name), "float32", dtype=str(dtype)))
        elif dtype.is_float():
            fields.append(_Field(name, json.dumps(name), "float", dtype=str(dtype)))
        elif dtype == pl.Boolean:
            fields.append(_Field(name, json.dumps(name), "bool", dtype=str(dtype)))
        elif dtype in (pl.Date, pl.Datetime) or isinstance(dtype, pl.Datetime):
            fields.append(_Field(name, json.dumps(name), "text", dtype=str(dtype)))
        else:
            fields.append(_Field(name, json.dumps(name), "any", dtype=str(dtype)))
    return tuple(fields)


def _inspect(payload: bytes, fields: tuple[_Field, ...]) -> str | None:
    if not payload.strip(_JSON_WS):
        return "empty value"
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        return f"not UTF-8: {exc.reason} (byte 0x{payload[exc.start]:02x} at position {exc.start})"
    if text.startswith("\ufeff"):
        return "starts with a byte order mark (BOM): a JSON message must not; remove it at the producer"
    escapes = "\\" in text
    if escapes and _SURROGATE.search(text):
        reason = _lone_surrogate(text)
        if reason is not None:
            return reason
    # Duplicate schema keys are looked for only where a key could repeat: a key written twice, or escapes.
    watch_keys = escapes or any(text.count(f.token) > 1 for f in fields)
    try:
        obj, duplicates = _parse(text, watch_keys)
    except _Reject as exc:
        return str(exc)
    except json.JSONDecodeError as exc:
        return f"invalid JSON: {exc.msg.removesuffix(' at')} at line {exc.lineno} column {exc.colno}"
    if type(obj) is not dict:
        return f"not an object: the payload is a JSON {_JSON_TYPES.get(type(obj), 'null')}"
    for f in fields:
        if f.name in duplicates:
            return f"duplicate key '{f.name}': JSON readers disagree on which of its values counts"
    for f in fields:
        value = obj.get(f.name)
        if value is None:
            continue
        kind, kind_of_value = f.kind, type(value)
        if kind == "int":
            if kind_of_value is not int:
                return _wrong_type(f, value)
            if not f.low <= value <= f.high:
                return _out_of_range(f.name, value, f.dtype)
        elif kind in ("float", "float32"):
            if kind_of_value is not int and kind_of_value is not float:
                return _wrong_type(f, value)
            if kind == "float32" and math.isinf(ctypes.c_float(float(value)).value):
                return _out_of_range(f.name, value, f.dtype)
        elif kind == "bool":
            if kind_of_value is not bool:
                return _wrong_type(f, value)
        elif kind == "text" and kind_of_value is not str:
            return _wrong_type(f, value)
    return None


def _wrong_type(f: _Field, value: Any) -> str:
    return f"wrong type: field '{f.name}' is {_JSON_TYPES.get(type(value), 'null')} {_short(value)}, schema says {f.dtype}"


_recursion_lock = threading.Lock()
# Numbers the reader refuses or Python cannot hold are long: >= 39 digits, or a 3-digit exponent.
_LONG_NUMBER = re.compile(r"\d{39}|[eE][-+]?\d{3}")


def _reject_constant(name: str) -> Any:
    raise _Reject(f"{name} is not valid JSON: send null, or the value as a string")


_PLAIN = json.JSONDecoder(parse_constant=_reject_constant)


def _parse(text: str, watch_keys: bool = True) -> tuple[Any, set[str]]:
    """(value, keys repeated in the top-level object): json with the rules of the fast path's reader, no
    NaN/Infinity, numbers in its range, at most MAX_DEPTH levels (Python's own recursion limit would
    otherwise decide, depending on the caller's stack). The hooks run only where they can matter."""
    objects: list[set[str]] = []

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        out = dict(items)
        repeated: set[str] = set()
        if len(out) < len(items):
            seen: set[str] = set()
            for key, _ in items:
                (repeated if key in seen else seen).add(key)
        objects.append(repeated)
        return out

    hooked = watch_keys or _LONG_NUMBER.search(text) is not None
    decoder = json.JSONDecoder(parse_constant=_reject_constant, parse_int=_checked_int, parse_float=_checked_float,
                               object_pairs_hook=pairs) if hooked else _PLAIN
    brackets = text.count("[") + text.count("{")
    if brackets <= 200:
        obj = decoder.decode(text)
    else:
        depth = nesting_depth(text)
        if depth > MAX_DEPTH:
            raise _Reject(f"nested deeper than {MAX_DEPTH} levels ({depth}): flatten the message")
        with _recursion_lock:  # room for `depth` nested calls of the C scanner, whatever the caller's stack
            limit = sys.getrecursionlimit()
            sys.setrecursionlimit(limit + depth + 100)
            try:
                obj = decoder.decode(text)
            finally:
                sys.setrecursionlimit(limit)
    # The top-level object is the last one the hook saw (objects close innermost first).
    return obj, (objects[-1] if type(obj) is dict and objects else set())


_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_STEP = {"[": 1, "{": 1, "]": -1, "}": -1}


def nesting_depth(text: str) -> int:
    """Deepest nesting of arrays and objects, brackets inside strings not counted. Iterative: a
    100,000-level message must not exhaust the stack of the process checking it."""
    brackets = re.sub(r"[^\[\]{}]", "", _STRINGS.sub("", text))
    return max(itertools.accumulate(map(_STEP.__getitem__, brackets)), default=0)


def _checked_int(literal: str) -> int:
    digits = len(literal.lstrip("-"))
    if digits > 39:  # decided before int(): Python refuses > 4300 digits with a message about itself
        raise _Reject(f"number out of range: an integer of {digits} digits ({_clip(literal)}); integers must "
                      f"lie between -2^127 and 2^128-1")
    value = int(literal)
    if not INT_MIN <= value <= INT_MAX:
        raise _Reject(f"number out of range: {_clip(literal)}; integers must lie between -2^127 and 2^128-1")
    return value


def _checked_float(literal: str) -> float:
    value = float(literal)
    if math.isinf(value):
        raise _Reject(f"number out of range for a 64-bit float: {_clip(literal)}")
    return value


_SURROGATE = re.compile(r"\\u[dD][89a-fA-F]")
# \uXXXX escapes, with `\\` consumed as a pair so that `\\ud800` (a backslash, then text) is not one.
_ESCAPES = re.compile(r"\\(?:u([0-9a-fA-F]{4})|.)", re.DOTALL)


def _lone_surrogate(text: str) -> str | None:
    """A \\ud800-\\udfff escape that is not half of a high+low pair: no Unicode character, so no reader
    can keep it (polars turns a lone high one into U+0000)."""
    pending: re.Match[str] | None = None  # a high surrogate waiting for its low half
    for match in _ESCAPES.finditer(text):
        code = int(match.group(1), 16) if match.group(1) else -1
        if pending is not None:
            if 0xDC00 <= code <= 0xDFFF and match.start() == pending.end():
                pending = None
                continue
            return _surrogate_reason(pending)
        if 0xD800 <= code <= 0xDBFF:
            pending = match
        elif 0xDC00 <= code <= 0xDFFF:
            return _surrogate_reason(match)
    return None if pending is None else _surrogate_reason(pending)


def _surrogate_reason(match: re.Match[str]) -> str:
    return (f"invalid escape {match.group(0)} at character {match.start()}: a lone UTF-16 surrogate is not a "
            "character (escape characters above U+FFFF as a high+low pair)")


def _explain(line: bytes, schema: dict[str, pl.DataType]) -> str:
    """Why the reader refused a message `inspect` let through: which field, in words."""
    try:
        obj = _parse(line.decode("utf-8"))[0]
        for name, dtype in schema.items():
            try:
                pl.read_ndjson(io.BytesIO(line), schema={name: _wide(dtype)})
            except CONTENT_ERRORS:
                return f"wrong value: field '{name}' is {_short(obj.get(name))}, not a valid {dtype}"
        pl.read_ndjson(io.BytesIO(line), schema=_read_schema(schema))
    except CONTENT_ERRORS as exc:
        return f"cannot decode: {_reader_error(exc)}"
    return "cannot decode: the JSON reader refused it"


_READER_KINDS = {
    "InvalidNumber": "invalid or out-of-range number",
    "DepthLimitExceeded": f"nested deeper than {MAX_DEPTH} levels",
    "InvalidUnicodeCodepoint": "invalid \\u escape",
    "InvalidEscape": "invalid escape",
    "InvalidUtf8": "not UTF-8",
}


def _reader_error(exc: BaseException) -> str:
    """A reader error in words, without parser internals such as `InternalError(TapeError)`."""
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    found = re.match(r"error parsing line: (\w+)(?:\([^)]*\))? at character (\d+)", text)
    if found:
        kind, at = found.groups()
        return f"{_READER_KINDS.get(kind, 'not valid JSON')} at character {at}"
    return _clip(text, 120)


def _describe_exception(exc: BaseException) -> str:
    return _clip(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}", 160)


def _short(value: Any) -> str:
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        text = repr(value)
    return _clip(text, 40)


def _clip(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ------------------------------------------------------------ standard columns
def standard_columns(raw: RawBatch, source: str, batch_id: str, ingested_at: datetime,
                     failures: dict[int, str] | None = None) -> pl.DataFrame:
    """One row per message in `raw`: the standard columns, plus source extras, plus ROW.

    A key, header or broker timestamp that cannot be stored becomes null and that message's reason in
    `failures` (it goes to the quarantine): one odd message never fails the batch."""
    n = len(raw)
    failures = {} if failures is None else failures
    columns: dict[str, pl.Series] = {
        "_source": _repeat("_source", source, n, pl.String),
        "_stream": _repeat_or_series("_stream", raw.streams, n, pl.String),
        "_partition": _repeat_or_series("_partition", raw.partitions, n, pl.Int32),
        "_offset": pl.Series("_offset", raw.offsets, dtype=pl.Int64),
        "_key": (_nulls("_key", n, pl.Binary) if raw.keys is None
                 else _guarded_series("_key", raw.keys, pl.Binary, failures, "key")),
        "_headers": _headers_series(raw.headers, n, failures),
        "_timestamp": _timestamps(raw.timestamps_ms, n, failures),
        "_batch_id": _repeat("_batch_id", batch_id, n, pl.String),
        "_ingested_at": _repeat("_ingested_at", ingested_at, n, TS_DTYPE),
    }
    frame = pl.DataFrame(columns)
    extras = {name: pl.Series(name, values) for name, values in raw.extra_columns.items()}
    if extras:
        frame = frame.with_columns(**extras)
    return frame.with_columns(pl.int_range(0, n, dtype=pl.UInt32).alias(ROW))


def _repeat(name: str, value: Any, n: int, dtype: pl.DataType) -> pl.Series:
    return pl.Series(name, [value], dtype=dtype).new_from_index(0, n) if n else pl.Series(name, [], dtype=dtype)


def _nulls(name: str, n: int, dtype: pl.DataType) -> pl.Series:
    """A column of n nulls that polars keeps (and hands to Arrow) without a value per row; a column built from
    `[None] * n` holds a view or offset per row (a 50k-message batch's `_key` and `_headers`: 1.2 MB)."""
    return pl.repeat(None, n, dtype=dtype, eager=True).alias(name)


def _repeat_or_series(name: str, value: Any, n: int, dtype: pl.DataType) -> pl.Series:
    if isinstance(value, int | str):  # one value for every row
        return _repeat(name, value, n, dtype)
    if dtype == pl.String:  # a topic or subject per message: few distinct ones
        return _repeated_strings(name, value)
    return pl.Series(name, value, dtype=dtype)


def _repeated_strings(name: str, values: Sequence[str]) -> pl.Series:
    """A String column of values that repeat (a topic or subject per message): each distinct value is stored
    once and every row is a view of it. Built from the list, each row would copy its string (a 30-byte MQTT
    topic: 1.5 MB more in a 50k-message batch)."""
    import numpy as np  # here, as in base.py: light commands never load it

    index = {value: i for i, value in enumerate(dict.fromkeys(values))}  # each distinct value, first seen first
    if len(index) == len(values):
        return pl.Series(name, values, dtype=pl.String)
    codes = np.fromiter(map(index.__getitem__, values), np.uint32, len(values))
    return pl.Series(name, list(index), dtype=pl.String).gather(codes)


def _guarded_series(name: str, values: list[Any], dtype: pl.DataType, failures: dict[int, str],
                    what: str, convert: Callable[[Any], Any] | None = None) -> pl.Series:
    """A column of per-message values; one value polars cannot take is nulled and reported, not raised."""
    try:
        return pl.Series(name, values if convert is None else [convert(v) for v in values], dtype=dtype)
    except CONTENT_ERRORS:
        pass
    kept = []
    for i, value in enumerate(values):
        try:
            item = value if convert is None else convert(value)
            pl.Series(name, [item], dtype=dtype)
            kept.append(item)
        except CONTENT_ERRORS as exc:
            failures.setdefault(i, f"cannot store the message's {what}: {_describe_exception(exc)}")
            kept.append(None)
    return pl.Series(name, kept, dtype=dtype)


def _headers_series(headers: list[Any] | None, n: int, failures: dict[int, str]) -> pl.Series:
    if headers is None or not any(headers):
        return _nulls("_headers", n, HEADER_DTYPE)
    return _guarded_series("_headers", headers, HEADER_DTYPE, failures, "headers",
                           lambda h: [{"key": k, "value": v} for k, v in h] if h else None)


def _timestamps(timestamps_ms: list[int | None] | None, n: int, failures: dict[int, str]) -> pl.Series:
    if timestamps_ms is None:
        return _nulls("_timestamp", n, TS_DTYPE)
    try:
        ms = pl.Series("_timestamp", timestamps_ms, dtype=pl.Int64)
    except CONTENT_ERRORS:
        ms = _guarded_series("_timestamp", timestamps_ms, pl.Int64, failures, "broker timestamp")
    too_late = ms > MAX_TIMESTAMP_MS  # a Kafka topic may allow any CreateTime
    if too_late.any():
        for i in too_late.arg_true().to_list():
            failures.setdefault(i, f"broker timestamp out of range: {ms[i]} ms since 1970 is after the year "
                                   "9999; fix the producer's timestamps")
    ms = pl.select(pl.when((ms >= 0) & ~too_late).then(ms).alias("_timestamp")).to_series()  # Kafka: -1 = none
    return ms.cast(pl.Datetime("ms")).dt.replace_time_zone("UTC").cast(TS_DTYPE)

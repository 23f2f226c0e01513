"""Hypothesis strategies for hostile messages, and the properties every batch must keep.

Used by `test_decode_fuzz.py` (a bounded run in `make test`) and `chaos/test_decode_fuzz_long.py` (a long
run in `make chaos`). Messages are built as JSON *text*, so they can hold what a serializer would never
write: NaN, duplicate keys, lone surrogate escapes, 5,000-digit numbers, 1,100 levels of nesting, raw
control characters, escaped keys, BOMs; plus raw bytes and byte-level mutations of good messages.
"""

from __future__ import annotations

import ctypes
import json
import math
import sys
from datetime import UTC, date, datetime
from typing import Any

import polars as pl
from hypothesis import strategies as st

from ingest_defs.config import PipelineSpec, parse_pipeline
from ingest_defs.decode import ROW, decode_payloads
from ingest_defs.lifecycle import BatchResult, BatchRunner
from ingest_defs.sources.base import PartitionRange, RawBatch

FUZZ_PIPELINE: dict[str, Any] = {
    "source": {"kafka": {"topic": "fuzz"}},
    "schema": {"columns": {
        "id": {"dtype": "int64", "checks": {"ge": 0}},
        "small": {"dtype": "int8"},
        "count": {"dtype": "uint32"},
        "value": {"dtype": "float64", "checks": {"in_range": {"min_value": -1e300, "max_value": 1e300}}},
        "ratio": {"dtype": "float32"},
        "name": {"dtype": "string", "checks": {"str_length": {"max_value": 40}}},
        "flag": {"dtype": "bool"},
        "at": {"dtype": "datetime"},
        "day": {"dtype": "date"},
    }},
    "table": "fuzz",
}
FIELDS = list(FUZZ_PIPELINE["schema"]["columns"])
PARSER_INTERNALS = ("TapeError", "InternalError", "Traceback", "PanicException", "pyo3", "set_int_max_str_digits",
                    "recursion depth")


def fuzz_spec(strict: bool = False) -> PipelineSpec:
    raw = json.loads(json.dumps(FUZZ_PIPELINE))
    raw["schema"]["strict"] = strict
    return parse_pipeline("fuzz", raw)


# ---------------------------------------------------------------- JSON text, valid and not
BOUNDARY_INTS = [0, 1, -1, 127, 128, -128, -129, 255, 256, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**63 - 1, 2**63,
                 -(2**63), -(2**63) - 1, 2**64 - 1, 2**64, 2**127 - 1, 2**127, -(2**127), -(2**127) - 1,
                 2**128 - 1, 2**128, 10**38, 10**39]
NUMBER_LITERALS = ["1e400", "-1e400", "1e-400", "1E2", "1.5e10", "-0", "-0.0", "0.1", "3.4028235e38", "3.4028236e38",
                   "1e39", "1.7976931348623157e308", "1.7976931348623159e308", "123456789012345678901234567890.5",
                   "0." + "0" * 400 + "1", "01", "+1", "1.", ".5", "1e", "0x10", "-", "NaN", "Infinity", "-Infinity",
                   "nan", "inf"]
STRING_LITERALS = ['"\\ud800"', '"\\udc00"', '"\\ud83d\\ude00"', '"\\ude00\\ud83d"', '"a\\ud800b"', '"\\uD800"',
                   '"\\ud800\\u0041"', '"\\u0000"', '"\\x41"', '"\\/"', '"\\u12"', '"\\\\ud800"', '"a\tb"',
                   '"a\x00b"', '"a\x7fb"', '"a\nb"', '"\u2028"', '"\ufeff"', '"\uffff"', '"\\u00e9"',
                   '"2024-01-01"', '"2024-01-01T00:00:00Z"', '"2024-01-01T00:00:00+02:00"', '"99999-01-01"',
                   '"2024-13-45"', '"0000-01-01T00:00:00Z"', '"1970-01-01T00:00:00"', '"2024-02-29T23:59:59.999999Z"',
                   '"true"', '"5"', '""']
KEY_SPELLINGS = {name: [json.dumps(name), '"' + "".join(f"\\u{ord(c):04x}" for c in name) + '"'] for name in FIELDS}
WHITESPACE = ["", " ", "\t", "\r\n", "\n", "  "]


SCALAR = st.one_of(
    st.sampled_from(BOUNDARY_INTS).map(str),
    st.integers().map(str),
    st.integers(min_value=39, max_value=5000).map(lambda d: "9" * d),
    st.floats(allow_nan=False, allow_infinity=False).map(repr),
    st.sampled_from(NUMBER_LITERALS),
    st.sampled_from(["true", "false", "null"]),
    st.text(max_size=30).flatmap(lambda s: st.sampled_from([json.dumps(s), json.dumps(s, ensure_ascii=False)])),
    st.sampled_from(STRING_LITERALS),
)


def json_text(max_leaves: int = 12) -> st.SearchStrategy[str]:
    """Any JSON-ish value as text: scalars, arrays, objects with duplicate or escaped keys, deep nesting."""
    deep = st.integers(min_value=1000, max_value=1100).map(lambda d: "[" * d + "]" * d)
    return st.recursive(
        st.one_of(SCALAR, deep),
        lambda inner: st.one_of(
            st.lists(inner, max_size=4).map(lambda items: "[" + ",".join(items) + "]"),
            st.lists(st.tuples(st.text(max_size=6).map(json.dumps), inner), max_size=4).map(
                lambda pairs: "{" + ",".join(f"{k}:{v}" for k, v in pairs) + "}"),
        ),
        max_leaves=max_leaves,
    )


JSON_TEXT = json_text()
SMALL_JSON_TEXT = json_text(max_leaves=4)


@st.composite
def message_text(draw: st.DrawFn) -> str:
    """Mostly an object over the schema's fields (some repeated, some spelled with escapes, extra fields),
    with hostile values and whitespace; sometimes any JSON value at the top; sometimes a BOM or garbage."""
    if draw(st.integers(0, 9)) == 0:
        return draw(JSON_TEXT)
    pairs = []
    for name in draw(st.lists(st.sampled_from(FIELDS), max_size=len(FIELDS) + 2)):
        key = draw(st.sampled_from(KEY_SPELLINGS[name])) if draw(st.integers(0, 7)) == 0 else json.dumps(name)
        pairs.append((key, draw(SMALL_JSON_TEXT if draw(st.integers(0, 4)) == 0 else TYPED_VALUES[name])))
    for _ in range(draw(st.integers(0, 2))):
        pairs.append((json.dumps(draw(st.text(max_size=8))), draw(SMALL_JSON_TEXT)))
    ws = draw(st.sampled_from(WHITESPACE))
    text = "{" + ws + ("," + ws).join(f"{k}{ws}:{ws}{v}" for k, v in pairs) + ws + "}"
    decoration = draw(st.integers(0, 19))
    if decoration == 0:
        text = "\ufeff" + text
    elif decoration == 1:
        text = text + draw(st.sampled_from(["x", " ", "\n", "}", "{}", "\x00", "\x0c", "\u0085"]))
    elif decoration == 2:
        text = draw(st.sampled_from([" ", "\t", "\r"])) + text
    return text


NAME_TEXT = st.one_of(
    st.text(max_size=50).flatmap(lambda s: st.sampled_from([json.dumps(s), json.dumps(s, ensure_ascii=False)])),
    st.sampled_from(STRING_LITERALS[:20]),
)
DATE_TEXT = st.one_of(st.dates().map(lambda d: f'"{d.isoformat()}"'), st.sampled_from(STRING_LITERALS[20:28]))
# Mostly plausible values for each field's type, to reach the checks, the ranges and the fast path.
TYPED_VALUES: dict[str, st.SearchStrategy[str]] = {
    "id": st.integers(min_value=-5, max_value=2**64).map(str),
    "small": st.integers(min_value=-300, max_value=300).map(str),
    "count": st.integers(min_value=-2, max_value=2**33).map(str),
    "value": st.floats(allow_nan=False, allow_infinity=False).map(repr),
    "ratio": st.one_of(st.floats(allow_nan=False, allow_infinity=False, width=32).map(repr),
                       st.floats(allow_nan=False, allow_infinity=False).map(repr)),
    "name": NAME_TEXT,
    "flag": st.sampled_from(["true", "false", "true", "false", "0", "1", '"true"', "null"]),
    "at": st.one_of(st.datetimes(timezones=st.just(UTC)).map(lambda d: f'"{d.isoformat()}"'), DATE_TEXT),
    "day": DATE_TEXT,
}
VALID_VALUES: dict[str, st.SearchStrategy[str]] = {
    "id": st.integers(min_value=0, max_value=2**63 - 1).map(str),
    "small": st.integers(min_value=-128, max_value=127).map(str),
    "count": st.integers(min_value=0, max_value=2**32 - 1).map(str),
    "value": st.floats(min_value=-1e300, max_value=1e300).map(repr),
    "ratio": st.floats(allow_nan=False, allow_infinity=False, width=32).map(repr),
    "name": st.text(max_size=40).flatmap(lambda s: st.sampled_from([json.dumps(s), json.dumps(s, ensure_ascii=False)])),
    "flag": st.sampled_from(["true", "false"]),
    "at": st.datetimes(min_value=datetime(1900, 1, 1), max_value=datetime(2200, 1, 1), timezones=st.just(UTC)).map(
        lambda d: f'"{d.isoformat()}"'),
    "day": st.dates(min_value=date(1900, 1, 1), max_value=date(2200, 1, 1)).map(lambda d: f'"{d.isoformat()}"'),
}
HAZARDS = ["duplicate", "lone_surrogate", "escaped_key", "nan", "deep", "huge_int", "float32_overflow",
           "int8_overflow", "bom", "whitespace", "nested_in_string", "raw_newline", "control_char", "big_float"]


@st.composite
def hazardous_message(draw: st.DrawFn) -> str:
    """A valid message with one hazard: most of them must be quarantined, some kept exactly."""
    pairs = {name: draw(VALID_VALUES[name]) for name in draw(st.sets(st.sampled_from(FIELDS), min_size=1))}
    items = [(json.dumps(k), v) for k, v in pairs.items()]
    hazard = draw(st.sampled_from(HAZARDS))
    name = draw(st.sampled_from(FIELDS))
    if hazard == "duplicate":
        items.insert(draw(st.integers(0, len(items))), (json.dumps(name), draw(VALID_VALUES[name])))
    elif hazard == "lone_surrogate":
        items.append((json.dumps(draw(st.sampled_from(["name", "extra"]))),
                      draw(st.sampled_from(['"\\ud800"', '"a\\udbffb"', '"\\udc00"', '"\\ud83d\\ude00"',
                                            '"\\ude00\\ud83d"', '"\\\\ud800"', '"\\uD834\\uDD1E"']))))
    elif hazard == "escaped_key":
        items.append((draw(st.sampled_from(KEY_SPELLINGS[name])), draw(VALID_VALUES[name])))
    elif hazard == "nan":
        items.append((json.dumps(draw(st.sampled_from([name, "extra"]))), draw(st.sampled_from(["NaN", "Infinity", "-Infinity"]))))
    elif hazard == "deep":
        depth = draw(st.integers(min_value=1015, max_value=1030))
        items.append(('"extra"', "[" * depth + "]" * depth))
    elif hazard == "huge_int":
        items.append((json.dumps(draw(st.sampled_from(["extra", "value", "id"]))),
                      draw(st.sampled_from(BOUNDARY_INTS[-8:])).__str__() if draw(st.booleans()) else "9" * draw(st.integers(39, 5000))))
    elif hazard == "float32_overflow":
        items.append(('"ratio"', draw(st.sampled_from(["3.4028235e38", "3.4028236e38", "3.5e38", "1e39", "-1e300", "1e-50"]))))
    elif hazard == "int8_overflow":
        items.append(('"small"', str(draw(st.sampled_from([127, 128, -128, -129, 300, 2**31])))))
    elif hazard == "nested_in_string":
        items.append(('"name"', draw(SMALL_JSON_TEXT)))
    elif hazard == "big_float":
        items.append(('"value"', draw(st.sampled_from(["1.7976931348623157e308", "1.7976931348623159e308", "1e400", "1e-400"]))))
    text = "{" + ",".join(f"{k}:{v}" for k, v in items) + "}"
    if hazard == "bom":
        text = "\ufeff" + text
    elif hazard == "whitespace":
        ws = draw(st.sampled_from(WHITESPACE[1:]))
        text = ws + text.replace(",", ws + "," + ws).replace(":", ws + ":") + ws
    elif hazard == "raw_newline":
        text = text.replace(",", ",\n")
    elif hazard == "control_char":
        text = text[:-1] + ',"extra":"a' + draw(st.sampled_from(["\t", "\x00", "\x1f", "\n", "\x7f"])) + 'b"}'
    return text


def good_message(i: int, with_dates: bool = True) -> bytes:
    record = {"id": i, "small": i % 100, "count": i, "value": i / 4, "ratio": 0.5, "name": f"n{i}", "flag": i % 2 == 0}
    if with_dates:
        record.update(at="2026-01-01T00:00:00Z", day="2026-01-01")
    return json.dumps(record).encode()


@st.composite
def mutated_good_message(draw: st.DrawFn) -> bytes:
    """A good message with a few bytes replaced, inserted or deleted."""
    data = bytearray(good_message(draw(st.integers(0, 1000))))
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(0, len(data)))
        op = draw(st.sampled_from(["replace", "insert", "delete"]))
        byte = draw(st.integers(0, 255))
        if op == "insert":
            data.insert(at, byte)
        elif at < len(data):
            if op == "replace":
                data[at] = byte
            else:
                del data[at]
    return bytes(data)


PAYLOADS = st.one_of(
    message_text().map(lambda t: t.encode("utf-8")),
    hazardous_message().map(lambda t: t.encode("utf-8")),
    hazardous_message().map(lambda t: t.encode("utf-8")),
    st.binary(max_size=120),
    mutated_good_message(),
    st.sampled_from([b"", b" ", b"\n", b"\xef\xbb\xbf", b"\xff", b"\xed\xa0\x80", b"\xc0\xaf", b"{}"]),
)


def payloads() -> st.SearchStrategy[bytes]:
    return PAYLOADS


# ---------------------------------------------------------------- the properties
Outcome = tuple[str, Any]  # ("row", values) or ("quarantined", reason)


def payload_schema(with_dates: bool = True) -> dict[str, pl.DataType]:
    """The fuzz pipeline's payload schema; without its date fields the fast path may prove a batch free of
    duplicate keys by counting colons alone, so both shapes are fuzzed."""
    schema = fuzz_spec().payload_schema
    return schema if with_dates else {k: v for k, v in schema.items() if k not in ("at", "day")}


def decode_outcomes(batch: list[bytes], with_dates: bool = True) -> list[Outcome]:
    """Each message's outcome after decoding; asserts that every message has exactly one."""
    schema = payload_schema(with_dates)
    decoded = decode_payloads(batch, schema)
    rows = decoded.rows
    positions = rows.get_column(ROW).to_list()
    assert len(positions) == len(set(positions)), "a message decoded twice"
    assert not set(positions) & set(decoded.failures), "a message both decoded and quarantined"
    assert set(positions) | set(decoded.failures) == set(range(len(batch))), "a message lost"
    assert rows.drop(ROW).schema == pl.Schema(schema), "the rows do not have the schema's types"
    out: dict[int, Outcome] = {i: ("quarantined", reason) for i, reason in decoded.failures.items()}
    # Dates as their integer (polars holds years Python's datetime cannot, e.g. 0000-01-01)
    physical = rows.drop(ROW).with_columns(pl.col(pl.Date, pl.Datetime).to_physical())
    for i, row in zip(positions, physical.iter_rows(), strict=True):
        out[i] = ("row", row)
    return [out[i] for i in range(len(batch))]


def assert_readable(reason: str) -> None:
    assert isinstance(reason, str) and reason.strip(), "an empty reason"
    assert not any(word in reason for word in PARSER_INTERNALS), f"parser internals in the reason: {reason}"
    assert len(reason) < 400, f"an unreadably long reason: {reason[:100]}..."


def check_message_alone_and_among_others(message: bytes, with_dates: bool = True) -> None:
    """A message's outcome never depends on its neighbours: alone, among good messages (the fast path
    when it is acceptable) and beside an invalid one (the isolating path) give the same row or reason."""
    alone = decode_outcomes([message], with_dates)[0]
    among_good = decode_outcomes([good_message(1, with_dates), message, good_message(2, with_dates)], with_dates)[1]
    beside_bad = decode_outcomes([good_message(1, with_dates), b"{", message], with_dates)[2]
    assert alone == among_good == beside_bad, (alone, among_good, beside_bad)
    if alone[0] == "quarantined":
        assert_readable(alone[1])
    else:
        check_values_kept(message, alone[1], payload_schema(with_dates))


def check_values_kept(message: bytes, row: tuple[Any, ...], dtypes: dict[str, pl.DataType]) -> None:
    """An accepted message's values are what a careful JSON reader sees: never silently changed."""
    obj = _loads_deep(message)
    assert isinstance(obj, dict)
    for (name, dtype), got in zip(dtypes.items(), row, strict=True):
        want = obj.get(name)
        if want is None:
            assert got is None, f"{name}: {got!r} from a missing or null field"
        elif dtype.is_integer():
            assert got == want and isinstance(want, int), f"{name}: {got!r} != {want!r}"
        elif dtype == pl.Float32:
            assert got == ctypes.c_float(float(want)).value, f"{name}: {got!r} != {want!r} as float32"
        elif dtype.is_float():
            assert got == float(want) and not math.isinf(got), f"{name}: {got!r} != {want!r}"
        elif dtype == pl.Boolean:
            assert got is want, f"{name}: {got!r} != {want!r}"
        elif dtype == pl.String:
            if isinstance(want, str):
                assert got == want, f"{name}: {got!r} != {want!r} (a string must be kept exactly)"
            else:  # documented: a non-string value is kept as the reader renders it (numbers normalized)
                try:
                    rendered = _loads_deep(got)
                except ValueError:  # documented: the reader writes control characters in nested strings raw
                    assert any(ord(c) < 0x20 for c in got), f"{name}: {got!r} is not JSON"
                    continue
                assert _same_json(rendered, want), f"{name}: {got!r} is not the JSON of {want!r}"


def _loads_deep(text: str | bytes) -> Any:
    """json.loads with room for the 1024 levels an accepted message may nest (its C scanner recurses)."""
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(limit + 2000)
    try:
        return json.loads(text)
    finally:
        sys.setrecursionlimit(limit)


def _same_json(a: Any, b: Any) -> bool:
    """Equal as JSON values (numbers by value, booleans apart from numbers). Iterative: a value may nest
    1024 levels, deeper than Python's recursion limit allows a recursive walk."""
    pairs = [(a, b)]
    while pairs:
        a, b = pairs.pop()
        if isinstance(a, bool) or isinstance(b, bool) or a is None or b is None:
            same = a is b
        elif isinstance(a, int | float) and isinstance(b, int | float):
            same = float(a) == float(b)
        elif isinstance(a, list) and isinstance(b, list):
            same = len(a) == len(b)
            pairs.extend(zip(a, b, strict=False))
        elif isinstance(a, dict) and isinstance(b, dict):
            same = a.keys() == b.keys()
            pairs.extend((a[k], b[k]) for k in a if k in b)
        else:
            same = a == b
        if not same:
            return False
    return True


def run_rows(batch: list[bytes], keys: list[bytes | None] | None = None,
             timestamps_ms: list[int | None] | None = None, strict: bool = False) -> None:
    """The batch through the lifecycle's decode + standard columns + validation (`BatchRunner._rows`):
    never raises, and every message lands in exactly one of target and quarantine, with a readable reason."""
    spec = fuzz_spec(strict)
    n = len(batch)
    raw = RawBatch(payloads=batch, offsets=list(range(n)), partitions=0, streams="fuzz",
                   keys=keys, headers=[[("h", p[:8])] if i % 3 else None for i, p in enumerate(batch)],
                   timestamps_ms=timestamps_ms if timestamps_ms is not None else [1_700_000_000_000] * n,
                   covered=[PartitionRange("fuzz/kafka/fuzz/0", 0, 0, n - 1)])
    runner = BatchRunner(spec, source=None, target=None, quarantine=None)  # _rows needs neither
    result = BatchResult(batch_id="01FUZZ", planned=[])
    good, bad = runner._rows(raw, result, ingested_at=datetime(2026, 1, 1, tzinfo=UTC))
    target, quarantine = good.get_column("_offset").to_list(), bad.get_column("_offset").to_list()
    assert sorted(target + quarantine) == list(range(n)), "a message lost or doubled"
    for reason in bad.get_column("_error").to_list():
        assert_readable(reason)
    assert bad.get_column("_raw").to_list() == [batch[o] for o in quarantine], "_raw is not the message"

"""Decoding: the fast path and the bisecting fallback agree, and bad messages are isolated with reasons."""

import json
import sys

import polars as pl
import pytest

from ingest_defs.decode import ROW, decode_payloads

SCHEMA = {"id": pl.Int64(), "event": pl.String(), "value": pl.Float64()}


def good(i: int) -> bytes:
    return json.dumps({"id": i, "event": "click", "value": i / 2}).encode()


def test_fast_path_keeps_every_row_in_order():
    payloads = [good(i) for i in range(1000)]
    decoded = decode_payloads(payloads, SCHEMA)
    assert decoded.failures == {}
    assert decoded.rows["id"].to_list() == list(range(1000))
    assert decoded.rows[ROW].to_list() == list(range(1000))


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"", "empty value"),
        (b"   ", "empty value"),
        (b'{"id": 1, "event": "x",,}', "invalid JSON"),
        (b'{"id": "abc"}', "wrong type: field 'id'"),
        (b'{"id": 5.5}', "wrong type: field 'id'"),  # never silently truncated to 5
        (b'{"id": 100000000000000000000}', "number out of range for int64"),  # never silently nulled
        (b'{"id": 1, "note": "\xff\xfe"}', "not UTF-8"),
        (b"[1, 2]", "not an object"),
        (b"null", "not an object"),
        (b'{"id": 1} {"id": 2}', "invalid JSON"),
    ],
)
def test_one_bad_message_is_isolated_with_its_reason(payload: bytes, reason: str):
    payloads = [good(i) for i in range(200)]
    payloads.insert(77, payload)
    decoded = decode_payloads(payloads, SCHEMA)
    assert list(decoded.failures) == [77]
    assert reason in decoded.failures[77]
    assert decoded.rows.height == 200
    assert 77 not in decoded.rows[ROW].to_list()
    # the good rows are exactly what the fast path gives for them
    expected = decode_payloads([p for i, p in enumerate(payloads) if i != 77], SCHEMA).rows.drop(ROW)
    assert decoded.rows.drop(ROW).equals(expected)


def test_many_bad_messages_spread_over_a_batch():
    payloads = [good(i) if i % 7 else b"{oops" for i in range(5000)]
    decoded = decode_payloads(payloads, SCHEMA)
    assert set(decoded.failures) == {i for i in range(5000) if i % 7 == 0}
    assert decoded.rows[ROW].to_list() == [i for i in range(5000) if i % 7]


def test_pretty_printed_json_with_newlines_is_decoded_not_split():
    pretty = json.dumps({"id": 9, "event": "click", "value": 1.5}, indent=2).encode()
    decoded = decode_payloads([good(1), pretty, good(2)], SCHEMA)
    assert decoded.failures == {}
    assert decoded.rows["id"].to_list() == [1, 9, 2]


def test_missing_fields_are_null_and_extra_fields_ignored_unless_strict():
    payloads = [b'{"id": 1}', b'{"id": 2, "event": "a", "value": 1, "extra": true}']
    loose = decode_payloads(payloads, SCHEMA)
    assert loose.failures == {}
    assert loose.rows["event"].to_list() == [None, "a"]
    strict = decode_payloads(payloads, SCHEMA, strict=True)
    assert list(strict.failures) == [1]
    assert "extra" in strict.failures[1]


def test_datetime_and_int32_ranges():
    schema = {"t": pl.Datetime("us", "UTC"), "n": pl.Int32()}
    decoded = decode_payloads([b'{"t": "2024-01-01T00:00:00+02:00", "n": 1}', b'{"t": "x", "n": 1}',
                               b'{"t": null, "n": 3000000000}'], schema)
    assert set(decoded.failures) == {1, 2}
    assert str(decoded.rows["t"][0]) == "2023-12-31 22:00:00+00:00"


# ---------------------------------------------------------------- the corpus: the nastiest messages found
NASTY_SCHEMA = {"id": pl.Int64(), "event": pl.String(), "value": pl.Float64(), "small": pl.Int8(),
                "ratio": pl.Float32()}
DEEP = 100_000
NASTY = {
    # structure: Python's json raised RecursionError (not ValueError) here, failing the whole batch
    "nested 100,000 deep": (b'{"id":1,"x":' + b"[" * DEEP + b"]" * DEEP + b"}", "nested deeper than 1024 levels"),
    "nested 1,025 deep": (b'{"id":1,"x":' + b"[" * 1024 + b"]" * 1024 + b"}", "nested deeper than 1024 levels"),
    "nested 1,024 deep is fine": (b'{"id":1,"x":' + b"[" * 1023 + b"]" * 1023 + b"}", None),
    "objects nested 5,000 deep": (b'{"id":1,"event":' + b'{"a":' * 5000 + b"1" + b"}" * 5000 + b"}",
                                  "nested deeper than 1024 levels"),
    # numbers: polars refused these with parser internals (InternalError(TapeError), InvalidNumber)
    "NaN": (b'{"id":1,"value":NaN}', "NaN is not valid JSON"),
    "Infinity in an unused field": (b'{"id":1,"other":Infinity}', "Infinity is not valid JSON"),
    "-Infinity": (b'{"id":1,"value":-Infinity}', "-Infinity is not valid JSON"),
    "1e400": (b'{"id":1,"value":1e400}', "number out of range for a 64-bit float"),
    "5,000-digit integer": (b'{"id":1,"other":' + b"9" * 5000 + b"}", "number out of range: an integer of 5000 digits"),
    "2^128": (b'{"id":1,"value":340282366920938463463374607431768211456}', "number out of range"),
    "2^128-1 as a float is fine": (b'{"id":1,"value":340282366920938463463374607431768211455}', None),
    "int64 + 1": (b'{"id":9223372036854775808}', "number out of range for int64"),
    "int8 300 (polars panicked)": (b'{"id":1,"small":300}', "number out of range for int8: field 'small' is 300"),
    "float32 1e300 (polars made it inf)": (b'{"id":1,"ratio":1e300}', "number out of range for float32"),
    "1e-400 underflows to 0 as everywhere": (b'{"id":1,"value":1e-400}', None),
    # escapes and characters: never replaced, never turned into something else
    "lone high surrogate (polars made it U+0000)": (b'{"id":1,"event":"\\ud800"}', "invalid escape \\ud800"),
    "lone low surrogate": (b'{"id":1,"event":"x\\udc00"}', "invalid escape \\udc00"),
    "reversed surrogate pair": (b'{"id":1,"event":"\\ude00\\ud83d"}', "invalid escape \\ude00"),
    "lone surrogate in a key": (b'{"\\ud800":1,"id":1}', "invalid escape \\ud800"),
    "surrogate pair is a character": (b'{"id":1,"event":"\\ud83d\\ude00"}', None),
    "escaped backslash before ud800 is text": (b'{"id":1,"event":"\\\\ud800"}', None),
    "invalid escape": (b'{"id":1,"event":"\\x41"}', "invalid JSON: Invalid \\escape"),
    "short \\u escape": (b'{"id":1,"event":"\\u12"}', "invalid JSON: Invalid \\uXXXX escape"),
    "raw control character": (b'{"id":1,"event":"a\x01b"}', "invalid JSON: Invalid control character"),
    "raw tab in a string": (b'{"id":1,"event":"a\tb"}', "invalid JSON: Invalid control character"),
    "escaped NUL is a character": (b'{"id":1,"event":"a\\u0000b"}', None),
    "UTF-8 encoded surrogate": (b'{"id":1,"event":"\xed\xa0\x80"}', "not UTF-8"),
    "overlong UTF-8": (b'{"id":1,"event":"\xc0\xaf"}', "not UTF-8"),
    "BOM": (b'\xef\xbb\xbf{"id":1}', "byte order mark"),
    # keys: polars takes the first of duplicate keys, JSON readers generally the last
    "duplicate key": (b'{"id":1,"id":2}', "duplicate key 'id'"),
    "duplicate key spelled with an escape": (b'{"id":1,"i\\u0064":2}', "duplicate key 'id'"),
    "duplicate unused key is harmless": (b'{"id":1,"other":1,"other":2}', None),
    "escaped key": (b'{"i\\u0064":7}', None),
    # top level
    "array": (b"[1,2]", "not an object: the payload is a JSON array"),
    "string": (b'"hello"', "not an object: the payload is a JSON string"),
    "null": (b"null", "not an object: the payload is a JSON null"),
    "two objects": (b'{"id":1}{"id":2}', "invalid JSON: Extra data"),
    "form feed after the object": (b'{"id":1}\x0c', "invalid JSON"),
    "CR inside is whitespace": (b'{"id":1,\r"event":"a"}', None),
    "pretty-printed": (b'{\n  "id": 1,\n  "event": "a"\n}', None),
    "huge string": (b'{"id":1,"event":"' + b"a" * 5_000_000 + b'"}', None),
}


@pytest.mark.parametrize("name", list(NASTY))
def test_nasty_message_alone_among_good_and_beside_bad(name: str):
    """Each nasty message gets the same outcome alone, in a clean batch (fast path) and beside an invalid
    message (isolating path), with a reason a person can act on — or, when valid, its exact values."""
    payload, reason = NASTY[name]
    outcomes = []
    for batch, at in (([payload], 0), ([good(1), payload, good(2)], 1), ([good(1), b"{", payload], 2)):
        decoded = decode_payloads(batch, NASTY_SCHEMA)
        assert set(decoded.failures) | set(decoded.rows[ROW].to_list()) == set(range(len(batch)))
        row = decoded.rows.filter(pl.col(ROW) == at).drop(ROW).rows()
        outcomes.append(("failed", decoded.failures[at]) if at in decoded.failures else ("row", row))
    assert outcomes[0] == outcomes[1] == outcomes[2]
    kind, detail = outcomes[0]
    if reason is None:
        assert kind == "row", detail
        limit = sys.getrecursionlimit()
        sys.setrecursionlimit(limit + 2000)  # valid messages nest up to 1024 levels
        try:
            expected = json.loads(payload)
        finally:
            sys.setrecursionlimit(limit)
        values = dict(zip(NASTY_SCHEMA, detail[0], strict=True))
        for field in ("id", "event", "value"):
            if isinstance(expected.get(field), str | int | float):
                want = float(expected[field]) if field == "value" else expected[field]
                assert values[field] == want
    else:
        assert kind == "failed", detail
        assert reason in detail
        assert "TapeError" not in detail and "InternalError" not in detail


def test_nested_1024_levels_decode_in_a_worker_thread_with_a_deep_stack():
    """The depth rule does not depend on the caller: a thread already deep in calls (the lifecycle decodes
    on a worker thread under Dagster) still reads 1024 levels and quarantines 1025."""
    import threading

    ok = b'{"id":1,"x":' + b"[" * 1023 + b"]" * 1023 + b"}"
    too_deep = b'{"id":1,"x":' + b"[" * 1024 + b"]" * 1024 + b"}"
    found: list = []

    def deep_call(level: int) -> None:
        if level:
            return deep_call(level - 1)
        found.append(decode_payloads([ok, too_deep, b"{"], NASTY_SCHEMA))

    thread = threading.Thread(target=deep_call, args=(800,))
    thread.start()
    thread.join()
    assert found and set(found[0].failures) == {1, 2}
    assert "nested deeper than 1024 levels" in found[0].failures[1]


def test_a_clean_batch_takes_the_fast_path_without_checking_messages_one_by_one(monkeypatch):
    """The common case stays fast: a clean batch is one read plus byte scans, no per-message inspection."""
    import ingest_defs.decode as decode

    looked_at: list[bytes] = []
    monkeypatch.setattr(decode, "inspect", lambda payload, schema: looked_at.append(payload))
    payloads = [good(i) for i in range(5000)] + [b'{"id":1,"event":"caf\\u00e9 \\ud83d\\ude00","value":null}']
    decoded = decode_payloads(payloads, SCHEMA)
    assert decoded.failures == {} and decoded.rows.height == 5001
    assert looked_at == [payloads[-1]]  # only the message with escapes that could hide a problem


def test_broker_timestamps_keys_and_headers_that_cannot_be_stored_quarantine_only_their_message():
    from datetime import UTC, datetime

    from ingest_defs.decode import standard_columns
    from ingest_defs.sources.base import PartitionRange, RawBatch

    # 2**62 ms made polars panic; year 10000 broke every Python datetime downstream (found by the fuzz)
    raw = RawBatch(payloads=[good(i) for i in range(6)], offsets=list(range(6)), partitions=0, streams="t",
                   keys=[b"k", "not bytes", None, b"k3", None, None],
                   headers=[None, [("h", b"v")], None, None, [("\udcff", b"v")], None],  # a surrogate-escaped key
                   timestamps_ms=[1_700_000_000_000, -1, 2**62, None, 0, 253_402_300_800_000],
                   covered=[PartitionRange("a", 0, 0, 5)])
    failures: dict[int, str] = {}
    frame = standard_columns(raw, "kafka", "b", datetime(2026, 1, 1, tzinfo=UTC), failures)
    assert frame.height == 6
    assert set(failures) == {1, 2, 4, 5}
    assert "cannot store the message's key" in failures[1]
    assert "broker timestamp out of range" in failures[2] and "broker timestamp out of range" in failures[5]
    assert "cannot store the message's headers" in failures[4]
    assert frame["_timestamp"].is_null().to_list() == [False, True, True, True, False, True]
    assert frame["_headers"][1].to_list() == [{"key": "h", "value": b"v"}]

"""Decoding: the fast path and the bisecting fallback agree, and bad messages are isolated with reasons."""

import json

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
        (b'{"id": 100000000000000000000}', "wrong type: field 'id'"),  # never silently nulled
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

"""Validation splits rows into valid ones and ones with every failed check named."""

import pandera.polars as pa
import polars as pl

from ingest_defs.config import parse_pipeline
from ingest_defs.validation import MAX_VALIDATIONS, validate


def spec():
    return parse_pipeline("v", {
        "source": {"kafka": {"topic": "t"}},
        "schema": {"columns": {
            "id": {"dtype": "int64", "nullable": False, "checks": {"ge": 0}},
            "event": {"dtype": "string", "checks": {"isin": ["a", "b"]}},
        }},
        "table": "t",
    })


def test_rows_failing_checks_are_split_out_with_reasons():
    frame = pl.DataFrame({"id": [1, -1, None, 4], "event": ["a", "c", "a", None], "_offset": [0, 1, 2, 3]})
    result = validate(frame, spec().pandera_schema, "v")
    assert result.valid["_offset"].to_list() == [0, 3]
    assert set(result.failures) == {1, 2}
    assert "check failed: id greater_than_or_equal_to(0) (value -1)" in result.failures[1]
    assert "event isin" in result.failures[1]
    assert "not_nullable" in result.failures[2]


def test_a_check_over_the_whole_column_is_blamed_on_the_message_that_fails_it():
    # A dataframe check returning one boolean: pandera reports it against row 0, whatever row caused it.
    # The blame is verified (the rest must pass without it), and the frame bisected until the message
    # that fails on its own is found. The batch is never failed, nor the wrong message quarantined.
    schema = pa.DataFrameSchema({"id": pa.Column(pl.Int64)},
                                checks=[pa.Check(lambda d: d.lazyframe.select(pl.col("id").max() < 100), name="small")])
    frame = pl.DataFrame({"id": [*range(50), 500, *range(60, 90)]})
    result = validate(frame, schema, "v")
    assert list(result.failures) == [50]
    assert "small" in result.failures[50]
    assert result.valid["id"].to_list() == [*range(50), *range(60, 90)]


def test_a_check_that_raises_on_one_value_quarantines_that_message():
    # A user's check that breaks on one odd value (a strict cast): pandera reports the exception with no row.
    byte_sized = pa.Check(lambda d: d.lazyframe.select(pl.col(d.key).cast(pl.UInt8, strict=True) >= 0), name="byte_sized")
    schema = pa.DataFrameSchema({"id": pa.Column(pl.Int64, checks=[byte_sized])})
    result = validate(pl.DataFrame({"id": [*range(20), 300, *range(20, 40)]}), schema, "v")
    assert list(result.failures) == [20]
    assert "byte_sized" in result.failures[20]
    assert result.valid.height == 40


def test_row_failures_and_a_whole_column_check_together():
    schema = pa.DataFrameSchema(
        {"id": pa.Column(pl.Int64, checks=[pa.Check.ge(0)])},
        checks=[pa.Check(lambda d: d.lazyframe.select(pl.col("id").max() < 100), name="small")])
    result = validate(pl.DataFrame({"id": [0, -1, 5, 700, 6, -2]}), schema, "v")
    assert set(result.failures) == {1, 3, 5}
    assert "small" in result.failures[3] and "greater_than_or_equal_to" in result.failures[1]
    assert result.valid["id"].to_list() == [0, 5, 6]


def test_a_check_no_message_passes_quarantines_all_within_the_bisection_budget():
    schema = pa.DataFrameSchema({"id": pa.Column(pl.Int64)}, checks=[pa.Check(lambda df: False, name="never")])
    frame = pl.DataFrame({"id": list(range(5000))})
    result = validate(frame, schema, "v")
    assert set(result.failures) == set(range(5000))
    assert result.valid.height == 0
    assert all("never" in reason for reason in result.failures.values())
    assert any("not narrowed down further" in reason for reason in result.failures.values())
    assert MAX_VALIDATIONS < 5000  # the budget, not one validation per message, bounded the work

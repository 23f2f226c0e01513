"""Validation splits rows into valid ones and ones with every failed check named."""

import pandera.polars as pa
import polars as pl
import pytest

from ingest_defs.config import parse_pipeline
from ingest_defs.validation import FrameValidationError, validate


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


def test_frame_level_failure_fails_the_batch_with_a_message():
    schema = pa.DataFrameSchema({"id": pa.Column(pl.Int64)}, checks=[pa.Check(lambda df: False, name="never")])
    with pytest.raises(FrameValidationError, match="pipeline 'v'"):
        validate(pl.DataFrame({"id": [1]}), schema, "v")

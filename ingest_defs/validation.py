"""Pandera (polars backend) validation: split a decoded frame into valid rows and rows with reasons."""

from __future__ import annotations

from dataclasses import dataclass

import pandera.errors as pa_errors
import pandera.polars as pa
import polars as pl


class FrameValidationError(RuntimeError):
    """A failure that belongs to the whole frame, not to rows (e.g. a dataframe-level check without an index)."""


@dataclass
class Validated:
    valid: pl.DataFrame
    failures: dict[int, str]  # frame row position → reason


def validate(frame: pl.DataFrame, schema: pa.DataFrameSchema, pipeline: str) -> Validated:
    """Validate a DataFrame (never a LazyFrame: pandera would check only its schema) with lazy=True."""
    if frame.height == 0:
        return Validated(frame, {})
    try:
        schema.validate(frame, lazy=True)
        return Validated(frame, {})
    except pa_errors.SchemaErrors as exc:
        cases = exc.failure_cases
    frame_level = cases.filter(pl.col("index").is_null())
    if frame_level.height:
        first = frame_level.row(0, named=True)
        raise FrameValidationError(
            f"pipeline '{pipeline}': schema check '{first['check']}' on {first['column'] or 'the frame'} failed "
            f"for the whole batch ({first['failure_case']}); fix the schema or the producer")
    reasons = (
        cases.with_columns(
            pl.format("check failed: {} {} (value {})", pl.col("column").fill_null("frame"), pl.col("check"),
                      pl.col("failure_case").fill_null("null")).alias("reason"))
        .group_by("index", maintain_order=True)
        .agg(pl.col("reason").str.join("; "))
    )
    failures = dict(zip(reasons.get_column("index").to_list(), reasons.get_column("reason").to_list(), strict=True))
    bad_rows = pl.Series(list(failures), dtype=pl.Int64).implode()
    return Validated(frame.filter(~pl.int_range(pl.len(), dtype=pl.Int64).is_in(bad_rows)), failures)

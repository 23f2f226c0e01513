"""Pandera (polars backend) validation: split a decoded frame into valid rows and rows with reasons.

No message fails its batch here either. Row-level failures name their rows, and the rows left must then
pass on their own: a check that returns one boolean for a whole column is reported by pandera against
row 0, whatever row caused it. A failure with no row (a dataframe check, a check that raises on a value)
or a blame that does not hold up bisects the frame until the messages that fail alone are found; they go
to the quarantine with the check's name. A check over many rows (a sum, a uniqueness) therefore sees
smaller groups when something fails: a group that passes is kept.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pandera.errors as pa_errors
import pandera.polars as pa
import polars as pl

from ingest_defs.decode import CONTENT_ERRORS

MAX_VALIDATIONS = 256  # bisection budget per frame: beyond it, what is left failing is quarantined whole
VALUE_CHARS = 60  # a failing value is quoted in the reason up to this length


@dataclass
class Validated:
    valid: pl.DataFrame
    failures: dict[int, str]  # frame row position → reason


def validate(frame: pl.DataFrame, schema: pa.DataFrameSchema, pipeline: str) -> Validated:
    """Validate a DataFrame (never a LazyFrame: pandera would check only its schema) with lazy=True."""
    if frame.height == 0:
        return Validated(frame, {})
    failures: dict[int, str] = {}
    _validate_rows(frame, range(frame.height), schema, failures, [MAX_VALIDATIONS])
    if not failures:
        return Validated(frame, {})
    bad_rows = pl.Series(list(failures), dtype=pl.Int64).implode()
    return Validated(frame.filter(~pl.int_range(pl.len(), dtype=pl.Int64).is_in(bad_rows)), failures)


def _validate_rows(frame: pl.DataFrame, positions: Sequence[int], schema: pa.DataFrameSchema,
                   failures: dict[int, str], budget: list[int]) -> None:
    """Failures among `positions` of `frame`, each blamed on a message only once that blame holds up."""
    budget[0] -= 1
    blamed, frame_reason = _check(_rows_at(frame, positions), schema)
    if frame_reason is None and blamed:
        rest = [p for k, p in enumerate(positions) if k not in blamed]
        if rest and budget[0] > 0:
            budget[0] -= 1
            still, rest_reason = _check(_rows_at(frame, rest), schema)
            if still or rest_reason is not None:  # the blame does not hold: bisect
                frame_reason = rest_reason or next(iter(still.values()))
    if frame_reason is None:
        failures.update({positions[k]: reason for k, reason in blamed.items()})
        return
    if len(positions) == 1:
        failures[positions[0]] = "; ".join(dict.fromkeys([frame_reason, *blamed.values()]))
        return
    if budget[0] <= 0:
        for p in positions:
            failures[p] = f"{frame_reason} (for a group of {len(positions)} messages; not narrowed down further)"
        return
    half = len(positions) // 2
    _validate_rows(frame, positions[:half], schema, failures, budget)
    _validate_rows(frame, positions[half:], schema, failures, budget)


def _rows_at(frame: pl.DataFrame, positions: Sequence[int]) -> pl.DataFrame:
    """The rows at `positions` (ascending, distinct): the frame itself, not a copy, when that is all of them
    (the first check of every batch; a gathered copy was ~1.7× the batch's payload bytes at the peak)."""
    return frame if len(positions) == frame.height else frame[list(positions)]


def _check(frame: pl.DataFrame, schema: pa.DataFrameSchema) -> tuple[dict[int, str], str | None]:
    """(row position → reason, the frame-level reason or None). Never raises on the data."""
    try:
        schema.validate(frame, lazy=True)
        return {}, None
    except pa_errors.SchemaErrors as exc:
        cases = exc.failure_cases
    except CONTENT_ERRORS as exc:  # a check that breaks on these values is a failure of the data, named
        return {}, f"check failed: the schema's checks raised {type(exc).__name__} ({str(exc)[:120]})"
    frame_level = cases.filter(pl.col("index").is_null())
    frame_reason = None
    if frame_level.height:
        first = frame_level.row(0, named=True)
        value = _clip(first["failure_case"]) if first["failure_case"] is not None else "null"
        frame_reason = f"check failed: {first['column'] or 'frame'} {first['check']} (value {value})"
    value = pl.col("failure_case").cast(pl.String).fill_null("null")
    clipped = pl.when(value.str.len_chars() > VALUE_CHARS).then(
        value.str.slice(0, VALUE_CHARS - 3) + pl.lit("...")).otherwise(value)
    reasons = (
        cases.filter(pl.col("index").is_not_null())
        .with_columns(
            pl.format("check failed: {} {} (value {})", pl.col("column").fill_null("frame"), pl.col("check"),
                      clipped).alias("reason"))
        .group_by("index", maintain_order=True)
        .agg(pl.col("reason").str.join("; "))
    )
    rows = dict(zip(reasons.get_column("index").to_list(), reasons.get_column("reason").to_list(), strict=True))
    return rows, frame_reason


def _clip(value: object) -> str:
    text = str(value)
    return text if len(text) <= VALUE_CHARS else text[: VALUE_CHARS - 3] + "..."

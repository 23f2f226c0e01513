"""What Delta stores for each column type (real Delta tables, no broker)."""

from __future__ import annotations

from pathlib import Path

import polars as pl

from ingest_defs.sink import DeltaTableSink, storable, stored_dtype


def test_unsigned_integers_are_stored_one_size_wider_also_nested():
    assert stored_dtype(pl.UInt8()) == pl.Int16() and stored_dtype(pl.UInt16()) == pl.Int32()
    assert stored_dtype(pl.UInt32()) == pl.Int64() and stored_dtype(pl.UInt64()) == pl.Decimal(20, 0)
    nested = pl.Struct({"a": pl.UInt32(), "b": pl.List(pl.UInt64()), "c": pl.String()})
    assert stored_dtype(nested) == pl.Struct({"a": pl.Int64(), "b": pl.List(pl.Decimal(20, 0)), "c": pl.String()})
    assert stored_dtype(pl.Int32()) == pl.Int32() and stored_dtype(pl.Datetime("us", "UTC")) == pl.Datetime("us", "UTC")


def test_the_largest_unsigned_values_round_trip_through_a_delta_table(tmp_path: Path):
    frame = pl.DataFrame({"u8": [0, 255], "u16": [0, 65535], "u32": [0, 2**32 - 1], "u64": [0, 2**64 - 1]},
                         schema={"u8": pl.UInt8, "u16": pl.UInt16, "u32": pl.UInt32, "u64": pl.UInt64})
    sink = DeltaTableSink(str(tmp_path / "t"), "p", "target")
    sink.ensure_exists(frame, {"source": "test"})
    sink.append(frame, {"p/0": 1}, {})
    back = pl.read_delta(str(tmp_path / "t"))
    assert back.to_dicts() == frame.to_dicts()
    assert back.schema["u64"] == pl.Decimal(20, 0) and back.schema["u32"] == pl.Int64


def test_a_table_made_before_the_widening_keeps_its_type_and_quarantines_what_it_cannot_hold(tmp_path: Path):
    uri = str(tmp_path / "old")
    old = pl.DataFrame({"id": [1], "u32": [7]}, schema={"id": pl.Int64, "u32": pl.Int32})  # uint32 as it was stored
    sink = DeltaTableSink(uri, "p", "target")
    sink.ensure_exists(old, {"source": "test"})
    sink.append(old, {"p/0": 0}, {})
    incoming = pl.DataFrame({"id": [2, 3], "u32": [5, 3_000_000_000], "row": [0, 1]},
                            schema={"id": pl.Int64, "u32": pl.UInt32, "row": pl.Int64})
    failures = sink.unstorable_rows(incoming, "row")
    assert list(failures) == [1] and "u32=3000000000" in failures[1] and "new table" in failures[1]
    kept = incoming.filter(pl.col("row") == 0).drop("row")
    assert storable(kept, {"u32": "integer"}).schema["u32"] == pl.Int32
    sink.append(kept, {"p/0": 1}, {})
    assert sorted(pl.read_delta(uri)["u32"].to_list()) == [5, 7]

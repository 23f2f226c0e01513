"""Sample messages for a pipeline's schema (valid ones, and a chosen share of bad ones).

Used by `ingest produce`, the demo, the tests and the benchmarks. Bad messages cycle through the kinds the
quarantine must catch: invalid JSON, a wrong type, a failed check, non-UTF-8 bytes and an empty value.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pandera.polars as pa
import polars as pl

from ingest_defs.config import PipelineSpec

BAD_KINDS = ("bad_json", "wrong_type", "failed_check", "non_utf8", "empty")


@dataclass
class Samples:
    payloads: list[bytes] = field(default_factory=list)
    keys: list[bytes | None] = field(default_factory=list)
    bad: dict[int, str] = field(default_factory=dict)  # position → kind of badness


def make_samples(spec: PipelineSpec, count: int, bad_fraction: float = 0.0, seed: int | None = None,
                 start_id: int = 0, users: int = 0) -> Samples:
    """`users` > 0: the `id` field (a user id) comes from a pool of that many users, from `start_id` on, so
    per-user aggregates see several events, as in real traffic; 0: every message gets its own id
    (`start_id` + position), which tests use to compare produced and landed messages."""
    if spec.uses_registry:  # Avro, Protobuf, JSON Schema in the Confluent wire format
        from ingest_defs.formats.produce import make_registry_samples

        return make_registry_samples(spec, count, bad_fraction, seed, start_id)
    rng = random.Random(seed)
    schema = spec.pandera_schema
    key_column = _key_column(schema)
    out = Samples()
    bad_every = int(round(1 / bad_fraction)) if bad_fraction > 0 else 0
    kinds = [k for k in BAD_KINDS if k != "failed_check" or _has_checks(schema)]
    n_bad = 0
    for i in range(count):
        record = _record(schema, rng, start_id + (rng.randrange(users) if users else i))
        key = str(record[key_column]).encode() if key_column else None
        if bad_every and i % bad_every == bad_every - 1:
            kind = kinds[n_bad % len(kinds)]
            n_bad += 1
            out.payloads.append(_bad_payload(kind, record, schema))
            out.bad[i] = kind
        else:
            out.payloads.append(json.dumps(record, separators=(",", ":")).encode())
        out.keys.append(key)
    return out


def _key_column(schema: pa.DataFrameSchema) -> str | None:
    for name in schema.columns:
        if name == "id" or name.endswith("_id"):
            return name
    return None


def _has_checks(schema: pa.DataFrameSchema) -> bool:
    return any(col.checks for col in schema.columns.values())


def _record(schema: pa.DataFrameSchema, rng: random.Random, n: int) -> dict[str, Any]:
    return {name: _value(name, col, rng, n) for name, col in schema.columns.items()}


def _value(name: str, col: pa.Column, rng: random.Random, n: int) -> Any:
    dtype = col.dtype.type
    for check in col.checks:
        stats = check.statistics or {}
        if "allowed_values" in stats:
            return rng.choice(sorted(stats["allowed_values"], key=str))
    low, high = _bounds(col)
    if name == "id" and dtype.is_integer():
        return n  # the user id: unique per message, or drawn from a pool (make_samples' `users`)
    if name.endswith("_id") and dtype.is_integer():
        return rng.randint(max(int(low), 0), max(int(low), 0) + 9)
    if dtype.is_integer():
        return rng.randint(max(low, 0), min(high, 1000))
    if dtype.is_float():
        return round(rng.uniform(max(low, -40.0), min(high, 60.0)), 2)
    if dtype == pl.Boolean:
        return rng.random() < 0.5
    if isinstance(dtype, pl.Datetime):
        return datetime.now(UTC).isoformat()
    if dtype == pl.Date:
        return datetime.now(UTC).date().isoformat()
    if name.endswith("_id"):
        return f"{name[:-3]}-{rng.randint(1, 10)}"
    return rng.choice(["alpha", "beta", "gamma", "delta"])


def _bounds(col: pa.Column) -> tuple[float, float]:
    low, high = -1e9, 1e9
    for check in col.checks:
        stats = check.statistics or {}
        if "min_value" in stats:
            low = max(low, stats["min_value"])
        if "max_value" in stats:
            high = min(high, stats["max_value"])
    return low, high


def _bad_payload(kind: str, record: dict[str, Any], schema: pa.DataFrameSchema) -> bytes:
    if kind == "bad_json":
        return json.dumps(record).encode()[:-3] + b",,}"
    if kind == "non_utf8":
        return b'{"note": "\xff\xfe broken"}'
    if kind == "empty":
        return b""
    broken = dict(record)
    if kind == "wrong_type":
        for name, col in schema.columns.items():
            if col.dtype.type.is_numeric():
                broken[name] = "not-a-number"
                break
        else:
            broken[next(iter(schema.columns))] = {"nested": True}
        return json.dumps(broken).encode()
    # failed_check: break the first column that has a check
    for name, col in schema.columns.items():
        for check in col.checks:
            stats = check.statistics or {}
            if "allowed_values" in stats:
                broken[name] = "__not_allowed__" if col.dtype.type == pl.String else -999999
                return json.dumps(broken).encode()
            if "min_value" in stats:
                broken[name] = stats["min_value"] - 1
                return json.dumps(broken).encode()
            if "max_value" in stats:
                broken[name] = stats["max_value"] + 1
                return json.dumps(broken).encode()
    return json.dumps(broken).encode()

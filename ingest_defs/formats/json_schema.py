"""`format: json_schema` — Confluent JSON Schema bodies: JSON text after the 5-byte header, so they go
through the JSON fast path (decode.py: one `read_ndjson` with the reader schema's columns, and its
isolating fallback for bad messages).

Landing types: integer → Int64, number → Float64, boolean, string (format date → date, date-time →
timestamp UTC), object with properties → struct, array with items → list; a property not in `required`,
or typed ["T", "null"], is nullable. A message that lacks a property its (writer) schema requires is
quarantined. Local `$ref`s (#/definitions/..., #/$defs/...) are followed. Refused when the pipeline
loads: oneOf/anyOf/allOf (except "T or null"), objects without properties (free-form maps), references to
other registered schemas, several non-null types, recursive definitions.
"""

from __future__ import annotations

import datetime as dt
import json
import random
from typing import Any

import polars as pl

from ingest_defs.decode import ROW, Decoded, decode_payloads
from ingest_defs.formats.confluent import HEADER, Parsed, Unsupported
from ingest_defs.formats.registry import RegisteredSchema, Registry

SCALARS: dict[str, pl.DataType] = {"integer": pl.Int64(), "number": pl.Float64(), "boolean": pl.Boolean(),
                                   "string": pl.String()}
STRING_FORMATS: dict[str, pl.DataType] = {"date": pl.Date(), "date-time": pl.Datetime("us", "UTC")}


class JsonSchemaCodec:
    schema_type = "JSON"

    def parse(self, schema: RegisteredSchema, registry: Registry | None) -> Parsed:
        if schema.references:
            raise Unsupported("", "references to other registered schemas")
        root = json.loads(schema.text)
        walk = _Walk(root)
        root_type = walk.resolve(root, "")
        if _types(root_type) != ["object"] or "properties" not in root_type:
            raise Unsupported("", "the top-level schema is not an object with properties (each property becomes a column)")
        dtypes = {name: walk.dtype(prop, name) for name, prop in root_type["properties"].items()}
        return Parsed(schema.id, dtypes, record_name=root_type.get("title"),
                      required=tuple(root_type.get("required", [])), native=root_type)

    def decode(self, frames: pl.Series, writer: Parsed, reader: Parsed) -> tuple[pl.DataFrame, dict[int, str]]:
        bodies = frames.bin.slice(HEADER).to_list()
        decoded = _decode(bodies, reader.dtypes)  # JSON text is self-describing: read as the reader
        failures = dict(decoded.failures)
        rows = decoded.rows
        required = [name for name in writer.required if name in rows.columns]
        if required and rows.height:
            missing = rows.select(ROW, *[pl.col(name).is_null().alias(name) for name in required])
            bad = missing.filter(pl.any_horizontal(*required))
            for row in bad.iter_rows(named=True):
                names = [name for name in required if row[name]]
                failures[row[ROW]] = (f"missing required field(s) {', '.join(names)} (JSON Schema id "
                                      f"{writer.schema_id} requires them)")
            if bad.height:
                rows = rows.filter(~pl.col(ROW).is_in(bad.get_column(ROW).implode()))
        return rows, failures

    # ------------------------------------------------------------ producing
    def sample(self, parsed: Parsed, rng: random.Random, n: int) -> dict[str, Any]:
        walk = _Walk(parsed.native)
        return {name: _sample(walk.resolve(prop, name), walk, rng, n, name)
                for name, prop in parsed.native["properties"].items()}

    def encode(self, parsed: Parsed, record: dict[str, Any]) -> bytes:
        return json.dumps(record, separators=(",", ":")).encode()


def _decode(bodies: list[bytes], dtypes: dict[str, pl.DataType]) -> Decoded:
    """decode.py's JSON path. Top-level timestamps are read as text and parsed by one vectorized call
    (read_ndjson parses date-time text with an offset at ~15k values/s); if that parse fails, the batch is
    read again with the timestamp types, whose path isolates the bad messages."""
    stamps = [name for name, dtype in dtypes.items() if isinstance(dtype, pl.Datetime)]
    if not stamps:
        return decode_payloads(bodies, dtypes)
    decoded = decode_payloads(bodies, {**dtypes, **dict.fromkeys(stamps, pl.String())})
    try:
        rows = decoded.rows.with_columns(
            pl.col(name).str.to_datetime(time_unit="us", time_zone="UTC").cast(dtypes[name]) for name in stamps)
    except (pl.exceptions.PolarsError, ValueError):
        return decode_payloads(bodies, dtypes)
    return Decoded(rows=rows, failures=decoded.failures)


def _types(node: dict[str, Any]) -> list[str]:
    t = node.get("type")
    if t is None:
        return ["object"] if "properties" in node else []
    return [t] if isinstance(t, str) else list(t)


class _Walk:
    def __init__(self, root: dict[str, Any]):
        self.root = root
        self.stack: list[str] = []

    def resolve(self, node: dict[str, Any], path: str) -> dict[str, Any]:
        ref = node.get("$ref")
        if ref is None:
            return node
        if not ref.startswith("#/"):
            raise Unsupported(path, f"$ref {ref} (only local references, #/definitions/... or #/$defs/...)")
        if ref in self.stack:
            raise Unsupported(path, f"recursive $ref {ref} (a Delta column has a fixed depth)")
        target: Any = self.root
        for part in ref[2:].split("/"):
            if not isinstance(target, dict) or part not in target:
                raise Unsupported(path, f"$ref {ref} points nowhere")
            target = target[part]
        return {**target, "__ref": ref}

    def dtype(self, node: Any, path: str) -> pl.DataType:
        if not isinstance(node, dict):
            raise Unsupported(path, f"schema {node!r}")
        node = self.resolve(node, path)
        ref = node.get("__ref")
        if ref:
            self.stack.append(ref)
        try:
            return self._dtype(node, path)
        finally:
            if ref:
                self.stack.pop()

    def _dtype(self, node: dict[str, Any], path: str) -> pl.DataType:
        for combinator in ("oneOf", "anyOf"):
            if combinator in node:
                options = [o for o in node[combinator] if _types(self.resolve(o, path)) != ["null"]]
                if len(options) != 1:
                    raise Unsupported(path, f"{combinator} of several types (only \"T or null\" maps to one column)")
                return self.dtype(options[0], path)
        for keyword in ("allOf", "not", "if"):
            if keyword in node:
                raise Unsupported(path, f"{keyword} (a column needs one type)")
        types = [t for t in _types(node) if t != "null"]
        if len(types) != 1:
            raise Unsupported(path, "no type" if not types else f"several types {types} (only \"T or null\")")
        (kind,) = types
        if kind == "string" and node.get("format") in STRING_FORMATS:
            return STRING_FORMATS[node["format"]]
        if kind in SCALARS:
            return SCALARS[kind]
        if kind == "array":
            items = node.get("items")
            if not isinstance(items, dict):
                raise Unsupported(path, "array without one `items` schema")
            return pl.List(self.dtype(items, f"{path}[]"))
        if kind == "object":
            props = node.get("properties")
            if not props:
                raise Unsupported(path, "object without properties (a free-form map)")
            return pl.Struct({name: self.dtype(prop, f"{path}.{name}") for name, prop in props.items()})
        raise Unsupported(path, f"type {kind}")


def _sample(node: dict[str, Any], walk: _Walk, rng: random.Random, n: int, name: str) -> Any:
    for combinator in ("oneOf", "anyOf"):
        if combinator in node:
            options = [walk.resolve(o, name) for o in node[combinator]]
            node = next(o for o in options if _types(o) != ["null"])
    types = [t for t in _types(node) if t != "null"]
    kind = types[0] if types else "string"
    if "enum" in node:
        return rng.choice(node["enum"])
    if kind == "integer":
        return n if name == "id" else rng.randint(node.get("minimum", 0), min(node.get("maximum", 1000), 1000))
    if kind == "number":
        return round(rng.uniform(-40, 60), 2)
    if kind == "boolean":
        return rng.random() < 0.5
    if kind == "string":
        now = dt.datetime.now(dt.UTC)
        return {"date": now.date().isoformat(), "date-time": now.isoformat()}.get(node.get("format", ""),
                                                                                   rng.choice(["alpha", "beta", "gamma"]))
    if kind == "array":
        return [_sample(walk.resolve(node["items"], name), walk, rng, n, name) for _ in range(rng.randint(0, 3))]
    if kind == "object":
        return {k: _sample(walk.resolve(v, k), walk, rng, n, k) for k, v in node.get("properties", {}).items()}
    return None

"""Sample messages of a registry format for `ingest produce`, the demo and the benchmarks: records made
from the pipeline's `schema_file`, registered under the pipeline's reader subject when absent, encoded in
the Confluent wire format. Bad ones cycle through what the quarantine must catch: a wrong magic byte, an
unknown schema id, a corrupt body (Avro: truncated; Protobuf: a message index that does not exist; JSON
Schema: truncated JSON), and a failed check when declared columns have checks.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from ingest_defs.config import ConfigError, PipelineSpec
from ingest_defs.formats.confluent import SCHEMA_TYPES, Parsed, RegistryFormat, codec_for, frame_message
from ingest_defs.formats.registry import RegisteredSchema, registry_for
from ingest_defs.samples import Samples

UNKNOWN_ID = 0x7FFFFFF0  # a schema id no registry of the tests or the demo hands out
BODY_KINDS = {"avro": "truncated", "protobuf": "bad_index", "json_schema": "bad_json"}


def register_schema_file(spec: PipelineSpec) -> Parsed:
    """Register the pipeline's schema_file under its reader subject (no-op when there) and parse it."""
    if not spec.registry.schema_file:
        raise ConfigError(spec.name, "schema_registry.schema_file", "`ingest produce` needs the schema to encode "
                          "samples with", "set schema_registry.schema_file to the .avsc, .proto or .json file")
    text = Path(spec.registry.schema_file).read_text()
    schema_type = SCHEMA_TYPES[spec.format]
    codec = codec_for(spec.format, spec)
    fmt = RegistryFormat(spec)
    local = codec.parse(RegisteredSchema(0, schema_type, text), fmt.registry)
    subject = fmt._subject(local)
    if subject is None:
        raise ConfigError(spec.name, "schema_registry", "the schema has no record name for the subject strategy",
                          "name the record (Avro), message (Protobuf) or give the schema a title (JSON Schema)")
    registry = registry_for(spec.registry, spec.name)
    schema_id = registry.register(subject, text, schema_type)
    return codec.parse(RegisteredSchema(schema_id, schema_type, text), registry)


def make_registry_samples(spec: PipelineSpec, count: int, bad_fraction: float = 0.0, seed: int | None = None,
                          start_id: int = 0) -> Samples:
    rng = random.Random(seed)
    parsed = register_schema_file(spec)
    codec = codec_for(spec.format, spec)
    out = Samples()
    bad_every = int(round(1 / bad_fraction)) if bad_fraction > 0 else 0
    check = _first_check(spec)
    kinds = ["bad_magic", "unknown_id", BODY_KINDS[spec.format]] + (["failed_check"] if check else [])
    n_bad = 0
    for i in range(count):
        record = codec.sample(parsed, rng, start_id + i)
        key = str(record["id"]).encode() if "id" in record else None
        if bad_every and i % bad_every == bad_every - 1:
            kind = kinds[n_bad % len(kinds)]
            n_bad += 1
            out.payloads.append(_bad(kind, spec, codec, parsed, record, check))
            out.bad[i] = kind
        else:
            out.payloads.append(frame_message(parsed.schema_id, codec.encode(parsed, record)))
        out.keys.append(key)
    return out


def _first_check(spec: PipelineSpec) -> tuple[str, dict[str, Any]] | None:
    for name, col in spec.pandera_schema.columns.items():
        for check in col.checks:
            stats = check.statistics or {}
            if any(k in stats for k in ("min_value", "max_value", "allowed_values")):
                return name, stats
    return None


def _bad(kind: str, spec: PipelineSpec, codec: Any, parsed: Parsed, record: dict[str, Any],
         check: tuple[str, dict[str, Any]] | None) -> bytes:
    good = frame_message(parsed.schema_id, codec.encode(parsed, record))
    if kind == "bad_magic":
        return b"{" + good[1:]
    if kind == "unknown_id":
        return frame_message(UNKNOWN_ID, good[5:])
    if kind == "truncated":
        return good[: max(6, len(good) // 2)]
    if kind == "bad_index":
        return good[:5] + b"\x02\x0e" + good[6:]  # message index [7]: no such message
    if kind == "bad_json":
        return good[:-3] + b",,}"
    assert check is not None
    name, stats = check
    broken = dict(record)
    if "allowed_values" in stats:
        broken[name] = "__not_allowed__"
    elif "min_value" in stats:
        broken[name] = _below(record[name], stats["min_value"])
    else:
        broken[name] = _below(record[name], -stats["max_value"]) * -1
    return frame_message(parsed.schema_id, codec.encode(parsed, broken))


def _below(value: Any, minimum: Any) -> Any:
    """A value of `value`'s type below `minimum`."""
    from decimal import Decimal

    if isinstance(value, Decimal):
        return Decimal(minimum) - 1
    if isinstance(value, float):
        return float(minimum) - 1.0
    return int(minimum) - 1


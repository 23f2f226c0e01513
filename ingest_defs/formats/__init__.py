"""Payload formats: a batch of payload bytes → a Polars frame of payload columns (+ `ROW`) and the
messages that could not be decoded, with their reasons (quarantine). Formats never know the broker;
sources never know the format.

* `json` — JSON objects, columns declared in the pipeline's schema (json.py, over decode.py).
* `avro`, `protobuf`, `json_schema` — the Confluent wire format (magic byte 0, a 4-byte big-endian schema
  id, then the body), schemas from a registry (registry.py); the table's columns come from the registry
  schema: confluent.py does the framing, grouping by writer schema id and resolution to the subject's
  newest version; avro.py, protobuf.py and json_schema.py decode the bodies.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from ingest_defs.config import PipelineSpec
    from ingest_defs.decode import Decoded


class Format(Protocol):
    """Decodes one batch's payloads. Infrastructure trouble (a registry that cannot be asked) raises;
    anything wrong with a message is a failure at its position."""

    name: str

    def decode(self, payloads: Sequence[bytes]) -> Decoded: ...


def format_for(spec: PipelineSpec) -> Format:
    if spec.format == "json":
        from ingest_defs.formats.json import JsonFormat

        return JsonFormat(spec)
    from ingest_defs.formats.confluent import RegistryFormat

    return RegistryFormat(spec)


def check_spec(spec: PipelineSpec, file: Path | None) -> None:
    """Load-time checks of a registry pipeline (no registry call): see confluent.check_spec."""
    from ingest_defs.formats.confluent import check_spec as check

    check(spec, file)

"""`format: json` — JSON object payloads into the pipeline's declared columns (decode.py's fast path with
its isolating fallback)."""

from __future__ import annotations

from collections.abc import Sequence

import polars as pl

from ingest_defs.config import PipelineSpec
from ingest_defs.decode import Decoded, decode_payloads


class JsonFormat:
    name = "json"

    def __init__(self, spec: PipelineSpec):
        self.schema: dict[str, pl.DataType] = spec.payload_schema
        self.strict = spec.schema_.strict

    def decode(self, payloads: Sequence[bytes]) -> Decoded:
        return decode_payloads(payloads, self.schema, self.strict)

"""What every benchmark builds: the batch runner exactly as the ingestion asset does (ledger included)."""

from __future__ import annotations

from typing import Any

from ingest_defs.config import PipelineSpec
from ingest_defs.ledger import Ledger
from ingest_defs.lifecycle import BatchContext, BatchRunner
from ingest_defs.partitions import partition_key_at
from ingest_defs.sink import DeltaTableSink


def batch_runner(spec: PipelineSpec, source: Any) -> BatchRunner:
    return BatchRunner(spec, source, DeltaTableSink(spec.table_uri(), spec.name, "target"),
                       DeltaTableSink(spec.quarantine_uri(), spec.name, "quarantine"), BatchContext(trigger="bench"),
                       ledger=Ledger(spec.ledger_uri(), spec.name, partition_of=lambda when: partition_key_at(spec, when)))

"""What the benchmarks share: the messages (~150-byte JSON) and their schema, the batch runner exactly as
the ingestion asset builds it (ledger included), and publishing the messages in chunks, with progress."""

from __future__ import annotations

import json
from typing import Any

from rich.progress import Progress

from ingest_defs.config import PipelineSpec
from ingest_defs.ledger import Ledger
from ingest_defs.lifecycle import BatchContext, BatchRunner
from ingest_defs.partitions import partition_key_at
from ingest_defs.sink import DeltaTableSink

SCHEMA = {"columns": {
    "id": {"dtype": "int64", "nullable": False, "checks": {"ge": 0}},
    "event": {"dtype": "string", "checks": {"isin": ["user_activity", "click"]}},
    "value": {"dtype": "int64"},
    "page": {"dtype": "string"},
    "session": {"dtype": "string"},
}}


def payload(i: int) -> bytes:
    # ~150 bytes of JSON, like the messages
    return json.dumps({"id": i, "event": "click" if i % 3 else "user_activity", "value": i % 1000,
                       "page": f"/products/{i % 5000:05d}/details", "session": f"s-{i * 7919 % 10**12:012d}-abcdef"},
                      separators=(",", ":")).encode()


def batch_runner(spec: PipelineSpec, source: Any) -> BatchRunner:
    return BatchRunner(spec, source, DeltaTableSink.of(spec, "target"),
                       DeltaTableSink.of(spec, "quarantine"), BatchContext(trigger="bench"),
                       ledger=Ledger.of(spec, partition_of=lambda when: partition_key_at(spec, when)))


def publish_in_chunks(source: Any, label: str, messages: int, chunk: int = 10_000) -> None:
    """The benchmark's messages 0..messages-1 through `source.publish`, `chunk` at a time."""
    with Progress() as progress:
        task = progress.add_task(f"publishing {messages:,} to {label}", total=messages)
        for lo in range(0, messages, chunk):
            hi = min(messages, lo + chunk)
            source.publish([payload(i) for i in range(lo, hi)])
            progress.update(task, completed=hi)

"""Per-batch overhead over time: 1,000 small Kafka batches into one table, with and without maintenance.

Each batch is timed from opening the tables (as a fresh run does) through plan, the target and ledger
commits and the offset commit; producing its messages is not timed. "Maintenance on" runs the pipeline's maintenance (compact,
checkpoint, log cleanup, vacuum) every `every` batches, as the hourly schedule would over a day of
micro-batches; its own time is reported apart. delta-rs writes a checkpoint every 100 commits in both
modes (its default), so per-batch times are a sawtooth: the figure is the p95 of the last 100 batches.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from confluent_kafka import Producer
from rich.progress import Progress

from ingest_defs.bench.common import SCHEMA, batch_runner, payload
from ingest_defs.bench.kafka import BOOTSTRAP
from ingest_defs.config import parse_pipeline
from ingest_defs.maintenance import maintain_table
from ingest_defs.resources.brokers import source_for
from ingest_defs.sink import DeltaTableSink
from ingest_defs.storage import TABLE_ROLES, join, table_location


def _p(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def _one_mode(batches: int, per_batch: int, maintenance: bool, every: int, lake_uri: str | None = None) -> dict[str, Any]:
    ts = time.time_ns()
    lake = lake_uri or str(Path(tempfile.mkdtemp(prefix="bench-overhead-")))
    spec = parse_pipeline(f"bench_overhead_{'on' if maintenance else 'off'}", {
        "source": {"kafka": {"topic": f"bench_overhead_{ts}", "partitions": 1}}, "schema": SCHEMA,
        "table": join(lake, f"overhead_{ts}", "bronze"), "batch": {"max_messages": per_batch}})
    source = source_for(spec)
    source.ensure_exists()
    producer = Producer({"bootstrap.servers": BOOTSTRAP, "linger.ms": 0})
    times: list[float] = []
    stages: list[dict[str, float]] = []
    maintenance_s: list[float] = []
    label = f"maintenance {'on' if maintenance else 'off'}"
    with Progress() as progress:
        task = progress.add_task(f"{batches:,} batches of {per_batch}, {label}", total=batches)
        for i in range(batches):
            for j in range(per_batch):
                producer.produce(spec.source.kafka.topic, payload(i * per_batch + j))
            producer.flush(30)
            started = time.perf_counter()
            runner = batch_runner(spec, source)
            results = runner.run(max_batches=1)
            times.append(time.perf_counter() - started)
            # the rest of the batch's time: opening the tables, identity and ledger checks, the plan ("commit"
            # is part of "write"; the ledger row is written while the broker is acknowledged)
            stage = results[0].stage_s
            timed = sum(stage.get(k, 0.0) for k in ("read", "decode_validate", "write"))
            timed += max(stage.get("ack", 0.0), stage.get("ledger", 0.0))
            stages.append({**stage, "open_plan": times[-1] - timed})
            assert sum(r.rows_written for r in results) == per_batch, "a batch landed short"
            if maintenance and (i + 1) % every == 0:
                t0 = time.perf_counter()
                for role in TABLE_ROLES:  # as the job does
                    maintain_table(table_location(spec, role), spec.maintenance)
                maintenance_s.append(time.perf_counter() - t0)
            progress.advance(task)
    source.close()
    first, last = times[:100], times[-100:]
    files = len(DeltaTableSink.of(spec, "target").table().file_uris())
    last_stages = stages[-100:]
    return {
        "maintenance": maintenance,
        "batches": batches,
        "messages_per_batch": per_batch,
        "first100_median_ms": statistics.median(first) * 1000,
        "last100_median_ms": statistics.median(last) * 1000,
        "last100_p95_ms": _p(last, 0.95) * 1000,
        "median_ratio_last_over_first": statistics.median(last) / statistics.median(first),
        "files_at_end": files,
        "maintenance_pass_median_s": statistics.median(maintenance_s) if maintenance_s else None,
        # where a batch's time goes (last 100): open + plan, read, decode+validate, write (fence and commits),
        # then the ledger row and the ack side by side
        "last100_stage_median_ms": {k: round(statistics.median(s.get(k, 0.0) for s in last_stages) * 1000, 1)
                                    for k in ("open_plan", "read", "decode_validate", "write", "ledger", "ack")},
        "per_batch_ms": [round(t * 1000, 2) for t in times],
    }


def bench_overhead(batches: int = 1000, per_batch: int = 20, every: int = 100,
                   lake_uri: str | None = None, modes: tuple[bool, ...] = (True, False)) -> list[dict[str, Any]]:
    return [{**_one_mode(batches, per_batch, maintenance, every, lake_uri), "storage": "s3" if lake_uri else "local"}
            for maintenance in modes]

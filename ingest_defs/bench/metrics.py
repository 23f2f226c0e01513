"""What one Prometheus scrape of `ingest metrics serve` costs, with several pipelines.

Pipelines: Kafka topics of 3 partitions and NATS limits streams, each with `batches` small committed
batches (so each ledger has that many files and each target that many commits). Measured in one exporter
process, as Prometheus would see it (the full /metrics text, `generate_latest`):

* **cold**: the first scrape — broker connections, opening the tables, reading every ledger file;
* **steady**: nothing changed since the last scrape (the common case at a 15 s interval): wall time and CPU
  time (all threads) per scrape, median and p95;
* **one new batch per pipeline**: each ledger has one new file, each target one new commit;
* **after ledger compaction**: maintenance rewrote every ledger into one file (read once).
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from prometheus_client import generate_latest
from rich.progress import Progress

from ingest_defs.bench.common import SCHEMA, batch_runner, payload
from ingest_defs.bench.nats import _delete_streams
from ingest_defs.config import PipelineSpec, parse_pipeline
from ingest_defs.metrics import IngestCollector, registry_for
from ingest_defs.resources.brokers import source_for
from ingest_defs.storage import location


def _specs(kafka: int, nats: int, per_batch: int, lake: Path) -> list[PipelineSpec]:
    ts = time.time_ns()
    specs = [parse_pipeline(f"bench_metrics_k{i}", {
        "source": {"kafka": {"topic": f"bench_metrics_{ts}_{i}", "partitions": 3}}, "schema": SCHEMA,
        "table": str(lake / f"k{i}"), "batch": {"max_messages": per_batch}}) for i in range(kafka)]
    specs += [parse_pipeline(f"bench_metrics_n{i}", {
        "source": {"nats": {"stream": f"BENCH_METRICS_{ts}_{i}", "subject": f"bench.metrics.{ts}.{i}.*",
                            "retention": "limits"}},
        "schema": SCHEMA, "table": str(lake / f"n{i}"), "batch": {"max_messages": per_batch}}) for i in range(nats)]
    return specs


def _ingest(spec: PipelineSpec, messages: int, batches: int) -> None:
    source = source_for(spec)
    try:
        source.ensure_exists()
        source.publish([payload(i) for i in range(messages)])
        batch_runner(spec, source).run(max_batches=batches)
    finally:
        source.close()


def _scrape(registry: Any) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    generate_latest(registry)
    return time.perf_counter() - wall, time.process_time() - cpu


def _ms(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {"median_ms": statistics.median(ordered) * 1000,
            "p95_ms": ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))] * 1000}


def bench_metrics(kafka: int = 6, nats: int = 2, batches: int = 100, scrapes: int = 20) -> list[dict[str, Any]]:
    lake = Path(tempfile.mkdtemp(prefix="bench-metrics-"))
    per_batch = 30
    specs = _specs(kafka, nats, per_batch, lake)
    with Progress() as progress:
        task = progress.add_task(f"{len(specs)} pipelines × {batches} batches", total=len(specs))
        for spec in specs:
            _ingest(spec, per_batch * batches, batches)
            progress.advance(task)
    collector = IngestCollector(specs, timeout=60)
    registry = registry_for(collector, process_metrics=False)
    rows: list[dict[str, Any]] = []

    def record(phase: str, samples: list[tuple[float, float]]) -> None:
        wall, cpu = _ms([w for w, _ in samples]), _ms([c for _, c in samples])
        rows.append({"phase": phase, "pipelines": len(specs), "ledger_files": batches, "scrapes": len(samples),
                     "wall_median_ms": wall["median_ms"], "wall_p95_ms": wall["p95_ms"],
                     "cpu_median_ms": cpu["median_ms"], "cpu_p95_ms": cpu["p95_ms"],
                     "pipelines_up": sum(1 for snap in collector.last_snapshots if not snap.errors)})

    try:
        record("cold (connect, read every ledger file)", [_scrape(registry)])
        record("steady (nothing new)", [_scrape(registry) for _ in range(scrapes)])
        for spec in specs:  # one more batch each
            _ingest_more(spec, per_batch)
        record("one new batch per pipeline", [_scrape(registry)])
        for spec in specs:
            location(spec.ledger_uri()).open().optimize.compact()
        record("after compacting every ledger", [_scrape(registry)])
    finally:
        collector.close()
        asyncio.run(_delete_streams(*(spec.source.nats.stream for spec in specs if spec.source.nats)))
    return rows


def _ingest_more(spec: PipelineSpec, messages: int) -> None:
    source = source_for(spec)
    try:
        source.publish([payload(i) for i in range(messages)])
        batch_runner(spec, source).run(max_batches=1)
    finally:
        source.close()

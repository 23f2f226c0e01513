"""Memory: peak RSS above the idle baseline of a process draining a 1M and a 5M Kafka backlog.

The drain runs in a child process (`python -m ingest_defs.bench.memory <topic> <table> <batch>`), so
each figure is one process's own high-water mark (VmHWM) against its RSS once imports, the broker
connection and the table checks are done. Bounded ranges mean both backlogs give the same peak.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ingest_defs.bench.common import SCHEMA, batch_runner
from ingest_defs.bench.kafka import _produce
from ingest_defs.config import REPO_ROOT, parse_pipeline


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _spec(topic: str, table: str, batch: int) -> Any:
    return parse_pipeline("bench_memory", {
        "source": {"kafka": {"topic": topic, "partitions": 1}}, "schema": SCHEMA, "table": table,
        "batch": {"max_messages": batch, "max_run_seconds": 3600}})


def drain(topic: str, table: str, batch: int) -> dict[str, Any]:
    """In the child: drain the whole backlog in one catch-up run and report memory."""
    from ingest_defs.resources.brokers import source_for

    spec = _spec(topic, table, batch)
    source = source_for(spec)
    runner = batch_runner(spec, source)
    runner.identity()
    runner.plan()  # connection, metadata and table checks done: this is the idle baseline
    baseline_kb = _status_kb("VmRSS")
    started = time.perf_counter()
    results = runner.run()
    seconds = time.perf_counter() - started
    messages = sum(r.messages for r in results)
    nbytes = sum(r.nbytes for r in results)
    return {"baseline_mb": baseline_kb / 1024, "peak_mb": _status_kb("VmHWM") / 1024, "messages": messages,
            "batches": len(results), "payload_bytes_per_batch_mb": nbytes / max(1, len(results)) / 2**20,
            "seconds": seconds}


def bench_memory(backlogs: tuple[int, ...] = (1_000_000, 5_000_000), batch: int = 100_000) -> list[dict[str, Any]]:
    rows = []
    for backlog in backlogs:
        topic = f"bench_memory_{backlog}_{time.time_ns()}"
        _produce(topic, backlog, 1)
        table = str(Path(tempfile.mkdtemp(prefix="bench-memory-")) / "bronze")
        proc = subprocess.run([sys.executable, "-m", "ingest_defs.bench.memory", topic, table, str(batch)],
                              cwd=REPO_ROOT, env=os.environ, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"memory drain of {backlog:,} failed:\n{proc.stdout}{proc.stderr}")
        figures = json.loads(proc.stdout.strip().splitlines()[-1])
        assert figures["messages"] == backlog, f"drained {figures['messages']} of {backlog}"
        above = figures["peak_mb"] - figures["baseline_mb"]
        rows.append({"backlog": backlog, "batch": batch, **figures, "above_baseline_mb": above,
                     "above_baseline_over_batch_bytes": above / figures["payload_bytes_per_batch_mb"],
                     "mb_per_100k_batch": above / (batch / 100_000)})
    return rows


if __name__ == "__main__":
    print(json.dumps(drain(sys.argv[1], sys.argv[2], int(sys.argv[3]))))

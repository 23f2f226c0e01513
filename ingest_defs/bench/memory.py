"""Memory: peak RSS above the idle baseline of a process draining a backlog, per broker.

Kafka and NATS (Limits stream) drain a 1M and a 5M backlog; MQTT (a persistent QoS 1 session, whose
queue Mosquitto holds in memory) 200k and 1M, at batch 100k (MQTT 50k: at most 65,535 in flight). The drain runs in a child process
(`python -m ingest_defs.bench.memory <pipeline json>`), so each figure is one process's own high-water mark
(VmHWM) against its RSS once imports, the broker connection and the table checks are done. Bounded
batches mean the backlog's size should not change the peak: both sizes are measured to show it.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from ingest_defs.bench.common import SCHEMA, batch_runner, publish_in_chunks
from ingest_defs.bench.kafka import _produce
from ingest_defs.config import REPO_ROOT, parse_pipeline

BACKLOGS = {"kafka": (1_000_000, 5_000_000), "nats": (1_000_000, 5_000_000), "mqtt": (200_000, 1_000_000)}
BATCHES = {"kafka": 100_000, "nats": 100_000, "mqtt": 50_000}  # MQTT: at most 65,535 messages in flight


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _pipeline(broker: str, backlog: int, batch: int) -> dict[str, Any]:
    """The drained pipeline's settings (a fresh topic, stream or session and table each time)."""
    ts = time.time_ns()
    table = str(Path(tempfile.mkdtemp(prefix="bench-memory-")) / "bronze")
    source: dict[str, Any] = {
        "kafka": {"kafka": {"topic": f"bench_memory_{backlog}_{ts}", "partitions": 1}},
        "nats": {"nats": {"stream": f"BENCHMEM_{ts}", "subject": f"benchmem_{ts}.*"}},
        "mqtt": {"mqtt": {"topics": [f"benchmem_{ts}/+"], "client_id": f"bench-memory-{ts}",
                          "session_expiry_seconds": 3600}},
    }[broker]
    batch_settings: dict[str, Any] = {"max_messages": batch, "max_run_seconds": 3600}
    if broker == "mqtt":
        batch_settings["idle_ms"] = 300
    return {"source": source, "schema": SCHEMA, "table": table, "batch": batch_settings}


class _AnonymousPeak:
    """The process's private (anonymous) memory at its highest, sampled every 5 ms on a thread: VmHWM counts
    the shared libraries' code pages too, which a process maps in as it first runs them (polars' JSON
    reader, delta-rs's writer: ~65 MB once per process, clean and shared, given back under pressure)."""

    def __init__(self) -> None:
        self.peak_kb = _status_kb("RssAnon")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak_kb = max(self.peak_kb, _status_kb("RssAnon"))

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak_kb


def drain(settings: dict[str, Any]) -> dict[str, Any]:
    """In the child: drain the whole backlog in one catch-up run and report memory."""
    from ingest_defs.resources.brokers import source_for

    spec = parse_pipeline("bench_memory", settings)
    source = source_for(spec)
    runner = batch_runner(spec, source)
    runner.identity()
    runner.plan()  # connection, metadata and table checks done: this is the idle baseline
    baseline_kb, anon_baseline_kb, file_baseline_kb = (_status_kb(f) for f in ("VmRSS", "RssAnon", "RssFile"))
    anon = _AnonymousPeak()
    started = time.perf_counter()
    results = runner.run()
    seconds = time.perf_counter() - started
    anon_peak_kb = anon.stop()
    source.close()
    with_data = [r for r in results if r.messages]
    return {"baseline_mb": baseline_kb / 1024, "peak_mb": _status_kb("VmHWM") / 1024,
            "anon_above_baseline_mb": (anon_peak_kb - anon_baseline_kb) / 1024,
            "code_pages_mapped_mb": (_status_kb("RssFile") - file_baseline_kb) / 1024,
            "messages": sum(r.rows_written + r.rows_quarantined for r in results), "batches": len(with_data),
            "payload_bytes_per_batch_mb": max(r.nbytes for r in with_data) / 2**20, "seconds": seconds}


def _fill(broker: str, settings: dict[str, Any], backlog: int) -> None:
    """Put the backlog on the broker."""
    from ingest_defs.resources.brokers import source_for

    if broker == "kafka":
        _produce(settings["source"]["kafka"]["topic"], backlog, 1)
        return
    source = source_for(parse_pipeline("bench_memory", settings))
    source.ensure_exists()  # a stream, or the MQTT session that queues what follows
    publish_in_chunks(source, broker, backlog)
    source.close()


def _clean_up(broker: str, settings: dict[str, Any]) -> None:
    if broker == "nats":
        from ingest_defs.bench.nats import _delete_streams

        asyncio.run(_delete_streams(settings["source"]["nats"]["stream"]))
    elif broker == "mqtt":
        from ingest_defs.bench.mqtt import _BareSession
        from ingest_defs.resources.brokers import source_for

        source = source_for(parse_pipeline("bench_memory", settings))
        mqtt = settings["source"]["mqtt"]
        _BareSession(source.host, source.port, mqtt["client_id"], mqtt["topics"][0]).delete()


def bench_memory(brokers: tuple[str, ...] = ("kafka", "nats", "mqtt"), scale: int = 1) -> list[dict[str, Any]]:
    """Per broker, first a small drain (20k at batch 2k): what the first batch costs whatever its size (the
    Polars and delta-rs thread pools, Parquet writer, Arrow buffers, the allocators' arenas); then the real
    backlogs, reported above the baseline and above that fixed cost."""
    rows = []
    for broker in brokers:
        fixed = None
        for backlog, batch in [(20_000, 2_000)] + [(b // scale, BATCHES[broker] // scale) for b in BACKLOGS[broker]]:
            settings = _pipeline(broker, backlog, batch)
            try:
                _fill(broker, settings, backlog)
                proc = subprocess.run([sys.executable, "-m", "ingest_defs.bench.memory", json.dumps(settings)],
                                      cwd=REPO_ROOT, env=os.environ, capture_output=True, text=True)
            finally:
                _clean_up(broker, settings)
            if proc.returncode != 0:
                raise RuntimeError(f"memory drain of {backlog:,} from {broker} failed:\n{proc.stdout}{proc.stderr}")
            figures = json.loads(proc.stdout.strip().splitlines()[-1])
            assert figures["messages"] == backlog, f"{broker}: drained {figures['messages']} of {backlog}"
            above = figures["peak_mb"] - figures["baseline_mb"]
            if fixed is None:
                fixed, anon_fixed = above, figures["anon_above_baseline_mb"]
            rows.append({"broker": broker, "backlog": backlog, "batch": batch, **figures,
                         "above_baseline_mb": above,
                         "above_baseline_over_batch_bytes": above / figures["payload_bytes_per_batch_mb"],
                         "anon_over_batch_bytes": figures["anon_above_baseline_mb"] / figures["payload_bytes_per_batch_mb"],
                         "anon_first_batch_fixed_mb": anon_fixed,
                         "first_batch_fixed_mb": fixed,
                         "above_fixed_over_batch_bytes": max(0.0, above - fixed) / figures["payload_bytes_per_batch_mb"]})
    return rows


if __name__ == "__main__":
    sys.modules.setdefault("hypothesis", None)  # as the `ingest` command (ingest_defs/__main__.py)
    print(json.dumps(drain(json.loads(sys.argv[1]))))

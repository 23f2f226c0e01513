"""Memory: peak RSS above the idle baseline of a process draining a backlog, per broker.

Kafka and NATS (Limits stream) drain a 1M and a 5M backlog; MQTT (a persistent QoS 1 session, whose
queue Mosquitto holds in memory) 200k and 1M, at batch 100k (MQTT 50k: at most 65,535 in flight). The drain runs in a child process
(`python -m ingest_defs.bench.memory <pipeline json>`), so each figure is one process's own high-water mark
(VmHWM) against its RSS once imports, the broker connection and the table checks are done. Bounded
batches mean the backlog's size should not change the peak: both sizes are measured to show it.
"""

from __future__ import annotations

import asyncio
import contextlib
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
    reader, delta-rs's writer: ~65 MB once per process, clean and shared, given back under pressure).

    `watch` also keeps the highest sample taken while a stage ran (a method of the batch path: read, decode
    + validate, the Delta commits, the ledger, the ack), which says where the peak is. Stages overlap where
    the batch path overlaps them (a read-ahead read runs while the previous batch is written)."""

    def __init__(self) -> None:
        self.peak_kb = _status_kb("RssAnon")
        self.stage_peaks_kb: dict[str, int] = {}
        self._running: dict[str, int] = {}  # stage -> calls in progress (stages may run on two threads)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _take_sample(self) -> None:
        kb = _status_kb("RssAnon")
        with self._lock:
            self.peak_kb = max(self.peak_kb, kb)
            for stage, calls in self._running.items():
                if calls:
                    self.stage_peaks_kb[stage] = max(self.stage_peaks_kb.get(stage, 0), kb)

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self._take_sample()

    def watch(self, owner: Any, method: str, stage: str) -> None:
        """Count the samples taken while `owner.method` runs towards `stage` (one sample at its start and end too)."""
        call = getattr(owner, method)

        def watched(*args: Any, **kwargs: Any) -> Any:
            with self._lock:
                self._running[stage] = self._running.get(stage, 0) + 1
            self._take_sample()
            try:
                return call(*args, **kwargs)
            finally:
                self._take_sample()
                with self._lock:
                    self._running[stage] -= 1

        setattr(owner, method, watched)

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
    modules_at_baseline = set(sys.modules)
    anon = _AnonymousPeak()
    for owner, method, stage in [(source, "read", "read"), (runner, "_rows", "decode + validate"),
                                 (runner.target, "append", "delta commits"), (runner.quarantine, "append", "delta commits"),
                                 (runner.ledger, "append", "ledger"), (source, "acknowledge", "ack")]:
        anon.watch(owner, method, stage)
    started = time.perf_counter()
    results = runner.run()
    seconds = time.perf_counter() - started
    anon_peak_kb = anon.stop()
    source.close()
    with_data = [r for r in results if r.messages]
    return {"baseline_mb": baseline_kb / 1024, "peak_mb": _status_kb("VmHWM") / 1024,
            "anon_above_baseline_mb": (anon_peak_kb - anon_baseline_kb) / 1024,
            "anon_stage_peaks_mb": {stage: (kb - anon_baseline_kb) / 1024 for stage, kb in anon.stage_peaks_kb.items()},
            "code_pages_mapped_mb": (_status_kb("RssFile") - file_baseline_kb) / 1024,
            # code the first batch imports (pandera's polars backend, numpy.ma, ...): see `import_cost`
            "modules_first_imported": sorted(set(sys.modules) - modules_at_baseline),
            "messages": sum(r.rows_written + r.rows_quarantined for r in results), "batches": len(with_data),
            "payload_bytes_per_batch_mb": max(r.nbytes for r in with_data) / 2**20, "seconds": seconds}


def import_cost(broker: str, modules: list[str]) -> dict[str, Any]:
    """In the child: the private memory that importing `modules` adds to a process that has imported what a
    drain of `broker` has at its baseline. The modules a drain's first batch imports are code loaded once per
    process, not memory of the batch: this tells how much of the first-batch ("fixed") cost they are."""
    import importlib

    importlib.import_module(f"ingest_defs.sources.{broker}")  # as `source_for` in `drain` before its baseline
    before = _status_kb("RssAnon")
    for name in modules:
        with contextlib.suppress(Exception):  # a module that imports only as part of its parent
            importlib.import_module(name)
    return {"imports_mb": (_status_kb("RssAnon") - before) / 1024}


def library_floor(batch: int, batches: int = 4) -> dict[str, Any]:
    """In the child: what the libraries alone cost to take batches of `batch` messages into a Delta table, as a
    bare pipeline would: the payloads held as a client hands them over (a `bytes` each), polars' JSON reader
    into the schema's columns, the raw payload and offset columns, `write_deltalake` (append). None of the
    product's standard columns, validation, quarantine, ledger or read-ahead: the floor under its figures."""
    import polars as pl
    from deltalake import write_deltalake

    from ingest_defs.bench.common import payload
    from ingest_defs.config import DTYPES

    schema = {name: DTYPES[column["dtype"]] for name, column in SCHEMA["columns"].items()}
    table = str(Path(tempfile.mkdtemp(prefix="bench-memory-floor-")) / "bronze")
    write_deltalake(table, pl.DataFrame(schema=schema).with_columns(
        pl.lit(None, pl.Binary).alias("_raw"), pl.lit(None, pl.Int64).alias("_offset")).to_arrow(), mode="error")
    baseline_kb, anon_baseline_kb, file_baseline_kb = (_status_kb(f) for f in ("VmRSS", "RssAnon", "RssFile"))
    anon = _AnonymousPeak()
    nbytes = 0
    for b in range(batches):
        payloads = [payload(b * batch + i) for i in range(batch)]
        nbytes = max(nbytes, sum(map(len, payloads)))
        frame = pl.read_ndjson(b"\n".join(payloads), schema=schema).with_columns(
            pl.Series("_raw", payloads, dtype=pl.Binary), pl.int_range(b * batch, (b + 1) * batch).alias("_offset"))
        write_deltalake(table, frame.to_arrow(compat_level=pl.CompatLevel.newest()), mode="append")
        del payloads, frame
    return {"anon_above_baseline_mb": (anon.stop() - anon_baseline_kb) / 1024,
            # as a drain's whole peak: VmHWM above the RSS at the baseline, code pages mapped in since included
            "above_baseline_mb": (_status_kb("VmHWM") - baseline_kb) / 1024,
            "code_pages_mapped_mb": (_status_kb("RssFile") - file_baseline_kb) / 1024,
            "payload_bytes_per_batch_mb": nbytes / 2**20, "table": table}


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
    floors: dict[int, dict[str, Any]] = {}  # batch size -> the library floor at that size (measured once)
    for broker in brokers:
        fixed = None
        for backlog, batch in [(20_000, 2_000)] + [(b // scale, BATCHES[broker] // scale) for b in BACKLOGS[broker]]:
            settings = _pipeline(broker, backlog, batch)
            try:
                _fill(broker, settings, backlog)
                figures = _child(f"memory drain of {backlog:,} from {broker}", json.dumps(settings))
            finally:
                _clean_up(broker, settings)
            assert figures["messages"] == backlog, f"{broker}: drained {figures['messages']} of {backlog}"
            above = figures["peak_mb"] - figures["baseline_mb"]
            if fixed is None:
                fixed, anon_fixed = above, figures["anon_above_baseline_mb"]
                imports = _child(f"import cost for {broker}", "--imports", broker,
                                 json.dumps(figures["modules_first_imported"]))["imports_mb"]
            if batch not in floors:
                floors[batch] = _child(f"library floor at batch {batch:,}", "--floor", str(batch))
            floor = floors[batch]
            rows.append({"broker": broker, "backlog": backlog, "batch": batch, **figures,
                         "first_batch_imports_mb": imports,
                         "library_floor_mb": floor["anon_above_baseline_mb"],
                         "library_floor_over_batch_bytes": floor["anon_above_baseline_mb"] / floor["payload_bytes_per_batch_mb"],
                         "anon_over_library_floor": figures["anon_above_baseline_mb"] / floor["anon_above_baseline_mb"],
                         "library_floor_whole_mb": floor["above_baseline_mb"],
                         "library_floor_whole_over_batch_bytes": floor["above_baseline_mb"] / floor["payload_bytes_per_batch_mb"],
                         "above_baseline_mb": above,
                         "above_baseline_over_batch_bytes": above / figures["payload_bytes_per_batch_mb"],
                         "anon_over_batch_bytes": figures["anon_above_baseline_mb"] / figures["payload_bytes_per_batch_mb"],
                         "anon_first_batch_fixed_mb": anon_fixed,
                         "first_batch_fixed_mb": fixed,
                         "above_fixed_over_batch_bytes": max(0.0, above - fixed) / figures["payload_bytes_per_batch_mb"]})
    return rows


def _child(what: str, *args: str) -> dict[str, Any]:
    """Run this module in a fresh process with `args` (a drain, `--imports` or `--floor`); its last output line
    (JSON). `what` names it in the error if it fails."""
    proc = subprocess.run([sys.executable, "-m", "ingest_defs.bench.memory", *args], cwd=REPO_ROOT, env=os.environ,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed:\n{proc.stdout}{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    sys.modules.setdefault("hypothesis", None)  # as the `ingest` command (ingest_defs/__main__.py)
    if sys.argv[1] == "--floor":
        print(json.dumps(library_floor(int(sys.argv[2]))))
    elif sys.argv[1] == "--imports":
        print(json.dumps(import_cost(sys.argv[2], json.loads(sys.argv[3]))))
    else:
        print(json.dumps(drain(json.loads(sys.argv[1]))))

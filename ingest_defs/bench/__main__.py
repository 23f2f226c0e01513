"""`make bench`: `python -m ingest_defs.bench [section ...] [--quick]`.

Sections (default: all): throughput (Kafka 1M at 1 and 4 partitions, NATS 500k, MQTT 200k, each against
the bare client in the same run), overhead (1,000 small batches, maintenance on and off), memory (1M
and 5M backlogs), freshness (daemon + 5 s sensors, one pipeline, then four together), shards (a 2M backlog
over 12 partitions drained by 1, 2 and 4 shards as concurrent runs; `--quick`: 100k). The figures go
to `<lake>/_bench/results.json` and a chart to `<lake>/_bench/results.png`; how each is defined is in
the README's performance section. `--quick` runs every section at a tenth of the size (a smoke run).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from ingest_defs.bench.chart import draw
from ingest_defs.config import lake_root

console = Console(width=max(Console().width, 150))  # wide tables even when the output goes to a file


SECTIONS = ["throughput", "overhead", "memory", "freshness", "shards"]
TARGETS = {"kafka": 0.7, "nats": 0.8, "mqtt": 0.9}  # ratio A targets (facts.md)


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def throughput(quick: bool) -> list[dict[str, Any]]:
    from ingest_defs.bench.kafka import bench_kafka
    from ingest_defs.bench.mqtt import bench_mqtt
    from ingest_defs.bench.nats import bench_nats

    scale = 10 if quick else 1
    rows = [bench_kafka(1_000_000 // scale, partitions, 100_000 // scale) for partitions in (1, 4)]
    rows += bench_nats(500_000 // scale, 100_000 // scale)
    rows.append(bench_mqtt(200_000 // scale, 50_000 // scale))
    table = Table("throughput", "messages", "bare msg/s", "batch path msg/s", "ratio A", "target",
                  "Dagster runs msg/s", "ratio B", title="Throughput (A: in-run; B: backlog drained by `ingest run`)")
    for r in rows:
        target = next((t for k, t in TARGETS.items() if r["name"].startswith(k)), None)
        table.add_row(r["name"], f"{r['messages']:,}", f"{r['bare_rate']:,.0f}", f"{r['path_rate']:,.0f}",
                      f"{r['ratio']:.2f}", _fmt(target, ".1f"), _fmt(r.get("dagster_rate"), ",.0f"),
                      _fmt(r.get("ratio_b"), ".2f"))
    console.print(table)
    return rows


def overhead(quick: bool) -> list[dict[str, Any]]:
    from ingest_defs.bench.overhead import bench_overhead

    rows = bench_overhead(batches=200 if quick else 1000, per_batch=20, every=20 if quick else 100)
    table = Table("maintenance", "batches", "first 100 median ms", "last 100 median ms", "last 100 p95 ms",
                  "last/first", "files at end", "maintenance pass s",
                  title="Per-batch overhead (open + plan + commits + ack; target p95 ≤ 150 ms)")
    for r in rows:
        table.add_row("on" if r["maintenance"] else "off", f"{r['batches']:,}", f"{r['first100_median_ms']:.1f}",
                      f"{r['last100_median_ms']:.1f}", f"{r['last100_p95_ms']:.1f}",
                      f"{r['median_ratio_last_over_first']:.2f}", str(r["files_at_end"]),
                      _fmt(r["maintenance_pass_median_s"], ".2f"))
    console.print(table)
    return rows


def memory(quick: bool) -> list[dict[str, Any]]:
    from ingest_defs.bench.memory import bench_memory

    backlogs = (100_000, 500_000) if quick else (1_000_000, 5_000_000)
    rows = bench_memory(backlogs, batch=100_000)
    table = Table("backlog", "batches", "baseline MB", "peak MB", "above baseline MB", "batch payload MB",
                  "× batch bytes", title="Memory of a drain (batch 100k; target ≤ 3× the batch's bytes)")
    for r in rows:
        table.add_row(f"{r['backlog']:,}", str(r["batches"]), f"{r['baseline_mb']:.0f}", f"{r['peak_mb']:.0f}",
                      f"{r['above_baseline_mb']:.0f}", f"{r['payload_bytes_per_batch_mb']:.1f}",
                      f"{r['above_baseline_over_batch_bytes']:.1f}")
    console.print(table)
    if len(rows) == 2:
        growth = rows[1]["peak_mb"] / rows[0]["peak_mb"] - 1
        console.print(f"peak RSS, {rows[1]['backlog']:,} vs {rows[0]['backlog']:,} backlog: {growth:+.1%}")
    return rows


def freshness(quick: bool) -> list[dict[str, Any]]:
    from ingest_defs.bench.freshness import bench_freshness

    seconds = 30 if quick else 150
    rows = bench_freshness(["kafka"], seconds=seconds)
    rows += bench_freshness(["kafka", "nats", "nats_workqueue", "mqtt"], seconds=seconds)
    rows += bench_freshness(["kafka"], seconds=seconds, linger=30)  # what batch.linger_seconds buys
    table = Table("pipeline", "together", "linger s", "published", "landed", "p50 s", "p95 s", "max s", "runs",
                  "queue+start s", "run s", title="Freshness: publish → visible in Delta (5 s sensors; target p95 ≤ 15 s)")
    for r in rows:
        table.add_row(r["pipeline"], str(r["pipelines_together"]), f"{r['linger_s']:g}", f"{r['published']:,}", f"{r['landed']:,}",
                      _fmt(r["p50_s"], ".1f"), _fmt(r["p95_s"], ".1f"), _fmt(r["max_s"], ".1f"), str(r["runs"]),
                      _fmt(r["run_queue_and_start_s_median"], ".1f"), _fmt(r["run_duration_s_median"], ".1f"))
    console.print(table)
    return rows


def shards(quick: bool) -> list[dict[str, Any]]:
    from ingest_defs.bench.shards import bench_shards

    rows = bench_shards(100_000 if quick else 2_000_000, batch=10_000 if quick else 100_000)
    table = Table("shards", "messages", "wall s", "msg/s", "speed-up", "in-run msg/s", "CPU s per process",
                  "broker CPU s", "cores used (all)", "commit retries", "time committing",
                  title="Shards: 12 partitions drained by N concurrent runs (Dagster start-up included)")
    for r in rows:
        table.add_row(str(r["shards"]), f"{r['messages']:,}", f"{r['wall_s']:.1f}", f"{r['rate']:,.0f}",
                      f"{r['speedup']:.2f}", f"{r['in_run_rate']:,.0f}",
                      " ".join(f"{s['cpu_s']:.0f}" for s in r["per_shard"]), _fmt(r["broker_cpu_s"], ".0f"),
                      f"{r['cpu_use']:.0%} ({r['machine_cpu_use']:.0%})", str(r["commit_retries"]),
                      f"{r['commit_share']:.0%}")
    console.print(table)
    console.print(f"where it stops: {rows[-1]['verdict']}")
    return rows


def _delete_bench_topics() -> None:
    """The Kafka topics of this and earlier bench runs (NATS streams are deleted by their section)."""
    from confluent_kafka.admin import AdminClient

    from ingest_defs.bench.kafka import BOOTSTRAP

    admin = AdminClient({"bootstrap.servers": BOOTSTRAP})
    topics = [t for t in admin.list_topics(timeout=15).topics if t.startswith(("bench_", "fresh_"))]
    if topics:
        for future in admin.delete_topics(topics, operation_timeout=30).values():
            future.result()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ingest_defs.bench")
    parser.add_argument("sections", nargs="*", metavar="section", help=f"any of {', '.join(SECTIONS)} (default: all)")
    parser.add_argument("--quick", action="store_true", help="a tenth of the sizes: a smoke run")
    parser.add_argument("--keep", action="store_true", help="keep the scratch tables and logs")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.sections) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown section(s) {', '.join(unknown)}: use {', '.join(SECTIONS)}")
    out_dir = Path(lake_root()) / "_bench"
    out_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "quick": args.quick,
                               "machine": {"cpus": os.cpu_count(), "python": platform.python_version()}}
    runners = {"throughput": throughput, "overhead": overhead, "memory": memory, "freshness": freshness,
               "shards": shards}
    # Every table, work dir and daemon log of this run goes under one scratch dir, removed at the end.
    scratch = Path(tempfile.mkdtemp(prefix="ingest-bench-"))
    tempfile.tempdir = str(scratch)
    try:
        for section in args.sections or SECTIONS:
            results[section] = runners[section](args.quick)
            (out_dir / "results.json").write_text(json.dumps(results, indent=2))  # keep what is done so far
    finally:
        tempfile.tempdir = None
        if args.keep:
            print(f"scratch kept: {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)
        _delete_bench_topics()
    draw(results, out_dir / "results.png")
    print(f"figures: {out_dir / 'results.json'}\nchart:   {out_dir / 'results.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

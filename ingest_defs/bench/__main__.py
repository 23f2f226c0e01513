"""`make bench`: `python -m ingest_defs.bench [section ...] [--quick]`.

Sections (default: all): throughput (Kafka 1M at 1 and 4 partitions and as Avro, NATS 1M, MQTT 200k, each against
the bare client in the same run, and Kafka 1M over 64 partitions), overhead (1,000 small batches, maintenance on and off), memory (Kafka and NATS
1M and 5M backlogs, MQTT 200k and 1M), freshness (daemon + 5 s sensors, one pipeline, then four together, uniform and bursty
traffic), metrics (the cost of a Prometheus scrape with 8 pipelines), shards (a 2M backlog over 12
partitions drained by 1, 2 and 4 shards as concurrent runs; `--quick`: 100k), s3 (the Kafka 1-partition
throughput row and the per-batch overhead row with maintenance on, again with the tables on the stack's S3
server, beside the local-disk rows of the same run), soak (the shipped pipelines under `dagster dev` for 30
minutes, `--soak-minutes`). The figures go
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


SECTIONS = ["throughput", "overhead", "memory", "freshness", "metrics", "shards", "s3", "soak"]
TARGETS = {"kafka": 0.7, "nats": 0.8, "mqtt": 0.9}  # ratio A targets (facts.md)


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def throughput(quick: bool) -> list[dict[str, Any]]:
    from ingest_defs.bench.kafka import bench_kafka, bench_kafka_avro
    from ingest_defs.bench.mqtt import bench_mqtt
    from ingest_defs.bench.nats import bench_nats

    scale = 10 if quick else 1
    rows = [bench_kafka(1_000_000 // scale, partitions, 100_000 // scale) for partitions in (1, 4)]
    # A wide topic: what each partition costs, against the 1-partition row (target ≥ 0.7 of its rates). The same
    # backlog as that row, so `ingest run`'s start-up weighs the same in both.
    wide = bench_kafka(1_000_000 // scale, 64, 100_000 // scale)
    wide["path_rate_vs_1_partition"] = wide["path_rate"] / rows[0]["path_rate"]
    wide["dagster_rate_vs_1_partition"] = wide["dagster_rate"] / rows[0]["dagster_rate"]
    # `ingest run`'s drain alone (first batch's start to last commit): per-partition costs without start-up
    wide["dagster_drain_rate_vs_1_partition"] = wide["dagster_drain_rate"] / rows[0]["dagster_drain_rate"]
    rows.append(wide)
    rows.append(bench_kafka_avro(1_000_000 // scale, 100_000 // scale))  # the same records as Confluent Avro
    rows += bench_nats(1_000_000 // scale, 100_000 // scale)  # 1M: start-up weighs as little as in the Kafka rows
    rows.append(bench_mqtt(200_000 // scale, 50_000 // scale))
    table = Table("throughput", "messages", "bare msg/s", "batch path msg/s", "ratio A", "target",
                  "Dagster runs msg/s", "ratio B", "start-up s", "drain msg/s", "after s",
                  title="Throughput (A: in-run; B: backlog drained by `ingest run`: its seconds before the first "
                        "read, its rate from there to the last commit, its seconds after it)")
    for r in rows:
        target = next((t for k, t in TARGETS.items() if r["name"].startswith(k)), None)
        table.add_row(r["name"], f"{r['messages']:,}", f"{r['bare_rate']:,.0f}", f"{r['path_rate']:,.0f}",
                      f"{r['ratio']:.2f}", _fmt(target, ".1f"), _fmt(r.get("dagster_rate"), ",.0f"),
                      _fmt(r.get("ratio_b"), ".2f"), _fmt(r.get("dagster_startup_s"), ".1f"),
                      _fmt(r.get("dagster_drain_rate"), ",.0f"), _fmt(r.get("dagster_after_last_commit_s"), ".1f"))
    console.print(table)
    console.print(f"64 partitions against 1: batch path {wide['path_rate_vs_1_partition']:.2f}, "
                  f"`ingest run` {wide['dagster_rate_vs_1_partition']:.2f} of the 1-partition rate (target ≥ 0.7; "
                  f"its drain alone, start-up apart: {wide['dagster_drain_rate_vs_1_partition']:.2f})")
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

    rows = bench_memory(scale=10 if quick else 1)
    table = Table("broker", "backlog", "batch", "batches", "baseline MB", "peak MB", "above baseline MB",
                  "batch payload MB", "× batch bytes", "fixed MB", "(above − fixed) × batch bytes",
                  "private above baseline MB", "private × batch bytes", "of which first-batch imports MB",
                  "library floor × batch bytes", "private / floor", "floor's whole peak × batch bytes",
                  "private peak per stage MB", "code pages MB", "drain s",
                  title="Memory of a drain (target ≤ 10× the batch's bytes, goal 3×; fixed: the first row per "
                        "broker, a 20k drain at batch 2k; private: anonymous memory, without the code pages; "
                        "library floor: a bare polars + write_deltalake pipeline's private memory at the same batch; "
                        "its whole peak: VmHWM above its baseline, as a drain's)")
    for r in rows:
        table.add_row(r["broker"], f"{r['backlog']:,}", f"{r['batch']:,}", str(r["batches"]), f"{r['baseline_mb']:.0f}",
                      f"{r['peak_mb']:.0f}", f"{r['above_baseline_mb']:.0f}", f"{r['payload_bytes_per_batch_mb']:.1f}",
                      f"{r['above_baseline_over_batch_bytes']:.1f}", f"{r['first_batch_fixed_mb']:.0f}",
                      f"{r['above_fixed_over_batch_bytes']:.1f}", f"{r['anon_above_baseline_mb']:.0f}",
                      f"{r['anon_over_batch_bytes']:.1f}", f"{r['first_batch_imports_mb']:.0f}",
                      f"{r['library_floor_over_batch_bytes']:.1f}", f"{r['anon_over_library_floor']:.2f}",
                      f"{r['library_floor_whole_over_batch_bytes']:.1f}",
                      ", ".join(f"{stage} {mb:.0f}" for stage, mb in r["anon_stage_peaks_mb"].items()),
                      f"{r['code_pages_mapped_mb']:.0f}", f"{r['seconds']:.1f}")
    console.print(table)
    return rows


def freshness(quick: bool) -> list[dict[str, Any]]:
    from ingest_defs.bench.freshness import bench_freshness
    from ingest_defs.bench.traffic import bursty, uniform

    seconds = 45 if quick else 180
    four = ["kafka", "nats", "nats_workqueue", "mqtt"]
    steady, bursts = uniform(200), bursty(200, every=5)  # the same 200 msg/s: every 5 ms, or 1,000 every 5 s
    rows = bench_freshness(four, seconds=seconds, shape=steady)
    rows += bench_freshness(four, seconds=seconds, shape=bursts)
    table = Table("pipeline", "shape", "together", "linger s", "published", "landed", "first msg s", "p50 s",
                  "p95 s", "max s", "runs", "queue+start s", "run s",
                  title="Freshness: publish → visible in Delta (5 s sensors; target p95 ≤ 15 s; "
                        "percentiles over messages published once the first run had started)")
    for r in rows:
        table.add_row(r["pipeline"], r["shape"], str(r["pipelines_together"]), str(r["linger_s"]),
                      f"{r['published']:,}", f"{r['landed']:,}", _fmt(r["first_message_s"], ".1f"),
                      _fmt(r["p50_s"], ".1f"), _fmt(r["p95_s"], ".1f"),
                      _fmt(r["max_s"], ".1f"), str(r["runs"]), _fmt(r["run_queue_and_start_s_median"], ".1f"),
                      _fmt(r["run_duration_s_median"], ".1f"))
    console.print(table)
    return rows


def metrics(quick: bool) -> list[dict[str, Any]]:
    from ingest_defs.bench.metrics import bench_metrics

    rows = bench_metrics(batches=20 if quick else 100)
    table = Table("scrape", "pipelines", "ledger files each", "scrapes", "wall median ms", "wall p95 ms",
                  "CPU median ms", "CPU p95 ms", "up", title="Cost of one Prometheus scrape of `ingest metrics serve`")
    for r in rows:
        table.add_row(r["phase"], str(r["pipelines"]), str(r["ledger_files"]), str(r["scrapes"]),
                      f"{r['wall_median_ms']:.0f}", f"{r['wall_p95_ms']:.0f}", f"{r['cpu_median_ms']:.0f}",
                      f"{r['cpu_p95_ms']:.0f}", str(r["pipelines_up"]))
    console.print(table)
    return rows


def soak(quick: bool, minutes: float | None = None) -> dict[str, Any]:
    from ingest_defs.bench.soak import bench_soak

    result = bench_soak(minutes=minutes or (3 if quick else 30))
    table = Table("pipeline", "source", "published", "landed", "quarantined", "target versions/files",
                  "ledger versions/files", "freshness p50 / p95 / max s by window",
                  title=f"Soak: shipped pipelines under dagster dev, {result['minutes']:g} min, "
                        f"{result['rate_per_s']:g} msg/s each")
    for p in result["pipelines"]:
        t, led = p["tables"]["target"], p["tables"]["ledger"]
        fresh = "  ".join(f"{w['window_start_min']:g}m: {w['p50_s']:.1f}/{w['p95_s']:.1f}/{w['max_s']:.1f}"
                          for w in p["freshness"])
        table.add_row(p["pipeline"], p["source"], f"{p['published']:,}", f"{p['landed']:,}", f"{p['quarantined']:,}",
                      f"{_fmt(t['version'], 'd')}/{t['files']}", f"{_fmt(led['version'], 'd')}/{led['files']}", fresh)
    console.print(table)
    for skipped in result.get("skipped", []):
        console.print(f"not soaked: {skipped}")
    runs = Table("job", "runs", "failed", title="Soak: runs")
    for job, figures in sorted(result["runs"].items()):
        runs.add_row(job, str(figures["runs"]), str(figures["failed"]))
    console.print(runs)
    rss = Table("minute", "daemon MB", "webserver MB", "code server MB", "its proxy MB", "runs (MB)",
                title="Soak: RSS")
    for s in result["rss_samples"]:
        mb = s["rss_mb"]
        rss.add_row(f"{s['minute']:g}", f"{mb['daemon']:.0f}", f"{mb['webserver']:.0f}", f"{mb['code_server']:.0f}",
                    f"{mb['code_server_proxy']:.0f}", f"{s['processes']['run']} ({mb['run']:.0f})")
    console.print(rss)
    for role, g in result["rss_growth"].items():
        if g:
            console.print(f"{role}: {g['first_mb']:.0f} → {g['last_mb']:.0f} MB (peak {g['peak_mb']:.0f}); slope "
                          f"{g['slope_first_half_mb_per_min']} MB/min in the first half, "
                          f"{g['slope_second_half_mb_per_min']} MB/min in the second")
    return result


def s3(quick: bool, results: dict[str, Any]) -> dict[str, Any]:
    """The Kafka throughput row and the per-batch overhead row again, the tables on the stack's S3 server."""
    from ingest_defs.bench.kafka import bench_kafka
    from ingest_defs.bench.overhead import bench_overhead
    from ingest_defs.stack import manager
    from ingest_defs.stack import s3 as s3_stack
    from ingest_defs.storage import location

    if manager.up(with_s3=True, brokers=False) != 0:
        raise RuntimeError("the S3 server did not start (`ingest stack up --s3`)")
    os.environ.update({**s3_stack.client_env(), **s3_stack.load_secrets(s3_stack.Layout(manager.stack_dir() / "s3"))})
    root = f"s3://{s3_stack.bucket()}/bench/{time.strftime('%Y%m%dT%H%M%S')}"
    scale = 10 if quick else 1
    try:
        kafka = bench_kafka(1_000_000 // scale, 1, 100_000 // scale, lake_uri=root)
        overhead_rows = bench_overhead(batches=200 if quick else 1000, per_batch=20, every=20 if quick else 100,
                                       lake_uri=root, modes=(True,))
    finally:
        try:
            location(root).delete()
        except OSError as exc:  # the figures matter more than the scratch objects
            console.print(f"[yellow]could not delete {root}: {exc}[/]")
    local_kafka = next((r for r in results.get("throughput", []) if r["name"] == "kafka 1 partition(s)"), None)
    local_overhead = next((r for r in results.get("overhead", []) if r["maintenance"]), None)
    table = Table("row", "storage", "batch path msg/s", "ratio A", "Dagster runs msg/s", "ratio B",
                  title="Kafka throughput (1 partition): local disk vs S3 (versitygw on loopback)")
    for label, r in (("local disk", local_kafka), ("S3", kafka)):
        if r is not None:
            table.add_row(r["name"], label, f"{r['path_rate']:,.0f}", f"{r['ratio']:.2f}",
                          _fmt(r.get("dagster_rate"), ",.0f"), _fmt(r.get("ratio_b"), ".2f"))
    console.print(table)
    table = Table("storage", "last 100 median ms", "last 100 p95 ms", "open+plan", "read", "decode+validate",
                  "write (commits)", "ledger", "ack", "files at end",
                  title="Per-batch overhead, maintenance on: local disk vs S3 (stage medians, ms)")
    for label, r in (("local disk", local_overhead), ("S3", overhead_rows[0])):
        if r is not None:
            st = r.get("last100_stage_median_ms", {})
            table.add_row(label, f"{r['last100_median_ms']:.1f}", f"{r['last100_p95_ms']:.1f}",
                          *(_fmt(st.get(k), ".1f") for k in ("open_plan", "read", "decode_validate", "write", "ledger",
                                                             "ack")),
                          str(r["files_at_end"]))
    console.print(table)
    return {"throughput": [kafka], "overhead": overhead_rows}


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
    topics = [t for t in admin.list_topics(timeout=15).topics if t.startswith(("bench_", "fresh_", "soak_"))]
    if topics:
        for future in admin.delete_topics(topics, operation_timeout=30).values():
            future.result()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ingest_defs.bench")
    parser.add_argument("sections", nargs="*", metavar="section", help=f"any of {', '.join(SECTIONS)} (default: all)")
    parser.add_argument("--quick", action="store_true", help="a tenth of the sizes: a smoke run")
    parser.add_argument("--keep", action="store_true", help="keep the scratch tables and logs")
    parser.add_argument("--soak-minutes", type=float, default=None,
                        help="how long the soak runs (default 30; 3 with --quick)")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.sections) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown section(s) {', '.join(unknown)}: use {', '.join(SECTIONS)}")
    out_dir = Path(lake_root()) / "_bench"
    out_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "quick": args.quick,
                               "machine": {"cpus": os.cpu_count(), "python": platform.python_version()}}
    runners = {"throughput": throughput, "overhead": overhead, "memory": memory, "freshness": freshness,
               "metrics": metrics,
               "shards": shards,
               "s3": lambda quick: s3(quick, results),
               "soak": lambda quick: soak(quick, args.soak_minutes)}
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

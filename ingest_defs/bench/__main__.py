"""Run the benchmarks: `python -m ingest_defs.bench [kafka] [nats] [mqtt] [--messages N] [--batch N]`.

Without --messages / --batch each broker uses its own default size (kafka 1,000,000 / 100,000; nats
500,000 / 100,000; mqtt 200,000 / 50,000)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from ingest_defs.config import lake_root


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ingest_defs.bench")
    parser.add_argument("which", nargs="*", default=["kafka", "nats", "mqtt"], choices=["kafka", "nats", "mqtt"])
    parser.add_argument("--messages", type=int, default=None, help="default: per broker")
    parser.add_argument("--batch", type=int, default=None, help="default: per broker")
    args = parser.parse_args(argv)
    which = args.which or ["kafka", "nats", "mqtt"]
    results = []
    if "kafka" in which:
        from ingest_defs.bench.kafka import bench_kafka

        for partitions in (1, 4):
            results.append(bench_kafka(args.messages or 1_000_000, partitions, args.batch or 100_000))
    if "nats" in which:
        from ingest_defs.bench.nats import bench_nats

        results.extend(bench_nats(args.messages or 500_000, args.batch or 100_000))
    if "mqtt" in which:
        from ingest_defs.bench.mqtt import bench_mqtt

        results.append(bench_mqtt(args.messages or 200_000, args.batch or 50_000))
    table = Table("benchmark", "messages", "bare msg/s", "batch path msg/s", "ratio", "via Dagster runs msg/s", "ratio B")
    for r in results:
        table.add_row(r["name"], f"{r['messages']:,}", f"{r['bare_rate']:,.0f}", f"{r['path_rate']:,.0f}",
                      f"{r['ratio']:.2f}", _fmt(r.get("dagster_rate"), ",.0f"), _fmt(r.get("ratio_b"), ".2f"))
    Console().print(table)
    out = Path(lake_root()) / "_bench" / "results.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"figures written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

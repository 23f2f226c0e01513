"""Run the benchmarks: `python -m ingest_defs.bench [kafka] [--messages N]`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from ingest_defs.config import lake_root


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ingest_defs.bench")
    parser.add_argument("which", nargs="*", default=["kafka"], choices=["kafka"])
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--batch", type=int, default=100_000)
    args = parser.parse_args(argv)
    results = []
    if "kafka" in args.which:
        from ingest_defs.bench.kafka import bench_kafka

        for partitions in (1, 4):
            results.append(bench_kafka(args.messages, partitions, args.batch))
    table = Table("benchmark", "messages", "bare msg/s", "batch path msg/s", "ratio", "via Dagster runs msg/s", "ratio B")
    for r in results:
        table.add_row(r["name"], f"{r['messages']:,}", f"{r['bare_rate']:,.0f}", f"{r['path_rate']:,.0f}",
                      f"{r['ratio']:.2f}", f"{r['dagster_rate']:,.0f}", f"{r['ratio_b']:.2f}")
    Console().print(table)
    out = Path(lake_root()) / "_bench" / "results.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"figures written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Shards: one backlog over 12 partitions drained by 1, 2 and 4 shards as concurrent Dagster runs, and where
the scaling stops.

Each configuration drains the same topic into fresh tables (a pipeline of its own, so it starts from offset
0): N processes start at once, each `run_pipeline(spec, shard=i)` — the shard's own job, as the daemon or
`ingest run <pipeline>` launches it, Dagster start-up included. Measured per configuration:

* wall time from launch to the last process's exit, and messages/s over it (the speed-up against 1 shard);
* per process: CPU seconds (user + system, from `wait4`), messages, time in its run, commit retries and time
  spent committing (from the run's materialization metadata: `commit_retries`, `commit_s`);
* the broker's CPU seconds meanwhile (its /proc stat; the broker this stack started);
* the machine's CPU use: ours (all of that over wall time × cores) and everything's (/proc/stat), so a busy
  neighbour shows as such.

Where it stops: CPU-bound when the machine's cores are (nearly) all busy; commit contention when retries
show up or committing takes a growing share of the run; else the broker.
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

from ingest_defs.bench.common import SCHEMA
from ingest_defs.config import REPO_ROOT, dump_pipelines, parse_pipeline

PARTITIONS = 12
TICKS = os.sysconf("SC_CLK_TCK")


def _broker_cpu_s() -> float | None:
    """CPU seconds of the Kafka broker this stack started (None: not ours, e.g. an external broker)."""
    from ingest_defs.stack import manager

    kafka = next(b for b in manager._brokers() if b.name == "kafka")
    pid = manager._our_pid(kafka)
    if pid is None:
        return None
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime


def _machine_cpu() -> tuple[int, int]:
    """(busy, total) clock ticks of all CPUs since boot (/proc/stat)."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return sum(values) - idle, sum(values)


def _drain(topic: str, messages: int, shards: int, batch: int, work: Path) -> dict[str, Any]:
    name = f"bench_shards_{shards}"
    spec = parse_pipeline(name, {
        "source": {"kafka": {"topic": topic, "partitions": PARTITIONS}}, "schema": SCHEMA,
        "table": str(work / name / "bronze"), "shards": shards,
        "batch": {"max_messages": batch, "max_run_seconds": 3600}, "maintenance": {"enabled": False}})
    pipelines = work / f"{name}.yaml"
    pipelines.write_text(dump_pipelines([spec]))
    home = work / f"{name}_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    env = {**os.environ, "INGEST_PIPELINES": str(pipelines), "DAGSTER_HOME": str(home)}
    import dagster as dg

    dg.DagsterInstance.from_config(str(home)).dispose()  # its SQLite storage, made once before the runs race
    broker_before, machine_before = _broker_cpu_s(), _machine_cpu()
    start = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, "-m", "ingest_defs.bench.shards", "worker", name, str(i)], env=env,
                              cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(shards)]
    per_shard = []
    for i, proc in enumerate(procs):
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out, err = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"shard {i} of {shards} failed:\n{out}\n{err}")
        report = json.loads(out.strip().splitlines()[-1])
        per_shard.append({**report, "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
                          "peak_rss_mb": round(usage.ru_maxrss / 1024)})
    wall = time.perf_counter() - start
    broker_after, machine_after = _broker_cpu_s(), _machine_cpu()
    busy, total = (after - before for after, before in zip(machine_after, machine_before, strict=True))
    from ingest_defs.sink import DeltaTableSink

    landed = (DeltaTableSink(spec.table_uri(), name, "target").row_count()
              + DeltaTableSink(spec.quarantine_uri(), name, "quarantine").row_count())
    assert landed == messages, f"{shards} shard(s) landed {landed} of {messages}"
    broker_cpu = None if broker_before is None or broker_after is None else broker_after - broker_before
    cpu = sum(s["cpu_s"] for s in per_shard) + (broker_cpu or 0.0)
    run_s = sum(s["run_s"] for s in per_shard)
    return {
        "shards": shards, "messages": messages, "wall_s": round(wall, 2), "rate": messages / wall,
        "in_run_rate": messages / max(s["run_s"] for s in per_shard),
        "per_shard": per_shard, "broker_cpu_s": None if broker_cpu is None else round(broker_cpu, 2),
        "cpu_s": round(cpu, 2), "cpu_use": cpu / wall / (os.cpu_count() or 1),
        "machine_cpu_use": busy / total if total else 0.0,
        "commit_retries": sum(s["commit_retries"] for s in per_shard),
        "commit_share": sum(s["commit_s"] for s in per_shard) / run_s if run_s else 0.0,
    }


def verdict(rows: list[dict[str, Any]]) -> str:
    """Where the scaling stops, from the measured figures (see the module docstring)."""
    last = rows[-1]
    if last["machine_cpu_use"] >= 0.85:
        others = max(0.0, last["machine_cpu_use"] - last["cpu_use"])
        return (f"CPU: at {last['shards']} shards the machine's {os.cpu_count()} cores are {last['machine_cpu_use']:.0%} "
                f"busy (the shards and the broker {last['cpu_use']:.0%}, other processes {others:.0%}); more shards "
                "on this machine only share them")
    if last["commit_retries"] or last["commit_share"] > 2 * rows[0]["commit_share"] + 0.05:
        return (f"commit contention: {last['commit_retries']} retried commits, {last['commit_share']:.0%} of the "
                "run time committing")
    return (f"the broker: the cores are {last['machine_cpu_use']:.0%} busy, no commit contention (broker CPU "
            f"{last['broker_cpu_s']} s)")


def bench_shards(messages: int, batch: int, shard_counts: tuple[int, ...] = (1, 2, 4)) -> list[dict[str, Any]]:
    from ingest_defs.bench.kafka import _produce

    topic = f"bench_shards_{int(time.time())}"
    _produce(topic, messages, PARTITIONS)
    work = Path(tempfile.mkdtemp(prefix="bench-shards-"))
    rows = [_drain(topic, messages, n, batch, work) for n in shard_counts]
    for r in rows:
        r["speedup"] = r["rate"] / rows[0]["rate"]
    rows[-1]["verdict"] = verdict(rows)
    return rows


def worker(name: str, shard: int) -> None:
    """One shard's run (its own job, in this process), then a JSON line of what its materializations say."""
    from ingest_defs.assets.ingestion import op_name, target_key
    from ingest_defs.cli import run_pipeline
    from ingest_defs.config import load_pipelines
    from ingest_defs.shards import shard_op_name

    spec = load_pipelines()[name]
    started = time.perf_counter()
    result = run_pipeline(spec, quiet=True, shard=shard)  # one shard: the pipeline's own job
    took = time.perf_counter() - started
    if not result.success:
        raise SystemExit(f"shard {shard}: run {result.run_id} failed")
    node = shard_op_name(spec, shard) if spec.shards > 1 else op_name(spec)
    metas = [{k: v.value for k, v in m.metadata.items()} for m in result.asset_materializations_for_node(node)
             if m.asset_key == target_key(spec)]
    print(json.dumps({"shard": shard, "messages": sum(m["messages"] for m in metas),
                      "batches": sum(m["batches"] for m in metas), "run_s": round(sum(m["duration_s"] for m in metas), 3),
                      "process_s": round(took, 2), "commit_retries": sum(m["commit_retries"] for m in metas),
                      "commit_s": round(sum(m["commit_s"] for m in metas), 3)}))


if __name__ == "__main__":
    if sys.argv[1:2] == ["worker"]:
        worker(sys.argv[2], int(sys.argv[3]))

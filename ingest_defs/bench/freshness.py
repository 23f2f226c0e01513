"""Freshness: publish → visible in Delta, with the Dagster daemon running the sensors as a user's
deployment would (QueuedRunCoordinator, default run launcher: one process per run), under a traffic shape:
uniform (a message every few milliseconds, never idle) or bursty (all of a period's messages at once, then
silence); see `traffic.py`.

Each message carries its publish time (`sent_at`); it is visible once the Delta commit that added it
is written, and that commit's timestamp is in the log next to the batch id the rows carry. So every
message gets an exact latency without polling. Run records give the parts of it Dagster owns (queue
wait and process start-up); the sensor interval bounds the rest.
"""

from __future__ import annotations

import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import polars as pl
from rich.progress import Progress

from ingest_defs.bench.traffic import Shape, Traffic, uniform
from ingest_defs.config import REPO_ROOT, dump_pipelines, parse_pipeline
from ingest_defs.lifecycle import SENSOR_LINGER_SECONDS
from ingest_defs.resources.brokers import source_for
from ingest_defs.storage import table_location

SCHEMA = {"columns": {"id": {"dtype": "int64", "nullable": False}, "sent_at": {"dtype": "float64"}}}
VENV_BIN = Path(sys.executable).parent


def _specs(which: list[str], ts: int, lake: Path, interval: int, linger: float | None) -> list[Any]:
    sources = {
        "kafka": {"kafka": {"topic": f"fresh_{ts}", "partitions": 3}},
        "nats": {"nats": {"stream": f"FRESH_{ts}", "subject": f"fresh_{ts}.*"}},
        "nats_workqueue": {"nats": {"stream": f"FRESHWQ_{ts}", "subject": f"freshwq_{ts}.*",
                                    "retention": "workqueue", "ack_wait_seconds": 60}},
        "mqtt": {"mqtt": {"topics": [f"fresh/{ts}/+"], "client_id": f"fresh-{ts}"}},
    }
    return [parse_pipeline(f"fresh_{kind}", {
        "source": sources[kind], "schema": SCHEMA, "table": str(lake / "bronze" / f"fresh_{kind}"),
        "trigger": {"sensor": {"interval_seconds": interval}}, "maintenance": {"enabled": False},
        "batch": {} if linger is None else {"linger_seconds": linger}})  # None: the default
        for kind in which]


def _publish(specs: list[Any], shape: Shape, seconds: float) -> tuple[dict[str, int], float]:
    """The shape to every pipeline at once, each from a publisher thread of its own; acknowledged counts,
    and when publishing started."""
    threads = [Traffic(spec, shape, seconds) for spec in specs]
    with Progress() as progress:
        task = progress.add_task(f"publishing {shape.name} {shape.rate:.0f} msg/s to {len(specs)} pipeline(s)",
                                 total=seconds)
        started = time.time()
        for thread in threads:
            thread.start()
        while any(t.is_alive() for t in threads):
            progress.update(task, completed=min(seconds, time.time() - started))
            time.sleep(0.5)
    for thread in threads:
        if thread.error is not None:
            raise RuntimeError(f"publishing to {thread.spec.name} failed: {thread.error!r}") from thread.error
    return {t.spec.name: t.acked for t in threads}, started


def _latencies(spec: Any) -> pl.DataFrame:
    """sent_at and latency (publish → the commit that made it visible) of every row, in publish order."""
    where = table_location(spec)
    table = where.open()
    committed_at = {c["ingest.batch_id"]: c["timestamp"] / 1000 for c in table.history() if "ingest.batch_id" in c}
    rows = where.read(columns=["sent_at", "_batch_id"])
    visible = rows["_batch_id"].replace_strict(committed_at, return_dtype=pl.Float64)
    return pl.DataFrame({"sent_at": rows["sent_at"], "latency": visible - rows["sent_at"]}).sort("sent_at")


def _rows(spec: Any) -> int:
    table = table_location(spec).open()
    return 0 if table is None else table.to_pyarrow_dataset().count_rows()  # None: not created yet


def _wait_for_runs(home: Path, deadline: float) -> None:
    import dagster as dg

    in_progress = [dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED]
    with dg.DagsterInstance.from_config(str(home)) as instance:
        while time.time() < deadline and instance.get_runs_count(dg.RunsFilter(statuses=in_progress)):
            time.sleep(1)


def _run_figures(home: Path, spec: Any) -> dict[str, Any]:
    import dagster as dg

    with dg.DagsterInstance.from_config(str(home)) as instance:
        records = instance.get_run_records(dg.RunsFilter(job_name=f"{spec.name}_job"))
    waits = [r.start_time - r.create_timestamp.timestamp() for r in records if r.start_time]
    durations = [r.end_time - r.start_time for r in records if r.start_time and r.end_time]
    return {"runs": len(records), "failed_runs": sum(r.dagster_run.status == dg.DagsterRunStatus.FAILURE for r in records),
            "run_queue_and_start_s_median": statistics.median(waits) if waits else None,
            "run_duration_s_median": statistics.median(durations) if durations else None,
            "first_run_started": min((r.start_time for r in records if r.start_time), default=None)}


def bench_freshness(which: list[str], seconds: float = 120, shape: Shape | None = None, interval: int = 5,
                    linger: float | None = None) -> list[dict[str, Any]]:
    """Percentiles over the messages published once the pipeline's first run had started (the steady state:
    a cold start, traffic after a silence longer than the linger, pays one run start); the first message's
    latency (that cold start) is reported beside them."""
    shape = shape or uniform(50)
    ts = time.time_ns() // 1_000_000
    work = Path(tempfile.mkdtemp(prefix="bench-freshness-"))
    home, lake = work / "dagster_home", work / "lake"
    home.mkdir()
    shutil.copy(REPO_ROOT / "dagster_home" / "dagster.yaml", home / "dagster.yaml")
    specs = _specs(which, ts, lake, interval, linger)
    (work / "pipelines.yaml").write_text(dump_pipelines(specs))
    (work / "workspace.yaml").write_text(
        "load_from:\n  - python_module:\n      module_name: ingest_defs.bench.freshness_defs\n"
        f"      working_directory: {REPO_ROOT}\n")
    env = {**os.environ, "DAGSTER_HOME": str(home), "INGEST_PIPELINES": str(work / "pipelines.yaml"),
           "LAKE_ROOT": str(lake)}
    for spec in specs:  # topics, streams, work-queue durables and MQTT sessions exist before publishing
        source = source_for(spec)
        source.ensure_exists()
        source.close()
    log = open(work / "daemon.log", "w")  # noqa: SIM115 - closed below
    daemon = subprocess.Popen([str(VENV_BIN / "dagster-daemon"), "run", "-w", str(work / "workspace.yaml")],
                              env=env, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        time.sleep(10)  # the daemon loads the code location and starts its sensor loop
        sent, published_from = _publish(specs, shape, seconds)
        deadline = time.time() + 120
        while time.time() < deadline and any(_rows(s) < sent[s.name] for s in specs):
            time.sleep(1)
        _wait_for_runs(home, deadline=time.time() + (SENSOR_LINGER_SECONDS if linger is None else linger) + 60)
    finally:
        os.killpg(daemon.pid, signal.SIGTERM)
        try:
            daemon.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(daemon.pid, signal.SIGKILL)
        log.close()
    rows = []
    for spec in specs:
        every = _latencies(spec) if _rows(spec) else pl.DataFrame({"sent_at": [], "latency": []})
        runs = _run_figures(home, spec)
        first_run = runs.pop("first_run_started") or published_from
        steady = sorted(every.filter(pl.col("sent_at") >= first_run)["latency"].to_list())
        landed = len(every)
        rows.append({
            "pipeline": spec.name, "pipelines_together": len(specs), "sensor_interval_s": interval,
            "linger_s": "default" if linger is None else linger, "shape": shape.name,
            "burst_every_s": shape.burst_every, "rate_per_s": shape.rate, "published": sent[spec.name],
            "landed": landed, "first_run_started_after_s": first_run - published_from,
            "first_message_s": every["latency"][0] if landed else None,
            "p50_s": statistics.median(steady) if steady else None,
            "p95_s": steady[int(0.95 * (len(steady) - 1))] if steady else None,
            "max_s": steady[-1] if steady else None,
            **runs, "work_dir": str(work),
        })
    return rows

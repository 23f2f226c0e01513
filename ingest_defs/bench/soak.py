"""Soak: the shipped pipelines under `dagster dev` (webserver, daemon and code server, as a user runs them)
with steady mixed traffic for a long while (30 minutes by default).

The pipelines are `ingest_defs/pipelines.yaml` as shipped (sensors, batch settings, maintenance schedules),
on broker objects of their own (topic, streams, MQTT topics and client id renamed per soak run) and with one
extra payload column, `sent_at`, for per-message freshness. The code location is the repository's
`workspace.yaml` (dbt assets included). Each pipeline gets `rate` messages per second, evenly spaced, keyed,
with 1 % bad messages (quarantined), MQTT at mixed QoS (every fourth QoS 1, the rest QoS 0).

Reported: messages acknowledged by the broker vs landed (target ∪ quarantine) per pipeline, runs and failed
runs per job, freshness (publish → Delta commit) percentiles per time window, Delta versions and data files
per table, and the RSS of the daemon, the webserver and the code server sampled every minute (plus run
processes alive at that moment).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import polars as pl
from rich.progress import Progress

from ingest_defs.bench.traffic import Traffic, uniform, with_sent_at
from ingest_defs.config import (
    DEFAULT_PIPELINES_FILE,
    REPO_ROOT,
    PipelineSpec,
    dump_pipelines,
    load_pipelines,
    parse_pipeline,
)
from ingest_defs.resources.brokers import source_for
from ingest_defs.samples import make_samples
from ingest_defs.storage import location

VENV_BIN = Path(sys.executable).parent
PORT_VARIABLE = "INGEST_BENCH_WEBSERVER_PORT"  # the soak's dagster webserver (default 3070)
# Processes of `dagster dev`, by command line: the code server is `dagster api grpc` (the user code), started
# and watched by a `dagster code-server start` proxy; runs are multiprocessing children of the code server
# (the default run launcher), or `dagster api execute_run` processes.
ROLES = {"webserver": ("dagster_webserver", "dagster-webserver"), "daemon": ("dagster._daemon", "dagster-daemon"),
         "run": ("execute_run", "spawn_main"), "code_server_proxy": ("code-server start",),
         "code_server": ("api grpc",)}


def soak_specs(shipped: dict[str, PipelineSpec], tag: str) -> list[PipelineSpec]:
    """The shipped JSON pipelines on broker objects of this soak run, with a `sent_at` payload column.
    Registry-format pipelines are left out (`soak_skipped`): their columns come from the registry schema,
    which has no `sent_at` to measure freshness with."""
    out = []
    for name, spec in shipped.items():
        if spec.uses_registry:
            continue
        raw = spec.model_dump(by_alias=True, exclude={"name"}, exclude_none=True, mode="json")
        src = raw["source"]
        if "kafka" in src:
            src["kafka"]["topic"] = f"soak_{tag}_{src['kafka']['topic']}"
            src["kafka"].pop("group_id", None)
        elif "nats" in src:
            nats = src["nats"]
            nats["stream"] = f"SOAK_{tag}_{nats['stream']}"
            nats["subject"] = f"soak{tag}_{nats['subject']}"
        else:
            mqtt = src["mqtt"]
            mqtt["topics"] = [f"soak/{tag}/{t}" for t in mqtt["topics"]]
            mqtt["client_id"] = f"ingest-{name}-soak-{tag}"
        columns = raw["schema"].get("columns")
        if columns is not None:
            columns["sent_at"] = {"dtype": "float64"}
        out.append(parse_pipeline(name, raw))
    return out


def soak_skipped(shipped: dict[str, PipelineSpec]) -> list[str]:
    """Shipped pipelines the soak leaves out, each with why (reported with the figures)."""
    return [f"{name}: format {spec.format} takes its columns from the registry (no sent_at column)"
            for name, spec in shipped.items() if spec.uses_registry]


def _message_maker(spec: PipelineSpec) -> Any:
    samples = make_samples(spec, 5000, bad_fraction=0.01, seed=42)
    n = len(samples.payloads)

    def make(i: int, sent_at: float) -> tuple[bytes, bytes | None, int]:
        return with_sent_at(samples.payloads[i % n], sent_at), samples.keys[i % n], 1 if i % 4 == 0 else 0

    return make


# ---------------------------------------------------------------- processes of `dagster dev`
def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        tree.setdefault(ppid, []).append(int(entry.name))
    return tree


def _descendants(pid: int) -> list[int]:
    tree, out, todo = _children(), [], [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def role_of(cmdline: str) -> str | None:
    """Which part of `dagster dev` a process is, from its command line (run workers before code servers)."""
    for role in ROLES:
        if any(marker in cmdline for marker in ROLES[role]):
            return role
    return None


def sample_processes(root: int) -> dict[str, Any]:
    """RSS (MB) per role, summed over that role's processes, and how many processes each role has."""
    rss: dict[str, float] = dict.fromkeys(ROLES, 0.0)
    count: dict[str, int] = dict.fromkeys(ROLES, 0)
    for pid in _descendants(root):
        role = role_of(_cmdline(pid))
        if role is None:
            continue
        rss[role] += _rss_mb(pid)
        count[role] += 1
    return {"rss_mb": {k: round(v, 1) for k, v in rss.items()}, "processes": count}


# ---------------------------------------------------------------- figures from the tables and the instance
def _landed(spec: PipelineSpec) -> tuple[int, int]:
    rows = []
    for uri in (spec.table_uri(), spec.quarantine_uri()):
        try:
            table = location(uri).open()
            rows.append(0 if table is None else table.to_pyarrow_dataset().count_rows())
        except Exception:  # not readable yet
            rows.append(0)
    return rows[0], rows[1]


def _table_figures(uri: str) -> dict[str, Any]:
    table = location(uri).open()
    if table is None:
        return {"version": None, "files": 0}
    return {"version": table.version(), "files": len(table.file_uris())}


def freshness_windows(spec: PipelineSpec, started: float, window_s: float) -> list[dict[str, Any]]:
    """p50/p95/max of publish → visible (the commit that added the row) per window of publish time."""
    target = location(spec.table_uri())
    table = target.open()
    if table is None:
        return []
    committed = {c["ingest.batch_id"]: c["timestamp"] / 1000 for c in table.history() if "ingest.batch_id" in c}
    rows = target.read(columns=["sent_at", "_batch_id"]).drop_nulls("sent_at")
    if rows.is_empty():
        return []
    frame = rows.with_columns(
        (pl.col("_batch_id").replace_strict(committed, return_dtype=pl.Float64, default=None) - pl.col("sent_at"))
        .alias("latency"),
        ((pl.col("sent_at") - started) // window_s).cast(pl.Int64).alias("window"))
    out = []
    for (window,), group in sorted(frame.drop_nulls("latency").group_by("window"), key=lambda g: g[0][0]):
        lat = group["latency"]
        out.append({"window_start_min": round(window * window_s / 60, 1), "messages": group.height,
                    "p50_s": round(lat.quantile(0.5), 2), "p95_s": round(lat.quantile(0.95), 2),
                    "max_s": round(lat.max(), 2)})
    return out


def _runs(home: Path) -> dict[str, Any]:
    import dagster as dg

    with dg.DagsterInstance.from_config(str(home)) as instance:
        records = instance.get_run_records()
    per_job: dict[str, dict[str, int]] = {}
    for record in records:
        run = record.dagster_run
        job = per_job.setdefault(run.job_name, {"runs": 0, "failed": 0})
        job["runs"] += 1
        job["failed"] += run.status == dg.DagsterRunStatus.FAILURE
    return per_job


def _in_progress(home: Path) -> int:
    import dagster as dg

    statuses = [dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED]
    with dg.DagsterInstance.from_config(str(home)) as instance:
        return instance.get_runs_count(dg.RunsFilter(statuses=statuses))


def growth(samples: list[dict[str, Any]], role: str) -> dict[str, Any]:
    """First, last and peak RSS of a role, and its slope (MB/min) over the first and the second half."""
    points = [(s["minute"], s["rss_mb"][role]) for s in samples if s["rss_mb"].get(role)]
    if len(points) < 2:
        return {}

    def slope(part: list[tuple[float, float]]) -> float | None:
        if len(part) < 2:
            return None
        xs, ys = [p[0] for p in part], [p[1] for p in part]
        mx, my = statistics.fmean(xs), statistics.fmean(ys)
        var = sum((x - mx) ** 2 for x in xs)
        return round(sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var, 2) if var else None

    half = len(points) // 2
    return {"first_mb": points[0][1], "last_mb": points[-1][1], "peak_mb": max(p[1] for p in points),
            "slope_first_half_mb_per_min": slope(points[: half + 1]),
            "slope_second_half_mb_per_min": slope(points[half:])}


# ---------------------------------------------------------------- the soak
def bench_soak(minutes: float = 30.0, rate: float = 20.0, sample_every: float = 60.0,
               window_minutes: float = 5.0) -> dict[str, Any]:
    tag = str(time.time_ns() // 1_000_000)
    work = Path(tempfile.mkdtemp(prefix="bench-soak-"))
    home, lake = work / "dagster_home", work / "lake"
    home.mkdir()
    shutil.copy(REPO_ROOT / "dagster_home" / "dagster.yaml", home / "dagster.yaml")
    shipped = load_pipelines(DEFAULT_PIPELINES_FILE)
    specs = soak_specs(shipped, tag)
    (work / "pipelines.yaml").write_text(dump_pipelines(specs))
    env = {**os.environ, "DAGSTER_HOME": str(home), "INGEST_PIPELINES": str(work / "pipelines.yaml"),
           "LAKE_ROOT": str(lake)}
    os.environ["LAKE_ROOT"] = str(lake)  # this process reads the same tables
    for spec in specs:  # topics, streams, durables and MQTT sessions exist before anything is published
        source = source_for(spec)
        source.ensure_exists()
        source.close()
    port = os.environ.get(PORT_VARIABLE, "3070")
    log = open(work / "dagster_dev.log", "w")  # noqa: SIM115 - closed below
    dev = subprocess.Popen([str(VENV_BIN / "dagster"), "dev", "-w", str(REPO_ROOT / "workspace.yaml"), "-p", port,
                            "-h", "127.0.0.1"], env=env, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT,
                           start_new_session=True)
    samples: list[dict[str, Any]] = []
    stop = threading.Event()
    traffic = [Traffic(spec, uniform(rate), minutes * 60, _message_maker(spec), stop) for spec in specs]
    try:
        _wait_for_webserver(port, dev, timeout=600)  # loading the code location: seconds when idle
        started = time.time()
        for thread in traffic:
            thread.start()
        with Progress() as progress:
            task = progress.add_task(f"soak: {len(specs)} pipelines × {rate:g} msg/s under dagster dev",
                                     total=minutes * 60)
            next_sample = started
            while time.time() - started < minutes * 60:
                if dev.poll() is not None:
                    raise RuntimeError(f"dagster dev exited ({dev.returncode}); see {work / 'dagster_dev.log'}")
                if time.time() >= next_sample:
                    sample = {"minute": round((time.time() - started) / 60, 2), **sample_processes(dev.pid),
                              "landed": {s.name: sum(_landed(s)) for s in specs},
                              "sent": {t.spec.name: t.sent for t in traffic}}
                    samples.append(sample)
                    next_sample += sample_every
                progress.update(task, completed=min(minutes * 60, time.time() - started))
                time.sleep(1)
        stop.set()
        for thread in traffic:
            thread.join(120)
        acked = {t.spec.name: t.acked for t in traffic}
        deadline = time.time() + 300
        while time.time() < deadline and any(sum(_landed(s)) < acked[s.name] for s in specs):
            time.sleep(2)
        while time.time() < deadline and _in_progress(home):
            time.sleep(2)
        samples.append({"minute": round((time.time() - started) / 60, 2), **sample_processes(dev.pid),
                        "landed": {s.name: sum(_landed(s)) for s in specs}, "sent": acked})
    finally:
        stop.set()
        _stop(dev)
        log.close()
        _forget_broker_objects(specs)
    pipelines = []
    for spec, thread in zip(specs, traffic, strict=True):
        target_rows, quarantined = _landed(spec)
        pipelines.append({
            "pipeline": spec.name, "source": spec.source.kind, "published": thread.acked,
            "landed": target_rows + quarantined, "quarantined": quarantined,
            "publish_error": repr(thread.error) if thread.error else None,
            "tables": {"target": _table_figures(spec.table_uri()),
                       "quarantine": _table_figures(spec.quarantine_uri()),
                       "ledger": _table_figures(spec.ledger_uri())},
            "freshness": freshness_windows(spec, started, window_minutes * 60),
        })
    return {"minutes": minutes, "skipped": soak_skipped(shipped), "rate_per_s": rate, "work_dir": str(work), "pipelines": pipelines,
            "runs": _runs(home), "rss_samples": samples,
            "rss_growth": {role: growth(samples, role) for role in ("daemon", "webserver", "code_server")}}


def _forget_broker_objects(specs: list[PipelineSpec]) -> None:
    """Delete the soak's NATS streams and MQTT sessions (Kafka topics go with the bench's own cleanup)."""
    import asyncio

    import nats

    from ingest_defs.resources.brokers import DEFAULT_MQTT, DEFAULT_NATS
    from ingest_defs.sources.mqtt import parse_url

    streams = [s.source.nats.stream for s in specs if s.source.nats]

    async def drop() -> None:
        nc = await nats.connect(os.environ.get("NATS_URL", DEFAULT_NATS))
        try:
            for stream in streams:
                with contextlib.suppress(Exception):
                    await nc.jetstream().delete_stream(stream)
        finally:
            await nc.close()

    with contextlib.suppress(Exception):
        asyncio.run(drop())
    import paho.mqtt.client as mqtt

    host, port, _ = parse_url(os.environ.get("MQTT_URL", DEFAULT_MQTT))
    for spec in specs:
        if spec.source.mqtt:
            client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=spec.source.mqtt.client_id,
                                 protocol=mqtt.MQTTv5)
            with contextlib.suppress(OSError):
                client.connect(host, port, clean_start=True)  # session expiry 0: gone with this connection
                client.loop(0.2)
                client.disconnect()


def _wait_for_webserver(port: str, dev: subprocess.Popen, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if dev.poll() is not None:
            raise RuntimeError(f"dagster dev exited ({dev.returncode}) before its webserver answered")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/server_info", timeout=5):
                return
        except OSError:
            time.sleep(2)
    raise RuntimeError(f"dagster dev's webserver did not answer on port {port} within {timeout:.0f}s")


def _stop(dev: subprocess.Popen) -> None:
    if dev.poll() is not None:
        return
    os.killpg(dev.pid, signal.SIGTERM)  # dagster dev stops the webserver, the daemon and the code server
    try:
        dev.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(dev.pid, signal.SIGKILL)
        dev.wait(10)

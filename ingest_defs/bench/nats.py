"""NATS JetStream: our batch path (read → decode → validate → Delta commit → ack/lag marker) against the
fastest bare nats-py read of the same messages, in the same run.

Bare reads (each timed from the subscribe call to the last message): an ordered push consumer
(`js.subscribe(..., ordered_consumer=True)`) and a durable push consumer with flow control and AckPolicy
none. `bare_rate` is the fastest of them; the durable push read is the reference for the targets.

A work queue has a second, lower ceiling: the server deletes every acknowledged message, which a Limits
read never pays. The acking baseline is a durable push consumer with AckPolicy explicit (a WorkQueue stream
refuses `all`) whose callback acknowledges every message (`msg.ack()`), timed until the stream is empty.
Both sides of that ratio are the best of two runs, each on a stream of its own.

A: in-run ratio, from the first broker read to the last ack (Limits stream; a WorkQueue stream against both
the durable push read and the acking read). B: the same backlog drained by `ingest run` in a fresh process.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import nats
from nats.js import api

from ingest_defs.bench.common import SCHEMA, batch_runner, publish_in_chunks
from ingest_defs.bench.kafka import _via_dagster_runs
from ingest_defs.config import parse_pipeline
from ingest_defs.resources.brokers import DEFAULT_NATS, source_for

NATS_URL = os.environ.get("NATS_URL", DEFAULT_NATS)
PENDING = {"pending_msgs_limit": 10_000_000, "pending_bytes_limit": 4 << 30}


def _spec(name: str, stream: str, subject: str, table: Path, batch: int, retention: str = "limits") -> Any:
    return parse_pipeline(name, {
        "source": {"nats": {"stream": stream, "subject": subject, "retention": retention}}, "schema": SCHEMA,
        "table": str(table), "batch": {"max_messages": batch, "max_run_seconds": 3600}})


def _produce(source: Any, stream: str, messages: int) -> None:
    source.ensure_exists()
    publish_in_chunks(source, stream, messages)


async def _until_done(nc: Any, done: asyncio.Event, state: dict[str, int], what: str, messages: int) -> None:
    """Wait for `done`; a read that stops making progress (e.g. the server cut a slow consumer) fails."""
    last = -1
    while not done.is_set():
        if state["seen"] == last or nc.is_closed:
            await nc.close()
            raise RuntimeError(f"{what} stalled at {state['seen']} of {messages}")
        last = state["seen"]
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done.wait(), 10)


async def _read(stream: str, subject: str, messages: int, mode: str) -> float:
    """One bare read of the whole stream: 'ordered' or 'durable' push consumer. Returns msgs/s."""
    nc = await nats.connect(NATS_URL)
    js = nc.jetstream()
    done = asyncio.Event()
    state = {"seen": 0, "bytes": 0}

    async def cb(msg: Any) -> None:
        state["seen"] += 1
        state["bytes"] += len(msg.data)
        if state["seen"] >= messages:
            done.set()

    durable = f"bare-{int(time.time() * 1000)}"
    start = time.perf_counter()
    if mode == "ordered":
        sub = await js.subscribe(subject, stream=stream, ordered_consumer=True,
                                 deliver_policy=api.DeliverPolicy.ALL, cb=cb, **PENDING)
    else:
        config = api.ConsumerConfig(ack_policy=api.AckPolicy.NONE, flow_control=True, idle_heartbeat=5.0,
                                    deliver_policy=api.DeliverPolicy.ALL)
        sub = await js.subscribe(subject, stream=stream, durable=durable, config=config, cb=cb,
                                 manual_ack=True, flow_control=True, idle_heartbeat=5.0, **PENDING)
    await _until_done(nc, done, state, f"bare {mode} read", messages)
    took = time.perf_counter() - start
    await sub.unsubscribe()
    if mode != "ordered":
        with contextlib.suppress(Exception):  # best effort
            await js.delete_consumer(stream, durable)
    await nc.close()
    return messages / took


async def _read_acking(stream: str, subject: str, messages: int) -> float:
    """A bare durable push consumer on a WorkQueue stream acknowledging every message; msgs/s until the
    server has deleted them all (the stream is empty)."""
    nc = await nats.connect(NATS_URL)
    js = nc.jetstream()
    done = asyncio.Event()
    state = {"seen": 0}

    async def cb(msg: Any) -> None:
        await msg.ack()
        state["seen"] += 1
        if state["seen"] >= messages:
            done.set()

    durable = f"bare-ack-{int(time.time() * 1000)}"
    config = api.ConsumerConfig(ack_policy=api.AckPolicy.EXPLICIT, max_ack_pending=20_000, flow_control=True,
                                idle_heartbeat=5.0, deliver_policy=api.DeliverPolicy.ALL)
    start = time.perf_counter()
    sub = await js.subscribe(subject, stream=stream, durable=durable, config=config, cb=cb, manual_ack=True,
                             flow_control=True, idle_heartbeat=5.0, **PENDING)
    await _until_done(nc, done, state, "bare acking read", messages)
    await nc.flush(timeout=30)
    while (await js.stream_info(stream)).state.messages:  # acknowledged = deleted by the server
        await asyncio.sleep(0.01)
    took = time.perf_counter() - start
    await sub.unsubscribe()
    with contextlib.suppress(Exception):  # best effort
        await js.delete_consumer(stream, durable)
    await nc.close()
    return messages / took


def _bare(stream: str, subject: str, messages: int) -> dict[str, float]:
    """Best of two reads per mode; a mode whose reads all fail (slow consumer cut off) is left out."""
    rates: dict[str, float] = {}
    for mode in ("ordered", "durable", "ordered", "durable"):
        try:
            rate = asyncio.run(_read(stream, subject, messages, mode))
        except Exception as exc:  # noqa: BLE001 - recorded, the other reads still count
            print(f"bare {mode} read failed: {exc!r}")
            continue
        rates[mode] = max(rates.get(mode, 0.0), rate)
    if not rates:
        raise RuntimeError("every bare NATS read failed")
    return rates


def _path(spec: Any, messages: int) -> tuple[float, int, float]:
    source = source_for(spec)
    runner = batch_runner(spec, source)
    runner.identity()
    start = time.monotonic()
    results = runner.run()
    # first broker read → last ack (the final empty plan is not part of it)
    path_seconds = max(r.started_monotonic + r.duration_s for r in results if r.messages) - start
    source.close()
    landed = sum(r.rows_written + r.rows_quarantined for r in results)
    assert landed == messages, f"landed {landed} of {messages}"
    return messages / path_seconds, len([r for r in results if r.messages]), sum(r.duration_s for r in results)


def _bare_acking(ts: int, messages: int) -> list[float]:
    """Two acking reads' rates, each of a WorkQueue stream of its own filled with the same messages."""
    rates = []
    for i in range(2):
        stream, subject = f"BENCHWQBARE{i}_{ts}", f"benchwqbare{i}_{ts}.*"
        spec = _spec("bench_nats_wq_bare", stream, subject, Path(tempfile.mkdtemp()) / "unused", 1000, "workqueue")
        producer = source_for(spec)
        try:
            # ensure_exists makes the stream (and the pipeline's durable, removed before the read)
            _produce(producer, stream, messages)
            producer.close()
            asyncio.run(_drop_consumers(stream))
            rates.append(asyncio.run(_read_acking(stream, subject, messages)))
        finally:
            asyncio.run(_delete_streams(stream))
    return rates


async def _drop_consumers(stream: str) -> None:
    nc = await nats.connect(NATS_URL)
    js = nc.jetstream()
    for info in await js.consumers_info(stream):
        await js.delete_consumer(stream, info.name)
    await nc.close()


async def _delete_streams(*streams: str) -> None:
    nc = await nats.connect(NATS_URL)
    js = nc.jetstream()
    for stream in streams:
        with contextlib.suppress(Exception):  # best effort
            await js.delete_stream(stream)
    await nc.close()


def bench_nats(messages: int = 500_000, batch: int = 100_000, workqueue: bool = True) -> list[dict[str, Any]]:
    ts = int(time.time())
    stream, subject = f"BENCH_{ts}", f"bench_{ts}.*"
    lake = Path(tempfile.mkdtemp(prefix="bench-lake-"))
    spec = _spec("bench_nats", stream, subject, lake / "a" / "bronze", batch)
    streams = [stream]
    rows: list[dict[str, Any]] = []
    try:
        producer = source_for(spec)
        _produce(producer, stream, messages)
        producer.close()
        rates = _bare(stream, subject, messages)
        bare = max(rates.values())
        # Best of two, like the bare reads: each into a table of its own (a Limits stream keeps everything).
        path_rate, batches, read_s = max(_path(spec.model_copy(update={"table": str(lake / f"a{i}" / "bronze")}),
                                               messages) for i in range(2))
        via_dagster = _via_dagster_runs(spec.model_copy(update={"table": str(lake / "b" / "bronze")}), messages)
        rows.append({
            "name": "nats limits",
            "messages": messages, "batch": batch, "batches": batches,
            "bare_rate": bare, "path_rate": path_rate, "ratio": path_rate / bare,
            "bare_ordered_rate": rates.get("ordered"), "bare_durable_push_rate": rates.get("durable"),
            "ratio_vs_durable_push": path_rate / rates["durable"] if "durable" in rates else None, "target_vs_durable_push": 0.8,
            "batch_seconds": round(read_s, 2), **via_dagster, "ratio_b": via_dagster["dagster_rate"] / bare,
        })
        if workqueue and "durable" in rates:
            # Best of two, like the acking reads it is compared with: a work queue is empty once drained, so
            # each path run has a stream of its own, filled with the same messages.
            wq_runs = []
            for i in range(2):
                wq_stream, wq_subject = f"BENCHWQ{i}_{ts}", f"benchwq{i}_{ts}.*"
                streams.append(wq_stream)
                wq_spec = _spec("bench_nats_wq", wq_stream, wq_subject, lake / f"wq{i}" / "bronze", batch,
                                "workqueue")
                producer = source_for(wq_spec)
                _produce(producer, wq_stream, messages)  # ensure_exists creates the durable first
                producer.close()
                wq_runs.append(_path(wq_spec, messages))
                asyncio.run(_delete_streams(wq_stream))
            wq_rate, wq_batches, wq_read_s = max(wq_runs)
            acking_rates = _bare_acking(ts, messages)
            acking_rate = max(acking_rates)
            spread = {"path_rates": [round(r[0]) for r in wq_runs]}
            rows.append({
                "name": "nats workqueue (vs durable push)",
                "messages": messages, "batch": batch, "batches": wq_batches,
                "bare_rate": rates["durable"], "path_rate": wq_rate, "ratio": wq_rate / rates["durable"],
                "target_vs_durable_push": 0.8, "batch_seconds": round(wq_read_s, 2),
                "dagster_rate": None, "ratio_b": None, **spread,
            })
            rows.append({
                "name": "nats workqueue (vs acking push)",
                "messages": messages, "batch": batch, "batches": wq_batches,
                "bare_rate": acking_rate, "path_rate": wq_rate, "ratio": wq_rate / acking_rate,
                "target_vs_acking_push": 0.8, "batch_seconds": round(wq_read_s, 2),
                "dagster_rate": None, "ratio_b": None, **spread, "bare_rates": [round(r) for r in acking_rates],
            })
    finally:
        asyncio.run(_delete_streams(*streams))
    return rows

"""`batch.max_wait_seconds`: a batch whose broker decides what comes next (MQTT, NATS work-queue/interest
durables) closes that long after its first message even when the traffic never pauses, commits, acknowledges,
and the run goes on with the next batch — exactly once kept, across a kill -9 right after a time-cut commit.

Never-idle traffic is a publisher thread sending every few milliseconds (far below `idle_ms`). Assertions
are on what closed each batch and on counts, not on wall-clock thresholds.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import nats
import pytest
from deltalake import DeltaTable

from ingest_defs.sources.nats import _Reader
from ingest_tests.conftest import (
    assert_exactly_once,
    cli_env,
    failure_message,
    ingest_cli,
    landed,
    materialization,
    run_job,
    run_until_caught_up,
)
from ingest_tests.test_mqtt_pipeline import assert_exactly_once as assert_mqtt_exactly_once
from ingest_tests.test_mqtt_pipeline import direct_batch, mqtt_spec, register
from ingest_tests.test_mqtt_pipeline import sessions as sessions  # noqa: PLC0414 - the fixture, re-exported
from ingest_tests.test_mqtt_qos import ContinuousPublisher
from ingest_tests.test_nats_pipeline import NATS_URL, ensure_exists, nats_spec, stream_of
from ingest_tests.test_nats_pipeline import _delete_streams as _delete_streams  # noqa: PLC0414 - autouse fixture

pytestmark = pytest.mark.usefixtures("stack")


def commits(uri: str) -> list[dict]:
    """The table's batch commits, oldest first."""
    return sorted((c for c in DeltaTable(uri).history() if c.get("ingest.batch_id")), key=lambda c: c["version"])


# ---------------------------------------------------------------- MQTT
def test_mqtt_batches_close_by_time_under_never_idle_traffic(lake, instance, sessions):
    spec = mqtt_spec(batch={"max_messages": 50_000, "idle_ms": 500, "max_wait_seconds": 1.0})
    sessions.append(spec)
    register(spec)
    with ContinuousPublisher(spec, qos1_every=1) as publisher:
        time.sleep(0.5)
        result = run_job(spec, instance, max_seconds=6.0)  # one run, six times max_wait, traffic throughout
        assert result.success, failure_message(result)
    meta = materialization(result, spec)
    ended = meta["batches_ended_by"]
    assert ended.get("max_wait", 0) >= 2, ended  # several commits while the publisher never paused
    assert "idle" not in ended or ended["idle"] <= 1, ended  # (the traffic never left idle_ms of silence)
    cut = [c for c in commits(spec.table_uri()) if c.get("ingest.ended_by") == "max_wait"]
    assert len(cut) >= 2
    run_until_caught_up(spec, instance)
    assert_mqtt_exactly_once(spec, publisher.sent)


def test_mqtt_kill_right_after_a_time_cut_commit_doubles_and_loses_nothing(lake, instance, sessions,
                                                                             tmp_path: Path):
    spec = mqtt_spec(batch={"max_messages": 50_000, "idle_ms": 500, "max_wait_seconds": 1.0})
    sessions.append(spec)
    register(spec)
    env = cli_env(spec, tmp_path, lake, INGEST_FAULT="after_target_commit")
    with ContinuousPublisher(spec, qos1_every=1) as publisher:
        crashed = ingest_cli(["run", spec.name], env)  # killed after its first commit, before the PUBACKs
        assert crashed.returncode == -9, crashed.stdout + crashed.stderr
        (first,) = commits(spec.table_uri())
        assert first["ingest.ended_by"] == "max_wait"  # cut by time, mid-stream
        committed = sum(f.height for f in landed(spec))
        # the next connection gets the crashed batch back (DUP=1) while new messages keep coming
        results, stats = direct_batch(spec)
        assert stats["skipped_duplicates"] == committed, (stats, committed)
        for _ in range(2):
            assert run_job(spec, instance, max_batches=2).success
    run_until_caught_up(spec, instance)
    assert_mqtt_exactly_once(spec, publisher.sent)


# ---------------------------------------------------------------- NATS work queue
class JetStreamPublisher:
    """Publishes to a subject every few milliseconds from a thread of its own; keeps the acknowledged sequences."""

    def __init__(self, subject: str, stream: str, interval: float = 0.005):
        self.subject, self.stream, self.interval = subject, stream, interval
        self.acked: set[tuple[int, int]] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()))

    async def _run(self) -> None:
        nc = await nats.connect(NATS_URL)
        js = nc.jetstream(timeout=30)
        i = 0
        try:
            while not self._stop.is_set():
                payload = b'{"id":%d,"event":"click","value":%d}' % (i, i % 100)
                ack = await js.publish(self.subject, payload)
                assert ack.stream == self.stream
                self.acked.add((0, ack.seq))
                i += 1
                await asyncio.sleep(self.interval)
        finally:
            await nc.close()

    def __enter__(self) -> JetStreamPublisher:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


def test_work_queue_batches_follow_the_bounds_under_steady_traffic(lake, instance):
    # Before: a batch ended as soon as the durable reported nothing pending, so steady traffic made a commit
    # per read cycle (~32 messages at 20 msg/s). Now a caught-up batch stays open until idle_ms without a
    # delivery or max_wait_seconds after its first message.
    spec = nats_spec("workqueue", batch={"max_messages": 100_000, "idle_ms": 500, "max_wait_seconds": 1.5})
    spec = spec.model_copy(update={"source": spec.source.model_copy(update={
        "nats": spec.source.nats.model_copy(update={"ack_wait_seconds": 30.0})})})
    ensure_exists(spec)
    with JetStreamPublisher(f"{spec.name}.evt", stream_of(spec)) as publisher:
        time.sleep(0.5)
        result = run_job(spec, instance, max_seconds=6.0)
        assert result.success, failure_message(result)
    ended = materialization(result, spec)["batches_ended_by"]
    assert ended.get("max_wait", 0) >= 2, ended
    assert set(ended) <= {"max_wait", "idle"}, ended
    run_until_caught_up(spec, instance)
    assert_exactly_once(spec, publisher.acked)


def test_queue_reader_timers():
    reader = _Reader(version=0, max_messages=100, max_bytes=None, idle=0.5, max_wait=2.0)
    now = time.monotonic()
    assert reader.next_timer(now) == float("inf")  # nothing delivered: the stall check decides
    reader.pending, reader.last_delivery, reader.cut_at = 3, now, now + 2.0
    assert reader.next_timer(now) == pytest.approx(2.0)  # more pending: only the time bound applies
    reader.on_timer(now + 1.0)
    assert not reader.finished
    reader.pending = 0  # caught up: idle_ms without a delivery ends it
    assert reader.next_timer(now) == pytest.approx(0.5)
    reader.on_timer(now + 0.6)
    assert reader.finished and reader.ended_by == "idle"
    late = _Reader(version=0, max_messages=100, max_bytes=None, idle=0.5, max_wait=2.0)
    late.pending, late.last_delivery, late.cut_at = 0, now + 1.9, now + 2.0
    late.on_timer(now + 2.0)  # still receiving, but the batch is two seconds old
    assert late.finished and late.ended_by == "max_wait"

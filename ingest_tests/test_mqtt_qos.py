"""MQTT QoS 0 publishers, against real Mosquitto brokers.

* The shipped broker (`upgrade_outgoing_qos true`) delivers a QoS 0 publish to the pipeline's QoS 1
  subscription at QoS 1: queued while no batch runs, held until the PUBACK after the commit, redelivered
  after a crash. So QoS 0 publishers get exactly once from the broker on, even across a kill -9.
* A broker that delivers QoS 0 (Mosquitto's default; here one of the test's own with `queue_qos0_messages
  true`, as an external broker would be set up): the rows say `_mqtt_qos` 0, batches count and warn, a kill
  -9 loses at most the QoS 0 messages the crashed run had received, and nothing is ever doubled — the
  redelivered QoS 1 messages are matched against the committed QoS 1 rows only.

Every payload is unique (it carries a sequence number), so target ∪ quarantine is compared as a multiset.
"""

from __future__ import annotations

import os
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import paho.mqtt.client as mqtt
import polars as pl
import pytest

from ingest_defs.config import PipelineSpec
from ingest_defs.ledger import Ledger
from ingest_defs.resources.brokers import DEFAULT_MQTT, source_for
from ingest_defs.sources.mqtt import PID_COLUMN, QOS_COLUMN, SYS_DROPPED, dropped_during, parse_sys_counters
from ingest_tests.conftest import (
    cli_env,
    failure_message,
    ingest_cli,
    landed,
    materialization,
    run_job,
    run_until_caught_up,
)
from ingest_tests.test_mqtt_pipeline import (
    OwnMosquitto,
    assert_exactly_once,
    direct_batch,
    mqtt_spec,
    payloads,
    register,
)
from ingest_tests.test_mqtt_pipeline import sessions as sessions  # noqa: PLC0414 - the fixture, re-exported

pytestmark = pytest.mark.usefixtures("stack")


def publish(spec: PipelineSpec, batch: list[bytes], qos: int | list[int]) -> list[bytes]:
    source = source_for(spec)
    try:
        assert source.publish(batch, qos=qos) == len(batch)  # QoS 1: PUBACKed; QoS 0: written, then a round trip
    finally:
        source.close()
    return batch


def mixed(start: int, count: int, every: int = 3) -> tuple[list[bytes], list[int]]:
    """Payloads start.., every `every`-th published at QoS 1, the rest at QoS 0."""
    return payloads(start, count), [1 if i % every == 0 else 0 for i in range(count)]


def raws(spec: PipelineSpec) -> pl.DataFrame:
    target, quarantine = landed(spec)
    cols = ["_raw", "_offset", QOS_COLUMN, PID_COLUMN]
    frames = [f.select(cols) for f in (target, quarantine) if f.height]
    return pl.concat(frames) if frames else pl.DataFrame(schema=dict.fromkeys(cols, pl.Int64) | {"_raw": pl.Binary})


def run_log(instance: dg.DagsterInstance, result: dg.ExecuteInProcessResult) -> str:
    return "\n".join(e.user_message for e in instance.all_logs(result.run_id))


# ---------------------------------------------------------------- the shipped broker upgrades QoS 0
def test_qos0_publishes_reach_the_shipped_broker_session_at_qos1_and_land_exactly_once_across_a_crash(
        lake, instance, sessions, tmp_path: Path):
    # The case: 200 messages at QoS 0 and 50 at QoS 1 published while no batch runs.
    spec = mqtt_spec(max_messages=100)
    sessions.append(spec)
    register(spec)
    batch, qos = mixed(0, 250, every=5)
    published = publish(spec, batch, qos)
    assert qos.count(0) == 200
    # kill -9 after the first batch's commit, before its PUBACKs: the broker redelivers it (DUP=1), QoS 0
    # publishes included, and the matcher skips it
    crashed = ingest_cli(["run", spec.name, "--max-batches", "1"], cli_env(spec, tmp_path, lake, INGEST_FAULT="after_target_commit"))
    assert crashed.returncode == -9, crashed.stdout + crashed.stderr
    assert raws(spec).height == 100
    results, stats = direct_batch(spec)
    assert stats["skipped_duplicates"] == 100, stats
    assert results[0].counters == {"qos0_messages": 0}
    run_until_caught_up(spec, instance)
    assert_exactly_once(spec, published)
    rows = raws(spec)
    assert rows[QOS_COLUMN].unique().to_list() == [1]  # delivered at the subscription's QoS
    assert rows[PID_COLUMN].null_count() == 0


# ---------------------------------------------------------------- a broker that delivers QoS 0
class Qos0Mosquitto(OwnMosquitto):
    """The stack's Mosquitto config, but delivering QoS 0 as QoS 0 and queueing it for offline sessions."""

    def __init__(self, root: Path):
        super().__init__(root)
        text = self.config.read_text().replace("upgrade_outgoing_qos true", "upgrade_outgoing_qos false")
        self.config.write_text(text + "\nqueue_qos0_messages true\nsys_interval 1\n")


@pytest.fixture
def qos0_broker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Qos0Mosquitto]:
    broker = Qos0Mosquitto(tmp_path / "mosquitto")
    broker.start()
    monkeypatch.setenv("MQTT_URL", broker.url)
    try:
        yield broker
    finally:
        broker.stop()


def test_qos0_published_while_no_batch_runs_lands_with_its_qos_counted_and_warned(lake, instance, qos0_broker):
    spec = mqtt_spec(max_messages=400)
    register(spec)
    batch, qos = mixed(0, 300)
    published = publish(spec, batch, qos)  # queued for the offline session (queue_qos0_messages)
    result = run_job(spec, instance)
    assert result.success, failure_message(result)
    assert_exactly_once(spec, published)
    rows = raws(spec)
    by_payload = dict(zip(rows["_raw"].to_list(), rows[QOS_COLUMN].to_list(), strict=True))
    assert by_payload == dict(zip(batch, qos, strict=True))  # the delivered QoS of every message
    qos0_rows = rows.filter(pl.col(QOS_COLUMN) == 0)
    assert qos0_rows[PID_COLUMN].null_count() == qos0_rows.height == 200  # QoS 0 carries no packet id
    assert rows.filter(pl.col(QOS_COLUMN) == 1)[PID_COLUMN].null_count() == 0
    meta = materialization(result, spec)
    assert meta["qos0_messages"] == 200
    assert "arrived at QoS 0: at most once" in run_log(instance, result)
    ledger = Ledger(spec.ledger_uri(), spec.name).frame()
    assert ledger["qos0_messages"].sum() == 200 and ledger["count"].sum() == 300
    assert meta["mqtt_broker_dropped_during_run"] == 0  # $SYS is readable on this broker
    # nothing is left over or acknowledged twice: the QoS 1 ones got their PUBACKs, QoS 0 needs none
    again = run_job(spec, instance)
    assert again.success and materialization(again, spec)["messages"] == 0


def test_qos0_crash_after_commit_doubles_nothing(lake, instance, qos0_broker, tmp_path: Path):
    # The crashed batch's QoS 1 messages come back DUP=1; its QoS 0 rows are in Delta but never come back.
    # The matcher compares the redeliveries with the committed QoS 1 rows only, so they line up and are
    # skipped (matched against all rows, the QoS 0 ones in between would break the alignment: doubles).
    spec = mqtt_spec(max_messages=400)
    register(spec)
    batch, qos = mixed(0, 360)  # one batch holds all of it: nothing delivered to the crashed run is outside it
    published = publish(spec, batch, qos)
    crashed = ingest_cli(["run", spec.name, "--max-batches", "1"],
                         cli_env(spec, tmp_path, lake, INGEST_FAULT="after_target_commit") | {"MQTT_URL": qos0_broker.url})
    assert crashed.returncode == -9, crashed.stdout + crashed.stderr
    assert raws(spec).height == 360
    results, stats = direct_batch(spec)
    assert (stats["skipped_duplicates"], results[0].messages) == (120, 0), stats
    more, more_qos = mixed(360, 90)
    published += publish(spec, more, more_qos)
    run_until_caught_up(spec, instance)
    assert_exactly_once(spec, published)  # QoS 0 ones included: they were committed before the crash


def test_qos0_kill_mid_batch_loses_at_most_that_batchs_qos0_and_doubles_nothing(lake, instance, qos0_broker,
                                                                                tmp_path: Path):
    spec = mqtt_spec(max_messages=1000)
    register(spec)
    batch, qos = mixed(0, 300)
    first = publish(spec, batch, qos)
    # killed after reading its batch (everything published so far), before any commit
    crashed = ingest_cli(["run", spec.name, "--max-batches", "1"],
                         cli_env(spec, tmp_path, lake, INGEST_FAULT="after_read") | {"MQTT_URL": qos0_broker.url})
    assert crashed.returncode == -9, crashed.stdout + crashed.stderr
    assert raws(spec).is_empty()
    more, more_qos = mixed(300, 150)
    second = publish(spec, more, more_qos)
    run_until_caught_up(spec, instance)
    got = Counter(raws(spec)["_raw"].to_list())
    assert max(got.values()) == 1, "doubled"
    assert not set(got) - set(first) - set(second), "unexpected rows"
    qos1 = {p for p, q in zip(first, qos, strict=True) if q} | {p for p, q in zip(second, more_qos, strict=True) if q}
    assert qos1 <= set(got), "a QoS 1 message was lost"
    lost = set(first) - set(got)
    crashed_qos0 = {p for p, q in zip(first, qos, strict=True) if not q}
    assert lost <= crashed_qos0, "lost something other than the crashed batch's QoS 0 messages"
    assert set(second) <= set(got)  # published after the crash: all landed
    assert lost, "the crashed batch's QoS 0 messages cannot come back (else this test proves nothing)"
    offsets = sorted(raws(spec)["_offset"].to_list())
    assert offsets == list(range(len(offsets)))


class ContinuousPublisher:
    """One connection publishing without pause (a message every `interval` s, every `qos1_every`-th at QoS 1,
    the rest at QoS 0) until stopped: traffic that never leaves a pipeline idle."""

    def __init__(self, spec: PipelineSpec, interval: float = 0.002, qos1_every: int = 4):
        from ingest_defs.sources.mqtt import parse_url, publish_topic

        self.topic = publish_topic(spec.source.mqtt.topics[0], 0)
        self.interval, self.qos1_every = interval, qos1_every
        self.sent: list[bytes] = []
        self._stop = threading.Event()
        host, port, _ = parse_url(os.environ.get("MQTT_URL", DEFAULT_MQTT))
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"pub-{spec.name}",
                                  protocol=mqtt.MQTTv5)
        self.client.max_inflight_messages_set(1000)
        self.client.connect(host, port)
        self.client.loop_start()
        self._thread = threading.Thread(target=self._run)

    def __enter__(self) -> ContinuousPublisher:
        self._thread.start()
        return self

    def _run(self) -> None:
        infos = []
        seq = 0
        while not self._stop.is_set():
            payload = payloads(seq, 1)[0]
            infos.append(self.client.publish(self.topic, payload, qos=1 if seq % self.qos1_every == 0 else 0))
            self.sent.append(payload)
            seq += 1
            time.sleep(self.interval)
        for info in infos:
            info.wait_for_publish(30)  # QoS 1: PUBACKed; QoS 0: written
        done = threading.Event()
        self.client.on_subscribe = lambda *_: done.set()
        self.client.subscribe(f"ingest/_barrier/{self.topic}", qos=0)  # the broker handled all before it
        assert done.wait(30)

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
        self.client.disconnect()
        self.client.loop_stop()


def test_runs_ending_under_continuous_qos0_traffic_lose_nothing(lake, instance, qos0_broker):
    # A run that ends normally (batch budget, caught up) hands the QoS 0 messages already delivered to it
    # over as a last batch instead of dropping them with the connection: nothing is lost without a crash.
    spec = mqtt_spec(batch={"max_messages": 200, "idle_ms": 200, "max_wait_seconds": 1.0})
    register(spec)
    drained = 0
    with ContinuousPublisher(spec) as publisher:
        for _ in range(4):
            result = run_job(spec, instance, max_batches=2)  # ends while the publisher is still going
            assert result.success, failure_message(result)
            drained += materialization(result, spec)["batches_ended_by"].get("drain", 0)
    run_until_caught_up(spec, instance)
    assert_exactly_once(spec, publisher.sent)
    assert raws(spec)[QOS_COLUMN].to_list().count(0) > 500
    assert drained >= 3  # the runs did end with QoS 0 messages delivered and not yet taken


def test_sys_counters_and_drops_during_a_run():
    values = {"$SYS/broker/publish/messages/dropped": b"12", "$SYS/broker/uptime": b"345 seconds",
              "$SYS/broker/heap/current": b"99", "$SYS/other": b"1"}
    assert parse_sys_counters(values) == {"broker_dropped_messages": 12, "broker_uptime_s": 345,
                                          "broker_heap_bytes": 99}
    assert dropped_during(12, []) == (0, True)
    assert dropped_during(12, [15, 20]) == (8, True)
    assert dropped_during(None, [15, 20]) == (6, False)  # at least one before 15 was published, then 5
    assert dropped_during(20, [3]) == (3, True)  # the broker restarted: its counter starts again


def test_broker_drops_are_reported(lake, instance, qos0_broker):
    # A full client queue makes the broker drop messages the pipeline never sees: only $SYS counts them.
    qos0_broker.stop()
    text = qos0_broker.config.read_text().replace("max_queued_messages 0", "max_queued_messages 50")
    qos0_broker.config.write_text(text)
    qos0_broker.start()
    spec = mqtt_spec(max_messages=400)
    register(spec)
    source = source_for(spec)
    watch = source.loss_watch()  # what a run starts
    assert watch.start == 0
    published = publish(spec, payloads(0, 120), 1)  # the offline session's queue takes 50
    deadline = time.monotonic() + 10
    while len(watch.got.get(SYS_DROPPED, [])) <= watch.seen_at_start and time.monotonic() < deadline:
        time.sleep(0.2)  # $SYS is refreshed every sys_interval (1 s here)
    meta, warning = watch.finish()  # ... and what it reports when it ends
    assert meta == {"mqtt_broker_dropped_total": 70, "mqtt_broker_dropped_during_run": 70}
    assert warning is not None and "dropped 70 messages during this run" in warning
    assert "70 in total" in source.status_note()
    result = run_job(spec, instance)
    assert result.success, failure_message(result)
    meta = materialization(result, spec)
    assert (meta["mqtt_broker_dropped_total"], meta["mqtt_broker_dropped_during_run"]) == (70, 0)
    assert_exactly_once(spec, published[:50])


def test_a_ledger_written_before_the_qos0_column_gains_it_on_the_next_append(tmp_path: Path):
    from datetime import UTC, datetime

    from deltalake import write_deltalake

    from ingest_defs.ledger import LEDGER_SCHEMA, ledger_rows
    from ingest_defs.sources.base import PartitionRange

    def rows(batch: str, qos0: int | None) -> list[dict]:
        return ledger_rows(pipeline="p", batch_id=batch, partition_key="2026-01-01", mode="live",
                           status="committed", trigger="t", run_id="r", generation=None,
                           covered=[PartitionRange("p/mqtt/c", 0, 0, 9)], stats={}, rows_written=10,
                           rows_quarantined=0, target_version=1, quarantine_version=None,
                           ingested_at=datetime.now(UTC), qos0_messages=qos0)

    uri = str(tmp_path / "ledger")
    old_schema = {k: v for k, v in LEDGER_SCHEMA.items() if k != "qos0_messages"}
    old = pl.DataFrame([{k: v for k, v in r.items() if k in old_schema} for r in rows("b1", None)], schema=old_schema)
    write_deltalake(uri, old.to_arrow())  # a ledger as the first release wrote it
    ledger = Ledger(uri, "p")
    ledger.append(rows("b2", 7))
    frame = ledger.frame().sort("batch_id")
    assert frame["batch_id"].to_list() == ["b1", "b2"]
    assert frame["qos0_messages"].to_list() == [None, 7]
    assert [b.batch_id for b in ledger.live_batches()] == ["b1", "b2"]


def test_a_pipeline_with_probe_off_gets_a_run_per_tick_without_the_sensor_taking_delivery(lake, instance, qos0_broker):
    from ingest_defs.factory import build_definitions
    from ingest_defs.resources.brokers import resources_from_env

    spec = mqtt_spec(batch={"max_messages": 400, "idle_ms": 300, "linger_seconds": 0})  # a sensor's run lingers 60 s once caught up; not this test's subject
    spec = spec.model_copy(update={"source": spec.source.model_copy(update={
        "mqtt": spec.source.mqtt.model_copy(update={"probe": False})})})
    sensor = build_definitions({spec.name: spec}).resolve_sensor_def(f"{spec.name}_sensor")
    resources = resources_from_env()
    with dg.build_sensor_context(instance=instance, resources=resources) as ctx:
        first = sensor(ctx)  # asks for a run without connecting; the run registers the session
    assert isinstance(first, dg.RunRequest)
    assert run_job(spec, instance).success
    batch, qos = mixed(0, 90)
    published = publish(spec, batch, qos)
    for _ in range(2):  # ticks while QoS 0 messages wait: a look at the session would have taken them
        with dg.build_sensor_context(instance=instance, resources=resources) as ctx:
            request = sensor(ctx)
        assert isinstance(request, dg.RunRequest)
    result = run_job(spec, instance, **request.run_config["ops"][f"ingest_{spec.name}"]["config"])
    assert result.success, failure_message(result)
    assert_exactly_once(spec, published)

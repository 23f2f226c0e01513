"""MQTT → Delta against a real Mosquitto: every published payload exactly once, across batches, crashes,
full batches whose extra deliveries come back DUP=1, broker restarts and wildcard topics.

MQTT has no broker offsets, so every payload here is unique (it carries a sequence number) and the check
is multiset equality between what the broker acknowledged to the publisher and `_raw` in target ∪
quarantine, plus the pipeline's own `_offset`s being exactly 0..n-1.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import dagster as dg
import paho.mqtt.client as mqtt
import polars as pl
import pytest
from deltalake import DeltaTable
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from ingest_defs.config import PipelineSpec, parse_pipeline
from ingest_defs.lifecycle import BatchRunner
from ingest_defs.resources.brokers import DEFAULT_MQTT, source_for
from ingest_defs.sink import DeltaTableSink
from ingest_defs.sources.mqtt import HASH_COLUMN, PID_COLUMN, parse_url, payload_hash
from ingest_tests.conftest import (
    cli_env,
    failure_message,
    ingest_cli,
    landed,
    materialization,
    run_job,
    run_until_caught_up,
    unique,
)

pytestmark = pytest.mark.usefixtures("stack")

SCHEMA = {"columns": {
    "sensor_id": {"dtype": "string", "nullable": False},
    "temperature": {"dtype": "float64", "checks": {"in_range": {"min_value": -50, "max_value": 150}}},
    "humidity": {"dtype": "float64"},
    "timestamp": {"dtype": "string"},
}}
# One bad kind per reason the quarantine must give; each payload carries its sequence number (unique).
BAD = {
    "invalid JSON": lambda seq: b'{"seq": %d, "sensor_id": "s", "temperature": ' % seq,
    "wrong type": lambda seq: json.dumps({"seq": seq, "sensor_id": "s", "temperature": "hot"}).encode(),
    "check failed: temperature": lambda seq: json.dumps({"seq": seq, "sensor_id": "s", "temperature": 999.5}).encode(),
    "not UTF-8": lambda seq: b'{"seq": %d, "sensor_id": "s\xff\xfe"}' % seq,
    "not_nullable": lambda seq: json.dumps({"seq": seq, "temperature": 20.0}).encode(),
}


def mqtt_spec(name: str | None = None, max_messages: int = 300, topics: list[str] | None = None,
              **overrides: Any) -> PipelineSpec:
    name = name or unique("mq")
    raw: dict[str, Any] = {
        "source": {"mqtt": {"topics": topics or [f"it/{name}/+/temperature"], "session_expiry_seconds": 3600}},
        "schema": SCHEMA,
        "table": f"bronze/{name}",
        "batch": {"max_messages": max_messages, "idle_ms": 300},
        "trigger": {"sensor": {"interval_seconds": 5}},
    }
    raw.update(overrides)
    return parse_pipeline(name, raw)


def payloads(start: int, count: int, bad_every: int = 0) -> list[bytes]:
    out = []
    kinds = list(BAD.values())
    for seq in range(start, start + count):
        if bad_every and seq % bad_every == bad_every - 1:
            out.append(kinds[(seq // bad_every) % len(kinds)](seq))
        else:
            out.append(json.dumps({"sensor_id": f"sensor-{seq % 5}", "temperature": round(15 + (seq % 40) * 0.25, 2),
                                   "humidity": 40.5, "timestamp": "2024-05-01T12:00:00+00:00", "seq": seq},
                                  separators=(",", ":")).encode())
    return out


def register(spec: PipelineSpec) -> None:
    source = source_for(spec)
    try:
        source.ensure_exists()
    finally:
        source.close()


def publish(spec: PipelineSpec, batch: list[bytes]) -> list[bytes]:
    source = source_for(spec)
    try:
        assert source.publish(batch) == len(batch)  # every PUBACK received
    finally:
        source.close()
    return batch


def assert_exactly_once(spec: PipelineSpec, published: list[bytes]) -> tuple[pl.DataFrame, pl.DataFrame]:
    """target ∪ quarantine holds each published payload exactly once (and nothing else), offsets 0..n-1."""
    target, quarantine = landed(spec)
    raws = (target["_raw"].to_list() if target.height else []) + (quarantine["_raw"].to_list() if quarantine.height else [])
    got, want = Counter(raws), Counter(published)
    doubled = sum((got - want).values())
    lost = sum((want - got).values())
    assert got == want, f"lost {lost}, doubled or unexpected {doubled} (of {len(published)})"
    offsets = sorted((target["_offset"].to_list() if target.height else [])
                     + (quarantine["_offset"].to_list() if quarantine.height else []))
    assert offsets == list(range(len(published))), "offsets are not exactly 0..n-1"
    app_id = f"{spec.name}/mqtt/{spec.source.mqtt.client_id or 'ingest-' + spec.name}"
    assert DeltaTable(spec.table_uri()).transaction_version(app_id) == len(published) - 1
    return target, quarantine


def batch_sizes(spec: PipelineSpec) -> dict[str, int]:
    target, quarantine = landed(spec)
    frames = [f.select("_batch_id") for f in (target, quarantine) if f.height]
    counts = pl.concat(frames).group_by("_batch_id").len()
    return dict(zip(counts["_batch_id"].to_list(), counts["len"].to_list(), strict=True))


def direct_batch(spec: PipelineSpec) -> tuple[Any, dict[str, int]]:
    """One batch through the same BatchRunner the asset uses, keeping the source to inspect its stats."""
    source = source_for(spec)
    runner = BatchRunner(spec, source, DeltaTableSink(spec.table_uri(), spec.name, "target"),
                         DeltaTableSink(spec.quarantine_uri(), spec.name, "quarantine"))
    try:
        results = runner.run(max_batches=1)
    finally:
        source.close()
    return results, source.stats


@pytest.fixture
def sessions() -> Iterator[list[PipelineSpec]]:
    """Specs whose broker sessions are deleted after the test (the shared broker persists them)."""
    specs: list[PipelineSpec] = []
    yield specs
    for spec in specs:
        host, port, _ = parse_url(os.environ.get("MQTT_URL", DEFAULT_MQTT))
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=spec.source.mqtt.client_id or f"ingest-{spec.name}",
                             protocol=mqtt.MQTTv5)
        try:
            client.connect(host, port, clean_start=True)  # session expiry 0: the session ends with this
            client.loop(0.2)
            client.disconnect()
        except OSError:
            pass


# ---------------------------------------------------------------- 1. exact set equality over batches
def test_batches_land_every_payload_once_with_contiguous_offsets(lake, instance, sessions):
    spec = mqtt_spec(max_messages=300)
    sessions.append(spec)
    register(spec)  # the session exists before anything is published: everything is queued
    published_from = datetime.now(UTC)
    published = publish(spec, payloads(0, 700, bad_every=20))
    first = run_job(spec, instance, max_batches=2)  # part of the backlog ...
    assert first.success, failure_message(first)
    assert materialization(first, spec)["messages"] == 600
    published += publish(spec, payloads(700, 450, bad_every=20))  # ... then more arrives between batches
    runs = run_until_caught_up(spec, instance)
    assert len(runs) >= 2
    landed_by = datetime.now(UTC)
    target, quarantine = assert_exactly_once(spec, published)
    # bad payloads are quarantined with their reason, good ones are in the target
    reasons = dict(zip(quarantine["_raw"].to_list(), quarantine["_error"].to_list(), strict=True))
    kinds = list(BAD)
    bad = {p: kinds[(seq // 20) % len(kinds)] for seq, p in enumerate(published) if seq % 20 == 19}
    assert set(reasons) == set(bad)
    for payload, expected in bad.items():
        assert expected in reasons[payload], (payload, reasons[payload])
    assert target.height == len(published) - len(bad)
    # standard columns
    assert target["_source"].unique().to_list() == ["mqtt"]
    assert target["_partition"].unique().to_list() == [0]
    assert target["_key"].null_count() == target.height
    assert target["_timestamp"].dtype == pl.Datetime("us", "UTC")
    assert target["_timestamp"].null_count() == 0
    received = target["_timestamp"]  # receive times: after the first publish, before the last run ended
    assert published_from - timedelta(milliseconds=1) <= received.min() and received.max() <= landed_by
    assert target["_batch_id"].n_unique() >= 3
    assert all(s.startswith(f"it/{spec.name}/sensor-") for s in target["_stream"].unique().to_list())
    for frame in (target, quarantine):  # fingerprints are in the rows of both tables
        assert frame[PID_COLUMN].dtype == pl.Int32 and frame[HASH_COLUMN].dtype == pl.Int64
        assert frame[PID_COLUMN].null_count() == 0 and frame[HASH_COLUMN].null_count() == 0
        assert frame[HASH_COLUMN].to_list() == [payload_hash(p) for p in frame["_raw"].to_list()]
    # nothing is left on the broker and nothing comes twice
    again = run_job(spec, instance)
    assert again.success and materialization(again, spec)["messages"] == 0


# ---------------------------------------------------------------- 2. crash between Delta commit and PUBACKs
def test_crash_after_delta_commit_before_pubacks_doubles_nothing(lake, instance, sessions, tmp_path: Path):
    spec = mqtt_spec(max_messages=300)
    sessions.append(spec)
    register(spec)
    published = publish(spec, payloads(0, 800, bad_every=25))
    env = cli_env(spec, tmp_path, lake, INGEST_FAULT="after_target_commit")
    crashed = ingest_cli(["run", spec.name, "--max-batches", "1"], env)
    assert crashed.returncode == -9, crashed.stdout + crashed.stderr
    target, quarantine = landed(spec)
    assert target.height + quarantine.height == 300  # the commit happened, the PUBACKs did not
    # Crash again: the broker redelivers those 300 (DUP=1); they are recognised, skipped and acknowledged,
    # and the next 300 are committed and not acknowledged.
    crashed = ingest_cli(["run", spec.name, "--max-batches", "1"], env)
    assert crashed.returncode == -9, crashed.stdout + crashed.stderr
    target, quarantine = landed(spec)
    assert target.height + quarantine.height == 600
    # only the second crash's batch comes back as already written; the rest is taken
    results, stats = direct_batch(spec)
    assert stats["skipped_duplicates"] == 300, stats
    assert results[0].messages == 200
    run_until_caught_up(spec, instance)
    assert_exactly_once(spec, published)
    # the PUBACKs went out: new messages are the only thing a later batch sees
    published += publish(spec, payloads(800, 50))
    results, stats = direct_batch(spec)
    assert (results[0].messages, stats["redelivered"]) == (50, 0), stats
    assert_exactly_once(spec, published)


def test_crash_between_quarantine_and_target_commit_doubles_nothing(lake, instance, sessions, tmp_path: Path):
    # The quarantine is ahead of the target: those rows are not in the matched tail (it stops at the
    # target's version), so the batch is taken again with the same offsets and the lifecycle's fence
    # keeps the quarantined ones single.
    spec = mqtt_spec(max_messages=300)
    sessions.append(spec)
    register(spec)
    published = publish(spec, payloads(0, 500, bad_every=10))
    env = cli_env(spec, tmp_path, lake, INGEST_FAULT="after_quarantine_commit")
    crashed = ingest_cli(["run", spec.name, "--max-batches", "1"], env)
    assert crashed.returncode == -9, crashed.stdout + crashed.stderr
    target, quarantine = landed(spec)
    assert target.is_empty() and quarantine.height == 30
    run_until_caught_up(spec, instance)
    assert_exactly_once(spec, published)


def test_sensor_registers_the_session_and_asks_for_runs_only_when_messages_wait(lake, instance, sessions):
    from ingest_defs.factory import build_definitions
    from ingest_defs.resources.brokers import resources_from_env

    spec = mqtt_spec(batch={"max_messages": 300, "idle_ms": 300, "linger_seconds": 0})  # a sensor's run lingers 60 s once caught up; not this test's subject
    sessions.append(spec)
    sensor = build_definitions({spec.name: spec}).resolve_sensor_def(f"{spec.name}_sensor")
    resources = resources_from_env()
    with dg.build_sensor_context(instance=instance, resources=resources) as ctx:
        assert isinstance(sensor(ctx), dg.SkipReason)  # first tick registers the session; nothing waits
    published = publish(spec, payloads(0, 500))  # queued for the session the sensor registered
    with dg.build_sensor_context(instance=instance, resources=resources) as ctx:
        request = sensor(ctx)
        cursor = ctx.cursor
    assert isinstance(request, dg.RunRequest)
    result = run_job(spec, instance, **request.run_config["ops"][f"ingest_{spec.name}"]["config"])
    assert result.success, failure_message(result)
    run_until_caught_up(spec, instance)
    assert_exactly_once(spec, published)
    with dg.build_sensor_context(instance=instance, resources=resources, cursor=cursor) as ctx:
        assert isinstance(sensor(ctx), dg.SkipReason)


# ---------------------------------------------------------------- 3. full batches: DUP=1 but never written
def test_deliveries_beyond_a_full_batch_come_back_and_are_written(lake, instance, sessions):
    spec = mqtt_spec(max_messages=100)
    sessions.append(spec)
    register(spec)
    published = publish(spec, payloads(0, 450))
    # Two batches in one connection: after the first PUBACKs Mosquitto stops honouring Receive Maximum
    # and sends the rest of the queue; the second batch stops at 100 and the run ends with the broker
    # holding those deliveries in flight, unacknowledged.
    run = run_job(spec, instance, max_batches=2)
    assert run.success and materialization(run, spec)["messages"] == 200
    results, stats = direct_batch(spec)
    assert stats["redelivered"] > 0, stats  # they came back with DUP=1 ...
    assert stats["skipped_duplicates"] == 0, stats  # ... and were not mistaken for written ones
    assert results[0].messages == 100
    run_until_caught_up(spec, instance)
    assert_exactly_once(spec, published)


def test_session_takeovers_during_a_run_double_and_lose_nothing(lake, instance, sessions):
    # Another connection with the pipeline's client id (a second run, a racing sensor) takes the session
    # over: the run loses its connection mid-read or mid-ack, and PUBACKs written into the dropped
    # connection vanish, so redelivered runs span several committed batches.
    spec = mqtt_spec(max_messages=400)
    sessions.append(spec)
    register(spec)
    published = publish(spec, payloads(0, 8000, bad_every=50))
    host, port, _ = parse_url(os.environ.get("MQTT_URL", DEFAULT_MQTT))
    done = threading.Event()

    def take_over() -> None:
        while not done.wait(0.4):
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = 3600
            other = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"ingest-{spec.name}",
                                protocol=mqtt.MQTTv5, manual_ack=True)  # never acknowledges anything
            other.connect(host, port, clean_start=False, properties=props)
            other.loop(0.02)
            other.disconnect()

    source = source_for(spec)
    runner = BatchRunner(spec, source, DeltaTableSink(spec.table_uri(), spec.name, "target"),
                         DeltaTableSink(spec.quarantine_uri(), spec.name, "quarantine"))
    thief = threading.Thread(target=take_over)
    thief.start()
    try:
        deadline = time.monotonic() + 4
        while time.monotonic() < deadline:
            runner.run()  # ends early when a connection drops mid-batch; the next run reconnects
    finally:
        done.set()
        thief.join()
        source.close()
    assert source.stats["connections"] > 2, source.stats  # the session was taken over while the run read
    assert source.stats["skipped_duplicates"] > 0, source.stats  # and committed batches came back
    run_until_caught_up(spec, instance)
    assert_exactly_once(spec, published)


# ---------------------------------------------------------------- 5. max_messages is a hard cap
def test_a_batch_never_exceeds_max_messages(lake, instance, sessions):
    spec = mqtt_spec(max_messages=150)
    sessions.append(spec)
    register(spec)
    published = publish(spec, payloads(0, 1000, bad_every=10))
    # a multi-batch run (the broker floods after the first PUBACKs), then a reconnect that resends
    # everything in flight at once, ignoring Receive Maximum
    assert run_job(spec, instance, max_batches=3).success
    run_until_caught_up(spec, instance)
    assert_exactly_once(spec, published)
    sizes = batch_sizes(spec)
    assert max(sizes.values()) <= 150, sizes
    assert sum(sizes.values()) == 1000


# ---------------------------------------------------------------- 6. wildcards, headers, retained
def test_wildcard_topics_land_in_stream_with_user_properties(lake, instance, sessions):
    name = unique("mqw")
    spec = mqtt_spec(name, topics=[f"w/{name}/+/temperature", f"w2/{name}/#"])
    sessions.append(spec)
    host, port, _ = parse_url(os.environ.get("MQTT_URL", DEFAULT_MQTT))
    pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"pub-{name}", protocol=mqtt.MQTTv5)
    pub.connect(host, port)
    pub.loop_start()
    try:
        retained_topic = f"w/{name}/r1/temperature"
        retained = payloads(10_000, 1)[0]
        pub.publish(retained_topic, retained, qos=1, retain=True).wait_for_publish(10)
        register(spec)  # the subscription is created now: the retained message is delivered once
        expected: dict[bytes, str] = {retained: retained_topic}
        topics = [f"w/{name}/s1/temperature", f"w/{name}/s2/temperature", f"w2/{name}/a", f"w2/{name}/a/b/c"]
        infos = []
        for i, payload in enumerate(payloads(0, 40)):
            topic = topics[i % len(topics)]
            props = Properties(PacketTypes.PUBLISH)
            props.UserProperty = ("seq", str(i))
            props.UserProperty = ("site", "nz")
            infos.append(pub.publish(topic, payload, qos=1, properties=props))
            expected[payload] = topic
        ignored = payloads(500, 3)
        for payload in ignored:  # matches neither filter
            infos.append(pub.publish(f"w/{name}/s1/humidity", payload, qos=1))
        for info in infos:
            info.wait_for_publish(10)
        run_until_caught_up(spec, instance)
        target, _ = assert_exactly_once(spec, list(expected))
        assert dict(zip(target["_raw"].to_list(), target["_stream"].to_list(), strict=True)) == expected
        headers = {row["_raw"]: row["_headers"] for row in target.iter_rows(named=True)}
        assert headers[retained] is None
        first = payloads(0, 1)[0]
        assert headers[first] == [{"key": "seq", "value": b"0"}, {"key": "site", "value": b"nz"}]
        # later batches do not get the retained message again (no re-subscribe while the session exists)
        more = payloads(100, 5)
        for payload in more:
            pub.publish(topics[0], payload, qos=1).wait_for_publish(10)
            expected[payload] = topics[0]
        run_until_caught_up(spec, instance)
        assert_exactly_once(spec, list(expected))
    finally:
        pub.publish(retained_topic, b"", qos=1, retain=True).wait_for_publish(10)  # clear it
        pub.disconnect()
        pub.loop_stop()


# ---------------------------------------------------------------- 4. broker restarts (a broker of our own)
class OwnMosquitto:
    """A Mosquitto of this test's own (never the shared one), with the stack's config, on a free port."""

    def __init__(self, root: Path):
        from ingest_defs.stack.manager import mosquitto_native_config

        self.root, self.data = root, root / "data"
        self.data.mkdir(parents=True)
        self.port = _free_port()
        self.config = root / "mosquitto.conf"
        self.config.write_text(mosquitto_native_config(self.port, self.data))
        self.binary = shutil.which("mosquitto") or shutil.which("mosquitto", path="/usr/sbin:/usr/local/sbin")
        assert self.binary, "mosquitto is not installed"
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> None:
        log = (self.root / "mosquitto.log").open("ab")
        self.proc = subprocess.Popen([self.binary, "-c", str(self.config)], stdout=log, stderr=log)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, (self.root / "mosquitto.log").read_text()
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.05)
        raise AssertionError("own mosquitto did not start")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(15)
        self.proc = None


def _free_port() -> int:
    for port in range(18830 + os.getpid() % 500, 19900):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError("no free port")


@pytest.fixture
def own_broker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[OwnMosquitto]:
    broker = OwnMosquitto(tmp_path / "mosquitto")
    broker.start()
    monkeypatch.setenv("MQTT_URL", broker.url)  # source_for / resources_from_env / run_job use it
    try:
        yield broker
    finally:
        broker.stop()


def test_broker_restart_between_batches_loses_nothing(lake, instance, own_broker: OwnMosquitto):
    spec = mqtt_spec(max_messages=300)
    register(spec)
    published = publish(spec, payloads(0, 500, bad_every=30))
    run = run_job(spec, instance, max_batches=1)
    assert run.success and materialization(run, spec)["messages"] == 300
    published += publish(spec, payloads(500, 200))  # queued for the offline-between-batches session
    own_broker.stop(signal.SIGTERM)  # a clean stop saves sessions, subscriptions and queues
    assert (own_broker.data / "mosquitto.db").exists()
    own_broker.start()
    published += publish(spec, payloads(700, 100))
    runs = run_until_caught_up(spec, instance)
    assert all("gaps" not in materialization(r, spec) for r in runs)  # the session survived
    assert_exactly_once(spec, published)


def test_a_lost_session_is_a_gap_handled_by_on_gap(lake, instance, own_broker: OwnMosquitto):
    spec = mqtt_spec(max_messages=300)
    register(spec)
    published = publish(spec, payloads(0, 50))
    run_until_caught_up(spec, instance)
    publish(spec, payloads(50, 20))  # queued, then lost with the session
    own_broker.stop(signal.SIGTERM)
    (own_broker.data / "mosquitto.db").unlink()
    own_broker.start()
    failed = run_job(spec, instance)
    assert not failed.success
    assert "lost the persistent session" in failure_message(failed) and "on_gap" in failure_message(failed)
    failed_again = run_job(spec, instance)  # not healed by the failed attempt
    assert not failed_again.success
    skipping = spec.model_copy(update={"on_gap": "skip"})
    ok = run_job(skipping, instance)
    assert ok.success, failure_message(ok)
    assert "lost the persistent session" in json.dumps(materialization(ok, skipping)["gaps"])
    published += publish(spec, payloads(70, 30))  # the session is registered again: queued and ingested
    run_until_caught_up(skipping, instance)
    assert_exactly_once(spec, published)

"""MQTT: our batch path (read → decode → validate → Delta commit → PUBACKs) against a bare paho v5 drain of
the same messages, in the same run.

MQTT has one queue per session, so two persistent sessions subscribe to the same unique topic filter
before anything is published: the pipeline's (registered by `source.ensure_exists()`) and a bare paho one
(clean_start=False, session expiry, QoS 1, manual_ack). The bare session is drained with paho's own loop,
acknowledging every message; the pipeline's with `BatchRunner.run` until caught up.

A: in-run ratio, from the first broker read to the last ack. B (`ingest run` in a fresh process) is not
measured for MQTT: `dagster_rate` / `ratio_b` are None.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from ingest_defs.bench.common import SCHEMA, batch_runner, publish_in_chunks
from ingest_defs.config import parse_pipeline
from ingest_defs.resources.brokers import source_for

SESSION_EXPIRY = 3600


class _BareSession:
    """A plain paho v5 persistent session: QoS 1, manual acks, one ack per message."""

    def __init__(self, host: str, port: int, client_id: str, topic_filter: str):
        self.host, self.port, self.client_id, self.topic_filter = host, port, client_id, topic_filter
        self.seen = 0
        self.nbytes = 0
        self.connack: Any = None
        self.suback: Any = None
        self.client: mqtt.Client | None = None

    def _connect(self, expiry: int = SESSION_EXPIRY) -> mqtt.Client:
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=mqtt.MQTTv5,
                             manual_ack=True)
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = expiry
        props.ReceiveMaximum = 65535
        client.on_connect = lambda _c, _u, flags, reason, _p: setattr(self, "connack", (flags, reason))
        client.on_subscribe = lambda _c, _u, _m, reasons, _p: setattr(self, "suback", reasons)

        def on_message(c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
            self.seen += 1
            self.nbytes += len(msg.payload)
            c.ack(msg.mid, msg.qos)

        client.on_message = on_message
        self.connack = None
        client.connect(self.host, self.port, keepalive=60, clean_start=False, properties=props)
        self._until(client, lambda: self.connack is not None, 15)
        self.client = client
        return client

    @staticmethod
    def _until(client: mqtt.Client, done: Any, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            if time.monotonic() > deadline:
                raise TimeoutError("MQTT broker did not answer")
            client.loop(0.1)

    def register(self) -> None:
        client = self._connect()
        client.subscribe(self.topic_filter, options=mqtt.SubscribeOptions(qos=1, retainHandling=1))
        self._until(client, lambda: self.suback is not None, 15)
        client.disconnect()
        client.loop(0.1)

    def drain(self, messages: int) -> float:
        """Connect to the stored session and take `messages` messages, acking each. Returns msgs/s."""
        start = time.perf_counter()
        client = self._connect()
        self._until(client, lambda: self.seen >= messages, 600)
        took = time.perf_counter() - start
        client.disconnect()
        client.loop(0.1)
        return messages / took

    def delete(self) -> None:
        """Best effort: end the session (clean start, expiry 0)."""
        try:
            client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=mqtt.MQTTv5)
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = 0
            client.connect(self.host, self.port, keepalive=60, clean_start=True, properties=props)
            client.loop(0.5)
            client.disconnect()
            client.loop(0.1)
        except Exception:  # noqa: BLE001 - best effort
            pass


def bench_mqtt(messages: int = 200_000, batch: int = 50_000) -> dict[str, Any]:
    ts = int(time.time())
    topic_filter = f"bench_{ts}/+"
    lake = Path(tempfile.mkdtemp(prefix="bench-lake-"))
    spec = parse_pipeline("bench_mqtt", {
        "source": {"mqtt": {"topics": [topic_filter], "client_id": f"bench-path-{ts}",
                            "session_expiry_seconds": SESSION_EXPIRY}},
        "schema": SCHEMA, "table": str(lake / "a" / "bronze"),
        "batch": {"max_messages": batch, "idle_ms": 300, "max_run_seconds": 3600}})
    source = source_for(spec)
    bare = _BareSession(source.host, source.port, f"bench-bare-{ts}", topic_filter)
    try:
        # both sessions exist before the first publish, so both queue every message
        source.ensure_exists()
        bare.register()
        publish_in_chunks(source, topic_filter, messages)
        bare_rate = bare.drain(messages)
        runner = batch_runner(spec, source)
        runner.identity()
        start = time.monotonic()
        results = runner.run()
        wall_seconds = time.monotonic() - start
        # first broker read → last ack; the trailing idle_ms that tells "caught up" is not part of it
        path_seconds = max(r.started_monotonic + r.duration_s for r in results if r.messages) - start
        landed = sum(r.rows_written + r.rows_quarantined for r in results)
        assert landed == messages, f"landed {landed} of {messages}"
    finally:
        source.close()
        bare.delete()
        _BareSession(bare.host, bare.port, spec.source.mqtt.client_id, topic_filter).delete()
    path_rate = messages / path_seconds
    return {
        "name": "mqtt (QoS 1, persistent session)",
        "messages": messages, "batch": batch, "batches": len([r for r in results if r.messages]),
        "bare_rate": bare_rate, "path_rate": path_rate, "ratio": path_rate / bare_rate, "target": 0.9,
        "idle_ms": spec.batch.idle_ms, "path_rate_wall": messages / wall_seconds,
        "batch_seconds": round(sum(r.duration_s for r in results), 2), "dagster_rate": None, "ratio_b": None,
    }

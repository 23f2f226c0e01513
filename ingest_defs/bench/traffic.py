"""Traffic for the freshness bench and the soak: one long-lived publisher per pipeline (a connection held for
the whole run, never one per message), sending in a shape — uniform (a message every few milliseconds, never
idle) or bursty (a burst, then silence) — with each message's publish time inside it.

Publishers count what the broker acknowledged (Kafka delivery reports, JetStream publish acks, MQTT PUBACKs;
a QoS 0 MQTT publish counts once it was written, and a SUBSCRIBE round trip at the end shows the broker
handled it).
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ingest_defs.config import PipelineSpec
from ingest_defs.resources.brokers import DEFAULT_KAFKA, DEFAULT_MQTT, source_for


@dataclass(frozen=True)
class Shape:
    """`rate` messages per second on average; `burst_every` None: evenly spaced, else all of a period's
    messages at once every `burst_every` seconds."""

    name: str
    rate: float
    burst_every: float | None = None

    def ticks(self, started: float, seconds: float) -> Any:
        """(time to send at, how many) until `seconds` have passed."""
        if self.burst_every is None:
            per_tick = max(1, round(self.rate * 0.002))  # at most one tick every 2 ms
            interval = per_tick / self.rate
        else:
            per_tick, interval = max(1, round(self.rate * self.burst_every)), self.burst_every
        n = 0
        while n * interval < seconds:
            yield started + n * interval, per_tick
            n += 1


def uniform(rate: float) -> Shape:
    return Shape("uniform", rate)


def bursty(rate: float, every: float = 5.0) -> Shape:
    return Shape("bursty", rate, every)


# ---------------------------------------------------------------- one publisher per broker kind
class KafkaPublisher:
    def __init__(self, spec: PipelineSpec):
        from confluent_kafka import Producer

        assert spec.source.kafka is not None
        self.topic = spec.source.kafka.topic
        self.acked = 0
        self.failed: list[str] = []
        self.producer = Producer({"bootstrap.servers": os.environ.get("KAFKA_BOOTSTRAP_SERVERS", DEFAULT_KAFKA),
                                  "linger.ms": 0, "acks": "all", "enable.idempotence": True})

    def _delivered(self, err: Any, _msg: Any) -> None:
        if err is None:
            self.acked += 1
        else:
            self.failed.append(str(err))

    def send(self, payload: bytes, key: bytes | None, qos: int = 1) -> None:
        self.producer.produce(self.topic, value=payload, key=key, on_delivery=self._delivered)
        self.producer.poll(0)

    def close(self) -> int:
        self.producer.flush(60)
        return self.acked


class NatsPublisher:
    """JetStream publishes through the pipeline's own source object (one connection, acks awaited)."""

    def __init__(self, spec: PipelineSpec):
        self.source = source_for(spec)
        self.acked = 0

    def send(self, payload: bytes, key: bytes | None, qos: int = 1) -> None:
        self.acked += self.source.publish([payload], [key])

    def close(self) -> int:
        self.source.close()
        return self.acked


class MqttPublisher:
    """One paho connection (network loop in its own thread); QoS per message."""

    def __init__(self, spec: PipelineSpec):
        import paho.mqtt.client as mqtt

        from ingest_defs.sources.mqtt import parse_url, publish_topic

        assert spec.source.mqtt is not None
        self.filter = spec.source.mqtt.topics[0]
        self.topic_of: Callable[[int, bytes | None], str] = lambda i, key: publish_topic(self.filter, i, key)
        host, port, _ = parse_url(os.environ.get("MQTT_URL", DEFAULT_MQTT))
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"bench-pub-{uuid.uuid4().hex[:8]}",
                                  protocol=mqtt.MQTTv5)
        self.client.max_inflight_messages_set(1000)
        self.client.max_queued_messages_set(0)
        self.acked = 0
        self.sent = 0
        self._lock = threading.Lock()
        self.client.on_publish = self._published
        self.client.connect(host, port)
        self.client.loop_start()

    def _published(self, _c: Any, _u: Any, _mid: int, reason: Any, _p: Any) -> None:
        if not reason.is_failure:
            with self._lock:
                self.acked += 1

    def send(self, payload: bytes, key: bytes | None, qos: int = 1) -> None:
        self.client.publish(self.topic_of(self.sent, key), payload, qos=qos)
        self.sent += 1

    def close(self) -> int:
        deadline = time.monotonic() + 60
        while self.acked < self.sent and time.monotonic() < deadline:
            time.sleep(0.01)
        done = threading.Event()
        self.client.on_subscribe = lambda *_: done.set()
        self.client.subscribe(f"ingest/_barrier/{uuid.uuid4().hex}", qos=0)  # the broker handled all before it
        done.wait(30)
        self.client.disconnect()
        self.client.loop_stop()
        return self.acked


def publisher_for(spec: PipelineSpec) -> Any:
    kind = spec.source.kind
    return KafkaPublisher(spec) if kind == "kafka" else NatsPublisher(spec) if kind == "nats" else MqttPublisher(spec)


# ---------------------------------------------------------------- a traffic thread per pipeline
MakeMessage = Callable[[int, float], tuple[bytes, bytes | None, int]]
"""(message number, publish time) → (payload, key, MQTT QoS)."""


def timed_message(i: int, sent_at: float) -> tuple[bytes, bytes | None, int]:
    """The freshness bench's message: an id and the publish time."""
    return f'{{"id":{i},"sent_at":{sent_at:.6f}}}'.encode(), None, 1


class Traffic(threading.Thread):
    """Sends `shape` to one pipeline for `seconds` (or until stopped); `acked` when done."""

    def __init__(self, spec: PipelineSpec, shape: Shape, seconds: float, make: MakeMessage = timed_message,
                 stop: threading.Event | None = None):
        super().__init__(name=f"traffic-{spec.name}", daemon=True)
        self.spec, self.shape, self.seconds, self.make = spec, shape, seconds, make
        self.stop_event = stop or threading.Event()
        self.sent = 0
        self.acked = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        publisher = publisher_for(self.spec)
        try:
            for at, count in self.shape.ticks(time.time(), self.seconds):
                if self.stop_event.is_set():
                    break
                delay = at - time.time()
                if delay > 0:
                    self.stop_event.wait(delay)
                for _ in range(count):
                    payload, key, qos = self.make(self.sent, time.time())
                    publisher.send(payload, key, qos)
                    self.sent += 1
        except BaseException as exc:  # reported by the caller; the rest of the bench goes on
            self.error = exc
        finally:
            self.acked = publisher.close()


def with_sent_at(payload: bytes, sent_at: float) -> bytes:
    """A sample JSON object with `sent_at` added (bad samples stay as they are: they go to quarantine)."""
    try:
        record = json.loads(payload)
    except ValueError:
        return payload
    if not isinstance(record, dict):
        return payload
    record["sent_at"] = sent_at
    return json.dumps(record, separators=(",", ":")).encode()

"""MQTT source (paho-mqtt 2.x, MQTT v5, Mosquitto 2.0): a persistent session read in bounded batches,
PUBACKs only once the batch is in Delta.

MQTT has no offsets, no replay and no broker timestamp, so:

* **Offsets are ours.** The pipeline numbers messages itself: a batch planned from Delta version V takes
  messages in arrival order as `_offset` V+1, V+2, ... and commits `Transaction(app_id, V+n)`. App id:
  `{pipeline}/mqtt/{client_id}`. `_partition` is 0, `_stream` the message's topic, `_timestamp` the
  receive time (tz-aware UTC; MQTT carries no broker time), `_headers` the MQTT v5 user properties,
  `_key` null.
* **The session is the queue.** MQTT v5, fixed client id, `clean_start=False`, session expiry > 0, QoS 1,
  `manual_ack=True`. We subscribe only when CONNACK says `session_present=0`, with `retainHandling=1`.
  Receive Maximum = `batch.max_messages`, but Mosquitto 2.0.11 honours it only until the first PUBACK of
  a connection (then it sends everything queued) and not at all for the in-flight messages it resends
  after a reconnect, so **the client enforces `max_messages`**: `read` stops pulling packets off the
  socket once the batch is full. What the broker sent beyond that stays unacknowledged: the next batch
  of the same connection takes it in order, or, after a disconnect, the broker resends it (DUP=1).
* **PUBACKs follow the commit**, in arrival order, sent in one write (paho's `ack()` costs a syscall
  per message, ~28 % of a drain).

Duplicates after a crash between the Delta commit and the PUBACKs
--------------------------------------------------------------------
The broker resends every unacknowledged message of the session, in the original order, with DUP=1,
right after CONNACK. DUP=1 does *not* mean "already written": messages sent beyond a full batch come back
with DUP=1 although no batch took them. So a redelivered message is skipped only when it belongs to
the **leading run of DUP=1 messages of a connection** and that run's prefix equals, message for message,
the **ordered tail of what Delta already holds** (`match_redelivered`). Each message is fingerprinted
by (packet id, topic, 64-bit BLAKE2b of the payload); the fingerprints live **in the rows** as the extra
columns `_mqtt_pid` (Int32) and `_mqtt_hash` (Int64) of target and quarantine (not in commit metadata).
The tail is loaded only when a connection's first message has DUP=1: target ∪ quarantine rows with
`version - window < _offset <= version`, ordered by `_offset`, window = 2 × `max_messages` (the crashed
batch, plus duplicates it had skipped whose PUBACKs were lost with it; see below for longer runs). Rows
above the target's version (a quarantine commit whose target commit never happened) are left out on
purpose: that batch is re-taken, gets the same offsets (same messages, same order) and the lifecycle's
quarantine fence keeps it single. Confirmed duplicates are acknowledged as soon as they are confirmed, inside `read` (they are
already durable in Delta and precede everything else in arrival order, so PUBACK order is kept); this
also keeps a batch that is *only* redeliveries from leaving them unacknowledged, and keeps the run of
redeliveries after a second crash short. The match is decided as soon as it can be: when the first
redelivery is not in the tail at all (nothing to skip), or once as many redeliveries arrived as the
alignment of the first one needs, so a redelivery never costs an `idle_ms` wait.

**Duplicates this design still lets through** (documented, not detectable from the subscriber side):

1. A publisher's own resend: a QoS 1 publisher that does not get its PUBACK publishes again (DUP=1 on
   its PUBLISH, but the broker forwards it as a new message with a new packet id). Two rows.
2. An identical payload on a reused packet id inside the crash window: a message that was never written
   but carries the same (packet id, topic, payload) as the committed message at its aligned position
   in the tail is indistinguishable from that message's redelivery and is skipped (a genuine repeat
   collapses into the earlier row). Packet ids are assigned sequentially and only wrap after 65,535
   messages, so this needs a wrap inside the window *and* a byte-identical payload on the same topic.
3. A redelivered run reaching further back than 8 × `max_messages` committed rows (about eight batches
   in a row committed without any of their PUBACKs reaching the broker, e.g. repeated session takeovers):
   the first redelivery is not found and the run is written again.

QoS 0
-----
The subscription is QoS 1; a message published at QoS 0 is delivered at QoS 0 unless the broker upgrades it
(Mosquitto `upgrade_outgoing_qos true`, as the shipped stack does: then it is an ordinary QoS 1 delivery
and everything above applies). A QoS 0 *delivery* has no packet id, no PUBACK and is never redelivered:
the broker forgets it once written to the socket. So: its row keeps `_mqtt_qos` 0 and a null `_mqtt_pid`
(the committed tail a DUP=1 run is matched against holds QoS 1 rows only — a redelivered run never contains
QoS 0 messages, so counting them would misalign the match); it is never acknowledged; each batch counts
them (`qos0_messages`) and warns. Delivered QoS 0 messages are lost by a crash before their commit, and by
any close of the connection while they wait in our buffer or socket: a run that ends normally therefore
hands them over as a last batch (`drain`: DISCONNECT, read to the end, keep the QoS 0 ones; QoS 1 ones are
redelivered as never written). A sensor's look at the session (`plan` without `read`) would take them too;
`probe: false` keeps the sensor from connecting. Within a connection the broker sends QoS 0 messages past
held QoS 1 ones (Receive Maximum limits QoS 1 only), so `_offset` order is arrival order, not publish order.

Retained messages: with `retainHandling=1` the broker sends the retained message of each matching topic
once, when the subscription is created (first registration of the session, or after the broker lost the
session); they are ingested as ordinary messages. They are never re-sent per batch because we never
re-subscribe while the session exists. After a lost session they arrive again and can duplicate rows
ingested before the loss.

Lost session: CONNACK `session_present=0` while Delta already holds a version means the broker lost the
session (expired, broker restarted without persistence, ...): messages published meanwhile were never
queued. `plan` reports a `SessionLostGap` and does not subscribe; the lifecycle applies `on_gap`. `read`
(which only runs when the gap was accepted, `on_gap: skip`) subscribes again. If no `read` follows
(`on_gap: fail`, or a sensor that only plans), `close` deletes the fresh empty session (session expiry 0
on DISCONNECT) so the loss is reported again instead of being healed silently.

Only one connection per client id can exist: the broker drops the older one (Mosquitto 2.0.11 just closes
the socket, with no DISCONNECT reason, so a takeover looks like any lost connection). Whatever connects
with the pipeline's client id while a run reads (a second `ingest run` of the pipeline, a sensor tick
racing a manual run, another consumer configured with the same id; `ensure_exists` does not connect once
the pipeline has committed) takes the session over. The run reconnects on its next batch; what it had
committed but whose PUBACKs went into the already-dropped connection is redelivered, so a redelivered
run can span several batches. The first redelivery is looked for up to 8 × `max_messages` rows back, and
a connection whose skipped run was longer than the window takes nothing new: it closes cleanly and lets
the next connection show what is still unacknowledged, so repeated takeovers stall a pipeline instead
of letting that run grow past what can be matched.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
import select
import socket
import ssl
import threading
import time
import uuid
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import paho.mqtt.client as mqtt
import polars as pl
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from ingest_defs.config import PipelineSpec
from ingest_defs.security import mqtt_auth, redact
from ingest_defs.sources.base import (
    Gap,
    PackedPayloads,
    PartitionRange,
    PartitionState,
    Plan,
    RawBatch,
    SourceError,
    StoredVersion,
)
from ingest_defs.storage import table_location

logger = logging.getLogger("ingest.mqtt")

Fingerprint = tuple[int, str, int]  # (packet id, topic, payload hash)
PID_COLUMN, HASH_COLUMN, QOS_COLUMN = "_mqtt_pid", "_mqtt_hash", "_mqtt_qos"
WINDOW_FACTOR = 2  # committed rows loaded to match redeliveries against, in units of max_messages
SEARCH_FACTOR = 8  # how far back the first redelivery is looked for when not in that tail
CONNECT_TIMEOUT = 15.0
CONNECT_ATTEMPTS = 3
KEEPALIVE = 60
MISC_INTERVAL = 1.0  # how often the read loop lets paho send keepalive pings
BURST = 512  # packets read per select() wake-up at most
PUBLISH_WINDOW = 10_000  # publishes awaiting their PUBACK at most
REDELIVERY_WAIT = 10.0  # seconds to wait for the rest of a located run of redeliveries (≥ 10 × idle_ms)
SYS_TIMEOUT = 0.5  # seconds to wait for Mosquitto's retained $SYS values
# Mosquitto's $SYS topics (retained, refreshed every sys_interval, 10 s by default) → our names.
SYS_DROPPED, SYS_UPTIME = "$SYS/broker/publish/messages/dropped", "$SYS/broker/uptime"
SYS_COUNTERS = {SYS_DROPPED: "broker_dropped_messages", SYS_UPTIME: "broker_uptime_s",
                "$SYS/broker/heap/current": "broker_heap_bytes"}
SYS_EXPIRY = 60  # seconds Mosquitto 2.0 keeps a retained $SYS value (the dropped counter: set only on change)
DRAIN_SECONDS = 5.0  # ending a run: how long to read what the broker had sent before our DISCONNECT
DRAIN_FIRST_SECONDS = 0.05  # ... first this long, then DISCONNECT and read until the broker closes
DRAIN_CAP = 100_000  # messages buffered by a drain at most (4 × max_messages if more)
_DISCONNECT = b"\xe0\x00"  # v5 DISCONNECT, reason Normal, session kept (expiry as in CONNECT)


# ---------------------------------------------------------------- pure logic (unit-tested)
def payload_hash(payload: bytes) -> int:
    """A stable 64-bit fingerprint of a payload (BLAKE2b, as a signed Int64)."""
    return int.from_bytes(hashlib.blake2b(payload, digest_size=8).digest(), "little", signed=True)


def match_redelivered(lead: Sequence[Fingerprint], committed: Sequence[Fingerprint]) -> int:
    """How many messages at the head of a connection's leading DUP=1 run are already in Delta.

    `lead`: fingerprints of the leading run of redelivered (DUP=1) messages, in arrival order.
    `committed`: fingerprints of the last committed rows, ordered by `_offset` (oldest first).

    The broker resends un-PUBACKed messages in their original order, so the already-written ones form a
    prefix of `lead` that equals a *suffix* of `committed` (the crashed batch's unacknowledged tail, which
    always ends at the last committed offset). Returns the length of the longest such prefix, 0 when none.
    A match that does not reach the last committed row is no match: messages after it would be skipped
    while the committed rows after it were never redelivered, which cannot happen in a real redelivery.
    """
    lead, committed = list(lead), list(committed)
    if not lead or not committed:
        return 0
    n = len(committed)
    first = lead[0]
    for p in range(max(0, n - len(lead)), n):  # candidate alignments, longest first
        if committed[p] == first and lead[: n - p] == committed[p:]:
            return n - p
    return 0


def pubacks(mids: Sequence[int] | np.ndarray) -> bytes:
    """MQTT v5 PUBACKs (reason Success, no properties) for these packet ids, back to back: 0x40, remaining
    length 2, the packet id big-endian."""
    packets = np.empty((len(mids), 4), np.uint8)
    packets[:, 0], packets[:, 1] = 0x40, 2
    packets[:, 2:] = np.asarray(mids, dtype=">u2").view(np.uint8).reshape(-1, 2)
    return packets.tobytes()


_LEVEL_UNSAFE = re.compile(r"[+#/\x00]")


def publish_topic(topic_filter: str, i: int, key: bytes | None = None) -> str:
    """A concrete topic under a filter: `+` becomes the key (or `sensor-{i % 5}`), `#` becomes `data`."""
    levels = []
    for level in topic_filter.split("/"):
        if level == "+":
            token = key.decode("utf-8", "replace") if key else ""
            token = _LEVEL_UNSAFE.sub("_", token) or f"sensor-{i % 5}"
            levels.append(token)
        elif level == "#":
            levels.append("data")
        else:
            levels.append(level)
    return "/".join(levels)


def parse_url(url: str) -> tuple[str, int, bool]:
    """`mqtt://host:port` (also tcp://; mqtts:// or ssl:// for TLS) → (host, port, tls)."""
    parts = urlsplit(url if "://" in url else f"mqtt://{url}")
    if parts.scheme not in ("mqtt", "tcp", "mqtts", "ssl"):
        raise SourceError(f"MQTT_URL '{url}': use mqtt://host:port or mqtts://host:port")
    tls = parts.scheme in ("mqtts", "ssl")
    return parts.hostname or "localhost", parts.port or (8883 if tls else 1883), tls


class _ConnectionDropped(SourceError):
    """The broker closed the connection during CONNECT/SUBSCRIBE (e.g. a session takeover)."""


@dataclass(frozen=True)
class SessionLostGap(Gap):
    """The broker no longer had the persistent session: what was published meanwhile was never queued.

    MQTT cannot say how many messages that was; first_lost..last_lost is the empty range after the stored
    version (version+1 .. version), so offsets stay contiguous and nothing is counted as lost."""

    client_id: str = ""

    def describe(self) -> str:
        return (f"{self.app_id}: the broker lost the persistent session of client id '{self.client_id}' "
                f"(after offset {self.last_lost}); messages published while it was gone were not queued and "
                f"are lost, how many is unknown ({self.reason})")


class ReceivedPayloads:
    """The payloads received and not yet taken by a batch, packed newline-separated into one buffer as they
    arrive: no `bytes` object is kept per message. (A list of them, 50k a batch, pinned the interpreter's
    small-object arenas: ~15 MB stayed after every batch was gone, the MQTT drain's peak grew batch by batch.)

    A batch takes the first n as `PackedPayloads` (one copy of their bytes); fingerprints read single
    payloads by position."""

    __slots__ = ("_data", "_lengths", "_starts", "nbytes")

    def __init__(self) -> None:
        self._clear()

    def _clear(self) -> None:
        self._data = bytearray()  # a new one: the old one's memory goes back at once
        self._starts = array("q")  # where each payload begins in _data
        self._lengths = array("I")
        self.nbytes = 0  # payload bytes held (newlines not counted)

    def append(self, payload: bytes) -> None:
        self._starts.append(len(self._data))
        self._lengths.append(len(payload))
        self._data += payload
        self._data += b"\n"
        self.nbytes += len(payload)

    def __len__(self) -> int:
        return len(self._lengths)

    def __getitem__(self, index: int) -> bytes:
        start = self._starts[index]
        with memoryview(self._data) as view:
            return bytes(view[start:start + self._lengths[index]])

    def length(self, index: int) -> int:
        return self._lengths[index]

    def packed(self, n: int) -> PackedPayloads:
        """The first n payloads, packed (a copy: `drop` then forgets them here)."""
        if n <= 0:
            return PackedPayloads()
        end = self._starts[n - 1] + self._lengths[n - 1]  # the last one's newline stays out
        with memoryview(self._data) as view:
            taken = bytes(view[:end])
        return PackedPayloads.of_joined(taken, self._lengths[:n])

    def drop(self, n: int) -> None:
        """Forget the first n payloads (taken, or skipped as already in Delta)."""
        if n >= len(self):
            self._clear()
            return
        if n <= 0:
            return
        cut = self._starts[n]
        self.nbytes -= cut - n  # the dropped payloads' bytes: everything before `cut` but their n newlines
        self._data = self._data[cut:]
        self._starts = array("q", (np.frombuffer(self._starts, np.int64)[n:] - cut).tobytes())
        self._lengths = self._lengths[n:]

    def keep(self, positions: Sequence[int]) -> None:
        """Keep only the payloads at `positions` (ascending), in that order."""
        kept = [self[i] for i in positions]
        self._clear()
        for payload in kept:
            self.append(payload)


# ---------------------------------------------------------------- the source
class MqttSource:
    kind = "mqtt"
    reports_bounds = False  # no broker offsets or queue depth: lag is unknown

    def __init__(self, spec: PipelineSpec, resource: Any):
        mqtt_spec = spec.source.mqtt
        assert mqtt_spec is not None
        self.spec = spec
        self.topics = list(mqtt_spec.topics)
        self.client_id = mqtt_spec.client_id or f"ingest-{spec.name}"
        self.session_expiry = mqtt_spec.session_expiry_seconds
        self.host, self.port, url_tls = parse_url(resource.url)
        self.auth = mqtt_auth(spec, resource, url_tls)
        self.tls = self.auth.tls.enabled
        self.username, self.password = self.auth.username, self.auth.password
        self.secrets = self.auth.secrets
        self.app_id = f"{spec.name}/mqtt/{self.client_id}"
        self.probe = mqtt_spec.probe  # may the sensor connect the session to look for waiting messages?
        self.max_messages = spec.batch.max_messages
        self.window = WINDOW_FACTOR * self.max_messages
        self.search = SEARCH_FACTOR * self.max_messages
        self._redelivered = 0  # DUP=1 messages received, all connections
        self._skipped = 0  # of which skipped as already in Delta
        self._connections = 0
        self._client: mqtt.Client | None = None
        self._generation = 0
        self._connack: tuple[bool, Any] | None = None
        self._suback: list[Any] | None = None
        self._session_lost = False  # a lost session was seen and not yet re-subscribed
        self._broken = False  # a write of ours failed: paho does not know the connection is gone
        self._reset_buffer()

    @property
    def stats(self) -> dict[str, int]:
        """Counters for tests and logs: DUP=1 messages received, how many were skipped as already in Delta,
        connections opened."""
        return {"redelivered": self._redelivered, "skipped_duplicates": self._skipped,
                "connections": self._connections}

    # ------------------------------------------------------------ buffer (filled by on_message)
    def _reset_buffer(self) -> None:
        # Column-wise, no per-message objects: paho builds a Properties object per message (~kilobytes).
        self._mids = array("i")
        self._qos = array("b")  # delivered QoS: 0 (no packet id, never redelivered, no PUBACK) or 1
        self._times = array("d")  # time.monotonic() at receipt (paho's message.timestamp)
        self._payloads = ReceivedPayloads()
        self._topics: list[str] = []
        self._headers: dict[int, list[tuple[str, str]]] = {}  # absolute receipt index → user properties
        self._base = 0  # absolute receipt index of _payloads[0]
        self._topic_names: dict[str, str] = {}
        self._lead_open = True  # still inside this connection's leading run of DUP=1 messages
        self._lead_len = 0
        self._lead_resolved = False
        self._tail: list[Fingerprint] | None = None  # committed fingerprints, loaded when DUP=1 arrives
        self._drain_only = False  # skipped a run longer than the window: take nothing new on this connection
        self._lead_needed = 0  # leading redeliveries needed before the match can be decided
        self._lead_wait_until = 0.0

    def _on_message(self, _client: Any, _userdata: Any, msg: mqtt.MQTTMessage) -> None:
        # Keep this minimal: it runs once per message at ~50k msg/s.
        self._payloads.append(msg.payload)
        self._mids.append(msg.mid)
        self._qos.append(msg.qos)
        self._times.append(msg.timestamp)
        topic = msg.topic
        self._topics.append(self._topic_names.setdefault(topic, topic))  # one str object per topic
        props = msg.properties
        if props is not None:
            user = props.__dict__.get("UserProperty")
            if user:
                self._headers[self._base + len(self._payloads) - 1] = user
        if msg.dup:
            self._redelivered += 1
            if self._lead_open:
                self._lead_len += 1
        elif self._lead_open:
            self._lead_open = False

    def _on_connect(self, _c: Any, _u: Any, flags: Any, reason: Any, _p: Any) -> None:
        self._connack = (bool(flags.session_present), reason)

    def _on_subscribe(self, _c: Any, _u: Any, _mid: int, reasons: list[Any], _p: Any) -> None:
        self._suback = reasons

    # ------------------------------------------------------------ connection
    def _connected(self) -> bool:
        client = self._client
        return client is not None and not self._broken and client.is_connected() and client.socket() is not None

    def _new_client(self, client_id: str, consumer: bool) -> mqtt.Client:
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5,
                             manual_ack=consumer)
        if self.username:
            client.username_pw_set(self.username, self.password)
        if self.tls:
            try:
                client.tls_set_context(self.auth.tls.context())
            except (OSError, ssl.SSLError) as exc:
                raise SourceError(f"pipeline '{self.spec.name}': MQTT TLS settings do not load ({exc}). Fix "
                                  "source.mqtt.security ca_file/cert_file/key_file (or MQTT_TLS_*).") from None
        return client

    def _pump(self, client: mqtt.Client, until: Callable[[], bool], timeout: float, what: str) -> None:
        """Run paho's network loop on this thread until `until()` (control packets only; see _pull)."""
        deadline = time.monotonic() + timeout
        while not until():
            left = deadline - time.monotonic()
            if left <= 0:
                raise SourceError(f"pipeline '{self.spec.name}': no {what} from the MQTT broker at "
                                  f"{self.host}:{self.port} within {timeout:.0f}s")
            rc = client.loop(min(left, 0.2))
            if rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_AGAIN) and not until():
                # (A refusing CONNACK arrives just before the broker closes: it counts, not the close.)
                raise _ConnectionDropped(f"pipeline '{self.spec.name}': MQTT connection to {self.host}:{self.port} "
                                         f"lost while waiting for {what} ({mqtt.error_string(rc)})")

    def _connect(self, client: mqtt.Client, receive_maximum: int | None) -> tuple[bool, Any]:
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = self.session_expiry
        if receive_maximum:
            props.ReceiveMaximum = receive_maximum
        self._connack = None
        client.on_connect = self._on_connect
        where = f"the MQTT broker at {self.host}:{self.port}"
        try:
            client.connect(self.host, self.port, keepalive=KEEPALIVE, clean_start=False, properties=props)
        except ssl.SSLCertVerificationError as exc:
            raise SourceError(f"pipeline '{self.spec.name}': TLS to {where} failed: its certificate is not trusted "
                              f"({exc.verify_message}). Set source.mqtt.security.ca_file (or MQTT_TLS_CA_FILE) "
                              "to the CA that signed it.") from None
        except (OSError, ssl.SSLError) as exc:
            raise SourceError(redact(f"pipeline '{self.spec.name}': cannot connect to {where} ({exc}). Start it "
                                     "(`ingest stack up`) or set MQTT_URL.", self.secrets)) from None
        try:
            self._pump(client, lambda: self._connack is not None, CONNECT_TIMEOUT, "CONNACK")
        except _ConnectionDropped as exc:
            if self.tls and not self.auth.tls.cert_file:
                # A TLS 1.3 server that requires a client certificate rejects it after the handshake: the
                # client only sees the connection close before CONNACK.
                raise SourceError(f"{exc}. {where} closed the TLS connection before CONNACK: a listener that "
                                  "requires a client certificate does this without one; set "
                                  "source.mqtt.security cert_file/key_file (or MQTT_TLS_CERT_FILE/KEY_FILE).") from None
            raise
        assert self._connack is not None
        present, reason = self._connack
        if reason.is_failure:
            client.disconnect()
            fix = ""
            if reason.value in (0x86, 0x87, 0x8C):  # bad user name or password, not authorized, bad auth method
                fix = (". Check source.mqtt.security username/password (or MQTT_USERNAME/MQTT_PASSWORD) and "
                       "the broker's password file")
            raise SourceError(f"pipeline '{self.spec.name}': {where} refused the connection of client id "
                              f"'{self.client_id}': {reason}{fix}")
        return present, reason

    def _subscribe(self, client: mqtt.Client) -> None:
        options = mqtt.SubscribeOptions(qos=1, retainHandling=1)
        self._suback = None
        client.on_subscribe = self._on_subscribe
        rc, _ = client.subscribe([(t, options) for t in self.topics])
        if rc != mqtt.MQTT_ERR_SUCCESS:
            raise SourceError(f"pipeline '{self.spec.name}': MQTT subscribe failed ({mqtt.error_string(rc)})")
        self._pump(client, lambda: self._suback is not None, CONNECT_TIMEOUT, "SUBACK")
        # A denied subscription is not an error packet: SUBACK carries reason 0x87 (Not authorized) and the
        # broker then silently delivers nothing. Anything but "granted QoS 1" fails the run here.
        bad = [(t, r) for t, r in zip(self.topics, self._suback or [], strict=False) if r.is_failure or r.value != 1]
        if bad:
            denied = any(r.value == 0x87 for _, r in bad)
            raise SourceError(f"pipeline '{self.spec.name}': the MQTT broker at {self.host}:{self.port} did not "
                              "grant QoS 1 on " + ", ".join(f"'{t}' ({r}, 0x{r.value:02X})" for t, r in bad)
                              + (f". User '{self.username}' may not subscribe there: allow it in the broker's ACL "
                                 "file (`topic read ...`)" if denied else ""))

    def _ensure_connected(self, version: int | None) -> None:
        """One connection per source object, kept across the batches of a run."""
        if self._connected():
            return
        if self._client is not None:  # the previous connection died: its unacked messages come back DUP=1
            self._drop_client()
        for attempt in range(CONNECT_ATTEMPTS):
            client = self._new_client(self.client_id, consumer=True)
            client.on_message = self._on_message
            self._reset_buffer()
            try:
                present, _ = self._connect(client, self.max_messages)
                break
            except _ConnectionDropped:
                if attempt == CONNECT_ATTEMPTS - 1:
                    raise
                time.sleep(0.2 * (attempt + 1))
        self._client, self._broken = client, False
        self._generation += 1
        self._connections += 1
        if present:
            return
        if version is None:
            # First registration: from now on the broker queues what is published while no batch runs.
            self._subscribe(client)
            logger.info("%s: registered MQTT session '%s' on %s", self.spec.name, self.client_id, self.topics)
        else:
            self._session_lost = True
            logger.warning("%s: the MQTT broker lost session '%s' (Delta is at offset %s)",
                           self.spec.name, self.client_id, version)

    def _drop_client(self, expire: bool = False) -> None:
        client, self._client = self._client, None
        if client is None:
            return
        try:
            if client.is_connected():
                props = None
                if expire:  # delete the session on the broker (see the module docstring: lost session)
                    props = Properties(PacketTypes.DISCONNECT)
                    props.SessionExpiryInterval = 0
                client.disconnect(properties=props)
                client.loop(0.05)
        except (OSError, ValueError):
            pass
        finally:
            sock = client.socket()
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.close()

    def _has_pending(self, timeout: float) -> bool:
        """Whether a message is buffered or the socket has data, without reading any payload."""
        if self._payloads:
            return True
        sock = self._client.socket() if self._client is not None else None
        if sock is None:
            return False
        try:
            readable, _, _ = select.select([sock], [], [], timeout)
        except (OSError, ValueError):
            return True  # let read() find out
        return bool(readable)

    # ------------------------------------------------------------ protocol
    def plan(self, stored: StoredVersion, max_messages: int) -> Plan:
        """From Delta version V (None → -1): at most N messages, offsets V+1 .. V+N (unbounded plan).

        Connects the persistent session (registering it the first time, so later messages are queued) and
        reports a lost session as a gap. The plan is empty when nothing arrives within `idle_ms` (only
        checks that the socket became readable: no payload is read, nothing is acknowledged)."""
        version = stored(self.app_id)
        start = 0 if version is None else version + 1
        self._ensure_connected(version)
        if self._client is not None:
            self._client.loop_misc()  # keepalive: a lingering run may plan for minutes without reading
        gaps: list[Gap] = []
        if self._session_lost:
            gaps.append(SessionLostGap(self.app_id, 0, start, start - 1, "broker lost the persistent session",
                                       client_id=self.client_id))
        elif not self._has_pending(self.spec.batch.idle_ms / 1000):
            return Plan(ranges=[], bounded=False)
        return Plan(ranges=[PartitionRange(self.app_id, 0, start, start + max_messages - 1)], gaps=gaps,
                    lag_after=0, bounded=False)

    def read(self, plan: Plan, max_bytes: int) -> RawBatch:
        """Take at most the planned count (≤ max_messages) or `max_bytes`, ending after `idle_ms` without a
        message or `max_wait_seconds` after its first message, whichever comes first. Skips (and acknowledges)
        redeliveries already in Delta; see the module docstring."""
        if not plan.ranges:
            return _empty_batch([])
        planned = plan.ranges[0]
        version = planned.start - 1 if planned.start > 0 else None
        limit = max(1, min(planned.count, self.max_messages))
        self._ensure_connected(version)
        if self._session_lost:  # the lifecycle applied on_gap and went on: register the session again
            assert self._client is not None
            self._subscribe(self._client)
            self._session_lost = False
        status = self._pull(limit, max_bytes, version)
        if not self._lead_resolved and self._payloads:
            self._advance_lead(version, final=status != "connection_lost")
        undecided = not self._lead_resolved and bool(self._payloads)
        if undecided:
            # The connection dropped in the middle of the redeliveries: which of them are already in Delta
            # cannot be told from part of the run. Take none; the broker resends them all next connection.
            # (All of them are DUP=1, so QoS 1: no QoS 0 message is dropped here.)
            logger.warning("%s: MQTT connection lost while %d redelivered messages were arriving; taking "
                           "none of them in this batch", self.spec.name, len(self._payloads))
            self._drop_client()
            self._reset_buffer()
            batch = _empty_batch([PartitionRange(self.app_id, 0, planned.start, planned.start - 1)])
            batch.lag_after, batch.ended_by = 1, status
            return batch
        if self._drain_only:
            # The skipped run reached back more than the window (PUBACKs of several batches were lost,
            # connections dropped or taken over right after them). Take nothing new until the skipped ones are
            # known to be acknowledged: close cleanly (the broker handles our PUBACKs before the DISCONNECT)
            # and let the next connection's redeliveries show what is still unacknowledged. This keeps the
            # unacknowledged run bounded, so it can always be matched. QoS 0 messages already delivered would
            # be lost by the close: they are this batch.
            self._drain_only = False
            batch = self._close_taking_qos0(planned.start)
            batch.lag_after = 1
            return batch
        n = min(limit, len(self._payloads))
        if n and self._payloads.nbytes > max_bytes:
            total = 0
            for i in range(n):
                total += self._payloads.length(i)
                if total > max_bytes:
                    n = max(1, i)
                    break
        batch = self._take(n, planned.start)
        more = status in ("max_messages", "max_bytes", "max_wait")
        batch.lag_after = len(self._payloads) or (1 if more else 0)  # MQTT cannot tell more
        batch.ended_by = status
        return batch

    def drain(self, stored: StoredVersion) -> RawBatch | None:
        """End of a run (`Draining`): close the connection without losing delivered QoS 0 messages.

        The broker forgets a QoS 0 message once it has written it to the socket, so closing a connection
        loses every QoS 0 message buffered or in flight towards us. Instead: DISCONNECT (the session stays;
        from now on the broker queues), read what it had already sent until it closes the socket, and return
        the QoS 0 messages among what no batch took, numbered from the Delta version, as one more batch to
        commit (nothing to acknowledge). QoS 1 messages read here stay unacknowledged: the broker redelivers
        them (DUP=1) to the next connection, where, never having been written, they are taken as new.
        Done whether or not QoS 0 messages were seen so far: the broker sends unacknowledged QoS 1 messages of
        an earlier connection first, so QoS 0 ones can be waiting behind a batch of only QoS 1."""
        if self._client is None or self._session_lost or not self._connected():
            return None
        version = stored(self.app_id)
        batch = self._close_taking_qos0(0 if version is None else version + 1)
        return batch if len(batch) else None

    def _close_taking_qos0(self, start: int) -> RawBatch:
        self._disconnect_and_read_to_end()
        self._keep_only_qos0()
        batch = self._take(len(self._payloads), start)
        self._reset_buffer()
        batch.ended_by = "drain"
        return batch

    def _disconnect_and_read_to_end(self) -> None:
        """Send DISCONNECT ourselves (paho closes its socket right after writing one) and keep reading until
        the broker closes the connection: everything it sent before handling the DISCONNECT is buffered."""
        client, self._client = self._client, None
        if client is None:
            return
        sock = client.socket()
        deadline = time.monotonic() + DRAIN_SECONDS
        try:
            if sock is None or not client.is_connected() or self._broken:
                return
            # First read for a moment, so what the broker holds in its own send queue flows into the socket.
            self._read_while_readable(client, sock, until=min(deadline, time.monotonic() + DRAIN_FIRST_SECONDS))
            while client.want_write() and time.monotonic() < deadline:
                if client.loop_write() != mqtt.MQTT_ERR_SUCCESS:
                    return
            _send_all(sock, _DISCONNECT, deadline)
            self._read_while_readable(client, sock, until=deadline)
            if client.socket() is sock:
                logger.warning("%s: the MQTT broker kept sending after our DISCONNECT; %d messages read, the "
                               "rest is dropped (QoS 0 ones lost)", self.spec.name, len(self._payloads))
        except (OSError, ValueError, ssl.SSLError) as exc:
            logger.debug("%s: while draining the MQTT connection: %r", self.spec.name, exc)
        finally:
            if client.socket() is not None:
                with contextlib.suppress(OSError):
                    client.socket().close()

    def _read_while_readable(self, client: mqtt.Client, sock: Any, until: float) -> None:
        """Buffer incoming messages until `until`, or the broker closes the connection (after our DISCONNECT),
        or DRAIN_CAP messages are buffered."""
        cap = max(DRAIN_CAP, 4 * self.max_messages)
        while client.socket() is sock and len(self._payloads) < cap:
            if not (isinstance(sock, ssl.SSLSocket) and sock.pending()):
                left = until - time.monotonic()
                if left <= 0 or not select.select([sock], [], [], left)[0]:
                    return
            if client.loop_read() != mqtt.MQTT_ERR_SUCCESS:
                return

    def _pull(self, limit: int, max_bytes: int, version: int | None) -> str:
        """Read packets until `limit` messages count against the batch ("max_messages"), `max_bytes`
        ("max_bytes"), `idle_ms` without a message ("idle"), `max_wait_seconds` after the batch's first
        message ("max_wait"), or the connection drops ("connection_lost"). Messages of the leading DUP=1 run
        do not count until we know whether they are already in Delta (`_advance_lead`), so skipped duplicates
        never shrink a batch; the time bound starts after that decision (it takes at most REDELIVERY_WAIT), so
        a cut never splits the redeliveries and never ends a batch that has nothing to take."""
        client = self._client
        assert client is not None
        sock = client.socket()
        idle = self.spec.batch.idle_ms / 1000
        payloads = self._payloads
        loop_read = client.loop_read
        last_misc = time.monotonic()
        deadline = last_misc + idle
        cut_at = float("inf")  # max_wait_seconds after the first message this batch can take
        while True:
            if not self._lead_resolved and payloads and self._advance_lead(version, final=False):
                # Skipped duplicates were acknowledged, which frees the broker's window: wait idle_ms for what
                # comes next from now, not from the last redelivery (loading the tail can take longer).
                deadline = time.monotonic() + idle
            if cut_at == float("inf") and self._lead_resolved and payloads:
                cut_at = time.monotonic() + self.spec.batch.max_wait_seconds
            exempt = 0 if self._lead_resolved else self._lead_len
            if len(payloads) - exempt >= limit:
                return "max_messages"
            if self._lead_resolved and payloads.nbytes >= max_bytes:
                return "max_bytes"
            if self._drain_only:
                return "idle"
            now = time.monotonic()
            if now >= cut_at:
                return "max_wait"
            if now - last_misc >= MISC_INTERVAL:
                client.loop_misc()  # keepalive
                last_misc = now
            if sock is None or client.socket() is not sock or self._broken:
                break  # connection lost: the batch is what arrived
            readable = False
            left = min(deadline, cut_at) - now
            if left > 0:
                try:
                    readable = bool(select.select([sock], [], [], left)[0])
                except (OSError, ValueError):
                    break
            if not readable:
                if time.monotonic() >= cut_at:
                    return "max_wait"
                # idle_ms without a message
                if not self._lead_resolved and payloads:
                    if self._lead_incomplete() and time.monotonic() < self._lead_wait_until:
                        # A located run of redeliveries stopped short of the committed tail's end: the broker
                        # can pause for longer than idle_ms while resending (seen during session takeovers).
                        deadline = time.monotonic() + idle
                        continue
                    if self._advance_lead(version, final=True):
                        deadline = time.monotonic() + idle  # PUBACKs of skipped duplicates free the window
                        continue
                return "idle"
            got, cap = len(payloads), limit + exempt
            for _ in range(BURST):
                before = len(payloads)
                if loop_read() != mqtt.MQTT_ERR_SUCCESS:
                    break  # connection lost (paho closed the socket)
                n = len(payloads)
                if n == before or n >= cap or payloads.nbytes >= max_bytes:
                    break  # drained / control or partial packet / time to re-check the limits
            if len(payloads) > got:
                deadline = time.monotonic() + idle
        return "connection_lost"

    def _lead_incomplete(self) -> bool:
        return self._lead_open and self._lead_len < self._lead_needed

    def _advance_lead(self, version: int | None, final: bool) -> int:
        """Resolve this connection's leading DUP=1 run as soon as it can be: when it has ended, when it is as
        long as the committed tail, or (final) when no more messages come. Returns how many were skipped."""
        if not self._lead_len or version is None:  # no redeliveries, or nothing committed to match
            self._lead_resolved, self._lead_open = True, False
            return 0
        if self._tail is None:
            self._tail = self._committed_tail(version, version - self.window)  # once per connection
            first = (self._mids[0], self._topics[0], payload_hash(self._payloads[0]))
            # Where the first redelivery sits in the committed tail decides how many leading messages the
            # match needs (the longest alignment); not in the tail at all: nothing to skip, decide now.
            starts = [p for p, f in enumerate(self._tail) if f == first]
            if not starts:
                # PUBACKs written into a connection the broker had already dropped (session taken over)
                # vanish: then the unacknowledged tail spans more batches. Look further back, once.
                older = self._find_committed(first, version - self.search, version - self.window)
                if older is not None:
                    logger.warning("%s: the first redelivered message was committed at offset %d, more than %d "
                                   "rows back (PUBACKs of several batches were lost)", self.spec.name, older,
                                   self.window)
                    self._tail = self._committed_tail(version, older - 1)
                    starts = [0]
            self._lead_needed = len(self._tail) - starts[0] if starts else 0
            self._lead_wait_until = time.monotonic() + max(REDELIVERY_WAIT, 10 * self.spec.batch.idle_ms / 1000)
        if not final and self._lead_incomplete():
            return 0
        if self._lead_incomplete():
            logger.warning("%s: only %d of the %d redeliveries that would match Delta's tail arrived; treating "
                           "them as new", self.spec.name, self._lead_len, self._lead_needed)
        return self._resolve_lead(version)

    def _resolve_lead(self, version: int) -> int:
        """Skip and acknowledge the leading redeliveries that are already in Delta (once per connection)."""
        committed, self._tail = self._tail or [], []
        self._lead_resolved, self._lead_open = True, False
        lead = self._lead_len
        k = min(lead, len(committed))
        if not k:
            return 0
        fingerprints = [(self._mids[i], self._topics[i], payload_hash(self._payloads[i])) for i in range(k)]
        skip = match_redelivered(fingerprints, committed)
        if not skip:
            logger.info("%s: %d redelivered messages at the head of the session, none already in Delta",
                        self.spec.name, lead)
            return 0
        self._send_acks(self._mids[:skip])  # already durable in Delta; first in arrival order
        self._consume(skip)
        self._skipped += skip
        self._drain_only = skip > self.window
        logger.warning("%s: skipped %d redelivered messages already in Delta (offsets %d..%d); "
                       "a batch had committed but not acknowledged them", self.spec.name, skip,
                       version - skip + 1, version)
        return skip

    def _committed_tail(self, version: int, low: int) -> list[Fingerprint]:
        """Fingerprints of target ∪ quarantine rows with low < _offset <= version, in `_offset` order."""
        frames = []
        for where in (table_location(self.spec, "target"), table_location(self.spec, "quarantine")):
            if not where.exists():
                continue
            try:
                frame = (where.scan()
                         .filter((pl.col("_offset") > low) & (pl.col("_offset") <= version))
                         .select("_offset", "_stream", PID_COLUMN, HASH_COLUMN)
                         .collect())
            except pl.exceptions.ColumnNotFoundError:
                continue
            frames.append(frame.cast({"_offset": pl.Int64, PID_COLUMN: pl.Int64, HASH_COLUMN: pl.Int64}))
        if not frames:
            return []
        tail = (pl.concat(frames).drop_nulls(PID_COLUMN).unique("_offset", keep="first").sort("_offset"))
        return list(zip(tail[PID_COLUMN].to_list(), tail["_stream"].to_list(), tail[HASH_COLUMN].to_list(),
                        strict=True))

    def _find_committed(self, fingerprint: Fingerprint, low: int, high: int) -> int | None:
        """The latest `_offset` in (low, high] of a row with this fingerprint, in target ∪ quarantine."""
        if high <= max(low, -1):
            return None
        pid, topic, digest = fingerprint
        found: list[int] = []
        for where in (table_location(self.spec, "target"), table_location(self.spec, "quarantine")):
            if not where.exists():
                continue
            try:
                frame = (where.scan()
                         .filter((pl.col("_offset") > low) & (pl.col("_offset") <= high)
                                 & (pl.col(PID_COLUMN) == pid) & (pl.col(HASH_COLUMN) == digest)
                                 & (pl.col("_stream") == topic))
                         .select(pl.col("_offset").max())
                         .collect())
            except pl.exceptions.ColumnNotFoundError:
                continue
            if frame.height and frame.item() is not None:
                found.append(int(frame.item()))
        return max(found) if found else None

    def _consume(self, n: int) -> None:
        """Drop the first n buffered messages (taken by a batch or skipped as duplicates)."""
        for i in range(self._base, self._base + n):
            self._headers.pop(i, None)
        self._payloads.drop(n)
        del self._topics[:n], self._mids[:n], self._qos[:n], self._times[:n]
        self._base += n

    def _take(self, n: int, start: int) -> RawBatch:
        # Arrays, not lists: a Python int per packet id, held until the batch is acknowledged, pinned the
        # interpreter's small-object arenas as the payloads' `bytes` did (see ReceivedPayloads).
        mids = np.frombuffer(self._mids, np.int32, count=n).copy()
        qos = np.frombuffer(self._qos, np.int8, count=n).copy()
        streams = self._topics[:n]
        wall = time.time() - time.monotonic()
        timestamps = ((np.frombuffer(self._times, dtype=np.float64, count=n) + wall) * 1000).astype(np.int64)
        headers: list[Any] | None = None
        if self._headers:
            base = self._base
            found = {i - base: h for i, h in self._headers.items() if i - base < n}
            if found:
                headers = [None] * n
                for i, h in found.items():
                    headers[i] = [(k, v.encode()) for k, v in h]
        # Packed: the batch holds one buffer, not a `bytes` per message (decode reads it as is, `_raw` views it).
        packed = self._payloads.packed(n)
        self._consume(n)
        if len(self._topic_names) > 100_000:  # high-cardinality topics: do not grow without bound
            self._topic_names.clear()
        if not n:
            return _empty_batch([PartitionRange(self.app_id, 0, start, start - 1)])
        delivered_qos0 = qos == 0
        qos0 = int(delivered_qos0.sum())
        # QoS 0 deliveries carry no packet id: a null `_mqtt_pid` keeps them out of the redelivery match.
        pids = pl.Series(PID_COLUMN, mids, dtype=pl.Int32)
        if qos0:
            pids = pids.set(pl.Series(delivered_qos0), None)  # type: ignore[arg-type]
        extra = {
            PID_COLUMN: pids,
            HASH_COLUMN: pl.Series(HASH_COLUMN, np.fromiter(map(payload_hash, packed), np.int64, n), dtype=pl.Int64),
            QOS_COLUMN: pl.Series(QOS_COLUMN, qos, dtype=pl.Int8),
        }
        warnings = []
        if qos0:
            warnings.append(f"{self.spec.name}: {qos0} of {n} messages (offsets {start}..{start + n - 1}) arrived at "
                            "QoS 0: at most once. The broker keeps no copy once it has sent them and never "
                            "redelivers them, so a crash between their receipt and the Delta commit loses them. "
                            "Publish at QoS 1 for exactly once.")
        return RawBatch(
            payloads=packed, offsets=np.arange(start, start + n, dtype=np.int64), partitions=0,
            streams=streams, keys=None,
            headers=headers, timestamps_ms=timestamps, covered=[PartitionRange(self.app_id, 0, start, start + n - 1)],
            nbytes=packed.nbytes, extra_columns=extra, counters={"qos0_messages": qos0}, warnings=warnings,
            ack_token=(self._generation, mids[~delivered_qos0] if qos0 else mids),
        )

    def _keep_only_qos0(self) -> None:
        """Drop the buffered QoS 1 messages (unacknowledged, so the broker redelivers them); keep QoS 0 ones."""
        keep = [i for i, q in enumerate(self._qos) if q == 0]
        if len(keep) == len(self._qos):
            return
        base = self._base
        self._payloads.keep(keep)
        self._topics[:] = [self._topics[i] for i in keep]
        self._mids = array("i", [self._mids[i] for i in keep])
        self._qos = array("b", [0] * len(keep))
        self._times = array("d", [self._times[i] for i in keep])
        self._headers = {base + j: self._headers[base + i] for j, i in enumerate(keep) if base + i in self._headers}

    def acknowledge(self, batch: RawBatch) -> None:
        """PUBACK the batch's messages, in arrival order, after its Delta commit."""
        if batch.ack_token is None:
            return
        generation, mids = batch.ack_token
        if not len(mids):
            return
        if generation != self._generation or not self._connected():
            logger.warning("%s: MQTT connection lost before acknowledging %d messages; the broker will redeliver "
                           "them and the next batch skips them (already in Delta)", self.spec.name, len(mids))
            return
        self._send_acks(mids)

    def _send_acks(self, mids: Sequence[int] | np.ndarray) -> None:
        """PUBACKs in one write when paho has nothing queued (its ack() is a send() per message)."""
        client = self._client
        if client is None or not len(mids):
            return
        sock = client.socket()
        if self.tls or client.want_write() or not isinstance(sock, socket.socket):
            for mid in mids:
                client.ack(int(mid), 1)
            deadline = time.monotonic() + 30
            while client.want_write() and time.monotonic() < deadline:
                if client.loop_write() != mqtt.MQTT_ERR_SUCCESS:
                    break
            return
        data = memoryview(pubacks(mids))
        sent, deadline = 0, time.monotonic() + 30
        try:
            while sent < len(data):
                try:
                    sent += sock.send(data[sent:])
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise TimeoutError("socket not writable") from None
                    select.select([], [sock], [], 1.0)
        except (OSError, TimeoutError) as exc:
            self._broken = True
            logger.warning("%s: could not send %d PUBACKs (%s); the broker will redeliver them",
                           self.spec.name, len(mids) - sent // 4, exc)

    def state(self) -> list[PartitionState]:
        """MQTT has no broker offsets or queue depth: one partition with unknown bounds (first/last None).
        Where ingestion stands is the Delta version (`_offset` of the last message taken)."""
        return [PartitionState(self.app_id, 0, None, None)]

    def identity(self) -> dict[str, str]:
        return {"mqtt.client_id": self.client_id, "mqtt.topics": ",".join(self.topics)}

    def publish(self, payloads: Sequence[bytes], keys: Sequence[bytes | None] | None = None,
                qos: int | Sequence[int] = 1) -> int:
        """To topics under the first filter (`publish_topic`), at QoS 1 (waits for every PUBACK) or QoS 0 (one
        value or one per message). QoS 0 has no acknowledgement: a SUBSCRIBE/SUBACK round trip at the end
        shows the broker has handled every publish before it (it handles one connection's packets in order)."""
        levels = [qos] * len(payloads) if isinstance(qos, int) else list(qos)
        if len(levels) != len(payloads) or set(levels) - {0, 1}:
            raise ValueError("qos: 0 or 1, one value or one per payload")
        client = self._new_client(f"{self.client_id}-pub-{uuid.uuid4().hex[:8]}", consumer=False)
        client.max_inflight_messages_set(1000)
        client.max_queued_messages_set(0)
        lock = threading.Lock()
        counts = {"acked": 0, "failed": 0}
        failures: list[str] = []

        def on_publish(_c: Any, _u: Any, _mid: int, reason: Any, _p: Any) -> None:
            with lock:
                if reason.is_failure:
                    counts["failed"] += 1
                    if len(failures) < 3:
                        failures.append(str(reason))
                else:
                    counts["acked"] += 1

        client.on_publish = on_publish
        connack: list[Any] = []
        client.on_connect = lambda _c, _u, _f, reason, _p: connack.append(reason)
        try:
            client.connect(self.host, self.port, keepalive=KEEPALIVE)
        except (OSError, ssl.SSLError) as exc:
            raise SourceError(f"pipeline '{self.spec.name}': cannot connect to the MQTT broker at "
                              f"{self.host}:{self.port} ({exc})") from None
        client.loop_start()
        try:
            deadline = time.monotonic() + CONNECT_TIMEOUT
            while not connack and time.monotonic() < deadline:
                time.sleep(0.005)
            if not connack or connack[0].is_failure:
                # Without this a refused publisher would only time out waiting for PUBACKs.
                raise SourceError(f"pipeline '{self.spec.name}': the MQTT broker at {self.host}:{self.port} refused "
                                  f"the publisher: {connack[0] if connack else 'no CONNACK'}")
            topic_filter = self.topics[0]
            by_key: dict[Any, str] = {}
            stall = time.monotonic() + 60
            for i, payload in enumerate(payloads):
                # Packet ids wrap at 65535: keep the unacknowledged window well below that.
                while i - counts["acked"] - counts["failed"] >= PUBLISH_WINDOW:
                    if time.monotonic() > stall:
                        raise SourceError(f"pipeline '{self.spec.name}': the MQTT broker stopped acknowledging "
                                          f"publishes ({counts['acked']} of {len(payloads)} acknowledged)")
                    time.sleep(0.001)
                stall = time.monotonic() + 60
                key = keys[i] if keys is not None else None
                cache_key = key if key else i % 5
                topic = by_key.get(cache_key)
                if topic is None:
                    topic = by_key[cache_key] = publish_topic(topic_filter, i, key)
                info = client.publish(topic, payload, qos=levels[i])
                if info.rc != mqtt.MQTT_ERR_SUCCESS:
                    raise SourceError(f"pipeline '{self.spec.name}': MQTT publish failed "
                                      f"({mqtt.error_string(info.rc)})")
            deadline = time.monotonic() + 30 + len(payloads) / 1000
            while counts["acked"] + counts["failed"] < len(payloads):
                if time.monotonic() > deadline:
                    raise SourceError(f"pipeline '{self.spec.name}': only {counts['acked']} of {len(payloads)} "
                                      "MQTT publishes acknowledged in time")
                time.sleep(0.005)
            if 0 in levels:
                barrier: list[Any] = []
                client.on_subscribe = lambda _c, _u, _m, reasons, _p: barrier.append(reasons)
                client.subscribe(f"ingest/_barrier/{uuid.uuid4().hex}", qos=0)  # denied by ACLs is fine too
                deadline = time.monotonic() + 30
                while not barrier and time.monotonic() < deadline:
                    time.sleep(0.002)
        finally:
            client.disconnect()
            client.loop_stop()
        if counts["failed"]:
            # Mosquitto drops a publish its ACLs deny; only the v5 PUBACK reason (0x87) says so.
            raise SourceError(f"pipeline '{self.spec.name}': the MQTT broker at {self.host}:{self.port} refused "
                              f"{counts['failed']} of {len(payloads)} publishes ({', '.join(failures)}): check "
                              f"user '{self.username}' may publish there (the broker's ACLs)")
        return counts["acked"]

    def broker_counters(self, timeout: float = SYS_TIMEOUT) -> dict[str, int]:
        """What Mosquitto's `$SYS` tree says about loss the pipeline cannot count itself: messages the broker
        dropped because a client's queue was full (broker-wide, all clients, since it started), its uptime and
        heap. Mosquitto 2.0 publishes the dropped counter only when it changes, retained with a 60 s expiry:
        so it is missing when it did not change in the last minute (or never did). {} when the broker
        publishes no `$SYS` (other brokers, `sys_interval 0`) or this user may not read it."""
        client, got = self._sys_client()
        try:
            deadline = time.monotonic() + timeout
            while SYS_UPTIME not in got and time.monotonic() < deadline:
                if client.loop(0.05) not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_AGAIN):
                    break
            client.loop(0.02)  # retained values come in subscription order: the counter, if any, came first
        except (OSError, ssl.SSLError, ValueError) as exc:
            logger.debug("%s: reading $SYS: %r", self.spec.name, exc)
        finally:
            with contextlib.suppress(OSError, ValueError):
                client.disconnect()
        return parse_sys_counters({topic: values[-1] for topic, values in got.items()})

    def _sys_client(self) -> tuple[mqtt.Client, dict[str, list[bytes]]]:
        """A separate connection (never the session's) subscribed to the $SYS counters."""
        got: dict[str, list[bytes]] = {}
        client = self._new_client(f"{self.client_id}-sys-{uuid.uuid4().hex[:8]}", consumer=False)
        client.on_message = lambda _c, _u, m: got.setdefault(m.topic, []).append(m.payload)
        client.on_connect = lambda c, _u, _f, reason, _p: None if reason.is_failure else c.subscribe(
            [(topic, 0) for topic in SYS_COUNTERS])
        try:
            client.connect(self.host, self.port, keepalive=KEEPALIVE)
        except (OSError, ssl.SSLError, ValueError) as exc:
            logger.debug("%s: connecting for $SYS: %r", self.spec.name, exc)
        return client, got

    def status_note(self) -> str:
        """One line for `ingest status`: what the broker says it dropped (loss the pipeline cannot count)."""
        counters = self.broker_counters()
        where = f"{self.spec.name}: MQTT broker at {self.host}:{self.port}"
        if "broker_uptime_s" not in counters:
            return (f"{where} publishes no $SYS counters this user can read: messages it drops (full client "
                    "queues) cannot be seen")
        up = counters["broker_uptime_s"]
        dropped = counters.get("broker_dropped_messages")
        if dropped is None:
            what = "none" if up < SYS_EXPIRY else "none in the last minute (older drops are not shown)"
        else:
            what = f"{dropped} in total, the last within the last minute"
        return (f"{where} (up {up // 3600}h{up % 3600 // 60:02d}m): messages dropped for full client queues "
                f"(all clients): {what}")

    def loss_watch(self) -> BrokerLossWatch:
        """Reads the broker's dropped-message counter now; `finish()` after the run says what changed."""
        return BrokerLossWatch(self)

    def ensure_exists(self) -> None:
        """Register the persistent session (subscribe when the broker has none), so messages published from
        now on are queued.

        Once the pipeline has committed, its session was registered by then and this does nothing: connecting
        with the pipeline's client id would take the session over from a running batch (whose PUBACKs would
        then be lost). A session the broker lost meanwhile is the next batch's gap to report, not something
        to heal silently here."""
        version = self._delta_version()
        if version is not None:
            return
        if self._client is not None:
            self._drop_client()
        self._ensure_connected(version)
        self._drop_client(expire=self._session_lost)
        self._session_lost = False

    def _delta_version(self) -> int | None:
        table = table_location(self.spec, "target").open()
        return None if table is None else table.transaction_version(self.app_id)

    def close(self) -> None:
        # Buffered QoS 1 messages not taken stay unacknowledged: the broker resends them to the next session.
        # QoS 0 ones are gone (a run that ends normally hands them over first: `drain`).
        lost = self._qos.count(0)
        if lost:
            logger.warning("%s: closing the MQTT connection drops %d QoS 0 messages that were delivered but not "
                           "written (QoS 0 is at most once: the broker keeps no copy)", self.spec.name, lost)
        self._drop_client(expire=self._session_lost)
        self._session_lost = False
        self._reset_buffer()


def parse_sys_counters(values: dict[str, bytes]) -> dict[str, int]:
    """$SYS payloads → integers by our names (`$SYS/broker/uptime` is "N seconds")."""
    out: dict[str, int] = {}
    for topic, name in SYS_COUNTERS.items():
        text = values.get(topic, b"").decode("ascii", "replace").split(" ")[0]
        if text.isdigit():
            out[name] = int(text)
    return out


class BrokerLossWatch:
    """Watches the broker's dropped-message counter for the length of a run (a background connection of its
    own): loss that happens on the broker, which the pipeline cannot see itself."""

    def __init__(self, source: MqttSource):
        self.source = source
        self.client, self.got = source._sys_client()
        self.start: int | None = None
        self.readable = False
        try:
            self.client.loop_start()
            deadline = time.monotonic() + SYS_TIMEOUT
            while SYS_UPTIME not in self.got and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(0.02)
        except (OSError, ValueError):
            pass
        counters = parse_sys_counters({t: v[-1] for t, v in list(self.got.items())})
        self.readable = "broker_uptime_s" in counters
        self.seen_at_start = len(self.got.get(SYS_DROPPED, []))
        if "broker_dropped_messages" in counters:
            self.start = counters["broker_dropped_messages"]
        elif self.readable and counters["broker_uptime_s"] < SYS_EXPIRY:
            self.start = 0  # a young broker that never published the counter never dropped anything

    def finish(self) -> tuple[dict[str, Any], str | None]:
        """(metadata, warning or None) for the run's materialization and log."""
        with contextlib.suppress(OSError, ValueError):
            self.client.disconnect()
            self.client.loop_stop()
        if not self.readable:
            return {}, None
        later = [int(v) for v in self.got.get(SYS_DROPPED, [])[self.seen_at_start:] if v.isdigit()]
        meta: dict[str, Any] = {}
        if later or self.start is not None:
            meta["mqtt_broker_dropped_total"] = later[-1] if later else self.start
        during, exact = dropped_during(self.start, later)
        meta["mqtt_broker_dropped_during_run"] = during
        if not during:
            return meta, None
        amount = f"{during}" if exact else f"at least {during}"
        return meta, (f"{self.source.spec.name}: the MQTT broker at {self.source.host}:{self.source.port} dropped "
                      f"{amount} messages during this run ($SYS/broker/publish/messages/dropped, all clients: a "
                      "full client queue, max_queued_messages/max_queued_bytes). Some may have been this "
                      "pipeline's; they never reached it and cannot be recovered.")


def dropped_during(start: int | None, later: list[int]) -> tuple[int, bool]:
    """(messages dropped during a run, exact?) from the counter at its start (None: not published in the
    minute before) and the values published during it (only on change). A value lower than the one before
    is a broker restart (the counter starts again from 0)."""
    if not later:
        return 0, True
    total, previous, exact = 0, start, start is not None
    for value in later:
        if previous is None:
            total += 1  # changed at least once before this value, by how much is unknown
        elif value >= previous:
            total += value - previous
        else:
            total += value  # restarted
        previous = value
    return total, exact


def _send_all(sock: Any, data: bytes, deadline: float) -> None:
    """Write on paho's non-blocking (possibly TLS) socket."""
    view = memoryview(data)
    while view:
        try:
            view = view[sock.send(view):]
        except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
            if time.monotonic() > deadline:
                raise TimeoutError("socket not writable") from None
            select.select([], [sock], [], 0.1)


def _empty_batch(covered: list[PartitionRange]) -> RawBatch:
    return RawBatch(payloads=[], offsets=[], partitions=0, streams=[], keys=None, headers=None, timestamps_ms=[],
                    covered=covered, nbytes=0, ack_token=None)

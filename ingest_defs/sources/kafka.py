"""Apache Kafka source (confluent-kafka): exact per-partition ranges, read_committed, group commit after Delta.

Traps handled here (see shared design): watermarks are the last stable offset only under read_committed;
`position()` is wrong after EOF (librdkafka#4844), so coverage comes from the offsets and EOF events we
see; a finished partition is unassigned, not paused (pausing stalled the next batch's first fetch by the
consume timeout); a range may end in transaction markers or aborted records, so "covered" can exceed "last read".
"""

from __future__ import annotations

import contextlib
import time
from array import array
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
from confluent_kafka import (
    Consumer,
    IsolationLevel,
    KafkaError,
    KafkaException,
    Producer,
    TopicCollection,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient, NewTopic, OffsetSpec

from ingest_defs.config import PipelineSpec, expand_env
from ingest_defs.logs import LIBRDKAFKA
from ingest_defs.security import kafka_secrets, kafka_security, redact
from ingest_defs.shards import Shard
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

CONSUME_CHUNK = 2_000  # messages per consume(): the client makes a Message and two bytes per message
READ_STALL_SECONDS = 60.0  # a planned range that yields nothing for this long is an error, not a hang
CONNECT_SECONDS = 15.0  # how long the first metadata request may take before the run fails
TOPIC_READY_SECONDS = 30.0  # how long ensure_exists waits for a new topic's partitions to get leaders
# librdkafka error codes that mean "this broker will not take us as configured": fail at once, say why.
_REFUSED = {KafkaError._AUTHENTICATION: "authentication failed (check username/password and sasl_mechanism)",
            KafkaError._SSL: "TLS failed (check ca_file: the CA that signed the broker's certificate)"}
# While a cluster fails over (a broker died, a leader or the group coordinator moved), requests fail with
# these until librdkafka's metadata catches up: asked again for up to FAILOVER_SECONDS, not failed at once.
# The admin client's ListOffsets (plans, status) also meets a new leader's epoch before its metadata has it
# (FENCED/UNKNOWN_LEADER_EPOCH: seen in CI after a leader kill) and partitions added since its last metadata
# refresh (_UNKNOWN_PARTITION: seen in CI when a topic grew from 12 to 15 partitions during a run); on those
# its metadata is refreshed before asking again (_refresh_admin_metadata, on _STALE_METADATA).
FAILOVER_SECONDS = 45.0
_FAILOVER = {KafkaError.NOT_LEADER_FOR_PARTITION, KafkaError.LEADER_NOT_AVAILABLE, KafkaError.NOT_COORDINATOR,
             KafkaError.COORDINATOR_NOT_AVAILABLE, KafkaError.COORDINATOR_LOAD_IN_PROGRESS,
             KafkaError.REQUEST_TIMED_OUT, KafkaError._TIMED_OUT, KafkaError._TRANSPORT,
             KafkaError.NOT_ENOUGH_REPLICAS, KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError.FENCED_LEADER_EPOCH,
             KafkaError.UNKNOWN_LEADER_EPOCH, KafkaError._UNKNOWN_PARTITION}
# Of those, the ones that mean the admin client's cached metadata is stale (refreshed before asking again).
_STALE_METADATA = {KafkaError._UNKNOWN_PARTITION, KafkaError.FENCED_LEADER_EPOCH, KafkaError.UNKNOWN_LEADER_EPOCH,
                   KafkaError.NOT_LEADER_FOR_PARTITION, KafkaError.LEADER_NOT_AVAILABLE}


def _during_failover(call: Any, refresh_metadata: Callable[[], None] | None = None) -> Any:
    """`call()`, asked again while the error says the cluster is failing over (see _FAILOVER); when it says the
    client's metadata is stale (_STALE_METADATA), `refresh_metadata()` first."""
    deadline = time.monotonic() + FAILOVER_SECONDS
    wait = 0.2
    while True:
        try:
            return call()
        except KafkaException as exc:
            err = exc.args[0]
            if not isinstance(err, KafkaError) or not (err.retriable() or err.code() in _FAILOVER) \
                    or time.monotonic() + wait > deadline:
                raise
            if refresh_metadata is not None and err.code() in _STALE_METADATA:
                refresh_metadata()
        time.sleep(wait)
        wait = min(2.0, wait * 2)


class KafkaSource:
    kind = "kafka"
    reports_bounds = True

    def __init__(self, spec: PipelineSpec, client_config: dict[str, Any], shard: Shard | None = None):
        kafka = spec.source.kafka
        assert kafka is not None
        self.spec = spec
        # A shard plans, reads and acknowledges only its partitions (p % N == i); None: all of them.
        self.shard = shard
        self.topic = kafka.topic
        self.group_id = kafka.group_id or f"ingest-{spec.name}"
        passthrough = {k: expand_env(spec.name, f"source.kafka.config.{k}", v) for k, v in kafka.config.items()}
        security, _ = kafka_security(spec)  # the pipeline's `security` block replaces the environment's
        if security:
            client_config = {k: v for k, v in client_config.items() if not k.startswith(("security.", "sasl.", "ssl."))}
        self.client_config = {**client_config, **security, **passthrough, "error_cb": self._on_client_error,
                              "logger": LIBRDKAFKA}  # librdkafka's lines through Python logging, not stderr
        self.secrets = tuple(kafka_secrets(self.client_config))
        self._client_errors: list[KafkaError] = []
        self._connected = False
        self._consumer: Consumer | None = None  # made on first use, sized by the partitions it will read
        # How many partitions the last metadata gave this source: a consumer made after a plan (or by
        # `acknowledge` after `close`, or by `committed`) is sized without asking the cluster again.
        self._owned_partitions = 0
        self._admin: AdminClient | None = None  # metadata, identity, the watermarks of all partitions at once

    # ------------------------------------------------------------ helpers
    def app_id(self, partition: int) -> str:
        return f"{self.spec.name}/kafka/{self.topic}/{partition}"

    def _consumer_for(self) -> Consumer:
        if self._consumer is None:
            tunable = {
                **prefetch_settings(self.spec.batch.max_bytes, self._owned_partitions or len(self._partition_ids())),
                # A fetch long-poll holds the broker connection: the ack's offset commit queues behind it (0.5 s
                # per micro-batch at the default 500 ms; plans ask through the admin client). Ranges are bounded and
                # unassigned when read, so a short wait costs nothing while draining a backlog.
                "fetch.wait.max.ms": 50,
                "client.id": f"ingest-{self.spec.name}",
            }
            required = {  # exactly-once depends on these: the pipeline's `config` cannot change them
                "group.id": self.group_id,
                "enable.auto.commit": False,
                "enable.auto.offset.store": False,
                "isolation.level": "read_committed",
                "enable.partition.eof": True,
                "auto.offset.reset": "error",
            }
            self._consumer = Consumer({**tunable, **self.client_config, **required})
        return self._consumer

    def _on_client_error(self, err: KafkaError) -> None:
        self._client_errors.append(err)
        del self._client_errors[:-20]

    def _refusal(self) -> str | None:
        """Why the broker refuses us (authentication, TLS), from librdkafka's error callback; None if it does not."""
        for err in reversed(self._client_errors):
            if err.code() in _REFUSED or err.fatal():
                return f"{_REFUSED.get(err.code(), 'fatal client error')}: {err.str()}"
            if err.code() == KafkaError._TRANSPORT and "ssl/tls alert" in err.str().lower():
                # The broker aborted the TLS handshake; on a listener with ssl.client.auth=required that means
                # no (or an untrusted) client certificate.
                return ("the broker rejected the TLS handshake; a listener that requires a client certificate does "
                        f"this without a valid one (set cert_file/key_file): {err.str()}")
        return None

    def _check_connection(self) -> None:
        """Fail fast and clearly when the broker cannot be reached or refuses our credentials or certificate.

        Without this a refused login looks like a 15-second metadata timeout with no reason."""
        if self._connected:
            return
        bootstrap = self.client_config.get("bootstrap.servers")
        deadline = time.monotonic() + CONNECT_SECONDS
        while True:
            try:
                self._admin_for().list_topics(timeout=1.0)
                self._connected = True
                return
            except KafkaException as exc:
                self._admin_for().poll(0)  # serves error_cb: librdkafka reports refusals only there
                refusal = self._refusal()
                if refusal is not None:
                    raise SourceError(self.redact(
                        f"pipeline '{self.spec.name}': Kafka at {bootstrap} refused the connection: {refusal}. "
                        "Fix source.kafka.security (or the KAFKA_* environment settings).")) from None
                if time.monotonic() > deadline:
                    last = self._client_errors[-1].str() if self._client_errors else exc.args[0].str()
                    hint = (" A listener that requires client certificates closes the connection without one: "
                            "set cert_file/key_file." if self.client_config.get("security.protocol", "").endswith("SSL")
                            and "ssl.certificate.location" not in self.client_config else "")
                    raise SourceError(self.redact(
                        f"pipeline '{self.spec.name}': cannot reach Kafka at {bootstrap} within "
                        f"{CONNECT_SECONDS:.0f}s (last error: {last}).{hint} Start the stack (`ingest stack up`) "
                        "or fix KAFKA_BOOTSTRAP_SERVERS / source.kafka.security.")) from None

    def _denied(self, what: str, exc: KafkaException) -> SourceError:
        err = exc.args[0]
        text = err.str() if isinstance(err, KafkaError) else str(exc)
        fix = (" The user lacks an ACL for it: grant it (e.g. `kafka-acls --add --allow-principal User:<name> "
               "--operation All --topic <topic> --group <group>`).") if "AUTHORIZATION" in str(getattr(err, "name", lambda: "")()) else ""
        return SourceError(self.redact(f"pipeline '{self.spec.name}': Kafka at {self.client_config.get('bootstrap.servers')} "
                                       f"refused {what}: {text}.{fix}"))

    def redact(self, text: str) -> str:
        return redact(text, self.secrets)

    def _partition_ids(self) -> list[int]:
        """The topic's partitions this source owns: all of them, or its shard's (new ones included)."""
        partitions = self._all_partition_ids()
        owned = partitions if self.shard is None else self.shard.partitions(partitions)
        self._owned_partitions = len(owned)
        return owned

    def _all_partition_ids(self) -> list[int]:
        self._check_connection()
        metadata = self._admin_for().list_topics(self.topic, timeout=15)
        topic = metadata.topics.get(self.topic)
        if topic is None or topic.error is not None:
            reason = topic.error.str() if topic is not None and topic.error else "not in metadata"
            raise SourceError(
                f"pipeline '{self.spec.name}': Kafka topic '{self.topic}' is not available ({reason}). "
                f"Create it (e.g. `ingest produce {self.spec.name} --count 0`) or fix source.kafka.topic.")
        return sorted(topic.partitions)

    def _watermarks(self, partitions: list[int]) -> dict[int, tuple[int, int]]:
        """(low, high) per partition, in the order given, from two batched ListOffsets requests (earliest,
        latest: one request per leader each), not a round trip per partition (64 partitions: 70–140 ms per plan
        against 5–10 ms). Under read_committed the high watermark is the last stable offset (librdkafka#3428)."""
        admin = self._admin_for()

        def ask() -> dict[int, tuple[int, int]]:
            def offsets(spec: OffsetSpec) -> dict[int, int]:
                futures = admin.list_offsets({TopicPartition(self.topic, p): spec for p in partitions},
                                             isolation_level=IsolationLevel.READ_COMMITTED, request_timeout=15)
                return {tp.partition: future.result().offset for tp, future in futures.items()}
            low, high = offsets(OffsetSpec.earliest()), offsets(OffsetSpec.latest())
            return {p: (low[p], high[p]) for p in partitions}

        try:
            return _during_failover(ask, self._refresh_admin_metadata) if partitions else {}
        finally:
            admin.poll(0)  # its error and log callbacks (librdkafka queues them until polled)

    def _refresh_admin_metadata(self) -> None:
        """Make the admin client fetch the topic's metadata now. ListOffsets finds leaders in its metadata cache
        and never refreshes it for a partition it does not know: after partitions were added it failed with
        _UNKNOWN_PARTITION for minutes (until the 5-minute periodic refresh), measured against the broker."""
        with contextlib.suppress(KafkaException):  # the caller asks again; mid-failover it may not answer yet
            self._admin_for().list_topics(self.topic, timeout=5)

    def _admin_for(self) -> AdminClient:
        """This source's admin client (topic identity, watermarks), made once."""
        if self._admin is None:
            # a metadata request of the admin (a producer handle) must never create a missing topic
            self._admin = AdminClient({**self._admin_config(), "client.id": f"ingest-{self.spec.name}",
                                       "allow.auto.create.topics": False})
        return self._admin

    # ------------------------------------------------------------ protocol
    def plan(self, stored: StoredVersion, max_messages: int) -> Plan:
        wanted: list[tuple[int, int, int]] = []  # (partition, start, available)
        gaps: list[Gap] = []
        for partition, (low, high) in self._watermarks(self._partition_ids()).items():
            version = stored(self.app_id(partition))
            start = low if version is None else version + 1
            if version is not None and version > high - 1:
                raise SourceError(
                    f"pipeline '{self.spec.name}': table records offset {version} for {self.topic}[{partition}] "
                    f"but the broker ends at {high - 1}. The topic was recreated or truncated; refusing to "
                    "re-ingest silently. Point the pipeline at a new table or delete the table's history.")
            if start < low:
                gaps.append(Gap(self.app_id(partition), partition, start, low - 1,
                                "retention or compaction deleted them"))
                start = low
            if high > start:
                wanted.append((partition, start, high - start))
        ranges, lag_after = _share_budget(wanted, max_messages, self.app_id)
        return Plan(ranges=ranges, gaps=gaps, lag_after=lag_after)

    def read(self, plan: Plan, max_bytes: int) -> RawBatch:
        consumer = self._consumer_for()
        by_partition = {r.partition: r for r in plan.ranges}
        assigned = [TopicPartition(self.topic, r.partition, r.start) for r in plan.ranges]
        consumer.assign(assigned)
        columns = _Columns(plan.ranges[0].partition if len(plan.ranges) == 1 else None)
        covered_end = {r.partition: r.start - 1 for r in plan.ranges}
        open_parts = set(by_partition)
        last_progress = time.monotonic()
        try:
            while open_parts:
                # consume() waits for its full count or the timeout: ask for no more than the ranges still
                # hold, or every small batch waits out the timeout (1 s per micro-batch before this fix).
                # Fewer records than offsets (aborted records, markers) end with the partition EOF events.
                left = sum(by_partition[p].end - covered_end[p] for p in open_parts)
                msgs = consumer.consume(max(1, min(CONSUME_CHUNK, left)), 1.0)
                if not msgs:
                    if time.monotonic() - last_progress > READ_STALL_SECONDS:
                        raise SourceError(
                            f"pipeline '{self.spec.name}': no data from {self.topic} partitions "
                            f"{sorted(open_parts)} for {READ_STALL_SECONDS:.0f}s while reading a planned range")
                    continue
                last_progress = time.monotonic()
                limits = {p: by_partition[p].end for p in open_parts}
                offs = [m.offset() for m in msgs]
                parts = [m.partition() for m in msgs]
                if all(o <= limits.get(p, -1) for p, o in zip(parts, offs, strict=True)) and not any(m.error() for m in msgs):
                    # Fast path, the common case: a whole chunk of data inside the open ranges.
                    columns.add_chunk(msgs, offs, parts)
                    for p, o in zip(parts, offs, strict=True):
                        covered_end[p] = o
                    for p in set(parts):
                        if covered_end[p] == limits[p]:
                            open_parts.discard(p)
                            consumer.incremental_unassign([TopicPartition(self.topic, p)])
                else:
                    self._take_one_by_one(msgs, by_partition, open_parts, covered_end, columns)
                del msgs  # the client's Message objects go per chunk: only the packed columns stay
                if columns.nbytes >= max_bytes and open_parts:
                    open_parts.clear()  # max_bytes ends the batch early; coverage is what we saw
        finally:
            consumer.unassign()
        covered = [PartitionRange(r.app_id, r.partition, r.start, covered_end[r.partition]) for r in plan.ranges]
        return columns.batch(self.topic, covered)

    def _take_one_by_one(self, msgs: list[Any], by_partition: dict[int, PartitionRange], open_parts: set[int],
                         covered_end: dict[int, int], columns: _Columns) -> None:
        """Slow path for a chunk holding a range end, an EOF event or an error."""
        consumer = self._consumer_for()
        taken: list[Any] = []
        for m in msgs:
            p = m.partition()
            if p not in open_parts:
                continue
            err = m.error()
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    # Everything up to the EOF offset was seen or skipped (markers, aborted records).
                    covered_end[p] = min(by_partition[p].end, m.offset() - 1)
                    open_parts.discard(p)
                    consumer.incremental_unassign([TopicPartition(self.topic, p)])
                    continue
                raise KafkaException(err)
            o = m.offset()
            end = by_partition[p].end
            if o > end:
                covered_end[p] = end
                open_parts.discard(p)
                consumer.incremental_unassign([TopicPartition(self.topic, p)])
                continue
            taken.append(m)
            covered_end[p] = o
            if o == end:
                open_parts.discard(p)
                consumer.incremental_unassign([TopicPartition(self.topic, p)])
        columns.add_chunk(taken, [m.offset() for m in taken], [m.partition() for m in taken])

    def acknowledge(self, batch: RawBatch) -> None:
        # The group is bookkeeping for lag tools; the Delta log stays the truth.
        offsets = [TopicPartition(self.topic, r.partition, r.end + 1) for r in batch.covered if r.count > 0]
        if offsets:
            try:
                _during_failover(lambda: self._consumer_for().commit(offsets=offsets, asynchronous=False))
            except KafkaException as exc:
                raise self._denied(f"committing offsets of group '{self.group_id}'", exc) from None

    def state(self) -> list[PartitionState]:
        out = []
        for partition, (low, high) in self._watermarks(self._partition_ids()).items():
            out.append(PartitionState(self.app_id(partition), partition,
                                      low if high > low else None, high - 1 if high > low else None))
        return out

    def committed(self) -> dict[int, int | None]:
        """The group's committed next offsets per partition (None: nothing committed)."""
        tps = [TopicPartition(self.topic, p) for p in self._partition_ids()]
        result = _during_failover(lambda: self._consumer_for().committed(tps, timeout=15))
        return {tp.partition: (tp.offset if tp.offset >= 0 else None) for tp in result}

    def identity(self) -> dict[str, str]:
        self._check_connection()
        admin = self._admin_for()
        future = admin.describe_topics(TopicCollection([self.topic]))[self.topic]
        try:
            description = future.result(timeout=15)
        except KafkaException as exc:
            if isinstance(exc.args[0], KafkaError) and exc.args[0].code() == KafkaError.UNKNOWN_TOPIC_OR_PART:
                self._partition_ids()  # a missing topic: fails with the fix (create it, or fix the name)
            raise self._denied(f"describing topic '{self.topic}'", exc) from None
        return {"kafka.topic": self.topic, "kafka.topic_id": str(description.topic_id)}

    def publish(self, payloads: Sequence[bytes], keys: Sequence[bytes | None] | None = None) -> int:
        producer = Producer({**self._admin_config(), "linger.ms": 20, "acks": "all",
                             "enable.idempotence": True, "batch.num.messages": 10000})
        delivered = 0
        failures: list[str] = []

        def on_delivery(err: Any, _msg: Any) -> None:
            nonlocal delivered
            if err is None:
                delivered += 1
            else:
                failures.append(str(err))

        for i, value in enumerate(payloads):
            key = keys[i] if keys is not None else None
            while True:
                try:
                    producer.produce(self.topic, value=value, key=key, on_delivery=on_delivery)
                    break
                except BufferError:
                    producer.poll(0.1)
            if i % 10000 == 0:
                producer.poll(0)
        remaining = producer.flush(60)
        if remaining or failures:
            raise SourceError(f"pipeline '{self.spec.name}': {remaining} messages not delivered, "
                              f"{len(failures)} failed ({failures[:1]})")
        return delivered

    def ensure_exists(self) -> None:
        self._check_connection()
        admin = AdminClient(self._admin_config())
        partitions = self.spec.source.kafka.partitions
        # replication_factor -1: the broker's default.replication.factor (1 on the local stack, 3 on the cluster)
        futures = admin.create_topics([NewTopic(self.topic, num_partitions=partitions, replication_factor=-1)])
        try:
            futures[self.topic].result(timeout=30)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise
        # On a cluster the creation returns before every node knows the topic: wait until its partitions
        # have leaders, so what comes next (a producer, a plan) does not meet UNKNOWN_TOPIC_OR_PART.
        deadline = time.monotonic() + TOPIC_READY_SECONDS
        while time.monotonic() < deadline:
            meta = admin.list_topics(self.topic, timeout=10).topics.get(self.topic)
            if (meta is not None and meta.error is None and len(meta.partitions) >= partitions
                    and all(p.leader >= 0 for p in meta.partitions.values())):
                return
            time.sleep(0.2)

    def close(self) -> None:
        try:
            if self._consumer is not None:
                self._consumer.close()
                self._consumer = None
        finally:
            self._admin = None  # its last reference going destroys the admin client

    def _admin_config(self) -> dict[str, Any]:
        # Consumer-only settings would make producers/admin clients warn; pass connection settings only.
        return {k: v for k, v in self.client_config.items()
                if not k.startswith(("fetch.", "queued.", "isolation.", "auto.offset", "session.", "group."))}


FETCH_QUEUE_BACKOFF_MS = 10  # re-check a full prefetch queue this often (librdkafka's default: 1 s)


MIN_PARTITION_FETCH_BYTES = 32 << 10  # a fetch asks at least this much per partition (a larger message still comes)


def prefetch_settings(max_bytes: int, partitions: int = 1) -> dict[str, int]:
    """librdkafka's read-ahead, sized from the batch so memory follows the batch, not the backlog: its
    consumer queue holds a 64th of a batch's bytes, 1–8 MB (1 MB at the default 64 MB `max_bytes`), and one
    fetch of all `partitions` asks about that much (`max.partition.fetch.bytes`: the queue's bytes shared
    over the partitions, 32 kB to 1 MB each).

    The per-partition fetch is what wide topics pay for: at librdkafka's default 1 MB, a fetch of 64
    partitions brought up to 64 MB for a 1 MB queue, and a batch takes ~1.5k messages from each partition,
    so most of it was parsed into messages and thrown away when the partition's range ended (unassigned) and
    fetched again by the next batch. A 1M drain over 64 partitions read in 3.8–4.1 s against 1.2–1.4 s over
    one; with 32 kB per partition 1.7–1.9 s (16 kB no faster), and one partition no slower.

    What the queue holds costs ~3.5× its bytes (message structures, the fetch buffers they point into): an
    8 MB queue kept 36–45 MB of a bare consumer's memory, 1 MB 11–16 MB, and once the refill below waits
    10 ms a 100k read took as long with either (0.12–0.25 s; the batch path at 1, 4 and 64 partitions
    within run-to-run noise).

    A queue that small fills many times per batch, and each time it is full librdkafka postpones that
    partition's next fetch by `fetch.queue.backoff.ms` — 1 s by default, which made 1M drains stall about a
    second per refill (the 1-partition path at 107k msg/s, 64 partitions at 73k; 144k and 105k with 10 ms).
    Only the byte bound otherwise: a smaller `queued.min.messages` made the client wait between fetches
    (with the 1 s back-off), and `fetch.max.bytes` set explicitly would refuse a pipeline's larger
    `message.max.bytes`."""
    queue_bytes = max(1 << 20, min(8 << 20, max_bytes // 64))
    return {"queued.max.messages.kbytes": queue_bytes // 1024,
            "max.partition.fetch.bytes": max(MIN_PARTITION_FETCH_BYTES, min(1 << 20, queue_bytes // max(1, partitions))),
            "fetch.queue.backoff.ms": FETCH_QUEUE_BACKOFF_MS}


class _Columns:
    """A batch's messages as packed columns, filled one consume chunk at a time: payloads newline-joined
    per chunk (`PackedPayloads`), offsets and timestamps as int64 arrays, keys packed into one buffer. The
    client's Message objects (and the `bytes` it makes per value and key) live only as long as their chunk."""

    def __init__(self, single: int | None) -> None:
        self.single = single  # the plan's only partition: `_partition` is then one value for every row
        self.payloads = PackedPayloads()
        self.offsets = array("q")
        self.timestamps = array("q")
        self.partitions: list[int] = []
        self.keys = _PackedKeys()
        self.headers: list[Any] | None = None  # only once a message has headers
        self.nbytes = 0

    def add_chunk(self, msgs: list[Any], offsets: list[int], partitions: list[int]) -> None:
        if not msgs:
            return
        values = [m.value() or b"" for m in msgs]
        self.payloads.extend(values)
        self.nbytes += sum(map(len, values))
        del values
        self.offsets.extend(offsets)
        if self.single is None:
            self.partitions.extend(partitions)
        self.timestamps.extend([m.timestamp()[1] for m in msgs])
        self.keys.extend([m.key() for m in msgs])
        headers = [m.headers() for m in msgs]
        if self.headers is not None:
            self.headers.extend(headers)
        elif any(headers):
            self.headers = [None] * (len(self.offsets) - len(msgs)) + headers

    def batch(self, topic: str, covered: list[PartitionRange]) -> RawBatch:
        n = len(self.offsets)
        return RawBatch(payloads=self.payloads, offsets=np.frombuffer(self.offsets, dtype=np.int64),
                        partitions=self.single if self.single is not None else self.partitions, streams=topic,
                        keys=self.keys.column(n), headers=self.headers,
                        timestamps_ms=np.frombuffer(self.timestamps, dtype=np.int64), covered=covered,
                        nbytes=self.nbytes)


class _PackedKeys:
    """Message keys packed into one buffer with their lengths; a pyarrow binary column at the end (polars
    takes it without a Python object per key). Falls back to a plain list if a chunk mixes null keys."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.lengths = array("q")
        self.nulls = 0  # leading chunks without any key
        self.mixed: list[bytes | None] | None = None

    def extend(self, keys: list[bytes | None]) -> None:
        if self.mixed is not None:
            self.mixed.extend(keys)
        elif not self.chunks and not any(k is not None for k in keys):
            self.nulls += len(keys)
        elif not self.nulls and None not in keys:
            self.chunks.append(b"".join(keys))  # type: ignore[arg-type]
            self.lengths.extend(map(len, keys))  # type: ignore[arg-type]
        else:
            self.mixed = self._as_list() + keys

    def _as_list(self) -> list[bytes | None]:
        if self.nulls:
            return [None] * self.nulls
        data, out, pos = b"".join(self.chunks), [], 0
        for length in self.lengths:
            out.append(data[pos:pos + length])
            pos += length
        return out

    def column(self, n: int) -> Sequence[bytes | None] | None:
        if self.mixed is not None:
            return self.mixed
        if not self.chunks:
            return None  # no message had a key
        ends = np.cumsum(np.frombuffer(self.lengths, dtype=np.int64))
        offsets = np.concatenate(([0], ends)).astype(np.int64)
        return pa.LargeBinaryArray.from_buffers(pa.large_binary(), n,
                                                [None, pa.py_buffer(offsets), pa.py_buffer(b"".join(self.chunks))])


def _share_budget(wanted: list[tuple[int, int, int]], max_messages: int,
                  app_id: Any) -> tuple[list[PartitionRange], int]:
    """Split a batch's message budget over partitions with data, fairly; returns ranges and lag beyond them."""
    remaining = max_messages
    takes = {p: 0 for p, _, _ in wanted}
    pending = [w for w in wanted]
    while remaining > 0 and pending:
        share = max(1, remaining // len(pending))
        next_pending = []
        for p, start, available in pending:
            take = min(share, available - takes[p], remaining)
            takes[p] += take
            remaining -= take
            if takes[p] < available:
                next_pending.append((p, start, available))
            if remaining == 0:
                break
        pending = next_pending
    ranges = [PartitionRange(app_id(p), p, start, start + takes[p] - 1) for p, start, _ in wanted if takes[p] > 0]
    lag_after = sum(available for _, _, available in wanted) - sum(takes.values())
    return ranges, lag_after

"""Kafka: our batch path (read → decode → validate → Delta commit → offset commit) against a bare
batch `consume()` loop over the same messages, in the same run.

A: in-run ratio, from the first broker read to the last ack. B: the same backlog drained by
`ingest run` in a fresh process (Dagster run start-up included), as a user would.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic
from rich.progress import Progress

from ingest_defs.bench.common import SCHEMA, batch_runner, payload
from ingest_defs.config import REPO_ROOT, dump_pipelines, parse_pipeline
from ingest_defs.resources.brokers import DEFAULT_KAFKA, source_for
from ingest_defs.sink import DeltaTableSink
from ingest_defs.storage import join

BOOTSTRAP = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", DEFAULT_KAFKA)
def _produce(topic: str, messages: int, partitions: int, value: Any = None) -> None:
    value = value or payload
    admin = AdminClient({"bootstrap.servers": BOOTSTRAP})  # keep a reference until the future resolves
    admin.create_topics([NewTopic(topic, num_partitions=partitions, replication_factor=1)])[topic].result(30)
    producer = Producer({"bootstrap.servers": BOOTSTRAP, "linger.ms": 50, "batch.num.messages": 10000,
                         "compression.type": "lz4", "queue.buffering.max.messages": 1_000_000})
    with Progress() as progress:
        task = progress.add_task(f"producing {messages:,} to {topic}", total=messages)
        for i in range(messages):
            while True:
                try:
                    producer.produce(topic, value(i), key=str(i).encode(), partition=i % partitions)
                    break
                except BufferError:
                    producer.poll(0.05)
            if i % 50_000 == 0:
                producer.poll(0)
                progress.update(task, completed=i)
        producer.flush(120)
        progress.update(task, completed=messages)


def _bare_read(topic: str, messages: int, partitions: int) -> float:
    """The bare client: batch consume() of the whole range, touching each message's value."""
    consumer = Consumer({"bootstrap.servers": BOOTSTRAP, "group.id": f"bare-{topic}", "enable.auto.commit": False,
                         "isolation.level": "read_committed", "enable.partition.eof": False})
    consumer.assign([TopicPartition(topic, p, 0) for p in range(partitions)])
    seen = 0
    nbytes = 0
    start = time.perf_counter()
    while seen < messages:
        # the fastest plain form: one list comprehension per chunk, payload bytes kept
        values = [m.value() for m in consumer.consume(10_000, 1.0) if m.error() is None]
        seen += len(values)
        nbytes += sum(map(len, values))
    took = time.perf_counter() - start
    consumer.close()
    return messages / took


def bench_kafka(messages: int, partitions: int, batch: int, lake_uri: str | None = None) -> dict[str, Any]:
    """`lake_uri`: where the tables go (default a local scratch dir; `s3://...` for the S3 row)."""
    topic = f"bench_{partitions}p_{int(time.time())}"
    _produce(topic, messages, partitions)
    bare = max(_bare_read(topic, messages, partitions) for _ in range(2))
    lake = lake_uri or str(Path(tempfile.mkdtemp(prefix="bench-lake-")))
    spec = parse_pipeline(f"bench_{partitions}p", {
        "source": {"kafka": {"topic": topic, "partitions": partitions}}, "schema": SCHEMA,
        "table": join(lake, "a", "bronze"), "batch": {"max_messages": batch, "max_run_seconds": 3600}})
    # Best of two, like the bare read: each into a table of its own, so each reads everything.
    path_seconds, results = min((_path(spec.model_copy(update={"table": join(lake, f"a{i}", "bronze")}), messages)
                                 for i in range(2)), key=lambda run: run[0])
    read_s = sum(r.duration_s for r in results)
    via_dagster = _via_dagster_runs(spec.model_copy(update={"table": join(lake, "b", "bronze")}), messages)
    return {
        "name": f"kafka {partitions} partition(s)" + (" on S3" if lake_uri else ""),
        "messages": messages, "batch": batch, "batches": len(results),
        "bare_rate": bare, "path_rate": messages / path_seconds, "ratio": messages / path_seconds / bare,
        "batch_seconds": round(read_s, 2), **via_dagster, "ratio_b": via_dagster["dagster_rate"] / bare,
    }


def _path(spec: Any, messages: int) -> tuple[float, list[Any]]:
    """Our batch path in this process: seconds from the first plan to the last ack, and the batches."""
    source = source_for(spec)
    runner = batch_runner(spec, source)
    runner.identity()
    start = time.perf_counter()
    results = runner.run()
    path_seconds = time.perf_counter() - start
    source.close()
    landed = sum(r.rows_written + r.rows_quarantined for r in results)
    assert landed == messages, f"landed {landed} of {messages}"
    return path_seconds, results


def _via_dagster_runs(spec, messages: int) -> dict[str, float]:
    """Drain the same backlog with `ingest run` in a fresh process, as a user would (start-up included).

    Besides the rate, where the wall time went, from the pipeline's ledger: `startup_s` from the process's
    start to the first batch's start (imports, instance, definitions, run start and the first plan: before
    the first read of messages), `drain_s` from there to the last batch's commit, `after_last_commit_s` from
    it to the process's end (the last ledger row, the run's closing events, the exit). The instance is the
    bench's own (telemetry off), its storage created before the clock starts."""
    import polars as pl

    from ingest_defs.ledger import Ledger

    work = Path(tempfile.mkdtemp(prefix="bench-dagster-"))
    pipelines = work / "pipelines.yaml"
    pipelines.write_text(dump_pipelines([spec]))
    (work / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    env = {**os.environ, "INGEST_PIPELINES": str(pipelines), "DAGSTER_HOME": str(work)}
    # The instance's storage exists, as after a user's first run: creating it is not part of any drain.
    made = subprocess.run([sys.executable, "-c", "from dagster import DagsterInstance; DagsterInstance.get().dispose()"],
                          env=env, capture_output=True, text=True)
    if made.returncode != 0:
        raise RuntimeError(made.stderr)
    started_wall, start = time.time(), time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "ingest_defs", "run", spec.name], env=env, cwd=REPO_ROOT,
                          capture_output=True, text=True)
    took = time.perf_counter() - start
    ended_wall = started_wall + took
    if proc.returncode != 0:
        raise RuntimeError(proc.stdout + proc.stderr)
    target = DeltaTableSink.of(spec, "target")
    assert target.row_count() == messages
    batches = Ledger.of(spec).frame((pl.col("mode") == "live") & (pl.col("status") == "committed")).select(
        pl.col("started_at").min().dt.epoch("ms") / 1000, pl.col("committed_at").max().dt.epoch("ms") / 1000)
    first_start, last_commit = batches.row(0)
    return {"dagster_rate": messages / took, "dagster_seconds": round(took, 2),
            "dagster_startup_s": round(first_start - started_wall, 2),
            "dagster_drain_s": round(last_commit - first_start, 2),
            "dagster_after_last_commit_s": round(ended_wall - last_commit, 2),
            "dagster_drain_rate": messages / (last_commit - first_start)}  # B without start-up: rate / bare


# ------------------------------------------------------------ Avro (Confluent wire format, schema registry)
AVRO_SCHEMA = {"type": "record", "name": "Event", "namespace": "bench", "fields": [
    {"name": "id", "type": "long"}, {"name": "event", "type": "string"}, {"name": "value", "type": "long"},
    {"name": "page", "type": "string"}, {"name": "session", "type": "string"}]}


def bench_kafka_avro(messages: int, batch: int) -> dict[str, Any]:
    """The Kafka JSON row's messages (same records), as Confluent Avro against the stack's registry: the bare
    read against our path (Avro batch decode: one native read per writer schema and batch)."""
    import io
    import json

    import fastavro

    from ingest_defs.formats.confluent import frame_message
    from ingest_defs.formats.registry import registry_for

    topic = f"bench_avro_{int(time.time())}"
    lake = Path(tempfile.mkdtemp(prefix="bench-lake-"))
    spec = parse_pipeline("bench_avro", {
        "source": {"kafka": {"topic": topic, "partitions": 1}}, "format": "avro", "table": str(lake / "a" / "bronze"),
        "batch": {"max_messages": batch, "max_run_seconds": 3600}})
    schema_id = registry_for(spec.registry, spec.name).register(f"{topic}-value", json.dumps(AVRO_SCHEMA), "AVRO")
    parsed = fastavro.parse_schema(AVRO_SCHEMA)

    def avro_payload(i: int) -> bytes:
        buf = io.BytesIO()
        fastavro.schemaless_writer(buf, parsed, json.loads(payload(i)))
        return frame_message(schema_id, buf.getvalue())

    _produce(topic, messages, 1, value=avro_payload)
    bare = max(_bare_read(topic, messages, 1) for _ in range(2))
    path_seconds, results = min((_path(spec.model_copy(update={"table": str(lake / f"a{i}" / "bronze")}), messages)
                                 for i in range(2)), key=lambda run: run[0])
    return {
        "name": "kafka avro 1 partition(s)", "messages": messages, "batch": batch, "batches": len(results),
        "bytes_per_message": len(avro_payload(messages // 2)),
        "bare_rate": bare, "path_rate": messages / path_seconds, "ratio": messages / path_seconds / bare,
        "batch_seconds": round(sum(r.duration_s for r in results), 2),
        "decode_s": round(sum(r.stage_s.get("decode_validate", 0.0) for r in results), 2),
    }

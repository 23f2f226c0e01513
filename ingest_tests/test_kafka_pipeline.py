"""Kafka → Delta against a real broker: exactly once, crash-safe, concurrent-safe, gap-aware."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import dagster as dg
import polars as pl
import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from ingest_defs.resources.brokers import DEFAULT_KAFKA, source_for
from ingest_defs.samples import make_samples
from ingest_tests.conftest import (
    assert_exactly_once,
    assert_gap_policy,
    cli_env,
    failure_message,
    ingest_cli,
    kafka_spec,
    landed,
    materialization,
    run_job,
    run_until_caught_up,
)

pytestmark = pytest.mark.usefixtures("stack")
BOOTSTRAP = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", DEFAULT_KAFKA)


def produce(spec, payloads: list[bytes], keys: list[bytes | None] | None = None,
            transactional: str | None = None, abort: bool = False) -> set[tuple[int, int]]:
    """Produce and return the (partition, offset) of every message the broker acknowledged."""
    source = source_for(spec)
    source.ensure_exists()
    source.close()
    config = {"bootstrap.servers": BOOTSTRAP, "linger.ms": 5, "enable.idempotence": True}
    if transactional:
        config["transactional.id"] = transactional
    producer = Producer(config)
    acked: set[tuple[int, int]] = set()

    def on_delivery(err, msg):
        assert err is None, err
        acked.add((msg.partition(), msg.offset()))

    if transactional:
        producer.init_transactions(30)
        producer.begin_transaction()
    for i, value in enumerate(payloads):
        producer.produce(spec.source.kafka.topic, value=value, key=keys[i] if keys else None, on_delivery=on_delivery)
        producer.poll(0)
    producer.flush(30)
    if transactional:
        (producer.abort_transaction if abort else producer.commit_transaction)(30)
    assert len(acked) == len(payloads)
    return acked


def group_offsets(spec) -> dict[int, int]:
    consumer = Consumer({"bootstrap.servers": BOOTSTRAP, "group.id": f"ingest-{spec.name}"})
    try:
        parts = consumer.list_topics(spec.source.kafka.topic, timeout=10).topics[spec.source.kafka.topic].partitions
        tps = consumer.committed([TopicPartition(spec.source.kafka.topic, p) for p in parts], timeout=10)
        return {tp.partition: tp.offset for tp in tps if tp.offset >= 0}
    finally:
        consumer.close()


def delta_positions(spec) -> dict[int, int]:
    from deltalake import DeltaTable

    table = DeltaTable(spec.table_uri())
    out = {}
    for p in range(spec.source.kafka.partitions):
        v = table.transaction_version(f"{spec.name}/kafka/{spec.source.kafka.topic}/{p}")
        if v is not None:
            out[p] = v
    return out


def test_batches_over_partitions_land_each_message_exactly_once(lake, instance):
    spec = kafka_spec(partitions=3, batch={"max_messages": 700})
    first = make_samples(spec, 2000, bad_fraction=0.05, seed=1)
    produced = produce(spec, first.payloads, first.keys)
    run_job(spec, instance, max_batches=2)  # part of the backlog, then more arrives between batches
    second = make_samples(spec, 1500, bad_fraction=0.05, seed=2, start_id=2000)
    produced |= produce(spec, second.payloads, second.keys)
    runs = run_until_caught_up(spec, instance)
    assert len(runs) >= 2
    target, quarantine = assert_exactly_once(spec, produced)
    # the payloads too: every good id once, every bad payload once
    good_ids = {json.loads(p)["id"] for s in (first, second) for i, p in enumerate(s.payloads) if i not in s.bad}
    assert set(target["id"].to_list()) == good_ids
    bad_payloads = sorted(p for s in (first, second) for i, p in enumerate(s.payloads) if i in s.bad)
    assert sorted(quarantine["_raw"].to_list()) == bad_payloads
    # standard columns
    assert target["_source"].unique().to_list() == ["kafka"]
    assert target["_stream"].unique().to_list() == [spec.source.kafka.topic]
    assert target["_key"].drop_nulls().len() == target.height
    assert target["_timestamp"].dtype == pl.Datetime("us", "UTC")
    assert target["_batch_id"].n_unique() >= 2
    # the group's committed offsets follow Delta (end + 1)
    assert group_offsets(spec) == {p: v + 1 for p, v in delta_positions(spec).items()}


def test_quarantine_holds_each_bad_message_with_its_reason(lake, instance):
    spec = kafka_spec(partitions=1)
    bad = {
        b'{"id": 1, "event": "click", "value": ': "invalid JSON",
        b'{"id": "seven", "event": "click", "value": 1}': "wrong type",
        b'{"id": -5, "event": "click", "value": 1}': "check failed: id",
        b'{"id": 3, "event": "purchase", "value": 1}': "check failed: event",
        b'{"id": 4, "event": "click", "value": 1, "note": "\xc3\x28"}': "not UTF-8",
        b"": "empty value",
        b'{"event": "click", "value": 1}': "not_nullable",
    }
    good = [json.dumps({"id": i, "event": "click", "value": i}).encode() for i in range(10, 20)]
    produced = produce(spec, good + list(bad))
    run_until_caught_up(spec, instance)
    target, quarantine = assert_exactly_once(spec, produced)
    assert target.height == len(good)
    reasons = dict(zip(quarantine["_raw"].to_list(), quarantine["_error"].to_list(), strict=True))
    for payload, expected in bad.items():
        assert expected in reasons[payload], (payload, reasons[payload])


def test_sensor_requests_nothing_without_lag_and_one_run_per_range(lake, instance):
    from ingest_defs.factory import build_definitions
    from ingest_defs.resources.brokers import resources_from_env

    spec = kafka_spec(partitions=2, batch={"linger_seconds": 0})  # a sensor's run lingers 60 s once caught up; not this test's subject
    defs = build_definitions({spec.name: spec})
    sensor = defs.resolve_sensor_def(f"{spec.name}_sensor")
    resources = resources_from_env()
    produce(spec, [])  # creates the topic
    with dg.build_sensor_context(instance=instance, resources=resources) as ctx:
        assert isinstance(sensor(ctx), dg.SkipReason)
    produced = produce(spec, make_samples(spec, 300, seed=3).payloads)
    with dg.build_sensor_context(instance=instance, resources=resources) as ctx:
        first = sensor(ctx)
        cursor = ctx.cursor
    assert isinstance(first, dg.RunRequest)
    # the daemon's way in (evaluate_tick, resources from the context) asks for the same run
    with dg.build_sensor_context(instance=instance, resources=resources, definitions=defs) as ctx:
        tick = sensor.evaluate_tick(ctx)
    assert [r.run_key for r in tick.run_requests] == [first.run_key], tick.skip_message
    planned = first.run_config["ops"][f"ingest_{spec.name}"]["config"]["ranges"]
    assert sum(r["end"] - r["start"] + 1 for r in planned) == 300
    # evaluated again before the run: the same range gets the same run key (Dagster de-duplicates it)
    with dg.build_sensor_context(instance=instance, resources=resources, cursor=cursor) as ctx:
        again = sensor(ctx)
    assert again.run_key == first.run_key
    # run the requested range exactly as the daemon would, then the sensor has nothing to ask for
    result = run_job(spec, instance, **first.run_config["ops"][f"ingest_{spec.name}"]["config"])
    assert result.success, failure_message(result)
    assert_exactly_once(spec, produced)
    with dg.build_sensor_context(instance=instance, resources=resources, cursor=cursor) as ctx:
        assert isinstance(sensor(ctx), dg.SkipReason)


def test_a_wide_topic_with_messages_larger_than_a_partition_fetch_lands_every_message(lake, instance):
    """64 partitions make the consumer ask 32 kB per partition per fetch (see prefetch_settings): messages of
    150 kB must still come whole (the broker sends a record batch larger than the size asked), and small
    batches, whose ranges end inside a fetch, must neither lose nor double a message."""
    spec = kafka_spec(partitions=64, batch={"max_messages": 150})
    samples = make_samples(spec, 640, seed=3)
    # JSON allows whitespace between members: every 16th message is padded past the per-partition fetch
    payloads = [p[:-1] + b" " * 150_000 + b"}" if i % 16 == 0 else p for i, p in enumerate(samples.payloads)]
    produced = produce(spec, payloads, samples.keys)
    runs = run_until_caught_up(spec, instance)
    assert len(runs) >= 5
    target, quarantine = assert_exactly_once(spec, produced)
    assert quarantine.height == 0
    assert sorted(target["id"].to_list()) == sorted(json.loads(p)["id"] for p in payloads)


def test_aborted_transactions_never_land_and_the_batch_still_ends_exactly(lake, instance):
    spec = kafka_spec(partitions=1)
    rows = lambda start: [json.dumps({"id": i, "event": "click", "value": 1}).encode() for i in range(start, start + 10)]  # noqa: E731
    committed = produce(spec, rows(0), transactional=f"tx-{spec.name}")
    produce(spec, rows(100), transactional=f"tx-{spec.name}", abort=True)
    committed |= produce(spec, rows(200), transactional=f"tx-{spec.name}")
    aborted_tail = produce(spec, rows(300), transactional=f"tx-{spec.name}", abort=True)
    run_until_caught_up(spec, instance)
    target, _ = assert_exactly_once(spec, committed)
    assert sorted(target["id"].to_list()) == list(range(0, 10)) + list(range(200, 210))
    # the position covers the aborted tail and its marker, so the next plan finds nothing to do
    assert delta_positions(spec)[0] > max(o for _, o in aborted_tail)
    assert materialization(run_job(spec, instance), spec)["messages"] == 0


def test_crash_after_delta_commit_before_offset_commit_doubles_nothing(lake, instance, tmp_path: Path):
    spec = kafka_spec(partitions=2, batch={"max_messages": 400})
    samples = make_samples(spec, 1000, bad_fraction=0.02, seed=4)
    produced = produce(spec, samples.payloads, samples.keys)
    env = cli_env(spec, tmp_path, lake, INGEST_FAULT="after_target_commit")
    crashed = ingest_cli(["run", spec.name, "--max-batches", "1"], env)
    assert crashed.returncode == -9, crashed.stdout + crashed.stderr
    target, _ = landed(spec)
    assert target.height > 0  # the commit happened
    assert group_offsets(spec) == {}  # the offset commit did not
    run_until_caught_up(spec, instance)
    assert_exactly_once(spec, produced)
    assert group_offsets(spec) == {p: v + 1 for p, v in delta_positions(spec).items()}


def test_crash_between_quarantine_and_target_commit_doubles_nothing(lake, instance, tmp_path: Path):
    spec = kafka_spec(partitions=1, batch={"max_messages": 500})
    samples = make_samples(spec, 800, bad_fraction=0.1, seed=5)
    produced = produce(spec, samples.payloads, samples.keys)
    env = cli_env(spec, tmp_path, lake, INGEST_FAULT="after_quarantine_commit")
    crashed = ingest_cli(["run", spec.name, "--max-batches", "1"], env)
    assert crashed.returncode == -9, crashed.stdout + crashed.stderr
    target, quarantine = landed(spec)
    assert target.is_empty() and quarantine.height > 0
    run_until_caught_up(spec, instance)
    assert_exactly_once(spec, produced)


def test_two_runs_at_once_double_nothing(lake, tmp_path: Path):
    spec = kafka_spec(partitions=2, batch={"max_messages": 300})
    samples = make_samples(spec, 3000, bad_fraction=0.02, seed=6)
    produced = produce(spec, samples.payloads, samples.keys)
    env = cli_env(spec, tmp_path, lake)
    results = [None, None]

    def run(i: int) -> None:
        results[i] = ingest_cli(["run", spec.name], env)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r in results:
        assert r.returncode == 0, r.stdout + r.stderr
    assert_exactly_once(spec, produced)


def test_retention_gap_fails_or_is_skipped_as_configured(lake, instance):
    spec = kafka_spec(partitions=1)
    first = produce(spec, make_samples(spec, 100, seed=7).payloads)
    run_until_caught_up(spec, instance)
    lost = produce(spec, make_samples(spec, 50, seed=8, start_id=100).payloads)
    kept = produce(spec, make_samples(spec, 30, seed=9, start_id=150).payloads)
    # the broker deletes the 50 unread messages, as retention would
    admin = AdminClient({"bootstrap.servers": BOOTSTRAP})
    low = min(o for _, o in kept)
    for future in admin.delete_records([TopicPartition(spec.source.kafka.topic, 0, low)]).values():
        future.result(30)
    assert_gap_policy(spec, instance, lost, kept)
    assert_exactly_once(spec, first | kept)


def test_schema_evolution_adds_columns_and_refuses_type_changes(lake, instance):
    spec = kafka_spec(partitions=1)
    produce(spec, [json.dumps({"id": 1, "event": "click", "value": 1}).encode()])
    run_until_caught_up(spec, instance)
    schema = spec.model_dump(by_alias=True)["schema"]
    schema["columns"]["country"] = {"dtype": "string"}
    evolved = spec.model_copy(update={"schema_": type(spec.schema_).model_validate(schema)})
    evolved.__dict__.pop("pandera_schema", None)
    evolved.__dict__.pop("payload_schema", None)
    produce(spec, [json.dumps({"id": 2, "event": "click", "value": 2, "country": "NZ"}).encode()])
    run_until_caught_up(evolved, instance)
    target, _ = landed(spec)
    assert dict(zip(target["id"].to_list(), target["country"].to_list(), strict=True)) == {1: None, 2: "NZ"}
    schema["columns"]["value"] = {"dtype": "string"}
    retyped = spec.model_copy(update={"schema_": type(spec.schema_).model_validate(schema)})
    retyped.__dict__.pop("pandera_schema", None)
    retyped.__dict__.pop("payload_schema", None)
    produce(spec, [json.dumps({"id": 3, "event": "click", "value": "x"}).encode()])
    failed = run_job(retyped, instance)
    assert not failed.success
    message = failure_message(failed)
    assert "column 'value'" in message and "not change a type" in message


def test_recreated_topic_is_refused_not_reingested(lake, instance):
    spec = kafka_spec(partitions=1)
    produce(spec, make_samples(spec, 20, seed=10).payloads)
    run_until_caught_up(spec, instance)
    admin = AdminClient({"bootstrap.servers": BOOTSTRAP})
    admin.delete_topics([spec.source.kafka.topic])[spec.source.kafka.topic].result(30)
    import time

    for _ in range(50):
        fut = admin.create_topics([NewTopic(spec.source.kafka.topic, 1, 1)])[spec.source.kafka.topic]
        try:
            fut.result(30)
            break
        except Exception:
            time.sleep(0.3)
    produce(spec, make_samples(spec, 5, seed=11).payloads)
    failed = run_job(spec, instance)
    assert not failed.success
    assert "recreated" in failure_message(failed)

"""Sharded Kafka pipelines on the one-node broker: N shards commit disjoint partitions into one table at the
same time, exactly once; the sensor asks for one run per shard; `ingest run` runs every shard as its own
run; backfills and `ingest replay` still cover every shard. (Failover on the 3-node cluster, under the
daemon: test_shards_cluster.py.)"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import dagster as dg
import polars as pl
import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewPartitions

from ingest_defs.factory import build_definitions
from ingest_defs.jobs.shards import lag_by_shard
from ingest_defs.ledger import Ledger
from ingest_defs.lifecycle import BatchContext, BatchRunner
from ingest_defs.partitions import partition_key_at
from ingest_defs.resources.brokers import resources_from_env, source_for
from ingest_defs.samples import make_samples
from ingest_defs.shards import Shard, shard_op_name, shards_of
from ingest_defs.sink import DeltaTableSink
from ingest_tests.conftest import (
    assert_exactly_once,
    cli_env,
    failure_message,
    ingest_cli,
    kafka_spec,
)
from ingest_tests.test_backfill import backfill, ledger_frame, replay_metadata
from ingest_tests.test_kafka_pipeline import BOOTSTRAP, group_offsets, produce

pytestmark = pytest.mark.usefixtures("stack")


def sinks(spec):
    return (DeltaTableSink(spec.table_uri(), spec.name, "target"),
            DeltaTableSink(spec.quarantine_uri(), spec.name, "quarantine"), Ledger(spec.ledger_uri(), spec.name))


def delta_positions_all(spec) -> dict[int, int]:
    from deltalake import DeltaTable

    table = DeltaTable(spec.table_uri())
    source = source_for(spec)
    try:
        return {p.partition: table.transaction_version(p.app_id) for p in source.state()}
    finally:
        source.close()


def assert_ledger_covers_each_offset_once(spec, produced: set[tuple[int, int]]) -> None:
    live = ledger_frame(spec).filter(pl.col("mode") == "live")
    covered = [(p, o) for p, s, e in live.select("source_partition", "range_start", "range_end").iter_rows()
               for o in range(s, e + 1)]
    assert len(covered) == len(set(covered)), "a batch is in the ledger twice"
    assert set(covered) == produced


def test_three_shards_commit_concurrently_while_messages_and_partitions_arrive(lake):
    spec = kafka_spec(partitions=12, shards=3, batch={"max_messages": 300})
    first = make_samples(spec, 3000, bad_fraction=0.02, seed=151)
    produced = produce(spec, first.payloads, first.keys)
    errors: list[BaseException] = []
    results: dict[int, list] = {s.index: [] for s in shards_of(spec)}
    arriving = threading.Event()

    def shard_runs(shard: Shard) -> None:  # one shard's runs, back to back, as its pool allows
        try:
            while True:
                source = source_for(spec, shard=shard)
                target, quarantine, ledger = sinks(spec)
                runner = BatchRunner(spec, source, target, quarantine, BatchContext(trigger="test", shard=shard.label),
                                     ledger=ledger)
                try:
                    batches = runner.run(max_batches=3)
                finally:
                    source.close()
                results[shard.index].extend(batches)
                if not any(b.messages for b in batches):
                    if not arriving.is_set():
                        return
                    time.sleep(0.2)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=shard_runs, args=(shard,)) for shard in shards_of(spec)]
    arriving.set()
    for t in threads:
        t.start()
    # more messages while the shards run, then three partitions more (one for each shard), then more again
    acked: set[tuple[int, int]] = set()

    def send(n: int, partitions: int, seed: int, start: int) -> None:
        producer = Producer({"bootstrap.servers": BOOTSTRAP, "acks": "all", "enable.idempotence": True, "linger.ms": 5})
        deadline = time.monotonic() + 30  # until its metadata knows every partition (new ones take a moment)
        while (len(producer.list_topics(spec.source.kafka.topic, timeout=10).topics[spec.source.kafka.topic]
                   .partitions) < partitions and time.monotonic() < deadline):
            time.sleep(0.2)
        samples = make_samples(spec, n, bad_fraction=0.02, seed=seed, start_id=start)
        for i, payload in enumerate(samples.payloads):
            producer.produce(spec.source.kafka.topic, value=payload, partition=i % partitions,
                             on_delivery=lambda err, msg: acked.add((msg.partition(), msg.offset())) if err is None else None)
        producer.flush(30)

    send(1500, 12, 152, 3000)
    admin = AdminClient({"bootstrap.servers": BOOTSTRAP})
    admin.create_partitions([NewPartitions(spec.source.kafka.topic, 15)])[spec.source.kafka.topic].result(30)
    send(1500, 15, 153, 4500)
    arriving.clear()
    for t in threads:
        t.join(timeout=240)
    assert not errors, errors
    produced |= acked
    assert len(produced) == 6000 and {p for p, _ in produced} == set(range(15))
    # a last pass: every shard until caught up (the new partitions included)
    for shard in shards_of(spec):
        source = source_for(spec, shard=shard)
        target, quarantine, ledger = sinks(spec)
        try:
            BatchRunner(spec, source, target, quarantine, BatchContext(shard=shard.label), ledger=ledger).run()
        finally:
            source.close()
    assert_exactly_once(spec, produced)
    assert_ledger_covers_each_offset_once(spec, produced)
    # each shard committed only its own partitions
    for index, batches in results.items():
        touched = {r.partition for b in batches for r in b.covered if r.count}
        assert touched and all(p % 3 == index for p in touched), (index, touched)
    everything = source_for(spec)
    try:
        assert lag_by_shard(spec, everything, sinks(spec)[0]) == {"0": 0, "1": 0, "2": 0}
    finally:
        everything.close()
    assert group_offsets(spec) == {p: v + 1 for p, v in delta_positions_all(spec).items()}


def test_a_source_that_planned_before_partitions_were_added_plans_and_lands_them(lake):
    # The admin client behind the plan caches the topic's metadata and never refreshed it for partitions it did
    # not know (ListOffsets failed with _UNKNOWN_PARTITION until its 5-minute refresh): one source, kept open
    # across the growth, must see the new partitions at its next plan.
    spec = kafka_spec(partitions=2, batch={"max_messages": 500})
    first = make_samples(spec, 200, bad_fraction=0.05, seed=171)
    produced = produce(spec, first.payloads, first.keys)
    source = source_for(spec)
    target, quarantine, ledger = sinks(spec)
    try:
        runner = BatchRunner(spec, source, target, quarantine, BatchContext(trigger="test"), ledger=ledger)
        assert sum(b.messages for b in runner.run()) == 200
        topic = spec.source.kafka.topic
        admin = AdminClient({"bootstrap.servers": BOOTSTRAP})  # held: a collected client cancels its futures
        admin.create_partitions([NewPartitions(topic, 5)])[topic].result(30)
        producer = Producer({"bootstrap.servers": BOOTSTRAP, "acks": "all", "enable.idempotence": True})
        deadline = time.monotonic() + 30
        while len(producer.list_topics(topic, timeout=10).topics[topic].partitions) < 5:
            assert time.monotonic() < deadline, "the producer never saw the new partitions"
            time.sleep(0.2)
        more = make_samples(spec, 300, bad_fraction=0.05, seed=172, start_id=200)
        for i, payload in enumerate(more.payloads):
            producer.produce(topic, value=payload, partition=i % 5,
                             on_delivery=lambda err, msg: produced.add((msg.partition(), msg.offset())))
        assert producer.flush(30) == 0
        assert sum(b.messages for b in runner.run()) == 300
    finally:
        source.close()
    assert {p for p, _ in produced} == set(range(5)) and len(produced) == 500
    assert_exactly_once(spec, produced)
    assert group_offsets(spec) == {p: v + 1 for p, v in delta_positions_all(spec).items()}


def test_the_sensor_asks_one_run_per_shard_and_each_run_reports_its_shard(lake, instance):
    spec = kafka_spec(partitions=6, shards=3, batch={"max_messages": 500, "linger_seconds": 0})  # a sensor's run lingers 60 s once caught up; not this test's subject
    samples = make_samples(spec, 900, bad_fraction=0.05, seed=154)
    produced = produce(spec, samples.payloads, samples.keys)
    defs = build_definitions({spec.name: spec})
    sensor = defs.resolve_sensor_def(f"{spec.name}_sensor")
    with dg.build_sensor_context(instance=instance, resources=resources_from_env(), definitions=defs) as ctx:
        tick = sensor.evaluate_tick(ctx)
        cursor = ctx.cursor
    requests = tick.run_requests
    assert sorted(r.job_name for r in requests) == [f"{spec.name}_shard_{i}_job" for i in range(3)]
    assert len({r.run_key for r in requests}) == 3
    for r in requests:
        index = int(r.tags["ingest/shard"].split("/")[0])
        planned = r.run_config["ops"][shard_op_name(spec, index)]["config"]["ranges"]
        assert planned and all(p["partition"] % 3 == index for p in planned)
    for r in requests:
        result = defs.resolve_job_def(r.job_name).execute_in_process(
            run_config={**r.run_config, "loggers": {"console": {"config": {"log_level": "ERROR"}}}},
            instance=instance, tags=r.tags, raise_on_error=False)
        assert result.success, failure_message(result)
        index = int(r.tags["ingest/shard"].split("/")[0])
        mats = result.asset_materializations_for_node(shard_op_name(spec, index))
        meta = {k: v.value for k, v in mats[0].metadata.items()}
        assert meta["shard"] == r.tags["ingest/shard"] and meta["shard_partitions"] == [index, index + 3]
        assert meta["lag"] == 0 and set(meta["lag_by_shard"]) == {"0", "1", "2"} and "commit_retries" in meta
        assert mats[0].partition == partition_key_at(spec)
    assert_exactly_once(spec, produced)
    with dg.build_sensor_context(instance=instance, resources=resources_from_env(), definitions=defs,
                                 cursor=cursor) as ctx:
        tick = sensor.evaluate_tick(ctx)
    assert not tick.run_requests and "no lag" in (tick.skip_message or "")
    # a backfill of today (the asset's run, across every shard) replays every shard's batches
    meta = replay_metadata(backfill(spec, instance, [partition_key_at(spec)]), spec)
    assert meta["batches_not_replayed"] == 0 and meta["batches_replaced"] == ledger_frame(spec)["batch_id"].n_unique()
    assert_exactly_once(spec, produced)


def test_ingest_run_runs_every_shard_as_its_own_run_and_replay_covers_them(lake, tmp_path: Path):
    spec = kafka_spec(partitions=4, shards=2, batch={"max_messages": 400})
    samples = make_samples(spec, 1600, bad_fraction=0.02, seed=155)
    produced = produce(spec, samples.payloads, samples.keys)
    env = cli_env(spec, tmp_path, lake)
    wrong = ingest_cli(["run", spec.name, "--shard", "2"], env)
    assert wrong.returncode == 2 and "shard 2 does not exist" in wrong.stderr  # errors go to stderr
    done = ingest_cli(["run", spec.name], env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"[shard 0] {spec.name} shard 0: run" in done.stdout and f"[shard 1] {spec.name} shard 1: run" in done.stdout
    assert_exactly_once(spec, produced)
    with dg.DagsterInstance.from_config(str(tmp_path / "dh")) as instance:
        runs = instance.get_runs()
        assert sorted(r.tags.get("ingest/shard") for r in runs) == ["0/2", "1/2"]
    replay = ingest_cli(["replay", spec.name, "--from", "0", "--to", "1000000"], env)
    assert replay.returncode == 0, replay.stdout + replay.stderr
    assert f"{ledger_frame(spec)['batch_id'].n_unique()} replaced" in replay.stdout.replace("\n", " ")
    assert_exactly_once(spec, produced)
    status = ingest_cli(["status", spec.name], {**env, "COLUMNS": "250"})  # a wide table: one line per pipeline
    assert "0 (s0 0, s1 0)" in status.stdout, status.stdout  # the lag per shard

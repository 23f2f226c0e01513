"""A sharded pipeline on the 3-node Kafka cluster under the Dagster daemon: its sensor launches one run per
shard, concurrently, while messages keep arriving; the leader of a shard's partition is killed (-9) while
that shard's run is mid-batch; another shard's run is killed (-9) between its Delta commit and its offset
commit and resumed by the next sensor request; the killed broker is restarted and rejoins; partitions are
added to the topic. Then target ∪ quarantine equals what was produced, nothing doubled, the group's
committed offsets survived, and every shard's lag is 0.

The cluster (`ingest stack up --cluster`) is started once per session by the `kafka_cluster` fixture
(and stopped after, if it started it)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import polars as pl
import pytest
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicCollection, TopicPartition
from confluent_kafka.admin import AdminClient, ConfigResource, NewPartitions

from ingest_defs.assets.ingestion import target_key
from ingest_defs.config import REPO_ROOT
from ingest_defs.jobs.shards import lag_by_shard
from ingest_defs.resources.brokers import source_for
from ingest_defs.samples import make_samples
from ingest_defs.sensors.ingestion import IN_PROGRESS
from ingest_defs.shards import shard_job_name
from ingest_defs.sink import DeltaTableSink
from ingest_tests.conftest import assert_exactly_once, kafka_spec, write_pipelines_file
from ingest_tests.test_backfill import ledger_frame

BIN = Path(sys.executable).parent


@pytest.fixture(scope="session")
def kafka_cluster() -> Iterator[str]:
    """The 3-node cluster's bootstrap servers: started here once per session (stopped after if so)."""
    from ingest_defs.stack import cluster, manager

    if os.environ.get("INGEST_STACK_EXTERNAL") == "1":
        pytest.skip("the brokers are external: this suite cannot start (or kill) cluster nodes")
    started = manager.status(cluster=True) != 0
    if started:
        assert manager.up(cluster=True) == 0, "could not start the Kafka cluster (ingest stack up --cluster)"
    yield cluster.bootstrap()
    if started:
        manager.down(cluster=True)


class SteadyProducer(threading.Thread):
    """Publishes the pipeline's sample messages (2% bad) at a steady rate, round robin over the topic's
    partitions, acks=all with idempotence; keeps the (partition, offset) of every acknowledged message."""

    def __init__(self, spec, bootstrap: str, rate: int = 300):
        super().__init__(daemon=True)
        self.spec, self.bootstrap, self.rate = spec, bootstrap, rate
        self.partitions = 12
        self.acked: set[tuple[int, int]] = set()
        self.errors: list[str] = []
        self.stop = threading.Event()

    def _producer(self) -> Producer:
        producer = Producer({"bootstrap.servers": self.bootstrap, "acks": "all", "enable.idempotence": True,
                             "linger.ms": 5, "logger": _quiet_logger()})
        producer.list_topics(self.spec.source.kafka.topic, timeout=30)  # knows every partition before producing
        return producer

    def _on_delivery(self, err, msg) -> None:
        if err is None:
            self.acked.add((msg.partition(), msg.offset()))
        else:
            self.errors.append(str(err))

    def run(self) -> None:
        topic, known, producer = self.spec.source.kafka.topic, self.partitions, self._producer()
        sent, tick = 0, 0.1
        while not self.stop.is_set():
            if self.partitions != known:  # partitions were added: a producer that knows them
                producer.flush(60)
                producer, known = self._producer(), self.partitions
            samples = make_samples(self.spec, int(self.rate * tick), bad_fraction=0.02, seed=sent, start_id=sent)
            for i, payload in enumerate(samples.payloads):
                producer.produce(topic, value=payload, partition=(sent + i) % known, on_delivery=self._on_delivery)
            sent += len(samples.payloads)
            producer.poll(0)
            time.sleep(tick)
        remaining = producer.flush(120)
        if remaining:
            self.errors.append(f"{remaining} messages not delivered")


def _quiet_logger():
    import logging

    logger = logging.getLogger("ingest_tests.cluster_producer")
    logger.setLevel(logging.CRITICAL)  # a killed broker makes librdkafka log every reconnect attempt
    return logger


def _asked_until_known(ask, timeout: float = 30.0):
    """ask()'s answer; a node that has not seen a new topic's metadata yet answers
    UNKNOWN_TOPIC_OR_PART for a moment (to any admin request), so that is asked again."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return ask()
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.UNKNOWN_TOPIC_OR_PART or time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def describe(admin: AdminClient, topic: str, timeout: float = 30.0):
    """The topic's description."""
    return _asked_until_known(lambda: admin.describe_topics(TopicCollection([topic]))[topic].result(30), timeout)


def topic_config(admin: AdminClient, topic: str, timeout: float = 30.0) -> dict:
    """The topic's configuration entries by name."""
    resource = ConfigResource(ConfigResource.Type.TOPIC, topic)
    return _asked_until_known(lambda: next(iter(admin.describe_configs([resource]).values())).result(30), timeout)


def group_offsets(bootstrap: str, spec, partitions: int) -> dict[int, int]:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"ingest-{spec.name}", "logger": _quiet_logger()})
    try:
        tps = consumer.committed([TopicPartition(spec.source.kafka.topic, p) for p in range(partitions)], timeout=30)
        return {tp.partition: tp.offset for tp in tps if tp.offset >= 0}
    finally:
        consumer.close()


def wait_until(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.timeout(1200)  # minutes on a quiet machine; a loaded one starts the daemon's processes slowly
def test_sharded_pipeline_on_the_cluster_survives_a_leader_kill_a_killed_run_and_new_partitions(
        lake, tmp_path: Path, kafka_cluster: str, monkeypatch: pytest.MonkeyPatch):
    from ingest_defs.stack import cluster, manager

    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", kafka_cluster)
    # a run keeps polling while messages arrive (linger), so each shard needs few runs: launching one costs seconds
    spec = kafka_spec(partitions=12, shards=3, batch={"max_messages": 600, "max_run_seconds": 60, "linger_seconds": 4},
                      trigger={"sensor": {"interval_seconds": 1}})
    source = source_for(spec)
    source.ensure_exists()
    source.close()
    admin = AdminClient({"bootstrap.servers": kafka_cluster, "logger": _quiet_logger()})
    topic = spec.source.kafka.topic
    assert {len(p.replicas) for p in describe(admin, topic).partitions} == {3}  # the cluster's default RF
    assert topic_config(admin, topic)["min.insync.replicas"].value == "2"

    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(REPO_ROOT / "dagster_home" / "dagster.yaml", home / "dagster.yaml")
    stall = tmp_path / "stall"
    env = {**os.environ, "DAGSTER_HOME": str(home), "LAKE_ROOT": str(lake), "KAFKA_BOOTSTRAP_SERVERS": kafka_cluster,
           "INGEST_PIPELINES": str(write_pipelines_file(tmp_path / "pipelines.yaml", [spec])),
           # shard 0 waits once after planning a batch (its partitions' leader dies then); shard 1 waits once
           # after its Delta commit, before the offset commit (its run is killed then)
           "INGEST_FAULT": "stall:after_plan@0,stall:after_target_commit@1", "INGEST_FAULT_FILE": str(stall),
           # a loaded machine can take over Dagster's default 60 s to start a run process (imports included)
           "DAGSTER_GRPC_TIMEOUT_SECONDS": "300"}
    producer = SteadyProducer(spec, kafka_cluster)
    producer.start()
    killed_node = None
    with open(tmp_path / "daemon.log", "w") as log:
        daemon = subprocess.Popen([str(BIN / "dagster-daemon"), "run", "-w", str(REPO_ROOT / "workspace.yaml")],
                                  cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        planned, committed = Path(f"{stall}-after_plan"), Path(f"{stall}-after_target_commit")

        def both_stalled() -> bool:
            return planned.exists() and committed.exists()

        # shard 0 planned a batch and has read nothing, while shard 1 committed one to Delta and not yet its
        # offsets: two shards' runs in progress at once
        wait_until(both_stalled, 600, "a shard-0 run to stall mid-batch and a shard-1 run to stall after its commit")
        before = group_offsets(kafka_cluster, spec, 12)
        killed_node = describe(admin, topic).partitions[0].leader.id  # the leader of a shard-0 partition
        cluster.kill_node(killed_node)
        planned.unlink()  # shard 0's batch goes on: its reads find the new leaders
        # the committed offsets survive the loss of a node (`__consumer_offsets` has RF 3)
        after = wait_until(lambda: _offsets_or_none(kafka_cluster, spec), 60, "the group coordinator to move")
        assert all(after.get(p, -1) >= o for p, o in before.items()), (before, after)
        os.kill(int(committed.read_text()), signal.SIGKILL)  # shard 1's run dies between Delta and offset commits
        committed.with_suffix(".done").write_text("")  # later runs of shard 1 go through
        committed.unlink()
        assert manager.up(cluster=True) == 0  # the killed node restarts and rejoins
        wait_until(lambda: all(len(p.isr) == 3 for p in describe(admin, topic).partitions), 120,
                   "every partition back to 3 in-sync replicas")
        # one more partition per shard (with RF 3 that needs all three nodes), and traffic on them too
        admin.create_partitions([NewPartitions(topic, 15)])[topic].result(60)
        producer.partitions = 15
        time.sleep(3)
        producer.stop.set()
        producer.join(150)
        assert not producer.errors, producer.errors[:3]
        produced = producer.acked
        assert {p for p, _ in produced} == set(range(15))
        target = DeltaTableSink(spec.table_uri(), spec.name, "target")

        def caught_up() -> bool:
            everything = source_for(spec)
            try:
                return lag_by_shard(spec, everything, target) == {"0": 0, "1": 0, "2": 0}
            finally:
                everything.close()

        wait_until(caught_up, 600, "every shard's lag to reach 0")
        wait_until(lambda: group_offsets(kafka_cluster, spec, 15) == _delta_next(spec, 15), 120,
                   "the group's offsets to follow Delta")

        def runs_done() -> bool:  # a run that caught up lingers a little, then records its materialization
            with dg.DagsterInstance.from_config(str(home)) as instance:
                return not instance.get_runs(filters=dg.RunsFilter(statuses=IN_PROGRESS), limit=1)

        wait_until(runs_done, 180, "the last runs to finish")
    finally:
        producer.stop.set()
        daemon.terminate()
        try:
            daemon.wait(60)
        except subprocess.TimeoutExpired:
            daemon.kill()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(daemon.pid, signal.SIGKILL)  # its code server and any run it launched
        if killed_node is not None and cluster.node_pid(killed_node) is None:
            manager.up(cluster=True)

    assert_exactly_once(spec, produced)
    live = ledger_frame(spec).filter(pl.col("mode") == "live")
    covered = [(p, o) for p, s, e in live.select("source_partition", "range_start", "range_end").iter_rows()
               for o in range(s, e + 1)]
    assert len(covered) == len(set(covered)) and set(covered) == produced, "the ledger records each offset once"
    with dg.DagsterInstance.from_config(str(home)) as instance:
        spans: dict[int, list[tuple[float, float, str]]] = {}
        for record in instance.get_run_records():
            run = record.dagster_run
            for i in range(3):
                if run.job_name == shard_job_name(spec, i) and record.start_time and record.end_time:
                    spans.setdefault(i, []).append((record.start_time, record.end_time, run.status.value))
        assert sorted(spans) == [0, 1, 2], "every shard ran"
        for i, runs in spans.items():  # one shard, one run at a time (its pool)
            ordered = sorted(runs)
            assert all(b[0] >= a[1] for a, b in zip(ordered, ordered[1:], strict=False)), f"shard {i} overlapped"
        assert "FAILURE" in {status for _, _, status in spans[1]}  # the run killed after its commit
        every = sorted((s, e, i) for i, runs in spans.items() for s, e, _ in runs)
        assert any(b[0] < a[1] and a[2] != b[2] for a, b in zip(every, every[1:], strict=False)), \
            "no two shards' runs ever ran at the same time"
        events = instance.fetch_materializations(target_key(spec), limit=1000).records
        shown = {e.asset_materialization.metadata["shard"].value for e in events}
        assert shown == {"0/3", "1/3", "2/3"}
        assert all("lag_by_shard" in e.asset_materialization.metadata for e in events)


def _offsets_or_none(bootstrap: str, spec) -> dict[int, int] | None:
    try:
        return group_offsets(bootstrap, spec, 12)
    except Exception:  # noqa: BLE001 - the coordinator is moving: ask again
        return None


def _delta_next(spec, partitions: int) -> dict[int, int]:
    from deltalake import DeltaTable

    table = DeltaTable(spec.table_uri())
    out = {}
    for p in range(partitions):
        v = table.transaction_version(f"{spec.name}/kafka/{spec.source.kafka.topic}/{p}")
        if v is not None:
            out[p] = v + 1
    return out

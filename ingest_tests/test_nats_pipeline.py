"""NATS JetStream → Delta against a real nats-server: exactly once, crash-safe, gap-aware.

Every test publishes with its own client (the oracle: the stream sequences the broker acknowledged) and
compares that set with what landed in target ∪ quarantine: nothing lost, nothing doubled.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import dagster as dg
import nats
import pyarrow as pa
import pytest
from deltalake import DeltaTable, write_deltalake
from nats.js import api

from ingest_defs.config import PipelineSpec, parse_pipeline
from ingest_defs.ledger import Ledger
from ingest_defs.resources.brokers import DEFAULT_NATS, source_for
from ingest_defs.samples import Samples, make_samples
from ingest_defs.sources import nats as nats_source
from ingest_tests.conftest import (
    USER_ACTIVITY_SCHEMA,
    assert_exactly_once,
    assert_gap_policy,
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
NATS_URL = os.environ.get("NATS_URL", DEFAULT_NATS)
ACK_WAIT = 2.0  # small, so redelivery after ack_wait happens inside a test
_streams: list[str] = []  # created by this module's tests, deleted after each test


@pytest.fixture(autouse=True)
def _delete_streams():
    yield
    names, _streams[:] = list(_streams), []

    async def drop(js):
        for name in names:
            with contextlib.suppress(nats.js.errors.NotFoundError):
                await js.delete_stream(name)

    on_broker(drop)


# ------------------------------------------------------------ helpers
def nats_spec(retention: str = "limits", subject: str | None = None, name: str | None = None,
              **overrides: Any) -> PipelineSpec:
    """A user_activity-like pipeline on a fresh stream of its own (subjects `<name>.*`)."""
    name = name or unique("np")
    raw: dict[str, Any] = {
        "source": {"nats": {"stream": f"S_{name}", "subject": subject or f"{name}.*", "retention": retention,
                            "ack_wait_seconds": ACK_WAIT}},
        "schema": USER_ACTIVITY_SCHEMA,
        "table": f"bronze/{name}",
        "batch": {"max_messages": 300},
        "trigger": {"sensor": {"interval_seconds": 5}},
    }
    raw.update(overrides)
    _streams.append(f"S_{name}")
    return parse_pipeline(name, raw)


def stream_of(spec: PipelineSpec) -> str:
    return spec.source.nats.stream


def app_id(spec: PipelineSpec) -> str:
    return f"{spec.name}/nats/{stream_of(spec)}"


def on_broker(fn):
    """Run `await fn(js)` on a fresh connection (the tests' own client, independent of NatsSource)."""
    async def go():
        nc = await nats.connect(NATS_URL)
        try:
            return await fn(nc.jetstream(timeout=30))
        finally:
            await nc.close()

    return asyncio.run(go())


def ensure_exists(spec: PipelineSpec) -> None:
    source = source_for(spec)
    try:
        source.ensure_exists()
    finally:
        source.close()


def publish(messages: list[tuple[str, bytes, dict[str, str] | None]], stream: str) -> list[int]:
    """Publish (subject, payload, headers) with acks; the stream sequences, in order."""
    async def go(js):
        seqs: list[int] = []
        for i in range(0, len(messages), 1000):
            futures = [await js.publish_async(s, p, headers=h) for s, p, h in messages[i:i + 1000]]
            for ack in await asyncio.gather(*futures):
                assert ack.stream == stream, ack
                seqs.append(ack.seq)
        return seqs

    return on_broker(go)


def produce(spec: PipelineSpec, samples: Samples, subjects: list[str] | None = None) -> set[tuple[int, int]]:
    """Publish samples to `<name>.evt` (or the given subjects); (partition 0, stream sequence) acknowledged."""
    subjects = subjects or [f"{spec.name}.evt"] * len(samples.payloads)
    seqs = publish([(s, p, None) for s, p in zip(subjects, samples.payloads, strict=True)], stream_of(spec))
    return {(0, s) for s in seqs}


def stream_state(spec: PipelineSpec) -> api.StreamState:
    async def go(js):
        return (await js.stream_info(stream_of(spec))).state

    return on_broker(go)


def consumer(spec: PipelineSpec) -> api.ConsumerInfo | None:
    async def go(js):
        try:
            return await js.consumer_info(stream_of(spec), f"ingest-{spec.name}")
        except nats.js.errors.NotFoundError:
            return None

    return on_broker(go)


def delta_version(spec: PipelineSpec) -> int | None:
    return DeltaTable(spec.table_uri()).transaction_version(app_id(spec))


def good_ids(*samples: Samples) -> set[int]:
    return {json.loads(p)["id"] for s in samples for i, p in enumerate(s.payloads) if i not in s.bad}


# ------------------------------------------------------------ limits streams
def test_limits_stream_batches_land_each_message_exactly_once(lake, instance):
    spec = nats_spec(batch={"max_messages": 700})
    ensure_exists(spec)
    first = make_samples(spec, 2000, bad_fraction=0.05, seed=1)
    kinds = ["page_loaded", "page_closed", "clicked"]
    messages = []
    for i, payload in enumerate(first.payloads):
        headers = {"trace": f"t-{i}"} if i % 10 == 0 else None
        if i % 7 == 0:
            headers = {**(headers or {}), "Nats-Msg-Id": f"{spec.name}-{i}"}
        messages.append((f"{spec.name}.{kinds[i % 3]}", payload, headers))
    seqs = publish(messages, stream_of(spec))
    expected = dict(zip(seqs, messages, strict=True))
    run_job(spec, instance, max_batches=2)  # part of the backlog, then more arrives between batches
    second = make_samples(spec, 1500, bad_fraction=0.05, seed=2, start_id=2000)
    more = [(f"{spec.name}.{kinds[i % 3]}", p, None) for i, p in enumerate(second.payloads)]
    more_seqs = publish(more, stream_of(spec))
    expected.update(zip(more_seqs, more, strict=True))
    runs = run_until_caught_up(spec, instance)
    assert len(runs) >= 2
    target, quarantine = assert_exactly_once(spec, {(0, s) for s in expected})
    assert set(target["id"].to_list()) == good_ids(first, second)
    bad = sorted(p for s in (first, second) for i, p in enumerate(s.payloads) if i in s.bad)
    assert sorted(quarantine["_raw"].to_list()) == bad
    # standard columns: the subject, the headers, Nats-Msg-Id as key, JetStream's stored time
    for frame in (target, quarantine):
        for row in frame.select("_offset", "_stream", "_headers", "_key", "_partition", "_source").iter_rows(named=True):
            subject, _, headers = expected[row["_offset"]]
            assert row["_stream"] == subject
            assert row["_partition"] == 0 and row["_source"] == "nats"
            got = {h["key"]: h["value"].decode() for h in row["_headers"] or []}
            assert got == (headers or {}), row
            msg_id = (headers or {}).get("Nats-Msg-Id")
            assert row["_key"] == (msg_id.encode() if msg_id else None)
    assert str(target["_timestamp"].dtype) == "Datetime(time_unit='us', time_zone='UTC')"
    assert target["_timestamp"].null_count() == 0
    assert target["_batch_id"].n_unique() >= 2
    # the version is the last sequence covered; the durable is a lag marker right after it
    last = max(expected)
    assert delta_version(spec) == last
    marker = consumer(spec)
    assert marker is not None and marker.num_pending == 0 and marker.delivered.stream_seq == last


def test_subject_filter_lands_only_its_subject_and_still_covers_the_others(lake, instance):
    name = unique("nf")
    spec = nats_spec(subject=f"{name}.a", name=name, batch={"max_messages": 50})
    on_broker(lambda js: js.add_stream(name=stream_of(spec), subjects=[f"{name}.*"]))
    subjects = [f"{name}.{'abcb'[i % 4]}" for i in range(300)] + [f"{name}.b"] * 7  # ends in other subjects
    rows = [json.dumps({"id": i, "event": "click", "value": i}).encode() for i in range(len(subjects))]
    seqs = publish([(s, p, None) for s, p in zip(subjects, rows, strict=True)], stream_of(spec))
    wanted = {(0, q) for q, s in zip(seqs, subjects, strict=True) if s.endswith(".a")}
    run_until_caught_up(spec, instance)
    target, _ = assert_exactly_once(spec, wanted)
    assert target["_stream"].unique().to_list() == [f"{name}.a"]
    assert delta_version(spec) == max(seqs)  # the batch covered the trailing `b` messages too
    # a range holding no message of the filter still advances the version (an empty commit)
    tail = publish([(f"{name}.b", b'{"id": 1}', None)] * 60, stream_of(spec))
    result = run_job(spec, instance)
    assert result.success, failure_message(result)
    assert materialization(result, spec)["messages"] == 0
    assert delta_version(spec) == max(tail)
    assert_exactly_once(spec, wanted)


def test_purged_range_fails_or_is_skipped_as_configured(lake, instance):
    spec = nats_spec()
    ensure_exists(spec)
    first = produce(spec, make_samples(spec, 100, seed=7))
    run_until_caught_up(spec, instance)
    lost = produce(spec, make_samples(spec, 50, seed=8, start_id=100))
    kept = produce(spec, make_samples(spec, 30, seed=9, start_id=150))
    low = min(s for _, s in kept)
    on_broker(lambda js: js.purge_stream(stream_of(spec), seq=low))  # the broker drops the 50 unread ones
    assert_gap_policy(spec, instance, lost, kept)
    assert_exactly_once(spec, first | kept)


def test_recreated_stream_is_refused_not_reingested(lake, instance):
    spec = nats_spec()
    ensure_exists(spec)
    produce(spec, make_samples(spec, 20, seed=10))
    run_until_caught_up(spec, instance)
    on_broker(lambda js: js.delete_stream(stream_of(spec)))
    ensure_exists(spec)
    produce(spec, make_samples(spec, 5, seed=11))
    failed = run_job(spec, instance)
    assert not failed.success
    assert "recreated" in failure_message(failed)


def test_fast_and_plain_delivery_paths_read_the_same_batch(lake, monkeypatch):
    monkeypatch.setattr(nats_source, "PACK_EVERY", 7)  # payloads packed in several buffers, and a rest
    spec = nats_spec(batch={"max_messages": 60})
    ensure_exists(spec)
    messages = [(f"{spec.name}.{'xy'[i % 2]}", json.dumps({"id": i, "event": "click", "value": i}).encode(),
                 {"trace": f"t-{i}", "Nats-Msg-Id": f"{spec.name}-{i}"} if i % 3 == 0 else None) for i in range(80)]
    seqs = publish(messages, stream_of(spec))
    batches = {}
    for fast in ("1", "0"):
        monkeypatch.setenv("INGEST_NATS_FAST_PATH", fast)
        source = source_for(spec)
        try:
            plan = source.plan(lambda _app_id: seqs[9], 60)  # as if sequences up to the 10th were in Delta
            raw = source.read(plan, 1 << 20)
        finally:
            source.close()
        batches[fast] = (raw.offsets.tolist(), raw.streams, raw.keys, raw.headers, raw.timestamps_ms.tolist(),
                         list(raw.payloads), raw.covered)
    assert batches["1"] == batches["0"]
    offsets, streams, keys, headers, _, payloads, covered = batches["1"]
    assert offsets == seqs[10:70] and covered[0].start == seqs[10] and covered[0].end == seqs[69]
    for seq, subject, key, header in zip(offsets, streams, keys, headers, strict=True):
        want_subject, want_payload, want_headers = messages[seqs.index(seq)]
        assert subject == want_subject
        assert key == (want_headers["Nats-Msg-Id"].encode() if want_headers else None)
        assert dict(header or []) == {k: v.encode() for k, v in (want_headers or {}).items()}
    assert payloads == [m[1] for m in messages[10:70]]


def test_a_range_read_gets_no_more_than_its_range_from_the_server(lake, monkeypatch):
    """The server pushes a range consumer's messages as fast as flow control lets it; without a bound it goes
    on past the range until the consumer is deleted, and the client parses and drops all of that (half
    again of a 300k read). The range's consumer is bounded by `max_ack_pending`: what the client receives
    is the range and the API replies around it."""
    monkeypatch.setenv("INGEST_NATS_FAST_PATH", "0")  # nats-py then counts every delivery in stats["in_msgs"]
    spec = nats_spec(batch={"max_messages": 500})
    ensure_exists(spec)
    seqs = publish([(f"{spec.name}.evt", json.dumps({"id": i, "event": "click", "value": i}).encode(), None)
                    for i in range(20_000)], stream_of(spec))
    source = source_for(spec)
    try:
        plan = source.plan(lambda _app_id: None, 500)
        raw = source.read(plan, 1 << 30)
        source.state()  # a round trip more: deliveries still in flight are received by now
        received = source._nc.stats["in_msgs"]
    finally:
        source.close()
    assert raw.offsets.tolist() == seqs[:500]
    assert received <= 500 + 50, received


def test_range_reads_fall_back_to_unbounded_where_the_server_caps_max_ack_pending(tmp_path: Path):
    """An account (or server, or stream) may cap max_ack_pending below a batch: the bounded range consumer is
    then refused (10121) and the source reads its ranges unbounded, as before the bound, losing nothing."""
    import socket
    import subprocess

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = tmp_path / "capped.conf"
    config.write_text(f'port: {port}\njetstream {{ store_dir: "{tmp_path / "js"}" }}\n'
                      'accounts { A: { jetstream: { max_ack_pending: 100 }, users: [ {user: a, password: a} ] } }\n')
    server = subprocess.Popen([shutil.which("nats-server") or "nats-server", "-c", str(config)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.1)
        spec = nats_spec(batch={"max_messages": 300})
        source = nats_source.NatsSource(spec, {"url": f"nats://a:a@127.0.0.1:{port}"})
        try:
            source.ensure_exists()
            payloads = [json.dumps({"id": i, "event": "click", "value": i}).encode() for i in range(700)]
            assert source.publish(payloads) == 700
            read, stored = [], {}
            while not (plan := source.plan(stored.get, 300)).empty:
                raw = source.read(plan, 1 << 30)
                read += raw.payloads
                stored[raw.covered[0].app_id] = raw.covered[0].end
            assert not source._bounded_ranges  # the server refused the bound once
        finally:
            source.close()
        assert read == payloads
    finally:
        server.terminate()
        server.wait(10)


# ------------------------------------------------------------ crashes
@pytest.mark.parametrize("retention", ["limits", "workqueue"])
def test_crash_after_delta_commit_before_ack_doubles_nothing(lake, instance, tmp_path: Path, retention: str):
    spec = nats_spec(retention, batch={"max_messages": 400})
    ensure_exists(spec)
    samples = make_samples(spec, 1000, bad_fraction=0.02, seed=4)
    produced = produce(spec, samples)
    crashed = ingest_cli(["run", spec.name, "--max-batches", "1"], cli_env(spec, tmp_path, lake, INGEST_FAULT="after_target_commit"))
    assert crashed.returncode == -9, crashed.stdout + crashed.stderr
    target, _ = landed(spec)
    assert target.height > 0  # the commit happened
    if retention == "workqueue":
        assert stream_state(spec).messages == 1000  # the acks did not
        assert consumer(spec).num_ack_pending == 400
    else:
        assert consumer(spec) is None  # the lag marker did not move either
    run_until_caught_up(spec, instance)
    target, _ = assert_exactly_once(spec, produced)
    assert set(target["id"].to_list()) == good_ids(samples)
    if retention == "workqueue":
        assert stream_state(spec).messages == 0
        assert sorted(target["_raw"].to_list()) == sorted(p for i, p in enumerate(samples.payloads) if i not in samples.bad)


def test_a_work_queue_batch_killed_before_its_ledger_row_lands_once_and_the_row_is_rebuilt(lake, instance,
                                                                                         tmp_path: Path):
    """The ledger row is written while the batch is acknowledged (after its target commit): a kill there may
    come before or after the acks reached the server. Either way the batch is in Delta once and the next run
    rebuilds its ledger row; what was not acknowledged is redelivered and not written twice."""
    spec = nats_spec("workqueue", batch={"max_messages": 300})
    ensure_exists(spec)
    samples = make_samples(spec, 700, bad_fraction=0.03, seed=21)
    produced = produce(spec, samples)
    crashed = ingest_cli(["run", spec.name, "--max-batches", "1"], cli_env(spec, tmp_path, lake, INGEST_FAULT="before_ledger"))
    assert crashed.returncode == -9, crashed.stdout + crashed.stderr
    target, quarantine = landed(spec)
    assert target.height + quarantine.height == 300  # the first batch committed ...
    assert Ledger(spec.ledger_uri(), spec.name).frame().is_empty()  # ... and has no ledger row
    committed_batch = target["_batch_id"].unique().to_list()
    run_until_caught_up(spec, instance)
    assert_exactly_once(spec, produced)
    assert stream_state(spec).messages == 0
    ledger = Ledger(spec.ledger_uri(), spec.name).frame()
    assert set(committed_batch) <= set(ledger["batch_id"])  # rebuilt from the target's commit
    covered = [o for s, e in ledger.select("range_start", "range_end").iter_rows() for o in range(s, e + 1)]
    assert sorted(covered) == list(range(1, 701))  # every stream sequence in exactly one ledger row


@pytest.mark.parametrize("retention", ["workqueue", "interest"])
def test_redelivery_after_ack_wait_doubles_nothing(lake, instance, tmp_path: Path, retention: str):
    """A batch dies after reading; ack_wait passes, so the broker redelivers; then a batch dies after its
    commit and ack_wait passes again. The next runs neither double nor lose a message."""
    spec = nats_spec(retention, batch={"max_messages": 250})
    ensure_exists(spec)
    samples = make_samples(spec, 600, bad_fraction=0.05, seed=12)
    produced = produce(spec, samples)
    env = cli_env(spec, tmp_path, lake)
    crashed = ingest_cli(["run", spec.name, "--max-batches", "1"], {**env, "INGEST_FAULT": "after_read"})
    assert crashed.returncode == -9, crashed.stdout + crashed.stderr
    target, quarantine = landed(spec)
    assert target.is_empty() and quarantine.is_empty()
    assert consumer(spec).num_ack_pending == 250
    time.sleep(ACK_WAIT + 0.5)
    crashed = ingest_cli(["run", spec.name, "--max-batches", "1"], {**env, "INGEST_FAULT": "after_target_commit"})
    assert crashed.returncode == -9, crashed.stdout + crashed.stderr
    assert 0 < len(landed(spec)[0]) + len(landed(spec)[1]) <= 250
    time.sleep(ACK_WAIT + 0.5)
    run_until_caught_up(spec, instance)
    assert_exactly_once(spec, produced)
    assert stream_state(spec).messages == 0  # acked = deleted (interest: the only consumer acked)
    state = consumer(spec)
    assert state.num_ack_pending == 0 and state.num_pending == 0


@pytest.mark.parametrize(("retention", "ack_wait"), [("workqueue", 60.0), ("interest", ACK_WAIT)])
def test_batch_started_while_a_crashed_batch_is_pending_loses_nothing(lake, instance, tmp_path: Path,
                                                                      retention: str, ack_wait: float):
    """The design's silent-loss case: a batch dies holding unacknowledged messages, newer ones arrive, and the
    next batch starts before ack_wait. Reading the newer ones first would commit a version above the pending
    ones, which would then come back as "already written" and be acked away. WorkQueue: the durable is
    recreated (ack_wait 60 s here, so nothing would come back by itself during the test). Interest: the batch
    waits out ack_wait and takes the pending ones first."""
    spec = nats_spec(retention, batch={"max_messages": 250})
    spec = spec.model_copy(update={"source": spec.source.model_copy(update={
        "nats": spec.source.nats.model_copy(update={"ack_wait_seconds": ack_wait})})})
    ensure_exists(spec)
    first = make_samples(spec, 100, seed=15)
    produced = produce(spec, first)
    crashed = ingest_cli(["run", spec.name, "--max-batches", "1"], {**cli_env(spec, tmp_path, lake),
                                                                     "INGEST_FAULT": "after_read"})
    assert crashed.returncode == -9, crashed.stdout + crashed.stderr
    assert consumer(spec).num_ack_pending == 100
    produced |= produce(spec, make_samples(spec, 100, seed=16, start_id=100))
    run_until_caught_up(spec, instance)
    target, _ = assert_exactly_once(spec, produced)
    assert sorted(target["id"].to_list()) == list(range(200))
    assert stream_state(spec).messages == 0


# ------------------------------------------------------------ work queues
def test_work_queue_failed_write_keeps_messages_then_lands_them_exactly_once(lake, instance):
    spec = nats_spec("workqueue", batch={"max_messages": 400})
    ensure_exists(spec)
    samples = make_samples(spec, 1000, bad_fraction=0.05, seed=13)
    produced = produce(spec, samples)
    # A target table the batch cannot append to (`id` is a string there): the write fails after the read.
    write_deltalake(spec.table_uri(), pa.table({"id": pa.array(["not-a-number"])}))
    failed = run_job(spec, instance)
    assert not failed.success
    assert "not change a type" in failure_message(failed)
    assert stream_state(spec).messages == 1000  # nothing was acknowledged, nothing deleted
    assert consumer(spec).num_ack_pending == 400
    shutil.rmtree(spec.table_uri())  # the operator fixes the table
    run_until_caught_up(spec, instance)
    target, quarantine = assert_exactly_once(spec, produced)
    assert stream_state(spec).messages == 0  # acked = deleted from the work queue
    assert set(target["id"].to_list()) == good_ids(samples)
    assert sorted(target["_raw"].to_list() + quarantine["_raw"].to_list()) == sorted(samples.payloads)


def test_work_queue_sensor_request_runs_and_then_skips(lake, instance):
    from ingest_defs.factory import build_definitions
    from ingest_defs.resources.brokers import resources_from_env

    spec = nats_spec("workqueue", batch={"max_messages": 200, "linger_seconds": 0})  # a sensor's run lingers 60 s once caught up; not this test's subject
    sensor = build_definitions({spec.name: spec}).resolve_sensor_def(f"{spec.name}_sensor")
    resources = resources_from_env()
    ensure_exists(spec)
    with dg.build_sensor_context(instance=instance, resources=resources) as ctx:
        assert isinstance(sensor(ctx), dg.SkipReason)
    produced = produce(spec, make_samples(spec, 500, seed=14))
    with dg.build_sensor_context(instance=instance, resources=resources) as ctx:
        request = sensor(ctx)
        cursor = ctx.cursor
    assert isinstance(request, dg.RunRequest)
    result = run_job(spec, instance, **request.run_config["ops"][f"ingest_{spec.name}"]["config"])
    assert result.success, failure_message(result)
    run_until_caught_up(spec, instance)
    assert_exactly_once(spec, produced)
    with dg.build_sensor_context(instance=instance, resources=resources, cursor=cursor) as ctx:
        assert isinstance(sensor(ctx), dg.SkipReason)

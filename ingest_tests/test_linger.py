"""`batch.linger_seconds`: a caught-up run keeps polling, so messages published during the run land in it,
exactly once, and the run ends once the broker has been quiet that long."""

from __future__ import annotations

import threading
import time

import dagster as dg
import pytest
from deltalake import DeltaTable
from deltalake.exceptions import TableNotFoundError

from ingest_defs.samples import make_samples
from ingest_tests.conftest import (
    assert_exactly_once,
    failure_message,
    kafka_spec,
    run_job,
    write_pipelines_file,
)
from ingest_tests.test_kafka_pipeline import produce
from ingest_tests.test_mqtt_pipeline import assert_exactly_once as assert_mqtt_exactly_once
from ingest_tests.test_mqtt_pipeline import (
    mqtt_spec,
    payloads,
    publish,
    register,
    sessions,  # noqa: F401 - fixture
)

pytestmark = pytest.mark.usefixtures("stack")


def _run_ids_of_commits(uri: str) -> set[str]:
    return {c["ingest.run_id"] for c in DeltaTable(uri).history() if c.get("ingest.batch_id")}


def _run_ids_of_commits_if_any(uri: str) -> set[str]:
    try:
        return _run_ids_of_commits(uri)
    except TableNotFoundError:
        return set()


def _run_while_publishing(spec, instance, publish_chunk, chunks: int) -> dg.ExecuteInProcessResult:
    """Start one run, publish `chunks` chunks while it runs, return the run's result. A produce() call
    takes a second or more on a loaded machine: the pipelines linger well beyond the gaps between chunks."""
    outcome: dict[str, dg.ExecuteInProcessResult] = {}
    runner = threading.Thread(target=lambda: outcome.setdefault("result", run_job(spec, instance)))
    runner.start()
    for i in range(chunks):
        time.sleep(0.7)
        publish_chunk(i)
    runner.join(120)
    assert not runner.is_alive(), "the lingering run did not end after the broker went quiet"
    return outcome["result"]


def test_kafka_run_lingers_and_lands_what_arrives_meanwhile(lake, instance):
    spec = kafka_spec(partitions=2, batch={"max_messages": 500, "linger_seconds": 8})
    samples = make_samples(spec, 600, bad_fraction=0.05, seed=11).payloads
    produced = produce(spec, samples[:100])
    chunks = [samples[100 + i * 100:200 + i * 100] for i in range(5)]
    result = _run_while_publishing(spec, instance, lambda i: produced.update(produce(spec, chunks[i])), len(chunks))
    assert result.success, failure_message(result)
    assert_exactly_once(spec, produced)
    assert _run_ids_of_commits(spec.table_uri()) == {result.run_id}  # all of it in the one run


def test_mqtt_run_lingers_and_lands_what_arrives_meanwhile(lake, instance, sessions):  # noqa: F811
    spec = mqtt_spec(max_messages=200, batch={"max_messages": 200, "idle_ms": 200, "linger_seconds": 8})
    sessions.append(spec)
    register(spec)
    published = publish(spec, payloads(0, 100, bad_every=9))
    chunks = [payloads(100 + i * 100, 100, bad_every=9) for i in range(4)]
    result = _run_while_publishing(spec, instance, lambda i: published.extend(publish(spec, chunks[i])), len(chunks))
    assert result.success, failure_message(result)
    assert_mqtt_exactly_once(spec, published)
    assert _run_ids_of_commits(spec.table_uri()) == {result.run_id}


def test_a_sensor_run_lingers_by_default_and_starts_a_batch_at_most_every_max_wait(lake, instance, monkeypatch):
    from ingest_defs import lifecycle

    monkeypatch.setattr(lifecycle, "SENSOR_LINGER_SECONDS", 3.0)  # the default's value, short for a test
    spec = kafka_spec(partitions=2, batch={"max_messages": 500, "max_wait_seconds": 2})
    samples = make_samples(spec, 1300, bad_fraction=0.05, seed=12).payloads
    produced = produce(spec, samples[:100])
    outcome: dict[str, dg.ExecuteInProcessResult] = {}
    runner = threading.Thread(target=lambda: outcome.setdefault(
        "result", run_job(spec, instance, trigger="sensor", mode="live")))
    runner.start()
    traffic_started = time.monotonic()
    for i in range(30):  # steady traffic: a chunk every 0.3 s plus the time a produce() call takes
        time.sleep(0.3)
        produced.update(produce(spec, samples[100 + i * 40:140 + i * 40]))
    traffic_seconds = time.monotonic() - traffic_started
    runner.join(120)
    assert not runner.is_alive(), "the lingering run did not end after the broker went quiet"
    result = outcome["result"]
    assert result.success, failure_message(result)
    assert_exactly_once(spec, produced)
    assert _run_ids_of_commits(spec.table_uri()) == {result.run_id}  # it lingered: no linger_seconds was set
    commits = sorted(c["timestamp"] / 1000 for c in DeltaTable(spec.table_uri()).history() if c.get("ingest.batch_id"))
    # paced by max_wait_seconds once caught up (2 s), not a batch per 0.25 s poll
    assert len(commits) <= traffic_seconds / 2 + 4, (traffic_seconds, commits)
    gaps = [b - a for a, b in zip(commits[1:], commits[2:], strict=False)]  # the first batch is the catch-up
    assert gaps and min(gaps) >= 1.5, gaps


@pytest.mark.parametrize(("trigger", "configured", "expected"), [
    ("sensor", None, 60.0), ("manual", None, 0.0), ("cli", None, 0.0), ("schedule", None, 0.0),
    ("backfill", None, 0.0), ("sensor", 0.0, 0.0), ("cli", 5.0, 5.0)])
def test_linger_defaults_to_sensor_runs_only(trigger, configured, expected):
    from ingest_defs.lifecycle import BatchContext, BatchRunner

    batch = {} if configured is None else {"linger_seconds": configured}
    spec = kafka_spec(partitions=1, batch=batch)
    runner = BatchRunner(spec, None, None, None, BatchContext(trigger=trigger))  # type: ignore[arg-type]
    assert runner.linger_seconds == expected


def test_a_lingering_run_notices_when_the_pipelines_file_changes_its_pipeline(tmp_path, monkeypatch):
    from ingest_defs.config import PipelineFileWatch, load_pipelines, parse_pipeline

    file = write_pipelines_file(tmp_path / "pipelines.yaml", [kafka_spec(partitions=1), kafka_spec(partitions=1)])
    monkeypatch.setenv("INGEST_PIPELINES", str(file))
    ours, other = load_pipelines(file).values()
    watch = PipelineFileWatch(ours)
    assert watch.watching and not watch.changed()
    write_pipelines_file(file, [ours, parse_pipeline(other.name, {**other.model_dump(exclude_none=True),
                                                                   "batch": {"max_messages": 7}})])
    assert not watch.changed()  # another pipeline's settings: this run goes on
    file.write_text("pipelines: {broken")  # a file being edited: go on, the next run reports it
    assert not watch.changed()
    write_pipelines_file(file, [parse_pipeline(ours.name, {**ours.model_dump(exclude_none=True),
                                                           "batch": {"max_messages": 7}}), other])
    assert watch.changed()
    assert not PipelineFileWatch(kafka_spec(partitions=1)).watching  # built by a test, not in the file


def test_a_lingering_run_ends_when_another_run_of_its_pipeline_waits_for_the_slot(lake, instance):
    from dagster._core.remote_origin import (
        InProcessCodeLocationOrigin,
        RemoteJobOrigin,
        RemoteRepositoryOrigin,
    )
    from dagster._core.storage.dagster_run import DagsterRun
    from dagster._core.types.loadable_target_origin import LoadableTargetOrigin

    from ingest_defs.assets.ingestion import job_name

    spec = kafka_spec(partitions=1, batch={"linger_seconds": 600})  # it would linger ten minutes
    produced = produce(spec, make_samples(spec, 50, seed=13).payloads)
    outcome: dict[str, dg.ExecuteInProcessResult] = {}
    runner = threading.Thread(target=lambda: outcome.setdefault("result", run_job(spec, instance)))
    runner.start()
    deadline = time.monotonic() + 120
    while not _run_ids_of_commits_if_any(spec.table_uri()) and time.monotonic() < deadline:
        time.sleep(0.5)  # caught up: the first batch is committed
    # a backfill or a launch from the UI waiting in the queue for the pipeline's pool slot
    origin = RemoteJobOrigin(RemoteRepositoryOrigin(InProcessCodeLocationOrigin(
        LoadableTargetOrigin(module_name="ingest_defs.definitions")), "__repository__"), job_name(spec))
    instance.add_run(DagsterRun(job_name=job_name(spec), run_id="waiting-run", status=dg.DagsterRunStatus.QUEUED,
                                remote_job_origin=origin))
    runner.join(120)
    assert not runner.is_alive(), "the lingering run did not hand its slot over"
    result = outcome["result"]
    assert result.success, failure_message(result)
    messages = [entry.user_message for entry in instance.all_logs(result.run_id)]
    assert any("another run of this pipeline is waiting" in m for m in messages)
    assert_exactly_once(spec, produced)


def _runner(spec, ctx):
    from ingest_defs.ledger import Ledger
    from ingest_defs.lifecycle import BatchRunner
    from ingest_defs.resources.brokers import source_for
    from ingest_defs.sink import DeltaTableSink

    return BatchRunner(spec, source_for(spec), DeltaTableSink.of(spec, "target"), DeltaTableSink.of(spec, "quarantine"),
                       ctx, ledger=Ledger.of(spec))


def test_a_lingering_run_ends_when_its_partition_has_ended(lake):
    from ingest_defs.lifecycle import BatchContext

    spec = kafka_spec(partitions=1, batch={"linger_seconds": 600})
    produced = produce(spec, make_samples(spec, 40, seed=14).payloads)
    said: list[str] = []
    # a run of yesterday's partition (it started before midnight): its batches would all carry that key
    runner = _runner(spec, BatchContext(trigger="sensor", partition_key="2000-01-01", log=said.append))
    done = threading.Thread(target=runner.run)
    done.start()
    done.join(120)
    runner.source.close()
    assert not done.is_alive(), "the lingering run went on into a new partition"
    assert any("partition 2000-01-01 has ended" in line for line in said), said
    assert_exactly_once(spec, produced)


def test_a_backlog_that_arrives_while_a_run_lingers_is_drained_back_to_back_not_paced(lake):
    from ingest_defs.lifecycle import BatchContext
    from ingest_defs.samples import Samples
    from ingest_tests.test_nats_pipeline import ensure_exists, nats_spec
    from ingest_tests.test_nats_pipeline import produce as produce_nats

    # NATS limits: a bounded plan whose batches max_bytes cuts (~10 messages of ~100 bytes); pacing 30 s
    spec = nats_spec("limits", batch={"linger_seconds": 4, "max_wait_seconds": 30, "max_bytes": 1024})
    ensure_exists(spec)
    samples = make_samples(spec, 320, seed=15)
    produced = produce_nats(spec, Samples(payloads=samples.payloads[:10]))
    runner = _runner(spec, BatchContext(trigger="sensor"))
    outcome: dict[str, list] = {}
    done = threading.Thread(target=lambda: outcome.setdefault("results", runner.run()))
    done.start()
    time.sleep(2)  # caught up on the first 10, lingering
    produced |= produce_nats(spec, Samples(payloads=samples.payloads[10:]))
    done.join(300)  # paced, its ~30 batches would take 15 minutes
    runner.source.close()
    assert not done.is_alive(), "a backlog cut by max_bytes was paced batch by batch"
    assert_exactly_once(spec, produced)
    backlog = [r for r in outcome["results"] if r.messages and r.started_at > outcome["results"][0].started_at]
    assert len(backlog) >= 10, [r.messages for r in backlog]  # cut by max_bytes, as configured
    # one paced interval at most before the backlog's first batch, then back to back
    span = backlog[-1].started_at - backlog[0].started_at
    assert span < 30, (span, [round(r.started_at - backlog[0].started_at, 1) for r in backlog])


@pytest.mark.parametrize(("freshness_minutes", "expected"), [(None, 3600.0), (5, 150.0), (1, 30.0), (600, 3600.0)])
def test_a_lingering_run_lasts_at_most_half_the_freshness_window(freshness_minutes, expected):
    from ingest_defs.lifecycle import BatchContext, BatchRunner

    checks = {} if freshness_minutes is None else {"freshness_minutes": freshness_minutes}
    spec = kafka_spec(partitions=1, checks=checks)
    runner = BatchRunner(spec, None, None, None, BatchContext(trigger="sensor"))  # type: ignore[arg-type]
    assert runner.lingering_run_seconds == expected

"""`batch.linger_seconds`: a caught-up run keeps polling, so messages published during the run land in it,
exactly once, and the run ends once the broker has been quiet that long."""

from __future__ import annotations

import threading
import time

import dagster as dg
import pytest
from deltalake import DeltaTable

from ingest_defs.samples import make_samples
from ingest_tests.conftest import assert_exactly_once, failure_message, kafka_spec, run_job
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


def _run_while_publishing(spec, instance, publish_chunk, chunks: int) -> dg.ExecuteInProcessResult:
    """Start one run, publish `chunks` chunks while it runs, return the run's result."""
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
    spec = kafka_spec(partitions=2, batch={"max_messages": 500, "linger_seconds": 3})
    samples = make_samples(spec, 600, bad_fraction=0.05, seed=11).payloads
    produced = produce(spec, samples[:100])
    chunks = [samples[100 + i * 100:200 + i * 100] for i in range(5)]
    result = _run_while_publishing(spec, instance, lambda i: produced.update(produce(spec, chunks[i])), len(chunks))
    assert result.success, failure_message(result)
    assert_exactly_once(spec, produced)
    assert _run_ids_of_commits(spec.table_uri()) == {result.run_id}  # all of it in the one run


def test_mqtt_run_lingers_and_lands_what_arrives_meanwhile(lake, instance, sessions):  # noqa: F811
    spec = mqtt_spec(max_messages=200, batch={"max_messages": 200, "idle_ms": 200, "linger_seconds": 3})
    sessions.append(spec)
    register(spec)
    published = publish(spec, payloads(0, 100, bad_every=9))
    chunks = [payloads(100 + i * 100, 100, bad_every=9) for i in range(4)]
    result = _run_while_publishing(spec, instance, lambda i: published.extend(publish(spec, chunks[i])), len(chunks))
    assert result.success, failure_message(result)
    assert_mqtt_exactly_once(spec, published)
    assert _run_ids_of_commits(spec.table_uri()) == {result.run_id}

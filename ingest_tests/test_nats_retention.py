"""A NATS pipeline takes its stream's retention from the broker when `retention:` is left out; a stated
retention the stream does not have is refused (it decides how the stream is read)."""

from __future__ import annotations

import pytest
from nats.js import api

from ingest_defs.config import parse_pipeline
from ingest_defs.samples import make_samples
from ingest_tests.conftest import (
    USER_ACTIVITY_SCHEMA,
    assert_exactly_once,
    failure_message,
    run_job,
    run_until_caught_up,
    unique,
)
from ingest_tests.test_nats_pipeline import _delete_streams, _streams, on_broker, produce, stream_state  # noqa: F401 (the fixture deletes the streams)

pytestmark = pytest.mark.usefixtures("stack")


def spec_without_retention(name: str, **nats: str):
    _streams.append(f"S_{name}")  # deleted after the test
    return parse_pipeline(name, {
        "source": {"nats": {"stream": f"S_{name}", "subject": f"{name}.*", "ack_wait_seconds": 5, **nats}},
        "schema": USER_ACTIVITY_SCHEMA, "table": f"bronze/{name}", "batch": {"max_messages": 300}})


def create_stream(name: str, retention: api.RetentionPolicy) -> None:
    async def go(js):
        await js.add_stream(api.StreamConfig(name=f"S_{name}", subjects=[f"{name}.*"], retention=retention,
                                             storage=api.StorageType.FILE))

    on_broker(go)


@pytest.mark.parametrize("retention", [api.RetentionPolicy.WORK_QUEUE, api.RetentionPolicy.LIMITS])
def test_retention_left_out_is_the_streams(lake, instance, retention):
    name = unique("nr")
    create_stream(name, retention)
    spec = spec_without_retention(name)
    assert spec.source.nats.retention is None and spec.keep_raw_payload  # unknown until run: keep payloads
    produced = produce(spec, make_samples(spec, 700, bad_fraction=0.05, seed=5))
    run_until_caught_up(spec, instance)
    target, _ = assert_exactly_once(spec, produced)
    assert target["_raw"].null_count() == 0
    if retention == api.RetentionPolicy.WORK_QUEUE:
        assert stream_state(spec).messages == 0  # read through the durable and acknowledged: deleted
    else:
        assert stream_state(spec).messages == 700  # read as exact ranges: a limits stream keeps them


def test_a_stated_retention_the_stream_does_not_have_is_refused(lake, instance):
    name = unique("nr")
    create_stream(name, api.RetentionPolicy.WORK_QUEUE)
    spec = spec_without_retention(name, retention="limits")
    produce(spec, make_samples(spec, 10, seed=6))
    result = run_job(spec, instance)
    assert not result.success
    message = failure_message(result)
    assert "has retention 'workqueue' but the pipeline says 'limits'" in message
    assert "Set source.nats.retention to 'workqueue', or remove it" in message
    assert stream_state(spec).messages == 10  # nothing was read or acknowledged

"""The stack's schema registry as a service: schemas survive a restart, and a registry killed while
batches are in flight fails those runs before any commit (nothing acknowledged) — the rerun lands every
message exactly once — for Avro, Protobuf and JSON Schema alike."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid

import pytest

from ingest_defs.config import REPO_ROOT
from ingest_defs.formats.registry import registry_for
from ingest_defs.stack import manager, registry
from ingest_tests.conftest import (
    assert_exactly_once,
    cli_env,
    landed,
    run_until_caught_up,
    wait_for,
)
from ingest_tests.formats_cases import AVRO_V1, FORMATS, JSON_V1, PROTO_V1, Producer, record, registry_url
from ingest_tests.test_formats_pipeline import registry_spec
from ingest_tests.test_kafka_pipeline import group_offsets, produce

pytestmark = [pytest.mark.usefixtures("stack"),
              pytest.mark.skipif(os.environ.get("INGEST_STACK_EXTERNAL") == "1",
                                 reason="the registry is external: these tests stop and kill the stack's own")]


def registry_pid() -> int:
    b = registry.broker(manager.stack_dir())
    pid = manager._our_pid(b)
    assert pid is not None, "the stack's registry is not running"
    return pid


def get(path: str) -> dict:
    with urllib.request.urlopen(f"{registry_url().rstrip('/')}/{path}", timeout=10) as resp:
        return json.loads(resp.read())


def test_schemas_survive_a_stack_restart():
    spec = registry_spec("avro")
    client = registry_for(spec.registry, spec.name)
    tag = uuid.uuid4().hex[:8]
    texts = {"AVRO": json.dumps(AVRO_V1), "PROTOBUF": PROTO_V1, "JSON": json.dumps(JSON_V1)}
    ids = {kind: client.register(f"restart-{tag}-{kind.lower()}", text, kind) for kind, text in texts.items()}
    before = {kind: get(f"schemas/ids/{schema_id}")["schema"] for kind, schema_id in ids.items()}
    assert json.loads(before["AVRO"]) == AVRO_V1 and before["PROTOBUF"] == PROTO_V1
    pid = registry_pid()
    assert manager.down(only={"registry"}) == 0
    assert not manager._alive(pid)
    assert manager.up() == 0  # starts only what is not running: the registry
    assert registry_pid() != pid
    for kind, schema_id in ids.items():  # plain HTTP: nothing cached in this process answers
        assert get(f"schemas/ids/{schema_id}")["schema"] == before[kind]
        assert get(f"subjects/restart-{tag}-{kind.lower()}/versions/latest")["id"] == schema_id
    assert get("config")["compatibilityLevel"] == "BACKWARD"
    assert (manager.stack_dir() / "registry" / "data" / "registry.mv.db").exists()


def test_registry_killed_mid_batch_fails_before_any_commit_and_the_rerun_lands_exactly_once(lake, instance, tmp_path):
    specs = {fmt: registry_spec(fmt) for fmt in FORMATS}
    produced = {}
    for fmt, spec in specs.items():
        producer = Producer(fmt, spec.source.kafka.topic, 1)
        produced[fmt] = produce(spec, [producer(record(i)) for i in range(60)] + [b"\x01junk"])
    runs, markers = {}, {}
    try:
        for fmt, spec in specs.items():  # each run stalls after its broker read, before decoding
            markers[fmt] = tmp_path / f"stalled-{fmt}"
            env = {**os.environ, **cli_env(spec, tmp_path, lake, home=f"dh-{spec.name}", INGEST_FAULT="stall:after_read",
                                          INGEST_FAULT_FILE=str(markers[fmt]))}
            runs[fmt] = subprocess.Popen([sys.executable, "-m", "ingest_defs", "run", spec.name], env=env,
                                         cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        wait_for(lambda: all(m.exists() for m in markers.values()), timeout=180)
        pid = registry_pid()
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: not manager._alive(pid), timeout=30)
        for marker in markers.values():
            marker.unlink()  # the batches go on: decoding needs the registry, which is gone
        outputs = {fmt: run.communicate(timeout=300)[0] for fmt, run in runs.items()}
    finally:
        for run in runs.values():
            if run.poll() is None:
                run.kill()
                run.communicate()
    for fmt, spec in specs.items():
        assert runs[fmt].returncode != 0, outputs[fmt]
        assert f"schema registry {registry_url()}" in outputs[fmt], outputs[fmt][-2000:]
        target, quarantine = landed(spec)
        assert target.is_empty() and quarantine.is_empty(), f"{fmt}: something was committed"
        assert group_offsets(spec) == {}, f"{fmt}: offsets were acknowledged"
    t0 = time.monotonic()
    assert manager.up() == 0  # the registry again, from its database file
    print(f"registry restart took {time.monotonic() - t0:.1f}s")
    for fmt, spec in specs.items():
        run_until_caught_up(spec, instance)
        target, quarantine = assert_exactly_once(spec, produced[fmt])
        assert target.height == 60 and quarantine.height == 1
        assert group_offsets(spec) == {0: 61}

"""Fault injection against the real brokers: after every fault, target ∪ quarantine equals the messages
produced — nothing lost, nothing doubled — counted by payload (every payload is unique), so it holds for
MQTT too, whose offsets are assigned by the pipeline.

Scenarios, for each broker:
* `kill@<point>`: the run's process SIGKILLs itself at each lifecycle point (after the read, after the
  quarantine commit, during the target commit — data files written, no log entry —, after the target
  commit before the broker ack, after the ack), then the pipeline resumes.
* `broker restart`: the run stalls after its read, the broker is restarted, the run goes on, then resumes.
* `two runs at once`: two `ingest run`s of one pipeline start together.
* `poison`: bad JSON, non-UTF-8, wrong types, missing and extra fields, an oversized message, an empty
  payload and null keys, mixed into good messages.

`make test` runs the fast subset (unmarked: the new during-commit kill and poison, for every broker);
`make chaos` runs everything (marker `chaos`) and prints the table.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import dagster as dg
import pytest

from ingest_defs.config import REPO_ROOT, PipelineSpec, parse_pipeline
from ingest_defs.resources.brokers import source_for
from ingest_tests.chaos.conftest import ROWS, ChaosRow
from ingest_tests.conftest import (
    USER_ACTIVITY_SCHEMA,
    cli_env,
    ingest_cli,
    landed,
    run_until_caught_up,
    unique,
    wait_for,
)

pytestmark = pytest.mark.usefixtures("stack")

BROKERS = ("kafka", "nats", "mqtt")
STACK_NAME = {"kafka": "kafka", "nats": "nats", "mqtt": "mosquitto"}
OVERSIZED = 600_000  # bytes: below every broker's default message limit (1 MB), far above the rest


def chaos_spec(broker: str, max_messages: int = 150) -> PipelineSpec:
    name = unique(f"ch{broker[0]}")
    source = {"kafka": {"topic": f"t_{name}", "partitions": 1},
              "nats": {"stream": f"S_{name}", "subject": f"{name}.*", "ack_wait_seconds": 5},
              "mqtt": {"topics": [f"chaos/{name}/+"], "session_expiry_seconds": 3600}}[broker]
    return parse_pipeline(name, {"source": {broker: source}, "schema": USER_ACTIVITY_SCHEMA,
                                 "table": f"bronze/{name}", "keep_raw": True,
                                 "batch": {"max_messages": max_messages, "idle_ms": 300}})


def good(seq: int) -> bytes:
    return json.dumps({"id": seq, "event": "click", "value": seq}).encode()


# Each poison kind; every payload is unique (it carries its sequence number) except the one empty payload.
POISON = {
    "bad JSON": lambda seq: b'{"id": %d, "event": ' % seq,
    "not UTF-8": lambda seq: b'{"id": %d, "event": "\xff\xfe"}' % seq,
    "wrong type": lambda seq: json.dumps({"id": seq, "event": "click", "value": "lots"}).encode(),
    "missing field": lambda seq: json.dumps({"event": "click", "value": seq}).encode(),
    "extra field": lambda seq: json.dumps({"id": seq, "event": "click", "value": seq, "extra": [1, 2]}).encode(),
    "oversized": lambda seq: json.dumps({"id": seq, "event": "x" * OVERSIZED, "value": seq}).encode(),
}


def messages(count: int, poison_every: int = 0) -> tuple[list[bytes], list[bytes | None]]:
    """`count` payloads (every `poison_every`-th one a poison kind, in turn) and their keys (some null)."""
    payloads, keys, kinds = [], [], list(POISON)
    for seq in range(count):
        if poison_every and seq % poison_every == poison_every - 1:
            payloads.append(POISON[kinds[(seq // poison_every) % len(kinds)]](seq))
        else:
            payloads.append(good(seq))
        keys.append(None if seq % 3 == 0 else f"k{seq % 5}".encode())
    return payloads, keys


def produce(spec: PipelineSpec, payloads: list[bytes], keys: list[bytes | None]) -> None:
    source = source_for(spec)
    try:
        source.ensure_exists()  # creates the topic/stream; registers the MQTT session before publishing
        assert source.publish(payloads, keys) == len(payloads)
    finally:
        source.close()


def tally(scenario: str, broker: str, spec: PipelineSpec, produced: list[bytes], runs: int) -> ChaosRow:
    """Compare target ∪ quarantine with what was produced, by payload; record and return the row."""
    target, quarantine = landed(spec)
    raws = [bytes(r or b"") for r in (target["_raw"].to_list() if not target.is_empty() else [])]
    qraws = [bytes(r or b"") for r in (quarantine["_raw"].to_list() if not quarantine.is_empty() else [])]
    want, have = Counter(produced), Counter(raws) + Counter(qraws)
    lost = sum((want - have).values())
    doubled = sum((have - want).values())
    offsets = [(s, p, o) for frame in (target, quarantine) if not frame.is_empty()
               for s, p, o in zip(frame["_stream"], frame["_partition"], frame["_offset"], strict=True)]
    doubled = max(doubled, len(offsets) - len(set(offsets)))
    row = ChaosRow(scenario, broker, runs, len(produced), len(raws), len(qraws), lost, doubled)
    ROWS.append(row)
    return row


def assert_exact(row: ChaosRow) -> None:
    assert (row.lost, row.doubled) == (0, 0), row
    assert row.landed + row.quarantined == row.produced, row


def resume(spec: PipelineSpec, instance: dg.DagsterInstance) -> int:
    return len(run_until_caught_up(spec, instance))


# ---------------------------------------------------------------- kill -9 at each lifecycle point
KILL_POINTS = ["after_read", "after_quarantine_commit", "during_target_commit", "after_target_commit", "after_ack"]


def _kill_params() -> list[Any]:
    params = []
    for broker in BROKERS:
        for point in KILL_POINTS:
            marks = [] if point == "during_target_commit" else [pytest.mark.chaos]
            params.append(pytest.param(broker, point, marks=marks, id=f"{broker}-{point}"))
    return params


@pytest.mark.parametrize("broker,point", _kill_params())
def test_kill_at_each_lifecycle_point_then_resume(lake, instance, tmp_path: Path, broker: str, point: str):
    spec = chaos_spec(broker)
    payloads, keys = messages(400, poison_every=9)  # poison in every batch: both tables get commits
    produce(spec, payloads, keys)
    crashed = ingest_cli(["run", spec.name, "--max-batches", "1"], cli_env(spec, tmp_path, lake, INGEST_FAULT=point))
    assert crashed.returncode == -signal.SIGKILL, crashed.stdout + crashed.stderr
    if point == "during_target_commit":
        target, _ = landed(spec)
        assert target.is_empty()  # its data file exists, but no log entry points at it: invisible
        orphans = [p for p in Path(spec.table_uri()).glob("*.parquet")]
        assert orphans, "the fault should leave the commit's data file behind"
    runs = 1 + resume(spec, instance)
    assert_exact(tally(f"kill@{point}", broker, spec, payloads, runs))


# ---------------------------------------------------------------- broker restart during a batch
def restart_broker(broker: str) -> None:
    """SIGTERM this stack's broker and start it again (only a broker the stack started: pidfile)."""
    from ingest_defs.stack import manager

    b = next(b for b in manager._brokers() if b.name == STACK_NAME[broker])
    pid = manager._our_pid(b)
    assert pid is not None, f"{b.label} was not started by this stack; cannot restart it"
    os.kill(pid, signal.SIGTERM)
    wait_for(lambda: not manager._alive(pid), timeout=60)
    assert manager.up() == 0


@pytest.mark.chaos
@pytest.mark.parametrize("broker", BROKERS)
def test_broker_restart_during_a_batch(lake, instance, tmp_path: Path, broker: str):
    if os.environ.get("INGEST_STACK_EXTERNAL") == "1":
        pytest.skip("the brokers are external: this suite cannot restart them")
    spec = chaos_spec(broker)
    payloads, keys = messages(400, poison_every=11)
    produce(spec, payloads, keys)
    marker = tmp_path / "stalled"
    env = cli_env(spec, tmp_path, lake, INGEST_FAULT="stall:after_read", INGEST_FAULT_FILE=str(marker))
    run = subprocess.Popen([sys.executable, "-m", "ingest_defs", "run", spec.name, "--max-batches", "2"],
                           env={**os.environ, **env}, cwd=REPO_ROOT, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(marker.exists, timeout=120)
        restart_broker(broker)
        marker.unlink()  # the stalled batch goes on against the restarted broker
        run.communicate(timeout=300)
    finally:
        if run.poll() is None:
            run.kill()
            run.communicate()
    runs = 1 + resume(spec, instance)
    assert_exact(tally("broker restart mid-batch", broker, spec, payloads, runs))


# ---------------------------------------------------------------- two runs of one pipeline at once
@pytest.mark.chaos
@pytest.mark.parametrize("broker", BROKERS)
def test_two_runs_of_one_pipeline_at_once(lake, instance, tmp_path: Path, broker: str):
    spec = chaos_spec(broker, max_messages=100)
    payloads, keys = messages(500, poison_every=13)
    produce(spec, payloads, keys)
    env = {**os.environ, **cli_env(spec, tmp_path, lake)}
    runs = [subprocess.Popen([sys.executable, "-m", "ingest_defs", "run", spec.name, "--max-batches", "3"],
                             env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for _ in range(2)]
    deadline = time.monotonic() + 300
    for run in runs:
        run.communicate(timeout=max(1.0, deadline - time.monotonic()))
    total = 2 + resume(spec, instance)
    assert_exact(tally("two runs at once", broker, spec, payloads, total))


# ---------------------------------------------------------------- a batch full of poison
@pytest.mark.parametrize("broker", BROKERS)
def test_poison_batch_is_quarantined_not_lost(lake, instance, broker: str):
    spec = chaos_spec(broker, max_messages=100)
    payloads, keys = messages(60, poison_every=2)  # every other message is poison, every kind several times
    payloads.append(b"")  # an empty payload
    keys.append(None)
    produce(spec, payloads, keys)
    runs = resume(spec, instance)
    row = tally("poison batch", broker, spec, payloads, runs)
    assert_exact(row)
    _, quarantine = landed(spec)
    reasons = " ".join(quarantine["_error"].to_list())
    for expected in ("JSON", "UTF-8", "not_nullable"):
        assert expected in reasons, (expected, reasons[:500])
    target, _ = landed(spec)
    extra = [json.loads(r) for r in target["_raw"].to_list() if b"extra" in r]
    assert extra, "a message with an extra field is a valid row (schema.strict: false)"

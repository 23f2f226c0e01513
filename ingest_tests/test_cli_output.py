"""The `ingest` command as a person and a script see it, through real runs against the real broker:
one clear error for a failed run (the trace only with -v), no librdkafka lines on the console, tables that
stay readable at 80 columns and in CI logs, `--json`, and progress on a terminal."""

from __future__ import annotations

import json
import os
import pty
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from confluent_kafka import Producer, TopicPartition
from confluent_kafka.admin import AdminClient

from ingest_defs.config import REPO_ROOT
from ingest_defs.resources.brokers import DEFAULT_KAFKA, source_for
from ingest_tests.conftest import ingest_cli, kafka_spec, run_until_caught_up, write_pipelines_file

pytestmark = pytest.mark.usefixtures("stack")
BOOTSTRAP = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", DEFAULT_KAFKA)
TRACE_MARKERS = ("Traceback", "Stack Trace", "dagster._core", 'File "')


def env_for(tmp_path: Path, specs: list, lake: Path | None = None, **extra: str) -> dict[str, str]:
    home = tmp_path / "dagster_home"
    home.mkdir(exist_ok=True)
    shutil.copy(REPO_ROOT / "dagster_home" / "dagster.yaml", home / "dagster.yaml")  # pools; telemetry off
    return {"INGEST_PIPELINES": str(write_pipelines_file(tmp_path / "pipelines.yaml", specs)),
            "LAKE_ROOT": str(lake or tmp_path / "lake"), "DAGSTER_HOME": str(home), **extra}


def produce(topic: str, payloads: list[bytes], partitions: int = 1) -> None:
    """Round-robin over the partitions: unkeyed messages would all go where the sticky partitioner puts them."""
    producer = Producer({"bootstrap.servers": BOOTSTRAP})
    for i, p in enumerate(payloads):
        producer.produce(topic, p, partition=i % partitions)
    assert producer.flush(30) == 0


def assert_one_clear_error(proc: subprocess.CompletedProcess, *phrases: str) -> str:
    assert proc.returncode != 0, proc.stdout + proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    for phrase in phrases:
        assert phrase in errors[0], errors[0]
    for marker in TRACE_MARKERS:
        assert marker not in proc.stdout + proc.stderr, f"{marker!r} on the console:\n{proc.stderr}"
    assert "rdkafka" not in proc.stderr and "%3|" not in proc.stderr and "%4|" not in proc.stderr, proc.stderr
    return errors[0]


def test_a_run_on_a_missing_topic_prints_one_error_and_the_trace_only_with_v(tmp_path: Path):
    spec = kafka_spec(name="cli_missing_topic_with_a_long_name_for_80_columns")  # its topic is never created
    env = env_for(tmp_path, [spec])
    proc = ingest_cli(["run", spec.name], env)
    assert_one_clear_error(proc, f"pipeline '{spec.name}'", "is not available", "Create it", "source.kafka.topic")
    verbose = ingest_cli(["-v", "run", spec.name], env)
    assert verbose.returncode != 0
    assert "Stack Trace" in verbose.stderr or "Traceback" in verbose.stderr  # -v: Dagster's own log lines


def test_a_run_stopped_by_a_gap_says_how_to_go_on(tmp_path: Path, lake: Path, instance):
    spec = kafka_spec(partitions=1)
    topic = spec.source.kafka.topic
    source = source_for(spec)
    source.ensure_exists()
    source.close()
    produce(topic, [json.dumps({"id": i, "event": "click", "value": i}).encode() for i in range(10)])
    run_until_caught_up(spec, instance)
    produce(topic, [json.dumps({"id": i, "event": "click", "value": i}).encode() for i in range(10, 20)])
    admin = AdminClient({"bootstrap.servers": BOOTSTRAP})
    for future in admin.delete_records([TopicPartition(topic, 0, 15)]).values():
        future.result(30)  # as retention would: offsets 10..14 are gone before they were ingested
    proc = ingest_cli(["run", spec.name], env_for(tmp_path, [spec], lake))
    assert_one_clear_error(proc, "offsets 10..14 (5 messages)", "on_gap is 'fail'", "on_gap: skip")


def test_an_unreachable_broker_is_one_error_not_librdkafka_lines(tmp_path: Path):
    spec = kafka_spec()
    proc = ingest_cli(["run", spec.name], env_for(tmp_path, [spec], KAFKA_BOOTSTRAP_SERVERS="localhost:1"))
    assert_one_clear_error(proc, "cannot reach Kafka at localhost:1", "ingest stack up")


def run_on_a_terminal(args: list[str], env: dict[str, str], columns: int = 80, timeout: float = 600) -> str:
    """The command with a pseudo-terminal of `columns` columns as stdout and stderr; what it printed."""
    master, slave = pty.openpty()
    full_env = {**os.environ, **env, "COLUMNS": str(columns), "LINES": "40", "TERM": "xterm"}
    proc = subprocess.Popen([sys.executable, "-m", "ingest_defs", *args], stdout=slave, stderr=slave,
                            stdin=subprocess.DEVNULL, env=full_env, cwd=REPO_ROOT, close_fds=True)
    os.close(slave)
    out = bytearray()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.5)
        if ready:
            try:
                chunk = os.read(master, 65536)
            except OSError:
                break
            if not chunk:
                break
            out.extend(chunk)
        elif proc.poll() is not None:
            break
    proc.wait(timeout=60)
    os.close(master)
    assert proc.returncode == 0, out.decode(errors="replace")
    return out.decode(errors="replace")


@pytest.mark.timeout(900)  # eight commands, each starting Python and Dagster
def test_run_status_show_batches_on_a_terminal_in_ci_logs_and_as_json(tmp_path: Path):
    name = "cli_pipeline_with_a_rather_long_name_" + kafka_spec().name  # longer than any 80-column cell
    spec = kafka_spec(name=name, partitions=2, batch={"max_messages": 400})
    env = env_for(tmp_path, [spec])
    assert ingest_cli(["produce", spec.name, "--count", "0"], env).returncode == 0
    produce(spec.source.kafka.topic, [json.dumps({"id": i, "event": "click", "value": i}).encode() for i in range(1000)]
            + [b"{not json"], partitions=2)

    # a backlog on a terminal: progress with messages, rate and lag left
    shown = run_on_a_terminal(["run", spec.name], env)
    assert "messages ·" in shown and "msg/s" in shown and "left" in shown, shown
    assert f"{spec.name}: run " in shown and "1,001 messages" in shown

    # in a CI log (not a terminal): the whole name on one line, nothing cut
    status = ingest_cli(["status", spec.name], env)
    assert status.returncode == 0, status.stderr
    row = next(line for line in status.stdout.splitlines() if spec.name in line)
    assert "…" not in status.stdout and "1" in row  # one quarantined message
    batches = ingest_cli(["batches", spec.name], env)
    assert batches.returncode == 0 and "…" not in batches.stdout

    # --json for scripts
    document = json.loads(ingest_cli(["status", spec.name, "--json"], env).stdout)
    assert document[0]["pipeline"] == spec.name and document[0]["lag"] == 0 and document[0]["error"] is None
    assert document[0]["quarantined_rows"] == 1 and document[0]["target_rows"] == 1000
    assert sorted(p["partition"] for p in document[0]["partitions"]) == [0, 1]
    assert sum(p["broker_end"] + 1 for p in document[0]["partitions"]) == 1001
    shown = json.loads(ingest_cli(["show", spec.name, "--json", "--rows", "2"], env).stdout)
    assert shown[0]["rows"] == 1000 and shown[0]["quarantined"] == 1 and len(shown[0]["sample"]) == 2
    assert shown[0]["reasons"] == [{"reason": "invalid JSON", "count": 1}]
    listed = json.loads(ingest_cli(["batches", spec.name, "--json"], env).stdout)
    assert sum(b["count"] for b in listed) == 1001 and all(b["status"] == "committed" for b in listed)

    # at 80 columns on a terminal: readable records, the name never cut
    narrow = run_on_a_terminal(["status", spec.name], env, columns=80)
    assert spec.name in narrow.replace("\r\n", "").replace("\n", "")
    assert "…" not in narrow
    narrow_batches = run_on_a_terminal(["batches", spec.name], env, columns=80)
    assert "…" not in narrow_batches and listed[-1]["batch_id"] in narrow_batches


# ---------------------------------------------------------------- pure parts
def test_status_figures_are_one_pure_function_of_broker_bounds_and_delta_versions():
    from datetime import UTC, datetime

    from ingest_defs.sources.base import PartitionState
    from ingest_defs.status import PipelineStatus, figures_of

    states = [PartitionState("p/0", 0, 0, 99), PartitionState("p/1", 1, 50, 149), PartitionState("p/2", 2, None, None),
              PartitionState("p/3", 3, 10, 19)]
    when = datetime(2026, 1, 1, tzinfo=UTC)
    figures = figures_of("p", "kafka", states, {"p/0": 89, "p/1": None, "p/3": 30}, when, 500, 7)
    assert [p.lag for p in figures.partitions] == [10, 100, 0, 0]  # never ingested: all the broker holds
    assert figures.lag == 110 and figures.quarantined_rows == 7
    document = PipelineStatus("p", "kafka", figures).as_dict()
    assert document["last_batch_at"] == "2026-01-01T00:00:00+00:00" and document["error"] is None
    assert document["lag"] == 110 and document["target_rows"] == 500
    assert document["partitions"][1] == {"app_id": "p/1", "partition": 1, "broker_start": 50, "broker_end": 149,
                                         "position": None, "lag": 100}
    unknown = figures_of("m", "mqtt", [PartitionState("m/c", 0, None, None)], {"m/c": 4}, None, 4, 0,
                         knows_bounds=False)
    assert unknown.partitions[0].lag is None and unknown.lag == 0


def test_demo_samples_draw_user_ids_from_a_pool():
    from collections import Counter

    from ingest_defs.config import load_pipelines
    from ingest_defs.samples import make_samples

    spec = load_pipelines()["user_activity"]
    pooled = make_samples(spec, 2000, seed=3, users=50)
    ids = Counter(json.loads(p)["id"] for p in pooled.payloads)
    assert set(ids) <= set(range(50)) and len(ids) > 40
    assert min(ids.values()) > 10  # several events per user in any window of the demo
    unique = make_samples(spec, 300, seed=3, start_id=1000)
    assert [json.loads(p)["id"] for p in unique.payloads] == list(range(1000, 1300))


def test_a_wide_batch_line_names_a_few_ranges_and_counts_the_rest():
    from ingest_defs.lifecycle import SHOWN_RANGES, ranges_text
    from ingest_defs.sources.base import PartitionRange

    def ranges(n: int) -> list[PartitionRange]:
        return [PartitionRange(f"t/{p}", p, 10 * p, 10 * p + 9) for p in range(n)]

    assert ranges_text(ranges(SHOWN_RANGES + 1)).count("..") == SHOWN_RANGES + 1  # a few: every one
    wide = ranges_text(ranges(64))
    assert wide.startswith("p0:0..9, p1:10..19") and wide.endswith(f"… +{64 - SHOWN_RANGES} partitions")
    assert len(wide) < 100
    empty = [PartitionRange("t/0", 0, 5, 4)]  # nothing read from it
    assert ranges_text(empty) == "-"

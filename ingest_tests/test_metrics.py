"""The Prometheus exporter (`ingest metrics serve`) and the figures it shares with `ingest status`.

Against real parts: the ledger and tables are real Delta tables, the brokers the session's stack, and the
end-to-end test has a real Prometheus (Debian's package, `ingest stack up --prometheus`) scrape the
exporter every second while the test produces and ingests, reading the results through Prometheus's
HTTP API.
"""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import polars as pl
import pytest
import yaml
from confluent_kafka import TopicPartition
from confluent_kafka.admin import AdminClient
from deltalake import DeltaTable, write_deltalake
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from ingest_defs import cli, metrics
from ingest_defs.ledger import LEDGER_SCHEMA, Ledger, PartitionStats, ledger_rows
from ingest_defs.resources.brokers import source_for
from ingest_defs.samples import make_samples
from ingest_defs.sink import DeltaTableSink
from ingest_defs.sources.base import PartitionRange
from ingest_defs.stack import manager
from ingest_defs.stack import prometheus as prometheus_stack
from ingest_defs.status import partition_lag, pipeline_figures
from ingest_tests.conftest import (
    assert_exactly_once,
    kafka_spec,
    landed,
    run_job,
    wait_for,
    write_pipelines_file,
)

REPO = manager.REPO_ROOT
DASHBOARD = REPO / "deploy" / "grafana" / "ingest-dashboard.json"
SCRAPE_CONFIG = REPO / "deploy" / "prometheus.yml"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    """One sample's value; KeyError (naming what there is) if absent."""
    key = (name, frozenset(labels.items()))
    if key not in samples:
        have = sorted(dict(k[1]) for k in samples if k[0] == name)
        raise KeyError(f"{name}{labels} not exported; {name} has {have}")
    return samples[key]


def total(samples: Samples, name: str, **labels: str) -> float:
    return sum(v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= ls)


def scrape(specs) -> Samples:
    text, _ = metrics.exposition_once(specs, timeout=60)
    return parse(text)


# ---------------------------------------------------------------------------- pure figures
def test_lag_counts_from_the_start_of_retention_until_written() -> None:
    assert partition_lag(broker_start=5, broker_end=9, position=None) == 5  # offsets 5..9, nothing written yet
    assert partition_lag(broker_start=5, broker_end=9, position=7) == 2
    assert partition_lag(broker_start=5, broker_end=9, position=9) == 0
    assert partition_lag(broker_start=None, broker_end=None, position=None) == 0  # empty partition


def test_an_mqtt_lag_is_absent_not_zero_and_a_failed_pipeline_keeps_its_counters() -> None:
    """MQTT brokers cannot tell their queue depth: no lag series rather than a reassuring 0. A pipeline whose
    broker failed is down, without gauges, but its ledger counters stay (they are totals, not rates)."""
    from ingest_defs.config import parse_pipeline
    from ingest_defs.status import PartitionFigures, PipelineFigures

    mqtt = parse_pipeline("m", {"source": {"mqtt": {"topics": ["m/#"]}}, "schema": {"columns": {"id": {"dtype": "int64"}}},
                                "table": "bronze/m"})
    kafka = kafka_spec(partitions=1)
    now = datetime.now(UTC)
    figures = PipelineFigures("m", "mqtt", [PartitionFigures("m/mqtt/c", 0, None, None, 41, None)], now, 42, 0)
    totals = metrics.ledger_totals(pl.DataFrame(_live("b", [(0, 0, 5)], 5, 1, 0.5, now), schema=LEDGER_SCHEMA))
    mqtt_rows = _live("b", [(0, 0, 5)], 5, 1, 0.5, now) + _live("c", [(0, 6, 9)], 4, 0, 0.5, now)
    for row, qos0 in zip(mqtt_rows, (2, 3), strict=True):
        row["qos0_messages"] = qos0
    mqtt_totals = metrics.ledger_totals(pl.DataFrame(mqtt_rows, schema=LEDGER_SCHEMA))
    families = metrics.build_families([mqtt, kafka], [metrics.Snapshot(figures, mqtt_totals),
                                                      metrics.Snapshot(None, totals, ["broker or tables: refused"])], now)
    samples = {(smp.name, frozenset(smp.labels.items())): smp.value for f in families for smp in f.samples}
    assert value(samples, "ingest_delta_position_offset", pipeline="m", source="mqtt", partition="0") == 41
    assert not [k for k in samples if k[0] in ("ingest_lag_messages", "ingest_broker_end_offset")
                and ("pipeline", "m") in k[1]]
    assert value(samples, "ingest_pipeline_up", pipeline="m", source="mqtt") == 1
    assert value(samples, "ingest_pipeline_up", pipeline=kafka.name, source="kafka") == 0
    assert not [k for k in samples if k[0] == "ingest_table_rows" and ("pipeline", kafka.name) in k[1]]
    assert value(samples, "ingest_rows_written_total", pipeline=kafka.name, source="kafka") == 5
    # QoS 0 deliveries (at most once) are counted for MQTT only
    assert value(samples, "ingest_qos0_messages_total", pipeline="m", source="mqtt", partition="0") == 5
    assert not [k for k in samples if k[0] == "ingest_qos0_messages_total" and ("pipeline", kafka.name) in k[1]]


# ---------------------------------------------------------------------------- ledger totals on a real ledger
def _live(batch_id: str, ranges: list[tuple[int, int, int]], written: int | None, quarantined: int | None,
          seconds: float | None, at: datetime) -> list[dict]:
    covered = [PartitionRange(f"p/kafka/t/{p}", p, s, e) for p, s, e in ranges]
    stats = {p: PartitionStats(e - s + 1, s, e, None, None) for p, s, e in ranges}
    return ledger_rows(pipeline="p", batch_id=batch_id, partition_key="2026-12-01", mode="live", status="committed",
                       trigger="test", run_id="", generation=None, covered=covered, stats=stats,
                       rows_written=written, rows_quarantined=quarantined, target_version=1, quarantine_version=None,
                       ingested_at=at, committed_at=at,
                       started_at=None if seconds is None else at - timedelta(seconds=seconds))


def _replay(batch_id: str, ranges: list[tuple[int, int, int]], generation: str, status: str, written: int,
            quarantined: int, at: datetime) -> list[dict]:
    rows = _live(batch_id, ranges, written, quarantined, None, at)
    for row in rows:
        row.update(mode="replay", generation=generation, status=status)
    return rows


def test_ledger_totals_are_incremental_and_survive_compaction_and_restarts(tmp_path: Path) -> None:
    """Counters are totals over the ledger's rows: each file is read once, a compaction changes nothing, a
    new reader (an exporter restart) gets the same totals, and replays never lower the live counters."""
    uri = str(tmp_path / "ledger")
    at = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
    # A ledger made before `started_at` existed: one batch without a duration.
    old_rows = _live("b0", [(0, 0, 9), (1, 0, 4)], 12, 3, None, at)
    for row in old_rows:
        row.pop("started_at")
    old_schema = {k: v for k, v in LEDGER_SCHEMA.items() if k != "started_at"}
    write_deltalake(uri, pl.DataFrame(old_rows, schema=old_schema).to_arrow())
    ledger = Ledger(uri, "p")
    ledger.append(_live("b1", [(0, 10, 19)], 10, 0, 0.3, at))
    # p0 15 offsets skipped (a retention gap under on_gap: skip), then a batch rebuilt after a crash (rows unknown)
    ledger.append(_live("b2", [(0, 35, 39), (1, 5, 9)], 9, 1, 4.0, at))
    ledger.append(_live("b3", [(1, 10, 11)], None, None, None, at))
    ledger.append(_replay("b1", [(0, 10, 19)], "gen-1", "committed", 8, 2, at))
    ledger.append(_replay("b2", [(0, 35, 39), (1, 5, 9)], "gen-1", "not replayed: gone", 0, 0, at))

    reader = metrics.LedgerReader(Ledger(uri, "p"))
    first = reader.totals()
    assert first.batches == 4
    assert (first.rows_written, first.rows_quarantined) == (12 + 10 + 9, 3 + 0 + 1)  # b3's rows are unknown
    assert {p: t.sums["count"] for p, t in first.partitions.items()} == {0: 10 + 10 + 5, 1: 5 + 5 + 2}
    assert {p: t.gap_messages for p, t in first.partitions.items()} == {0: 15, 1: 0}
    assert first.duration_count == 2 and first.duration_sum == pytest.approx(4.3)
    buckets = dict(first.cumulative_buckets())
    assert (buckets["0.25"], buckets["0.5"], buckets["2.5"], buckets["5.0"], buckets["+Inf"]) == (0, 1, 1, 2, 2)
    assert len(first.replay_generations) == 1
    assert first.replay_batches == {"replaced": 1, "not_replayed": 1}
    assert (first.replay_rows_written, first.replay_rows_quarantined) == (8, 2)
    files = reader.files_read
    assert files == 6

    assert reader.totals() == first and reader.files_read == files  # same version: nothing read

    DeltaTable(uri).optimize.compact()  # maintenance rewrites the files: the totals stay
    after = reader.totals()
    assert after == first
    assert reader.files_read == files + 1  # only the compacted file was read

    restarted = metrics.LedgerReader(Ledger(uri, "p")).totals()
    assert restarted == first

    Ledger(uri, "p").append(_live("b4", [(0, 40, 49)], 10, 0, 0.02, at))
    grown = reader.totals()
    assert reader.files_read == files + 2  # just the new batch's file
    assert grown.batches == 5 and grown.rows_written == first.rows_written + 10
    assert grown.partitions[0].sums["count"] == 35 and grown.duration_count == 3


# ---------------------------------------------------------------------------- broker + Delta + ledger
needs_stack = pytest.mark.usefixtures("stack")


@needs_stack
def test_exporter_and_status_agree_with_the_broker_and_delta(lake, instance, tmp_path, monkeypatch, capsys) -> None:
    """Lag, positions, broker ends from the one shared function; counters from the ledger; a replay does not
    lower the counters; a retention gap shows as pending, then as skipped once `on_gap: skip` passes it."""
    spec = kafka_spec(partitions=1, batch={"max_messages": 100})
    monkeypatch.setenv("INGEST_PIPELINES", str(write_pipelines_file(tmp_path / "p.yaml", [spec])))
    app_id = f"{spec.name}/kafka/{spec.source.kafka.topic}/0"
    source = source_for(spec)
    source.ensure_exists()
    source.publish(make_samples(spec, 300, 0.1, seed=3).payloads)
    assert run_job(spec, instance, max_batches=2).success
    labels = {"pipeline": spec.name, "source": "kafka"}
    part = {**labels, "partition": "0"}

    samples = scrape([spec])
    figures = pipeline_figures(source, DeltaTableSink(spec.table_uri(), spec.name, "target"),
                               DeltaTableSink(spec.quarantine_uri(), spec.name, "quarantine"))
    assert value(samples, "ingest_pipeline_up", **labels) == 1
    assert value(samples, "ingest_broker_end_offset", **part) == 299 == figures.partitions[0].broker_end
    assert value(samples, "ingest_delta_position_offset", **part) == DeltaTable(spec.table_uri()).transaction_version(app_id) == 199
    assert value(samples, "ingest_lag_messages", **part) == 100 == figures.lag
    assert cli.main(["status", spec.name]) == 0
    assert re.search(r"\b100\b", capsys.readouterr().out), "ingest status shows the same lag"
    assert cli.main(["metrics", "show", spec.name]) == 0
    assert value(parse(capsys.readouterr().out), "ingest_lag_messages", **part) == 100
    target, quarantine = landed(spec)
    assert value(samples, "ingest_rows_written_total", **labels) == target.height
    assert value(samples, "ingest_rows_quarantined_total", **labels) == quarantine.height > 0
    assert value(samples, "ingest_table_rows", **labels, table="target") == target.height
    assert value(samples, "ingest_messages_total", **part) == 200
    assert value(samples, "ingest_batches_total", **labels) == 2
    assert value(samples, "ingest_batch_duration_seconds_count", **labels) == 2
    assert value(samples, "ingest_last_batch_age_seconds", **labels) >= 0

    # A replay replaces the batches' rows: live counters stay, replay counters count it.
    assert cli.main(["replay", spec.name, "--from", "0", "--to", "199"]) == 0
    replayed = scrape([spec])
    for name in ("ingest_rows_written_total", "ingest_rows_quarantined_total", "ingest_batches_total"):
        assert value(replayed, name, **labels) == value(samples, name, **labels), name
    assert value(replayed, "ingest_replays_total", **labels) == 1
    assert value(replayed, "ingest_replay_batches_total", **labels, status="replaced") == 2
    assert value(replayed, "ingest_replay_rows_written_total", **labels) == landed(spec)[0].height

    # The broker deletes offsets 200..319 before they were read (retention): a pending gap, then a skipped one.
    source.publish(make_samples(spec, 50, seed=4, start_id=300).payloads)
    admin = AdminClient({"bootstrap.servers": source.client_config["bootstrap.servers"]})
    for future in admin.delete_records([TopicPartition(spec.source.kafka.topic, 0, 320)]).values():
        future.result(30)
    gapped = scrape([spec])
    assert value(gapped, "ingest_broker_start_offset", **part) == 320
    assert value(gapped, "ingest_pending_gap_messages", **part) == 120
    assert value(gapped, "ingest_gap_messages_total", **part) == 0
    skipping = spec.model_copy(update={"on_gap": "skip"})
    assert run_job(skipping, instance).success
    done = scrape([skipping])
    assert value(done, "ingest_lag_messages", **part) == 0
    assert value(done, "ingest_pending_gap_messages", **part) == 0
    assert value(done, "ingest_gap_messages_total", **part) == 120
    target, quarantine = assert_exactly_once(spec, {(0, o) for o in [*range(200), *range(320, 350)]})
    assert value(done, "ingest_rows_written_total", **labels) + value(done, "ingest_rows_quarantined_total", **labels) == 230
    source.close()


@pytest.fixture(scope="session")
def silent_port() -> Iterator[int]:
    """A port that accepts connections and never answers: a hung broker. Open for the whole session, so the
    client a test leaves behind times out quietly instead of logging refused reconnects."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        yield silent.getsockname()[1]


@needs_stack
def test_a_pipeline_that_cannot_be_read_does_not_break_the_scrape(lake, caplog, silent_port) -> None:
    """A missing stream fails its pipeline at once; a broker that accepts connections and never answers
    outlasts the scrape's timeout. Both show `ingest_pipeline_up 0` and a log line; the good one is scraped."""
    good = kafka_spec(partitions=1)
    missing = kafka_spec(source={"nats": {"stream": f"MISSING_{good.name}", "subject": f"missing.{good.name}.*"}})
    hung = kafka_spec(source={"kafka": {"topic": f"t_{good.name}", "config": {
        "bootstrap.servers": f"127.0.0.1:{silent_port}"}}})
    source = source_for(good)
    source.ensure_exists()
    source.publish(make_samples(good, 10, seed=1).payloads)
    source.close()
    collector = metrics.IngestCollector([good, missing, hung], timeout=2.0)
    registry = metrics.registry_for(collector, process_metrics=False)
    scrapes: list[Samples] = []

    def good_read_and_missing_reported() -> bool:
        scrapes.append(parse(generate_latest(registry).decode()))
        return (value(scrapes[-1], "ingest_pipeline_up", pipeline=good.name, source="kafka") == 1
                and "does not exist" in caplog.text)

    try:
        with caplog.at_level("INFO", logger="ingest.metrics"):
            wait_for(good_read_and_missing_reported, timeout=120, interval=0.1)
        samples = scrapes[-1]
        assert value(samples, "ingest_lag_messages", pipeline=good.name, source="kafka", partition="0") == 10
        assert value(samples, "ingest_pipeline_up", pipeline=missing.name, source="nats") == 0
        assert all(value(s, "ingest_pipeline_up", pipeline=hung.name, source="kafka") == 0 for s in scrapes)
        assert not [k for s in scrapes for k in s if k[0] == "ingest_lag_messages" and ("pipeline", hung.name) in k[1]]
        warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
        assert any(f"pipeline {missing.name}" in w and "does not exist" in w for w in warnings), warnings
        assert f"pipeline {hung.name}: first read not finished" in caplog.text
    finally:
        collector.close()


# ---------------------------------------------------------------------------- a real Prometheus
@pytest.fixture(scope="module")
def prometheus_url(stack) -> Iterator[str]:
    """This stack's Prometheus, scraping the exporter's port every second (reloaded if it already ran)."""
    started = not prometheus_stack.running()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(prometheus_stack.INTERVAL_ENV, "1s")
        assert manager.up(prometheus=True) == 0, "could not start Prometheus (`ingest stack up --prometheus`)"
        yield prometheus_stack.url()
    if started:
        manager.down(prometheus=True)
    else:  # give it back the interval it had
        prometheus_stack.reload_if_changed(prometheus_stack.service())


def query(url: str, promql: str) -> list[dict]:
    with urllib.request.urlopen(f"{url}/api/v1/query?{urllib.parse.urlencode({'query': promql})}", timeout=10) as r:
        body = json.loads(r.read())
    assert body["status"] == "success", body
    return body["data"]["result"]


def scalar(url: str, promql: str) -> float | None:
    result = query(url, promql)
    return float(result[0]["value"][1]) if result else None


def wait_value(url: str, promql: str, check: Callable[[float], bool], timeout: float = 90.0) -> float:
    seen: list[float | None] = []

    def ok() -> bool:
        seen.append(scalar(url, promql))
        return seen[-1] is not None and check(seen[-1])

    try:
        wait_for(ok, timeout=timeout, interval=0.5)
    except AssertionError:
        raise AssertionError(f"{promql}: last values {seen[-5:]}") from None
    return seen[-1]


@needs_stack
def test_prometheus_sees_lag_rise_when_produced_and_fall_to_zero_after_ingest_run(
        prometheus_url, lake, tmp_path, monkeypatch) -> None:
    spec = kafka_spec(partitions=2, batch={"max_messages": 1000})
    monkeypatch.setenv("INGEST_PIPELINES", str(write_pipelines_file(tmp_path / "p.yaml", [spec])))
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
    source = source_for(spec)
    source.ensure_exists()
    # The command itself, on INGEST_METRICS_PORT (Prometheus's target), answering within the 1 s scrape timeout.
    exporter = subprocess.Popen([sys.executable, "-m", "ingest_defs", "metrics", "serve", "--host", "127.0.0.1",
                                 "--timeout", "0.8"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                cwd=REPO)
    sel = f'{{pipeline="{spec.name}"}}'
    try:
        wait_value(prometheus_url, f"ingest_pipeline_up{sel}", lambda v: v == 1, timeout=120)
        assert wait_value(prometheus_url, f"sum(ingest_lag_messages{sel})", lambda v: True) == 0
        assert scalar(prometheus_url, f"ingest_rows_written_total{sel}") == 0

        source.publish(make_samples(spec, 400, 0.1, seed=11).payloads)
        wait_value(prometheus_url, f"sum(ingest_lag_messages{sel})", lambda v: v == 400)

        assert cli.main(["run", spec.name]) == 0
        wait_value(prometheus_url, f"sum(ingest_lag_messages{sel})", lambda v: v == 0)
        ends = {p.partition: p.last for p in source.state()}
        target, quarantine = assert_exactly_once(spec, {(p, o) for p, last in ends.items() for o in range(last + 1)})
        wait_value(prometheus_url, f"ingest_rows_written_total{sel}", lambda v: v == target.height)
        assert scalar(prometheus_url, f"ingest_rows_quarantined_total{sel}") == quarantine.height > 0
        assert scalar(prometheus_url, f"sum(ingest_messages_total{sel})") == 400
        assert scalar(prometheus_url, f"ingest_batch_duration_seconds_count{sel}") >= 1
        assert scalar(prometheus_url, f"increase(ingest_rows_written_total{sel}[1m])") > 0
    finally:
        exporter.send_signal(signal.SIGTERM)
        output, _ = exporter.communicate(timeout=60)
        source.close()
    assert exporter.returncode == 0, output
    assert f"serving http://127.0.0.1:{metrics.default_port()}/metrics for 1 pipelines ({spec.name})" in output


@needs_stack
def test_the_dashboard_and_alert_queries_run_on_prometheus_and_name_exported_metrics(prometheus_url) -> None:
    """Every panel's PromQL parses and runs on the real Prometheus, uses only metrics the exporter exports,
    and takes its data source from the dashboard's variable (so Grafana's import asks for one); the
    alerting rules of deploy/ingest-alerts.yml are loaded and name exported metrics too."""
    dashboard = json.loads(DASHBOARD.read_text())
    assert {"datasource", "pipeline"} <= {v["name"] for v in dashboard["templating"]["list"]}
    assert next(v for v in dashboard["templating"]["list"] if v["name"] == "datasource")["type"] == "datasource"
    exported = _exported_names()
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    for panel in panels:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert {"x", "y", "w", "h"} <= set(panel["gridPos"])
        for target in panel["targets"]:
            expr = target["expr"]
            for name in set(re.findall(r"\bingest_[a-z0-9_]+", expr)):
                assert name in exported, f"panel '{panel['title']}' uses {name}, which the exporter does not export"
            runnable = (expr.replace("$pipeline", ".*").replace("$__rate_interval", "1m")
                        .replace("$__range", "1h").replace("$__interval", "15s"))
            query(prometheus_url, runnable)  # asserts Prometheus accepted it
    # The alerting rules loaded (Prometheus refuses a config whose rules do not parse).
    with urllib.request.urlopen(f"{prometheus_url}/api/v1/rules", timeout=10) as r:
        groups = json.loads(r.read())["data"]["groups"]
    rules = {rule["name"] for g in groups if g["name"] == "ingest" for rule in g["rules"]}
    assert {"IngestPipelineUnreadable", "IngestDataDeletedBeforeIngestion", "IngestStale"} <= rules
    for rule_expr in (rule["query"] for g in groups for rule in g["rules"]):
        for name in set(re.findall(r"\bingest_[a-z0-9_]+", rule_expr)):
            assert name in exported, f"alert rule uses {name}, which the exporter does not export"


def _exported_names() -> set[str]:
    """Every sample name the exporter can emit, from families built for one pipeline with a full snapshot."""
    spec = kafka_spec(partitions=1)
    from ingest_defs.status import PartitionFigures, PipelineFigures

    figures = PipelineFigures(spec.name, "kafka", [PartitionFigures("a", 0, 0, 9, 5, 4)], datetime.now(UTC), 1, 1)
    totals = metrics.ledger_totals(pl.DataFrame(_live("b", [(0, 0, 5)], 5, 1, 0.5, datetime.now(UTC)),
                                                schema=LEDGER_SCHEMA))
    families = metrics.build_families([spec], [metrics.Snapshot(figures, totals)], datetime.now(UTC))
    return {s.name for f in families for s in f.samples} | {"ingest_exporter_scrape_duration_seconds"}


def test_scrape_configs_are_valid_for_promtool(tmp_path: Path) -> None:
    """deploy/prometheus.yml and the stack's generated config pass `promtool check config` and scrape the same
    job and path; compose mounts the shipped file and runs the exporter it targets."""
    generated = tmp_path / "prometheus.yml"
    generated.write_text(prometheus_stack.config_text("127.0.0.1:9464", "1s"))
    for path in (SCRAPE_CONFIG, generated):
        check = subprocess.run(["promtool", "check", "config", str(path)], capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr
    shipped, ours = (yaml.safe_load(p.read_text())["scrape_configs"][0] for p in (SCRAPE_CONFIG, generated))
    assert (shipped["job_name"], shipped["metrics_path"]) == (ours["job_name"], ours["metrics_path"])
    (target,) = shipped["static_configs"][0]["targets"]
    host, port = target.split(":")
    services = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]
    assert int(port) == metrics.DEFAULT_PORT
    assert services[host]["command"][:3] == ["ingest", "metrics", "serve"]
    assert "./deploy/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in services["prometheus"]["volumes"]
    assert "./deploy/ingest-alerts.yml:/etc/prometheus/ingest-alerts.yml:ro" in services["prometheus"]["volumes"]
    assert yaml.safe_load(SCRAPE_CONFIG.read_text())["rule_files"] == ["ingest-alerts.yml"]

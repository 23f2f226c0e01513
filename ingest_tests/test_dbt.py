"""dbt over bronze tables the real pipelines ingested in this test: builds pass, gold equals Polars, lineage.

One module-scoped lakehouse (tmp LAKE_ROOT, tmp DuckDB file) with the shipped table names:
1. produce to the brokers (Kafka record times spread over minutes; MQTT readings with their own times and
   a publisher's resend; NATS page events) and ingest with `run_until_caught_up`;
2. `dbt build` (the dbt CLI, as `make demo` runs it) of the gold models over what was ingested;
3. produce late and new data, ingest, and build again through the Dagster dbt asset (incremental path,
   lookback, missing-table exclusion);
then compare gold with the same aggregates computed by Polars on the bronze Delta tables.
MQTT/NATS parts are skipped only while their source modules are absent.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import subprocess
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import dagster as dg
import duckdb
import polars as pl
import pytest
from confluent_kafka import Producer
from deltalake import DeltaTable

from ingest_defs.assets.dbt import DBT_CRON, DBT_POOL, dbt_definitions, dbt_env, dbt_executable
from ingest_defs.assets.ingestion import source_asset_key, target_key
from ingest_defs.config import REPO_ROOT, PipelineSpec, parse_pipeline
from ingest_defs.factory import build_definitions
from ingest_defs.resources.brokers import DEFAULT_KAFKA, DEFAULT_MQTT, source_for
from ingest_tests.conftest import kafka_spec, run_until_caught_up, unique

HAS_NATS = importlib.util.find_spec("ingest_defs.sources.nats") is not None
HAS_MQTT = importlib.util.find_spec("ingest_defs.sources.mqtt") is not None
NO_NATS = "ingest_defs/sources/nats.py is not there yet: no bronze/page_events to build on"
NO_MQTT = "ingest_defs/sources/mqtt.py is not there yet: no bronze/iot_temperature to build on"
BOOTSTRAP = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", DEFAULT_KAFKA)
GOLD = {"user_activity": "gold_user_activity_1m", "iot_temperature": "gold_iot_temperature_1m",
        "page_events": "gold_page_loads_1m"}  # bronze table -> gold model (relation gold.<model minus "gold_">)


def gold_key(table: str) -> dg.AssetKey:
    return dg.AssetKey(["gold", GOLD[table].removeprefix("gold_")])


@dataclass
class Lakehouse:
    root: Path
    warehouse: Path
    specs: dict[str, PipelineSpec]  # by table name
    defs: dg.Definitions
    build1: subprocess.CompletedProcess
    run2: dg.ExecuteInProcessResult
    gold_after_build1: pl.DataFrame
    late_windows: set[int]  # window starts (epoch µs) that got late rows after the first build
    versions: dict[str, int] = field(default_factory=dict)  # bronze Delta version after the last ingest

    def query(self, sql: str) -> pl.DataFrame:
        return query(self.warehouse, sql)


def query(warehouse: Path, sql: str) -> pl.DataFrame:
    with duckdb.connect(str(warehouse), read_only=True) as con:
        return pl.from_arrow(con.sql(sql).to_arrow_table())


# ---------------------------------------------------------------- producing
def minute(dt: datetime) -> datetime:
    return dt.replace(second=0, microsecond=0)


def produce_kafka(spec: PipelineSpec, records: list[tuple[bytes, datetime]]) -> None:
    """Payloads with explicit record times (CreateTime = the event time gold windows use)."""
    source = source_for(spec)
    source.ensure_exists()
    source.close()
    producer = Producer({"bootstrap.servers": BOOTSTRAP, "linger.ms": 5, "enable.idempotence": True})
    errors: list[Any] = []
    for i, (payload, ts) in enumerate(records):
        producer.produce(spec.source.kafka.topic, value=payload, key=str(i % 9).encode(),
                         timestamp=int(ts.timestamp() * 1000), on_delivery=lambda err, _m: err and errors.append(err))
        producer.poll(0)
    assert producer.flush(30) == 0 and not errors, errors


def user_activity(n: int, start: int, times: list[datetime]) -> list[tuple[bytes, datetime]]:
    out = []
    for i in range(start, start + n):
        payload = {"id": i % 9, "event": "click" if i % 3 else "user_activity", "value": (i * 37) % 1000}
        out.append((json.dumps(payload).encode(), times[i % len(times)]))
    # bad messages go to quarantine and must not reach silver/gold
    out.append((b'{"id": 1, "event": "click", "value": ', times[0]))
    out.append((json.dumps({"id": -1, "event": "click", "value": 5}).encode(), times[0]))
    return out


def mqtt_spec(name: str) -> PipelineSpec:
    return parse_pipeline(name, {
        "source": {"mqtt": {"topics": [f"it/{name}/+/temperature"], "session_expiry_seconds": 3600}},
        "schema": {"columns": {"sensor_id": {"dtype": "string", "nullable": False},
                               "temperature": {"dtype": "float64"}, "humidity": {"dtype": "float64"},
                               "timestamp": {"dtype": "datetime"}}},
        "table": "bronze/iot_temperature",
        "batch": {"max_messages": 500, "idle_ms": 300},
    })


def readings(base: datetime, minutes: range, offset_s: int = 0, resend: int = 0) -> tuple[list[bytes], list[bytes]]:
    """4 readings per sensor (3 sensors) per minute; `offset_s` shifts their times (new, distinct readings)."""
    payloads, keys = [], []
    for m in minutes:
        for s in range(3):
            for k in range(4):
                ts = base + timedelta(minutes=m, seconds=k * 13 + s + offset_s)
                payloads.append(json.dumps({"sensor_id": f"sensor-{s}", "temperature": round(15 + (m * 7 + k * 3 + s) % 20 * 0.5, 2),
                                            "humidity": 40 + (m + k) % 9, "timestamp": ts.isoformat()}).encode())
                keys.append(f"sensor-{s}".encode())
    # a publisher's own resend: same reading again (same sensor and time) as a new MQTT message
    return payloads + payloads[:resend], keys + keys[:resend]


def publish(spec: PipelineSpec, payloads: list[bytes], keys: list[bytes]) -> None:
    source = source_for(spec)
    try:
        source.ensure_exists()
        assert source.publish(payloads, keys) == len(payloads)
    finally:
        source.close()


def nats_spec(name: str) -> PipelineSpec:
    return parse_pipeline(name, {
        "source": {"nats": {"stream": f"S_{name}", "subject": f"{name}.*"}},
        "schema": {"columns": {"page": {"dtype": "string", "nullable": False}, "user_id": {"dtype": "int64"},
                               "load_ms": {"dtype": "int64", "checks": {"ge": 0}}}},
        "table": "bronze/page_events",
        "batch": {"max_messages": 500},
    })


def page_events(n: int, start: int) -> tuple[list[bytes], list[bytes]]:
    pages = ["/", "/cart", "/search", "/help"]
    payloads = [json.dumps({"page": pages[i % 4], "user_id": None if i % 10 == 0 else i % 6,
                            "load_ms": (i * 53) % 900}).encode() for i in range(start, start + n)]
    payloads.append(json.dumps({"page": "/", "user_id": 1, "load_ms": -5}).encode())  # quarantined
    return payloads, [b"page_loaded"] * len(payloads)


def drop_mqtt_session(spec: PipelineSpec) -> None:
    import paho.mqtt.client as mqtt

    from ingest_defs.sources.mqtt import parse_url

    host, port, _ = parse_url(os.environ.get("MQTT_URL", DEFAULT_MQTT))
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=spec.source.mqtt.client_id or f"ingest-{spec.name}",
                         protocol=mqtt.MQTTv5)
    try:
        client.connect(host, port, clean_start=True)  # session expiry 0: the session ends with this
        client.loop(0.2)
        client.disconnect()
    except OSError:
        pass


# ---------------------------------------------------------------- the lakehouse, built once
@pytest.fixture(scope="module")
def lakehouse(stack, tmp_path_factory: pytest.TempPathFactory) -> Any:
    tmp = tmp_path_factory.mktemp("dbt")
    root, warehouse = tmp / "lake", tmp / "warehouse.duckdb"
    specs = {"user_activity": kafka_spec(name=unique("dbtua"), partitions=2, table="bronze/user_activity")}
    if HAS_MQTT:
        specs["iot_temperature"] = mqtt_spec(unique("dbtiot"))
    if HAS_NATS:
        specs["page_events"] = nats_spec(unique("dbtpg"))
    base = minute(datetime.now(UTC)) - timedelta(minutes=30)
    with pytest.MonkeyPatch.context() as mp, dg.instance_for_test() as instance:
        mp.setenv("LAKE_ROOT", str(root))
        mp.setenv("DBT_DUCKDB_PATH", str(warehouse))
        # dbt's target dir; dagster-dbt puts its per-run dirs under it and reuses its partial_parse.msgpack
        mp.setenv("DBT_TARGET_PATH", str(tmp / "target"))
        try:
            # 1. first data: 12 minutes of user activity, 10 minutes of readings (+5 resends), page events
            ua = specs["user_activity"]
            produce_kafka(ua, user_activity(400, 0, [base + timedelta(minutes=m, seconds=m * 4) for m in range(12)]))
            if HAS_MQTT:  # publish() registers the persistent session first: nothing is lost
                publish(specs["iot_temperature"], *readings(base, range(10), resend=5))
            if HAS_NATS:
                publish(specs["page_events"], *page_events(90, 0))
            for spec in specs.values():
                run_until_caught_up(spec, instance)

            # 2. dbt build of what was ingested, with the dbt CLI (as `make demo`)
            select = " ".join(f"+{GOLD[t]}" for t in specs)
            build1 = subprocess.run(
                [dbt_executable(), "build", "--select", select],
                env={**os.environ, **dbt_env(str(root))}, cwd=REPO_ROOT, capture_output=True, text=True, timeout=180)
            assert build1.returncode == 0, build1.stdout[-4000:] + build1.stderr[-2000:]
            gold1 = query(warehouse, "select epoch_us(window_start) as w, id, event_count from gold.user_activity_1m")

            # 3. late rows (windows 2..4, already in gold) and new windows (12..17), then the Dagster dbt asset
            late = [base + timedelta(minutes=m, seconds=30) for m in (2, 3, 4)]
            produce_kafka(ua, user_activity(60, 1000, late) + user_activity(120, 2000, [
                base + timedelta(minutes=m, seconds=7) for m in range(12, 18)])[:-2])
            if HAS_MQTT:
                late_payloads, late_keys = readings(base, range(3, 5), offset_s=5)
                new_payloads, new_keys = readings(base, range(10, 14))
                publish(specs["iot_temperature"], late_payloads + new_payloads, late_keys + new_keys)
            if HAS_NATS:
                publish(specs["page_events"], *page_events(60, 500))
            for spec in specs.values():
                run_until_caught_up(spec, instance)
            versions = {t: DeltaTable(spec.table_uri()).version() for t, spec in specs.items()}

            # the code location as definitions.py composes it, with the manifest the first build wrote
            by_name = {s.name: s for s in specs.values()}
            defs = dg.Definitions.merge(build_definitions(by_name),
                                        dbt_definitions(by_name, manifest_path=tmp / "target" / "manifest.json"))
            dbt_keys = {k for k in defs.resolve_asset_graph().get_all_asset_keys() if k.path[0] in ("silver", "gold")}
            run2 = defs.resolve_implicit_global_asset_job_def().get_subset(asset_selection=dbt_keys).execute_in_process(
                run_config={"loggers": {"console": {"config": {"log_level": "ERROR"}}}},
                instance=instance, raise_on_error=False)
            yield Lakehouse(root, warehouse, specs, defs, build1, run2, gold1,
                            {int(minute(t).timestamp()) * 1_000_000 for t in late}, versions)
        finally:
            if HAS_MQTT:
                drop_mqtt_session(specs["iot_temperature"])


# ---------------------------------------------------------------- Polars references on the bronze tables
def bronze(lh: Lakehouse, table: str) -> pl.DataFrame:
    return pl.read_delta(lh.specs[table].table_uri())


def window(col: str) -> pl.Expr:
    return pl.col(col).dt.truncate("1m").dt.epoch("us").alias("w")


def rows(frame: pl.DataFrame) -> list[tuple]:
    return sorted(frame.rows())


# ---------------------------------------------------------------- tests
def test_both_dbt_builds_pass_with_every_data_test(lakehouse: Lakehouse):
    assert "ERROR=0" in lakehouse.build1.stdout and "PASS=" in lakehouse.build1.stdout
    run = lakehouse.run2
    assert run.success, [e.message for e in run.all_events if e.is_failure]
    materialized = {e.asset_key for e in run.get_asset_materialization_events()}
    for table in lakehouse.specs:
        assert {dg.AssetKey(["silver", table]), gold_key(table)} <= materialized
    assert dg.AssetKey(["silver", "jobs"]) not in materialized  # no bronze/jobs in this lake: excluded
    checks = run.get_asset_check_evaluations()
    assert checks and all(c.passed for c in checks), [c.asset_check_key for c in checks if not c.passed]


def test_gold_user_activity_equals_polars_on_bronze(lakehouse: Lakehouse):
    expected = (bronze(lakehouse, "user_activity")
                .unique(subset=["_stream", "_partition", "_offset"])
                .group_by(window("_timestamp"), "id")
                .agg(pl.len().alias("event_count"), pl.col("value").sum().alias("total_value")))
    gold = lakehouse.query("select epoch_us(window_start) as w, id, event_count, total_value from gold.user_activity_1m")
    assert rows(gold) == rows(expected.select("w", "id", pl.col("event_count").cast(pl.Int64), "total_value"))
    # the late rows landed in windows the first build had already written: the incremental run rebuilt them
    before = lakehouse.gold_after_build1.group_by("w").agg(pl.col("event_count").sum())
    after = gold.group_by("w").agg(pl.col("event_count").sum())
    late_before = before.filter(pl.col("w").is_in(list(lakehouse.late_windows)))
    assert late_before.height == len(lakehouse.late_windows)
    merged = late_before.join(after, on="w", suffix="_after")
    assert (merged["event_count_after"] > merged["event_count"]).all(), merged
    # one window per minute per id, windows [start, start + 1 min)
    assert gold.n_unique(["w", "id"]) == gold.height
    assert gold["w"].n_unique() == 18


def test_gold_iot_temperature_equals_polars_on_bronze(lakehouse: Lakehouse):
    if not HAS_MQTT:
        pytest.skip(NO_MQTT)
    frame = bronze(lakehouse, "iot_temperature")
    deduped = frame.sort("_ingested_at", "_offset").unique(subset=["sensor_id", "timestamp"], keep="last")
    assert frame.height - deduped.height == 5  # the publisher's resends
    expected = deduped.group_by(window("timestamp"), "sensor_id").agg(
        pl.len().cast(pl.Int64).alias("readings"),
        *(getattr(pl.col(c), f)().alias(f"{f}_{c}") for c in ("temperature", "humidity") for f in ("mean", "min", "max")))
    gold = lakehouse.query("""select epoch_us(window_start) as w, sensor_id, readings,
        avg_temperature, min_temperature, max_temperature, avg_humidity, min_humidity, max_humidity
        from gold.iot_temperature_1m""")
    assert gold.height == expected.height == 14 * 3
    rounded = [pl.col(pl.Float64).round(9)]
    assert rows(gold.with_columns(rounded)) == rows(expected.select(
        "w", "sensor_id", "readings", *(f"{f}_{c}" for c in ("temperature", "humidity") for f in ("mean", "min", "max")))
        .with_columns(rounded))


def test_gold_page_loads_equals_polars_on_bronze(lakehouse: Lakehouse):
    if not HAS_NATS:
        pytest.skip(NO_NATS)
    expected = (bronze(lakehouse, "page_events")
                .unique(subset=["_stream", "_partition", "_offset"])
                .group_by(window("_timestamp"), "page")
                .agg(pl.len().cast(pl.Int64).alias("page_loads"),
                     pl.col("user_id").drop_nulls().n_unique().cast(pl.Int64).alias("users"),
                     pl.col("load_ms").mean().round(9).alias("avg_load_ms"), pl.col("load_ms").max().alias("max_load_ms")))
    gold = lakehouse.query("""select epoch_us(window_start) as w, page, page_loads, users,
        round(avg_load_ms, 9) as avg_load_ms, max_load_ms from gold.page_loads_1m""")
    assert gold["page_loads"].sum() == 150
    assert rows(gold) == rows(expected)


def test_silver_and_gold_record_the_delta_version_read(lakehouse: Lakehouse):
    for table, version in lakehouse.versions.items():
        silver = lakehouse.query(f"select min(_bronze_version) as lo, max(_bronze_version) as hi from silver.{table}")
        # every row was re-read (silver_overlap_minutes) at the version the second build saw
        assert silver.row(0) == (version, version), (table, silver.row(0), version)
        gold = ".".join(gold_key(table).path)
        assert lakehouse.query(f"select max(bronze_version) from {gold}").item() == version


def test_asset_graph_runs_from_each_broker_through_bronze_and_silver_to_gold(lakehouse: Lakehouse):
    graph = lakehouse.defs.resolve_asset_graph()
    for table, spec in lakehouse.specs.items():
        chain, key = [gold_key(table)], gold_key(table)
        while graph.get(key).parent_keys:
            (key,) = graph.get(key).parent_keys
            chain.append(key)
        assert chain == [gold_key(table), dg.AssetKey(["silver", table]), target_key(spec), source_asset_key(spec)]
        assert graph.get(gold_key(table)).automation_condition.get_label() == f"on_cron({DBT_CRON}, UTC)"
    dbt_def = lakehouse.defs.resolve_assets_def(dg.AssetKey(["gold", "user_activity_1m"]))
    assert dbt_def.op.pool == DBT_POOL
    assert lakehouse.defs.resolve_sensor_def("dbt_automation_sensor")


def test_code_location_loads_without_a_manifest_and_says_what_to_run(tmp_path: Path, caplog):
    spec = kafka_spec(table="bronze/user_activity")
    with caplog.at_level(logging.WARNING):
        defs = dbt_definitions({spec.name: spec}, manifest_path=tmp_path / "missing" / "manifest.json")
    assert not list(defs.assets or [])
    assert "make setup" in caplog.text


def test_plugin_version_column_follows_the_snapshot_read_and_keeps_partitions(tmp_path: Path):
    """Unit test of dbt/plugins/lake_delta.py (no broker): partition pruning still works, `as_of_version: 0`
    pins version 0 (the built-in plugin reads 0 as "latest"), and a missing table names the fix."""
    import sys

    import pyarrow as pa
    from deltalake import write_deltalake

    sys.path.insert(0, str(REPO_ROOT / "dbt" / "plugins"))
    try:
        import lake_delta
    finally:
        sys.path.remove(str(REPO_ROOT / "dbt" / "plugins"))

    class SourceConfig(dict):
        def table_name(self) -> str:
            return "bronze.t"

    path = str(tmp_path / "t")
    for _ in range(2):
        write_deltalake(path, pa.table({"a": [1, 2, 3], "p": ["x", "y", "x"]}), partition_by=["p"], mode="append")
    plugin = lake_delta.Plugin("lake_delta", {})
    with duckdb.connect() as con:
        con.register("latest", plugin.load(SourceConfig(delta_table_path=path)))
        con.register("first", plugin.load(SourceConfig(delta_table_path=path, as_of_version=0)))
        assert con.sql("select count(*), min(_delta_version), max(_delta_version) from latest where p = 'x'").fetchall() == [(4, 1, 1)]
        assert con.sql("select count(*), max(_delta_version) from first").fetchall() == [(3, 0)]
    with pytest.raises(RuntimeError, match="not written it yet"):
        plugin.load(SourceConfig(delta_table_path=str(tmp_path / "missing")))

"""The batch ledger, backfills of ingestion-time partitions and `ingest replay`, against real brokers."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import dagster as dg
import polars as pl
import pytest
from confluent_kafka import TopicPartition
from confluent_kafka.admin import AdminClient
from deltalake import DeltaTable

from ingest_defs.assets.ingestion import job_name, op_name, run_mode
from ingest_defs.config import PartitionsSpec, PipelineSpec, parse_pipeline
from ingest_defs.factory import build_definitions
from ingest_defs.ledger import Ledger
from ingest_defs.lifecycle import BatchContext, BatchRunner
from ingest_defs.partitions import partition_key_at, partitions_def
from ingest_defs.replay import Replayer
from ingest_defs.resources.brokers import source_for
from ingest_defs.samples import make_samples
from ingest_defs.sink import DeltaTableSink
from ingest_tests.conftest import (
    USER_ACTIVITY_SCHEMA,
    assert_exactly_once,
    cli_env,
    failure_message,
    ingest_cli,
    kafka_spec,
    landed,
    run_until_caught_up,
    write_pipelines_file,
)
from ingest_tests.test_kafka_pipeline import BOOTSTRAP, delta_positions, produce
from ingest_tests.test_mqtt_pipeline import sessions  # noqa: F401 - the fixture that ends MQTT sessions
from ingest_tests.test_nats_pipeline import _delete_streams  # noqa: F401 - deletes the streams of nats_spec()

pytestmark = pytest.mark.usefixtures("stack")

STRICT_EVENTS = {"columns": {
    "id": {"dtype": "int64", "nullable": False, "checks": {"ge": 0}},
    "event": {"dtype": "string", "checks": {"isin": ["user_activity"]}},  # "click" is quarantined
    "value": {"dtype": "int64"},
}}


def with_schema(spec: PipelineSpec, schema: dict[str, Any]) -> PipelineSpec:
    """The same pipeline with another schema (parsed afresh: the pandera schema is cached per spec)."""
    raw = spec.model_dump(by_alias=True, exclude={"name"}, exclude_none=True, mode="json")
    return parse_pipeline(spec.name, {**raw, "schema": schema})


def backfill(spec: PipelineSpec, instance: dg.DagsterInstance, keys: list[str], backfill_id: str = "bf1",
             schema_spec: PipelineSpec | None = None) -> dg.ExecuteInProcessResult:
    """What a Dagster backfill of `keys` runs: one run over the range, tagged with the backfill id."""
    spec = schema_spec or spec
    job = build_definitions({spec.name: spec}).resolve_job_def(job_name(spec))
    tags = {"dagster/backfill": backfill_id}
    if len(keys) == 1:
        kwargs: dict[str, Any] = {"partition_key": keys[0]}
    else:
        tags |= {"dagster/asset_partition_range_start": keys[0], "dagster/asset_partition_range_end": keys[-1]}
        kwargs = {}
    result = job.execute_in_process(run_config={"loggers": {"console": {"config": {"log_level": "ERROR"}}}},
                                    instance=instance, tags=tags, raise_on_error=False, **kwargs)
    assert result.success, failure_message(result)
    return result


def replay_metadata(result: dg.ExecuteInProcessResult, spec: PipelineSpec) -> dict[str, Any]:
    from ingest_defs.assets.ingestion import target_key

    mats = [m for m in result.asset_materializations_for_node(op_name(spec)) if m.asset_key == target_key(spec)]
    return {k: v.value for k, v in mats[-1].metadata.items()}


def tables(spec: PipelineSpec) -> tuple[pl.DataFrame, pl.DataFrame]:
    target, quarantine = landed(spec)
    return (target.sort("_partition", "_offset"),
            quarantine.sort("_partition", "_offset") if quarantine.height else quarantine)


def ledger_frame(spec: PipelineSpec) -> pl.DataFrame:
    return Ledger(spec.ledger_uri(), spec.name).frame()


def test_ledger_records_every_batch_and_a_backfill_reproduces_the_rows_exactly(lake, instance):
    spec = kafka_spec(partitions=2, batch={"max_messages": 300})
    samples = make_samples(spec, 900, bad_fraction=0.05, seed=61)
    produced = produce(spec, samples.payloads, samples.keys)
    run_until_caught_up(spec, instance)
    before_t, before_q = tables(spec)
    positions = delta_positions(spec)

    # the ledger: every committed batch, its exact ranges, counts and versions
    ledger = ledger_frame(spec)
    assert set(ledger["mode"]) == {"live"} and set(ledger["status"]) == {"committed"}
    today = partition_key_at(spec)
    assert set(ledger["partition_key"]) == {today}
    covered = {(p, o) for p, s, e in ledger.select("source_partition", "range_start", "range_end").iter_rows()
               for o in range(s, e + 1)}
    assert covered == produced  # ranges cover every offset once
    assert ledger["count"].sum() == len(produced)
    per_batch = pl.concat([before_t, before_q], how="diagonal_relaxed").group_by("_batch_id").len()
    assert dict(per_batch.iter_rows()) == dict(ledger.group_by("batch_id").agg(pl.col("count").sum()).iter_rows())
    assert ledger["first_timestamp"].null_count() == 0 and ledger["target_version"].null_count() == 0

    # a backfill of today's partition re-reads those ranges from the broker and changes nothing
    result = backfill(spec, instance, [today])
    meta = replay_metadata(result, spec)
    assert meta["mode"] == "replay" and meta["batches_replaced"] == ledger["batch_id"].n_unique()
    assert meta["batches_not_replayed"] == 0 and meta["lag"] == 0 and meta["delta_version"] is not None
    after_t, after_q = tables(spec)
    assert after_t.equals(before_t) and after_q.equals(before_q)
    assert delta_positions(spec) == positions  # live transaction versions untouched
    app_ids = [f"backfill/{spec.name}/{today}/bf1"]
    assert DeltaTable(spec.table_uri()).transaction_version(app_ids[0]) == meta["batches"]

    # the same backfill again (same generation: nothing to do), then a new one: same tables
    again = replay_metadata(backfill(spec, instance, [today]), spec)
    assert again["batches_replaced"] == 0
    backfill(spec, instance, [today], backfill_id="bf2")
    after_t, after_q = tables(spec)
    assert after_t.equals(before_t) and after_q.equals(before_q)
    assert_exactly_once(spec, produced)
    replays = ledger_frame(spec).filter(pl.col("mode") == "replay")
    assert set(replays["generation"]) == {"bf1", "bf2"}

    # the live path goes on from where it was, after the replays
    more = produce(spec, make_samples(spec, 200, seed=62, start_id=900).payloads)
    run_until_caught_up(spec, instance)
    assert_exactly_once(spec, produced | more)


def test_backfill_after_a_schema_fix_moves_quarantined_rows_into_the_target(lake, instance):
    spec = kafka_spec(partitions=1, schema=STRICT_EVENTS, batch={"max_messages": 300})
    fixed = with_schema(spec, USER_ACTIVITY_SCHEMA)
    samples = make_samples(fixed, 900, bad_fraction=0.02, seed=63)
    produced = produce(spec, samples.payloads, samples.keys)
    run_until_caught_up(spec, instance)
    _, quarantine = landed(spec)
    clicks = quarantine.filter(pl.col("_error").str.contains("event"))
    assert clicks.height > 50  # the too strict schema quarantined the click events

    # a backfill of yesterday...today, one run over the range (as `--partition-range` or the UI launch it)
    keys = partitions_def(spec).get_partition_keys()[-2:]
    meta = replay_metadata(backfill(spec, instance, keys, schema_spec=fixed), fixed)
    assert meta["partitions"] == keys and meta["batches_replaced"] == 3 and meta["batches_not_replayed"] == 0
    target, quarantine = assert_exactly_once(fixed, produced)
    moved = set(clicks["_offset"].to_list()) - set(samples.bad)  # one partition: offset = sample index
    assert moved <= set(target["_offset"].to_list())
    assert not moved & set(quarantine["_offset"].to_list())
    bad_payloads = sorted(p for i, p in enumerate(samples.payloads) if i in samples.bad)
    assert sorted(quarantine["_raw"].to_list()) == bad_payloads  # only the truly bad messages are left


def test_backfill_of_a_range_the_broker_no_longer_holds_says_so_and_changes_nothing(lake, instance):
    spec = kafka_spec(partitions=1, batch={"max_messages": 100})
    produced = produce(spec, make_samples(spec, 300, seed=64).payloads)
    run_until_caught_up(spec, instance)
    before_t, before_q = tables(spec)
    admin = AdminClient({"bootstrap.servers": BOOTSTRAP})
    for future in admin.delete_records([TopicPartition(spec.source.kafka.topic, 0, 150)]).values():
        future.result(30)  # retention removed offsets 0..149: two of the three batches are gone
    meta = replay_metadata(backfill(spec, instance, [partition_key_at(spec)]), spec)
    assert meta["batches_not_replayed"] == 2 and meta["batches_replaced"] == 1
    reasons = [m["reason"] for m in meta["not_replayed"]]
    assert all("no longer holds" in r and "nothing was changed" in r for r in reasons)
    after_t, after_q = tables(spec)
    assert after_t.equals(before_t) and after_q.height == before_q.height == 0
    assert_exactly_once(spec, produced)
    not_replayed = ledger_frame(spec).filter(pl.col("status").str.starts_with("not replayed"))
    assert not_replayed["batch_id"].n_unique() == 2


def test_backfill_next_to_live_batches_doubles_nothing(lake, instance):
    spec = kafka_spec(partitions=2, schema=STRICT_EVENTS, batch={"max_messages": 150})
    fixed = with_schema(spec, USER_ACTIVITY_SCHEMA)
    first = make_samples(fixed, 750, bad_fraction=0.02, seed=65)
    produced = produce(spec, first.payloads, first.keys)
    run_until_caught_up(spec, instance)
    second = make_samples(fixed, 750, bad_fraction=0.02, seed=66, start_id=750)
    produced |= produce(spec, second.payloads, second.keys)
    errors: list[BaseException] = []

    def sinks(s: PipelineSpec) -> tuple[DeltaTableSink, DeltaTableSink, Ledger]:
        return (DeltaTableSink(s.table_uri(), s.name, "target"), DeltaTableSink(s.quarantine_uri(), s.name, "quarantine"),
                Ledger(s.ledger_uri(), s.name))

    def live() -> None:  # the live path keeps committing new batches while the backfill replaces old ones
        try:
            source = source_for(spec)
            target, quarantine, ledger = sinks(spec)
            runner = BatchRunner(spec, source, target, quarantine, BatchContext(trigger="test"), ledger=ledger)
            while runner.run(max_batches=1):
                pass
            source.close()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    def replay() -> None:
        try:
            source = source_for(fixed)
            target, quarantine, ledger = sinks(fixed)
            replayer = Replayer(fixed, source, target, quarantine, ledger, BatchContext(trigger="test", mode="replay"), "concurrent")
            replayer.replay(replayer.batches_for_partitions([partition_key_at(spec)]))
            source.close()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=live), threading.Thread(target=replay)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    run_until_caught_up(spec, instance)
    assert_exactly_once(spec, produced)
    # every live batch is in the ledger exactly once, ranges disjoint and complete
    live_rows = ledger_frame(spec).filter(pl.col("mode") == "live")
    covered = [(p, o) for p, s, e in live_rows.select("source_partition", "range_start", "range_end").iter_rows()
               for o in range(s, e + 1)]
    assert len(covered) == len(set(covered)) and set(covered) == produced


def test_crash_before_the_ledger_row_is_repaired_by_the_next_run(lake, instance, tmp_path: Path):
    spec = kafka_spec(partitions=1, batch={"max_messages": 250})
    produced = produce(spec, make_samples(spec, 500, bad_fraction=0.05, seed=67).payloads)
    env = cli_env(spec, tmp_path, lake, INGEST_FAULT="before_ledger")
    crashed = ingest_cli(["run", spec.name, "--max-batches", "1"], env)
    assert crashed.returncode != 0
    target, _ = landed(spec)
    assert target.height > 0 and ledger_frame(spec).is_empty()  # committed, not in the ledger
    committed_batch = target["_batch_id"].unique().to_list()
    run_until_caught_up(spec, instance)
    ledger = ledger_frame(spec)
    assert set(committed_batch) <= set(ledger["batch_id"])  # rebuilt from the target's commit
    repaired = ledger.filter(pl.col("batch_id") == committed_batch[0])
    assert repaired["count"].sum() == 250 and repaired["trigger"].to_list() == ["cli"]
    assert_exactly_once(spec, produced)
    # the repaired row is good enough to replay from
    meta = replay_metadata(backfill(spec, instance, [partition_key_at(spec)]), spec)
    assert meta["batches_not_replayed"] == 0 and meta["batches_replaced"] == ledger["batch_id"].n_unique()
    assert_exactly_once(spec, produced)


def test_ingest_batches_and_ingest_replay_by_offsets(lake, instance, tmp_path: Path, monkeypatch, capsys):
    from ingest_defs import cli

    spec = kafka_spec(partitions=1, schema=STRICT_EVENTS, batch={"max_messages": 100})
    fixed = with_schema(spec, USER_ACTIVITY_SCHEMA)
    samples = make_samples(fixed, 400, seed=68)
    produced = produce(spec, samples.payloads, samples.keys)
    run_until_caught_up(spec, instance)
    # the commands in this process (the crash test runs `ingest` as a child process)
    monkeypatch.setenv("INGEST_PIPELINES", str(write_pipelines_file(tmp_path / "p.yaml", [fixed])))
    monkeypatch.setenv("COLUMNS", "250")
    assert cli.main(["batches", spec.name]) == 0
    listed = capsys.readouterr().out
    ledger = ledger_frame(spec)
    for batch_id in ledger["batch_id"]:
        assert batch_id in listed
    # offsets 120..180 lie in the second batch (100..199): that whole batch is replayed, nothing else
    _, quarantine_before = landed(spec)
    assert cli.main(["replay", spec.name, "--from", "120", "--to", "180"]) == 0
    assert "1 replaced, 0 not replayed" in capsys.readouterr().out
    target, quarantine = assert_exactly_once(fixed, produced)
    moved = set(quarantine_before.filter(pl.col("_offset").is_between(100, 199))["_offset"].to_list())
    assert moved and moved <= set(target["_offset"].to_list())
    assert set(quarantine["_offset"].to_list()) == set(quarantine_before["_offset"].to_list()) - moved
    # by broker time: every batch
    assert cli.main(["replay", spec.name, "--from", "2000-01-01T00:00:00Z", "--to", "2100-01-01T00:00:00Z"]) == 0
    assert f"{ledger['batch_id'].n_unique()} replaced" in capsys.readouterr().out
    target, quarantine = assert_exactly_once(fixed, produced)
    assert quarantine.is_empty()
    assert cli.main(["batches", spec.name, "--replays"]) == 0
    assert "replay replay-" in capsys.readouterr().out
    # a range not ingested yet is refused with the fix
    assert cli.main(["replay", spec.name, "--from", "5000", "--to", "6000"]) == 1
    assert "ingest run" in capsys.readouterr().out


def test_run_mode_and_live_requests_target_the_current_partition():
    assert run_mode("auto", {}, [], "2026-11-27") == "live"
    assert run_mode("auto", {}, ["2026-11-27"], "2026-11-27") == "live"
    assert run_mode("auto", {}, ["2026-11-26"], "2026-11-27") == "replay"
    assert run_mode("auto", {"dagster/backfill": "x"}, ["2026-11-27"], "2026-11-27") == "replay"
    assert run_mode("live", {}, ["2026-11-26"], "2026-11-27") == "live"  # a sensor run started after midnight
    hourly = kafka_spec(partitions=1).model_copy(update={"partitions": PartitionsSpec(granularity="hourly")})
    assert partition_key_at(hourly).endswith(":00")
    assert partitions_def(hourly).get_last_partition_key() == partition_key_at(hourly)


def test_mqtt_backfill_replays_from_the_lake_and_re_drives_quarantine(lake, instance, sessions):  # noqa: F811
    from ingest_tests.test_mqtt_pipeline import SCHEMA, mqtt_spec, payloads, publish, register
    from ingest_tests.test_mqtt_pipeline import assert_exactly_once as mqtt_exactly_once

    strict = {"columns": {**SCHEMA["columns"],
                          "temperature": {"dtype": "float64", "checks": {"in_range": {"min_value": -50, "max_value": 20}}}}}
    spec = mqtt_spec(max_messages=200, schema=strict)
    sessions.append(spec)
    register(spec)
    published = publish(spec, payloads(0, 500, bad_every=25))
    run_until_caught_up(spec, instance)
    before_t, before_q = tables(spec)
    assert before_q.filter(pl.col("_error").str.contains("temperature")).height > 100
    today = partition_key_at(spec)
    # MQTT cannot replay: the rows' `_raw` is the source. Same schema: the same rows.
    meta = replay_metadata(backfill(spec, instance, [today]), spec)
    assert meta["batches_not_replayed"] == 0 and meta["batches_replaced"] >= 3
    after_t, after_q = tables(spec)
    assert after_t.equals(before_t) and after_q.equals(before_q)
    # the schema fix: a backfill moves the too-hot readings into the target
    fixed = with_schema(spec, SCHEMA)
    backfill(spec, instance, [today], backfill_id="fix", schema_spec=fixed)
    target, quarantine = mqtt_exactly_once(fixed, published)
    assert quarantine.height == 20 and not quarantine["_error"].str.contains("temperature <= 20").any()
    assert target.height == 480


def test_assets_are_partitioned_by_ingestion_time_with_a_freshness_policy_when_configured():
    from datetime import timedelta

    from ingest_defs.assets.ingestion import target_key

    spec = kafka_spec(partitions=1, checks={"freshness_minutes": 5})
    defs = build_definitions({spec.name: spec})
    node = defs.resolve_asset_graph().get(target_key(spec))
    assert node.partitions_def.get_last_partition_key() == partition_key_at(spec)  # today is a valid partition
    assert node.backfill_policy == dg.BackfillPolicy.single_run()
    assert node.freshness_policy.fail_window.to_timedelta() == timedelta(minutes=5)
    plain = kafka_spec(partitions=1)
    assert build_definitions({plain.name: plain}).resolve_asset_graph().get(target_key(plain)).freshness_policy is None


def test_sensor_and_schedule_request_live_runs_of_the_current_partition_one_at_a_time(lake, instance):
    from datetime import UTC, datetime

    from dagster._core.storage.dagster_run import DagsterRun

    from ingest_defs.resources.brokers import resources_from_env

    spec = kafka_spec(partitions=1, trigger={"sensor": {"interval_seconds": 5}, "schedule": "*/5 * * * *"})
    defs = build_definitions({spec.name: spec})
    produce(spec, make_samples(spec, 10, seed=69).payloads)
    with dg.build_sensor_context(instance=instance, resources=resources_from_env()) as ctx:
        request = defs.resolve_sensor_def(f"{spec.name}_sensor")(ctx)
    assert isinstance(request, dg.RunRequest) and request.partition_key == partition_key_at(spec)
    assert request.run_config["ops"][op_name(spec)]["config"]["mode"] == "live"
    schedule = defs.resolve_schedule_def(f"{spec.name}_schedule")
    tick = datetime(2026, 3, 4, 5, 10, tzinfo=UTC)
    with dg.build_schedule_context(instance=instance, scheduled_execution_time=tick,
                                   repository_def=defs.get_repository_def()) as ctx:
        request = schedule.evaluate_tick(ctx).run_requests[0]
    assert request.partition_key == "2026-03-04"
    assert request.run_config["ops"][op_name(spec)]["config"] == {"trigger": "schedule", "mode": "live"}
    # while a run of the pipeline is in progress, neither asks for another one
    instance.add_run(DagsterRun(job_name=job_name(spec), run_id="f" * 36, status=dg.DagsterRunStatus.STARTED))
    with dg.build_schedule_context(instance=instance, scheduled_execution_time=tick,
                                   repository_def=defs.get_repository_def()) as ctx:
        assert not schedule.evaluate_tick(ctx).run_requests
    with dg.build_sensor_context(instance=instance, resources=resources_from_env()) as ctx:
        assert isinstance(defs.resolve_sensor_def(f"{spec.name}_sensor")(ctx), dg.SkipReason)


@pytest.mark.parametrize("retention", ["limits", "workqueue"])
def test_nats_backfill_after_a_schema_fix(lake, instance, retention):
    """Limits streams replay from the broker, work queues (acked = deleted) from the lake's `_raw`."""
    from ingest_tests.test_nats_pipeline import ensure_exists, nats_spec
    from ingest_tests.test_nats_pipeline import produce as nats_produce

    spec = nats_spec(retention, schema=STRICT_EVENTS)
    fixed = with_schema(spec, USER_ACTIVITY_SCHEMA)
    ensure_exists(spec)
    samples = make_samples(fixed, 700, bad_fraction=0.02, seed=70)
    produced = nats_produce(spec, samples)
    run_until_caught_up(spec, instance)
    before_t, before_q = tables(spec)
    assert before_q.filter(pl.col("_error").str.contains("event")).height > 50
    today = partition_key_at(spec)
    backfill(spec, instance, [today])  # same schema: the same rows
    after_t, after_q = tables(spec)
    assert after_t.equals(before_t) and after_q.equals(before_q)
    meta = replay_metadata(backfill(spec, instance, [today], backfill_id="fix", schema_spec=fixed), fixed)
    assert meta["batches_not_replayed"] == 0
    _, quarantine = assert_exactly_once(fixed, produced)
    assert sorted(quarantine["_raw"].to_list()) == sorted(p for i, p in enumerate(samples.payloads) if i in samples.bad)


def test_batches_committed_without_a_ledger_row_are_recorded_by_the_first_backfill(lake, instance):
    spec = kafka_spec(partitions=2, batch={"max_messages": 100})
    produced = produce(spec, make_samples(spec, 300, bad_fraction=0.05, seed=73).payloads)
    source = source_for(spec)
    runner = BatchRunner(spec, source, DeltaTableSink(spec.table_uri(), spec.name, "target"),
                         DeltaTableSink(spec.quarantine_uri(), spec.name, "quarantine"))  # no ledger
    try:
        assert len(runner.run()) == 3
    finally:
        source.close()
    assert ledger_frame(spec).is_empty()
    meta = replay_metadata(backfill(spec, instance, [partition_key_at(spec)]), spec)
    assert meta["batches_replaced"] == 3 and meta["batches_not_replayed"] == 0
    live = ledger_frame(spec).filter(pl.col("mode") == "live")
    assert live["batch_id"].n_unique() == 3 and live["count"].sum() == len(produced)
    assert_exactly_once(spec, produced)

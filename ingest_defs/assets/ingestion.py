"""One ingestion multi-asset per pipeline: the target table (and its quarantine table) in Dagster.

The asset body runs the batch lifecycle itself (write to Delta, then acknowledge): no IO manager touches
the tables. The broker topic/stream appears as an external asset upstream.

No `from __future__ import annotations` here: Dagster reads the asset's config annotation at runtime.
"""


import re
from collections import Counter
from datetime import timedelta
from typing import Any

import dagster as dg

from ingest_defs.config import PipelineSpec
from ingest_defs.decode import STANDARD_SCHEMA
from ingest_defs.ledger import Ledger
from ingest_defs.lifecycle import BatchContext, BatchResult, BatchRunner, GapError
from ingest_defs.partitions import partition_key_at, partitions_def
from ingest_defs.replay import Replayer, ReplayOutcome
from ingest_defs.security import redact
from ingest_defs.sink import DeltaTableSink, SinkError
from ingest_defs.sources.base import PartitionRange, SourceError
from ingest_defs.status import partition_lag
from ingest_defs.storage import StorageConfigError, StorageError
from ingest_defs.storage import redact as redact_storage

BROKER_GROUP = "brokers"
INGESTION_GROUP = "ingestion"


class PlannedRange(dg.Config):
    app_id: str
    partition: int
    start: int
    end: int


class IngestConfig(dg.Config):
    """Run config of an ingestion run. Empty `ranges`: the run plans from Delta itself."""

    ranges: list[PlannedRange] = []
    max_batches: int = 0  # 0: until caught up or the pipeline's batch.max_run_seconds is spent
    max_seconds: float | None = None
    trigger: str = "manual"
    # live | replay | auto. auto: a `dagster/backfill` run or a past partition is a replay (it re-ingests
    # that partition's batches from their stored ranges); otherwise live. Sensors, schedules and
    # `ingest run` say live explicitly, so a run planned just before midnight stays live.
    mode: str = "auto"


def others_waiting(context: dg.OpExecutionContext, job: str, asset: dg.AssetKey | None = None):
    """A check for a lingering run: is another run of the same job (or one materializing `asset`: a
    backfill) queued, i.e. waiting for this run's pool slot?"""
    def check() -> bool:
        queued = context.instance.get_runs(dg.RunsFilter(statuses=[dg.DagsterRunStatus.QUEUED]), limit=100)
        return any(r.run_id != context.run.run_id
                   and (r.job_name == job or (asset is not None and asset in (r.asset_selection or ())))
                   for r in queued)
    return check


def run_mode(config_mode: str, tags: dict[str, str], partition_keys: list[str], current_key: str) -> str:
    """live or replay, for a run of an ingestion job (see IngestConfig.mode)."""
    if config_mode in ("live", "replay"):
        return config_mode
    if config_mode != "auto":
        raise dg.Failure(description=f"unknown mode '{config_mode}': use live, replay or auto")
    if "dagster/backfill" in tags:
        return "replay"
    if partition_keys and (len(partition_keys) > 1 or partition_keys[0] != current_key):
        return "replay"
    return "live"


def op_name(spec: PipelineSpec) -> str:
    return f"ingest_{spec.name}"


def job_name(spec: PipelineSpec) -> str:
    return f"{spec.name}_job"


def pool_name(spec: PipelineSpec) -> str:
    return f"ingest_{spec.name}"


def _clean(part: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", part).strip("_") or "all"


def source_asset_key(spec: PipelineSpec) -> dg.AssetKey:
    src = spec.source
    if src.kafka:
        return dg.AssetKey(["kafka", _clean(src.kafka.topic)])
    if src.nats:
        return dg.AssetKey(["nats", _clean(src.nats.stream)])
    return dg.AssetKey(["mqtt", _clean(src.mqtt.topics[0])])


def target_key(spec: PipelineSpec) -> dg.AssetKey:
    return dg.AssetKey(spec.asset_key_path)


def quarantine_key(spec: PipelineSpec) -> dg.AssetKey:
    return dg.AssetKey(spec.quarantine_key_path)


def source_asset_spec(spec: PipelineSpec) -> dg.AssetSpec:
    src = spec.source
    what = (f"Kafka topic {src.kafka.topic}" if src.kafka else
            f"NATS JetStream stream {src.nats.stream} ({src.nats.subject})" if src.nats else
            f"MQTT topics {', '.join(src.mqtt.topics)}")
    return dg.AssetSpec(source_asset_key(spec), description=what, group_name=BROKER_GROUP, kinds={src.kind})


def freshness_policy(spec: PipelineSpec) -> Any:
    """`checks.freshness_minutes`: the target should have materialized within that window (warn at half).
    Dagster cannot go below one minute; sub-minute freshness shows as the `lag` metadata and check."""
    minutes = spec.checks.freshness_minutes
    if minutes is None:
        return None
    window = timedelta(minutes=minutes)
    return dg.FreshnessPolicy.time_window(fail_window=window, warn_window=window / 2 if minutes >= 2 else None)


def build_ingestion_asset(spec: PipelineSpec) -> dg.AssetsDefinition:
    kind = spec.source.kind
    tkey, qkey = target_key(spec), quarantine_key(spec)
    table_meta = {"pipeline": spec.name, "table_uri": dg.MetadataValue.path(spec.table_uri()),
                  "dagster/table_name": spec.table}
    columns = [dg.TableColumn(name, str(dtype)) for name, dtype in spec.payload_schema.items()]
    columns += [dg.TableColumn(name, str(dtype)) for name, dtype in STANDARD_SCHEMA.items()]

    @dg.multi_asset(
        name=op_name(spec),
        specs=[
            dg.AssetSpec(tkey, deps=[source_asset_key(spec)], group_name=INGESTION_GROUP, kinds={"delta", kind},
                         description=spec.description or f"{spec.name}: rows that passed validation",
                         metadata={**table_meta, "dagster/column_schema": dg.TableSchema(columns),
                                   "ledger_uri": dg.MetadataValue.path(spec.ledger_uri())},
                         freshness_policy=freshness_policy(spec)),
            dg.AssetSpec(qkey, deps=[source_asset_key(spec)], group_name=INGESTION_GROUP, kinds={"delta"},
                         skippable=True, description=f"{spec.name}: messages that failed decoding or validation",
                         metadata={"pipeline": spec.name, "table_uri": dg.MetadataValue.path(spec.quarantine_uri())}),
        ],
        check_specs=[
            dg.AssetCheckSpec("quarantine_share", asset=tkey,
                              description=f"share of messages quarantined ≤ {spec.checks.max_quarantine_share}"),
            dg.AssetCheckSpec("lag", asset=tkey,
                              description=f"messages left on the broker ≤ {spec.checks.max_lag_messages}"),
        ],
        required_resource_keys={kind},
        pool=pool_name(spec),
        op_tags={"ingest/pipeline": spec.name},
        partitions_def=partitions_def(spec),
        # A backfill of many partitions is one run (and `dagster asset materialize --partition-range` works).
        backfill_policy=dg.BackfillPolicy.single_run(),
    )
    def _ingest(context: dg.AssetExecutionContext, config: IngestConfig):
        keys = list(context.partition_keys) if context.has_partition_key or context.has_partition_key_range else []
        tags = dict(context.run.tags)
        mode = run_mode(config.mode, tags, keys, partition_key_at(spec))
        source = getattr(context.resources, kind).source_for(spec)
        target = DeltaTableSink.of(spec, "target")
        quarantine = DeltaTableSink.of(spec, "quarantine")
        ledger = Ledger.of(spec, partition_of=lambda when: partition_key_at(spec, when))
        if mode == "replay":
            generation = tags.get("dagster/backfill") or context.run.run_id
            ctx = BatchContext(run_id=context.run.run_id, trigger="backfill" if "dagster/backfill" in tags else config.trigger,
                               mode="replay", log=context.log.info)
            replayer = Replayer(spec, source, target, quarantine, ledger, ctx, generation)
            try:
                outcomes = replayer.replay(replayer.batches_for_partitions(keys or [partition_key_at(spec)]))
                lag = live_lag(source, target)
            except (SourceError, SinkError, StorageError, StorageConfigError) as exc:
                raise dg.Failure(description=redact_storage(redact(str(exc), getattr(source, "secrets", ())))) from None
            finally:
                source.close()
            for o in outcomes:
                if o.status == "not replayed":
                    context.log.warning(f"{spec.name}: {o.describe()}")
            yield from report_replay(spec, keys, generation, outcomes, lag)
            return
        runner = BatchRunner(
            spec, source, target, quarantine,
            BatchContext(run_id=context.run.run_id, trigger=config.trigger, mode="live", log=context.log.info,
                         partition_key=keys[0] if keys else None, log_warning=context.log.warning,
                         others_waiting=others_waiting(context, job_name(spec), tkey)),
            ledger=ledger,
        )
        requested = [PartitionRange(r.app_id, r.partition, r.start, r.end) for r in config.ranges] or None
        broker_loss: dict[str, Any] = {}
        try:
            # MQTT: the broker's own dropped-message counter, before and after (loss we cannot count ourselves)
            watch = source.loss_watch() if hasattr(source, "loss_watch") else None
            results = runner.run(requested, config.max_batches, config.max_seconds)
            if watch is not None:
                broker_loss, warning = watch.finish()
                if warning:
                    context.log.warning(warning)
        except (GapError, SourceError, SinkError, StorageError, StorageConfigError) as exc:
            raise dg.Failure(description=redact_storage(redact(str(exc), getattr(source, "secrets", ())))) from None
        except Exception as exc:
            # A client library's own error: shown as is, unless it echoes a secret.
            secrets = getattr(source, "secrets", ())
            text = f"{type(exc).__name__}: {exc}"
            if redact_storage(redact(text, secrets)) != text:
                raise dg.Failure(description=redact_storage(redact(text, secrets))) from None
            raise
        finally:
            source.close()
        yield from report(spec, results, broker_loss)

    return _ingest


def report(spec: PipelineSpec, results: list[BatchResult], extra: dict[str, Any] | None = None) -> Any:
    """Materializations and check results of one run (one or more batches)."""
    tkey, qkey = target_key(spec), quarantine_key(spec)
    messages = sum(r.messages for r in results)
    written = sum(r.rows_written for r in results)
    quarantined = sum(r.rows_quarantined for r in results)
    lag = results[-1].lag_after if results else 0
    versions = [r.target_version for r in results if r.target_version is not None]
    reasons: Counter[str] = Counter()
    for r in results:
        reasons.update(r.reasons)
    duration = sum(r.duration_s for r in results)
    metadata: dict[str, Any] = {
        "batches": len(results),
        "ranges": dg.MetadataValue.json(_merged_ranges(results)),
        "messages": messages,
        "rows_written": written,
        "rows_quarantined": quarantined,
        "bytes": sum(r.nbytes for r in results),
        "delta_version": versions[-1] if versions else None,
        "lag": lag,
        "duration_s": round(duration, 3),
        "messages_per_s": round(messages / duration, 1) if duration else 0.0,
        # commits lost to other writers (other shards, maintenance) and retried, and the time committing
        "commit_retries": sum(r.commit_retries for r in results),
        "commit_s": round(sum(r.stage_s.get("commit", 0.0) for r in results), 3),
        "batch_ids": dg.MetadataValue.json([r.batch_id for r in results]),
        "dagster/row_count": written,
    }
    gaps = [g.describe() for r in results for g in r.gaps]
    if gaps:
        metadata["gaps"] = dg.MetadataValue.json(gaps)
    skipped = [r.skipped for r in results if r.skipped]
    if skipped:
        metadata["skipped"] = dg.MetadataValue.json(skipped)
    counters: Counter[str] = Counter()
    for r in results:
        counters.update(r.counters)
    metadata.update({name: counters[name] for name in sorted({k for r in results for k in r.counters})})
    ended = Counter(r.ended_by for r in results if r.ended_by)
    if ended:  # sources whose batches stay open: what closed them (max_messages, idle, max_wait, ...)
        metadata["batches_ended_by"] = dg.MetadataValue.json(dict(ended))
    metadata.update(extra or {})
    yield dg.MaterializeResult(asset_key=tkey, metadata={k: v for k, v in metadata.items() if v is not None})
    if quarantined:
        qversions = [r.quarantine_version for r in results if r.quarantine_version is not None]
        yield dg.MaterializeResult(asset_key=qkey, metadata={
            "rows_quarantined": quarantined, "reasons": dg.MetadataValue.json(dict(reasons)),
            "delta_version": qversions[-1] if qversions else None, "dagster/row_count": quarantined})
    last = results[-1] if results else None
    share = (last.rows_quarantined / last.messages) if last and last.messages else 0.0
    yield dg.AssetCheckResult(
        check_name="quarantine_share", asset_key=tkey, passed=share <= spec.checks.max_quarantine_share,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={"share": round(share, 6), "quarantined": last.rows_quarantined if last else 0,
                  "messages": last.messages if last else 0})
    yield dg.AssetCheckResult(
        check_name="lag", asset_key=tkey, passed=lag <= spec.checks.max_lag_messages,
        severity=dg.AssetCheckSeverity.WARN, metadata={"lag": lag, "max_lag_messages": spec.checks.max_lag_messages})


def live_lag(source: Any, target: DeltaTableSink) -> int | None:
    """Messages the broker holds beyond the live position (None where the broker cannot say: MQTT)."""
    parts = source.state()
    if any(p.last is None and p.first is None for p in parts) and source.kind == "mqtt":
        return None
    versions = target.versions([p.app_id for p in parts])
    return sum(partition_lag(p.first, p.last, versions.get(p.app_id)) for p in parts)  # as `ingest status` counts it


def report_replay(spec: PipelineSpec, keys: list[str], generation: str, outcomes: list[ReplayOutcome],
                  lag: int | None) -> Any:
    """Materializations and checks of a replay (backfill) run."""
    tkey, qkey = target_key(spec), quarantine_key(spec)
    done = [o for o in outcomes if o.status == "replaced"]
    missed = [o for o in outcomes if o.status == "not replayed"]
    written = sum(o.rows_written for o in done)
    quarantined = sum(o.rows_quarantined for o in done)
    messages = sum(o.messages for o in done)
    versions = [o.target_version for o in done if o.target_version is not None]
    metadata: dict[str, Any] = {
        "mode": "replay",
        "partitions": dg.MetadataValue.json(keys),
        "generation": generation,
        "batches": len(outcomes),
        "batches_replaced": len(done),
        "batches_not_replayed": len(missed),
        "ranges": dg.MetadataValue.json([{**r.as_dict(), "batch_id": o.batch_id} for o in done for r in o.ranges]),
        "messages": messages,
        "rows_written": written,
        "rows_quarantined": quarantined,
        "delta_version": versions[-1] if versions else None,
        "lag": lag,  # of the live path, measured after the replay
        "dagster/row_count": written,
    }
    if missed:
        metadata["not_replayed"] = dg.MetadataValue.json([{"batch_id": o.batch_id, "reason": o.reason} for o in missed])
    yield dg.MaterializeResult(asset_key=tkey, metadata={k: v for k, v in metadata.items() if v is not None})
    qversions = [o.quarantine_version for o in done if o.quarantine_version is not None]
    if done:
        reasons: Counter[str] = Counter()
        for o in done:
            reasons.update(o.reasons)
        yield dg.MaterializeResult(asset_key=qkey, metadata={
            "mode": "replay", "rows_quarantined": quarantined, "reasons": dg.MetadataValue.json(dict(reasons)),
            "delta_version": qversions[-1] if qversions else None, "dagster/row_count": quarantined})
    share = quarantined / messages if messages else 0.0
    yield dg.AssetCheckResult(
        check_name="quarantine_share", asset_key=tkey, passed=share <= spec.checks.max_quarantine_share,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={"share": round(share, 6), "quarantined": quarantined, "messages": messages, "mode": "replay"})
    yield dg.AssetCheckResult(
        check_name="lag", asset_key=tkey, passed=lag is None or lag <= spec.checks.max_lag_messages,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={"lag": lag if lag is not None else "unknown (MQTT: measured by live runs)",
                  "max_lag_messages": spec.checks.max_lag_messages})


def _merged_ranges(results: list[BatchResult]) -> list[dict[str, Any]]:
    merged: dict[str, dict[str, Any]] = {}
    for r in results:
        for c in r.covered:
            if not c.count:
                continue
            m = merged.setdefault(c.app_id, {"app_id": c.app_id, "partition": c.partition, "start": c.start, "end": c.end})
            m["start"], m["end"] = min(m["start"], c.start), max(m["end"], c.end)
    return list(merged.values())

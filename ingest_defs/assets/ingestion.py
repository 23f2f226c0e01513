"""One ingestion multi-asset per pipeline: the target table (and its quarantine table) in Dagster.

The asset body runs the batch lifecycle itself (write to Delta, then acknowledge): no IO manager touches
the tables. The broker topic/stream appears as an external asset upstream.

No `from __future__ import annotations` here: Dagster reads the asset's config annotation at runtime.
"""


import re
from collections import Counter
from typing import Any

import dagster as dg

from ingest_defs.config import PipelineSpec
from ingest_defs.decode import STANDARD_SCHEMA
from ingest_defs.lifecycle import BatchContext, BatchResult, BatchRunner, GapError
from ingest_defs.security import redact
from ingest_defs.sink import DeltaTableSink, SinkError
from ingest_defs.sources.base import PartitionRange, SourceError
from ingest_defs.validation import FrameValidationError

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
    mode: str = "live"


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
                         metadata={**table_meta, "dagster/column_schema": dg.TableSchema(columns)}),
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
    )
    def _ingest(context: dg.AssetExecutionContext, config: IngestConfig):
        source = getattr(context.resources, kind).source_for(spec)
        runner = BatchRunner(
            spec, source,
            DeltaTableSink(spec.table_uri(), spec.name, "target"),
            DeltaTableSink(spec.quarantine_uri(), spec.name, "quarantine"),
            BatchContext(run_id=context.run.run_id, trigger=config.trigger, mode=config.mode, log=context.log.info),
        )
        requested = [PartitionRange(r.app_id, r.partition, r.start, r.end) for r in config.ranges] or None
        try:
            results = runner.run(requested, config.max_batches, config.max_seconds)
        except (GapError, SourceError, SinkError, FrameValidationError) as exc:
            raise dg.Failure(description=redact(str(exc), getattr(source, "secrets", ()))) from None
        except Exception as exc:
            # A client library's own error: shown as is, unless it echoes a secret.
            secrets = getattr(source, "secrets", ())
            text = f"{type(exc).__name__}: {exc}"
            if redact(text, secrets) != text:
                raise dg.Failure(description=redact(text, secrets)) from None
            raise
        finally:
            source.close()
        yield from report(spec, results)

    return _ingest


def report(spec: PipelineSpec, results: list[BatchResult]) -> Any:
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
        "batch_ids": dg.MetadataValue.json([r.batch_id for r in results]),
        "dagster/row_count": written,
    }
    gaps = [g.describe() for r in results for g in r.gaps]
    if gaps:
        metadata["gaps"] = dg.MetadataValue.json(gaps)
    skipped = [r.skipped for r in results if r.skipped]
    if skipped:
        metadata["skipped"] = dg.MetadataValue.json(skipped)
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


def _merged_ranges(results: list[BatchResult]) -> list[dict[str, Any]]:
    merged: dict[str, dict[str, Any]] = {}
    for r in results:
        for c in r.covered:
            if not c.count:
                continue
            m = merged.setdefault(c.app_id, {"app_id": c.app_id, "partition": c.partition, "start": c.start, "end": c.end})
            m["start"], m["end"] = min(m["start"], c.start), max(m["end"], c.end)
    return list(merged.values())

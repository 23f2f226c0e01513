"""The live path of a sharded Kafka pipeline in Dagster: one job per shard, each one op in its own pool.

Dagster claims concurrency pools per op, and an op's pool is fixed when the definitions load, so a shard
gets its own op: job `<pipeline>_shard_<i>_job`, op `ingest_<pipeline>_shard_<i>`, pool
`ingest_<pipeline>_shard_<i>` (limit 1 per run in dagster.yaml). Different shards run at once; one shard
runs one run at a time. The op runs the same batch lifecycle as the pipeline's asset, on the pipeline's
source restricted to the shard's partitions, and records its work as materializations of the pipeline's
target (and quarantine) asset, with the shard, its partitions, its lag and every shard's lag in the
metadata — so the asset's page shows which run served which shard.

The pipeline's multi-asset stays what backfills and replays run (across all shards) and what the UI's
Materialize button runs (one live run over every partition, safe beside the shard runs because every
commit is fenced per partition).

No `from __future__ import annotations` here: Dagster reads the op's config annotation at runtime.
"""


from typing import Any

import dagster as dg

from ingest_defs import faults
from ingest_defs.assets.ingestion import IngestConfig, others_waiting, quarantine_key, report, target_key
from ingest_defs.config import PipelineSpec
from ingest_defs.ledger import Ledger
from ingest_defs.lifecycle import BatchContext, BatchRunner, GapError
from ingest_defs.partitions import partition_key_at
from ingest_defs.security import redact
from ingest_defs.shards import (
    Shard,
    shard_job_name,
    shard_of_app_id,
    shard_op_name,
    shard_pool_name,
    shards_of,
)
from ingest_defs.sink import DeltaTableSink, SinkError
from ingest_defs.sources.base import PartitionRange, SourceError
from ingest_defs.storage import StorageConfigError, StorageError
from ingest_defs.storage import redact as redact_storage


def shard_tags(spec: PipelineSpec, shard: Shard) -> dict[str, str]:
    return {"ingest/pipeline": spec.name, "ingest/shard": shard.label}


def lag_by_shard(spec: PipelineSpec, source: Any, target: DeltaTableSink) -> dict[str, int]:
    """Messages left on the broker per shard (`"i"` → lag), from one look at every partition."""
    parts = source.state()
    versions = target.versions([p.app_id for p in parts])
    lags = {str(i): 0 for i in range(spec.shards)}
    for p in parts:
        if p.last is None:
            continue
        v = versions.get(p.app_id)
        shard = shard_of_app_id(p.app_id, spec.shards)
        lags[str(shard)] += max(0, p.last - ((p.first - 1) if v is None else v))
    return lags


def build_shard_job(spec: PipelineSpec, shard: Shard) -> dg.JobDefinition:
    tkey, qkey = target_key(spec), quarantine_key(spec)

    @dg.op(
        name=shard_op_name(spec, shard.index),
        pool=shard_pool_name(spec, shard.index),
        out={},
        required_resource_keys={"kafka"},
        tags=shard_tags(spec, shard),
        description=f"Live micro-batches of {spec.name}, shard {shard.label}: partitions p with "
                    f"p % {shard.count} == {shard.index}",
    )
    def ingest_shard(context: dg.OpExecutionContext, config: IngestConfig):
        faults.set_shard(shard.index)
        kafka = context.resources.kafka
        source = kafka.source_for(spec, shard)
        target = DeltaTableSink.of(spec, "target")
        quarantine = DeltaTableSink.of(spec, "quarantine")
        ledger = Ledger.of(spec, partition_of=lambda when: partition_key_at(spec, when))
        runner = BatchRunner(spec, source, target, quarantine,
                             BatchContext(run_id=context.run.run_id, trigger=config.trigger, mode="live",
                                          log=context.log.info, log_warning=context.log.warning,
                                          shard=shard.label,
                                          others_waiting=others_waiting(context, shard_job_name(spec, shard.index))),
                             ledger=ledger)
        requested = [PartitionRange(r.app_id, r.partition, r.start, r.end) for r in config.ranges] or None
        everything = kafka.source_for(spec)  # all partitions: every shard's lag, for the metadata
        try:
            results = runner.run(requested, config.max_batches, config.max_seconds)
            lags = lag_by_shard(spec, everything, target)
            owned = shard.partitions(p.partition for p in everything.state())
        except (GapError, SourceError, SinkError, StorageError, StorageConfigError) as exc:
            raise dg.Failure(description=redact_storage(redact(str(exc), getattr(source, "secrets", ())))) from None
        finally:
            source.close()
            everything.close()
        partition = partition_key_at(spec)
        extra = {"shard": shard.label, "shard_partitions": dg.MetadataValue.json(owned),
                 "lag_by_shard": dg.MetadataValue.json(lags)}
        for event in report(spec, results):
            if isinstance(event, dg.MaterializeResult):
                assert event.asset_key is not None
                yield dg.AssetMaterialization(asset_key=event.asset_key, partition=partition,
                                              metadata={**(event.metadata or {}), **extra})
            elif isinstance(event, dg.AssetCheckResult):
                assert event.asset_key is not None and event.check_name is not None
                context.log_event(dg.AssetCheckEvaluation(
                    asset_key=event.asset_key, check_name=event.check_name, passed=event.passed,
                    severity=event.severity, metadata={**(event.metadata or {}), "shard": shard.label}))

    @dg.job(name=shard_job_name(spec, shard.index), executor_def=dg.in_process_executor,
            tags=shard_tags(spec, shard),
            description=f"Bounded micro-batches of pipeline {spec.name}, shard {shard.label} "
                        f"(writes {'/'.join(tkey.path)} and {'/'.join(qkey.path)})")
    def shard_job() -> None:
        ingest_shard()

    return shard_job


def build_shard_jobs(spec: PipelineSpec) -> list[dg.JobDefinition]:
    return [build_shard_job(spec, shard) for shard in shards_of(spec)]

"""One sensor per pipeline: plan from Delta and the broker, request one run per planned range.

The cursor is bookkeeping only (the plan generation per start); the Delta log is the truth. `run_key`
de-duplication also skips failed runs, so a failed or canceled range is re-planned under a new generation.
"""

from __future__ import annotations

import json

import dagster as dg

from ingest_defs.assets.ingestion import job_name, op_name
from ingest_defs.config import PipelineSpec
from ingest_defs.lifecycle import BatchRunner
from ingest_defs.partitions import partition_key_at
from ingest_defs.shards import Shard, shard_job_name, shard_op_name
from ingest_defs.sink import DeltaTableSink

IN_PROGRESS = [dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.NOT_STARTED, dg.DagsterRunStatus.STARTING,
               dg.DagsterRunStatus.STARTED]
RETRYABLE = (dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED)


def plan_run_request(context: dg.SensorEvaluationContext, spec: PipelineSpec, source, trigger: str,
                     shard: Shard | None = None):
    """A RunRequest for the next range of `spec` (or of one shard of it: `source` is then restricted to the
    shard's partitions), or a SkipReason. Shared by sensors and schedules."""
    job = job_name(spec) if shard is None else shard_job_name(spec, shard.index)
    active = context.instance.get_runs(
        filters=dg.RunsFilter(job_name=job, statuses=IN_PROGRESS), limit=1)
    who = spec.name if shard is None else f"{spec.name} shard {shard.label}"
    if active:
        return dg.SkipReason(f"{who}: run {active[0].run_id} is still in progress")
    if not getattr(source, "probe", True):  # never sharded: MQTT
        # Looking would take delivery of what waits (MQTT QoS 0 from a broker that does not upgrade it) and
        # a sensor cannot keep it: ask for a run, which plans and reads itself (and registers a new session).
        source.close()
        return dg.RunRequest(
            partition_key=partition_key_at(spec),
            run_config={"ops": {op_name(spec): {"config": {"trigger": trigger, "mode": "live"}}}},
            tags={"ingest/pipeline": spec.name, "ingest/trigger": trigger})
    try:
        runner = BatchRunner(spec, source, DeltaTableSink.of(spec, "target"),
                             DeltaTableSink.of(spec, "quarantine"))
        plan = runner.plan()
    finally:
        source.close()
    if plan.empty:
        return dg.SkipReason(f"{who}: no lag")
    start_sig = ",".join(f"{r.partition}:{r.start}" for r in plan.ranges)
    cursor = json.loads(context.cursor) if context.cursor else {}
    # one cursor entry per shard (the plan generation per start); an unsharded pipeline keeps the flat one
    scope = cursor if shard is None else cursor.get(f"shard_{shard.index}", {})
    generation = int(scope.get(start_sig, 0))
    prefix = spec.name if shard is None else f"{spec.name}:s{shard.index}"
    run_key = f"{prefix}:{start_sig}:{generation}"
    previous = context.instance.get_runs(filters=dg.RunsFilter(tags={"dagster/run_key": run_key}), limit=1)
    # Unbounded plans (MQTT, work queues) start where the last run ended even when it found nothing:
    # a finished run must not block the next request for the same start.
    if previous and (previous[0].status in RETRYABLE or not plan.bounded):
        generation += 1
        run_key = f"{prefix}:{start_sig}:{generation}"
    if shard is None:
        context.update_cursor(json.dumps({start_sig: generation}))
    else:
        context.update_cursor(json.dumps({**cursor, f"shard_{shard.index}": {start_sig: generation}}))
    ranges = [r.as_dict() for r in plan.ranges]
    config = {"ranges": ranges, "trigger": trigger, "mode": "live"}
    tags = {"ingest/pipeline": spec.name, "ingest/trigger": trigger, "ingest/plan": start_sig,
            "ingest/plan_generation": str(generation), "ingest/planned_messages": str(plan.total)}
    if shard is not None:  # a shard job is a plain op job: not partitioned, named in the request
        return dg.RunRequest(run_key=run_key, job_name=job,
                             run_config={"ops": {shard_op_name(spec, shard.index): {"config": config}}},
                             tags={**tags, "ingest/shard": shard.label})
    return dg.RunRequest(
        run_key=run_key,
        # live runs target the current ingestion-time partition; mode says live explicitly so a run that
        # starts after midnight is not taken for a replay of yesterday
        partition_key=partition_key_at(spec),
        run_config={"ops": {op_name(spec): {"config": config}}},
        tags=tags,
    )


def build_ingestion_sensor(spec: PipelineSpec, job: dg.UnresolvedAssetJobDefinition) -> dg.SensorDefinition:
    trigger = spec.trigger.sensor
    assert trigger is not None
    kind = spec.source.kind

    @dg.sensor(
        name=f"{spec.name}_sensor",
        job=job,
        minimum_interval_seconds=trigger.interval_seconds,
        default_status=dg.DefaultSensorStatus.RUNNING if trigger.enabled else dg.DefaultSensorStatus.STOPPED,
        required_resource_keys={kind},
        description=f"Requests a bounded micro-batch of {spec.name} when the broker has messages beyond Delta.",
    )
    def _sensor(context: dg.SensorEvaluationContext, **resources):
        # Direct invocation passes required resources as keywords; the daemon (evaluate_tick) passes only
        # resources named as parameters, so there the broker comes from the context.
        broker = resources.get(kind) or getattr(context.resources, kind)
        source = broker.source_for(spec)
        return plan_run_request(context, spec, source, "sensor")

    return _sensor


def build_ingestion_schedule(spec: PipelineSpec, job: dg.UnresolvedAssetJobDefinition) -> dg.ScheduleDefinition:
    """Scheduled micro-batches: each tick asks for one live run of the current partition (the run plans from
    Delta itself). A tick while a run of the pipeline is in progress is skipped; the pool serialises the rest."""
    assert spec.trigger.schedule is not None

    @dg.schedule(
        name=f"{spec.name}_schedule",
        job=job,
        cron_schedule=spec.trigger.schedule,
        default_status=dg.DefaultScheduleStatus.RUNNING,
        execution_timezone="UTC",
        description=f"Scheduled bounded micro-batches of {spec.name} ({spec.trigger.schedule}, UTC).",
    )
    def _schedule(context: dg.ScheduleEvaluationContext):
        active = context.instance.get_runs(
            filters=dg.RunsFilter(job_name=job_name(spec), statuses=IN_PROGRESS), limit=1)
        if active:
            return dg.SkipReason(f"{spec.name}: run {active[0].run_id} is still in progress")
        when = context.scheduled_execution_time
        return dg.RunRequest(
            partition_key=partition_key_at(spec, when),
            run_config={"ops": {op_name(spec): {"config": {"trigger": "schedule", "mode": "live"}}}},
            tags={"ingest/pipeline": spec.name, "ingest/trigger": "schedule"},
        )

    return _schedule

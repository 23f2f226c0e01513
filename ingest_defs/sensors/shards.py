"""The sensor (and schedule) of a sharded Kafka pipeline: each tick plans every shard on its own and asks
for one run per shard that has lag and no run in progress, targeting that shard's job.

A shard's plan covers only its partitions (`p % N == i`, new partitions included), so the requests of
one tick never overlap; run keys carry the shard (`<pipeline>:s<i>:<starts>:<generation>`).
"""

from __future__ import annotations

import dagster as dg

from ingest_defs.config import PipelineSpec
from ingest_defs.sensors.ingestion import IN_PROGRESS, plan_run_request
from ingest_defs.shards import shard_job_name, shard_op_name, shards_of


def shard_requests(context: dg.SensorEvaluationContext, spec: PipelineSpec, broker, trigger: str):
    """One RunRequest per shard with lag and no run in progress, or one SkipReason saying why none."""
    requests, skipped = [], []
    for shard in shards_of(spec):
        outcome = plan_run_request(context, spec, broker.source_for(spec, shard), trigger, shard)
        if isinstance(outcome, dg.RunRequest):
            requests.append(outcome)
        else:
            skipped.append(outcome.skip_message or "")
    return requests or dg.SkipReason("; ".join(skipped))


def build_shard_sensor(spec: PipelineSpec, jobs: list[dg.JobDefinition]) -> dg.SensorDefinition:
    trigger = spec.trigger.sensor
    assert trigger is not None

    @dg.sensor(
        name=f"{spec.name}_sensor",
        jobs=jobs,
        minimum_interval_seconds=trigger.interval_seconds,
        default_status=dg.DefaultSensorStatus.RUNNING if trigger.enabled else dg.DefaultSensorStatus.STOPPED,
        required_resource_keys={"kafka"},
        description=f"Requests one bounded micro-batch run per shard of {spec.name} ({spec.shards} shards) "
                    "whose partitions have messages beyond Delta.",
    )
    def _sensor(context: dg.SensorEvaluationContext, **resources):
        broker = resources.get("kafka") or context.resources.kafka
        return shard_requests(context, spec, broker, "sensor")

    return _sensor


def build_shard_schedule(spec: PipelineSpec, jobs: list[dg.JobDefinition]) -> dg.ScheduleDefinition:
    """Each tick asks for one live run per shard without a run in progress (the run plans itself)."""
    assert spec.trigger.schedule is not None

    @dg.schedule(
        name=f"{spec.name}_schedule",
        jobs=jobs,
        cron_schedule=spec.trigger.schedule,
        default_status=dg.DefaultScheduleStatus.RUNNING,
        execution_timezone="UTC",
        description=f"Scheduled bounded micro-batches of {spec.name}, one run per shard ({spec.trigger.schedule}, UTC).",
    )
    def _schedule(context: dg.ScheduleEvaluationContext):
        requests = []
        for shard in shards_of(spec):
            job = shard_job_name(spec, shard.index)
            if context.instance.get_runs(filters=dg.RunsFilter(job_name=job, statuses=IN_PROGRESS), limit=1):
                continue
            requests.append(dg.RunRequest(
                job_name=job, run_config={"ops": {shard_op_name(spec, shard.index): {"config": {"trigger": "schedule"}}}},
                tags={"ingest/pipeline": spec.name, "ingest/trigger": "schedule", "ingest/shard": shard.label}))
        return requests or dg.SkipReason(f"{spec.name}: every shard has a run in progress")

    return _schedule

"""The one place that turns pipeline specs into Dagster definitions (assets, jobs, sensors, schedules).

`definitions.py` calls it for the code location; the CLI and tests call it for one pipeline without
loading the whole code location (and its dbt project).
"""

from __future__ import annotations

import dagster as dg

from ingest_defs.assets.ingestion import (
    build_ingestion_asset,
    job_name,
    quarantine_key,
    source_asset_spec,
    target_key,
)
from ingest_defs.config import PipelineSpec
from ingest_defs.jobs.maintenance import build_maintenance_job, build_maintenance_schedule
from ingest_defs.jobs.shards import build_shard_jobs
from ingest_defs.resources.brokers import resources_from_env
from ingest_defs.sensors.ingestion import build_ingestion_schedule, build_ingestion_sensor
from ingest_defs.sensors.shards import build_shard_schedule, build_shard_sensor


def build_definitions(specs: dict[str, PipelineSpec]) -> dg.Definitions:
    assets: list = []
    jobs, sensors, schedules = [], [], []
    seen_sources: set[dg.AssetKey] = set()
    for spec in specs.values():
        source_spec = source_asset_spec(spec)
        if source_spec.key not in seen_sources:
            seen_sources.add(source_spec.key)
            assets.append(source_spec)
        assets.append(build_ingestion_asset(spec))
        job = dg.define_asset_job(
            name=job_name(spec),
            selection=dg.AssetSelection.assets(target_key(spec), quarantine_key(spec)),
            executor_def=dg.in_process_executor,
            tags={"ingest/pipeline": spec.name},
            description=f"Bounded micro-batches of pipeline {spec.name}",
        )
        jobs.append(job)
        if spec.shards > 1:  # the live path runs per shard: one job (and pool) each; the asset job stays for backfills
            shard_jobs = build_shard_jobs(spec)
            jobs.extend(shard_jobs)
            if spec.trigger.sensor is not None:
                sensors.append(build_shard_sensor(spec, shard_jobs))
            if spec.trigger.schedule:
                schedules.append(build_shard_schedule(spec, shard_jobs))
        else:
            if spec.trigger.sensor is not None:
                sensors.append(build_ingestion_sensor(spec, job))
            if spec.trigger.schedule:
                schedules.append(build_ingestion_schedule(spec, job))
        if spec.maintenance.enabled:
            maintenance = build_maintenance_job(spec)
            jobs.append(maintenance)
            schedules.append(build_maintenance_schedule(spec, maintenance))
    return dg.Definitions(assets=assets, jobs=jobs, sensors=sensors, schedules=schedules,
                          resources=resources_from_env())


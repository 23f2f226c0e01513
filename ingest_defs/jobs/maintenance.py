"""Per-pipeline table maintenance as a Dagster job (one op per table: target, quarantine, batch ledger) on
the pipeline's cron schedule.

Each op records an AssetObservation on its table's asset, so files and bytes before and after show in
the asset's page next to the ingestion materializations. The job takes no pool: it runs beside live
batches (see `ingest_defs.maintenance` for why that is safe).
"""


import dagster as dg

from ingest_defs.assets.ingestion import quarantine_key, target_key
from ingest_defs.config import PipelineSpec
from ingest_defs.maintenance import maintain_table
from ingest_defs.storage import table_location


def maintenance_job_name(spec: PipelineSpec) -> str:
    return f"{spec.name}_maintenance"


def _maintenance_op(spec: PipelineSpec, role: str, uri: str, asset_key: dg.AssetKey | None) -> dg.OpDefinition:
    @dg.op(name=f"{spec.name}_maintain_{role}", description=f"Compact, checkpoint, clean the log and vacuum {uri}",
           tags={"ingest/table": role})
    def maintain(context: dg.OpExecutionContext) -> None:
        report = maintain_table(table_location(spec, role), spec.maintenance)  # options resolved in the run
        metadata = report.metadata()
        context.log.info(f"{spec.name} {role}: " + ", ".join(f"{k}={v}" for k, v in metadata.items()))
        if (warning := report.log_warning(spec.name, spec.maintenance)) is not None:
            context.log.warning(warning)
        if report.before is not None and asset_key is not None:  # the ledger is not an asset: logs only
            context.log_event(dg.AssetObservation(asset_key=asset_key, metadata={
                **metadata, "table": dg.MetadataValue.path(uri), "operation": "maintenance"}))

    return maintain


def build_maintenance_job(spec: PipelineSpec) -> dg.JobDefinition:
    tables = {"target": (spec.table_uri(), target_key(spec)),
              "quarantine": (spec.quarantine_uri(), quarantine_key(spec)),
              "ledger": (spec.ledger_uri(), None)}
    ops = [_maintenance_op(spec, role, uri, key) for role, (uri, key) in tables.items()]

    @dg.job(name=maintenance_job_name(spec), executor_def=dg.in_process_executor,
            tags={"ingest/maintenance": spec.name},
            description=f"Table maintenance of pipeline {spec.name} (target, quarantine and ledger tables)")
    def maintenance() -> None:
        for op in ops:
            op()

    return maintenance


def build_maintenance_schedule(spec: PipelineSpec, job: dg.JobDefinition) -> dg.ScheduleDefinition:
    return dg.ScheduleDefinition(
        name=f"{spec.name}_maintenance_schedule",
        job=job,
        cron_schedule=spec.maintenance.schedule,
        execution_timezone="UTC",
        default_status=dg.DefaultScheduleStatus.RUNNING,
        description=f"Table maintenance of {spec.name} (`maintenance.schedule` in the pipelines file)",
    )

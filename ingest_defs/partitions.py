"""Ingestion-time partitions (UTC): the partition a batch belongs to is the one of the time it was planned.

Daily by default, hourly per pipeline (`partitions.granularity`). `end_offset=1` makes the current day
(hour) a valid partition: live runs target it, backfills target past ones.
"""

from __future__ import annotations

from datetime import UTC, datetime

from ingest_defs.config import PipelineSpec

KEY_FORMATS = {"daily": "%Y-%m-%d", "hourly": "%Y-%m-%d-%H:%M"}


def partition_key_at(spec: PipelineSpec, when: datetime | None = None) -> str:
    """The partition key holding `when` (default: now), in Dagster's key format."""
    when = (when or datetime.now(UTC)).astimezone(UTC)
    if spec.partitions.granularity == "hourly":
        when = when.replace(minute=0, second=0, microsecond=0)
    return when.strftime(KEY_FORMATS[spec.partitions.granularity])


def partitions_def(spec: PipelineSpec):  # -> dg.TimeWindowPartitionsDefinition
    import dagster as dg

    start = spec.partitions.start
    if spec.partitions.granularity == "hourly":
        return dg.HourlyPartitionsDefinition(start_date=start if "-" in start[8:] else f"{start}-00:00",
                                             end_offset=1, timezone="UTC")
    return dg.DailyPartitionsDefinition(start_date=start[:10], end_offset=1, timezone="UTC")

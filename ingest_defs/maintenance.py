"""Table maintenance: compaction, checkpoint, expired-log cleanup and vacuum of one Delta table.

Safe beside live batches: compaction rewrites files without changing data (a concurrent append commits
on top of it; both land), and vacuum only deletes files that are no longer referenced *and* older than
the time-travel period (at least an hour), so the files of a batch still being committed are never touched
(that includes files no commit references, which a writer killed mid-commit leaves behind).
Transaction versions (the pipelines' offsets) survive log cleanup because checkpoints carry them.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from deltalake import CommitProperties, DeltaTable, PostCommitHookProperties
from deltalake.exceptions import CommitFailedError

from ingest_defs.config import MaintenanceSpec
from ingest_defs.storage import Location, location

LOG_RETENTION_PROP = "delta.logRetentionDuration"
FILE_RETENTION_PROP = "delta.deletedFileRetentionDuration"
CHECKPOINT_INTERVAL_PROP = "delta.checkpointInterval"
COMMIT_RETRIES = 5
# On local disk every open, refresh and commit of delta-rs lists the whole `_delta_log` directory (upstream:
# delta-kernel-rs#2335), so its cost follows the retained commits, not the table. Measured on this project's
# machine with delta-rs's log cleanup after every commit: an append takes 5 ms with 10 entries, 94 ms with
# 5,000, 350 ms with 20,000 and ~1 s with 60,000 (a week of 10 s micro-batches). Batch commits run that cleanup
# on one commit in ten (commit_hooks); without it an append takes 30 ms at 5,500. Above this many entries
# maintenance warns.
LOG_ENTRIES_WARNING = 5_000
LOG_CLEANUP_EVERY = 10  # batch commits clean up expired log entries on one commit in this many (commit_hooks)


@dataclass
class TableStats:
    version: int
    files: int
    bytes: int


@dataclass
class MaintenanceReport:
    uri: str
    before: TableStats | None  # None: the table does not exist yet
    after: TableStats | None = None
    files_compacted: int = 0
    files_written: int = 0
    vacuumed_files: int = 0
    checkpoint_version: int | None = None
    log_entries: int | None = None  # entries in `_delta_log` after cleanup (local disk only)
    retries: int = 0
    seconds: dict[str, float] = field(default_factory=dict)

    def log_warning(self, pipeline: str, settings: MaintenanceSpec) -> str | None:
        """Why commits to this table get slower, and what to change, when its log is long (local disk)."""
        if self.log_entries is None or self.log_entries <= LOG_ENTRIES_WARNING:
            return None
        return (f"pipeline '{pipeline}': {self.uri} keeps {self.log_entries:,} entries in _delta_log after log "
                f"cleanup (maintenance.time_travel_hours={settings.time_travel_hours}). On local disk delta-rs "
                "lists that whole directory on every open and commit, so each batch's commits slow down with it "
                "(measured: ~30 ms per append at 5,500 entries, more than 0.1 s per open and commit at 60,000). "
                "Lower `maintenance.time_travel_hours`, "
                "or make fewer commits (a larger `batch.max_wait_seconds` for lingering runs), or put the lake "
                "on object storage, whose listing starts after the checkpoint.")

    def metadata(self) -> dict[str, Any]:
        """Flat values for Dagster metadata and logs."""
        if self.before is None:
            return {"table": self.uri, "skipped": "the table does not exist yet"}
        after = self.after or self.before
        return {
            "table": self.uri,
            "files_before": self.before.files,
            "files_after": after.files,
            "bytes_before": self.before.bytes,
            "bytes_after": after.bytes,
            "files_compacted": self.files_compacted,
            "files_written": self.files_written,
            "vacuumed_files": self.vacuumed_files,
            "checkpoint_version": self.checkpoint_version,
            "log_entries": self.log_entries,
            "version_after": after.version,
            "commit_retries": self.retries,
            **{f"seconds_{k}": round(v, 3) for k, v in self.seconds.items()},
        }


def table_stats(table: DeltaTable) -> TableStats:
    sizes = table.get_add_actions(flatten=True).column("size_bytes").to_pylist()
    return TableStats(version=table.version(), files=len(sizes), bytes=int(sum(sizes)))


def commit_hooks(next_version: int) -> PostCommitHookProperties:
    """delta-rs's hooks for a batch commit that will write `next_version`: checkpoints as configured, and the
    expired-log cleanup on one commit in LOG_CLEANUP_EVERY only. By default delta-rs cleans up after every
    commit, listing and stat-ing all of `_delta_log` each time (an empty append: 26 ms against 10 with 1,100
    entries, 103 against 30 with 5,500, measured here); one in ten keeps the log bounded whether or not the
    maintenance job runs, at a tenth of that cost."""
    return PostCommitHookProperties(cleanup_expired_logs=next_version % LOG_CLEANUP_EVERY == 0)


def table_properties(settings: MaintenanceSpec) -> dict[str, str]:
    """Time travel for `settings.time_travel_hours` (and no longer), and how often delta-rs checkpoints."""
    interval = f"interval {settings.time_travel_hours} hours"
    return {LOG_RETENTION_PROP: interval, FILE_RETENTION_PROP: interval,
            CHECKPOINT_INTERVAL_PROP: str(settings.checkpoint_interval)}


def maintain_table(uri: str | Location, settings: MaintenanceSpec, *,
                   vacuum_retention_hours: int | None = None) -> MaintenanceReport:
    """Compact small files, write a checkpoint, clean up expired log entries, vacuum; report before/after.

    `vacuum_retention_hours` overrides the time-travel period for vacuum only (tests and one-off cleanups
    with no writer running); the pipelines file cannot set it below an hour."""
    where = uri if isinstance(uri, Location) else location(uri)
    with where.failures("maintaining"):
        return _maintain(where, settings, vacuum_retention_hours)


def _maintain(where: Location, settings: MaintenanceSpec, vacuum_retention_hours: int | None) -> MaintenanceReport:
    uri = where.uri
    table = where.open()
    if table is None:
        return MaintenanceReport(uri, before=None)
    report = MaintenanceReport(uri, before=table_stats(table))
    commit = CommitProperties(custom_metadata={"ingest.operation": "maintenance"})

    started = time.monotonic()
    _set_properties(table, settings, report, commit)
    metrics = _with_retries(table, report, lambda: table.optimize.compact(
        target_size=settings.target_file_size_mb * 1024 * 1024, commit_properties=commit))
    report.files_compacted = int(metrics.get("numFilesRemoved", 0))
    report.files_written = int(metrics.get("numFilesAdded", 0))
    report.seconds["compact"] = time.monotonic() - started

    started = time.monotonic()
    table.update_incremental()
    table.create_checkpoint()
    report.checkpoint_version = table.version()
    table.cleanup_metadata()  # log entries older than delta.logRetentionDuration, up to the checkpoint
    report.log_entries = _log_entries(where)
    report.seconds["checkpoint_and_log_cleanup"] = time.monotonic() - started

    started = time.monotonic()
    retention = settings.time_travel_hours if vacuum_retention_hours is None else vacuum_retention_hours
    # full: also files no commit ever referenced (a writer killed between its data files and its log entry)
    removed = table.vacuum(retention_hours=retention, dry_run=False, enforce_retention_duration=False,
                           full=True, commit_properties=commit)
    report.vacuumed_files = len(removed)
    report.seconds["vacuum"] = time.monotonic() - started

    table.update_incremental()
    report.after = table_stats(table)
    return report


def _log_entries(where: Location) -> int | None:
    if where.remote:
        return None
    parts = urlsplit(where.uri)
    log = Path(unquote(parts.path) if parts.scheme == "file" else where.uri) / "_delta_log"
    return sum(1 for _ in os.scandir(log)) if log.is_dir() else None


def _set_properties(table: DeltaTable, settings: MaintenanceSpec, report: MaintenanceReport,
                   commit: CommitProperties) -> None:
    # A metadata change makes concurrent appends re-plan once, so only write it when it differs.
    wanted = table_properties(settings)
    current = table.metadata().configuration
    if all(current.get(k) == v for k, v in wanted.items()):
        return
    _with_retries(table, report, lambda: table.alter.set_table_properties(wanted, commit_properties=commit))


def _with_retries(table: DeltaTable, report: MaintenanceReport, operation: Any) -> Any:
    """Run a maintenance commit, re-reading the table when a concurrent writer (e.g. a replay) won."""
    for attempt in range(COMMIT_RETRIES):
        try:
            return operation()
        except CommitFailedError:
            if attempt == COMMIT_RETRIES - 1:
                raise
            report.retries += 1
            time.sleep(0.2 * (attempt + 1))
            table.update_incremental()
    raise AssertionError("unreachable")

"""How the `ingest` command shows things: tables that stay readable at 80 columns and in CI logs, `--json`
for scripts, one clear line for a failed run, and a progress line while a run drains a backlog."""

from __future__ import annotations

import base64
import json
import logging
import sys
import time
from datetime import date, datetime
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.measure import Measurement
from rich.progress import Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ingest_defs.status import PipelineStatus

NOT_A_TERMINAL_WIDTH = 10_000  # in CI logs a table is as wide as its cells: nothing wrapped or cut


def print_table(console: Console, table: Table, records: list[str] | None = None) -> None:
    """Print a table at its natural width when not on a terminal (CI logs: nothing wrapped or cut); on a
    terminal too narrow for it, print `records` instead (one short block per row) when given."""
    if console.is_terminal:
        if records is not None and _natural_width(console, table) > console.width:
            for line in records:
                console.print(line, soft_wrap=False, overflow="fold")
            return
        console.print(table)
        return
    wide = Console(file=console.file, width=NOT_A_TERMINAL_WIDTH, color_system=None, highlight=False)
    wide.print(table, width=max(_natural_width(wide, table), 40))


def _natural_width(console: Console, table: Table) -> int:
    wide = Console(width=NOT_A_TERMINAL_WIDTH, color_system=None)
    return Measurement.get(wide, wide.options, table).maximum


def name_column(table: Table, header: str, names: list[str]) -> None:
    """A column whose values are never truncated or folded (pipeline names)."""
    table.add_column(header, no_wrap=True, min_width=max([len(header), *map(len, names)]))


def status_table(statuses: list[PipelineStatus]) -> Table:
    table = Table(title=None, show_lines=False)
    name_column(table, "pipeline", [s.pipeline for s in statuses])
    table.add_column("source", no_wrap=True)
    table.add_column("lag", justify="right", no_wrap=True)
    table.add_column("last batch (UTC)", overflow="fold")
    table.add_column("quarantined", justify="right", no_wrap=True)
    table.add_column("broker end", overflow="fold")
    table.add_column("delta position", overflow="fold")
    for s in statuses:
        f = s.figures
        if f is None:
            table.add_row(s.pipeline, s.source, "-", "-", "-", "[red]unavailable[/]", "(see below)")
            continue
        ends = " ".join(f"{p.partition}:{_dash(p.broker_end)}" for p in f.partitions) or "-"
        positions = " ".join(f"{p.partition}:{_dash(p.position)}" for p in f.partitions) or "-"
        when = f.last_batch_at.strftime("%Y-%m-%d %H:%M:%S") if f.last_batch_at else "-"
        table.add_row(s.pipeline, s.source, _shard_lag(s), when, f"{f.quarantined_rows:,}", ends, positions)
    return table


def status_records(statuses: list[PipelineStatus]) -> list[str]:
    """The status as short lines, for a narrow terminal."""
    lines = []
    for s in statuses:
        f = s.figures
        if f is None:
            lines.append(f"[bold]{escape(s.pipeline)}[/] ({s.source}): [red]unavailable[/] (see below)")
            continue
        when = f.last_batch_at.strftime("%Y-%m-%d %H:%M:%S UTC") if f.last_batch_at else "-"
        lines.append(f"[bold]{escape(s.pipeline)}[/] ({s.source}): lag {_shard_lag(s)} · "
                     f"{f.quarantined_rows:,} quarantined · last batch {when}")
        for p in f.partitions:
            lines.append(f"  partition {p.partition}: broker end {_dash(p.broker_end)}, delta position "
                         f"{_dash(p.position)}, lag {_lag(p.lag, [p])}")
    return lines


def print_errors(console: Console, statuses: list[PipelineStatus]) -> None:
    for s in statuses:
        if s.error is not None:
            named = f"'{s.pipeline}'" in s.error  # the error already names the pipeline
            console.print(f"[red]error:[/] {'' if named else escape(s.pipeline) + ': '}{escape(s.error)}",
                          soft_wrap=True)


def _shard_lag(s: PipelineStatus) -> str:
    """The pipeline's lag, with each shard's after it when it is sharded: `120 (s0 40, s1 80, s2 0)`."""
    assert s.figures is not None
    total = _lag(s.figures.lag, s.figures.partitions)
    by_shard = s.lag_by_shard
    return total if by_shard is None else f"{total} ({', '.join(f's{i} {n:,}' for i, n in by_shard.items())})"


def _lag(lag: int | None, partitions: list) -> str:
    """A lag figure; "-" where the broker cannot tell (MQTT keeps no offsets to count)."""
    if lag is None or (partitions and all(p.lag is None for p in partitions)):
        return "-"
    return f"{lag:,}"


def _dash(value: object) -> str:
    return "-" if value is None else str(value)


# ------------------------------------------------------------ JSON
def _default(value: Any) -> Any:
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return {"base64": base64.b64encode(value).decode()}
    return str(value)


def print_json(value: Any) -> None:
    """One JSON document on stdout (no colour, no wrapping), for scripts."""
    sys.stdout.write(json.dumps(value, default=_default, ensure_ascii=False, indent=2) + "\n")


# ------------------------------------------------------------ a run's failure
def run_failure(result: Any) -> str:
    """The run's failure as its one line: the cause and fix the run said, without the framework's trace."""
    from dagster import DagsterEventType

    for wanted in (DagsterEventType.STEP_FAILURE, DagsterEventType.RUN_FAILURE):
        for event in result.all_events:
            if event.event_type != wanted or event.event_specific_data is None:
                continue
            user = getattr(event.event_specific_data, "user_failure_data", None)
            if user is not None and user.description:
                return user.description.strip()
            error = getattr(event.event_specific_data, "error", None)
            if error is not None:
                cause = error
                while cause.cause is not None and cause.cls_name in ("DagsterExecutionStepExecutionError",
                                                                      "DagsterUserCodeExecutionError"):
                    cause = cause.cause  # the user code's exception, not Dagster's wrapper
                message = cause.message.strip()
                if ": " in message and message.split(": ", 1)[0].endswith(cause.cls_name or "\0"):
                    message = message.split(": ", 1)[1]
                return f"{cause.cls_name}: {message}" if cause.cls_name != "Failure" else message
    return "the run failed (no failure event was recorded)"


# ------------------------------------------------------------ progress of a run
class BatchProgress(logging.Handler):
    """One line per committed batch (from the `ingest.batch` logger); on a terminal also a live line with
    messages so far, the rate and the lag left."""

    def __init__(self, console: Console) -> None:
        super().__init__(logging.INFO)
        self.console = console
        self.count = 0
        self.messages = 0
        self.started = time.monotonic()
        self.progress: Progress | None = None
        self.task: Any = None

    def start(self, pipeline: str) -> None:
        self.count, self.messages, self.started = 0, 0, time.monotonic()
        if self.console.is_terminal:
            # the batch lines name the pipeline: the live line keeps to figures, so it fits 80 columns
            self.progress = Progress(TextColumn("{task.fields[detail]}"), TimeElapsedColumn(), console=self.console,
                                     transient=True)
            self.task = self.progress.add_task(pipeline, detail="first batch…")
            self.progress.start()

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def emit(self, record: logging.LogRecord) -> None:
        batch = getattr(record, "batch", None)
        if batch is not None:
            self.count += 1
            self.messages += batch.messages
            if self.progress is not None:
                elapsed = max(time.monotonic() - self.started, 1e-6)
                self.progress.update(self.task, detail=f"{self.messages:,} messages · {self.messages / elapsed:,.0f} "
                                                       f"msg/s · lag {batch.lag_after:,} left")
        self.console.print(record.getMessage(), markup=False, highlight=False, soft_wrap=True)

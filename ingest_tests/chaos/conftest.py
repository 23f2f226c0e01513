"""The chaos suite's report: one row per scenario, printed as a table at the end of the session."""

from __future__ import annotations

from dataclasses import dataclass

import pytest


@dataclass
class ChaosRow:
    scenario: str
    broker: str
    runs: int
    produced: int
    landed: int
    quarantined: int
    lost: int
    doubled: int


ROWS: list[ChaosRow] = []


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not ROWS:
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="chaos: target ∪ quarantine against the messages produced")
    for column in ("scenario", "broker", "runs", "produced", "landed", "quarantined", "lost", "doubled"):
        table.add_column(column, justify="left" if column in ("scenario", "broker") else "right")
    for row in ROWS:
        bad = row.lost or row.doubled
        style = "bold red" if bad else None
        table.add_row(row.scenario, row.broker, str(row.runs), str(row.produced), str(row.landed),
                      str(row.quarantined), str(row.lost), str(row.doubled), style=style)
    console = Console(width=110, force_terminal=False, color_system=None)
    with console.capture() as captured:
        console.print(table)
    terminalreporter.write_line("")
    for line in captured.get().splitlines():
        terminalreporter.write_line(line)

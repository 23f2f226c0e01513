"""Fault injection for crash and chaos tests: named points in the batch lifecycle.

`INGEST_FAULT=<point>` makes the process SIGKILL itself when it reaches that point (like a kill -9, no
cleanup). `INGEST_FAULT=stall:<point>` with `INGEST_FAULT_FILE=<path>` instead creates that file and waits
until a test removes it (at most `STALL_SECONDS`), so the test can act during the batch — restart the
broker, start a second run — without timed sleeps. Unset, every point costs one dict lookup.

Points: after_read, after_quarantine_commit, during_target_commit (the target's data files are written,
its log entry is not: see `DeltaTableSink.append`), after_target_commit (before the broker ack), before_ledger
(the target committed, its ledger row not yet), after_ack.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

POINTS = ("after_read", "after_quarantine_commit", "during_target_commit", "after_target_commit", "before_ledger",
          "after_ack")
STALL_SECONDS = 120.0


def armed(name: str) -> bool:
    """Whether INGEST_FAULT asks to kill the process at `name`."""
    return os.environ.get("INGEST_FAULT") == name


def requested(name: str) -> bool:
    """Whether INGEST_FAULT asks to kill or to stall the process at `name`."""
    return os.environ.get("INGEST_FAULT") in (name, f"stall:{name}")


def fault_point(name: str) -> None:
    """Crash tests: SIGKILL here, or stall here until the test removes INGEST_FAULT_FILE."""
    fault = os.environ.get("INGEST_FAULT")
    if not fault:
        return
    if fault == name:
        os.kill(os.getpid(), signal.SIGKILL)
    if fault == f"stall:{name}":
        marker = Path(os.environ["INGEST_FAULT_FILE"])
        if marker.with_suffix(".done").exists():
            return  # stall once per run: later batches go through
        marker.write_text(str(os.getpid()))
        deadline = time.monotonic() + STALL_SECONDS
        while marker.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        marker.with_suffix(".done").write_text("")

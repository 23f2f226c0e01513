"""Fault injection for crash and chaos tests: named points in the batch lifecycle.

`INGEST_FAULT=<point>` makes the process SIGKILL itself when it reaches that point (like a kill -9, no
cleanup). `INGEST_FAULT=stall:<point>` with `INGEST_FAULT_FILE=<path>` instead creates that file and waits
until a test removes it (at most `STALL_SECONDS`), so the test can act during the batch — restart the
broker, start a second run — without timed sleeps. Unset, every point costs one dict lookup.

Several faults: comma-separated (`stall:after_plan@0,stall:after_target_commit@1`); a `@<i>` suffix limits
a fault to runs serving shard i of a sharded pipeline (`set_shard`). With several stalls, each waits on its
own file, `INGEST_FAULT_FILE` + `-<point>`.

Points: after_plan (the batch is planned, nothing read yet), after_read, after_quarantine_commit,
during_target_commit (the target's data files are written, its log entry is not: see `DeltaTableSink.append`),
after_target_commit (before the broker ack), before_ledger (the target committed, its ledger row not yet),
after_ack. A run's batches are committed on the writer thread, which writes each one's ledger row there while
the main thread acknowledges it, so before_ledger and after_target_commit/after_ack may come in either order;
the last batch an MQTT run hands over on closing (its QoS 0 messages, `_drain`) is committed on the main
thread, its ledger row before its ack.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

POINTS = ("after_plan", "after_read", "after_quarantine_commit", "during_target_commit", "after_target_commit",
          "before_ledger", "after_ack")
STALL_SECONDS = 300.0


_shard: int | None = None  # the shard the current run serves (None: unsharded)


def set_shard(index: int | None) -> None:
    """Runs serving one shard say which, so `<fault>@<shard>` hits only them."""
    global _shard
    _shard = index


def _faults() -> list[tuple[str, int | None]]:
    """(fault, shard or None) for each comma-separated entry of INGEST_FAULT that applies to this run."""
    out = []
    for entry in filter(None, (e.strip() for e in os.environ.get("INGEST_FAULT", "").split(","))):
        fault, _, shard = entry.partition("@")
        out.append((fault, int(shard) if shard else None))
    return out


def armed(name: str) -> bool:
    """Whether INGEST_FAULT asks to kill the process at `name` (in this run)."""
    return any(f == name and (s is None or s == _shard) for f, s in _faults())


def requested(name: str) -> bool:
    """Whether INGEST_FAULT asks to kill or to stall the process at `name`."""
    return os.environ.get("INGEST_FAULT") in (name, f"stall:{name}")


def fault_point(name: str) -> None:
    """Crash tests: SIGKILL here, or stall here until the test removes INGEST_FAULT_FILE."""
    if "INGEST_FAULT" not in os.environ:
        return
    faults = _faults()
    for fault, shard in faults:
        if shard is not None and shard != _shard:
            continue
        if fault == name:
            os.kill(os.getpid(), signal.SIGKILL)
        if fault == f"stall:{name}":
            _stall(Path(os.environ["INGEST_FAULT_FILE"] + ("" if len(faults) == 1 else f"-{name}")))


def _stall(marker: Path) -> None:
    if marker.with_suffix(".done").exists():
        return  # stall once per run: later batches go through
    marker.write_text(str(os.getpid()))
    deadline = time.monotonic() + STALL_SECONDS
    while marker.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    marker.with_suffix(".done").write_text("")

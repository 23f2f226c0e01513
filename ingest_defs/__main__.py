"""The `ingest` command (also `python -m ingest_defs`): `cli.main`, then an exit without the interpreter's
module teardown.

Python's finalization of a process that loaded Dagster, Polars, PyArrow and delta-rs (collecting and
clearing every module's objects) took 1.2 s of an 8.6 s `ingest run` here: a second after the last batch
before the shell, a scheduler or the next shard gets the process's status. The handler below is registered
before anything else is imported, so it runs after every other exit handler (they run last in, first out):
threads have been joined and every library's own handler has run; only the teardown is skipped. A command
that ends by an exception keeps Python's normal exit (its traceback, status 1).

Runs launched by the Dagster daemon do not come through here (they run in Dagster's own worker process).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys


def entry() -> None:
    status: list[int] = []

    def end_now() -> None:
        if not status:
            return
        import logging

        logging.shutdown()  # in case logging was imported before this handler was registered (its own ran last)
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):  # a closed pipe (`ingest status | head`)
                stream.flush()
        os._exit(status[0])

    atexit.register(end_now)
    # Hypothesis is a test tool (the dev dependency group) that Pandera imports at start-up for data
    # synthesis whenever it is installed: 0.55 s of every command's start, for a feature no command uses.
    sys.modules.setdefault("hypothesis", None)
    from ingest_defs.cli import main

    status.append(main())
    sys.exit(status[0])


if __name__ == "__main__":
    entry()

"""Where log lines go: librdkafka's own lines through Python logging, and the `ingest` command's console.

librdkafka prints `%4|…|GETPID|…` lines straight to stderr unless it is given a logger. Each Kafka client
gets `LIBRDKAFKA` (confluent-kafka's `logger` setting), one level down from librdkafka's own: the client
retries what it logs as an error, and what is fatal reaches us as an exception that the run reports.
"""

from __future__ import annotations

import logging
from typing import Any

LIBRDKAFKA_LOGGER = "ingest.librdkafka"
# librdkafka's levels as confluent-kafka maps them to Python's → the level we log them at.
_DEMOTE = {logging.CRITICAL: logging.ERROR, logging.ERROR: logging.WARNING, logging.WARNING: logging.INFO,
           logging.INFO: logging.DEBUG}

logging.getLogger(LIBRDKAFKA_LOGGER).addHandler(logging.NullHandler())  # never Python's last-resort stderr


class _LibrdkafkaLog(logging.LoggerAdapter):
    def log(self, level: int, msg: object, *args: Any, **kwargs: Any) -> None:
        super().log(_DEMOTE.get(level, level), msg, *args, **kwargs)


LIBRDKAFKA = _LibrdkafkaLog(logging.getLogger(LIBRDKAFKA_LOGGER), {})


def configure_console(verbose: bool) -> None:
    """The `ingest` command's logging: quiet by default (a failing run says why in one line); with -v the
    librdkafka lines and everything else at INFO go to stderr as well."""
    if not verbose:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.INFO)

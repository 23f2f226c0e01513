"""Local broker stack (Kafka 4.x KRaft, NATS JetStream, Mosquitto) run as plain processes.

`ingest stack up|down|status` calls :mod:`ingest_defs.stack.manager`.
"""

from ingest_defs.stack.manager import addresses, down, status, up

__all__ = ["addresses", "down", "status", "up"]

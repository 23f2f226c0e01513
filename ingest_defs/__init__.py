"""Orchestrated lakehouse ingestion (Dagster code location: `ingest_defs.definitions`)."""

from ingest_defs import allocator

# Before anything imports polars or deltalake: their allocators read the setting when they load.
allocator.configure()

"""Code location of the freshness benchmark: the pipelines file in INGEST_PIPELINES, without dbt."""

from ingest_defs.config import load_pipelines
from ingest_defs.factory import build_definitions

defs = build_definitions(load_pipelines())

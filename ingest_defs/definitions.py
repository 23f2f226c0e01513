"""The code location: the pipelines file's definitions plus the dbt project downstream of them.

Cheap to import: no broker connection, no table access, no dbt manifest parse at import time.
"""

from __future__ import annotations

import dagster as dg

from ingest_defs.assets.dbt import dbt_definitions
from ingest_defs.config import load_pipelines
from ingest_defs.factory import build_definitions

__all__ = ["build_definitions", "defs"]

_specs = load_pipelines()
defs = dg.Definitions.merge(build_definitions(_specs), dbt_definitions(_specs))

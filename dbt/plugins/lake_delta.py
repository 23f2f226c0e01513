"""dbt-duckdb source plugin `lake_delta`: the built-in `delta` plugin plus the Delta version it read.

The built-in plugin (`dbt.adapters.duckdb.plugins.delta`) opens the table with the `deltalake` package
and hands DuckDB a pyarrow dataset: no DuckDB extension is downloaded at run time. This subclass keeps
that and adds:

- a constant column `_delta_version` on every row: the version of the snapshot this read scanned. It is
  attached as a partition expression of each file fragment, so it is exactly the snapshot DuckDB reads
  (no second `DeltaTable(path).version()` call that could see a newer commit), costs nothing per row and
  keeps filter pushdown into the Parquet files;
- `as_of_version: 0` pins version 0 (the built-in plugin treats 0 as "latest");
- a missing table fails with a message that says which pipeline has not written it yet.

Source meta (in models/sources.yml): `delta_table_path` (required), `storage_options`, `as_of_version`.
The table is opened through `ingest_defs.storage`, like every other reader: an `s3://` path gets its
options (endpoint, credentials, retries) from the environment, so no secret is written into sources.yml
or the manifest; `storage_options` in the source meta override them.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import pyarrow.dataset as ds
from dbt.adapters.duckdb.plugins.delta import Plugin as DeltaPlugin

from ingest_defs.storage import location

VERSION_COLUMN = "_delta_version"


class Plugin(DeltaPlugin):
    def load(self, source_config: Any) -> ds.Dataset:
        path = source_config.get("delta_table_path")
        if not path:
            raise ValueError(f"source {source_config.table_name()}: meta.delta_table_path is required")
        table = location(path, source_config.get("storage_options") or None).open()
        if table is None:
            raise RuntimeError(
                f"source {source_config.table_name()}: no Delta table at {path}. Its ingestion pipeline has "
                "not written it yet (or LAKE_ROOT points elsewhere); build only the models over tables that "
                "exist, e.g. `dbt build --select +gold_user_activity_1m`."
            )
        as_of = source_config.get("as_of_version")
        if as_of not in (None, ""):
            table.load_as_version(int(as_of))
        return with_version_column(table.to_pyarrow_dataset(), table.version())


def with_version_column(dataset: ds.FileSystemDataset, version: int) -> ds.FileSystemDataset:
    """The same files, each fragment also carrying `_delta_version == version` (read as a column)."""
    pinned = ds.field(VERSION_COLUMN) == pa.scalar(version, pa.int64())
    fragments = [
        dataset.format.make_fragment(f.path, filesystem=f.filesystem, partition_expression=f.partition_expression & pinned)
        for f in dataset.get_fragments()
    ]
    schema = dataset.schema.append(pa.field(VERSION_COLUMN, pa.int64(), nullable=False))
    return ds.FileSystemDataset(fragments, schema, dataset.format, filesystem=dataset.filesystem)

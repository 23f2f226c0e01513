"""dbt (silver and gold over the bronze Delta tables) as Dagster assets downstream of the ingestion assets.

- Lineage: each dbt source carries `meta.dagster.asset_key` = the ingestion asset that writes its table,
  so the graph runs broker topic/stream -> bronze Delta table -> silver -> gold. Models are keyed
  `[schema, alias]` (e.g. `["gold", "user_activity_1m"]`) and grouped by layer.
- Scheduling: every model has `AutomationCondition.on_cron(DBT_CRON)` (once per tick, after its upstream
  tables changed; not once per micro-batch), and the op runs in pool `dbt_duckdb` (limit 1 from
  dagster.yaml's `default_limit`): DuckDB has one writer.
- Cheap import: the manifest is prepared at build/CI time (`make setup` runs
  `python -m ingest_defs.assets.dbt parse`) and only read here. If it is missing the code location still
  loads without the dbt assets and logs a warning naming `make setup`: ingestion (the sensors writing
  bronze) must not stop because a downstream build artifact is absent.
- A bronze table no pipeline has written yet is excluded from a run (`--exclude source:bronze.<t>+`)
  with a warning, so one missing pipeline does not fail the others' models.

CLI (used by the Makefile): `python -m ingest_defs.assets.dbt parse` writes dbt/target/manifest.json;
`python -m ingest_defs.assets.dbt build [--show N]` builds what the lake has and prints gold rows.

No `from __future__ import annotations` here: Dagster reads the asset's context annotation at runtime.
"""

import argparse
import json
import logging
import os
import shutil
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import dagster as dg
from dagster_dbt import DagsterDbtTranslator, DbtCliResource, dbt_assets

from ingest_defs.assets.ingestion import target_key
from ingest_defs.config import REPO_ROOT, PipelineSpec, lake_root, resolve_table_uri
from ingest_defs.storage import location

log = logging.getLogger(__name__)

DBT_PROJECT_DIR = REPO_ROOT / "dbt"
MANIFEST_PATH = DBT_PROJECT_DIR / "target" / "manifest.json"
DBT_POOL = "dbt_duckdb"
DBT_CRON = "*/10 * * * *"
DBT_ASSETS_NAME = "dbt_lakehouse"
GOLD_SCHEMA = "gold"


class LakehouseTranslator(DagsterDbtTranslator):
    """Sources -> their ingestion asset (meta.dagster.asset_key); models -> [schema, alias], on a cron."""

    def get_asset_key(self, dbt_resource_props: Mapping[str, Any]) -> dg.AssetKey:
        if dbt_resource_props["resource_type"] == "model":
            schema = dbt_resource_props["config"].get("schema") or dbt_resource_props["schema"]
            return dg.AssetKey([schema, dbt_resource_props["alias"]])
        return super().get_asset_key(dbt_resource_props)

    def get_group_name(self, dbt_resource_props: Mapping[str, Any]) -> str | None:
        if dbt_resource_props["resource_type"] == "model":
            return dbt_resource_props["config"].get("schema") or "dbt"
        return super().get_group_name(dbt_resource_props)

    def get_automation_condition(self, dbt_resource_props: Mapping[str, Any]) -> dg.AutomationCondition | None:
        return dg.AutomationCondition.on_cron(DBT_CRON)


def dbt_env(lake: str | None = None) -> dict[str, str]:
    """What dbt needs in its environment: an absolute LAKE_ROOT and the project/profiles directory."""
    root = lake or lake_root()
    env = {"DBT_PROJECT_DIR": str(DBT_PROJECT_DIR), "DBT_PROFILES_DIR": str(DBT_PROJECT_DIR)}
    if "://" not in root:
        root = str(Path(root).resolve())
    elif not os.environ.get("DBT_DUCKDB_PATH"):
        # DuckDB's file cannot live in an object store: a lake on S3 keeps the warehouse on local disk.
        env["DBT_DUCKDB_PATH"] = str(REPO_ROOT / "lake" / "warehouse.duckdb")
    return {"LAKE_ROOT": root, **env}


def dbt_executable() -> str:
    """This interpreter's dbt (the venv's bin/ is not on PATH under `make` or a code server)."""
    local = Path(sys.executable).parent / "dbt"
    return str(local) if local.is_file() else "dbt"


def source_selectors(manifest: Mapping[str, Any]) -> dict[str, dg.AssetKey]:
    """dbt source selector (`source:bronze.user_activity`) -> the asset key it maps to."""
    translator = LakehouseTranslator()
    out = {}
    for props in manifest.get("sources", {}).values():
        out[f"source:{props['source_name']}.{props['name']}"] = translator.get_asset_key(props)
    return out


def table_uris(specs: Mapping[str, PipelineSpec]) -> dict[dg.AssetKey, str]:
    """Ingestion asset key -> the Delta table it writes, under the current LAKE_ROOT."""
    return {target_key(spec): spec.table_uri() for spec in specs.values()}


def missing_sources(manifest: Mapping[str, Any], uris: Mapping[dg.AssetKey, str]) -> list[str]:
    """Source selectors whose Delta table does not exist (yet): their downstream models cannot build."""
    missing = []
    for selector, key in source_selectors(manifest).items():
        uri = uris.get(key) or resolve_table_uri("/".join(key.path))
        if not location(uri).exists():
            missing.append(selector)
    return missing


def exclude_args(missing: Sequence[str]) -> list[str]:
    return ["--exclude", " ".join(f"{s}+" for s in missing)] if missing else []


def dbt_definitions(specs: Mapping[str, PipelineSpec], manifest_path: Path | str = MANIFEST_PATH) -> dg.Definitions:
    """The dbt assets, their resource and automation sensor; empty (with a warning) without a manifest."""
    manifest_path = Path(manifest_path)
    if not manifest_path.is_file():
        log.warning("dbt manifest not found at %s: the dbt assets (silver/gold) are left out of this code "
                    "location. Run `make setup` (it runs `python -m ingest_defs.assets.dbt parse`).", manifest_path)
        return dg.Definitions()
    manifest = json.loads(manifest_path.read_text())
    assets = build_dbt_assets(manifest, specs)
    sensor = dg.AutomationConditionSensorDefinition(
        "dbt_automation_sensor", target=dg.AssetSelection.assets(assets),
        default_status=dg.DefaultSensorStatus.RUNNING, minimum_interval_seconds=60,
        description=f"Builds the dbt models on their cron ({DBT_CRON}) once their upstream tables changed.")
    resource = DbtCliResource(project_dir=str(DBT_PROJECT_DIR), profiles_dir=str(DBT_PROJECT_DIR),
                              dbt_executable=dbt_executable())
    return dg.Definitions(assets=[assets], sensors=[sensor], resources={"dbt": resource})


def build_dbt_assets(manifest: Mapping[str, Any], specs: Mapping[str, PipelineSpec]) -> dg.AssetsDefinition:
    @dbt_assets(manifest=manifest, dagster_dbt_translator=LakehouseTranslator(), name=DBT_ASSETS_NAME,
                pool=DBT_POOL, op_tags={"ingest/layer": "dbt"})
    def _dbt(context: dg.AssetExecutionContext, dbt: DbtCliResource) -> Iterator[Any]:
        # DbtCliResource hands os.environ to dbt: make LAKE_ROOT absolute there (dbt runs in dbt/).
        os.environ.update({k: v for k, v in dbt_env().items() if k in ("LAKE_ROOT", "DBT_DUCKDB_PATH")})
        missing = missing_sources(manifest, table_uris(specs))
        if missing:
            context.log.warning(f"no Delta table yet for {', '.join(missing)}: their models are skipped this run")
        invocation = dbt.cli(["build", *exclude_args(missing)], context=context)
        yield from invocation.stream()
        # dagster-dbt gives every run its own target dir (manifest, logs): keep only failed runs' dirs.
        shutil.rmtree(invocation.target_path, ignore_errors=True)

    return _dbt


# ---------------------------------------------------------------- CLI (Makefile: setup, demo)
def _invoke(args: list[str]) -> bool:
    """dbt in a child process (an in-process dbtRunner keeps the DuckDB file open afterwards)."""
    import subprocess

    return subprocess.run([dbt_executable(), *args], env={**os.environ, **dbt_env()}, cwd=REPO_ROOT).returncode == 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ingest_defs.assets.dbt", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("parse", help=f"write {MANIFEST_PATH.relative_to(REPO_ROOT)} (no data access)")
    build = sub.add_parser("build", help="dbt build over the bronze tables that exist, then print gold rows")
    build.add_argument("--show", type=int, default=5, help="gold rows to print per table (0: none)")
    args = parser.parse_args(argv)
    if args.command == "parse":
        return 0 if _invoke(["parse", "--quiet"]) else 1
    from ingest_defs.config import load_pipelines

    manifest_path = MANIFEST_PATH
    if not manifest_path.is_file() and not _invoke(["parse", "--quiet"]):
        return 1
    missing = missing_sources(json.loads(manifest_path.read_text()), table_uris(load_pipelines()))
    for selector in missing:
        print(f"skipping {selector}+ : its Delta table does not exist yet")
    ok = _invoke(["build", *exclude_args(missing)])
    if args.show:
        show_gold(args.show)
    return 0 if ok else 1


def duckdb_path() -> str:
    env = dbt_env()
    return os.environ.get("DBT_DUCKDB_PATH") or env.get("DBT_DUCKDB_PATH") or f"{env['LAKE_ROOT']}/warehouse.duckdb"


def show_gold(rows: int) -> None:
    import duckdb

    path = duckdb_path()
    if not Path(path).is_file():
        print(f"no DuckDB file at {path}")
        return
    with duckdb.connect(path, read_only=True) as con:
        tables = [t for (t,) in con.execute(
            "select table_name from information_schema.tables where table_schema = ? order by 1",
            [GOLD_SCHEMA]).fetchall()]
        for table in tables:
            total = con.execute(f'select count(*) from {GOLD_SCHEMA}."{table}"').fetchall()[0][0]
            print(f"\n{GOLD_SCHEMA}.{table}: {total} rows, latest windows")
            con.sql(f'select * exclude (computed_at) from {GOLD_SCHEMA}."{table}" '
                    f"order by window_start desc, 3 limit {int(rows)}").show(max_width=160)


if __name__ == "__main__":
    sys.exit(main())

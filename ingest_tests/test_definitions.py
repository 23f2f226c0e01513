"""The code location loads, and its graph is what the pipelines file says."""

import os
import subprocess
import sys
from pathlib import Path

import dagster as dg

from ingest_defs.config import REPO_ROOT, load_pipelines


def test_dagster_definitions_validate_loads_the_workspace(tmp_path: Path):
    env = {**os.environ, "DAGSTER_HOME": str(tmp_path)}
    proc = subprocess.run([str(Path(sys.executable).parent / "dagster"), "definitions", "validate",
                           "-w", "workspace.yaml"], cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_code_location_is_cheap_to_import_and_touches_no_broker():
    # No broker connection and no table access at import: this must work with nothing listening.
    env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1", "NATS_URL": "nats://127.0.0.1:1",
           "MQTT_URL": "mqtt://127.0.0.1:1", "LAKE_ROOT": "/nonexistent/lake"}
    # The timeout guards against a hang on a broker; it is not a speed assertion.
    proc = subprocess.run([sys.executable, "-c", "from ingest_defs.definitions import defs; print(len(list(defs.assets)))"],
                          env=env, capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_each_pipeline_has_source_table_quarantine_checks_job_and_sensor():
    from ingest_defs.assets.ingestion import quarantine_key, source_asset_key, target_key
    from ingest_defs.definitions import defs

    graph = defs.resolve_asset_graph()
    for spec in load_pipelines().values():
        assert source_asset_key(spec) in graph.get(target_key(spec)).parent_keys
        assert quarantine_key(spec) in graph.get_all_asset_keys()
        checks = {c.name for c in graph.get(target_key(spec)).check_keys}
        assert {"quarantine_share", "lag"} <= checks
        assert defs.resolve_job_def(f"{spec.name}_job").executor_def.name == dg.in_process_executor.name
        if spec.trigger.sensor:
            assert defs.resolve_sensor_def(f"{spec.name}_sensor")


def test_committed_dagster_yaml_loads_with_one_run_per_pool(tmp_path: Path):
    (tmp_path / "dagster.yaml").write_text((REPO_ROOT / "dagster_home" / "dagster.yaml").read_text())
    with dg.DagsterInstance.from_config(str(tmp_path)) as instance:
        config = instance.get_concurrency_config()
        assert config.pool_config.pool_granularity.value == "run"
        assert config.pool_config.default_pool_limit == 1

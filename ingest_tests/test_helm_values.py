"""Kubernetes on paper: deploy/helm/values.yaml (the official Dagster chart) and the Secrets/ConfigMap it
refers to (deploy/helm/secrets.example.yaml) must name the environment variables the code reads, keep every
secret in a Secret, and configure Dagster the way deploy/dagster.postgres.yaml does (the configuration
test_dagster_postgres.py runs)."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from ingest_defs import storage
from ingest_defs.config import REPO_ROOT

HELM = REPO_ROOT / "deploy" / "helm"
SOURCE_ENV = re.compile(r"""(?:os\.environ(?:\.get)?\(\s*|os\.environ\[\s*|EnvVar\(\s*|_secret\(\s*)["']([A-Z][A-Z0-9_]+)["']""")
# Variables the deployment must set: where the lake is, how to reach it, the pipelines file, the brokers.
REQUIRED = {"LAKE_ROOT", "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION",
            "INGEST_PIPELINES", "INGEST_STACK_EXTERNAL", "KAFKA_BOOTSTRAP_SERVERS", "NATS_URL", "MQTT_URL"}


def variables_the_code_reads() -> set[str]:
    names: set[str] = set()
    for path in (REPO_ROOT / "ingest_defs").rglob("*.py"):
        names |= set(SOURCE_ENV.findall(path.read_text()))
    names |= set(storage.AWS_ENV) | {env for env, _ in storage.CLIENT_SETTINGS.values()}
    return names


def manifests() -> dict[tuple[str, str], dict]:
    return {(doc["kind"], doc["metadata"]["name"]): doc
            for doc in yaml.safe_load_all((HELM / "secrets.example.yaml").read_text()) if doc}


def values() -> dict:
    return yaml.safe_load((HELM / "values.yaml").read_text())


def test_the_code_reads_the_variables_this_test_looks_for() -> None:
    read = variables_the_code_reads()
    assert read >= REQUIRED, sorted(REQUIRED - read)
    assert {"KAFKA_SASL_PASSWORD", "NATS_PASSWORD", "MQTT_PASSWORD", "LAKE_S3_RETRY_TIMEOUT"} <= read


def test_helm_values_name_the_variables_the_code_reads_and_keep_secrets_in_secrets() -> None:
    docs = manifests()
    deployment = values()["dagster-user-deployments"]["deployments"][0]
    from_env = {e["name"]: e.get("value") for e in deployment["env"]}
    from_configmaps = {}
    for ref in deployment["envConfigMaps"]:
        from_configmaps |= docs[("ConfigMap", ref["name"])]["data"]
    from_secrets = {}
    for ref in deployment["envSecrets"]:
        from_secrets |= docs[("Secret", ref["name"])]["stringData"]
    everything = set(from_env) | set(from_configmaps) | set(from_secrets)
    read = variables_the_code_reads()
    assert everything >= REQUIRED, sorted(REQUIRED - everything)
    assert everything <= read, f"set but never read (a typo?): {sorted(everything - read)}"
    # secrets only in Secrets, never in plain env or a ConfigMap
    plain = set(from_env) | set(from_configmaps)
    assert not {n for n in plain if storage.is_secret_key(n)}, plain
    assert {n for n in everything if storage.is_secret_key(n)} <= set(from_secrets)
    # the pipelines file is mounted from its ConfigMap where INGEST_PIPELINES points
    mount = next(m for m in deployment["volumeMounts"] if m["name"] == "pipelines")
    volume = next(v for v in deployment["volumes"] if v["name"] == "pipelines")
    assert Path(from_env["INGEST_PIPELINES"]).parent == Path(mount["mountPath"])
    assert volume["configMap"]["name"] == "ingest-pipelines"
    assert from_configmaps["LAKE_ROOT"].startswith("s3://"), "run pods are ephemeral: the lake is on S3"


def test_helm_values_run_dagster_as_the_tested_postgres_configuration() -> None:
    v, docs = values(), manifests()
    tested = yaml.safe_load((REPO_ROOT / "deploy" / "dagster.postgres.yaml").read_text())
    deployment = v["dagster-user-deployments"]["deployments"][0]
    workspace = yaml.safe_load((REPO_ROOT / "workspace.yaml").read_text())
    module = workspace["load_from"][0]["python_module"]["module_name"]
    assert deployment["dagsterApiGrpcArgs"] == ["--module-name", module]
    assert deployment["includeConfigInLaunchedRuns"]["enabled"] is True
    assert v["runLauncher"]["type"] == "K8sRunLauncher"
    # Postgres storage, password from a Secret with the key the chart reads
    assert v["postgresql"]["enabled"] is False and v["generatePostgresqlPasswordSecret"] is False
    assert "postgresql-password" in docs[("Secret", v["global"]["postgresqlSecretName"])]["stringData"]
    assert "postgres" in tested["storage"]
    # the same run coordinator, pools and run limit as dagster.postgres.yaml
    coordinator = v["dagsterDaemon"]["runCoordinator"]
    assert coordinator["type"] == tested["run_coordinator"]["class"]
    assert (coordinator["config"]["queuedRunCoordinator"]["dequeueIntervalSeconds"]
            == tested["run_coordinator"]["config"]["dequeue_interval_seconds"])
    pools, runs = v["concurrency"]["pools"], v["concurrency"]["runs"]
    assert v["concurrency"]["enabled"] is True
    assert pools["granularity"] == tested["concurrency"]["pools"]["granularity"]
    assert pools["defaultLimit"] == tested["concurrency"]["pools"]["default_limit"]
    assert runs["maxConcurrentRuns"] == tested["concurrency"]["runs"]["max_concurrent_runs"]
    assert v["dagsterDaemon"]["sensors"] == {"useThreads": tested["sensors"]["use_threads"],
                                             "numWorkers": tested["sensors"]["num_workers"]}
    # the image is this project's (built from its Dockerfile, with the Kubernetes extra)
    assert "--extra k8s" in (REPO_ROOT / "Dockerfile").read_text()
    assert 'k8s = ["dagster-k8s==' in (REPO_ROOT / "pyproject.toml").read_text()

"""ingest_defs.storage, the one place that turns table paths into URIs and storage options (pure logic, no
server), and a check that every reader and writer goes through it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from ingest_defs import storage
from ingest_defs.config import REPO_ROOT, ConfigError, parse_pipeline
from ingest_tests.conftest import USER_ACTIVITY_SCHEMA


def spec_with(**extra):
    return parse_pipeline("p", {"source": {"kafka": {"topic": "t"}}, "schema": USER_ACTIVITY_SCHEMA,
                                "table": "bronze/p", **extra})


def test_table_paths_resolve_under_lake_root_local_or_s3(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LAKE_ROOT", str(tmp_path))
    assert storage.resolve_table_uri("bronze/t") == str(tmp_path / "bronze" / "t")
    assert storage.resolve_table_uri("/abs/t") == "/abs/t"
    assert storage.resolve_table_uri("s3://other/t") == "s3://other/t"
    monkeypatch.setenv("LAKE_ROOT", "s3://lake/prod/")
    assert storage.resolve_table_uri("bronze/t") == "s3://lake/prod/bronze/t"
    spec = spec_with()
    assert [storage.table_location(spec, r).uri for r in storage.TABLE_ROLES] == [
        "s3://lake/prod/bronze/p", "s3://lake/prod/bronze/p_quarantine", "s3://lake/prod/bronze/p_ledger"]


def test_local_tables_need_no_options_and_s3_ones_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert storage.storage_options("/tmp/lake/t") is None
    for key in ("AWS_ENDPOINT_URL", "AWS_REGION", "LAKE_S3_MAX_RETRIES", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKID")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-value")
    options = storage.storage_options("s3://lake/t")
    assert options == {"AWS_ACCESS_KEY_ID": "AKID", "AWS_SECRET_ACCESS_KEY": "s3cr3t-value", "AWS_REGION": "us-east-1",
                       "timeout": "30s", "connect_timeout": "5s", "max_retries": "5", "retry_timeout": "60s"}
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")
    monkeypatch.setenv("LAKE_S3_MAX_RETRIES", "2")
    options = storage.storage_options("s3://lake/t")
    assert options["AWS_ALLOW_HTTP"] == "true" and options["max_retries"] == "2"
    where = storage.location("s3://lake/t")
    assert where.endpoint == "http://127.0.0.1:9000" and "s3cr3t" not in repr(where)
    assert where.polars_options()["max_retries"] == 2  # polars wants a number


def test_plain_http_to_another_host_and_unsafe_rename_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://s3.example.com:9000")
    with pytest.raises(storage.StorageConfigError, match="plain HTTP.*https://"):
        storage.storage_options("s3://lake/t")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "https://s3.example.com")
    assert "AWS_ALLOW_HTTP" not in storage.storage_options("s3://lake/t")
    monkeypatch.setenv("AWS_S3_ALLOW_UNSAFE_RENAME", "true")
    with pytest.raises(storage.StorageConfigError, match="unset AWS_S3_ALLOW_UNSAFE_RENAME"):
        storage.storage_options("s3://lake/t")


def test_a_pipelines_storage_options_expand_env_and_refuse_literal_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LAKE_ROOT", "s3://lake/x")
    monkeypatch.setenv("P_SECRET", "from-env-secret")
    spec = spec_with(storage={"options": {"AWS_SECRET_ACCESS_KEY": "${P_SECRET}", "AWS_REGION": "eu-west-1"}})
    options = storage.table_location(spec, "quarantine").options
    assert options["AWS_SECRET_ACCESS_KEY"] == "from-env-secret" and options["AWS_REGION"] == "eu-west-1"
    assert "from-env-secret" not in spec.model_dump_json()  # only the reference is in the spec (and run config)
    assert storage.redact("failed with from-env-secret inside") == "failed with *** inside"
    with pytest.raises(ConfigError, match="literal secret") as err:
        spec_with(storage={"options": {"AWS_SECRET_ACCESS_KEY": "plain"}})
    assert "${P_AWS_SECRET_ACCESS_KEY}" in str(err.value)


def test_object_store_errors_become_one_clean_line() -> None:
    raw = OSError("Kernel error -> Generic S3 error\n  \x1b[31m↳\x1b[0m Error performing GET http://h/x in 1s, after 3 "
                  "retries, max_retries 3\n   \x1b[31m↳\x1b[0m Connection refused")
    assert storage.clean_error(raw) == ("Kernel error -> Generic S3 error Error performing GET http://h/x in 1s, "
                                        "after 3 retries, max_retries 3 Connection refused")
    assert storage.is_store_failure(raw)


# every reader and writer opens tables through storage.py: no bare paths handed to delta-rs or polars
BARE = re.compile(r"DeltaTable\(\s*(?!\.\.\.)[^)]|DeltaTable\.is_deltatable\(|pl\.(?:read|scan)_delta\(\s*(?!target\b)"
                  r"|write_deltalake\(\s*(?!table\b)")


@pytest.mark.parametrize("root", ["ingest_defs", "dbt/plugins"])
def test_nothing_but_storage_opens_a_table_by_path(root: str) -> None:
    offenders = []
    for path in sorted((REPO_ROOT / root).rglob("*.py")):
        if path.name == "storage.py":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if BARE.search(code) and "`" not in code:
                offenders.append(f"{path.relative_to(REPO_ROOT)}:{number}: {line.strip()}")
    assert not offenders, "open tables through ingest_defs.storage (Location):\n" + "\n".join(offenders)

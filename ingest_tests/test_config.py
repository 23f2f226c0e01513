"""The pipelines file: every mistake names the pipeline, the key and the fix."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ingest_defs.config import ConfigError, load_pipelines, parse_pipeline
from ingest_defs.sources.mqtt_topics import filters_overlap, topic_matches

BASE = {
    "source": {"kafka": {"topic": "t"}},
    "schema": {"columns": {"id": {"dtype": "int64"}}},
    "table": "bronze/t",
}


def with_(path: str, value):
    raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in BASE.items()}
    node = raw
    keys = path.split(".")
    for key in keys[:-1]:
        node[key] = dict(node.get(key, {}))
        node = node[key]
    if value is KeyError:
        node.pop(keys[-1])
    else:
        node[keys[-1]] = value
    return raw


@pytest.mark.parametrize(
    ("path", "value", "key", "fix"),
    [
        ("sourse", {}, "sourse", "remove 'sourse'"),
        ("source.kafka.topic", KeyError, "source.kafka.topic", "add `topic:` under pipelines.p.source.kafka"),
        ("batch", {"max_messages": "lots"}, "batch.max_messages", "whole number"),
        ("schema", {"columns": {"id": {"dtype": "int65"}}}, "schema.columns.id.dtype", "use one of int8"),
        ("schema", {"model": "nowhere.at_all:Model"}, "schema.model", "check the module path"),
        ("schema", {"model": "ingest_defs.config:PipelineSpec"}, "schema.model", "DataFrameModel"),
        ("on_gap", "ignore", "on_gap", "use one of fail, skip"),
        ("on_gap", "skp", "on_gap", "did you mean `skip`?"),
        ("tabel", "t", "tabel", "did you mean `table`? Rename it"),
        ("batch", {"max_mesages": 5}, "batch.max_mesages", "did you mean `max_messages`?"),
        ("source", {"kafka": {"topic": "t"}, "nats": {"stream": "s", "subject": "s.>"}}, "source", "one source block"),
        ("schema", {"columns": {"id": {"dtype": "int64", "checks": {"between": 1}}}}, "schema.columns.id.checks", "use one of"),
        ("partition_by", ["nope"], "partition_by", "use one of id"),
        ("maintenance", {"schedule": "hourly"}, "maintenance.schedule", "five cron fields"),
        ("maintenance", {"time_travel_hours": 0}, "maintenance.time_travel_hours", "greater than or equal to 1"),
    ],
)
def test_mistakes_name_pipeline_key_and_fix(path, value, key, fix):
    with pytest.raises(ConfigError) as err:
        parse_pipeline("p", with_(path, value))
    message = str(err.value)
    assert "pipeline 'p'" in message
    assert f"key '{key}'" in message
    assert fix in message


def test_mqtt_overlapping_filters_are_rejected():
    raw = {**BASE, "source": {"mqtt": {"topics": ["x/#", "x/+/t"]}}}
    with pytest.raises(ConfigError, match="overlap"):
        parse_pipeline("p", raw)


def test_filter_logic():
    assert filters_overlap("x/#", "x/+/t")
    assert filters_overlap("a/+/c", "a/b/+")
    assert not filters_overlap("a/b", "a/c")
    assert not filters_overlap("a/+", "a/b/c")
    assert topic_matches("iot/sensors/+/temperature", "iot/sensors/s1/temperature")
    assert not topic_matches("iot/+", "iot/a/b")
    assert topic_matches("iot/#", "iot/a/b")


def test_shipped_file_loads():
    specs = load_pipelines()
    assert "user_activity" in specs
    assert specs["user_activity"].source.kafka.topic == "user_activity_events"


def test_ingest_validate_prints_the_error_and_fails(tmp_path: Path):
    bad = tmp_path / "pipelines.yaml"
    bad.write_text("pipelines:\n  p:\n    source: {kafka: {}}\n    schema: {columns: {id: {dtype: int64}}}\n    table: t\n")
    proc = subprocess.run([sys.executable, "-m", "ingest_defs", "validate"], capture_output=True, text=True,
                          env={"INGEST_PIPELINES": str(bad), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 2
    assert "pipeline 'p'" in proc.stderr and "source.kafka.topic" in proc.stderr
    good = subprocess.run([sys.executable, "-m", "ingest_defs", "validate"], capture_output=True, text=True)
    assert good.returncode == 0, good.stdout + good.stderr
    assert "ok user_activity" in good.stdout  # all of it, though the command skips the interpreter's teardown


def test_the_command_ends_after_every_exit_handler_with_its_status(tmp_path: Path):
    """`ingest` skips Python's module teardown (a second of every command), not what libraries registered
    to run at exit, nor its status or its last lines."""
    script = (
        "import atexit, sys\n"
        "import ingest_defs.cli as cli\n"
        "command = cli.main\n"
        "def main(argv=None):\n"
        "    atexit.register(lambda: print('exit handler ran', flush=True))\n"
        "    return command(argv)\n"
        "cli.main = main\n"
        "sys.argv = ['ingest', 'validate']\n"
        "from ingest_defs.__main__ import entry\n"
        "entry()\n")
    bad = tmp_path / "pipelines.yaml"
    bad.write_text("pipelines:\n  p:\n    source: {kafka: {}}\n    schema: {columns: {id: {dtype: int64}}}\n    table: t\n")
    for env, status in (({}, 0), ({"INGEST_PIPELINES": str(bad)}, 2)):
        proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                              env={**os.environ, **env})
        assert proc.returncode == status, proc.stdout + proc.stderr
        assert proc.stdout.rstrip().endswith("exit handler ran"), proc.stdout


# ---------------------------------------------------------------- security settings
def _secured(kind: str, security: dict) -> dict:
    source = {"kafka": {"topic": "t"}, "nats": {"stream": "S", "subject": "s.*"}, "mqtt": {"topics": ["a/#"]}}[kind]
    return {**BASE, "source": {kind: {**source, "security": security}}}


@pytest.mark.parametrize("kind,security,key", [
    ("kafka", {"protocol": "sasl_ssl", "sasl_mechanism": "PLAIN", "username": "u", "password": "hunter2"},
     "source.kafka.security.password"),
    ("kafka", {"protocol": "ssl", "cert_file": "c", "key_file": "k", "key_password": "hunter2"},
     "source.kafka.security.key_password"),
    ("nats", {"user": "u", "password": "hunter2"}, "source.nats.security.password"),
    ("nats", {"token": "hunter2"}, "source.nats.security.token"),
    ("mqtt", {"username": "u", "password": "hunter2"}, "source.mqtt.security.password"),
])
def test_a_literal_secret_is_refused_with_the_fix_use_env(kind, security, key):
    with pytest.raises(ConfigError) as err:
        parse_pipeline("p", _secured(kind, security))
    assert err.value.key == key and err.value.pipeline == "p"
    assert "${" in err.value.fix and "hunter2" not in str(err.value)


def test_a_literal_secret_in_kafka_passthrough_config_is_refused():
    raw = with_("source.kafka.config", {"sasl.password": "hunter2"})
    with pytest.raises(ConfigError, match=r"sasl\.password") as err:
        parse_pipeline("p", raw)
    assert "hunter2" not in str(err.value) and "${P_SASL_PASSWORD}" in err.value.fix
    assert parse_pipeline("p", with_("source.kafka.config", {"sasl.password": "${PW}"}))


@pytest.mark.parametrize("kind,security,says", [
    ("kafka", {"protocol": "sasl_ssl", "username": "u", "password": "${PW}"}, "needs sasl_mechanism"),
    ("kafka", {"protocol": "plaintext", "ca_file": "ca.pem"}, "need protocol ssl or sasl_ssl"),
    ("kafka", {"protocol": "ssl", "cert_file": "c.pem"}, "go together"),
    ("nats", {"user": "u", "password": "${PW}", "token": "${T}"}, "one way to authenticate"),
    ("mqtt", {"protocol": "x"}, "remove .protocol."),
])
def test_inconsistent_security_settings_name_the_key(kind, security, says):
    with pytest.raises(ConfigError, match=says) as err:
        parse_pipeline("p", _secured(kind, security))
    assert err.value.key.startswith(f"source.{kind}.security")


def test_env_references_resolve_at_run_time_and_name_the_key_when_missing(monkeypatch, tmp_path):
    from ingest_defs.security import kafka_security, redact

    spec = parse_pipeline("p", _secured("kafka", {
        "protocol": "sasl_ssl", "sasl_mechanism": "SCRAM-SHA-512", "username": "u", "password": "${P_PW}",
        "ca_file": "${P_CA}"}))
    monkeypatch.delenv("P_PW", raising=False)
    monkeypatch.setenv("P_CA", str(tmp_path / "missing.pem"))
    with pytest.raises(ConfigError, match="P_PW is not set") as err:
        kafka_security(spec)
    assert err.value.key == "source.kafka.security.password"
    monkeypatch.setenv("P_PW", "s3cret-value")
    with pytest.raises(ConfigError, match="does not exist") as err:
        kafka_security(spec)
    assert err.value.key == "source.kafka.security.ca_file"
    (tmp_path / "missing.pem").write_text("x")
    config, secrets = kafka_security(spec)
    assert config["sasl.password"] == "s3cret-value" and secrets == ["s3cret-value"]
    assert config["security.protocol"] == "SASL_SSL" and config["ssl.ca.location"].endswith("missing.pem")
    assert redact("auth failed for s3cret-value", secrets) == "auth failed for ***"


def test_nkey_auth_without_the_nkeys_package_names_the_key_and_the_fix(monkeypatch, tmp_path):
    import importlib.util

    from ingest_defs.security import nats_auth

    seed = tmp_path / "user.nk"
    seed.write_text("SU")
    spec = parse_pipeline("p", _secured("nats", {"nkey_seed_file": str(seed)}))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "nkeys" else real(name, *a))
    with pytest.raises(ConfigError, match="nkeys") as err:
        nats_auth(spec, {})
    assert err.value.key == "source.nats.security.nkey_seed_file" and "uv add nkeys" in err.value.fix


def test_credentials_in_a_nats_url_are_never_shown():
    from ingest_defs.security import redact, url_secrets, without_userinfo

    url = "nats://ingest:s3cret@127.0.0.1:4222,tls://tok3n@h:1"
    assert without_userinfo(url) == "nats://127.0.0.1:4222,tls://h:1"
    assert redact(f"cannot connect to {url}", url_secrets(url)).count("***") == 2


# ---------------------------------------------------------------- every mistake at once
MANY_MISTAKES = """\
pipelines:
  clicks:
    source:
      kafka: {topic: clicks, partitons: 3}
    schema:
      columns:
        id: {dtype: int64}
        event: {dtype: string, checks: {isin: click}}
    tabel: bronze/clicks
    batch: {max_messages: lots}
  pages:
    source:
      nats: {stream: PAGES, subject: "pages.*", retention: workque}
    shema:
      columns:
        page: {dtype: string}
    table: bronze/pages
  fine:
    source: {kafka: {topic: fine}}
    schema: {columns: {id: {dtype: int65}}}
    table: bronze/fine
extra_top: 1
"""
EXPECTED = [  # (pipeline, key, part of the fix)
    (None, "extra_top", "only `pipelines:`"),
    ("clicks", "source.kafka.partitons", "did you mean `partitions`?"),
    ("clicks", "batch.max_messages", "whole number"),
    ("clicks", "tabel", "did you mean `table`?"),
    ("clicks", "schema.columns.event.checks.isin", "isin: [a, b]"),
    ("pages", "source.nats.retention", "did you mean `workqueue`?"),
    ("pages", "shema", "did you mean `schema`?"),
    ("fine", "schema.columns.id.dtype", "use one of int8"),
]


def test_every_mistake_in_the_file_is_reported_at_once_with_pipeline_key_and_fix(tmp_path: Path):
    from ingest_defs.config import ConfigErrors

    file = tmp_path / "pipelines.yaml"
    file.write_text(MANY_MISTAKES)
    with pytest.raises(ConfigErrors) as err:
        load_pipelines(file)
    found = [(e.pipeline, e.key, e.fix) for e in err.value.errors]
    for pipeline, key, fix in EXPECTED:
        assert any(p == pipeline and k == key and fix in f for p, k, f in found), (pipeline, key, fix, found)
    assert len(found) == len(EXPECTED), found
    # a misspelt key is not also reported as a missing one elsewhere
    assert not any(k in ("table", "schema") for _, k, _ in found)


def test_ingest_validate_prints_every_mistake(tmp_path: Path):
    file = tmp_path / "pipelines.yaml"
    file.write_text(MANY_MISTAKES)
    proc = subprocess.run([sys.executable, "-m", "ingest_defs", "validate"], capture_output=True, text=True,
                          env={"INGEST_PIPELINES": str(file), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == len(EXPECTED), proc.stderr
    assert f"{len(EXPECTED)} mistakes" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_one_pipelines_mistakes_all_come_from_parse_pipeline():
    from ingest_defs.config import ConfigErrors

    raw = {**BASE, "tabel": "x", "on_gap": "ignore", "batch": {"max_messages": 0}}
    raw.pop("table")
    with pytest.raises(ConfigErrors) as err:
        parse_pipeline("p", raw)
    assert sorted(e.key for e in err.value.errors) == ["batch.max_messages", "on_gap", "tabel"]

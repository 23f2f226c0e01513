"""Pipelines against the secure stack (`ingest stack up --secure`): authentication, ACLs and TLS on.

Right credentials land every message exactly once; a wrong password, an unknown CA, a missing client
certificate or a user without permission fails the run with a message that names the broker and the
cause, and no secret appears in the error, the captured logs, the run config, tags or event metadata.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import pytest

from ingest_defs.config import PipelineSpec, parse_pipeline
from ingest_defs.resources.brokers import source_for
from ingest_defs.sources.base import SourceError
from ingest_defs.stack import manager, secure
from ingest_tests.conftest import (
    USER_ACTIVITY_SCHEMA,
    assert_exactly_once,
    failure_message,
    landed,
    run_job,
    run_until_caught_up,
    unique,
)

pytestmark = pytest.mark.secure

PASSWORD = "${INGEST_SECURE_INGEST_PASSWORD}"
WRONG = "wrong-" + "pw-7f3c9d"  # a value that must never show up anywhere either


@pytest.fixture(scope="session")
def secure_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """One secure stack per test session, started only when these tests run (stopped after, if we started it)."""
    started = manager.status(secure=True) != 0
    if started:
        assert manager.up(secure=True) == 0, "could not start the secure stack"
    layout = secure.Layout(manager.stack_dir() / "secure")
    env = {**secure.client_env(layout), **secure.load_secrets(layout), "INGEST_TEST_WRONG_PASSWORD": WRONG}
    rogue_cert, _ = secure.make_ca(tmp_path_factory.mktemp("rogue-ca"), "rogue CA")
    env["INGEST_TEST_ROGUE_CA"] = str(rogue_cert)
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield env
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    if started:
        manager.down(secure=True)


def secret_values(env: dict[str, str]) -> list[str]:
    return [env[name] for name in secure.secret_names()] + [WRONG]


def assert_no_secret(env: dict[str, str], instance: dg.DagsterInstance, result: dg.ExecuteInProcessResult,
                     captured: str) -> None:
    """No secret in the error, the captured output/logs, the run config, tags or any event (metadata included)."""
    run = result.dagster_run
    texts = {
        "error": failure_message(result) if not result.success else "",
        "captured logs": captured,
        "run config": json.dumps(run.run_config, default=str),
        "tags": json.dumps(run.tags, default=str),
        "events": "\n".join(dg.serialize_value(e) for e in instance.all_logs(run.run_id)),
    }
    for secret in secret_values(env):
        for where, text in texts.items():
            assert secret not in text, f"a secret leaked into the {where}"


def _spec(kind: str, source: dict[str, Any], name: str | None = None) -> PipelineSpec:
    name = name or unique(f"sec{kind[0]}")
    return parse_pipeline(name, {"source": {kind: source}, "schema": USER_ACTIVITY_SCHEMA,
                                 "table": f"bronze/{name}", "batch": {"max_messages": 200, "idle_ms": 300}})


def _payloads(n: int) -> list[bytes]:
    return [json.dumps({"id": i, "event": "click", "value": i}).encode() for i in range(n)]


def _produce(spec: PipelineSpec, n: int) -> None:
    source = source_for(spec)
    try:
        source.ensure_exists()
        assert source.publish(_payloads(n)) == n
    finally:
        source.close()


def _use(monkeypatch: pytest.MonkeyPatch, **env: str) -> None:
    for k, v in env.items():
        monkeypatch.setenv(k, v)


def _failed(spec: PipelineSpec, instance: dg.DagsterInstance, env: dict[str, str], capfd, caplog) -> str:
    result = run_job(spec, instance)
    assert not result.success, "the run should have failed"
    out, err = capfd.readouterr()
    assert_no_secret(env, instance, result, out + err + caplog.text)
    return failure_message(result)


# ---------------------------------------------------------------- Kafka
def kafka_security(env: dict[str, str], mode: str, **changes: str) -> dict[str, Any]:
    if mode == "mtls":
        sec = {"protocol": "ssl", "ca_file": "${INGEST_SECURE_CA_FILE}", "cert_file": "${INGEST_SECURE_CLIENT_CERT}",
               "key_file": "${INGEST_SECURE_CLIENT_KEY}"}
    else:
        sec = {"protocol": "sasl_ssl", "sasl_mechanism": mode, "username": "ingest", "password": PASSWORD,
               "ca_file": "${INGEST_SECURE_CA_FILE}"}
    return {**sec, **changes}


def kafka_spec(env: dict[str, str], mode: str = "SCRAM-SHA-512", topic: str | None = None, **changes: str) -> PipelineSpec:
    name = unique("seck")
    return _spec("kafka", {"topic": topic or f"t_{name}", "security": kafka_security(env, mode, **changes)}, name)


def _kafka_env(monkeypatch: pytest.MonkeyPatch, env: dict[str, str], mode: str) -> None:
    _use(monkeypatch, KAFKA_BOOTSTRAP_SERVERS=env["INGEST_SECURE_KAFKA_MTLS" if mode == "mtls" else "INGEST_SECURE_KAFKA_SASL"])


@pytest.mark.parametrize("mode", ["SCRAM-SHA-512", "PLAIN", "mtls"])
def test_kafka_right_credentials_ingest_exactly_once(secure_env, lake, instance, monkeypatch, capfd, caplog, mode):
    _kafka_env(monkeypatch, secure_env, mode)
    spec = kafka_spec(secure_env, mode)
    _produce(spec, 250)
    results = run_until_caught_up(spec, instance)
    assert_exactly_once(spec, {(0, o) for o in range(250)})
    out, err = capfd.readouterr()
    for result in results:
        assert_no_secret(secure_env, instance, result, out + err + caplog.text)


def test_kafka_refusals_name_the_broker_and_the_cause(secure_env, lake, instance, monkeypatch, capfd, caplog):
    _kafka_env(monkeypatch, secure_env, "SCRAM-SHA-512")
    good = kafka_spec(secure_env)
    _produce(good, 10)
    topic = good.source.kafka.topic

    wrong = kafka_spec(secure_env, topic=topic, password="${INGEST_TEST_WRONG_PASSWORD}")
    message = _failed(wrong, instance, secure_env, capfd, caplog)
    assert "Kafka at 127.0.0.1" in message and "authentication failed" in message, message

    rogue = kafka_spec(secure_env, topic=topic, ca_file="${INGEST_TEST_ROGUE_CA}")
    message = _failed(rogue, instance, secure_env, capfd, caplog)
    assert "Kafka at 127.0.0.1" in message and "TLS failed" in message and "certificate" in message, message

    denied = kafka_spec(secure_env, topic=topic, username="intruder", password="${INGEST_SECURE_INTRUDER_PASSWORD}")
    message = _failed(denied, instance, secure_env, capfd, caplog)
    assert "Kafka at 127.0.0.1" in message and f"topic '{topic}'" in message, message
    assert "Topic authorization failed" in message and "ACL" in message, message

    _kafka_env(monkeypatch, secure_env, "mtls")
    no_cert = _spec("kafka", {"topic": topic, "security": {"protocol": "ssl", "ca_file": "${INGEST_SECURE_CA_FILE}"}})
    message = _failed(no_cert, instance, secure_env, capfd, caplog)
    assert "Kafka at 127.0.0.1" in message and "client certificate" in message, message
    assert landed(good)[0].is_empty()


# ---------------------------------------------------------------- NATS
def nats_spec(env: dict[str, str], stream: str | None = None, **changes: str) -> PipelineSpec:
    name = unique("secn")
    stream = stream or f"S_{name}"
    sec = {"ca_file": "${INGEST_SECURE_CA_FILE}", "user": "ingest", "password": PASSWORD, **changes}
    sec = {k: v for k, v in sec.items() if v is not None}
    return _spec("nats", {"stream": stream, "subject": f"{stream}.*", "ack_wait_seconds": 5, "security": sec}, name)


def test_nats_right_credentials_ingest_exactly_once(secure_env, lake, instance, monkeypatch, capfd, caplog):
    _use(monkeypatch, NATS_URL=secure_env["INGEST_SECURE_NATS_URL"])
    spec = nats_spec(secure_env)
    _produce(spec, 250)
    results = run_until_caught_up(spec, instance)
    assert_exactly_once(spec, {(0, o) for o in range(1, 251)})
    out, err = capfd.readouterr()
    for result in results:
        assert_no_secret(secure_env, instance, result, out + err + caplog.text)


def test_nats_refusals_name_the_broker_and_the_cause(secure_env, lake, instance, monkeypatch, capfd, caplog):
    _use(monkeypatch, NATS_URL=secure_env["INGEST_SECURE_NATS_URL"])
    good = nats_spec(secure_env)
    _produce(good, 10)
    stream = good.source.nats.stream

    message = _failed(nats_spec(secure_env, stream, password="${INGEST_TEST_WRONG_PASSWORD}"), instance, secure_env,
                      capfd, caplog)
    assert "NATS at tls://127.0.0.1" in message and "authentication failed" in message, message

    message = _failed(nats_spec(secure_env, stream, ca_file="${INGEST_TEST_ROGUE_CA}"), instance, secure_env,
                      capfd, caplog)
    assert "NATS at tls://127.0.0.1" in message and "certificate is not trusted" in message, message

    denied = nats_spec(secure_env, stream, user="intruder", password="${INGEST_SECURE_INTRUDER_PASSWORD}")
    message = _failed(denied, instance, secure_env, capfd, caplog)
    assert "NATS at tls://127.0.0.1" in message and "denied this user" in message, message
    assert "permissions violation" in message.lower(), message
    assert landed(good)[0].is_empty()


# ---------------------------------------------------------------- MQTT
def mqtt_spec(env: dict[str, str], topic: str | None = None, name: str | None = None, **changes: str) -> PipelineSpec:
    name = name or unique("secm")
    sec = {"ca_file": "${INGEST_SECURE_CA_FILE}", "username": "ingest", "password": PASSWORD}
    sec = {k: v for k, v in {**sec, **changes}.items() if v is not None}
    return _spec("mqtt", {"topics": [topic or f"sec/{name}/+"], "session_expiry_seconds": 600, "security": sec},
                 name)


@pytest.mark.parametrize("listener", ["password", "mtls"])
def test_mqtt_right_credentials_ingest_exactly_once(secure_env, lake, instance, monkeypatch, capfd, caplog,
                                                    listener):
    if listener == "mtls":
        _use(monkeypatch, MQTT_URL=secure_env["INGEST_SECURE_MQTT_MTLS_URL"])
        spec = mqtt_spec(secure_env, username=None, password=None, cert_file="${INGEST_SECURE_CLIENT_CERT}",
                         key_file="${INGEST_SECURE_CLIENT_KEY}")
    else:
        _use(monkeypatch, MQTT_URL=secure_env["INGEST_SECURE_MQTT_URL"])
        spec = mqtt_spec(secure_env)
    _produce(spec, 250)
    results = run_until_caught_up(spec, instance)
    target, _ = assert_exactly_once(spec, {(0, o) for o in range(250)})
    assert sorted(target["id"].to_list()) == list(range(250))
    out, err = capfd.readouterr()
    for result in results:
        assert_no_secret(secure_env, instance, result, out + err + caplog.text)


def test_mqtt_refusals_name_the_broker_and_the_cause(secure_env, lake, instance, monkeypatch, capfd, caplog):
    _use(monkeypatch, MQTT_URL=secure_env["INGEST_SECURE_MQTT_URL"])
    message = _failed(mqtt_spec(secure_env, password="${INGEST_TEST_WRONG_PASSWORD}"), instance, secure_env,
                      capfd, caplog)
    assert "MQTT broker at 127.0.0.1" in message and "Not authorized" in message and "password" in message, message

    message = _failed(mqtt_spec(secure_env, ca_file="${INGEST_TEST_ROGUE_CA}"), instance, secure_env, capfd, caplog)
    assert "MQTT broker at 127.0.0.1" in message and "certificate is not trusted" in message, message

    # Denied by the ACL file: Mosquitto answers SUBACK 0x87 and would then deliver nothing, silently.
    denied = mqtt_spec(secure_env, username="intruder", password="${INGEST_SECURE_INTRUDER_PASSWORD}")
    message = _failed(denied, instance, secure_env, capfd, caplog)
    assert "MQTT broker at 127.0.0.1" in message and "0x87" in message and "ACL" in message, message
    # ... and a publish it denies comes back as PUBACK 0x87 (Mosquitto drops the message): the producer fails.
    with pytest.raises(SourceError, match=r"refused 3 of 3 publishes \(Not authorized"):
        source_for(denied).publish(_payloads(3))
    with pytest.raises(SourceError, match="refused the publisher: Not authorized") as err:
        source_for(mqtt_spec(secure_env, password="${INGEST_TEST_WRONG_PASSWORD}")).publish(_payloads(1))
    assert WRONG not in str(err.value)

    _use(monkeypatch, MQTT_URL=secure_env["INGEST_SECURE_MQTT_MTLS_URL"])
    message = _failed(mqtt_spec(secure_env, username=None, password=None), instance, secure_env, capfd, caplog)
    assert "MQTT broker at 127.0.0.1" in message and "client certificate" in message, message


def test_secure_stack_files_hold_no_secret_on_a_command_line(secure_env):
    """Passwords live in files only (mode 600), never in a broker's argv or the stack's logs."""
    layout = secure.Layout(manager.stack_dir() / "secure")
    assert layout.secrets_file.stat().st_mode & 0o077 == 0
    for b in manager._brokers(secure=True):
        pid = manager._our_pid(b)
        assert pid is not None, f"{b.label} is not running"
        argv = " ".join(manager._cmdline(pid))
        log = Path(b.logfile).read_text(errors="replace")
        for secret in secret_values(secure_env):
            assert secret not in argv, f"a secret is on {b.label}'s command line"
            assert secret not in log, f"a secret is in {b.label}'s log"


def _own_nats(tmp_path: Path, secure_env: dict[str, str], auth: str, verify: bool) -> Iterator[str]:
    """A nats-server of this test's own, TLS with the secure stack's certificates (the stack's server has a
    users list, and nats-server allows neither a token next to it nor client certificates for only some)."""
    import shutil
    import socket
    import subprocess

    layout = secure.Layout(manager.stack_dir() / "secure")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    conf = tmp_path / "nats.conf"
    conf.write_text(
        f'listen: "127.0.0.1:{port}"\n'
        f'tls {{ cert_file: "{layout.server_cert}", key_file: "{layout.server_key}", ca_file: "{layout.ca}", '
        f'verify: {str(verify).lower()} }}\n'
        f"{auth}\n"
        f'jetstream {{ store_dir: "{tmp_path / "js"}" }}\n')
    conf.chmod(0o600)
    server = subprocess.Popen([shutil.which("nats-server") or "/usr/sbin/nats-server", "-c", str(conf)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        from ingest_tests.conftest import wait_for

        wait_for(lambda: manager._tcp_open("127.0.0.1", port, 0.2), timeout=20)
        yield f"tls://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(timeout=20)


@pytest.fixture
def token_nats(tmp_path: Path, secure_env: dict[str, str]) -> Iterator[tuple[str, str]]:
    import secrets as pysecrets

    token = pysecrets.token_urlsafe(16)
    for url in _own_nats(tmp_path, secure_env, f'authorization {{ token: "{token}" }}', verify=False):
        yield url, token


@pytest.fixture
def mtls_nats(tmp_path: Path, secure_env: dict[str, str]) -> Iterator[str]:
    yield from _own_nats(tmp_path, secure_env, "", verify=True)


def test_nats_client_certificate_required_ingests_and_missing_one_fails(secure_env, mtls_nats, lake, instance,
                                                                         monkeypatch, capfd, caplog):
    _use(monkeypatch, NATS_URL=mtls_nats)
    spec = nats_spec(secure_env, user=None, password=None, cert_file="${INGEST_SECURE_CLIENT_CERT}",
                     key_file="${INGEST_SECURE_CLIENT_KEY}")
    _produce(spec, 120)
    run_until_caught_up(spec, instance)
    assert_exactly_once(spec, {(0, o) for o in range(1, 121)})
    no_cert = nats_spec(secure_env, spec.source.nats.stream, user=None, password=None)
    message = _failed(no_cert, instance, secure_env, capfd, caplog)
    assert f"NATS at {mtls_nats} refused the connection: TLS handshake failed" in message, message
    assert "cert_file/key_file" in message, message


def test_nats_token_over_tls_ingests_and_a_wrong_token_is_refused(secure_env, token_nats, lake, instance,
                                                                     monkeypatch, capfd, caplog):
    url, token = token_nats
    _use(monkeypatch, NATS_URL=url, INGEST_TEST_NATS_TOKEN=token)
    env = {**secure_env, "INGEST_TEST_NATS_TOKEN": token}
    spec = nats_spec(env, user=None, password=None, token="${INGEST_TEST_NATS_TOKEN}")
    _produce(spec, 120)
    results = run_until_caught_up(spec, instance)
    assert_exactly_once(spec, {(0, o) for o in range(1, 121)})
    out, err = capfd.readouterr()
    for result in results:
        assert_no_secret(env, instance, result, out + err + caplog.text)
        assert token not in out + err + caplog.text
    wrong = nats_spec(env, spec.source.nats.stream, user=None, password=None, token="${INGEST_TEST_WRONG_PASSWORD}")
    message = _failed(wrong, instance, env, capfd, caplog)
    assert f"NATS at {url}" in message and "authentication failed" in message, message
    assert token not in message


def test_nats_nkey_seed_file_ingests_exactly_once(secure_env, lake, instance, monkeypatch, capfd, caplog):
    _use(monkeypatch, NATS_URL=secure_env["INGEST_SECURE_NATS_URL"])
    spec = nats_spec(secure_env, user=None, password=None, nkey_seed_file="${INGEST_SECURE_NKEY_SEED_FILE}")
    _produce(spec, 120)
    results = run_until_caught_up(spec, instance)
    assert_exactly_once(spec, {(0, o) for o in range(1, 121)})
    seed = Path(secure_env["INGEST_SECURE_NKEY_SEED_FILE"]).read_text().strip()
    out, err = capfd.readouterr()
    for result in results:
        assert_no_secret({**secure_env, "INGEST_TEST_SEED": seed}, instance, result, out + err + caplog.text)
        assert seed not in out + err + caplog.text


def test_environment_settings_without_a_security_block(secure_env, lake, instance, monkeypatch, capfd, caplog):
    """The broker resources' own settings (Dagster EnvVars for the secrets) when a pipeline has no block."""
    _use(monkeypatch, KAFKA_BOOTSTRAP_SERVERS=secure_env["INGEST_SECURE_KAFKA_SASL"],
         KAFKA_SECURITY_PROTOCOL="SASL_SSL", KAFKA_SASL_MECHANISM="SCRAM-SHA-512", KAFKA_SASL_USERNAME="ingest",
         KAFKA_SASL_PASSWORD=secure_env["INGEST_SECURE_INGEST_PASSWORD"],
         KAFKA_SSL_CA_LOCATION=secure_env["INGEST_SECURE_CA_FILE"],
         MQTT_URL=secure_env["INGEST_SECURE_MQTT_URL"], MQTT_USERNAME="ingest",
         MQTT_PASSWORD=secure_env["INGEST_SECURE_INGEST_PASSWORD"], MQTT_TLS_CA_FILE=secure_env["INGEST_SECURE_CA_FILE"])
    name = unique("seck")
    kafka = _spec("kafka", {"topic": f"t_{name}"}, name)
    mqtt = _spec("mqtt", {"topics": [f"sec/{name}/+"], "session_expiry_seconds": 600})
    for spec, first in ((kafka, 0), (mqtt, 0)):
        _produce(spec, 100)
        results = run_until_caught_up(spec, instance)
        assert_exactly_once(spec, {(0, o) for o in range(first, first + 100)})
        out, err = capfd.readouterr()
        for result in results:
            assert_no_secret(secure_env, instance, result, out + err + caplog.text)

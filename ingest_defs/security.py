"""Broker security settings → client options, resolved at run time; secrets only from the environment.

A pipeline's `source.<broker>.security` block (see config.py) replaces the environment's settings
(`KafkaResource`/`NatsResource`/`MqttResource`) for that pipeline. `${ENV}` references are expanded here,
inside the run's process, so the values never reach run config, tags, metadata or the UI. Every source
keeps the secret values it resolved in `secrets`, and `redact` removes them from any text that leaves it
(error messages, log lines) in case a client library echoes one.
"""

from __future__ import annotations

import os
import re
import ssl
from dataclasses import dataclass, field
from typing import Any

from ingest_defs.config import (
    ConfigError,
    KafkaSecuritySpec,
    MqttSecuritySpec,
    NatsSecuritySpec,
    PipelineSpec,
    TlsSpec,
    expand_env,
)

REDACTED = "***"


def redact(text: str, secrets: tuple[str, ...] | list[str]) -> str:
    """`text` with every secret value replaced (longest first, so a secret containing another is covered)."""
    for secret in sorted((s for s in secrets if s), key=len, reverse=True):
        text = text.replace(secret, REDACTED)
    return text


def without_userinfo(url: str) -> str:
    """`url` as it may be shown: `nats://user:secret@host:4222` → `nats://host:4222` (each of a comma list)."""
    return ",".join(re.sub(r"(^[a-z]+://)[^@/]*@", r"\1", u.strip()) for u in str(url).split(","))


def url_secrets(url: str) -> list[str]:
    """The secrets written into a URL's userinfo (`user:password@` or a bare `token@`)."""
    found = []
    for u in str(url).split(","):
        match = re.match(r"^[a-z]+://([^@/]*)@", u.strip())
        if match:
            user, _, password = match.group(1).partition(":")
            found.append(password or user)
    return [f for f in found if f]


@dataclass(frozen=True)
class Tls:
    """Resolved TLS settings: files checked to exist, key password expanded."""

    enabled: bool = False
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    key_password: str | None = None

    def context(self) -> ssl.SSLContext:
        """A client context that verifies the broker (hostname included) against `ca_file` or the system CAs."""
        ctx = ssl.create_default_context(cafile=self.ca_file)
        if self.cert_file:
            ctx.load_cert_chain(self.cert_file, self.key_file, password=self.key_password)
        return ctx


@dataclass
class _Resolver:
    """Expands one pipeline's settings; collects the secrets it resolved."""

    pipeline: str
    prefix: str
    secrets: list[str] = field(default_factory=list)

    def value(self, key: str, raw: str | None) -> str | None:
        return None if raw is None else expand_env(self.pipeline, f"{self.prefix}.{key}", raw)

    def secret(self, key: str, raw: str | None) -> str | None:
        value = self.value(key, raw)
        if value:
            self.secrets.append(value)
        return value

    def file(self, key: str, raw: str | None) -> str | None:
        path = self.value(key, raw)
        if path is not None and not os.path.isfile(path):
            raise ConfigError(self.pipeline, f"{self.prefix}.{key}", f"file '{path}' does not exist",
                              "fix the path (it is read on the machine that runs the batch)")
        return path

    def tls(self, spec: TlsSpec, enabled: bool) -> Tls:
        return Tls(enabled=enabled or bool(spec.ca_file or spec.cert_file),
                   ca_file=self.file("ca_file", spec.ca_file), cert_file=self.file("cert_file", spec.cert_file),
                   key_file=self.file("key_file", spec.key_file),
                   key_password=self.secret("key_password", spec.key_password))


# ---------------------------------------------------------------- Kafka
def kafka_security(spec: PipelineSpec) -> tuple[dict[str, Any], list[str]]:
    """librdkafka settings of the pipeline's `security` block (empty without one) and its secret values."""
    kafka = spec.source.kafka
    sec: KafkaSecuritySpec | None = kafka.security if kafka else None
    if sec is None:
        return {}, []
    r = _Resolver(spec.name, "source.kafka.security")
    config: dict[str, Any] = {"security.protocol": sec.protocol.upper()}
    if sec.protocol.startswith("sasl_"):
        config.update({"sasl.mechanism": sec.sasl_mechanism, "sasl.username": r.value("username", sec.username),
                       "sasl.password": r.secret("password", sec.password)})
    tls = r.tls(sec, enabled=sec.protocol.endswith("ssl"))
    optional = {"ssl.ca.location": tls.ca_file, "ssl.certificate.location": tls.cert_file,
                "ssl.key.location": tls.key_file, "ssl.key.password": tls.key_password}
    config.update({k: v for k, v in optional.items() if v})
    return config, r.secrets


def kafka_secrets(config: dict[str, Any]) -> list[str]:
    """The secret values in a librdkafka config (whatever set them: environment, resource, passthrough)."""
    from ingest_defs.config import KAFKA_SECRET_KEYS

    return [str(v) for k, v in config.items() if v and any(word in k for word in KAFKA_SECRET_KEYS)]


# ---------------------------------------------------------------- NATS
@dataclass(frozen=True)
class NatsAuth:
    """How a NATS source connects: TLS plus at most one identity."""

    tls: Tls = Tls()
    user: str | None = None
    password: str | None = None
    token: str | None = None
    nkey_seed_file: str | None = None
    creds_file: str | None = None
    secrets: tuple[str, ...] = ()

    def connect_options(self, url: str) -> dict[str, Any]:
        options: dict[str, Any] = {}
        if self.tls.enabled or url.startswith("tls://"):
            options["tls"] = self.tls.context()
        optional = {"user": self.user, "password": self.password, "token": self.token,
                    "nkeys_seed": self.nkey_seed_file, "user_credentials": self.creds_file}
        options.update({k: v for k, v in optional.items() if v})
        return options


def nats_auth(spec: PipelineSpec, connection: Any) -> NatsAuth:
    """The pipeline's `security` block if it has one, else the resource's (environment) settings."""
    nats = spec.source.nats
    sec: NatsSecuritySpec | None = nats.security if nats else None
    if sec is not None:
        r = _Resolver(spec.name, "source.nats.security")
        if sec.nkey_seed_file or sec.creds_file:
            _require_nkeys(spec.name, "nkey_seed_file" if sec.nkey_seed_file else "creds_file")
        return NatsAuth(tls=r.tls(sec, enabled=sec.tls), user=r.value("user", sec.user),
                        password=r.secret("password", sec.password), token=r.secret("token", sec.token),
                        nkey_seed_file=r.file("nkey_seed_file", sec.nkey_seed_file),
                        creds_file=r.file("creds_file", sec.creds_file), secrets=tuple(r.secrets))
    get = connection.get if isinstance(connection, dict) else lambda k, d=None: getattr(connection, k, d)
    ca, cert, key = get("tls_ca_file"), get("tls_cert_file"), get("tls_key_file")
    password, token = get("password"), get("token")
    return NatsAuth(tls=Tls(enabled=bool(ca or cert), ca_file=ca, cert_file=cert, key_file=key),
                    user=get("user"), password=password, token=token, nkey_seed_file=get("nkey_seed_file"),
                    creds_file=get("creds_file"), secrets=tuple(s for s in (password, token) if s))


def _require_nkeys(pipeline: str, key: str) -> None:
    """nats-py signs NKey/JWT challenges with the optional `nkeys` package; say so before connecting."""
    import importlib.util

    if importlib.util.find_spec("nkeys") is None:
        raise ConfigError(pipeline, f"source.nats.security.{key}", "NKey and credentials-file authentication "
                          "need the `nkeys` package, which is not installed",
                          "add `nkeys` to the project's dependencies (uv add nkeys), or use user/password or token")


# ---------------------------------------------------------------- MQTT
@dataclass(frozen=True)
class MqttAuth:
    tls: Tls = Tls()
    username: str | None = None
    password: str | None = None
    secrets: tuple[str, ...] = ()


def mqtt_auth(spec: PipelineSpec, resource: Any, url_tls: bool) -> MqttAuth:
    """The pipeline's `security` block if it has one, else the resource's (environment) settings."""
    mqtt = spec.source.mqtt
    sec: MqttSecuritySpec | None = mqtt.security if mqtt else None
    if sec is not None:
        r = _Resolver(spec.name, "source.mqtt.security")
        return MqttAuth(tls=r.tls(sec, enabled=sec.tls or url_tls), username=r.value("username", sec.username),
                        password=r.secret("password", sec.password), secrets=tuple(r.secrets))
    get = lambda k: getattr(resource, k, None)  # noqa: E731
    ca, cert, key = get("tls_ca_file"), get("tls_cert_file"), get("tls_key_file")
    password = get("password")
    return MqttAuth(tls=Tls(enabled=url_tls or bool(ca or cert), ca_file=ca, cert_file=cert, key_file=key),
                    username=get("username"), password=password, secrets=(password,) if password else ())

"""Broker connections as Dagster resources, configured from the environment.

Addresses come from KAFKA_BOOTSTRAP_SERVERS, NATS_URL and MQTT_URL; security settings from the variables
read in `resources_from_env` (see the README's security section). Secrets are `dg.EnvVar`s, so they never
appear in run config, logs or the UI. A pipeline's own `source.<broker>.security` block replaces these.
"""

from __future__ import annotations

import os
from typing import Any

import dagster as dg

from ingest_defs.config import PipelineSpec
from ingest_defs.shards import Shard
from ingest_defs.sources.base import Source

DEFAULT_KAFKA = "localhost:9092"
DEFAULT_NATS = "nats://localhost:4222"
DEFAULT_MQTT = "mqtt://localhost:1883"


class KafkaResource(dg.ConfigurableResource):
    """librdkafka connection settings shared by every Kafka pipeline (per-pipeline `config` overrides)."""

    bootstrap_servers: str = DEFAULT_KAFKA
    security_protocol: str | None = None
    sasl_mechanism: str | None = None
    sasl_username: str | None = None
    sasl_password: str | None = None
    ssl_ca_location: str | None = None
    ssl_certificate_location: str | None = None
    ssl_key_location: str | None = None
    ssl_key_password: str | None = None

    def client_config(self) -> dict[str, Any]:
        config: dict[str, Any] = {"bootstrap.servers": self.bootstrap_servers}
        optional = {
            "security.protocol": self.security_protocol,
            "sasl.mechanism": self.sasl_mechanism,
            "sasl.username": self.sasl_username,
            "sasl.password": self.sasl_password,
            "ssl.ca.location": self.ssl_ca_location,
            "ssl.certificate.location": self.ssl_certificate_location,
            "ssl.key.location": self.ssl_key_location,
            "ssl.key.password": self.ssl_key_password,
        }
        config.update({k: v for k, v in optional.items() if v})
        return config

    def source_for(self, spec: PipelineSpec, shard: Shard | None = None) -> Source:
        from ingest_defs.sources.kafka import KafkaSource

        return KafkaSource(spec, self.client_config(), shard)


class NatsResource(dg.ConfigurableResource):
    url: str = DEFAULT_NATS
    user: str | None = None
    password: str | None = None
    token: str | None = None
    creds_file: str | None = None
    nkey_seed_file: str | None = None
    tls_ca_file: str | None = None
    tls_cert_file: str | None = None
    tls_key_file: str | None = None

    def source_for(self, spec: PipelineSpec) -> Source:
        from ingest_defs.sources.nats import NatsSource

        return NatsSource(spec, self)


class MqttResource(dg.ConfigurableResource):
    url: str = DEFAULT_MQTT
    username: str | None = None
    password: str | None = None
    tls_ca_file: str | None = None
    tls_cert_file: str | None = None
    tls_key_file: str | None = None

    def source_for(self, spec: PipelineSpec) -> Source:
        from ingest_defs.sources.mqtt import MqttSource

        return MqttSource(spec, self)


def _secret(name: str) -> Any:
    """An EnvVar when the variable is set (resolved at run time, masked in the UI), else None."""
    return dg.EnvVar(name) if os.environ.get(name) else None


def resources_from_env() -> dict[str, dg.ConfigurableResource]:
    return {
        "kafka": KafkaResource(
            bootstrap_servers=os.environ.get("KAFKA_BOOTSTRAP_SERVERS", DEFAULT_KAFKA),
            security_protocol=os.environ.get("KAFKA_SECURITY_PROTOCOL"),
            sasl_mechanism=os.environ.get("KAFKA_SASL_MECHANISM"),
            sasl_username=_secret("KAFKA_SASL_USERNAME"),
            sasl_password=_secret("KAFKA_SASL_PASSWORD"),
            ssl_ca_location=os.environ.get("KAFKA_SSL_CA_LOCATION"),
            ssl_certificate_location=os.environ.get("KAFKA_SSL_CERTIFICATE_LOCATION"),
            ssl_key_location=os.environ.get("KAFKA_SSL_KEY_LOCATION"),
            ssl_key_password=_secret("KAFKA_SSL_KEY_PASSWORD"),
        ),
        "nats": NatsResource(
            url=os.environ.get("NATS_URL", DEFAULT_NATS),
            user=_secret("NATS_USER"),
            password=_secret("NATS_PASSWORD"),
            token=_secret("NATS_TOKEN"),
            creds_file=os.environ.get("NATS_CREDS_FILE"),
            nkey_seed_file=os.environ.get("NATS_NKEY_SEED_FILE"),
            tls_ca_file=os.environ.get("NATS_TLS_CA_FILE"),
            tls_cert_file=os.environ.get("NATS_TLS_CERT_FILE"),
            tls_key_file=os.environ.get("NATS_TLS_KEY_FILE"),
        ),
        "mqtt": MqttResource(
            url=os.environ.get("MQTT_URL", DEFAULT_MQTT),
            username=_secret("MQTT_USERNAME"),
            password=_secret("MQTT_PASSWORD"),
            tls_ca_file=os.environ.get("MQTT_TLS_CA_FILE"),
            tls_cert_file=os.environ.get("MQTT_TLS_CERT_FILE"),
            tls_key_file=os.environ.get("MQTT_TLS_KEY_FILE"),
        ),
    }


def source_for(spec: PipelineSpec, resources: dict[str, Any] | None = None, shard: Shard | None = None) -> Source:
    """The source of a pipeline (or of one shard of it), outside Dagster (CLI, tests, benchmarks)."""
    resources = resources or resources_from_env()
    resource = resources[spec.source.kind].process_config_and_initialize()  # resolves EnvVars
    return resource.source_for(spec, shard) if shard is not None else resource.source_for(spec)

"""The schema registry client: schemas by id (cached for the process), a subject's newest version, and
registration for producers. Built on confluent-kafka's SchemaRegistryClient (its bounded retries with
backoff, basic auth, CA file); only the Protobuf route differs from the Confluent deserializers, see
formats/protobuf.py.

Two kinds of trouble, kept apart:
* the registry cannot be asked (down, slow, 5xx after the retries, refused credentials): an
  infrastructure failure, `RegistryUnavailable` — the batch fails before any commit and nothing is
  acknowledged; the next run reads the same range again;
* the registry answers that it has no such schema id or subject: data it cannot explain — the caller
  quarantines those messages.

Schemas by id are immutable, so they are cached per process by (registry, id): a replay decodes each
message with exactly the schema its id names. Newest versions are never cached across batches.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import Any

from ingest_defs.config import ConfigError, SchemaRegistrySpec, expand_env
from ingest_defs.stack.registry import DEFAULT_URL, base_url_without_credentials

SCHEMA_NOT_FOUND = 40403
SUBJECT_NOT_FOUND = 40401
VERSION_NOT_FOUND = 40402


class RegistryUnavailable(RuntimeError):
    """The schema registry could not be asked: the batch must fail before any commit (nothing is acked)."""


@dataclass(frozen=True)
class Reference:
    name: str
    subject: str
    version: int


@dataclass(frozen=True)
class RegisteredSchema:
    id: int
    schema_type: str  # AVRO | PROTOBUF | JSON
    text: str
    references: tuple[Reference, ...] = ()
    subject: str | None = None
    version: int | None = None


def registry_url(spec: SchemaRegistrySpec, pipeline: str) -> str:
    value = spec.url or os.environ.get("SCHEMA_REGISTRY_URL") or DEFAULT_URL
    return str(expand_env(pipeline, "schema_registry.url", value))


class Registry:
    """One registry (URL + credentials), shared by every pipeline of the process that uses it."""

    def __init__(self, url: str, conf: dict[str, Any], attempts: int):
        # imported here: it costs ~0.5 s, and the code location must stay cheap to load
        from confluent_kafka.schema_registry import SchemaRegistryClient

        self.url = base_url_without_credentials(url)  # as shown in messages: never credentials
        self._client = SchemaRegistryClient(conf)
        self._attempts = attempts
        self._by_id: dict[int, RegisteredSchema | None] = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------ reading
    def schema(self, schema_id: int) -> RegisteredSchema | None:
        """The schema with this id, or None when the registry has none (never registered, or deleted)."""
        with self._lock:
            if schema_id in self._by_id and self._by_id[schema_id] is not None:
                return self._by_id[schema_id]
        try:
            found = self._call(lambda: self._client.get_schema(schema_id), f"schema id {schema_id}")
        except _NotFound:
            return None  # not cached: a schema registered later under a reused id is found then
        registered = _registered(found, schema_id)
        with self._lock:
            self._by_id[schema_id] = registered
        return registered

    def latest(self, subject: str) -> RegisteredSchema | None:
        """The subject's newest version (always asked: the reader schema may have evolved), or None."""
        try:
            found = self._call(lambda: self._fresh_latest(subject), f"subject '{subject}'")
        except _NotFound:
            return None
        return RegisteredSchema(found.schema_id, found.schema.schema_type or "AVRO", found.schema.schema_str,
                                _references(found.schema), found.subject, found.version)

    def version(self, subject: str, version: int) -> RegisteredSchema | None:
        try:
            found = self._call(lambda: self._client.get_version(subject, version), f"subject '{subject}' v{version}")
        except _NotFound:
            return None
        return RegisteredSchema(found.schema_id, found.schema.schema_type or "AVRO", found.schema.schema_str,
                                _references(found.schema), found.subject, found.version)

    def _fresh_latest(self, subject: str) -> Any:
        self._client.clear_latest_caches()
        return self._client.get_latest_version(subject)

    # ------------------------------------------------------------ writing (producers, tests)
    def register(self, subject: str, text: str, schema_type: str, references: tuple[Reference, ...] = ()) -> int:
        """Register (or find) the schema under the subject; its id. An incompatible schema raises."""
        from confluent_kafka.schema_registry import Schema, SchemaReference

        schema = Schema(text, schema_type, [SchemaReference(r.name, r.subject, r.version) for r in references])
        return int(self._call(lambda: self._client.register_schema(subject, schema), f"registering under '{subject}'",
                              not_found_is_data=False))

    # ------------------------------------------------------------ errors
    def _call(self, fn: Any, what: str, not_found_is_data: bool = True) -> Any:
        from confluent_kafka.schema_registry.error import SchemaRegistryError

        try:
            return fn()
        except SchemaRegistryError as exc:
            status = exc.http_status_code
            if not_found_is_data and status == 404:
                raise _NotFound() from None
            if status in (401, 403):
                raise RegistryUnavailable(
                    f"schema registry {self.url} refused the credentials (HTTP {status}) while fetching {what}: "
                    "check schema_registry.security.username/password (their environment variables)") from None
            if status == 409 or status == 422:
                raise SchemaRejected(f"schema registry {self.url} refused {what}: HTTP {status}: "
                                     f"{exc.error_message}") from None
            raise RegistryUnavailable(
                f"schema registry {self.url} answered HTTP {status} ({exc.error_message}) while fetching {what}, "
                f"after {self._attempts} attempt(s)") from None
        except (OSError, ValueError) as exc:
            raise RegistryUnavailable(f"schema registry {self.url} could not be reached while fetching {what} "
                                      f"({type(exc).__name__}: {exc})") from None
        except Exception as exc:  # httpx transport errors (connect, read timeout) after the client's retries
            if type(exc).__module__.startswith(("httpx", "httpcore")):
                raise RegistryUnavailable(
                    f"schema registry {self.url} is unreachable while fetching {what} after {self._attempts} "
                    f"attempt(s) ({type(exc).__name__}: {str(exc) or 'no answer'})") from None
            raise


class SchemaRejected(RuntimeError):
    """The registry refused a registration (e.g. incompatible with the subject's compatibility rule)."""


class _NotFound(Exception):
    pass


def _references(schema: Any) -> tuple[Reference, ...]:
    return tuple(Reference(r.name, r.subject, r.version) for r in (schema.references or []))


def _registered(schema: Any, schema_id: int) -> RegisteredSchema:
    return RegisteredSchema(schema_id, schema.schema_type or "AVRO", schema.schema_str, _references(schema))


_REGISTRIES: dict[tuple[Any, ...], Registry] = {}
_REGISTRIES_LOCK = threading.Lock()


def registry_for(spec: SchemaRegistrySpec, pipeline: str) -> Registry:
    """The process's client for this registry (schemas by id are cached for the process)."""
    url = registry_url(spec, pipeline)
    security = spec.security
    user = password = ca = None
    if security is not None:
        user = expand_env(pipeline, "schema_registry.security.username", security.username)
        password = expand_env(pipeline, "schema_registry.security.password", security.password)
        ca = expand_env(pipeline, "schema_registry.security.ca_file", security.ca_file)
        if ca and not os.path.exists(ca):
            raise ConfigError(pipeline, "schema_registry.security.ca_file", f"{ca} does not exist",
                              "point it at the PEM file of the CA that signed the registry's certificate")
    key = (url, user, password, ca, spec.timeout_seconds, spec.max_retries)
    with _REGISTRIES_LOCK:
        if key not in _REGISTRIES:
            conf: dict[str, Any] = {"url": url, "timeout": spec.timeout_seconds, "max.retries": spec.max_retries,
                                    "retries.wait.ms": 200, "retries.max.wait.ms": 2000}
            if user is not None:
                conf["basic.auth.user.info"] = f"{user}:{password}"
            if ca:
                conf["ssl.ca.location"] = ca
            _REGISTRIES[key] = Registry(url, conf, spec.max_retries + 1)
        return _REGISTRIES[key]

"""The pipelines file: typed models, loading, and error messages that name the pipeline, the key and the fix.

Every other module takes a `PipelineSpec`; nothing else reads YAML.
"""

from __future__ import annotations

import difflib
import importlib
import os
import re
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

import pandera.polars as pa
import polars as pl
import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from ingest_defs import storage
from ingest_defs.storage import is_secret_key

PACKAGE_DIR = Path(__file__).resolve().parent
REPO_ROOT = PACKAGE_DIR.parent
DEFAULT_PIPELINES_FILE = PACKAGE_DIR / "pipelines.yaml"
PIPELINE_NAME = re.compile(r"^[a-z][a-z0-9_]*$")

# YAML dtype names → polars dtypes. Datetimes are parsed from ISO-8601 strings into UTC.
DTYPES: dict[str, pl.DataType] = {
    "int8": pl.Int8(),
    "int16": pl.Int16(),
    "int32": pl.Int32(),
    "int64": pl.Int64(),
    "uint8": pl.UInt8(),
    "uint16": pl.UInt16(),
    "uint32": pl.UInt32(),
    "uint64": pl.UInt64(),
    "float32": pl.Float32(),
    "float64": pl.Float64(),
    "string": pl.String(),
    "bool": pl.Boolean(),
    "date": pl.Date(),
    "datetime": pl.Datetime("us", "UTC"),
}
DTYPE_ALIASES = {"str": "string", "utf8": "string", "boolean": "bool", "float": "float64", "int": "int64",
                 "double": "float64", "long": "int64", "timestamp": "datetime"}

# Column checks a YAML schema may use: name → how its argument is passed to pandera.Check.
CHECKS: dict[str, str] = {
    "eq": "value", "ne": "value", "gt": "value", "ge": "value", "lt": "value", "le": "value",
    "isin": "list", "notin": "list", "str_matches": "value", "str_contains": "value",
    "str_startswith": "value", "str_endswith": "value", "str_length": "kwargs", "in_range": "kwargs",
}
CHECK_ALIASES = {"greater_than_or_equal_to": "ge", "less_than_or_equal_to": "le", "greater_than": "gt",
                 "less_than": "lt", "equal_to": "eq", "not_equal_to": "ne"}


class ConfigError(ValueError):
    """A mistake in the pipelines file: says which pipeline, which key, and how to fix it."""

    def __init__(self, pipeline: str | None, key: str, problem: str, fix: str, file: Path | None = None):
        self.pipeline, self.key, self.problem, self.fix, self.file = pipeline, key, problem, fix, file
        where = f"pipeline '{pipeline}'" if pipeline else "pipelines file"
        src = f" ({file})" if file else ""
        super().__init__(f"{where}{src}: key '{key}': {problem}. Fix: {fix}")


class ConfigErrors(ConfigError):
    """Every mistake found in the pipelines file at once, each naming its pipeline, key and fix. Behaves as
    its first mistake where one ConfigError is expected."""

    def __init__(self, errors: list[ConfigError]):
        self.errors = errors
        first = errors[0]
        self.pipeline, self.key, self.problem, self.fix, self.file = (first.pipeline, first.key, first.problem,
                                                                     first.fix, first.file)
        ValueError.__init__(self, f"{len(errors)} mistakes:\n" + "\n".join(f"  - {e}" for e in errors))


def raise_all(errors: list[ConfigError]) -> None:
    """Raise the one mistake as it is, several as ConfigErrors; nothing if there is none."""
    if len(errors) == 1:
        raise errors[0]
    if errors:
        raise ConfigErrors(errors)


def _flatten(exc: ConfigError) -> list[ConfigError]:
    return list(exc.errors) if isinstance(exc, ConfigErrors) else [exc]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# ---------------------------------------------------------------- security
# Secret settings must be a reference to an environment variable, never the value itself: the pipelines
# file is committed, shown in the UI and copied around. Paths and user names may be literal or ${ENV}.
SECRET_REF = re.compile(r"^\$\{[A-Za-z_][A-Za-z0-9_]*\}$")
LITERAL_SECRET = "a literal secret is not allowed here"
# librdkafka keys (in source.kafka.config) whose values are secrets.
KAFKA_SECRET_KEYS = ("password", "secret", "sasl.jaas.config", "ssl.key.pem", "ssl_key.pem")


def _secret_ref(value: str | None) -> str | None:
    if value is not None and not SECRET_REF.match(value):
        raise ValueError(LITERAL_SECRET)
    return value


class TlsSpec(_Strict):
    """TLS towards the broker: the CA that signed its certificate, and our client certificate (mTLS)."""

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    key_password: str | None = None

    _key_password_ref = field_validator("key_password")(classmethod(lambda cls, v: _secret_ref(v)))

    @model_validator(mode="after")
    def _cert_and_key(self) -> TlsSpec:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together (the client certificate and its private key)")
        return self


class KafkaSecuritySpec(TlsSpec):
    protocol: Literal["plaintext", "ssl", "sasl_plaintext", "sasl_ssl"] = "plaintext"
    sasl_mechanism: Literal["SCRAM-SHA-512", "SCRAM-SHA-256", "PLAIN"] | None = None
    username: str | None = None
    password: str | None = None

    _password_ref = field_validator("password")(classmethod(lambda cls, v: _secret_ref(v)))

    @model_validator(mode="after")
    def _consistent(self) -> KafkaSecuritySpec:
        sasl = self.protocol.startswith("sasl_")
        if sasl and not (self.sasl_mechanism and self.username and self.password):
            raise ValueError(f"protocol {self.protocol} needs sasl_mechanism, username and password")
        if not sasl and (self.sasl_mechanism or self.username or self.password):
            raise ValueError(f"sasl_mechanism/username/password need protocol sasl_ssl (is {self.protocol})")
        if self.protocol in ("plaintext", "sasl_plaintext") and (self.ca_file or self.cert_file):
            raise ValueError(f"ca_file/cert_file need protocol ssl or sasl_ssl (is {self.protocol})")
        return self


class NatsSecuritySpec(TlsSpec):
    tls: bool = False  # true: TLS even without ca_file (system CAs); implied by any TLS file or tls:// URL
    user: str | None = None
    password: str | None = None
    token: str | None = None
    nkey_seed_file: str | None = None
    creds_file: str | None = None

    _secrets_ref = field_validator("password", "token")(classmethod(lambda cls, v: _secret_ref(v)))

    @model_validator(mode="after")
    def _one_identity(self) -> NatsSecuritySpec:
        if (self.user is None) != (self.password is None):
            raise ValueError("user and password go together")
        given = [k for k in ("user", "token", "nkey_seed_file", "creds_file") if getattr(self, k)]
        if len(given) > 1:
            raise ValueError(f"give one way to authenticate, not {' and '.join(given)}")
        return self


class MqttSecuritySpec(TlsSpec):
    tls: bool = False  # true: TLS even without ca_file (system CAs); implied by any TLS file or mqtts:// URL
    username: str | None = None
    password: str | None = None

    _password_ref = field_validator("password")(classmethod(lambda cls, v: _secret_ref(v)))


class StorageSpec(_Strict):
    """`storage:` — object-store options for the pipeline's tables (see storage.py), over the environment's."""

    options: dict[str, str] = Field(default_factory=dict)

    @field_validator("options")
    @classmethod
    def _no_literal_secrets(cls, value: dict[str, str]) -> dict[str, str]:
        for key, item in value.items():
            if is_secret_key(key) and not SECRET_REF.match(item):
                raise ValueError(f"{LITERAL_SECRET} (config key '{key}')")
        return value


# ---------------------------------------------------------------- sources
class KafkaSourceSpec(_Strict):
    topic: str = Field(min_length=1)
    group_id: str | None = None
    # librdkafka settings passed through (fetch sizes, ...). Values may use ${ENV_VAR}; secret keys must.
    config: dict[str, str | int | float | bool] = Field(default_factory=dict)
    partitions: int = Field(default=1, ge=1, description="partitions when `ingest` creates the topic")
    security: KafkaSecuritySpec | None = None

    @field_validator("config")
    @classmethod
    def _no_literal_secrets(cls, value: dict[str, Any]) -> dict[str, Any]:
        for key, item in value.items():
            if any(word in key for word in KAFKA_SECRET_KEYS) and not (isinstance(item, str) and SECRET_REF.match(item)):
                raise ValueError(f"{LITERAL_SECRET} (config key '{key}')")
        return value


class NatsSourceSpec(_Strict):
    stream: str = Field(min_length=1)
    subject: str = Field(min_length=1)
    durable: str | None = None
    # Omitted: the stream's own, read from the broker at run time (`ingest produce` creates a missing
    # stream as limits). Stated: a stream with another retention is refused.
    retention: Literal["limits", "workqueue", "interest"] | None = None
    # workqueue/interest: seconds the broker waits for an ack before redelivering; keep it above the worst
    # batch time (read + decode + validate + both commits). Interest streams wait it out after a crash.
    ack_wait_seconds: float = Field(default=120.0, gt=0, le=86400)
    security: NatsSecuritySpec | None = None


class MqttSourceSpec(_Strict):
    topics: list[str] = Field(min_length=1)
    qos: Literal[1] = 1  # of the subscription; what a QoS 0 publish gets is in the README's QoS table
    client_id: str | None = None
    # The sensor looks for waiting messages by connecting the pipeline's session. A broker that delivers QoS 0
    # (no `upgrade_outgoing_qos`) sends queued QoS 0 messages to that look, which cannot keep them: false
    # makes the sensor request a run each tick instead, without connecting.
    probe: bool = True
    session_expiry_seconds: int = Field(default=604800, gt=0)
    security: MqttSecuritySpec | None = None


class SourceSpec(_Strict):
    kafka: KafkaSourceSpec | None = None
    nats: NatsSourceSpec | None = None
    mqtt: MqttSourceSpec | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> SourceSpec:
        given = [k for k in ("kafka", "nats", "mqtt") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"exactly one of kafka, nats, mqtt must be given (got {given or 'none'})")
        return self

    @property
    def kind(self) -> Literal["kafka", "nats", "mqtt"]:
        return "kafka" if self.kafka else "nats" if self.nats else "mqtt"


# ---------------------------------------------------------------- schema
class ColumnSpec(_Strict):
    dtype: str | None = None  # required for `format: json`; registry formats take it from the registry schema
    nullable: bool = True
    checks: dict[str, Any] = Field(default_factory=dict)

    @field_validator("dtype")
    @classmethod
    def _known_dtype(cls, value: str | None) -> str | None:
        if value is None:
            return None
        name = DTYPE_ALIASES.get(value.lower(), value.lower())
        if name not in DTYPES:
            raise ValueError(f"unknown dtype '{value}'; use one of {', '.join(DTYPES)}")
        return name

    @field_validator("checks")
    @classmethod
    def _known_checks(cls, value: dict[str, Any]) -> dict[str, Any]:
        for name in value:
            if CHECK_ALIASES.get(name, name) not in CHECKS:
                raise ValueError(f"unknown check '{name}'; use one of {', '.join(CHECKS)}")
        return value


class SchemaSpec(_Strict):
    columns: dict[str, ColumnSpec] | None = None
    model: str | None = Field(default=None, description="module:Class of a pandera.polars DataFrameModel")
    # false: payload fields not in the schema are ignored; true: such messages are quarantined.
    strict: bool = False

    @model_validator(mode="after")
    def _columns_or_model(self) -> SchemaSpec:
        # Neither is fine for registry formats (the columns come from the registry): see _check_semantics.
        if self.columns is not None and self.model is not None:
            raise ValueError("give either `columns` or `model`, not both or neither")
        if self.columns is not None and not self.columns:
            raise ValueError("`columns` is empty; list at least one payload field")
        return self


# ---------------------------------------------------------------- batches and triggers
class BatchSpec(_Strict):
    max_messages: int = Field(default=100_000, ge=1, le=10_000_000)
    max_bytes: int = Field(default=64 * 1024 * 1024, ge=1024)
    idle_ms: int = Field(default=500, ge=10,
                         description="MQTT, NATS work-queue/interest: end the batch after this long without a message")
    # Those sources' batches stay open while messages keep coming: end every batch this long after it started
    # (then commit, acknowledge, and go on with the next). Bounds freshness and the unacknowledged window.
    max_wait_seconds: float = Field(default=10.0, gt=0, le=3600)
    # Catch-up mode: one run executes consecutive batches until caught up or this budget is spent.
    max_run_seconds: float = Field(default=300.0, gt=0)
    # Once caught up, a run keeps polling the broker until no message came for this long (or the budget is
    # spent): seconds of freshness instead of a sensor tick plus a run start-up, for a pool slot held longer.
    # Unset: 60 s for runs a sensor requests, none for `ingest run`, schedules, UI launches and backfills.
    linger_seconds: float | None = Field(default=None, ge=0)


def _cron(value: str) -> str:
    from dagster._utils.schedules import is_valid_cron_string  # only when a schedule is given

    if not is_valid_cron_string(value):
        raise ValueError(f"'{value}' is not a cron expression (five fields, e.g. \"7 * * * *\")")
    return value


Cron = Annotated[str, AfterValidator(_cron)]  # trigger.schedule and maintenance.schedule


class SensorTriggerSpec(_Strict):
    interval_seconds: int = Field(default=15, ge=1)
    enabled: bool = True


class TriggerSpec(_Strict):
    sensor: SensorTriggerSpec | None = Field(default_factory=SensorTriggerSpec)
    schedule: Cron | None = None


class ChecksSpec(_Strict):
    max_quarantine_share: float = Field(default=0.05, ge=0, le=1)
    max_lag_messages: int = Field(default=1_000_000, ge=0)
    # Dagster freshness policy: the target table should have been materialized within this many minutes
    # (Dagster cannot go below 1 minute; sub-minute freshness is reported as `lag` metadata instead).
    freshness_minutes: int | None = Field(default=None, ge=1)


class PartitionsSpec(_Strict):
    """Ingestion-time partitions (UTC) of the pipeline's assets: each batch belongs to the partition of the
    time it was planned, and a backfill of a partition replays exactly those batches."""

    granularity: Literal["daily", "hourly"] = "daily"
    start: str = Field(default="2026-01-01", description="first partition, YYYY-MM-DD (hourly: YYYY-MM-DD-HH:MM)")

    @field_validator("start")
    @classmethod
    def _valid_start(cls, value: str) -> str:
        from datetime import datetime

        for fmt in ("%Y-%m-%d", "%Y-%m-%d-%H:%M"):
            try:
                datetime.strptime(value, fmt)
                return value
            except ValueError:
                continue
        raise ValueError(f"'{value}' is not a date like 2026-01-01 (hourly: 2026-01-01-00:00)")


class MaintenanceSpec(_Strict):
    """Table maintenance of the pipeline's tables (target, quarantine, ledger), as a scheduled Dagster job."""

    enabled: bool = True
    schedule: Cron = "7 * * * *"  # hourly: a 15 s sensor makes ~240 small files an hour
    target_file_size_mb: int = Field(default=128, ge=1, le=4096)
    # Time travel is kept this long: vacuum keeps files and log cleanup keeps commits younger than this.
    # At least an hour, so vacuum can never delete the files of a batch still being committed.
    time_travel_hours: int = Field(default=168, ge=1, le=24 * 3650)
    # Opening a table reads every commit since the last checkpoint: delta-rs's default of 100 makes the
    # per-batch cost a sawtooth (p95 131 ms vs 56 ms with 10 in `make bench`); a checkpoint of a compacted
    # table is small.
    checkpoint_interval: int = Field(default=10, ge=1, le=1000)



class SchemaRegistrySecuritySpec(_Strict):
    """Basic auth and TLS towards the schema registry (secrets as ${ENV} only)."""

    username: str | None = None
    password: str | None = None
    ca_file: str | None = None

    _password_ref = field_validator("password")(classmethod(lambda cls, v: _secret_ref(v)))

    @model_validator(mode="after")
    def _user_and_password(self) -> SchemaRegistrySecuritySpec:
        if (self.username is None) != (self.password is None):
            raise ValueError("username and password go together")
        return self


class SchemaRegistrySpec(_Strict):
    """Where `avro`, `protobuf` and `json_schema` payloads find their schemas (Confluent wire format)."""

    url: str | None = None  # default: $SCHEMA_REGISTRY_URL, else http://localhost:8081/apis/ccompat/v7
    # Whose newest version is the reader schema: topic_name → `<topic>-value`; record_name → the writer
    # schema's full record/message name (JSON Schema: its title); topic_record_name → `<topic>-<record>`.
    subject_name_strategy: Literal["topic_name", "record_name", "topic_record_name"] = "topic_name"
    # The "topic" of the strategies: default the Kafka topic, the NATS stream; MQTT has none, give `topic`
    # or `subject`.
    topic: str | None = None
    subject: str | None = None  # a fixed reader subject (overrides the strategy)
    # The schema `ingest produce` registers (when absent) and encodes samples with; relative to the
    # pipelines file. Also checked when the pipeline loads (unsupported constructs, declared columns).
    schema_file: str | None = None
    message: str | None = None  # protobuf: the message type `ingest produce` writes (default: the file's first)
    timeout_seconds: float = Field(default=10.0, gt=0, le=300)
    max_retries: int = Field(default=3, ge=0, le=10)  # transient errors (5xx, 408, 429, connection), backoff
    security: SchemaRegistrySecuritySpec | None = None


REGISTRY_FORMATS = ("avro", "protobuf", "json_schema")


class PipelineSpec(_Strict):
    name: str
    source: SourceSpec
    format: Literal["json", "avro", "protobuf", "json_schema"] = "json"
    schema_registry: SchemaRegistrySpec | None = None  # registry formats: defaults apply when absent
    schema_: SchemaSpec = Field(default_factory=SchemaSpec, alias="schema")
    table: str = Field(min_length=1)
    quarantine_table: str | None = None
    partition_by: list[str] = Field(default_factory=list)
    batch: BatchSpec = Field(default_factory=BatchSpec)
    on_gap: Literal["fail", "skip"] = "fail"
    trigger: TriggerSpec = Field(default_factory=TriggerSpec)
    checks: ChecksSpec = Field(default_factory=ChecksSpec)
    maintenance: MaintenanceSpec = Field(default_factory=MaintenanceSpec)
    partitions: PartitionsSpec = Field(default_factory=PartitionsSpec)
    # The batch ledger (a Delta table): every committed batch's ranges, trigger, versions and run id.
    ledger_table: str | None = None
    # Object-store options for this pipeline's tables, over the environment's (see storage.py).
    storage: StorageSpec = Field(default_factory=StorageSpec)
    # Kafka only: N concurrent runs, shard i owning the partitions p with p % N == i (see ingest_defs/shards.py).
    shards: int = Field(default=1, ge=1, le=1024)
    # Keep the payload bytes in the target's `_raw` column. Default: on where the broker cannot replay
    # (MQTT, NATS work-queue/interest streams), so backfills re-read the lake instead.
    keep_raw: bool | None = None
    description: str | None = None

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @model_validator(mode="before")
    @classmethod
    def _mqtt_batch_default(cls, raw: Any) -> Any:
        # MQTT caps messages in flight at 65535 (Receive Maximum): its default batch is smaller.
        if isinstance(raw, dict) and isinstance(raw.get("source"), dict) and "mqtt" in raw["source"]:
            batch = raw.get("batch") or {}
            if isinstance(batch, dict) and "max_messages" not in batch:
                raw = {**raw, "batch": {**batch, "max_messages": 50_000}}
        return raw

    # -- derived, cached: the pandera schema and the payload's polars schema
    @cached_property
    def pandera_schema(self) -> pa.DataFrameSchema:
        return build_pandera_schema(self)

    @cached_property
    def payload_schema(self) -> dict[str, pl.DataType]:
        """Declared payload columns (registry formats: only those declared with a dtype)."""
        return {name: col.dtype.type for name, col in self.pandera_schema.columns.items() if col.dtype is not None}

    @property
    def uses_registry(self) -> bool:
        return self.format in REGISTRY_FORMATS

    @property
    def registry(self) -> SchemaRegistrySpec:
        return self.schema_registry or SchemaRegistrySpec()

    @property
    def keep_raw_payload(self) -> bool:
        if self.keep_raw is not None:
            return self.keep_raw
        nats = self.source.nats
        # A NATS stream whose retention is not stated may delete what it delivered: keep the payloads too.
        return self.source.mqtt is not None or (nats is not None and nats.retention != "limits")

    def table_uri(self, lake_root: str | None = None) -> str:
        return resolve_table_uri(self.table, lake_root)

    def quarantine_uri(self, lake_root: str | None = None) -> str:
        return resolve_table_uri(self.quarantine_table or f"{self.table}_quarantine", lake_root)

    def ledger_uri(self, lake_root: str | None = None) -> str:
        return resolve_table_uri(self.ledger_table or f"{self.table}_ledger", lake_root)

    @property
    def asset_key_path(self) -> list[str]:
        return [p for p in self.table.split("://")[-1].strip("/").split("/") if p][-2:]

    @property
    def quarantine_key_path(self) -> list[str]:
        path = self.asset_key_path
        return [*path[:-1], f"{path[-1]}_quarantine"]


class PipelinesFile(_Strict):
    pipelines: dict[str, dict[str, Any]]


def lake_root() -> str:
    return storage.lake_root()


def resolve_table_uri(table: str, root: str | None = None) -> str:
    return storage.resolve_table_uri(table, root)


def pipelines_file() -> Path:
    return Path(os.environ.get("INGEST_PIPELINES", str(DEFAULT_PIPELINES_FILE)))


# ---------------------------------------------------------------- pandera
def build_pandera_schema(spec: PipelineSpec) -> pa.DataFrameSchema:
    return _pandera_schema(spec.name, spec.schema_)


def _pandera_schema(pipeline: str, schema: SchemaSpec) -> pa.DataFrameSchema:
    if schema.model:
        model = import_model(pipeline, schema.model)
        return model.to_schema()
    columns = {}
    errors: list[ConfigError] = []
    for name, col in (schema.columns or {}).items():
        checks = []
        for check, arg in col.checks.items():
            try:
                checks.append(_build_check(pipeline, name, check, arg))
            except ConfigError as exc:
                errors.append(exc)
        dtype = DTYPES[col.dtype] if col.dtype else None  # None: the registry schema's type (checked at the first run)
        columns[name] = pa.Column(dtype, nullable=col.nullable, checks=checks, required=False)
    raise_all(errors)
    # Extra payload fields never reach the frame (decode reads only schema columns), so strict is
    # enforced in decoding; the frame itself is always exactly the schema's columns.
    return pa.DataFrameSchema(columns, strict=False, name=pipeline)


def _build_check(pipeline: str, column: str, check: str, arg: Any) -> pa.Check:
    check = CHECK_ALIASES.get(check, check)
    key = f"schema.columns.{column}.checks.{check}"
    kind = CHECKS[check]
    factory = getattr(pa.Check, check)
    try:
        if kind == "list":
            if not isinstance(arg, list):
                raise TypeError("expects a list")
            return factory(arg)
        if kind == "kwargs":
            if not isinstance(arg, dict):
                raise TypeError("expects a mapping, e.g. {min_value: 1, max_value: 10}")
            return factory(**arg)
        return factory(arg)
    except (TypeError, ValueError) as exc:
        raise ConfigError(pipeline, key, f"bad argument {arg!r} ({exc})",
                          f"give `{check}` a valid argument, e.g. {_check_example(check)}") from exc


def _check_example(check: str) -> str:
    return {"list": f"{check}: [a, b]", "kwargs": f"{check}: {{min_value: 0, max_value: 10}}"}.get(
        CHECKS[check], f"{check}: 0")


def import_model(pipeline: str, ref: str) -> type[pa.DataFrameModel]:
    key = "schema.model"
    if ":" not in ref:
        raise ConfigError(pipeline, key, f"'{ref}' is not in the form module:Class",
                          "write it as e.g. `ingest_defs.schemas:UserActivity`")
    module_name, _, attr = ref.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(pipeline, key, f"module '{module_name}' does not import ({exc})",
                          "check the module path and that it is installed") from exc
    model = getattr(module, attr, None)
    if not (isinstance(model, type) and issubclass(model, pa.DataFrameModel)):
        raise ConfigError(pipeline, key, f"'{attr}' in '{module_name}' is not a pandera.polars DataFrameModel",
                          "point it at a class deriving from pandera.polars.DataFrameModel")
    return model


# ---------------------------------------------------------------- loading
_FIXES = {
    "missing": "add the key",
    "extra_forbidden": "remove it or fix its spelling",
    "literal_error": "use one of the allowed values",
    "int_parsing": "give a whole number",
    "int_type": "give a whole number",
    "float_parsing": "give a number",
    "bool_parsing": "give true or false",
    "string_type": "give a string",
    "dict_type": "give a mapping",
    "list_type": "give a list",
    "model_type": "give a mapping",
    "greater_than_equal": "give a larger value",
    "less_than_equal": "give a smaller value",
    "greater_than": "give a larger value",
    "too_short": "give at least one item",
}


def _pydantic_to_config_errors(name: str, exc: ValidationError, file: Path | None) -> list[ConfigError]:
    """Every mistake pydantic found, one per key. An unknown key close to a known one gets "did you mean",
    and the "field required" that its misspelling caused elsewhere is left out (it would mislead)."""
    errors = exc.errors()
    suggested: set[tuple[str, ...]] = set()  # keys an unknown key was probably meant to be
    for err in errors:
        loc = _loc(err)
        if err["type"] == "extra_forbidden" and loc:
            match = _did_you_mean(loc)
            if match:
                suggested.add((*loc[:-1], match))
    out: list[ConfigError] = []
    seen: set[tuple[str, ...]] = set()
    for err in errors:
        loc = _loc(err)
        if tuple(loc) in seen or (err["type"] == "missing" and tuple(loc) in suggested):
            continue
        seen.add(tuple(loc))
        out.append(_pydantic_to_config_error(name, err, loc, file))
    return out


def _loc(err: Any) -> list[str]:
    return [str(p) for p in err["loc"] if not str(p).startswith("function-after")]


def _did_you_mean(loc: list[str]) -> str | None:
    """The known key closest to an unknown one at `loc` (e.g. `tabel` → `table`), if one is close."""
    model = _model_at(loc[:-1])
    if model is None:
        return None
    known = [f.alias or key for key, f in model.model_fields.items() if key != "name" or model is not PipelineSpec]
    found = difflib.get_close_matches(loc[-1], known, n=1, cutoff=0.6)
    return found[0] if found else None


def _model_at(path: list[str]) -> type[BaseModel] | None:
    """The pydantic model that holds the keys at `path` of a pipeline (dict keys such as column names skipped)."""
    model: type[BaseModel] = PipelineSpec
    i = 0
    while i < len(path):
        field = next((f for key, f in model.model_fields.items() if path[i] in (key, f.alias)), None)
        if field is None:
            return None
        inner, keyed = _model_in(field.annotation)
        if inner is None:
            return None
        model, i = inner, i + (2 if keyed else 1)
    return model


def _model_in(annotation: Any) -> tuple[type[BaseModel] | None, bool]:
    """(the model an annotation holds, whether it is the value of a mapping)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, False
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is dict and len(args) == 2:
        inner, _ = _model_in(args[1])
        return inner, inner is not None
    for arg in args:
        inner, keyed = _model_in(arg)
        if inner is not None:
            return inner, keyed
    return None, False


def _pydantic_to_config_error(name: str, err: Any, loc: list[str], file: Path | None) -> ConfigError:
    key = ".".join(loc) or "(pipeline)"
    problem = err["msg"].removeprefix("Value error, ")
    fix = _FIXES.get(err["type"], "correct the value")
    if err["type"] == "extra_forbidden" and loc:
        problem = "unknown key"
        match = _did_you_mean(loc)
        fix = (f"did you mean `{match}`? Rename it, or remove '{loc[-1]}'" if match else
               f"remove '{loc[-1]}' or fix its spelling (see the README's configuration section)")
    if err["type"] == "literal_error" and isinstance(err.get("input"), str):
        allowed = re.findall(r"'([^']*)'", str(err.get("ctx", {}).get("expected", "")))
        close = difflib.get_close_matches(err["input"], allowed, n=1, cutoff=0.6)
        fix = f"did you mean `{close[0]}`? (one of {', '.join(allowed)})" if close else f"use one of {', '.join(allowed)}"
    if err["type"] == "missing" and loc:
        parent = ".".join(["pipelines", name, *loc[:-1]])
        fix = f"add `{loc[-1]}:` under {parent}"
    if "unknown dtype" in problem or "unknown check" in problem:
        fix = problem.split("; ", 1)[-1]
    if "exactly one of kafka" in problem:
        fix = "give one source block: `kafka: {topic: ...}`, `nats: {stream: ..., subject: ...}` or `mqtt: {topics: [...]}`"
    if "is not a cron expression" in problem:
        fix = f"give `{key}` five cron fields (minute hour day month weekday), e.g. \"7 * * * *\""
    if LITERAL_SECRET in problem:
        field = re.search(r"config key '([^']+)'", problem)
        field_name = field.group(1) if field else str(loc[-1])
        var = re.sub(r"[^A-Z0-9]+", "_", f"{name}_{field_name}".upper())
        fix = (f"put the secret in an environment variable and write `{field_name}: ${{{var}}}` "
               "(use ${ENV}; secrets never go in the pipelines file)")
    if "either `columns` or `model`" in problem:
        fix = "keep only `columns:` (inline) or only `model: module:Class`"
    return ConfigError(name, key, problem, fix, file)


def parse_pipeline(name: str, raw: Any, file: Path | None = None) -> PipelineSpec:
    """One pipeline's spec; every mistake in it is reported at once (ConfigErrors when there are several)."""
    errors: list[ConfigError] = []
    if not PIPELINE_NAME.match(name):
        errors.append(ConfigError(name, "(name)", "pipeline names must be lower_snake_case",
                                  "rename it, e.g. 'user_activity'", file))
    if not isinstance(raw, dict):
        errors.append(ConfigError(name, "(pipeline)", "expected a mapping",
                                  "indent the pipeline's keys under its name", file))
        raise_all(errors)
    raw = _resolve_schema_file(raw, file)
    invalid: list[ConfigError] = []
    try:
        spec = PipelineSpec.model_validate({**raw, "name": name})
    except ValidationError as exc:
        invalid = _pydantic_to_config_errors(name, exc, file)
    if invalid:
        raise_all(errors + invalid + _schema_block_mistakes(name, raw, invalid, file))
    errors += _check_semantics(spec, file)
    raise_all(errors)
    return spec


def _resolve_schema_file(raw: dict[str, Any], file: Path | None) -> dict[str, Any]:
    """`schema_registry.schema_file` is relative to the pipelines file."""
    block = raw.get("schema_registry")
    if file is None or not isinstance(block, dict) or not isinstance(block.get("schema_file"), str):
        return raw
    path = Path(block["schema_file"])
    if path.is_absolute():
        return raw
    return {**raw, "schema_registry": {**block, "schema_file": str((file.parent / path).resolve())}}


def _schema_block_mistakes(name: str, raw: dict[str, Any], found: list[ConfigError],
                           file: Path | None) -> list[ConfigError]:
    """The schema block's own mistakes (e.g. a check's argument) when other keys made the pipeline invalid:
    they would otherwise show only after those are fixed."""
    if any(e.key.split(".")[0] == "schema" for e in found) or not isinstance(raw.get("schema"), dict):
        return []
    try:
        _pandera_schema(name, SchemaSpec.model_validate(raw["schema"]))
    except ConfigError as exc:
        for e in _flatten(exc):
            e.file = file
        return _flatten(exc)
    except ValidationError:
        return []
    return []


def _check_semantics(spec: PipelineSpec, file: Path | None) -> list[ConfigError]:
    errors: list[ConfigError] = []
    try:
        if spec.uses_registry:  # the registry formats' own checks (schema file, subject)
            from ingest_defs.formats import check_spec

            check_spec(spec, file)
        else:
            _check_json_schema_block(spec, file)
    except ConfigError as exc:
        for e in _flatten(exc):
            e.file = e.file or file
        errors += _flatten(exc)
    try:
        schema = spec.pandera_schema
    except ConfigError as exc:
        for e in _flatten(exc):
            e.file = file
        return errors + _flatten(exc)
    for col in spec.partition_by:
        if col not in schema.columns and col not in ("_stream", "_partition", "_source"):
            errors.append(ConfigError(spec.name, "partition_by", f"'{col}' is not a schema column",
                                      f"use one of {', '.join(schema.columns)} or a standard column like _stream", file))
    for col in schema.columns:
        if col.startswith("_"):
            errors.append(ConfigError(spec.name, f"schema.columns.{col}", "names starting with '_' are reserved for the standard columns",
                                      "rename the field in the schema", file))
    if spec.source.mqtt and spec.batch.max_messages > 65535:
        errors.append(ConfigError(spec.name, "batch.max_messages", "MQTT allows at most 65535 messages in flight",
                                  "set batch.max_messages to 65535 or less", file))
    if spec.source.mqtt:
        try:
            _reject_overlapping_filters(spec, file)
        except ConfigError as exc:
            errors.append(exc)
    if spec.shards > 1 and not spec.source.kafka:
        errors.append(_refuse_shards(spec, file))
    return errors


def _check_json_schema_block(spec: PipelineSpec, file: Path | None) -> None:
    if spec.schema_.columns is None and spec.schema_.model is None:
        raise ConfigError(spec.name, "schema", "a `format: json` pipeline needs its payload columns",
                          "give `schema: {columns: {...}}` or `schema: {model: module:Class}` (only avro, protobuf "
                          "and json_schema take their columns from the schema registry)", file)
    for name, col in (spec.schema_.columns or {}).items():
        if col.dtype is None:
            raise ConfigError(spec.name, f"schema.columns.{name}.dtype", "Field required",
                              f"add `dtype:` to column '{name}' (one of {', '.join(DTYPES)})", file)
    if spec.schema_registry is not None:
        raise ConfigError(spec.name, "schema_registry", "only used by `format: avro | protobuf | json_schema`",
                          "remove the block, or set the pipeline's format", file)


def _refuse_shards(spec: PipelineSpec, file: Path | None) -> ConfigError:
    # Shards own disjoint partitions; a NATS stream or an MQTT session is one ordered sequence with one
    # offset (one transaction id), so two runs could only split it by racing on that one position.
    why = {"nats": "a JetStream stream is one ordered sequence with one position (one transaction id)",
           "mqtt": "an MQTT session is one ordered delivery with one position (one transaction id), "
                   "and the broker allows one connection per client id"}[spec.source.kind]
    return ConfigError(spec.name, "shards", f"shards > 1 needs Kafka partitions: {why}, so it cannot be split "
                       "into disjoint shards", "remove `shards:` (or set it to 1); split the data over several "
                       "pipelines (subjects/topic filters) with their own tables instead", file)


def _reject_overlapping_filters(spec: PipelineSpec, file: Path | None) -> None:
    from ingest_defs.sources.mqtt_topics import filters_overlap

    topics = spec.source.mqtt.topics
    for i, a in enumerate(topics):
        for b in topics[i + 1:]:
            if filters_overlap(a, b):
                raise ConfigError(spec.name, "source.mqtt.topics", f"filters '{a}' and '{b}' overlap (the broker would deliver such messages twice)",
                                  "keep only the wider filter, or make them disjoint", file)


def load_pipelines(path: Path | str | None = None) -> dict[str, PipelineSpec]:
    """Load and check the pipelines file. Raises ConfigError for a mistake, ConfigErrors listing all of them."""
    file = Path(path) if path else pipelines_file()
    try:
        doc = yaml.safe_load(file.read_text())
    except FileNotFoundError:
        raise ConfigError(None, "(file)", f"{file} does not exist",
                          "create it or point INGEST_PIPELINES at your pipelines file") from None
    except yaml.YAMLError as exc:
        raise ConfigError(None, "(file)", f"not valid YAML ({exc})", "fix the YAML syntax", file) from None
    if not isinstance(doc, dict) or not isinstance(doc.get("pipelines"), dict):
        raise ConfigError(None, "pipelines", "the file must have a top-level `pipelines:` mapping",
                          "put each pipeline under `pipelines: {name: {...}}`", file)
    errors: list[ConfigError] = []
    for key in sorted(set(doc) - {"pipelines"}):
        errors.append(ConfigError(None, key, "unknown top-level key", "only `pipelines:` is allowed at the top", file))
    specs: dict[str, PipelineSpec] = {}
    for name, raw in doc["pipelines"].items():
        try:
            specs[str(name)] = parse_pipeline(str(name), raw, file)
        except ConfigError as exc:
            errors += _flatten(exc)
    errors += _check_unique_tables(specs, file)
    raise_all(errors)
    return specs


class PipelineFileWatch:
    """Whether the pipelines file says something else about one pipeline than when the run started: a
    lingering run then ends, so that the next run (the sensor asks for it) applies the new settings.
    Watches only a pipeline that came from the file unchanged (not one a test or a script built)."""

    def __init__(self, spec: PipelineSpec) -> None:
        self.spec, self.file = spec, pipelines_file()
        self.mtime = self._mtime()
        self.watching = self.mtime is not None and self._current() == spec

    def _mtime(self) -> int | None:
        try:
            return self.file.stat().st_mtime_ns
        except OSError:
            return None

    def _current(self) -> PipelineSpec | None | bool:
        """The file's spec of the pipeline, None when it is gone, False when the file does not load (mid-edit)."""
        try:
            return load_pipelines(self.file).get(self.spec.name)
        except (ConfigError, OSError, ValueError):
            return False

    def changed(self) -> bool:
        if not self.watching:
            return False
        mtime = self._mtime()
        if mtime == self.mtime:
            return False  # a stat per poll; the file is read again only when it was written
        self.mtime = mtime
        current = self._current()
        return current is not False and current != self.spec


def dump_pipelines(specs: list[PipelineSpec]) -> str:
    """The YAML of a pipelines file holding `specs` (tests and benchmarks write their own files)."""
    doc = {"pipelines": {s.name: s.model_dump(by_alias=True, exclude={"name"}, exclude_none=True, mode="json")
                         for s in specs}}
    return yaml.safe_dump(doc, sort_keys=False)


def _check_unique_tables(specs: dict[str, PipelineSpec], file: Path | None) -> list[ConfigError]:
    seen: dict[str, str] = {}
    errors: list[ConfigError] = []
    for spec in specs.values():
        for uri in (spec.table_uri(), spec.quarantine_uri(), spec.ledger_uri()):
            if uri in seen:
                errors.append(ConfigError(spec.name, "table", f"table '{uri}' is also used by pipeline '{seen[uri]}'",
                                          "give each pipeline its own table", file))
            seen.setdefault(uri, spec.name)
    return errors


_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def expand_env(pipeline: str, key: str, value: Any) -> Any:
    """Replace ${ENV_VAR} in a setting at run time (secrets never sit in the file or in run config)."""
    if not isinstance(value, str):
        return value

    def sub(match: re.Match[str]) -> str:
        var = match.group(1)
        if var not in os.environ:
            raise ConfigError(pipeline, key, f"environment variable {var} is not set", f"export {var}=...")
        return os.environ[var]

    return _ENV_REF.sub(sub, value)

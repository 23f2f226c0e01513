"""The Confluent wire format over a schema registry, for every registry format.

A message is magic byte 0, a 4-byte big-endian schema id (the *writer* schema), then the body. One batch:

1. split the frames (vectorized): a wrong magic byte or a message shorter than the header is quarantined;
2. group the messages by writer schema id; fetch each id once per process (registry.py);
3. find the *reader* schema: the newest version of the subject (topic name strategy `<topic>-value` by
   default; record name, topic-record name, or a fixed subject) — asked once per batch, never cached
   longer, so the table evolves on the next batch after a new version is registered;
4. let the format decode the group's bodies with the writer schema (avro.py: one native read; protobuf.py;
   json_schema.py: the JSON fast path) and conform the rows to the reader schema: fields the writer did
   not have are null (or their Avro default), promotable types are widened, fields the reader dropped go.

An unknown or deleted id, a missing subject, a body that does not decode, or a writer schema that cannot
be read as the reader schema are failures of those messages (quarantine, with the reason); a registry that
cannot be asked raises RegistryUnavailable (the batch fails before any commit). The table's columns are the
reader schema's; declared `schema.columns` add checks and must agree with it (ConfigError otherwise).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import polars as pl

from ingest_defs.config import DTYPES, ConfigError, PipelineSpec
from ingest_defs.decode import ROW, Decoded
from ingest_defs.formats.registry import RegisteredSchema, Registry, registry_for
from ingest_defs.sources.base import payload_series

HEADER = 5
SCHEMA_TYPES = {"avro": "AVRO", "protobuf": "PROTOBUF", "json_schema": "JSON"}


class Unsupported(ValueError):
    """A schema construct that cannot land in a Delta column: names the field and the construct."""

    def __init__(self, path: str, what: str):
        self.path, self.what = path, what
        super().__init__(f"field '{path}': {what}" if path else what)


@dataclass
class Parsed:
    """A registry schema, ready to decode with: its landing columns and what resolution needs."""

    schema_id: int
    dtypes: dict[str, pl.DataType]
    record_name: str | None = None  # for the record-name subject strategies
    defaults: dict[str, Any] = field(default_factory=dict)  # reader-side defaults of top-level fields
    required: tuple[str, ...] = ()  # JSON Schema: top-level `required`
    native: Any = None  # the format's own parsed form (fastavro schema, protobuf descriptor, ...)


class Codec(Protocol):
    schema_type: str

    def parse(self, schema: RegisteredSchema, registry: Registry) -> Parsed:
        """Raises Unsupported for a construct no Delta column can hold."""
        ...

    def decode(self, frames: pl.Series, writer: Parsed, reader: Parsed) -> tuple[pl.DataFrame, dict[int, str]]:
        """Bodies of one writer schema (`frames` still carry the 5-byte header) → rows in the reader's
        columns plus ROW = position in `frames`, and failures by position."""
        ...


def codec_for(fmt: str, spec: PipelineSpec | None = None) -> Codec:
    if fmt == "avro":
        from ingest_defs.formats.avro import AvroCodec

        return AvroCodec()
    if fmt == "protobuf":
        from ingest_defs.formats.protobuf import ProtobufCodec

        return ProtobufCodec(spec.registry.message if spec else None)
    from ingest_defs.formats.json_schema import JsonSchemaCodec

    return JsonSchemaCodec()


# Parsed schemas for the process, by (registry, id, codec setting): ids are immutable.
_PARSED: dict[tuple[str, int, str, str | None], Parsed | Unsupported] = {}
_PARSED_LOCK = threading.Lock()


class RegistryFormat:
    """`format: avro | protobuf | json_schema` for one pipeline."""

    def __init__(self, spec: PipelineSpec):
        self.spec = spec
        self.name = spec.format
        self.codec = codec_for(spec.format, spec)
        self._registry: Registry | None = None
        self._checked: set[int] = set()  # reader ids whose columns were checked against the declared ones

    @property
    def registry(self) -> Registry:
        if self._registry is None:
            self._registry = registry_for(self.spec.registry, self.spec.name)
        return self._registry

    # ------------------------------------------------------------ one batch
    def decode(self, payloads: Sequence[bytes]) -> Decoded:
        frames = payload_series("frame", payloads)
        failures: dict[int, str] = {}
        latest: dict[str, Parsed | str] = {}  # subject → reader schema, or why there is none (this batch only)
        template = self._template(latest)
        ids, bad = split_frames(frames)
        failures.update(bad)
        parts: list[pl.DataFrame] = []
        positions = pl.DataFrame({"id": ids, ROW: pl.int_range(0, len(frames), dtype=pl.UInt32, eager=True)})
        positions = positions.filter(pl.col("id").is_not_null())
        for schema_id, group in _groups(positions):
            rows = group.get_column(ROW)
            frame, group_failures = self._decode_group(schema_id, frames.gather(rows), latest)
            for local, reason in group_failures.items():
                failures[int(rows[local])] = reason
            if frame.height:  # ROW: from the position in the group to the position in the batch
                parts.append(frame.with_columns(rows.gather(frame.get_column(ROW)).alias(ROW)))
        if not parts:
            return Decoded(rows=_empty(template.dtypes if template else {}), failures=failures)
        rows = pl.concat(parts, how="diagonal") if len(parts) > 1 else parts[0]
        if template is not None:
            missing = [pl.lit(None, dtype).alias(name) for name, dtype in template.dtypes.items() if name not in rows.columns]
            if missing:
                rows = rows.with_columns(missing)
        return Decoded(rows=rows.sort(ROW) if len(parts) > 1 else rows, failures=failures)

    def _decode_group(self, schema_id: int, frames: pl.Series,
                      latest: dict[str, Parsed | str]) -> tuple[pl.DataFrame, dict[int, str]]:
        everything = range(len(frames))
        found = self.registry.schema(schema_id)
        if found is None:
            reason = (f"unknown schema id {schema_id}: the schema registry at {self.registry.url} has no schema with "
                      "this id (never registered, deleted, or written against another registry)")
            return pl.DataFrame(), dict.fromkeys(everything, reason)
        writer = self._parse(found)
        if isinstance(writer, str):
            return pl.DataFrame(), dict.fromkeys(everything, writer)
        reader = self._reader(writer, latest)
        if isinstance(reader, str):
            return pl.DataFrame(), dict.fromkeys(everything, reader)
        self._check_declared(reader)
        try:
            return self.codec.decode(frames, writer, reader)
        except ResolutionError as exc:
            return pl.DataFrame(), dict.fromkeys(everything, str(exc))

    # ------------------------------------------------------------ schemas
    def _parse(self, found: RegisteredSchema) -> Parsed | str:
        """The writer schema parsed (cached for the process), or why its messages cannot be decoded."""
        want = SCHEMA_TYPES[self.spec.format]
        if found.schema_type != want:
            return (f"schema id {found.id} is a {found.schema_type} schema, but the pipeline's format is "
                    f"{self.spec.format} ({want})")
        key = (self.registry.url, found.id, self.spec.format, self.spec.registry.message)
        with _PARSED_LOCK:
            cached = _PARSED.get(key)
        if cached is None:
            try:
                cached = self.codec.parse(found, self.registry)
            except Unsupported as exc:
                cached = exc
            with _PARSED_LOCK:
                _PARSED[key] = cached
        if isinstance(cached, Unsupported):
            return f"schema id {found.id} cannot land in a Delta table: {cached}"
        return cached

    def _subject(self, writer: Parsed | None) -> str | None:
        """The reader subject for a writer schema (None: the strategy needs the writer's record name)."""
        registry = self.spec.registry
        if registry.subject:
            return registry.subject
        topic = subject_topic(self.spec)
        if registry.subject_name_strategy == "topic_name":
            return f"{topic}-value"
        if writer is None or writer.record_name is None:
            return None
        if registry.subject_name_strategy == "record_name":
            return writer.record_name
        return f"{topic}-{writer.record_name}"

    def _reader(self, writer: Parsed, latest: dict[str, Parsed | str]) -> Parsed | str:
        subject = self._subject(writer)
        if subject is None:
            return (f"schema id {writer.schema_id} has no record name, which subject_name_strategy "
                    f"{self.spec.registry.subject_name_strategy} needs")
        if subject not in latest:
            latest[subject] = self._latest(subject)
        reader = latest[subject]
        if isinstance(reader, Parsed) and reader.schema_id == writer.schema_id:
            return writer
        return reader

    def _latest(self, subject: str) -> Parsed | str:
        found = self.registry.latest(subject)
        if found is None:
            return (f"no subject '{subject}' in the schema registry at {self.registry.url} (subject_name_strategy "
                    f"{self.spec.registry.subject_name_strategy}): the reader schema is its newest version; "
                    "register the schema under it, or set schema_registry.subject")
        parsed = self._parse(found)
        if isinstance(parsed, str):
            raise ConfigError(self.spec.name, "schema_registry", f"the newest version of subject '{subject}' "
                              f"(the reader schema): {parsed}", "register a version of the subject that can land "
                              "(see the README's formats section for what is supported)")
        return parsed

    def _template(self, latest: dict[str, Parsed | str]) -> Parsed | None:
        """The reader schema when the subject does not depend on the messages (the table's columns even when
        no message of the batch decodes); checked against the declared columns."""
        subject = self._subject(None)
        if subject is None:
            return None
        latest[subject] = reader = self._latest(subject)
        if isinstance(reader, str):
            return None
        self._check_declared(reader)
        return reader

    def _check_declared(self, reader: Parsed) -> None:
        if reader.schema_id in self._checked:
            return
        check_declared_columns(self.spec, reader.dtypes, f"the registry schema (id {reader.schema_id})")
        self._checked.add(reader.schema_id)


class ResolutionError(ValueError):
    """A writer schema's rows cannot be read as the reader schema (quarantined with this reason)."""


# ------------------------------------------------------------ framing
def split_frames(frames: pl.Series) -> tuple[pl.Series, dict[int, str]]:
    """Writer schema ids (null where the message is not in the wire format) and the reasons."""
    size = frames.bin.size()
    ok = (size >= HEADER) & frames.bin.starts_with(b"\x00")
    ids = frames.bin.slice(1, 4).bin.reinterpret(dtype=pl.UInt32, endianness="big")
    ids = pl.select(pl.when(ok).then(ids).otherwise(None)).to_series().alias("id")
    failures: dict[int, str] = {}
    if not ok.all():
        for i in (~ok).arg_true().to_list():
            frame = frames[i]
            if len(frame) < HEADER:
                failures[i] = (f"not Confluent wire format: {len(frame)} byte(s), shorter than the 5-byte header "
                               "(magic byte 0 + schema id)")
            else:
                failures[i] = f"not Confluent wire format: magic byte 0x{frame[0]:02x}, expected 0x00"
    return ids, failures


def frame_message(schema_id: int, body: bytes) -> bytes:
    return b"\x00" + schema_id.to_bytes(4, "big") + body


def _groups(positions: pl.DataFrame) -> list[tuple[int, pl.DataFrame]]:
    if positions.height == 0:
        return []
    ids = positions.get_column("id")
    if ids.n_unique() == 1:
        return [(int(ids[0]), positions)]
    return [(int(key[0]), group) for key, group in positions.partition_by("id", as_dict=True, maintain_order=True).items()]


def _empty(dtypes: dict[str, pl.DataType]) -> pl.DataFrame:
    return pl.DataFrame(schema={**dtypes, ROW: pl.UInt32})


# ------------------------------------------------------------ resolution: writer rows → reader columns
def conform(frame: pl.DataFrame, writer: dict[str, pl.DataType], reader: Parsed) -> pl.DataFrame:
    """The writer's rows in the reader's columns (frame keeps ROW). Raises ResolutionError."""
    if writer == reader.dtypes:
        return frame
    exprs = []
    for name, dtype in reader.dtypes.items():
        if name in writer:
            exprs.append(_conform_expr(pl.col(name), writer[name], dtype).alias(name))
        else:
            exprs.append(_default(reader.defaults.get(name), dtype).alias(name))
    try:
        return frame.select(*exprs, ROW)
    except (pl.exceptions.PolarsError, TypeError, ValueError) as exc:
        raise ResolutionError(f"{str(exc).splitlines()[0]}") from exc


def _conform_expr(expr: pl.Expr, have: pl.DataType, want: pl.DataType) -> pl.Expr:
    if have == want:
        return expr
    if isinstance(have, pl.Struct) and isinstance(want, pl.Struct):
        present = {f.name: f.dtype for f in have.fields}
        fields = [(_conform_expr(expr.struct.field(f.name), present[f.name], f.dtype) if f.name in present
                   else pl.lit(None, f.dtype)).alias(f.name) for f in want.fields]
        return pl.when(expr.is_null()).then(pl.lit(None, want)).otherwise(pl.struct(fields))
    if isinstance(have, pl.List) and isinstance(want, pl.List):
        return expr.list.eval(_conform_expr(pl.element(), have.inner, want.inner))
    return expr.cast(want, strict=True)


def _default(value: Any, dtype: pl.DataType) -> pl.Expr:
    if value is None or isinstance(value, dict | list) or dtype.is_nested():
        return pl.lit(None, dtype)
    try:
        return pl.lit(value).cast(dtype)
    except (pl.exceptions.PolarsError, TypeError, ValueError):
        return pl.lit(None, dtype)


# ------------------------------------------------------------ configuration
def subject_topic(spec: PipelineSpec) -> str:
    registry = spec.registry
    if registry.topic:
        return registry.topic
    if spec.source.kafka:
        return spec.source.kafka.topic
    if spec.source.nats:
        return spec.source.nats.stream
    raise ConfigError(spec.name, "schema_registry.topic", "an MQTT source has no topic name for the subject strategy",
                      "set schema_registry.subject (the reader subject) or schema_registry.topic")


def check_declared_columns(spec: PipelineSpec, dtypes: dict[str, pl.DataType], where: str,
                           file: Path | None = None) -> None:
    """Declared columns add checks to a registry schema's columns; they must exist and agree with it."""
    for name, col in (spec.schema_.columns or {}).items():
        if name not in dtypes:
            raise ConfigError(spec.name, f"schema.columns.{name}",
                              f"'{name}' is not a field of {where} (its fields: {', '.join(dtypes) or 'none'})",
                              "remove the column or fix its name: with a schema registry the columns come from the "
                              "registry schema, declared ones only add checks", file)
        if col.dtype is not None and DTYPES[col.dtype] != dtypes[name]:
            have = next((n for n, t in DTYPES.items() if t == dtypes[name]), None)
            fix = f"declare `dtype: {have}`" if have else "leave `dtype` out (it comes from the registry schema)"
            raise ConfigError(spec.name, f"schema.columns.{name}.dtype",
                              f"declared {col.dtype}, but {where} makes '{name}' {dtypes[name]}", fix, file)


def check_spec(spec: PipelineSpec, file: Path | None) -> None:
    """Load-time checks of a registry pipeline (no registry call): the subject can be named, `schema.model`
    and `strict` do not apply, and a `schema_file` parses into columns that agree with the declared ones."""
    if spec.schema_.model is not None:
        raise ConfigError(spec.name, "schema.model", f"a `format: {spec.format}` pipeline takes its columns from "
                          "the schema registry", "declare checks under `schema.columns` instead", file)
    if spec.schema_.strict:
        raise ConfigError(spec.name, "schema.strict", f"`format: {spec.format}` decodes only the schema's fields",
                          "remove `strict`", file)
    registry = spec.registry
    if not registry.subject and (registry.subject_name_strategy != "record_name"):
        try:
            subject_topic(spec)
        except ConfigError as exc:
            exc.file = file
            raise
    if registry.schema_file:
        path = Path(registry.schema_file)
        if not path.is_file():
            raise ConfigError(spec.name, "schema_registry.schema_file", f"{path} does not exist",
                              "point it at the schema producers register (.avsc, .proto or .json)", file)
        try:
            parsed = local_schema(spec)
        except Unsupported as exc:
            raise ConfigError(spec.name, "schema_registry.schema_file", f"{path}: {exc}",
                              "change the schema (see the README's formats section for what is supported)",
                              file) from None
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError(spec.name, "schema_registry.schema_file", f"{path} is not a valid {spec.format} "
                              f"schema ({exc})", "fix the schema file", file) from None
        check_declared_columns(spec, parsed.dtypes, f"schema_file {path.name}", file)


def local_schema(spec: PipelineSpec) -> Parsed:
    """The pipeline's `schema_file`, parsed as the registry would hand it out (id 0, no references)."""
    text = Path(spec.registry.schema_file or "").read_text()
    return codec_for(spec.format, spec).parse(RegisteredSchema(0, SCHEMA_TYPES[spec.format], text), None)  # type: ignore[arg-type]


def zigzag_varint(n: int) -> bytes:
    """A signed integer as a zigzag varint: Avro's longs and the Confluent Protobuf framing's message indexes."""
    n = (n << 1) ^ (n >> 63)
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)

"""The Delta sink: where the truth lives. Transaction versions per app id, identity properties, and
one commit per table per batch carrying the batch's transactions.

Offset bookkeeping (what a batch covered) is decided by the lifecycle; this module only writes frames and
reads back versions, in the spirit of kafka-delta-ingest's split between offsets and writing.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import polars as pl
from deltalake import CommitProperties, DeltaTable, Schema, Transaction, write_deltalake
from deltalake.exceptions import CommitFailedError, DeltaError

from ingest_defs import faults
from ingest_defs.maintenance import commit_hooks, table_properties
from ingest_defs.storage import Location, location, table_location

PROP_PREFIX = "ingest."
TXN_RETENTION_PROP = "delta.setTransactionRetentionDuration"
# A commit that loses a race to another writer (a shard's append that changed the table's metadata, a
# maintenance commit) is retried this many times on the new snapshot; delta-rs already rebases plain
# appends with other transaction ids itself (up to 15 times), so each of these attempts is a real loss.
COMMIT_ATTEMPTS = 8
# What delta-rs says when a winning commit carries one of *our* transaction ids (CommitConflictError::
# ConcurrentTransaction): another run committed this batch's partitions; never retried.
SAME_TXN_CONFLICT = "Concurrent transaction failed"


class SinkError(RuntimeError):
    """A table state the pipeline must refuse (foreign table, expiring txns, impossible schema change)."""


class ConcurrentBatchError(RuntimeError):
    """Another writer committed the same app id first: the batch was (or is being) done elsewhere."""


class CommitContentionError(SinkError):
    """Every attempt to commit lost a race to other writers: nothing of the batch was written."""


# Delta has no unsigned integers, and delta-rs writes polars' UIntN as the signed N-bit type: a uint32 of
# 3e9 failed the whole batch's commit, again on every retry. Each unsigned column is stored in the next wider
# signed type instead (uint64 in decimal(20,0)), which holds every value the schema admits.
STORED_UNSIGNED: dict[type[pl.DataType], pl.DataType] = {
    pl.UInt8: pl.Int16(), pl.UInt16: pl.Int32(), pl.UInt32: pl.Int64(), pl.UInt64: pl.Decimal(20, 0)}
# Tables created before that hold them in the signed type of the same width: (Delta type, largest value).
LEGACY_UNSIGNED: dict[type[pl.DataType], tuple[str, int]] = {
    pl.UInt8: ("byte", 2**7 - 1), pl.UInt16: ("short", 2**15 - 1), pl.UInt32: ("integer", 2**31 - 1),
    pl.UInt64: ("long", 2**63 - 1)}


def stored_dtype(dtype: pl.DataType) -> pl.DataType:
    """The type a column of `dtype` is stored as in Delta (unsigned integers widened, also inside
    structs and lists)."""
    if type(dtype) in STORED_UNSIGNED:
        return STORED_UNSIGNED[type(dtype)]
    if isinstance(dtype, pl.Struct):
        return pl.Struct([pl.Field(f.name, stored_dtype(f.dtype)) for f in dtype.fields])
    if isinstance(dtype, pl.List):
        return pl.List(stored_dtype(dtype.inner))
    if isinstance(dtype, pl.Array):
        return pl.Array(stored_dtype(dtype.inner), dtype.shape)
    return dtype


def storable(frame: pl.DataFrame, existing: dict[str, str] | None = None) -> pl.DataFrame:
    """`frame` with the types Delta stores. `existing` (column → Delta type name of the table): a top-level
    unsigned column that an older table already holds in the signed type of its width keeps that type
    (`unstorable_rows` sent the values it cannot hold to quarantine first)."""
    casts: dict[str, pl.DataType] = {}
    for name, dtype in frame.schema.items():
        legacy = LEGACY_UNSIGNED.get(type(dtype))
        if legacy is not None and existing is not None and existing.get(name) == legacy[0]:
            casts[name] = {"byte": pl.Int8(), "short": pl.Int16(), "integer": pl.Int32(), "long": pl.Int64()}[legacy[0]]
        elif (wanted := stored_dtype(dtype)) != dtype:
            casts[name] = wanted
    return frame.cast(casts) if casts else frame  # type: ignore[arg-type]


@dataclass
class Committed:
    version: int | None  # the Delta table version written (None: nothing written)
    rows: int
    retries: int = 0  # attempts lost to other writers before this one landed
    seconds: float = 0.0  # time spent committing (all attempts)


def commit_with_retries(attempt: Any, refresh: Any, describe: str, attempts: int = COMMIT_ATTEMPTS) -> int:
    """Run `attempt()` (one Delta commit) until it lands; returns how many attempts were lost first.

    A loss to a commit on one of our own transaction ids raises ConcurrentBatchError at once (someone
    else did this batch). Any other CommitFailedError (metadata changed, delta-rs out of rebase
    attempts) is a race with a writer of *other* ids: `refresh()` re-reads the table and this batch's
    versions, raises ConcurrentBatchError if they moved, and the commit is tried again on the new
    snapshot. After `attempts` losses: CommitContentionError, never a silent drop."""
    last = ""
    for lost in range(attempts):
        try:
            attempt()
            return lost
        except CommitFailedError as exc:
            if SAME_TXN_CONFLICT in str(exc):
                raise ConcurrentBatchError(str(exc)) from exc
            last = str(exc)
        # back off a little, with jitter, so racing writers do not collide again in lockstep
        time.sleep(min(1.0, 0.02 * 2 ** lost) * (0.5 + random.random()))
        refresh()
    raise CommitContentionError(
        f"{describe}: gave up after {attempts} attempts, each lost to a concurrent commit by another writer "
        f"(last: {last}). Nothing of this batch was written and the broker keeps its messages; the next run "
        "re-plans them. If this repeats, run fewer shards or move maintenance/schema changes away from peak load.")


class TxnVersions:
    """App ids' transaction versions as a table holds them at one version, each looked up once.

    delta-rs replays the log for every `transaction_version` lookup (~0.4 ms on local disk, requests on
    S3), and a batch over 64 partitions looked its 64 ids up in the target, the quarantine, the fence and the
    ledger: ~100 ms a batch. A table's content at a version never changes, and our own commit moves it by
    exactly our transactions, so between batches of one writer nothing needs looking up again."""

    def __init__(self) -> None:
        self._at: tuple[int, dict[str, int | None]] | None = None  # (table version, app id -> version)

    def of(self, table: DeltaTable | None, app_ids: Iterable[str]) -> dict[str, int | None]:
        """The versions of `app_ids` at `table`'s snapshot (None for each while the table does not exist)."""
        app_ids = list(app_ids)
        if table is None:
            return dict.fromkeys(app_ids)
        version = table.version()
        if self._at is None or self._at[0] != version:
            self._at = (version, {})
        known = self._at[1]
        for a in app_ids:
            if a not in known:
                known[a] = table.transaction_version(a)
        return {a: known[a] for a in app_ids}

    def committed(self, table: DeltaTable | None, written: dict[str, int]) -> None:
        """Our commit of `written` landed and moved `table` to its version: if that is the one right after the
        version known here, what was known, updated with ours, holds there (else a commit by another writer
        came between: forget it all)."""
        at = self._at
        if table is not None and at is not None and table.version() == at[0] + 1:
            self._at = (at[0] + 1, {**at[1], **written})
        else:
            self._at = None


class DeltaTableSink:
    """One Delta table (target or quarantine) of one pipeline."""

    def __init__(self, uri: str | Location, pipeline: str, role: str, storage_options: dict[str, str] | None = None,
                 properties: dict[str, str] | None = None):
        # A bare path or URI gets its storage options from the environment (storage.py), plus `storage_options`.
        self.location = uri if isinstance(uri, Location) else location(uri, storage_options)
        self.uri, self.pipeline, self.role = self.location.uri, pipeline, role
        self.storage_options = self.location.options
        self.properties = properties or {}  # Delta table properties a table this sink creates starts with
        self._table: DeltaTable | None = None
        self._txn_versions = TxnVersions()

    @classmethod
    def of(cls, spec: Any, role: str) -> DeltaTableSink:
        """The pipeline's `target` or `quarantine` table, with the pipeline's storage options; a table it
        creates starts with the maintenance settings (checkpoint interval, retention), not delta-rs's defaults."""
        return cls(table_location(spec, role), spec.name, role, properties=table_properties(spec.maintenance))

    # ------------------------------------------------------------ reading state
    def table(self, refresh: bool = True) -> DeltaTable | None:
        if self._table is None:
            self._table = self.location.open()
        elif refresh:
            with self.location.failures("reading"):
                self._table.update_incremental()
        return self._table

    def versions(self, app_ids: list[str] | None = None, refresh: bool = True) -> dict[str, int | None]:
        return self._txn_versions.of(self.table(refresh), app_ids or [])

    def version_of(self, app_id: str) -> int | None:
        return self._txn_versions.of(self.table(refresh=False), [app_id])[app_id]

    def check_identity(self, identity: dict[str, str]) -> None:
        """Refuse a table written by another pipeline or source, or one whose txns could expire. Reads the table
        as last read (a run checks it right after `open_tables`), or opens it."""
        table = self.table(refresh=False)
        if table is None:
            return
        config = table.metadata().configuration
        if config.get(TXN_RETENTION_PROP):
            raise SinkError(
                f"pipeline '{self.pipeline}': {self.role} table {self.uri} sets {TXN_RETENTION_PROP}="
                f"{config[TXN_RETENTION_PROP]}: expired transaction ids would make batches re-ingest. "
                f"Unset it: DeltaTable(...).alter.set_table_properties({{'{TXN_RETENTION_PROP}': ...}}) is not "
                "reversible here, so point the pipeline at a new table.")
        expected = {PROP_PREFIX + "pipeline": self.pipeline,
                    **{PROP_PREFIX + k: v for k, v in identity.items()}}
        for key, want in expected.items():
            have = config.get(key)
            if have is not None and have != want:
                raise SinkError(
                    f"pipeline '{self.pipeline}': {self.role} table {self.uri} has {key}={have}, but the source "
                    f"now says {want}. The topic/stream was recreated or the table belongs to another pipeline; "
                    "refusing to ingest silently. Use a new table path, or delete the table to start over.")

    # ------------------------------------------------------------ writing
    def ensure_exists(self, template: pl.DataFrame, identity: dict[str, str],
                      partition_by: list[str] | None = None) -> None:
        """Create the table (schema only, no transactions) before a batch reads its fence.

        The fence (transaction versions) and the commit must use the same snapshot, or a concurrent
        writer's commit would go unnoticed: so the table must exist before the versions are read."""
        if self.table(refresh=False) is not None:
            return
        try:
            self.location.write(storable(template.clear()).to_arrow(), mode="error", partition_by=partition_by or None)
        except (CommitFailedError, DeltaError) as exc:
            if self.location.exists():
                return  # another writer created it first
            raise SinkError(f"pipeline '{self.pipeline}': cannot create {self.role} table {self.uri}: {exc}") from exc
        table = self.location.open()
        assert table is not None
        props = {**self.properties, PROP_PREFIX + "pipeline": self.pipeline, PROP_PREFIX + "role": self.role,
                 **{PROP_PREFIX + k: v for k, v in identity.items()}}
        for attempt in range(5):  # a concurrent first batch may commit in between; the properties are idempotent
            try:
                with self.location.failures("creating"):
                    table.update_incremental()
                    table.alter.set_table_properties(props, raise_if_not_exists=False)
                break
            except CommitFailedError:
                if attempt == 4:
                    raise
        self._table = None

    def append(self, frame: pl.DataFrame, txns: dict[str, int], metadata: dict[str, Any]) -> Committed:
        """Append `frame` in one commit carrying one Transaction per app id (even with zero rows).

        Commits against the snapshot the caller read its fence from (`versions()`; the versions are not looked
        up again, see TxnVersions): a commit by another writer since then on one of our app ids makes this
        fail with ConcurrentBatchError. A commit lost to a writer of other app
        ids (another shard) is retried on the new snapshot once our app ids are re-read and found unchanged
        (see `commit_with_retries`)."""
        table = self.table(refresh=False)
        if table is None:
            raise SinkError(f"pipeline '{self.pipeline}': {self.role} table {self.uri} does not exist")
        frame = storable(frame, self._column_types(table))
        self._check_schema_change(table, frame)
        fence = self._txn_versions.of(table, txns)
        commit = CommitProperties(
            app_transactions=[Transaction(app_id, version) for app_id, version in txns.items()],
            custom_metadata={k: v for k, v in metadata.items() if v is not None},
        )
        if self.role == "target" and faults.requested("during_target_commit"):
            self._die_between_data_files_and_log(frame)
        data = frame.to_arrow(compat_level=pl.CompatLevel.newest())  # no copy of string columns
        committing = f"committing a batch to the {self.role} table"

        def attempt() -> None:
            with self.location.failures(committing):
                write_deltalake(table, data, mode="append", schema_mode="merge", commit_properties=commit,
                                post_commithook_properties=commit_hooks(table.version() + 1))

        def refresh() -> None:
            with self.location.failures(f"reading the {self.role} table"):
                table.update_incremental()
            self._check_schema_change(table, frame)
            moved = {a: v for a, v in self._txn_versions.of(table, txns).items() if v != fence[a]}
            if moved:
                raise ConcurrentBatchError(f"another writer committed {sorted(moved)} meanwhile")

        started = time.monotonic()
        retries = commit_with_retries(attempt, refresh, f"pipeline '{self.pipeline}': committing to the "
                                      f"{self.role} table {self.uri}")
        self._txn_versions.committed(table, txns)
        # write_deltalake moved `table` to the version it committed: no refresh (a listing of the log) needed
        return Committed(table.version(), frame.height, retries, time.monotonic() - started)

    def _die_between_data_files_and_log(self, frame: pl.DataFrame) -> None:
        """Fault injection: the state a kill -9 inside `write_deltalake` leaves — the commit's parquet file in
        the table directory (local or S3), no log entry for it — then SIGKILL (or stall, for a test that stops
        the object store here). Readers must never see those rows, and the batch must land exactly once when it
        is re-run."""
        import io
        import uuid

        import pyarrow.parquet as pq

        buffer = io.BytesIO()
        pq.write_table(frame.to_arrow(), buffer)
        self.location.put_bytes(f"part-00000-{uuid.uuid4()}-c000.snappy.parquet", buffer.getvalue())
        faults.fault_point("during_target_commit")

    def replace(self, frame: pl.DataFrame, predicate: str, txns: dict[str, int], metadata: dict[str, Any],
                attempts: int = 5) -> Committed:
        """Replace the rows matching `predicate` with `frame`, in one commit (a backfill or replay).

        `txns` must never hold a live app id (that would move the live position): replays carry
        `backfill/...` ids. A concurrent live append adds rows outside the predicate (higher offsets, another
        `_batch_id`), so both commits stand; a conflict delta-rs does detect is retried on a fresh snapshot
        (the replace is idempotent)."""
        commit = CommitProperties(
            app_transactions=[Transaction(app_id, version) for app_id, version in txns.items()],
            custom_metadata={k: v for k, v in metadata.items() if v is not None},
        )
        for attempt in range(attempts):
            table = self.table(refresh=True)
            if table is None:
                raise SinkError(f"pipeline '{self.pipeline}': {self.role} table {self.uri} does not exist")
            stored = storable(frame, self._column_types(table))
            self._check_schema_change(table, stored)
            try:
                with self.location.failures(f"replacing rows of the {self.role} table"):
                    write_deltalake(table, stored.to_arrow(), mode="overwrite", predicate=predicate,
                                    schema_mode="merge", commit_properties=commit,
                                    post_commithook_properties=commit_hooks(table.version() + 1))
            except CommitFailedError:
                if attempt == attempts - 1:
                    raise
                continue
            return Committed(table.version(), frame.height)
        raise AssertionError("unreachable")

    @staticmethod
    def _column_types(table: DeltaTable) -> dict[str, str]:
        return {f.name: _type_name(f.type) for f in table.schema().fields}

    def unstorable_rows(self, frame: pl.DataFrame, position: str) -> dict[int, str]:
        """Rows (by their `position` column) holding an unsigned value this table cannot store: a table made
        before unsigned columns were widened holds uintN in the signed N-bit type. The rows go to quarantine
        with the reason and the fix, instead of failing every retry of the batch."""
        table = self.table(refresh=False)
        if table is None:
            return {}
        existing = self._column_types(table)
        failures: dict[int, str] = {}
        for name, dtype in frame.schema.items():
            legacy = LEGACY_UNSIGNED.get(type(dtype))
            if legacy is None or existing.get(name) != legacy[0]:
                continue
            over = frame.filter(pl.col(name) > legacy[1]).select(position, name)
            for row, value in over.iter_rows():
                failures.setdefault(row, (
                    f"number out of range: {name}={value} is more than {legacy[1]}, the largest value column "
                    f"'{name}' can hold in {self.uri} (Delta {legacy[0]}: the table was created before unsigned "
                    "columns were stored one size wider). To keep such values, point `table:` at a new table "
                    "and replay into it"))
        return failures

    def _check_schema_change(self, table: DeltaTable, frame: pl.DataFrame) -> None:
        existing = {f.name: f.type for f in table.schema().fields}
        incoming = Schema.from_arrow(frame.clear().to_arrow().schema)  # the schema only: no copy of the rows
        for field in incoming.fields:
            have = existing.get(field.name)
            if have is not None and _type_name(have) != _type_name(field.type):
                raise SinkError(
                    f"pipeline '{self.pipeline}': column '{field.name}' is {_type_name(have)} in {self.uri} but the "
                    f"schema now makes it {_type_name(field.type)}. Delta can add columns but not change a type. "
                    f"Revert the dtype of '{field.name}', add a new column under another name, or point "
                    "`table:` at a new table and replay into it.")

    # ------------------------------------------------------------ reading rows
    def offsets_in(self, app_partition: int, stream_filter: str | None, low: int, high: int) -> set[int]:
        """Offsets in (low, high] of one partition already in this table (used when quarantine is ahead)."""
        table = self.table(refresh=False)
        if table is None:
            return set()
        frame = self.location.scan().filter(
            (pl.col("_partition") == app_partition) & (pl.col("_offset") > low) & (pl.col("_offset") <= high)
        )
        if stream_filter is not None:
            frame = frame.filter(pl.col("_stream") == stream_filter)
        with self.location.failures("reading"):
            return set(frame.select("_offset").collect().get_column("_offset").to_list())

    def row_count(self) -> int:
        table = self.table()
        if table is None:
            return 0
        return int(table.count())


def _type_name(delta_type: Any) -> str:
    text = str(delta_type)
    # PrimitiveType("long") → long; nested types compare by their full text
    if text.startswith('PrimitiveType("'):
        return text[len('PrimitiveType("'):-2]
    return text


"""The batch lifecycle, the same for every broker and every trigger:

plan → read → decode → validate → write quarantine → write target → acknowledge → report.

The Delta log is the only record of progress: a batch plans from the target table's transaction
versions, writes each table in one commit carrying `Transaction(app_id, last covered offset)`, and only
then acknowledges to the broker. A crash anywhere leaves either nothing or a commit the next plan skips.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import polars as pl
from ulid import ULID

from ingest_defs.allocator import release_after_batch
from ingest_defs.config import PipelineFileWatch, PipelineSpec
from ingest_defs.decode import QUARANTINE_SCHEMA, ROW, standard_columns
from ingest_defs.faults import fault_point
from ingest_defs.formats import Format, format_for
from ingest_defs.ledger import Ledger, PartitionStats, ledger_rows, partition_stats
from ingest_defs.partitions import partition_key_at
from ingest_defs.sink import ConcurrentBatchError, DeltaTableSink
from ingest_defs.sources.base import Gap, PartitionRange, Plan, RawBatch, Source, payload_series
from ingest_defs.validation import validate

logger = logging.getLogger("ingest.batch")


LINGER_POLL_SECONDS = 0.25  # how often a lingering run asks the broker for new messages
# `batch.linger_seconds` unset: runs a sensor requests linger this long (a run start costs seconds, a sensor
# tick more), runs started by hand, by `ingest run`, a schedule or a backfill drain and end.
SENSOR_LINGER_SECONDS = 60.0
# A caught-up lingering run outlives `max_run_seconds` (each hand-over to a new run costs a run start in every
# waiting message's latency) unless another run of the pipeline waits for its slot; after this long it hands
# over anyway, so one run's log stays a size the UI shows well.
LINGERING_RUN_SECONDS = 3600.0
WAITING_CHECK_SECONDS = 5.0  # how often a lingering run asks whether another run waits for its slot


class GapError(RuntimeError):
    """Data was removed by the broker before it was ingested, and the pipeline says `on_gap: fail`."""


@dataclass
class BatchResult:
    batch_id: str
    planned: list[PartitionRange]
    covered: list[PartitionRange] = field(default_factory=list)
    gaps: list[Gap] = field(default_factory=list)
    messages: int = 0
    rows_written: int = 0
    rows_quarantined: int = 0
    nbytes: int = 0
    target_version: int | None = None
    quarantine_version: int | None = None
    lag_after: int = 0
    started_at: float = 0.0
    started_monotonic: float = 0.0
    duration_s: float = 0.0
    skipped: str | None = None  # why nothing was written (e.g. another writer did it)
    safe_to_ack: bool = True  # False only when our commit failed (then the broker must keep the messages)
    # where the time goes: read, decode_validate, write (fence and commits; "commit" is part of it), ledger, ack
    stage_s: dict[str, float] = field(default_factory=dict)
    reasons: Counter[str] = field(default_factory=Counter)
    partition_key: str = ""  # the ingestion-time partition the batch belongs to
    ingested_at: datetime | None = None  # `_ingested_at` of its rows
    stats: dict[int, PartitionStats] = field(default_factory=dict)  # per source partition, for the ledger
    counters: dict[str, int] = field(default_factory=dict)  # source-specific counts (MQTT: qos0_messages)
    ended_by: str | None = None  # why an open (unbounded) batch ended: max_messages, idle, max_wait, ...
    commit_retries: int = 0  # commit attempts lost to other writers (other shards, maintenance) and retried

    def summary(self, pipeline: str) -> str:
        ranges = ranges_text(self.covered)
        if self.skipped:
            return f"{pipeline} batch {self.batch_id}: skipped ({self.skipped}) ranges {ranges}"
        retried = f" | {self.commit_retries} commit retries" if self.commit_retries else ""
        rate = self.messages / self.duration_s if self.duration_s else 0.0
        ended = f" | ended by {self.ended_by}" if self.ended_by else ""
        return (f"{pipeline} batch {self.batch_id}: {ranges} | {self.messages} msgs → {self.rows_written} rows, "
                f"{self.rows_quarantined} quarantined | delta v{self.target_version} | lag {self.lag_after} | "
                f"{self.duration_s:.2f}s ({rate:,.0f} msg/s){ended}{retried}")


SHOWN_RANGES = 4  # a wide topic's batch line names this many ranges, then counts the rest


def ranges_text(covered: list[PartitionRange]) -> str:
    """The ranges a batch read, for its log line: every one for a few partitions; for a wide topic the first
    few and how many more (64 ranges made a line of 2,000 characters; the ledger keeps them all)."""
    read = [f"p{r.partition}:{r.start}..{r.end}" for r in covered if r.count]
    if len(read) > SHOWN_RANGES + 1:
        return ", ".join(read[:SHOWN_RANGES]) + f", … +{len(read) - SHOWN_RANGES} partitions"
    return ", ".join(read) or "-"


@dataclass
class BatchContext:
    """Who runs the batches: for commit metadata and logs."""

    run_id: str = ""
    trigger: str = "manual"
    mode: str = "live"
    log: Callable[[str], None] | None = None
    partition_key: str | None = None  # the run's partition (None: the partition of each batch's plan time)
    log_warning: Callable[[str], None] | None = None
    shard: str | None = None  # `i/N` when the run serves one shard of a sharded pipeline (the source is restricted)
    # Whether another run of the pipeline (a backfill, a launch from the UI) waits for this run's pool slot:
    # a lingering run then ends at once instead of at `linger_seconds` or its budget.
    others_waiting: Callable[[], bool] | None = None

    def info(self, message: str, batch: BatchResult | None = None) -> None:
        logger.info(message, extra={"batch": batch} if batch is not None else None)  # the CLI's progress reads it
        if self.log:
            self.log(message)

    def warning(self, message: str) -> None:
        logger.warning(message)
        if self.log_warning:
            self.log_warning(message)


class BatchRunner:
    """Runs consecutive bounded batches of one pipeline (catch-up mode)."""

    def __init__(self, spec: PipelineSpec, source: Source, target: DeltaTableSink, quarantine: DeltaTableSink,
                 ctx: BatchContext | None = None, ledger: Ledger | None = None):
        self.spec, self.source, self.target, self.quarantine = spec, source, target, quarantine
        self.ctx = ctx or BatchContext()
        self.ledger = ledger
        self._identity: dict[str, str] | None = None
        self._format: Format | None = None
        self.versions_seen: dict[str, int | None] = {}  # every partition's Delta version at the last plan

    @property
    def format(self) -> Format:
        """How payloads decode (json, or a schema-registry format); made on first use, then reused."""
        if self._format is None:
            self._format = format_for(self.spec)
        return self._format

    @property
    def linger_seconds(self) -> float:
        """`batch.linger_seconds`, or when unset SENSOR_LINGER_SECONDS for a run a sensor requested, else 0."""
        configured = self.spec.batch.linger_seconds
        if configured is not None:
            return configured
        return SENSOR_LINGER_SECONDS if self.ctx.trigger == "sensor" else 0.0

    @property
    def lingering_run_seconds(self) -> float:
        """How long a caught-up lingering run may last: LINGERING_RUN_SECONDS, or half the pipeline's
        freshness window (`checks.freshness_minutes`) since the asset materializes when a run ends."""
        minutes = self.spec.checks.freshness_minutes
        return LINGERING_RUN_SECONDS if minutes is None else min(LINGERING_RUN_SECONDS, minutes * 30.0)

    def identity(self) -> dict[str, str]:
        if self._identity is None:
            self._identity = self.source.identity()
            self.target.check_identity(self._identity)
            self.quarantine.check_identity(self._identity)
        return self._identity

    # ------------------------------------------------------------ planning
    def plan(self, requested: list[PartitionRange] | None = None, refresh: bool = True) -> Plan:
        """Plan from the target table's versions; a requested plan (from a sensor) is clamped to them.
        `refresh=False`: from the snapshot just read (`open_tables`), without listing the log again."""
        self.target.table(refresh=refresh)
        seen: dict[str, int | None] = {}

        def stored(app_id: str) -> int | None:
            seen[app_id] = self.target.version_of(app_id)
            return seen[app_id]

        plan = self.source.plan(stored, self.spec.batch.max_messages)
        self.versions_seen = seen
        if requested is None:
            return plan
        fresh = {r.app_id: r for r in plan.ranges}
        clamped = []
        for r in requested:
            now = fresh.get(r.app_id)
            if now is None:
                continue  # already ingested by another run
            start = max(r.start, now.start)
            if start <= r.end:
                clamped.append(PartitionRange(r.app_id, r.partition, start, r.end))
        return Plan(ranges=clamped, gaps=plan.gaps, bounded=plan.bounded,
                    lag_after=plan.lag_after + plan.total - sum(r.count for r in clamped))

    def handle_gaps(self, plan: Plan) -> None:
        for gap in plan.gaps:
            message = f"pipeline '{self.spec.name}': {gap.describe()}"
            if self.spec.on_gap == "fail":
                raise GapError(f"{message}. on_gap is 'fail': set `on_gap: skip` to record the loss and go on, "
                               "or restore the data to the broker.")
            self.ctx.info(f"{message}; on_gap is 'skip': recorded and skipped")

    # ------------------------------------------------------------ catch-up loop
    def run(self, requested: list[PartitionRange] | None = None, max_batches: int = 0,
            max_seconds: float | None = None) -> list[BatchResult]:
        """Consecutive batches until caught up, `max_batches`, or the time budget.

        Bounded sources read ahead: batch N+1 is read from the broker while batch N is decoded and
        committed on a worker thread (the broker read and the Delta write both release the GIL). Commits
        and acknowledgements stay strictly in order, and a read-ahead batch is thrown away unless the
        batch before it committed."""
        self.open_tables()
        self.identity()
        self.repair_ledger(refresh=False)
        budget = self.spec.batch.max_run_seconds if max_seconds is None else max_seconds
        started = time.monotonic()
        # Linger: once caught up, keep polling for new messages this long (an explicit batch count does not).
        linger = self.linger_seconds if not max_batches else 0.0
        last_data = started
        # Caught up and lingering, a batch starts at most once per max_wait_seconds (unless a full bounded one
        # waits): steady or sparse traffic makes a commit per max_wait_seconds, not one per poll or per gap.
        pace = self.spec.batch.max_wait_seconds if linger else 0.0
        # caught_up: the last plan or batch found nothing more waiting (pacing and hand-over apply); lingered:
        # that happened once in this run (the run is then bounded by LINGERING_RUN_SECONDS, not the budget)
        caught_up, lingered, last_read_at = False, False, 0.0
        watch = PipelineFileWatch(self.spec) if linger else None  # new settings end a lingering run

        asked_at = 0.0  # when others_waiting() was last asked

        def hand_over() -> bool:
            """A caught-up lingering run ends for new settings, a new partition (a run's batches all carry
            its partition key), or a run waiting for its slot (checked every 5 s)."""
            nonlocal asked_at
            if self.ctx.partition_key is not None and partition_key_at(self.spec) != self.ctx.partition_key:
                self.ctx.info(f"{self.spec.name}: partition {self.ctx.partition_key} has ended; this run ends "
                              "here and the next one serves the new partition")
                return True
            if watch is not None and watch.changed():
                self.ctx.info(f"{self.spec.name}: the pipelines file changed this pipeline's settings; this run "
                              "ends here and the next one applies them")
                return True
            now = time.monotonic()
            if self.ctx.others_waiting is None or now - asked_at < WAITING_CHECK_SECONDS:
                return False
            asked_at = now
            if self.ctx.others_waiting():
                self.ctx.info(f"{self.spec.name}: another run of this pipeline is waiting; this run ends here")
                return True
            return False

        def spent() -> bool:
            """The run's time is up: `max_run_seconds` while catching up, lingering_run_seconds once caught up."""
            limit = self.lingering_run_seconds if linger and lingered and max_seconds is None else budget
            return time.monotonic() - started >= limit

        def lingering() -> bool:
            return bool(linger) and time.monotonic() - last_data < linger and not spent()
        results: list[BatchResult] = []
        inflight: tuple[BatchResult, RawBatch, Future[BatchResult], Future[None]] | None = None

        def finish_inflight() -> BatchResult:
            """Commit and acknowledge the read-ahead batch, once even if that raises. Nothing here keeps its
            messages afterwards: a finished batch held through the next read is a third batch in memory."""
            nonlocal inflight
            item, inflight = inflight, None
            assert item is not None
            result, raw, committing, recording = item
            finished = self._finish(result, raw, committing, results, recording)
            del result, raw
            del item
            release_after_batch(finished.nbytes)  # its frames and messages are gone: hand their pages back
            return finished

        known: dict[str, int | None] = {}  # versions as they will be once the in-flight batch commits
        planned = False  # whether a plan was made in this run
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"write-{self.spec.name}") as writer:
            try:
                while True:
                    if caught_up and linger and hand_over():
                        break
                    if inflight is None:
                        # the first plan reads the snapshot open_tables() took a moment ago
                        plan = self.plan(requested if not results else None, refresh=planned)
                        planned = True
                        if plan.empty and requested is not None and not results:
                            requested = None  # done elsewhere meanwhile: catch up from where Delta stands
                            plan = self.plan()
                        # Every partition's position, not only those in this plan: a partition without lag
                        # now may get messages before the read-ahead plans it (it must not start from 0).
                        known = dict(self.versions_seen)
                    else:  # read ahead without touching Delta (the writer thread owns the tables now)
                        plan = self.source.plan(known.get, self.spec.batch.max_messages)
                    self.handle_gaps(plan)
                    if plan.empty:
                        caught_up = lingered = True
                        if inflight is not None and linger:
                            finish_inflight()  # commit it, then poll from where Delta stands
                            continue
                        if lingering():
                            time.sleep(LINGER_POLL_SECONDS)
                            continue
                        break
                    too_soon = last_read_at + pace - time.monotonic()
                    if caught_up and too_soon > 0 and (not plan.bounded or plan.total < self.spec.batch.max_messages):
                        if inflight is not None:  # commit what was read while waiting for more
                            finish_inflight()
                        time.sleep(min(too_soon, WAITING_CHECK_SECONDS))  # then hand_over() is asked again
                        if spent():
                            break
                        continue
                    last_read_at = time.monotonic()
                    result, raw = self._read(plan)
                    if len(raw):
                        last_data = time.monotonic()
                    if inflight is not None:
                        previous = finish_inflight()
                        if previous.skipped:
                            del raw  # not held through the next read
                            continue  # the read-ahead assumed a commit that did not happen: re-plan from Delta
                    if plan.bounded:
                        known.update(self._versions_after(raw, plan))
                        inflight = (result, raw, *self._submit(writer, result, raw))  # finished after the next read
                    else:  # no read-ahead: a batch ends when the broker stops sending, so it is finished at once
                        committing, recording = self._submit(writer, result, raw)
                        self._finish(result, raw, committing, results, recording)
                        del raw  # not held through the next read
                        release_after_batch(result.nbytes)
                        last = results[-1]
                        if not last.safe_to_ack or (last.messages == 0 and not lingering()):
                            break  # unbounded sources: nothing more right now, or re-plan in a later run
                        if last.ended_by == "idle" and not linger:
                            break  # caught up (idle_ms without a message): as a bounded plan with no lag left
                        # keeping up with live traffic (a batch cut by idle_ms or max_wait), not draining a backlog
                        caught_up = last.ended_by in ("idle", "max_wait")
                        lingered = lingered or caught_up
                        if last.messages == 0:
                            results.pop()  # an empty poll while lingering: not a batch worth reporting
                    done = len(results) + (inflight is not None)
                    if max_batches and done >= max_batches:
                        break
                    if spent():
                        break
                    if plan.bounded:
                        if result.lag_after == 0 and not linger:
                            break
                        # a batch cut by max_bytes leaves lag: the next one is read at once, not paced
                        caught_up = result.lag_after == 0
                        lingered = lingered or caught_up
            finally:
                if inflight is not None:
                    result, raw, committing, recording = inflight
                    self._finish(result, raw, committing, results, recording)
        self._drain(results)
        return results

    def _drain(self, results: list[BatchResult]) -> None:
        """A source that would lose delivered messages on close (MQTT QoS 0) hands them over as a last batch."""
        drain = getattr(self.source, "drain", None)
        if drain is None:
            return
        self.target.table(refresh=True)
        raw = drain(self.target.version_of)
        if raw is None or not len(raw):
            return
        result = BatchResult(batch_id=str(ULID()), planned=list(raw.covered), started_at=time.time(),
                             started_monotonic=time.monotonic(),
                             partition_key=self.ctx.partition_key or partition_key_at(self.spec))
        self._describe(result, raw, Plan(ranges=list(raw.covered), bounded=False))
        self._finish(result, raw, None, results)

    def open_tables(self) -> None:
        """Bring the target, quarantine and ledger tables to their latest versions, all at once: delta-rs lists
        and replays each log without the GIL. The run's identity check, ledger repair and first plan then read
        these snapshots instead of listing each log again (on local disk a listing covers every retained
        commit)."""
        readers = [self.target.table, self.quarantine.table] + ([self.ledger.table] if self.ledger else [])
        with ThreadPoolExecutor(max_workers=len(readers), thread_name_prefix=f"open-{self.spec.name}") as pool:
            for opened in [pool.submit(read) for read in readers]:
                opened.result()

    def repair_ledger(self, refresh: bool = True) -> None:
        """Record batches a crash left without their ledger row (committed to the target, not to the ledger).
        `refresh=False`: from the snapshots `open_tables` just read."""
        if self.ledger is None:
            return
        # Only this run's own partitions: another shard's batch may be between its target and ledger commits.
        app_ids = [p.app_id for p in self.source.state()]
        repaired = self.ledger.repair(self.target.table(refresh=refresh), self.quarantine.location, app_ids,
                                      target_location=self.target.location, refresh=refresh)
        if repaired:
            self.ctx.info(f"{self.spec.name}: ledger rows rebuilt for batches {', '.join(repaired)}")

    def _versions_after(self, raw: RawBatch, plan: Plan) -> dict[str, int | None]:
        """Where each partition will stand once this batch commits (for planning the next one)."""
        versions: dict[str, int | None] = {}
        for planned, covered in zip(plan.ranges, raw.covered, strict=True):
            versions[planned.app_id] = covered.end if covered.count else planned.start - 1
        return versions

    def _finish(self, result: BatchResult, raw: RawBatch, future: Future[BatchResult] | None,
                results: list[BatchResult], recording: Future[None] | None = None) -> BatchResult:
        """Wait for the batch's commits, then acknowledge it to the broker (always on this thread). A batch
        committed on the writer thread has its ledger row written there meanwhile (`recording`): the
        acknowledgement needs only the target commit, and a ledger row a crash leaves out is rebuilt."""
        if future is not None:
            future.result()
        else:
            self._write(result, raw)
        if result.safe_to_ack:
            fault_point("after_target_commit")
            t1 = time.monotonic()
            self.source.acknowledge(raw)
            result.stage_s["ack"] = time.monotonic() - t1
            fault_point("after_ack")
        if recording is not None:
            recording.result()
        result.duration_s = time.monotonic() - result.started_monotonic
        results.append(result)
        if result.messages or not self.linger_seconds:  # lingering polls would log every 0.5 s
            self.ctx.info(result.summary(self.spec.name), result)
        if result.target_version is not None:
            for warning in raw.warnings:
                self.ctx.warning(f"{warning} (batch {result.batch_id})")
        return result

    # ------------------------------------------------------------ one batch
    def run_one(self, plan: Plan) -> BatchResult:
        """One batch, start to end: read, decode, validate, commit, acknowledge."""
        result, raw = self._read(plan)
        results: list[BatchResult] = []
        return self._finish(result, raw, None, results)

    def _read(self, plan: Plan) -> tuple[BatchResult, RawBatch]:
        result = BatchResult(batch_id=str(ULID()), planned=plan.ranges, started_at=time.time(),
                             started_monotonic=time.monotonic(), gaps=plan.gaps,
                             partition_key=self.ctx.partition_key or partition_key_at(self.spec))
        fault_point("after_plan")
        raw = self.source.read(plan, self.spec.batch.max_bytes)
        result.stage_s["read"] = time.monotonic() - result.started_monotonic
        fault_point("after_read")
        self._describe(result, raw, plan)
        return result, raw

    @staticmethod
    def _describe(result: BatchResult, raw: RawBatch, plan: Plan) -> None:
        result.covered, result.messages, result.nbytes = raw.covered, len(raw), raw.nbytes
        result.counters, result.ended_by = dict(raw.counters), raw.ended_by
        if raw.lag_after is not None:
            result.lag_after = raw.lag_after
        elif plan.bounded:
            result.lag_after = plan.lag_after + sum(p.count - c.count for p, c in zip(plan.ranges, raw.covered, strict=False))
        else:
            result.lag_after = plan.lag_after

    def _write(self, result: BatchResult, raw: RawBatch) -> BatchResult:
        """Commit the batch (`_commit`), then record it in the ledger. No acknowledgement."""
        self._commit(result, raw)
        if result.target_version is not None:
            self._record(result, raw)
        return result

    def _submit(self, writer: ThreadPoolExecutor, result: BatchResult,
                raw: RawBatch) -> tuple[Future[BatchResult], Future[None]]:
        """The batch's commits, then its ledger row, on the writer thread: the caller acknowledges the batch once
        the commit is done (`_finish`), while the ledger row is written."""
        committing = writer.submit(self._commit, result, raw)
        return committing, writer.submit(self._record_once_committed, committing, result, raw)

    def _record_once_committed(self, committing: Future[BatchResult], result: BatchResult, raw: RawBatch) -> None:
        """The ledger row of a batch `_commit` committed (it ran before this, on the same writer thread)."""
        if committing.exception() is None and result.target_version is not None:
            self._record(result, raw)

    def _commit(self, result: BatchResult, raw: RawBatch) -> BatchResult:
        """Decode, validate, fence against Delta, commit quarantine then target. No ledger, no acknowledgement."""
        t1 = time.monotonic()
        good, bad = self._rows(raw, result)
        raw.release_columns()  # in the frames now: not held through the write while the next batch is read
        result.stage_s["decode_validate"] = time.monotonic() - t1
        t1 = time.monotonic()
        app_ids = [r.app_id for r in raw.covered]
        # Tables exist before the fence is read, so fence and commit share one snapshot.
        self.target.ensure_exists(good, self.identity(), self.spec.partition_by)
        if bad.height:
            self.quarantine.ensure_exists(bad, self.identity())
        fresh_target = self.target.versions(app_ids)
        fresh_quarantine = self.quarantine.versions(app_ids)
        if not any(r.count for r in raw.covered):
            result.skipped = "nothing new"  # still acknowledged: e.g. MQTT redeliveries already in Delta
            return result
        if all(_done(r, fresh_target.get(r.app_id)) for r in raw.covered):
            result.skipped = "already in Delta (another run committed these ranges)"
            return result
        good = self._drop_written(good, raw.covered, fresh_target)
        good = self._drop_quarantined(good, raw.covered, fresh_target, fresh_quarantine)
        bad = self._drop_written(bad, raw.covered, fresh_quarantine)

        meta = self._commit_metadata(result, raw)
        commit_s = 0.0
        try:
            if bad.height:
                txns = {r.app_id: _max(r.end, fresh_quarantine.get(r.app_id)) for r in raw.covered if r.count}
                committed = self.quarantine.append(bad, txns, meta)
                result.quarantine_version, result.rows_quarantined = committed.version, committed.rows
                result.commit_retries += committed.retries
                commit_s += committed.seconds
            fault_point("after_quarantine_commit")
            txns = {r.app_id: _max(r.end, fresh_target.get(r.app_id)) for r in raw.covered if r.count}
            if result.quarantine_version is not None:
                meta["ingest.quarantine_version"] = str(result.quarantine_version)
            committed = self.target.append(good, txns, meta)
            result.target_version, result.rows_written = committed.version, committed.rows
            result.commit_retries += committed.retries
            result.stage_s["commit"] = commit_s + committed.seconds
        except ConcurrentBatchError:
            result.skipped = "another writer committed the same ranges first; re-planning"
            result.safe_to_ack = False  # our commit did not land: the broker must keep these messages
            return result
        result.stage_s["write"] = time.monotonic() - t1
        return result

    def _record(self, result: BatchResult, raw: RawBatch) -> None:
        """The batch's ledger row(s), after the target commit (a crash before this is repaired next run)."""
        fault_point("before_ledger")
        if self.ledger is None:
            return
        t1 = time.monotonic()
        self.ledger.append(ledger_rows(
            pipeline=self.spec.name, batch_id=result.batch_id, partition_key=result.partition_key, mode="live",
            status="committed", trigger=self.ctx.trigger, run_id=self.ctx.run_id, generation=None,
            covered=raw.covered, stats=result.stats, rows_written=result.rows_written,
            rows_quarantined=result.rows_quarantined, target_version=result.target_version,
            quarantine_version=result.quarantine_version, ingested_at=result.ingested_at,
            started_at=datetime.fromtimestamp(result.started_at, UTC),
            qos0_messages=result.counters.get("qos0_messages")),
            covered={r.app_id: r.end for r in raw.covered if r.count > 0})
        result.stage_s["ledger"] = time.monotonic() - t1

    def _rows(self, raw: RawBatch, result: BatchResult,
              ingested_at: datetime | None = None) -> tuple[pl.DataFrame, pl.DataFrame]:
        """Decode and validate: (rows for the target, rows for the quarantine)."""
        batch_ts = ingested_at or datetime.now(UTC)
        result.ingested_at = batch_ts
        failures: dict[int, str] = {}  # batch position → reason: each message's content is judged alone
        std = standard_columns(raw, self.spec.source.kind, result.batch_id, batch_ts, failures)
        result.stats = partition_stats(std)
        decoded = self.format.decode(raw.payloads)
        failures = {**failures, **decoded.failures}
        rows = decoded.rows
        if failures:
            rows = rows.filter(~pl.col(ROW).is_in(list(failures)))
        std_good = std if not failures else std.join(rows.select(ROW), on=ROW, how="semi")
        frame = rows.drop(ROW).hstack(std_good)
        checked = validate(frame, self.spec.pandera_schema, self.spec.name)
        if checked.failures:
            positions = frame.get_column(ROW)
            for position, reason in checked.failures.items():
                failures[positions[position]] = reason
        good = checked.valid
        # only in tables older than widened unsigned columns (no target: the decode harness of the fuzz tests)
        unstorable = self.target.unstorable_rows(good, ROW) if self.target is not None else {}
        if unstorable:
            failures.update(unstorable)
            good = good.filter(~pl.col(ROW).is_in(list(unstorable)))
        if self.keep_raw:
            payloads = payload_series("_raw", raw.payloads)
            positions = good.get_column(ROW)
            if good.height < len(raw) or not positions.is_sorted():  # the payloads of the rows left only
                payloads = payloads.gather(positions)
            good = good.with_columns(payloads)
        good = good.drop(ROW)
        for reason in failures.values():
            result.reasons[_reason_kind(reason)] += 1
        return good, self._quarantine_rows(std, raw, failures)

    @property
    def keep_raw(self) -> bool:
        return self.spec.keep_raw_payload

    def _quarantine_rows(self, std: pl.DataFrame, raw: RawBatch, failures: dict[int, str]) -> pl.DataFrame:
        if not failures:
            return pl.DataFrame(schema=QUARANTINE_SCHEMA)
        positions = sorted(failures)
        rows = std.filter(pl.col(ROW).is_in(positions)).sort(ROW)
        return rows.with_columns(
            pl.Series("_error", [failures[i] for i in positions], dtype=pl.String),
            pl.Series("_raw", [raw.payloads[i] for i in positions], dtype=pl.Binary),
        ).drop(ROW)

    @staticmethod
    def _drop_written(frame: pl.DataFrame, covered: list[PartitionRange],
                      versions: dict[str, int | None]) -> pl.DataFrame:
        """Rows at or below a table's stored version are already there (a retried or raced batch)."""
        floors = {r.partition: versions.get(r.app_id) for r in covered}
        if frame.height == 0 or all(v is None or v < r.start for r, v in ((r, floors[r.partition]) for r in covered)):
            return frame
        mapping = {p: (v if v is not None else -1) for p, v in floors.items()}
        floor = pl.col("_partition").replace_strict(mapping, default=-1, return_dtype=pl.Int64)
        return frame.filter(pl.col("_offset") > floor)

    def _drop_quarantined(self, good: pl.DataFrame, covered: list[PartitionRange],
                          target_versions: dict[str, int | None],
                          quarantine_versions: dict[str, int | None]) -> pl.DataFrame:
        """After a crash between the two commits the quarantine is ahead: keep its rows out of the target."""
        for r in covered:
            t, q = target_versions.get(r.app_id), quarantine_versions.get(r.app_id)
            if q is not None and (t is None or q > t) and good.height:
                low = -1 if t is None else t
                taken = self.quarantine.offsets_in(r.partition, None, low, q)
                if taken:
                    good = good.filter(~((pl.col("_partition") == r.partition) & pl.col("_offset").is_in(list(taken))))
        return good

    def _commit_metadata(self, result: BatchResult, raw: RawBatch) -> dict[str, Any]:
        return {
            "ingest.pipeline": self.spec.name,
            "ingest.batch_id": result.batch_id,
            "ingest.run_id": self.ctx.run_id or None,
            "ingest.trigger": self.ctx.trigger,
            "ingest.mode": self.ctx.mode,
            "ingest.ranges": json.dumps([r.as_dict() for r in raw.covered]),
            "ingest.partition_key": result.partition_key,
            "ingest.ingested_at": result.ingested_at.isoformat() if result.ingested_at else None,
            "ingest.counters": json.dumps(result.counters) if result.counters else None,
            "ingest.ended_by": result.ended_by,
            "ingest.shard": self.ctx.shard,
        }


def _done(covered: PartitionRange, version: int | None) -> bool:
    return covered.count == 0 or (version is not None and version >= covered.end)


def _max(end: int, stored: int | None) -> int:
    # transaction_version is not monotonic: never write a lower version than the table holds
    return end if stored is None else max(end, stored)


def _reason_kind(reason: str) -> str:
    return reason.split(":", 1)[0].split("(")[0].strip()[:60]

"""The `ingest` command: local broker stack, runs through Dagster, status, sample producer, validation."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ingest_defs.config import (
    REPO_ROOT,
    ConfigError,
    ConfigErrors,
    PipelineSpec,
    load_pipelines,
    pipelines_file,
)

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)  # errors go to stderr: stdout stays clean for scripts


def _ensure_dagster_home() -> None:
    # DAGSTER_HOME must be absolute; default to this repo's dagster_home/ (as the Makefile does).
    home = Path(os.environ.get("DAGSTER_HOME") or REPO_ROOT / "dagster_home").resolve()
    home.mkdir(parents=True, exist_ok=True)
    os.environ["DAGSTER_HOME"] = str(home)


def _load(name: str | None = None) -> dict[str, PipelineSpec]:
    specs = load_pipelines()
    if name is not None and name not in specs:
        raise ConfigError(None, name, f"no pipeline named '{name}' in {pipelines_file()}",
                          f"use one of {', '.join(specs)}")
    return specs


# ------------------------------------------------------------ commands
def cmd_stack(args: argparse.Namespace) -> int:
    from ingest_defs.stack import manager

    services = {"with_s3": True if args.s3 else None, "with_postgres": args.postgres}
    if args.action == "up":
        return manager.up(secure=args.secure, prometheus=args.prometheus, cluster=args.cluster, **services)
    if args.action == "down":
        return manager.down(cluster=True) if args.cluster else manager.down()
    return manager.status(secure=args.secure, prometheus=args.prometheus, cluster=args.cluster, **services)


def cmd_validate(_args: argparse.Namespace) -> int:
    specs = load_pipelines()
    for spec in specs.values():
        console.print(f"[green]ok[/] {spec.name}: {spec.source.kind} → {spec.table_uri()}")
    return 0


def cmd_produce(args: argparse.Namespace) -> int:
    from ingest_defs.resources.brokers import source_for
    from ingest_defs.samples import make_samples

    spec = _load(args.pipeline)[args.pipeline]
    source = source_for(spec)
    try:
        source.ensure_exists()
        samples = make_samples(spec, args.count, args.bad_fraction, seed=args.seed, start_id=args.start_id,
                               users=args.users)
        if args.key is not None:  # Kafka key, NATS subject token, MQTT topic level for every message
            samples.keys = [args.key.encode()] * len(samples.payloads)
        t0 = time.monotonic()
        sent = source.publish(samples.payloads, samples.keys) if args.count else 0
        took = time.monotonic() - t0
    finally:
        source.close()
    console.print(f"{spec.name}: produced {sent} messages ({len(samples.bad)} bad) to {spec.source.kind} "
                  f"in {took:.1f}s")
    return 0


def run_pipeline(spec: PipelineSpec, max_batches: int = 0, max_seconds: float | None = None,
                 trigger: str = "cli", quiet: bool = False, verbose: bool = False, shard: int | None = None):
    """Run batches of one pipeline (or of one shard of it) through its Dagster job, in this process, on the
    persistent instance."""
    _ensure_dagster_home()
    from dagster import DagsterInstance

    from ingest_defs.assets.ingestion import job_name, op_name
    from ingest_defs.factory import build_definitions
    from ingest_defs.partitions import partition_key_at
    from ingest_defs.shards import Shard, shard_job_name, shard_op_name

    defs = build_definitions({spec.name: spec})
    config = {"trigger": trigger, "max_batches": max_batches, "mode": "live"}
    if max_seconds is not None:
        config["max_seconds"] = max_seconds
    # Dagster's console logger prints a failure's framework trace (twice): it stays in the run's event log
    # and shows here only with -v; the command prints the failure's one line itself.
    loggers = {"console": {"config": {"log_level": "INFO" if verbose else "CRITICAL"}}}
    tags = {"ingest/pipeline": spec.name, "ingest/trigger": trigger}
    with DagsterInstance.get() as instance:
        if shard is not None and spec.shards > 1:  # a shard's own job (its own pool): not partitioned
            job = defs.resolve_job_def(shard_job_name(spec, shard))
            return job.execute_in_process(run_config={"ops": {shard_op_name(spec, shard): {"config": config}},
                                                      "loggers": loggers}, instance=instance, raise_on_error=False,
                                          tags={**tags, "ingest/shard": Shard(shard, spec.shards).label})
        job = defs.resolve_job_def(job_name(spec))
        run_config = {"ops": {op_name(spec): {"config": config}}, "loggers": loggers}
        return job.execute_in_process(run_config=run_config, instance=instance, raise_on_error=False,
                                      partition_key=partition_key_at(spec), tags=tags)


def run_shards(spec: PipelineSpec, args: argparse.Namespace) -> int:
    """All shards of a pipeline at once: one `ingest run <pipeline> --shard i` child process each (separate
    runs and pools, as the daemon would launch them), their lines prefixed with the shard."""
    import subprocess
    import threading

    extra = ["--max-batches", str(args.max_batches)]
    if args.max_seconds is not None:
        extra += ["--max-seconds", str(args.max_seconds)]
    children = [(i, subprocess.Popen([sys.executable, "-m", "ingest_defs", "run", spec.name, "--shard", str(i),
                                      *extra], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
                for i in range(spec.shards)]

    def relay(i: int, child: subprocess.Popen) -> None:
        assert child.stdout is not None
        for line in child.stdout:
            console.print(f"[shard {i}] {line.rstrip()}", markup=False, soft_wrap=True, highlight=False)

    relays = [threading.Thread(target=relay, args=c) for c in children]
    for t in relays:
        t.start()
    codes = [child.wait() for _, child in children]
    for t in relays:
        t.join()
    failed = [i for (i, _), code in zip(children, codes, strict=True) if code != 0]
    if failed:
        console.print(f"[red]{spec.name}: shard(s) {', '.join(map(str, failed))} failed[/]")
    return 1 if failed else 0


def cmd_run(args: argparse.Namespace) -> int:
    from ingest_defs.cli_output import BatchProgress, run_failure

    specs = _load(None if args.pipeline == "all" else args.pipeline)
    names = [args.pipeline] if args.pipeline != "all" else list(specs)
    if args.shard is not None:
        spec = specs[names[0]]
        if args.pipeline == "all" or not 0 <= args.shard < spec.shards:
            raise ConfigError(spec.name if args.pipeline != "all" else None, "--shard",
                              f"shard {args.shard} does not exist ({args.pipeline} has {spec.shards} shard(s))"
                              if args.pipeline != "all" else "--shard needs one pipeline, not 'all'",
                              f"give 0 ≤ --shard < {spec.shards}, or leave --shard out to run every shard")
    progress = BatchProgress(console)
    batch_log = logging.getLogger("ingest.batch")
    batch_log.addHandler(progress)
    batch_log.setLevel(logging.INFO)
    status = 0
    try:
        for name in names:
            if specs[name].shards > 1 and args.shard is None:
                status = max(status, run_shards(specs[name], args))
                continue
            who = name if args.shard is None else f"{name} shard {args.shard}"
            progress.start(who)
            try:
                result = run_pipeline(specs[name], args.max_batches, args.max_seconds, verbose=args.verbose,
                                      shard=args.shard)
            finally:
                progress.stop()
            if not result.success:
                status = 1
                err_console.print(f"[red]error:[/] {escape(run_failure(result))}", soft_wrap=True)
                err_console.print(f"[dim]{who}: run {result.run_id} failed; its logs keep the full trace "
                                  f"(the Dagster UI, or `ingest -v run {name}`)[/]", soft_wrap=True)
            else:
                console.print(f"{who}: run {result.run_id} done ({progress.count} batches, "
                              f"{progress.messages:,} messages)", soft_wrap=True)
    finally:
        batch_log.removeHandler(progress)
    return status


def cmd_status(args: argparse.Namespace) -> int:
    from ingest_defs.cli_output import print_errors, print_json, print_table, status_records, status_table
    from ingest_defs.status import read_status

    specs = _load(args.pipeline if args.pipeline != "all" else None)
    names = [args.pipeline] if args.pipeline != "all" else list(specs)
    statuses = [read_status(specs[name]) for name in names]
    if args.json:
        print_json([s.as_dict() for s in statuses])
    else:
        print_table(console, status_table(statuses), status_records(statuses))
        for s in statuses:
            if s.note:  # e.g. MQTT: what the broker dropped (its $SYS counters)
                console.print(s.note, markup=False, soft_wrap=True)
        print_errors(err_console, statuses)
    return 1 if any(s.error for s in statuses) else 0


def cmd_show(args: argparse.Namespace) -> int:
    """Row counts, quarantined rows with their reasons, and a few rows: what the demo prints."""
    import polars as pl

    from ingest_defs.cli_output import NOT_A_TERMINAL_WIDTH, print_json
    from ingest_defs.sink import DeltaTableSink

    specs = _load(args.pipeline if args.pipeline != "all" else None)
    names = [args.pipeline] if args.pipeline != "all" else list(specs)
    pl.Config.set_tbl_rows(args.rows)
    pl.Config.set_fmt_str_lengths(400)  # reasons whole: polars wraps them to the width below
    # polars fits its tables to this width (wrapping cells); in CI logs nothing is cut
    pl.Config.set_tbl_width_chars(console.width if console.is_terminal else NOT_A_TERMINAL_WIDTH)
    pl.Config.set_tbl_cols(-1)
    pl.Config.set_tbl_hide_dataframe_shape(True)
    pl.Config.set_tbl_hide_column_data_types(True)
    documents = []
    for name in names:
        spec = specs[name]
        target = DeltaTableSink.of(spec, "target")
        quarantine = DeltaTableSink.of(spec, "quarantine")
        doc: dict = {"pipeline": name, "table": spec.table_uri(), "quarantine_table": spec.quarantine_uri(),
                     "rows": target.row_count(), "quarantined": quarantine.row_count(), "reasons": [],
                     "quarantine_sample": [], "sample": []}
        reasons = q = rows = None
        if quarantine.table() is not None:
            q = quarantine.location.read()
            reasons = (q.with_columns(pl.col("_error").str.split(":").list.first().alias("reason"))
                       .group_by("reason").len().sort("len", descending=True))
            doc["reasons"] = [{"reason": r, "count": c} for r, c in reasons.iter_rows()]
            doc["quarantine_sample"] = q.select("_partition", "_offset", "_error").head(args.rows).to_dicts()
        if target.table() is not None:
            table_rows = target.location.read()
            # registry formats: the columns come from the registry schema
            payload_cols = ([c for c in table_rows.columns if not c.startswith("_")] if spec.uses_registry
                            else list(spec.payload_schema))
            rows = table_rows.select(*payload_cols, "_stream", "_partition", "_offset", "_timestamp").head(args.rows)
            doc["sample"] = rows.to_dicts()
        if args.json:
            documents.append(doc)
            continue
        console.print(f"[bold]{escape(name)}[/]: {escape(spec.table_uri())}", soft_wrap=True)
        console.print(f"rows: {doc['rows']}   quarantined: {doc['quarantined']}")
        if reasons is not None and q is not None:
            with pl.Config(tbl_rows=-1):  # every kind of reason: there are few
                print(reasons.rename({"len": "messages"}))
            print(q.select("_partition", "_offset", "_error").head(args.rows))
        if rows is not None:
            print(rows)
    if args.json:
        print_json(documents)
    return 0


def cmd_batches(args: argparse.Namespace) -> int:
    """The batch ledger: each committed batch's ranges, counts, trigger, versions and run id."""
    import polars as pl

    from ingest_defs.cli_output import print_json, print_table
    from ingest_defs.ledger import Ledger

    spec = _load(args.pipeline)[args.pipeline]
    ledger = Ledger.of(spec)
    expr = pl.lit(True)
    if args.partition:
        expr = expr & (pl.col("partition_key") == args.partition)
    if not args.replays:
        expr = expr & (pl.col("mode") == "live")
    frame = ledger.frame(expr)
    if frame.is_empty():
        if args.json:
            print_json([])
            return 0
        console.print(f"{spec.name}: no batches in {spec.ledger_uri()}" + (f" for partition {args.partition}" if args.partition else ""),
                      soft_wrap=True)
        return 0
    batches = (frame.sort("committed_at", "source_partition")
               .with_columns(pl.format("p{}:{}..{}", "source_partition", "range_start", "range_end").alias("range"))
               .group_by("batch_id", "mode", "generation", "status", maintain_order=True)
               .agg(pl.col("partition_key").first(), pl.col("trigger").first(), pl.col("range").str.join(" "),
                    pl.col("count").sum(), pl.col("rows_written").first(), pl.col("rows_quarantined").first(),
                    pl.col("target_version").first(), pl.col("first_timestamp").min(), pl.col("last_timestamp").max(),
                    pl.col("run_id").first(), pl.col("committed_at").first())
               .tail(args.limit))
    if args.json:
        print_json(batches.to_dicts())
        return 0
    table = Table()
    table.add_column("batch", no_wrap=True)
    for header in ("partition", "mode", "trigger", "ranges"):
        table.add_column(header, overflow="fold")
    for header in ("msgs", "rows", "quar.", "delta v"):
        table.add_column(header, justify="right", no_wrap=True)
    for header in ("broker time (UTC)", "run", "status"):
        table.add_column(header, overflow="fold")
    records = []
    for b in batches.iter_rows(named=True):
        when = "-" if b["first_timestamp"] is None else (
            f"{b['first_timestamp']:%Y-%m-%d %H:%M:%S} → {b['last_timestamp']:%H:%M:%S}")
        mode = b["mode"] if b["mode"] == "live" else f"replay {b['generation']}"
        run = (b["run_id"] or "-")[:8]
        table.add_row(b["batch_id"], b["partition_key"], mode, b["trigger"], b["range"], str(b["count"]),
                      _dash(b["rows_written"]), _dash(b["rows_quarantined"]), _dash(b["target_version"]), when,
                      run, b["status"])
        records += [f"[bold]{b['batch_id']}[/] {mode} · {b['trigger']} · run {run} · {b['status']}",
                    f"  partition {b['partition_key']} · delta v{_dash(b['target_version'])} · {b['count']} msgs → "
                    f"{_dash(b['rows_written'])} rows, {_dash(b['rows_quarantined'])} quarantined",
                    f"  ranges {b['range']}", f"  broker time {when} UTC"]
    console.print(f"{escape(spec.name)}: {escape(spec.ledger_uri())}", soft_wrap=True, highlight=False)
    print_table(console, table, records)
    return 0


def _dash(value: object) -> str:
    return "-" if value is None else str(value)


def _bound(text: str):
    """An offset (int) or a broker time (ISO-8601, UTC unless it says otherwise)."""
    from datetime import UTC, datetime

    try:
        return int(text)
    except ValueError:
        pass
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ConfigError(None, "--from/--to", f"'{text}' is neither an offset nor an ISO-8601 time",
                          "give offsets (e.g. --from 1200 --to 1800) or times (e.g. --from 2026-11-27T10:00)") from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def cmd_replay(args: argparse.Namespace) -> int:
    """Re-ingest the batches overlapping an explicit range with the current schema, replacing their rows."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from ulid import ULID

    from ingest_defs.ledger import Ledger
    from ingest_defs.lifecycle import BatchContext
    from ingest_defs.partitions import partition_key_at
    from ingest_defs.replay import Replayer
    from ingest_defs.resources.brokers import source_for
    from ingest_defs.sink import DeltaTableSink

    spec = _load(args.pipeline)[args.pipeline]
    low, high = _bound(args.from_), _bound(args.to)
    if type(low) is not type(high):
        raise ConfigError(spec.name, "--from/--to", "one bound is an offset and the other a time",
                          "give two offsets or two times")
    if low > high:
        raise ConfigError(spec.name, "--from/--to", f"--from {args.from_} is after --to {args.to}", "swap them")
    ledger = Ledger.of(spec, partition_of=lambda when: partition_key_at(spec, when))
    source = source_for(spec)
    generation = f"replay-{ULID()}"
    replayer = Replayer(spec, source, DeltaTableSink.of(spec, "target"),
                        DeltaTableSink.of(spec, "quarantine"), ledger,
                        BatchContext(trigger="replay", mode="replay"), generation)
    try:
        batches = replayer.batches_for_range(low, high, args.partition)
        if not batches:
            console.print(f"[red]{spec.name}: no committed batch overlaps {args.from_}..{args.to}[/]. Only what the "
                          f"pipeline has ingested can be replayed: run `ingest run {spec.name}` to ingest new data "
                          f"(`ingest batches {spec.name}` lists what is there).")
            return 1
        spans = ", ".join(f"p{r.partition}:{r.start}..{r.end}" for b in batches for r in b.ranges)
        console.print(f"{spec.name}: replaying {len(batches)} whole batches ({spans}) as generation {generation}")
        outcomes = []
        with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TextColumn("{task.fields[rows]} rows, {task.fields[quarantined]} quarantined"),
                      TimeElapsedColumn(), console=console, transient=False) as progress:
            task = progress.add_task(f"replay {spec.name}", total=len(batches), rows=0, quarantined=0)

            def advance(outcome) -> None:
                outcomes.append(outcome)
                progress.update(task, advance=1, rows=sum(o.rows_written for o in outcomes),
                                quarantined=sum(o.rows_quarantined for o in outcomes))

            replayer.replay(batches, advance)
    finally:
        source.close()
    replaced = [o for o in outcomes if o.status == "replaced"]
    missed = [o for o in outcomes if o.status == "not replayed"]
    for o in missed:
        console.print(f"[red]{escape(o.describe())}[/]", soft_wrap=True)
    console.print(f"{spec.name}: {len(replaced)} replaced, {len(missed)} not replayed; "
                  f"{sum(o.rows_written for o in replaced)} rows in the target, "
                  f"{sum(o.rows_quarantined for o in replaced)} in quarantine")
    return 1 if missed else 0


# ------------------------------------------------------------ entry point
def cmd_maintain(args: argparse.Namespace) -> int:
    """Run the pipelines' maintenance jobs now (the same job the maintenance schedule runs)."""
    _ensure_dagster_home()
    from dagster import DagsterEventType, DagsterInstance

    from ingest_defs.factory import build_definitions
    from ingest_defs.jobs.maintenance import maintenance_job_name

    specs = _load(None if args.pipeline == "all" else args.pipeline)
    if args.pipeline != "all":
        specs = {args.pipeline: specs[args.pipeline]}
    table = Table("pipeline", "table", "files before", "files after", "MB before", "MB after", "vacuumed files")
    status = 0
    with DagsterInstance.get() as instance:
        for name, spec in specs.items():
            job = build_definitions({name: spec}).resolve_job_def(maintenance_job_name(spec))
            level = "INFO" if args.verbose else "CRITICAL"  # the trace stays in the run's logs (as `ingest run`)
            result = job.execute_in_process(instance=instance, raise_on_error=False,
                                            run_config={"loggers": {"console": {"config": {"log_level": level}}}})
            if not result.success:
                from ingest_defs.cli_output import run_failure

                status = 1
                err_console.print(f"[red]error:[/] {escape(run_failure(result))}", soft_wrap=True)
                err_console.print(f"[dim]{name}: maintenance run {result.run_id} failed; its logs keep the full trace[/]",
                                  soft_wrap=True)
                continue
            for event in result.all_events:
                if event.event_type == DagsterEventType.ASSET_OBSERVATION:
                    meta = {k: v.value for k, v in event.event_specific_data.asset_observation.metadata.items()}
                    table.add_row(name, "/".join(event.asset_key.path), str(meta["files_before"]),
                                  str(meta["files_after"]), f"{meta['bytes_before'] / 2**20:.1f}",
                                  f"{meta['bytes_after'] / 2**20:.1f}", str(meta["vacuumed_files"]))
    console.print(table)
    return status


def cmd_metrics(args: argparse.Namespace) -> int:
    """The Prometheus exporter (ingest_defs/metrics.py): `serve` it, or `show` one scrape's text."""
    from ingest_defs import metrics

    specs = _load(None if args.pipeline == "all" else args.pipeline)
    selected = list(specs.values()) if args.pipeline == "all" else [specs[args.pipeline]]
    if args.action == "serve":
        return metrics.serve_forever(selected, args.port, args.host, args.timeout or metrics.DEFAULT_TIMEOUT_SECONDS)
    text, seconds = metrics.exposition_once(selected, args.timeout or 60.0)  # a cold start connects first
    print(text, end="")
    print(f"# one scrape of {len(selected)} pipelines took {seconds * 1000:.0f} ms", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ingest", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="show Dagster's and the broker clients' log lines, and a failed run's full trace")
    sub = parser.add_subparsers(dest="command", required=True)

    stack = sub.add_parser("stack", help="the local broker stack (Kafka, NATS JetStream, Mosquitto)")
    stack.add_argument("action", choices=["up", "down", "status"])
    stack.add_argument("--secure", action="store_true", help="the secure stack: authentication, ACLs and TLS on, on its own ports (see README)")
    stack.add_argument("--prometheus", action="store_true",
                       help="also a Prometheus server scraping `ingest metrics serve` (INGEST_PROMETHEUS_PORT, default 9090)")
    stack.add_argument("--s3", action="store_true",
                       help="also the S3-compatible server (versitygw; INGEST_S3_PORT, default 9000); implied when "
                            "LAKE_ROOT is s3:// on its endpoint")
    stack.add_argument("--postgres", action="store_true",
                       help="also PostgreSQL for Dagster's storage (INGEST_POSTGRES_PORT, default 5432)")
    stack.add_argument("--cluster", action="store_true",
                       help="a 3-node Kafka cluster (KRaft, RF 3, min.insync.replicas 2) on its own ports (see README)")
    stack.set_defaults(func=cmd_stack)

    run = sub.add_parser("run", help="run batches of a pipeline through Dagster until caught up")
    run.add_argument("pipeline", help="pipeline name, or 'all'")
    run.add_argument("--max-batches", type=int, default=0, help="stop after N batches (0: until caught up)")
    run.add_argument("--max-seconds", type=float, default=None, help="time budget for the run")
    run.add_argument("-v", "--verbose", action="store_true", dest="run_verbose", help="as `ingest -v run`")
    run.add_argument("--shard", type=int, default=None,
                     help="only this shard of a sharded pipeline (default: every shard, as concurrent runs)")
    run.set_defaults(func=cmd_run)

    status = sub.add_parser("status", help="broker end, Delta position, lag, last batch, quarantined rows")
    status.add_argument("pipeline", nargs="?", default="all")
    status.add_argument("--json", action="store_true", help="print JSON (for scripts)")
    status.set_defaults(func=cmd_status)

    produce = sub.add_parser("produce", help="produce sample events for a pipeline's source")
    produce.add_argument("pipeline")
    produce.add_argument("--count", type=int, required=True)
    produce.add_argument("--bad-fraction", type=float, default=0.0, help="share of invalid messages (0..1)")
    produce.add_argument("--seed", type=int, default=None)
    produce.add_argument("--start-id", type=int, default=0)
    produce.add_argument("--users", type=int, default=100,
                         help="draw the `id` (user id) field from this many users, like real traffic; 0: a new id "
                              "per message (default 100)")
    produce.add_argument("--key", default=None,
                         help="one key for all messages (Kafka key; fills the wildcard of a NATS subject or MQTT topic)")
    produce.set_defaults(func=cmd_produce)

    show = sub.add_parser("show", help="row counts, quarantine reasons and a few rows of a pipeline's tables")
    show.add_argument("pipeline", nargs="?", default="all")
    show.add_argument("--rows", type=int, default=5)
    show.add_argument("--json", action="store_true", help="print JSON (for scripts)")
    show.set_defaults(func=cmd_show)

    maintain = sub.add_parser("maintain", help="compact, checkpoint, clean the log and vacuum a pipeline's tables now")
    maintain.add_argument("pipeline", nargs="?", default="all")
    maintain.set_defaults(func=cmd_maintain)
    batches = sub.add_parser("batches", help="the batch ledger: ranges, counts, trigger, versions, run id per batch")
    batches.add_argument("pipeline")
    batches.add_argument("--partition", default=None, help="only this ingestion-time partition, e.g. 2026-11-27")
    batches.add_argument("--replays", action="store_true", help="also list replays and backfills")
    batches.add_argument("--limit", type=int, default=50, help="the last N batches (default 50)")
    batches.add_argument("--json", action="store_true", help="print JSON (for scripts)")
    batches.set_defaults(func=cmd_batches)

    replay = sub.add_parser("replay", help="re-ingest committed batches in a range with the current schema")
    replay.add_argument("pipeline")
    replay.add_argument("--from", dest="from_", required=True, help="first offset/sequence, or an ISO-8601 time (UTC)")
    replay.add_argument("--to", required=True, help="last offset/sequence, or an ISO-8601 time (UTC), inclusive")
    replay.add_argument("--partition", type=int, default=None, help="only this source partition (Kafka)")
    replay.set_defaults(func=cmd_replay)

    metrics = sub.add_parser("metrics", help="Prometheus metrics: serve the exporter, or show one scrape")
    metrics.add_argument("action", choices=["serve", "show"])
    metrics.add_argument("pipeline", nargs="?", default="all")
    metrics.add_argument("--port", type=int, default=None,
                         help="port of /metrics (default: $INGEST_METRICS_PORT or 9464)")
    metrics.add_argument("--host", default="0.0.0.0", help="address to listen on (default 0.0.0.0)")
    metrics.add_argument("--timeout", type=float, default=None,
                         help="seconds a scrape waits for a pipeline's broker and tables (serve: 8, show: 60)")
    metrics.set_defaults(func=cmd_metrics)

    validate = sub.add_parser("validate", help="check the pipelines file")
    validate.set_defaults(func=cmd_validate)
    return parser


def main(argv: list[str] | None = None) -> int:
    from ingest_defs.logs import configure_console

    args = build_parser().parse_args(argv)
    args.verbose = args.verbose or getattr(args, "run_verbose", False)
    configure_console(args.verbose)
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        mistakes = exc.errors if isinstance(exc, ConfigErrors) else [exc]
        for mistake in mistakes:
            err_console.print(f"[red]error:[/] {escape(str(mistake))}", soft_wrap=True)
        if len(mistakes) > 1:
            err_console.print(f"{len(mistakes)} mistakes; fix them all, then run `ingest validate` again")
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

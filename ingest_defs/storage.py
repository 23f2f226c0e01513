"""Where the tables live: table URIs and the object-store options to open them.

Every reader and writer of a Delta table — the sink, the ledger, maintenance, replays, the CLI, the MQTT
source's lake reads, the dbt plugin, the benchmarks and the tests' helpers — gets a `Location` here and
opens the table through it, so a lake on S3 works wherever a lake on local disk does. Nothing else calls
`DeltaTable(path)` or `write_deltalake(path)` with a bare path.

A table is a local path or a URI. `LAKE_ROOT` (default `<repo>/lake`) is where relative table paths go;
`LAKE_ROOT=s3://bucket/prefix` puts the whole lake on S3. For `s3://` the options come from the
environment (the standard AWS names, read when a table is opened, so secrets stay out of run config):

=========================  ===========================================================================
`AWS_ENDPOINT_URL`         an S3-compatible server (`http://` only for loopback addresses; else HTTPS)
`AWS_ACCESS_KEY_ID`        access key
`AWS_SECRET_ACCESS_KEY`    secret key (never logged, shown, or put in run config; removed from errors)
`AWS_SESSION_TOKEN`        optional temporary credentials
`AWS_REGION`               region (default `us-east-1`)
`LAKE_S3_TIMEOUT`          one request's timeout (default `30s`)
`LAKE_S3_CONNECT_TIMEOUT`  connect timeout (default `5s`)
`LAKE_S3_MAX_RETRIES`      retries of a failed or timed-out request (default `5`, backoff from 100 ms)
`LAKE_S3_RETRY_TIMEOUT`    no retry starts later than this after the first attempt (default `60s`)
=========================  ===========================================================================

A pipeline's `storage: {options: {...}}` adds or overrides options for its tables (values may be
`${ENV}`; secret keys must be). Concurrent commits are safe on S3 through conditional writes
(`If-None-Match: *`, delta-rs 1.x's default): a lost race raises delta-rs's `CommitFailedError`, exactly as
on local disk. `AWS_S3_ALLOW_UNSAFE_RENAME` (which turns that off) is refused.
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

if TYPE_CHECKING:
    import polars as pl
    import pyarrow.fs as pafs
    from deltalake import DeltaTable

REPO_ROOT = Path(__file__).resolve().parents[1]
REDACTED = "***"
LOOPBACK_HOSTS = {"localhost", "127.0.0.1", "::1", "[::1]"}
# object_store client settings (https://docs.rs/object_store, ClientConfigKey/RetryConfig) and their defaults here
CLIENT_SETTINGS = {
    "timeout": ("LAKE_S3_TIMEOUT", "30s"),
    "connect_timeout": ("LAKE_S3_CONNECT_TIMEOUT", "5s"),
    "max_retries": ("LAKE_S3_MAX_RETRIES", "5"),
    "retry_timeout": ("LAKE_S3_RETRY_TIMEOUT", "60s"),
}
AWS_ENV = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_REGION")
SECRET_WORDS = ("SECRET", "TOKEN", "PASSWORD")
UNSAFE_RENAME = "AWS_S3_ALLOW_UNSAFE_RENAME"
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_STORE_FAILURE = re.compile(r"Generic \w+ error|error sending request|after \d+ retries")
_seen_secrets: set[str] = set()  # every secret value an option set carried in this process (for redact)


class StorageConfigError(ValueError):
    """A storage setting that cannot work; the message says which and the fix."""


class StorageError(RuntimeError):
    """The object store failed (down, refusing, too slow) after the client's retries; names the endpoint."""


# ---------------------------------------------------------------- table URIs
def lake_root() -> str:
    return os.environ.get("LAKE_ROOT", str(REPO_ROOT / "lake"))


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def resolve_table_uri(table: str, root: str | None = None) -> str:
    """A table path from the pipelines file → an absolute path or URI (relative paths go under LAKE_ROOT)."""
    if "://" in table or table.startswith("/"):
        return table
    base = root or lake_root()
    if "://" in base:
        return f"{base.rstrip('/')}/{table}"
    return str(Path(base).resolve() / table)


def join(uri: str, *parts: str) -> str:
    """`uri` / parts, for local paths and URIs alike."""
    return "/".join([uri.rstrip("/"), *(p.strip("/") for p in parts)])


# ---------------------------------------------------------------- storage options
def is_secret_key(key: str) -> bool:
    return any(word in key.upper() for word in SECRET_WORDS)


def storage_options(uri: str, overrides: dict[str, str] | None = None) -> dict[str, str] | None:
    """The options delta-rs/polars need for `uri` (None for local paths), from the environment and `overrides`.

    Reads the environment now (not at import), so a process that changes it sees the change."""
    if not is_remote(uri):
        return None
    options: dict[str, str] = {}
    if uri.startswith(("s3://", "s3a://")):
        options = {k: os.environ[k] for k in AWS_ENV if os.environ.get(k)}
        options.setdefault("AWS_REGION", "us-east-1")
        for key, (env, default) in CLIENT_SETTINGS.items():
            options[key] = os.environ.get(env) or default
    options.update(overrides or {})
    unsafe = options.get(UNSAFE_RENAME) or os.environ.get(UNSAFE_RENAME)
    if unsafe and unsafe.lower() not in ("false", "0"):
        raise StorageConfigError(
            f"{UNSAFE_RENAME} is set: it lets two writers overwrite each other's commits on S3 (lost batches). "
            f"Fix: unset {UNSAFE_RENAME}; delta-rs commits safely with conditional writes (If-None-Match), which "
            "the S3 server must support.")
    endpoint = endpoint_of(options)
    if endpoint and endpoint.startswith("http://"):
        host = urlsplit(endpoint).hostname or ""
        if host not in LOOPBACK_HOSTS:
            raise StorageConfigError(
                f"AWS_ENDPOINT_URL={endpoint} is plain HTTP to a host other than this machine: the credentials and "
                "data would cross the network unencrypted. Fix: use https:// (or a loopback address for a local server).")
        options["AWS_ALLOW_HTTP"] = "true"
    _seen_secrets.update(v for k, v in options.items() if is_secret_key(k) and v)
    return options


def endpoint_of(options: dict[str, str] | None) -> str | None:
    if not options:
        return None
    for key in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT", "aws_endpoint_url", "endpoint_url", "endpoint"):
        if options.get(key):
            return options[key].rstrip("/")
    return None


def redact(text: str, extra: list[str] | tuple[str, ...] = ()) -> str:
    """`text` without any secret this process's storage options (or the environment) carried."""
    secrets = set(_seen_secrets) | set(extra)
    secrets |= {v for k, v in os.environ.items() if k in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN") and v}
    for secret in sorted((s for s in secrets if s), key=len, reverse=True):
        text = text.replace(secret, REDACTED)
    return text


def clean_error(exc: BaseException) -> str:
    """delta-rs/object_store errors are multi-line with ANSI colours: one plain, redacted line."""
    text = _ANSI.sub("", str(exc))
    text = " ".join(part.strip().lstrip("↳").strip() for part in text.splitlines() if part.strip())
    return redact(text)


# ---------------------------------------------------------------- one table's location
@dataclass(frozen=True)
class Location:
    """A Delta table's URI and the options to open it. `options` holds secrets: never print it."""

    uri: str
    options: dict[str, str] | None = field(default=None, repr=False, compare=False)

    @property
    def remote(self) -> bool:
        return is_remote(self.uri)

    @property
    def endpoint(self) -> str:
        """Where the table's bytes are, as shown in messages (no credentials)."""
        if not self.remote:
            return "local disk"
        parts = urlsplit(self.uri)
        return endpoint_of(self.options) or f"{parts.scheme}://{parts.netloc}"

    def __str__(self) -> str:
        return self.uri

    # -- Delta tables
    def open(self, version: int | None = None) -> DeltaTable | None:
        """The table at its latest (or `version`), or None when there is no table there yet."""
        from deltalake import DeltaTable
        from deltalake.exceptions import TableNotFoundError

        try:
            with self.failures("opening"):
                return DeltaTable(self.uri, version=version, storage_options=self.options)
        except TableNotFoundError:
            return None

    def exists(self) -> bool:
        from deltalake import DeltaTable

        with self.failures("opening"):
            return DeltaTable.is_deltatable(self.uri, storage_options=self.options)

    def scan(self) -> pl.LazyFrame:
        import polars as pl

        return pl.scan_delta(self.uri, storage_options=self.polars_options())

    def read(self, columns: list[str] | None = None) -> pl.DataFrame:
        import polars as pl

        with self.failures("reading"):
            return pl.read_delta(self.uri, columns=columns, storage_options=self.polars_options())

    def polars_options(self) -> dict[str, Any] | None:
        """The same options for polars, which wants `max_retries` as a number."""
        if self.options is None:
            return None
        return {k: int(v) if k == "max_retries" else v for k, v in self.options.items()}

    def write(self, data: Any, **kwargs: Any) -> None:
        """`write_deltalake` to this location (creating the table if `mode` allows)."""
        from deltalake import write_deltalake

        with self.failures("writing"):
            write_deltalake(self.uri, data, storage_options=self.options, **kwargs)

    # -- plain objects (fault injection, orphan files, tests)
    def filesystem(self, **s3_options: Any) -> tuple[pafs.FileSystem, str]:
        """A pyarrow filesystem over the table's bytes and the table's path in it (`s3_options`: more
        pyarrow S3FileSystem arguments)."""
        import pyarrow.fs as pafs

        if not self.remote:
            return pafs.LocalFileSystem(), self.uri
        parts = urlsplit(self.uri)
        path = f"{parts.netloc}{parts.path}".rstrip("/")
        if parts.scheme not in ("s3", "s3a"):
            return pafs.FileSystem.from_uri(self.uri)[0], path
        opts = self.options or {}
        endpoint = endpoint_of(opts)
        kwargs: dict[str, Any] = {"region": opts.get("AWS_REGION", "us-east-1")}
        if opts.get("AWS_ACCESS_KEY_ID"):
            kwargs.update(access_key=opts["AWS_ACCESS_KEY_ID"], secret_key=opts.get("AWS_SECRET_ACCESS_KEY"),
                          session_token=opts.get("AWS_SESSION_TOKEN"))
        if endpoint:
            url = urlsplit(endpoint)
            kwargs.update(endpoint_override=url.netloc, scheme=url.scheme)
        kwargs.update(request_timeout=_seconds(opts.get("timeout", "30s")),
                      connect_timeout=_seconds(opts.get("connect_timeout", "5s")))
        return pafs.S3FileSystem(**kwargs, **s3_options), path

    def files(self, suffix: str = ".parquet", log: bool = False) -> list[str]:
        """Paths (relative to the table) of the objects under the table ending in `suffix`: the data files any
        commit wrote and those a writer killed mid-commit left behind, or (`log`) those in `_delta_log/`."""
        import pyarrow.fs as pafs

        fs, root = self.filesystem()
        with self.failures("listing"):
            infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
        names = [i.path[len(root):].lstrip("/") for i in infos if i.type == pafs.FileType.File]
        return sorted(n for n in names if n.endswith(suffix) and n.startswith("_delta_log/") == log)

    def put_bytes(self, relative: str, data: bytes) -> None:
        fs, root = self.filesystem()
        if not self.remote:
            Path(root, relative).parent.mkdir(parents=True, exist_ok=True)
        with self.failures("writing"), fs.open_output_stream(f"{root}/{relative}") as out:
            out.write(data)

    def delete(self) -> None:
        """Remove the whole table (tests, `ingest` never deletes tables)."""
        import pyarrow.fs as pafs

        fs, root = self.filesystem()
        if not self.remote:
            if fs.get_file_info(root).type != pafs.FileType.NotFound:
                fs.delete_dir(root)
            return
        # Objects first, then the directory markers deepest first (a POSIX-backed server keeps real directories,
        # which pyarrow's delete_dir would try to remove before their contents).
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
        for info in infos:
            if info.type == pafs.FileType.File:
                fs.delete_file(info.path)
        for info in sorted((i for i in infos if i.type == pafs.FileType.Directory), key=lambda i: -i.path.count("/")):
            with contextlib.suppress(OSError):
                fs.delete_dir(info.path)

    # -- errors
    def failures(self, action: str) -> _Failures:
        return _Failures(self, action)


class _Failures:
    """Turn an object store's I/O error into a StorageError naming the endpoint (secrets removed)."""

    def __init__(self, location: Location, action: str):
        self.location, self.action = location, action

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, _tb: Any) -> bool:
        if exc is not None and self.location.remote and is_store_failure(exc):
            raise failure(self.location, self.action, exc) from None
        return False


def is_store_failure(exc: BaseException) -> bool:
    """An object-store I/O failure: reads raise OSError; a write raises a plain DeltaError carrying object_store's
    "Generic S3 error ... after N retries" (never a CommitFailedError: a lost race is not a failure)."""
    from deltalake.exceptions import DeltaError

    if isinstance(exc, OSError):
        return True
    return type(exc) is DeltaError and bool(_STORE_FAILURE.search(str(exc)))


def failure(location: Location, action: str, exc: BaseException) -> StorageError:
    return StorageError(
        f"the object store at {location.endpoint} failed while {action} {location.uri} "
        f"(after the client's retries: LAKE_S3_MAX_RETRIES, LAKE_S3_RETRY_TIMEOUT): {clean_error(exc)}. "
        "Nothing of this batch was acknowledged; check the server is up and reachable, then run again.")


def location(uri: str, overrides: dict[str, str] | None = None) -> Location:
    """The Location of a table URI or path (options from the environment, plus `overrides`)."""
    return Location(uri, storage_options(uri, overrides))


def _seconds(text: str) -> float:
    match = re.fullmatch(r"\s*([0-9.]+)\s*(ms|s|m|h)?\s*", text)
    if not match:
        return 30.0
    value, unit = float(match.group(1)), match.group(2) or "s"
    return value * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit]


# ---------------------------------------------------------------- a pipeline's tables
TABLE_ROLES = ("target", "quarantine", "ledger")


def table_location(spec: Any, role: str = "target") -> Location:
    """The Location of a pipeline's `target`, `quarantine` or `ledger` table, with its `storage.options`."""
    uri = {"target": spec.table_uri, "quarantine": spec.quarantine_uri, "ledger": spec.ledger_uri}[role]()
    return location(uri, pipeline_options(spec))


def pipeline_options(spec: Any) -> dict[str, str] | None:
    """A pipeline's `storage.options`, `${ENV}` expanded now (in the process that opens the tables)."""
    raw = getattr(getattr(spec, "storage", None), "options", None)
    if not raw:
        return None
    from ingest_defs.config import expand_env

    return {key: str(expand_env(spec.name, f"storage.options.{key}", value)) for key, value in raw.items()}

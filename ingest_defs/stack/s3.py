"""The stack's S3-compatible object store: Versity's S3 gateway (versitygw) over a local directory.

Why versitygw: delta-rs 1.x makes concurrent commits safe on S3 with conditional writes alone — the commit
is a PutObject of the next log entry with `If-None-Match: *`, and the server must answer the second of two
racing writers with 412. versitygw v1.8.0 (Apache-2.0, POSIX backend, one static Go binary) does, under
real concurrency (checked: 300 rounds of 2 racing writers and 100 rounds of 8, exactly one 200 per key, the
others 412, the object holding the winner's bytes; `ingest_tests/test_s3.py` repeats a smaller check on
every run). s3proxy 2.7.0 (Maven Central) ignores `If-None-Match` on its filesystem and transient backends
(the second PutObject overwrote the first: unusable for Delta); SeaweedFS is served only as a Go
pseudo-version and was not checked; MinIO is AGPL.

Installed by `go install github.com/versity/versitygw/cmd/versitygw@v1.8.0` from the Go module proxy into
``<stack dir>/s3/bin`` (first start only; a few minutes of compiling on 2 cores; the module and build
caches live under ``<stack dir>/s3/go``). ``INGEST_VERSITYGW`` points at an existing binary instead (to
share one between stacks). A Go toolchain older than the module's `go` line downloads the right one from
the proxy by itself (GOTOOLCHAIN=auto); without any `go`, root installs Debian's `golang-go` first.

Layout (``<stack dir>/s3/``)::

    bin/versitygw-v1.8.0   the gateway
    data/<bucket>/...      the objects (POSIX backend: one file per object, metadata in xattrs)
    secrets.env            generated access key and secret key (mode 600), `export AWS_...=` lines
    env.sh                 endpoint, region and bucket, then `. secrets.env`: a client's whole setup
    s3.pid s3.run.json s3.log

Environment: ``INGEST_S3_PORT`` (default 9000; the gateway listens on 127.0.0.1 only),
``INGEST_S3_BUCKET`` (default ``lake``, made on first start). The credentials reach the gateway through its
environment (`ROOT_ACCESS_KEY`/`ROOT_SECRET_KEY`), never its command line.
"""

from __future__ import annotations

import os
import secrets
import shlex
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

MODULE = "github.com/versity/versitygw/cmd/versitygw"
VERSION = "v1.8.0"
DEFAULT_PORT = 9000
DEFAULT_BUCKET = "lake"
REGION = "us-east-1"
BUILD_TIMEOUT = 1800.0


class S3StackError(Exception):
    pass


def port() -> int:
    value = os.environ.get("INGEST_S3_PORT")
    if not value:
        return DEFAULT_PORT
    try:
        return int(value)
    except ValueError as exc:
        raise S3StackError(f"INGEST_S3_PORT={value!r} is not a port number") from exc


def bucket() -> str:
    return os.environ.get("INGEST_S3_BUCKET") or DEFAULT_BUCKET


def endpoint() -> str:
    return f"http://127.0.0.1:{port()}"


@dataclass(frozen=True)
class Layout:
    root: Path  # <stack dir>/s3

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def binary(self) -> Path:
        override = os.environ.get("INGEST_VERSITYGW")
        return Path(override) if override else self.root / "bin" / f"versitygw-{VERSION}"

    @property
    def gopath(self) -> Path:
        return self.root / "go"

    @property
    def secrets_file(self) -> Path:
        return self.root / "secrets.env"

    @property
    def env_file(self) -> Path:
        return self.root / "env.sh"


# ---------------------------------------------------------------- install
def ensure_binary(layout: Layout, say=print, apt_install=None) -> Path:
    """The versitygw binary, built with `go install` from the Go module proxy on first use."""
    target = layout.binary
    if target.is_file() and os.access(target, os.X_OK):
        return target
    if os.environ.get("INGEST_VERSITYGW"):
        raise S3StackError(f"INGEST_VERSITYGW={target} is not an executable file")
    go = shutil.which("go") or next((p for p in ("/usr/local/go/bin/go", "/usr/lib/go/bin/go") if Path(p).exists()), None)
    if go is None and apt_install is not None:
        apt_install(["golang-go"])  # older than versitygw's `go` line: GOTOOLCHAIN=auto fetches the right one
        go = shutil.which("go")
    if go is None:
        raise S3StackError("`go` not found: the S3 server (versitygw) is built with `go install` from the Go "
                           "module proxy. Install Go (https://go.dev/dl, or `apt-get install golang-go`), or point "
                           "INGEST_VERSITYGW at a versitygw binary.")
    bin_dir = layout.root / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "GOBIN": str(bin_dir / ".build"), "GOPATH": str(layout.gopath),
           "GOMODCACHE": str(layout.gopath / "pkg" / "mod"), "GOCACHE": str(layout.gopath / "cache"),
           "GOFLAGS": "-modcacherw -buildvcs=false", "CGO_ENABLED": "0"}
    cmd = [go, "install", "-trimpath", "-ldflags=-s -w", f"{MODULE}@{VERSION}"]
    say(f"building the S3 server: {shlex.join(cmd)} (first start only; a few minutes) ...")
    started = time.monotonic()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=BUILD_TIMEOUT)
    built = bin_dir / ".build" / "versitygw"
    if proc.returncode != 0 or not built.is_file():
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-20:])
        raise S3StackError(f"`{shlex.join(cmd)}` failed (exit {proc.returncode}):\n{tail}")
    built.replace(target)
    shutil.rmtree(layout.gopath / "cache", ignore_errors=True)  # the compiled packages (~400 MB) are not needed again
    say(f"  built {target} in {time.monotonic() - started:.0f}s")
    return target


# ---------------------------------------------------------------- credentials
SECRET_NAMES = {
    "AWS_ACCESS_KEY_ID": "access key of the stack's S3 server (root account)",
    "AWS_SECRET_ACCESS_KEY": "secret key of the stack's S3 server (root account)",
}


def load_secrets(layout: Layout, create: bool = False) -> dict[str, str]:
    """The generated credentials from secrets.env (made once, when `create`)."""
    values: dict[str, str] = {}
    if layout.secrets_file.exists():
        for line in layout.secrets_file.read_text().splitlines():
            words = shlex.split(line) if line.startswith("export ") else []
            if len(words) == 2 and "=" in words[1]:
                name, _, value = words[1].partition("=")
                values[name] = value
    missing = [n for n in SECRET_NAMES if n not in values]
    if missing and not create:
        raise S3StackError(f"{layout.secrets_file} lacks {', '.join(missing)}: run `ingest stack up --s3`")
    if missing:
        values.setdefault("AWS_ACCESS_KEY_ID", "ingest" + secrets.token_hex(6))
        values.setdefault("AWS_SECRET_ACCESS_KEY", secrets.token_urlsafe(30))
        layout.root.mkdir(parents=True, exist_ok=True)
        tmp = layout.secrets_file.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write("# Generated by `ingest stack up --s3`: the S3 server's credentials. Keep private.\n")
            for name, what in SECRET_NAMES.items():
                fh.write(f"# {what}\nexport {name}={shlex.quote(values[name])}\n")
        tmp.replace(layout.secrets_file)
    return values


def client_env() -> dict[str, str]:
    """Non-secret settings a client needs (the credentials are in secrets.env)."""
    return {"AWS_ENDPOINT_URL": endpoint(), "AWS_REGION": REGION, "INGEST_S3_BUCKET": bucket()}


def write_env_file(layout: Layout) -> None:
    lines = ["# Generated by `ingest stack up --s3`. `. .stack/s3/env.sh`, then e.g. "
             f"`export LAKE_ROOT=s3://{bucket()}/lake` to put the lake on the stack's S3 server."]
    lines += [f"export {k}={shlex.quote(v)}" for k, v in client_env().items()]
    lines.append(f". {shlex.quote(str(layout.secrets_file))}")
    layout.env_file.write_text("\n".join(lines) + "\n")


def server_env(layout: Layout) -> dict[str, str]:
    """The gateway's own environment: the root credentials (kept off its command line)."""
    creds = load_secrets(layout)
    return {"ROOT_ACCESS_KEY": creds["AWS_ACCESS_KEY_ID"], "ROOT_SECRET_KEY": creds["AWS_SECRET_ACCESS_KEY"],
            "VGW_REGION": REGION}


def options(layout: Layout) -> dict[str, str]:
    """Storage options for this server (probes and bucket creation)."""
    creds = load_secrets(layout)
    return {"AWS_ENDPOINT_URL": endpoint(), "AWS_REGION": REGION, "AWS_ALLOW_HTTP": "true",
            "AWS_ACCESS_KEY_ID": creds["AWS_ACCESS_KEY_ID"], "AWS_SECRET_ACCESS_KEY": creds["AWS_SECRET_ACCESS_KEY"],
            "timeout": "5s", "connect_timeout": "2s"}


def argv(layout: Layout) -> list[str]:
    layout.data.mkdir(parents=True, exist_ok=True)
    return [str(ensure_binary(layout)), "--port", f"127.0.0.1:{port()}", "--quiet", "posix", str(layout.data)]


# ---------------------------------------------------------------- probe and bucket
def probe(layout: Layout, timeout: float) -> None:
    """A signed request (does the bucket exist?): raises unless the gateway answers with our credentials."""
    import pyarrow.fs as pafs

    from ingest_defs.storage import Location

    opts = {**options(layout), "timeout": f"{max(1, int(timeout))}s"}
    fs, _ = Location(f"s3://{bucket()}", opts).filesystem()
    fs.get_file_info(pafs.FileSelector("", recursive=False))  # ListBuckets


def ensure_bucket(layout: Layout) -> None:
    import pyarrow.fs as pafs

    from ingest_defs.storage import Location

    fs, _ = Location(f"s3://{bucket()}", options(layout)).filesystem(allow_bucket_creation=True)
    if fs.get_file_info(bucket()).type == pafs.FileType.NotFound:
        fs.create_dir(bucket())

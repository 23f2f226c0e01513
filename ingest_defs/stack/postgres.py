"""The stack's PostgreSQL, for Dagster's run, event and schedule storage (deploy/dagster.postgres.yaml).

PostgreSQL from Debian (`postgresql`, installed with apt-get when root), a cluster of its own made with
`initdb` under ``<stack dir>/postgres/data`` on first start, listening on 127.0.0.1 only (no Unix socket),
password authentication (SCRAM) for user ``ingest`` with a generated password, and a ``dagster`` database.
PostgreSQL refuses to run as root: started as root, the cluster belongs to the OS user ``postgres`` (made
by the Debian package) and the server runs as that user; otherwise it runs as the calling user.

Layout (``<stack dir>/postgres/``)::

    data/          the cluster (initdb), mode 700, owned by the server's user
    secrets.env    the generated password (mode 600): `export DAGSTER_POSTGRES_PASSWORD=...`
    env.sh         DAGSTER_POSTGRES_HOSTNAME/PORT/USER/DB, then `. secrets.env`
    postgres.pid postgres.run.json postgres.log

Environment: ``INGEST_POSTGRES_PORT`` (default 5432). `ingest stack down` stops it with SIGINT (PostgreSQL's
fast shutdown: SIGTERM would wait for every client, e.g. a running dagster-daemon, to disconnect).
"""

from __future__ import annotations

import hashlib
import os
import pwd
import secrets
import shlex
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

DEFAULT_PORT = 5432
USER = "ingest"
DATABASE = "dagster"
OS_USER_WHEN_ROOT = "postgres"
OUTSIDE_DATA_ROOT = Path("/var/tmp/ingest-postgres")  # see Layout.data
DEBIAN_PACKAGE = "postgresql"
SERVER_SETTINGS = {
    "listen_addresses": "'127.0.0.1'",
    "unix_socket_directories": "''",  # TCP only: no socket directory to own
    "password_encryption": "'scram-sha-256'",
    "max_connections": "100",
    "shared_buffers": "64MB",
    "log_min_messages": "warning",
    "log_connections": "off",
}


class PostgresStackError(Exception):
    pass


def port() -> int:
    value = os.environ.get("INGEST_POSTGRES_PORT")
    if not value:
        return DEFAULT_PORT
    try:
        return int(value)
    except ValueError as exc:
        raise PostgresStackError(f"INGEST_POSTGRES_PORT={value!r} is not a port number") from exc


@dataclass(frozen=True)
class Layout:
    root: Path  # <stack dir>/postgres

    @property
    def data(self) -> Path:
        """`<stack dir>/postgres/data`, or, when the server runs as `postgres` (we are root) and that user
        cannot reach the stack dir (a clone under a private directory such as `mktemp -d`'s), a directory
        of this stack's own under /var/tmp (one per stack dir, so restarts find it)."""
        inside = self.root / "data"
        owner = run_as()
        if owner is None or _reachable(inside, owner):
            return inside
        digest = hashlib.sha256(str(self.root.resolve()).encode()).hexdigest()[:16]
        return OUTSIDE_DATA_ROOT / digest / "data"

    @property
    def data_marker(self) -> Path:
        """Names the data directory this stack initialised (a /var/tmp one left by an older stack at the
        same path has another password: it is replaced)."""
        return self.root / "data_dir"

    @property
    def config(self) -> Path:
        return self.data / "postgresql.conf"

    @property
    def secrets_file(self) -> Path:
        return self.root / "secrets.env"

    @property
    def env_file(self) -> Path:
        return self.root / "env.sh"


# ---------------------------------------------------------------- binaries
def bin_dir() -> Path | None:
    """The newest /usr/lib/postgresql/<major>/bin with initdb and postgres (Debian's layout)."""
    found = sorted((p for p in Path("/usr/lib/postgresql").glob("*/bin") if (p / "initdb").exists()),
                   key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0)
    if found:
        return found[-1]
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def ensure_installed(apt_install) -> Path:
    found = bin_dir()
    if found is None and apt_install is not None:
        _no_main_cluster()
        apt_install([DEBIAN_PACKAGE])
        found = bin_dir()
    if found is None:
        raise PostgresStackError(f"PostgreSQL not found: `sudo apt-get install -y {DEBIAN_PACKAGE}` (Debian), or put "
                                 "`initdb` and `postgres` on PATH")
    return found


def _no_main_cluster() -> None:
    """Debian's package makes and starts a cluster `main` on port 5432 when installed: this stack has its own."""
    conf = Path("/etc/postgresql-common/createcluster.d")
    try:
        conf.mkdir(parents=True, exist_ok=True)
        (conf / "ingest-no-main-cluster.conf").write_text("# written by `ingest stack up --postgres`\n"
                                                          "create_main_cluster = false\n")
    except OSError:
        pass


def run_as() -> str | None:
    """The OS user the server runs as: `postgres` when we are root (PostgreSQL refuses root), else None (us)."""
    return OS_USER_WHEN_ROOT if os.geteuid() == 0 else None


# ---------------------------------------------------------------- secrets
def load_password(layout: Layout, create: bool = False) -> str:
    if layout.secrets_file.exists():
        for line in layout.secrets_file.read_text().splitlines():
            words = shlex.split(line) if line.startswith("export ") else []
            if len(words) == 2 and words[1].startswith("DAGSTER_POSTGRES_PASSWORD="):
                return words[1].partition("=")[2]
    if not create:
        raise PostgresStackError(f"{layout.secrets_file} holds no password: run `ingest stack up --postgres`")
    password = secrets.token_urlsafe(24)
    layout.root.mkdir(parents=True, exist_ok=True)
    tmp = layout.secrets_file.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write("# Generated by `ingest stack up --postgres`: the password of PostgreSQL user 'ingest'. Keep private.\n"
                 f"export DAGSTER_POSTGRES_PASSWORD={shlex.quote(password)}\n")
    tmp.replace(layout.secrets_file)
    return password


def client_env() -> dict[str, str]:
    """What deploy/dagster.postgres.yaml reads (the password is in secrets.env)."""
    return {"DAGSTER_POSTGRES_HOSTNAME": "127.0.0.1", "DAGSTER_POSTGRES_PORT": str(port()),
            "DAGSTER_POSTGRES_USER": USER, "DAGSTER_POSTGRES_DB": DATABASE}


def write_env_file(layout: Layout) -> None:
    lines = ["# Generated by `ingest stack up --postgres`. `. .stack/postgres/env.sh` and use "
             "deploy/dagster.postgres.yaml as $DAGSTER_HOME/dagster.yaml to keep Dagster's storage here."]
    lines += [f"export {k}={shlex.quote(v)}" for k, v in client_env().items()]
    lines.append(f". {shlex.quote(str(layout.secrets_file))}")
    layout.env_file.write_text("\n".join(lines) + "\n")


# ---------------------------------------------------------------- cluster
def prepare(layout: Layout, apt_install=None) -> list[str]:
    """initdb on first start, the settings, and the server's argv."""
    binaries = ensure_installed(apt_install)
    password = load_password(layout, create=True)
    owner = run_as()
    mine = layout.data_marker.exists() and layout.data_marker.read_text().strip() == str(layout.data)
    if layout.data != layout.root / "data" and layout.data.exists() and not mine:
        shutil.rmtree(layout.data.parent)  # an older stack's, at this stack dir's path: its password is gone
    if not (layout.data / "PG_VERSION").exists():
        _initdb(layout, binaries, password, owner)
        layout.data_marker.write_text(f"{layout.data}\n")
    settings = {**SERVER_SETTINGS, "port": str(port())}
    auto = layout.data / "postgresql.auto.conf"  # later lines win over postgresql.conf; rewritten every start
    auto.write_text("# written by `ingest stack up --postgres` on every start\n"
                    + "".join(f"{k} = {v}\n" for k, v in settings.items()))
    if owner:
        info = pwd.getpwnam(owner)
        os.chown(auto, info.pw_uid, info.pw_gid)
    return [str(binaries / "postgres"), "-D", str(layout.data)]


def _initdb(layout: Layout, binaries: Path, password: str, owner: str | None) -> None:
    if layout.data.is_relative_to(OUTSIDE_DATA_ROOT):
        for parent in (OUTSIDE_DATA_ROOT, layout.data.parent):
            parent.mkdir(parents=True, exist_ok=True)
            parent.chmod(0o755)  # the server's user passes through; the data dir itself is 0700
    layout.data.mkdir(parents=True, exist_ok=True)
    layout.data.chmod(0o700)
    uid = gid = None
    if owner:
        try:
            info = pwd.getpwnam(owner)
        except KeyError:
            raise PostgresStackError(f"PostgreSQL refuses to run as root and there is no OS user '{owner}' to run it "
                                     f"as (the Debian package makes it): `apt-get install -y {DEBIAN_PACKAGE}`") from None
        uid, gid = info.pw_uid, info.pw_gid
        os.chown(layout.data, uid, gid)
        _check_traversable(layout.data, owner, uid)
    # beside the data directory: initdb, running as the server's user, must be able to read it
    with tempfile.NamedTemporaryFile("w", dir=layout.data.parent, prefix=".pw-", delete=False) as fh:
        fh.write(password + "\n")
        pwfile = Path(fh.name)
    try:
        pwfile.chmod(0o600)
        if uid is not None:
            os.chown(pwfile, uid, gid)
        cmd = [str(binaries / "initdb"), "-D", str(layout.data), "--username", USER, "--pwfile", str(pwfile),
               "--auth", "scram-sha-256", "--encoding", "UTF8", "--locale", "C", "--no-instructions"]
        proc = subprocess.run(cmd, capture_output=True, text=True, user=uid, group=gid, cwd=layout.data)
    finally:
        pwfile.unlink(missing_ok=True)
    if proc.returncode != 0:
        shutil.rmtree(layout.data, ignore_errors=True)
        raise PostgresStackError(f"initdb failed (exit {proc.returncode}): {(proc.stderr or proc.stdout).strip()[-600:]}")
    # Loopback only, SCRAM passwords only.
    (layout.data / "pg_hba.conf").write_text("host all all 127.0.0.1/32 scram-sha-256\n")
    if uid is not None:
        os.chown(layout.data / "pg_hba.conf", uid, gid)


def _reachable(path: Path, owner: str) -> bool:
    """Whether `owner` can pass through every existing parent of `path` (owns it, or others may search it)."""
    try:
        uid = pwd.getpwnam(owner).pw_uid
    except KeyError:
        return True  # no such user yet: _initdb says what to install
    for parent in path.parents:
        if not parent.exists():
            continue
        st = parent.stat()
        if st.st_uid != uid and not st.st_mode & 0o001:
            return False
    return True


def _check_traversable(path: Path, owner: str, uid: int) -> None:
    for parent in path.parents:
        mode = parent.stat().st_mode
        if parent.stat().st_uid != uid and not mode & 0o001:
            raise PostgresStackError(f"the server runs as OS user '{owner}', which cannot reach {path}: {parent} is "
                                     f"not searchable by others. `chmod o+x {parent}` or set INGEST_STACK_DIR elsewhere")


def popen_user() -> dict[str, object]:
    """Extra subprocess.Popen arguments: run the server as `postgres` when we are root."""
    owner = run_as()
    if not owner:
        return {}
    info = pwd.getpwnam(owner)
    return {"user": info.pw_uid, "group": info.pw_gid, "extra_groups": [], "env": {"PATH": os.environ.get("PATH", ""),
                                                                                   "LANG": "C.UTF-8"}}


# ---------------------------------------------------------------- probe and database
def connect(layout: Layout, dbname: str = "postgres", timeout: float = 5.0):
    import psycopg2

    return psycopg2.connect(host="127.0.0.1", port=port(), user=USER, password=load_password(layout),
                            dbname=dbname, connect_timeout=max(1, int(timeout)))


def probe(layout: Layout, timeout: float) -> None:
    with connect(layout, timeout=timeout) as conn, conn.cursor() as cur:
        cur.execute("select 1")


def ensure_database(layout: Layout) -> None:
    conn = connect(layout)
    try:
        conn.autocommit = True  # CREATE DATABASE cannot run in a transaction
        with conn.cursor() as cur:
            cur.execute("select 1 from pg_database where datname = %s", (DATABASE,))
            if cur.fetchone() is None:
                cur.execute(f'create database "{DATABASE}" owner "{USER}"')
    finally:
        conn.close()

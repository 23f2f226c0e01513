"""The schema registry of the local stack: Apicurio Registry 3.3.3 (Confluent-compatible API).

`ingest stack up` starts it beside the brokers, as one more process under the stack dir::

    .stack/registry/  registry.conf  registry.log  registry.pid  registry.run.json
                      data/registry.mv.db       H2 database file: schemas survive down/up
                      dist/                     the unpacked distribution (INGEST_REGISTRY_DIST)

Address: ``SCHEMA_REGISTRY_URL`` (default ``http://localhost:8081/apis/ccompat/v7``); its
management port (health) is ``SCHEMA_REGISTRY_MANAGEMENT_PORT`` (default: the HTTP port + 1).
``INGEST_STACK_REGISTRY=0`` leaves it out (the stack tests' second stack does).

* The distribution is the prebuilt Quarkus app Maven Central serves as
  ``io.apicurio:apicurio-registry-app:3.3.3:tar.gz:all``, fetched once with Maven
  (``mvn dependency:copy``) and unpacked into ``INGEST_REGISTRY_DIST`` (default
  ``<stack dir>/registry/dist``; point several stacks at one copy).
* It needs Java 21 or newer (its classes are class file 65); Debian bookworm's default is
  17. The JDK is taken from ``INGEST_REGISTRY_JAVA_HOME``, else ``JAVA_HOME`` or ``java`` on
  PATH when they are 21+, else the newest 21+ JDK under ``/usr/lib/jvm``.
* Storage: H2 in a file (Apicurio's default is an in-memory H2, empty on every start), so the
  schema ids inside stored messages stay resolvable across ``ingest stack down/up``.
* Global compatibility BACKWARD from the start (Apicurio's default is NONE; Confluent's is BACKWARD).
* Its per-request access and audit log lines are off: the log holds start-up, warnings and errors.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import tarfile
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

from ingest_defs.stack import manager

APICURIO_VERSION = "3.3.3"
APICURIO_ARTIFACT = f"io.apicurio:apicurio-registry-app:{APICURIO_VERSION}:tar.gz:all"
DEFAULT_URL = "http://localhost:8081/apis/ccompat/v7"
REGISTRY_TIMEOUT = 180.0  # ~9 s on an idle machine; a JVM start on two busy cores takes far longer
JAVA_MIN = 21
JVM_DIR = Path("/usr/lib/jvm")

# Passed as system properties (and recorded in registry.conf) on every start.
SETTINGS = {
    "apicurio.storage.kind": "sql",
    "apicurio.storage.sql.kind": "h2",
    "apicurio.datasource.jdbc.initial-size": "2",
    "apicurio.datasource.jdbc.min-size": "2",
    "apicurio.datasource.jdbc.max-size": "20",
    "apicurio.rules.global.compatibility": "BACKWARD",
    "quarkus.http.access-log.enabled": "false",
    'quarkus.log.category."io.apicurio.registry.logging.audit".level': "WARN",
    'quarkus.log.category."io.apicurio.registry.storage.metrics".level': "WARN",
}


def enabled() -> bool:
    """`INGEST_STACK_REGISTRY=0` leaves the registry out of the stack (a stack that needs no schemas)."""
    return os.environ.get("INGEST_STACK_REGISTRY", "1").strip().lower() not in {"0", "false", "no", "off"}


def url() -> str:
    return os.environ.get("SCHEMA_REGISTRY_URL") or DEFAULT_URL


def endpoint() -> manager.Endpoint:
    return manager._split_hostport(url(), 8081, "SCHEMA_REGISTRY_URL")


def management_port() -> int:
    value = os.environ.get("SCHEMA_REGISTRY_MANAGEMENT_PORT")
    if value:
        try:
            return int(value)
        except ValueError as exc:
            raise manager.StackError(f"SCHEMA_REGISTRY_MANAGEMENT_PORT={value!r} is not a port number") from exc
    return endpoint().port + 1


def dist_dir() -> Path:
    value = os.environ.get("INGEST_REGISTRY_DIST")
    return Path(value).resolve() if value else manager.stack_dir() / "registry" / "dist"


def broker(root: Path) -> manager.Broker:
    ep = endpoint()
    return manager.Broker(
        name="registry",
        label="Registry",
        env_var="SCHEMA_REGISTRY_URL",
        address=url(),
        endpoint=ep,
        binary="java",
        timeout=REGISTRY_TIMEOUT,
        probe=probe,
        write_config=_config,
        extra_ports={management_port(): "registry management port (health), SCHEMA_REGISTRY_MANAGEMENT_PORT"},
        root=root,
    )


# --------------------------------------------------------------------------- Java 21+


def _java_major(java: Path) -> int | None:
    """The major version of a `bin/java`, from the JDK's `release` file or `java -version`."""
    release = java.parent.parent / "release"
    try:
        match = re.search(r'^JAVA_VERSION="([0-9]+)', release.read_text(), re.M)
        if match:
            return int(match.group(1))
    except OSError:
        pass
    try:
        out = subprocess.run([str(java), "-version"], capture_output=True, text=True, timeout=30).stderr
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r'version "(?:1\.)?([0-9]+)', out)
    return int(match.group(1)) if match else None


def find_java() -> str:
    """A `java` of version 21 or newer, or a StackError saying what to install."""
    candidates: list[Path] = []
    for var in ("INGEST_REGISTRY_JAVA_HOME", "JAVA_HOME"):
        home = os.environ.get(var)
        if home:
            candidates.append(Path(home) / "bin" / "java")
    on_path = shutil.which("java")
    if on_path:
        candidates.append(Path(on_path).resolve())
    if JVM_DIR.is_dir():
        jdks = [d / "bin" / "java" for d in JVM_DIR.iterdir() if (d / "bin" / "java").exists() and not d.is_symlink()]
        candidates += sorted(jdks, key=lambda j: _java_major(j) or 0, reverse=True)
    seen: dict[Path, int | None] = {}
    for java in candidates:
        if java in seen or not java.exists():
            continue
        seen[java] = major = _java_major(java)
        if major is not None and major >= JAVA_MIN:
            return str(java)
    found = ", ".join(f"{j} (Java {v or '?'})" for j, v in seen.items()) or "no java at all"
    raise manager.StackError(
        f"Apicurio Registry {APICURIO_VERSION} needs Java {JAVA_MIN} or newer; found {found}. Install a JDK "
        f"{JAVA_MIN}+ (Debian bookworm has none: e.g. Eclipse Temurin 21 or 25 — the `temurin-21-jdk` package "
        f"from the Adoptium apt repository, or its tarball unpacked under {JVM_DIR}) and, if it is not under "
        f"{JVM_DIR}, point INGEST_REGISTRY_JAVA_HOME at it."
    )


# --------------------------------------------------------------------------- distribution


def ensure_dist() -> Path:
    """Download (Maven) and unpack the Apicurio distribution once; return its directory."""
    dist = dist_dir()
    marker = dist / ".version"

    def fresh() -> bool:
        return (dist / "quarkus-run.jar").exists() and marker.exists() and marker.read_text().strip() == APICURIO_VERSION

    if fresh():
        return dist
    dist.parent.mkdir(parents=True, exist_ok=True)
    with manager._flock(dist.parent / f".{dist.name}.lock"):
        if fresh():
            return dist
        mvn = manager._which("mvn")
        if not mvn:
            raise SystemExit(
                f"ingest stack: Maven (`mvn`) not found. Install with:\n  {manager._apt_command(['mvn', 'java'])}")
        download = dist.parent / f".{dist.name}.download-{os.getpid()}"
        tmp = dist.parent / f".{dist.name}.tmp-{os.getpid()}"
        for d in (download, tmp):
            shutil.rmtree(d, ignore_errors=True)
        cmd = [mvn, "-q", "-B", "-Dstyle.color=never", "dependency:copy", f"-Dartifact={APICURIO_ARTIFACT}",
               f"-DoutputDirectory={download}"]
        manager._say(f"fetching Apicurio Registry {APICURIO_VERSION} with Maven into {dist} (first run only) ...")
        t0 = time.monotonic()
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=dist.parent)
        archives = list(download.glob("*.tar.gz"))
        if proc.returncode != 0 or len(archives) != 1:
            shutil.rmtree(download, ignore_errors=True)
            out = (proc.stdout + proc.stderr).strip().splitlines()[-manager.LOG_TAIL_LINES:]
            raise SystemExit(f"ingest stack: `{shlex.join(cmd)}` failed (exit {proc.returncode}):\n" + "\n".join(out))
        with tarfile.open(archives[0]) as archive:
            archive.extractall(tmp, filter="data")
        shutil.rmtree(download, ignore_errors=True)
        if not (tmp / "quarkus-run.jar").exists():
            shutil.rmtree(tmp, ignore_errors=True)
            raise SystemExit(f"ingest stack: {APICURIO_ARTIFACT} has no quarkus-run.jar at its top level")
        (tmp / ".version").write_text(APICURIO_VERSION + "\n")
        if dist.exists():
            old = dist.parent / f".{dist.name}.old-{os.getpid()}"
            dist.rename(old)
            shutil.rmtree(old, ignore_errors=True)
        tmp.rename(dist)
        manager._say(f"  done in {time.monotonic() - t0:.1f}s")
    return dist


# --------------------------------------------------------------------------- process


def _config(b: manager.Broker) -> list[str]:
    b.data_dir.mkdir(parents=True, exist_ok=True)
    (management,) = b.extra_ports
    settings = {
        **SETTINGS,
        "quarkus.http.host": "127.0.0.1",
        "quarkus.http.port": str(b.endpoint.port),
        "quarkus.management.host": "127.0.0.1",
        "quarkus.management.port": str(management),
        "apicurio.datasource.url": f"jdbc:h2:file:{b.data_dir / 'registry'}",
        "apicurio.import.work-dir": str(b.data_dir),
        "apicurio.storage.snapshot.location": str(b.data_dir),
    }
    b.config.write_text(
        "# Generated by ingest_defs.stack.registry on every `ingest stack up`; edits are lost.\n"
        + "".join(f"{key}={value}\n" for key, value in settings.items())
    )
    java = find_java()
    dist = ensure_dist()
    # The prebuilt app ignores quarkus.config.locations: the settings go in as system properties; the
    # file records them, and its path in argv marks the process as this stack's.
    return [
        java,
        "-Xmx320m",
        "-XX:+ExitOnOutOfMemoryError",
        "-Djava.awt.headless=true",
        *(f"-D{key}={value}" for key, value in settings.items()),
        f"-Dingest.stack.config={b.config}",
        "-jar",
        str(dist / "quarkus-run.jar"),
    ]


def probe(timeout: float) -> None:
    """Ready (management health) and answering the Confluent API (global compatibility)."""
    ep = endpoint()
    with urllib.request.urlopen(f"http://{ep.host}:{management_port()}/health/ready", timeout=timeout) as resp:
        health = json.loads(resp.read())
    if health.get("status") != "UP":
        raise RuntimeError(f"health {health.get('status')}")
    with urllib.request.urlopen(f"{url().rstrip('/')}/config", timeout=timeout) as resp:
        json.loads(resp.read())


def base_url_without_credentials(value: str) -> str:
    """The URL as it may be shown: without user:password@."""
    parts = urlsplit(value)
    if parts.username or parts.password:
        host = parts.hostname or ""
        netloc = f"{host}:{parts.port}" if parts.port else host
        return parts._replace(netloc=netloc).geturl()
    return value

"""`ingest stack up|down|status`: Kafka, NATS JetStream and Mosquitto as plain local processes.

No Docker: the brokers run as processes bound to 127.0.0.1, with data, logs, generated
configs and pidfiles under one git-ignored folder (``INGEST_STACK_DIR``, default
``<repo>/.stack``)::

    .stack/
      .lock                         serialises up/down
      kafka/     server.properties  kafka.log  kafka.pid  kafka.run.json  data/
                 libs/              Kafka jars (Maven cache, see ensure_kafka_jars)
                 build/pom.xml      scratch copy of ingest_defs/stack/kafka/pom.xml
      nats/      nats.conf          nats.log   nats.pid   nats.run.json   data/jetstream/
      mosquitto/ mosquitto.conf     mosquitto.log  mosquitto.pid  mosquitto.run.json
                 data/mosquitto.db
      s3/        (`up --s3`) the S3 server, versitygw: see stack/s3.py
      postgres/  (`up --postgres`) PostgreSQL for Dagster's storage: see stack/postgres.py

Addresses come from ``KAFKA_BOOTSTRAP_SERVERS`` (default ``localhost:9092``), ``NATS_URL``
(``nats://localhost:4222``) and ``MQTT_URL`` (``mqtt://localhost:1883``); the KRaft
controller listens on the Kafka port + 1 or ``KAFKA_CONTROLLER_PORT``. Everything is read
from the environment at call time.

Other environment variables: ``INGEST_KAFKA_LIBS`` (Kafka jar cache dir, default
``<stack dir>/kafka/libs``; point several stacks at one cache), ``JAVA_HOME`` (else ``java``
on PATH), ``INGEST_STACK_EXTERNAL`` (below).

The stack only ever reuses or stops processes it started itself (pidfile + matching
``/proc/<pid>/cmdline``). A port held by anything else is an error, unless
``INGEST_STACK_EXTERNAL=1`` says the brokers are external on purpose, in which case
``up`` only checks that they answer.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import errno
import fcntl
import hashlib
import ipaddress
import json
import logging
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from ingest_defs.stack import postgres, s3, secure
from ingest_defs.stack import prometheus as prometheus_service

PACKAGE_DIR = Path(__file__).resolve().parent
REPO_ROOT = PACKAGE_DIR.parents[1]

KAFKA_VERSION = "4.1.1"
KAFKA_JAR = f"kafka_2.13-{KAFKA_VERSION}.jar"
KAFKA_POM = PACKAGE_DIR / "kafka" / "pom.xml"
KAFKA_LOG4J2 = PACKAGE_DIR / "kafka" / "log4j2.properties"
MOSQUITTO_CONF = PACKAGE_DIR / "mosquitto.conf"
# Options of the shared mosquitto.conf that the native stack replaces with its own values.
MOSQUITTO_NATIVE_OVERRIDES = frozenset({"listener", "persistence_location", "user", "log_dest", "pid_file"})

DEFAULT_KAFKA = "localhost:9092"
DEFAULT_NATS = "nats://localhost:4222"
DEFAULT_MQTT = "mqtt://localhost:1883"

KAFKA_TIMEOUT = 90.0
NATS_TIMEOUT = 20.0
MQTT_TIMEOUT = 20.0
STOP_TIMEOUT = 20.0
LOG_TAIL_LINES = 30
LOG_ROTATE_BYTES = 20 * 1024 * 1024

# binary -> Debian package providing it
SYSTEM_PACKAGES = {
    "nats-server": "nats-server",
    "mosquitto": "mosquitto",
    "java": "openjdk-17-jre-headless",
    "mvn": "maven",
    "openssl": "openssl",  # makes the secure stack's certificates
    "prometheus": "prometheus",  # `ingest stack up --prometheus` (stack/prometheus.py), scrapes the exporter
}
_SBIN_PATH = "/usr/local/sbin:/usr/sbin:/sbin"
_apt_updated = False
# Popen handles of brokers started by this process, kept so they are never garbage
# collected while running (avoids ResourceWarnings; the brokers outlive us anyway).
_CHILDREN: dict[int, subprocess.Popen] = {}


class StackError(Exception):
    """A problem worth one clear line to the user."""


# --------------------------------------------------------------------------- addresses


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def _first(value: str) -> str:
    return value.split(",")[0].strip()


def _split_hostport(text: str, default_port: int, what: str) -> Endpoint:
    parts = urlsplit(text if "//" in text else f"//{text}")
    try:
        port = parts.port or default_port
    except ValueError as exc:
        raise StackError(f"{what}: bad port in {text!r}") from exc
    return Endpoint(parts.hostname or "localhost", port)


def kafka_bootstrap() -> str:
    return os.environ.get("KAFKA_BOOTSTRAP_SERVERS") or DEFAULT_KAFKA


def nats_url() -> str:
    return os.environ.get("NATS_URL") or DEFAULT_NATS


def mqtt_url() -> str:
    return os.environ.get("MQTT_URL") or DEFAULT_MQTT


def kafka_endpoint() -> Endpoint:
    return _split_hostport(_first(kafka_bootstrap()), 9092, "KAFKA_BOOTSTRAP_SERVERS")


def kafka_controller_port() -> int:
    value = os.environ.get("KAFKA_CONTROLLER_PORT")
    if value:
        try:
            return int(value)
        except ValueError as exc:
            raise StackError(f"KAFKA_CONTROLLER_PORT={value!r} is not a port number") from exc
    return kafka_endpoint().port + 1


def nats_endpoint() -> Endpoint:
    return _split_hostport(_first(nats_url()), 4222, "NATS_URL")


def mqtt_endpoint() -> Endpoint:
    url = _first(mqtt_url())
    default = 8883 if url.startswith(("mqtts://", "ssl://")) else 1883
    return _split_hostport(url, default, "MQTT_URL")


def addresses() -> dict[str, str]:
    """The broker addresses as clients want them (read from the environment now).

    Keys: ``kafka`` (bootstrap ``host:port``), ``nats`` (URL), ``mqtt`` (URL),
    ``mqtt_host`` and ``mqtt_port`` (for ``paho`` ``connect(host, int(port))``).
    """
    mqtt = mqtt_endpoint()
    return {
        "kafka": str(kafka_endpoint()),
        "nats": _first(nats_url()),
        "mqtt": _first(mqtt_url()),
        "mqtt_host": mqtt.host,
        "mqtt_port": str(mqtt.port),
    }


def stack_dir() -> Path:
    return Path(os.environ.get("INGEST_STACK_DIR") or REPO_ROOT / ".stack").resolve()


def external() -> bool:
    return os.environ.get("INGEST_STACK_EXTERNAL", "").strip().lower() in {"1", "true", "yes", "on"}


# --------------------------------------------------------------------------- brokers


@dataclass
class Broker:
    name: str  # directory / file stem: kafka | nats | mosquitto
    label: str
    env_var: str
    address: str  # as shown to the user
    endpoint: Endpoint
    binary: str  # expected basename of argv[0]
    timeout: float
    probe: Callable[[float], None]  # raises when the broker does not answer
    write_config: Callable[[Broker], list[str]]  # writes config, returns argv
    extra_ports: dict[int, str] = field(default_factory=dict)  # port -> description
    root: Path = field(default_factory=stack_dir)
    after_ready: Callable[[], None] | None = None  # idempotent setup once it answers (secure Kafka: users, ACLs)
    argv_marker: str | None = None  # what our process's argv holds (default: the config file's path)
    popen: Callable[[], dict] | None = None  # extra Popen arguments (environment, OS user, cwd)
    stop_signal: int = signal.SIGTERM
    before_start: Callable[[Broker, list[str]], None] | None = None  # e.g. a cluster node's storage format

    @property
    def dir(self) -> Path:
        return self.root / self.name

    @property
    def data_dir(self) -> Path:
        return self.dir / "data"

    @property
    def pidfile(self) -> Path:
        return self.dir / f"{self.name}.pid"

    @property
    def runfile(self) -> Path:
        return self.dir / f"{self.name}.run.json"

    @property
    def logfile(self) -> Path:
        return self.dir / f"{self.name}.log"

    @property
    def config(self) -> Path:
        return self.dir / ("server.properties" if self.binary == "java" and self.name != "registry" else
                           {"prometheus": "prometheus.yml"}.get(self.name, f"{self.name}.conf"))

    @property
    def ports(self) -> dict[int, str]:
        return {self.endpoint.port: f"{self.label} port", **self.extra_ports}


def _brokers(secure: bool = False, cluster: bool = False) -> list[Broker]:
    if cluster:
        from ingest_defs.stack import cluster as kafka_cluster  # the 3-node Kafka cluster (`up --cluster`)

        return kafka_cluster.brokers()
    if secure:
        return _secure_brokers()
    from ingest_defs.stack import registry  # imports this module

    kafka, nats_ep, mqtt = kafka_endpoint(), nats_endpoint(), mqtt_endpoint()
    controller = kafka_controller_port()
    root = stack_dir()
    return [
        Broker(
            name="kafka",
            label="Kafka",
            env_var="KAFKA_BOOTSTRAP_SERVERS",
            address=str(kafka),
            endpoint=kafka,
            binary="java",
            timeout=KAFKA_TIMEOUT,
            probe=lambda t: _probe_kafka(str(kafka), t),
            write_config=_kafka_config,
            extra_ports={controller: "Kafka KRaft controller port, KAFKA_CONTROLLER_PORT or Kafka port + 1"},
            root=root,
        ),
        Broker(
            name="nats",
            label="NATS",
            env_var="NATS_URL",
            address=_first(nats_url()),
            endpoint=nats_ep,
            binary="nats-server",
            timeout=NATS_TIMEOUT,
            probe=lambda t: _probe_nats(_first(nats_url()), t),
            write_config=_nats_config,
            root=root,
        ),
        Broker(
            name="mosquitto",
            label="MQTT",
            env_var="MQTT_URL",
            address=_first(mqtt_url()),
            endpoint=mqtt,
            binary="mosquitto",
            timeout=MQTT_TIMEOUT,
            probe=lambda t: _probe_mqtt(mqtt, t),
            write_config=_mosquitto_config,
            root=root,
        ),
        *([registry.broker(root)] if registry.enabled() else []),  # the schema registry, see stack/registry.py
    ]


def _secure_layout() -> secure.Layout:
    return secure.Layout(stack_dir() / "secure")


def _secure_brokers() -> list[Broker]:
    """The secure stack (`up --secure`): its own ports, directory and pidfiles; see stack/secure.py."""
    try:
        ports = {name: secure.port(name) for name in secure.DEFAULT_PORTS}
    except secure.SecureStackError as exc:
        raise StackError(str(exc)) from exc
    layout = _secure_layout()
    env = secure.client_env(layout)
    local = "127.0.0.1"
    return [
        Broker(
            name="kafka", label="Kafka (SASL_SSL+mTLS)", env_var="INGEST_SECURE_KAFKA_PORT",
            address=env["INGEST_SECURE_KAFKA_SASL"], endpoint=Endpoint(local, ports["INGEST_SECURE_KAFKA_PORT"]),
            binary="java", timeout=KAFKA_TIMEOUT, probe=lambda t: _probe_secure_kafka(layout, t),
            write_config=lambda b: _secure_kafka_config(b, layout),
            extra_ports={ports["INGEST_SECURE_KAFKA_MTLS_PORT"]: "Kafka mTLS port (INGEST_SECURE_KAFKA_MTLS_PORT)",
                         ports["INGEST_SECURE_KAFKA_CONTROLLER_PORT"]:
                             "Kafka KRaft controller port (INGEST_SECURE_KAFKA_CONTROLLER_PORT)"},
            root=layout.root, after_ready=lambda: secure.kafka_setup(layout, secure.load_secrets(layout)),
        ),
        Broker(
            name="nats", label="NATS (TLS+users)", env_var="INGEST_SECURE_NATS_PORT",
            address=env["INGEST_SECURE_NATS_URL"], endpoint=Endpoint(local, ports["INGEST_SECURE_NATS_PORT"]),
            binary="nats-server", timeout=NATS_TIMEOUT, probe=lambda t: _probe_secure_nats(layout, t),
            write_config=lambda b: _secure_nats_config(b, layout), root=layout.root,
        ),
        Broker(
            name="mosquitto", label="MQTT (TLS+users, mTLS)", env_var="INGEST_SECURE_MQTT_PORT",
            address=env["INGEST_SECURE_MQTT_URL"], endpoint=Endpoint(local, ports["INGEST_SECURE_MQTT_PORT"]),
            binary="mosquitto", timeout=MQTT_TIMEOUT, probe=lambda t: _probe_secure_mqtt(layout, t),
            write_config=lambda b: _secure_mosquitto_config(b, layout),
            extra_ports={ports["INGEST_SECURE_MQTT_MTLS_PORT"]: "MQTT mTLS port (INGEST_SECURE_MQTT_MTLS_PORT)"},
            root=layout.root,
        ),
    ]


def s3_wanted() -> bool:
    """`up` starts the S3 server when asked (`--s3`) or when the lake is on it: LAKE_ROOT=s3://... with
    AWS_ENDPOINT_URL naming this machine (a lake on a real S3 needs no local server)."""
    if not os.environ.get("LAKE_ROOT", "").startswith("s3://"):
        return False
    endpoint = urlsplit(os.environ.get("AWS_ENDPOINT_URL", ""))
    return bool(endpoint.hostname) and _is_local(endpoint.hostname) and endpoint.port == s3.port()


def _service_brokers(with_s3: bool, with_postgres: bool) -> list[Broker]:
    """The S3 server (stack/s3.py) and PostgreSQL (stack/postgres.py), each under its own directory."""
    root = stack_dir()
    out = []
    try:
        if with_s3:
            layout = s3.Layout(root / "s3")
            out.append(Broker(
                name="s3", label="S3", env_var="INGEST_S3_PORT", address=s3.endpoint(),
                endpoint=Endpoint("127.0.0.1", s3.port()), binary=f"versitygw-{s3.VERSION}", timeout=30.0,
                probe=lambda t: _probe_external_s3(t) if external() else s3.probe(layout, t),
                write_config=lambda b: s3.argv(s3.Layout(b.dir)), root=root, argv_marker=str(layout.data),
                after_ready=lambda: s3.ensure_bucket(layout),
                popen=lambda: {"env": {**os.environ, **s3.server_env(layout)}},
            ))
            if os.environ.get("INGEST_VERSITYGW"):
                out[-1].binary = Path(os.environ["INGEST_VERSITYGW"]).name
        if with_postgres:
            pg = postgres.Layout(root / "postgres")
            out.append(Broker(
                name="postgres", label="Postgres", env_var="INGEST_POSTGRES_PORT",
                address=f"127.0.0.1:{postgres.port()}", endpoint=Endpoint("127.0.0.1", postgres.port()),
                binary="postgres", timeout=60.0,
                probe=lambda t: _probe_external_postgres(t) if external() else postgres.probe(pg, t),
                write_config=lambda b: postgres.prepare(pg, apt_install), root=root, argv_marker=str(pg.data),
                after_ready=lambda: postgres.ensure_database(pg),
                popen=lambda: {**postgres.popen_user(), "cwd": pg.data},  # its data dir may be outside (Layout.data)
                stop_signal=signal.SIGINT,  # fast shutdown; SIGTERM waits for every client to leave
            ))
    except (s3.S3StackError, postgres.PostgresStackError) as exc:
        raise StackError(str(exc)) from exc
    return out


def _prepare_services(brokers: list[Broker]) -> None:
    """Credentials (made once) and the env.sh files of the S3 server and PostgreSQL."""
    for b in brokers:
        if b.name == "s3":
            layout = s3.Layout(b.dir)
            s3.load_secrets(layout, create=True)
            s3.write_env_file(layout)
            layout.binary.parent.mkdir(parents=True, exist_ok=True)
            s3.ensure_binary(layout, say=_say, apt_install=apt_install)  # before the lock's timeouts start
        if b.name == "postgres":
            layout = postgres.Layout(b.dir)
            postgres.load_password(layout, create=True)
            postgres.write_env_file(layout)


def _probe_external_s3(timeout: float) -> None:
    """An S3 server the user runs (INGEST_STACK_EXTERNAL=1): a signed ListBuckets with the AWS_* settings."""
    import pyarrow.fs as pafs

    from ingest_defs.storage import location

    fs, _ = location(f"s3://{s3.bucket()}").filesystem()
    fs.get_file_info(pafs.FileSelector("", recursive=False))


def _probe_external_postgres(timeout: float) -> None:
    import psycopg2

    with psycopg2.connect(host=os.environ.get("DAGSTER_POSTGRES_HOSTNAME", "127.0.0.1"), port=postgres.port(),
                          user=os.environ.get("DAGSTER_POSTGRES_USER", postgres.USER),
                          password=os.environ.get("DAGSTER_POSTGRES_PASSWORD", ""),
                          dbname=os.environ.get("DAGSTER_POSTGRES_DB", postgres.DATABASE),
                          connect_timeout=max(1, int(timeout))) as conn, conn.cursor() as cur:
        cur.execute("select 1")


def _prepare_secure() -> None:
    """Passwords, certificates, the Mosquitto password/ACL files and env.sh (made once, reused after)."""
    layout = _secure_layout()
    if not shutil.which("openssl"):
        raise StackError("`openssl` not found (it makes the secure stack's certificates): apt-get install openssl")
    try:
        passwords = secure.load_secrets(layout, create=True)
        secure.ensure_tls(layout, passwords["INGEST_SECURE_KEYSTORE_PASSWORD"])
        secure.write_mosquitto_auth(layout, passwords)
        secure.write_env_file(layout)
    except secure.SecureStackError as exc:
        raise StackError(str(exc)) from exc


def _secure_kafka_config(b: Broker, layout: secure.Layout) -> list[str]:
    b.data_dir.mkdir(parents=True, exist_ok=True)
    b.config.touch(mode=0o600)
    b.config.chmod(0o600)  # it holds the keystore and PLAIN passwords
    b.config.write_text(secure.kafka_properties(layout, b.data_dir, secure.load_secrets(layout)))
    return _kafka_argv(b)


def _secure_nats_config(b: Broker, layout: secure.Layout) -> list[str]:
    argv = _nats_config(b)
    b.config.write_text(secure.nats_conf(layout, b.data_dir, secure.load_secrets(layout)))
    b.config.chmod(0o600)
    return argv


def _secure_mosquitto_config(b: Broker, layout: secure.Layout) -> list[str]:
    argv = _mosquitto_config(b)
    b.config.write_text(secure.mosquitto_conf(layout, b.config.read_text()))
    return argv


# --------------------------------------------------------------------------- configs


# One broker that is also its controller: internal topics cannot have more than one replica.
KAFKA_SINGLE_NODE = (
    "num.partitions=1\n"
    "offsets.topic.replication.factor=1\n"
    "transaction.state.log.replication.factor=1\n"
    "transaction.state.log.min.isr=1\n"
    "share.coordinator.state.topic.replication.factor=1\n"
    "share.coordinator.state.topic.min.isr=1\n"
    "group.initial.rebalance.delay.ms=0\n"
)


def _kafka_config(b: Broker) -> list[str]:
    port = b.endpoint.port
    (controller,) = b.extra_ports
    b.data_dir.mkdir(parents=True, exist_ok=True)
    b.config.write_text(
        "# Generated by ingest_defs.stack.manager on every `ingest stack up`; edits are lost.\n"
        "process.roles=broker,controller\n"
        "node.id=1\n"
        f"controller.quorum.bootstrap.servers=127.0.0.1:{controller}\n"
        f"listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller}\n"
        f"advertised.listeners=PLAINTEXT://127.0.0.1:{port}\n"
        "controller.listener.names=CONTROLLER\n"
        "listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT\n"
        f"log.dirs={b.data_dir}\n"
        + KAFKA_SINGLE_NODE
        + "auto.create.topics.enable=true\n"
        "delete.topic.enable=true\n"
        "log.retention.check.interval.ms=5000\n"
    )
    return _kafka_argv(b)


def _kafka_argv(b: Broker, heap: str = "768m") -> list[str]:
    return [
        _java(),
        f"-Xmx{heap}",
        "-Xms128m" if heap != "768m" else "-Xms256m",
        "-XX:+ExitOnOutOfMemoryError",
        "-Djava.awt.headless=true",
        # Kafka logs its own shutdown; log4j2 must not stop logging before that.
        "-Dlog4j2.shutdownHookEnabled=false",
        "-cp",
        f"{ensure_kafka_jars()}/*",
        f"-Dlog4j2.configurationFile={KAFKA_LOG4J2}",
        "kafka.Kafka",
        str(b.config),
    ]


def _nats_config(b: Broker) -> list[str]:
    b.data_dir.mkdir(parents=True, exist_ok=True)
    b.config.write_text(
        "# Generated by ingest_defs.stack.manager on every `ingest stack up`; edits are lost.\n"
        "server_name: ingest-stack\n"
        f'listen: "127.0.0.1:{b.endpoint.port}"\n'
        "jetstream {\n"
        f"  store_dir: {json.dumps(str(b.data_dir))}\n"
        "}\n"
    )
    return [_which_or_raise("nats-server"), "-c", str(b.config)]


def mosquitto_native_config(port: int, data_dir: Path, run_as_root: bool | None = None) -> str:
    """The shared mosquitto.conf with the native stack's listener/persistence/user lines."""
    if run_as_root is None:
        run_as_root = os.geteuid() == 0
    kept = []
    for line in MOSQUITTO_CONF.read_text().splitlines():
        words = line.split()
        if words and not words[0].startswith("#") and words[0] in MOSQUITTO_NATIVE_OVERRIDES:
            continue
        kept.append(line)
    native = [
        "",
        "# --- native stack (ingest_defs.stack.manager) ---",
        f"listener {port} 127.0.0.1",
        f"persistence_location {data_dir}/",
    ]
    if run_as_root:
        # Otherwise Mosquitto drops to user `mosquitto` and silently fails to save mosquitto.db.
        native.append("user root")
    return (
        "# Generated by ingest_defs.stack.manager from ingest_defs/stack/mosquitto.conf; edits are lost.\n"
        + "\n".join(kept + native)
        + "\n"
    )


def _mosquitto_config(b: Broker) -> list[str]:
    b.data_dir.mkdir(parents=True, exist_ok=True)
    b.config.write_text(mosquitto_native_config(b.endpoint.port, b.data_dir))
    return [_which_or_raise("mosquitto"), "-c", str(b.config)]


# --------------------------------------------------------------------------- system packages


def _which(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path=_SBIN_PATH)


def _which_or_raise(name: str) -> str:
    path = _which(name)
    if not path:
        raise StackError(
            f"`{name}` not found; run `ingest stack up` (it installs it) or: {_apt_command([name])}"
        )
    return path


def _java() -> str:
    java_home = os.environ.get("JAVA_HOME")
    if java_home and (Path(java_home) / "bin" / "java").exists():
        return str(Path(java_home) / "bin" / "java")
    return _which_or_raise("java")


def _apt_command(binaries: list[str], sudo: bool = True) -> str:
    pkgs = " ".join(sorted({SYSTEM_PACKAGES[b] for b in binaries}))
    s = "sudo " if sudo else ""
    return f"{s}apt-get update && {s}apt-get install -y {pkgs}"


def ensure_system_packages() -> None:
    """Make sure nats-server, mosquitto, java and mvn exist.

    As root (with apt-get) install the missing Debian packages; otherwise raise
    SystemExit with the exact command to run. Only the binaries are used: the stack never
    relies on (or talks to) a system mosquitto/nats service.
    """
    missing = [b for b in SYSTEM_PACKAGES if not _which(b) and not (b == "java" and _has_java_home())]
    if not missing:
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise SystemExit(
            f"ingest stack: missing {', '.join(missing)}. Install with:\n  {_apt_command(missing)}"
        )
    pkgs = sorted({SYSTEM_PACKAGES[b] for b in missing})
    _say(f"installing {' '.join(pkgs)} with apt-get (missing: {', '.join(missing)}) ...")
    apt_install(pkgs)
    still = [b for b in missing if not _which(b)]
    if still:
        raise SystemExit(
            f"ingest stack: still missing {', '.join(still)} after apt-get install {' '.join(pkgs)}"
        )


def apt_install(pkgs: list[str]) -> None:
    """apt-get install `pkgs` (root only; otherwise StackError with the command to run)."""
    global _apt_updated
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise StackError(f"missing Debian packages; install with: sudo apt-get install -y {' '.join(pkgs)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        if not _apt_updated:
            subprocess.run(["apt-get", "update"], check=True, env=env, stdout=subprocess.DEVNULL)
            _apt_updated = True
        subprocess.run(["apt-get", "install", "-y", *pkgs], check=True, env=env, stdout=subprocess.DEVNULL)
    except subprocess.CalledProcessError as exc:
        raise SystemExit(f"ingest stack: `{shlex.join(exc.cmd)}` failed (exit {exc.returncode})") from exc


def _has_java_home() -> bool:
    java_home = os.environ.get("JAVA_HOME")
    return bool(java_home and (Path(java_home) / "bin" / "java").exists())


def kafka_libs_dir() -> Path:
    value = os.environ.get("INGEST_KAFKA_LIBS")
    return Path(value).resolve() if value else stack_dir() / "kafka" / "libs"


def ensure_kafka_jars() -> Path:
    """Download the Kafka broker jars pinned by kafka/pom.xml into the libs cache; return it.

    The cache is ``INGEST_KAFKA_LIBS`` or ``<stack dir>/kafka/libs``. It is reused when it
    holds ``kafka_2.13-<version>.jar`` (and, if present, its pom hash marker matches).
    """
    libs = kafka_libs_dir()
    pom_hash = hashlib.sha256(KAFKA_POM.read_bytes()).hexdigest()
    marker = libs / ".pom.sha256"

    def fresh() -> bool:
        return (libs / KAFKA_JAR).exists() and (not marker.exists() or marker.read_text().strip() == pom_hash)

    if fresh():
        return libs
    libs.parent.mkdir(parents=True, exist_ok=True)
    with _flock(libs.parent / f".{libs.name}.lock"):
        if fresh():
            return libs
        mvn = _which("mvn")
        if not mvn:
            raise SystemExit(
                f"ingest stack: Maven (`mvn`) not found. Install with:\n  {_apt_command(['mvn', 'java'])}"
            )
        build = libs.parent / "build"
        build.mkdir(exist_ok=True)
        shutil.copy2(KAFKA_POM, build / "pom.xml")
        tmp = libs.parent / f".{libs.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        cmd = [
            mvn, "-q", "-B", "-Dstyle.color=never", "-f", str(build / "pom.xml"),
            "dependency:copy-dependencies", f"-DoutputDirectory={tmp}", "-DincludeScope=runtime",
        ]  # fmt: skip
        _say(f"fetching Kafka {KAFKA_VERSION} jars with Maven into {libs} (first run only) ...")
        t0 = time.monotonic()
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=build)
        if proc.returncode != 0 or not (tmp / KAFKA_JAR).exists():
            shutil.rmtree(tmp, ignore_errors=True)
            out = (proc.stdout + proc.stderr).strip().splitlines()[-LOG_TAIL_LINES:]
            raise SystemExit(
                f"ingest stack: `{shlex.join(cmd)}` failed (exit {proc.returncode}):\n" + "\n".join(out)
            )
        (tmp / ".pom.sha256").write_text(pom_hash + "\n")
        if libs.exists():
            old = libs.parent / f".{libs.name}.old-{os.getpid()}"
            libs.rename(old)
            shutil.rmtree(old, ignore_errors=True)
        tmp.rename(libs)
        _say(f"  done in {time.monotonic() - t0:.1f}s")
    return libs


# --------------------------------------------------------------------------- processes


def _proc_state(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return stat.rsplit(")", 1)[1].split()[0]


def _reap(pid: int) -> None:
    popen = _CHILDREN.get(pid)
    if popen is not None:
        popen.poll()
        return
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def _alive(pid: int) -> bool:
    """pid has not finished exiting: a killed JVM's main thread is a zombie while its other threads still unmap
    the heap, and its sockets stay open (the ports busy) until the last of them is gone."""
    _reap(pid)
    state = _proc_state(pid)
    if state is None or state == "X":
        return False
    if state != "Z":
        return True
    try:
        return len(os.listdir(f"/proc/{pid}/task")) > 1
    except OSError:
        return False


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def _is_ours(b: Broker, pid: int) -> bool:
    """pid is alive and is this stack's broker: right binary and our config file."""
    if not _alive(pid):
        return False
    argv = _cmdline(pid)
    marker = b.argv_marker or str(b.config)
    return bool(argv) and Path(argv[0]).name == b.binary and any(a == marker or a.endswith(f"={marker}") for a in argv)


def _read_pid(b: Broker) -> int | None:
    try:
        return int(b.pidfile.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _our_pid(b: Broker) -> int | None:
    pid = _read_pid(b)
    return pid if pid is not None and _is_ours(b, pid) else None


def _clear_pidfiles(b: Broker) -> None:
    for f in (b.pidfile, b.runfile):
        f.unlink(missing_ok=True)


def _listeners(port: int) -> list[tuple[int, str]]:
    """(pid, command line) of processes with a LISTEN socket on `port` (best effort, /proc)."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            if len(cols) > 9 and cols[3] == "0A" and int(cols[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(cols[9])
    found: list[tuple[int, str]] = []
    if not inodes:
        return found
    targets = {f"socket:[{i}]" for i in inodes}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            fds = list((proc / "fd").iterdir())
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(fd) in targets:
                    found.append((int(proc.name), shlex.join(_cmdline(int(proc.name))) or "?"))
                    break
            except OSError:
                continue
    return found


def _port_busy(host: str, port: int) -> bool:
    """Something listens on 127.0.0.1:port, or on any loopback address `host` resolves to."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return True
            raise
    return any(_tcp_open(addr, port, 0.5) for addr in {"127.0.0.1", *_resolve(host)})


def _resolve(host: str) -> set[str]:
    try:
        return {info[4][0] for info in socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)}
    except socket.gaierror:
        return set()


def _is_local(host: str) -> bool:
    addrs = _resolve(host)
    return bool(addrs) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addrs)


def _tcp_open(host: str, port: int, timeout: float) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _foreign_port_message(b: Broker, port: int, what: str) -> str:
    holders = _listeners(port)
    who = "; ".join(f"pid {pid} `{_shorten(cmd)}`" for pid, cmd in holders) or "an unknown process"
    msg = (
        f"port {port} ({what}, {b.env_var}={b.address}) is held by {who}, which this stack did not start. "
        "Stop it, or point KAFKA_BOOTSTRAP_SERVERS/NATS_URL/MQTT_URL elsewhere "
        "(INGEST_STACK_EXTERNAL=1 uses brokers you run yourself, on purpose)."
    )
    if any("/etc/mosquitto" in cmd or "/etc/nats" in cmd for _, cmd in holders):
        svc = "mosquitto" if b.name == "mosquitto" else "nats-server"
        msg += f" It looks like the system service: `systemctl disable --now {svc}`."
    for _, cmd in holders:
        for arg in shlex.split(cmd):
            cfg = Path(arg)
            if cfg.name in {"server.properties", "nats.conf", "mosquitto.conf"} and cfg.parent.name in {
                "kafka",
                "nats",
                "mosquitto",
            }:
                other = cfg.parent.parent
                if other != b.root:
                    msg += f" It belongs to the ingest stack in {other}: `INGEST_STACK_DIR={other} ingest stack down`."
                break
    if b.name == "mosquitto":
        msg += " (A Mosquitto with default settings silently drops queued messages past 1000 per client.)"
    return msg


def _shorten(text: str, limit: int = 140) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


@contextlib.contextmanager
def _flock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _rotate(log: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        if log.stat().st_size > LOG_ROTATE_BYTES:
            log.replace(log.with_name(log.name + ".1"))


def _tail(path: Path, n: int = LOG_TAIL_LINES) -> list[str]:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 64 * 1024))
            return fh.read().decode(errors="replace").splitlines()[-n:]
    except OSError:
        return []


def _say(msg: str = "") -> None:
    print(msg, flush=True)


def _log_banner(b: Broker, text: str) -> None:
    with open(b.logfile, "a") as fh:
        fh.write(f"\n===== {time.strftime('%Y-%m-%dT%H:%M:%S')} ingest stack: {text} =====\n")


def _kafka_format(b: Broker, argv: list[str]) -> None:
    """Format KRaft storage once (first start only)."""
    if (b.data_dir / "meta.properties").exists():
        return
    # Same format as `kafka.tools.StorageTool random-uuid` (base64url of 16 random bytes,
    # never starting with '-'), without paying for another JVM start.
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cluster_id.startswith("-"):
            break
    main = argv.index("kafka.Kafka")
    cmd = [
        *argv[:main],
        "kafka.tools.StorageTool",
        "format",
        "--standalone",
        "-t",
        cluster_id,
        "-c",
        str(b.config),
    ]
    _log_banner(b, f"formatting KRaft storage: {shlex.join(cmd)}")
    with open(b.logfile, "a") as log:
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL).returncode
    if rc != 0:
        raise StackError(f"Kafka storage format (kafka.tools.StorageTool format) failed with exit code {rc}")


def _start(b: Broker) -> int:
    b.dir.mkdir(parents=True, exist_ok=True)
    _rotate(b.logfile)
    argv = b.write_config(b)
    if b.before_start is not None:
        b.before_start(b, argv)
    elif b.name == "kafka":
        _kafka_format(b, argv)
    _log_banner(b, f"starting {shlex.join(argv)}")
    extra = b.popen() if b.popen else {}
    with open(b.logfile, "a") as log:
        proc = subprocess.Popen(
            argv,
            cwd=extra.pop("cwd", b.data_dir),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
            **extra,
        )
    _CHILDREN[proc.pid] = proc
    b.pidfile.write_text(f"{proc.pid}\n")
    b.runfile.write_text(
        json.dumps(
            {
                "pid": proc.pid,
                "address": b.address,
                "ports": sorted(b.ports),
                "argv": argv,
                "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            },
            indent=2,
        )
        + "\n"
    )
    return proc.pid


def _wait_ready(b: Broker, pid: int | None, timeout: float) -> str | None:
    """None when the broker answers a real protocol request, else the reason it does not."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while True:
        if pid is not None and not _alive(pid):
            popen = _CHILDREN.get(pid)
            code = popen.returncode if popen is not None else None
            return f"process {pid} exited" + (f" with code {code}" if code is not None else "")
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return f"did not answer within {timeout:.0f}s ({last})"
        if _tcp_open(b.endpoint.host, b.endpoint.port, min(1.0, remaining)):
            try:
                b.probe(max(1.0, min(5.0, remaining)))
                return None
            except Exception as exc:  # noqa: BLE001 - any failure means "not (yet) answering"
                last = f"{type(exc).__name__}: {exc}".strip()[:200]
        else:
            last = f"nothing listening on {b.endpoint}"
        time.sleep(0.3)


# --------------------------------------------------------------------------- probes


class _Quiet(logging.Logger):
    def __init__(self) -> None:
        super().__init__("ingest_defs.stack.probe", logging.CRITICAL + 1)
        self.addHandler(logging.NullHandler())


def _probe_kafka(bootstrap: str, timeout: float) -> None:
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": bootstrap, "logger": _Quiet(), "log_level": 0})
    md = admin.list_topics(timeout=timeout)
    if not md.brokers:
        raise RuntimeError("metadata without brokers")


def _probe_nats(url: str, timeout: float) -> None:
    import nats

    async def check() -> None:
        async def quiet(*_args: object) -> None:
            return None

        nc = await nats.connect(
            url,
            connect_timeout=timeout,
            allow_reconnect=False,
            max_reconnect_attempts=0,
            error_cb=quiet,
            disconnected_cb=quiet,
            closed_cb=quiet,
        )
        try:
            await nc.jetstream(timeout=timeout).account_info()
        finally:
            await nc.close()

    asyncio.run(asyncio.wait_for(check(), timeout + 1))


def _probe_mqtt(ep: Endpoint, timeout: float, tls: object = None, credentials: tuple[str, str] | None = None) -> None:
    import paho.mqtt.client as mqtt

    client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2,
        client_id=f"ingest-stack-probe-{uuid.uuid4().hex[:12]}",
        protocol=mqtt.MQTTv5,
    )
    client.connect_timeout = timeout
    if tls is not None:
        client.tls_set_context(tls)
    if credentials is not None:
        client.username_pw_set(*credentials)
    done = threading.Event()
    result: dict[str, object] = {}

    def on_connect(_c, _u, _flags, reason_code, _props) -> None:
        result["rc"] = reason_code
        done.set()

    client.on_connect = on_connect
    client.connect(ep.host, ep.port, keepalive=10, clean_start=True)
    client.loop_start()
    try:
        if not done.wait(timeout):
            raise TimeoutError("no CONNACK")
        rc = result["rc"]
        if getattr(rc, "is_failure", False):
            raise RuntimeError(f"CONNACK {rc}")
    finally:
        client.disconnect()
        client.loop_stop()


def _probe_secure_kafka(layout: secure.Layout, timeout: float) -> None:
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({**secure.kafka_admin_config(layout), "logger": _Quiet(), "log_level": 0})
    if not admin.list_topics(timeout=timeout).brokers:
        raise RuntimeError("metadata without brokers")


def _probe_secure_nats(layout: secure.Layout, timeout: float) -> None:
    import ssl

    import nats

    password = secure.load_secrets(layout)["INGEST_SECURE_INGEST_PASSWORD"]

    async def check() -> None:
        async def quiet(*_args: object) -> None:
            return None

        nc = await nats.connect(
            secure.client_env(layout)["INGEST_SECURE_NATS_URL"], user="ingest", password=password,
            tls=ssl.create_default_context(cafile=str(layout.ca)), connect_timeout=timeout,
            allow_reconnect=False, max_reconnect_attempts=0, error_cb=quiet, disconnected_cb=quiet, closed_cb=quiet,
        )
        try:
            await nc.jetstream(timeout=timeout).account_info()
        finally:
            await nc.close()

    # asyncio warns "returning true from eof_received() has no effect when using ssl" on every TLS close.
    quiet_asyncio = logging.getLogger("asyncio")
    level = quiet_asyncio.level
    quiet_asyncio.setLevel(logging.ERROR)
    try:
        asyncio.run(asyncio.wait_for(check(), timeout + 1))
    finally:
        quiet_asyncio.setLevel(level)


def _probe_secure_mqtt(layout: secure.Layout, timeout: float) -> None:
    import ssl

    password = secure.load_secrets(layout)["INGEST_SECURE_INGEST_PASSWORD"]
    _probe_mqtt(Endpoint("127.0.0.1", secure.port("INGEST_SECURE_MQTT_PORT")), timeout,
                tls=ssl.create_default_context(cafile=str(layout.ca)), credentials=("ingest", password))


# --------------------------------------------------------------------------- commands


def _row(b: Broker, pid: int | None, state: str, extra: str = "") -> str:
    pid_s = f"pid {pid}" if pid else "pid -"
    return f"  {b.label:<6} {b.address:<26} {pid_s:<10} {state:<11} {extra}".rstrip()


def _check_answers(
    brokers: list[Broker], pids: dict[str, int | None], timeouts: dict[str, float]
) -> dict[str, str | None]:
    if not brokers:  # every start failed
        return {}
    with ThreadPoolExecutor(max_workers=len(brokers)) as pool:
        futures = {b.name: pool.submit(_wait_ready, b, pids.get(b.name), timeouts[b.name]) for b in brokers}
        return {name: f.result() for name, f in futures.items()}


def _services(prometheus: bool) -> list[Broker]:
    """Optional services beside the brokers: Prometheus (stack/prometheus.py)."""
    return [prometheus_service.service()] if prometheus else []


def up(secure: bool = False, with_s3: bool | None = None, with_postgres: bool = False, brokers: bool = True,
       prometheus: bool = False, cluster: bool = False) -> int:
    """Start (or reuse) Kafka, NATS JetStream and Mosquitto (and the S3 server, PostgreSQL, Prometheus); wait
    until each answers. `with_s3` None: only when the lake is on the stack's S3 server (`s3_wanted`).
    `brokers=False`: only the services. `cluster`: the three Kafka nodes of the cluster (stack/cluster.py)
    instead of the brokers.

    Returns a process exit code (0 = all answer).
    """
    try:
        services = _service_brokers(s3_wanted() if with_s3 is None else with_s3, with_postgres)
        wanted = (_brokers(secure, cluster) if brokers else []) + services + _services(prometheus)
        if external():
            return _up_external(wanted)
        if secure:
            _prepare_secure()
        _prepare_services(services)
        rc = _up_native(wanted)
        if rc == 0 and cluster:
            from ingest_defs.stack import cluster as kafka_cluster

            _say(f"ingest stack: cluster up; clients: KAFKA_BOOTSTRAP_SERVERS={kafka_cluster.bootstrap()}")
        if rc == 0 and secure:
            _say(f"ingest stack: secure stack up; for its addresses, CA, client certificates and passwords: "
                 f"`. {_secure_layout().env_file}` (see the README's security section)")
        return rc
    except (StackError, s3.S3StackError, postgres.PostgresStackError) as exc:
        _say(f"ingest stack: ERROR: {exc}")
        return 1


def _up_external(brokers: list[Broker]) -> int:
    _say("ingest stack: INGEST_STACK_EXTERNAL=1, not starting anything; checking the brokers answer ...")
    results = _check_answers(brokers, {}, {b.name: b.timeout if b.name != "kafka" else 30.0 for b in brokers})
    for b in brokers:
        err = results[b.name]
        _say(_row(b, None, "external", "answers" if err is None else f"NOT ANSWERING: {err}"))
    return 0 if all(e is None for e in results.values()) else 1


def _up_native(brokers: list[Broker]) -> int:
    root = stack_dir()
    problems: list[str] = []
    seen: dict[int, str] = {}
    for b in brokers:
        if not _is_local(b.endpoint.host):
            problems.append(
                f"{b.env_var}={b.address} is not this machine; the native stack binds 127.0.0.1. "
                "Use localhost, or set INGEST_STACK_EXTERNAL=1 to use external brokers."
            )
        for port, what in b.ports.items():
            if port in seen:
                problems.append(f"port {port} is used twice: {seen[port]} and {what}")
            seen[port] = what
    if problems:
        for p in problems:
            _say(f"ingest stack: ERROR: {p}")
        return 1

    root.mkdir(parents=True, exist_ok=True)
    _say(f"ingest stack: {root}")
    t0 = time.monotonic()
    with _flock(root / ".lock"):
        pids: dict[str, int | None] = {}
        states: dict[str, str] = {}
        for b in brokers:
            pid = _our_pid(b)
            if pid is not None:
                run = _read_run(b)
                if run.get("ports") and sorted(run["ports"]) != sorted(b.ports):
                    problems.append(
                        f"{b.label} of this stack (pid {pid}) is running on ports {run['ports']}, "
                        f"but the environment now asks for {sorted(b.ports)}: run `ingest stack down` first."
                    )
                pids[b.name], states[b.name] = pid, "reused"
                continue
            _clear_pidfiles(b)
            for port, what in b.ports.items():
                if _port_busy(b.endpoint.host, port):
                    problems.append(_foreign_port_message(b, port, what))
        if problems:
            for p in problems:
                _say(f"ingest stack: ERROR: {p}")
            return 1

        to_start = [b for b in brokers if b.name not in pids]
        failures: dict[str, str] = {}
        if to_start:
            ensure_system_packages()
            if any(b.binary == "java" for b in to_start):
                ensure_kafka_jars()
            # Quick ones first; Kafka's one-time storage format runs while they boot.
            for b in sorted(to_start, key=lambda x: x.name == "kafka"):
                try:
                    pids[b.name], states[b.name] = _start(b), "started"
                except (StackError, OSError) as exc:
                    pids[b.name], states[b.name] = None, "FAILED"
                    failures[b.name] = str(exc)

        waiting = [b for b in brokers if b.name not in failures]
        results = _check_answers(waiting, pids, {b.name: b.timeout for b in waiting})
        failures.update({k: v for k, v in results.items() if v is not None})
        for b in waiting:
            if b.after_ready is not None and b.name not in failures:
                try:
                    b.after_ready()
                except Exception as exc:  # noqa: BLE001 - reported as this broker's failure
                    failures[b.name] = f"setup after start failed: {type(exc).__name__}: {exc}"[:300]

    for b in brokers:
        if b.name in failures:
            _say(_row(b, pids.get(b.name), "FAILED", failures[b.name]))
        else:
            _say(_row(b, pids.get(b.name), states[b.name], f"log: {b.logfile}"))
    for b in brokers:
        if b.name in failures:
            _say(f"--- last {LOG_TAIL_LINES} lines of {b.logfile} ---")
            for line in _tail(b.logfile):
                _say(f"  {line}")
    if failures:
        _say("ingest stack: up FAILED (`ingest stack down` stops what was started)")
        return 1
    _say(f"ingest stack: up ({time.monotonic() - t0:.1f}s)")
    return 0


def _read_run(b: Broker) -> dict:
    try:
        return json.loads(b.runfile.read_text())
    except (OSError, ValueError):
        return {}


def down(secure: bool | None = None, prometheus: bool = False, only: set[str] | None = None,
         cluster: bool = False) -> int:
    """Stop the brokers this stack started (pidfiles), SIGTERM then SIGKILL after 20 s.

    `secure`: None stops the plain and the secure stack (and the Kafka cluster), True only the secure one,
    False only the plain one. Prometheus stops with the plain stack; `prometheus=True` stops only Prometheus.
    `cluster`: only the Kafka cluster. `only`: just these services (by name: kafka, nats, mosquitto,
    registry, prometheus, s3, postgres)."""
    try:
        if cluster:
            brokers = _brokers(cluster=True)
        else:
            brokers = [] if secure or prometheus else _brokers()
            if secure is not False and not prometheus and _secure_layout().root.exists():
                brokers += _brokers(secure=True)
            if secure is None and not prometheus and (stack_dir() / "cluster").exists():
                brokers += _brokers(cluster=True)
            if not secure and not prometheus:  # the S3 server and PostgreSQL, if this stack ever ran them
                brokers += _service_brokers((stack_dir() / "s3").exists(), (stack_dir() / "postgres").exists())
            if not secure and (stack_dir() / prometheus_service.NAME).exists():
                brokers += _services(prometheus=True)
        if only is not None:
            brokers = [b for b in brokers if b.name in only]
    except StackError as exc:
        _say(f"ingest stack: ERROR: {exc}")
        return 1
    root = stack_dir()
    if not root.exists():
        _say(f"ingest stack: nothing to stop ({root} does not exist)")
        return 0
    rc = 0
    with _flock(root / ".lock"):
        running: dict[str, int] = {}
        for b in brokers:
            pid = _our_pid(b)
            if pid is None:
                stale = _read_pid(b) is not None
                _clear_pidfiles(b)
                _say(_row(b, None, "not running", "(stale pidfile removed)" if stale else ""))
                continue
            b.address = _read_run(b).get("address") or b.address  # what it was started with
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, b.stop_signal)
            running[b.label] = pid
        deadline = time.monotonic() + STOP_TIMEOUT
        while running and time.monotonic() < deadline and any(_alive(p) for p in running.values()):
            time.sleep(0.1)
        for b in brokers:
            pid = running.get(b.label)
            if pid is None:
                continue
            how = "stopped"
            if _alive(pid):
                how = "killed"
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                for _ in range(50):
                    if not _alive(pid):
                        break
                    time.sleep(0.1)
                else:
                    rc = 1
                    how = "STILL RUNNING"
            if how != "STILL RUNNING":
                _clear_pidfiles(b)
            _say(
                _row(
                    b,
                    pid,
                    how,
                    f"(no answer to SIGTERM within {STOP_TIMEOUT:.0f}s)" if how == "killed" else "",
                )
            )
    return rc


def status(secure: bool = False, with_s3: bool | None = None, with_postgres: bool = False, brokers: bool = True,
           prometheus: bool = False, cluster: bool = False) -> int:
    """Print address, pid (if ours) and health of each broker; non-zero if any is not answering."""
    try:
        services = _service_brokers(s3_wanted() if with_s3 is None else with_s3, with_postgres)
        brokers = (_brokers(secure, cluster) if brokers else []) + services + _services(prometheus)
    except StackError as exc:
        _say(f"ingest stack: ERROR: {exc}")
        return 1
    ext = external()
    _say(f"ingest stack: {stack_dir()}" + (" (INGEST_STACK_EXTERNAL=1)" if ext else ""))
    pids = {b.name: _our_pid(b) for b in brokers}
    with ThreadPoolExecutor(max_workers=len(brokers)) as pool:
        futures = {b.name: pool.submit(_health, b) for b in brokers}
        health = {k: f.result() for k, f in futures.items()}
    rc = 0
    for b in brokers:
        pid, err = pids[b.name], health[b.name]
        if err is not None:
            rc = 1
            _say(_row(b, pid, "DOWN", f"not answering: {err}"))
        elif pid is None and not ext:
            rc = 1
            _say(_row(b, None, "FOREIGN", "answers, but was NOT started by this stack (`up` refuses it)"))
        else:
            _say(_row(b, pid, "up", "answers" + ("" if ext else f", log: {b.logfile}")))
    return rc


def _health(b: Broker) -> str | None:
    if not _tcp_open(b.endpoint.host, b.endpoint.port, 1.0):
        return f"nothing listening on {b.endpoint}"
    try:
        b.probe(5.0)
        return None
    except Exception as exc:  # noqa: BLE001
        return f"{type(exc).__name__}: {exc}".strip()[:200]


if __name__ == "__main__":  # pragma: no cover - handy for debugging without the CLI
    cmd = sys.argv[1] if len(sys.argv) > 1 else "status"
    raise SystemExit({"up": up, "down": down, "status": status}[cmd]())

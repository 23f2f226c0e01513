"""`ingest stack` against real processes.

The default stack (default ports, <repo>/.stack) belongs to the rest of the test session
and is never touched here: these tests run a SECOND stack in a temporary INGEST_STACK_DIR on
free ports, sharing only the Kafka jar cache (INGEST_KAFKA_LIBS) so nothing is downloaded.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import nats
import paho.mqtt.client as mqtt
import pytest
from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient, NewTopic
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from ingest_defs.stack import manager, secure

BROKERS = ("kafka", "nats", "mosquitto")
QUEUED_MQTT_MESSAGES = 1500  # > Mosquitto's default max_queued_messages (1000)
RUN_ID = uuid.uuid4().hex[:8]
KAFKA_TOPIC = f"stack-test-{RUN_ID}"
KAFKA_VALUE = f"kafka-{RUN_ID}".encode()
JS_STREAM = f"STACKTEST{RUN_ID}"
MQTT_TOPIC = f"stack-test/{RUN_ID}"
MQTT_PERSISTENT_ID = f"stack-test-persistent-{RUN_ID}"


# --------------------------------------------------------------------------- helpers


def free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def stack_env(stack_dir: Path, kafka: int, controller: int, nats_port: int, mqtt_port: int) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("INGEST_STACK_EXTERNAL", None)
    env.update(
        INGEST_STACK_DIR=str(stack_dir),
        INGEST_KAFKA_LIBS=str(manager.ensure_kafka_jars()),
        KAFKA_BOOTSTRAP_SERVERS=f"localhost:{kafka}",
        KAFKA_CONTROLLER_PORT=str(controller),
        NATS_URL=f"nats://localhost:{nats_port}",
        MQTT_URL=f"mqtt://localhost:{mqtt_port}",
        INGEST_STACK_REGISTRY="0",  # the registry's own stack tests are in test_registry_stack.py
    )
    return env


def run_manager(command: str, env: dict[str, str], timeout: float = 240) -> subprocess.CompletedProcess[str]:
    code = f"from ingest_defs.stack import manager; raise SystemExit(manager.{command}())"
    proc = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        cwd=manager.REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    print(f"$ manager.{command}() -> {proc.returncode}\n{proc.stdout}{proc.stderr}")
    return proc


def read_pids(stack_dir: Path) -> dict[str, int]:
    pids = {}
    for name in BROKERS:
        pidfile = stack_dir / name / f"{name}.pid"
        if pidfile.exists():
            pids[name] = int(pidfile.read_text().split()[0])
    return pids


def wait_gone(pid: int, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while manager._alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not manager._alive(pid)


def port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@dataclass
class Stack:
    dir: Path
    env: dict[str, str]
    kafka: int
    controller: int
    nats: int
    mqtt: int
    first_up: subprocess.CompletedProcess[str]
    first_pids: dict[str, int]

    @property
    def bootstrap(self) -> str:
        return self.env["KAFKA_BOOTSTRAP_SERVERS"]

    @property
    def nats_url(self) -> str:
        return self.env["NATS_URL"]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory):
    stack_dir = tmp_path_factory.mktemp("stack")
    kafka, controller, nats_port, mqtt_port = free_ports(4)
    env = stack_env(stack_dir, kafka, controller, nats_port, mqtt_port)
    try:
        t0 = time.monotonic()
        first = run_manager("up", env)
        print(f"test stack up took {time.monotonic() - t0:.1f}s")
        assert first.returncode == 0, first.stdout + first.stderr
        yield Stack(stack_dir, env, kafka, controller, nats_port, mqtt_port, first, read_pids(stack_dir))
    finally:
        pids = read_pids(stack_dir)
        run_manager("down", env)
        for pid in pids.values():
            assert wait_gone(pid), f"pid {pid} survived `down`"


# --------------------------------------------------------------------------- client helpers


def mqtt_connect(port: int, client_id: str, clean_start: bool, on_message=None) -> mqtt.Client:
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    connected = threading.Event()
    client.on_connect = lambda *_a: connected.set()
    if on_message is not None:
        client.on_message = on_message
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 24 * 3600
    client.connect("localhost", port, keepalive=30, clean_start=clean_start, properties=props)
    client.loop_start()
    assert connected.wait(10), "no CONNACK"
    return client


def mqtt_close(client: mqtt.Client) -> None:
    client.disconnect()
    client.loop_stop()


def kafka_consume_one(bootstrap: str, topic: str, timeout: float = 30) -> bytes:
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"stack-test-{uuid.uuid4().hex}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    try:
        consumer.subscribe([topic])
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            msg = consumer.poll(1.0)
            if msg is not None and msg.error() is None:
                return msg.value()
        raise AssertionError(f"nothing consumed from {topic} within {timeout}s")
    finally:
        consumer.close()


# --------------------------------------------------------------------------- tests


def test_up_starts_all_three_brokers(stack: Stack) -> None:
    out = stack.first_up.stdout
    assert out.count("started") == 3, out
    assert set(stack.first_pids) == set(BROKERS)
    for name, pid in stack.first_pids.items():
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode()
        assert str(stack.dir / name) in cmdline, (name, cmdline)
        assert str(stack.dir / name / f"{name}.log") in out
    # Everything lives under the stack dir.
    assert (stack.dir / "kafka" / "data" / "meta.properties").exists()
    assert (stack.dir / "nats" / "data" / "jetstream").is_dir()
    assert f"listener {stack.mqtt} 127.0.0.1" in (stack.dir / "mosquitto" / "mosquitto.conf").read_text()


def test_kafka_round_trip(stack: Stack) -> None:
    admin = AdminClient({"bootstrap.servers": stack.bootstrap})
    admin.create_topics([NewTopic(KAFKA_TOPIC, num_partitions=1, replication_factor=1)])[KAFKA_TOPIC].result(
        30
    )
    producer = Producer({"bootstrap.servers": stack.bootstrap, "acks": "all", "enable.idempotence": True})
    producer.produce(KAFKA_TOPIC, value=KAFKA_VALUE)
    assert producer.flush(30) == 0
    assert kafka_consume_one(stack.bootstrap, KAFKA_TOPIC) == KAFKA_VALUE


def test_jetstream_round_trip(stack: Stack) -> None:
    async def go() -> bytes:
        nc = await nats.connect(stack.nats_url)
        try:
            js = nc.jetstream()
            await js.add_stream(name=JS_STREAM, subjects=[f"{JS_STREAM}.>"])
            ack = await js.publish(f"{JS_STREAM}.a", b"hello-jetstream")
            assert ack.stream == JS_STREAM
            sub = await js.pull_subscribe(f"{JS_STREAM}.>", durable="stacktest")
            (msg,) = await sub.fetch(1, timeout=10)
            await msg.ack()
            return msg.data
        finally:
            await nc.close()

    assert asyncio.run(go()) == b"hello-jetstream"


def test_mqtt_qos1_round_trip(stack: Stack) -> None:
    got: list[bytes] = []
    received = threading.Event()
    subscribed = threading.Event()

    def on_message(_c, _u, msg) -> None:
        got.append(msg.payload)
        received.set()

    sub = mqtt_connect(stack.mqtt, f"rt-sub-{RUN_ID}", True, on_message)
    sub.on_subscribe = lambda *_a: subscribed.set()
    try:
        sub.subscribe(f"{MQTT_TOPIC}/rt", qos=1)
        assert subscribed.wait(10)
        pub = mqtt_connect(stack.mqtt, f"rt-pub-{RUN_ID}", True)
        try:
            pub.publish(f"{MQTT_TOPIC}/rt", b"hello-mqtt", qos=1).wait_for_publish(10)
        finally:
            mqtt_close(pub)
        assert received.wait(10)
        assert got == [b"hello-mqtt"]
    finally:
        mqtt_close(sub)


def test_up_again_reuses_everything(stack: Stack) -> None:
    again = run_manager("up", stack.env)
    assert again.returncode == 0, again.stdout
    assert again.stdout.count("reused") == 3, again.stdout
    assert "started" not in again.stdout
    assert read_pids(stack.dir) == stack.first_pids


def test_status_reports_answering_brokers(stack: Stack) -> None:
    st = run_manager("status", stack.env)
    assert st.returncode == 0, st.stdout
    assert st.stdout.count("answers") == 3
    for pid in stack.first_pids.values():
        assert f"pid {pid}" in st.stdout


def test_external_mode_only_checks_brokers_answer(stack: Stack, tmp_path: Path) -> None:
    env = {**stack.env, "INGEST_STACK_DIR": str(tmp_path / "ext"), "INGEST_STACK_EXTERNAL": "1"}
    ext = run_manager("up", env)
    assert ext.returncode == 0, ext.stdout
    assert ext.stdout.count("external") >= 3
    assert not (tmp_path / "ext").exists()  # nothing started, nothing written
    assert read_pids(stack.dir) == stack.first_pids


def test_port_held_by_foreign_process_is_an_error(tmp_path: Path) -> None:
    kafka, controller, nats_port = free_ports(3)
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen(1)
        mqtt_port = squatter.getsockname()[1]
        env = stack_env(tmp_path / "stack", kafka, controller, nats_port, mqtt_port)
        res = run_manager("up", env)
    assert res.returncode != 0
    out = res.stdout + res.stderr
    assert f"port {mqtt_port}" in out
    assert "did not start" in out
    assert "MQTT_URL" in out
    assert f"pid {os.getpid()}" in out  # names the process holding the port
    # Checked before starting anything: no broker was started.
    assert read_pids(tmp_path / "stack") == {}
    assert all(port_free(p) for p in (kafka, controller, nats_port))


def test_down_stops_all_processes_and_mosquitto_saves_its_db(stack: Stack) -> None:
    # A persistent (offline) subscriber with more queued messages than Mosquitto's default limit.
    # clean_start=False from the very first connect: Mosquitto 2.0.11 keeps a v5 session that
    # started with clean_start=True (and a session expiry) in memory only; it is not written
    # to mosquitto.db and is gone after a restart.
    subscribed = threading.Event()
    sub = mqtt_connect(stack.mqtt, MQTT_PERSISTENT_ID, clean_start=False)
    sub.on_subscribe = lambda *_a: subscribed.set()
    sub.subscribe(f"{MQTT_TOPIC}/queued", qos=1)
    assert subscribed.wait(10)
    mqtt_close(sub)
    pub = mqtt_connect(stack.mqtt, f"q-pub-{RUN_ID}", True)
    try:
        infos = [
            pub.publish(f"{MQTT_TOPIC}/queued", str(i).encode(), qos=1) for i in range(QUEUED_MQTT_MESSAGES)
        ]
        for info in infos:
            info.wait_for_publish(30)
    finally:
        mqtt_close(pub)

    pids = read_pids(stack.dir)
    assert pids == stack.first_pids
    res = run_manager("down", stack.env)
    assert res.returncode == 0, res.stdout
    for name, pid in pids.items():
        assert wait_gone(pid), f"{name} pid {pid} still running after down"
    assert read_pids(stack.dir) == {}
    for port in (stack.kafka, stack.controller, stack.nats, stack.mqtt):
        assert port_free(port), f"port {port} still in use after down"
    db = stack.dir / "mosquitto" / "data" / "mosquitto.db"
    assert db.exists() and db.stat().st_size > 0, "mosquitto did not save its persistence db"
    st = run_manager("status", stack.env)
    assert st.returncode != 0


def test_up_after_down_keeps_queued_messages_and_data(stack: Stack) -> None:
    res = run_manager("up", stack.env)
    assert res.returncode == 0, res.stdout
    assert res.stdout.count("started") == 3
    new_pids = read_pids(stack.dir)
    assert set(new_pids) == set(BROKERS)
    assert not set(new_pids.values()) & set(stack.first_pids.values())

    # The persistent subscriber gets every queued message back after the restart.
    seen: set[bytes] = set()
    lock = threading.Lock()
    done = threading.Event()

    def on_message(_c, _u, msg) -> None:
        with lock:
            seen.add(msg.payload)
            if len(seen) >= QUEUED_MQTT_MESSAGES:
                done.set()

    sub = mqtt_connect(stack.mqtt, MQTT_PERSISTENT_ID, clean_start=False, on_message=on_message)
    try:
        done.wait(30)
    finally:
        mqtt_close(sub)
    assert len(seen) == QUEUED_MQTT_MESSAGES, f"got {len(seen)} of {QUEUED_MQTT_MESSAGES} queued messages"

    # Kafka and JetStream data survived too.
    assert kafka_consume_one(stack.bootstrap, KAFKA_TOPIC) == KAFKA_VALUE

    async def stream_messages() -> int:
        nc = await nats.connect(stack.nats_url)
        try:
            return (await nc.jetstream().stream_info(JS_STREAM)).state.messages
        finally:
            await nc.close()

    assert asyncio.run(stream_messages()) == 1


def test_native_mosquitto_config_is_the_shared_file_plus_overrides(tmp_path: Path) -> None:
    shared = manager.MOSQUITTO_CONF.read_text().splitlines()
    native = manager.mosquitto_native_config(12345, tmp_path, run_as_root=True).splitlines()
    for line in shared:
        words = line.split()
        if words and not words[0].startswith("#") and words[0] in manager.MOSQUITTO_NATIVE_OVERRIDES:
            assert line not in native
        else:
            assert line in native
    settings = [ln for ln in native if ln.strip() and not ln.lstrip().startswith("#")]
    keys = [ln.split()[0] for ln in settings]
    for once in ("listener", "persistence_location", "user"):
        assert keys.count(once) == 1, once
    assert "listener 12345 127.0.0.1" in settings
    assert f"persistence_location {tmp_path}/" in settings
    assert "user root" in settings
    non_root = manager.mosquitto_native_config(1, tmp_path, run_as_root=False).splitlines()
    assert not [ln for ln in non_root if ln.split()[:1] == ["user"]]


def test_shared_mosquitto_config_never_drops_queued_messages() -> None:
    conf = {}
    for line in manager.MOSQUITTO_CONF.read_text().splitlines():
        words = line.split(None, 1)
        if words and not words[0].startswith("#"):
            conf.setdefault(words[0], words[1] if len(words) > 1 else "")
    assert conf["persistence"] == "true"
    assert conf["max_queued_messages"] == "0"  # default 1000 silently drops
    assert 0 < int(conf["max_queued_bytes"]) <= 4 * 1024**3  # but memory stays bounded
    assert conf["max_inflight_messages"] in {"0", "65535"}
    assert conf["autosave_on_changes"] == "false"  # per-change autosave rewrites the whole db
    assert conf["allow_anonymous"] == "true"
    assert conf["persistent_client_expiration"].endswith(("d", "w", "m", "y"))
    # QoS 0 publishes reach the QoS 1 subscriptions at QoS 1: queued inside max_queued_bytes, redelivered
    assert conf["upgrade_outgoing_qos"] == "true"
    assert conf.get("queue_qos0_messages", "false") == "false"  # unbounded in 2.0.11 (see the config file)


def test_addresses_follow_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:29092,other:1")
    monkeypatch.setenv("NATS_URL", "nats://localhost:24222")
    monkeypatch.setenv("MQTT_URL", "mqtt://localhost:21883")
    monkeypatch.delenv("KAFKA_CONTROLLER_PORT", raising=False)
    assert manager.addresses() == {
        "kafka": "127.0.0.1:29092",
        "nats": "nats://localhost:24222",
        "mqtt": "mqtt://localhost:21883",
        "mqtt_host": "localhost",
        "mqtt_port": "21883",
    }
    assert manager.kafka_controller_port() == 29093
    monkeypatch.setenv("KAFKA_CONTROLLER_PORT", "29999")
    assert manager.kafka_controller_port() == 29999
    for var in ("KAFKA_BOOTSTRAP_SERVERS", "NATS_URL", "MQTT_URL"):
        monkeypatch.delenv(var)
    assert manager.addresses()["kafka"] == "localhost:9092"
    assert manager.addresses()["nats"] == "nats://localhost:4222"
    assert manager.addresses()["mqtt_port"] == "1883"


def test_secure_stack_ports_default_apart_from_the_plain_stack(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("KAFKA_BOOTSTRAP_SERVERS", "KAFKA_CONTROLLER_PORT", "NATS_URL", "MQTT_URL", *secure.DEFAULT_PORTS):
        monkeypatch.delenv(var, raising=False)
    plain = {p for b in manager._brokers() for p in b.ports}
    secured = [p for b in manager._brokers(secure=True) for p in b.ports]
    assert len(secured) == len(set(secured)) == 6
    assert not plain & set(secured)
    monkeypatch.setenv("INGEST_SECURE_NATS_PORT", "not-a-port")
    assert manager.up(secure=True) == 1  # a clear one-line error, nothing started


def test_stack_dir_defaults_to_repo_dot_stack(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("INGEST_STACK_DIR", raising=False)
    assert manager.stack_dir() == (manager.REPO_ROOT / ".stack").resolve()
    assert (manager.REPO_ROOT / "ingest_defs").is_dir()
    monkeypatch.setenv("INGEST_STACK_DIR", str(tmp_path))
    assert manager.stack_dir() == tmp_path.resolve()
    with contextlib.suppress(FileNotFoundError):
        gitignore = (manager.REPO_ROOT / ".gitignore").read_text()
        assert "/.stack/" in gitignore.split()


def test_down_never_signals_a_process_it_did_not_start(tmp_path: Path) -> None:
    # Pidfiles pointing at a live process that is not this stack's broker (e.g. a reused pid).
    stranger = subprocess.Popen(["sleep", "60"])
    try:
        env = stack_env(tmp_path / "stack", *free_ports(4))
        for name in BROKERS:
            (tmp_path / "stack" / name).mkdir(parents=True)
            (tmp_path / "stack" / name / f"{name}.pid").write_text(f"{stranger.pid}\n")
        res = run_manager("down", env)
        assert res.returncode == 0, res.stdout
        time.sleep(0.2)
        assert stranger.poll() is None, "down signalled a process it did not start"
        assert read_pids(tmp_path / "stack") == {}  # stale pidfiles are cleaned up
        st = run_manager("status", env)
        assert st.returncode != 0
        assert f"pid {stranger.pid}" not in st.stdout
    finally:
        stranger.kill()
        stranger.wait()


# The main thread leaves with the exit syscall (not exit_group): the process's leader is a zombie while another
# thread still holds a listening socket, as a SIGKILLed JVM's is while its other threads unmap the heap.
_LEADER_EXITS_FIRST = """
import ctypes, os, platform, socket, sys, threading, time
server = socket.socket()
server.bind(("127.0.0.1", 0))
server.listen()
print(server.getsockname()[1], flush=True)
def last_thread():
    while not os.path.exists(sys.argv[1]):
        time.sleep(0.01)
    os._exit(0)
threading.Thread(target=last_thread).start()
ctypes.CDLL(None).syscall({"x86_64": 60, "aarch64": 93}[platform.machine()], 0)
"""


@pytest.mark.skipif(os.uname().machine not in {"x86_64", "aarch64"}, reason="the exit syscall's number")
def test_a_process_whose_leader_is_a_zombie_is_alive_until_its_last_thread_exits(tmp_path: Path) -> None:
    release = tmp_path / "release"
    child = subprocess.Popen([sys.executable, "-c", _LEADER_EXITS_FIRST, str(release)], stdout=subprocess.PIPE, text=True)
    try:
        port = int(child.stdout.readline())
        deadline = time.monotonic() + 10
        while manager._proc_state(child.pid) != "Z" and time.monotonic() < deadline:
            time.sleep(0.01)
        assert manager._proc_state(child.pid) == "Z"
        assert manager._port_busy("127.0.0.1", port)
        assert manager._alive(child.pid), "a zombie leader was taken for a dead process while its socket is open"
        release.write_text("")
        deadline = time.monotonic() + 10
        while manager._alive(child.pid) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not manager._alive(child.pid)
        assert not manager._port_busy("127.0.0.1", port)  # what a restart on the same port needs
    finally:
        release.write_text("")
        child.kill()
        child.wait()
        child.stdout.close()


def test_broker_that_fails_to_start_shows_its_log_and_fails(tmp_path: Path) -> None:
    broken_libs = tmp_path / "libs"
    broken_libs.mkdir()
    (broken_libs / manager.KAFKA_JAR).write_bytes(b"")  # "cached", but no Kafka classes in it
    env = {**stack_env(tmp_path / "stack", *free_ports(4)), "INGEST_KAFKA_LIBS": str(broken_libs)}
    try:
        res = run_manager("up", env)
        assert res.returncode != 0
        assert "FAILED" in res.stdout
        assert (
            f"last {manager.LOG_TAIL_LINES} lines of {tmp_path / 'stack' / 'kafka' / 'kafka.log'}"
            in res.stdout
        )
        assert "kafka.tools.StorageTool" in res.stdout  # the tail shows Java's complaint
    finally:
        pids = read_pids(tmp_path / "stack")
        run_manager("down", env)
        assert all(wait_gone(pid) for pid in pids.values())

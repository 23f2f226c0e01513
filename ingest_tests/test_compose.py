"""docker-compose.yml cannot run here (no Docker engine); check its structure instead."""

from __future__ import annotations

import pytest
import yaml

from ingest_defs.stack import manager

REPO = manager.REPO_ROOT
COMPOSE = REPO / "docker-compose.yml"


@pytest.fixture(scope="module")
def services() -> dict:
    return yaml.safe_load(COMPOSE.read_text())["services"]


def published(service: dict) -> dict[int, int]:
    """host port -> container port for the short `ports:` syntax ([ip:]host:container)."""
    out = {}
    for spec in service.get("ports", []):
        parts = str(spec).split("/")[0].split(":")
        out[int(parts[-2])] = int(parts[-1])
    return out


def mounts(service: dict) -> dict[str, str]:
    """container path -> source for the short `volumes:` syntax."""
    out = {}
    for spec in service.get("volumes", []):
        src, dst, *_ = str(spec).split(":")
        out[dst] = src
    return out


def test_all_services_exist(services: dict) -> None:
    assert {"kafka", "nats", "mosquitto", "postgres", "dagster-webserver", "dagster-daemon"} <= set(services)


def test_broker_images_and_ports(services: dict) -> None:
    assert services["kafka"]["image"].startswith("apache/kafka:4.")
    assert services["nats"]["image"].startswith("nats:")
    assert services["mosquitto"]["image"] == "eclipse-mosquitto:2"
    assert 9092 in published(services["kafka"])
    assert published(services["nats"]) == {4222: 4222}
    assert published(services["mosquitto"]) == {1883: 1883}
    assert 3000 in published(services["dagster-webserver"])


def test_kafka_is_single_node_kraft_like_the_native_stack(services: dict) -> None:
    env = services["kafka"]["environment"]
    assert env["KAFKA_PROCESS_ROLES"] == "broker,controller"
    for key in (
        "KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR",
        "KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR",
        "KAFKA_TRANSACTION_STATE_LOG_MIN_ISR",
        "KAFKA_SHARE_COORDINATOR_STATE_TOPIC_REPLICATION_FACTOR",
    ):
        assert int(env[key]) == 1, key
    # Containers reach it as kafka:9092, the host as localhost:9092.
    advertised = env["KAFKA_ADVERTISED_LISTENERS"]
    assert "//kafka:9092" in advertised and "//localhost:9092" in advertised
    host_listener = next(p for p in advertised.split(",") if p.endswith("//localhost:9092"))
    name = host_listener.split(":")[0]
    container_port = published(services["kafka"])[9092]
    assert f"{name}://:{container_port}" in env["KAFKA_LISTENERS"]
    assert "/var/lib/kafka/data" in mounts(services["kafka"])


def test_nats_has_jetstream_on_a_volume(services: dict) -> None:
    cmd = services["nats"]["command"]
    assert "-js" in cmd
    store = cmd[cmd.index("-sd") + 1]
    assert store in mounts(services["nats"])


def test_mosquitto_mounts_the_same_config_as_the_native_stack(services: dict) -> None:
    m = mounts(services["mosquitto"])
    main_config = "/mosquitto/config/mosquitto.conf"
    assert main_config in m
    assert (REPO / m[main_config]).resolve() == manager.MOSQUITTO_CONF.resolve()
    # The image's default command loads exactly that file.
    assert "command" not in services["mosquitto"] or main_config in " ".join(services["mosquitto"]["command"])
    # Its container-specific lines fit the compose service: listener 1883, data on a volume.
    settings = [
        ln.split() for ln in manager.MOSQUITTO_CONF.read_text().splitlines() if ln.strip() and ln[0] != "#"
    ]
    assert ["listener", "1883"] in settings
    (location,) = [s[1] for s in settings if s[0] == "persistence_location"]
    assert location.rstrip("/") in m
    assert not [s for s in settings if s[0] == "user"]  # container keeps the image's `mosquitto` user


def test_dagster_services_use_the_compose_brokers_and_postgres(services: dict) -> None:
    for name in ("dagster-webserver", "dagster-daemon"):
        svc = services[name]
        env = svc["environment"]
        assert env["KAFKA_BOOTSTRAP_SERVERS"] == "kafka:9092"
        assert env["NATS_URL"] == "nats://nats:4222"
        assert env["MQTT_URL"] == "mqtt://mosquitto:1883"
        assert env["INGEST_STACK_EXTERNAL"] == "1"
        assert env["DAGSTER_POSTGRES_HOSTNAME"] == "postgres"
        assert svc["build"]["context"] == "."
        assert (REPO / svc["build"]["dockerfile"]).is_file()
        assert set(svc["depends_on"]) >= {"postgres", "kafka", "nats", "mosquitto"}
        assert "/app/workspace.yaml" in svc["command"]
    assert services["dagster-webserver"]["command"][0] == "dagster-webserver"
    assert services["dagster-daemon"]["command"][:2] == ["dagster-daemon", "run"]


def test_dockerfile_installs_locked_deps_and_postgres_dagster_yaml() -> None:
    dockerfile = (REPO / "Dockerfile").read_text()
    assert "uv sync --frozen" in dockerfile
    assert "COPY deploy/dagster.postgres.yaml /opt/dagster/dagster_home/dagster.yaml" in dockerfile
    assert "DAGSTER_HOME=/opt/dagster/dagster_home" in dockerfile
    dagster_yaml = yaml.safe_load((REPO / "deploy" / "dagster.postgres.yaml").read_text())
    db = dagster_yaml["storage"]["postgres"]["postgres_db"]
    assert db["hostname"] == {"env": "DAGSTER_POSTGRES_HOSTNAME"}
    # dagster-postgres must be locked, matching the locked dagster (1.x.y <-> 0.(x+16).y).
    lock = (REPO / "uv.lock").read_text()
    version = lock.split('name = "dagster"\nversion = "', 1)[1].split('"', 1)[0]
    major, minor, patch = version.split(".")
    assert f'name = "dagster-postgres"\nversion = "0.{int(minor) + 16}.{patch}"' in lock


def test_workspace_loads_the_definitions_module() -> None:
    workspace = yaml.safe_load((REPO / "workspace.yaml").read_text())
    modules = [entry["python_module"]["module_name"] for entry in workspace["load_from"]]
    assert modules == ["ingest_defs.definitions"]


def test_dagster_postgres_yaml_matches_embedded_defaults_except_storage() -> None:
    embedded = REPO / "dagster_home" / "dagster.yaml"
    if not embedded.exists():
        pytest.fail("dagster_home/dagster.yaml is missing")
    ours = yaml.safe_load((REPO / "deploy" / "dagster.postgres.yaml").read_text())
    theirs = yaml.safe_load(embedded.read_text()) or {}
    ours.pop("storage")
    theirs.pop("storage", None)
    assert ours == theirs, "deploy/dagster.postgres.yaml drifted from dagster_home/dagster.yaml"


def test_schema_registry_matches_the_native_stack(services: dict) -> None:
    from ingest_defs.stack import registry

    svc = services["schema-registry"]
    assert svc["image"] == f"apicurio/apicurio-registry:{registry.APICURIO_VERSION}"
    assert published(svc) == {8081: 8080}  # the native stack's default SCHEMA_REGISTRY_URL port
    env = svc["environment"]
    assert env["APICURIO_RULES_GLOBAL_COMPATIBILITY"] == registry.SETTINGS["apicurio.rules.global.compatibility"]
    assert env["APICURIO_STORAGE_KIND"] == "sql" and env["APICURIO_DATASOURCE_URL"].startswith("jdbc:h2:file:")
    data_dir = env["APICURIO_DATASOURCE_URL"].removeprefix("jdbc:h2:file:").rsplit("/", 1)[0]
    assert data_dir in mounts(svc)  # the H2 file lives on a volume: schemas survive restarts
    assert env["QUARKUS_HTTP_ACCESS_LOG_ENABLED"] == "false"
    for name in ("dagster-webserver", "dagster-daemon"):
        dagster = services[name]
        assert dagster["environment"]["SCHEMA_REGISTRY_URL"] == "http://schema-registry:8080/apis/ccompat/v7"
        assert "schema-registry" in dagster["depends_on"]


"""`ingest stack up --secure`: the three brokers with authentication, authorization and TLS on.

Everything lives under ``<stack dir>/secure/`` (its own pidfiles, so the plain and secure stacks run side
by side and `ingest stack down` stops both)::

    secure/
      tls/        ca.pem ca.key  server.pem server.key  kafka-broker.p12
                  client-ingest.pem/.key  client-intruder.pem/.key  client-admin.pem/.key
      nkeys/      ingest.nk: the NKey seed of NATS user `ingest` (mode 600)
      secrets.env the generated passwords (mode 600), as `export NAME=value` lines
      env.sh      everything a client needs: addresses, CA and client-certificate paths, `. secrets.env`
      kafka/ nats/ mosquitto/   configs, logs, pidfiles, data (as in the plain stack)

Users (the same on every broker): ``ingest`` may read and write everything; ``intruder`` authenticates but
is allowed nothing the pipelines use (Kafka: no ACLs; NATS: only ``other.>``; Mosquitto: only ``other/#``,
through the dynamic-security plugin, which answers a denied SUBSCRIBE with 0x87).
``admin`` (Kafka super user, by client certificate) sets up SCRAM credentials and ACLs.

Listeners (ports from the environment; defaults never collide with the plain stack's):

=========================  ==================================  ================================
variable                   default                             what
=========================  ==================================  ================================
INGEST_SECURE_KAFKA_PORT        9192  Kafka SASL_SSL, SCRAM-SHA-512 and PLAIN
INGEST_SECURE_KAFKA_MTLS_PORT   9193  Kafka SSL requiring a client certificate (principal = CN)
INGEST_SECURE_KAFKA_CONTROLLER_PORT 9194  KRaft controller, SSL with client certificates
INGEST_SECURE_NATS_PORT         4322  NATS, TLS + user/password or NKey, per-user permissions
INGEST_SECURE_MQTT_PORT         8883  MQTT over TLS + username/password (dynamic-security plugin)
INGEST_SECURE_MQTT_MTLS_PORT    8884  MQTT over TLS requiring a client certificate (user = CN)
=========================  ==================================  ================================

Certificates are made with the ``openssl`` command (no Python dependency), once, valid 10 years, for
``localhost`` and ``127.0.0.1``. Passwords are random, made once and kept in ``secrets.env``; they never
appear on a command line or in a log (Mosquitto's are stored PBKDF2-hashed in its dynamic-security file;
Kafka's SCRAM credentials are created through the admin API over mTLS).
"""

from __future__ import annotations

import os
import secrets
import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path

CLIENTS = ("ingest", "intruder", "admin")
USERS = ("ingest", "intruder")  # password users (admin authenticates by certificate only)
DEFAULT_PORTS = {
    "INGEST_SECURE_KAFKA_PORT": 9192,
    "INGEST_SECURE_KAFKA_MTLS_PORT": 9193,
    "INGEST_SECURE_KAFKA_CONTROLLER_PORT": 9194,
    "INGEST_SECURE_NATS_PORT": 4322,
    "INGEST_SECURE_MQTT_PORT": 8883,
    "INGEST_SECURE_MQTT_MTLS_PORT": 8884,
}
CERT_DAYS = 3650


class SecureStackError(Exception):
    pass


def port(name: str) -> int:
    value = os.environ.get(name)
    if not value:
        return DEFAULT_PORTS[name]
    try:
        return int(value)
    except ValueError as exc:
        raise SecureStackError(f"{name}={value!r} is not a port number") from exc


@dataclass(frozen=True)
class Layout:
    """Paths of the secure stack's shared files."""

    root: Path  # <stack dir>/secure

    @property
    def tls(self) -> Path:
        return self.root / "tls"

    @property
    def ca(self) -> Path:
        return self.tls / "ca.pem"

    @property
    def server_cert(self) -> Path:
        return self.tls / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.tls / "server.key"

    @property
    def kafka_keystore(self) -> Path:
        return self.tls / "kafka-broker.p12"

    def client_cert(self, user: str) -> Path:
        return self.tls / f"client-{user}.pem"

    def client_key(self, user: str) -> Path:
        return self.tls / f"client-{user}.key"

    def nkey_seed(self, user: str) -> Path:
        return self.root / "nkeys" / f"{user}.nk"

    @property
    def secrets_file(self) -> Path:
        return self.root / "secrets.env"

    @property
    def env_file(self) -> Path:
        return self.root / "env.sh"


# ---------------------------------------------------------------- secrets
def secret_names() -> dict[str, str]:
    """Environment variable → what it holds."""
    return {
        "INGEST_SECURE_INGEST_PASSWORD": "password of user 'ingest' (Kafka SCRAM/PLAIN, NATS, MQTT)",
        "INGEST_SECURE_INTRUDER_PASSWORD": "password of user 'intruder' (authenticates, allowed nothing)",
        "INGEST_SECURE_KEYSTORE_PASSWORD": "password of Kafka's PKCS12 keystore (broker side only)",
    }


def load_secrets(layout: Layout, create: bool = False) -> dict[str, str]:
    """The stack's passwords from secrets.env (made once, when `create`)."""
    values: dict[str, str] = {}
    if layout.secrets_file.exists():
        for line in layout.secrets_file.read_text().splitlines():
            words = shlex.split(line) if line.startswith("export ") else []
            if len(words) == 2 and words[0] == "export" and "=" in words[1]:
                name, _, value = words[1].partition("=")
                values[name] = value
    missing = [n for n in secret_names() if n not in values]
    if missing and create:
        for name in missing:
            values[name] = secrets.token_urlsafe(24)
        layout.root.mkdir(parents=True, exist_ok=True)
        tmp = layout.secrets_file.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write("# Generated by `ingest stack up --secure`: the secure stack's passwords. Keep private.\n")
            for name, what in secret_names().items():
                fh.write(f"# {what}\nexport {name}={shlex.quote(values[name])}\n")
        tmp.replace(layout.secrets_file)
    elif missing:
        raise SecureStackError(f"{layout.secrets_file} lacks {', '.join(missing)}: run `ingest stack up --secure`")
    return values


# ---------------------------------------------------------------- certificates (openssl CLI)
def _openssl(*args: str, env: dict[str, str] | None = None) -> None:
    proc = subprocess.run(["openssl", *args], capture_output=True, text=True, env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        raise SecureStackError(f"`openssl {args[0]}` failed: {proc.stderr.strip()[-400:]}")


def make_ca(directory: Path, name: str = "ingest-stack CA") -> tuple[Path, Path]:
    """A self-signed CA (certificate, key) in `directory`; tests make a second one to show an unknown CA."""
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / "ca.pem", directory / "ca.key"
    if not cert.exists():
        _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                 "-days", str(CERT_DAYS), "-subj", f"/CN={name}",
                 "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
        key.chmod(0o600)
    return cert, key


def issue(ca: tuple[Path, Path], cert: Path, key: Path, cn: str, server: bool) -> None:
    """A certificate for `cn` signed by `ca` (server: for localhost/127.0.0.1; else a client certificate)."""
    if cert.exists() and key.exists():
        return
    csr = cert.with_suffix(".csr")
    ext = cert.with_suffix(".ext")
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={cn}")
    key.chmod(0o600)
    usage = ("subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n" if server
             else "extendedKeyUsage=clientAuth\n")
    ext.write_text("basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n" + usage)
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca[0]), "-CAkey", str(ca[1]), "-CAcreateserial",
             "-out", str(cert), "-days", str(CERT_DAYS), "-sha256", "-extfile", str(ext))
    csr.unlink(missing_ok=True)
    ext.unlink(missing_ok=True)


def ensure_nkey(layout: Layout, user: str = "ingest") -> str:
    """An NKey user's seed file (mode 600, made once); returns its public key (U...) for nats.conf."""
    import nkeys

    path = layout.nkey_seed(user)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER))
    return nkeys.from_seed(bytearray(path.read_bytes().strip())).public_key.decode()


def ensure_tls(layout: Layout, keystore_password: str) -> None:
    """CA, server certificate (+ Kafka's PKCS12 keystore) and one client certificate per user (made once)."""
    ca = make_ca(layout.tls)
    issue(ca, layout.server_cert, layout.server_key, "broker", server=True)
    for user in CLIENTS:
        issue(ca, layout.client_cert(user), layout.client_key(user), user, server=False)
    if not layout.kafka_keystore.exists():
        # The password goes through the environment, not argv.
        _openssl("pkcs12", "-export", "-in", str(layout.server_cert), "-inkey", str(layout.server_key),
                 "-name", "broker", "-out", str(layout.kafka_keystore), "-passout", "env:INGEST_KEYSTORE_PW",
                 env={"INGEST_KEYSTORE_PW": keystore_password})
        layout.kafka_keystore.chmod(0o600)


# ---------------------------------------------------------------- broker configs
def kafka_properties(layout: Layout, data_dir: Path, passwords: dict[str, str]) -> str:
    sasl, mtls, ctrl = (port("INGEST_SECURE_KAFKA_PORT"), port("INGEST_SECURE_KAFKA_MTLS_PORT"),
                        port("INGEST_SECURE_KAFKA_CONTROLLER_PORT"))
    from ingest_defs.stack.manager import KAFKA_SINGLE_NODE  # manager imports this module

    plain_users = " ".join(f'user_{u}="{passwords[_password_var(u)]}"' for u in USERS)
    return (
        "# Generated by ingest_defs.stack.secure on every `ingest stack up --secure`; edits are lost.\n"
        "process.roles=broker,controller\n"
        "node.id=1\n"
        f"controller.quorum.bootstrap.servers=127.0.0.1:{ctrl}\n"
        f"listeners=SASL_SSL://127.0.0.1:{sasl},MTLS://127.0.0.1:{mtls},CONTROLLER://127.0.0.1:{ctrl}\n"
        f"advertised.listeners=SASL_SSL://127.0.0.1:{sasl},MTLS://127.0.0.1:{mtls}\n"
        "controller.listener.names=CONTROLLER\n"
        "inter.broker.listener.name=MTLS\n"
        "listener.security.protocol.map=SASL_SSL:SASL_SSL,MTLS:SSL,CONTROLLER:SSL\n"
        "sasl.enabled.mechanisms=SCRAM-SHA-512,PLAIN\n"
        "listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config="
        "org.apache.kafka.common.security.scram.ScramLoginModule required;\n"
        "listener.name.sasl_ssl.plain.sasl.jaas.config="
        f"org.apache.kafka.common.security.plain.PlainLoginModule required {plain_users};\n"
        "ssl.keystore.type=PKCS12\n"
        f"ssl.keystore.location={layout.kafka_keystore}\n"
        f"ssl.keystore.password={passwords['INGEST_SECURE_KEYSTORE_PASSWORD']}\n"
        "ssl.truststore.type=PEM\n"
        f"ssl.truststore.location={layout.ca}\n"
        "listener.name.mtls.ssl.client.auth=required\n"
        "listener.name.controller.ssl.client.auth=required\n"
        # Certificate principal = its CN (User:broker, User:ingest, ...), the same names as the SASL users.
        "ssl.principal.mapping.rules=RULE:^CN=([^,]+)$/$1/,DEFAULT\n"
        "authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer\n"
        "super.users=User:broker;User:admin\n"
        "allow.everyone.if.no.acl.found=false\n"
        f"log.dirs={data_dir}\n"
        + KAFKA_SINGLE_NODE
        + "auto.create.topics.enable=false\n"
        "delete.topic.enable=true\n"
    )


def _password_var(user: str) -> str:
    return f"INGEST_SECURE_{user.upper()}_PASSWORD"


def nats_conf(layout: Layout, data_dir: Path, passwords: dict[str, str]) -> str:
    import json

    ingest, intruder = (json.dumps(passwords[_password_var(u)]) for u in USERS)
    return (
        "# Generated by ingest_defs.stack.secure on every `ingest stack up --secure`; edits are lost.\n"
        "server_name: ingest-secure\n"
        f'listen: "127.0.0.1:{port("INGEST_SECURE_NATS_PORT")}"\n'
        "tls {\n"
        f"  cert_file: {json.dumps(str(layout.server_cert))}\n"
        f"  key_file: {json.dumps(str(layout.server_key))}\n"
        f"  ca_file: {json.dumps(str(layout.ca))}\n"
        "  timeout: 5\n"
        "}\n"
        "authorization {\n"
        "  users = [\n"
        f"    {{user: ingest, password: {ingest}, permissions: {{publish: \">\", subscribe: \">\"}}}}\n"
        f"    {{nkey: {ensure_nkey(layout)}, permissions: {{publish: \">\", subscribe: \">\"}}}}\n"
        f"    {{user: intruder, password: {intruder}, permissions: {{\n"
        '      publish: {allow: ["other.>"]}, subscribe: {allow: ["other.>", "_INBOX.>"]}}}\n'
        "  ]\n"
        "}\n"
        "jetstream {\n"
        f"  store_dir: {json.dumps(str(data_dir))}\n"
        "}\n"
    )


def mosquitto_conf(layout: Layout, base: str) -> str:
    """The plain stack's config (persistence, limits, logging) plus two TLS listeners with auth and ACLs.

    Authentication and ACLs come from the dynamic-security plugin, not `password_file`/`acl_file`: with an
    acl_file Mosquitto grants every subscription and silently delivers nothing (mosquitto#2042), while the
    plugin answers a denied SUBSCRIBE with reason 0x87, which the source turns into a failed run."""
    kept = [line for line in base.splitlines()
            if not line.split()[:1] or line.split()[0] not in {"listener", "allow_anonymous"}]
    tls = [f"cafile {layout.ca}", f"certfile {layout.server_cert}", f"keyfile {layout.server_key}",
           "tls_version tlsv1.2"]
    return "\n".join([
        *kept,
        "",
        "# --- secure stack (ingest_defs.stack.secure) ---",
        f"plugin {dynsec_plugin()}",
        f"plugin_opt_config_file {layout.root / 'mosquitto' / 'dynamic-security.json'}",
        "allow_anonymous false",
        f"listener {port('INGEST_SECURE_MQTT_PORT')} 127.0.0.1",
        *tls,
        "require_certificate false",
        f"listener {port('INGEST_SECURE_MQTT_MTLS_PORT')} 127.0.0.1",
        *tls,
        "require_certificate true",
        "use_identity_as_username true",  # the certificate's CN is the user; its ACLs apply
        "",
    ])


def dynsec_plugin() -> str:
    import glob

    found = sorted(glob.glob("/usr/lib/*/mosquitto_dynamic_security.so") + glob.glob("/usr/lib/mosquitto_dynamic_security.so"))
    if not found:
        raise SecureStackError("mosquitto_dynamic_security.so not found (it ships with Debian's mosquitto package)")
    return found[0]


def _dynsec_password(password: str) -> dict[str, object]:
    """The plugin's stored form: PBKDF2-HMAC-SHA512, 64 bytes, base64 (as `mosquitto_ctrl` writes it)."""
    import base64
    import hashlib

    salt = os.urandom(12)
    iterations = 101
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations, 64)
    return {"password": base64.b64encode(digest).decode(), "salt": base64.b64encode(salt).decode(),
            "iterations": iterations}


def write_mosquitto_auth(layout: Layout, passwords: dict[str, str]) -> None:
    """The dynamic-security file: users `ingest` (everything) and `intruder` (only other/#), deny by default."""
    import json

    directory = layout.root / "mosquitto"
    directory.mkdir(parents=True, exist_ok=True)

    def acls(topic: str) -> list[dict[str, object]]:
        return [{"acltype": kind, "topic": topic, "priority": 0, "allow": True}
                for kind in ("publishClientSend", "publishClientReceive", "subscribePattern", "unsubscribePattern")]

    doc = {
        "defaultACLAccess": {"publishClientSend": False, "publishClientReceive": False, "subscribe": False,
                             "unsubscribe": True},
        # A certificate user (use_identity_as_username) is the client of the same name: same role, same ACLs.
        "clients": [{"username": user, "textname": user, "roles": [{"rolename": user}],
                     **_dynsec_password(passwords[_password_var(user)])} for user in USERS],
        "groups": [],
        "roles": [{"rolename": "ingest", "acls": acls("#")}, {"rolename": "intruder", "acls": acls("other/#")}],
    }
    path = directory / "dynamic-security.json"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(doc, fh, indent=2)


def kafka_admin_config(layout: Layout, user: str = "admin") -> dict[str, str]:
    """librdkafka settings for a client-certificate connection to the mTLS listener."""
    return {"bootstrap.servers": f"127.0.0.1:{port('INGEST_SECURE_KAFKA_MTLS_PORT')}",
            "security.protocol": "SSL", "ssl.ca.location": str(layout.ca),
            "ssl.certificate.location": str(layout.client_cert(user)),
            "ssl.key.location": str(layout.client_key(user))}


def kafka_setup(layout: Layout, passwords: dict[str, str], timeout: float = 30.0) -> None:
    """SCRAM-SHA-512 credentials for the password users and ACLs for `ingest` (idempotent; as admin)."""
    from confluent_kafka.admin import (
        AclBinding,
        AclOperation,
        AclPermissionType,
        AdminClient,
        ResourcePatternType,
        ResourceType,
        ScramCredentialInfo,
        ScramMechanism,
        UserScramCredentialUpsertion,
    )

    admin = AdminClient({**kafka_admin_config(layout), "log_level": 0})
    upserts = [UserScramCredentialUpsertion(user, ScramCredentialInfo(ScramMechanism.SCRAM_SHA_512, 8192),
                                            passwords[_password_var(user)].encode()) for user in USERS]
    for future in admin.alter_user_scram_credentials(upserts).values():
        future.result(timeout=timeout)
    # `ingest` (by password or by its certificate's CN) may use every topic, group and transactional id.
    acls = [AclBinding(kind, "*", ResourcePatternType.LITERAL, "User:ingest", "*", AclOperation.ALL,
                       AclPermissionType.ALLOW)
            for kind in (ResourceType.TOPIC, ResourceType.GROUP, ResourceType.TRANSACTIONAL_ID)]
    for future in admin.create_acls(acls).values():
        future.result(timeout=timeout)


def client_env(layout: Layout) -> dict[str, str]:
    """Non-secret settings a client of the secure stack needs (the passwords are in secrets.env)."""
    return {
        "INGEST_SECURE_KAFKA_SASL": f"127.0.0.1:{port('INGEST_SECURE_KAFKA_PORT')}",
        "INGEST_SECURE_KAFKA_MTLS": f"127.0.0.1:{port('INGEST_SECURE_KAFKA_MTLS_PORT')}",
        "INGEST_SECURE_NATS_URL": f"tls://127.0.0.1:{port('INGEST_SECURE_NATS_PORT')}",
        "INGEST_SECURE_MQTT_URL": f"mqtts://127.0.0.1:{port('INGEST_SECURE_MQTT_PORT')}",
        "INGEST_SECURE_MQTT_MTLS_URL": f"mqtts://127.0.0.1:{port('INGEST_SECURE_MQTT_MTLS_PORT')}",
        "INGEST_SECURE_CA_FILE": str(layout.ca),
        "INGEST_SECURE_CLIENT_CERT": str(layout.client_cert("ingest")),
        "INGEST_SECURE_CLIENT_KEY": str(layout.client_key("ingest")),
        "INGEST_SECURE_INTRUDER_CERT": str(layout.client_cert("intruder")),
        "INGEST_SECURE_INTRUDER_KEY": str(layout.client_key("intruder")),
        "INGEST_SECURE_NKEY_SEED_FILE": str(layout.nkey_seed("ingest")),
    }


def write_env_file(layout: Layout) -> None:
    lines = ["# Generated by `ingest stack up --secure`: `. .stack/secure/env.sh` to use the secure stack."]
    lines += [f"export {k}={shlex.quote(v)}" for k, v in client_env(layout).items()]
    lines.append(f". {shlex.quote(str(layout.secrets_file))}")
    layout.env_file.write_text("\n".join(lines) + "\n")

"""Beckon's push service with real clients: tenant identities, the shared HTTPS port, wake-ups end to end.

Beckon only: Mosquitto has no tenant identities and no port shared by raw MQTT, MQTT over
WebSocket and HTTPS, so nothing here runs against the reference broker (the fixture is
`push_broker`, not the suite's parametrized `broker`).

Each test starts `beckon broker --mqtts .. --fallback .. --tenants-dir ..` with two tenants:

- `acme`: a CA given as a file (agent `a1` and server `console` certificates) and an Ed25519
  token key (server tokens);
- `globex`: a CA given inline (server `console` certificate), the stranger for isolation.

Certificates and the Ed25519 key are made by the `openssl` CLI, like the suite's server
certificate; tokens (`bkn1.<claims>.<sig>`) and signed wake-ups are signed with it too.
"""

from __future__ import annotations

import base64
import dataclasses
import http.client
import json
import os
import ssl
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import Certificates, LoggedProcess, _free_ports, _run, serve_for_test, start_beckon_broker
from mqtt_clients import WAIT, MosquittoSub, PahoClient, props
from paho.mqtt.packettypes import PacketTypes

TOKEN_KID = "interop-console"
WAKE_TOPIC = "agents/a1/wake"
NOT_AUTHORIZED = 0x87


def b64url(data: bytes) -> str:
    """RFC 4648 URL-safe base64 without padding (tokens and wake-up signatures)."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


@dataclass
class Identity:
    """A client certificate and its key; the subject says tenant (O), role (OU) and id (CN)."""

    cert: Path
    key: Path


@dataclass
class TenantPki:
    """Tenant CAs, client certificates and acme's token key, made once per session."""

    dir: Path
    tenants_dir: Path
    token_key: Path
    identities: dict[str, Identity]

    def sign(self, message: bytes) -> bytes:
        """Ed25519 signature of `message` with acme's console key (openssl pkeyutl -rawin)."""
        msg = self.dir / f"msg-{uuid.uuid4().hex}"
        sig = msg.with_suffix(".sig")
        msg.write_bytes(message)
        try:
            _run(["openssl", "pkeyutl", "-sign", "-rawin", "-inkey", str(self.token_key), "-in", str(msg), "-out", str(sig)], self.dir)
            signature = sig.read_bytes()
        finally:
            msg.unlink(missing_ok=True)
            sig.unlink(missing_ok=True)
        assert len(signature) == 64, f"an Ed25519 signature is 64 bytes, openssl wrote {len(signature)}"
        return signature

    def token(self, role: str, sub: str, lifetime: int = 600) -> str:
        """A token of tenant acme, as the console issues them (docs/tenants.md)."""
        now = int(time.time())
        claims = {"tenant": "acme", "role": role, "sub": sub, "iat": now, "exp": now + lifetime, "kid": TOKEN_KID}
        signed = "bkn1." + b64url(json.dumps(claims, separators=(",", ":")).encode())
        return signed + "." + b64url(self.sign(signed.encode("ascii")))

    def wakeup(self, agent: str, reason: str) -> bytes:
        """A signed wake-up envelope for an acme agent (docs/wake-up.md); the broker passes it through untouched."""
        now = int(time.time())
        raw = bytearray(int(time.time() * 1000).to_bytes(6, "big") + os.urandom(10))
        raw[6] = 0x70 | (raw[6] & 0x0F)  # UUID version 7
        raw[8] = 0x80 | (raw[8] & 0x3F)  # RFC 4122 variant
        inner = json.dumps(
            {"v": 1, "id": str(uuid.UUID(bytes=bytes(raw))), "tenant": "acme", "agent": agent, "reason": reason,
             "issued_at": now, "expires_at": now + 600, "spread": 0},
            separators=(",", ":"),
        )
        sig = b64url(self.sign(b"beckon.wakeup.v1." + inner.encode()))
        return json.dumps({"wakeup": inner, "kid": TOKEN_KID, "sig": sig}, separators=(",", ":")).encode()


def _make_ca(d: Path, name: str, subject: str) -> Path:
    _run(["openssl", "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", f"{name}.key"], d)
    _run(
        [
            "openssl", "req", "-x509", "-new", "-key", f"{name}.key", "-sha256", "-days", "2", "-subj", subject,
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign",
            "-out", f"{name}.pem",
        ],
        d,
    )
    return d / f"{name}.pem"


def _issue_client(d: Path, ca: str, name: str, subject: str) -> Identity:
    _run(["openssl", "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", f"{name}.key"], d)
    _run(["openssl", "req", "-new", "-key", f"{name}.key", "-subj", subject, "-out", f"{name}.csr"], d)
    (d / "client.ext").write_text(
        "basicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature\n"
        "extendedKeyUsage=clientAuth\n"
    )
    _run(
        [
            "openssl", "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
            "-CAcreateserial", "-days", "2", "-sha256", "-extfile", "client.ext", "-out", f"{name}.pem",
        ],
        d,
    )
    return Identity(cert=d / f"{name}.pem", key=d / f"{name}.key")


@pytest.fixture(scope="session")
def tenant_pki(tmp_path_factory, certs) -> TenantPki:
    """Tenants acme (CA file + token key) and globex (inline CA), with their client certificates."""
    d = tmp_path_factory.mktemp("tenant-pki")
    tenants = d / "tenants"
    tenants.mkdir()
    _make_ca(tenants, "acme-ca", "/O=acme/CN=acme agents CA")
    globex_ca = _make_ca(d, "globex-ca", "/O=globex/CN=globex CA")
    identities = {
        "acme/agent/a1": _issue_client(tenants, "acme-ca", "acme-agent-a1", "/O=acme/OU=agent/CN=a1"),
        "acme/server/console": _issue_client(tenants, "acme-ca", "acme-server-console", "/O=acme/OU=server/CN=console"),
        "globex/server/console": _issue_client(d, "globex-ca", "globex-server-console", "/O=globex/OU=server/CN=console"),
    }
    _run(["openssl", "genpkey", "-algorithm", "ed25519", "-out", "token.key"], d)
    spki = subprocess.run(
        ["openssl", "pkey", "-in", str(d / "token.key"), "-pubout", "-outform", "DER"], capture_output=True, timeout=30, check=True
    ).stdout
    public_key = spki[-32:]  # the SubjectPublicKeyInfo of an Ed25519 key ends with the raw 32-byte key
    (tenants / "acme.toml").write_text(
        'name = "ACME Corp"\n\n'
        "[[ca]]\n"
        'file = "acme-ca.pem"\n\n'
        "[[token_key]]\n"
        f'kid = "{TOKEN_KID}"\n'
        f'public_key = "{b64url(public_key)}"\n'
    )
    (tenants / "globex.toml").write_text('[[ca]]\npem = """\n' + globex_ca.read_text() + '"""\n')
    return TenantPki(dir=d, tenants_dir=tenants, token_key=d / "token.key", identities=identities)


@dataclass
class PushBroker(LoggedProcess):
    """A running `beckon broker` with a tenant folder; `tls_port` is mqtts (8883's role), `fallback_port` the shared port."""

    name: str
    host: str
    tls_port: int
    fallback_port: int
    certs: Certificates
    pki: TenantPki
    process: subprocess.Popen
    log: Path


@pytest.fixture
def push_broker(tmp_path, certs, tenant_pki):
    """A fresh Beckon push service per test (mqtts + shared port + tenants), killed on teardown."""
    tls_port, fallback_port = _free_ports(2)
    log = tmp_path / "beckon-push.log"
    listen = [
        "--mqtts", f"127.0.0.1:{tls_port}",
        "--fallback", f"127.0.0.1:{fallback_port}",
        "--tenants-dir", str(tenant_pki.tenants_dir),
    ]
    proc = start_beckon_broker(tmp_path, certs, listen, log)
    yield from serve_for_test(
        proc, [tls_port, fallback_port], log, "beckon",
        lambda: PushBroker("beckon", "127.0.0.1", tls_port, fallback_port, certs, tenant_pki, proc, log),
    )


class RecordingSSLSocket(ssl.SSLSocket):
    """An SSL socket that keeps the first bytes it receives, to read the WebSocket handshake paho got."""

    HEAD = 8192

    def recv(self, buflen: int = 1024, flags: int = 0) -> bytes:
        data = super().recv(buflen, flags)
        head = self.__dict__.setdefault("received_head", bytearray())
        if len(head) < self.HEAD:
            head.extend(data[: self.HEAD - len(head)])
        return data

    def http_response_head(self) -> tuple[str, dict[str, str]]:
        """Status line and headers (lowercase names) of the HTTP response that opened the connection."""
        raw = bytes(self.__dict__.get("received_head", b""))
        head, sep, _ = raw.partition(b"\r\n\r\n")
        assert sep, f"no complete HTTP response head among the first bytes received: {raw[:300]!r}"
        status, *lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        return status, headers


class TenantClient(PahoClient):
    """A paho client of a tenant identity on one of the broker's TLS ports (client certificate and/or token)."""

    def __init__(self, broker: PushBroker, client_id: str, port: int, *, version: str = "v5",
                 identity: Identity | None = None, token: str | None = None, user: str | None = None,
                 alpn: list[str] | None = None, websocket: bool = False):
        super().__init__(broker, version, client_id=client_id, transport="websockets" if websocket else "tcp")
        self.port = port
        ctx = ssl.create_default_context(cafile=str(broker.certs.ca))
        if identity is not None:
            ctx.load_cert_chain(str(identity.cert), str(identity.key))
        if alpn is not None:
            ctx.set_alpn_protocols(alpn)
        if websocket:
            ctx.sslsocket_class = RecordingSSLSocket
            self.client.ws_set_options(path="/mqtt")
        self.client.tls_set_context(ctx)
        if token is not None:
            # The user name is ignored by the broker; the identity helps when reading a capture.
            self.client.username_pw_set(user or client_id, token)

    def endpoint(self) -> tuple[str, int]:
        return "localhost", self.port

    def tls_socket(self) -> ssl.SSLSocket:
        """The TLS socket under the connection (under paho's WebSocket wrapper for `websocket=True`)."""
        sock = self.client.socket()
        sock = getattr(sock, "_socket", sock)  # paho's _WebsocketWrapper keeps the TLS socket there
        assert isinstance(sock, ssl.SSLSocket), f"not a TLS connection: {sock!r}"
        return sock


@pytest.fixture
def tenant_clients(push_broker):
    """Factory for TenantClient; every client is disconnected on teardown."""
    made: list[TenantClient] = []

    def make(client_id: str, port: int, **kwargs) -> TenantClient:
        c = TenantClient(push_broker, client_id, port, **kwargs)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


def presence_of(server: TenantClient, agent: str) -> dict:
    """The retained presence event of `agent`, as a server of its tenant sees it."""
    assert server.subscribe(f"agents/{agent}/presence", qos=1) == [1]
    msg = server.expect_one()
    assert msg.topic == f"agents/{agent}/presence"
    assert msg.retain, "presence events are retained"
    return json.loads(msg.payload)


def deliver_wakeup(server: TenantClient, agent: TenantClient, reason: str) -> bytes:
    """The server publishes a signed wake-up to a1 at QoS 1; a1 gets it once, byte for byte."""
    payload = server.broker.pki.wakeup("a1", reason)
    properties = props(PacketTypes.PUBLISH, MessageExpiryInterval=600) if server.v5 else None
    server.publish(WAKE_TOPIC, payload, qos=1, properties=properties)
    msg = agent.expect_one()
    assert (msg.topic, msg.payload, msg.qos) == (WAKE_TOPIC, payload, 1)
    agent.expect_none()
    return payload


def ack_back(agent: TenantClient, server: TenantClient, wakeup: bytes) -> None:
    """The agent acks on agents/a1/ack; the server, subscribed there, gets the ack."""
    wakeup_id = json.loads(json.loads(wakeup)["wakeup"])["id"]
    ack = json.dumps({"wakeup_id": wakeup_id, "stage": "received", "at": int(time.time() * 1000)}).encode()
    agent.publish("agents/a1/ack", ack, qos=1)
    msg = server.expect_one()
    assert (msg.topic, msg.payload) == ("agents/a1/ack", ack)


def wake_and_ack(server: TenantClient, agent: TenantClient, path: str, reason: str) -> None:
    """The console (`server`) sees agent a1 connected over `path`, wakes it, and gets its ack."""
    event = presence_of(server, "a1")
    assert (event["state"], event["path"]) == ("connected", path)
    assert server.subscribe("agents/a1/ack", qos=1) == [1]
    wakeup = deliver_wakeup(server, agent, reason)
    ack_back(agent, server, wakeup)


def https_get(broker: PushBroker, path: str, alpn: list[str] | None) -> tuple[int, bytes, str | None, str]:
    """GET over TLS on the shared port, verifying the server certificate; (status, body, ALPN, content type)."""
    ctx = ssl.create_default_context(cafile=str(broker.certs.ca))
    if alpn is not None:
        ctx.set_alpn_protocols(alpn)
    conn = http.client.HTTPSConnection("localhost", broker.fallback_port, context=ctx, timeout=WAIT)
    try:
        conn.request("GET", path)
        assert isinstance(conn.sock, ssl.SSLSocket)
        selected = conn.sock.selected_alpn_protocol()  # before the response: a closing response detaches the socket
        resp = conn.getresponse()
        body = resp.read()
        return resp.status, body, selected, resp.getheader("Content-Type", "")
    finally:
        conn.close()


# --- the shared port ----------------------------------------------------------


def test_paho_v5_agent_on_shared_port_with_alpn_mqtt_gets_wakeup(push_broker, tenant_clients):
    pki = push_broker.pki
    agent = tenant_clients("a1", push_broker.fallback_port, identity=pki.identities["acme/agent/a1"], alpn=["mqtt"])
    agent.connect()
    assert agent.tls_socket().selected_alpn_protocol() == "mqtt"
    assert agent.subscribe(WAKE_TOPIC, qos=1) == [1]

    # The console's way in: a token as the password over mqtts, no client certificate.
    server = tenant_clients("console", push_broker.tls_port, token=pki.token("server", "console"), user="acme/server/console")
    server.connect()
    wake_and_ack(server, agent, "443-mqtt", "alpn-mqtt")


def test_paho_agent_over_websocket_on_shared_port_gets_wakeup(push_broker, tenant_clients):
    pki = push_broker.pki
    agent = tenant_clients("a1", push_broker.fallback_port, identity=pki.identities["acme/agent/a1"], websocket=True)
    agent.connect()
    status, headers = agent.tls_socket().http_response_head()
    assert status.startswith("HTTP/1.1 101"), status
    assert headers.get("upgrade", "").lower() == "websocket"
    assert headers.get("sec-websocket-protocol") == "mqtt", f"subprotocol not echoed: {headers}"
    assert agent.subscribe(WAKE_TOPIC, qos=1) == [1]

    server = tenant_clients("console", push_broker.tls_port, identity=pki.identities["acme/server/console"])
    server.connect()
    wake_and_ack(server, agent, "443-websocket", "websocket")


@pytest.mark.parametrize("alpn", [["http/1.1"], None], ids=["alpn-http1.1", "no-alpn"])
def test_https_health_on_shared_port_beside_mqtt(push_broker, tenant_clients, alpn):
    for path, body in [("/healthz", {"status": "ok"}), ("/readyz", {"status": "ready"})]:
        status, raw, selected, content_type = https_get(push_broker, path, alpn)
        assert status == 200, f"GET {path}: {status} {raw!r}"
        assert json.loads(raw) == body
        assert "json" in content_type, f"GET {path}: Content-Type {content_type!r}"
        assert selected == (alpn[0] if alpn else None)
    status, raw, _, _ = https_get(push_broker, "/no-such-page", alpn)
    assert status == 404, f"GET /no-such-page: {status} {raw!r}"

    # The same port, same broker: an MQTT client without ALPN (the first byte decides) still gets its wake-up.
    pki = push_broker.pki
    agent = tenant_clients("a1", push_broker.fallback_port, identity=pki.identities["acme/agent/a1"])
    agent.connect()
    assert agent.tls_socket().selected_alpn_protocol() is None
    assert agent.subscribe(WAKE_TOPIC, qos=1) == [1]
    server = tenant_clients("console", push_broker.tls_port, token=pki.token("server", "console"))
    server.connect()
    assert presence_of(server, "a1")["path"] == "443-mqtt"
    deliver_wakeup(server, agent, "after-health-check")


# --- the command-line client ---------------------------------------------------


@pytest.mark.parametrize(
    "version,port,alpn",
    [("v5", "mqtts", None), ("v311", "mqtts", None), ("v5", "fallback", "mqtt")],
    ids=["v5-mqtts", "v311-mqtts", "v5-shared-port-alpn-mqtt"],
)
def test_cli_subscriber_with_agent_certificate_gets_wakeup(push_broker, tenant_clients, version, port, alpn):
    pki = push_broker.pki
    agent_cert = pki.identities["acme/agent/a1"]
    target = push_broker if port == "mqtts" else dataclasses.replace(push_broker, tls_port=push_broker.fallback_port)
    extra = ["-i", "a1", "--cert", str(agent_cert.cert), "--key", str(agent_cert.key)]
    if alpn:
        extra += ["--tls-alpn", alpn]
    sub = MosquittoSub(target, version, tls=True, topic=WAKE_TOPIC, qos=1, extra=extra)
    try:
        server = tenant_clients("console", push_broker.tls_port, identity=pki.identities["acme/server/console"])
        server.connect()
        assert presence_of(server, "a1")["path"] == ("8883" if port == "mqtts" else "443-mqtt")
        payload = pki.wakeup("a1", "cli")
        server.publish(WAKE_TOPIC, payload, qos=1, properties=props(PacketTypes.PUBLISH, MessageExpiryInterval=600))
        (msg,) = sub.expect(1)
        assert (msg.topic, msg.qos, msg.payload) == (WAKE_TOPIC, 1, payload.decode())
        sub.expect_none()
    finally:
        sub.close()


# --- isolation ------------------------------------------------------------------


def test_isolation_between_tenants_and_agents(push_broker, tenant_clients):
    pki = push_broker.pki
    # globex's server sees everything of globex (#), and must see nothing of acme.
    stranger = tenant_clients("console", push_broker.tls_port, identity=pki.identities["globex/server/console"])
    stranger.connect()
    assert stranger.subscribe("#", qos=1) == [1]
    own = stranger.drain()  # its own retained presence, nothing else
    assert all(m.topic == "servers/console/presence" for m in own), f"globex sees foreign topics: {own}"

    agent = tenant_clients("a1", push_broker.fallback_port, identity=pki.identities["acme/agent/a1"], alpn=["mqtt"])
    agent.connect()
    assert agent.subscribe("agents/a2/wake", qos=1) == [NOT_AUTHORIZED]
    assert agent.subscribe_many([(WAKE_TOPIC, 1), ("agents/+/wake", 1), ("#", 1)]) == [1, NOT_AUTHORIZED, NOT_AUTHORIZED]

    server = tenant_clients("console", push_broker.tls_port, token=pki.token("server", "console"))
    server.connect()
    deliver_wakeup(server, agent, "isolation")
    # A wake-up for another acme agent does not reach a1 (its refused filters took nothing).
    server.publish("agents/a2/wake", pki.wakeup("a2", "not-for-a1"), qos=1)
    agent.expect_none()
    # globex's server may publish to its own agents/a1/wake: acme's a1 is another agent.
    stranger.publish(WAKE_TOPIC, b'{"from":"globex"}', qos=1)
    agent.expect_none()

    # Its `#` works (it gets its own tenant's message: the control), and it got nothing of acme's:
    # neither the wake-ups nor the presence events of acme's agent and server.
    seen = [(m.topic, m.payload) for m in stranger.drain()]
    assert seen == [(WAKE_TOPIC, b'{"from":"globex"}')], f"globex's server saw other than its own message: {seen}"

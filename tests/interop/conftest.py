"""Fixtures for the interoperability suite.

Every test that asks for the `broker` fixture runs twice: once against Debian's
Mosquitto (the reference) and once against Beckon. Both brokers get the same
generated certificates, a plain and a TLS listener on free loopback ports, and
anonymous access. A scenario that fails on Mosquitto means the test is wrong.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from mqtt_clients import PahoClient, die_with_parent

REPO_ROOT = Path(__file__).resolve().parents[2]
MOSQUITTO_BIN = os.environ.get("MOSQUITTO_BIN", "/usr/sbin/mosquitto")
STARTUP_TIMEOUT = 10.0


@dataclass
class Certificates:
    """A throwaway CA and a server certificate for localhost / 127.0.0.1."""

    ca: Path
    cert: Path
    key: Path


class LoggedProcess:
    """A process under test whose output goes to `log`: its tail goes into failure reports."""

    log: Path

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log.read_text(errors="replace").splitlines()
        except OSError as err:
            return f"(no log: {err})"
        return "\n".join(text[-lines:])


@dataclass
class Broker(LoggedProcess):
    """A running broker under test and how to reach it."""

    name: str
    host: str
    port: int
    tls_port: int
    certs: Certificates
    process: subprocess.Popen
    log: Path


def _run(cmd: list[str], cwd: Path) -> None:
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({result.returncode}): {result.stderr}")


@pytest.fixture(scope="session")
def certs(tmp_path_factory) -> Certificates:
    """Generate a CA and a server certificate with the openssl CLI."""
    if shutil.which("openssl") is None:
        pytest.fail("openssl CLI not found: install it with `apt-get install -y openssl` (scripts/test does)")
    d = tmp_path_factory.mktemp("pki")
    _run(["openssl", "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", "ca.key"], d)
    _run(
        [
            "openssl", "req", "-x509", "-new", "-key", "ca.key", "-sha256", "-days", "2",
            "-subj", "/CN=Beckon interop test CA",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign",
            "-out", "ca.pem",
        ],
        d,
    )
    _run(["openssl", "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", "server.key"], d)
    _run(["openssl", "req", "-new", "-key", "server.key", "-subj", "/CN=localhost", "-out", "server.csr"], d)
    (d / "server.ext").write_text(
        "basicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature\n"
        "extendedKeyUsage=serverAuth\n"
        "subjectAltName=DNS:localhost,IP:127.0.0.1\n"
    )
    _run(
        [
            "openssl", "x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-days", "2", "-sha256", "-extfile", "server.ext", "-out", "server.pem",
        ],
        d,
    )
    return Certificates(ca=d / "ca.pem", cert=d / "server.pem", key=d / "server.key")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _free_ports(count: int) -> list[int]:
    """`count` distinct free ports."""
    ports: list[int] = []
    while len(ports) < count:
        port = _free_port()
        if port not in ports:
            ports.append(port)
    return ports


def _wait_listening(proc: subprocess.Popen, ports: list[int], log: Path, name: str) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT
    pending = list(ports)
    while pending:
        if proc.poll() is not None:
            pytest.fail(
                f"{name} exited with status {proc.returncode} before listening on {ports}; log:\n"
                + log.read_text(errors="replace")[-4000:]
            )
        port = pending[0]
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                pending.pop(0)
                continue
        except OSError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(
                f"{name} did not listen on 127.0.0.1:{port} within {STARTUP_TIMEOUT}s; log:\n"
                + log.read_text(errors="replace")[-4000:]
            )
        time.sleep(0.05)


def _start_mosquitto(tmp: Path, certs: Certificates, port: int, tls_port: int, log: Path) -> subprocess.Popen:
    if not os.access(MOSQUITTO_BIN, os.X_OK):
        pytest.fail(f"{MOSQUITTO_BIN} not found: install it with `apt-get install -y mosquitto` (scripts/test does)")
    conf = tmp / "mosquitto.conf"
    conf.write_text(
        "# generated by the interop suite\n"
        "per_listener_settings false\n"
        "allow_anonymous true\n"
        "persistence false\n"
        # As root, mosquitto would drop to user 'mosquitto', which cannot read
        # the test's temporary certificate files; as non-root this is ignored.
        "user root\n"
        "log_dest stderr\n"
        "log_type all\n"
        f"listener {port} 127.0.0.1\n"
        f"listener {tls_port} 127.0.0.1\n"
        f"certfile {certs.cert}\n"
        f"keyfile {certs.key}\n"
    )
    with log.open("wb") as out:
        return subprocess.Popen(
            [MOSQUITTO_BIN, "-c", str(conf)], stdout=out, stderr=subprocess.STDOUT, preexec_fn=die_with_parent
        )


def _beckon_bin() -> Path:
    configured = os.environ.get("BECKON_BIN")
    path = Path(configured) if configured else REPO_ROOT / "target" / "debug" / "beckon"
    if not path.is_absolute():
        path = REPO_ROOT / path
    return path


def start_beckon_broker(tmp: Path, certs: Certificates, listen: list[str], log: Path) -> subprocess.Popen:
    """`beckon broker` with the suite's server certificate, a fresh data folder in `tmp` and
    the listeners (and other options) in `listen`, its output in `log`."""
    binary = _beckon_bin()
    if not (binary.is_file() and os.access(binary, os.X_OK)):
        pytest.fail(
            f"beckon binary not found at {binary}: build it with `cargo build -p beckon` "
            "(scripts/test does), or point BECKON_BIN at it"
        )
    data = tmp / "beckon-data"
    data.mkdir()
    cmd = [
        str(binary), "broker", *listen,
        "--cert", str(certs.cert),
        "--key", str(certs.key),
        "--data", str(data),
    ]
    with log.open("wb") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, preexec_fn=die_with_parent)


def _start_beckon(tmp: Path, certs: Certificates, port: int, tls_port: int, log: Path) -> subprocess.Popen:
    listen = ["--mqtt", f"127.0.0.1:{port}", "--mqtts", f"127.0.0.1:{tls_port}", "--allow-anonymous"]
    return start_beckon_broker(tmp, certs, listen, log)


@pytest.fixture(params=["mosquitto", "beckon"])
def broker(request, tmp_path, certs):
    """A fresh broker per test (no state leaks between scenarios), killed on teardown."""
    name = request.param
    port, tls_port = _free_ports(2)
    log = tmp_path / f"{name}.log"
    start = _start_mosquitto if name == "mosquitto" else _start_beckon
    proc = start(tmp_path, certs, port, tls_port, log)
    yield from serve_for_test(
        proc, [port, tls_port], log, name,
        lambda: Broker(name=name, host="127.0.0.1", port=port, tls_port=tls_port, certs=certs, process=proc, log=log),
    )


def serve_for_test(proc: subprocess.Popen, ports: list[int], log: Path, name: str, make):
    """The body of a broker fixture: waits until `proc` listens on `ports`, yields `make()` to
    the test, fails the test if the process died during it, and kills the process at the end."""
    try:
        _wait_listening(proc, ports, log, name)
        b = make()
        yield b
        if proc.poll() is not None:
            pytest.fail(f"{name} died during the test (status {proc.returncode}); log:\n{b.log_tail()}")
    finally:
        if proc.poll() is None:
            proc.kill()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass


@pytest.fixture
def topic(request) -> str:
    """A topic prefix unique to this test."""
    return f"interop/{uuid.uuid4().hex[:12]}"


@pytest.fixture
def clients(broker):
    """Factory for paho clients that are all disconnected on teardown."""
    made: list[PahoClient] = []

    def make(version: str, client_id: str | None = None, tls: bool = False, **kwargs) -> PahoClient:
        c = PahoClient(broker, version, client_id=client_id, tls=tls, **kwargs)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


@pytest.fixture
def subscriber(clients):
    """Factory for a connected client subscribed to `filters`, at QoS 1 unless `qos` says otherwise
    (`subscribe_options`, e.g. no_local=True, go to every SUBSCRIBE)."""

    def make(version: str, *filters: str, qos: int = 1, **subscribe_options) -> PahoClient:
        c = clients(version)
        c.connect()
        for f in filters:
            c.subscribe(f, qos=qos, **subscribe_options)
        return c

    return make


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_makereport(item, call):
    """On failure, attach the broker's log tail to the report (`push_broker`: test_push_service.py)."""
    if call.when == "call" and call.excinfo is not None:
        for name in ("broker", "push_broker"):
            b = item.funcargs.get(name)
            if b is not None and hasattr(b, "log_tail"):
                item.add_report_section("call", f"{b.name} log", b.log_tail())

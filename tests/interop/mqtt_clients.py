"""Thin, bounded wrappers around the real MQTT clients the suite drives.

`PahoClient` runs paho-mqtt's network loop in a background thread and turns its
callbacks into queues and events, so that every wait in a test has a timeout.
`MosquittoSub` runs `mosquitto_sub` and parses its formatted output;
`mosquitto_pub` runs the CLI publisher once.
"""

from __future__ import annotations

import ctypes
import queue
import signal
import socket
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass, field

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

WAIT = 5.0  # upper bound for anything that should happen promptly
QUIET = 0.7  # how long to watch for something that must not happen

VERSIONS = {"v311": mqtt.MQTTv311, "v5": mqtt.MQTTv5}


@dataclass
class Received:
    """One application message as a client saw it."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    properties: Properties | None = None
    dup: bool = False
    mid: int = 0

    def prop(self, name: str, default=None):
        if self.properties is None:
            return default
        return getattr(self.properties, name, default)


@dataclass
class Connack:
    """What the broker answered to CONNECT."""

    reason_code: int
    session_present: bool
    properties: Properties | None = None


@dataclass
class Disconnect:
    """How a connection ended, as paho reported it."""

    reason_code: int
    from_server: bool
    properties: Properties | None = field(default=None)


def die_with_parent() -> None:
    """Run in a child before exec: SIGKILL it if the test process dies, so nothing is left running."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def props(packet_type: int, **values) -> Properties:
    """Build MQTT v5 properties, e.g. props(PacketTypes.PUBLISH, MessageExpiryInterval=5)."""
    p = Properties(packet_type)
    for name, value in values.items():
        setattr(p, name, value)
    return p


class PahoClient:
    """A paho-mqtt client whose network loop runs in a background thread."""

    def __init__(self, broker, version: str, client_id: str | None = None, tls: bool = False, clean_session: bool = True,
                 manual_ack: bool = False, transport: str = "tcp"):
        self.broker = broker
        self.version = version
        self.v5 = version == "v5"
        self.client_id = client_id or f"interop-{uuid.uuid4().hex[:10]}"
        self.tls = tls
        kwargs = {}
        if not self.v5:
            kwargs["clean_session"] = clean_session
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=VERSIONS[version],
            reconnect_on_failure=False,
            manual_ack=manual_ack,
            transport=transport,
            **kwargs,
        )
        if tls:
            self.client.tls_set(ca_certs=str(broker.certs.ca))
        self.messages: queue.Queue[Received] = queue.Queue()
        self.connacks: queue.Queue[Connack] = queue.Queue()
        self.disconnects: queue.Queue[Disconnect] = queue.Queue()
        self._subacks: dict[int, list] = {}
        self._unsubacks: set[int] = set()
        self._acks = threading.Condition()
        self._running = False
        c = self.client
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        c.on_subscribe = self._on_subscribe
        c.on_unsubscribe = self._on_unsubscribe

    # --- callbacks (network thread) ---------------------------------------

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        self.connacks.put(Connack(int(reason_code.value), bool(flags.session_present), properties if self.v5 else None))

    def _on_disconnect(self, client, userdata, flags, reason_code, properties):
        self.disconnects.put(Disconnect(int(reason_code.value), bool(flags.is_disconnect_packet_from_server), properties))

    def _on_message(self, client, userdata, msg):
        props_ = getattr(msg, "properties", None) if self.v5 else None
        self.messages.put(Received(msg.topic, bytes(msg.payload), msg.qos, bool(msg.retain), props_, bool(msg.dup), msg.mid))

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties):
        with self._acks:
            self._subacks[mid] = [int(rc.value) for rc in reason_codes]
            self._acks.notify_all()

    def _on_unsubscribe(self, client, userdata, mid, reason_codes, properties):
        with self._acks:
            self._unsubacks.add(mid)
            self._acks.notify_all()

    # --- actions ------------------------------------------------------------

    def endpoint(self) -> tuple[str, int]:
        """Host and port to connect to: the TLS listener by its certificate's name, or the plain one."""
        if self.tls:
            return "localhost", self.broker.tls_port
        return self.broker.host, self.broker.port

    def set_will(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False, properties: Properties | None = None):
        self.client.will_set(topic, payload, qos=qos, retain=retain, properties=properties)

    def connect(self, clean_start: bool = True, properties: Properties | None = None, keepalive: int = 30, expect_success: bool = True) -> Connack:
        """Connect (plain or TLS), start the loop thread and wait for CONNACK."""
        host, port = self.endpoint()
        kwargs = {"keepalive": keepalive}
        if self.v5:
            kwargs["clean_start"] = clean_start
            kwargs["properties"] = properties
        self.client.connect(host, port, **kwargs)
        self.client.loop_start()
        self._running = True
        try:
            ack = self.connacks.get(timeout=WAIT)
        except queue.Empty:
            raise AssertionError(f"{self.client_id}: no CONNACK from {self.broker.name} within {WAIT}s") from None
        if expect_success:
            assert ack.reason_code == 0, f"{self.client_id}: CONNECT refused with reason {ack.reason_code:#x}"
        return ack

    def subscribe(self, topic: str, qos: int = 1, no_local: bool = False, retain_as_published: bool = False,
                  retain_handling: int = 0, properties: Properties | None = None) -> list[int]:
        """Subscribe and wait for SUBACK; returns the granted QoS / reason codes."""
        if self.v5:
            opts = SubscribeOptions(qos=qos, noLocal=no_local, retainAsPublished=retain_as_published, retainHandling=retain_handling)
            rc, mid = self.client.subscribe(topic, options=opts, properties=properties)
        else:
            rc, mid = self.client.subscribe(topic, qos)
        assert rc == mqtt.MQTT_ERR_SUCCESS, f"subscribe({topic}) failed locally: {mqtt.error_string(rc)}"
        with self._acks:
            if not self._acks.wait_for(lambda: mid in self._subacks, timeout=WAIT):
                raise AssertionError(f"{self.client_id}: no SUBACK for {topic} within {WAIT}s")
            return self._subacks.pop(mid)

    def subscribe_many(self, filters: list[tuple[str, int]]) -> list[int]:
        """One SUBSCRIBE carrying several (filter, qos) pairs; returns the SUBACK's codes in order."""
        if self.v5:
            rc, mid = self.client.subscribe([(f, SubscribeOptions(qos=q)) for f, q in filters])
        else:
            rc, mid = self.client.subscribe(filters)
        assert rc == mqtt.MQTT_ERR_SUCCESS, f"subscribe({filters}) failed locally: {mqtt.error_string(rc)}"
        with self._acks:
            if not self._acks.wait_for(lambda: mid in self._subacks, timeout=WAIT):
                raise AssertionError(f"{self.client_id}: no SUBACK for {filters} within {WAIT}s")
            return self._subacks.pop(mid)

    def unsubscribe(self, topic: str) -> None:
        rc, mid = self.client.unsubscribe(topic)
        assert rc == mqtt.MQTT_ERR_SUCCESS
        with self._acks:
            if not self._acks.wait_for(lambda: mid in self._unsubacks, timeout=WAIT):
                raise AssertionError(f"{self.client_id}: no UNSUBACK for {topic} within {WAIT}s")

    def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False, properties: Properties | None = None) -> None:
        """Publish and wait until the flow completes (sent for QoS 0, PUBACK / PUBCOMP otherwise)."""
        info = self.client.publish(topic, payload, qos=qos, retain=retain, properties=properties)
        assert info.rc == mqtt.MQTT_ERR_SUCCESS, f"publish({topic}) failed locally: {mqtt.error_string(info.rc)}"
        deadline = time.monotonic() + WAIT
        while not info.is_published():
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.client_id}: QoS {qos} publish to {topic} not acknowledged within {WAIT}s")
            time.sleep(0.01)

    def expect(self, count: int = 1, timeout: float = WAIT) -> list[Received]:
        """Wait for exactly `count` messages (more may follow; see expect_none)."""
        got: list[Received] = []
        deadline = time.monotonic() + timeout
        while len(got) < count:
            remaining = deadline - time.monotonic()
            try:
                got.append(self.messages.get(timeout=max(remaining, 0.001)))
            except queue.Empty:
                raise AssertionError(
                    f"{self.client_id}: expected {count} message(s) within {timeout}s, got {len(got)}: {got}"
                ) from None
        return got

    def expect_one(self, timeout: float = WAIT) -> Received:
        return self.expect(1, timeout)[0]

    def expect_none(self, quiet: float = QUIET) -> None:
        try:
            msg = self.messages.get(timeout=quiet)
        except queue.Empty:
            return
        raise AssertionError(f"{self.client_id}: expected no message, got {msg}")

    def drain(self, quiet: float = QUIET) -> list[Received]:
        """Collect every message that arrives until the client has been quiet for `quiet` seconds."""
        got = []
        while True:
            try:
                got.append(self.messages.get(timeout=quiet))
            except queue.Empty:
                return got

    def expect_disconnect(self, timeout: float = WAIT) -> Disconnect:
        try:
            return self.disconnects.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"{self.client_id}: connection not closed within {timeout}s") from None

    def disconnect(self, reason: str | None = None, properties: Properties | None = None) -> None:
        """Clean disconnect (sends DISCONNECT), waits for the loop thread to see it."""
        rc = ReasonCode(PacketTypes.DISCONNECT, reason) if (self.v5 and reason) else None
        self.client.disconnect(reasoncode=rc, properties=properties)
        self.expect_disconnect()
        self._stop_loop()

    def kill_socket(self) -> None:
        """Abrupt disconnect: close the TCP connection without sending DISCONNECT."""
        sock = self.client.socket()
        assert sock is not None, "not connected"
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.expect_disconnect()
        self._stop_loop()

    def go_silent(self) -> None:
        """Stop the network loop but keep the socket open: no more PINGREQ, no DISCONNECT."""
        self._stop_loop()

    def _stop_loop(self) -> None:
        if not self._running:
            return
        self._running = False
        stopper = threading.Thread(target=self.client.loop_stop, daemon=True)
        stopper.start()
        stopper.join(timeout=WAIT)

    def close(self) -> None:
        """Teardown: best-effort disconnect, never blocks for long."""
        try:
            if self.client.is_connected():
                self.client.disconnect()
        except Exception:
            pass
        self._stop_loop()
        try:
            sock = self.client.socket()
            if sock is not None:
                sock.close()
        except Exception:
            pass


# --- mosquitto command-line clients -------------------------------------------

SUB_FORMAT = "MSG|%t|%q|%r|%P|%p"


@dataclass
class CliMessage:
    """One message printed by mosquitto_sub."""

    topic: str
    qos: int
    retain: bool
    user_properties: str
    payload: str


def cli_connection_args(broker, version: str, tls: bool) -> list[str]:
    args = ["-V", "5" if version == "v5" else "311"]
    if tls:
        args += ["-h", "localhost", "-p", str(broker.tls_port), "--cafile", str(broker.certs.ca)]
    else:
        args += ["-h", broker.host, "-p", str(broker.port)]
    return args


class MosquittoSub:
    """A running mosquitto_sub whose output is parsed in a background thread."""

    def __init__(self, broker, version: str, tls: bool, topic: str, qos: int = 2, extra: list[str] | None = None,
                 wait_subscribed: bool = True):
        # Line-buffered stdout (stdbuf), so the debug line for SUBACK arrives as it happens.
        cmd = ["stdbuf", "-oL", "mosquitto_sub", *cli_connection_args(broker, version, tls), "-d", "-t", topic, "-q", str(qos),
               "-F", SUB_FORMAT, *(extra or [])]
        self.cmd = cmd
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                                     preexec_fn=die_with_parent)
        self.lines: queue.Queue[str] = queue.Queue()
        self.output: list[str] = []
        self._subscribed = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        if wait_subscribed and not self._subscribed.wait(WAIT):
            self.close()
            raise AssertionError(f"mosquitto_sub did not get a SUBACK within {WAIT}s: {self.output}")

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            line = line.rstrip("\n")
            self.output.append(line)
            if "received SUBACK" in line:
                self._subscribed.set()
            if line.startswith("MSG|"):
                self.lines.put(line)

    def expect(self, count: int = 1, timeout: float = WAIT) -> list[CliMessage]:
        got = []
        deadline = time.monotonic() + timeout
        while len(got) < count:
            try:
                line = self.lines.get(timeout=max(deadline - time.monotonic(), 0.001))
            except queue.Empty:
                raise AssertionError(f"mosquitto_sub: expected {count} message(s), got {len(got)}; output: {self.output}") from None
            _, topic, qos, retain, user_props, payload = line.split("|", 5)
            got.append(CliMessage(topic, int(qos), retain == "1", user_props, payload))
        return got

    def expect_none(self, quiet: float = QUIET) -> None:
        try:
            line = self.lines.get(timeout=quiet)
        except queue.Empty:
            return
        raise AssertionError(f"mosquitto_sub: expected no message, got {line}")

    def wait_exit(self, timeout: float = WAIT) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"mosquitto_sub did not exit within {timeout}s; output: {self.output}") from None

    def kill(self) -> None:
        """SIGKILL: the broker sees the socket close without DISCONNECT."""
        self.proc.kill()
        self.proc.wait(timeout=WAIT)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=2)
        self._reader.join(timeout=2)


def mosquitto_pub(broker, version: str, tls: bool, topic: str, message: str | None, qos: int = 0,
                  extra: list[str] | None = None) -> None:
    """Publish once with mosquitto_pub; `message=None` sends an empty payload (-n)."""
    cmd = ["mosquitto_pub", *cli_connection_args(broker, version, tls), "-t", topic, "-q", str(qos)]
    cmd += ["-n"] if message is None else ["-m", message]
    cmd += extra or []
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=WAIT * 2)
    assert result.returncode == 0, f"{' '.join(cmd)} exited {result.returncode}: {result.stderr}{result.stdout}"

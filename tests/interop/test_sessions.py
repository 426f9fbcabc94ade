"""Will messages, persistent sessions, session takeover and message expiry."""

import time

import pytest
from paho.mqtt.packettypes import PacketTypes

from mqtt_clients import PahoClient, props

VERSIONS = ["v311", "v5"]





# --- will -------------------------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
def test_will_published_on_abrupt_disconnect(clients, subscriber, topic, version, tls):
    watcher = subscriber(version, f"{topic}/will")
    dying = clients(version, tls=tls)
    dying.set_will(f"{topic}/will", b"gone", qos=1)
    dying.connect()
    watcher.expect_none(0.3)  # nothing while it lives
    dying.kill_socket()
    msg = watcher.expect_one()
    assert (msg.topic, msg.payload, msg.qos, msg.retain) == (f"{topic}/will", b"gone", 1, False)


@pytest.mark.parametrize("version", VERSIONS)
def test_will_not_published_on_clean_disconnect(clients, subscriber, topic, version):
    watcher = subscriber(version, f"{topic}/will")
    leaving = clients(version)
    leaving.set_will(f"{topic}/will", b"gone", qos=1)
    leaving.connect()
    leaving.disconnect()
    watcher.expect_none(1.0)


@pytest.mark.parametrize("version", VERSIONS)
def test_retained_will(clients, subscriber, topic, version):
    """A will with retain set becomes the retained message of its topic."""
    dying = clients(version)
    dying.set_will(f"{topic}/status", b"offline", qos=1, retain=True)
    dying.connect()
    dying.kill_socket()
    time.sleep(0.3)
    late = subscriber(version, f"{topic}/status")
    msg = late.expect_one()
    assert (msg.payload, msg.retain) == (b"offline", True)


@pytest.mark.parametrize("version", VERSIONS)
def test_keepalive_timeout_publishes_will(clients, subscriber, topic, version):
    """A client that goes silent past 1.5 x keepalive is dropped by the broker, and its will published."""
    watcher = subscriber(version, f"{topic}/will")
    silent = clients(version)
    silent.set_will(f"{topic}/will", b"timed out", qos=1)
    silent.connect(keepalive=1)
    silent.go_silent()
    msg = watcher.expect_one(timeout=6.0)
    assert msg.payload == b"timed out"


def test_v5_will_delay(clients, subscriber, topic):
    """v5 Will Delay Interval: the will is held back for the delay, then published."""
    watcher = subscriber("v5", f"{topic}/will")
    dying = clients("v5")
    dying.set_will(f"{topic}/will", b"late", qos=1, properties=props(PacketTypes.WILLMESSAGE, WillDelayInterval=2))
    dying.connect(properties=props(PacketTypes.CONNECT, SessionExpiryInterval=60))
    start = time.monotonic()
    dying.kill_socket()
    watcher.expect_none(1.0)
    msg = watcher.expect_one(timeout=5.0)
    assert msg.payload == b"late"
    assert time.monotonic() - start >= 1.5


def test_v5_will_delay_cancelled_by_reconnect(clients, subscriber, topic):
    """Reconnecting to the session before the will delay ends means no will."""
    watcher = subscriber("v5", f"{topic}/will")
    dying = clients("v5")
    dying.set_will(f"{topic}/will", b"late", qos=1, properties=props(PacketTypes.WILLMESSAGE, WillDelayInterval=2))
    dying.connect(properties=props(PacketTypes.CONNECT, SessionExpiryInterval=60))
    dying.kill_socket()
    back = clients("v5", client_id=dying.client_id)
    ack = back.connect(clean_start=False, properties=props(PacketTypes.CONNECT, SessionExpiryInterval=60))
    assert ack.session_present
    watcher.expect_none(3.0)


def test_v5_disconnect_with_will_message(clients, subscriber, topic):
    """v5 DISCONNECT with reason 0x04 asks the broker to publish the will."""
    watcher = subscriber("v5", f"{topic}/will")
    leaving = clients("v5")
    leaving.set_will(f"{topic}/will", b"asked", qos=1)
    leaving.connect()
    leaving.disconnect(reason="Disconnect with will message")
    assert watcher.expect_one().payload == b"asked"


# --- persistent sessions ----------------------------------------------------


def _persistent(clients, version, client_id=None, tls=False):
    """A client that asks for a persistent session, and the connect() arguments for it."""
    if version == "v5":
        c = clients("v5", client_id=client_id, tls=tls)
        return c, dict(clean_start=False, properties=props(PacketTypes.CONNECT, SessionExpiryInterval=300))
    c = clients("v311", client_id=client_id, clean_session=False, tls=tls)
    return c, dict()


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
def test_persistent_session_resumes_with_queued_messages(clients, topic, version, tls):
    first, how = _persistent(clients, version, tls=tls)
    if version == "v5":
        ack = first.connect(clean_start=True, properties=how["properties"])
    else:
        # Start from a clean slate, then switch to a persistent session.
        fresh = clients("v311", client_id=first.client_id, clean_session=True)
        fresh.connect()
        fresh.disconnect()
        ack = first.connect()
    assert not ack.session_present
    assert first.subscribe(f"{topic}/q", qos=1) == [1]
    first.disconnect()

    pub = clients(version)
    pub.connect()
    for i in range(3):
        pub.publish(f"{topic}/q", f"queued-{i}".encode(), qos=1)

    back, how = _persistent(clients, version, client_id=first.client_id, tls=tls)
    ack = back.connect(**how)
    assert ack.session_present
    got = back.expect(3)
    assert [(m.payload, m.qos) for m in got] == [(f"queued-{i}".encode(), 1) for i in range(3)]
    back.expect_none()
    # The subscription itself survived too.
    pub.publish(f"{topic}/q", b"live", qos=1)
    assert back.expect_one().payload == b"live"


@pytest.mark.parametrize("version", VERSIONS)
def test_unacknowledged_qos1_redelivered_on_resume(clients, topic, version):
    """A QoS 1 message received but never acknowledged is sent again, with DUP set, when the session resumes."""
    if version == "v5":
        first = clients("v5", manual_ack=True)
        how = dict(clean_start=False, properties=props(PacketTypes.CONNECT, SessionExpiryInterval=300))
    else:
        first = clients("v311", clean_session=False, manual_ack=True)
        how = {}
    first.connect(**how)
    first.subscribe(f"{topic}/r", qos=1)
    pub = clients(version)
    pub.connect()
    pub.publish(f"{topic}/r", b"at-least-once", qos=1)
    msg = first.expect_one()
    assert (msg.payload, msg.dup) == (b"at-least-once", False)
    first.kill_socket()  # no PUBACK was sent

    if version == "v5":
        back = clients("v5", client_id=first.client_id)
    else:
        back = clients("v311", client_id=first.client_id, clean_session=False)
    ack = back.connect(**how)
    assert ack.session_present
    again = back.expect_one()
    assert (again.payload, again.qos, again.dup) == (b"at-least-once", 1, True)
    back.expect_none()


@pytest.mark.parametrize("version", VERSIONS)
def test_clean_session_discards_old_session(clients, topic, version):
    first, how = _persistent(clients, version)
    first.connect(**how)
    first.subscribe(f"{topic}/q", qos=1)
    first.disconnect()
    pub = clients(version)
    pub.connect()
    pub.publish(f"{topic}/q", b"for-old-session", qos=1)

    if version == "v5":
        again = clients("v5", client_id=first.client_id)
    else:
        again = clients("v311", client_id=first.client_id, clean_session=True)
    ack = again.connect(clean_start=True)
    assert not ack.session_present
    again.expect_none()
    pub.publish(f"{topic}/q", b"after", qos=1)
    again.expect_none()  # no subscription any more


def test_v5_session_expiry_zero_ends_session(clients, topic):
    """v5: session expiry 0 (the default) means nothing survives the disconnect."""
    first = clients("v5")
    first.connect(clean_start=False)
    first.subscribe(f"{topic}/q", qos=1)
    first.disconnect()
    pub = clients("v5")
    pub.connect()
    pub.publish(f"{topic}/q", b"x", qos=1)
    again = clients("v5", client_id=first.client_id)
    ack = again.connect(clean_start=False, properties=props(PacketTypes.CONNECT, SessionExpiryInterval=60))
    assert not ack.session_present
    again.expect_none()


def test_v5_session_expires_after_interval(clients, topic):
    first = clients("v5")
    first.connect(clean_start=True, properties=props(PacketTypes.CONNECT, SessionExpiryInterval=1))
    first.subscribe(f"{topic}/q", qos=1)
    first.disconnect()
    time.sleep(2.5)
    again = clients("v5", client_id=first.client_id)
    ack = again.connect(clean_start=False, properties=props(PacketTypes.CONNECT, SessionExpiryInterval=60))
    assert not ack.session_present


# --- takeover ---------------------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
def test_session_takeover(broker, clients, topic, version, tls):
    """A second connection with the same client id disconnects the first (v5: reason 0x8E)."""
    first = clients(version, tls=tls)
    first.connect()
    first.subscribe(f"{topic}/t", qos=1)
    second = clients(version, client_id=first.client_id, tls=tls)
    second.connect()
    gone = first.expect_disconnect()
    if version == "v5":
        # MQTT 5 section 3.1.4: the server sends DISCONNECT 0x8E (Session taken over) to the
        # old connection, then closes it. Mosquitto 2.0.11, the reference here, only closes
        # the socket (newer Mosquitto releases send the DISCONNECT), so the packet itself is
        # required from Beckon alone; whoever sends one must use 0x8E.
        if gone.from_server or broker.name == "beckon":
            assert gone.from_server, f"{broker.name} closed the old connection without DISCONNECT 0x8E"
            assert gone.reason_code == 0x8E, f"reason {gone.reason_code:#x}"
    else:
        assert gone.reason_code != 0
    # The new connection works and the old one stays closed.
    second.subscribe(f"{topic}/t", qos=1)
    pub = clients(version)
    pub.connect()
    pub.publish(f"{topic}/t", b"to-second", qos=1)
    assert second.expect_one().payload == b"to-second"
    first.expect_none(0.3)
    # (paho's is_connected() stays true after a server DISCONNECT; its socket is what tells.)
    assert first.client.socket() is None
    second.expect_none(0.3)


@pytest.mark.parametrize("version", VERSIONS)
def test_takeover_resumes_persistent_session(clients, topic, version):
    """Taking over a live persistent session keeps its subscriptions."""
    first, how = _persistent(clients, version)
    first.connect(**how)
    first.subscribe(f"{topic}/t", qos=1)
    second, how = _persistent(clients, version, client_id=first.client_id)
    ack = second.connect(**how)
    assert ack.session_present
    first.expect_disconnect()
    pub = clients(version)
    pub.connect()
    pub.publish(f"{topic}/t", b"kept", qos=1)
    assert second.expect_one().payload == b"kept"


# --- message expiry ---------------------------------------------------------


def test_v5_message_expiry_for_offline_session(clients, topic):
    """A queued message past its expiry is dropped; one within it is delivered with the remaining interval."""
    sub = clients("v5")
    sub.connect(properties=props(PacketTypes.CONNECT, SessionExpiryInterval=300))
    sub.subscribe(f"{topic}/e", qos=1)
    sub.disconnect()

    pub = clients("v5")
    pub.connect()
    pub.publish(f"{topic}/e", b"short", qos=1, properties=props(PacketTypes.PUBLISH, MessageExpiryInterval=1))
    pub.publish(f"{topic}/e", b"long", qos=1, properties=props(PacketTypes.PUBLISH, MessageExpiryInterval=60))
    time.sleep(2.5)

    back = clients("v5", client_id=sub.client_id)
    ack = back.connect(clean_start=False, properties=props(PacketTypes.CONNECT, SessionExpiryInterval=300))
    assert ack.session_present
    msg = back.expect_one()
    assert msg.payload == b"long"
    remaining = msg.prop("MessageExpiryInterval")
    assert remaining is not None and 50 <= remaining <= 58, f"MessageExpiryInterval {remaining}"
    back.expect_none()


def test_v5_retained_message_expires(clients, subscriber, topic):
    pub = clients("v5")
    pub.connect()
    pub.publish(f"{topic}/r", b"brief", qos=1, retain=True, properties=props(PacketTypes.PUBLISH, MessageExpiryInterval=1))
    time.sleep(2.2)
    sub = subscriber("v5", f"{topic}/r")
    sub.expect_none()

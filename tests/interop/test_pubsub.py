"""Publish/subscribe basics, retained messages and `$` topics, with paho-mqtt v3.1.1 and v5."""

import pytest

from mqtt_clients import PahoClient

VERSIONS = ["v311", "v5"]


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
@pytest.mark.parametrize("pub_qos", [0, 1, 2])
def test_publish_subscribe_qos(clients, topic, version, tls, pub_qos):
    """A message arrives with its payload, on its topic, at the QoS it was published with."""
    sub = clients(version, tls=tls)
    sub.connect()
    assert sub.subscribe(f"{topic}/+", qos=2) == [2]
    pub = clients(version, tls=tls)
    pub.connect()
    payload = bytes(range(256)) + f"qos{pub_qos}".encode()
    pub.publish(f"{topic}/a", payload, qos=pub_qos)
    msg = sub.expect_one()
    assert (msg.topic, msg.payload, msg.qos, msg.retain) == (f"{topic}/a", payload, pub_qos, False)
    sub.expect_none()


@pytest.mark.parametrize("version", VERSIONS)
def test_qos_downgraded_to_subscription(clients, topic, version):
    """A QoS 2 publish to a QoS 0 / QoS 1 subscription is delivered at the subscription's QoS."""
    sub0, sub1 = clients(version), clients(version)
    sub0.connect()
    sub1.connect()
    assert sub0.subscribe(topic, qos=0) == [0]
    assert sub1.subscribe(topic, qos=1) == [1]
    pub = clients(version)
    pub.connect()
    pub.publish(topic, b"down", qos=2)
    assert sub0.expect_one().qos == 0
    assert sub1.expect_one().qos == 1


@pytest.mark.parametrize("version", VERSIONS)
def test_wildcards_and_order(clients, subscriber, topic, version):
    """`+` and `#` match as specified, and messages from one publisher keep their order."""
    sub = subscriber(version, f"{topic}/+/temp", f"{topic}/alarm/#")
    pub = clients(version)
    pub.connect()
    for t in [f"{topic}/room1/temp", f"{topic}/room1/humidity", f"{topic}/alarm", f"{topic}/alarm/x/y", f"{topic}/a/b/temp"]:
        pub.publish(t, t.encode(), qos=1)
    got = [m.topic for m in sub.expect(3)]
    assert got == [f"{topic}/room1/temp", f"{topic}/alarm", f"{topic}/alarm/x/y"]
    sub.expect_none()
    for i in range(20):
        pub.publish(f"{topic}/seq/temp", str(i).encode(), qos=1)
    assert [m.payload for m in sub.expect(20)] == [str(i).encode() for i in range(20)]


@pytest.mark.parametrize("version", VERSIONS)
def test_retained_set_delivered_and_cleared(clients, subscriber, topic, version):
    """A retained message reaches later subscribers with the retain flag; an empty retained payload clears it."""
    pub = clients(version)
    pub.connect()
    pub.publish(f"{topic}/state", b"on", qos=1, retain=True)

    late = subscriber(version, f"{topic}/#")
    msg = late.expect_one()
    assert (msg.topic, msg.payload, msg.retain, msg.qos) == (f"{topic}/state", b"on", True, 1)

    # Live delivery to an existing subscription carries retain = 0.
    pub.publish(f"{topic}/state", b"off", qos=1, retain=True)
    live = late.expect_one()
    assert (live.payload, live.retain) == (b"off", False)

    # The newest retained message replaced the old one.
    again = subscriber(version, f"{topic}/state", qos=0)
    replaced = again.expect_one()
    assert (replaced.payload, replaced.retain, replaced.qos) == (b"off", True, 0)
    again.expect_none()

    pub.publish(f"{topic}/state", b"", qos=1, retain=True)
    late.drain()  # the clearing publish itself may be seen by existing subscribers
    after = subscriber(version, f"{topic}/#")
    after.expect_none()


@pytest.mark.parametrize("version", VERSIONS)
def test_dollar_topics_not_matched_by_wildcards(clients, subscriber, topic, version):
    """`#` and `+/...` do not match topics starting with `$`; an explicit `$` filter does."""
    dollar = f"$test{topic.split('/')[1]}"
    everything = subscriber(version, "#")
    plus = subscriber(version, "+/x")
    explicit = subscriber(version, f"{dollar}/#")

    pub = clients(version)
    pub.connect()
    pub.publish(f"{dollar}/x", b"hidden", qos=1)
    pub.publish(f"{topic}/x", b"visible", qos=1)

    assert explicit.expect_one().topic == f"{dollar}/x"
    got = everything.drain()
    assert [m.topic for m in got] == [f"{topic}/x"], got
    plus.expect_none()


@pytest.mark.parametrize("version", VERSIONS)
def test_unsubscribe_stops_delivery(clients, subscriber, topic, version):
    sub = subscriber(version, f"{topic}/u", f"{topic}/keep")
    pub = clients(version)
    pub.connect()
    pub.publish(f"{topic}/u", b"before", qos=1)
    assert sub.expect_one().payload == b"before"
    sub.unsubscribe(f"{topic}/u")
    pub.publish(f"{topic}/u", b"after", qos=1)
    pub.publish(f"{topic}/keep", b"still", qos=1)
    assert sub.expect_one().payload == b"still"
    sub.expect_none()


@pytest.mark.parametrize("version", VERSIONS)
def test_empty_and_large_payloads(clients, subscriber, topic, version):
    """A zero-length (non-retained) payload and a 64 KiB one both arrive intact."""
    sub = subscriber(version, f"{topic}/#")
    pub = clients(version)
    pub.connect()
    big = bytes(i % 251 for i in range(64 * 1024))
    pub.publish(f"{topic}/empty", b"", qos=1)
    pub.publish(f"{topic}/big", big, qos=1)
    empty, large = sub.expect(2)
    assert (empty.topic, empty.payload) == (f"{topic}/empty", b"")
    assert (large.topic, large.payload) == (f"{topic}/big", big)


@pytest.mark.parametrize("version", VERSIONS)
def test_subscribe_several_filters_at_once(clients, topic, version):
    """One SUBACK for a SUBSCRIBE with several filters, one granted QoS per filter in order."""
    sub = clients(version)
    sub.connect()
    assert sub.subscribe_many([(f"{topic}/a", 0), (f"{topic}/b", 1), (f"{topic}/c", 2)]) == [0, 1, 2]
    pub = clients(version)
    pub.connect()
    for name in "abc":
        pub.publish(f"{topic}/{name}", name.encode(), qos=2)
    assert sorted((m.payload, m.qos) for m in sub.expect(3)) == [(b"a", 0), (b"b", 1), (b"c", 2)]

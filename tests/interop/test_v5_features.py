"""MQTT 5 features: topic aliases, subscription identifiers, no-local, retain-as-published,
retain handling, properties passed through, shared subscriptions."""

import pytest
from paho.mqtt.packettypes import PacketTypes

from mqtt_clients import props


@pytest.mark.parametrize("sub_version", ["v311", "v5"])
def test_topic_alias_from_publisher(clients, subscriber, topic, sub_version):
    """A v5 publisher sets an alias, then publishes by alias only; subscribers see the full topic."""
    sub = subscriber(sub_version, f"{topic}/#")
    pub = clients("v5")
    ack = pub.connect()
    assert getattr(ack.properties, "TopicAliasMaximum", 0) >= 1, "CONNACK must offer topic aliases"
    full = f"{topic}/aliased/long/topic/name"
    pub.publish(full, b"first", qos=1, properties=props(PacketTypes.PUBLISH, TopicAlias=1))
    pub.publish("", b"second", qos=1, properties=props(PacketTypes.PUBLISH, TopicAlias=1))
    pub.publish("", b"third", qos=0, properties=props(PacketTypes.PUBLISH, TopicAlias=1))
    # Rebinding the alias to another topic.
    pub.publish(f"{topic}/other", b"fourth", qos=1, properties=props(PacketTypes.PUBLISH, TopicAlias=1))
    pub.publish("", b"fifth", qos=1, properties=props(PacketTypes.PUBLISH, TopicAlias=1))
    got = [(m.topic, m.payload) for m in sub.expect(5)]
    assert got == [
        (full, b"first"), (full, b"second"), (full, b"third"),
        (f"{topic}/other", b"fourth"), (f"{topic}/other", b"fifth"),
    ]


def test_subscription_identifiers(clients, topic):
    sub = clients("v5")
    sub.connect()
    sub.subscribe(f"{topic}/x/+", qos=1, properties=props(PacketTypes.SUBSCRIBE, SubscriptionIdentifier=7))
    sub.subscribe(f"{topic}/y/#", qos=1, properties=props(PacketTypes.SUBSCRIBE, SubscriptionIdentifier=268435455))
    sub.subscribe(f"{topic}/z", qos=1)
    pub = clients("v5")
    pub.connect()
    pub.publish(f"{topic}/x/1", b"x", qos=1)
    pub.publish(f"{topic}/y/2/3", b"y", qos=1)
    pub.publish(f"{topic}/z", b"z", qos=1)
    x, y, z = sub.expect(3)
    assert (x.payload, x.prop("SubscriptionIdentifier")) == (b"x", [7])
    assert (y.payload, y.prop("SubscriptionIdentifier")) == (b"y", [268435455])
    assert (z.payload, z.prop("SubscriptionIdentifier")) == (b"z", None)


def test_subscription_identifier_on_retained(clients, topic):
    pub = clients("v5")
    pub.connect()
    pub.publish(f"{topic}/r", b"kept", qos=1, retain=True)
    sub = clients("v5")
    sub.connect()
    sub.subscribe(f"{topic}/#", qos=1, properties=props(PacketTypes.SUBSCRIBE, SubscriptionIdentifier=42))
    msg = sub.expect_one()
    assert (msg.payload, msg.retain, msg.prop("SubscriptionIdentifier")) == (b"kept", True, [42])


def test_no_local(clients, subscriber, topic):
    """With No Local, a client does not get its own messages, but gets everyone else's."""
    me = subscriber("v5", f"{topic}/chat", no_local=True)
    other = subscriber("v5", f"{topic}/chat")
    me.publish(f"{topic}/chat", b"from-me", qos=1)
    assert other.expect_one().payload == b"from-me"
    me.expect_none()
    other.publish(f"{topic}/chat", b"from-other", qos=1)
    assert me.expect_one().payload == b"from-other"
    assert other.expect_one().payload == b"from-other"  # no_local was not set for `other`


def test_retain_as_published(clients, subscriber, topic):
    """Retain As Published keeps the retain flag on live delivery; without it the flag is cleared."""
    rap = subscriber("v5", f"{topic}/s", retain_as_published=True)
    plain = subscriber("v5", f"{topic}/s")
    pub = clients("v5")
    pub.connect()
    pub.publish(f"{topic}/s", b"r", qos=1, retain=True)
    pub.publish(f"{topic}/s", b"n", qos=1, retain=False)
    assert [(m.payload, m.retain) for m in rap.expect(2)] == [(b"r", True), (b"n", False)]
    assert [(m.payload, m.retain) for m in plain.expect(2)] == [(b"r", False), (b"n", False)]


@pytest.mark.parametrize("handling", [0, 1, 2])
def test_retain_handling(clients, topic, handling):
    """0: retained sent on every subscribe; 1: only when the subscription is new; 2: never."""
    pub = clients("v5")
    pub.connect()
    pub.publish(f"{topic}/r", b"kept", qos=1, retain=True)
    sub = clients("v5")
    sub.connect()
    sub.subscribe(f"{topic}/r", qos=1, retain_handling=handling)
    if handling == 2:
        sub.expect_none()
    else:
        msg = sub.expect_one()
        assert (msg.payload, msg.retain) == (b"kept", True)
    sub.subscribe(f"{topic}/r", qos=1, retain_handling=handling)  # same filter again
    if handling == 0:
        msg = sub.expect_one()
        assert (msg.payload, msg.retain) == (b"kept", True)
    else:
        sub.expect_none()
    # Live messages still flow whatever the retain handling.
    pub.publish(f"{topic}/r", b"live", qos=1)
    assert sub.expect_one().payload == b"live"


def test_publish_properties_passed_through(clients, subscriber, topic):
    """User properties (order and duplicates kept) and the other application properties reach v5 subscribers."""
    sub = subscriber("v5", f"{topic}/p")
    pub = clients("v5")
    pub.connect()
    user = [("tenant", "acme"), ("trace", "1"), ("trace", "2"), ("ünïcode", "✓")]
    p = props(
        PacketTypes.PUBLISH,
        UserProperty=user,
        ContentType="application/json",
        ResponseTopic=f"{topic}/reply",
        CorrelationData=b"\x00\x01corr",
        PayloadFormatIndicator=1,
    )
    pub.publish(f"{topic}/p", b'{"k": 1}', qos=1, properties=p)
    msg = sub.expect_one()
    assert msg.prop("UserProperty") == user
    assert msg.prop("ContentType") == "application/json"
    assert msg.prop("ResponseTopic") == f"{topic}/reply"
    assert msg.prop("CorrelationData") == b"\x00\x01corr"
    assert msg.prop("PayloadFormatIndicator") == 1


def test_v311_subscriber_gets_v5_message(clients, subscriber, topic):
    """A v3.1.1 subscriber receives a v5 publisher's message without the properties."""
    sub = subscriber("v311", f"{topic}/p")
    pub = clients("v5")
    pub.connect()
    pub.publish(f"{topic}/p", b"mixed", qos=1, properties=props(PacketTypes.PUBLISH, UserProperty=[("a", "b")]))
    msg = sub.expect_one()
    assert (msg.topic, msg.payload, msg.qos) == (f"{topic}/p", b"mixed", 1)


@pytest.mark.parametrize("version", ["v311", "v5"])
def test_shared_subscription(clients, topic, version):
    """$share/g/topic: each message goes to exactly one member of the group, and both members get some.
    A normal subscription on the same topic still gets every message."""
    a, b, watcher = clients(version), clients(version), clients(version)
    for c in (a, b, watcher):
        c.connect()
    assert a.subscribe(f"$share/g1/{topic}/jobs", qos=1) == [1]
    assert b.subscribe(f"$share/g1/{topic}/jobs", qos=1) == [1]
    watcher.subscribe(f"{topic}/jobs", qos=1)
    pub = clients(version)
    pub.connect()
    n = 20
    for i in range(n):
        pub.publish(f"{topic}/jobs", f"job-{i}".encode(), qos=1)
    got_a, got_b = a.drain(), b.drain()
    payloads = sorted([m.payload for m in got_a + got_b])
    assert payloads == sorted(f"job-{i}".encode() for i in range(n)), (len(got_a), len(got_b))
    assert got_a and got_b, f"one member got nothing: a={len(got_a)} b={len(got_b)}"
    assert all(m.topic == f"{topic}/jobs" for m in got_a + got_b)
    assert len(watcher.expect(n)) == n


def test_shared_subscription_member_leaves(clients, topic):
    """When one member of a share group disconnects, the remaining member gets everything."""
    a, b = clients("v5"), clients("v5")
    a.connect()
    b.connect()
    a.subscribe(f"$share/g2/{topic}/w", qos=1)
    b.subscribe(f"$share/g2/{topic}/w", qos=1)
    b.disconnect()
    pub = clients("v5")
    pub.connect()
    for i in range(5):
        pub.publish(f"{topic}/w", str(i).encode(), qos=1)
    assert [m.payload for m in a.expect(5)] == [str(i).encode() for i in range(5)]

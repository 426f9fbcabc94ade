"""mosquitto_pub / mosquitto_sub (Debian's mosquitto-clients), v3.1.1 and v5, plain and TLS."""

import uuid

import pytest

from mqtt_clients import MosquittoSub, mosquitto_pub

VERSIONS = ["v311", "v5"]
TRANSPORTS = pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])


@pytest.fixture
def subs():
    made = []

    def make(*args, **kwargs):
        s = MosquittoSub(*args, **kwargs)
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


@pytest.mark.parametrize("version", VERSIONS)
@TRANSPORTS
@pytest.mark.parametrize("qos", [0, 1, 2])
def test_cli_publish_subscribe(broker, subs, topic, version, tls, qos):
    sub = subs(broker, version, tls, f"{topic}/#", qos=2)
    mosquitto_pub(broker, version, tls, f"{topic}/cli", f"hello qos{qos}", qos=qos)
    msg = sub.expect(1)[0]
    assert (msg.topic, msg.payload, msg.qos, msg.retain) == (f"{topic}/cli", f"hello qos{qos}", qos, False)
    sub.expect_none()


@pytest.mark.parametrize("version", VERSIONS)
@TRANSPORTS
def test_cli_with_paho(broker, subs, clients, topic, version, tls):
    """mosquitto_sub receives from paho; paho receives from mosquitto_pub."""
    sub = subs(broker, version, tls, f"{topic}/to-cli", qos=1)
    pub = clients(version, tls=tls)
    pub.connect()
    pub.publish(f"{topic}/to-cli", b"from paho", qos=1)
    msg = sub.expect(1)[0]
    assert (msg.payload, msg.qos) == ("from paho", 1)

    psub = clients(version, tls=tls)
    psub.connect()
    psub.subscribe(f"{topic}/to-paho", qos=2)
    mosquitto_pub(broker, version, tls, f"{topic}/to-paho", "from cli", qos=2)
    got = psub.expect_one()
    assert (got.payload, got.qos) == (b"from cli", 2)


@pytest.mark.parametrize("version", VERSIONS)
@TRANSPORTS
def test_cli_retained(broker, subs, topic, version, tls):
    mosquitto_pub(broker, version, tls, f"{topic}/state", "on", qos=1, extra=["-r"])
    sub = subs(broker, version, tls, f"{topic}/state", qos=1, extra=["-C", "1", "-W", "5"])
    msg = sub.expect(1)[0]
    assert (msg.payload, msg.retain, msg.qos) == ("on", True, 1)
    assert sub.wait_exit() == 0
    mosquitto_pub(broker, version, tls, f"{topic}/state", None, qos=1, extra=["-r"])
    empty = subs(broker, version, tls, f"{topic}/state", qos=1)
    empty.expect_none()


@pytest.mark.parametrize("version", VERSIONS)
@TRANSPORTS
def test_cli_persistent_session(broker, subs, topic, version, tls):
    """mosquitto_sub -c: subscribe, leave, messages are queued, come back and get them."""
    client_id = f"cli-{uuid.uuid4().hex[:10]}"
    session = ["-c", "-i", client_id] + (["-x", "300"] if version == "v5" else [])
    first = subs(broker, version, tls, f"{topic}/q", qos=1, extra=[*session, "-E"])
    assert first.wait_exit() == 0
    for i in range(3):
        mosquitto_pub(broker, version, tls, f"{topic}/q", f"queued-{i}", qos=1)
    back = subs(broker, version, tls, f"{topic}/q", qos=1, extra=[*session, "-C", "3", "-W", "5"],
                wait_subscribed=False)
    got = back.expect(3)
    assert [(m.payload, m.qos) for m in got] == [(f"queued-{i}", 1) for i in range(3)]
    assert back.wait_exit() == 0


@pytest.mark.parametrize("version", VERSIONS)
@TRANSPORTS
def test_cli_will_on_kill(broker, subs, clients, topic, version, tls):
    """A killed mosquitto_sub's will is published; a normally exiting one's is not."""
    watcher = clients(version)
    watcher.connect()
    watcher.subscribe(f"{topic}/will", qos=1)
    will = ["--will-topic", f"{topic}/will", "--will-payload", "cli died", "--will-qos", "1"]
    dying = subs(broker, version, tls, f"{topic}/x", qos=1, extra=will)
    dying.kill()
    msg = watcher.expect_one()
    assert (msg.payload, msg.qos) == (b"cli died", 1)

    polite = subs(broker, version, tls, f"{topic}/x", qos=1, extra=[*will, "-C", "1", "-W", "5"])
    mosquitto_pub(broker, version, tls, f"{topic}/x", "bye", qos=1)
    assert polite.expect(1)[0].payload == "bye"
    assert polite.wait_exit() == 0
    watcher.expect_none(1.0)


@TRANSPORTS
def test_cli_v5_user_properties(broker, subs, clients, topic, tls):
    sub = subs(broker, "v5", tls, f"{topic}/p", qos=1)
    psub = clients("v5")
    psub.connect()
    psub.subscribe(f"{topic}/p", qos=1)
    mosquitto_pub(broker, "v5", tls, f"{topic}/p", "with props", qos=1,
                  extra=["-D", "publish", "user-property", "site", "lab-1"])
    msg = sub.expect(1)[0]
    assert (msg.payload, msg.user_properties) == ("with props", "site:lab-1")
    got = psub.expect_one()
    assert got.prop("UserProperty") == [("site", "lab-1")]


@pytest.mark.parametrize("version", VERSIONS)
def test_cli_dollar_topic_not_matched(broker, subs, topic, version):
    everything = subs(broker, version, False, "#", qos=1)
    dollar = f"$test{topic.split('/')[1]}/x"
    mosquitto_pub(broker, version, False, dollar, "hidden", qos=1)
    mosquitto_pub(broker, version, False, f"{topic}/x", "visible", qos=1)
    msg = everything.expect(1)[0]
    assert msg.topic == f"{topic}/x"
    everything.expect_none()

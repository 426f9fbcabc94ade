//! The client side of an MQTT 5 test conversation (feature `mqtt`): CONNECT and SUBSCRIBE
//! with their answers checked, for any test client that sends and receives packets its own
//! way (over TCP, TLS or an in-memory stream).

use beckon_mqtt::{
    Connect, Packet, Properties, ProtocolVersion, QoS, Subscribe, Subscription, SubscriptionOptions,
};

/// A test's MQTT 5 client: it sends and receives packets; the handshakes come with it.
pub trait TestClient {
    /// Sends one packet; fails the test when it cannot.
    fn send_packet(&mut self, packet: Packet) -> impl Future<Output = ()>;

    /// The next packet; fails the test when none comes within the client's wait.
    fn recv_packet(&mut self) -> impl Future<Output = Packet>;

    /// Keeps a packet that arrived while an answer was awaited. By default such a packet
    /// fails the test.
    fn hold(&mut self, packet: Packet) {
        panic!("{packet:?} while waiting for an answer");
    }

    /// CONNECT as `client_id` (clean start, keepalive 60 s); fails the test unless the
    /// CONNACK accepts it.
    fn connect_as(&mut self, client_id: &str) -> impl Future<Output = ()> {
        async move {
            let connect = Connect::new(ProtocolVersion::V5, client_id, 60);
            self.send_packet(Packet::Connect(Box::new(connect))).await;
            match self.recv_packet().await {
                Packet::ConnAck(a) => assert!(!a.code.is_error(), "{client_id} refused: {a:?}"),
                other => panic!("{client_id}: {other:?} instead of a CONNACK"),
            }
        }
    }

    /// SUBSCRIBE to `filter` at QoS 1 as `packet_id`; fails the test unless the SUBACK
    /// grants it. What comes before the SUBACK goes to [`TestClient::hold`].
    fn subscribe_qos1(&mut self, packet_id: u16, filter: &str) -> impl Future<Output = ()> {
        async move {
            self.send_packet(Packet::Subscribe(Subscribe {
                packet_id,
                subscriptions: vec![Subscription {
                    filter: filter.into(),
                    options: SubscriptionOptions {
                        qos: QoS::AtLeastOnce,
                        ..SubscriptionOptions::default()
                    },
                }],
                properties: Properties::default(),
            }))
            .await;
            loop {
                match self.recv_packet().await {
                    Packet::SubAck(s) if s.packet_id == packet_id => {
                        assert!(
                            s.codes.iter().all(|c| !c.is_error()),
                            "subscription to {filter} refused: {s:?}"
                        );
                        return;
                    }
                    other => self.hold(other),
                }
            }
        }
    }
}

//! Connect-rate limits through the real server on 127.0.0.1:0 (plain listener, anonymous
//! clients): a burst over the rate gets 0x9F, clients already connected are still served.
//! Every wait is bounded.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use beckon_broker::{BrokerConfig, Listen, Server};
use beckon_mqtt::{Connect, Packet, ProtocolVersion, ReasonCode};
use tokio::net::TcpStream;

use common::{Client, WAIT};

impl Client<TcpStream> {
    async fn open(addr: SocketAddr, version: ProtocolVersion) -> Self {
        let tcp = tokio::time::timeout(WAIT, TcpStream::connect(addr))
            .await
            .expect("connect in time")
            .expect("connect");
        Self::new(tcp, version)
    }

    async fn connect(&mut self, id: &str) -> ReasonCode {
        self.send(&Packet::Connect(Box::new(Connect::new(
            self.version,
            id,
            60,
        ))))
        .await;
        match self.recv().await {
            Some(Packet::ConnAck(ack)) => ack.code,
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn a_connect_burst_over_the_rate_gets_0x9f_and_connected_clients_are_still_served() {
    let dir = tempfile::tempdir().expect("tmp");
    let mut config = BrokerConfig {
        data_dir: dir.path().join("data"),
        allow_anonymous: true,
        ..BrokerConfig::default()
    };
    config.listeners.mqtts = Listen(None);
    config.listeners.mqtt = Listen(Some("127.0.0.1:0".parse().expect("addr")));
    config.limits.connect_rate = 2;
    config.limits.connect_burst = 5;
    let (bound, handle) = Server::bind(config).await.expect("starts");
    let addr = bound.mqtt.expect("plain");

    let mut settled = Client::open(addr, ProtocolVersion::V5).await;
    assert_eq!(settled.connect("settled").await, ReasonCode::SUCCESS);

    let mut codes = Vec::new();
    for i in 0..20 {
        let version = if i % 2 == 0 {
            ProtocolVersion::V5
        } else {
            ProtocolVersion::V311
        };
        let mut c = Client::open(addr, version).await;
        codes.push((version, c.connect(&format!("burst-{i}")).await));
    }
    let refused: Vec<_> = codes
        .iter()
        .filter(|(_, c)| *c != ReasonCode::SUCCESS)
        .collect();
    assert!(
        refused.len() >= 10,
        "a burst of 20 over a burst allowance of 5 is mostly refused: {codes:?}"
    );
    for (version, code) in &refused {
        match version {
            ProtocolVersion::V5 => assert_eq!(*code, ReasonCode::CONNECTION_RATE_EXCEEDED),
            // v3.1.1 return code 3, server unavailable.
            ProtocolVersion::V311 => assert_eq!(*code, ReasonCode(3)),
        }
    }

    // The client connected before the burst is still served.
    settled.send(&Packet::PingReq).await;
    assert_eq!(settled.recv().await, Some(Packet::PingResp));

    // After a pause the rate admits connections again.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let mut later = Client::open(addr, ProtocolVersion::V5).await;
    assert_eq!(later.connect("later").await, ReasonCode::SUCCESS);

    tokio::time::timeout(WAIT, handle.shutdown())
        .await
        .expect("shutdown in time")
        .expect("clean");
}

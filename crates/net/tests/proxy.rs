//! HTTP CONNECT through a real proxy (Debian's tinyproxy, started by the test) and through a
//! scripted proxy that demands authentication.

mod support;

use beckon_net::{PrefixedStream, ProxyError, http_connect};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Asks `proxy` for a tunnel to `port` on 127.0.0.1.
async fn connect_through(
    proxy: &Tinyproxy,
    port: u16,
) -> Result<PrefixedStream<TcpStream>, ProxyError> {
    let tcp = TcpStream::connect(("127.0.0.1", proxy.port))
        .await
        .expect("connect to tinyproxy");
    http_connect(tcp, &proxy_url(proxy).to_string(), "127.0.0.1", port, WAIT).await
}

#[tokio::test]
async fn tinyproxy_tunnels_to_an_allowed_port() {
    let (echo, _task) = start_echo_server().await;
    let proxy = Tinyproxy::start(&[echo.port()]);
    let mut tunnel = connect_through(&proxy, echo.port())
        .await
        .unwrap_or_else(|e| panic!("tunnel: {e}\ntinyproxy said:\n{}", proxy.output()));
    tunnel.write_all(b"through the proxy").await.expect("write");
    let mut back = [0u8; 17];
    tokio::time::timeout(WAIT, tunnel.read_exact(&mut back))
        .await
        .expect("in time")
        .expect("echo");
    assert_eq!(&back, b"through the proxy");
}

#[tokio::test]
async fn tinyproxy_forbidding_the_port_is_explained() {
    let (echo, _task) = start_echo_server().await;
    let allowed = refused_port();
    let proxy = Tinyproxy::start(&[allowed]);
    let err = connect_through(&proxy, echo.port())
        .await
        .expect_err("port not allowed");
    assert!(matches!(err, ProxyError::Forbidden { .. }), "{err}");
    let text = err.to_string();
    assert!(text.contains("403"), "{text}");
    assert!(
        text.contains(&format!("allow CONNECT to port {}", echo.port())),
        "{text}"
    );
    assert!(text.contains("squid"), "{text}");
}

#[tokio::test]
async fn a_proxy_asking_for_credentials_is_unsupported() {
    let (addr, _task) = start_scripted_server(
        b"HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic realm=\"corp\"\r\nContent-Length: 0\r\n\r\n",
    )
    .await;
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let err = http_connect(tcp, "http://corp-proxy:3128", "broker.example", 8883, WAIT)
        .await
        .expect_err("407");
    assert!(
        matches!(err, ProxyError::AuthenticationRequired { .. }),
        "{err}"
    );
    assert!(
        err.to_string()
            .contains("the proxy http://corp-proxy:3128 requires authentication, which Beckon does not support"),
        "{err}"
    );
}

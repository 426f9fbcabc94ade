//! HTTP CONNECT through real proxies (Debian's tinyproxy, and squid demanding Basic
//! authentication, started by the test) and through a scripted proxy that demands
//! authentication.

mod support;

use beckon_net::{PrefixedStream, ProxyError, ProxyUrl, http_connect};
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
    http_connect(tcp, &proxy_url(proxy), "127.0.0.1", port, WAIT).await
}

/// Asks squid for a tunnel to `port` on 127.0.0.1 as `url` (with its credentials, if any).
async fn connect_through_squid(
    squid: &Squid,
    url: &ProxyUrl,
    port: u16,
) -> Result<PrefixedStream<TcpStream>, ProxyError> {
    let tcp = TcpStream::connect(("127.0.0.1", squid.port))
        .await
        .expect("connect to squid");
    http_connect(tcp, url, "127.0.0.1", port, WAIT).await
}

/// Writes through `tunnel` and expects the echo back.
async fn assert_echoes(tunnel: &mut PrefixedStream<TcpStream>) {
    tunnel.write_all(b"through the proxy").await.expect("write");
    let mut back = [0u8; 17];
    tokio::time::timeout(WAIT, tunnel.read_exact(&mut back))
        .await
        .expect("in time")
        .expect("echo");
    assert_eq!(&back, b"through the proxy");
}

#[tokio::test]
async fn squid_with_basic_authentication_tunnels_for_the_right_credentials_only() {
    let (echo, _task) = start_echo_server().await;
    let squid = Squid::start("agent", "pa:ss@word", &[echo.port()]);
    let base = ProxyUrl::new("127.0.0.1", squid.port);
    let right: ProxyUrl = format!("http://agent:pa%3Ass%40word@127.0.0.1:{}", squid.port)
        .parse()
        .expect("proxy address");
    let mut tunnel = connect_through_squid(&squid, &right, echo.port())
        .await
        .unwrap_or_else(|e| panic!("tunnel: {e}\nsquid said:\n{}", squid.output()));
    assert_echoes(&mut tunnel).await;

    let wrong = base.clone().with_credentials("agent", "guess");
    let err = connect_through_squid(&squid, &wrong, echo.port())
        .await
        .expect_err("wrong password");
    assert!(
        matches!(err, ProxyError::CredentialsRefused { .. }),
        "{err}"
    );
    let text = err.to_string();
    assert!(
        text.contains("refused the credentials of user \"agent\"") && !text.contains("guess"),
        "{text}"
    );

    let err = connect_through_squid(&squid, &base, echo.port())
        .await
        .expect_err("no credentials");
    assert!(
        matches!(err, ProxyError::AuthenticationRequired { .. }),
        "{err}"
    );
    assert!(
        err.to_string().contains("http://user:password@host:port"),
        "{err}"
    );
}

#[tokio::test]
async fn tinyproxy_tunnels_to_an_allowed_port() {
    let (echo, _task) = start_echo_server().await;
    let proxy = Tinyproxy::start(&[echo.port()]);
    let mut tunnel = connect_through(&proxy, echo.port())
        .await
        .unwrap_or_else(|e| panic!("tunnel: {e}\ntinyproxy said:\n{}", proxy.output()));
    assert_echoes(&mut tunnel).await;
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
async fn a_proxy_asking_for_credentials_says_how_to_give_them() {
    let (addr, _task) = start_scripted_server(
        b"HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic realm=\"corp\"\r\nContent-Length: 0\r\n\r\n",
    )
    .await;
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let corp = ProxyUrl::new("corp-proxy", 3128);
    let err = http_connect(tcp, &corp, "broker.example", 8883, WAIT)
        .await
        .expect_err("407");
    assert!(
        matches!(err, ProxyError::AuthenticationRequired { .. }),
        "{err}"
    );
    assert!(
        err.to_string()
            .contains("the proxy http://corp-proxy:3128 requires authentication (407): give its user name and password"),
        "{err}"
    );
}

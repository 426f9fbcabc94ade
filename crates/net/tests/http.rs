//! The HTTP client against scripted servers: through tinyproxy, over TLS, chunked answers,
//! kept-alive connections, an answer over the size limit and a server that never answers.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use beckon_net::http::{HttpClient, HttpError, HttpSettings, Request, Url};
use beckon_net::{TlsClient, TlsSettings, TrustAnchors};
use support::*;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

/// A server on loopback answering every request of every connection with `answer`; the
/// request heads (and bodies) it read arrive on the receiver.
async fn http_server(answer: &'static [u8]) -> (SocketAddr, mpsc::UnboundedReceiver<String>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("address");
    let (seen, requests) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(serve_requests(tcp, answer, seen.clone()));
        }
    });
    (addr, requests)
}

async fn serve_requests<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    answer: &'static [u8],
    seen: mpsc::UnboundedSender<String>,
) {
    let mut buf = Vec::new();
    loop {
        let Some(request) = read_request(&mut stream, &mut buf).await else {
            return;
        };
        let _ = seen.send(request);
        if stream.write_all(answer).await.is_err() {
            return;
        }
    }
}

/// One request (head and `Content-Length` body) from `stream`, what follows kept in `buf`.
async fn read_request<S: AsyncRead + Unpin>(stream: &mut S, buf: &mut Vec<u8>) -> Option<String> {
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end + 4]).into_owned();
            let length = head
                .lines()
                .find_map(|l| {
                    let (name, value) = l.split_once(':')?;
                    name.eq_ignore_ascii_case("content-length")
                        .then(|| value.trim().parse::<usize>().ok())?
                })
                .unwrap_or(0);
            if buf.len() >= end + 4 + length {
                let whole: Vec<u8> = buf.drain(..end + 4 + length).collect();
                return Some(String::from_utf8_lossy(&whole).into_owned());
            }
        }
        let mut chunk = [0u8; 4096];
        match tokio::time::timeout(WAIT, stream.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
            _ => return None,
        }
    }
}

fn url(addr: SocketAddr, path: &str) -> Url {
    Url::parse(&format!("http://{addr}{path}")).expect("url")
}

const OK_JSON: &[u8] =
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n{\"ok\":true}";

#[tokio::test]
async fn a_request_through_tinyproxy_reaches_the_server() {
    let (server, mut requests) = http_server(OK_JSON).await;
    let proxy = Tinyproxy::start(&[server.port()]);
    let client = HttpClient::new(HttpSettings {
        proxy: Some(proxy_url(&proxy)),
        ..HttpSettings::default()
    });
    let request = Request::new("POST")
        .expect("method")
        .header("Authorization", "Bearer secret")
        .json(&b"{\"hello\":1}"[..]);
    let answer = client
        .request(&url(server, "/api/v1/agents/a1/checkin"), request, WAIT)
        .await
        .unwrap_or_else(|e| {
            panic!(
                "through the proxy: {e}\ntinyproxy said:\n{}",
                proxy.output()
            )
        });
    assert_eq!(answer.status, 200);
    assert_eq!(answer.body, b"{\"ok\":true}");
    assert_eq!(answer.header("content-type"), Some("application/json"));
    let seen = requests.recv().await.expect("the server saw the request");
    assert!(
        seen.starts_with("POST /api/v1/agents/a1/checkin HTTP/1.1\r\n"),
        "{seen}"
    );
    let lower = seen.to_ascii_lowercase();
    assert!(lower.contains(&format!("host: {server}\r\n")), "{seen}");
    assert!(lower.contains("authorization: bearer secret\r\n"), "{seen}");
    assert!(
        lower.contains("content-type: application/json\r\n"),
        "{seen}"
    );
    assert!(seen.ends_with("\r\n\r\n{\"hello\":1}"), "{seen}");
}

#[tokio::test]
async fn a_proxy_forbidding_the_port_is_the_proxy_error() {
    let (server, _requests) = http_server(OK_JSON).await;
    let proxy = Tinyproxy::start(&[refused_port()]);
    let client = HttpClient::new(HttpSettings {
        proxy: Some(proxy_url(&proxy)),
        ..HttpSettings::default()
    });
    let err = client
        .request(&url(server, "/"), Request::get(), WAIT)
        .await
        .expect_err("the proxy forbids the port");
    assert!(matches!(err, HttpError::Proxy(_)), "{err}");
    assert!(err.to_string().contains("403"), "{err}");
}

#[tokio::test]
async fn chunked_answers_are_put_back_together() {
    static CHUNKED: &[u8] = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;ext=1\r\nde\r\n0\r\n\r\n";
    let (server, _requests) = http_server(CHUNKED).await;
    let client = HttpClient::new(HttpSettings::default());
    let answer = client
        .request(&url(server, "/"), Request::get(), WAIT)
        .await
        .expect("chunked answer");
    assert_eq!(
        (answer.status, answer.body.as_slice()),
        (200, &b"abcde"[..])
    );
}

#[tokio::test]
async fn a_kept_alive_connection_serves_requests_one_after_another() {
    let (server, mut requests) = http_server(OK_JSON).await;
    let client = HttpClient::new(HttpSettings::default());
    let mut conn = client.connect(&url(server, "/")).await.expect("connect");
    for path in ["/one", "/two"] {
        let answer = conn.send(path, Request::get(), WAIT).await.expect("answer");
        assert_eq!(answer.status, 200);
        let seen = requests.recv().await.expect("request");
        assert!(seen.starts_with(&format!("GET {path} HTTP/1.1")), "{seen}");
    }
    assert!(!conn.is_closed());
}

#[tokio::test]
async fn an_answer_over_the_size_limit_is_refused() {
    static ANNOUNCED: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 2048\r\n\r\n";
    // 0x400 = 1,024 bytes in one chunk, no length announced.
    let chunked = format!(
        "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n400\r\n{}\r\n0\r\n\r\n",
        "x".repeat(1024)
    );
    let chunked: &'static [u8] = Box::leak(chunked.into_bytes().into_boxed_slice());
    let client = HttpClient::new(HttpSettings {
        max_body: 1000,
        ..HttpSettings::default()
    });
    for answer in [ANNOUNCED, chunked] {
        let (server, _requests) = http_server(answer).await;
        let err = client
            .request(&url(server, "/big"), Request::get(), WAIT)
            .await
            .expect_err("over the limit");
        assert!(
            matches!(err, HttpError::TooLarge { limit: 1000, .. }),
            "{err}"
        );
        let text = err.to_string();
        assert!(text.contains("larger than 1000 bytes"), "{text}");
        assert!(text.contains("/big"), "{text}");
    }
}

#[tokio::test]
async fn a_server_that_never_answers_hits_the_time_limit() {
    let (silent, _task) = start_silent_server().await;
    let client = HttpClient::new(HttpSettings::default());
    let limit = Duration::from_millis(300);
    let started = Instant::now();
    let err = client
        .request(&url(silent, "/"), Request::get(), limit)
        .await
        .expect_err("no answer");
    assert!(
        matches!(err, HttpError::TimedOut { after, .. } if after == limit),
        "{err}"
    );
    assert!(started.elapsed() < WAIT, "took {:?}", started.elapsed());
    assert!(err.to_string().contains("no complete answer"), "{err}");
}

#[tokio::test]
async fn an_answer_that_is_not_http_is_named() {
    let (server, _task) = start_scripted_server(b"SSH-2.0-OpenSSH_9.6\r\n\r\n").await;
    let client = HttpClient::new(HttpSettings::default());
    let err = client
        .request(&url(server, "/"), Request::get(), WAIT)
        .await
        .expect_err("not HTTP");
    assert!(matches!(err, HttpError::NotHttp { .. }), "{err}");
}

#[tokio::test]
async fn https_uses_the_configured_ca() {
    let ca = TestCa::new("http test CA");
    let config = Arc::new(server_config(ca.server_cert(&["localhost"]), &["http/1.1"]));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("address");
    let (seen, mut requests) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = tokio_rustls::TlsAcceptor::from(config.clone());
            let seen = seen.clone();
            tokio::spawn(async move {
                if let Ok(tls) = acceptor.accept(tcp).await {
                    serve_requests(tls, OK_JSON, seen).await;
                }
            });
        }
    });
    let dir = tempfile::tempdir().expect("dir");
    let tls = TlsClient::new(&TlsSettings {
        trust: TrustAnchors::CaFile(ca.write_pem(dir.path(), "ca.pem")),
        ..TlsSettings::default()
    })
    .expect("tls client");
    let client = HttpClient::new(HttpSettings {
        tls: Some(Arc::new(tls)),
        ..HttpSettings::default()
    });
    let https = Url::parse(&format!("https://localhost:{}/x", addr.port())).expect("url");
    let answer = client
        .request(&https, Request::get(), WAIT)
        .await
        .expect("over TLS");
    assert_eq!(answer.body, b"{\"ok\":true}");
    assert!(
        requests
            .recv()
            .await
            .expect("request")
            .starts_with("GET /x ")
    );

    let untrusting = HttpClient::new(HttpSettings::default());
    let err = untrusting
        .request(&https, Request::get(), WAIT)
        .await
        .expect_err("no TLS client");
    assert!(matches!(err, HttpError::NoTls(_)), "{err}");
}

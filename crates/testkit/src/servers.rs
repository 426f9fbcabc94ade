//! Scripted TCP servers: one that answers with fixed bytes, one that never says anything (the
//! failure cases), and one that echoes what it gets.

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::WAIT;

/// A TCP server on loopback that answers every connection with `answer` (after reading the
/// request's first bytes: a ClientHello or a CONNECT) and closes. Stops when the task is
/// aborted or dropped with the runtime.
pub async fn start_scripted_server(
    answer: &'static [u8],
) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    serve_each(move |mut tcp| async move {
        let mut buf = [0u8; 4096];
        let _ = tokio::time::timeout(WAIT, tcp.read(&mut buf)).await;
        let _ = tcp.write_all(answer).await;
        let _ = tcp.shutdown().await;
    })
    .await
}

/// A TCP server on loopback that sends back what it receives, on every connection (each for
/// at most [`WAIT`]).
pub async fn start_echo_server() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    serve_each(|mut tcp| async move {
        let (mut r, mut w) = tcp.split();
        let _ = tokio::time::timeout(WAIT, tokio::io::copy(&mut r, &mut w)).await;
    })
    .await
}

/// A TCP server on loopback handing every connection to `session` on a task of its own;
/// stops when its task is aborted or dropped with the runtime.
async fn serve_each<F, S>(session: F) -> (SocketAddr, tokio::task::JoinHandle<()>)
where
    F: Fn(TcpStream) -> S + Copy + Send + 'static,
    S: Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("address");
    let task = tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(session(tcp));
        }
    });
    (addr, task)
}

/// A TCP server on loopback that accepts and never says anything; it holds every connection
/// until the task ends.
pub async fn start_silent_server() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("address");
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            held.push(tcp);
        }
    });
    (addr, task)
}

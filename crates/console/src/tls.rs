//! Serving the API over HTTPS (or plain HTTP on loopback).
//!
//! TLS handshakes run in their own tasks, each with a timeout, and finished streams are
//! handed to axum through a channel-backed [`Listener`](axum::serve::Listener): a slow or
//! silent client never holds up the accept loop.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use beckon_pki::CertificateAuthority;
use rustls::ServerConfig;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

use crate::{ConsoleConfig, ConsoleError};

/// How long a client may take for its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The HTTPS configuration: the given files, or a certificate issued by the console's CA
/// for the configured names (`console-https.pem`, `console-https.key`), made on first start.
pub(crate) fn server_config(
    config: &ConsoleConfig,
    ca: &CertificateAuthority,
) -> Result<Arc<ServerConfig>, ConsoleError> {
    let (cert, key) = match &config.tls_files {
        Some((c, k)) => (c.clone(), k.clone()),
        None => {
            let cert = config.data_dir.join("console-https.pem");
            let key = config.data_dir.join("console-https.key");
            if !cert.exists() || !key.exists() {
                ca.issue_server(
                    &config.server_names,
                    Duration::from_secs(2 * 365 * 24 * 3600),
                )?
                .save(&cert, &key)?;
            }
            (cert, key)
        }
    };
    let files = beckon_pki::TlsFiles {
        cert,
        key,
        client_ca: None,
    };
    let options = beckon_pki::ServerTlsOptions {
        alpn: vec![b"http/1.1".to_vec()],
        ..Default::default()
    };
    Ok(Arc::new(beckon_pki::server_config(&files, &options)?))
}

struct TlsListener {
    rx: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    addr: SocketAddr,
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.rx.recv().await {
            Some(conn) => conn,
            // The accept task ended (shutdown): wait for axum's graceful shutdown.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.addr)
    }
}

/// Serves `router` until `shutdown` turns true.
pub(crate) async fn serve(
    listener: TcpListener,
    tls: Option<Arc<ServerConfig>>,
    router: axum::Router,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut stop = shutdown.clone();
    let stopped = async move {
        let _ = crate::dispatch::stopped(&mut stop).await;
    };
    let app = router.into_make_service();
    let result = match tls {
        None => {
            axum::serve(listener, app)
                .with_graceful_shutdown(stopped)
                .await
        }
        Some(config) => {
            let addr = match listener.local_addr() {
                Ok(a) => a,
                Err(e) => {
                    tracing::error!(error = %e, "console listener has no address");
                    return;
                }
            };
            let (tx, rx) = mpsc::channel(64);
            let acceptor = TlsAcceptor::from(config);
            tokio::spawn(async move {
                loop {
                    let accepted = tokio::select! {
                        a = listener.accept() => a,
                        _ = crate::dispatch::stopped(&mut shutdown) => return,
                    };
                    let (tcp, peer) = match accepted {
                        Ok(a) => a,
                        Err(e) => {
                            // Out of file descriptors and the like: slow down, never spin.
                            tracing::warn!(error = %e, "console accept failed");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            continue;
                        }
                    };
                    let acceptor = acceptor.clone();
                    let tx = tx.clone();
                    tokio::spawn(async move {
                        match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                            Ok(Ok(stream)) => {
                                let _ = tx.send((stream, peer)).await;
                            }
                            Ok(Err(e)) => {
                                tracing::debug!(%peer, error = %e, "TLS handshake failed")
                            }
                            Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                        }
                    });
                }
            });
            axum::serve(TlsListener { rx, addr }, app)
                .with_graceful_shutdown(stopped)
                .await
        }
    };
    if let Err(e) = result {
        tracing::error!(error = %e, "console HTTP server stopped");
    }
}

//! Name resolution and TCP connect, each bounded by a timeout and reported on its own.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tokio::net::{TcpSocket, TcpStream};

/// How to open a TCP connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcpOptions {
    /// How long one connect attempt (to one address) may take. Default 10 s.
    pub connect_timeout: Duration,
    /// Local source address to bind before connecting (port chosen by the system). Load
    /// generators spread their connections over 127.0.0.x this way. Default: none.
    pub local_addr: Option<IpAddr>,
    /// Disable Nagle's algorithm: MQTT packets are small and latency matters. Default true.
    pub nodelay: bool,
}

impl Default for TcpOptions {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(10),
            local_addr: None,
            nodelay: true,
        }
    }
}

/// Name resolution failed.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    /// The resolver answered that the name does not exist, or could not be asked.
    #[error(
        "the name {host} does not resolve ({detail}): check the spelling, and that this machine's DNS server knows it"
    )]
    NoSuchName {
        /// The name that was looked up.
        host: String,
        /// What the system resolver said.
        detail: String,
    },
    /// The resolver answered with no address at all.
    #[error("the name {host} resolves to no address: add an A or AAAA record for it")]
    NoAddresses {
        /// The name that was looked up.
        host: String,
    },
    /// The resolver did not answer in time.
    #[error(
        "resolving {host} took longer than {} s: the DNS server is slow or unreachable",
        after.as_secs_f32()
    )]
    TimedOut {
        /// The name that was looked up.
        host: String,
        /// The timeout that expired.
        after: Duration,
    },
    /// The host name is empty.
    #[error("no host name given: set the broker's (or proxy's) host name")]
    EmptyHost,
}

/// A TCP connect failed.
#[derive(Debug, thiserror::Error)]
pub enum TcpError {
    /// The peer answered with a reset: nothing listens on that port, or a firewall rejects it.
    #[error(
        "port {} refused by {}: nothing listens there, or a firewall rejects the connection",
        addr.port(), addr.ip()
    )]
    Refused {
        /// The address that refused.
        addr: SocketAddr,
    },
    /// No answer in time: often a firewall that drops packets silently.
    #[error(
        "no answer from {} on port {} within {} s: a firewall probably drops the packets",
        addr.ip(), addr.port(), after.as_secs_f32()
    )]
    TimedOut {
        /// The address that did not answer.
        addr: SocketAddr,
        /// The timeout that expired.
        after: Duration,
    },
    /// There is no route to the address.
    #[error("{addr} is unreachable from this machine ({source}): check the network and routing")]
    Unreachable {
        /// The unreachable address.
        addr: SocketAddr,
        /// The system's error.
        source: io::Error,
    },
    /// The configured local source address could not be bound.
    #[error(
        "cannot use local source address {local} ({source}): it must be an address of this machine"
    )]
    LocalBind {
        /// The local address asked for.
        local: IpAddr,
        /// The system's error.
        source: io::Error,
    },
    /// The resolved addresses are all of another family than the local source address.
    #[error(
        "{host} has no address of the same family as the local source address {local} (IPv4/IPv6)"
    )]
    NoUsableAddress {
        /// The host that was resolved.
        host: String,
        /// The local address asked for.
        local: IpAddr,
    },
    /// Any other system error while connecting.
    #[error("TCP connect to {addr} failed: {source}")]
    Io {
        /// The address tried.
        addr: SocketAddr,
        /// The system's error.
        source: io::Error,
    },
}

/// Resolves `host` (a name or an IP literal) to socket addresses, within `timeout`.
///
/// IP literals (IPv6 with or without brackets) are returned without asking a resolver.
pub async fn resolve(
    host: &str,
    port: u16,
    timeout: Duration,
) -> Result<Vec<SocketAddr>, ResolveError> {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    if bare.is_empty() {
        return Err(ResolveError::EmptyHost);
    }
    if let Ok(ip) = bare.parse::<IpAddr>() {
        return Ok(vec![SocketAddr::new(ip, port)]);
    }
    let lookup = tokio::net::lookup_host((bare, port));
    match tokio::time::timeout(timeout, lookup).await {
        Err(_) => Err(ResolveError::TimedOut {
            host: bare.to_owned(),
            after: timeout,
        }),
        Ok(Err(e)) => Err(ResolveError::NoSuchName {
            host: bare.to_owned(),
            detail: e.to_string(),
        }),
        Ok(Ok(addrs)) => {
            let addrs: Vec<SocketAddr> = addrs.collect();
            if addrs.is_empty() {
                Err(ResolveError::NoAddresses {
                    host: bare.to_owned(),
                })
            } else {
                Ok(addrs)
            }
        }
    }
}

/// Connects to the first of `addrs` that answers, trying them in order, each attempt bounded
/// by `options.connect_timeout`. Returns the stream and the address it reached; on failure,
/// the error of the last address tried. `host` names the target in error messages.
pub async fn connect_addrs(
    host: &str,
    addrs: &[SocketAddr],
    options: &TcpOptions,
) -> Result<(TcpStream, SocketAddr), TcpError> {
    let usable: Vec<SocketAddr> = match options.local_addr {
        Some(local) => addrs
            .iter()
            .copied()
            .filter(|a| a.is_ipv4() == local.is_ipv4())
            .collect(),
        None => addrs.to_vec(),
    };
    let mut last_error = None;
    for addr in usable {
        match connect_one(addr, options).await {
            Ok(stream) => return Ok((stream, addr)),
            // A bad local address fails the same way for every target: stop here.
            Err(e @ TcpError::LocalBind { .. }) => return Err(e),
            Err(e) => {
                tracing::debug!(%addr, error = %e, "TCP connect attempt failed");
                last_error = Some(e);
            }
        }
    }
    Err(match (last_error, options.local_addr) {
        (Some(e), _) => e,
        (None, Some(local)) => TcpError::NoUsableAddress {
            host: host.to_owned(),
            local,
        },
        // resolve() never returns an empty list; an empty slice from a caller lands here.
        (None, None) => TcpError::NoUsableAddress {
            host: host.to_owned(),
            local: IpAddr::from([0, 0, 0, 0]),
        },
    })
}

async fn connect_one(addr: SocketAddr, options: &TcpOptions) -> Result<TcpStream, TcpError> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(|source| TcpError::Io { addr, source })?;
    if let Some(local) = options.local_addr {
        socket
            .bind(SocketAddr::new(local, 0))
            .map_err(|source| TcpError::LocalBind { local, source })?;
    }
    let stream = match tokio::time::timeout(options.connect_timeout, socket.connect(addr)).await {
        Err(_) => {
            return Err(TcpError::TimedOut {
                addr,
                after: options.connect_timeout,
            });
        }
        Ok(Err(source)) => return Err(classify_connect_error(addr, source)),
        Ok(Ok(stream)) => stream,
    };
    if options.nodelay {
        // Only a latency optimisation: a failure here does not make the connection unusable.
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(%addr, error = %e, "could not set TCP_NODELAY");
        }
    }
    Ok(stream)
}

fn classify_connect_error(addr: SocketAddr, source: io::Error) -> TcpError {
    match source.kind() {
        io::ErrorKind::ConnectionRefused => TcpError::Refused { addr },
        io::ErrorKind::TimedOut => TcpError::TimedOut {
            addr,
            after: Duration::ZERO,
        },
        io::ErrorKind::NetworkUnreachable | io::ErrorKind::HostUnreachable => {
            TcpError::Unreachable { addr, source }
        }
        _ => TcpError::Io { addr, source },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn ip_literals_resolve_without_a_resolver() {
        let v4 = resolve("127.0.0.1", 8883, Duration::from_secs(1))
            .await
            .expect("literal");
        assert_eq!(v4, vec!["127.0.0.1:8883".parse().expect("addr")]);
        let v6 = resolve("[::1]", 443, Duration::from_secs(1))
            .await
            .expect("literal");
        assert_eq!(v6, vec!["[::1]:443".parse().expect("addr")]);
    }

    #[tokio::test]
    async fn localhost_resolves() {
        let addrs = resolve("localhost", 80, Duration::from_secs(5))
            .await
            .expect("localhost resolves");
        assert!(addrs.iter().all(|a| a.ip().is_loopback()), "{addrs:?}");
    }

    #[tokio::test]
    async fn unknown_name_is_reported_as_not_resolving() {
        // `.invalid` is reserved (RFC 2606) and never resolves; the lookup stays local when
        // no DNS server is reachable, and the timeout bounds it otherwise.
        let err = resolve("no-such-host.invalid", 8883, Duration::from_secs(10))
            .await
            .expect_err("must not resolve");
        let text = err.to_string();
        assert!(
            matches!(
                err,
                ResolveError::NoSuchName { .. } | ResolveError::TimedOut { .. }
            ),
            "{text}"
        );
        assert!(text.contains("no-such-host.invalid"), "{text}");
    }

    #[tokio::test]
    async fn empty_host_is_an_error() {
        let err = resolve("", 8883, Duration::from_secs(1))
            .await
            .expect_err("empty");
        assert!(matches!(err, ResolveError::EmptyHost));
    }

    #[tokio::test]
    async fn refused_port_is_named() {
        let port = crate::test_support::refused_port();
        let addr: SocketAddr = SocketAddr::from(([127, 0, 0, 1], port));
        let err = connect_addrs("127.0.0.1", &[addr], &TcpOptions::default())
            .await
            .expect_err("refused");
        assert!(matches!(err, TcpError::Refused { .. }), "{err}");
        assert!(
            err.to_string()
                .contains(&format!("port {port} refused by 127.0.0.1")),
            "{err}"
        );
    }

    #[tokio::test]
    async fn connects_from_the_chosen_local_address() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let target = listener.local_addr().expect("addr");
        let options = TcpOptions {
            local_addr: Some(IpAddr::from([127, 0, 0, 7])),
            ..TcpOptions::default()
        };
        let targets = [target];
        let (accepted, connected) = tokio::join!(
            tokio::time::timeout(Duration::from_secs(5), listener.accept()),
            connect_addrs("127.0.0.1", &targets, &options)
        );
        let (_server_side, peer) = accepted.expect("accept in time").expect("accept");
        let (stream, reached) = connected.expect("connect");
        assert_eq!(reached, target);
        assert_eq!(peer.ip(), IpAddr::from([127, 0, 0, 7]));
        assert_eq!(
            stream.local_addr().expect("local").ip(),
            IpAddr::from([127, 0, 0, 7])
        );
    }

    #[tokio::test]
    async fn local_address_of_other_family_is_reported() {
        let options = TcpOptions {
            local_addr: Some("::1".parse().expect("ip")),
            ..TcpOptions::default()
        };
        let err = connect_addrs("broker", &["127.0.0.1:1".parse().expect("addr")], &options)
            .await
            .expect_err("family mismatch");
        assert!(matches!(err, TcpError::NoUsableAddress { .. }), "{err}");
    }

    #[tokio::test]
    async fn unbindable_local_address_is_reported() {
        // 192.0.2.1 (TEST-NET-1) is not an address of this machine: bind fails locally, and
        // nothing is ever sent to it.
        let options = TcpOptions {
            local_addr: Some(IpAddr::from([192, 0, 2, 1])),
            ..TcpOptions::default()
        };
        let err = connect_addrs("broker", &["127.0.0.1:1".parse().expect("addr")], &options)
            .await
            .expect_err("cannot bind");
        assert!(matches!(err, TcpError::LocalBind { .. }), "{err}");
    }
}

//! The broker's TLS stream: rustls' unbuffered API over a `TcpStream`, holding no buffer
//! while the connection is idle.
//!
//! tokio-rustls drives rustls' buffered `ServerConnection`, which keeps a 4 KiB receive
//! buffer for the life of a connection once anything was read, and offers no way to release
//! it. With tens of thousands of idle agents that buffer was the largest single cost of a
//! connection. Here the socket is read into a stack buffer and rustls decrypts the records in
//! place; the heap holds only what is really pending: a partial record, decrypted bytes the
//! reader has not taken yet, and encrypted bytes the socket has not accepted yet. Each of
//! these is freed as soon as it is empty, so an idle connection keeps none of them.
//!
//! After a TLS 1.3 handshake, rustls' connection state is let go as well: its traffic
//! secrets go to the broker's own record layer ([`crate::tls13_records`]), which keeps only
//! the keys. TLS 1.2 connections stay with rustls to the end.

use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use rustls::server::{ServerConnectionData, UnbufferedServerConnection};
use rustls::unbuffered::{
    ConnectionState, EncodeError, EncodeTlsData, EncryptError, InsufficientSizeError,
    UnbufferedStatus, WriteTraffic,
};
use rustls::{ProtocolVersion, ServerConfig};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::tls13_records::Tls13Records;

/// Bytes read from the socket at once, on the stack: one whole TLS record of the largest
/// size (16 KiB of plaintext plus overhead) fits.
const READ_CHUNK: usize = 18 * 1024 + 64;
/// Received TLS bytes kept while waiting for the rest of a record or of a handshake flight.
/// rustls refuses records over 18 KiB and handshake messages over 64 KiB itself; this only
/// guards against a peer that feeds bytes rustls never consumes.
const MAX_PENDING_TLS: usize = 96 * 1024;
/// Plaintext encrypted per write call; what the socket does not take is kept until the next
/// write or flush, so this bounds the outgoing queue of a connection.
const MAX_WRITE: usize = 16 * 1024;

/// Who protects the records.
enum Engine {
    /// rustls: the handshake, and TLS 1.2 connections throughout.
    Rustls(Box<UnbufferedServerConnection>),
    /// The broker's TLS 1.3 record layer after the handshake.
    Tls13(Box<Tls13Records>),
}

/// A server-side TLS connection over TCP; see the module documentation.
pub(crate) struct TlsStream {
    tcp: TcpStream,
    engine: Engine,
    /// Received TLS bytes rustls has not consumed: a partial record, or during the handshake
    /// a partial flight. Empty, with no allocation, between whole records.
    incoming: Vec<u8>,
    /// Decrypted bytes the reader has not taken yet, from `plaintext_pos` on.
    plaintext: Vec<u8>,
    plaintext_pos: usize,
    /// Encrypted bytes the socket has not accepted yet, from `outgoing_pos` on.
    outgoing: Vec<u8>,
    outgoing_pos: usize,
    /// The peer ended its side (close_notify, or end of stream).
    read_closed: bool,
    /// Our close_notify is queued.
    close_notify_queued: bool,
}

impl std::fmt::Debug for TlsStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsStream")
            .field("tcp", &self.tcp)
            .field("handshaking", &self.is_handshaking())
            .field("incoming", &self.incoming.len())
            .field("plaintext", &(self.plaintext.len() - self.plaintext_pos))
            .field("outgoing", &(self.outgoing.len() - self.outgoing_pos))
            .finish_non_exhaustive()
    }
}

/// A connection after its handshake, with what the handshake settled.
pub(crate) struct Accepted {
    pub(crate) stream: TlsStream,
    /// The ALPN protocol agreed.
    pub(crate) alpn: Option<Vec<u8>>,
    /// The client's certificate (DER), when it sent one and it was verified.
    pub(crate) client_certificate: Option<Vec<u8>>,
}

/// Runs the TLS handshake on `tcp` with `config`. The caller bounds it in time.
///
/// With `config.enable_secret_extraction` set, a TLS 1.3 connection then continues on the
/// broker's own record layer; otherwise (and for TLS 1.2) rustls keeps the connection.
pub(crate) async fn accept(config: Arc<ServerConfig>, tcp: TcpStream) -> io::Result<Accepted> {
    let take_over = config.enable_secret_extraction;
    let conn = UnbufferedServerConnection::new(config).map_err(tls_error)?;
    let mut stream = TlsStream {
        tcp,
        engine: Engine::Rustls(Box::new(conn)),
        incoming: Vec::new(),
        plaintext: Vec::new(),
        plaintext_pos: 0,
        outgoing: Vec::new(),
        outgoing_pos: 0,
        read_closed: false,
        close_notify_queued: false,
    };
    std::future::poll_fn(|cx| stream.poll_handshake(cx)).await?;
    let Engine::Rustls(conn) = stream.engine else {
        return Err(io::Error::other("TLS handshake state lost"));
    };
    let alpn = conn.alpn_protocol().map(<[u8]>::to_vec);
    let client_certificate = conn
        .peer_certificates()
        .and_then(|chain| chain.first())
        .map(|leaf| leaf.as_ref().to_vec());
    stream.engine = if take_over && conn.protocol_version() == Some(ProtocolVersion::TLSv1_3) {
        let (secrets, kernel) = conn.dangerous_into_kernel_connection().map_err(tls_error)?;
        Engine::Tls13(Box::new(
            Tls13Records::new(secrets, kernel).map_err(tls_error)?,
        ))
    } else {
        Engine::Rustls(conn)
    };
    Ok(Accepted {
        stream,
        alpn,
        client_certificate,
    })
}

/// What to do once rustls reaches the state in which application data may be written.
enum Want<'a> {
    /// Nothing: only process what was received.
    Read,
    /// Encrypt this plaintext into the outgoing queue.
    Encrypt(&'a [u8]),
    /// Queue a close_notify alert.
    CloseNotify,
}

/// The parts of a [`TlsStream`] that processing borrows beside the received bytes.
struct Parts<'a> {
    conn: &'a mut UnbufferedServerConnection,
    plaintext: &'a mut Vec<u8>,
    outgoing: &'a mut Vec<u8>,
    read_closed: &'a mut bool,
}

impl Parts<'_> {
    /// Runs rustls over `received` until it needs more bytes or has done `want`. Returns how
    /// many bytes at the front of `received` rustls is done with, and whether `want` was done.
    fn drive(
        &mut self,
        received: &mut [u8],
        mut want: Want<'_>,
    ) -> Result<(usize, bool), rustls::Error> {
        let mut consumed = 0;
        let mut wanted = matches!(want, Want::Read);
        loop {
            let UnbufferedStatus { discard, state } =
                self.conn.process_tls_records(&mut received[consumed..]);
            let mut extra = 0;
            let done = match state? {
                ConnectionState::ReadTraffic(mut traffic) => {
                    while let Some(record) = traffic.next_record() {
                        let record = record?;
                        self.plaintext.extend_from_slice(record.payload);
                        extra += record.discard;
                    }
                    false
                }
                ConnectionState::EncodeTlsData(mut data) => {
                    encode_into(self.outgoing, &mut data)?;
                    false
                }
                // The bytes are in the outgoing queue, which is written before anything else.
                ConnectionState::TransmitTlsData(transmit) => {
                    transmit.done();
                    false
                }
                ConnectionState::WriteTraffic(mut traffic) => {
                    match std::mem::replace(&mut want, Want::Read) {
                        Want::Read => {}
                        Want::Encrypt(data) => encrypt_into(self.outgoing, &mut traffic, data)?,
                        Want::CloseNotify => close_notify_into(self.outgoing, &mut traffic)?,
                    }
                    wanted = true;
                    true
                }
                // Edge-triggered: the next round says whether we may still write.
                ConnectionState::PeerClosed => {
                    *self.read_closed = true;
                    matches!(want, Want::Read)
                }
                ConnectionState::Closed => {
                    *self.read_closed = true;
                    true
                }
                ConnectionState::BlockedHandshake => true,
                ConnectionState::ReadEarlyData(_) => {
                    // The configurations never enable 0-RTT (it could be replayed).
                    return Err(rustls::Error::General(
                        "TLS early data is not accepted".to_owned(),
                    ));
                }
                _ => true,
            };
            consumed += discard + extra;
            if done {
                return Ok((consumed, wanted));
            }
        }
    }
}

/// Appends a handshake record to `outgoing`.
fn encode_into(
    outgoing: &mut Vec<u8>,
    data: &mut EncodeTlsData<'_, ServerConnectionData>,
) -> Result<(), rustls::Error> {
    append_with(
        outgoing,
        1024,
        "encoding a TLS record",
        |buf| data.encode(buf),
        |e| match e {
            EncodeError::InsufficientSize(InsufficientSizeError { required_size }) => {
                Some(*required_size)
            }
            _ => None,
        },
    )
}

/// Appends `data`, encrypted, to `outgoing`.
fn encrypt_into(
    outgoing: &mut Vec<u8>,
    traffic: &mut WriteTraffic<'_, ServerConnectionData>,
    data: &[u8],
) -> Result<(), rustls::Error> {
    // Record header, content type and AEAD tag per 16 KiB record; retried if too small.
    let room = data.len() + (data.len() / (16 * 1024) + 1) * 64;
    append_with(
        outgoing,
        room,
        "encrypting",
        |buf| traffic.encrypt(data, buf),
        encrypt_room,
    )
}

/// Appends a close_notify alert to `outgoing`.
fn close_notify_into(
    outgoing: &mut Vec<u8>,
    traffic: &mut WriteTraffic<'_, ServerConnectionData>,
) -> Result<(), rustls::Error> {
    append_with(
        outgoing,
        64,
        "encrypting close_notify",
        |buf| traffic.queue_close_notify(buf),
        encrypt_room,
    )
}

fn encrypt_room(e: &EncryptError) -> Option<usize> {
    match e {
        EncryptError::InsufficientSize(InsufficientSizeError { required_size }) => {
            Some(*required_size)
        }
        _ => None,
    }
}

/// Appends to `outgoing` what `write` puts into the slice it is given (rustls' unbuffered
/// API writes into the caller's buffer), starting with `room` bytes and growing to what
/// `needed` reads from a too-small error.
fn append_with<E: std::fmt::Display>(
    outgoing: &mut Vec<u8>,
    mut room: usize,
    what: &str,
    mut write: impl FnMut(&mut [u8]) -> Result<usize, E>,
    needed: impl Fn(&E) -> Option<usize>,
) -> Result<(), rustls::Error> {
    let start = outgoing.len();
    loop {
        outgoing.resize(start + room, 0);
        match write(&mut outgoing[start..]) {
            Ok(n) => {
                outgoing.truncate(start + n);
                return Ok(());
            }
            Err(e) => match needed(&e) {
                Some(required) if required > room => room = required,
                _ => {
                    outgoing.truncate(start);
                    return Err(rustls::Error::General(format!("{what}: {e}")));
                }
            },
        }
    }
}

fn tls_error(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

impl TlsStream {
    /// Whether the broker's own TLS 1.3 record layer protects this connection (the lean idle
    /// path) rather than rustls.
    #[cfg(test)]
    pub(crate) fn on_own_records(&self) -> bool {
        matches!(self.engine, Engine::Tls13(_))
    }

    fn is_handshaking(&self) -> bool {
        match &self.engine {
            Engine::Rustls(conn) => conn.is_handshaking(),
            Engine::Tls13(_) => false,
        }
    }

    /// Processes `received` (whole records at its front; the rest is left) and does `want`.
    /// Returns how many bytes were consumed and whether `want` was done.
    fn process(
        &mut self,
        received: &mut [u8],
        want: Want<'_>,
    ) -> Result<(usize, bool), rustls::Error> {
        match &mut self.engine {
            Engine::Rustls(conn) => Parts {
                conn,
                plaintext: &mut self.plaintext,
                outgoing: &mut self.outgoing,
                read_closed: &mut self.read_closed,
            }
            .drive(received, want),
            Engine::Tls13(records) => match want {
                Want::Read => {
                    if self.read_closed {
                        // Nothing counts after close_notify.
                        return Ok((received.len(), true));
                    }
                    let opened = records.open(received, &mut self.plaintext, &mut self.outgoing)?;
                    self.read_closed |= opened.closed;
                    Ok((opened.consumed, true))
                }
                Want::Encrypt(data) => records.seal(data, &mut self.outgoing).map(|()| (0, true)),
                Want::CloseNotify => records.close_notify(&mut self.outgoing).map(|()| (0, true)),
            },
        }
    }

    /// Processes what is pending in `incoming` and does `want`; says whether it was done.
    fn drive_pending(&mut self, want: Want<'_>) -> Result<bool, rustls::Error> {
        let mut incoming = std::mem::take(&mut self.incoming);
        let result = self.process(&mut incoming, want);
        if let Ok((consumed, _)) = result {
            incoming.drain(..consumed);
        }
        release_if_empty(&mut incoming);
        self.incoming = incoming;
        result.map(|(_, wanted)| wanted)
    }

    /// On a TLS error, sends the alert rustls prepared (best effort, without waiting) and
    /// turns the error into an I/O error.
    fn fail(&mut self, cx: &mut Context<'_>, e: rustls::Error) -> io::Error {
        if let Engine::Rustls(conn) = &mut self.engine {
            let mut nothing: [u8; 0] = [];
            if let Ok(ConnectionState::EncodeTlsData(mut alert)) =
                conn.process_tls_records(&mut nothing).state
            {
                let _ = encode_into(&mut self.outgoing, &mut alert);
            }
        }
        let _ = self.poll_write_outgoing(cx);
        tls_error(e)
    }

    /// Reads once from the socket and lets rustls process what came. `Ready(Ok(()))` means
    /// progress (or end of stream, in `read_closed`).
    fn poll_read_tls(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut chunk = [const { MaybeUninit::<u8>::uninit() }; READ_CHUNK];
        let mut buf = ReadBuf::uninit(&mut chunk);
        ready!(Pin::new(&mut self.tcp).poll_read(cx, &mut buf))?;
        if buf.filled().is_empty() {
            self.read_closed = true;
            if !self.incoming.is_empty() {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the peer closed the connection in the middle of a TLS record",
                )));
            }
            return Poll::Ready(Ok(()));
        }
        let received = buf.filled_mut();
        let result = if self.incoming.is_empty() {
            // The common case: whole records, processed where they were read.
            let n = received.len();
            self.process(received, Want::Read).map(|(consumed, _)| {
                if consumed < n {
                    self.incoming.extend_from_slice(&received[consumed..]);
                }
            })
        } else if self.incoming.len() + received.len() > MAX_PENDING_TLS {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "the peer sent more TLS data than rustls consumed (over 96 KiB pending)",
            )));
        } else {
            self.incoming.extend_from_slice(received);
            self.drive_pending(Want::Read).map(|_| ())
        };
        if let Err(e) = result {
            return Poll::Ready(Err(self.fail(cx, e)));
        }
        if self.incoming.capacity() > 2 * self.incoming.len() + 1024 {
            self.incoming.shrink_to_fit();
        }
        Poll::Ready(Ok(()))
    }

    /// Writes the outgoing queue to the socket; frees it once it is empty.
    fn poll_write_outgoing(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.outgoing_pos < self.outgoing.len() {
            let n = ready!(
                Pin::new(&mut self.tcp).poll_write(cx, &self.outgoing[self.outgoing_pos..])
            )?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.outgoing_pos += n;
        }
        self.outgoing = Vec::new();
        self.outgoing_pos = 0;
        Poll::Ready(Ok(()))
    }

    fn poll_handshake(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            // The client waits for our flight before it sends more.
            ready!(self.poll_write_outgoing(cx))?;
            if !self.is_handshaking() {
                return Poll::Ready(Ok(()));
            }
            ready!(self.poll_read_tls(cx))?;
            if self.read_closed {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the client closed the connection during the TLS handshake",
                )));
            }
        }
    }
}

/// Frees a buffer's memory once it holds nothing.
fn release_if_empty(buf: &mut Vec<u8>) {
    if buf.is_empty() && buf.capacity() > 0 {
        *buf = Vec::new();
    }
}

impl AsyncRead for TlsStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            let pending = &this.plaintext[this.plaintext_pos..];
            if !pending.is_empty() {
                let n = pending.len().min(buf.remaining());
                buf.put_slice(&pending[..n]);
                this.plaintext_pos += n;
                if this.plaintext_pos == this.plaintext.len() {
                    this.plaintext = Vec::new();
                    this.plaintext_pos = 0;
                }
                return Poll::Ready(Ok(()));
            }
            if this.read_closed {
                return Poll::Ready(Ok(()));
            }
            // Session tickets, key-update answers and alerts go out while the reader waits;
            // a socket that is not writable now wakes this task when it is.
            if let Poll::Ready(Err(e)) = this.poll_write_outgoing(cx) {
                return Poll::Ready(Err(e));
            }
            ready!(this.poll_read_tls(cx))?;
        }
    }
}

impl AsyncWrite for TlsStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        // Backpressure: nothing new is taken while earlier bytes wait for the socket.
        ready!(this.poll_write_outgoing(cx))?;
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let n = data.len().min(MAX_WRITE);
        match this.drive_pending(Want::Encrypt(&data[..n])) {
            Ok(true) => {}
            Ok(false) => {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::NotConnected,
                    "the TLS connection is closed for sending",
                )));
            }
            Err(e) => return Poll::Ready(Err(this.fail(cx, e))),
        }
        // Accepted: what the socket does not take now goes with the next write or flush.
        if let Poll::Ready(Err(e)) = this.poll_write_outgoing(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_write_outgoing(cx))?;
        Pin::new(&mut this.tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.close_notify_queued {
            this.close_notify_queued = true;
            // A connection that already failed just closes its socket.
            let _ = this.drive_pending(Want::CloseNotify);
        }
        ready!(this.poll_write_outgoing(cx))?;
        Pin::new(&mut this.tcp).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::time::Duration;

    use beckon_pki::{
        ClientTlsOptions, ServerTlsOptions, ServerVerification, TlsFiles, TlsVersion,
    };
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, ServerName};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;
    use tokio::task::JoinHandle;
    use tokio::time::timeout;

    use super::*;

    pub(super) const WAIT: Duration = Duration::from_secs(10);

    /// The TLS 1.3 client side of a test connection, through tokio-rustls.
    pub(super) type Client = tokio_rustls::client::TlsStream<TcpStream>;

    /// What [`echo_server`] reports: the ALPN protocol, whether the idle connection held no
    /// buffer, and whether TLS 1.3 records went through the broker's own record layer.
    pub(super) type EchoReport = (Option<Vec<u8>>, bool, bool);

    pub(super) struct Pki {
        pub(super) server: Arc<ServerConfig>,
        roots: rustls::RootCertStore,
    }

    /// A CA and the broker's server configuration for `localhost`, as the broker builds it
    /// (the TLS policy's, from PEM files), accepting TLS 1.3 and 1.2 with ALPN `mqtt`.
    pub(super) fn pki() -> Pki {
        let ca = beckon_pki::CertificateAuthority::generate("test CA", Duration::from_secs(3600))
            .expect("CA");
        let leaf = ca
            .issue_server(&["localhost".to_owned()], Duration::from_secs(3600))
            .expect("leaf");
        let dir = tempfile::tempdir().expect("temp dir");
        let files = TlsFiles {
            cert: dir.path().join("server.pem"),
            key: dir.path().join("server.key"),
            client_ca: None,
        };
        leaf.save(&files.cert, &files.key).expect("save leaf");
        let options = ServerTlsOptions {
            alpn: vec![b"mqtt".to_vec()],
            min_version: TlsVersion::Tls12,
        };
        let config = beckon_pki::server_config(&files, &options).expect("server config");
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(ca.cert_pem().as_bytes()).expect("ca der"))
            .expect("root");
        Pki {
            server: Arc::new(config),
            roots,
        }
    }

    /// A client trusting the test CA that speaks exactly `version`, offering ALPN `mqtt`.
    pub(super) fn connector(
        pki: &Pki,
        version: &'static rustls::SupportedProtocolVersion,
    ) -> tokio_rustls::TlsConnector {
        let tls12 = version == &rustls::version::TLS12;
        let options = ClientTlsOptions {
            min_version: if tls12 {
                TlsVersion::Tls12
            } else {
                TlsVersion::Tls13
            },
            max_version: tls12.then_some(TlsVersion::Tls12),
            alpn: vec![b"mqtt".to_vec()],
            ..ClientTlsOptions::default()
        };
        let config =
            beckon_pki::client_config(ServerVerification::Roots(pki.roots.clone()), None, &options)
                .expect("client config");
        tokio_rustls::TlsConnector::from(Arc::new(config))
    }

    pub(super) fn localhost() -> ServerName<'static> {
        ServerName::try_from("localhost").expect("name")
    }

    /// An [`echo_server`] for one connection on a fresh port.
    pub(super) async fn spawn_echo_server(
        pki: &Pki,
    ) -> (SocketAddr, JoinHandle<io::Result<EchoReport>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        (
            addr,
            tokio::spawn(echo_server(listener, pki.server.clone())),
        )
    }

    /// A client connection to `addr` speaking `version`, its handshake done.
    pub(super) async fn connect(
        pki: &Pki,
        version: &'static rustls::SupportedProtocolVersion,
        addr: SocketAddr,
    ) -> Client {
        let tcp = TcpStream::connect(addr).await.expect("connect");
        timeout(WAIT, connector(pki, version).connect(localhost(), tcp))
            .await
            .expect("handshake in time")
            .expect("handshake")
    }

    /// What a test server task ended with, within [`WAIT`].
    pub(super) async fn server_result<T>(server: JoinHandle<io::Result<T>>) -> io::Result<T> {
        timeout(WAIT, server)
            .await
            .expect("server ends")
            .expect("task")
    }

    /// A server that echoes everything back until the client closes, then closes with
    /// close_notify. Returns what it saw: the ALPN protocol and whether its buffers were all
    /// released while waiting for more (checked before every read).
    pub(super) async fn echo_server(
        listener: TcpListener,
        config: Arc<ServerConfig>,
    ) -> io::Result<EchoReport> {
        let (tcp, _) = listener.accept().await?;
        let Accepted {
            stream: mut tls,
            alpn,
            ..
        } = accept(config, tcp).await?;
        let own_records = matches!(tls.engine, Engine::Tls13(_));
        let mut idle_without_buffers = true;
        let mut buf = vec![0u8; 7000];
        loop {
            if tls.plaintext.is_empty() {
                idle_without_buffers &= tls.incoming.capacity() == 0
                    || !tls.incoming.is_empty() && tls.incoming.len() < READ_CHUNK;
                idle_without_buffers &= tls.plaintext.capacity() == 0;
                idle_without_buffers &= tls.outgoing.capacity() == 0;
            }
            let n = tls.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            tls.write_all(&buf[..n]).await?;
            tls.flush().await?;
        }
        tls.shutdown().await?;
        Ok((alpn, idle_without_buffers, own_records))
    }

    async fn echo_roundtrip(version: &'static rustls::SupportedProtocolVersion) {
        let pki = pki();
        let (addr, server) = spawn_echo_server(&pki).await;
        let mut client = connect(&pki, version, addr).await;
        assert_eq!(client.get_ref().1.protocol_version(), Some(version.version));
        // Sizes around the record size, so records end in the middle of reads.
        let data: Vec<u8> = (0..100_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
        for size in [1, 100, 16_383, 16_384, 16_385, 40_000, 100_000] {
            client.write_all(&data[..size]).await.expect("write");
            client.flush().await.expect("flush");
            let mut back = vec![0u8; size];
            timeout(WAIT, client.read_exact(&mut back))
                .await
                .expect("echo in time")
                .expect("echo");
            assert!(back == data[..size], "echo of {size} bytes differs");
        }
        client.shutdown().await.expect("close_notify");
        let mut rest = Vec::new();
        // A clean close_notify from the server: no error, no extra bytes.
        timeout(WAIT, client.read_to_end(&mut rest))
            .await
            .expect("close in time")
            .expect("clean TLS close");
        assert!(rest.is_empty());
        let (alpn, idle, own_records) = server_result(server).await.expect("server");
        assert_eq!(alpn.as_deref(), Some(&b"mqtt"[..]));
        assert!(
            idle,
            "an idle connection holds no receive, plaintext or send buffer"
        );
        // TLS 1.3 continues on the broker's record layer; TLS 1.2 stays with rustls.
        assert_eq!(own_records, version == &rustls::version::TLS13);
    }

    #[tokio::test]
    async fn echoes_over_tls13_and_holds_no_buffer_while_idle() {
        echo_roundtrip(&rustls::version::TLS13).await;
    }

    #[tokio::test]
    async fn echoes_over_tls12() {
        echo_roundtrip(&rustls::version::TLS12).await;
    }

    #[tokio::test]
    async fn handshake_and_data_dribbled_one_byte_at_a_time_and_a_key_update() {
        let pki = pki();
        let (addr, server) = spawn_echo_server(&pki).await;
        // A relay that passes the client's bytes on one at a time.
        let relay = TcpListener::bind("127.0.0.1:0").await.expect("bind relay");
        let relay_addr = relay.local_addr().expect("addr");
        tokio::spawn(async move {
            let (client_side, _) = relay.accept().await?;
            let server_side = TcpStream::connect(addr).await?;
            server_side.set_nodelay(true)?;
            let (mut cr, mut cw) = client_side.into_split();
            let (mut sr, mut sw) = server_side.into_split();
            let down = tokio::spawn(async move { tokio::io::copy(&mut sr, &mut cw).await });
            let mut byte = [0u8; 1];
            while cr.read(&mut byte).await? == 1 {
                sw.write_all(&byte).await?;
                tokio::time::sleep(Duration::from_micros(200)).await;
            }
            sw.shutdown().await?;
            let _ = down.await;
            io::Result::Ok(())
        });
        let mut client = connect(&pki, &rustls::version::TLS13, relay_addr).await;
        for round in 0..3u8 {
            let msg = [round; 300];
            client.write_all(&msg).await.expect("write");
            client.flush().await.expect("flush");
            let mut back = [0u8; 300];
            timeout(WAIT, client.read_exact(&mut back))
                .await
                .expect("echo in time")
                .expect("echo");
            assert_eq!(back, msg);
            // New keys both ways: the server must answer the key update and use it.
            client
                .get_mut()
                .1
                .refresh_traffic_keys()
                .expect("key update");
        }
        client.shutdown().await.expect("close");
        let (_, idle, own_records) = server_result(server).await.expect("server");
        assert!(idle);
        assert!(
            own_records,
            "key updates went through the broker's record layer"
        );
    }

    /// A server task that accepts one TLS handshake, and a plain TCP connection to it.
    async fn handshake_server_and_raw_client() -> (JoinHandle<io::Result<()>>, TcpStream) {
        let pki = pki();
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await?;
            accept(pki.server.clone(), tcp).await.map(|_| ())
        });
        let tcp = TcpStream::connect(addr).await.expect("connect");
        (server, tcp)
    }

    #[tokio::test]
    async fn garbage_instead_of_a_client_hello_fails_the_handshake() {
        let (server, mut tcp) = handshake_server_and_raw_client().await;
        tcp.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .expect("write");
        let e = server_result(server).await.expect_err("not TLS");
        assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
        // The client is told why (a TLS alert) and the socket is closed.
        let mut answer = Vec::new();
        timeout(WAIT, tcp.read_to_end(&mut answer))
            .await
            .expect("closed in time")
            .ok();
        assert_eq!(answer.first(), Some(&0x15), "an alert record: {answer:?}");
    }

    #[tokio::test]
    async fn a_client_leaving_mid_handshake_is_an_error_not_a_hang() {
        let (server, mut tcp) = handshake_server_and_raw_client().await;
        // The start of a handshake record, then nothing more.
        tcp.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01])
            .await
            .expect("write");
        drop(tcp);
        assert_eq!(
            server_result(server).await.expect_err("incomplete").kind(),
            io::ErrorKind::UnexpectedEof
        );
    }
}

#[cfg(test)]
mod hostile_records {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::time::timeout;

    use super::tests::{WAIT, connect, pki, server_result, spawn_echo_server};
    use super::*;

    /// After a TLS 1.3 handshake, the client's socket carries `raw` instead of a proper
    /// record; the server must fail with an error (no panic, no hang) and close.
    async fn server_fails_on(raw: &[u8]) -> io::Error {
        let pki = pki();
        let (addr, server) = spawn_echo_server(&pki).await;
        let mut client = connect(&pki, &rustls::version::TLS13, addr).await;
        // One proper round first, so the server is on its own record layer.
        client.write_all(b"ping").await.expect("write");
        client.flush().await.expect("flush");
        let mut back = [0u8; 4];
        timeout(WAIT, client.read_exact(&mut back))
            .await
            .expect("echo in time")
            .expect("echo");
        client.get_mut().0.write_all(raw).await.expect("raw write");
        server_result(server)
            .await
            .expect_err("the server must refuse the record")
    }

    #[tokio::test]
    async fn a_forged_record_fails_decryption() {
        let mut raw = vec![0x17, 3, 3, 0, 40];
        raw.extend((0..40u8).map(|i| i.wrapping_mul(37)));
        let e = server_fails_on(&raw).await;
        assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
    }

    #[tokio::test]
    async fn an_oversized_record_is_refused_before_it_arrives() {
        let e = server_fails_on(&[0x17, 3, 3, 0xff, 0xff]).await;
        assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
    }

    #[tokio::test]
    async fn a_plaintext_handshake_record_after_the_handshake_is_refused() {
        let e = server_fails_on(&[0x16, 3, 3, 0, 4, 1, 0, 0, 0]).await;
        assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
    }
}

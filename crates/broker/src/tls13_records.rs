//! TLS 1.3 record protection after the handshake, with the traffic secrets rustls hands over
//! (its "kernel connection" interface, made for kTLS).
//!
//! Why: after the handshake rustls still keeps its whole connection state (over 2 KB: the
//! handshake deframer's span list, buffers' queues, the state machine) for every idle
//! connection. The kernel does not offer TLS offload on every machine (`tcp_available_ulp`
//! may lack `tls`), so the broker does what kTLS would do: it keeps only the two traffic
//! keys (as bytes: each batch of records builds its key schedule), their IVs and sequence
//! numbers, and rustls' small [`KernelConnection`] for key updates.
//!
//! What it does (RFC 8446 section 5): application data records in and out, close_notify,
//! other alerts as errors, and KeyUpdate in both directions (answering a requested update).
//! Anything else after the handshake is a protocol error. TLS 1.2 connections stay with
//! rustls.

use aws_lc_rs::aead::{
    AES_128_GCM, AES_256_GCM, Aad, Algorithm, CHACHA20_POLY1305, LessSafeKey, NONCE_LEN, Nonce,
    UnboundKey,
};
use rustls::crypto::cipher::AeadKey;
use rustls::kernel::KernelConnection;
use rustls::server::ServerConnectionData;
use rustls::{AlertDescription, ConnectionTrafficSecrets, Error, ExtractedSecrets};

const APPLICATION_DATA: u8 = 0x17;
const ALERT: u8 = 0x15;
const HANDSHAKE: u8 = 0x16;
const KEY_UPDATE: u8 = 24;
/// Largest plaintext of one record.
const MAX_FRAGMENT: usize = 16 * 1024;
/// Largest encrypted record body: plaintext, content type, padding and tag (RFC 8446 5.2).
const MAX_CIPHERTEXT: usize = MAX_FRAGMENT + 256;
const TAG_LEN: usize = 16;
/// Records sent under one key before the broker moves to a new one; well under the AES-GCM
/// limit of 2^24.5 records (RFC 8446 5.5).
const RECORDS_PER_KEY: u64 = 1 << 23;

/// One direction's traffic key, IV and next sequence number.
///
/// The key is kept as its bytes, and the AEAD key schedule (aws-lc's AES key expansion and
/// GHASH table, about 600 bytes) is built for each batch of records and dropped after it:
/// an idle connection then holds 60 bytes per direction instead of 650, for about a tenth
/// of a microsecond per batch.
struct DirectionKeys {
    algorithm: &'static Algorithm,
    /// Zeroed when dropped.
    key: AeadKey,
    iv: [u8; NONCE_LEN],
    seq: u64,
}

impl DirectionKeys {
    fn new(seq: u64, secrets: ConnectionTrafficSecrets) -> Result<Self, Error> {
        let (algorithm, key, iv): (&'static Algorithm, _, _) = match secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (&AES_128_GCM, key, iv),
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (&AES_256_GCM, key, iv),
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => (&CHACHA20_POLY1305, key, iv),
            _ => return Err(Error::General("unsupported TLS 1.3 cipher".into())),
        };
        let iv: [u8; NONCE_LEN] = iv
            .as_ref()
            .try_into()
            .map_err(|_| Error::General("TLS traffic IV of the wrong length".into()))?;
        let keys = Self {
            algorithm,
            key,
            iv,
            seq,
        };
        // Checked once here, so that a later bind cannot fail on the length.
        keys.bind()?;
        Ok(keys)
    }

    /// The key schedule for a batch of records.
    fn bind(&self) -> Result<LessSafeKey, Error> {
        let key = UnboundKey::new(self.algorithm, self.key.as_ref())
            .map_err(|_| Error::General("TLS traffic key of the wrong length".into()))?;
        Ok(LessSafeKey::new(key))
    }

    /// The nonce of the next record, and the sequence number moved on.
    fn next_nonce(&mut self) -> Result<Nonce, Error> {
        let mut nonce = self.iv;
        for (n, s) in nonce[NONCE_LEN - 8..]
            .iter_mut()
            .zip(self.seq.to_be_bytes())
        {
            *n ^= s;
        }
        self.seq = self.seq.checked_add(1).ok_or(Error::EncryptError)?;
        Ok(Nonce::assume_unique_for_key(nonce))
    }

    /// Seals one record of `content_type` with `fragment` onto `outgoing`.
    fn seal_record(
        &mut self,
        key: &LessSafeKey,
        content_type: u8,
        fragment: &[u8],
        outgoing: &mut Vec<u8>,
    ) -> Result<(), Error> {
        let len = fragment.len() + 1 + TAG_LEN;
        let header = [APPLICATION_DATA, 3, 3, (len >> 8) as u8, len as u8];
        let start = outgoing.len();
        outgoing.reserve(5 + len);
        outgoing.extend_from_slice(&header);
        outgoing.extend_from_slice(fragment);
        outgoing.push(content_type);
        let nonce = self.next_nonce()?;
        let tag = key
            .seal_in_place_separate_tag(nonce, Aad::from(header), &mut outgoing[start + 5..])
            .map_err(|_| Error::EncryptError)?;
        outgoing.extend_from_slice(tag.as_ref());
        Ok(())
    }
}

/// A TLS 1.3 connection's record layer after the handshake.
pub(crate) struct Tls13Records {
    tx: DirectionKeys,
    rx: DirectionKeys,
    kernel: KernelConnection<ServerConnectionData>,
}

/// What [`Tls13Records::open`] found.
pub(crate) struct Opened {
    /// Bytes at the front of the input that were whole records, processed.
    pub(crate) consumed: usize,
    /// The peer sent close_notify.
    pub(crate) closed: bool,
}

impl Tls13Records {
    /// Takes over from rustls after a TLS 1.3 handshake.
    pub(crate) fn new(
        secrets: ExtractedSecrets,
        kernel: KernelConnection<ServerConnectionData>,
    ) -> Result<Self, Error> {
        let (tx_seq, tx) = secrets.tx;
        let (rx_seq, rx) = secrets.rx;
        Ok(Self {
            tx: DirectionKeys::new(tx_seq, tx)?,
            rx: DirectionKeys::new(rx_seq, rx)?,
            kernel,
        })
    }

    /// Appends `data` to `outgoing` as application data records.
    pub(crate) fn seal(&mut self, data: &[u8], outgoing: &mut Vec<u8>) -> Result<(), Error> {
        let mut key = self.tx.bind()?;
        for chunk in data.chunks(MAX_FRAGMENT) {
            if self.tx.seq >= RECORDS_PER_KEY {
                self.update_tx_key(&key, outgoing)?;
                key = self.tx.bind()?;
            }
            self.tx
                .seal_record(&key, APPLICATION_DATA, chunk, outgoing)?;
        }
        Ok(())
    }

    /// Appends a close_notify alert to `outgoing`.
    pub(crate) fn close_notify(&mut self, outgoing: &mut Vec<u8>) -> Result<(), Error> {
        let key = self.tx.bind()?;
        self.tx.seal_record(
            &key,
            ALERT,
            &[1, u8::from(AlertDescription::CloseNotify)],
            outgoing,
        )
    }

    /// Sends KeyUpdate (update_not_requested) under the current key `key`, then moves to the
    /// next.
    fn update_tx_key(&mut self, key: &LessSafeKey, outgoing: &mut Vec<u8>) -> Result<(), Error> {
        self.tx
            .seal_record(key, HANDSHAKE, &[KEY_UPDATE, 0, 0, 1, 0], outgoing)?;
        let (seq, secrets) = self.kernel.update_tx_secret()?;
        self.tx = DirectionKeys::new(seq, secrets)?;
        Ok(())
    }

    /// Decrypts the whole records at the front of `received` in place: application data is
    /// appended to `plaintext`, answers (a KeyUpdate) to `outgoing`. Stops after close_notify.
    pub(crate) fn open(
        &mut self,
        received: &mut [u8],
        plaintext: &mut Vec<u8>,
        outgoing: &mut Vec<u8>,
    ) -> Result<Opened, Error> {
        let mut consumed = 0;
        // Bound at the first whole record, and again after a KeyUpdate from the peer.
        let mut key: Option<LessSafeKey> = None;
        loop {
            let rest = &mut received[consumed..];
            let Some(header) = rest.get(..5) else {
                return Ok(Opened {
                    consumed,
                    closed: false,
                });
            };
            let header: [u8; 5] = [header[0], header[1], header[2], header[3], header[4]];
            let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
            if header[0] != APPLICATION_DATA {
                return Err(Error::General(format!(
                    "unexpected TLS record type {} after the handshake",
                    header[0]
                )));
            }
            if !(1 + TAG_LEN..=MAX_CIPHERTEXT).contains(&len) {
                return Err(Error::General(format!("TLS record of {len} bytes")));
            }
            let Some(body) = rest.get_mut(5..5 + len) else {
                return Ok(Opened {
                    consumed,
                    closed: false,
                });
            };
            let nonce = self.rx.next_nonce()?;
            let bound = match key.take() {
                Some(bound) => bound,
                None => self.rx.bind()?,
            };
            let inner = bound
                .open_in_place(nonce, Aad::from(header), body)
                .map_err(|_| Error::DecryptError)?;
            key = Some(bound);
            // The content type is the last non-zero byte; zeros after it are padding.
            let Some(type_at) = inner.iter().rposition(|&b| b != 0) else {
                return Err(Error::General("TLS record without a content type".into()));
            };
            let content = &inner[..type_at];
            consumed += 5 + len;
            match inner[type_at] {
                APPLICATION_DATA => plaintext.extend_from_slice(content),
                ALERT => {
                    if let [_, description] = content
                        && *description == u8::from(AlertDescription::CloseNotify)
                    {
                        return Ok(Opened {
                            consumed,
                            closed: true,
                        });
                    }
                    return Err(Error::AlertReceived(
                        content.get(1).map_or(AlertDescription::DecodeError, |&d| {
                            AlertDescription::from(d)
                        }),
                    ));
                }
                HANDSHAKE => {
                    let content = content.to_vec();
                    self.handshake_messages(&content, outgoing)?;
                    key = None;
                }
                other => {
                    return Err(Error::General(format!(
                        "unexpected TLS content type {other} after the handshake"
                    )));
                }
            }
        }
    }

    /// Post-handshake messages from the client: only KeyUpdate is allowed.
    fn handshake_messages(
        &mut self,
        mut messages: &[u8],
        outgoing: &mut Vec<u8>,
    ) -> Result<(), Error> {
        while !messages.is_empty() {
            let [kind, a, b, c, body @ ..] = messages else {
                return Err(Error::General("truncated post-handshake message".into()));
            };
            let len = usize::from(*a) << 16 | usize::from(*b) << 8 | usize::from(*c);
            let Some(payload) = body.get(..len) else {
                return Err(Error::General(
                    "post-handshake message split over records".into(),
                ));
            };
            match (*kind, payload) {
                (KEY_UPDATE, [requested @ (0 | 1)]) => {
                    let (seq, secrets) = self.kernel.update_rx_secret()?;
                    self.rx = DirectionKeys::new(seq, secrets)?;
                    if *requested == 1 {
                        let key = self.tx.bind()?;
                        self.update_tx_key(&key, outgoing)?;
                    }
                }
                _ => {
                    return Err(Error::General(format!(
                        "unexpected handshake message {kind} after the handshake"
                    )));
                }
            }
            messages = &body[len..];
        }
        Ok(())
    }
}

//! TLS 1.3 record protection after the handshake, with the traffic secrets rustls hands over
//! (its "kernel connection" interface, made for kTLS).
//!
//! Why: after the handshake rustls still keeps its whole connection state (over 2 KB: the
//! handshake deframer's span list, buffers' queues, the state machine) for every idle
//! connection. The kernel does not offer TLS offload on every machine (`tcp_available_ulp`
//! may lack `tls`), so the broker does what kTLS would do: it keeps only the two traffic
//! keys (as bytes), their IVs and sequence numbers, and rustls' small [`KernelConnection`]
//! for key updates. The record protection itself is rustls': the negotiated suite's
//! [`Tls13AeadAlgorithm`] builds a [`MessageEncrypter`] or [`MessageDecrypter`] from the
//! kept key for each batch of records, dropped after it.
//!
//! What it does (RFC 8446 section 5): application data records in and out, close_notify,
//! other alerts as errors, and KeyUpdate in both directions (answering a requested update).
//! Anything else after the handshake is a protocol error, answered with the alert section 5
//! names (record_overflow, unexpected_message, decode_error, bad_record_mac), as is a
//! failure of the broker's own side (internal_error). TLS 1.2 connections stay with rustls.

use rustls::crypto::cipher::{
    AeadKey, InboundOpaqueMessage, Iv, MessageDecrypter, MessageEncrypter, NONCE_LEN,
    OutboundChunks, OutboundPlainMessage, Tls13AeadAlgorithm,
};
use rustls::crypto::tls13::{HkdfExpander, OkmBlock, OutputLengthError};
// rustls exports its key schedule's AeadKey constructor only here (hidden, outside its
// semver promise); the lock file pins rustls, and a change shows as a build error.
use rustls::internal::derive_traffic_key;
use rustls::kernel::KernelConnection;
use rustls::server::ServerConnectionData;
use rustls::{
    AlertDescription, ConnectionTrafficSecrets, ContentType, Error, ExtractedSecrets,
    ProtocolVersion, SupportedCipherSuite,
};

const APPLICATION_DATA: u8 = 0x17;
const KEY_UPDATE: u8 = 24;
/// Largest plaintext of one record (RFC 8446 5.1).
const MAX_FRAGMENT: usize = 16 * 1024;
/// Largest encrypted record body: plaintext, content type, padding and tag (RFC 8446 5.2).
const MAX_CIPHERTEXT: usize = MAX_FRAGMENT + 256;
/// Records sent under one key before the broker moves to a new one; well under the AES-GCM
/// limit of 2^24.5 records (RFC 8446 5.5).
const RECORDS_PER_KEY: u64 = 1 << 23;

/// One direction's traffic key, IV and next sequence number.
///
/// The key is kept as its bytes, and the AEAD state (aws-lc's AES key expansion and GHASH
/// table, about 600 bytes) is built for each batch of records and dropped after it: an idle
/// connection then holds 60 bytes per direction instead of 650, for about a tenth of a
/// microsecond per batch.
struct DirectionKeys {
    /// Zeroed when dropped.
    key: AeadKey,
    iv: [u8; NONCE_LEN],
    seq: u64,
}

/// Hands kept key bytes to rustls' [`derive_traffic_key`], the public way to make an
/// [`AeadKey`] of the suite's key length (an `AeadKey` is consumed by each encrypter and
/// rustls offers no copy): this "expansion" yields the bytes it holds.
struct KeptKey<'a>(&'a [u8]);

impl HkdfExpander for KeptKey<'_> {
    fn expand_slice(&self, _info: &[&[u8]], output: &mut [u8]) -> Result<(), OutputLengthError> {
        let n = self.0.len().min(output.len());
        output[..n].copy_from_slice(&self.0[..n]);
        Ok(())
    }

    fn expand_block(&self, _info: &[&[u8]]) -> OkmBlock {
        OkmBlock::new(self.0)
    }

    fn hash_len(&self) -> usize {
        self.0.len()
    }
}

impl DirectionKeys {
    fn new(
        aead: &dyn Tls13AeadAlgorithm,
        seq: u64,
        secrets: ConnectionTrafficSecrets,
    ) -> Result<Self, Error> {
        let (ConnectionTrafficSecrets::Aes128Gcm { key, iv }
        | ConnectionTrafficSecrets::Aes256Gcm { key, iv }
        | ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv }) = secrets
        else {
            return Err(Error::General("unsupported TLS 1.3 cipher".into()));
        };
        if key.as_ref().len() != aead.key_len() {
            return Err(Error::General(
                "TLS traffic key of the wrong length for the suite".into(),
            ));
        }
        let iv: [u8; NONCE_LEN] = iv
            .as_ref()
            .try_into()
            .map_err(|_| Error::General("TLS traffic IV of the wrong length".into()))?;
        Ok(Self { key, iv, seq })
    }

    /// rustls' encrypter for a batch of records.
    fn encrypter(&self, aead: &dyn Tls13AeadAlgorithm) -> Box<dyn MessageEncrypter> {
        aead.encrypter(
            derive_traffic_key(&KeptKey(self.key.as_ref()), aead),
            Iv::from(self.iv),
        )
    }

    /// rustls' decrypter for a batch of records.
    fn decrypter(&self, aead: &dyn Tls13AeadAlgorithm) -> Box<dyn MessageDecrypter> {
        aead.decrypter(
            derive_traffic_key(&KeptKey(self.key.as_ref()), aead),
            Iv::from(self.iv),
        )
    }

    /// The sequence number of the next record, moved on.
    fn next_seq(&mut self) -> Result<u64, Error> {
        let seq = self.seq;
        self.seq = seq.checked_add(1).ok_or(Error::EncryptError)?;
        Ok(seq)
    }

    /// Seals one record of `content_type` with `fragment` onto `outgoing`.
    ///
    /// Each record gets an encrypter of its own: aws-lc's TLS 1.3 AES-GCM sealing key takes
    /// its nonce mask from the first record it seals and then requires the counter to grow,
    /// which sequence numbers XORed with a mask taken mid-connection do not always do.
    fn seal_record(
        &mut self,
        aead: &dyn Tls13AeadAlgorithm,
        content_type: ContentType,
        fragment: &[u8],
        outgoing: &mut Vec<u8>,
    ) -> Result<(), Error> {
        let seq = self.next_seq()?;
        let sealed = self.encrypter(aead).encrypt(
            OutboundPlainMessage {
                typ: content_type,
                version: ProtocolVersion::TLSv1_3,
                payload: OutboundChunks::Single(fragment),
            },
            seq,
        )?;
        let record = sealed.encode();
        if outgoing.is_empty() {
            // The usual case (one record per write): the sealed record becomes the buffer.
            *outgoing = record;
        } else {
            outgoing.extend_from_slice(&record);
        }
        Ok(())
    }
}

/// A failure of the record layer, and the alert that tells the peer (none for an alert the
/// peer sent).
struct Fatal {
    alert: Option<AlertDescription>,
    error: Error,
}

impl Fatal {
    /// The peer broke RFC 8446: `alert`, and `what` for the log.
    fn peer(alert: AlertDescription, what: impl Into<String>) -> Self {
        Self {
            alert: Some(alert),
            error: Error::General(what.into()),
        }
    }
}

impl From<Error> for Fatal {
    /// rustls' errors with the alert RFC 8446 names for each; anything else is the broker's
    /// own failure (internal_error).
    fn from(error: Error) -> Self {
        let alert = match &error {
            Error::AlertReceived(_) => None,
            Error::DecryptError => Some(AlertDescription::BadRecordMac),
            Error::PeerSentOversizedRecord => Some(AlertDescription::RecordOverflow),
            Error::PeerMisbehaved(_) => Some(AlertDescription::UnexpectedMessage),
            Error::InvalidMessage(m) => Some(AlertDescription::from(*m)),
            _ => Some(AlertDescription::InternalError),
        };
        Self { alert, error }
    }
}

/// A TLS 1.3 connection's record layer after the handshake.
pub(crate) struct Tls13Records {
    aead: &'static dyn Tls13AeadAlgorithm,
    tx: DirectionKeys,
    rx: DirectionKeys,
    /// rustls' key schedule for key updates (absent only in tests and fuzzing, where a key
    /// update then fails).
    kernel: Option<KernelConnection<ServerConnectionData>>,
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
        let SupportedCipherSuite::Tls13(suite) = kernel.negotiated_cipher_suite() else {
            return Err(Error::General(
                "a TLS 1.2 suite on a TLS 1.3 connection".into(),
            ));
        };
        Self::with_keys(suite.aead_alg, secrets, Some(kernel))
    }

    fn with_keys(
        aead: &'static dyn Tls13AeadAlgorithm,
        secrets: ExtractedSecrets,
        kernel: Option<KernelConnection<ServerConnectionData>>,
    ) -> Result<Self, Error> {
        let (tx_seq, tx) = secrets.tx;
        let (rx_seq, rx) = secrets.rx;
        Ok(Self {
            aead,
            tx: DirectionKeys::new(aead, tx_seq, tx)?,
            rx: DirectionKeys::new(aead, rx_seq, rx)?,
            kernel,
        })
    }

    fn kernel(&mut self) -> Result<&mut KernelConnection<ServerConnectionData>, Error> {
        self.kernel
            .as_mut()
            .ok_or_else(|| Error::General("no TLS key schedule for a key update".into()))
    }

    /// Appends `data` to `outgoing` as application data records. On failure an
    /// internal_error alert is queued (when the keys still seal).
    pub(crate) fn seal(&mut self, data: &[u8], outgoing: &mut Vec<u8>) -> Result<(), Error> {
        self.seal_data(data, outgoing)
            .map_err(|e| self.fail(Fatal::from(e), outgoing))
    }

    fn seal_data(&mut self, data: &[u8], outgoing: &mut Vec<u8>) -> Result<(), Error> {
        for chunk in data.chunks(MAX_FRAGMENT) {
            if self.tx.seq >= RECORDS_PER_KEY {
                self.update_tx_key(outgoing)?;
            }
            self.tx
                .seal_record(self.aead, ContentType::ApplicationData, chunk, outgoing)?;
        }
        Ok(())
    }

    /// Appends a close_notify alert to `outgoing`.
    pub(crate) fn close_notify(&mut self, outgoing: &mut Vec<u8>) -> Result<(), Error> {
        self.seal_alert(1, AlertDescription::CloseNotify, outgoing)
    }

    fn seal_alert(
        &mut self,
        level: u8,
        description: AlertDescription,
        outgoing: &mut Vec<u8>,
    ) -> Result<(), Error> {
        self.tx.seal_record(
            self.aead,
            ContentType::Alert,
            &[level, u8::from(description)],
            outgoing,
        )
    }

    /// Queues the fatal alert of `fatal` (best effort: the keys may be what failed) and
    /// returns its error.
    fn fail(&mut self, fatal: Fatal, outgoing: &mut Vec<u8>) -> Error {
        if let Some(alert) = fatal.alert {
            let _ = self.seal_alert(2, alert, outgoing);
        }
        fatal.error
    }

    /// Sends KeyUpdate (update_not_requested) under the current key, then moves to the next.
    /// The next key is made first: if that fails, the current key still seals the alert.
    fn update_tx_key(&mut self, outgoing: &mut Vec<u8>) -> Result<(), Error> {
        let (seq, secrets) = self.kernel()?.update_tx_secret()?;
        let next = DirectionKeys::new(self.aead, seq, secrets)?;
        self.tx.seal_record(
            self.aead,
            ContentType::Handshake,
            &[KEY_UPDATE, 0, 0, 1, 0],
            outgoing,
        )?;
        self.tx = next;
        Ok(())
    }

    /// Decrypts the whole records at the front of `received` in place: application data is
    /// appended to `plaintext`, answers (a KeyUpdate, or the alert before failing) to
    /// `outgoing`. Stops after close_notify.
    pub(crate) fn open(
        &mut self,
        received: &mut [u8],
        plaintext: &mut Vec<u8>,
        outgoing: &mut Vec<u8>,
    ) -> Result<Opened, Error> {
        self.open_records(received, plaintext, outgoing)
            .map_err(|fatal| self.fail(fatal, outgoing))
    }

    fn open_records(
        &mut self,
        received: &mut [u8],
        plaintext: &mut Vec<u8>,
        outgoing: &mut Vec<u8>,
    ) -> Result<Opened, Fatal> {
        let mut consumed = 0;
        // Built at the first whole record, and again after a KeyUpdate from the peer.
        let mut decrypter: Option<Box<dyn MessageDecrypter>> = None;
        loop {
            let rest = &mut received[consumed..];
            let Some(&[kind, _, _, len_hi, len_lo]) = rest.get(..5) else {
                return Ok(Opened {
                    consumed,
                    closed: false,
                });
            };
            let len = usize::from(u16::from_be_bytes([len_hi, len_lo]));
            if kind != APPLICATION_DATA {
                return Err(Fatal::peer(
                    AlertDescription::UnexpectedMessage,
                    format!("unprotected TLS record of type {kind} after the handshake"),
                ));
            }
            if len > MAX_CIPHERTEXT {
                return Err(Fatal::peer(
                    AlertDescription::RecordOverflow,
                    format!("TLS record of {len} bytes (at most {MAX_CIPHERTEXT})"),
                ));
            }
            let Some(body) = rest.get_mut(5..5 + len) else {
                return Ok(Opened {
                    consumed,
                    closed: false,
                });
            };
            let seq = self.rx.next_seq()?;
            let aead = self.aead;
            let rx = &self.rx;
            let opener = decrypter.get_or_insert_with(|| rx.decrypter(aead));
            // rustls removes the padding, and refuses inner plaintext over 2^14 + 1 bytes
            // (record_overflow) and records of nothing but padding.
            let inner = opener.decrypt(
                InboundOpaqueMessage::new(
                    ContentType::ApplicationData,
                    ProtocolVersion::TLSv1_2,
                    body,
                ),
                seq,
            )?;
            consumed += 5 + len;
            match inner.typ {
                ContentType::ApplicationData => plaintext.extend_from_slice(inner.payload),
                ContentType::Alert => {
                    return alert(inner.payload).map(|()| Opened {
                        consumed,
                        closed: true,
                    });
                }
                ContentType::Handshake => {
                    if self.handshake_messages(inner.payload, outgoing)? {
                        decrypter = None;
                    }
                }
                other => {
                    return Err(Fatal::peer(
                        AlertDescription::UnexpectedMessage,
                        format!("unexpected TLS content type {other:?} after the handshake"),
                    ));
                }
            }
        }
    }

    /// Post-handshake messages from the client: only KeyUpdate is allowed, and it ends its
    /// record (RFC 8446 5.1: handshake messages must not span a key change). Returns whether
    /// the receiving key changed.
    fn handshake_messages(
        &mut self,
        mut messages: &[u8],
        outgoing: &mut Vec<u8>,
    ) -> Result<bool, Fatal> {
        if messages.is_empty() {
            return Err(Fatal::peer(
                AlertDescription::UnexpectedMessage,
                "empty TLS handshake record",
            ));
        }
        let mut rekeyed = false;
        while !messages.is_empty() {
            let [kind, a, b, c, body @ ..] = messages else {
                return Err(Fatal::peer(
                    AlertDescription::DecodeError,
                    "truncated post-handshake message",
                ));
            };
            let len = usize::from(*a) << 16 | usize::from(*b) << 8 | usize::from(*c);
            let Some(payload) = body.get(..len) else {
                return Err(Fatal::peer(
                    AlertDescription::UnexpectedMessage,
                    "post-handshake message split over TLS records",
                ));
            };
            let last = body.len() == len;
            match (*kind, payload) {
                (KEY_UPDATE, _) if !last => {
                    return Err(Fatal::peer(
                        AlertDescription::UnexpectedMessage,
                        "a handshake message after KeyUpdate in the same TLS record",
                    ));
                }
                (KEY_UPDATE, [requested @ (0 | 1)]) => {
                    let (seq, secrets) = self.kernel()?.update_rx_secret()?;
                    self.rx = DirectionKeys::new(self.aead, seq, secrets)?;
                    if *requested == 1 {
                        self.update_tx_key(outgoing)?;
                    }
                    rekeyed = true;
                }
                (KEY_UPDATE, [_]) => {
                    return Err(Fatal::peer(
                        AlertDescription::IllegalParameter,
                        "KeyUpdate with a request value other than 0 or 1",
                    ));
                }
                (KEY_UPDATE, _) => {
                    return Err(Fatal::peer(
                        AlertDescription::DecodeError,
                        format!("KeyUpdate of {len} bytes"),
                    ));
                }
                _ => {
                    return Err(Fatal::peer(
                        AlertDescription::UnexpectedMessage,
                        format!("unexpected handshake message {kind} after the handshake"),
                    ));
                }
            }
            messages = &body[len..];
        }
        Ok(rekeyed)
    }
}

/// An alert record from the peer: `Ok` for close_notify, an error for any other alert, and
/// for an empty or malformed one the alert RFC 8446 names.
fn alert(content: &[u8]) -> Result<(), Fatal> {
    match content {
        [] => Err(Fatal::peer(
            AlertDescription::UnexpectedMessage,
            "empty TLS alert record",
        )),
        [_, description] if *description == u8::from(AlertDescription::CloseNotify) => Ok(()),
        [_, description] => Err(Fatal::from(Error::AlertReceived(AlertDescription::from(
            *description,
        )))),
        _ => Err(Fatal::peer(
            AlertDescription::DecodeError,
            format!("TLS alert of {} bytes", content.len()),
        )),
    }
}

/// The client's side of a [`Tls13Records`] with made-up keys, for tests and the fuzz target:
/// it seals what it sends to the broker and opens what the broker sends back.
#[cfg(any(test, feature = "fuzzing"))]
pub(crate) mod peer {
    use super::*;

    /// One direction's secrets from fixed bytes.
    fn secrets(aead: &dyn Tls13AeadAlgorithm, byte: u8) -> ConnectionTrafficSecrets {
        let key = derive_traffic_key(&KeptKey(&[byte; 32]), aead);
        aead.extract_keys(key, Iv::from([byte ^ 0x5a; NONCE_LEN]))
            .expect("an aws-lc-rs TLS 1.3 suite")
    }

    /// The client of a [`Tls13Records`].
    pub(crate) struct Peer {
        aead: &'static dyn Tls13AeadAlgorithm,
        to_broker: DirectionKeys,
        from_broker: DirectionKeys,
    }

    /// A broker's record layer on `suite` (no key schedule: a key update fails) and its
    /// client, both directions starting at `seq`.
    pub(crate) fn pair(suite: SupportedCipherSuite, seq: u64) -> (Tls13Records, Peer) {
        let SupportedCipherSuite::Tls13(suite) = suite else {
            panic!("a TLS 1.3 suite");
        };
        let aead = suite.aead_alg;
        let keys = |byte| DirectionKeys::new(aead, seq, secrets(aead, byte)).expect("keys");
        let records = Tls13Records::with_keys(
            aead,
            ExtractedSecrets {
                tx: (seq, secrets(aead, 1)),
                rx: (seq, secrets(aead, 2)),
            },
            None,
        )
        .expect("records");
        let peer = Peer {
            aead,
            to_broker: keys(2),
            from_broker: keys(1),
        };
        (records, peer)
    }

    impl Peer {
        /// One record of `typ` holding `content`, as the client sends it.
        pub(crate) fn record(&mut self, typ: ContentType, content: &[u8]) -> Vec<u8> {
            let mut out = Vec::new();
            self.to_broker
                .seal_record(self.aead, typ, content, &mut out)
                .expect("seal");
            out
        }

        /// The records the broker sent, decrypted: content type and content.
        pub(crate) fn opened(&mut self, mut bytes: &[u8]) -> Vec<(ContentType, Vec<u8>)> {
            let mut records = Vec::new();
            while let [_, _, _, hi, lo, rest @ ..] = bytes {
                let len = usize::from(u16::from_be_bytes([*hi, *lo]));
                let mut body = rest[..len].to_vec();
                let seq = self.from_broker.next_seq().expect("seq");
                let plain = self
                    .from_broker
                    .decrypter(self.aead)
                    .decrypt(
                        InboundOpaqueMessage::new(
                            ContentType::ApplicationData,
                            ProtocolVersion::TLSv1_2,
                            &mut body,
                        ),
                        seq,
                    )
                    .expect("the broker's record decrypts");
                records.push((plain.typ, plain.payload.to_vec()));
                bytes = &rest[len..];
            }
            records
        }
    }
}

/// Feeds `data` to the record reader: the first byte picks the suite and whether the rest
/// goes in as raw bytes or as records the client sealed (type, 16-bit length, content), so
/// that the reader's checks after decryption are reached too.
#[cfg(feature = "fuzzing")]
pub(crate) fn fuzz(data: &[u8]) {
    use rustls::crypto::aws_lc_rs::cipher_suite as suites;
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let suite = match mode % 3 {
        0 => suites::TLS13_AES_128_GCM_SHA256,
        1 => suites::TLS13_AES_256_GCM_SHA384,
        _ => suites::TLS13_CHACHA20_POLY1305_SHA256,
    };
    let (mut records, mut peer) = peer::pair(suite, u64::from(mode >> 4));
    let mut input = if mode & 8 == 0 {
        rest.to_vec()
    } else {
        let mut sealed = Vec::new();
        let mut rest = rest;
        while let [typ, hi, lo, tail @ ..] = rest {
            let len = usize::from(u16::from_be_bytes([*hi, *lo])).min(tail.len());
            sealed.extend(peer.record(ContentType::from(*typ), &tail[..len]));
            rest = &tail[len..];
        }
        sealed
    };
    let (mut plaintext, mut outgoing) = (Vec::new(), Vec::new());
    if let Ok(opened) = records.open(&mut input, &mut plaintext, &mut outgoing) {
        assert!(opened.consumed <= input.len());
    }
    // Whatever the broker answered (a key update, an alert) is well formed.
    peer.opened(&outgoing);
}

#[cfg(test)]
mod tests {
    use rustls::crypto::aws_lc_rs::cipher_suite::{
        TLS13_AES_128_GCM_SHA256, TLS13_AES_256_GCM_SHA384, TLS13_CHACHA20_POLY1305_SHA256,
    };

    use super::peer::{Peer, pair};
    use super::*;

    fn suite() -> SupportedCipherSuite {
        TLS13_AES_128_GCM_SHA256
    }

    /// Records as the client reads them: content type and content.
    type Records = Vec<(ContentType, Vec<u8>)>;

    /// Opens `input` on the broker's side; returns the result, the application data and
    /// what the client then reads from the broker.
    fn open(
        records: &mut Tls13Records,
        peer: &mut Peer,
        mut input: Vec<u8>,
    ) -> (Result<Opened, Error>, Vec<u8>, Records) {
        let (mut plaintext, mut outgoing) = (Vec::new(), Vec::new());
        let result = records.open(&mut input, &mut plaintext, &mut outgoing);
        let answers = peer.opened(&outgoing);
        (result, plaintext, answers)
    }

    /// The fatal alert the broker sent, as (level, description).
    fn fatal(description: AlertDescription) -> Records {
        vec![(ContentType::Alert, vec![2, u8::from(description)])]
    }

    #[test]
    fn records_go_both_ways_on_every_suite_from_any_sequence_number() {
        let data: Vec<u8> = (0..40_000u32).map(|i| (i * 31 + i / 97) as u8).collect();
        for suite in [
            TLS13_AES_128_GCM_SHA256,
            TLS13_AES_256_GCM_SHA384,
            TLS13_CHACHA20_POLY1305_SHA256,
        ] {
            // A connection's first sequence number after the handshake is not 0 (a ticket
            // went first), and three records go in one batch.
            let (mut records, mut peer) = pair(suite, 1);
            let mut sealed = Vec::new();
            records.seal(&data, &mut sealed).expect("seal");
            let back: Vec<u8> = peer
                .opened(&sealed)
                .into_iter()
                .flat_map(|(typ, content)| {
                    assert_eq!(typ, ContentType::ApplicationData);
                    content
                })
                .collect();
            assert!(back == data, "{suite:?}: what the client reads differs");
            let input: Vec<u8> = data
                .chunks(MAX_FRAGMENT)
                .flat_map(|c| peer.record(ContentType::ApplicationData, c))
                .collect();
            let (result, plaintext, answers) = open(&mut records, &mut peer, input);
            assert!(result.is_ok(), "{suite:?}: {:?}", result.err());
            assert!(plaintext == data && answers.is_empty(), "{suite:?}");
        }
    }

    #[test]
    fn content_over_2_14_bytes_is_answered_with_record_overflow() {
        let (mut records, mut peer) = pair(suite(), 0);
        let full = peer.record(ContentType::ApplicationData, &[7; MAX_FRAGMENT]);
        let (result, plaintext, _) = open(&mut records, &mut peer, full);
        assert!(result.is_ok() && plaintext.len() == MAX_FRAGMENT);
        let over = peer.record(ContentType::ApplicationData, &[7; MAX_FRAGMENT + 1]);
        let (result, plaintext, answers) = open(&mut records, &mut peer, over);
        assert!(result.is_err() && plaintext.is_empty());
        assert_eq!(answers, fatal(AlertDescription::RecordOverflow));
    }

    #[test]
    fn an_empty_handshake_record_is_an_unexpected_message() {
        let (mut records, mut peer) = pair(suite(), 0);
        let input = peer.record(ContentType::Handshake, &[]);
        let (result, _, answers) = open(&mut records, &mut peer, input);
        assert!(result.is_err());
        assert_eq!(answers, fatal(AlertDescription::UnexpectedMessage));
    }

    #[test]
    fn an_empty_alert_is_an_unexpected_message_and_a_long_one_a_decode_error() {
        for (content, answer) in [
            (&[][..], AlertDescription::UnexpectedMessage),
            (&[1, 0, 0][..], AlertDescription::DecodeError),
        ] {
            let (mut records, mut peer) = pair(suite(), 0);
            let input = peer.record(ContentType::Alert, content);
            let (result, _, answers) = open(&mut records, &mut peer, input);
            assert!(result.is_err(), "{content:?}");
            assert_eq!(answers, fatal(answer), "{content:?}");
        }
    }

    #[test]
    fn a_key_update_must_end_its_record() {
        let (mut records, mut peer) = pair(suite(), 0);
        let two = [KEY_UPDATE, 0, 0, 1, 0, KEY_UPDATE, 0, 0, 1, 0];
        let input = peer.record(ContentType::Handshake, &two);
        let (result, _, answers) = open(&mut records, &mut peer, input);
        let e = result.err().expect("refused");
        assert!(e.to_string().contains("after KeyUpdate"), "{e}");
        assert_eq!(answers, fatal(AlertDescription::UnexpectedMessage));
    }

    #[test]
    fn a_key_update_with_a_bad_request_value_is_an_illegal_parameter() {
        let (mut records, mut peer) = pair(suite(), 0);
        let input = peer.record(ContentType::Handshake, &[KEY_UPDATE, 0, 0, 1, 2]);
        let (result, _, answers) = open(&mut records, &mut peer, input);
        assert!(result.is_err());
        assert_eq!(answers, fatal(AlertDescription::IllegalParameter));
    }

    #[test]
    fn a_failure_of_the_brokers_own_side_sends_internal_error() {
        // Time for a new sending key, but no key schedule to make one: the broker's own
        // failure, which the client hears of before the connection closes.
        let (mut records, mut peer) = pair(suite(), RECORDS_PER_KEY);
        let mut outgoing = Vec::new();
        assert!(records.seal(b"wake up", &mut outgoing).is_err());
        assert_eq!(
            peer.opened(&outgoing),
            fatal(AlertDescription::InternalError)
        );
    }

    #[test]
    fn close_notify_ends_reading_and_a_peer_alert_is_not_answered() {
        let (mut records, mut peer) = pair(suite(), 0);
        let mut input = peer.record(ContentType::ApplicationData, b"bye");
        input.extend(peer.record(ContentType::Alert, &[1, 0]));
        let (result, plaintext, answers) = open(&mut records, &mut peer, input);
        assert!(result.expect("clean close").closed);
        assert_eq!((plaintext.as_slice(), answers.len()), (&b"bye"[..], 0));
        let (mut records, mut peer) = pair(suite(), 0);
        let input = peer.record(ContentType::Alert, &[2, 40]);
        let (result, _, answers) = open(&mut records, &mut peer, input);
        assert!(matches!(result, Err(Error::AlertReceived(_))));
        assert!(answers.is_empty());
    }
}

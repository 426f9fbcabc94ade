//! Ed25519 keys: the console's signing key (PKCS#8) and the public keys, with key ids, that
//! the broker (tokens) and the agents (wake-ups) verify against.

use std::fmt;

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};

/// Longest key id, in bytes.
pub const MAX_KEY_ID_LEN: usize = 64;
/// Length of an Ed25519 signature, in bytes.
pub const SIGNATURE_LEN: usize = 64;

/// Why a key or key id could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// The key id is empty, too long or uses characters outside `A-Z a-z 0-9 - _ .`.
    #[error(
        "key id {0:?} is not valid: use 1 to 64 characters among ASCII letters, digits, '-', '_' and '.'"
    )]
    InvalidKeyId(String),
    /// The public key text is not base64 of 32 bytes.
    #[error("public key is not valid: {0}; expected the base64 of a raw 32-byte Ed25519 key")]
    InvalidPublicKey(String),
    /// The PKCS#8 document is not an Ed25519 private key.
    #[error("private key is not an Ed25519 PKCS#8 key: {0}")]
    InvalidPrivateKey(String),
    /// The system random generator failed.
    #[error("could not generate a key: the system random generator failed")]
    Generation,
}

/// The name of a key, carried next to every signature so that keys can be rotated.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct KeyId(String);

impl KeyId {
    /// Checks `value`: 1 to 64 characters among ASCII letters, digits, `-`, `_` and `.`.
    pub fn new(value: impl Into<String>) -> Result<Self, KeyError> {
        let value = value.into();
        let ok = !value.is_empty()
            && value.len() <= MAX_KEY_ID_LEN
            && value
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
        if ok {
            Ok(Self(value))
        } else {
            let mut shown = value;
            shown.truncate(shown.floor_char_boundary(MAX_KEY_ID_LEN));
            Err(KeyError::InvalidKeyId(shown))
        }
    }

    /// The key id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// An Ed25519 public key (32 raw bytes).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct PublicKey([u8; 32]);

impl PublicKey {
    /// Wraps 32 raw bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// Parses base64 (standard or URL-safe alphabet, padded or not) of the raw 32 bytes.
    pub fn from_base64(text: &str) -> Result<Self, KeyError> {
        let text = text.trim();
        let bytes = [&URL_SAFE_NO_PAD, &URL_SAFE, &STANDARD_NO_PAD, &STANDARD]
            .iter()
            .find_map(|engine| engine.decode(text).ok())
            .ok_or_else(|| KeyError::InvalidPublicKey("not base64".into()))?;
        let raw: [u8; 32] = bytes.as_slice().try_into().map_err(|_| {
            KeyError::InvalidPublicKey(format!("decodes to {} bytes, not 32", bytes.len()))
        })?;
        Ok(Self(raw))
    }

    /// The raw key as URL-safe base64 without padding (the form written in tenant files).
    pub fn to_base64(&self) -> String {
        URL_SAFE_NO_PAD.encode(self.0)
    }

    /// The raw 32 bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Whether `signature` is this key's Ed25519 signature of `message`.
    pub fn verifies(&self, message: &[u8], signature: &[u8]) -> bool {
        UnparsedPublicKey::new(&ED25519, &self.0)
            .verify(message, signature)
            .is_ok()
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.to_base64())
    }
}

/// The console's Ed25519 signing key with its key id. It signs tokens and wake-ups; the
/// signed messages are domain-separated, so one key may serve both.
pub struct SigningKey {
    kid: KeyId,
    pair: Ed25519KeyPair,
}

impl SigningKey {
    /// Generates a new private key as a PKCS#8 v2 document (store it with mode 0600).
    pub fn generate_pkcs8() -> Result<Vec<u8>, KeyError> {
        let doc = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new())
            .map_err(|_| KeyError::Generation)?;
        Ok(doc.as_ref().to_vec())
    }

    /// Loads a PKCS#8 (v1 or v2) Ed25519 private key.
    pub fn from_pkcs8(kid: KeyId, pkcs8: &[u8]) -> Result<Self, KeyError> {
        let pair = Ed25519KeyPair::from_pkcs8_maybe_unchecked(pkcs8)
            .map_err(|e| KeyError::InvalidPrivateKey(e.to_string()))?;
        Ok(Self { kid, pair })
    }

    /// Generates a fresh key in memory (tests, `beckon up`).
    pub fn generate(kid: KeyId) -> Result<Self, KeyError> {
        Self::from_pkcs8(kid, &Self::generate_pkcs8()?)
    }

    /// A key from a fixed 32-byte seed: for the documented test vectors and fuzzing only.
    #[cfg(any(test, feature = "fuzzing"))]
    pub(crate) fn from_seed(kid: KeyId, seed: &[u8; 32]) -> Self {
        let pair = Ed25519KeyPair::from_seed_unchecked(seed).expect("a 32-byte seed is valid");
        Self { kid, pair }
    }

    /// The key id.
    pub fn kid(&self) -> &KeyId {
        &self.kid
    }

    /// The matching public key, to write into tenant files and agent state.
    pub fn public_key(&self) -> PublicKey {
        let mut raw = [0u8; 32];
        raw.copy_from_slice(self.pair.public_key().as_ref());
        PublicKey(raw)
    }

    /// Signs `message`.
    pub(crate) fn sign(&self, message: &[u8]) -> [u8; SIGNATURE_LEN] {
        let mut out = [0u8; SIGNATURE_LEN];
        out.copy_from_slice(self.pair.sign(message).as_ref());
        out
    }
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print private key material.
        f.debug_struct("SigningKey")
            .field("kid", &self.kid)
            .field("public_key", &self.public_key())
            .finish()
    }
}

/// URL-safe base64 without padding, as used in tokens and signatures.
pub(crate) fn b64url(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// Decodes strict URL-safe base64 without padding; `None` on any other text.
pub(crate) fn b64url_decode(text: &[u8]) -> Option<Vec<u8>> {
    URL_SAFE_NO_PAD.decode(text).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_ids_are_checked() {
        assert!(KeyId::new("console-2026.11_a").is_ok());
        for bad in ["", "a b", "a/b", "é", &"k".repeat(65)] {
            assert!(KeyId::new(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_generated_key_signs_and_its_public_key_verifies() {
        let key = SigningKey::generate(KeyId::new("k1").unwrap()).unwrap();
        let sig = key.sign(b"hello");
        assert!(key.public_key().verifies(b"hello", &sig));
        assert!(!key.public_key().verifies(b"hellO", &sig));
        let other = SigningKey::generate(KeyId::new("k2").unwrap()).unwrap();
        assert!(!other.public_key().verifies(b"hello", &sig));
        assert!(!key.public_key().verifies(b"hello", &sig[..63]));
    }

    #[test]
    fn pkcs8_round_trip_keeps_the_key() {
        let doc = SigningKey::generate_pkcs8().unwrap();
        let a = SigningKey::from_pkcs8(KeyId::new("k").unwrap(), &doc).unwrap();
        let b = SigningKey::from_pkcs8(KeyId::new("k").unwrap(), &doc).unwrap();
        assert_eq!(a.public_key(), b.public_key());
        assert!(SigningKey::from_pkcs8(KeyId::new("k").unwrap(), b"not a key").is_err());
        assert!(!format!("{a:?}").contains(&format!("{:?}", doc)));
    }

    #[test]
    fn public_keys_parse_from_every_base64_flavour() {
        let key = SigningKey::generate(KeyId::new("k").unwrap())
            .unwrap()
            .public_key();
        let raw = key.as_bytes();
        for text in [
            URL_SAFE_NO_PAD.encode(raw),
            URL_SAFE.encode(raw),
            STANDARD.encode(raw),
            STANDARD_NO_PAD.encode(raw),
            format!("  {}\n", key.to_base64()),
        ] {
            assert_eq!(PublicKey::from_base64(&text).unwrap(), key, "{text}");
        }
        let err = PublicKey::from_base64(&URL_SAFE_NO_PAD.encode([1u8; 31])).unwrap_err();
        assert!(err.to_string().contains("31 bytes"), "{err}");
        assert!(PublicKey::from_base64("***").is_err());
    }
}

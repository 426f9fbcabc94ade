//! Random secrets (tokens), their stored hashes, and password hashing.
//!
//! Tokens are 32 random bytes in URL-safe base64 behind a short prefix that says what they
//! are (`bke_` enrollment, `bkt_` API, `bks_` session, `bka_` agent check-in). Only their
//! SHA-256 is stored: a stolen database does not give working tokens. Passwords are hashed
//! with Argon2id (the `argon2` crate's defaults: 19 MiB, 2 passes) and stored as PHC strings;
//! hashes of the console's first format still verify and are replaced at the next login.

use argon2::{Argon2, PasswordHash, PasswordHasher, PasswordVerifier};
use base64::Engine;
use base64::engine::general_purpose::{STANDARD_NO_PAD, URL_SAFE_NO_PAD};

/// Random bytes from rand's thread generator (a CSPRNG seeded by the operating system).
pub fn random_bytes<const N: usize>() -> [u8; N] {
    use rand::RngCore;
    let mut out = [0u8; N];
    rand::rng().fill_bytes(&mut out);
    out
}

/// A new token with its prefix, e.g. `bkt_...`.
pub fn new_token(prefix: &str) -> String {
    format!("{prefix}{}", URL_SAFE_NO_PAD.encode(random_bytes::<32>()))
}

/// A short public id (for listing and revoking tokens).
pub fn new_id() -> String {
    URL_SAFE_NO_PAD.encode(random_bytes::<9>())
}

/// SHA-256 of a token, as stored.
pub fn token_hash(token: &str) -> [u8; 32] {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, token.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

/// Why a password could not be hashed.
#[derive(Debug, thiserror::Error)]
pub enum PasswordError {
    /// Argon2id refused the input (a password longer than it accepts) or its parameters.
    #[error("cannot hash the password with Argon2id: {0}; choose a shorter password")]
    Hash(String),
}

/// Hashes a password with Argon2id (the crate's default parameters) and a fresh salt, as a
/// PHC string: `$argon2id$v=19$m=19456,t=2,p=1$<salt>$<hash>`.
pub fn hash_password(password: &str) -> Result<String, PasswordError> {
    let salt = random_bytes::<16>();
    let hash: PasswordHash = Argon2::default()
        .hash_password_with_salt(password.as_bytes(), &salt)
        .map_err(|e| PasswordError::Hash(e.to_string()))?;
    Ok(hash.to_string())
}

/// What checking a password against its stored hash found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PasswordCheck {
    /// The password does not match (or the stored hash is unreadable).
    Wrong,
    /// The password matches a PHC string hash.
    Right,
    /// The password matches a hash in the console's first format
    /// (`argon2id$<salt>$<hash>`): store [`hash_password`]'s PHC string in its place.
    RightOutdated,
}

impl PasswordCheck {
    /// Whether the password matched.
    pub fn is_right(self) -> bool {
        self != Self::Wrong
    }
}

/// Checks a password against a stored hash: a PHC string (with the parameters it names),
/// or the console's first format, `argon2id$<salt base64>$<hash base64>` (default
/// parameters). Both compare in constant time.
pub fn verify_password(password: &str, stored: &str) -> PasswordCheck {
    if stored.starts_with('$') {
        let Ok(hash) = PasswordHash::new(stored) else {
            return PasswordCheck::Wrong;
        };
        return match Argon2::default().verify_password(password.as_bytes(), &hash) {
            Ok(()) => PasswordCheck::Right,
            Err(_) => PasswordCheck::Wrong,
        };
    }
    if verify_first_format(password, stored) {
        PasswordCheck::RightOutdated
    } else {
        PasswordCheck::Wrong
    }
}

/// The console's first format: `argon2id$<salt base64>$<hash base64>`.
fn verify_first_format(password: &str, stored: &str) -> bool {
    let mut parts = stored.split('$');
    let (Some("argon2id"), Some(salt), Some(hash), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return false;
    };
    let (Ok(salt), Ok(hash)) = (STANDARD_NO_PAD.decode(salt), STANDARD_NO_PAD.decode(hash)) else {
        return false;
    };
    let mut out = vec![0u8; hash.len()];
    if Argon2::default()
        .hash_password_into(password.as_bytes(), &salt, &mut out)
        .is_err()
    {
        return false;
    }
    aws_lc_rs::constant_time::verify_slices_are_equal(&out, &hash).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_verify_only_with_the_right_password() {
        let h = hash_password("correct horse").unwrap();
        assert!(h.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{h}");
        assert_eq!(verify_password("correct horse", &h), PasswordCheck::Right);
        assert_eq!(verify_password("correct horsE", &h), PasswordCheck::Wrong);
        assert_eq!(
            verify_password("correct horse", "garbage"),
            PasswordCheck::Wrong
        );
        assert_ne!(h, hash_password("correct horse").unwrap(), "salted");
    }

    #[test]
    fn first_format_hashes_verify_and_ask_to_be_replaced() {
        let salt = [7u8; 16];
        let mut out = [0u8; 32];
        Argon2::default()
            .hash_password_into(b"correct horse", &salt, &mut out)
            .unwrap();
        let old = format!(
            "argon2id${}${}",
            STANDARD_NO_PAD.encode(salt),
            STANDARD_NO_PAD.encode(out)
        );
        assert_eq!(
            verify_password("correct horse", &old),
            PasswordCheck::RightOutdated
        );
        assert_eq!(verify_password("correct horsE", &old), PasswordCheck::Wrong);
    }

    #[test]
    fn tokens_are_random_and_prefixed() {
        let a = new_token("bkt_");
        assert!(a.starts_with("bkt_") && a.len() > 40);
        assert_ne!(a, new_token("bkt_"));
        assert_ne!(token_hash(&a), token_hash(&new_token("bkt_")));
    }
}

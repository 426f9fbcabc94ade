//! Random secrets (tokens), their stored hashes, and password hashing.
//!
//! Tokens are 32 random bytes in URL-safe base64 behind a short prefix that says what they
//! are (`bke_` enrollment, `bkt_` API, `bks_` session, `bka_` agent check-in). Only their
//! SHA-256 is stored: a stolen database does not give working tokens. Passwords are hashed
//! with Argon2id (the `argon2` crate's defaults: 19 MiB, 2 passes).

use argon2::Argon2;
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

/// Hashes a password with Argon2id and a fresh salt:
/// `argon2id$<salt base64>$<hash base64>` (default parameters).
pub fn hash_password(password: &str) -> Result<String, String> {
    let salt = random_bytes::<16>();
    let mut out = [0u8; 32];
    Argon2::default()
        .hash_password_into(password.as_bytes(), &salt, &mut out)
        .map_err(|e| format!("cannot hash the password: {e}"))?;
    Ok(format!(
        "argon2id${}${}",
        STANDARD_NO_PAD.encode(salt),
        STANDARD_NO_PAD.encode(out)
    ))
}

/// Checks a password against a stored hash (constant-time comparison).
pub fn verify_password(password: &str, stored: &str) -> bool {
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
        assert!(verify_password("correct horse", &h));
        assert!(!verify_password("correct horsE", &h));
        assert!(!verify_password("correct horse", "garbage"));
        assert_ne!(h, hash_password("correct horse").unwrap(), "salted");
    }

    #[test]
    fn tokens_are_random_and_prefixed() {
        let a = new_token("bkt_");
        assert!(a.starts_with("bkt_") && a.len() > 40);
        assert_ne!(a, new_token("bkt_"));
        assert_ne!(token_hash(&a), token_hash(&new_token("bkt_")));
    }
}

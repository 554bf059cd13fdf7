//! Join tokens: `mnj1.` + base64url of a fixed 88-byte layout:
//! CA fingerprint (32) | token id (16) | secret (32) | expiry, Unix seconds (u64 BE).
//!
//! The fingerprint lets a joiner check the server's chain *before* it sends
//! the token; the id names the token in the CA node's store, which keeps only
//! a SHA-256 of the secret.

use std::fmt;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use rand::RngExt;

const PREFIX: &str = "mnj1.";
const LEN: usize = 32 + 16 + 32 + 8;

#[derive(Clone, PartialEq, Eq)]
pub struct Token {
    pub ca_fingerprint: [u8; 32],
    pub id: [u8; 16],
    pub secret: [u8; 32],
    /// Unix seconds.
    pub expires: u64,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    #[error("not a meshnode join token (expected it to start with {PREFIX:?}; copy the whole line `meshnode token create` printed)")]
    Prefix,
    #[error("join token is damaged: {0}")]
    Damaged(String),
}

impl Token {
    /// A new token with a random id and secret.
    pub fn generate(ca_fingerprint: [u8; 32], expires: u64) -> Self {
        let mut rng = rand::rng();
        Self {
            ca_fingerprint,
            id: rng.random(),
            secret: rng.random(),
            expires,
        }
    }

    pub fn encode(&self) -> String {
        let mut b = Vec::with_capacity(LEN);
        b.extend_from_slice(&self.ca_fingerprint);
        b.extend_from_slice(&self.id);
        b.extend_from_slice(&self.secret);
        b.extend_from_slice(&self.expires.to_be_bytes());
        format!("{PREFIX}{}", URL_SAFE_NO_PAD.encode(b))
    }

    pub fn decode(s: &str) -> Result<Self, TokenError> {
        let body = s.trim().strip_prefix(PREFIX).ok_or(TokenError::Prefix)?;
        if body.len() > 2 * LEN {
            return Err(TokenError::Damaged("too long".into()));
        }
        let b = URL_SAFE_NO_PAD
            .decode(body)
            .map_err(|e| TokenError::Damaged(e.to_string()))?;
        if b.len() != LEN {
            return Err(TokenError::Damaged(format!(
                "{} bytes, expected {LEN}",
                b.len()
            )));
        }
        let mut t = Token {
            ca_fingerprint: [0; 32],
            id: [0; 16],
            secret: [0; 32],
            expires: 0,
        };
        t.ca_fingerprint.copy_from_slice(&b[..32]);
        t.id.copy_from_slice(&b[32..48]);
        t.secret.copy_from_slice(&b[48..80]);
        let mut exp = [0u8; 8];
        exp.copy_from_slice(&b[80..]);
        t.expires = u64::from_be_bytes(exp);
        Ok(t)
    }

    /// The token id as the CA node's store names it.
    pub fn id_hex(&self) -> String {
        super::hex(&self.id)
    }

    /// What the CA node stores instead of the secret.
    pub fn secret_hash(&self) -> String {
        super::hex(&super::sha256(&self.secret))
    }
}

/// Never print the secret.
impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Token")
            .field("id", &self.id_hex())
            .field("expires", &self.expires)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn round_trip_and_debug_hides_secret() {
        let t = Token::generate([7; 32], 1_900_000_000);
        let s = t.encode();
        assert!(s.starts_with("mnj1."));
        assert_eq!(Token::decode(&format!("  {s}\n")).unwrap(), t);
        assert!(!format!("{t:?}").contains(&super::super::hex(&t.secret)));
        assert_ne!(Token::generate([7; 32], 1).id, t.id);
    }

    #[test]
    fn damaged_tokens_are_clear_errors() {
        let s = Token::generate([7; 32], 1).encode();
        assert_eq!(Token::decode("hello"), Err(TokenError::Prefix));
        assert!(matches!(
            Token::decode(&s[..s.len() - 4]),
            Err(TokenError::Damaged(_))
        ));
        assert!(matches!(
            Token::decode("mnj1.!!!"),
            Err(TokenError::Damaged(_))
        ));
    }

    proptest! {
        #[test]
        fn garbage_never_panics(s in ".{0,200}") {
            let _ = Token::decode(&s);
            let _ = Token::decode(&format!("mnj1.{s}"));
        }
    }
}

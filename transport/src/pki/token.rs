//! Join tokens: `mnj2.` + base64url of a fixed 88-byte layout:
//! CA fingerprint (32) | token id (16) | key seed (32) | expiry, Unix seconds (u64 BE).
//!
//! The fingerprint lets a joiner check the server's chain *before* it sends
//! anything; the id names the token in the CA node's store.
//!
//! The token's secret is the seed of an Ed25519 private key. The CA node
//! stores only its public half. A joiner never sends the secret: it sends the
//! token id and a [`Token::prove`] signature over everything that decides the
//! certificate (the CA, the token, the node name, the cluster and the CSR,
//! which binds the joiner's own key). A relay, or anyone who captures the
//! request, can replay it only to get the same certificate for the joiner's
//! key, which is useless without the joiner's private key; changing the name,
//! the cluster or the key breaks the proof.

use std::fmt;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use rand::RngExt;
use ring::signature::{self, Ed25519KeyPair, KeyPair, UnparsedPublicKey};

const PREFIX: &str = "mnj2.";
/// Tokens of meshnode before join proofs: their secret travelled in the request.
const LEGACY_PREFIX: &str = "mnj1.";
const LEN: usize = 32 + 16 + 32 + 8;
/// Domain separation of the proof's signing input.
const PROOF_CONTEXT: &[u8] = b"meshnode-join-proof-v1\0";

#[derive(Clone, PartialEq, Eq)]
pub struct Token {
    pub ca_fingerprint: [u8; 32],
    pub id: [u8; 16],
    /// Ed25519 private key seed: the token's secret.
    pub seed: [u8; 32],
    /// Unix seconds.
    pub expires: u64,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    #[error("not a meshnode join token (expected it to start with {PREFIX:?}; copy the whole line `meshnode token create` printed)")]
    Prefix,
    #[error("this join token was made by an older meshnode (its secret would travel in the request); create a new one with `meshnode token create`")]
    Legacy,
    #[error("join token is damaged: {0}")]
    Damaged(String),
}

impl Token {
    /// A new token with a random id and key.
    pub fn generate(ca_fingerprint: [u8; 32], expires: u64) -> Self {
        let mut rng = rand::rng();
        Self {
            ca_fingerprint,
            id: rng.random(),
            seed: rng.random(),
            expires,
        }
    }

    pub fn encode(&self) -> String {
        let mut b = Vec::with_capacity(LEN);
        b.extend_from_slice(&self.ca_fingerprint);
        b.extend_from_slice(&self.id);
        b.extend_from_slice(&self.seed);
        b.extend_from_slice(&self.expires.to_be_bytes());
        format!("{PREFIX}{}", URL_SAFE_NO_PAD.encode(b))
    }

    pub fn decode(s: &str) -> Result<Self, TokenError> {
        let s = s.trim();
        if s.starts_with(LEGACY_PREFIX) {
            return Err(TokenError::Legacy);
        }
        let body = s.strip_prefix(PREFIX).ok_or(TokenError::Prefix)?;
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
            seed: [0; 32],
            expires: 0,
        };
        t.ca_fingerprint.copy_from_slice(&b[..32]);
        t.id.copy_from_slice(&b[32..48]);
        t.seed.copy_from_slice(&b[48..80]);
        let mut exp = [0u8; 8];
        exp.copy_from_slice(&b[80..]);
        t.expires = u64::from_be_bytes(exp);
        Ok(t)
    }

    /// The token id as the CA node's store names it.
    pub fn id_hex(&self) -> String {
        super::hex(&self.id)
    }

    /// ring refuses only seeds that are not 32 bytes long, which the type rules out.
    fn key(&self) -> Result<Ed25519KeyPair, TokenError> {
        Ed25519KeyPair::from_seed_unchecked(&self.seed)
            .map_err(|e| TokenError::Damaged(format!("key seed: {e}")))
    }

    /// The public half of the token's key: what the CA node stores (hex).
    pub fn public_key_hex(&self) -> Result<String, TokenError> {
        Ok(super::hex(self.key()?.public_key().as_ref()))
    }

    /// The joiner's proof that it holds this token, bound to the request.
    pub fn prove(
        &self,
        csr: &[u8],
        node: &str,
        cluster: Option<&str>,
    ) -> Result<Vec<u8>, TokenError> {
        let input = proof_input(&self.ca_fingerprint, &self.id, csr, node, cluster);
        Ok(self.key()?.sign(&input).as_ref().to_vec())
    }
}

/// What a join proof signs: every field that decides the certificate,
/// length-prefixed so no two requests share an input.
pub fn proof_input(
    ca_fingerprint: &[u8; 32],
    token_id: &[u8; 16],
    csr: &[u8],
    node: &str,
    cluster: Option<&str>,
) -> Vec<u8> {
    let mut b = Vec::with_capacity(PROOF_CONTEXT.len() + 64 + csr.len() + node.len() + 32);
    b.extend_from_slice(PROOF_CONTEXT);
    b.extend_from_slice(ca_fingerprint);
    b.extend_from_slice(token_id);
    for field in [csr, node.as_bytes()] {
        b.extend_from_slice(&(field.len() as u64).to_be_bytes());
        b.extend_from_slice(field);
    }
    match cluster {
        None => b.push(0),
        Some(c) => {
            b.push(1);
            b.extend_from_slice(&(c.len() as u64).to_be_bytes());
            b.extend_from_slice(c.as_bytes());
        }
    }
    b
}

/// Checks a join proof against the token's stored public key (hex).
pub fn verify_proof(public_key_hex: &str, input: &[u8], proof: &[u8]) -> bool {
    let Some(pk) = super::unhex(public_key_hex) else {
        return false;
    };
    UnparsedPublicKey::new(&signature::ED25519, pk)
        .verify(input, proof)
        .is_ok()
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
        assert!(s.starts_with("mnj2."));
        assert_eq!(Token::decode(&format!("  {s}\n")).unwrap(), t);
        assert!(!format!("{t:?}").contains(&super::super::hex(&t.seed)));
        assert_ne!(Token::generate([7; 32], 1).id, t.id);
    }

    #[test]
    fn damaged_and_old_tokens_are_clear_errors() {
        let s = Token::generate([7; 32], 1).encode();
        assert_eq!(Token::decode("hello"), Err(TokenError::Prefix));
        assert_eq!(Token::decode("mnj1.AAAA"), Err(TokenError::Legacy));
        assert!(matches!(
            Token::decode(&s[..s.len() - 4]),
            Err(TokenError::Damaged(_))
        ));
        assert!(matches!(
            Token::decode("mnj2.!!!"),
            Err(TokenError::Damaged(_))
        ));
    }

    #[test]
    fn a_proof_binds_every_field_and_the_key() {
        let t = Token::generate([7; 32], 1);
        let pk = t.public_key_hex().unwrap();
        let proof = t.prove(b"csr", "vm-1", Some("east")).unwrap();
        let input = |fp: &[u8; 32], id: &[u8; 16], csr: &[u8], node: &str, c: Option<&str>| {
            proof_input(fp, id, csr, node, c)
        };
        assert!(verify_proof(
            &pk,
            &input(&t.ca_fingerprint, &t.id, b"csr", "vm-1", Some("east")),
            &proof
        ));
        for other in [
            input(&[8; 32], &t.id, b"csr", "vm-1", Some("east")),
            input(&t.ca_fingerprint, &[0; 16], b"csr", "vm-1", Some("east")),
            input(&t.ca_fingerprint, &t.id, b"csR", "vm-1", Some("east")),
            input(&t.ca_fingerprint, &t.id, b"csr", "vm-2", Some("east")),
            input(&t.ca_fingerprint, &t.id, b"csr", "vm-1", Some("west")),
            input(&t.ca_fingerprint, &t.id, b"csr", "vm-1", None),
            // Shifting bytes between fields changes the input.
            input(&t.ca_fingerprint, &t.id, b"cs", "rvm-1", Some("east")),
        ] {
            assert!(!verify_proof(&pk, &other, &proof));
        }
        // Another token's key, a damaged stored key, a damaged proof.
        let good = input(&t.ca_fingerprint, &t.id, b"csr", "vm-1", Some("east"));
        assert!(!verify_proof(
            &Token::generate([7; 32], 1).public_key_hex().unwrap(),
            &good,
            &proof
        ));
        assert!(!verify_proof("zz", &good, &proof));
        let mut bad = proof.clone();
        bad[3] ^= 1;
        assert!(!verify_proof(&pk, &good, &bad));
        // The public key reveals nothing of the seed and is stable.
        assert_eq!(t.public_key_hex().unwrap(), pk);
        assert!(!pk.contains(&super::super::hex(&t.seed)));
    }

    proptest! {
        #[test]
        fn garbage_never_panics(s in ".{0,200}") {
            let _ = Token::decode(&s);
            let _ = Token::decode(&format!("mnj2.{s}"));
        }

        #[test]
        fn garbage_proofs_are_refused(pk in ".{0,80}", proof in proptest::collection::vec(any::<u8>(), 0..100)) {
            prop_assert!(!verify_proof(&pk, b"x", &proof));
        }
    }
}

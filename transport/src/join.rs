//! The `meshnode-join/1` protocol: one bidi stream per request. The client
//! writes one encoded [`Request`] and finishes its side; the server answers
//! with one encoded [`Response`] and finishes. Both sides read with a size cap
//! and a deadline; messages are versioned enums through [`crate::codec`].
//!
//! - `Join` comes from a machine without a certificate (it verified the
//!   server's chain against the token's CA fingerprint first) or from a member
//!   relaying it to a CA node.
//! - `Renew` carries the current certificate and a CSR for the same key: the
//!   CSR's signature proves possession of the key, so a renewal is
//!   authenticated by the current certificate wherever it is relayed from.

use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::codec;

/// Cap on one request or response.
pub const MAX_MESSAGE: usize = 32 * 1024;
/// A peer that does not send its whole message within this is dropped.
pub const READ_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// The token's secret never travels: `proof` is its key's signature over
    /// [`crate::pki::token::proof_input`] of this request's fields.
    Join {
        token_id: [u8; 16],
        proof: Vec<u8>,
        /// DER.
        csr: Vec<u8>,
        node: String,
        /// `None`: the token's cluster, else the CA node's.
        cluster: Option<String>,
    },
    Renew {
        /// The current node certificate, DER.
        cert: Vec<u8>,
        /// DER, for the key of `cert`.
        csr: Vec<u8>,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    Issued {
        cert_pem: String,
        ca_pem: String,
        /// The SPIFFE ID of the new certificate.
        identity: String,
        /// Live members of the new node's cluster, to seed its gossip.
        seeds: Vec<SocketAddr>,
    },
    Refused {
        reason: Refusal,
        message: String,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Refusal {
    /// Unknown token, or wrong secret.
    BadToken,
    Expired,
    UsedUp,
    NameTaken,
    /// No node holding the CA key could be reached.
    NoCa,
    Revoked,
    Malformed,
    Internal,
}

/// Version 1 carried the token itself in `Join`; its `Renew` is unchanged
/// and is still what renewals send, so CA nodes can be upgraded first.
#[derive(Serialize, Deserialize)]
enum WireRequest {
    V1(RequestV1),
    V2(Request),
}

#[derive(Serialize, Deserialize)]
enum RequestV1 {
    Join {
        token: String,
        csr: Vec<u8>,
        node: String,
        cluster: Option<String>,
    },
    Renew {
        cert: Vec<u8>,
        csr: Vec<u8>,
    },
}

#[derive(Serialize, Deserialize)]
enum WireResponse {
    V1(Response),
}

#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    #[error("{0}")]
    Stream(String),
    #[error("no answer within {READ_TIMEOUT:?}")]
    Timeout,
    #[error(transparent)]
    Codec(#[from] codec::CodecError),
    #[error("a join request of an older meshnode (its token's secret travels in it): upgrade the joining machine's meshnode and create a new token")]
    Legacy,
}

impl Refusal {
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::BadToken => "bad_token",
            Refusal::Expired => "expired",
            Refusal::UsedUp => "used_up",
            Refusal::NameTaken => "name_taken",
            Refusal::NoCa => "no_ca",
            Refusal::Revoked => "revoked",
            Refusal::Malformed => "malformed",
            Refusal::Internal => "internal",
        }
    }
}

impl Response {
    pub fn refused(reason: Refusal, message: impl Into<String>) -> Self {
        Response::Refused {
            reason,
            message: message.into(),
        }
    }
}

pub fn encode_request(r: &Request) -> Result<Vec<u8>, codec::CodecError> {
    match r {
        Request::Renew { cert, csr } => codec::encode(&WireRequest::V1(RequestV1::Renew {
            cert: cert.clone(),
            csr: csr.clone(),
        })),
        Request::Join { .. } => codec::encode(&WireRequest::V2(r.clone())),
    }
}

pub fn decode_request(b: &[u8]) -> Result<Request, JoinError> {
    match codec::decode(b)? {
        WireRequest::V1(RequestV1::Renew { cert, csr }) => Ok(Request::Renew { cert, csr }),
        WireRequest::V1(RequestV1::Join { .. }) => Err(JoinError::Legacy),
        WireRequest::V2(r) => Ok(r),
    }
}

pub fn encode_response(r: &Response) -> Result<Vec<u8>, codec::CodecError> {
    codec::encode(&WireResponse::V1(r.clone()))
}

pub fn decode_response(b: &[u8]) -> Result<Response, codec::CodecError> {
    let WireResponse::V1(r) = codec::decode(b)?;
    Ok(r)
}

/// Sends `req` on a new stream of `conn` and waits for the answer.
pub async fn call(
    conn: &quinn::Connection,
    req: &Request,
    timeout: Duration,
) -> Result<Response, JoinError> {
    let body = encode_request(req)?;
    let exchange = async {
        let (mut send, mut recv) = conn
            .open_bi()
            .await
            .map_err(|e| JoinError::Stream(e.to_string()))?;
        send.write_all(&body)
            .await
            .map_err(|e| JoinError::Stream(e.to_string()))?;
        send.finish()
            .map_err(|e| JoinError::Stream(e.to_string()))?;
        let bytes = recv
            .read_to_end(MAX_MESSAGE)
            .await
            .map_err(|e| JoinError::Stream(e.to_string()))?;
        Ok(decode_response(&bytes)?)
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| JoinError::Timeout)?
}

/// Reads one request from an accepted stream (capped, with a deadline).
pub async fn read_request(recv: &mut quinn::RecvStream) -> Result<Request, JoinError> {
    let bytes = tokio::time::timeout(READ_TIMEOUT, recv.read_to_end(MAX_MESSAGE))
        .await
        .map_err(|_| JoinError::Timeout)?
        .map_err(|e| JoinError::Stream(e.to_string()))?;
    decode_request(&bytes)
}

/// Writes the answer and finishes the stream.
pub async fn respond(send: &mut quinn::SendStream, resp: &Response) -> Result<(), JoinError> {
    let body = encode_response(resp)?;
    send.write_all(&body)
        .await
        .map_err(|e| JoinError::Stream(e.to_string()))?;
    send.finish().map_err(|e| JoinError::Stream(e.to_string()))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn round_trips() {
        let req = Request::Join {
            token_id: [9; 16],
            proof: vec![4; 64],
            csr: vec![1, 2, 3],
            node: "vm-1".into(),
            cluster: Some("east".into()),
        };
        assert_eq!(decode_request(&encode_request(&req).unwrap()).unwrap(), req);
        let renew = Request::Renew {
            cert: vec![1],
            csr: vec![2],
        };
        assert_eq!(
            decode_request(&encode_request(&renew).unwrap()).unwrap(),
            renew
        );
        let resp = Response::refused(Refusal::UsedUp, "token used up");
        assert_eq!(
            decode_response(&encode_response(&resp).unwrap()).unwrap(),
            resp
        );
        let mut b = encode_request(&req).unwrap();
        b.push(0);
        assert!(decode_request(&b).is_err(), "trailing bytes");
    }

    #[test]
    fn older_nodes_renew_but_their_joins_get_a_clear_error() {
        let old_renew = codec::encode(&WireRequest::V1(RequestV1::Renew {
            cert: vec![1],
            csr: vec![2],
        }))
        .unwrap();
        assert_eq!(
            decode_request(&old_renew).unwrap(),
            Request::Renew {
                cert: vec![1],
                csr: vec![2]
            }
        );
        let old_join = codec::encode(&WireRequest::V1(RequestV1::Join {
            token: "mnj1.x".into(),
            csr: vec![],
            node: "n".into(),
            cluster: None,
        }))
        .unwrap();
        let err = decode_request(&old_join).unwrap_err();
        assert!(matches!(err, JoinError::Legacy), "{err}");
        assert!(err.to_string().contains("new token"));
    }

    proptest! {
        #[test]
        fn garbage_never_panics(b in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode_request(&b);
            let _ = decode_response(&b);
        }
    }
}

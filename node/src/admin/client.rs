//! A minimal client for the admin API, used by the CLI.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

const TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the meshnode admin API at {addr}: {reason} (is the agent running? pass --admin ADDR)")]
    Unreachable { addr: SocketAddr, reason: String },
    #[error("admin API at {addr} answered {status}: {body}")]
    Status {
        addr: SocketAddr,
        status: u16,
        body: String,
    },
}

/// Sends a request and returns the body of a 2xx answer.
pub async fn request(
    addr: SocketAddr,
    method: hyper::Method,
    path: &str,
) -> Result<String, ClientError> {
    send(addr, method, path, None, None).await
}

/// `POST` of a JSON body with a bearer secret (the CA endpoints).
pub async fn post_json(
    addr: SocketAddr,
    path: &str,
    body: &serde_json::Value,
    secret: &str,
) -> Result<String, ClientError> {
    post_json_with(addr, path, body, Some(secret)).await
}

/// A `POST` of JSON whose secret is optional (`/v1/policy`: the signed
/// document authorises itself on a loopback admin address).
pub async fn post_json_with(
    addr: SocketAddr,
    path: &str,
    body: &serde_json::Value,
    secret: Option<&str>,
) -> Result<String, ClientError> {
    send(
        addr,
        hyper::Method::POST,
        path,
        Some(body.to_string()),
        secret,
    )
    .await
}

async fn send(
    addr: SocketAddr,
    method: hyper::Method,
    path: &str,
    body: Option<String>,
    secret: Option<&str>,
) -> Result<String, ClientError> {
    let unreachable = |reason: String| ClientError::Unreachable { addr, reason };
    let work = async {
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        tokio::spawn(conn);
        let mut req = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, addr.to_string());
        if let Some(secret) = secret {
            req = req.header(hyper::header::AUTHORIZATION, format!("Bearer {secret}"));
        }
        if body.is_some() {
            req = req.header(hyper::header::CONTENT_TYPE, "application/json");
        }
        let req = req
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| unreachable(e.to_string()))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| unreachable(e.to_string()))?
            .to_bytes();
        let body = String::from_utf8_lossy(&body).into_owned();
        if status.is_success() {
            Ok(body)
        } else {
            Err(ClientError::Status {
                addr,
                status: status.as_u16(),
                body,
            })
        }
    };
    tokio::time::timeout(TIMEOUT, work)
        .await
        .map_err(|_| unreachable(format!("no answer within {TIMEOUT:?}")))?
}

pub async fn get(addr: SocketAddr, path: &str) -> Result<String, ClientError> {
    request(addr, hyper::Method::GET, path).await
}

/// A `GET` with the admin secret, which a remote admin address needs.
pub async fn get_with(
    addr: SocketAddr,
    path: &str,
    secret: Option<&str>,
) -> Result<String, ClientError> {
    send(addr, hyper::Method::GET, path, None, secret).await
}

/// A `POST` without a body, with the admin secret (`/v1/leave`).
pub async fn post(addr: SocketAddr, path: &str, secret: &str) -> Result<String, ClientError> {
    send(addr, hyper::Method::POST, path, None, Some(secret)).await
}

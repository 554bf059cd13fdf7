//! `meshnode check pass|warn|fail SERVICE`: an application reports the
//! state of its ttl check, with its service's token (not the admin secret).

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Args, ValueEnum};
use meshnode_node::admin::client::{self, ClientError};
use serde_json::Value;

use super::AdminArgs;
use crate::Failure;

#[derive(Clone, Copy, ValueEnum)]
pub enum Status {
    Pass,
    Warn,
    Fail,
}

#[derive(Args)]
pub struct CheckArgs {
    /// pass, warn or fail.
    #[arg(value_enum)]
    status: Status,
    /// The service whose ttl check this reports.
    service: String,
    /// Why (shown as the check's output in status and endpoints).
    #[arg(long)]
    note: Option<String>,
    /// The instance's port, when the service has several on this node.
    #[arg(long)]
    port: Option<u16>,
    /// The node's data_dir: the token is in `checks/<SERVICE>.token` there.
    #[arg(long, default_value = "/var/lib/meshnode")]
    data_dir: PathBuf,
    /// Read the token from this file instead (or set MESHNODE_CHECK_TOKEN).
    #[arg(long)]
    token_file: Option<PathBuf>,
    #[command(flatten)]
    admin: AdminArgs,
}

impl CheckArgs {
    pub fn admin(&self) -> &AdminArgs {
        &self.admin
    }
}

fn token(a: &CheckArgs) -> Result<String, Failure> {
    if let Ok(t) = std::env::var("MESHNODE_CHECK_TOKEN") {
        if !t.trim().is_empty() {
            return Ok(t.trim().to_string());
        }
    }
    let path: PathBuf = a.token_file.clone().unwrap_or_else(|| {
        Path::new(&a.data_dir)
            .join(meshnode_node::app::CHECK_TOKENS_DIR)
            .join(format!("{}.token", a.service))
    });
    std::fs::read_to_string(&path)
        .map(|t| t.trim().to_string())
        .with_context(|| {
            format!(
                "reading {} (the node writes it at start for a service with a ttl check; run as a user of the node's group, or pass --token-file)",
                path.display()
            )
        })
        .map_err(Failure::usage)
}

pub async fn run(a: CheckArgs) -> Result<(), Failure> {
    let token = token(&a)?;
    let status = match a.status {
        Status::Pass => "pass",
        Status::Warn => "warn",
        Status::Fail => "fail",
    };
    let body = serde_json::json!({ "status": status, "note": a.note, "port": a.port });
    let path = format!("/v1/check/{}", a.service);
    match client::post_json_with(a.admin.admin, &path, &body, Some(&token)).await {
        Ok(out) => {
            if a.admin.json {
                println!("{}", out.trim());
            } else {
                println!("reported {status} for {}", a.service);
            }
            Ok(())
        }
        Err(ClientError::Status { status, body, .. }) if (400..500).contains(&status) => {
            let msg = serde_json::from_str::<Value>(&body)
                .ok()
                .and_then(|v| v.get("error").and_then(Value::as_str).map(String::from))
                .unwrap_or(body);
            Err(Failure::usage(anyhow::anyhow!(
                "the agent refused the report: {msg}"
            )))
        }
        Err(e) => Err(Failure::runtime(e)),
    }
}

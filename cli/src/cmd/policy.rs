//! `meshnode policy apply | get | list | delete`: documents are validated
//! and signed here, with the operator's key (or the CA key), and handed to
//! the local agent, which verifies them like any other node and spreads them.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Args, Subcommand};
use meshnode_node::admin::client::{self, ClientError};
use meshnode_node::policy::schema;
use meshnode_transport::pki::operator::OperatorCert;
use meshnode_transport::pki::policy::{DocHeader, SignedDocument, SigningKey, KINDS};
use meshnode_transport::pki::sign::NodeSigner;
use meshnode_transport::pki::{first_cert_der, read_private_key, unix_now, Ca};
use serde_json::Value;

use super::admin::{get, print_json, secret_from_env};
use super::AdminArgs;
use crate::output::table;
use crate::Failure;

#[derive(Subcommand)]
pub enum PolicyCommand {
    /// Validate a document (TOML), sign it and hand it to the local agent.
    Apply {
        file: PathBuf,
        #[command(flatten)]
        signer: SignerArgs,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Print a document this node holds.
    Get {
        kind: String,
        name: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// The documents this node holds.
    List {
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Withdraw a document: a signed tombstone, kept 30 days.
    Delete {
        kind: String,
        name: String,
        #[command(flatten)]
        signer: SignerArgs,
        #[command(flatten)]
        admin: AdminArgs,
    },
}

impl PolicyCommand {
    pub fn admin(&self) -> &AdminArgs {
        match self {
            PolicyCommand::Apply { admin, .. }
            | PolicyCommand::Get { admin, .. }
            | PolicyCommand::List { admin }
            | PolicyCommand::Delete { admin, .. } => admin,
        }
    }
}

#[derive(Args)]
pub struct SignerArgs {
    /// The operator certificate (`cert issue --operator`).
    #[arg(long, requires = "operator_key", required_unless_present = "ca")]
    operator_cert: Option<PathBuf>,
    /// The operator's private key.
    #[arg(long, requires = "operator_cert")]
    operator_key: Option<PathBuf>,
    /// Sign with the CA key instead (a directory holding ca.pem and ca.key).
    #[arg(long, conflicts_with_all = ["operator_cert", "operator_key"])]
    ca: Option<PathBuf>,
}

#[allow(clippy::large_enum_variant)] // one per command
enum Key {
    Ca(Ca),
    Operator {
        cert_der: Vec<u8>,
        key_pem: String,
        mesh: String,
    },
}

impl Key {
    fn load(a: &SignerArgs) -> Result<Self, Failure> {
        if let Some(dir) = &a.ca {
            return Ca::load(dir)
                .with_context(|| format!("loading the CA from {}", dir.display()))
                .map(Key::Ca)
                .map_err(Failure::usage);
        }
        let (Some(cert), Some(key)) = (&a.operator_cert, &a.operator_key) else {
            return Err(Failure::usage(anyhow::anyhow!(
                "give --operator-cert and --operator-key, or --ca"
            )));
        };
        let pem = std::fs::read_to_string(cert)
            .with_context(|| format!("reading {}", cert.display()))
            .map_err(Failure::usage)?;
        let cert_der = first_cert_der(&pem)
            .with_context(|| format!("{}", cert.display()))
            .map_err(Failure::usage)?;
        let op = OperatorCert::from_der(&cert_der)
            .with_context(|| format!("{} is not an operator certificate", cert.display()))
            .map_err(Failure::usage)?;
        let (key_pem, _) = read_private_key(key)
            .with_context(|| format!("reading {}", key.display()))
            .map_err(Failure::usage)?;
        let signer = NodeSigner::from_pem(&key_pem)
            .with_context(|| format!("{}", key.display()))
            .map_err(Failure::usage)?;
        if signer.public_key() != op.public_key.as_slice() {
            return Err(Failure::usage(anyhow::anyhow!(
                "{} is not the key of {}",
                key.display(),
                cert.display()
            )));
        }
        if op.not_after < unix_now() {
            return Err(Failure::usage(anyhow::anyhow!(
                "the operator certificate {} has expired",
                cert.display()
            )));
        }
        Ok(Key::Operator {
            cert_der,
            key_pem,
            mesh: op.mesh,
        })
    }

    fn mesh(&self) -> &str {
        match self {
            Key::Ca(ca) => ca.mesh(),
            Key::Operator { mesh, .. } => mesh,
        }
    }

    fn sign(&self, header: DocHeader, source: String) -> Result<SignedDocument, Failure> {
        let key = match self {
            Key::Ca(ca) => SigningKey::Ca(ca),
            Key::Operator {
                cert_der, key_pem, ..
            } => SigningKey::Operator {
                cert_der: cert_der.clone(),
                key: NodeSigner::from_pem(key_pem).map_err(Failure::usage)?,
            },
        };
        SignedDocument::sign(&key, header, source).map_err(Failure::usage)
    }
}

pub async fn run(cmd: PolicyCommand) -> Result<(), Failure> {
    match cmd {
        PolicyCommand::Apply {
            file,
            signer,
            admin,
        } => apply(&file, &signer, &admin).await,
        PolicyCommand::Get { kind, name, admin } => get_one(&kind, &name, &admin).await,
        PolicyCommand::List { admin } => list(&admin).await,
        PolicyCommand::Delete {
            kind,
            name,
            signer,
            admin,
        } => delete(&kind, &name, &signer, &admin).await,
    }
}

fn check_kind(kind: &str) -> Result<(), Failure> {
    if KINDS.contains(&kind) {
        Ok(())
    } else {
        Err(Failure::usage(anyhow::anyhow!(
            "unknown kind {kind:?}: one of {}",
            KINDS.join(", ")
        )))
    }
}

/// The version the agent holds (0: none), from `GET /v1/policy/<kind>/<name>`.
async fn held_version(admin: &AdminArgs, kind: &str, name: &str) -> Result<Option<u64>, Failure> {
    let path = format!("/v1/policy/{kind}/{name}");
    let secret = secret_from_env();
    match client::get_with(admin.admin, &path, secret.as_deref()).await {
        Ok(body) => {
            let v: Value = serde_json::from_str(&body).map_err(Failure::runtime)?;
            Ok(v.pointer("/summary/version").and_then(Value::as_u64))
        }
        Err(ClientError::Status { status: 404, .. }) => Ok(None),
        Err(e) => Err(Failure::runtime(e)),
    }
}

async fn submit(admin: &AdminArgs, doc: &SignedDocument) -> Result<Value, Failure> {
    let secret = secret_from_env();
    let body = serde_json::json!({ "document": doc.text() });
    match client::post_json_with(admin.admin, "/v1/policy", &body, secret.as_deref()).await {
        Ok(out) => serde_json::from_str(&out).map_err(Failure::runtime),
        Err(ClientError::Status { status, body, .. }) if status == 400 || status == 409 => {
            let msg = serde_json::from_str::<Value>(&body)
                .ok()
                .and_then(|v| v.get("error").and_then(Value::as_str).map(String::from))
                .unwrap_or(body);
            Err(Failure::usage(anyhow::anyhow!(
                "the agent refused the document: {msg}"
            )))
        }
        Err(e) => Err(Failure::runtime(e)),
    }
}

async fn apply(file: &Path, signer: &SignerArgs, admin: &AdminArgs) -> Result<(), Failure> {
    let source = std::fs::read_to_string(file)
        .with_context(|| format!("reading {}", file.display()))
        .map_err(Failure::usage)?;
    let doc = schema::parse(&source).map_err(|errors| {
        let lines: Vec<String> = errors
            .iter()
            .map(|e| format!("  {}: {}", e.key, e.message))
            .collect();
        Failure::usage(anyhow::anyhow!(
            "{} is not a valid policy document:\n{}",
            file.display(),
            lines.join("\n")
        ))
    })?;
    let key = Key::load(signer)?;
    let version = held_version(admin, &doc.kind, &doc.name)
        .await?
        .unwrap_or(0)
        + 1;
    let header = DocHeader {
        mesh: key.mesh().to_string(),
        kind: doc.kind.clone(),
        name: doc.name.clone(),
        version,
        signed_at: unix_now(),
        deleted: false,
    };
    let signed = key.sign(header, source)?;
    let out = submit(admin, &signed).await?;
    if admin.json {
        print_json(&out);
        return Ok(());
    }
    println!(
        "{} {}/{} version {version} (signed by {}); gossip spreads it to every node",
        if out.get("status").and_then(Value::as_str) == Some("unchanged") {
            "unchanged:"
        } else {
            "applied"
        },
        doc.kind,
        doc.name,
        signed.signer_name()
    );
    Ok(())
}

async fn delete(
    kind: &str,
    name: &str,
    signer: &SignerArgs,
    admin: &AdminArgs,
) -> Result<(), Failure> {
    check_kind(kind)?;
    let key = Key::load(signer)?;
    let Some(held) = held_version(admin, kind, name).await? else {
        return Err(Failure::usage(anyhow::anyhow!(
            "this node holds no {kind} document named {name:?} (see `meshnode policy list`)"
        )));
    };
    let header = DocHeader {
        mesh: key.mesh().to_string(),
        kind: kind.to_string(),
        name: name.to_string(),
        version: held + 1,
        signed_at: unix_now(),
        deleted: true,
    };
    let signed = key.sign(header, String::new())?;
    let out = submit(admin, &signed).await?;
    if admin.json {
        print_json(&out);
        return Ok(());
    }
    println!(
        "deleted {kind}/{name} (tombstone version {}, kept 30 days)",
        held + 1
    );
    Ok(())
}

async fn get_one(kind: &str, name: &str, admin: &AdminArgs) -> Result<(), Failure> {
    check_kind(kind)?;
    let path = format!("/v1/policy/{kind}/{name}");
    let secret = secret_from_env();
    let body = match client::get_with(admin.admin, &path, secret.as_deref()).await {
        Ok(b) => b,
        Err(ClientError::Status { status: 404, .. }) => {
            return Err(Failure::usage(anyhow::anyhow!(
                "this node holds no {kind} document named {name:?}"
            )))
        }
        Err(e) => return Err(Failure::runtime(e)),
    };
    let v: Value = serde_json::from_str(&body).map_err(Failure::runtime)?;
    if admin.json {
        print_json(&v);
        return Ok(());
    }
    let s = v.get("summary").cloned().unwrap_or(Value::Null);
    let field = |k: &str| crate::output::cell(s.get(k).unwrap_or(&Value::Null));
    println!(
        "# {kind}/{name} version {} signed by {} at {}{}",
        field("version"),
        field("signer"),
        field("signed_at"),
        if s.get("deleted").and_then(Value::as_bool) == Some(true) {
            " (DELETED)"
        } else {
            ""
        }
    );
    print!(
        "{}",
        v.get("source").and_then(Value::as_str).unwrap_or_default()
    );
    Ok(())
}

async fn list(admin: &AdminArgs) -> Result<(), Failure> {
    let v = get(admin, "/v1/policy").await?;
    if admin.json {
        print_json(&v);
        return Ok(());
    }
    let rows: Vec<Vec<String>> = v
        .get("documents")
        .and_then(Value::as_array)
        .map(|docs| {
            docs.iter()
                .map(|d| {
                    let f = |k: &str| crate::output::cell(d.get(k).unwrap_or(&Value::Null));
                    vec![
                        f("kind"),
                        f("name"),
                        f("version"),
                        if d.get("deleted").and_then(Value::as_bool) == Some(true) {
                            "deleted".into()
                        } else {
                            "in force".into()
                        },
                        f("signer"),
                    ]
                })
                .collect()
        })
        .unwrap_or_default();
    println!(
        "{}",
        table(&["KIND", "NAME", "VERSION", "STATE", "SIGNER"], &rows)
    );
    if v.get("loaded").and_then(Value::as_bool) != Some(true) {
        eprintln!("warning: this node has not completed a full state exchange yet; the list may be out of date");
    }
    Ok(())
}

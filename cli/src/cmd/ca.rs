//! `ca init` and `cert issue`: offline PKI.

use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use meshnode_transport::pki::{Ca, DEFAULT_CA_VALIDITY};
use meshnode_transport::Role;

use crate::Failure;

pub fn init(mesh: &str, out: &Path) -> Result<(), Failure> {
    let ca = Ca::generate(mesh, DEFAULT_CA_VALIDITY).map_err(Failure::usage)?;
    ca.save(out)
        .with_context(|| format!("writing the CA into {}", out.display()))
        .map_err(Failure::runtime)?;
    println!("created the root CA of mesh {mesh:?}");
    println!(
        "  {}  (certificate: copy to every node)",
        out.join("ca.pem").display()
    );
    println!(
        "  {}  (private key, 0600: keep it offline or on CA nodes only)",
        out.join("ca.key").display()
    );
    Ok(())
}

fn load_ca(ca_dir: &Path) -> Result<Ca, Failure> {
    Ca::load(ca_dir)
        .with_context(|| {
            format!(
                "loading the CA from {} (expects ca.pem and ca.key)",
                ca_dir.display()
            )
        })
        .map_err(Failure::usage)
}

pub struct IssueOptions<'a> {
    pub cluster: &'a str,
    pub node: &'a str,
    pub gateway: bool,
    pub services: &'a [String],
    pub validity: Duration,
}

pub fn issue(ca_dir: &Path, o: IssueOptions<'_>, out: &Path) -> Result<(), Failure> {
    let ca = load_ca(ca_dir)?;
    let role = if o.gateway { Role::Gateway } else { Role::Node };
    let cert = ca
        .issue_as(o.cluster, o.node, role, o.services, o.validity)
        .map_err(Failure::usage)?;
    cert.save(out, ca.cert_pem())
        .with_context(|| format!("writing the certificate into {}", out.display()))
        .map_err(Failure::runtime)?;
    println!(
        "issued {} ({role}{}) valid for {}",
        cert.identity,
        if o.services.is_empty() {
            String::new()
        } else {
            format!(", acts as {}", o.services.join(", "))
        },
        crate::output::duration(o.validity)
    );
    for f in ["node.pem", "node.key", "ca.pem"] {
        println!("  {}", out.join(f).display());
    }
    Ok(())
}

pub fn issue_operator(
    ca_dir: &Path,
    name: &str,
    validity: Duration,
    out: &Path,
) -> Result<(), Failure> {
    let ca = load_ca(ca_dir)?;
    let op = ca.issue_operator(name, validity).map_err(Failure::usage)?;
    op.save(out, ca.cert_pem())
        .with_context(|| format!("writing the certificate into {}", out.display()))
        .map_err(Failure::runtime)?;
    println!(
        "issued {} (operator: signs policy documents) valid for {}",
        op.uri,
        crate::output::duration(validity)
    );
    for f in ["operator.pem", "operator.key", "ca.pem"] {
        println!("  {}", out.join(f).display());
    }
    Ok(())
}

/// The secret the agent wrote for its state-changing endpoints.
/// `MESHNODE_ADMIN_SECRET` wins, for an agent on another machine.
pub(super) fn admin_secret(data_dir: &Path) -> Result<String, Failure> {
    if let Some(s) = super::admin::secret_from_env() {
        return Ok(s);
    }
    let path = data_dir.join(meshnode_node::admin::SECRET_FILE);
    std::fs::read_to_string(&path)
        .map(|s| s.trim().to_string())
        .with_context(|| {
            format!(
                "reading {} (run this on the node, as the node's user or root, with --data-dir set to the node's data_dir)",
                path.display()
            )
        })
        .map_err(Failure::usage)
}

pub(super) fn admin_failure(e: meshnode_node::admin::client::ClientError) -> Failure {
    use meshnode_node::admin::client::ClientError;
    match &e {
        ClientError::Status { status, body, .. } if *status == 400 || *status == 404 => {
            let msg = serde_json::from_str::<serde_json::Value>(body)
                .ok()
                .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(String::from))
                .unwrap_or_else(|| body.clone());
            Failure::usage(anyhow::anyhow!("{msg}"))
        }
        _ => Failure::runtime(e),
    }
}

/// POSTs to a CA endpoint with the admin secret. With `--json` prints the
/// answer and returns `None`; otherwise returns it parsed, for a summary.
async fn ca_post(
    admin: &crate::cmd::AdminArgs,
    data_dir: &Path,
    path: &str,
    body: &serde_json::Value,
) -> Result<Option<serde_json::Value>, Failure> {
    let secret = admin_secret(data_dir)?;
    let out = meshnode_node::admin::client::post_json(admin.admin, path, body, &secret)
        .await
        .map_err(admin_failure)?;
    if admin.json {
        println!("{out}");
        return Ok(None);
    }
    serde_json::from_str(&out)
        .map(Some)
        .map_err(Failure::runtime)
}

pub struct TokenOptions {
    pub ttl: Duration,
    pub uses: u32,
    pub cluster: Option<String>,
    pub gateway: bool,
    pub services: Vec<String>,
}

pub async fn token_create(
    admin: &crate::cmd::AdminArgs,
    data_dir: &Path,
    o: TokenOptions,
) -> Result<(), Failure> {
    let body = serde_json::json!({
        "ttl": humantime::format_duration(o.ttl).to_string(),
        "uses": o.uses,
        "cluster": o.cluster,
        "gateway": o.gateway,
        "services": o.services,
    });
    let Some(v) = ca_post(admin, data_dir, "/v1/ca/tokens", &body).await? else {
        return Ok(());
    };
    let token = v.get("token").and_then(|t| t.as_str()).unwrap_or_default();
    println!("{token}");
    eprintln!(
        "join token: valid {}, {} use(s){}{}{}; on the new machine run:\n  meshnode join --token <TOKEN> <ADDRESS OF ANY NODE>:9470",
        crate::output::duration(o.ttl),
        o.uses,
        o.cluster
            .as_deref()
            .map(|c| format!(", cluster {c}"))
            .unwrap_or_default(),
        if o.gateway { ", gateway certificate" } else { "" },
        if o.services.is_empty() {
            String::new()
        } else {
            format!(", acts as {}", o.services.join(", "))
        }
    );
    Ok(())
}

pub struct RevokeTarget {
    pub node: Option<String>,
    pub cluster: Option<String>,
    pub serial: Option<String>,
    pub cert: Option<std::path::PathBuf>,
    pub force: bool,
}

pub async fn revoke(
    admin: &crate::cmd::AdminArgs,
    data_dir: &Path,
    t: RevokeTarget,
    reason: Option<String>,
) -> Result<(), Failure> {
    let cert = match &t.cert {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))
                .map_err(Failure::usage)?,
        ),
        None => None,
    };
    let body = serde_json::json!({
        "node": t.node, "cluster": t.cluster, "serial": t.serial, "cert": cert, "force": t.force, "reason": reason,
    });
    let Some(v) = ca_post(admin, data_dir, "/v1/ca/revoke", &body).await? else {
        return Ok(());
    };
    println!(
        "revoked {} ({} key(s)); entry {} is spreading to every node by gossip",
        v.get("identity")
            .and_then(|i| i.as_str())
            .unwrap_or(if t.cert.is_some() {
                "the certificate's key"
            } else {
                "by serial"
            }),
        v.get("keys").and_then(|k| k.as_array()).map_or(0, Vec::len),
        v.get("id").and_then(|i| i.as_str()).unwrap_or("?"),
    );
    Ok(())
}

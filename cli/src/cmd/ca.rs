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

pub fn issue(
    ca_dir: &Path,
    cluster: &str,
    node: &str,
    gateway: bool,
    validity: Duration,
    out: &Path,
) -> Result<(), Failure> {
    let ca = Ca::load(ca_dir)
        .with_context(|| {
            format!(
                "loading the CA from {} (expects ca.pem and ca.key)",
                ca_dir.display()
            )
        })
        .map_err(Failure::usage)?;
    let role = if gateway { Role::Gateway } else { Role::Node };
    let cert = ca
        .issue(cluster, node, role, validity)
        .map_err(Failure::usage)?;
    cert.save(out, ca.cert_pem())
        .with_context(|| format!("writing the certificate into {}", out.display()))
        .map_err(Failure::runtime)?;
    println!(
        "issued {} ({role}) valid for {}",
        cert.identity,
        humantime::format_duration(validity)
    );
    for f in ["node.pem", "node.key", "ca.pem"] {
        println!("  {}", out.join(f).display());
    }
    Ok(())
}

//! `run` and `validate`.

use std::path::Path;

use meshnode_node::config::LoadError;
use meshnode_node::Config;
use tokio::signal::unix::{signal, SignalKind};

use crate::Failure;

fn load(path: &Path) -> Result<Config, Failure> {
    Config::load(path).map_err(|e| match e {
        LoadError::Read { .. } => Failure::usage(e),
        LoadError::Invalid(_) => Failure::usage(anyhow::anyhow!("{}: {e}", path.display())),
    })
}

pub async fn run(path: &Path) -> Result<(), Failure> {
    let cfg = load(path)?;
    let metrics = meshnode_node::metrics::install(&cfg.node)
        .map_err(|e| Failure::runtime(anyhow::anyhow!("metrics: {e}")))?;
    let bound = meshnode_node::build(cfg, Some(metrics))
        .await
        .map_err(|e| {
            if e.is_config() {
                Failure::usage(e)
            } else {
                Failure::runtime(e)
            }
        })?;
    let mut term = signal(SignalKind::terminate()).map_err(Failure::runtime)?;
    let mut int = signal(SignalKind::interrupt()).map_err(Failure::runtime)?;
    bound
        .run(async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        })
        .await
        .map_err(|e| Failure::runtime(anyhow::anyhow!(e)))
}

pub fn validate(path: &Path) -> Result<(), Failure> {
    let cfg = load(path)?;
    println!(
        "{}: valid (node {}, cluster {}, mesh {}; {} service(s), {} upstream(s))",
        path.display(),
        cfg.node,
        cfg.cluster,
        cfg.mesh,
        cfg.services.len(),
        cfg.upstreams.len()
    );
    for (key, p) in [
        ("tls.ca", &cfg.tls.ca),
        ("tls.cert", &cfg.tls.cert),
        ("tls.key", &cfg.tls.key),
    ] {
        if !p.exists() {
            println!(
                "note: {key} {} does not exist yet (meshnode join or cert issue writes it)",
                p.display()
            );
        }
    }
    Ok(())
}

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

pub async fn run(path: &Path, log: meshnode_node::reload::LogControl) -> Result<(), Failure> {
    // Before anything else: SIGHUP's default action would kill the agent.
    let mut hup = signal(SignalKind::hangup()).map_err(Failure::runtime)?;
    let cfg = load(path)?;
    let metrics = meshnode_node::metrics::install(&cfg.node)
        .map_err(|e| Failure::runtime(anyhow::anyhow!("metrics: {e}")))?;
    let hooks = meshnode_node::Hooks {
        metrics: Some(metrics),
        config_path: Some(path.to_path_buf()),
        log: Some(log),
    };
    let bound = meshnode_node::build(cfg, hooks).await.map_err(|e| {
        if e.is_config() {
            Failure::usage(e)
        } else {
            Failure::runtime(e)
        }
    })?;
    let reloader = bound.reloader();
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            tracing::info!("SIGHUP: reloading the config");
            if let Err(e) = reloader.reload_from_source().await {
                tracing::error!(error = %e, "reload refused; the running config is kept");
            }
        }
    });
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

pub fn validate(path: &Path, json: bool) -> Result<(), Failure> {
    let result = check(path);
    if json {
        let v = match &result {
            Ok((cfg, notes)) => serde_json::json!({
                "valid": true,
                "config": path.display().to_string(),
                "node": cfg.node,
                "cluster": cfg.cluster,
                "mesh": cfg.mesh,
                "services": cfg.services.len(),
                "upstreams": cfg.upstreams.len(),
                "notes": notes,
            }),
            Err(Invalid::Keys(errors)) => serde_json::json!({
                "valid": false,
                "config": path.display().to_string(),
                "errors": errors
                    .iter()
                    .map(|e| serde_json::json!({ "key": e.key, "message": e.message }))
                    .collect::<Vec<_>>(),
            }),
            Err(Invalid::Other(e)) => serde_json::json!({
                "valid": false,
                "config": path.display().to_string(),
                "errors": [{ "key": null, "message": crate::render(e) }],
            }),
        };
        println!("{v}");
        return match result {
            Ok(_) => Ok(()),
            // Printed already: exit 64 without a second message.
            Err(_) => Err(Failure::silent(crate::EXIT_USAGE)),
        };
    }
    match result {
        Ok((cfg, notes)) => {
            println!(
                "{}: valid (node {}, cluster {}, mesh {}; {} service(s), {} upstream(s))",
                path.display(),
                cfg.node,
                cfg.cluster,
                cfg.mesh,
                cfg.services.len(),
                cfg.upstreams.len()
            );
            for note in notes {
                println!("note: {note}");
            }
            Ok(())
        }
        Err(Invalid::Keys(errors)) => Err(Failure::usage(anyhow::anyhow!(
            "{}: {}",
            path.display(),
            LoadError::Invalid(errors)
        ))),
        Err(Invalid::Other(e)) => Err(Failure::usage(e)),
    }
}

enum Invalid {
    /// Keys of the file that are wrong.
    Keys(Vec<meshnode_node::config::ConfigError>),
    /// The file cannot be read, or its certificate or key do not fit it.
    Other(anyhow::Error),
}

/// The config, and notes about it, or why `run` would refuse it.
fn check(path: &Path) -> Result<(Config, Vec<String>), Invalid> {
    let cfg = Config::load(path).map_err(|e| match e {
        LoadError::Invalid(errors) => Invalid::Keys(errors),
        e @ LoadError::Read { .. } => Invalid::Other(e.into()),
    })?;
    let mut notes = Vec::new();
    for (key, p) in [
        ("tls.ca", &cfg.tls.ca),
        ("tls.cert", &cfg.tls.cert),
        ("tls.key", &cfg.tls.key),
    ] {
        if !p.exists() {
            notes.push(format!(
                "{key} {} does not exist yet (meshnode join or cert issue writes it)",
                p.display()
            ));
        }
    }
    // With the files in place, the same checks as `run` (names in the
    // certificate, gateway role, key mode): a config that validates starts.
    if notes.is_empty() {
        meshnode_node::check_credentials(&cfg).map_err(|e| {
            Invalid::Other(anyhow::Error::new(e).context(format!("{}: not valid", path.display())))
        })?;
    }
    Ok((cfg, notes))
}

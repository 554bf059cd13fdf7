//! `meshnode`: the agent and its command line.

mod cmd;
mod output;

use std::process::ExitCode;

use clap::Parser;

use crate::cmd::Cli;
use meshnode_node::config::LogFormat;

/// sysexits EX_USAGE: bad arguments or a bad config.
pub const EXIT_USAGE: u8 = 64;

/// A failed command and the exit code it maps to.
pub struct Failure {
    pub code: u8,
    /// What to print; `None` when the command printed it already (as JSON, say).
    pub error: Option<anyhow::Error>,
}

impl Failure {
    pub fn usage(error: impl Into<anyhow::Error>) -> Self {
        Self {
            code: EXIT_USAGE,
            error: Some(error.into()),
        }
    }

    /// A failure whose message the command printed already (as JSON, say).
    pub fn silent(code: u8) -> Self {
        Self { code, error: None }
    }

    pub fn runtime(error: impl Into<anyhow::Error>) -> Self {
        Self {
            code: 1,
            error: Some(error.into()),
        }
    }
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let code = if e.use_stderr() { EXIT_USAGE } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    let (workers, format, level) = match cli.startup() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let log = init_logs(format, level);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let json = cli.wants_json();
    match runtime.block_on(cli.run(log)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            if let Some(e) = &f.error {
                if json {
                    // Where the answer would have been: a script reads one
                    // JSON value either way.
                    println!(
                        "{}",
                        serde_json::json!({ "error": render(e), "exit_code": f.code })
                    );
                } else {
                    eprintln!("error: {}", render(e));
                }
            }
            ExitCode::from(f.code)
        }
    }
}

/// Installs the log subscriber and returns the handle a reload changes
/// its filter by. `MESHNODE_LOG` wins over the config's `log_level` (and a
/// reload then keeps it); commands other than the agent log warnings only.
fn init_logs(format: LogFormat, level: Option<String>) -> meshnode_node::reload::LogControl {
    use tracing_subscriber::EnvFilter;
    let from_env = EnvFilter::try_from_env("MESHNODE_LOG").ok();
    let overridden = from_env.is_some();
    let filter = from_env.unwrap_or_else(|| {
        EnvFilter::builder()
            .parse(level.as_deref().unwrap_or("warn"))
            .unwrap_or_else(|_| EnvFilter::new("info"))
    });
    let parse = |s: &str| EnvFilter::builder().parse(s).map_err(|e| e.to_string());
    // Colour only for a person at a terminal: journald and log files get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let set: meshnode_node::reload::SetFilter = match format {
        LogFormat::Text => {
            let logs = logs.with_ansi(ansi).with_filter_reloading();
            let handle = logs.reload_handle();
            logs.init();
            Box::new(move |s| handle.reload(parse(s)?).map_err(|e| e.to_string()))
        }
        // One object per line: level, target, fields and the span context.
        LogFormat::Json => {
            let logs = logs.json().with_current_span(false).with_filter_reloading();
            let handle = logs.reload_handle();
            logs.init();
            Box::new(move |s| handle.reload(parse(s)?).map_err(|e| e.to_string()))
        }
    };
    meshnode_node::reload::LogControl { set, overridden }
}

/// An error and its causes on one line, each cause once: many errors name
/// their source in their own message already (`reading X: Permission
/// denied`), and anyhow's `{:#}` would print it a second time. A refused
/// permission gets a hint, since it is almost always the file's owner.
pub fn render(error: &anyhow::Error) -> String {
    let mut out = error.to_string();
    for cause in error.chain().skip(1) {
        let text = cause.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
    }
    let denied = error.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|e| e.kind() == std::io::ErrorKind::PermissionDenied)
    });
    if denied {
        out.push_str(
            "\nhint: the file belongs to another user: run this as that user \
             (the agent's files belong to `meshnode`: sudo -u meshnode ...) or as root, \
             and check the owner with `ls -l`",
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Read {
        source: std::io::Error,
    }

    impl std::fmt::Display for Read {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "reading /x/node.key: {}", self.source)
        }
    }

    impl std::error::Error for Read {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.source)
        }
    }

    #[test]
    fn each_cause_is_printed_once_and_a_refused_permission_gets_a_hint() {
        let e = anyhow::Error::new(Read {
            source: std::io::Error::from(std::io::ErrorKind::PermissionDenied),
        })
        .context("loading the node's TLS files");
        let text = render(&e);
        assert_eq!(text.matches("permission denied").count(), 1, "{text}");
        assert!(
            text.starts_with("loading the node's TLS files: reading /x/node.key: "),
            "{text}"
        );
        assert!(
            text.contains("hint: the file belongs to another user"),
            "{text}"
        );
        let plain = render(&anyhow::anyhow!("no such service"));
        assert_eq!(plain, "no such service");
    }
}

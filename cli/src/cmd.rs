//! The commands: one file each.

mod admin;
mod ca;
mod check;
mod demo;
mod docs;
mod join;
mod policy;
mod run;
mod top;

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::Failure;

#[derive(Parser)]
#[command(
    name = "meshnode",
    version,
    about = "A multi-cluster service mesh node: gossip discovery, QUIC tunnels, mutual TLS."
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Clone)]
pub struct AdminArgs {
    /// Admin API address of the running agent.
    #[arg(long, default_value = "127.0.0.1:9471", env = "MESHNODE_ADMIN")]
    pub admin: SocketAddr,
    /// Print the API's JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent in the foreground.
    Run {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Check a config file without starting (and, when they exist, its certificate and key).
    Validate {
        #[arg(long, short)]
        config: PathBuf,
        /// Print the result as JSON: `{"valid": true, ...}` or `{"valid": false, "errors": [...]}`.
        #[arg(long)]
        json: bool,
    },
    /// Run a whole mesh on loopback with demo services, traffic and a node failure.
    Demo {
        /// Keep the mesh up at the end and print the admin addresses to poke with the CLI.
        #[arg(long)]
        hold: bool,
        /// The HTTP act instead of the failover: a canary release of api v2
        /// moved 10 % -> 50 % -> 100 % by `policy apply`, counted per version.
        #[arg(long)]
        http: bool,
    },
    /// Mesh CA operations.
    #[command(subcommand)]
    Ca(CaCommand),
    /// Node certificate operations.
    #[command(subcommand)]
    Cert(CertCommand),
    /// Report the state of a service's ttl check (for the application).
    Check(check::CheckArgs),
    /// Mesh-wide policy documents: signed by an operator, spread by gossip.
    #[command(subcommand)]
    Policy(policy::PolicyCommand),
    /// Join tokens (on a CA node).
    #[command(subcommand)]
    Token(TokenCommand),
    /// Join this machine to the mesh: make a key, get it signed, write the config, start.
    Join(join::JoinArgs),
    /// The gossip pool as this node sees it.
    Members {
        #[command(flatten)]
        admin: AdminArgs,
        /// The WAN pool of gateways.
        #[arg(long)]
        wan: bool,
    },
    /// Services in the catalog.
    Services {
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Why a new connection to SERVICE would be allowed or denied, and where
    /// it would go: the intention that decides, the clusters in the order
    /// they are tried (with the reason for each), and the instance picked.
    Explain {
        service: String,
        /// The caller: `service:NAME` (this node acting as it), `node:NAME`
        /// (a node of this cluster), a SPIFFE ID, or a bare name (a node if
        /// one has it, else a service). Default: this node, as its upstream
        /// for SERVICE acts.
        #[arg(long)]
        from: Option<String>,
        /// For an HTTP service: the route a request with this path (and
        /// query) takes under the service's routes document.
        #[arg(long)]
        path: Option<String>,
        /// ... with this method (default GET).
        #[arg(long)]
        method: Option<String>,
        /// ... with this header, NAME=VALUE (repeat for more).
        #[arg(long = "header", value_name = "NAME=VALUE")]
        headers: Vec<String>,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Instances of one service.
    Endpoints {
        service: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// This node: identity, certificate expiry, pools, counts, warnings.
    Status {
        /// For monitoring: exit 2 when there is any warning (e.g. a certificate
        /// or the CA expires within 24 h).
        #[arg(long)]
        check: bool,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Re-read the running agent's config file and apply what can change
    /// live (services and checks, upstreams, log_level); keys that need a
    /// restart are reported and kept. SIGHUP (`systemctl reload`) does the same.
    Reload {
        /// The node's data_dir (holds the admin secret; or set MESHNODE_ADMIN_SECRET).
        #[arg(long, default_value = "/var/lib/meshnode")]
        data_dir: PathBuf,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell),
    /// generated from this command line.
    Completions { shell: clap_complete::Shell },
    /// Write man pages (meshnode.1 and one per subcommand) into a directory,
    /// generated from this command line (the Debian package ships them).
    Man {
        #[arg(long)]
        out: PathBuf,
    },
    /// A live view of the busiest callers and callees through this node:
    /// requests (or connections) per second, errors, p50/p99 latency and
    /// bytes, by source and destination service and cluster, refreshed
    /// every interval (Ctrl-C quits). With --json, one JSON object per frame.
    Top {
        /// Time between frames; each frame's rates are over it.
        #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
        interval: std::time::Duration,
        /// Stop after this many frames (default: until interrupted).
        #[arg(long)]
        count: Option<u32>,
        /// Rows shown, busiest first.
        #[arg(long, default_value_t = 20)]
        rows: usize,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Leave the pool gracefully: instances are withdrawn at once, streams drain, the agent exits.
    Leave {
        /// The node's data_dir (holds the admin secret; or set MESHNODE_ADMIN_SECRET).
        #[arg(long, default_value = "/var/lib/meshnode")]
        data_dir: PathBuf,
        #[command(flatten)]
        admin: AdminArgs,
    },
}

#[derive(Subcommand)]
pub enum CaCommand {
    /// Create the mesh root CA.
    Init {
        #[arg(long)]
        mesh: String,
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Subcommand)]
pub enum CertCommand {
    /// Issue a node (or operator) certificate offline.
    Issue {
        /// Directory holding ca.pem and ca.key.
        #[arg(long)]
        ca: PathBuf,
        #[arg(long, required_unless_present = "operator")]
        cluster: Option<String>,
        #[arg(long, required_unless_present = "operator")]
        node: Option<String>,
        /// Mark the certificate as a gateway's.
        #[arg(long, conflicts_with = "operator")]
        gateway: bool,
        /// A service the node may act as when it calls others (repeat, or
        /// separate with commas); authorization rules name callers by it.
        #[arg(long = "service", value_delimiter = ',', conflicts_with = "operator")]
        services: Vec<String>,
        /// Issue an operator certificate (`spiffe://<mesh>/operator/NAME`) that
        /// signs policy documents; it cannot serve as a node.
        #[arg(long, conflicts_with_all = ["cluster", "node"])]
        operator: Option<String>,
        /// Certificate lifetime.
        #[arg(long, default_value = "365d", value_parser = humantime::parse_duration)]
        validity: std::time::Duration,
        #[arg(long)]
        out: PathBuf,
    },
    /// Revoke a node's certificates (on a CA node): every node refuses it within seconds.
    Revoke {
        /// The node to revoke: all its certificates and its name (certificates issued before now).
        #[arg(long, required_unless_present_any = ["serial", "cert"])]
        node: Option<String>,
        /// The node's cluster (default: the CA node's).
        #[arg(long, requires = "node")]
        cluster: Option<String>,
        /// Revoke one certificate by serial number (hex, as `openssl x509 -serial` shows it).
        #[arg(long, conflicts_with = "node")]
        serial: Option<String>,
        /// Revoke the key of this certificate file (PEM): an operator's
        /// (documents it signed before now stay in force, later ones are
        /// refused), or a node's issued offline.
        #[arg(long, conflicts_with_all = ["node", "serial"])]
        cert: Option<PathBuf>,
        /// Revoke a node name this CA node knows nothing of (a certificate
        /// issued offline that never joined its pool).
        #[arg(long, requires = "node")]
        force: bool,
        #[arg(long)]
        reason: Option<String>,
        /// The CA node's data_dir (holds the admin secret).
        #[arg(long, default_value = "/var/lib/meshnode")]
        data_dir: PathBuf,
        #[command(flatten)]
        admin: AdminArgs,
    },
}

#[derive(Subcommand)]
pub enum TokenCommand {
    /// Print a join token (it embeds the CA fingerprint, a secret and its expiry).
    Create {
        /// How long the token is valid.
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        ttl: std::time::Duration,
        /// How many machines may join with it.
        #[arg(long, default_value_t = 1)]
        uses: u32,
        /// The cluster the new nodes join (default: the joiner's choice, else the CA node's).
        #[arg(long)]
        cluster: Option<String>,
        /// Issue gateway certificates.
        #[arg(long)]
        gateway: bool,
        /// Services the joined nodes may act as (comma-separated); their
        /// certificates name them, and renewals keep them.
        #[arg(long, value_delimiter = ',')]
        services: Vec<String>,
        /// The CA node's data_dir (holds the admin secret).
        #[arg(long, default_value = "/var/lib/meshnode")]
        data_dir: PathBuf,
        #[command(flatten)]
        admin: AdminArgs,
    },
}

impl Cli {
    /// Whether the command prints JSON (`--json`): then its errors do too.
    pub fn wants_json(&self) -> bool {
        let admin = match &self.command {
            Command::Members { admin, .. }
            | Command::Services { admin }
            | Command::Explain { admin, .. }
            | Command::Endpoints { admin, .. }
            | Command::Status { admin, .. }
            | Command::Top { admin, .. }
            | Command::Leave { admin, .. }
            | Command::Reload { admin, .. }
            | Command::Cert(CertCommand::Revoke { admin, .. })
            | Command::Token(TokenCommand::Create { admin, .. }) => admin,
            Command::Policy(p) => p.admin(),
            Command::Check(c) => c.admin(),
            _ => return false,
        };
        admin.json
    }

    /// Long-running agent commands log at info by default.
    fn is_agent(&self) -> bool {
        matches!(self.command, Command::Run { .. })
            || matches!(&self.command, Command::Join(a) if !a.no_start)
    }

    /// What `main` sets before the runtime and the log subscriber exist:
    /// runtime threads (`workers`), the log format (`log_format`, which
    /// `MESHNODE_LOG_FORMAT` overrides) and the log filter (`log_level`;
    /// `None`: a command that only logs warnings), from one read of `run`'s
    /// config. Defaults when the config cannot be read (`run` then reports
    /// why) and for other commands; a bad environment value is an error.
    pub fn startup(
        &self,
    ) -> Result<(usize, meshnode_node::config::LogFormat, Option<String>), String> {
        use meshnode_node::config::{LogFormat, DEFAULT_WORKERS};
        let loaded = match &self.command {
            Command::Run { config } => meshnode_node::Config::load(config).ok(),
            _ => None,
        };
        let workers = loaded.as_ref().map_or(DEFAULT_WORKERS, |c| c.workers);
        let format = match std::env::var_os("MESHNODE_LOG_FORMAT") {
            Some(v) => v
                .to_string_lossy()
                .parse::<LogFormat>()
                .map_err(|e| format!("MESHNODE_LOG_FORMAT={e}"))?,
            None => loaded.as_ref().map(|c| c.log_format).unwrap_or_default(),
        };
        let level = match loaded {
            Some(c) => Some(c.log_level),
            None if self.is_agent() => Some(meshnode_node::config::DEFAULT_LOG_LEVEL.to_string()),
            None => None,
        };
        Ok((workers, format, level))
    }

    pub async fn run(self, log: meshnode_node::reload::LogControl) -> Result<(), Failure> {
        match self.command {
            Command::Run { config } => run::run(&config, log).await,
            Command::Completions { shell } => docs::completions(shell),
            Command::Man { out } => docs::man(&out),
            Command::Reload { admin, data_dir } => admin::reload(&admin, &data_dir).await,
            Command::Validate { config, json } => run::validate(&config, json),
            Command::Demo { hold, http } => demo::demo(hold, http).await,
            Command::Ca(CaCommand::Init { mesh, out }) => ca::init(&mesh, &out),
            Command::Cert(CertCommand::Issue {
                ca,
                cluster,
                node,
                gateway,
                services,
                operator,
                validity,
                out,
            }) => match (operator, cluster, node) {
                (Some(op), _, _) => ca::issue_operator(&ca, &op, validity, &out),
                (None, Some(cluster), Some(node)) => ca::issue(
                    &ca,
                    ca::IssueOptions {
                        cluster: &cluster,
                        node: &node,
                        gateway,
                        services: &services,
                        validity,
                    },
                    &out,
                ),
                _ => Err(Failure::usage(anyhow::anyhow!(
                    "give --cluster and --node, or --operator"
                ))),
            },
            Command::Cert(CertCommand::Revoke {
                node,
                cluster,
                serial,
                cert,
                force,
                reason,
                data_dir,
                admin,
            }) => {
                ca::revoke(
                    &admin,
                    &data_dir,
                    ca::RevokeTarget {
                        node,
                        cluster,
                        serial,
                        cert,
                        force,
                    },
                    reason,
                )
                .await
            }
            Command::Token(TokenCommand::Create {
                ttl,
                uses,
                cluster,
                gateway,
                services,
                data_dir,
                admin,
            }) => {
                ca::token_create(
                    &admin,
                    &data_dir,
                    ca::TokenOptions {
                        ttl,
                        uses,
                        cluster,
                        gateway,
                        services,
                    },
                )
                .await
            }
            Command::Policy(cmd) => policy::run(cmd).await,
            Command::Check(args) => check::run(args).await,
            Command::Join(args) => join::join(args, log).await,
            Command::Members { admin, wan } => admin::members(&admin, wan).await,
            Command::Services { admin } => admin::services(&admin).await,
            Command::Endpoints { service, admin } => admin::endpoints(&admin, &service).await,
            Command::Explain {
                service,
                from,
                path,
                method,
                headers,
                admin,
            } => {
                let request = admin::RequestArgs {
                    path,
                    method,
                    headers,
                };
                admin::explain(&admin, &service, from.as_deref(), &request).await
            }
            Command::Status { admin, check } => admin::status(&admin, check).await,
            Command::Leave { admin, data_dir } => admin::leave(&admin, &data_dir).await,
            Command::Top {
                interval,
                count,
                rows,
                admin,
            } => top::run(&admin, interval, count, rows).await,
        }
    }
}

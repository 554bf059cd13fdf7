//! `meshnode join`: a fresh machine becomes a node with one command. The key
//! pair is made here and never leaves; the server's chain is checked against
//! the token's CA fingerprint before the token is sent.

use std::net::SocketAddr;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context};
use clap::Args;
use meshnode_transport::join::{self, Refusal, Request, Response};
use meshnode_transport::pki::join::NodeKey;
use meshnode_transport::pki::token::Token;
use meshnode_transport::pki::{fingerprint, first_cert_der, hex, unix_now, write_atomic, PeerCert};
use meshnode_transport::tls::{join_client_config, transport_config, Link};

use crate::Failure;

/// Dial and handshake give up after this long.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// The CA node may be one relay away.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(20);

#[derive(Args)]
pub struct JoinArgs {
    /// The join token from `meshnode token create` on a CA node.
    #[arg(
        long,
        env = "MESHNODE_TOKEN",
        hide_env_values = true,
        required_unless_present = "token_file",
        conflicts_with = "token_file"
    )]
    pub token: Option<String>,
    /// Read the token from this file instead (a mounted Kubernetes Secret):
    /// it stays out of the environment and the process list.
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// A node of the mesh to contact: its QUIC address (host:port, UDP).
    pub addr: String,
    /// Where to write ca.pem, node.pem, node.key and meshnode.toml.
    #[arg(long, default_value = "/var/lib/meshnode")]
    pub data_dir: PathBuf,
    /// This node's name (default: the hostname).
    #[arg(long)]
    pub node: Option<String>,
    /// The cluster to join (default: the token's, else the CA node's).
    #[arg(long)]
    pub cluster: Option<String>,
    /// The config file to write (default: `<data-dir>/meshnode.toml`).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// `bind` of the written config.
    #[arg(long, default_value = "0.0.0.0:9470")]
    pub bind: SocketAddr,
    /// `advertise` of the written config: the address other nodes of this
    /// cluster reach it at. Default: detected at start from the route to
    /// the first seed; when the cluster has no node yet (no seed to learn
    /// from), the address toward ADDR is written (gateways: give their LAN
    /// address here, ADDR is usually across the WAN).
    #[arg(long)]
    pub advertise: Option<SocketAddr>,
    /// Gateways: a gateway of another cluster to join the WAN pool through
    /// (repeat for several). Default: ADDR, when it is a gateway of another
    /// cluster.
    #[arg(long = "wan-seed")]
    pub wan_seeds: Vec<SocketAddr>,
    /// `admin` of the written config.
    #[arg(long, default_value = "127.0.0.1:9471")]
    pub admin: SocketAddr,
    /// Write the files and stop; do not start the agent (e.g. to start it with systemctl).
    #[arg(long)]
    pub no_start: bool,
    /// Exit 0 without contacting anyone when the data dir holds an identity
    /// already (node.key and node.pem): for init containers and provisioning
    /// scripts that run at every start.
    #[arg(long)]
    pub skip_if_joined: bool,
    /// Give the data dir and the credentials to this user (`UID:GID`), for a
    /// join that runs as root for an agent that does not (Kubernetes init
    /// containers). Default: the data dir's owner.
    #[arg(long, value_parser = parse_owner)]
    pub owner: Option<(u32, u32)>,
}

fn step(n: u32, msg: &str) {
    eprintln!("[{n}/5] {msg}");
}

pub async fn join(a: JoinArgs, log: meshnode_node::reload::LogControl) -> Result<(), Failure> {
    let config_path = a
        .config
        .clone()
        .unwrap_or_else(|| a.data_dir.join("meshnode.toml"));
    // Before the token is read: at a restart it may have expired long ago.
    if a.skip_if_joined
        && a.data_dir.join("node.key").exists()
        && a.data_dir.join("node.pem").exists()
    {
        eprintln!(
            "{} holds an identity already; nothing to do (--skip-if-joined)",
            a.data_dir.display()
        );
        return if a.no_start {
            Ok(())
        } else {
            super::run::run(&config_path, log).await
        };
    }
    let text = match (&a.token, &a.token_file) {
        (Some(t), _) => t.clone(),
        (None, Some(path)) => std::fs::read_to_string(path)
            .with_context(|| format!("reading the join token from {}", path.display()))
            .map_err(Failure::usage)?,
        (None, None) => return Err(Failure::usage(anyhow!("give --token or --token-file"))),
    };
    let token = Token::decode(text.trim()).map_err(Failure::usage)?;
    let now = unix_now();
    if token.expires <= now as u64 {
        return Err(Failure::runtime(anyhow!(
            "the join token expired {}s ago; create a new one with `meshnode token create`",
            now as u64 - token.expires
        )));
    }
    let node = a
        .node
        .clone()
        .unwrap_or_else(meshnode_node::config::hostname);
    meshnode_transport::pki::check_name("node", &node).map_err(Failure::usage)?;
    if let Some(c) = &a.cluster {
        meshnode_transport::pki::check_name("cluster", c).map_err(Failure::usage)?;
    }
    prepare_dir(&a.data_dir)?;
    if let Some((uid, gid)) = a.owner {
        std::os::unix::fs::chown(&a.data_dir, Some(uid), Some(gid))
            .with_context(|| format!("giving {} to {uid}:{gid}", a.data_dir.display()))
            .map_err(Failure::runtime)?;
    }

    step(
        1,
        &format!("generating a key pair for {node:?} (it stays on this machine)"),
    );
    let key = NodeKey::generate().map_err(Failure::runtime)?;
    let csr = key.csr(&node).map_err(Failure::runtime)?;

    let addr = resolve(&a.addr).await?;
    step(
        2,
        &format!(
            "connecting to {addr}; it must prove it holds a certificate of CA {}",
            &hex(&token.ca_fingerprint)[..16]
        ),
    );
    let conn = connect(addr, token.ca_fingerprint).await?;
    // Proven by the handshake: the contacted node's certificate.
    let contacted = meshnode_transport::endpoint::peer_cert(&conn);

    step(
        3,
        "sending the signing request with the token's proof (the token itself stays here)",
    );
    let proof = token
        .prove(&csr, &node, a.cluster.as_deref())
        .map_err(Failure::usage)?;
    let req = Request::Join {
        token_id: token.id,
        proof,
        csr,
        node: node.clone(),
        cluster: a.cluster.clone(),
    };
    let resp = join::call(&conn, &req, ANSWER_TIMEOUT)
        .await
        .map_err(|e| Failure::runtime(anyhow!("no answer to the join request from {addr}: {e}")))?;
    conn.close(quinn::VarInt::from_u32(0), b"done");
    let (cert_pem, ca_pem, identity, seeds) = match resp {
        Response::Issued {
            cert_pem,
            ca_pem,
            identity,
            seeds,
        } => (cert_pem, ca_pem, identity, seeds),
        Response::Refused { reason, message } => {
            return Err(Failure::runtime(anyhow!(
                "{addr} refused the join ({}): {message}{}",
                reason.as_str(),
                hint(reason)
            )))
        }
    };
    // The CA bundle must be the CA the token names, and the certificate ours.
    let ca_der = first_cert_der(&ca_pem).map_err(Failure::runtime)?;
    if fingerprint(&ca_der) != token.ca_fingerprint {
        return Err(Failure::runtime(anyhow!(
            "the CA certificate returned by {addr} is not the one the token names; nothing written"
        )));
    }
    let me = PeerCert::from_pem(&cert_pem).map_err(Failure::runtime)?;
    meshnode_transport::tls::TlsMaterial::from_pem(&ca_pem, &cert_pem, &key.pem())
        .map_err(|e| Failure::runtime(anyhow!("the issued certificate does not work: {e}")))?;

    step(
        4,
        &format!(
            "writing credentials for {identity} into {}",
            a.data_dir.display()
        ),
    );
    let owner = std::fs::metadata(&a.data_dir)
        .map(|m| (m.uid(), m.gid()))
        .ok();
    let files = [
        (a.data_dir.join("node.key"), key.pem(), 0o600),
        (a.data_dir.join("node.pem"), cert_pem, 0o644),
        (a.data_dir.join("ca.pem"), ca_pem, 0o644),
    ];
    for (path, text, mode) in &files {
        write_atomic(path, text.as_bytes(), *mode)
            .with_context(|| format!("writing {}", path.display()))
            .map_err(Failure::runtime)?;
    }
    let plan = Contacts::plan(&a, &me, &seeds, addr, contacted.as_ref());
    let wrote_config = if config_path.exists() && !is_packaged_example(&config_path) {
        eprintln!(
            "      {} exists; leaving it as it is (check node, cluster and seeds)",
            config_path.display()
        );
        false
    } else {
        let text = config_text(&a, &me, &plan);
        write_atomic(&config_path, text.as_bytes(), 0o644)
            .with_context(|| format!("writing {}", config_path.display()))
            .map_err(Failure::runtime)?;
        true
    };
    // `join` often runs as root for a daemon that runs as its own user:
    // the credentials go to that user (it renews them in place), the config
    // stays the invoking user's, so the daemon cannot rewrite its own
    // config (keep it outside the data dir, e.g. /etc/meshnode).
    if let Some((uid, gid)) = owner {
        for path in files.iter().map(|f| f.0.clone()) {
            let _ = std::os::unix::fs::chown(&path, Some(uid), Some(gid));
        }
    }
    if wrote_config
        && config_path.starts_with(&a.data_dir)
        && owner.is_some_and(|(uid, _)| uid != nix_uid())
    {
        eprintln!(
            "      note: {} is inside the data dir, which the node's user can write: it could replace its own config; prefer --config /etc/meshnode/meshnode.toml",
            config_path.display()
        );
    }
    println!("joined as {identity}");
    println!(
        "  certificate valid until {} (renewed automatically at two thirds of its lifetime)",
        humantime::format_rfc3339_seconds(
            std::time::UNIX_EPOCH + Duration::from_secs(me.not_after.max(0) as u64)
        )
    );
    println!("  config {}", config_path.display());
    if wrote_config {
        for note in &plan.notes {
            println!("  next: {note}");
        }
    }
    if a.no_start {
        println!(
            "  start it with: systemctl enable --now meshnode   (or: meshnode run --config {})",
            config_path.display()
        );
        return Ok(());
    }
    step(5, "starting the agent");
    super::run::run(&config_path, log).await
}

fn hint(reason: Refusal) -> &'static str {
    match reason {
        Refusal::Expired | Refusal::UsedUp | Refusal::BadToken => {
            "; create a new token with `meshnode token create` on a CA node"
        }
        Refusal::NameTaken => "",
        Refusal::NoCa => "; a node with a [ca] section must be live in that node's cluster",
        _ => "",
    }
}

fn parse_owner(s: &str) -> Result<(u32, u32), String> {
    let bad = || format!("{s:?} is not UID:GID (numbers, e.g. 65532:65532)");
    let (u, g) = s.split_once(':').ok_or_else(bad)?;
    Ok((u.parse().map_err(|_| bad())?, g.parse().map_err(|_| bad())?))
}

fn prepare_dir(dir: &Path) -> Result<(), Failure> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o750)
        .create(dir)
        .with_context(|| format!("creating {}", dir.display()))
        .map_err(Failure::runtime)?;
    for f in ["node.key", "node.pem"] {
        let p = dir.join(f);
        if p.exists() {
            return Err(Failure::usage(anyhow!(
                "{} exists: this machine has joined already. To join again, move {} and {} away first",
                p.display(),
                dir.join("node.key").display(),
                dir.join("node.pem").display()
            )));
        }
    }
    Ok(())
}

async fn resolve(addr: &str) -> Result<SocketAddr, Failure> {
    let mut addrs = tokio::net::lookup_host(addr)
        .await
        .with_context(|| format!("{addr:?} is not a host:port address"))
        .map_err(Failure::usage)?;
    addrs
        .next()
        .ok_or_else(|| Failure::usage(anyhow!("{addr:?} resolves to no address")))
}

async fn connect(addr: SocketAddr, fp: [u8; 32]) -> Result<quinn::Connection, Failure> {
    let bind: SocketAddr = if addr.is_ipv4() {
        "0.0.0.0:0".parse().map_err(Failure::runtime)?
    } else {
        "[::]:0".parse().map_err(Failure::runtime)?
    };
    let endpoint = quinn::Endpoint::client(bind)
        .with_context(|| format!("opening a UDP socket on {bind}"))
        .map_err(Failure::runtime)?;
    let cfg = join_client_config(fp, Arc::new(transport_config(Link::Tunnel)))
        .map_err(Failure::runtime)?;
    let connecting = endpoint
        .connect_with(cfg, addr, "meshnode")
        .map_err(|e| Failure::runtime(anyhow!("cannot dial {addr}: {e}")))?;
    match tokio::time::timeout(CONNECT_TIMEOUT, connecting).await {
        Err(_) => Err(Failure::runtime(anyhow!(
            "no answer from {addr} within {CONNECT_TIMEOUT:?}: check the address and that UDP {} is open",
            addr.port()
        ))),
        Ok(Err(e)) => {
            let text = e.to_string();
            if text.contains("named by the token") || text.contains("certificate") {
                Err(Failure::runtime(anyhow!(
                    "{addr} is not a node of the mesh this token is for (its certificate does not chain to the token's CA); the token was not sent ({text})"
                )))
            } else {
                Err(Failure::runtime(anyhow!("handshake with {addr} failed: {text}")))
            }
        }
        Ok(Ok(conn)) => Ok(conn),
    }
}

/// The seeds, WAN seeds and advertise address a joined node's config gets,
/// and what the operator still has to do.
#[derive(Debug, Default, PartialEq, Eq)]
struct Contacts {
    seeds: Vec<SocketAddr>,
    wan_seeds: Vec<SocketAddr>,
    advertise: Option<SocketAddr>,
    /// Gateways: the address toward the first WAN seed, when it is not `advertise`.
    wan_advertise: Option<SocketAddr>,
    notes: Vec<String>,
}

impl Contacts {
    /// Only nodes of the joiner's own cluster are seeds: the answer's seeds
    /// (the relay's pool, when it is ours), else the contacted node if it is
    /// ours. A gateway's WAN seeds: `--wan-seed`, else the contacted node if
    /// it is a gateway of another cluster.
    fn plan(
        a: &JoinArgs,
        me: &PeerCert,
        answered: &[SocketAddr],
        addr: SocketAddr,
        contacted: Option<&PeerCert>,
    ) -> Contacts {
        let cluster = me.identity.cluster();
        let contacted_ours = contacted.is_some_and(|c| c.identity.cluster() == cluster);
        let mut seeds = answered.to_vec();
        if seeds.is_empty() && contacted_ours {
            seeds.push(addr);
        }
        let mut notes = Vec::new();
        let mut wan_seeds = a.wan_seeds.clone();
        if me.is_gateway() && wan_seeds.is_empty() {
            match contacted {
                Some(c) if c.is_gateway() && c.identity.cluster() != cluster => wan_seeds.push(addr),
                _ => notes.push(
                    "this gateway has no WAN seed: add wan_seeds = [\"<a gateway's WAN address>\"] to the config (or join with --wan-seed)".to_string(),
                ),
            }
        }
        let mut advertise = a.advertise;
        if seeds.is_empty() {
            if advertise.is_none() && a.bind.ip().is_unspecified() {
                advertise = local_toward(addr).map(|ip| SocketAddr::new(ip, a.bind.port()));
            }
            notes.push(format!(
                "no other node of cluster {cluster} is known: this node starts its cluster's pool. Join the others through it (meshnode join --token T {})",
                advertise.map_or_else(|| a.bind.to_string(), |s| s.to_string())
            ));
            if me.is_gateway() && a.advertise.is_none() {
                notes.push(format!(
                    "advertise = {} is this machine's address toward {addr}; if the cluster's nodes reach it at another (its LAN address), set advertise to that one",
                    advertise.map_or_else(|| "?".to_string(), |s| s.to_string())
                ));
            }
        }
        let wan_advertise = match (me.is_gateway(), wan_seeds.first()) {
            (true, Some(w)) if a.bind.ip().is_unspecified() => local_toward(*w)
                .map(|ip| SocketAddr::new(ip, a.bind.port()))
                .filter(|w| Some(*w) != advertise),
            _ => None,
        };
        Contacts {
            seeds,
            wan_seeds,
            advertise,
            wan_advertise,
            notes,
        }
    }
}

/// The local address the kernel would use toward `to`.
fn local_toward(to: SocketAddr) -> Option<std::net::IpAddr> {
    let any: SocketAddr = if to.is_ipv4() {
        "0.0.0.0:0".parse().ok()?
    } else {
        "[::]:0".parse().ok()?
    };
    let probe = std::net::UdpSocket::bind(any).ok()?;
    probe.connect(to).ok()?;
    Some(probe.local_addr().ok()?.ip())
}

fn config_text(a: &JoinArgs, me: &PeerCert, c: &Contacts) -> String {
    let list = |v: &[SocketAddr]| {
        v.iter()
            .map(|s| format!("\"{s}\""))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut t = String::new();
    t.push_str("# Written by `meshnode join`. Add [[service]] and [[upstream]] sections here.\n");
    t.push_str(&format!("node = \"{}\"\n", me.identity.node()));
    t.push_str(&format!("cluster = \"{}\"\n", me.identity.cluster()));
    t.push_str(&format!("mesh = \"{}\"\n", me.identity.mesh()));
    t.push_str(&format!("data_dir = \"{}\"\n", a.data_dir.display()));
    t.push_str(&format!("bind = \"{}\"\n", a.bind));
    if let Some(adv) = c.advertise {
        t.push_str(&format!("advertise = \"{adv}\"\n"));
    }
    t.push_str(&format!("admin = \"{}\"\n", a.admin));
    t.push_str(&format!("seeds = [{}]\n", list(&c.seeds)));
    if me.is_gateway() {
        t.push_str("gateway = true\n");
        if let Some(w) = c.wan_advertise {
            t.push_str(&format!("wan_advertise = \"{w}\"\n"));
        }
        t.push_str(&format!("wan_seeds = [{}]\n", list(&c.wan_seeds)));
    }
    t
}

/// The first line the Debian package's example config carries: `join`
/// replaces that file (it holds nothing of this machine yet) and leaves any
/// other config alone.
pub const PACKAGED_EXAMPLE: &str =
    "# meshnode: packaged example (meshnode join replaces this file)";

fn is_packaged_example(path: &Path) -> bool {
    std::fs::read_to_string(path).is_ok_and(|t| t.lines().next() == Some(PACKAGED_EXAMPLE))
}

/// The uid of this process.
fn nix_uid() -> u32 {
    std::fs::metadata("/proc/self")
        .map(|m| m.uid())
        .unwrap_or(0)
}

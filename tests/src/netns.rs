//! A fault-injection harness in network namespaces that the test itself makes.
//!
//! Each host is its own namespace with its own address; each cluster is a
//! Linux bridge in a "switch" namespace; gateways have a second interface on a
//! WAN bridge. Nothing is routed between clusters except through gateways.
//! Namespace names carry the process id and a counter, so parallel tests never
//! collide, and [`Topology`] deletes them (killing whatever still runs inside)
//! on drop, also when the test panics.
//!
//! Faults follow `shared/faultlab`: nftables drop rules at the receiver's
//! input hook (partitions, one-way partitions, `numgen random` loss), SIGKILL
//! and SIGSTOP. No netem (not on these machines), no `ip link set down` (it
//! does not behave like a partition).
//!
//! Tests reach into a namespace from the test process itself: a short-lived
//! thread enters the namespace (`setns`) and opens the socket there; a socket
//! stays in the namespace it was made in, whichever thread uses it later.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

/// The QUIC port of every node in a topology.
pub const QUIC_PORT: u16 = 9470;
/// The admin port, on the loopback of each host's namespace.
pub const ADMIN: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), 9471);
const WAN_NET: [u8; 3] = [10, 255, 0];

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// Whether namespace tests can run here. Without root they are skipped with a
/// message, except under `CI=true`, where they must run: this panics.
pub fn available(test: &str) -> bool {
    let probe = format!(
        "mnprobe{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    );
    let made = Command::new("ip").args(["netns", "add", &probe]).output();
    let ok = matches!(&made, Ok(o) if o.status.success());
    if ok {
        let _ = Command::new("ip").args(["netns", "del", &probe]).output();
    }
    let nft = Command::new("nft")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if ok && nft {
        return true;
    }
    let why = match made {
        Ok(o) if !o.status.success() => String::from_utf8_lossy(&o.stderr).trim().to_string(),
        Err(e) => format!("cannot run `ip`: {e}"),
        _ => "nftables (`nft`) is not installed".to_string(),
    };
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{test}: namespace tests must run under CI=true (as root, with iproute2 and nftables): {why}");
    }
    eprintln!(
        "SKIPPED {test}: needs root, iproute2 and nftables to make network namespaces ({why})"
    );
    false
}

fn run(args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("running {args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// One host of the topology.
#[derive(Clone, Debug)]
pub struct Host {
    pub name: String,
    pub cluster: String,
    /// Namespace name.
    pub ns: String,
    pub lan: Ipv4Addr,
    /// Gateways only.
    pub wan: Option<Ipv4Addr>,
}

impl Host {
    pub fn quic(&self) -> SocketAddr {
        SocketAddr::new(self.lan.into(), QUIC_PORT)
    }

    pub fn wan_quic(&self) -> Option<SocketAddr> {
        self.wan.map(|w| SocketAddr::new(w.into(), QUIC_PORT))
    }
}

/// What to build: clusters, each with plain nodes and gateways.
pub struct ClusterSpec<'a> {
    pub name: &'a str,
    pub nodes: &'a [&'a str],
    pub gateways: &'a [&'a str],
}

/// Namespaces, bridges and veth pairs; removed on drop.
pub struct Topology {
    prefix: String,
    namespaces: Vec<String>,
    pub hosts: BTreeMap<String, Host>,
}

impl Topology {
    pub fn build(clusters: &[ClusterSpec<'_>]) -> Topology {
        let prefix = format!(
            "mn{}x{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let mut t = Topology {
            prefix,
            namespaces: Vec::new(),
            hosts: BTreeMap::new(),
        };
        let wan_switch = t.switch("wan");
        let mut wan_host = 1u8;
        for (k, c) in clusters.iter().enumerate() {
            let switch = t.switch(&format!("s{k}"));
            let members = c
                .gateways
                .iter()
                .map(|g| (*g, true))
                .chain(c.nodes.iter().map(|n| (*n, false)));
            for (i, (name, gateway)) in members.enumerate() {
                let ns = t.namespace(name);
                let lan = Ipv4Addr::new(10, 0, k as u8 + 1, i as u8 + 1);
                t.link(&ns, "eth0", &switch, lan);
                let wan = gateway.then(|| {
                    wan_host += 1;
                    let ip = Ipv4Addr::new(WAN_NET[0], WAN_NET[1], WAN_NET[2], wan_host);
                    t.link(&ns, "wan0", &wan_switch, ip);
                    ip
                });
                t.hosts.insert(
                    name.to_string(),
                    Host {
                        name: name.to_string(),
                        cluster: c.name.to_string(),
                        ns,
                        lan,
                        wan,
                    },
                );
            }
        }
        t
    }

    pub fn host(&self, name: &str) -> &Host {
        self.hosts
            .get(name)
            .unwrap_or_else(|| panic!("no host {name}"))
    }

    pub fn cluster(&self, cluster: &str) -> Vec<&Host> {
        self.hosts
            .values()
            .filter(|h| h.cluster == cluster)
            .collect()
    }

    fn namespace(&mut self, name: &str) -> String {
        let ns = format!("{}-{name}", self.prefix);
        run(&["ip", "netns", "add", &ns]);
        self.namespaces.push(ns.clone());
        run(&["ip", "-n", &ns, "link", "set", "lo", "up"]);
        ns
    }

    fn switch(&mut self, name: &str) -> String {
        let ns = self.namespace(name);
        run(&["ip", "-n", &ns, "link", "add", "br0", "type", "bridge"]);
        run(&["ip", "-n", &ns, "link", "set", "br0", "up"]);
        ns
    }

    /// A veth from `ns` (named `ifname`, address `ip/24`) to a port of `switch`'s bridge.
    fn link(&mut self, ns: &str, ifname: &str, switch: &str, ip: Ipv4Addr) {
        let port = format!("p{}", ip.octets()[2] as u32 * 256 + ip.octets()[3] as u32);
        run(&[
            "ip", "link", "add", ifname, "netns", ns, "type", "veth", "peer", "name", &port,
            "netns", switch,
        ]);
        run(&[
            "ip",
            "-n",
            ns,
            "addr",
            "add",
            &format!("{ip}/24"),
            "dev",
            ifname,
        ]);
        run(&["ip", "-n", ns, "link", "set", ifname, "up"]);
        run(&["ip", "-n", switch, "link", "set", &port, "master", "br0"]);
        run(&["ip", "-n", switch, "link", "set", &port, "up"]);
    }

    /// Drops, at `host`'s input, every packet from `from` (an address or CIDR):
    /// a one-way partition. Call for both sides for a full one.
    pub fn drop_from(&self, host: &str, from: &str) {
        let ns = &self.host(host).ns;
        nft(
            ns,
            &format!("add rule inet chaos in ip saddr {from} counter drop"),
        );
    }

    /// Cuts every gateway off the WAN, both ways (the LANs keep working).
    pub fn partition_wan(&self) {
        let wan = format!("{}.{}.{}.0/24", WAN_NET[0], WAN_NET[1], WAN_NET[2]);
        for h in self.hosts.values().filter(|h| h.wan.is_some()) {
            self.drop_from(&h.name, &wan);
        }
    }

    /// Drops `percent` % of the QUIC packets arriving at `host`, at random.
    pub fn loss(&self, host: &str, percent: u8) {
        let ns = &self.host(host).ns;
        nft(
            ns,
            &format!("add rule inet chaos in udp dport {QUIC_PORT} numgen random mod 100 < {percent} counter drop"),
        );
    }

    /// Removes every fault rule of `host`.
    pub fn heal(&self, host: &str) {
        let ns = &self.host(host).ns;
        let _ = Command::new("ip")
            .args([
                "netns", "exec", ns, "nft", "delete", "table", "inet", "chaos",
            ])
            .output();
    }

    pub fn heal_all(&self) {
        for h in self.hosts.keys() {
            self.heal(h);
        }
    }

    /// Packets the fault rules of `host` dropped so far.
    pub fn dropped(&self, host: &str) -> u64 {
        let ns = &self.host(host).ns;
        let out = Command::new("ip")
            .args(["netns", "exec", ns, "nft", "list", "table", "inet", "chaos"])
            .output();
        let text = out
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        text.split("packets ")
            .skip(1)
            .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
            .sum()
    }
}

/// Adds one rule to the `inet chaos` table's input chain of `ns`, creating both on first use.
fn nft(ns: &str, rule: &str) {
    let setup = "add table inet chaos\nadd chain inet chaos in { type filter hook input priority 0; policy accept; }\n";
    let script = format!("{setup}{rule}\n");
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns, "nft", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("running nft");
    if let Some(mut stdin) = child.stdin.take() {
        use std::io::Write;
        stdin
            .write_all(script.as_bytes())
            .expect("writing nft script");
    }
    let out = child.wait_with_output().expect("nft");
    assert!(
        out.status.success(),
        "nft {rule:?} in {ns}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Drop for Topology {
    fn drop(&mut self) {
        for ns in self.namespaces.iter().rev() {
            // Whatever still runs inside would keep the namespace alive.
            if let Ok(out) = Command::new("ip").args(["netns", "pids", ns]).output() {
                for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                    let _ = Command::new("kill").args(["-9", pid]).output();
                }
            }
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

/// Runs `f` on a fresh thread inside namespace `ns` (the thread dies afterwards,
/// so no pooled thread is ever left in a foreign namespace).
pub fn in_netns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> std::io::Result<T> {
    let path = format!("/var/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path)?;
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(std::io::Error::from)?;
        f()
    })
    .join()
    .map_err(|_| std::io::Error::other("namespace thread panicked"))?
}

/// A TCP connection made inside `ns` (or in the test's own namespace for `None`).
pub async fn connect(
    ns: Option<&str>,
    addr: SocketAddr,
    limit: Duration,
) -> std::io::Result<tokio::net::TcpStream> {
    match ns {
        None => tokio::time::timeout(limit, tokio::net::TcpStream::connect(addr))
            .await
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))?,
        Some(ns) => {
            let ns = ns.to_string();
            let std = tokio::task::spawn_blocking(move || {
                in_netns(&ns, move || {
                    let s = std::net::TcpStream::connect_timeout(&addr, limit)?;
                    s.set_nonblocking(true)?;
                    Ok(s)
                })
            })
            .await
            .map_err(std::io::Error::other)??;
            tokio::net::TcpStream::from_std(std)
        }
    }
}

/// A TCP listener bound inside `ns`.
pub fn listen(ns: &str, addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let l = in_netns(ns, move || {
        let l = std::net::TcpListener::bind(addr)?;
        l.set_nonblocking(true)?;
        Ok(l)
    })?;
    tokio::net::TcpListener::from_std(l)
}

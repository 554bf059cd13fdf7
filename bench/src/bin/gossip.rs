//! `meshnode-gossip-bench`: N meshnode nodes against N serf agents (LAN
//! profile) on loopback, in the same run, for N = 10, 30, 60 by default.
//!
//! Per N and system: a state change seen by all (meshnode: a service turning
//! passing on node 1, from node 1's own view to the last node's view; serf: a
//! tag change, from `serf tags` to the last agent's `serf members` view), a
//! kill -9 seen as dead by all, idle gossip bytes per second per node (an
//! nftables counter on the system's source subnet; needs root), and RSS per
//! node. Prints a table with meshnode/serf ratios.
//!
//! ```sh
//! meshnode-gossip-bench --meshnode target/release/meshnode --serf /usr/bin/serf --sizes 10,30,60
//! ```
//!
//! `--only meshnode` (or `serf`) runs one system: for comparing two meshnode
//! builds quickly, without ratios.
// A measuring crate: it reads wall and virtual clocks itself (the
// disallowed-methods rule of clippy.toml is for the mesh's own code).
#![allow(clippy::disallowed_methods)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

struct Args {
    meshnode: PathBuf,
    serf: PathBuf,
    sizes: Vec<usize>,
    work: PathBuf,
    only: Option<String>,
    /// The idle window: long enough for serf's 30 s push-pull (and our slow
    /// anti-entropy) to fall inside it several times.
    idle: Duration,
    /// The pool size that also runs the loss windows (0: none).
    loss_n: usize,
    /// How long each loss window lasts.
    loss_window: Duration,
}

/// Random loss levels of the loss windows, in percent.
const LOSS_LEVELS: [u8; 2] = [30, 40];

const USAGE: &str = "usage: meshnode-gossip-bench [--meshnode PATH] [--serf PATH] [--sizes 10,30,60,100] [--work DIR] [--only meshnode|serf] [--idle-secs 120] [--loss-n 30] [--loss-secs 60]";

#[derive(Debug, Default, Clone, Copy)]
struct Figures {
    propagation_s: f64,
    detection_s: f64,
    idle_bytes_per_node_s: Option<f64>,
    rss_kib_per_node: f64,
    /// The anonymous part of RSS (heap, stacks): memory of this process
    /// alone, where RSS also counts the binary's pages every node shares.
    anon_kib_per_node: f64,
    /// Per loss level: members some node listed as dead (observer, member
    /// pairs) while every node was alive, or None when not run.
    false_deaths: [Option<usize>; 2],
}

/// Children killed on drop.
struct Procs(Vec<Child>);

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn main() -> anyhow::Result<()> {
    let a = parse_args()?;
    std::fs::create_dir_all(&a.work)?;
    let mut rows = Vec::new();
    for &n in &a.sizes {
        let run = |system: &str| a.only.as_deref().is_none_or(|o| o == system);
        let mut m = Figures::default();
        if run("meshnode") {
            eprintln!("== N = {n}: meshnode");
            m = meshnode_run(&a, n)?;
            eprintln!("   {m:?}");
        }
        let mut s = Figures::default();
        if run("serf") {
            eprintln!("== N = {n}: serf");
            s = serf_run(&a, n)?;
            eprintln!("   {s:?}");
        }
        rows.push((n, m, s));
    }
    println!("\n| N | system | state change seen by all | kill -9 seen by all | idle B/s per node | RSS per node | of it anonymous |");
    println!("|---|---|---|---|---|---|---|");
    for (n, m, s) in &rows {
        for (name, f) in [("meshnode", m), ("serf", s)] {
            println!(
                "| {n} | {name} | {:.2} s | {:.2} s | {} | {:.1} MiB | {:.1} MiB |",
                f.propagation_s,
                f.detection_s,
                f.idle_bytes_per_node_s
                    .map_or("n/a".into(), |b| format!("{b:.0}")),
                f.rss_kib_per_node / 1024.0,
                f.anon_kib_per_node / 1024.0
            );
        }
        let ratio = |a: f64, b: f64| {
            if b > 0.0 {
                format!("{:.2}x", a / b)
            } else {
                "n/a".into()
            }
        };
        println!(
            "| {n} | **meshnode / serf** | **{}** | **{}** | **{}** | **{}** | **{}** |",
            ratio(m.propagation_s, s.propagation_s),
            ratio(m.detection_s, s.detection_s),
            match (m.idle_bytes_per_node_s, s.idle_bytes_per_node_s) {
                (Some(a), Some(b)) => ratio(a, b),
                _ => "n/a".into(),
            },
            ratio(m.rss_kib_per_node, s.rss_kib_per_node),
            ratio(m.anon_kib_per_node, s.anon_kib_per_node)
        );
    }
    for (n, m, s) in rows.iter().filter(|(n, _, _)| *n == a.loss_n) {
        println!("\n| N | random loss | window | meshnode false deaths | serf false deaths |");
        println!("|---|---|---|---|---|");
        for (k, level) in LOSS_LEVELS.iter().enumerate() {
            let show = |v: Option<usize>| v.map_or("n/a".into(), |c| c.to_string());
            println!(
                "| {n} | {level} % | {} s | {} | {} |",
                a.loss_window.as_secs(),
                show(m.false_deaths[k]),
                show(s.false_deaths[k])
            );
        }
    }
    Ok(())
}

fn parse_args() -> anyhow::Result<Args> {
    let mut a = Args {
        meshnode: "target/release/meshnode".into(),
        serf: "/usr/bin/serf".into(),
        sizes: vec![10, 30, 60, 100],
        work: std::env::temp_dir().join("meshnode-gossip-bench"),
        only: None,
        idle: Duration::from_secs(120),
        loss_n: 30,
        loss_window: Duration::from_secs(60),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "--help" || flag == "-h" {
            println!("{USAGE}");
            std::process::exit(0);
        }
        let v = it
            .next()
            .with_context(|| format!("{flag} needs a value\n{USAGE}"))?;
        match flag.as_str() {
            "--only" => match v.as_str() {
                "meshnode" | "serf" => a.only = Some(v),
                other => bail!("--only: meshnode or serf, not {other:?}"),
            },
            "--meshnode" => a.meshnode = v.into(),
            "--serf" => a.serf = v.into(),
            "--work" => a.work = v.into(),
            "--loss-n" => a.loss_n = v.parse().context("--loss-n: a number")?,
            "--loss-secs" => {
                a.loss_window = Duration::from_secs(v.parse().context("--loss-secs: a number")?)
            }
            "--idle-secs" => {
                a.idle = Duration::from_secs(v.parse().context("--idle-secs: a number")?)
            }
            "--sizes" => {
                a.sizes = v
                    .split(',')
                    .map(|s| s.trim().parse())
                    .collect::<Result<_, _>>()
                    .context("--sizes: comma-separated numbers")?
            }
            other => bail!("unknown flag {other}\n{USAGE}"),
        }
    }
    Ok(a)
}

fn ip(system: u8, n: usize, i: usize) -> String {
    format!("127.{system}.{n}.{}", i + 1)
}

/// Waits until `cond` holds; returns the time it took.
fn until(limit: Duration, mut cond: impl FnMut() -> bool) -> anyhow::Result<Duration> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if cond() {
            return Ok(start.elapsed());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    bail!("condition not met within {limit:?}")
}

fn http_get(addr: &str, path: &str) -> Option<String> {
    let addr: SocketAddr = addr.parse().ok()?;
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).ok()?;
    Some(body)
}

/// Mean (VmRSS, RssAnon) per process, KiB.
fn rss_kib(pids: &[u32]) -> (f64, f64) {
    let field = |s: &str, name: &str| -> u64 {
        s.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let (rss, anon) = pids
        .iter()
        .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/status")).ok())
        .fold((0, 0), |(r, a), s| {
            (r + field(&s, "VmRSS:"), a + field(&s, "RssAnon:"))
        });
    let n = pids.len().max(1) as f64;
    (rss as f64 / n, anon as f64 / n)
}

/// Bytes sent from `subnet` (127.S.N.0/24) during `window`, per node and
/// second, from an nftables counter; None without nft or root. UDP and TCP:
/// serf's push-pull runs over TCP, QUIC (keep-alives and all) over UDP.
fn idle_bytes(subnet: &str, n: usize, window: Duration) -> Option<f64> {
    let table = "meshnode_gossip_bench";
    let _ = nft(&format!("delete table ip {table}"));
    nft(&format!("add table ip {table}"))?;
    nft(&format!(
        "add chain ip {table} out {{ type filter hook output priority 0 ; }}"
    ))?;
    nft(&format!(
        "add rule ip {table} out ip saddr {subnet} meta l4proto {{ udp, tcp }} counter"
    ))?;
    std::thread::sleep(window);
    let out = nft(&format!("list chain ip {table} out"))?;
    let _ = nft(&format!("delete table ip {table}"));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let bytes: f64 = text
        .split_whitespace()
        .skip_while(|w| *w != "bytes")
        .nth(1)?
        .parse()
        .ok()?;
    Some(bytes / n as f64 / window.as_secs_f64())
}

/// How long a formed pool settles before the idle window, both systems
/// alike: a meshnode node's probes reach every peer once in N x 500 ms, and
/// each first contact costs a QUIC handshake (a one-time cost per node pair,
/// reported in BENCHMARKS.md apart from the idle bytes).
fn settle(n: usize) -> Duration {
    Duration::from_millis(500 * n as u64 + 5_000)
}

/// Drops `percent` % of the gossip packets that arrive at `subnet`
/// (nftables at the receivers' input, `numgen random`) while `f` runs, then
/// removes the rule; `tcp` adds a TCP port to the UDP one (serf's push-pull).
/// None without nft or root.
fn with_loss<T>(
    subnet: &str,
    udp: u16,
    tcp: Option<u16>,
    percent: u8,
    f: impl FnOnce() -> T,
) -> Option<T> {
    let table = "meshnode_gossip_bench_loss";
    let _ = nft(&format!("delete table ip {table}"));
    nft(&format!("add table ip {table}"))?;
    nft(&format!(
        "add chain ip {table} in {{ type filter hook input priority 0 ; }}"
    ))?;
    nft(&format!(
        "add rule ip {table} in ip daddr {subnet} udp dport {udp} numgen random mod 100 < {percent} drop"
    ))?;
    if let Some(port) = tcp {
        nft(&format!(
            "add rule ip {table} in ip daddr {subnet} tcp dport {port} numgen random mod 100 < {percent} drop"
        ))?;
    }
    let out = f();
    let _ = nft(&format!("delete table ip {table}"));
    Some(out)
}

/// Runs every loss window: for each level, `dead_pairs` is polled every
/// second for `window` and the distinct (observer, member) pairs it ever
/// returned are counted. Nobody dies during a window, so each is false.
fn loss_windows(
    subnet: &str,
    udp: u16,
    tcp: Option<u16>,
    window: Duration,
    dead_pairs: &dyn Fn() -> Vec<(usize, String)>,
) -> [Option<usize>; 2] {
    let mut out = [None; 2];
    for (k, level) in LOSS_LEVELS.iter().enumerate() {
        out[k] = with_loss(subnet, udp, tcp, *level, || {
            let mut seen = std::collections::BTreeSet::new();
            let start = Instant::now();
            while start.elapsed() < window {
                seen.extend(dead_pairs());
                std::thread::sleep(Duration::from_secs(1));
            }
            seen.len()
        });
        eprintln!(
            "   {level} % loss for {window:?}: {:?} false deaths",
            out[k]
        );
        // Let the pool heal before the next level (or the next figure).
        std::thread::sleep(Duration::from_secs(15));
    }
    out
}

/// One `nft` command (arguments split on spaces); None if it failed.
fn nft(args: &str) -> Option<std::process::Output> {
    Command::new("nft")
        .args(args.split(' '))
        .output()
        .ok()
        .filter(|o| o.status.success())
}

fn run_quiet(cmd: &mut Command) -> anyhow::Result<()> {
    let out = cmd.output().context("running a helper command")?;
    if !out.status.success() {
        bail!("{:?}: {}", cmd, String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

fn meshnode_run(a: &Args, n: usize) -> anyhow::Result<Figures> {
    let dir = a.work.join(format!("meshnode-{n}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    run_quiet(
        Command::new(&a.meshnode)
            .args(["ca", "init", "--mesh", "bench", "--out"])
            .arg(dir.join("ca")),
    )?;
    let flip_port = 18080;
    let mut procs = Procs(Vec::new());
    for i in 0..n {
        let name = format!("m{i}");
        let d = dir.join(&name);
        run_quiet(
            Command::new(&a.meshnode)
                .args(["cert", "issue", "--ca"])
                .arg(dir.join("ca"))
                .args(["--cluster", "c", "--node", &name, "--out"])
                .arg(&d),
        )?;
        let mut cfg = format!(
            "node = \"{name}\"\ncluster = \"c\"\nmesh = \"bench\"\ndata_dir = \"{}\"\nbind = \"{}:9470\"\nadmin = \"{}:9471\"\nseeds = [\"{}:9470\"]\n",
            d.display(),
            ip(77, n, i),
            ip(77, n, i),
            ip(77, n, 0)
        );
        if i == 0 {
            cfg.push_str(&format!(
                "\n[[service]]\nname = \"flip\"\naddress = \"{a}\"\nport = {flip_port}\ncheck = {{ tcp = \"{a}:{flip_port}\", interval = \"100ms\", timeout = \"100ms\", rise = 1 }}\n",
                a = ip(77, n, 0)
            ));
        }
        let cfg_path = d.join("config.toml");
        std::fs::write(&cfg_path, cfg)?;
        let log = std::fs::File::create(d.join("node.log"))?;
        procs.0.push(
            Command::new(&a.meshnode)
                .args(["run", "--config"])
                .arg(&cfg_path)
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()?,
        );
    }
    let admins: Vec<String> = (0..n).map(|i| format!("{}:9471", ip(77, n, i))).collect();
    let alive = |admin: &str| {
        http_get(admin, "/v1/members")
            .map(|b| b.matches("\"alive\"").count())
            .unwrap_or(0)
    };
    if until(Duration::from_secs(120), || {
        admins.iter().all(|a| alive(a) == n)
    })
    .is_err()
    {
        let seen: Vec<usize> = admins.iter().map(|a| alive(a)).collect();
        anyhow::bail!(
            "meshnode pool of {n} did not form in 120 s; alive members seen by each node: {seen:?}"
        );
    }
    std::thread::sleep(settle(n));
    let pids: Vec<u32> = procs.0.iter().map(Child::id).collect();
    let idle = idle_bytes(&format!("127.77.{n}.0/24"), n, a.idle);
    // After the idle window: the steady state, with every connection open.
    let (rss, anon) = rss_kib(&pids);
    let mut false_deaths = [None; 2];
    if n == a.loss_n {
        let dead_pairs = || {
            let mut v = Vec::new();
            for (i, admin) in admins.iter().enumerate() {
                // A lost admin answer is no verdict; admin runs over TCP, untouched.
                if let Some(body) = http_get(admin, "/v1/members") {
                    // Pretty-printed JSON: one object per member.
                    for entry in body.split('{').skip(1) {
                        if !entry.contains("\"alive\"") {
                            let name = entry
                                .split("\"node\": \"")
                                .nth(1)
                                .and_then(|r| r.split('"').next())
                                .unwrap_or("?");
                            v.push((i, name.to_string()));
                        }
                    }
                }
            }
            v
        };
        false_deaths = loss_windows(
            &format!("127.77.{n}.0/24"),
            9470,
            None,
            a.loss_window,
            &dead_pairs,
        );
    }

    // A state change: node 0's service turns passing.
    let passing =
        |admin: &str| http_get(admin, "/v1/services").is_some_and(|b| b.contains("\"passing\""));
    let _listener = TcpListener::bind(format!("{}:{flip_port}", ip(77, n, 0)))?;
    until(Duration::from_secs(10), || passing(&admins[0]))
        .context("node 0 never saw its own service pass")?;
    let t0 = Instant::now();
    until(Duration::from_secs(30), || {
        admins.iter().all(|a| passing(a))
    })
    .context("the change did not reach every node")?;
    let propagation = t0.elapsed().as_secs_f64();

    // kill -9 the last node.
    let victim = n - 1;
    let _ = procs.0[victim].kill();
    let t0 = Instant::now();
    if until(Duration::from_secs(60), || {
        admins[..victim].iter().all(|a| alive(a) == n - 1)
    })
    .is_err()
    {
        let off: Vec<(usize, usize)> = admins[..victim]
            .iter()
            .enumerate()
            .map(|(i, a)| (i, alive(a)))
            .filter(|(_, c)| *c != n - 1)
            .collect();
        anyhow::bail!(
            "kill -9 not detected by every node in 60 s; (node, alive members it lists) where not {}: {off:?}",
            n - 1
        );
    }
    Ok(Figures {
        propagation_s: propagation,
        detection_s: t0.elapsed().as_secs_f64(),
        idle_bytes_per_node_s: idle,
        rss_kib_per_node: rss,
        anon_kib_per_node: anon,
        false_deaths,
    })
}

fn serf_run(a: &Args, n: usize) -> anyhow::Result<Figures> {
    let dir = a.work.join(format!("serf-{n}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let mut procs = Procs(Vec::new());
    for i in 0..n {
        let mut cmd = Command::new(&a.serf);
        cmd.args([
            "agent",
            "-node",
            &format!("s{i}"),
            "-bind",
            &format!("{}:7946", ip(78, n, i)),
            "-rpc-addr",
            &format!("{}:7373", ip(78, n, i)),
            "-profile",
            "lan",
            "-log-level",
            "warn",
        ]);
        if i > 0 {
            cmd.args([
                "-retry-join",
                &format!("{}:7946", ip(78, n, 0)),
                "-retry-interval",
                "1s",
            ]);
        }
        procs.0.push(
            cmd.stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("starting serf (apt install serf)")?,
        );
        if i == 0 {
            std::thread::sleep(Duration::from_millis(300));
        }
    }
    let rpc = |i: usize| format!("{}:7373", ip(78, n, i));
    let alive = |i: usize| {
        Command::new(&a.serf)
            .args(["members", "-rpc-addr", &rpc(i), "-status", "alive"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).lines().count())
            .unwrap_or(0)
    };
    if until(Duration::from_secs(120), || (0..n).all(|i| alive(i) == n)).is_err() {
        let seen: Vec<usize> = (0..n).map(alive).collect();
        anyhow::bail!(
            "serf pool of {n} did not form in 120 s; alive members seen by each agent: {seen:?}"
        );
    }
    std::thread::sleep(settle(n));
    let pids: Vec<u32> = procs.0.iter().map(Child::id).collect();
    let idle = idle_bytes(&format!("127.78.{n}.0/24"), n, a.idle);
    let (rss, anon) = rss_kib(&pids);
    let mut false_deaths = [None; 2];
    if n == a.loss_n {
        let dead_pairs = || {
            let mut v = Vec::new();
            for i in 0..n {
                // `serf members` talks RPC over TCP 7373, which the rule leaves alone.
                if let Ok(o) = Command::new(&a.serf)
                    .args(["members", "-rpc-addr", &rpc(i), "-status", "failed"])
                    .output()
                {
                    for line in String::from_utf8_lossy(&o.stdout).lines() {
                        if let Some(name) = line.split_whitespace().next() {
                            v.push((i, name.to_string()));
                        }
                    }
                }
            }
            v
        };
        false_deaths = loss_windows(
            &format!("127.78.{n}.0/24"),
            7946,
            Some(7946),
            a.loss_window,
            &dead_pairs,
        );
    }

    // Every agent's view, polled in parallel: `serf members` with `filter`,
    // and `check` on its output. (Event handlers would add serf's member-event
    // coalescing, about 1 s, to its figures.)
    let all_agents = |agents: &[usize], filter: &[&str], check: &(dyn Fn(&str) -> bool + Sync)| {
        std::thread::scope(|sc| {
            let handles: Vec<_> = agents
                .iter()
                .map(|&i| {
                    let rpc = rpc(i);
                    sc.spawn(move || {
                        Command::new(&a.serf)
                            .args(["members", "-rpc-addr", &rpc])
                            .args(filter)
                            .output()
                            .map(|o| check(&String::from_utf8_lossy(&o.stdout)))
                            .unwrap_or(false)
                    })
                })
                .collect();
            handles.into_iter().all(|h| h.join().unwrap_or(false))
        })
    };
    let everyone: Vec<usize> = (0..n).collect();
    let t0 = Instant::now();
    run_quiet(Command::new(&a.serf).args(["tags", "-rpc-addr", &rpc(0), "-set", "bench=1"]))?;
    until(Duration::from_secs(30), || {
        all_agents(&everyone, &["-tag", "bench=1"], &|out| out.contains("s0 "))
    })
    .context("the tag change did not reach every agent")?;
    let propagation = t0.elapsed().as_secs_f64();

    let victim = n - 1;
    let _ = procs.0[victim].kill();
    let t0 = Instant::now();
    until(Duration::from_secs(60), || {
        all_agents(&everyone[..victim], &["-status", "alive"], &|out| {
            out.lines().count() == n - 1
        })
    })
    .context("serf did not detect the kill everywhere")?;
    let detection = t0.elapsed().as_secs_f64();
    Ok(Figures {
        propagation_s: propagation,
        detection_s: detection,
        idle_bytes_per_node_s: idle,
        rss_kib_per_node: rss,
        anon_kib_per_node: anon,
        false_deaths,
    })
}

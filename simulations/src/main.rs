//! `meshnode-sim`: runs the gossip scenarios in virtual time and writes CSV,
//! SVG plots and a short report.
//!
//! ```sh
//! cargo run --release -p meshnode-simulations -- all --out simulations/out
//! cargo run --release -p meshnode-simulations -- convergence --sizes 100,1000
//! ```
// A measuring crate: it reads wall and virtual clocks itself (the
// disallowed-methods rule of clippy.toml is for the mesh's own code).
#![allow(clippy::disallowed_methods)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use meshnode_simulations::plot::{line_chart, Series};
use meshnode_simulations::scenarios::Shape;
use meshnode_simulations::{runtime, scenarios};

#[derive(Parser)]
#[command(
    name = "meshnode-sim",
    about = "meshnode's gossip layer in virtual time"
)]
struct Cli {
    /// Seeds the network's loss and the run (chitchat's peer choice uses OS entropy).
    #[arg(long, global = true)]
    seed: Option<u64>,
    /// Output directory for CSV, SVG and report.md.
    #[arg(long, global = true, default_value = "simulations/out")]
    out: PathBuf,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Convergence of a service change and idle cost vs pool size.
    Convergence {
        #[arg(long, value_delimiter = ',', default_value = "10,30,100,300,1000")]
        sizes: Vec<usize>,
        /// Sizes to run chitchat alone at too (the shape before the plane).
        #[arg(long, value_delimiter = ',', default_value = "10,30,100,300")]
        before: Vec<usize>,
        /// Measure idle over the full settled window up to this size (above
        /// it, only the model from probes and exchange size).
        #[arg(long, default_value_t = 100)]
        full_idle_up_to: usize,
    },
    /// Failure detection and false failures vs packet loss.
    Detection {
        #[arg(long, default_value_t = 50)]
        n: usize,
        #[arg(long, value_delimiter = ',', default_value = "0,10,20,30,40")]
        loss: Vec<u32>,
        /// Seconds under loss before the kill.
        #[arg(long, default_value_t = 60)]
        window: u64,
    },
    /// A partition into two halves, then heal.
    Partition {
        #[arg(long, default_value_t = 50)]
        n: usize,
        #[arg(long, default_value_t = 30)]
        split: u64,
    },
    /// Federation summaries across a WAN pool of gateways.
    Federation {
        #[arg(long, default_value_t = 100)]
        clusters: usize,
    },
    /// Clusters of nodes, one gateway each, federated over a WAN pool:
    /// formation, idle bytes and false failures under loss, a change
    /// crossing clusters, a gateway's kill.
    Federated {
        #[arg(long, default_value_t = 100)]
        clusters: usize,
        #[arg(long, default_value_t = 100)]
        per_cluster: usize,
        #[arg(long, value_delimiter = ',', default_value = "0")]
        loss: Vec<u32>,
    },
    /// Who publishes policy documents and revocations: copies per object
    /// at N nodes through applies, mass failures and joins (meshnode's
    /// replica plan on every node's own lagging view).
    Replicas {
        #[arg(long, default_value_t = 1000)]
        n: usize,
        #[arg(long, default_value_t = 60)]
        documents: usize,
        #[arg(long, default_value_t = 20)]
        revocations: usize,
    },
    /// Every scenario with its defaults.
    All,
    /// Writes real gossip messages, raw and as zstd frames, as seeds for the
    /// `gossip_frame` fuzz target (not part of `all`).
    Corpus {
        #[arg(long, default_value = "fuzz/seeds/gossip_frame")]
        dir: PathBuf,
    },
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // Off unless asked for: MESHNODE_SIM_LOG=warn (or a tracing filter).
    if let Ok(filter) = std::env::var("MESHNODE_SIM_LOG") {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_writer(std::io::stderr)
            .init();
    }
    let seed = cli.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(1)
    });
    println!("seed {seed} (reproduce with --seed {seed}; chitchat's peer choice is not seeded)");
    match run(&cli, seed) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: &Cli, seed: u64) -> anyhow::Result<()> {
    let rt = runtime()?;
    if let Cmd::Corpus { dir } = &cli.cmd {
        return corpus(&rt, seed, dir);
    }
    std::fs::create_dir_all(&cli.out)?;
    let mut report = format!("# meshnode gossip simulation\n\nseed {seed}; meshnode's defaults: SWIM probes every 500 ms (200 ms timeout, 3 indirect), pushes to ln N + 4 peers, anti-entropy paced from 250 ms up to N s (10-300 s). \"before\": chitchat alone, a digest exchange with 3 peers every 250 ms, phi 8.\n\n");
    let all = matches!(cli.cmd, Cmd::All);
    if let Cmd::Convergence {
        sizes,
        before,
        full_idle_up_to,
    } = &cli.cmd
    {
        report.push_str(&convergence(
            &rt,
            sizes,
            before,
            *full_idle_up_to,
            seed,
            &cli.out,
        )?);
    } else if all {
        report.push_str(&convergence(
            &rt,
            // 1,000 in one pool trips chitchat 0.11's digest limit (see
            // BENCHMARKS.md, "Where it stops").
            &[10, 30, 100, 300],
            &[10, 30, 100, 300],
            100,
            seed,
            &cli.out,
        )?);
    }
    if let Cmd::Detection { n, loss, window } = &cli.cmd {
        report.push_str(&detection(
            &rt,
            *n,
            loss,
            Duration::from_secs(*window),
            seed,
            &cli.out,
        )?);
    } else if all {
        report.push_str(&detection(
            &rt,
            100,
            &[0, 10, 30],
            Duration::from_secs(60),
            seed,
            &cli.out,
        )?);
    }
    if let Cmd::Partition { n, split } = &cli.cmd {
        report.push_str(&partition(
            &rt,
            *n,
            Duration::from_secs(*split),
            seed,
            &cli.out,
        )?);
    } else if all {
        report.push_str(&partition(
            &rt,
            100,
            Duration::from_secs(30),
            seed,
            &cli.out,
        )?);
    }
    if let Cmd::Federation { clusters } = &cli.cmd {
        report.push_str(&federation(&rt, *clusters, seed, &cli.out)?);
    } else if all {
        report.push_str(&federation(&rt, 100, seed, &cli.out)?);
    }
    if let Cmd::Federated {
        clusters,
        per_cluster,
        loss,
    } = &cli.cmd
    {
        report.push_str(&federated(
            &rt,
            *clusters,
            *per_cluster,
            loss,
            seed,
            &cli.out,
        )?);
    } else if all {
        // 1,000 nodes: 100 x 100 is about 35 CPU-minutes by itself (see
        // BENCHMARKS.md), over the whole set's budget.
        report.push_str(&federated(&rt, 20, 50, &[0, 10, 30], seed, &cli.out)?);
    }
    if let Cmd::Replicas {
        n,
        documents,
        revocations,
    } = &cli.cmd
    {
        report.push_str(&replicas(*n, *documents, *revocations, seed, &cli.out)?);
    } else if all {
        report.push_str(&replicas(1000, 60, 20, seed, &cli.out)?);
    }
    std::fs::write(cli.out.join("report.md"), &report)?;
    println!("\n{report}wrote {}", cli.out.join("report.md").display());
    Ok(())
}

fn replicas(
    n: usize,
    documents: usize,
    revocations: usize,
    seed: u64,
    out: &Path,
) -> anyhow::Result<String> {
    use meshnode_simulations::replicas::{run, ReplicaConfig};
    let started = Instant::now();
    let cfg = ReplicaConfig {
        n,
        documents,
        revocations,
        seed,
        ..ReplicaConfig::default()
    };
    let r = run(cfg.clone());
    let mut csv = String::from("t_s,max_copies,mean_copies,min_copies,over_k,stale_holders\n");
    for s in &r.samples {
        csv.push_str(&format!(
            "{},{},{:.3},{},{},{}\n",
            s.t_s, s.max_copies, s.mean_copies, s.min_copies, s.over_k, s.stale_holders
        ));
    }
    std::fs::write(out.join("replicas.csv"), csv)?;
    let series = |name: &str, f: &dyn Fn(&meshnode_simulations::replicas::Sample) -> f64| Series {
        name: name.into(),
        points: r.samples.iter().map(|s| (s.t_s, f(s))).collect(),
        dashed: false,
    };
    let svg = line_chart(
        &format!(
            "Copies per object in gossip state, N = {n} ({documents} documents, {revocations} revocations, k = {})",
            cfg.k
        ),
        "time (s): steady, 10 applies, 10 % killed, k holders killed, 50 join",
        "live copies of one object",
        false,
        &[
            series("most copies of any object", &|s| s.max_copies as f64),
            series("mean copies", &|s| s.mean_copies),
            series("fewest copies of any object", &|s| s.min_copies as f64),
        ],
    );
    std::fs::write(out.join("replicas.svg"), svg)?;
    let mut md = format!(
        "## Replicas: who publishes policy documents and revocations\n\nN = {n}, {documents} documents and {revocations} revocations, k = {}; each node runs `replica::plan` on its own view, a publication reaches another node after {}-{} ms, a death is seen after {}-{} s. Every node held one copy of every revocation before: {} copies per object at the end of this run.\n\n| phase | at (s) | settled after (s) | most copies while settling |\n|---|---|---|---|\n",
        cfg.k,
        cfg.spread.0 * 100,
        cfg.spread.1 * 100,
        cfg.detect.0 as f64 / 10.0,
        cfg.detect.1 as f64 / 10.0,
        r.every_node_copies,
    );
    for p in &r.phases {
        md.push_str(&format!(
            "| {} | {:.0} | {} | {} |\n",
            p.name,
            p.at_s,
            p.settled_after_s
                .map_or("not within the phase".to_string(), |s| format!("{s:.1}")),
            p.peak_copies
        ));
    }
    md.push_str(&format!(
        "\nOnce settled: at most {} and at least {} live copies of any object. {} plan decisions, {:.1} s of CPU. ![replicas](replicas.svg)\n\n",
        r.settled_max,
        r.settled_min,
        r.plan_calls,
        started.elapsed().as_secs_f64()
    ));
    Ok(md)
}

fn corpus(rt: &tokio::runtime::Runtime, seed: u64, dir: &Path) -> anyhow::Result<()> {
    use meshnode_gossip::frame::Codec;
    let samples = rt.block_on(scenarios::corpus(seed))?;
    std::fs::create_dir_all(dir)?;
    for (i, raw) in samples.iter().enumerate() {
        std::fs::write(dir.join(format!("raw-{i:02}")), raw)?;
        let frame = Codec::Zstd
            .encode(raw)
            .map_err(|e| anyhow::anyhow!("message {i}: {e}"))?;
        std::fs::write(dir.join(format!("zstd-{i:02}")), frame)?;
    }
    println!(
        "wrote {} messages, raw and zstd, to {}",
        samples.len(),
        dir.display()
    );
    Ok(())
}

fn convergence(
    rt: &tokio::runtime::Runtime,
    sizes: &[usize],
    before: &[usize],
    full_idle_up_to: usize,
    seed: u64,
    out: &Path,
) -> anyhow::Result<String> {
    let mut csv = String::from("shape,n,formation_s,convergence_s,rounds,lower_bound_rounds,settle_s,idle_window_s,idle_wire_bytes_per_node_s,idle_frame_bytes_per_node_s,probe_bytes_per_node_s,exchange_bytes,idle_model_bytes_per_node_s,change_bytes,max_message_bytes,max_frame_bytes,oversize_messages,cpu_s\n");
    let mut md = String::from("## Convergence of a service change, and idle cost\n\nplane: hops of 100 ms each (every gossip message is delayed 100 ms); before: 250 ms rounds, no latency. Idle: everything on the wire (frames, QUIC/IP overhead, probes and their ACKs) per node. *Measured*: over a window after the anti-entropy pace settled (2 x the idle interval). *Model*: the probe rate and the mean exchange size measured in the 60 s after formation, with one exchange per node per idle interval (N s, 10-300 s); the two agree where both ran.\n\n| shape | N | hops/rounds (time) | lower bound | idle B/s per node, measured (frames) | idle B/s per node, model | one exchange | per change, fleet (per node) | largest frame | oversize | CPU |\n|---|---|---|---|---|---|---|---|---|---|---|\n");
    let mut idle: Vec<(Shape, Vec<(f64, f64)>)> =
        vec![(Shape::Plane, vec![]), (Shape::Chitchat, vec![])];
    let mut hops = Vec::new();
    let mut bound = Vec::new();
    let mut models = Vec::new();
    let runs = sizes
        .iter()
        .map(|n| (Shape::Plane, *n))
        .chain(before.iter().map(|n| (Shape::Chitchat, *n)));
    let opt = |v: Option<f64>| v.map(|v| format!("{v:.0}")).unwrap_or_default();
    for (shape, n) in runs {
        let cpu = Instant::now();
        let full = shape == Shape::Plane && n <= full_idle_up_to;
        let r = rt.block_on(scenarios::convergence(n, seed, shape, full))?;
        let cpu = cpu.elapsed().as_secs_f64();
        eprintln!(
            "convergence {} n={n}: {:.2} s ({:.1} rounds), idle {} (model {:.0}) B/s/node, cpu {cpu:.1} s",
            shape.as_str(),
            r.convergence_s,
            r.rounds,
            opt(r.idle_bytes_per_node_s),
            r.idle_model,
        );
        csv.push_str(&format!(
            "{},{n},{:.3},{:.3},{:.2},{},{:.0},{:.0},{},{},{:.0},{:.0},{:.0},{:.0},{},{},{},{cpu:.1}\n",
            shape.as_str(),
            r.formation_s,
            r.convergence_s,
            r.rounds,
            r.lower_bound_rounds,
            r.settle_s,
            r.idle_window_s,
            opt(r.idle_bytes_per_node_s),
            opt(r.idle_frame_bytes_per_node_s),
            r.probe_bytes_per_node_s,
            r.exchange_bytes,
            r.idle_model,
            r.change_bytes,
            r.max_message_bytes,
            r.max_frame_bytes,
            r.oversize_messages
        ));
        let measured = match (r.idle_bytes_per_node_s, r.idle_frame_bytes_per_node_s) {
            (Some(a), Some(f)) => format!("{a:.0} ({f:.0}) over {:.0} s", r.idle_window_s),
            _ if shape == Shape::Chitchat => "= model".into(),
            _ => "not run".into(),
        };
        md.push_str(&format!(
            "| {} | {n} | {:.1} ({:.2} s) | {} | {measured} | {:.0} | {:.0} B | {:.0} ({:.0}) | {} B | {} | {cpu:.1} s |\n",
            if shape == Shape::Plane { "plane" } else { "before" },
            r.rounds,
            r.convergence_s,
            r.lower_bound_rounds,
            r.idle_model,
            r.exchange_bytes,
            r.change_bytes,
            r.change_bytes / n as f64,
            r.max_frame_bytes,
            r.oversize_messages
        ));
        if let Some((_, pts)) = idle.iter_mut().find(|(s, _)| *s == shape) {
            pts.push((n as f64, r.idle_bytes_per_node_s.unwrap_or(r.idle_model)));
        }
        if shape == Shape::Plane {
            hops.push((n as f64, r.rounds));
            bound.push((n as f64, f64::from(r.lower_bound_rounds)));
        }
        if shape == Shape::Plane {
            models.push((
                n as f64,
                r.probe_bytes_per_node_s,
                r.exchange_bytes,
                r.max_frame_bytes as f64,
            ));
        }
    }
    std::fs::write(out.join("convergence.csv"), csv)?;
    let svg = line_chart(
        "Service change: push hops until every node knows",
        "nodes (log scale)",
        "hops (100 ms each)",
        true,
        &[
            Series {
                name: "meshnode (pushes)".into(),
                points: hops,
                dashed: false,
            },
            Series {
                name: "lower bound log(f+1) N, f = ln N + 4".into(),
                points: bound,
                dashed: true,
            },
        ],
    );
    std::fs::write(out.join("convergence.svg"), svg)?;
    let svg = line_chart(
        "Idle gossip per node (measured, else model)",
        "nodes (log scale)",
        "bytes per second on the wire",
        true,
        &[
            Series {
                name: "meshnode (probes, paced anti-entropy)".into(),
                points: idle[0].1.clone(),
                dashed: false,
            },
            Series {
                name: "before (chitchat every 250 ms)".into(),
                points: idle[1].1.clone(),
                dashed: true,
            },
        ],
    );
    std::fs::write(out.join("idle.svg"), svg)?;
    md.push_str("\nPlots: `convergence.svg`, `idle.svg`.\n\n");
    md.push_str(&extrapolate(&models));
    Ok(md)
}

/// Least squares y = a + b x.
fn fit(points: &[(f64, f64)]) -> (f64, f64) {
    let k = points.len() as f64;
    let (sx, sy) = points
        .iter()
        .fold((0.0, 0.0), |(a, b), (x, y)| (a + x, b + y));
    let (mx, my) = (sx / k, sy / k);
    let sxx: f64 = points.iter().map(|(x, _)| (x - mx).powi(2)).sum();
    let sxy: f64 = points.iter().map(|(x, y)| (x - mx) * (y - my)).sum();
    let b = if sxx > 0.0 { sxy / sxx } else { 0.0 };
    (my - b * mx, b)
}

/// Extrapolates the idle cost per node to 5,000 and 10,000 from the
/// measured curve: probes (flat in N: their mean), plus one exchange per
/// idle interval, with the exchange's size fitted linearly in N (a digest
/// and heartbeats of every member); and the largest frame, against the
/// frame limit (chitchat 0.11 sends a digest whole, in one message).
fn extrapolate(models: &[(f64, f64, f64, f64)]) -> String {
    if models.len() < 2 {
        return "Extrapolation needs two sizes.\n\n".into();
    }
    let probes = models.iter().map(|m| m.1).sum::<f64>() / models.len() as f64;
    let (a, b) = fit(&models.iter().map(|m| (m.0, m.2)).collect::<Vec<_>>());
    let (fa, fb) = fit(&models.iter().map(|m| (m.0, m.3)).collect::<Vec<_>>());
    let mut md = format!(
        "Extrapolation from the measured curve: probes {probes:.0} B/s per node (flat in N), one exchange = {a:.0} + {b:.1} N bytes (least squares over N = {}), one exchange per node per idle interval (300 s above N = 300); largest frame = {fa:.0} + {fb:.1} N bytes, limit {} B.\n\n| N | idle B/s per node | largest frame | fits one frame |\n|---|---|---|---|\n",
        models
            .iter()
            .map(|m| format!("{:.0}", m.0))
            .collect::<Vec<_>>()
            .join(", "),
        meshnode_simulations::MAX_FRAME
    );
    for n in [1000.0, 5000.0, 10000.0] {
        let interval = scenarios::idle_interval(n as usize).as_secs_f64();
        let frame = fa + fb * n;
        md.push_str(&format!(
            "| {n:.0} | {:.0} | {frame:.0} B | {} |\n",
            probes + (a + b * n) / interval,
            if frame <= meshnode_simulations::MAX_FRAME as f64 {
                "yes"
            } else {
                "no: the digest must be split"
            }
        ));
    }
    md.push('\n');
    md
}

fn detection(
    rt: &tokio::runtime::Runtime,
    n: usize,
    losses: &[u32],
    window: Duration,
    seed: u64,
    out: &Path,
) -> anyhow::Result<String> {
    let mut csv = String::from("n,loss_pct,window_s,false_failures,detection_s,dropped\n");
    let mut md = format!("## Failure detection vs loss ({n} nodes, {} s under loss, then kill one)\n\n| loss | false failures (observer-polls) | detection by all |\n|---|---|---|\n", window.as_secs());
    let mut det = Vec::new();
    for &l in losses {
        let r = rt.block_on(scenarios::detection(
            n,
            f64::from(l) / 100.0,
            window,
            seed,
            Shape::Plane,
        ))?;
        eprintln!(
            "detection loss={l}%: {:?} s, false failures {}",
            r.detection_s, r.false_failures
        );
        csv.push_str(&format!(
            "{n},{l},{:.0},{},{},{}\n",
            r.window_s,
            r.false_failures,
            r.detection_s.map(|d| format!("{d:.3}")).unwrap_or_default(),
            r.dropped
        ));
        md.push_str(&format!(
            "| {l}% | {} | {} |\n",
            r.false_failures,
            r.detection_s
                .map(|d| format!("{d:.2} s"))
                .unwrap_or_else(|| "not within 60 s".into())
        ));
        if let Some(d) = r.detection_s {
            det.push((f64::from(l), d));
        }
    }
    std::fs::write(out.join("detection.csv"), csv)?;
    let svg = line_chart(
        "kill -9: seconds until every node drops it",
        "packet loss (%)",
        "seconds",
        false,
        &[Series {
            name: "meshnode (SWIM + Lifeguard)".into(),
            points: det,
            dashed: false,
        }],
    );
    std::fs::write(out.join("detection.svg"), svg)?;
    md.push_str("\nPlot: `detection.svg`.\n\n");
    Ok(md)
}

fn partition(
    rt: &tokio::runtime::Runtime,
    n: usize,
    split: Duration,
    seed: u64,
    out: &Path,
) -> anyhow::Result<String> {
    let r = rt.block_on(scenarios::partition(n, split, seed, Shape::Plane))?;
    let f = secs_or_never;
    std::fs::write(
        out.join("partition.csv"),
        format!(
            "n,split_s,each_side_sees_half_s,reconverge_s\n{n},{:.0},{},{}\n",
            r.split_s,
            f(r.each_side_sees_half_s),
            f(r.reconverge_s)
        ),
    )?;
    Ok(format!(
        "## Partition into halves ({n} nodes, {:.0} s)\n\nEach side dropped the other after {} s; after the heal every node listed all {n} again in {} s.\n\n",
        r.split_s,
        f(r.each_side_sees_half_s),
        f(r.reconverge_s)
    ))
}

/// Seconds with two decimals, or "never" for a scenario step that did not happen.
fn secs_or_never(v: Option<f64>) -> String {
    v.map(|d| format!("{d:.2}"))
        .unwrap_or_else(|| "never".into())
}

fn federated(
    rt: &tokio::runtime::Runtime,
    clusters: usize,
    per_cluster: usize,
    losses: &[u32],
    seed: u64,
    out: &Path,
) -> anyhow::Result<String> {
    let f = |v: Option<f64>| {
        v.map(|d| format!("{d:.2} s"))
            .unwrap_or_else(|| "never".into())
    };
    let mut csv = String::from("clusters,per_cluster,loss_pct,formation_s,change_s,bytes_per_node_s,false_failures,detection_s,cpu_s\n");
    let mut md = format!("## Federation: {clusters} clusters x {per_cluster} nodes, one gateway each in a WAN pool\n\nChange: a new service on a node of cluster 0 until every gateway's WAN view lists it (LAN push, the gateway's summary, WAN push; 100 ms per message). Bytes: all LAN and WAN gossip on the wire per node, over 60 s after formation, under the loss. Detection: kill of cluster 1's gateway until its cluster and every other gateway dropped it.\n\n| loss | formation | change seen by all gateways | B/s per node | false failures (polls) | gateway kill seen by all | CPU |\n|---|---|---|---|---|---|---|\n");
    for &l in losses {
        let cpu = Instant::now();
        let r = rt.block_on(scenarios::federated(
            clusters,
            per_cluster,
            f64::from(l) / 100.0,
            seed,
        ))?;
        let cpu = cpu.elapsed().as_secs_f64();
        eprintln!("federated {clusters}x{per_cluster} loss={l}%: {r:?}, cpu {cpu:.1} s");
        let g = |v: Option<f64>| v.map(|d| format!("{d:.3}")).unwrap_or_default();
        csv.push_str(&format!(
            "{clusters},{per_cluster},{l},{},{},{:.0},{},{},{cpu:.1}\n",
            g(r.formation_s),
            g(r.change_s),
            r.bytes_per_node_s,
            r.false_failures,
            g(r.detection_s)
        ));
        md.push_str(&format!(
            "| {l}% | {} | {} | {:.0} | {} | {} | {cpu:.0} s |\n",
            f(r.formation_s),
            f(r.change_s),
            r.bytes_per_node_s,
            r.false_failures,
            f(r.detection_s)
        ));
    }
    std::fs::write(out.join("federated.csv"), csv)?;
    md.push('\n');
    Ok(md)
}

fn federation(
    rt: &tokio::runtime::Runtime,
    clusters: usize,
    seed: u64,
    out: &Path,
) -> anyhow::Result<String> {
    let r = rt.block_on(scenarios::federation(clusters, seed))?;
    let f = secs_or_never;
    std::fs::write(
        out.join("federation.csv"),
        format!(
            "clusters,summaries_everywhere_s,change_everywhere_s,idle_bytes_per_gateway_s\n{clusters},{},{},{:.0}\n",
            f(r.summaries_everywhere_s),
            f(r.change_everywhere_s),
            r.idle_bytes_per_gateway_s
        ),
    )?;
    Ok(format!(
        "## Federation across {clusters} clusters (one gateway each, WAN pool)\n\nEvery gateway's WAN view listed all {clusters} clusters with their summaries {} s after start; one cluster's summary change reached every gateway in {} s; idle WAN gossip {:.0} B/s per gateway.\n\n",
        f(r.summaries_everywhere_s),
        f(r.change_everywhere_s),
        r.idle_bytes_per_gateway_s
    ))
}

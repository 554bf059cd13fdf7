//! `meshnode-sim`: runs the gossip scenarios in virtual time and writes CSV,
//! SVG plots and a short report.
//!
//! ```sh
//! cargo run --release -p meshnode-simulations -- all --out simulations/out
//! cargo run --release -p meshnode-simulations -- convergence --sizes 100,1000
//! ```

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use meshnode_simulations::plot::{line_chart, Series};
use meshnode_simulations::{lower_bound_rounds, runtime, scenarios};

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
    /// Convergence of a service change vs pool size.
    Convergence {
        #[arg(long, value_delimiter = ',', default_value = "10,30,100,300,1000")]
        sizes: Vec<usize>,
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
    let mut report = format!("# meshnode gossip simulation\n\nseed {seed}; 250 ms rounds, fanout 3, phi 8 (meshnode's defaults).\n\n");
    let all = matches!(cli.cmd, Cmd::All);
    if let Cmd::Convergence { sizes } = &cli.cmd {
        report.push_str(&convergence(&rt, sizes, seed, &cli.out)?);
    } else if all {
        report.push_str(&convergence(
            &rt,
            &[10, 30, 100, 300, 1000],
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
            50,
            &[0, 10, 20, 30, 40],
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
            50,
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
    std::fs::write(cli.out.join("report.md"), &report)?;
    println!("\n{report}wrote {}", cli.out.join("report.md").display());
    Ok(())
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
    seed: u64,
    out: &Path,
) -> anyhow::Result<String> {
    let mut csv = String::from("n,formation_s,convergence_s,rounds,lower_bound_rounds,idle_wire_bytes_per_node_s,idle_raw_bytes_per_node_s,max_message_bytes,max_frame_bytes,oversize_messages,cpu_s\n");
    let mut md = String::from("## Convergence of a service change\n\n| N | rounds (time) | lower bound ceil(log4 N) | ratio | idle B/s per node, wire (raw) | largest message, frame (raw) | oversize | CPU |\n|---|---|---|---|---|---|---|---|\n");
    let mut measured = Vec::new();
    let mut bound = Vec::new();
    for &n in sizes {
        let cpu = Instant::now();
        let r = rt.block_on(scenarios::convergence(n, seed))?;
        let cpu = cpu.elapsed().as_secs_f64();
        eprintln!(
            "convergence n={n}: {:.2} s ({:.1} rounds), cpu {cpu:.1} s",
            r.convergence_s, r.rounds
        );
        csv.push_str(&format!(
            "{n},{:.3},{:.3},{:.2},{},{:.0},{:.0},{},{},{},{cpu:.1}\n",
            r.formation_s,
            r.convergence_s,
            r.rounds,
            r.lower_bound_rounds,
            r.idle_bytes_per_node_s,
            r.idle_raw_bytes_per_node_s,
            r.max_message_bytes,
            r.max_frame_bytes,
            r.oversize_messages
        ));
        md.push_str(&format!(
            "| {n} | {:.1} ({:.2} s) | {} | {:.1}x | {:.0} ({:.0}) | {} B ({} B) | {} | {cpu:.1} s |\n",
            r.rounds,
            r.convergence_s,
            r.lower_bound_rounds,
            r.rounds / f64::from(r.lower_bound_rounds.max(1)),
            r.idle_bytes_per_node_s,
            r.idle_raw_bytes_per_node_s,
            r.max_frame_bytes,
            r.max_message_bytes,
            r.oversize_messages
        ));
        measured.push((n as f64, r.rounds));
        bound.push((n as f64, f64::from(lower_bound_rounds(n, 3))));
    }
    std::fs::write(out.join("convergence.csv"), csv)?;
    let svg = line_chart(
        "Service change: rounds until every node knows",
        "nodes (log scale)",
        "gossip rounds (250 ms)",
        true,
        &[
            Series {
                name: "meshnode (chitchat)".into(),
                points: measured,
                dashed: false,
            },
            Series {
                name: "lower bound log4 N".into(),
                points: bound,
                dashed: true,
            },
        ],
    );
    std::fs::write(out.join("convergence.svg"), svg)?;
    md.push_str("\nPlot: `convergence.svg`.\n\n");
    Ok(md)
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
        let r = rt.block_on(scenarios::detection(n, f64::from(l) / 100.0, window, seed))?;
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
            name: "meshnode (chitchat)".into(),
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
    let r = rt.block_on(scenarios::partition(n, split, seed))?;
    let f = |v: Option<f64>| {
        v.map(|d| format!("{d:.2}"))
            .unwrap_or_else(|| "never".into())
    };
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

fn federation(
    rt: &tokio::runtime::Runtime,
    clusters: usize,
    seed: u64,
    out: &Path,
) -> anyhow::Result<String> {
    let r = rt.block_on(scenarios::federation(clusters, seed))?;
    let f = |v: Option<f64>| {
        v.map(|d| format!("{d:.2}"))
            .unwrap_or_else(|| "never".into())
    };
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

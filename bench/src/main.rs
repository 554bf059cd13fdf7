//! `meshnode-bench`: the request/response tool of `bench/dataplane.sh`.
//!
//! - `meshnode-bench rr-server ADDR`: answers every SIZE-byte request with SIZE bytes.
//! - `meshnode-bench rr ADDR [COUNT] [SIZE] [WARMUP]`: COUNT sequential round trips on
//!   one connection (after WARMUP), prints `p50_us p99_us p999_us` of the round-trip time.
//! - `meshnode-bench conn ADDR [COUNT] [SIZE]`: COUNT sequential new connections, one
//!   round trip each, prints `conn_per_s p50_us p99_us` of connect + first round trip.
//!
//! Blocking std sockets with TCP_NODELAY: the tool adds the same small cost to every path.
// A measuring crate: it reads wall and virtual clocks itself (the
// disallowed-methods rule of clippy.toml is for the mesh's own code).
#![allow(clippy::disallowed_methods)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Instant;

use anyhow::{bail, Context};

const DEFAULT_SIZE: usize = 64;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("rr-server") => {
            let addr = parse_addr(args.get(1))?;
            let size = parse_or(args.get(2), DEFAULT_SIZE)?;
            rr_server(addr, size)
        }
        Some("rr") => {
            let addr = parse_addr(args.get(1))?;
            let count = parse_or(args.get(2), 10_000)?;
            let size = parse_or(args.get(3), DEFAULT_SIZE)?;
            let warmup = parse_or(args.get(4), 500)?;
            let (p50, p99, p999) = rr(addr, count, size, warmup)?;
            println!("{p50:.1} {p99:.1} {p999:.1}");
            Ok(())
        }
        Some("conn") => {
            let addr = parse_addr(args.get(1))?;
            let count = parse_or(args.get(2), 1_000)?;
            let size = parse_or(args.get(3), DEFAULT_SIZE)?;
            let (rate, p50, p99) = conn(addr, count, size)?;
            println!("{rate:.0} {p50:.1} {p99:.1}");
            Ok(())
        }
        Some("hold") => {
            let addr = parse_addr(args.get(1))?;
            let count = parse_or(args.get(2), 10_000)?;
            let secs = parse_or(args.get(3), 10)?;
            hold(addr, count, secs)
        }
        Some("soak") => {
            let addr = parse_addr(args.get(1))?;
            let count = parse_or(args.get(2), 10_000)?;
            let secs = parse_or(args.get(3), 600)?;
            soak(addr, count, secs)
        }
        _ => bail!("usage: meshnode-bench rr-server ADDR [SIZE] | rr ADDR [COUNT] [SIZE] [WARMUP] | hold ADDR [COUNT] [SECONDS] | soak ADDR [COUNT] [SECONDS]"),
    }
}

fn parse_addr(s: Option<&String>) -> anyhow::Result<SocketAddr> {
    s.context("missing ADDR")?
        .parse()
        .context("ADDR must be IP:PORT")
}

fn parse_or(s: Option<&String>, default: usize) -> anyhow::Result<usize> {
    match s {
        None => Ok(default),
        Some(v) => v.parse().with_context(|| format!("{v:?} is not a number")),
    }
}

fn rr_server(addr: SocketAddr, size: usize) -> anyhow::Result<()> {
    let l = TcpListener::bind(addr).with_context(|| format!("binding {addr}"))?;
    for conn in l.incoming() {
        let Ok(mut s) = conn else { continue };
        // Small stacks: `hold` keeps thousands of connections open at once.
        let _ = std::thread::Builder::new()
            .stack_size(64 * 1024)
            .spawn(move || {
                let _ = s.set_nodelay(true);
                let mut buf = vec![0u8; size];
                while s.read_exact(&mut buf).is_ok() {
                    if s.write_all(&buf).is_err() {
                        break;
                    }
                }
            });
    }
    Ok(())
}

/// Opens `count` connections through `addr` (an upstream to an rr-server of
/// 1-byte messages), checks each with one round trip, holds them all for
/// `secs`, checks each again. Prints `opened ok_after_hold errors` and, on
/// stderr, progress; the caller reads the nodes' RSS while they are held.
/// New connections one after the other, each with one round trip: the
/// setup cost of the path (for a mesh: picking an instance, the tunnel
/// stream, and any session inside it).
fn conn(addr: SocketAddr, count: usize, size: usize) -> anyhow::Result<(f64, f64, f64)> {
    let req = vec![7u8; size];
    let mut resp = vec![0u8; size];
    let mut times = Vec::with_capacity(count);
    let all = Instant::now();
    for i in 0..count {
        let t = Instant::now();
        let mut s = TcpStream::connect(addr).with_context(|| format!("connect {addr}"))?;
        s.set_nodelay(true)?;
        s.write_all(&req)?;
        s.read_exact(&mut resp)
            .with_context(|| format!("connection {i}: no answer"))?;
        times.push(t.elapsed().as_secs_f64() * 1e6);
    }
    let rate = count as f64 / all.elapsed().as_secs_f64();
    times.sort_by(f64::total_cmp);
    let at = |q: f64| times[((times.len() as f64 * q) as usize).min(times.len() - 1)];
    Ok((rate, at(0.5), at(0.99)))
}

fn hold(addr: SocketAddr, count: usize, secs: usize) -> anyhow::Result<()> {
    let (mut conns, errors, first_error) = open_checked(addr, count, true);
    println!("HELD {} {errors}", conns.len());
    std::thread::sleep(std::time::Duration::from_secs(secs as u64));
    let mut ok = 0;
    for s in &mut conns {
        let mut b = [0u8; 1];
        if s.write_all(&[2]).is_ok() && s.read_exact(&mut b).is_ok() {
            ok += 1;
        }
    }
    println!("{} {ok} {errors}", conns.len());
    if let Some(e) = first_error {
        eprintln!("first error: {e}");
    }
    Ok(())
}

/// Opens `count` connections like [`hold`], then for `secs` keeps traffic on
/// all of them: round after round, one 1-byte round trip on every
/// connection. Prints `HELD n errors` once open, a line `t rounds errors` every
/// 30 s (the caller samples RSS meanwhile), and `DONE rounds round_trips errors`.
fn soak(addr: SocketAddr, count: usize, secs: usize) -> anyhow::Result<()> {
    let (mut conns, mut errors, mut first_error) = open_checked(addr, count, false);
    println!("HELD {} {errors}", conns.len());
    let start = Instant::now();
    let until = std::time::Duration::from_secs(secs as u64);
    let mut next_report = 30u64;
    let (mut rounds, mut trips) = (0u64, 0u64);
    while start.elapsed() < until {
        for (i, s) in conns.iter_mut().enumerate() {
            let mut b = [0u8; 1];
            match s.write_all(&[3]).and_then(|()| s.read_exact(&mut b)) {
                Ok(()) => trips += 1,
                Err(e) => {
                    errors += 1;
                    first_error
                        .get_or_insert_with(|| format!("round {rounds}, connection {i}: {e}"));
                }
            }
        }
        rounds += 1;
        let t = start.elapsed().as_secs();
        if t >= next_report {
            println!("{t} {rounds} {errors}");
            next_report += 30;
        }
    }
    println!("DONE {rounds} {trips} {errors}");
    if let Some(e) = first_error {
        eprintln!("first error: {e}");
    }
    Ok(())
}

/// Opens `count` connections to `addr`, each checked with a 1-byte round
/// trip. Returns them, the errors and the first error's text.
fn open_checked(
    addr: SocketAddr,
    count: usize,
    progress: bool,
) -> (Vec<TcpStream>, usize, Option<String>) {
    let mut conns = Vec::with_capacity(count);
    let mut errors = 0usize;
    let mut first_error = None;
    let start = Instant::now();
    for i in 0..count {
        let r = (|| -> anyhow::Result<TcpStream> {
            let mut s = TcpStream::connect(addr)?;
            s.set_read_timeout(Some(std::time::Duration::from_secs(20)))?;
            s.set_nodelay(true)?;
            s.write_all(&[1])?;
            let mut b = [0u8; 1];
            s.read_exact(&mut b)?;
            Ok(s)
        })();
        match r {
            Ok(s) => conns.push(s),
            Err(e) => {
                errors += 1;
                first_error.get_or_insert_with(|| format!("connection {i}: {e:#}"));
            }
        }
        if progress && (i + 1) % 1000 == 0 {
            eprintln!(
                "  {} open, {errors} errors, {:.1} s",
                conns.len(),
                start.elapsed().as_secs_f64()
            );
        }
    }
    (conns, errors, first_error)
}

/// Round-trip percentiles in microseconds.
fn rr(
    addr: SocketAddr,
    count: usize,
    size: usize,
    warmup: usize,
) -> anyhow::Result<(f64, f64, f64)> {
    if count == 0 {
        bail!("COUNT must be at least 1");
    }
    let mut s = TcpStream::connect(addr).with_context(|| format!("connecting to {addr}"))?;
    s.set_nodelay(true)?;
    let req = vec![0x5au8; size];
    let mut resp = vec![0u8; size];
    let mut samples = Vec::with_capacity(count);
    for i in 0..warmup + count {
        let t = Instant::now();
        s.write_all(&req)?;
        s.read_exact(&mut resp).context("reading the response")?;
        if i >= warmup {
            samples.push(t.elapsed().as_secs_f64() * 1e6);
        }
    }
    samples.sort_by(f64::total_cmp);
    let pct = |p: f64| {
        let i = ((samples.len() as f64 * p).ceil() as usize).clamp(1, samples.len()) - 1;
        samples[i]
    };
    Ok((pct(0.50), pct(0.99), pct(0.999)))
}

//! `meshnode top`: two snapshots of `GET /v1/top` an interval apart turned
//! into rates, errors and latency quantiles per caller and callee (pure:
//! [`frame`]), drawn again every interval.

use std::io::{IsTerminal, Write};
use std::time::Duration;

use serde::Deserialize;
use serde_json::{json, Value};

use super::admin::get;
use super::AdminArgs;
use crate::output::table;
use crate::Failure;

#[derive(Clone, Debug, Deserialize)]
pub struct Snapshot {
    pub node: String,
    pub uptime_ms: u64,
    pub latency_bounds: Vec<f64>,
    pub pairs: Vec<Pair>,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct Pair {
    pub direction: String,
    pub kind: String,
    pub source_service: String,
    pub source_cluster: String,
    pub destination_service: String,
    pub destination_cluster: String,
    pub total: u64,
    pub errors: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub latency_buckets: Vec<u64>,
}

impl Pair {
    fn same(&self, o: &Pair) -> bool {
        (
            &self.direction,
            &self.kind,
            &self.source_service,
            &self.source_cluster,
            &self.destination_service,
            &self.destination_cluster,
        ) == (
            &o.direction,
            &o.kind,
            &o.source_service,
            &o.source_cluster,
            &o.destination_service,
            &o.destination_cluster,
        )
    }
}

/// One pair over one interval.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    pub source: String,
    pub destination: String,
    pub direction: String,
    pub kind: String,
    /// Requests (HTTP) or connections (TCP) ended per second.
    pub rate: f64,
    /// Share of them that were errors, 0..=1.
    pub error_share: f64,
    /// Seconds; `None` without data, `INFINITY` above the last bound.
    pub p50: Option<f64>,
    pub p99: Option<f64>,
    pub sent_per_sec: f64,
    pub received_per_sec: f64,
}

/// The `q` quantile of bucket counts with upper `bounds` (one more count
/// for above the last), linear within a bucket.
pub fn quantile(bounds: &[f64], counts: &[u64], q: f64) -> Option<f64> {
    let total: u64 = counts.iter().sum();
    if total == 0 {
        return None;
    }
    let rank = q * total as f64;
    let mut seen = 0u64;
    for (i, c) in counts.iter().enumerate() {
        if *c == 0 {
            continue;
        }
        if (seen + c) as f64 >= rank {
            let Some(hi) = bounds.get(i) else {
                return Some(f64::INFINITY);
            };
            let lo = if i == 0 { 0.0 } else { bounds[i - 1] };
            let within = ((rank - seen as f64) / *c as f64).clamp(0.0, 1.0);
            return Some(lo + (hi - lo) * within);
        }
        seen += c;
    }
    Some(f64::INFINITY)
}

/// The rows of the interval between two snapshots, busiest first: pairs
/// with traffic in it. A counter that went down (the agent restarted)
/// counts from zero.
pub fn frame(prev: &Snapshot, cur: &Snapshot) -> Vec<Row> {
    let restarted = cur.uptime_ms < prev.uptime_ms;
    let ms = if restarted {
        cur.uptime_ms
    } else {
        cur.uptime_ms - prev.uptime_ms
    };
    let secs = ms.max(1) as f64 / 1000.0;
    let mut rows: Vec<Row> = cur
        .pairs
        .iter()
        .filter_map(|p| {
            let before = prev
                .pairs
                .iter()
                .find(|o| o.same(p))
                .filter(|o| !restarted && o.total <= p.total);
            let d = |now: u64, then: Option<u64>| now.saturating_sub(then.unwrap_or(0));
            let total = d(p.total, before.map(|b| b.total));
            if total == 0 {
                return None;
            }
            let errors = d(p.errors, before.map(|b| b.errors));
            let buckets: Vec<u64> = p
                .latency_buckets
                .iter()
                .enumerate()
                .map(|(i, c)| d(*c, before.and_then(|b| b.latency_buckets.get(i).copied())))
                .collect();
            Some(Row {
                source: format!("{}@{}", p.source_service, p.source_cluster),
                destination: format!("{}@{}", p.destination_service, p.destination_cluster),
                direction: p.direction.clone(),
                kind: p.kind.clone(),
                rate: total as f64 / secs,
                error_share: errors as f64 / total as f64,
                p50: quantile(&cur.latency_bounds, &buckets, 0.5),
                p99: quantile(&cur.latency_bounds, &buckets, 0.99),
                sent_per_sec: d(p.bytes_sent, before.map(|b| b.bytes_sent)) as f64 / secs,
                received_per_sec: d(p.bytes_received, before.map(|b| b.bytes_received)) as f64
                    / secs,
            })
        })
        .collect();
    rows.sort_by(|a, b| {
        b.rate
            .total_cmp(&a.rate)
            .then_with(|| a.source.cmp(&b.source))
            .then_with(|| a.destination.cmp(&b.destination))
    });
    rows
}

fn latency(s: Option<f64>) -> String {
    match s {
        None => "-".into(),
        Some(s) if s.is_infinite() => "> 2 s".into(),
        Some(s) if s < 0.001 => format!("{:.0} us", s * 1e6),
        Some(s) if s < 1.0 => format!("{:.1} ms", s * 1e3),
        Some(s) => format!("{s:.2} s"),
    }
}

fn bytes(per_sec: f64) -> String {
    match per_sec {
        b if b >= 1e6 => format!("{:.1} MB", b / 1e6),
        b if b >= 1e3 => format!("{:.1} kB", b / 1e3),
        b => format!("{b:.0} B"),
    }
}

/// A frame as text: a title line, then the table.
pub fn render(node: &str, interval: Duration, rows: &[Row], limit: usize) -> String {
    let mut out = format!(
        "meshnode top: node {node}, every {} (Ctrl-C quits)\n\n",
        humantime::format_duration(interval)
    );
    if rows.is_empty() {
        out.push_str("no traffic through this node in the last interval\n");
        return out;
    }
    let cells: Vec<Vec<String>> = rows
        .iter()
        .take(limit)
        .map(|r| {
            vec![
                r.source.clone(),
                r.destination.clone(),
                r.direction.clone(),
                r.kind.clone(),
                format!("{:.1}", r.rate),
                format!("{:.1} %", r.error_share * 100.0),
                latency(r.p50),
                latency(r.p99),
                bytes(r.sent_per_sec),
                bytes(r.received_per_sec),
            ]
        })
        .collect();
    out.push_str(&table(
        &[
            "SOURCE",
            "DESTINATION",
            "DIR",
            "KIND",
            "PER SEC",
            "ERRORS",
            "P50",
            "P99",
            "SENT/S",
            "RECV/S",
        ],
        &cells,
    ));
    out.push('\n');
    out
}

fn as_json(node: &str, rows: &[Row], limit: usize) -> Value {
    let finite = |v: Option<f64>| v.filter(|x| x.is_finite());
    json!({
        "node": node,
        "rows": rows.iter().take(limit).map(|r| json!({
            "source": r.source,
            "destination": r.destination,
            "direction": r.direction,
            "kind": r.kind,
            "per_second": r.rate,
            "error_share": r.error_share,
            "p50_seconds": finite(r.p50),
            "p99_seconds": finite(r.p99),
            "p99_above_buckets": r.p99.is_some_and(f64::is_infinite),
            "sent_per_second": r.sent_per_sec,
            "received_per_second": r.received_per_sec,
        })).collect::<Vec<_>>(),
    })
}

async fn snapshot(a: &AdminArgs) -> Result<Snapshot, Failure> {
    let v = get(a, "/v1/top").await?;
    serde_json::from_value(v).map_err(|e| {
        Failure::runtime(anyhow::anyhow!(
            "the admin API answered /v1/top with an unexpected shape: {e}"
        ))
    })
}

pub async fn run(
    a: &AdminArgs,
    interval: Duration,
    count: Option<u32>,
    rows: usize,
) -> Result<(), Failure> {
    if interval < Duration::from_millis(100) {
        return Err(Failure::usage(anyhow::anyhow!(
            "--interval {}: use at least 100ms",
            humantime::format_duration(interval)
        )));
    }
    let live = std::io::stdout().is_terminal() && !a.json;
    let mut prev = snapshot(a).await?;
    let mut shown = 0u32;
    while count.is_none_or(|c| shown < c) {
        tokio::time::sleep(interval).await;
        let cur = snapshot(a).await?;
        let f = frame(&prev, &cur);
        let mut out = std::io::stdout().lock();
        let written = if a.json {
            writeln!(out, "{}", as_json(&cur.node, &f, rows))
        } else if live {
            // Home and clear, then the frame: redrawn in place.
            write!(
                out,
                "\x1b[H\x1b[2J{}",
                render(&cur.node, interval, &f, rows)
            )
        } else {
            writeln!(out, "{}", render(&cur.node, interval, &f, rows))
        };
        // A closed pipe (`| head`) ends the view quietly.
        if written.and_then(|()| out.flush()).is_err() {
            return Ok(());
        }
        prev = cur;
        shown += 1;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOUNDS: [f64; 3] = [0.001, 0.01, 0.1];

    fn pair(src: &str, total: u64, errors: u64, buckets: [u64; 4]) -> Pair {
        Pair {
            direction: "out".into(),
            kind: "http".into(),
            source_service: src.into(),
            source_cluster: "east".into(),
            destination_service: "api".into(),
            destination_cluster: "east".into(),
            total,
            errors,
            bytes_sent: 0,
            bytes_received: 0,
            latency_buckets: buckets.to_vec(),
        }
    }

    fn snap(ms: u64, pairs: Vec<Pair>) -> Snapshot {
        Snapshot {
            node: "a".into(),
            uptime_ms: ms,
            latency_bounds: BOUNDS.to_vec(),
            pairs,
        }
    }

    #[test]
    fn quantiles_interpolate_within_a_bucket_and_say_when_above_the_last() {
        assert_eq!(quantile(&BOUNDS, &[0, 0, 0, 0], 0.5), None);
        // 100 samples in (1 ms, 10 ms]: the median halfway.
        let p50 = quantile(&BOUNDS, &[0, 100, 0, 0], 0.5).unwrap();
        assert!((p50 - 0.0055).abs() < 1e-9, "{p50}");
        assert_eq!(
            quantile(&BOUNDS, &[99, 0, 0, 1], 0.999),
            Some(f64::INFINITY)
        );
        let p99 = quantile(&BOUNDS, &[99, 0, 1, 0], 0.99).unwrap();
        assert!(p99 <= 0.001, "{p99}");
    }

    #[test]
    fn a_frame_is_the_interval_busiest_first_without_idle_pairs() {
        let prev = snap(
            1_000,
            vec![
                pair("web", 100, 0, [100, 0, 0, 0]),
                pair("batch", 50, 0, [50, 0, 0, 0]),
            ],
        );
        let cur = snap(
            3_000,
            vec![
                pair("web", 120, 2, [120, 0, 0, 0]),
                pair("batch", 250, 0, [50, 200, 0, 0]),
                pair("idle", 0, 0, [0, 0, 0, 0]),
            ],
        );
        let rows = frame(&prev, &cur);
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].source, "batch@east");
        assert!((rows[0].rate - 100.0).abs() < 1e-9);
        assert!((rows[1].rate - 10.0).abs() < 1e-9);
        assert!((rows[1].error_share - 0.1).abs() < 1e-9);
        let text = render("a", Duration::from_secs(2), &rows, 20);
        let batch = text.find("batch@east").unwrap();
        let web = text.find("web@east").unwrap();
        assert!(batch < web, "{text}");
    }

    #[test]
    fn a_restarted_agent_counts_from_zero() {
        let prev = snap(60_000, vec![pair("web", 1_000, 0, [1_000, 0, 0, 0])]);
        let cur = snap(1_000, vec![pair("web", 10, 0, [10, 0, 0, 0])]);
        let rows = frame(&prev, &cur);
        assert_eq!(rows.len(), 1);
        assert!((rows[0].rate - 10.0).abs() < 1e-9, "{rows:?}");
    }
}

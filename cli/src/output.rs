//! Aligned tables for humans; `--json` prints the API's JSON instead.

/// Renders rows under headers, columns padded to the widest cell.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(cell.chars().count());
            }
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                s.push_str(&format!("{:<w$}  ", c, w = widths[i]));
            }
        }
        s.trim_end().to_string()
    };
    let mut out = line(headers.to_vec());
    for row in rows {
        out.push('\n');
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out
}

/// A JSON value as a table cell.
pub fn cell(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => "-".into(),
        serde_json::Value::Array(a) if a.is_empty() => "-".into(),
        serde_json::Value::Array(a) => a.iter().map(cell).collect::<Vec<_>>().join(","),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn columns_align() {
        let t = super::table(
            &["NODE", "STATE"],
            &[
                vec!["a-long-name".into(), "alive".into()],
                vec!["b".into(), "dead".into()],
            ],
        );
        assert_eq!(
            t,
            "NODE         STATE\na-long-name  alive\nb            dead"
        );
    }
}

/// A duration for people: "365 days", "2 days 4 h", "3 h 20 min", "45s".
/// humantime counts months of 30.44 days, so 365 days came out as
/// "11months 30days 3h 50m 24s". Seconds are dropped above an hour and
/// minutes above a day.
pub fn duration(d: std::time::Duration) -> String {
    const MIN: u64 = 60;
    const HOUR: u64 = 60 * MIN;
    const DAY: u64 = 24 * HOUR;
    let s = d.as_secs();
    let plural = |n: u64, one: &str, many: &str| format!("{n} {}", if n == 1 { one } else { many });
    if s >= DAY {
        let (days, hours) = (s / DAY, (s % DAY) / HOUR);
        match hours {
            0 => plural(days, "day", "days"),
            h => format!("{} {h} h", plural(days, "day", "days")),
        }
    } else if s >= HOUR {
        let (hours, mins) = (s / HOUR, (s % HOUR) / MIN);
        match mins {
            0 => format!("{hours} h"),
            m => format!("{hours} h {m} min"),
        }
    } else {
        humantime::format_duration(std::time::Duration::from_secs(s)).to_string()
    }
}

#[cfg(test)]
mod duration_tests {
    use std::time::Duration;

    use super::duration;

    #[test]
    fn durations_read_as_people_write_them() {
        let cases = [
            (365 * 86_400, "365 days"),
            (86_400, "1 day"),
            (2 * 86_400 + 4 * 3_600 + 59, "2 days 4 h"),
            (3_600, "1 h"),
            (3 * 3_600 + 20 * 60 + 5, "3 h 20 min"),
            (45, "45s"),
            (0, "0s"),
        ];
        for (secs, want) in cases {
            assert_eq!(duration(Duration::from_secs(secs)), want, "{secs} s");
        }
    }
}

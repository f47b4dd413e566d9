//! Results: metrics measured on several paths, the ratio of the first path
//! to the baseline, rendered as a table or a JSON document.

use serde::Serialize;
use serde_json::Value;
use std::collections::BTreeMap;
use std::fmt::Write;

/// Which direction of a metric is good.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Better {
    Higher,
    Lower,
    /// Informational: no direction (e.g. what the sender offered).
    Neither,
}

/// One measured quantity, on every path.
#[derive(Clone, Debug, Serialize)]
pub struct Metric {
    /// Stable key for scripts, e.g. `tcp_gbps`.
    pub key: String,
    /// Human label with its unit, e.g. `TCP throughput, 1 stream (Gbit/s)`.
    pub label: String,
    pub unit: String,
    pub better: Better,
    /// Decimals shown in the table.
    #[serde(skip)]
    pub decimals: usize,
    /// Value per path label; a path that has no such metric is absent.
    pub values: BTreeMap<String, f64>,
    /// `values[subject] / values[baseline]`, when both exist and the
    /// baseline is not zero.
    pub ratio: Option<f64>,
}

/// The outcome of one scenario run.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub scenario: String,
    pub description: String,
    /// UTC, RFC 3339.
    pub started_at: String,
    pub duration_s: f64,
    pub host: Value,
    pub params: Value,
    /// Path labels, in column order; the first is the subject.
    pub paths: Vec<String>,
    /// The path ratios are taken against.
    pub baseline: String,
    pub metrics: Vec<Metric>,
    /// Raw tool results and counters, per path.
    pub details: Value,
    pub notes: Vec<String>,
}

impl Report {
    pub fn new(scenario: &str, description: &str, paths: &[&str], baseline: &str) -> Report {
        Report {
            scenario: scenario.into(),
            description: description.into(),
            started_at: utc_now(),
            duration_s: 0.0,
            host: host_info(),
            params: Value::Null,
            paths: paths.iter().map(|s| s.to_string()).collect(),
            baseline: baseline.into(),
            metrics: Vec::new(),
            details: Value::Object(Default::default()),
            notes: Vec::new(),
        }
    }

    /// Record `value` of metric `key` on `path` (creating the metric the
    /// first time it is seen).
    #[allow(clippy::too_many_arguments)]
    pub fn add(
        &mut self,
        key: &str,
        label: &str,
        unit: &str,
        better: Better,
        decimals: usize,
        path: &str,
        value: f64,
    ) {
        let i = match self.metrics.iter().position(|m| m.key == key) {
            Some(i) => i,
            None => {
                self.metrics.push(Metric {
                    key: key.into(),
                    label: label.into(),
                    unit: unit.into(),
                    better,
                    decimals,
                    values: BTreeMap::new(),
                    ratio: None,
                });
                self.metrics.len() - 1
            }
        };
        let m = &mut self.metrics[i];
        m.values.insert(path.into(), value);
        let subject = &self.paths[0];
        m.ratio = match (m.values.get(subject), m.values.get(&self.baseline)) {
            (Some(s), Some(b)) if *b != 0.0 && s.is_finite() && b.is_finite() => Some(s / b),
            _ => None,
        };
    }

    /// Attach raw results under `details[path][what]`.
    pub fn detail(&mut self, path: &str, what: &str, v: impl Serialize) {
        let v = serde_json::to_value(v).unwrap_or(Value::Null);
        let d = self.details.as_object_mut().expect("details is an object");
        let p = d.entry(path.to_string()).or_insert_with(|| Value::Object(Default::default()));
        if let Some(p) = p.as_object_mut() {
            p.insert(what.into(), v);
        }
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("report serializes")
    }

    /// The table: metric | one column per path | ratio | which way is better.
    pub fn to_table(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "{}: {}", self.scenario, self.description);
        let host = &self.host;
        let _ = writeln!(
            s,
            "{} UTC, Linux {}, {} cores ({}), run took {:.0} s",
            self.started_at.trim_end_matches('Z').replace('T', " "),
            host["kernel"].as_str().unwrap_or("?"),
            host["cores"],
            host["cpu"].as_str().unwrap_or("?"),
            self.duration_s
        );
        let _ = writeln!(s, "params: {}", compact_params(&self.params));
        let _ = writeln!(s);
        let ratio_head = format!("{}/{}", self.paths[0], self.baseline);
        let w0 = self.metrics.iter().map(|m| m.label.len()).max().unwrap_or(6).max(6);
        let cols: Vec<usize> = self.paths.iter().map(|p| p.len().max(10)).collect();
        let wr = ratio_head.len().max(6);
        let _ = write!(s, "{:<w0$}", "metric");
        for (p, w) in self.paths.iter().zip(&cols) {
            let _ = write!(s, " | {p:>w$}");
        }
        let _ = writeln!(s, " | {ratio_head:>wr$} | better");
        let total = w0 + cols.iter().map(|w| w + 3).sum::<usize>() + wr + 3 + 9;
        let _ = writeln!(s, "{}", "-".repeat(total));
        for m in &self.metrics {
            let _ = write!(s, "{:<w0$}", m.label);
            for (p, w) in self.paths.iter().zip(&cols) {
                let v = match m.values.get(p) {
                    Some(v) if v.is_finite() => format!("{v:.prec$}", prec = m.decimals),
                    Some(_) => "n/a".into(),
                    None => "-".into(),
                };
                let _ = write!(s, " | {v:>w$}");
            }
            let r = m.ratio.map_or("-".into(), |r| format!("{r:.2}"));
            let better = match m.better {
                Better::Higher => "higher",
                Better::Lower => "lower",
                Better::Neither => "",
            };
            let _ = writeln!(s, " | {r:>wr$} | {better}");
        }
        if !self.notes.is_empty() {
            let _ = writeln!(s);
            for n in &self.notes {
                let _ = writeln!(s, "note: {n}");
            }
        }
        s
    }
}

fn compact_params(p: &Value) -> String {
    match p.as_object() {
        Some(o) => o
            .iter()
            .map(|(k, v)| match v {
                Value::String(s) => format!("{k}={s:?}"),
                v => format!("{k}={v}"),
            })
            .collect::<Vec<_>>()
            .join(" "),
        None => p.to_string(),
    }
}

/// Kernel release, core count and CPU model.
pub fn host_info() -> Value {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    serde_json::json!({ "kernel": kernel, "cores": cores, "cpu": cpu })
}

/// The current time, UTC, as `YYYY-MM-DDTHH:MM:SSZ`.
pub fn utc_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    format_utc(secs)
}

/// Seconds since the epoch as RFC 3339 UTC (civil-from-days, H. Hinnant).
pub fn format_utc(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        assert_eq!(format_utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(format_utc(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(format_utc(1_700_000_000), "2023-11-14T22:13:20Z");
    }

    #[test]
    fn ratios_and_table() {
        let mut r = Report::new("same-node", "test", &["ocelot", "kernel"], "kernel");
        r.add("tcp", "TCP (Gbit/s)", "Gbit/s", Better::Higher, 2, "ocelot", 10.0);
        assert_eq!(r.metrics[0].ratio, None);
        r.add("tcp", "TCP (Gbit/s)", "Gbit/s", Better::Higher, 2, "kernel", 20.0);
        assert_eq!(r.metrics[0].ratio, Some(0.5));
        r.add("rss", "RSS (MiB)", "MiB", Better::Lower, 1, "ocelot", 5.0);
        r.add("loss", "loss (%)", "%", Better::Lower, 2, "ocelot", 0.0);
        r.add("loss", "loss (%)", "%", Better::Lower, 2, "kernel", 0.0);
        let t = r.to_table();
        assert!(t.contains("10.00"), "{t}");
        assert!(t.contains("0.50"), "{t}");
        assert!(t.lines().any(|l| l.starts_with("RSS (MiB)") && l.contains(" - ")), "{t}");
        let j: Value = serde_json::from_str(&r.to_json()).unwrap();
        assert_eq!(j["metrics"][0]["ratio"], 0.5);
        assert_eq!(j["metrics"][2]["ratio"], Value::Null);
    }
}

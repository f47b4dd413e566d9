//! Results: metrics measured on several paths, the ratios of subject paths
//! to their baselines, rendered as a table or a JSON document.

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
    /// `values[subject] / values[baseline]` of the first comparison, when
    /// both exist and the baseline is not zero.
    pub ratio: Option<f64>,
    /// The same for every comparison, keyed `subject/baseline`; a ratio
    /// that cannot be taken is absent.
    pub ratios: BTreeMap<String, f64>,
}

/// A ratio column: `subject / baseline`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Comparison {
    pub subject: String,
    pub baseline: String,
}

impl Comparison {
    pub fn new(subject: &str, baseline: &str) -> Comparison {
        Comparison { subject: subject.into(), baseline: baseline.into() }
    }

    /// `subject/baseline`: the column head and the key in [`Metric::ratios`].
    pub fn name(&self) -> String {
        format!("{}/{}", self.subject, self.baseline)
    }

    fn of(&self, values: &BTreeMap<String, f64>) -> Option<f64> {
        match (values.get(&self.subject), values.get(&self.baseline)) {
            (Some(s), Some(b)) if *b != 0.0 && s.is_finite() && b.is_finite() => Some(s / b),
            _ => None,
        }
    }
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
    /// Path labels, in column order.
    pub paths: Vec<String>,
    /// The baseline of the first comparison (empty when there is none).
    pub baseline: String,
    /// The ratio columns, in order.
    pub comparisons: Vec<Comparison>,
    pub metrics: Vec<Metric>,
    /// Raw tool results and counters, per path.
    pub details: Value,
    pub notes: Vec<String>,
    /// Paths that could not be measured (their cells stay empty), and why.
    pub failures: BTreeMap<String, String>,
}

impl Report {
    /// A report whose one ratio is the first path over `baseline`.
    pub fn new(scenario: &str, description: &str, paths: &[&str], baseline: &str) -> Report {
        Report::with_comparisons(
            scenario,
            description,
            paths,
            vec![Comparison::new(paths[0], baseline)],
        )
    }

    /// A report with one ratio column per comparison (possibly none).
    pub fn with_comparisons(
        scenario: &str,
        description: &str,
        paths: &[&str],
        comparisons: Vec<Comparison>,
    ) -> Report {
        Report {
            scenario: scenario.into(),
            description: description.into(),
            started_at: utc_now(),
            duration_s: 0.0,
            host: host_info(),
            params: Value::Null,
            paths: paths.iter().map(|s| s.to_string()).collect(),
            baseline: comparisons.first().map(|c| c.baseline.clone()).unwrap_or_default(),
            comparisons,
            metrics: Vec::new(),
            details: Value::Object(Default::default()),
            notes: Vec::new(),
            failures: BTreeMap::new(),
        }
    }

    /// Record that `path` could not be measured (the first reason sticks).
    pub fn fail(&mut self, path: &str, reason: &str) {
        self.failures.entry(path.into()).or_insert_with(|| reason.into());
    }

    /// True when `path` has failed.
    pub fn failed(&self, path: &str) -> bool {
        self.failures.contains_key(path)
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
                    ratios: BTreeMap::new(),
                });
                self.metrics.len() - 1
            }
        };
        let m = &mut self.metrics[i];
        m.values.insert(path.into(), value);
        m.ratios =
            self.comparisons.iter().filter_map(|c| Some((c.name(), c.of(&m.values)?))).collect();
        m.ratio = self.comparisons.first().and_then(|c| c.of(&m.values));
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

    /// The table: metric | one column per path | one per ratio | which way
    /// is better; then the failed paths and the notes.
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
        let heads: Vec<String> = self.comparisons.iter().map(Comparison::name).collect();
        let w0 = self.metrics.iter().map(|m| m.label.len()).max().unwrap_or(6).max(6);
        let cols: Vec<usize> = self.paths.iter().map(|p| p.len().max(10)).collect();
        let wrs: Vec<usize> = heads.iter().map(|h| h.len().max(6)).collect();
        let _ = write!(s, "{:<w0$}", "metric");
        for (p, w) in self.paths.iter().zip(&cols) {
            let _ = write!(s, " | {p:>w$}");
        }
        for (h, w) in heads.iter().zip(&wrs) {
            let _ = write!(s, " | {h:>w$}");
        }
        let _ = writeln!(s, " | better");
        let total = w0 + cols.iter().chain(&wrs).map(|w| w + 3).sum::<usize>() + 9;
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
            for (h, w) in heads.iter().zip(&wrs) {
                let r = m.ratios.get(h).map_or("-".into(), |r| format!("{r:.2}"));
                let _ = write!(s, " | {r:>w$}");
            }
            let better = match m.better {
                Better::Higher => "higher",
                Better::Lower => "lower",
                Better::Neither => "",
            };
            let _ = writeln!(s, " | {better}");
        }
        if !self.failures.is_empty() {
            let _ = writeln!(s);
            for p in self.paths.iter().filter(|p| self.failures.contains_key(*p)) {
                let _ = writeln!(s, "{}", failure_line(p, &self.failures[p]));
            }
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

/// `<path>: failed: <reason>`, later lines of the reason indented.
pub fn failure_line(path: &str, reason: &str) -> String {
    let mut lines = reason.trim_end().lines();
    let mut s = format!("{path}: failed: {}", lines.next().unwrap_or(""));
    for l in lines {
        s.push_str("\n    ");
        s.push_str(l);
    }
    s
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

    #[test]
    fn one_ratio_column_per_comparison_and_failed_paths() {
        let mut r = Report::with_comparisons(
            "cross-node",
            "test",
            &["ocelot-vxlan", "kernel-vxlan", "ocelot-ipip", "kernel-ipip"],
            vec![
                Comparison::new("ocelot-vxlan", "kernel-vxlan"),
                Comparison::new("ocelot-ipip", "kernel-ipip"),
            ],
        );
        assert_eq!(r.baseline, "kernel-vxlan");
        r.add("tcp", "TCP (Gbit/s)", "Gbit/s", Better::Higher, 2, "kernel-vxlan", 10.0);
        r.add("tcp", "TCP (Gbit/s)", "Gbit/s", Better::Higher, 2, "kernel-ipip", 8.0);
        r.add("tcp", "TCP (Gbit/s)", "Gbit/s", Better::Higher, 2, "ocelot-ipip", 4.0);
        r.fail("ocelot-vxlan", "pod 10.65.0.0 cannot ping pod 10.65.0.64\nsecond line");
        r.fail("ocelot-vxlan", "a later reason is ignored");
        assert!(r.failed("ocelot-vxlan") && !r.failed("kernel-vxlan"));
        let m = &r.metrics[0];
        assert_eq!(m.ratio, None, "ocelot-vxlan has no value");
        assert_eq!(m.ratios.get("ocelot-ipip/kernel-ipip"), Some(&0.5));
        assert_eq!(m.ratios.get("ocelot-vxlan/kernel-vxlan"), None);
        let t = r.to_table();
        let head = t.lines().find(|l| l.starts_with("metric")).unwrap();
        assert!(head.contains("| ocelot-vxlan/kernel-vxlan | ocelot-ipip/kernel-ipip | better"));
        let row = t.lines().find(|l| l.starts_with("TCP")).unwrap();
        let cells: Vec<&str> = row.split('|').map(str::trim).collect();
        assert_eq!(cells, ["TCP (Gbit/s)", "-", "10.00", "4.00", "8.00", "-", "0.50", "higher"]);
        assert!(
            t.contains(
                "\nocelot-vxlan: failed: pod 10.65.0.0 cannot ping pod 10.65.0.64\n    second line\n"
            ),
            "{t}"
        );
        let j: Value = serde_json::from_str(&r.to_json()).unwrap();
        assert_eq!(j["failures"]["ocelot-vxlan"].as_str().unwrap().lines().count(), 2);
        assert_eq!(j["metrics"][0]["ratios"]["ocelot-ipip/kernel-ipip"], 0.5);
    }

    #[test]
    fn no_comparison_no_ratio_column() {
        let mut r = Report::with_comparisons("x", "test", &["kernel-vxlan"], Vec::new());
        r.add("tcp", "TCP (Gbit/s)", "Gbit/s", Better::Higher, 2, "kernel-vxlan", 10.0);
        let t = r.to_table();
        assert!(t.lines().any(|l| l.starts_with("metric") && l.ends_with("kernel-vxlan | better")));
        assert_eq!(r.baseline, "");
    }
}

//! `/metrics`: the Prometheus text exposition format, version 0.0.4.
//!
//! Formatted by hand rather than through `prometheus-client`: that crate
//! writes OpenMetrics 1.0 (`# EOF`, `_total` names that 0.0.4 parsers read
//! as untyped), and every value here is a snapshot taken at scrape time
//! (the dataplane's counters, the IPAM state), so a registry of live metric
//! objects would add a copy and nothing else. [`Exposition`] keeps the
//! format's rules: one `# HELP`/`# TYPE` per family, its samples together,
//! label values escaped.

use super::state::{OpsState, POLICY_CALC_BUCKETS};
use super::view::AgentView;
use ocelot_dataplane::api::{PortCounters, WorkerCounters};
use std::collections::BTreeSet;
use std::fmt::Write as _;

/// The content type of the 0.0.4 text format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// A text exposition being written.
#[derive(Default)]
pub struct Exposition {
    out: String,
    families: BTreeSet<String>,
    current: String,
}

/// `\`, `"` and newlines escaped, as label values require.
fn escape_label(v: &str) -> String {
    let mut s = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => s.push_str("\\\\"),
            '"' => s.push_str("\\\""),
            '\n' => s.push_str("\\n"),
            c => s.push(c),
        }
    }
    s
}

/// `\` and newlines escaped, as `# HELP` text requires.
fn escape_help(v: &str) -> String {
    v.replace('\\', "\\\\").replace('\n', "\\n")
}

fn format_value(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v == f64::INFINITY {
        "+Inf".into()
    } else if v == f64::NEG_INFINITY {
        "-Inf".into()
    } else {
        format!("{v}")
    }
}

impl Exposition {
    /// Start a family. Each name may be started once: a second start is a
    /// bug, caught by the tests (debug builds panic; release builds write
    /// the samples under the earlier header's name anyway).
    pub fn family(&mut self, name: &str, kind: Kind, help: &str) -> &mut Self {
        debug_assert!(self.families.insert(name.to_string()), "family {name} declared twice");
        let _ = writeln!(self.out, "# HELP {name} {}", escape_help(help));
        let _ = writeln!(self.out, "# TYPE {name} {}", kind.as_str());
        self.current = name.to_string();
        self
    }

    /// One sample of the current family (`suffix`: `""`, or `_bucket`,
    /// `_sum`, `_count` for histograms).
    pub fn sample_with(&mut self, suffix: &str, labels: &[(&str, &str)], v: f64) -> &mut Self {
        let _ = write!(self.out, "{}{suffix}", self.current);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, val)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let _ = write!(self.out, "{k}=\"{}\"", escape_label(val));
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {}", format_value(v));
        self
    }

    pub fn sample(&mut self, labels: &[(&str, &str)], v: f64) -> &mut Self {
        self.sample_with("", labels, v)
    }

    /// A family with one unlabelled sample.
    pub fn single(&mut self, name: &str, kind: Kind, help: &str, v: f64) -> &mut Self {
        self.family(name, kind, help).sample(&[], v)
    }

    pub fn finish(self) -> String {
        self.out
    }
}

/// The kind of a port as a label: `pod`, `host`, `tunnel_vxlan`, `uplink`.
fn port_kind(k: &ocelot_dataplane::tables::PortKind) -> String {
    match serde_json::to_value(k) {
        Ok(serde_json::Value::String(s)) => s,
        Ok(serde_json::Value::Object(o)) => o
            .iter()
            .map(|(k, v)| format!("{k}_{}", v.as_str().unwrap_or("")))
            .collect::<Vec<_>>()
            .join("_"),
        _ => "unknown".into(),
    }
}

/// What the dataplane's `counters` request returned, or why not.
pub type DataplaneCounters =
    Result<(Vec<PortCounters>, Vec<WorkerCounters>, Vec<(String, String)>), String>;

/// The whole exposition: the agent's own state, IPAM use, and the
/// dataplane's counters.
pub fn render(view: &AgentView, ops: &OpsState, dp: &DataplaneCounters) -> String {
    let mut e = Exposition::default();
    e.family("ocelot_build_info", Kind::Gauge, "Always 1; the version of the running agent.")
        .sample(&[("version", &view.version)], 1.0);
    e.single(
        "ocelot_agent_ready",
        Kind::Gauge,
        "1 when /readyz succeeds: datastore synced, dataplane reachable, endpoints synced.",
        b(view.ready),
    );
    e.single(
        "ocelot_agent_datastore_synced",
        Kind::Gauge,
        "1 once the datastore delivered a complete view.",
        b(view.datastore_synced),
    );
    e.single(
        "ocelot_agent_dataplane_connected",
        Kind::Gauge,
        "1 while the agent holds a synced connection to the dataplane.",
        b(view.dataplane_connected),
    );
    e.single(
        "ocelot_agent_uptime_seconds",
        Kind::Gauge,
        "Seconds since the agent started.",
        view.uptime_s as f64,
    );
    e.single(
        "ocelot_agent_loop_age_seconds",
        Kind::Gauge,
        "Seconds since the agent's main loop last turned (liveness fails past its limit).",
        view.last_loop_s.unwrap_or(f64::NAN),
    );
    e.family(
        "ocelot_agent_sync_errors_total",
        Kind::Counter,
        "Failed steps of the agent's work (retried), by kind: policy, overlay, ipam, dataplane.",
    );
    for kind in ["dataplane", "ipam", "overlay", "policy"] {
        // Always present, so rate() works from the first error on.
        let n = view.sync_errors.get(kind).copied().unwrap_or(0);
        e.sample(&[("kind", kind)], n as f64);
    }
    for (kind, n) in view
        .sync_errors
        .iter()
        .filter(|(k, _)| !["dataplane", "ipam", "overlay", "policy"].contains(&k.as_str()))
    {
        e.sample(&[("kind", kind)], *n as f64);
    }
    e.single(
        "ocelot_agent_problems",
        Kind::Gauge,
        "Problems in the datastore the agent works around (bad Services, refused specs); `ocelot status` lists them.",
        view.problems.len() as f64,
    );
    e.single(
        "ocelot_agent_endpoints",
        Kind::Gauge,
        "Pod endpoints on this node (its IPAM allocations).",
        view.endpoints.len() as f64,
    );
    e.single(
        "ocelot_agent_remote_nodes",
        Kind::Gauge,
        "Other nodes in the datastore.",
        view.nodes.len() as f64,
    );
    e.single(
        "ocelot_policy_network_policies",
        Kind::Gauge,
        "NetworkPolicies in the datastore.",
        view.policies.network_policies as f64,
    );

    let h = ops.policy_calc();
    e.family(
        "ocelot_policy_calculation_seconds",
        Kind::Histogram,
        "Time to compute this node's endpoints' policy after a change.",
    );
    for (i, le) in POLICY_CALC_BUCKETS.iter().enumerate() {
        let n = h.buckets.get(i).copied().unwrap_or(0);
        e.sample_with("_bucket", &[("le", &format_value(*le))], n as f64);
    }
    e.sample_with("_bucket", &[("le", "+Inf")], h.count as f64);
    e.sample_with("_sum", &[], h.sum);
    e.sample_with("_count", &[], h.count as f64);

    type PoolField = fn(&super::view::PoolView) -> u64;
    let pool_families: [(&str, &str, PoolField); 5] = [
        ("ocelot_ipam_pool_capacity_addresses", "Addresses in the pool.", |p| p.capacity),
        ("ocelot_ipam_blocks", "Blocks of the pool claimed by any node.", |p| p.blocks),
        ("ocelot_ipam_node_blocks", "Blocks of the pool affine to this node.", |p| p.blocks_here),
        ("ocelot_ipam_allocated_addresses", "Addresses of the pool allocated on any node.", |p| {
            p.allocated
        }),
        (
            "ocelot_ipam_node_allocated_addresses",
            "Addresses of the pool allocated to this node's pods.",
            |p| p.allocated_here,
        ),
    ];
    for (name, help, f) in pool_families {
        e.family(name, Kind::Gauge, help);
        for p in &view.pools {
            e.sample(&[("pool", &p.name)], f(p) as f64);
        }
    }

    e.single(
        "ocelot_dataplane_up",
        Kind::Gauge,
        "1 when the dataplane answered the counters request of this scrape.",
        b(dp.is_ok()),
    );
    if let Ok((ports, workers, reasons)) = dp {
        type PortField = fn(&ocelot_dataplane::counters::CounterSnapshot) -> u64;
        let port_families: [(&str, &str, PortField); 4] = [
            ("ocelot_dataplane_port_rx_packets_total", "Frames received on the port.", |c| {
                c.rx_packets
            }),
            ("ocelot_dataplane_port_rx_bytes_total", "Bytes received on the port.", |c| c.rx_bytes),
            ("ocelot_dataplane_port_tx_packets_total", "Frames sent on the port.", |c| {
                c.tx_packets
            }),
            ("ocelot_dataplane_port_tx_bytes_total", "Bytes sent on the port.", |c| c.tx_bytes),
        ];
        let kinds: Vec<String> = ports.iter().map(|p| port_kind(&p.kind)).collect();
        for (name, help, f) in port_families {
            e.family(name, Kind::Counter, help);
            for (p, k) in ports.iter().zip(&kinds) {
                e.sample(&[("port", &p.name), ("kind", k)], f(&p.counters) as f64);
            }
        }
        e.family("ocelot_dataplane_port_drops_total", Kind::Counter, "Frames received on the port and dropped, by reason (see ocelot_dataplane_drop_reason_info).");
        for (p, k) in ports.iter().zip(&kinds) {
            for (reason, n) in &p.counters.drops {
                e.sample(&[("port", &p.name), ("kind", k), ("reason", reason)], *n as f64);
            }
        }
        e.family("ocelot_dataplane_drops_total", Kind::Counter, "Frames dropped by the dataplane's workers, by reason (every reason listed, zeros included).");
        for (reason, _) in reasons {
            let n: u64 =
                workers.iter().map(|w| w.counters.drops.get(reason).copied().unwrap_or(0)).sum();
            e.sample(&[("reason", reason)], n as f64);
        }
        e.family(
            "ocelot_dataplane_drop_reason_info",
            Kind::Gauge,
            "Always 1; the description of each drop reason.",
        );
        for (reason, desc) in reasons {
            e.sample(&[("reason", reason), ("description", desc)], 1.0);
        }
        type WorkerField = fn(&WorkerCounters) -> u64;
        let worker_families: [(&str, Kind, &str, WorkerField); 8] = [
            (
                "ocelot_dataplane_conntrack_entries",
                Kind::Gauge,
                "Connection-tracking entries in use, per worker.",
                |w| w.ct_entries,
            ),
            (
                "ocelot_dataplane_conntrack_refused_total",
                Kind::Counter,
                "New flows refused because the worker's connection-tracking table was full.",
                |w| w.ct_refused,
            ),
            (
                "ocelot_dataplane_nat_entries",
                Kind::Gauge,
                "Translated flows (Service DNAT, natOutgoing SNAT) in use, per worker, each direction counted.",
                |w| w.nat_entries,
            ),
            (
                "ocelot_dataplane_snat_ports",
                Kind::Gauge,
                "Source ports allocated for natOutgoing, per worker.",
                |w| w.snat_ports,
            ),
            (
                "ocelot_dataplane_worker_rx_packets_total",
                Kind::Counter,
                "Frames the worker received.",
                |w| w.counters.rx_packets,
            ),
            (
                "ocelot_dataplane_worker_tx_packets_total",
                Kind::Counter,
                "Frames the worker sent.",
                |w| w.counters.tx_packets,
            ),
            (
                "ocelot_dataplane_worker_batches_total",
                Kind::Counter,
                "Batches the worker processed.",
                |w| w.batches,
            ),
            (
                "ocelot_dataplane_worker_handoffs_total",
                Kind::Counter,
                "Frames the worker handed to the worker owning their flow.",
                |w| w.handoff_out,
            ),
        ];
        for (name, kind, help, f) in worker_families {
            e.family(name, kind, help);
            for w in workers {
                let id = w.worker.to_string();
                let core = w.core.map(|c| c.to_string()).unwrap_or_else(|| "none".into());
                e.sample(&[("worker", &id), ("core", &core)], f(w) as f64);
            }
        }
    }
    e.finish()
}

fn b(v: bool) -> f64 {
    if v {
        1.0
    } else {
        0.0
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::collections::BTreeMap;

    /// A strict reader of the 0.0.4 text format: every sample belongs to
    /// the family declared just before it (histograms: `_bucket`, `_sum`,
    /// `_count`), no family is declared twice, names and labels are well
    /// formed, values parse. Returns the samples as `name{labels}` → value.
    pub(crate) fn parse(text: &str) -> Result<BTreeMap<String, f64>, String> {
        let mut samples = BTreeMap::new();
        let mut declared = BTreeSet::new();
        let mut family: Option<(String, String)> = None;
        let ident = |s: &str| {
            !s.is_empty()
                && s.chars().enumerate().all(|(i, c)| {
                    c.is_ascii_alphabetic() || c == '_' || c == ':' || (i > 0 && c.is_ascii_digit())
                })
        };
        for (n, line) in text.lines().enumerate() {
            let at = |m: &str| format!("line {}: {m}: {line:?}", n + 1);
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').ok_or_else(|| at("TYPE without a kind"))?;
                if !["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind) {
                    return Err(at("unknown type"));
                }
                if !declared.insert(name.to_string()) {
                    return Err(at("family declared twice"));
                }
                family = Some((name.to_string(), kind.to_string()));
                continue;
            }
            if line.starts_with('#') || line.is_empty() {
                continue;
            }
            let (series, value) = line.rsplit_once(' ').ok_or_else(|| at("no value"))?;
            let v: f64 = match value {
                "+Inf" => f64::INFINITY,
                "-Inf" => f64::NEG_INFINITY,
                v => v.parse().map_err(|_| at("bad value"))?,
            };
            let name = series.split('{').next().unwrap_or("");
            if !ident(name) {
                return Err(at("bad metric name"));
            }
            let (fam, kind) = family.as_ref().ok_or_else(|| at("sample before any TYPE"))?;
            let ok = name == fam
                || (kind == "histogram"
                    && [format!("{fam}_bucket"), format!("{fam}_sum"), format!("{fam}_count")]
                        .contains(&name.to_string()));
            if !ok {
                return Err(at(&format!("sample outside its family {fam}")));
            }
            if let Some(l) = series.strip_prefix(name) {
                if !l.is_empty() {
                    let inner = l
                        .strip_prefix('{')
                        .and_then(|l| l.strip_suffix('}'))
                        .ok_or_else(|| at("bad label braces"))?;
                    // k="v" pairs, values with escapes.
                    let mut rest = inner;
                    while !rest.is_empty() {
                        let (k, r) = rest.split_once("=\"").ok_or_else(|| at("bad label"))?;
                        if !ident(k) {
                            return Err(at("bad label name"));
                        }
                        let mut chars = r.char_indices();
                        let mut end = None;
                        while let Some((i, c)) = chars.next() {
                            match c {
                                '\\' => {
                                    chars.next();
                                }
                                '"' => {
                                    end = Some(i);
                                    break;
                                }
                                _ => {}
                            }
                        }
                        let end = end.ok_or_else(|| at("unterminated label value"))?;
                        rest = &r[end + 1..];
                        rest = rest.strip_prefix(',').unwrap_or(rest);
                    }
                }
            }
            if samples.insert(series.to_string(), v).is_some() {
                return Err(at("duplicate series"));
            }
        }
        Ok(samples)
    }

    #[test]
    fn exposition_escapes_and_parses() {
        let mut e = Exposition::default();
        e.family("x_total", Kind::Counter, "help with \\ and\nnewline")
            .sample(&[("a", "q\"uote\\back\nline")], 3.0)
            .sample(&[("a", "b"), ("c", "d")], 4.5);
        e.single("y", Kind::Gauge, "y", f64::NAN);
        let text = e.finish();
        assert!(text.contains(r#"x_total{a="q\"uote\\back\nline"} 3"#), "{text}");
        assert!(text.contains("# HELP x_total help with \\\\ and\\nnewline"), "{text}");
        let s = parse(&text).unwrap();
        assert_eq!(s[r#"x_total{a="b",c="d"}"#], 4.5);
        assert!(s["y"].is_nan());
    }

    #[test]
    fn the_reader_rejects_broken_expositions() {
        assert!(parse("# TYPE a gauge\nb 1\n").unwrap_err().contains("outside its family"));
        assert!(parse("a 1\n").unwrap_err().contains("before any TYPE"));
        assert!(parse("# TYPE a gauge\na{x=\"1} 1\n").is_err());
        assert!(parse("# TYPE a gauge\na one\n").unwrap_err().contains("bad value"));
        assert!(parse("# TYPE a gauge\n# TYPE a gauge\n").unwrap_err().contains("twice"));
    }

    #[test]
    fn full_render_is_valid_with_and_without_a_dataplane() {
        use ocelot_dataplane::api::PortCounters;
        use ocelot_dataplane::counters::CounterSnapshot;
        let ops = OpsState::default();
        ops.policy_calculated(std::time::Duration::from_millis(2));
        ops.sync_error("policy");
        let view = AgentView {
            version: "0.1.0".into(),
            pools: vec![super::super::view::PoolView {
                name: "default".into(),
                capacity: 65536,
                allocated: 3,
                ..Default::default()
            }],
            sync_errors: ops.sync_errors(),
            problems: vec!["x/web: no such port".into()],
            ..Default::default()
        };
        let down = render(&view, &ops, &Err("no socket".into()));
        let s = parse(&down).unwrap();
        assert_eq!(s["ocelot_dataplane_up"], 0.0);
        assert_eq!(s["ocelot_agent_problems"], 1.0);
        assert_eq!(s[r#"ocelot_agent_sync_errors_total{kind="policy"}"#], 1.0);
        assert_eq!(s[r#"ocelot_ipam_allocated_addresses{pool="default"}"#], 3.0);
        assert_eq!(s[r#"ocelot_policy_calculation_seconds_bucket{le="0.005"}"#], 1.0);
        assert_eq!(s[r#"ocelot_policy_calculation_seconds_bucket{le="+Inf"}"#], 1.0);

        let mut drops = BTreeMap::new();
        drops.insert("no_route".to_string(), 7);
        let port = PortCounters {
            port: 1,
            name: "oc0123".into(),
            kind: ocelot_dataplane::tables::PortKind::Pod,
            counters: CounterSnapshot {
                rx_packets: 10,
                drops: drops.clone(),
                ..Default::default()
            },
        };
        let worker: WorkerCounters = serde_json::from_value(serde_json::json!({
            "worker": 0, "core": null, "ports": 1, "batches": 5, "polls": 9,
            "handoff_in": 0, "handoff_out": 0, "ct_entries": 4,
            "rx_packets": 10, "rx_bytes": 0, "tx_packets": 3, "tx_bytes": 0,
            "drops": {"no_route": 7}
        }))
        .unwrap();
        let reasons = vec![
            ("no_route".to_string(), "no route \"to\" it".to_string()),
            ("spoofed".to_string(), "spoofed".to_string()),
        ];
        let up = render(&view, &ops, &Ok((vec![port], vec![worker], reasons)));
        let s = parse(&up).unwrap();
        assert_eq!(s["ocelot_dataplane_up"], 1.0);
        assert_eq!(s[r#"ocelot_dataplane_port_rx_packets_total{port="oc0123",kind="pod"}"#], 10.0);
        assert_eq!(
            s[r#"ocelot_dataplane_port_drops_total{port="oc0123",kind="pod",reason="no_route"}"#],
            7.0
        );
        assert_eq!(s[r#"ocelot_dataplane_drops_total{reason="no_route"}"#], 7.0);
        assert_eq!(s[r#"ocelot_dataplane_drops_total{reason="spoofed"}"#], 0.0);
        assert_eq!(s[r#"ocelot_dataplane_conntrack_entries{worker="0",core="none"}"#], 4.0);
        assert_eq!(s[r#"ocelot_dataplane_nat_entries{worker="0",core="none"}"#], 0.0);
    }
}

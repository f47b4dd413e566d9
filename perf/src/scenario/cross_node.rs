//! `cross-node`: a pod on node 1 to a pod on node 2, across an underlay,
//! through up to four paths measured in the same run:
//!
//! * `kernel-vxlan`, `kernel-ipip`: Linux as Calico programs it
//!   ([`KernelCrossNode`]);
//! * `ocelot-vxlan`, `ocelot-ipip`: Ocelot's dataplanes, built by the real
//!   lab with a pool in `vxlanMode` / `ipipMode: Always` ([`OcelotLab`]).
//!
//! Ratios are Ocelot over the kernel with the same encapsulation. A path
//! that cannot be built or fails a test is reported as
//! `<path>: failed: <reason>`, its cells left empty, and the other paths
//! are measured anyway.

use super::{run_suite, Dataplane, OnFailure, Subject, SuiteParams};
use crate::interrupt;
use crate::report::{self, Comparison, Report};
use crate::tools;
use crate::topo::lab::OcelotLab;
use crate::topo::overlay::{self, Encap, KernelCrossNode, UPLINK_MTU};
use crate::topo::PodPair;
use anyhow::{anyhow, Result};
use ocelot_tests::TempDir;
use std::path::PathBuf;
use std::time::Instant;

/// Who forwards the pods' packets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Forwarder {
    Ocelot,
    Kernel,
}

/// One path: a forwarder and an encapsulation. Ordered as the report's
/// columns: per encapsulation, Ocelot then its kernel reference.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PathId {
    pub encap: Encap,
    pub by: Forwarder,
}

impl PathId {
    /// Every path, in column order.
    pub const ALL: [PathId; 4] = [
        PathId { encap: Encap::Vxlan, by: Forwarder::Ocelot },
        PathId { encap: Encap::Vxlan, by: Forwarder::Kernel },
        PathId { encap: Encap::Ipip, by: Forwarder::Ocelot },
        PathId { encap: Encap::Ipip, by: Forwarder::Kernel },
    ];

    /// `ocelot-vxlan`, `kernel-ipip`...
    pub fn label(self) -> String {
        let by = match self.by {
            Forwarder::Ocelot => "ocelot",
            Forwarder::Kernel => "kernel",
        };
        format!("{by}-{}", self.encap.name())
    }
}

impl serde::Serialize for PathId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.label())
    }
}

/// What `--paths` accepts besides the path names.
pub const PATH_GROUPS: &str = "all, kernel, ocelot, vxlan, ipip";

/// `--paths`: comma-separated path names (`kernel-vxlan`...) or groups
/// ([`PATH_GROUPS`]); the result is in column order, without duplicates.
pub fn parse_paths(s: &str) -> Result<Vec<PathId>, String> {
    let mut out = Vec::new();
    for word in s.split(',').map(str::trim).filter(|w| !w.is_empty()) {
        let hit: Vec<PathId> = PathId::ALL
            .into_iter()
            .filter(|p| match word {
                "all" => true,
                "kernel" => p.by == Forwarder::Kernel,
                "ocelot" => p.by == Forwarder::Ocelot,
                "vxlan" => p.encap == Encap::Vxlan,
                "ipip" => p.encap == Encap::Ipip,
                w => p.label() == w,
            })
            .collect();
        if hit.is_empty() {
            let names: Vec<String> = PathId::ALL.iter().map(|p| p.label()).collect();
            return Err(format!(
                "unknown path {word:?}: use {} or a group ({PATH_GROUPS})",
                names.join(", ")
            ));
        }
        out.extend(hit);
    }
    if out.is_empty() {
        return Err("no path given".into());
    }
    out.sort();
    out.dedup();
    Ok(out)
}

/// Ocelot over the kernel, for each encapsulation that has both.
pub fn comparisons(paths: &[PathId]) -> Vec<Comparison> {
    let mut v = Vec::new();
    for encap in [Encap::Vxlan, Encap::Ipip] {
        let o = PathId { encap, by: Forwarder::Ocelot };
        let k = PathId { encap, by: Forwarder::Kernel };
        if paths.contains(&o) && paths.contains(&k) {
            v.push(Comparison::new(&o.label(), &k.label()));
        }
    }
    v
}

/// The scenario's own parameters.
#[derive(Clone, Debug, serde::Serialize)]
pub struct CrossNodeParams {
    pub paths: Vec<PathId>,
    /// The IP pool (the lab's IPPool; the kernel paths take blocks of it
    /// the same way).
    pub pool: String,
    pub block_size: u8,
    /// The kernel paths' underlay subnet (the lab's fabric is its default,
    /// 192.0.2.0/24).
    pub underlay: String,
    /// Where `ocelot`, `ocelot-dataplane` and `ocelot-cni` are.
    #[serde(skip)]
    pub bin_dir: PathBuf,
}

/// A built path, removed when dropped.
enum Topo {
    Kernel(KernelCrossNode),
    Ocelot(OcelotLab),
}

impl Topo {
    fn pair(&self) -> &dyn PodPair {
        match self {
            Topo::Kernel(k) => k,
            Topo::Ocelot(o) => o,
        }
    }

    fn dataplanes(&self) -> Vec<Dataplane> {
        match self {
            Topo::Kernel(_) => Vec::new(),
            Topo::Ocelot(o) => o.dataplanes.clone(),
        }
    }

    /// Where the pods are, for the report.
    fn describe(&self, pod_mtu: u32) -> serde_json::Value {
        match self {
            Topo::Kernel(k) => serde_json::json!({
                "client": {"ip": k.client.ip, "netns": k.client.ns.name, "node_ip": k.plan[0].ip},
                "server": {"ip": k.server.ip, "netns": k.server.ns.name, "node_ip": k.plan[1].ip},
                "nodes": [k.nodes[0].name, k.nodes[1].name],
                "plan": k.plan,
                "pod_mtu": pod_mtu,
            }),
            Topo::Ocelot(o) => serde_json::json!({
                "lab": o.name(),
                "client": {"ip": o.client.ip, "netns": o.client.ns.name, "node_ip": o.nodes[0].internal_ip},
                "server": {"ip": o.server.ip, "netns": o.server.ns.name, "node_ip": o.nodes[1].internal_ip},
                "pod_mtu": pod_mtu,
            }),
        }
    }
}

/// Build one path and check that its client reaches its server; the path
/// and the MTU of the client's `eth0`.
fn build(id: PathId, p: &CrossNodeParams, plan: &[overlay::NodePlan; 2]) -> Result<(Topo, u32)> {
    let t = match id.by {
        Forwarder::Kernel => Topo::Kernel(KernelCrossNode::start(id.encap, plan)?),
        Forwarder::Ocelot => Topo::Ocelot(OcelotLab::up(
            id.encap,
            &p.pool,
            p.block_size,
            id.encap.mtu(UPLINK_MTU),
            &p.bin_dir,
        )?),
    };
    t.pair().check_connectivity()?;
    let mtu = tools::link_mtu(t.pair().client(), "eth0")?;
    Ok((t, mtu))
}

pub fn run(sp: &SuiteParams, p: &CrossNodeParams, progress: &dyn Fn(&str)) -> Result<Report> {
    let t0 = Instant::now();
    let labels: Vec<String> = p.paths.iter().map(|id| id.label()).collect();
    let label_refs: Vec<&str> = labels.iter().map(String::as_str).collect();
    let mut report = Report::with_comparisons(
        "cross-node",
        &format!(
            "pod on node 1 -> pod on node 2 over a {UPLINK_MTU} B underlay; kernel-* = Linux as \
             Calico programs it (vxlan.calico VNI {} / tunl0, proxy ARP, /32 routes), \
             ocelot-* = `ocelot lab` with an IPPool in vxlanMode / ipipMode Always",
            overlay::VXLAN_VNI
        ),
        &label_refs,
        comparisons(&p.paths),
    );
    let mut params = serde_json::to_value(sp)?;
    if let (Some(o), serde_json::Value::Object(extra)) =
        (params.as_object_mut(), serde_json::to_value(p)?)
    {
        o.extend(extra);
        o.insert("iperf3".into(), tools::version("iperf3").into());
        o.insert("sockperf".into(), tools::version("sockperf").into());
    }
    report.params = params;
    let plan = overlay::plan(&p.pool, p.block_size, &p.underlay)?;

    let logs = TempDir::new("ocelot-perf-");
    // Dropped at the end of the function, in order, also on error.
    let mut topos: Vec<Topo> = Vec::new();
    let mut mtus = Vec::new();
    for &id in &p.paths {
        interrupt::check()?;
        let path = id.label();
        progress(&format!("[{path}] setting up two nodes and a pod on each..."));
        match build(id, p, &plan) {
            Ok((t, mtu)) => {
                progress(&format!(
                    "[{path}] pod {} -> pod {}: reachable, MTU {mtu}",
                    t.pair().client_ip(),
                    t.pair().server_ip()
                ));
                report.detail(&path, "topology", t.describe(mtu));
                mtus.push(format!("{path} {mtu}"));
                topos.push(t);
            }
            Err(e) => {
                interrupt::check()?;
                let reason = format!("{e:#}");
                progress(&report::failure_line(&path, &reason));
                report.fail(&path, &reason);
            }
        }
    }
    let subjects: Vec<Subject<'_>> =
        topos.iter().map(|t| Subject { pair: t.pair(), dataplanes: t.dataplanes() }).collect();
    run_suite(&subjects, sp, &mut report, &logs.0, progress, OnFailure::SkipPath)?;
    for t in &topos {
        if let Topo::Ocelot(o) = t {
            if let Ok(d) = super::drops_of(&o.dataplanes) {
                report.detail(o.label(), "dataplane_drops_total", d);
            }
        }
    }

    if report.failures.len() == p.paths.len() {
        let all: Vec<String> =
            labels.iter().map(|l| report::failure_line(l, &report.failures[l])).collect();
        return Err(anyhow!("no path could be measured:\n{}", all.join("\n")));
    }
    report.notes.push(format!(
        "pods' eth0 MTU: {} (the {UPLINK_MTU} B underlay minus {} B for VXLAN, {} B for IPIP, \
         as Calico sets it)",
        mtus.join(", "),
        Encap::Vxlan.overhead(),
        Encap::Ipip.overhead()
    ));
    if p.paths.iter().any(|id| id.by == Forwarder::Ocelot) {
        report.notes.push(
            "dataplane CPU and memory of an ocelot path are the sum over both nodes' dataplanes"
                .into(),
        );
    }
    report.notes.push(
        "every path shares the machine's cores with iperf3/sockperf themselves; \
         compare ratios from one run, not absolute numbers across machines"
            .into(),
    );
    report.duration_s = t0.elapsed().as_secs_f64();
    progress("cleaning up...");
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(v: &[PathId]) -> Vec<String> {
        v.iter().map(|p| p.label()).collect()
    }

    #[test]
    fn paths_and_groups() {
        let all = ["ocelot-vxlan", "kernel-vxlan", "ocelot-ipip", "kernel-ipip"];
        assert_eq!(labels(&parse_paths("all").unwrap()), all);
        assert_eq!(
            labels(&parse_paths("kernel-ipip,ocelot-vxlan").unwrap()),
            ["ocelot-vxlan", "kernel-ipip"]
        );
        assert_eq!(labels(&parse_paths("kernel").unwrap()), ["kernel-vxlan", "kernel-ipip"]);
        assert_eq!(
            labels(&parse_paths("vxlan, kernel-vxlan").unwrap()),
            ["ocelot-vxlan", "kernel-vxlan"]
        );
        assert_eq!(
            labels(&parse_paths("ocelot,ipip").unwrap()),
            ["ocelot-vxlan", "ocelot-ipip", "kernel-ipip"]
        );
        assert!(parse_paths("").is_err());
        assert!(parse_paths(" , ").is_err());
        let e = parse_paths("kernel-vxlan,geneve").unwrap_err();
        assert!(e.contains("\"geneve\"") && e.contains("kernel-ipip"), "{e}");
    }

    #[test]
    fn ratios_pair_each_encapsulation() {
        let c = comparisons(&parse_paths("all").unwrap());
        let names: Vec<String> = c.iter().map(Comparison::name).collect();
        assert_eq!(names, ["ocelot-vxlan/kernel-vxlan", "ocelot-ipip/kernel-ipip"]);
        assert!(comparisons(&parse_paths("kernel").unwrap()).is_empty());
        let c = comparisons(&parse_paths("vxlan,kernel-ipip").unwrap());
        assert_eq!(c, [Comparison::new("ocelot-vxlan", "kernel-vxlan")]);
    }

    #[test]
    fn paths_serialize_as_their_labels() {
        let v = serde_json::to_value(parse_paths("kernel").unwrap()).unwrap();
        assert_eq!(v, serde_json::json!(["kernel-vxlan", "kernel-ipip"]));
    }
}

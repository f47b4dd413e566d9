//! `same-node`: pod A to pod B on one node, through Ocelot's dataplane and
//! through the kernel path Calico programs, measured in the same run.

use super::{run_suite, Dataplane, OnFailure, Subject, SuiteParams};
use crate::interrupt;
use crate::report::Report;
use crate::tools;
use crate::topo::{KernelSameNode, OcelotSameNode, PodPair};
use anyhow::Result;
use ocelot_tests::TempDir;
use std::time::Instant;

/// Addresses of the scenario (both paths use the same ones, each in its
/// own namespaces).
#[derive(Clone, Debug, serde::Serialize)]
pub struct SameNodeParams {
    pub pool: String,
    pub node_ip: String,
    pub client_ip: String,
    pub server_ip: String,
    /// Extra `ocelot-dataplane run` flags.
    pub dp_args: String,
}

pub fn run(sp: &SuiteParams, p: &SameNodeParams, progress: &dyn Fn(&str)) -> Result<Report> {
    let t0 = Instant::now();
    let mut report = Report::new(
        "same-node",
        &format!(
            "pod {} -> pod {} on one node; ocelot = user-space dataplane (TAP eth0), \
             kernel = Calico's kernel path (veth, proxy ARP, /32 routes)",
            p.client_ip, p.server_ip
        ),
        &["ocelot", "kernel"],
        "kernel",
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

    let logs = TempDir::new("ocelot-perf-");
    progress("setting up the ocelot node and pods...");
    let ocelot = OcelotSameNode::start(&p.node_ip, &p.pool, &p.client_ip, &p.server_ip, &p.dp_args);
    interrupt::check()?;
    progress("setting up the kernel (Calico-style) node and pods...");
    let kernel = KernelSameNode::start(&p.node_ip, &p.client_ip, &p.server_ip);
    interrupt::check()?;
    let result = (|| {
        ocelot.check_connectivity()?;
        kernel.check_connectivity()?;
        let subjects = [
            Subject {
                pair: &ocelot,
                dataplanes: vec![Dataplane {
                    pid: ocelot.dataplane_pid()?,
                    socket: ocelot.node.socket(),
                }],
            },
            Subject { pair: &kernel, dataplanes: Vec::new() },
        ];
        run_suite(&subjects, sp, &mut report, &logs.0, progress, OnFailure::Stop)
    })();
    if let Err(e) = result {
        if interrupt::interrupted() {
            return Err(e);
        }
        return Err(anyhow::anyhow!(
            "{e:#}\n\nocelot dataplane log (last lines):\n{}",
            tools::tail(&tools::strip_ansi(&ocelot.node.proc.log_text()), 15)
        ));
    }
    let drops = Dataplane { pid: ocelot.node.proc.pid(), socket: ocelot.node.socket() }.drops();
    if let Ok(d) = drops {
        report.detail("ocelot", "dataplane_drops_total", d);
    }
    report.notes.push(
        "both paths share the machine's cores with iperf3/sockperf themselves; \
         compare ratios from one run, not absolute numbers across machines"
            .into(),
    );
    report.duration_s = t0.elapsed().as_secs_f64();
    progress("cleaning up...");
    Ok(report)
}

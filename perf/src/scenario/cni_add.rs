//! `cni-add`: how long a pod attach takes, from exec of the plugin to its
//! result: `ocelot-cni` through the agent and dataplane, against the
//! standard `ptp` plugin with `host-local` IPAM (a veth and kernel routes,
//! the shape of Calico's attach) on the same machine in the same run. Also
//! the rate of IPAM allocations through Ocelot's shared, locked store.

use crate::report::{Better, Report};
use anyhow::{bail, Context, Result};
use ocelot_tests::{AgentNode, Netns, TempDir};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

pub struct CniAddParams {
    pub pods: usize,
    pub cni_dir: String,
}

/// The `p` quantile (0..=1) of `sorted`, nearest rank; NaN when empty.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn run_plugin(
    node: &Netns,
    plugin: &Path,
    cni_path: &str,
    cmd: &str,
    cid: &str,
    netns: &Path,
    conf: &str,
) -> Result<f64> {
    let t = Instant::now();
    let mut child = Command::new("ip")
        .args(["netns", "exec", &node.name])
        .arg(plugin)
        .env("CNI_COMMAND", cmd)
        .env("CNI_CONTAINERID", cid)
        .env("CNI_NETNS", netns)
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", cni_path)
        .env("CNI_ARGS", format!("IgnoreUnknown=1;K8S_POD_NAMESPACE=perf;K8S_POD_NAME={cid}"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("exec {}", plugin.display()))?;
    use std::io::Write as _;
    child.stdin.take().context("stdin")?.write_all(conf.as_bytes())?;
    let out = child.wait_with_output()?;
    let ms = t.elapsed().as_secs_f64() * 1e3;
    if !out.status.success() {
        bail!(
            "{} {cmd} failed: {}{}",
            plugin.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(ms)
}

/// ADD `n` fresh pod namespaces one after the other, then DEL them all;
/// the time of each call, in ms.
fn attach_all(
    node: &Netns,
    plugin: &Path,
    cni_path: &str,
    conf: &str,
    n: usize,
) -> Result<(Vec<f64>, Vec<f64>)> {
    let pods: Vec<Netns> = (0..n).map(|_| Netns::new("pfc")).collect();
    let mut times = [Vec::new(), Vec::new()];
    for (k, cmd) in ["ADD", "DEL"].iter().enumerate() {
        for (i, pod) in pods.iter().enumerate() {
            times[k].push(run_plugin(
                node,
                plugin,
                cni_path,
                cmd,
                &format!("pod{i}"),
                &pod.path(),
                conf,
            )?);
        }
    }
    let [add, del] = times;
    Ok((add, del))
}

fn summarize(report: &mut Report, path: &str, what: &str, mut v: Vec<f64>) {
    v.sort_by(|a, b| a.total_cmp(b));
    let mean = v.iter().sum::<f64>() / v.len().max(1) as f64;
    report.add(
        &format!("{what}_p50"),
        &format!("CNI {what} p50 (ms)"),
        "ms",
        Better::Lower,
        2,
        path,
        percentile(&v, 0.5),
    );
    report.add(
        &format!("{what}_p99"),
        &format!("CNI {what} p99 (ms)"),
        "ms",
        Better::Lower,
        2,
        path,
        percentile(&v, 0.99),
    );
    report.add(
        &format!("{what}_mean"),
        &format!("CNI {what} mean (ms)"),
        "ms",
        Better::Lower,
        2,
        path,
        mean,
    );
}

pub fn run(p: &CniAddParams, progress: &dyn Fn(&str)) -> Result<Report> {
    let t0 = Instant::now();
    let mut report = Report::new(
        "cni-add",
        &format!("{} pod attaches (ADD) and detaches (DEL), timed from exec to result; ocelot = ocelot-cni via agent and dataplane, ptp = containernetworking ptp + host-local", p.pods),
        &["ocelot", "ptp"],
        "ptp",
    );
    let ptp = Path::new(&p.cni_dir).join("ptp");
    if !ptp.is_file() {
        bail!("{} not found: apt-get install -y containernetworking-plugins", ptp.display());
    }

    progress("ocelot: starting a node (dataplane + agent)");
    let ds = TempDir::new("ocelot-perf-ds-");
    std::fs::write(
        ds.0.join("cluster.yaml"),
        "apiVersion: ocelot.dev/v1\nkind: IPPool\nmetadata: {name: perf}\nspec: {cidr: 10.92.0.0/16}\n---\nkind: Node\napiVersion: v1\nmetadata: {name: perf-node}\n",
    )?;
    let mut pods_yaml = String::new();
    for i in 0..p.pods {
        pods_yaml.push_str(&format!("---\nkind: Pod\napiVersion: v1\nmetadata: {{name: pod{i}, namespace: perf}}\nspec: {{nodeName: perf-node}}\n"));
    }
    std::fs::write(ds.0.join("pods.yaml"), pods_yaml)?;
    let node = AgentNode::start("perf-node", "192.0.2.40", &ds.0);
    let conf = node.cni_config("1.0.0");
    let cni = ocelot_tests::bin("ocelot-cni");
    let bin_dir = ocelot_tests::bin_dir().display().to_string();
    progress(&format!("ocelot: {} ADDs", p.pods));
    let (add, del) = attach_all(&node.ns, &cni, &bin_dir, &conf, p.pods)?;
    summarize(&mut report, "ocelot", "ADD", add);
    summarize(&mut report, "ocelot", "DEL", del);
    drop(node);

    progress(&format!("ptp: {} ADDs", p.pods));
    let node = Netns::new("pfk");
    let data = TempDir::new("ocelot-perf-hl-");
    let conf = format!(
        r#"{{"cniVersion":"1.0.0","name":"ref","type":"ptp","ipMasq":false,"ipam":{{"type":"host-local","subnet":"10.93.0.0/16","dataDir":"{}"}}}}"#,
        data.0.display()
    );
    let (add, del) = attach_all(&node, &ptp, &p.cni_dir, &conf, p.pods)?;
    summarize(&mut report, "ptp", "ADD", add);
    summarize(&mut report, "ptp", "DEL", del);
    drop(node);

    progress("ocelot: IPAM allocations per second (shared locked file store)");
    let dir = TempDir::new("ocelot-perf-ipam-");
    let store = ocelot_control::ipam::store::FileStore::open(&dir.0)?;
    let req = ocelot_control::ipam::Request::Auto {
        pools: vec![ocelot_control::ipam::PoolSpec {
            name: "p".into(),
            cidr: "10.94.0.0/16".parse().map_err(anyhow::Error::msg)?,
            block_size: 26,
        }],
    };
    let n = 2000;
    let t = Instant::now();
    for i in 0..n {
        let a = ocelot_control::ipam::Allocation {
            handle: format!("h{i}"),
            node: "n".into(),
            pod: String::new(),
            attrs: Default::default(),
        };
        store.transact(|st| {
            ocelot_control::ipam::Ipam { state: st, node: "n" }.allocate(&req, a)
        })??;
    }
    let rate = n as f64 / t.elapsed().as_secs_f64();
    report.add(
        "ipam_allocs",
        "IPAM allocations per second (2,000 into one state)",
        "1/s",
        Better::Higher,
        0,
        "ocelot",
        rate,
    );
    report.notes.push("IPAM rate: each allocation is one locked read-modify-write-rename of the shared state file (fsync'd), the cost that makes concurrent agents safe".into());
    report.duration_s = t0.elapsed().as_secs_f64();
    Ok(report)
}

//! `services`: new TCP connections per second, and the connect time (the
//! first packet's trip through the translation), from a pod to a ClusterIP
//! on one node, with N Services installed, through Ocelot's dataplane and
//! through the kernel with the rules kube-proxy (iptables mode) writes, in
//! one run, for each N asked.
//!
//! Every Service has two backends, both the server pod (on two ports), so
//! each translation picks one: Ocelot by its Maglev table, the kernel by
//! kube-proxy's chains: `KUBE-SERVICES` (one rule per Service, matched in
//! order) → `KUBE-SVC-*` (`statistic --mode random`) → `KUBE-SEP-*`
//! (DNAT). The target is the middle Service, so the kernel walks half of
//! `KUBE-SERVICES` per new connection, as on average in a real cluster.
//! Established packets skip the chains in both paths (conntrack).
//!
//! Each measurement uses cluster IPs and server ports of its own: the
//! server closes first, so its TIME_WAIT sockets (and both paths'
//! connection tracking) remember every 4-tuple of the previous run, and a
//! reused one costs a retransmitted SYN (a second) in a later run.

use crate::interrupt;
use crate::report::{Better, Comparison, Report};
use crate::scenario::conn_rate::{
    attempt, connect_loop, ms_since, record_connects, run_with_input, Server,
};
use crate::topo::{cmd, KernelSameNode, OcelotSameNode, PodPair};
use anyhow::{bail, Context, Result};
use ocelot_dataplane::api::client::Client;
use ocelot_dataplane::api::{
    Backend, Cidr, Frontend, FrontendKind, Request, ServiceSpec, ServicesSpec,
};
use ocelot_dataplane::policy::Proto;
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Instant;

/// Where cluster IPs come from.
pub const SERVICE_CIDR: &str = "10.96.0.0/12";
/// The Services' port.
pub const SERVICE_PORT: u16 = 80;

#[derive(Clone, Debug, serde::Serialize)]
pub struct ServicesParams {
    /// How many Services, one measurement each (e.g. 10 and 5000).
    pub counts: Vec<usize>,
    pub duration: u32,
    pub warmup: u32,
    pub parallel: usize,
    /// The server pod's first port (it also serves the next one).
    pub port: u16,
    pub pool: String,
    pub node_ip: String,
    pub client_ip: Ipv4Addr,
    pub server_ip: Ipv4Addr,
    pub dp_args: String,
}

/// Service `i`'s cluster IP: 10.96.0.10 and up.
pub fn cluster_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 10)) + i as u32)
}

/// The first Service of measurement round `round`: rounds never share a
/// cluster IP.
pub fn round_base(round: usize) -> usize {
    round * 8192
}

/// The server's two ports in round `round`.
pub fn round_ports(port: u16, round: usize) -> [u16; 2] {
    let p = port.wrapping_add(2 * round as u16);
    [p, p.wrapping_add(1)]
}

/// The Service every connection goes to: the middle one.
pub fn target(n: usize) -> usize {
    n / 2
}

/// `n` Services for Ocelot, from cluster IP number `base`, each with the
/// server's two `ports` as backends.
pub fn ocelot_spec(n: usize, base: usize, server: Ipv4Addr, ports: [u16; 2]) -> ServicesSpec {
    let services = (base..base + n)
        .map(|i| ServiceSpec {
            name: format!("perf/svc-{i}:{SERVICE_PORT}"),
            proto: Proto::Tcp,
            frontends: vec![Frontend {
                addr: cluster_ip(i).into(),
                port: SERVICE_PORT,
                kind: FrontendKind::ClusterIp,
            }],
            backends: ports
                .into_iter()
                .map(|p| Backend {
                    addr: IpAddr::V4(server),
                    port: p,
                    local: true,
                    ready: true,
                    serving: true,
                    terminating: false,
                })
                .collect(),
            affinity_timeout_s: 0,
            external_local: false,
            internal_local: false,
        })
        .collect();
    ServicesSpec {
        services,
        service_cidrs: vec![SERVICE_CIDR.parse::<Cidr>().expect("a CIDR")],
        ..Default::default()
    }
}

/// The nat table kube-proxy (iptables mode) writes for the same Services,
/// as `iptables-restore` input (chain names hashed as kube-proxy's are:
/// 16 characters after the prefix).
pub fn kube_proxy_rules(n: usize, base: usize, server: Ipv4Addr, ports: [u16; 2]) -> String {
    let mut t = String::from(
        "*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n\
         :POSTROUTING ACCEPT [0:0]\n:KUBE-SERVICES - [0:0]\n",
    );
    let svc = |i: usize| format!("KUBE-SVC-{i:016X}");
    let sep = |i: usize, j: usize| format!("KUBE-SEP-{:016X}", i * 2 + j);
    for i in base..base + n {
        let _ = writeln!(t, ":{} - [0:0]\n:{} - [0:0]\n:{} - [0:0]", svc(i), sep(i, 0), sep(i, 1));
    }
    t.push_str(
        "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n",
    );
    for i in base..base + n {
        let _ = writeln!(
            t,
            "-A KUBE-SERVICES -d {}/32 -p tcp -m comment --comment \"perf/svc-{i} cluster IP\" \
             -m tcp --dport {SERVICE_PORT} -j {}",
            cluster_ip(i),
            svc(i)
        );
        let _ = writeln!(
            t,
            "-A {} -m comment --comment \"perf/svc-{i} -> {server}\" -m statistic \
             --mode random --probability 0.50000000000 -j {}",
            svc(i),
            sep(i, 0)
        );
        let _ = writeln!(t, "-A {} -j {}", svc(i), sep(i, 1));
        for (j, p) in ports.into_iter().enumerate() {
            let _ =
                writeln!(t, "-A {} -p tcp -m tcp -j DNAT --to-destination {server}:{p}", sep(i, j));
        }
    }
    t.push_str("COMMIT\n");
    t
}

/// The nat table emptied.
const NAT_EMPTY: &str = "*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n\
                         :OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\nCOMMIT\n";

/// Measure one path with its Services loaded: check that both backends
/// answer through the cluster IP, then loop.
fn measure(
    report: &mut Report,
    p: &ServicesParams,
    path: &str,
    pair: &dyn PodPair,
    n: usize,
    base: usize,
    progress: &dyn Fn(&str),
) -> Result<()> {
    let to = SocketAddr::from((cluster_ip(base + target(n)), SERVICE_PORT));
    let client = pair.client().path();
    let probe = connect_loop(&client, to, 1, 0.3)?;
    if probe.connections == 0 {
        bail!(
            "no connection through {to} ({} failed): the Services are not in force",
            probe.failures
        );
    }
    record_connects(
        report,
        path,
        &client,
        to,
        (p.warmup, p.duration, p.parallel),
        "TCP connect/close rate to a ClusterIP (conn/s)",
        progress,
    )
}

pub fn run(p: &ServicesParams, progress: &dyn Fn(&str)) -> Result<Report> {
    let t0 = Instant::now();
    let paths: Vec<String> =
        p.counts.iter().flat_map(|n| [format!("ocelot-{n}"), format!("kube-proxy-{n}")]).collect();
    let path_refs: Vec<&str> = paths.iter().map(String::as_str).collect();
    let comparisons = p
        .counts
        .iter()
        .map(|n| Comparison::new(&format!("ocelot-{n}"), &format!("kube-proxy-{n}")))
        .collect();
    let mut report = Report::with_comparisons(
        "services",
        &format!(
            "TCP connect/close loop, pod {} -> a ClusterIP (the middle of N Services, 2 \
             backends each: the server pod {} on two ports from {}), on one node; ocelot = \
             user-space dataplane (set_services), kube-proxy = the iptables nat rules \
             kube-proxy writes (KUBE-SERVICES -> KUBE-SVC statistic -> KUBE-SEP DNAT)",
            p.client_ip, p.server_ip, p.port
        ),
        &path_refs,
        comparisons,
    );
    report.params = serde_json::to_value(p)?;
    let (cip, sip) = (p.client_ip.to_string(), p.server_ip.to_string());
    progress("setting up the ocelot node and pods...");
    let ocelot = OcelotSameNode::start(&p.node_ip, &p.pool, &cip, &sip, &p.dp_args);
    interrupt::check()?;
    progress("setting up the kernel (Calico-style) node and pods...");
    let kernel = KernelSameNode::start(&p.node_ip, &cip, &sip);
    interrupt::check()?;
    for pair in [&ocelot as &dyn PodPair, &kernel] {
        pair.check_connectivity()?;
        cmd(&format!(
            "ip netns exec {} sysctl -qw net.ipv4.ip_local_port_range='1024 65535'",
            pair.client().name
        ))?;
    }
    let node = kernel.node.name.clone();
    for (round, &n) in p.counts.iter().enumerate() {
        let (base, ports) = (round_base(round), round_ports(p.port, round));
        let mut servers = Vec::new();
        for pair in [&ocelot as &dyn PodPair, &kernel] {
            for port in ports {
                servers.push(Server::start(&pair.server().path(), port)?);
            }
        }
        let path = format!("ocelot-{n}");
        attempt(&mut report, &path, progress, |r| {
            let t = Instant::now();
            let mut c = Client::connect(&ocelot.node.socket(), "ocelot-perf")?;
            c.call(Request::SetServices { services: ocelot_spec(n, base, p.server_ip, ports) })
                .context("set_services")?;
            let load = ms_since(t);
            progress(&format!("[{path}] {n} Services set in {load:.0} ms"));
            r.add("load_ms", "loading the Services (ms)", "ms", Better::Lower, 0, &path, load);
            measure(r, p, &path, &ocelot, n, base, progress)
        })?;
        let path = format!("kube-proxy-{n}");
        attempt(&mut report, &path, progress, |r| {
            let t = Instant::now();
            run_with_input(
                &node,
                "iptables-restore",
                &[],
                &kube_proxy_rules(n, base, p.server_ip, ports),
            )?;
            let load = ms_since(t);
            progress(&format!("[{path}] {n} Services' rules loaded in {load:.0} ms"));
            r.add("load_ms", "loading the Services (ms)", "ms", Better::Lower, 0, &path, load);
            measure(r, p, &path, &kernel, n, base, progress)
        })?;
        drop(servers);
    }
    let _ = run_with_input(&node, "iptables-restore", &[], NAT_EMPTY);
    report.notes.push(format!(
        "{} connect loop(s); the server accepts and closes at once, the client waits for its \
         FIN and closes; the loops share the machine's cores with the dataplane",
        p.parallel
    ));
    report.notes.push(format!("ran in {:.0} s", t0.elapsed().as_secs_f64()));
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_and_rules_describe_the_same_services() {
        let server = Ipv4Addr::new(10, 66, 0, 3);
        let s = ocelot_spec(3, 0, server, [8080, 8081]);
        assert_eq!(s.services.len(), 3);
        assert_eq!(s.services[2].frontends[0].addr, IpAddr::V4(Ipv4Addr::new(10, 96, 0, 12)));
        let ports: Vec<u16> = s.services[0].backends.iter().map(|b| b.port).collect();
        assert_eq!(ports, [8080, 8081]);
        let t = kube_proxy_rules(3, 0, server, [8080, 8081]);
        assert_eq!(t.matches("-A KUBE-SERVICES -d").count(), 3);
        assert_eq!(t.matches("--mode random --probability 0.5").count(), 3);
        assert!(t.contains("-A KUBE-SERVICES -d 10.96.0.12/32 -p tcp"));
        assert!(t.contains("-j DNAT --to-destination 10.66.0.3:8081"));
        assert!(t.ends_with("COMMIT\n"));
        assert_eq!(target(5000), 2500);
        assert_eq!(round_ports(8080, 1), [8082, 8083]);
        let later = ocelot_spec(2, round_base(1), server, round_ports(8080, 1));
        assert_eq!(later.services[0].frontends[0].addr, IpAddr::V4(cluster_ip(8192)));
        let rules = kube_proxy_rules(1, round_base(1), server, [1, 2]);
        assert!(rules.contains(&cluster_ip(8192).to_string()));
        assert!(SERVICE_CIDR.parse::<Cidr>().unwrap().contains(cluster_ip(5000).into()));
    }
}

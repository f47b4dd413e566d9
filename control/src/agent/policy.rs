//! The calculation's view of the cluster (pods, namespaces,
//! NetworkPolicies, and every pod's addresses from the IPAM state, on every
//! node), and the difference from what the dataplane already has: only
//! endpoints whose rules changed are sent.

use crate::datastore::Cluster;
use crate::ipam::IpamState;
use crate::policy::calc::{Model, PodInfo};
use ocelot_dataplane::policy::EndpointPolicy;
use std::collections::BTreeMap;
use std::net::IpAddr;

/// The calculation's view of the cluster: pods with the addresses IPAM
/// gave them (a pod without addresses cannot be a peer yet).
pub fn model(cluster: &Cluster, ipam: &IpamState) -> Model {
    let mut ips: BTreeMap<&str, Vec<IpAddr>> = BTreeMap::new();
    let mut taken = std::collections::HashSet::new();
    for b in ipam.blocks.values() {
        for (ip, a) in &b.allocations {
            taken.insert(*ip);
            if !a.pod.is_empty() {
                ips.entry(a.pod.as_str()).or_default().push(*ip);
            }
        }
    }
    let pods = cluster
        .pods
        .iter()
        .map(|(k, p)| {
            let info = PodInfo {
                namespace: p.namespace().to_string(),
                labels: p.metadata.labels.clone(),
                ips: pod_ips(ips.get(k.as_str()), p, &taken),
                ports: p.spec.containers.iter().flat_map(|c| c.ports.iter().cloned()).collect(),
            };
            (k.clone(), info)
        })
        .collect();
    Model {
        namespaces: cluster
            .namespaces
            .iter()
            .map(|(k, n)| (k.clone(), n.metadata.labels.clone()))
            .collect(),
        pods,
        policies: cluster.policies.clone(),
    }
}

/// A pod's addresses: those IPAM gave it, then those of its
/// `status.podIPs` (the Kubernetes datastore) that IPAM has given to
/// nobody: IPAM is the truth for its own addresses (a status can lag
/// behind an address's reuse), the status for the others.
fn pod_ips(
    from_ipam: Option<&Vec<IpAddr>>,
    pod: &crate::model::Pod,
    taken: &std::collections::HashSet<IpAddr>,
) -> Vec<IpAddr> {
    let mut v = from_ipam.cloned().unwrap_or_default();
    for ip in pod.status_ips() {
        if !v.contains(&ip) && !taken.contains(&ip) {
            v.push(ip);
        }
    }
    v
}

/// What to send: the endpoints whose policy differs from `sent`.
pub fn delta(
    sent: &BTreeMap<String, EndpointPolicy>,
    want: &BTreeMap<String, EndpointPolicy>,
) -> Vec<(String, EndpointPolicy)> {
    want.iter()
        .filter(|(k, v)| sent.get(*k) != Some(*v))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ipam::{Allocation, Block};
    use crate::model::{parse_documents, Object};
    use crate::policy::calc::Graph;

    const CLUSTER: &str = r#"
kind: Namespace
metadata: {name: x, labels: {kubernetes.io/metadata.name: x}}
---
kind: Pod
metadata: {name: a, namespace: x, labels: {app: web}}
spec: {nodeName: n1, containers: [{name: c, ports: [{name: http, containerPort: 8080}]}]}
---
kind: Pod
metadata: {name: b, namespace: x, labels: {app: client}}
spec: {nodeName: n2, containers: [{name: c}]}
---
kind: NetworkPolicy
metadata: {name: web, namespace: x}
spec:
  podSelector: {matchLabels: {app: web}}
  ingress: [{from: [{podSelector: {matchLabels: {app: client}}}], ports: [{port: http}]}]
"#;

    fn setup() -> (Cluster, IpamState) {
        let (objs, _) = parse_documents(CLUSTER).unwrap();
        let cluster = Cluster::from_objects(objs.iter().collect::<Vec<&Object>>());
        let alloc = |pod: &str, node: &str| Allocation {
            handle: format!("h-{pod}"),
            node: node.into(),
            pod: pod.into(),
            attrs: Default::default(),
        };
        let block = Block {
            cidr: "10.65.0.0/26".parse().unwrap(),
            pool: "p".into(),
            affinity: Some("n1".into()),
            allocations: [
                ("10.65.0.2".parse().unwrap(), alloc("x/a", "n1")),
                ("10.65.0.3".parse().unwrap(), alloc("x/b", "n2")),
            ]
            .into_iter()
            .collect(),
            host_local: false,
        };
        (cluster, IpamState { blocks: [(block.cidr, block)].into_iter().collect() })
    }

    #[test]
    fn status_addresses_complete_ipam_but_never_override_it() {
        let (mut cluster, ipam) = setup();
        let status = |ips: &[&str]| crate::model::PodStatus {
            pod_ips: ips.iter().map(|i| crate::model::PodIp { ip: i.to_string() }).collect(),
        };
        // x/a: its IPAM address, and the same in its status once only; an
        // address of x/b's in a stale status is not taken; one outside
        // IPAM is (another CNI's pod, or a pod from before Ocelot).
        cluster.pods.get_mut("x/a").unwrap().status =
            status(&["10.65.0.2", "10.65.0.3", "192.168.9.9", "bogus"]);
        let m = model(&cluster, &ipam);
        let ips: Vec<String> = m.pods["x/a"].ips.iter().map(|i| i.to_string()).collect();
        assert_eq!(ips, ["10.65.0.2", "192.168.9.9"]);
        assert_eq!(m.pods["x/b"].ips.len(), 1);
    }

    #[test]
    fn endpoints_get_resolved_rules_and_only_changes_are_sent() {
        let (mut cluster, ipam) = setup();
        let m = model(&cluster, &ipam);
        assert_eq!(m.pods["x/b"].ips, vec!["10.65.0.3".parse::<IpAddr>().unwrap()]);
        let eps: BTreeMap<String, String> =
            [("ep-a".to_string(), "x/a".to_string()), ("ep-b".to_string(), "x/b".to_string())]
                .into_iter()
                .collect();
        let want = Graph::new(m, eps.clone()).results;
        let a = &want["ep-a"];
        let rules = a.ingress.as_ref().expect("x/a is isolated for ingress");
        assert_eq!(rules.len(), 1);
        let peers = rules[0].peers.as_ref().unwrap();
        assert_eq!(peers[0].cidr.to_string(), "10.65.0.3/32");
        let ports = rules[0].ports.as_ref().unwrap();
        assert_eq!((ports[0].first, ports[0].last), (8080, 8080), "named port resolved");
        assert!(a.egress.is_none());
        assert_eq!(want["ep-b"], EndpointPolicy::default(), "x/b is not selected");
        // Nothing changed: nothing to send. A label change on the client
        // changes x/a's rules (its peer set), not x/b's.
        assert!(delta(&want, &want).is_empty());
        cluster.pods.get_mut("x/b").unwrap().metadata.labels.insert("app".into(), "other".into());
        let again = Graph::new(model(&cluster, &ipam), eps).results;
        let d = delta(&want, &again);
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].0, "ep-a");
        assert_eq!(d[0].1.ingress.as_ref().unwrap()[0].peers.as_ref().unwrap().len(), 0);
    }
}

//! What the agent tells the cluster about its node: annotations the other
//! agents read (the VTEP MAC, `overlay::VTEP_MAC_ANNOTATION`; the underlay
//! address with its prefix), the Node's `NetworkUnavailable` condition set
//! to False once the dataplane forwards (as Calico sets it, reason
//! `OcelotIsUp`), and Events on failures (`events.k8s.io/v1`, regarding
//! the Node, deduplicated into series by kube's `Recorder`).
//!
//! What to publish is computed by pure functions ([`node_annotations`],
//! [`annotations_patch`], [`network_up_patch`]); [`Publisher`] only sends.

use crate::agent::overlay;
use crate::model;
use k8s_openapi::api::core::v1::{Node, ObjectReference};
use kube::api::{Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Api, Client};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// The node's underlay address and prefix (`192.0.2.11/24`), as Calico's
/// `projectcalico.org/IPv4Address`.
pub const IPV4_ADDRESS_ANNOTATION: &str = "ocelot.dev/ipv4-address";

/// The condition's reason while Ocelot runs on the node.
pub const UP_REASON: &str = "OcelotIsUp";

/// The annotations this node should carry: its VTEP MAC (the one its
/// dataplane answers to: the annotation's own value if valid, else derived
/// from the name, exactly what the peers compute) and, when known, its
/// underlay address.
pub fn node_annotations(
    node: &model::Node,
    underlay: Option<(Ipv4Addr, u8)>,
) -> BTreeMap<String, String> {
    let mut a = BTreeMap::new();
    a.insert(overlay::VTEP_MAC_ANNOTATION.to_string(), overlay::vtep_mac(node).to_string());
    if let Some((ip, len)) = underlay {
        a.insert(IPV4_ADDRESS_ANNOTATION.to_string(), format!("{ip}/{len}"));
    }
    a
}

/// A merge patch setting the annotations of `want` that `current` lacks or
/// has otherwise; None when there is nothing to change.
pub fn annotations_patch(current: &model::Node, want: &BTreeMap<String, String>) -> Option<Value> {
    let changed: serde_json::Map<String, Value> = want
        .iter()
        .filter(|(k, v)| current.metadata.annotations.get(*k) != Some(*v))
        .map(|(k, v)| (k.clone(), Value::String(v.clone())))
        .collect();
    (!changed.is_empty()).then(|| json!({ "metadata": { "annotations": changed } }))
}

/// A strategic merge patch of the Node's status: `NetworkUnavailable`
/// False (conditions merge by `type`, so the kubelet's stay). `now` is
/// RFC 3339.
pub fn network_up_patch(now: &str) -> Value {
    json!({
        "status": {
            "conditions": [{
                "type": "NetworkUnavailable",
                "status": "False",
                "reason": UP_REASON,
                "message": "Ocelot is running on this node",
                "lastTransitionTime": now,
                "lastHeartbeatTime": now,
            }]
        }
    })
}

/// RFC 3339 (seconds, UTC) of a time since the Unix epoch: what the API
/// server takes for a `metav1.Time`.
pub fn rfc3339(since_epoch: std::time::Duration) -> String {
    let secs = since_epoch.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
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

/// Why a publication failed.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// The API server refused or could not be reached.
    #[error("{what}: {err}")]
    Api { what: &'static str, err: kube::Error },
}

/// Sends what the functions above compute, for one node.
#[derive(Clone)]
pub struct Publisher {
    node: String,
    nodes: Api<Node>,
    recorder: Recorder,
}

impl Publisher {
    pub fn new(client: Client, node: &str) -> Publisher {
        let reporter = Reporter { controller: "ocelot-agent".into(), instance: Some(node.into()) };
        Publisher {
            node: node.to_string(),
            nodes: Api::all(client.clone()),
            recorder: Recorder::new(client, reporter),
        }
    }

    /// Set the annotations `want` on the Node, if `current` lacks them.
    /// True when a patch was sent.
    pub async fn annotate(
        &self,
        current: &model::Node,
        want: &BTreeMap<String, String>,
    ) -> Result<bool, PublishError> {
        let Some(patch) = annotations_patch(current, want) else { return Ok(false) };
        self.nodes
            .patch(&self.node, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map_err(|err| PublishError::Api { what: "annotating the Node", err })?;
        Ok(true)
    }

    /// `NetworkUnavailable` False on the Node's status.
    pub async fn network_up(&self, now: &str) -> Result<(), PublishError> {
        self.nodes
            .patch_status(
                &self.node,
                &PatchParams::default(),
                &Patch::Strategic(network_up_patch(now)),
            )
            .await
            .map_err(|err| PublishError::Api { what: "setting NetworkUnavailable=False", err })?;
        Ok(())
    }

    /// A Warning Event regarding the Node (`reason` in PascalCase, e.g.
    /// `IPAMExhausted`, `DataplaneUnreachable`).
    pub async fn warn(&self, reason: &str, note: &str) -> Result<(), PublishError> {
        let ev = Event {
            type_: EventType::Warning,
            reason: reason.to_string(),
            note: Some(note.chars().take(1000).collect()),
            action: reason.to_string(),
            secondary: None,
        };
        let reference = ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Node".into()),
            name: Some(self.node.clone()),
            ..Default::default()
        };
        self.recorder
            .publish(&ev, &reference)
            .await
            .map_err(|err| PublishError::Api { what: "posting an Event", err })
    }
}

/// Allows one action per key per interval: Events about a failure that
/// repeats every retry (a dataplane that stays away) are posted once a
/// minute, not at the retry pace.
#[derive(Debug, Default)]
pub struct RateLimit {
    last: BTreeMap<String, std::time::Instant>,
}

impl RateLimit {
    /// True (and remembered) when `key` was not allowed within `every`
    /// before `now`.
    pub fn allow(
        &mut self,
        key: &str,
        now: std::time::Instant,
        every: std::time::Duration,
    ) -> bool {
        match self.last.get(key) {
            Some(t) if now.saturating_duration_since(*t) < every => false,
            _ => {
                self.last.insert(key.to_string(), now);
                true
            }
        }
    }
}

/// What the agent holds on Kubernetes: the client and runtime of the
/// datastore (for the IPAM store too), and the node publishing state.
pub struct KubeLink {
    pub client: Client,
    pub handle: tokio::runtime::Handle,
    publisher: Publisher,
    /// NetworkUnavailable=False sent since the start.
    up_sent: Arc<AtomicBool>,
    /// A publication is under way.
    busy: Arc<AtomicBool>,
    /// Failed publications and Events: one attempt per key per interval.
    limits: std::sync::Mutex<RateLimit>,
}

/// The pause after a failed publication before the next attempt.
const RETRY: std::time::Duration = std::time::Duration::from_secs(5);
/// At most one Event per reason in this interval.
const EVENT_EVERY: std::time::Duration = std::time::Duration::from_secs(60);
/// The longest one publication may take.
const CALL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

impl KubeLink {
    pub fn new(client: Client, handle: tokio::runtime::Handle, node: &str) -> KubeLink {
        KubeLink {
            publisher: Publisher::new(client.clone(), node),
            client,
            handle,
            up_sent: Default::default(),
            busy: Default::default(),
            limits: Default::default(),
        }
    }

    fn allow(&self, key: &str, every: std::time::Duration) -> bool {
        let mut l = self.limits.lock().unwrap_or_else(|e| e.into_inner());
        l.allow(key, std::time::Instant::now(), every)
    }

    /// Once the dataplane has applied the overlay: the annotations `node`
    /// lacks, then NetworkUnavailable=False (once). Sent in the background
    /// (a CNI ADD that reconnects the dataplane never waits for the API
    /// server); nothing is sent when everything is in place, one
    /// publication runs at a time, and a failed one is tried again at a
    /// later call, 5 s on.
    pub fn publish_node(&self, node: &model::Node, underlay: (Ipv4Addr, u8)) {
        let want = node_annotations(node, Some(underlay));
        let needs_annotations = annotations_patch(node, &want).is_some();
        let needs_up = !self.up_sent.load(Ordering::Acquire);
        if !(needs_annotations || needs_up) || self.busy.load(Ordering::Acquire) {
            return;
        }
        if !self.allow("publish", RETRY) || self.busy.swap(true, Ordering::AcqRel) {
            return;
        }
        let (p, node, up_sent, busy) =
            (self.publisher.clone(), node.clone(), self.up_sent.clone(), self.busy.clone());
        self.handle.spawn(async move {
            let work = async {
                if needs_annotations {
                    p.annotate(&node, &want).await?;
                    tracing::info!(?want, "node annotations published");
                }
                if needs_up {
                    let now = rfc3339(
                        std::time::SystemTime::now()
                            .duration_since(std::time::UNIX_EPOCH)
                            .unwrap_or_default(),
                    );
                    p.network_up(&now).await?;
                    up_sent.store(true, Ordering::Release);
                    tracing::info!("node condition NetworkUnavailable=False ({UP_REASON})");
                }
                Ok::<(), PublishError>(())
            };
            match tokio::time::timeout(CALL_TIMEOUT, work).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!("cannot publish the node: {e}"),
                Err(_) => tracing::warn!("cannot publish the node: no answer in {CALL_TIMEOUT:?}"),
            }
            busy.store(false, Ordering::Release);
        });
    }

    /// A Warning Event regarding the node, at most once a minute per
    /// reason; sent in the background (never blocks the caller).
    pub fn warn(&self, reason: &str, note: &str) {
        if !self.allow(&format!("event:{reason}"), EVENT_EVERY) {
            return;
        }
        let p = self.publisher.clone();
        let (reason, note) = (reason.to_string(), note.to_string());
        self.handle.spawn(async move {
            if let Err(e) = p.warn(&reason, &note).await {
                tracing::warn!(%reason, "cannot post the Event: {e}");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{parse_documents, Object};

    fn node(yaml: &str) -> model::Node {
        let (objs, _) = parse_documents(yaml).unwrap();
        let Object::Node(n) = objs.into_iter().next().unwrap() else { panic!() };
        n
    }

    #[test]
    fn annotations_follow_what_peers_compute() {
        let n = node("kind: Node\nmetadata: {name: n1}\n");
        let want = node_annotations(&n, Some(("192.0.2.11".parse().unwrap(), 24)));
        assert_eq!(want[overlay::VTEP_MAC_ANNOTATION], overlay::vtep_mac(&n).to_string());
        assert_eq!(want[IPV4_ADDRESS_ANNOTATION], "192.0.2.11/24");
        let patch = annotations_patch(&n, &want).unwrap();
        assert_eq!(patch["metadata"]["annotations"].as_object().unwrap().len(), 2);
        // Once published, the node reads back the same MAC and nothing is sent.
        let mut published = n.clone();
        for (k, v) in &want {
            published.metadata.annotations.insert(k.clone(), v.clone());
        }
        assert_eq!(overlay::vtep_mac(&published), overlay::vtep_mac(&n));
        assert_eq!(annotations_patch(&published, &want), None);
        // A changed address is patched alone.
        let moved = node_annotations(&published, Some(("192.0.2.12".parse().unwrap(), 24)));
        let p = annotations_patch(&published, &moved).unwrap();
        assert_eq!(
            p,
            json!({"metadata": {"annotations": {IPV4_ADDRESS_ANNOTATION: "192.0.2.12/24"}}})
        );
        // A configured MAC is kept, a bad one replaced by the derived one.
        let set = node("kind: Node\nmetadata: {name: n1, annotations: {ocelot.dev/vxlan-tunnel-mac: '66:00:00:00:00:09'}}\n");
        assert_eq!(node_annotations(&set, None)[overlay::VTEP_MAC_ANNOTATION], "66:00:00:00:00:09");
        let bad = node("kind: Node\nmetadata: {name: n1, annotations: {ocelot.dev/vxlan-tunnel-mac: 'nope'}}\n");
        assert!(annotations_patch(&bad, &node_annotations(&bad, None)).is_some());
    }

    #[test]
    fn rate_limit() {
        let mut r = RateLimit::default();
        let t = std::time::Instant::now();
        let min = std::time::Duration::from_secs(60);
        assert!(r.allow("a", t, min));
        assert!(!r.allow("a", t + std::time::Duration::from_secs(59), min));
        assert!(r.allow("b", t, min), "per key");
        assert!(r.allow("a", t + min, min));
    }

    #[test]
    fn condition_and_time() {
        let p = network_up_patch("2026-11-23T19:00:00Z");
        let c = &p["status"]["conditions"][0];
        assert_eq!(
            (c["type"].as_str(), c["status"].as_str()),
            (Some("NetworkUnavailable"), Some("False"))
        );
        assert_eq!(c["reason"], UP_REASON);
        assert_eq!(rfc3339(std::time::Duration::ZERO), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(std::time::Duration::from_secs(1_700_000_000)), "2023-11-14T22:13:20Z");
        assert_eq!(rfc3339(std::time::Duration::from_secs(951_782_400)), "2000-02-29T00:00:00Z");
    }
}

//! A watcher's events applied to one map of the [`Cluster`], converted on
//! the way in: a reflector whose store holds model objects, not API
//! objects. No I/O: the datastore feeds it from `kube::runtime::watcher`,
//! the tests feed it by hand.
//!
//! A (re)list is buffered and swapped in whole at its end (`InitDone`), so
//! an object deleted while the watch was broken disappears then, and until
//! then the last good state stays in place. An object that does not convert
//! is reported and skipped; if an earlier version of it converted, that
//! version is kept (as the directory datastore keeps a bad file's last good
//! content).

use super::convert::ToModel;
use crate::datastore::Cluster;
use kube::runtime::watcher::Event;
use std::collections::BTreeMap;

/// What one kind's watcher has done so far: the readiness and health the
/// agent reports.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct WatcherHealth {
    /// The initial list has completed once (it stays true through later
    /// relists and outages: the data is there, maybe stale).
    pub listed: bool,
    /// The last error since the last successful event, if any.
    pub failing: Option<String>,
    /// The last error ever seen.
    pub last_error: Option<String>,
    /// Objects skipped because they do not convert, with why.
    pub invalid: BTreeMap<String, String>,
    /// Successful events, and complete (re)lists.
    pub events: u64,
    pub lists: u64,
}

/// The watch state of one kind `K`.
pub struct Reflect<K: ToModel> {
    /// Objects of a list in progress.
    pending: Option<BTreeMap<String, K::Model>>,
    /// Keys seen by the list in progress, converted or not.
    listed: std::collections::BTreeSet<String>,
    pub health: WatcherHealth,
}

impl<K: ToModel> Default for Reflect<K> {
    fn default() -> Self {
        Reflect { pending: None, listed: Default::default(), health: WatcherHealth::default() }
    }
}

impl<K: ToModel> Reflect<K> {
    /// Apply one event to `cluster`; true when the cluster changed.
    pub fn apply(&mut self, cluster: &mut Cluster, ev: Event<K>) -> bool {
        self.health.events += 1;
        self.health.failing = None;
        match ev {
            Event::Init => {
                self.pending = Some(BTreeMap::new());
                self.listed.clear();
                false
            }
            Event::InitApply(obj) => {
                if let Ok(k) = obj.key() {
                    self.listed.insert(k);
                }
                let map = K::slot(cluster);
                if let Some((key, m)) = self.convert(&obj, map) {
                    self.pending.get_or_insert_with(BTreeMap::new).insert(key, m);
                }
                false
            }
            Event::InitDone => {
                let new = self.pending.take().unwrap_or_default();
                self.health.listed = true;
                self.health.lists += 1;
                let map = K::slot(cluster);
                let listed = std::mem::take(&mut self.listed);
                self.health.invalid.retain(|k, _| listed.contains(k));
                if *map == new {
                    false
                } else {
                    *map = new;
                    true
                }
            }
            Event::Apply(obj) => {
                let map = K::slot(cluster);
                match self.convert(&obj, map) {
                    Some((key, m)) if map.get(&key) != Some(&m) => {
                        map.insert(key, m);
                        true
                    }
                    _ => false,
                }
            }
            Event::Delete(obj) => match obj.key() {
                Ok(key) => {
                    self.health.invalid.remove(&key);
                    K::slot(cluster).remove(&key).is_some()
                }
                Err(e) => {
                    self.reject("?".into(), e.to_string());
                    false
                }
            },
        }
    }

    /// A watch error: recorded; the state stays as it is (the watcher
    /// retries, with backoff, and relists when its version expired).
    pub fn error(&mut self, err: String) {
        // Said once per failure; its retries (every backoff step) quietly.
        if self.health.failing.as_ref() != Some(&err) {
            tracing::warn!(kind = K::KIND, "watch failed, keeping the last state: {err}");
        } else {
            tracing::debug!(kind = K::KIND, "watch still failing: {err}");
        }
        self.health.failing = Some(err.clone());
        self.health.last_error = Some(err);
    }

    /// The object converted, or its last good version, or nothing.
    fn convert(
        &mut self,
        obj: &K,
        current: &BTreeMap<String, K::Model>,
    ) -> Option<(String, K::Model)> {
        let key = match obj.key() {
            Ok(k) => k,
            Err(e) => {
                self.reject("?".into(), e.to_string());
                return None;
            }
        };
        match obj.to_model() {
            Ok(m) => {
                self.health.invalid.remove(&key);
                Some((key, m))
            }
            Err(e) => {
                self.reject(key.clone(), e.to_string());
                current.get(&key).cloned().map(|m| (key, m))
            }
        }
    }

    fn reject(&mut self, key: String, err: String) {
        tracing::error!(kind = K::KIND, %key, "object rejected: {err}");
        self.health.invalid.insert(key, err);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{Namespace, Pod};
    use k8s_openapi::api::networking::v1::NetworkPolicy;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    fn ns(name: &str, team: &str) -> Namespace {
        Namespace {
            metadata: ObjectMeta {
                name: Some(name.into()),
                labels: Some([("team".to_string(), team.to_string())].into()),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    #[test]
    fn list_watch_relist() {
        let mut c = Cluster::default();
        let mut r = Reflect::<Namespace>::default();
        assert!(!r.apply(&mut c, Event::Init));
        assert!(!r.apply(&mut c, Event::InitApply(ns("a", "x"))));
        assert!(!r.apply(&mut c, Event::InitApply(ns("b", "x"))));
        assert!(c.namespaces.is_empty(), "nothing visible before the list is whole");
        assert!(!r.health.listed);
        assert!(r.apply(&mut c, Event::InitDone));
        assert!(r.health.listed);
        assert_eq!(c.namespaces.keys().collect::<Vec<_>>(), ["a", "b"]);
        assert!(r.apply(&mut c, Event::Apply(ns("a", "y"))));
        assert!(!r.apply(&mut c, Event::Apply(ns("a", "y"))), "same content: no change");
        assert_eq!(c.namespaces["a"].metadata.labels["team"], "y");
        assert!(r.apply(&mut c, Event::Delete(ns("b", "x"))));
        assert!(!r.apply(&mut c, Event::Delete(ns("b", "x"))));
        // The watch expired; meanwhile `a` went and `c` came. During the
        // relist the old state stays; at its end it is replaced whole.
        r.error("too old resource version".into());
        assert!(r.health.failing.is_some());
        r.apply(&mut c, Event::Init);
        r.apply(&mut c, Event::InitApply(ns("c", "z")));
        assert!(c.namespaces.contains_key("a"));
        assert!(r.apply(&mut c, Event::InitDone));
        assert_eq!(c.namespaces.keys().collect::<Vec<_>>(), ["c"]);
        assert_eq!(r.health.failing, None);
        assert_eq!(r.health.last_error.as_deref(), Some("too old resource version"));
        assert_eq!(r.health.lists, 2);
        // A relist that finds the same state changes nothing.
        r.apply(&mut c, Event::Init);
        r.apply(&mut c, Event::InitApply(ns("c", "z")));
        assert!(!r.apply(&mut c, Event::InitDone));
    }

    #[test]
    fn a_bad_object_is_skipped_and_its_last_good_version_kept() {
        let mut c = Cluster::default();
        let mut r = Reflect::<NetworkPolicy>::default();
        let good: NetworkPolicy = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p", "namespace": "x"},
            "spec": {"podSelector": {}, "ingress": [{"ports": [{"port": 80}]}]}
        }))
        .unwrap();
        let mut bad = good.clone();
        bad.spec.as_mut().unwrap().ingress.as_mut().unwrap()[0].ports.as_mut().unwrap()[0]
            .protocol = Some("ICMP".into());
        r.apply(&mut c, Event::Init);
        r.apply(&mut c, Event::InitApply(bad.clone()));
        r.apply(&mut c, Event::InitDone);
        assert!(c.policies.is_empty(), "never good: not there");
        assert!(r.health.invalid["x/p"].contains("ICMP"), "{:?}", r.health.invalid);
        assert!(r.apply(&mut c, Event::Apply(good.clone())));
        assert!(r.health.invalid.is_empty());
        assert!(!r.apply(&mut c, Event::Apply(bad.clone())), "last good version kept");
        assert!(c.policies.contains_key("x/p"));
        assert!(r.health.invalid.contains_key("x/p"));
        // Kept through a relist too, and gone when deleted.
        r.apply(&mut c, Event::Init);
        r.apply(&mut c, Event::InitApply(bad.clone()));
        assert!(!r.apply(&mut c, Event::InitDone));
        assert!(c.policies.contains_key("x/p"));
        assert!(r.apply(&mut c, Event::Delete(bad)));
        assert!(c.policies.is_empty() && r.health.invalid.is_empty());
        // Nameless objects are reported, never a panic.
        r.apply(&mut c, Event::Apply(NetworkPolicy::default()));
        r.apply(&mut c, Event::Delete(NetworkPolicy::default()));
        assert!(r.health.invalid.contains_key("?"));
    }

    #[test]
    fn pods_land_in_the_pods_map() {
        let mut c = Cluster::default();
        let mut r = Reflect::<Pod>::default();
        let p = Pod {
            metadata: ObjectMeta {
                name: Some("a".into()),
                namespace: Some("x".into()),
                ..Default::default()
            },
            ..Default::default()
        };
        assert!(r.apply(&mut c, Event::Apply(p)));
        assert!(c.pods.contains_key("x/a"));
    }
}

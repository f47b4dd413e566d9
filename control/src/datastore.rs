//! Datastores: where the agent learns the cluster. The embedded default is
//! a directory of ordinary Kubernetes YAML, re-read when files change; the
//! Kubernetes API backend will implement the same trait.

use crate::model::{parse_documents, IpPool, Namespace, Node, Object, Pod};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// The cluster as last read.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Cluster {
    pub nodes: BTreeMap<String, Node>,
    pub namespaces: BTreeMap<String, Namespace>,
    /// By `namespace/name`.
    pub pods: BTreeMap<String, Pod>,
    pub pools: BTreeMap<String, IpPool>,
    /// By `namespace/name`.
    pub policies: BTreeMap<String, crate::policy::NetworkPolicy>,
    /// By `namespace/name`.
    pub services: BTreeMap<String, crate::model::Service>,
    /// By `namespace/name`.
    pub endpoint_slices: BTreeMap<String, crate::model::EndpointSlice>,
}

impl Cluster {
    pub fn from_objects<'a>(objs: impl IntoIterator<Item = &'a Object>) -> Cluster {
        let mut c = Cluster::default();
        for o in objs {
            match o {
                Object::Node(n) => {
                    c.nodes.insert(n.metadata.name.clone(), n.clone());
                }
                Object::Namespace(n) => {
                    c.namespaces.insert(n.metadata.name.clone(), n.clone());
                }
                Object::Pod(p) => {
                    c.pods.insert(p.key(), p.clone());
                }
                Object::IpPool(p) => {
                    c.pools.insert(p.metadata.name.clone(), p.clone());
                }
                Object::NetworkPolicy(p) => {
                    c.policies.insert(format!("{}/{}", p.namespace(), p.metadata.name), p.clone());
                }
                Object::Service(s) => {
                    c.services.insert(s.key(), s.clone());
                }
                Object::EndpointSlice(s) => {
                    c.endpoint_slices.insert(s.key(), s.clone());
                }
            }
        }
        c
    }
}

/// Which datastore the agent reads (`--datastore-type`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum DatastoreType {
    /// A directory of YAML files (the lab's, and the default).
    #[default]
    Dir,
    /// The Kubernetes API server (in-cluster configuration, or KUBECONFIG).
    Kubernetes,
}

/// A source of cluster state.
pub trait Datastore: Send {
    /// Pick up changes; true when the cluster changed since the last call.
    fn refresh(&mut self) -> bool;
    /// The cluster as last read.
    fn cluster(&self) -> &Cluster;
    /// Has the whole cluster been read at least once? (The Kubernetes
    /// datastore is not until every watcher has listed.)
    fn ready(&self) -> bool {
        true
    }
    /// The error keeping the datastore from being current, if any.
    fn last_error(&self) -> Option<String> {
        None
    }
    /// A channel woken on every change, when the datastore can push them
    /// (the agent then polls only as a fallback).
    fn subscribe(&mut self) -> Option<std::sync::mpsc::Receiver<()>> {
        None
    }
}

struct FileEntry {
    stamp: (Option<SystemTime>, u64),
    objects: Vec<Object>,
}

/// A directory of YAML files (`*.yaml`, `*.yml`; hidden files and
/// subdirectories are not read). A file that fails to parse is reported and
/// its last good content kept: bad input never loses state.
pub struct DirDatastore {
    dir: PathBuf,
    files: BTreeMap<PathBuf, FileEntry>,
    cluster: Cluster,
    /// Files whose current content is invalid, with the error.
    pub errors: BTreeMap<PathBuf, String>,
}

impl DirDatastore {
    pub fn open(dir: &Path) -> std::io::Result<DirDatastore> {
        std::fs::create_dir_all(dir)?;
        let mut d = DirDatastore {
            dir: dir.to_path_buf(),
            files: BTreeMap::new(),
            cluster: Cluster::default(),
            errors: BTreeMap::new(),
        };
        d.refresh();
        Ok(d)
    }

    fn scan(&self) -> Vec<(PathBuf, (Option<SystemTime>, u64))> {
        let Ok(rd) = std::fs::read_dir(&self.dir) else { return Vec::new() };
        let mut out: Vec<_> = rd
            .flatten()
            .filter_map(|e| {
                let p = e.path();
                let name = p.file_name()?.to_str()?.to_string();
                let yaml = name.ends_with(".yaml") || name.ends_with(".yml");
                let md = e.metadata().ok()?;
                (yaml && !name.starts_with('.') && md.is_file())
                    .then(|| (p, (md.modified().ok(), md.len())))
            })
            .collect();
        out.sort();
        out
    }
}

impl Datastore for DirDatastore {
    fn refresh(&mut self) -> bool {
        let seen = self.scan();
        let mut changed = false;
        let present: std::collections::BTreeSet<&PathBuf> = seen.iter().map(|(p, _)| p).collect();
        let gone: Vec<PathBuf> =
            self.files.keys().filter(|p| !present.contains(p)).cloned().collect();
        for p in gone {
            self.files.remove(&p);
            self.errors.remove(&p);
            changed = true;
        }
        for (p, stamp) in seen {
            if self.files.get(&p).is_some_and(|f| f.stamp == stamp)
                || self.errors.contains_key(&p)
                    && self.files.get(&p).is_none_or(|f| f.stamp == stamp)
            {
                continue;
            }
            let parsed = std::fs::read_to_string(&p)
                .map_err(|e| e.to_string())
                .and_then(|t| parse_documents(&t).map_err(|e| e.to_string()));
            match parsed {
                Ok((objects, _skipped)) => {
                    self.errors.remove(&p);
                    self.files.insert(p, FileEntry { stamp, objects });
                    changed = true;
                }
                Err(e) => {
                    tracing::error!(file = %p.display(), "datastore file rejected, keeping its last good content: {e}");
                    // Remember the bad stamp so we do not re-read it until it changes.
                    if let Some(f) = self.files.get_mut(&p) {
                        f.stamp = stamp;
                    }
                    self.errors.insert(p, e);
                }
            }
        }
        if changed {
            let c = Cluster::from_objects(self.files.values().flat_map(|f| f.objects.iter()));
            changed = c != self.cluster;
            self.cluster = c;
        }
        changed
    }

    fn cluster(&self) -> &Cluster {
        &self.cluster
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_up_changes_and_keeps_state_on_bad_yaml() {
        let dir = std::env::temp_dir().join(format!("ocelot-ds-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut d = DirDatastore::open(&dir).unwrap();
        assert!(d.cluster().pods.is_empty());
        std::fs::write(
            dir.join("pod.yaml"),
            "kind: Pod\nmetadata: {name: a, namespace: x, labels: {v: '1'}}\n",
        )
        .unwrap();
        assert!(d.refresh());
        assert_eq!(d.cluster().pods["x/a"].metadata.labels["v"], "1");
        assert!(!d.refresh(), "no change, no event");
        // Broken YAML: reported, last good content kept.
        std::fs::write(dir.join("pod.yaml"), "kind: Pod\nmetadata: [unclosed\n").unwrap();
        d.refresh();
        assert!(d.errors.contains_key(&dir.join("pod.yaml")));
        assert!(d.cluster().pods.contains_key("x/a"));
        std::fs::write(
            dir.join("pod.yaml"),
            "kind: Pod\nmetadata: {name: a, namespace: x, labels: {v: '2'}}\n",
        )
        .unwrap();
        assert!(d.refresh());
        assert!(d.errors.is_empty());
        assert_eq!(d.cluster().pods["x/a"].metadata.labels["v"], "2");
        std::fs::remove_file(dir.join("pod.yaml")).unwrap();
        assert!(d.refresh());
        assert!(d.cluster().pods.is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

//! A Kubernetes API server in memory, behind kube's `tower-test` mock
//! client, speaking the JSON a 1.30+ API server sends: lists with a
//! `resourceVersion` (items without kind/apiVersion, as the server sends
//! them), watches as newline-delimited events (`ADDED`, `MODIFIED`,
//! `DELETED`, `BOOKMARK`, and `ERROR` with a 410 `Status` when the version
//! asked for was compacted away), held open and fed as the test changes
//! objects. A test can also cut the server off (open watches fail, new
//! requests get a connection error) and bring it back, expire every watch,
//! and read the PATCH and POST requests it received.
//!
//! Shared by the `k8s_datastore*` test files.

#![allow(dead_code)]

use bytes::Bytes;
use futures::channel::mpsc;
use http::{Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::StreamBody;
use kube::client::Body;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub type Chunk = Result<Frame<Bytes>, std::io::Error>;
pub type ResBody = StreamBody<mpsc::UnboundedReceiver<Chunk>>;

/// The collections the datastore watches: (path, apiVersion, kind).
pub const RESOURCES: &[(&str, &str, &str)] = &[
    ("/api/v1/nodes", "v1", "Node"),
    ("/api/v1/namespaces", "v1", "Namespace"),
    ("/api/v1/pods", "v1", "Pod"),
    ("/apis/networking.k8s.io/v1/networkpolicies", "networking.k8s.io/v1", "NetworkPolicy"),
    ("/apis/ocelot.dev/v1/ippools", "ocelot.dev/v1", "IPPool"),
    ("/api/v1/services", "v1", "Service"),
    ("/apis/discovery.k8s.io/v1/endpointslices", "discovery.k8s.io/v1", "EndpointSlice"),
];

fn collection_of(kind: &str) -> &'static str {
    RESOURCES.iter().find(|r| r.2 == kind).map(|r| r.0).unwrap_or_else(|| panic!("kind {kind}"))
}

struct Watch {
    tx: mpsc::UnboundedSender<Chunk>,
    /// `spec.nodeName=<node>`, the only field selector the datastore uses.
    node: Option<String>,
}

#[derive(Default)]
struct Collection {
    /// By `namespace/name` (`name` when cluster-scoped).
    objects: BTreeMap<String, Value>,
    /// (resourceVersion, event type, object).
    history: Vec<(u64, &'static str, Value)>,
    watches: Vec<Watch>,
}

#[derive(Default)]
struct Inner {
    rv: u64,
    /// Watches from before this version get 410 Gone.
    compacted: u64,
    collections: BTreeMap<&'static str, Collection>,
    down: bool,
    /// Every request: (method, path and query).
    log: Vec<(String, String)>,
    /// PATCH and POST requests.
    writes: Vec<Write>,
}

/// A PATCH or POST the server received.
#[derive(Clone, Debug)]
pub struct Write {
    pub method: String,
    pub path: String,
    pub content_type: String,
    pub body: Value,
}

/// The fake API server; clone freely.
#[derive(Clone, Default)]
pub struct FakeApi {
    inner: Arc<Mutex<Inner>>,
}

fn line(v: &Value) -> Chunk {
    let mut b = serde_json::to_vec(v).unwrap();
    b.push(b'\n');
    Ok(Frame::data(Bytes::from(b)))
}

fn node_of(obj: &Value) -> Option<&str> {
    obj.pointer("/spec/nodeName").and_then(Value::as_str)
}

fn selected(w_node: &Option<String>, obj: &Value) -> bool {
    w_node.as_deref().is_none_or(|n| node_of(obj) == Some(n))
}

fn key_of(obj: &Value) -> String {
    let name = obj.pointer("/metadata/name").and_then(Value::as_str).expect("metadata.name");
    match obj.pointer("/metadata/namespace").and_then(Value::as_str) {
        Some(ns) => format!("{ns}/{name}"),
        None => name.to_string(),
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(if b[i] == b'+' { b' ' } else { b[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn query(uri: &http::Uri) -> BTreeMap<String, String> {
    uri.query()
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), percent_decode(v)))
        .collect()
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

fn respond(code: StatusCode, body: &Value) -> Response<ResBody> {
    let (tx, rx) = mpsc::unbounded();
    tx.unbounded_send(Ok(Frame::data(Bytes::from(serde_json::to_vec(body).unwrap())))).unwrap();
    drop(tx);
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(StreamBody::new(rx))
        .unwrap()
}

impl FakeApi {
    /// A client over the fake, and the task serving it (spawn it on any
    /// runtime; it ends when the client is dropped).
    pub fn client(&self) -> (kube::Client, impl std::future::Future<Output = ()> + Send + 'static) {
        let (svc, mut handle) = tower_test::mock::pair::<Request<Body>, Response<ResBody>>();
        let me = self.clone();
        let serve = async move {
            while let Some((req, send)) = handle.next_request().await {
                let (parts, body) = req.into_parts();
                let body = body.collect_bytes().await.unwrap_or_default();
                match me.handle(&parts, &body) {
                    Some(r) => send.send_response(r),
                    None => send.send_error(std::io::Error::new(
                        std::io::ErrorKind::ConnectionRefused,
                        "connection refused (the fake API server is down)",
                    )),
                }
            }
        };
        (kube::Client::new(svc, "default"), serve)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn handle(&self, parts: &http::request::Parts, body: &[u8]) -> Option<Response<ResBody>> {
        let mut g = self.lock();
        let path = parts.uri.path().to_string();
        g.log.push((parts.method.to_string(), parts.uri.to_string()));
        if g.down {
            return None;
        }
        if parts.method != http::Method::GET {
            let v: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
            let content_type = parts
                .headers
                .get(http::header::CONTENT_TYPE)
                .and_then(|h| h.to_str().ok())
                .unwrap_or("")
                .to_string();
            g.writes.push(Write {
                method: parts.method.to_string(),
                path: path.clone(),
                content_type,
                body: v.clone(),
            });
            // Echo what was written: enough for kube's typed responses.
            let mut echo = v;
            if echo.get("metadata").is_none() {
                echo["metadata"] = json!({});
            }
            if let Some(name) = path.strip_prefix("/api/v1/nodes/") {
                echo["metadata"]["name"] = json!(name.trim_end_matches("/status"));
                echo["kind"] = json!("Node");
                echo["apiVersion"] = json!("v1");
            }
            return Some(respond(StatusCode::OK, &echo));
        }
        let q = query(&parts.uri);
        let Some(&(cpath, api_version, kind)) = RESOURCES.iter().find(|r| r.0 == path) else {
            return Some(respond(
                StatusCode::NOT_FOUND,
                &status(404, "NotFound", &format!("the server could not find {path}")),
            ));
        };
        let node =
            q.get("fieldSelector").and_then(|f| f.strip_prefix("spec.nodeName=")).map(String::from);
        let rv = g.rv;
        let compacted = g.compacted;
        let c = g.collections.entry(cpath).or_default();
        if q.get("watch").map(String::as_str) != Some("true") {
            let items: Vec<Value> = c
                .objects
                .values()
                .filter(|o| selected(&node, o))
                .map(|o| {
                    let mut o = o.clone();
                    let m = o.as_object_mut().unwrap();
                    m.remove("kind");
                    m.remove("apiVersion");
                    o
                })
                .collect();
            let list = json!({
                "kind": format!("{kind}List"), "apiVersion": api_version,
                "metadata": {"resourceVersion": rv.to_string()}, "items": items,
            });
            return Some(respond(StatusCode::OK, &list));
        }
        let from: u64 = q.get("resourceVersion").and_then(|v| v.parse().ok()).unwrap_or(0);
        let (tx, rx) = mpsc::unbounded();
        if from < compacted {
            let msg = format!("too old resource version: {from} ({compacted})");
            let _ = tx.unbounded_send(line(
                &json!({"type": "ERROR", "object": status(410, "Expired", &msg)}),
            ));
        } else {
            for (v, ty, obj) in &c.history {
                if *v > from && selected(&node, obj) {
                    let _ = tx.unbounded_send(line(&json!({"type": ty, "object": obj})));
                }
            }
            c.watches.push(Watch { tx, node });
        }
        Some(
            Response::builder()
                .status(StatusCode::OK)
                .header("content-type", "application/json")
                .body(StreamBody::new(rx))
                .unwrap(),
        )
    }

    fn event(g: &mut Inner, cpath: &'static str, ty: &'static str, obj: Value) {
        let rv = g.rv;
        let c = g.collections.entry(cpath).or_default();
        c.history.push((rv, ty, obj.clone()));
        let ev = json!({"type": ty, "object": obj});
        c.watches.retain(|w| !selected(&w.node, &obj) || w.tx.unbounded_send(line(&ev)).is_ok());
    }

    /// Create or replace an object (JSON with apiVersion, kind, metadata):
    /// a new resourceVersion, a uid and creationTimestamp when missing,
    /// and an ADDED or MODIFIED event to the watches it matches.
    pub fn apply(&self, mut obj: Value) {
        let kind = obj["kind"].as_str().expect("kind").to_string();
        let cpath = collection_of(&kind);
        let mut g = self.lock();
        g.rv += 1;
        let rv = g.rv;
        let key = key_of(&obj);
        let old = g.collections.entry(cpath).or_default().objects.get(&key).cloned();
        let meta = obj["metadata"].as_object_mut().expect("metadata");
        meta.insert("resourceVersion".into(), json!(rv.to_string()));
        let (uid, created) = match &old {
            Some(o) => (o["metadata"]["uid"].clone(), o["metadata"]["creationTimestamp"].clone()),
            None => {
                (json!(format!("00000000-0000-4000-8000-{rv:012}")), json!("2026-11-20T09:00:00Z"))
            }
        };
        meta.insert("uid".into(), uid);
        meta.entry("creationTimestamp").or_insert(created);
        g.collections.get_mut(cpath).unwrap().objects.insert(key, obj.clone());
        let ty = if old.is_some() { "MODIFIED" } else { "ADDED" };
        Self::event(&mut g, cpath, ty, obj);
    }

    /// Delete an object by kind and `namespace/name` (or `name`).
    pub fn delete(&self, kind: &str, key: &str) {
        let cpath = collection_of(kind);
        let mut g = self.lock();
        let Some(mut obj) = g.collections.entry(cpath).or_default().objects.remove(key) else {
            return;
        };
        g.rv += 1;
        obj["metadata"]["resourceVersion"] = json!(g.rv.to_string());
        Self::event(&mut g, cpath, "DELETED", obj);
    }

    /// A BOOKMARK on every open watch, at the current version.
    pub fn bookmark(&self) {
        let mut g = self.lock();
        let rv = g.rv.to_string();
        for (&cpath, c) in g.collections.iter_mut() {
            let (_, api_version, kind) = RESOURCES.iter().find(|r| r.0 == cpath).unwrap();
            let ev = json!({"type": "BOOKMARK", "object": {"kind": kind, "apiVersion": api_version,
                            "metadata": {"resourceVersion": rv}}});
            c.watches.retain(|w| w.tx.unbounded_send(line(&ev)).is_ok());
        }
    }

    /// Compact the history: every open watch gets `ERROR` 410 and ends,
    /// and a watch from an older version gets the same.
    pub fn expire(&self) {
        let mut g = self.lock();
        g.compacted = g.rv;
        let msg = format!("too old resource version: {} ({})", g.rv, g.compacted);
        let ev = json!({"type": "ERROR", "object": status(410, "Expired", &msg)});
        for c in g.collections.values_mut() {
            c.history.clear();
            for w in c.watches.drain(..) {
                let _ = w.tx.unbounded_send(line(&ev));
            }
        }
    }

    /// Cut the server off (open watches fail mid-stream, every request
    /// gets a connection error), or bring it back.
    pub fn set_down(&self, down: bool) {
        let mut g = self.lock();
        g.down = down;
        if down {
            for c in g.collections.values_mut() {
                for w in c.watches.drain(..) {
                    let _ = w.tx.unbounded_send(Err(std::io::Error::new(
                        std::io::ErrorKind::ConnectionReset,
                        "connection reset",
                    )));
                }
            }
        }
    }

    /// Requests so far whose method is `method` and whose path and query
    /// contain every one of `parts`.
    pub fn requests(&self, method: &str, parts: &[&str]) -> usize {
        let g = self.lock();
        g.log.iter().filter(|(m, u)| m == method && parts.iter().all(|p| u.contains(p))).count()
    }

    /// List requests so far on a collection path (e.g. `/api/v1/pods`)
    /// whose query contains every one of `parts`.
    pub fn lists(&self, path: &str, parts: &[&str]) -> usize {
        let g = self.lock();
        g.log
            .iter()
            .filter(|(m, u)| {
                m == "GET"
                    && u.split('?').next() == Some(path)
                    && !u.contains("watch=true")
                    && parts.iter().all(|p| u.contains(p))
            })
            .count()
    }

    /// PATCH and POST bodies so far.
    pub fn writes(&self) -> Vec<Write> {
        self.lock().writes.clone()
    }

    /// Open watches on a collection.
    pub fn open_watches(&self, kind: &str) -> usize {
        let mut g = self.lock();
        let c = g.collections.entry(collection_of(kind)).or_default();
        c.watches.retain(|w| !w.tx.is_closed());
        c.watches.len()
    }
}

/// Poll `cond` until true or `timeout`; true when it became true.
pub fn eventually(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() > end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A backoff of 20 ms, so retries after an outage are quick in tests.
pub struct QuickBackoff;

impl Iterator for QuickBackoff {
    type Item = Duration;
    fn next(&mut self) -> Option<Duration> {
        Some(Duration::from_millis(20))
    }
}

impl kube::runtime::utils::Backoff for QuickBackoff {
    fn reset(&mut self) {}
}

/// A running `KubeDatastore` over a fake API server (its serving task on
/// a runtime of its own), for node `node-1`.
pub struct Harness {
    pub api: FakeApi,
    pub ds: ocelot_control::k8s::datastore::KubeDatastore,
    _server: tokio::runtime::Runtime,
}

pub fn harness(api: FakeApi) -> Harness {
    use ocelot_control::k8s::datastore::{KubeDatastore, Options};
    let server =
        tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let mut opts = Options::new("node-1");
    opts.backoff = Arc::new(|| Box::new(QuickBackoff) as Box<dyn kube::runtime::utils::Backoff>);
    let api2 = api.clone();
    let (tx, rx) = std::sync::mpsc::channel();
    let ds = KubeDatastore::start(opts, async move {
        // The client is made on the datastore's runtime; its server task
        // runs on ours.
        let (client, serve) = api2.client();
        tx.send(serve).map_err(|_| anyhow::anyhow!("harness gone"))?;
        Ok(client)
    })
    .unwrap();
    server.spawn(rx.recv().unwrap());
    Harness { api, ds, _server: server }
}

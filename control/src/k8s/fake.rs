//! An in-memory Kubernetes API server for tests: a tower `Service` that
//! keeps objects as JSON and answers list, get, create, replace and delete
//! the way a real API server does — a fresh `resourceVersion` on every
//! write, `409 AlreadyExists` on creating a name that exists, `409
//! Conflict` on a replace or a delete whose `resourceVersion` is stale,
//! `404 NotFound` with a `Status` body — so that many clients over one
//! `FakeApi` race exactly as agents race over a cluster.
//!
//! `kube::Client::new(fake.clone(), "default")` gives a client over it.
//! Paths: `/api/v1[/namespaces/NS]/PLURAL[/NAME]` and
//! `/apis/GROUP/VERSION[/namespaces/NS]/PLURAL[/NAME]`. Not a full server:
//! no watch, no selectors, no patch, no subresources.

use http::{Method, Request, Response, StatusCode};
use kube::client::Body;
use serde_json::{json, Value};
use std::collections::{BTreeMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

/// Where an object lives: the API prefix (`api/v1`, `apis/ocelot.dev/v1`),
/// the resource's plural, the namespace ("" when cluster-scoped), the name.
type Key = (String, String, String, String);

/// A failure to inject: the next request whose method is `method` and
/// whose path contains `path` gets `code` with `reason`.
#[derive(Clone, Debug)]
pub struct Fault {
    pub method: Method,
    pub path: String,
    pub code: u16,
    pub reason: String,
}

#[derive(Default)]
struct State {
    version: u64,
    objects: BTreeMap<Key, Value>,
    faults: VecDeque<Fault>,
    /// `METHOD path -> code`, in order.
    log: Vec<String>,
}

/// The in-memory API server (cheap to clone: clones share the objects).
#[derive(Clone, Default)]
pub struct FakeApi {
    state: Arc<Mutex<State>>,
}

/// A parsed request path.
struct Target {
    prefix: String,
    plural: String,
    namespace: Option<String>,
    name: Option<String>,
}

fn parse_path(path: &str) -> Option<Target> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').filter(|s| !s.is_empty()).collect();
    let n = match segs.first()? {
        &"api" => 2,
        &"apis" => 3,
        _ => return None,
    };
    if segs.len() <= n {
        return None;
    }
    let prefix = segs[..n].join("/");
    let mut rest = &segs[n..];
    let mut namespace = None;
    if rest.len() >= 3 && rest[0] == "namespaces" {
        namespace = Some(rest[1].to_string());
        rest = &rest[2..];
    }
    match rest {
        [plural] => Some(Target { prefix, plural: plural.to_string(), namespace, name: None }),
        [plural, name] => Some(Target {
            prefix,
            plural: plural.to_string(),
            namespace,
            name: Some(name.to_string()),
        }),
        _ => None,
    }
}

/// A `Status` body as the API server sends it.
fn status(code: u16, reason: &str, message: String, t: Option<&Target>) -> (u16, Value) {
    let mut v = json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    });
    if let Some(t) = t {
        v["details"] = json!({
            "name": t.name.clone().unwrap_or_default(),
            "group": t.prefix.strip_prefix("apis/").and_then(|g| g.split('/').next()).unwrap_or(""),
            "kind": t.plural,
        });
    }
    (code, v)
}

fn qualified(t: &Target) -> String {
    match t.prefix.strip_prefix("apis/").and_then(|g| g.split('/').next()) {
        Some(g) => format!("{}.{g}", t.plural),
        None => t.plural.clone(),
    }
}

fn conflict(t: &Target, name: &str) -> (u16, Value) {
    status(
        409,
        "Conflict",
        format!(
            "Operation cannot be fulfilled on {} \"{name}\": the object has been modified; please \
             apply your changes to the latest version and try again",
            qualified(t)
        ),
        Some(t),
    )
}

fn not_found(t: &Target, name: &str) -> (u16, Value) {
    status(404, "NotFound", format!("{} \"{name}\" not found", qualified(t)), Some(t))
}

impl FakeApi {
    pub fn new() -> FakeApi {
        FakeApi::default()
    }

    /// A client over this server.
    pub fn client(&self) -> kube::Client {
        kube::Client::new(self.clone(), "default")
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Create `obj` in `collection` (e.g. `/api/v1/namespaces/default/pods`)
    /// as another client would, bypassing faults; returns it as stored
    /// (with its resourceVersion and uid). A `metadata.uid` the object
    /// carries is kept, so that a test can put back an object it removed,
    /// as if a list had briefly missed it.
    pub fn insert(&self, collection: &str, obj: Value) -> Result<Value, String> {
        let uid = obj["metadata"]["uid"].clone();
        let (code, mut v) = self.serve(&Method::POST, collection, &obj.to_string(), false);
        if code < 300 && uid.is_string() {
            v["metadata"]["uid"] = uid;
            if let Some(t) = parse_path(collection) {
                let name = v["metadata"]["name"].as_str().unwrap_or_default().to_string();
                let key = (t.prefix, t.plural, t.namespace.unwrap_or_default(), name);
                self.lock().objects.insert(key, v.clone());
            }
        }
        if code >= 300 {
            return Err(format!("{code}: {v}"));
        }
        Ok(v)
    }

    /// Remove an object outright (as another client's delete would).
    pub fn remove(&self, object_path: &str) -> bool {
        let (code, _) = self.serve(&Method::DELETE, object_path, "", false);
        code < 300
    }

    /// Every object of a collection path (`/apis/ocelot.dev/v1/ipamblocks`).
    pub fn objects(&self, collection: &str) -> Vec<Value> {
        let (_, v) = self.serve(&Method::GET, collection, "", false);
        v["items"].as_array().cloned().unwrap_or_default()
    }

    /// Fail a future request (see [`Fault`]).
    pub fn inject(&self, f: Fault) {
        self.lock().faults.push_back(f);
    }

    /// `METHOD path -> code` of every request served so far.
    pub fn log(&self) -> Vec<String> {
        self.lock().log.clone()
    }

    /// Answer one request: status code and JSON body.
    fn serve(&self, method: &Method, path: &str, body: &str, faults: bool) -> (u16, Value) {
        let path = path.split('?').next().unwrap_or("");
        let mut st = self.lock();
        let r = Self::serve_locked(&mut st, method, path, body, faults);
        st.log.push(format!("{method} {path} -> {}", r.0));
        r
    }

    fn serve_locked(
        st: &mut State,
        method: &Method,
        path: &str,
        body: &str,
        faults: bool,
    ) -> (u16, Value) {
        let Some(t) = parse_path(path) else {
            return status(404, "NotFound", format!("the server could not find {path}"), None);
        };
        if faults {
            if let Some(i) =
                st.faults.iter().position(|f| f.method == *method && path.contains(&f.path))
            {
                if let Some(f) = st.faults.remove(i) {
                    let name = t.name.clone().unwrap_or_default();
                    return match (f.code, f.reason.as_str()) {
                        (409, "Conflict") => conflict(&t, &name),
                        (c, r) => status(c, r, format!("injected {c} {r}"), Some(&t)),
                    };
                }
            }
        }
        let ns = t.namespace.clone().unwrap_or_default();
        let key = |name: &str| (t.prefix.clone(), t.plural.clone(), ns.clone(), name.to_string());
        match (method, &t.name) {
            (&Method::GET, None) => {
                let items: Vec<Value> = st
                    .objects
                    .iter()
                    .filter(|((p, pl, n, _), _)| {
                        *p == t.prefix && *pl == t.plural && (t.namespace.is_none() || *n == ns)
                    })
                    .map(|(_, v)| v.clone())
                    .collect();
                (
                    200,
                    json!({
                        "kind": "List",
                        "apiVersion": "v1",
                        "metadata": {"resourceVersion": st.version.to_string()},
                        "items": items,
                    }),
                )
            }
            (&Method::GET, Some(name)) => match st.objects.get(&key(name)) {
                Some(v) => (200, v.clone()),
                None => not_found(&t, name),
            },
            (&Method::POST, None) => {
                let mut obj: Value = match serde_json::from_str(body) {
                    Ok(v) => v,
                    Err(e) => return status(400, "BadRequest", e.to_string(), Some(&t)),
                };
                let Some(name) = obj["metadata"]["name"].as_str().map(str::to_string) else {
                    return status(
                        422,
                        "Invalid",
                        "metadata.name: Required value: name is required".into(),
                        Some(&t),
                    );
                };
                if st.objects.contains_key(&key(&name)) {
                    return status(
                        409,
                        "AlreadyExists",
                        format!("{} \"{name}\" already exists", qualified(&t)),
                        Some(&t),
                    );
                }
                st.version += 1;
                obj["metadata"]["resourceVersion"] = json!(st.version.to_string());
                obj["metadata"]["uid"] = json!(format!("uid-{}", st.version));
                obj["metadata"]["creationTimestamp"] = json!("2026-01-01T00:00:00Z");
                if t.namespace.is_some() {
                    obj["metadata"]["namespace"] = json!(ns);
                }
                st.objects.insert(key(&name), obj.clone());
                (201, obj)
            }
            (&Method::PUT, Some(name)) => {
                let mut obj: Value = match serde_json::from_str(body) {
                    Ok(v) => v,
                    Err(e) => return status(400, "BadRequest", e.to_string(), Some(&t)),
                };
                let Some(cur) = st.objects.get(&key(name)) else {
                    return not_found(&t, name);
                };
                let want = obj["metadata"]["resourceVersion"].as_str().map(str::to_string);
                if let Some(w) = &want {
                    if cur["metadata"]["resourceVersion"].as_str() != Some(w.as_str()) {
                        return conflict(&t, name);
                    }
                }
                let (uid, created) =
                    (cur["metadata"]["uid"].clone(), cur["metadata"]["creationTimestamp"].clone());
                st.version += 1;
                obj["metadata"]["resourceVersion"] = json!(st.version.to_string());
                obj["metadata"]["uid"] = uid;
                obj["metadata"]["creationTimestamp"] = created;
                st.objects.insert(key(name), obj.clone());
                (200, obj)
            }
            (&Method::DELETE, Some(name)) => {
                let Some(cur) = st.objects.get(&key(name)) else {
                    return not_found(&t, name);
                };
                let opts: Value = serde_json::from_str(body).unwrap_or(Value::Null);
                if let Some(w) = opts["preconditions"]["resourceVersion"].as_str() {
                    if cur["metadata"]["resourceVersion"].as_str() != Some(w) {
                        return status(
                            409,
                            "Conflict",
                            format!(
                                "Operation cannot be fulfilled on {} \"{name}\": the ResourceVersion \
                                 in the precondition ({w}) does not match the ResourceVersion in \
                                 record ({}). The object might have been modified",
                                qualified(&t),
                                cur["metadata"]["resourceVersion"].as_str().unwrap_or("")
                            ),
                            Some(&t),
                        );
                    }
                }
                st.version += 1;
                let v = st.objects.remove(&key(name)).unwrap_or(Value::Null);
                (200, v)
            }
            _ => {
                status(405, "MethodNotAllowed", format!("{method} is not supported here"), Some(&t))
            }
        }
    }
}

impl tower::Service<Request<Body>> for FakeApi {
    type Response = Response<Body>;
    type Error = std::convert::Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        let me = self.clone();
        Box::pin(async move {
            let (parts, body) = req.into_parts();
            let bytes = body.collect_bytes().await.unwrap_or_default();
            let text = String::from_utf8_lossy(&bytes);
            let (code, v) = me.serve(&parts.method, parts.uri.path(), &text, true);
            let mut resp = Response::new(Body::from(serde_json::to_vec(&v).unwrap_or_default()));
            *resp.status_mut() =
                StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            resp.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/json"),
            );
            Ok(resp)
        })
    }
}

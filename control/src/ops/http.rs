//! The agent's HTTP endpoints, on `--metrics-addr`:
//!
//! | path | answer |
//! |---|---|
//! | `/livez` | 200 while the agent's loop turns; 503 and the reason otherwise |
//! | `/readyz` | 200 once the datastore is synced, the dataplane reachable and the endpoints synced; 503 and every reason otherwise |
//! | `/metrics` | Prometheus text format 0.0.4 (see `ops::metrics`) |
//! | `/status` | the agent's view as JSON (`ops::view::AgentView`), read by `ocelot status` |
//!
//! One thread with a single-threaded tokio runtime and hyper's HTTP/1
//! server; work that blocks (the dataplane socket, the IPAM file) runs on
//! the runtime's blocking pool, so a slow scrape never delays a probe.

use super::metrics::{self, DataplaneCounters};
use super::state::OpsState;
use super::view::{self, Source};
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode};
use ocelot_dataplane::api::client::Client;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

/// `--metrics-addr`: `host:port`, or empty for none.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ListenAddr(pub Option<SocketAddr>);

impl std::str::FromStr for ListenAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.trim().is_empty() {
            return Ok(ListenAddr(None));
        }
        s.trim().parse().map(|a| ListenAddr(Some(a))).map_err(|e| {
            format!("{s:?}: {e} (an IP address and port such as 0.0.0.0:9099, or '' to disable)")
        })
    }
}

/// Ask the dataplane for its counters over a fresh connection.
pub fn dataplane_counters(socket: &Path) -> DataplaneCounters {
    let mut c = Client::connect(socket, "ocelot-metrics")
        .map_err(|e| format!("cannot connect to the dataplane at {}: {e}", socket.display()))?;
    match c.call(ocelot_dataplane::api::Request::Counters) {
        Ok(ocelot_dataplane::api::Reply::Counters { ports, workers, drop_reasons }) => {
            Ok((ports, workers, drop_reasons))
        }
        Ok(other) => Err(format!("dataplane answered counters with {other:?}")),
        Err(e) => Err(format!("dataplane counters: {e}")),
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(hyper::header::CONTENT_TYPE, "text/plain; charset=utf-8".parse().expect("static"));
    r
}

fn with_type(mut r: Response<Full<Bytes>>, ct: &'static str) -> Response<Full<Bytes>> {
    r.headers_mut()
        .insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static(ct));
    r
}

async fn route(
    req: Request<hyper::body::Incoming>,
    ops: Arc<OpsState>,
    src: Arc<dyn Source>,
) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET\n".into());
    }
    match req.uri().path() {
        "/livez" | "/healthz" => match ops.liveness() {
            Ok(()) => text(StatusCode::OK, "ok\n".into()),
            Err(e) => text(StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")),
        },
        "/readyz" => {
            let r = tokio::task::spawn_blocking(move || view::readiness(src.as_ref(), &ops)).await;
            match r {
                Ok(Ok(())) => text(StatusCode::OK, "ok\n".into()),
                Ok(Err(why)) => text(StatusCode::SERVICE_UNAVAILABLE, why.join("\n") + "\n"),
                Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("readyz: {e}\n")),
            }
        }
        "/metrics" => {
            let r = tokio::task::spawn_blocking(move || {
                let v = view::build(src.as_ref(), &ops);
                let dp = dataplane_counters(&src.dataplane_socket());
                metrics::render(&v, &ops, &dp)
            })
            .await;
            match r {
                Ok(body) => with_type(text(StatusCode::OK, body), metrics::CONTENT_TYPE),
                Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("metrics: {e}\n")),
            }
        }
        "/status" => {
            let r = tokio::task::spawn_blocking(move || {
                serde_json::to_string_pretty(&view::build(src.as_ref(), &ops))
            })
            .await;
            match r {
                Ok(Ok(body)) => with_type(text(StatusCode::OK, body + "\n"), "application/json"),
                Ok(Err(e)) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("status: {e}\n")),
                Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("status: {e}\n")),
            }
        }
        "/" => text(StatusCode::OK, "ocelot agent: /livez /readyz /metrics /status\n".into()),
        p => text(
            StatusCode::NOT_FOUND,
            format!("no such endpoint {p:?}: try /livez /readyz /metrics /status\n"),
        ),
    }
}

/// Bind `addr` (port 0 picks a free one) and serve on a thread of its own.
/// Returns the bound address. A bind failure is returned, not logged: the
/// caller decides (the agent refuses to start without its probes).
pub fn serve(
    addr: SocketAddr,
    ops: Arc<OpsState>,
    src: Arc<dyn Source>,
) -> std::io::Result<SocketAddr> {
    let listener = std::net::TcpListener::bind(addr)?;
    listener.set_nonblocking(true)?;
    let local = listener.local_addr()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .max_blocking_threads(4)
        .thread_name("ocelot-http")
        .build()?;
    std::thread::Builder::new().name("ocelot-http".into()).spawn(move || {
        rt.block_on(async move {
            let listener = match tokio::net::TcpListener::from_std(listener) {
                Ok(l) => l,
                Err(e) => {
                    tracing::error!("HTTP endpoints: {e}");
                    return;
                }
            };
            loop {
                let (stream, _) = match listener.accept().await {
                    Ok(s) => s,
                    Err(e) => {
                        // Out of fds, say: back off rather than spin.
                        tracing::warn!("HTTP accept: {e}");
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let (ops, src) = (ops.clone(), src.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let (ops, src) = (ops.clone(), src.clone());
                        async move { Ok::<_, std::convert::Infallible>(route(req, ops, src).await) }
                    });
                    let conn = hyper::server::conn::http1::Builder::new()
                        .timer(hyper_util::rt::TokioTimer::new())
                        .header_read_timeout(std::time::Duration::from_secs(10))
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc);
                    if let Err(e) = conn.await {
                        tracing::debug!("HTTP connection: {e}");
                    }
                });
            }
        });
    })?;
    Ok(local)
}

/// A blocking `GET` for `ocelot status` and the tests: `(status, body)`.
/// Plain HTTP/1.1 with `Connection: close`; the server always sends a
/// `Content-Length`.
pub fn get(addr: &str, path: &str, timeout: std::time::Duration) -> Result<(u16, String), String> {
    use std::io::{Read, Write};
    use std::net::ToSocketAddrs;
    let sa = addr
        .to_socket_addrs()
        .map_err(|e| format!("agent address {addr:?}: {e}"))?
        .next()
        .ok_or_else(|| format!("agent address {addr:?} resolves to nothing"))?;
    let mut s = std::net::TcpStream::connect_timeout(&sa, timeout)
        .map_err(|e| format!("cannot reach the agent at {addr}: {e}"))?;
    s.set_read_timeout(Some(timeout)).map_err(|e| e.to_string())?;
    s.set_write_timeout(Some(timeout)).map_err(|e| e.to_string())?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")
        .map_err(|e| format!("agent at {addr}: {e}"))?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).map_err(|e| format!("agent at {addr}: {e}"))?;
    let raw = String::from_utf8_lossy(&raw);
    let (head, body) = raw
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("agent at {addr}: malformed HTTP response"))?;
    let status =
        head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).ok_or_else(|| {
            format!("agent at {addr}: no HTTP status in {:?}", head.lines().next())
        })?;
    Ok((status, body.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datastore::Cluster;
    use crate::ipam::IpamState;
    use ocelot_dataplane::api::{
        Envelope, Outcome, Reply, Request as DpRequest, Response as DpResponse,
    };
    use std::io::{BufRead, BufReader, Write};
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::Duration;

    struct Fixed {
        cluster: Cluster,
        ipam: std::sync::Mutex<IpamState>,
        socket: PathBuf,
    }

    impl Source for Fixed {
        fn node(&self) -> String {
            "node-1".into()
        }
        fn dataplane_socket(&self) -> PathBuf {
            self.socket.clone()
        }
        fn with_cluster(&self, f: &mut dyn FnMut(&Cluster)) {
            f(&self.cluster)
        }
        fn ipam(&self) -> Result<IpamState, String> {
            Ok(self.ipam.lock().unwrap().clone())
        }
    }

    fn fixed(socket: PathBuf) -> Arc<Fixed> {
        let (objs, _) = crate::model::parse_documents(
            "apiVersion: ocelot.dev/v1\nkind: IPPool\nmetadata: {name: default}\nspec: {cidr: 10.90.0.0/16}\n",
        )
        .unwrap();
        Arc::new(Fixed { cluster: Cluster::from_objects(&objs), ipam: Default::default(), socket })
    }

    /// A stand-in dataplane on a unix socket: answers `hello`, and
    /// `counters` with one pod port whose receive count grows by 10 per
    /// request.
    fn fake_dataplane(path: &std::path::Path) {
        let _ = std::fs::remove_file(path);
        let l = std::os::unix::net::UnixListener::bind(path).unwrap();
        let rx = Arc::new(AtomicU64::new(0));
        std::thread::spawn(move || {
            for conn in l.incoming().flatten() {
                let rx = rx.clone();
                std::thread::spawn(move || {
                    let mut w = conn.try_clone().unwrap();
                    for line in BufReader::new(conn).lines().map_while(Result::ok) {
                        let Ok(e) = serde_json::from_str::<Envelope>(&line) else { return };
                        let reply = match e.request {
                            DpRequest::Hello { .. } => Reply::Hello {
                                version: 1,
                                dataplane: "fake".into(),
                                tables_version: 1,
                            },
                            DpRequest::Counters => {
                                let n = rx.fetch_add(10, Ordering::Relaxed) + 10;
                                let port = serde_json::json!({
                                    "port": 1, "name": "ocpod", "kind": "pod",
                                    "rx_packets": n, "rx_bytes": 0, "tx_packets": 0, "tx_bytes": 0,
                                    "drops": {"no_route": n / 10}
                                });
                                Reply::Counters {
                                    ports: vec![serde_json::from_value(port).unwrap()],
                                    workers: vec![],
                                    drop_reasons: vec![("no_route".into(), "no route".into())],
                                }
                            }
                            _ => return,
                        };
                        let r = DpResponse { id: Some(e.id), outcome: Outcome::Ok(reply) };
                        let _ = writeln!(w, "{}", serde_json::to_string(&r).unwrap());
                    }
                });
            }
        });
    }

    #[test]
    fn listen_addresses() {
        assert_eq!("".parse::<ListenAddr>().unwrap(), ListenAddr(None));
        assert_eq!(
            "0.0.0.0:9099".parse::<ListenAddr>().unwrap().0,
            Some("0.0.0.0:9099".parse().unwrap())
        );
        assert!("[::1]:9099".parse::<ListenAddr>().is_ok());
        assert!("localhost".parse::<ListenAddr>().unwrap_err().contains("or '' to disable"));
    }

    /// A real listener on 127.0.0.1 port 0: probes follow the state, the
    /// exposition parses and its values move.
    #[test]
    fn endpoints_over_a_real_listener() {
        let dir = std::env::temp_dir().join(format!("ocelot-http-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("dp.sock");
        let ops = Arc::new(OpsState::new(Duration::from_secs(30)));
        let src = fixed(socket.clone());
        let addr = serve("127.0.0.1:0".parse().unwrap(), ops.clone(), src.clone()).unwrap();
        let a = addr.to_string();
        let t = Duration::from_secs(5);
        assert_eq!(get(&a, "/livez", t).unwrap(), (200, "ok\n".into()));
        let (code, body) = get(&a, "/readyz", t).unwrap();
        assert_eq!(code, 503);
        assert!(
            body.contains("datastore not synced") && body.contains("dataplane not reachable"),
            "{body}"
        );
        ops.tick();
        ops.set_datastore_synced(true);
        ops.set_dataplane(true);
        // The agent believes it is connected, but nothing answers there.
        let (code, body) = get(&a, "/readyz", t).unwrap();
        assert_eq!(code, 503, "{body}");
        assert!(body.contains("dataplane not reachable at"), "{body}");

        let (code, m0) = get(&a, "/metrics", t).unwrap();
        assert_eq!(code, 200);
        let s0 = metrics::tests::parse(&m0).unwrap();
        assert_eq!(s0["ocelot_dataplane_up"], 0.0, "no dataplane at that socket");
        assert_eq!(s0["ocelot_agent_ready"], 0.0);

        fake_dataplane(&socket);
        assert_eq!(get(&a, "/readyz", t).unwrap(), (200, "ok\n".into()));
        let (_, m1) = get(&a, "/metrics", t).unwrap();
        let s1 = metrics::tests::parse(&m1).unwrap();
        assert_eq!(s1["ocelot_agent_ready"], 1.0);
        assert_eq!(s1["ocelot_dataplane_up"], 1.0);
        assert_eq!(s1[r#"ocelot_ipam_pool_capacity_addresses{pool="default"}"#], 65536.0);
        let rx = r#"ocelot_dataplane_port_rx_packets_total{port="ocpod",kind="pod"}"#;

        ops.sync_error("overlay");
        ops.policy_calculated(Duration::from_micros(300));
        let (_, m2) = get(&a, "/metrics", t).unwrap();
        let s2 = metrics::tests::parse(&m2).unwrap();
        assert!(s2[rx] > s1[rx], "counters move: {} then {}", s1[rx], s2[rx]);
        assert!(s2[r#"ocelot_dataplane_drops_total{reason="no_route"}"#] >= 0.0);
        assert_eq!(s2[r#"ocelot_agent_sync_errors_total{kind="overlay"}"#], 1.0);
        assert_eq!(s2["ocelot_policy_calculation_seconds_count"], 1.0);

        let (code, st) = get(&a, "/status", t).unwrap();
        assert_eq!(code, 200);
        let v: view::AgentView = serde_json::from_str(&st).unwrap();
        assert_eq!(v.node, "node-1");
        assert_eq!(v.pools[0].cidr, "10.90.0.0/16");
        assert!(v.ready, "{v:?}");

        assert_eq!(get(&a, "/nope", t).unwrap().0, 404);
        ops.set_dataplane(false);
        assert_eq!(get(&a, "/readyz", t).unwrap().0, 503);
        assert!(get("127.0.0.1:1", "/livez", t).unwrap_err().contains("cannot reach"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}

//! The API socket: one thread accepting, one per connection. Requests are
//! served one at a time against the engine (under its mutex).

use super::{ApiError, Envelope, ErrorCode, Outcome, Reply, Request, Response, MAX_LINE, VERSIONS};
use crate::engine::Engine;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::{Arc, Mutex};

/// Bind the socket (root-only) and serve it on a background thread.
pub fn serve(path: &Path, engine: Arc<Mutex<Engine>>) -> io::Result<std::thread::JoinHandle<()>> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!("{} is served by another dataplane", path.display()),
            ));
        }
        std::fs::remove_file(path)?;
    }
    // Bind with a umask that leaves the socket root-only from its first moment.
    // SAFETY: umask only changes the process's file-creation mask.
    let old = unsafe { libc::umask(0o177) };
    let bound = UnixListener::bind(path);
    // SAFETY: as above; restores the previous mask.
    unsafe { libc::umask(old) };
    let listener = bound?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    tracing::info!(socket = %path.display(), "control API listening");
    std::thread::Builder::new().name("ocelot-api".into()).spawn(move || {
        for conn in listener.incoming() {
            match conn {
                Ok(s) => {
                    let engine = engine.clone();
                    let _ = std::thread::Builder::new().name("ocelot-api-conn".into()).spawn(
                        move || {
                            if let Err(e) = handle(s, &engine) {
                                tracing::debug!("API connection ended: {e}");
                            }
                        },
                    );
                }
                Err(e) => tracing::warn!("API accept failed: {e}"),
            }
        }
    })
}

fn handle(stream: UnixStream, engine: &Mutex<Engine>) -> io::Result<()> {
    let mut out = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    let mut version: Option<u32> = None;
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = reader.by_ref().take(MAX_LINE as u64 + 1).read_until(b'\n', &mut line)?;
        if n == 0 {
            return Ok(());
        }
        if line.len() > MAX_LINE {
            let r = Response {
                id: None,
                outcome: Outcome::Error(ApiError::new(
                    ErrorCode::BadRequest,
                    format!("request longer than {} MiB", MAX_LINE >> 20),
                )),
            };
            write_response(&mut out, &r)?;
            return Ok(());
        }
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let resp = match serde_json::from_slice::<Envelope>(&line) {
            Err(e) => {
                let id = serde_json::from_slice::<serde_json::Value>(&line)
                    .ok()
                    .and_then(|v| v.get("id")?.as_u64());
                Response {
                    id,
                    outcome: Outcome::Error(ApiError::new(ErrorCode::BadRequest, e.to_string())),
                }
            }
            Ok(env) => {
                Response { id: Some(env.id), outcome: dispatch(env.request, &mut version, engine) }
            }
        };
        write_response(&mut out, &resp)?;
    }
}

fn write_response(out: &mut UnixStream, r: &Response) -> io::Result<()> {
    let mut v = serde_json::to_vec(r).map_err(io::Error::other)?;
    v.push(b'\n');
    out.write_all(&v)
}

/// Serve one request. Public for tests.
pub fn dispatch(req: Request, version: &mut Option<u32>, engine: &Mutex<Engine>) -> Outcome {
    let mut engine = engine.lock().unwrap_or_else(|e| e.into_inner());
    let r = match req {
        Request::Hello { versions, client } => {
            match VERSIONS.iter().rev().find(|v| versions.contains(v)) {
                Some(v) => {
                    *version = Some(*v);
                    tracing::info!(client, version = v, "API client connected");
                    Ok(Reply::Hello {
                        version: *v,
                        dataplane: env!("CARGO_PKG_VERSION").into(),
                        tables_version: engine.tables_version(),
                    })
                }
                None => Err(ApiError::new(
                    ErrorCode::UnsupportedVersion,
                    format!("no common version: we speak {VERSIONS:?}, you {versions:?}"),
                )),
            }
        }
        _ if version.is_none() => Err(ApiError::new(ErrorCode::HelloFirst, "send hello first")),
        Request::Sync { endpoints, pools } => {
            engine.sync(endpoints, pools).map(|v| Reply::Done { tables_version: v })
        }
        Request::AddEndpoint { endpoint } => {
            engine.add_endpoint(endpoint).map(|e| Reply::Endpoint { endpoint: e })
        }
        Request::RemoveEndpoint { name } => {
            engine.remove_endpoint(&name).map(|v| Reply::Done { tables_version: v })
        }
        Request::SetOverlay { overlay } => engine.set_overlay(overlay),
        Request::SetPolicies { policies } => {
            engine.set_policies(policies).map(|v| Reply::Done { tables_version: v })
        }
        Request::SetServices { services } => engine.set_services(services),
        Request::Counters => Ok(engine.counters()),
        Request::State => Ok(engine.state()),
    };
    match r {
        Ok(r) => Outcome::Ok(r),
        Err(e) => Outcome::Error(e),
    }
}

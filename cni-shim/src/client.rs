//! The agent's CNI socket: one JSON request line, one JSON response line,
//! all within one deadline.

use crate::proto::{CniRequest, CniResponse};
use std::fmt;
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

/// Largest response accepted (a result is a few hundred bytes).
pub const MAX_RESPONSE: usize = 1 << 20;

/// Why talking to the agent failed.
#[derive(Debug)]
pub enum ClientError {
    /// No connection could be made: the socket is missing, nobody listens
    /// (connection refused), or it is not a socket. The agent is not running.
    Unreachable(io::Error),
    /// The deadline passed (while connecting, sending or waiting).
    Timeout(&'static str),
    /// The connection broke before a full answer arrived.
    Io(io::Error),
    /// The agent answered something that is not a `CniResponse` line.
    Protocol(String),
}

impl fmt::Display for ClientError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientError::Unreachable(e) => write!(f, "cannot connect to the agent: {e}"),
            ClientError::Timeout(what) => write!(f, "timed out {what}"),
            ClientError::Io(e) => write!(f, "lost the connection to the agent: {e}"),
            ClientError::Protocol(e) => write!(f, "bad answer from the agent: {e}"),
        }
    }
}

impl std::error::Error for ClientError {}

fn remaining(deadline: Instant, what: &'static str) -> Result<Duration, ClientError> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        Err(ClientError::Timeout(what))
    } else {
        Ok(left)
    }
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut)
}

/// Connects, bounded by the deadline. A unix-socket connect normally
/// completes or fails at once, but blocks when the listener's backlog is
/// full (an agent that stopped accepting): it runs on a helper thread so the
/// deadline holds even then; the thread dies with the process.
fn connect(path: &Path, deadline: Instant) -> Result<UnixStream, ClientError> {
    let left = remaining(deadline, "connecting to the agent")?;
    let (tx, rx) = mpsc::channel();
    let owned: PathBuf = path.to_path_buf();
    let spawned = thread::Builder::new().name("connect".into()).spawn(move || {
        let _ = tx.send(UnixStream::connect(owned));
    });
    if spawned.is_err() {
        // No thread (resource limits): connect inline.
        return UnixStream::connect(path).map_err(ClientError::Unreachable);
    }
    match rx.recv_timeout(left) {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(e)) => Err(ClientError::Unreachable(e)),
        Err(_) => Err(ClientError::Timeout("connecting to the agent")),
    }
}

/// Sends `req` to the agent at `path` and returns its answer, all within
/// `timeout`.
pub fn call(path: &Path, req: &CniRequest, timeout: Duration) -> Result<CniResponse, ClientError> {
    let deadline = Instant::now() + timeout;
    let mut stream = connect(path, deadline)?;

    let mut line = serde_json::to_vec(req)
        .map_err(|e| ClientError::Protocol(format!("encoding the request: {e}")))?;
    line.push(b'\n');
    let left = remaining(deadline, "sending the request")?;
    stream.set_write_timeout(Some(left)).map_err(ClientError::Io)?;
    stream.write_all(&line).map_err(|e| {
        if is_timeout(&e) {
            ClientError::Timeout("sending the request")
        } else {
            ClientError::Io(e)
        }
    })?;

    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    loop {
        let left = remaining(deadline, "waiting for the agent's answer")?;
        stream.set_read_timeout(Some(left)).map_err(ClientError::Io)?;
        match stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                if chunk[..n].contains(&b'\n') {
                    break;
                }
                if buf.len() > MAX_RESPONSE {
                    return Err(ClientError::Protocol(format!(
                        "answer longer than {MAX_RESPONSE} bytes"
                    )));
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if is_timeout(&e) => {
                return Err(ClientError::Timeout("waiting for the agent's answer"))
            }
            Err(e) => return Err(ClientError::Io(e)),
        }
    }
    let end = buf.iter().position(|&b| b == b'\n').unwrap_or(buf.len());
    let text = &buf[..end];
    if text.iter().all(u8::is_ascii_whitespace) {
        return Err(ClientError::Io(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the agent closed the connection without answering",
        )));
    }
    serde_json::from_slice(text).map_err(|e| ClientError::Protocol(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{CniResult, Command};
    use std::io::{BufRead, BufReader};
    use std::os::unix::net::UnixListener;

    fn req() -> CniRequest {
        CniRequest {
            command: Command::Status,
            container_id: String::new(),
            netns: None,
            ifname: String::new(),
            args: Default::default(),
            network: "n".into(),
            config: serde_json::json!({}),
            prev_result: None,
            valid_attachments: None,
        }
    }

    fn tmp(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("ocelot-cni-client-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(name);
        let _ = std::fs::remove_file(&p);
        p
    }

    /// A one-shot server: reads one line, answers `answer` (raw bytes).
    fn serve(path: &Path, answer: Vec<u8>, delay: Duration) -> thread::JoinHandle<String> {
        let l = UnixListener::bind(path).unwrap();
        thread::spawn(move || {
            let (s, _) = l.accept().unwrap();
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut line = String::new();
            r.read_line(&mut line).unwrap();
            thread::sleep(delay);
            let _ = (&s).write_all(&answer);
            line
        })
    }

    #[test]
    fn round_trip() {
        let p = tmp("ok.sock");
        let ans = serde_json::to_vec(&CniResponse::Ok { result: Some(CniResult::default()) });
        let mut ans = ans.unwrap();
        ans.push(b'\n');
        let h = serve(&p, ans, Duration::ZERO);
        let got = call(&p, &req(), Duration::from_secs(5)).unwrap();
        assert_eq!(got, CniResponse::Ok { result: Some(CniResult::default()) });
        let sent: CniRequest = serde_json::from_str(h.join().unwrap().trim_end()).unwrap();
        assert_eq!(sent, req());
    }

    #[test]
    fn answer_without_newline_then_eof() {
        let p = tmp("eof.sock");
        let h = serve(&p, br#"{"ok":{"result":null}}"#.to_vec(), Duration::ZERO);
        assert_eq!(
            call(&p, &req(), Duration::from_secs(5)).unwrap(),
            CniResponse::Ok { result: None }
        );
        h.join().unwrap();
    }

    #[test]
    fn missing_socket_is_unreachable() {
        let p = tmp("none.sock");
        assert!(matches!(
            call(&p, &req(), Duration::from_secs(1)),
            Err(ClientError::Unreachable(_))
        ));
    }

    #[test]
    fn stale_socket_is_unreachable() {
        let p = tmp("stale.sock");
        drop(UnixListener::bind(&p).unwrap()); // the file stays, nobody listens
        assert!(matches!(
            call(&p, &req(), Duration::from_secs(1)),
            Err(ClientError::Unreachable(_))
        ));
    }

    #[test]
    fn slow_agent_times_out() {
        let p = tmp("slow.sock");
        let _h = serve(&p, b"{}\n".to_vec(), Duration::from_secs(3));
        let t = Instant::now();
        let r = call(&p, &req(), Duration::from_millis(200));
        assert!(matches!(r, Err(ClientError::Timeout(_))), "{r:?}");
        assert!(t.elapsed() < Duration::from_secs(2));
    }

    #[test]
    fn garbage_and_silence() {
        let p = tmp("garbage.sock");
        let h = serve(&p, b"hello\n".to_vec(), Duration::ZERO);
        assert!(matches!(call(&p, &req(), Duration::from_secs(5)), Err(ClientError::Protocol(_))));
        h.join().unwrap();
        let p = tmp("silent.sock");
        let h = serve(&p, Vec::new(), Duration::ZERO);
        assert!(matches!(call(&p, &req(), Duration::from_secs(5)), Err(ClientError::Io(_))));
        h.join().unwrap();
    }
}

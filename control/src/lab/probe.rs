//! `ocelot lab probe`: connect from every pod to every pod on a port and
//! protocol, all at once, and print who reached whom, as cyclonus does.
//!
//! Probes run in this process on a bounded pool of short-lived threads;
//! each thread enters the source pod's network namespace (`setns` changes
//! only that thread) before it opens its socket. A probe counts as
//! reachable only when the answer names the pod it was sent to.
//!
//! SCTP goes through the kernel where it has SCTP; elsewhere through the
//! user-space exchange of `sctp.rs` (INIT out, INIT ACK back with the pod's
//! name in its State Cookie, then ABORT), judged the same way, and the
//! matrix says so in its note.

use crate::lab::sctp::{self, RawOutcome};
use serde_json::{json, Map, Value};
use std::fmt;
use std::fs::File;
use std::io::Read;
use std::net::{IpAddr, SocketAddr, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Most probes in flight at once.
const MAX_THREADS: usize = 256;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    /// Case-insensitive, as `kubectl` is lenient.
    pub fn parse(s: &str) -> Result<Protocol, String> {
        match s.to_ascii_uppercase().as_str() {
            "TCP" => Ok(Protocol::Tcp),
            "UDP" => Ok(Protocol::Udp),
            "SCTP" => Ok(Protocol::Sctp),
            _ => Err(format!("unknown protocol {s:?} (TCP, UDP or SCTP)")),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A pod as the prober sees it.
#[derive(Clone, Debug)]
pub struct Peer {
    /// `namespace/name`.
    pub key: String,
    /// Its network namespace (`/run/netns/...`).
    pub netns: PathBuf,
    /// Where to reach it; `None` if it has no address.
    pub ip: Option<IpAddr>,
}

/// The outcome of one probe.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The expected pod answered.
    Reached,
    /// Nothing answered in time, or the connection was refused or reset.
    Blocked(String),
    /// Someone answered, but not the expected pod.
    Wrong(String),
    /// The probe could not be made (no address, no SCTP, namespace gone).
    Error(String),
}

impl Outcome {
    pub fn reached(&self) -> bool {
        *self == Outcome::Reached
    }

    /// The matrix cell.
    pub fn symbol(&self) -> char {
        match self {
            Outcome::Reached => '.',
            Outcome::Blocked(_) => 'X',
            Outcome::Wrong(_) => '!',
            Outcome::Error(_) => '?',
        }
    }
}

/// What every cell means.
pub const LEGEND: &str =
    "legend: . reached (the answer named the pod)   X no answer (timeout, refused, reset)   \
     ! another pod answered   ? could not probe";

/// One port and protocol, all pairs. `cells[from][to]`.
#[derive(Clone, Debug)]
pub struct Matrix {
    pub port: u16,
    pub protocol: Protocol,
    pub pods: Vec<String>,
    pub cells: Vec<Vec<Outcome>>,
    /// Something to say about the whole matrix (SCTP missing, ...).
    pub note: Option<String>,
}

impl Matrix {
    pub fn reached(&self) -> usize {
        self.cells.iter().flatten().filter(|c| c.reached()).count()
    }

    /// `{"port": 80, "protocol": "TCP", "matrix": {"x/a": {"x/b": true}}}`.
    pub fn to_json(&self) -> Value {
        let mut m = Map::new();
        for (i, from) in self.pods.iter().enumerate() {
            let row: Map<String, Value> = self
                .pods
                .iter()
                .enumerate()
                .map(|(j, to)| (to.clone(), Value::Bool(self.cells[i][j].reached())))
                .collect();
            m.insert(from.clone(), Value::Object(row));
        }
        let mut v = json!({"port": self.port, "protocol": self.protocol.as_str(), "matrix": m});
        if let Some(n) = &self.note {
            v["note"] = Value::String(n.clone());
        }
        v
    }

    /// The table: rows from, columns to.
    pub fn render(&self) -> String {
        let mut s = format!(
            "{}/{}: {}/{} reached\n",
            self.protocol,
            self.port,
            self.reached(),
            self.pods.len() * self.pods.len()
        );
        if let Some(n) = &self.note {
            s.push_str(&format!("note: {n}\n"));
        }
        let w0 = self.pods.iter().map(String::len).max().unwrap_or(0).max("from \\ to".len());
        let widths: Vec<usize> = self.pods.iter().map(|p| p.len().max(1)).collect();
        let line = |cols: Vec<String>| -> String {
            let mut l = String::new();
            for (i, c) in cols.iter().enumerate() {
                let w = if i == 0 { w0 } else { widths[i - 1] };
                l.push_str(&format!("{c:<w$}"));
                l.push_str(if i + 1 < cols.len() { "  " } else { "" });
            }
            l.trim_end().to_string() + "\n"
        };
        let mut header = vec!["from \\ to".to_string()];
        header.extend(self.pods.iter().cloned());
        s.push_str(&line(header));
        for (i, from) in self.pods.iter().enumerate() {
            let mut row = vec![from.clone()];
            row.extend(self.cells[i].iter().map(|c| c.symbol().to_string()));
            s.push_str(&line(row));
        }
        s
    }

    /// The cells that were not reached, with why (for `-v`).
    pub fn failures(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (i, from) in self.pods.iter().enumerate() {
            for (j, to) in self.pods.iter().enumerate() {
                let why = match &self.cells[i][j] {
                    Outcome::Reached => continue,
                    Outcome::Blocked(w) => format!("no answer: {w}"),
                    Outcome::Wrong(w) => format!("answered by {w:?}"),
                    Outcome::Error(w) => format!("not probed: {w}"),
                };
                out.push(format!("{from} -> {to}: {why}"));
            }
        }
        out
    }
}

/// Probe every pair of `peers` on `port`/`protocol`, `timeout` per probe.
pub fn run(peers: &[Peer], port: u16, protocol: Protocol, timeout: Duration) -> Matrix {
    run_many(peers, &[(port, protocol)], timeout).pop().expect("one matrix")
}

/// Several matrices in one go: every probe of every port runs in parallel.
pub fn run_many(peers: &[Peer], ports: &[(u16, Protocol)], timeout: Duration) -> Vec<Matrix> {
    let n = peers.len();
    let jobs: Vec<(usize, usize, usize)> = (0..ports.len())
        .flat_map(|p| (0..n).flat_map(move |i| (0..n).map(move |j| (p, i, j))))
        .collect();
    let results: Mutex<Vec<Option<Outcome>>> = Mutex::new(vec![None; jobs.len()]);
    // Namespace files opened once; every thread enters from these fds.
    let nsfiles: Vec<Result<File, String>> = peers
        .iter()
        .map(|p| File::open(&p.netns).map_err(|e| format!("{}: {e}", p.netns.display())))
        .collect();
    let next = AtomicUsize::new(0);
    let threads = jobs.len().clamp(1, MAX_THREADS);
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                let mut current: Option<usize> = None;
                loop {
                    let k = next.fetch_add(1, Ordering::Relaxed);
                    let Some(&(p, i, j)) = jobs.get(k) else { break };
                    let (port, proto) = ports[p];
                    let outcome = match (&nsfiles[i], peers[j].ip) {
                        (Err(e), _) => Outcome::Error(format!("source namespace {e}")),
                        (_, None) => Outcome::Error(format!("{} has no address", peers[j].key)),
                        (Ok(f), Some(ip)) => {
                            if current != Some(i) && !in_netns(f) {
                                match crate::lab::sys::setns_net(f.as_raw_fd()) {
                                    Ok(()) => current = Some(i),
                                    Err(e) => {
                                        results.lock().unwrap()[k] =
                                            Some(Outcome::Error(format!("setns: {e}")));
                                        continue;
                                    }
                                }
                            }
                            probe_one(SocketAddr::new(ip, port), proto, &peers[j].key, timeout)
                        }
                    };
                    results.lock().unwrap()[k] = Some(outcome);
                }
            });
        }
    });
    let results = results.into_inner().unwrap();
    let keys: Vec<String> = peers.iter().map(|p| p.key.clone()).collect();
    ports
        .iter()
        .enumerate()
        .map(|(p, &(port, protocol))| {
            let cells: Vec<Vec<Outcome>> = (0..n)
                .map(|i| {
                    (0..n)
                        .map(|j| {
                            results[p * n * n + i * n + j]
                                .clone()
                                .unwrap_or_else(|| Outcome::Error("not run".into()))
                        })
                        .collect()
                })
                .collect();
            let note = if protocol != Protocol::Sctp || n == 0 {
                None
            } else if cells
                .iter()
                .flatten()
                .all(|c| matches!(c, Outcome::Error(e) if e.starts_with(sctp::UNAVAILABLE)))
            {
                // No kernel SCTP, and no user-space fallback either.
                match &cells[0][0] {
                    Outcome::Error(e) => Some(e.clone()),
                    _ => None,
                }
            } else if !sctp::kernel_available() {
                Some(sctp::USER_SPACE.to_string())
            } else {
                None
            };
            Matrix { port, protocol, pods: keys.clone(), cells, note }
        })
        .collect()
}

/// True when the calling thread already is in the namespace `ns` (no
/// `setns`, which needs privileges, is then needed).
fn in_netns(ns: &File) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (ns.metadata(), std::fs::metadata("/proc/thread-self/ns/net")) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

/// Judge an answer.
fn judge(answer: &[u8], expected: &str) -> Outcome {
    let got = String::from_utf8_lossy(answer);
    let got = got.trim();
    if got == expected {
        Outcome::Reached
    } else if got.is_empty() {
        Outcome::Blocked("empty answer".into())
    } else {
        Outcome::Wrong(got.to_string())
    }
}

/// One probe from the calling thread's namespace.
pub fn probe_one(to: SocketAddr, proto: Protocol, expected: &str, timeout: Duration) -> Outcome {
    let deadline = Instant::now() + timeout;
    let left = || deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
    match proto {
        Protocol::Tcp => {
            let mut c = match TcpStream::connect_timeout(&to, timeout) {
                Ok(c) => c,
                Err(e) => return Outcome::Blocked(e.to_string()),
            };
            let _ = c.set_read_timeout(Some(left()));
            read_answer(&mut c, expected)
        }
        Protocol::Sctp => {
            if !sctp::kernel_available() {
                return probe_sctp_user_space(to, expected, timeout);
            }
            let mut c = match sctp::connect(to, timeout) {
                Ok(c) => c,
                Err(e) if sctp::unavailable(&e) => {
                    return probe_sctp_user_space(to, expected, left())
                }
                Err(e) => return Outcome::Blocked(e.to_string()),
            };
            read_answer(&mut c, expected)
        }
        Protocol::Udp => {
            let bind: SocketAddr =
                if to.is_ipv4() { ([0, 0, 0, 0], 0).into() } else { ([0u16; 8], 0).into() };
            let s = match UdpSocket::bind(bind).and_then(|s| s.connect(to).map(|_| s)) {
                Ok(s) => s,
                Err(e) => return Outcome::Error(format!("udp socket: {e}")),
            };
            // A datagram can be lost (first packet, neighbour resolution):
            // ask up to three times within the timeout.
            let mut last = "no answer".to_string();
            let mut buf = [0u8; 512];
            for attempt in 0..3u32 {
                if Instant::now() >= deadline {
                    break;
                }
                if let Err(e) = s.send(b"probe\n") {
                    last = format!("send: {e}");
                    std::thread::sleep((timeout / 3).min(left()));
                    continue;
                }
                let slice = (timeout / 3).max(Duration::from_millis(10));
                let _ = s.set_read_timeout(Some(slice.min(left())));
                match s.recv(&mut buf) {
                    Ok(n) => return judge(&buf[..n], expected),
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) =>
                    {
                        last = format!("timed out ({} tries)", attempt + 1)
                    }
                    Err(e) => last = e.to_string(),
                }
            }
            Outcome::Blocked(last)
        }
    }
}

/// SCTP without kernel SCTP: the State Cookie of the INIT ACK is the
/// answer; an ABORT is a refusal, as a reset is for TCP.
fn probe_sctp_user_space(to: SocketAddr, expected: &str, timeout: Duration) -> Outcome {
    let SocketAddr::V4(to) = to else {
        return Outcome::Error(format!(
            "{}; the user-space fallback is IPv4 only",
            sctp::UNAVAILABLE
        ));
    };
    match sctp::probe_raw(to, timeout) {
        Ok(RawOutcome::Answered(cookie)) => judge(&cookie, expected),
        Ok(RawOutcome::Aborted) => Outcome::Blocked("aborted by the peer".into()),
        Ok(RawOutcome::NoAnswer(why)) => Outcome::Blocked(why),
        Err(e) => {
            Outcome::Error(format!("{}; user-space fallback: raw socket: {e}", sctp::UNAVAILABLE))
        }
    }
}

fn read_answer(c: &mut impl Read, expected: &str) -> Outcome {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 256];
    loop {
        match c.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                if buf.contains(&b'\n') || buf.len() > 1024 {
                    break;
                }
            }
            Err(e) if buf.is_empty() => return Outcome::Blocked(e.to_string()),
            Err(_) => break,
        }
    }
    judge(&buf, expected)
}

/// Every matrix as a JSON array.
pub fn to_json(ms: &[Matrix]) -> Value {
    Value::Array(ms.iter().map(Matrix::to_json).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::net::TcpListener;

    fn m() -> Matrix {
        Matrix {
            port: 80,
            protocol: Protocol::Tcp,
            pods: vec!["x/a".into(), "x/bb".into(), "y/longer".into()],
            cells: vec![
                vec![Outcome::Reached, Outcome::Reached, Outcome::Blocked("timed out".into())],
                vec![Outcome::Reached, Outcome::Wrong("x/a".into()), Outcome::Reached],
                vec![Outcome::Error("no address".into()), Outcome::Reached, Outcome::Reached],
            ],
            note: None,
        }
    }

    #[test]
    fn table() {
        let t = m().render();
        assert_eq!(
            t,
            "TCP/80: 6/9 reached\n\
             from \\ to  x/a  x/bb  y/longer\n\
             x/a        .    .     X\n\
             x/bb       .    !     .\n\
             y/longer   ?    .     .\n"
        );
    }

    #[test]
    fn json_shape() {
        let v = m().to_json();
        assert_eq!(v["port"], 80);
        assert_eq!(v["protocol"], "TCP");
        assert_eq!(v["matrix"]["x/a"]["x/bb"], true);
        assert_eq!(v["matrix"]["x/a"]["y/longer"], false);
        assert_eq!(v["matrix"]["x/bb"]["x/bb"], false, "a wrong answer is not reached");
        assert_eq!(v["matrix"].as_object().unwrap().len(), 3);
        assert!(v.get("note").is_none());
        let all = to_json(&[m(), m()]);
        assert_eq!(all.as_array().unwrap().len(), 2);
    }

    #[test]
    fn failures_say_why() {
        let f = m().failures();
        assert_eq!(f.len(), 3);
        assert_eq!(f[0], "x/a -> y/longer: no answer: timed out");
        assert_eq!(f[1], "x/bb -> x/bb: answered by \"x/a\"");
    }

    #[test]
    fn protocols() {
        assert_eq!(Protocol::parse("udp"), Ok(Protocol::Udp));
        assert_eq!(Protocol::Sctp.to_string(), "SCTP");
        assert!(Protocol::parse("icmp").is_err());
    }

    #[test]
    fn judging() {
        assert_eq!(judge(b"x/a\n", "x/a"), Outcome::Reached);
        assert_eq!(judge(b"x/b\n", "x/a"), Outcome::Wrong("x/b".into()));
        assert!(matches!(judge(b"", "x/a"), Outcome::Blocked(_)));
    }

    #[test]
    fn probes_on_loopback() {
        // Our own namespace: probe_one against local listeners.
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        std::thread::spawn(move || {
            for c in l.incoming().flatten().take(2) {
                let _ = (&c).write_all(b"x/a\n");
            }
        });
        let to = SocketAddr::from(([127, 0, 0, 1], port));
        let t = Duration::from_millis(500);
        assert_eq!(probe_one(to, Protocol::Tcp, "x/a", t), Outcome::Reached);
        assert_eq!(probe_one(to, Protocol::Tcp, "x/b", t), Outcome::Wrong("x/a".into()));
        let u = UdpSocket::bind("127.0.0.1:0").unwrap();
        let uport = u.local_addr().unwrap().port();
        std::thread::spawn(move || {
            let mut b = [0u8; 64];
            if let Ok((_, from)) = u.recv_from(&mut b) {
                let _ = u.send_to(b"x/u\n", from);
            }
        });
        let uto = SocketAddr::from(([127, 0, 0, 1], uport));
        assert_eq!(probe_one(uto, Protocol::Udp, "x/u", t), Outcome::Reached);
        // Nobody listens any more on that UDP port: blocked within the timeout.
        let t0 = Instant::now();
        assert!(matches!(probe_one(uto, Protocol::Udp, "x/u", t), Outcome::Blocked(_)));
        assert!(t0.elapsed() < Duration::from_secs(2));
    }

    #[test]
    fn matrix_over_own_namespace() {
        // Two "pods" that are both this namespace, reached at 127.0.0.1 on a
        // port answering "p/one": p/one is reached from both, p/two is not.
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        std::thread::spawn(move || {
            for c in l.incoming().flatten() {
                let _ = (&c).write_all(b"p/one\n");
            }
        });
        let me = PathBuf::from("/proc/self/ns/net");
        let peers = vec![
            Peer { key: "p/one".into(), netns: me.clone(), ip: Some([127, 0, 0, 1].into()) },
            Peer { key: "p/two".into(), netns: me.clone(), ip: Some([127, 0, 0, 1].into()) },
            Peer { key: "p/none".into(), netns: "/nonexistent".into(), ip: None },
        ];
        let ms = run_many(&peers, &[(port, Protocol::Tcp)], Duration::from_millis(500));
        let mx = &ms[0];
        let sym: Vec<String> =
            mx.cells.iter().map(|r| r.iter().map(Outcome::symbol).collect()).collect();
        assert_eq!(sym, [".!?", ".!?", "???"]);
    }

    #[test]
    fn sctp_in_user_space() {
        // Without kernel SCTP: a responder in a scratch namespace, probed
        // as the lab probes, one by one and as a matrix.
        crate::lab::sctp::tests::in_scratch_netns(|| {
            let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            let r = crate::lab::sctp::tests::responder(&[80], "p/one\n", &stop);
            let to = SocketAddr::from(([127, 0, 0, 1], 80));
            let t = Duration::from_millis(600);
            assert_eq!(probe_one(to, Protocol::Sctp, "p/one", t), Outcome::Reached);
            assert_eq!(probe_one(to, Protocol::Sctp, "p/two", t), Outcome::Wrong("p/one".into()));
            let t0 = Instant::now();
            let off = SocketAddr::from(([127, 0, 0, 1], 81));
            assert!(matches!(probe_one(off, Protocol::Sctp, "p/one", t), Outcome::Blocked(_)));
            assert!(t0.elapsed() < Duration::from_secs(2));
            let me = PathBuf::from("/proc/thread-self/ns/net");
            let peers = vec![
                Peer { key: "p/one".into(), netns: me.clone(), ip: Some([127, 0, 0, 1].into()) },
                Peer { key: "p/two".into(), netns: me, ip: Some([127, 0, 0, 1].into()) },
            ];
            let ms = run_many(&peers, &[(80, Protocol::Sctp)], t);
            let sym: Vec<String> =
                ms[0].cells.iter().map(|r| r.iter().map(Outcome::symbol).collect()).collect();
            assert_eq!(sym, [".!", ".!"]);
            assert_eq!(ms[0].note.as_deref(), Some(sctp::USER_SPACE));
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            r.join().unwrap();
        });
    }
}

//! `ocelot lab connect`: many connections (or datagrams, or DNS queries)
//! from one pod, node or external to one address and port, counting who
//! answered and how the others failed: refused at once, or no answer in
//! time. Through a Service this shows how connections spread over its
//! backends, affinity, and what a Service without endpoints does.

use crate::lab::probe::{probe_one, Outcome, Protocol};
use serde::Serialize;
use std::collections::BTreeMap;
use std::fs::File;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// What happened to one attempt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Attempt {
    /// Answered by this name.
    Answered(String),
    /// Refused at once (TCP RST, ICMP port unreachable, SCTP ABORT).
    Refused(String),
    /// No answer within the timeout.
    Timeout(String),
    /// Anything else (no route, a bad answer...).
    Failed(String),
}

/// The counts over every attempt.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Summary {
    pub attempts: usize,
    /// Answers by the name that answered.
    pub answers: BTreeMap<String, usize>,
    pub refused: usize,
    pub timeout: usize,
    pub failed: usize,
    /// A few of the failures' messages.
    pub errors: Vec<String>,
    /// Per attempt, from the start of the connect to its outcome.
    pub mean_ms: f64,
    pub max_ms: f64,
    pub elapsed_ms: f64,
}

/// Sort an error message into refused / timed out / other.
pub fn classify(why: &str) -> Attempt {
    let w = why.to_ascii_lowercase();
    if w.contains("refused") || w.contains("reset") || w.contains("aborted") {
        Attempt::Refused(why.to_string())
    } else if w.contains("timed out")
        || w.contains("temporarily unavailable")
        || w.contains("no answer")
    {
        Attempt::Timeout(why.to_string())
    } else {
        Attempt::Failed(why.to_string())
    }
}

/// One attempt from the calling thread's namespace.
pub fn attempt(to: SocketAddr, proto: Protocol, dns: bool, timeout: Duration) -> Attempt {
    if dns && proto == Protocol::Udp {
        return dns_attempt(to, timeout);
    }
    // No pod is named "\0": whoever answers is a `Wrong` naming itself.
    match probe_one(to, proto, "\0", timeout) {
        Outcome::Wrong(name) => {
            Attempt::Answered(name.split_whitespace().next().unwrap_or("").to_string())
        }
        Outcome::Reached => Attempt::Failed("empty answer".into()),
        Outcome::Blocked(why) => classify(&why),
        Outcome::Error(why) => Attempt::Failed(why),
    }
}

fn dns_attempt(to: SocketAddr, timeout: Duration) -> Attempt {
    let bind: SocketAddr = ([0, 0, 0, 0], 0).into();
    let s = match UdpSocket::bind(bind).and_then(|s| s.connect(to).map(|_| s)) {
        Ok(s) => s,
        Err(e) => return Attempt::Failed(format!("udp socket: {e}")),
    };
    let id = (crate::lab::sctp::random_u32() & 0xffff) as u16;
    if let Err(e) = s.send(&crate::lab::dns::query(id, "whoami.lab.ocelot.dev")) {
        return classify(&e.to_string());
    }
    let _ = s.set_read_timeout(Some(timeout));
    let mut buf = [0u8; 1500];
    match s.recv(&mut buf) {
        Ok(n) => match crate::lab::dns::read_answer(&buf[..n], id) {
            Ok(name) => Attempt::Answered(name),
            Err(e) => Attempt::Failed(e),
        },
        Err(e) => classify(&e.to_string()),
    }
}

/// `count` attempts from the namespace at `netns`, `parallel` at a time.
pub fn run(
    netns: &Path,
    to: SocketAddr,
    proto: Protocol,
    dns: bool,
    count: usize,
    parallel: usize,
    timeout: Duration,
) -> anyhow::Result<Summary> {
    let ns = File::open(netns)
        .map_err(|e| anyhow::anyhow!("opening namespace {}: {e}", netns.display()))?;
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<(Attempt, Duration)>> = Mutex::new(Vec::with_capacity(count));
    let t0 = Instant::now();
    let failed_setns: Mutex<Option<String>> = Mutex::new(None);
    std::thread::scope(|s| {
        for _ in 0..parallel.clamp(1, 64).min(count.max(1)) {
            s.spawn(|| {
                if let Err(e) = crate::lab::sys::setns_net(ns.as_raw_fd()) {
                    *failed_setns.lock().unwrap_or_else(|e| e.into_inner()) = Some(e.to_string());
                    return;
                }
                while next.fetch_add(1, Ordering::Relaxed) < count {
                    let t = Instant::now();
                    let a = attempt(to, proto, dns, timeout);
                    results.lock().unwrap_or_else(|e| e.into_inner()).push((a, t.elapsed()));
                }
            });
        }
    });
    if let Some(e) = failed_setns.into_inner().unwrap_or_else(|e| e.into_inner()) {
        anyhow::bail!("entering {}: {e}", netns.display());
    }
    let results = results.into_inner().unwrap_or_else(|e| e.into_inner());
    let mut sum = Summary { attempts: results.len(), ..Default::default() };
    let mut total = Duration::ZERO;
    for (a, d) in results {
        total += d;
        sum.max_ms = sum.max_ms.max(d.as_secs_f64() * 1e3);
        let why = match a {
            Attempt::Answered(name) => {
                *sum.answers.entry(name).or_default() += 1;
                continue;
            }
            Attempt::Refused(w) => {
                sum.refused += 1;
                w
            }
            Attempt::Timeout(w) => {
                sum.timeout += 1;
                w
            }
            Attempt::Failed(w) => {
                sum.failed += 1;
                w
            }
        };
        if sum.errors.len() < 5 && !sum.errors.contains(&why) {
            sum.errors.push(why);
        }
    }
    sum.mean_ms = total.as_secs_f64() * 1e3 / sum.attempts.max(1) as f64;
    sum.elapsed_ms = t0.elapsed().as_secs_f64() * 1e3;
    Ok(sum)
}

impl Summary {
    /// For people.
    pub fn render(&self) -> String {
        let mut s = format!(
            "{} attempts in {:.0} ms (mean {:.2} ms, max {:.2} ms): {} answered, {} refused, {} timed out, {} failed\n",
            self.attempts,
            self.elapsed_ms,
            self.mean_ms,
            self.max_ms,
            self.answers.values().sum::<usize>(),
            self.refused,
            self.timeout,
            self.failed
        );
        for (name, n) in &self.answers {
            s.push_str(&format!("  {n:>6}  {name}\n"));
        }
        for e in &self.errors {
            s.push_str(&format!("  error: {e}\n"));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::net::TcpListener;

    #[test]
    fn errors_are_sorted() {
        assert!(matches!(classify("Connection refused (os error 111)"), Attempt::Refused(_)));
        assert!(matches!(classify("aborted by the peer"), Attempt::Refused(_)));
        assert!(matches!(classify("connection timed out"), Attempt::Timeout(_)));
        assert!(matches!(classify("timed out (3 tries)"), Attempt::Timeout(_)));
        assert!(matches!(classify("No route to host"), Attempt::Failed(_)));
    }

    #[test]
    fn counts_answers_and_refusals_on_loopback() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let at = l.local_addr().unwrap();
        std::thread::spawn(move || {
            for c in l.incoming().flatten() {
                let _ = (&c).write_all(b"x/a\n");
            }
        });
        let me = Path::new("/proc/thread-self/ns/net");
        let t = Duration::from_millis(500);
        // setns into our own namespace needs no privilege only when we are
        // already there; skip when it is refused.
        let Ok(s) = run(me, at, Protocol::Tcp, false, 20, 4, t) else { return };
        assert_eq!(s.answers.get("x/a"), Some(&20), "{s:?}");
        drop(TcpListener::bind("127.0.0.1:0").unwrap());
        let closed: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let s = run(me, closed, Protocol::Tcp, false, 5, 2, t).unwrap();
        assert_eq!(s.refused, 5, "{s:?}");
        assert!(s.max_ms < 400.0, "a refusal comes at once: {s:?}");
    }
}

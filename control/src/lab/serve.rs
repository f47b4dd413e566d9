//! `ocelot lab serve`: the server in every lab pod, as agnhost serves in the
//! upstream network-policy tests. On each port it answers with the pod's
//! name (`namespace/name`, one line): TCP and SCTP on connect, UDP to any
//! datagram. Started by the lab inside the pod's namespace.
//!
//! TCP connections then stay open (each on its own thread) until the
//! client closes them or is idle for [`IDLE`]: a line `peer?` is answered
//! with the client's address as this pod sees it, any other line is echoed
//! (so a test can hold connections and check they still work). UDP answers
//! `peer?` with the name and the client's address, and a DNS query with a
//! TXT record holding the name (`dns.rs`).
//!
//! Where the kernel has no SCTP, one user-space responder (`sctp.rs`)
//! serves every SCTP port: it answers an INIT with an INIT ACK whose State
//! Cookie carries the name, which is all a probe needs. The ready file and
//! the log say so.

use crate::lab::probe::Protocol;
use crate::lab::sctp;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::PathBuf;
use std::time::Duration;

/// `ocelot lab serve` flags.
#[derive(clap::Args, Debug, Clone)]
pub struct ServeArgs {
    /// The name to answer with (`namespace/name`).
    #[arg(long)]
    pub pod: String,
    /// A port to serve, `PORT[/PROTOCOL]` (TCP by default); repeatable.
    #[arg(long = "port", value_parser = parse_port)]
    pub ports: Vec<(u16, Protocol)>,
    /// Written once every port is bound (or has failed for good).
    #[arg(long)]
    pub ready_file: Option<PathBuf>,
}

/// `80`, `80/TCP`, `81/udp`, `82/SCTP`.
pub fn parse_port(s: &str) -> Result<(u16, Protocol), String> {
    let (port, proto) = s.split_once('/').unwrap_or((s, "TCP"));
    let port: u16 = port.parse().map_err(|_| format!("bad port {port:?}"))?;
    Ok((port, Protocol::parse(proto)?))
}

/// Bind every port, then serve forever.
pub fn run(a: ServeArgs) -> anyhow::Result<()> {
    let answer = format!("{}\n", a.pod);
    let mut served = 0;
    let mut failed = Vec::new();
    let mut threads = Vec::new();
    // SCTP ports the kernel cannot serve: the user-space responder's.
    let mut user_space = Vec::new();
    for (port, proto) in &a.ports {
        if *proto == Protocol::Sctp && !sctp::kernel_available() {
            user_space.push(*port);
            continue;
        }
        let answer = answer.clone();
        let r = match proto {
            Protocol::Tcp => tcp(*port).map(|l| {
                threads.push(std::thread::spawn(move || serve_tcp(l, answer)));
            }),
            Protocol::Udp => udp(*port).map(|s| {
                threads.push(std::thread::spawn(move || serve_udp(s, answer)));
            }),
            Protocol::Sctp => sctp::listen(*port).map(|l| {
                threads.push(std::thread::spawn(move || serve_sctp(l, answer)));
            }),
        };
        match r {
            Ok(()) => {
                served += 1;
                eprintln!("serving {port}/{proto} as {}", a.pod);
            }
            Err(e) if *proto == Protocol::Sctp && sctp::unavailable(&e) => user_space.push(*port),
            Err(e) => {
                eprintln!("not serving {port}/{proto}: {e}");
                failed.push(format!("{port}/{proto}: {e}"));
            }
        }
    }
    // Said in the ready file too, so `lab up` shows it (anything but "ok"
    // there is printed as a warning); the ports are served all the same.
    let mut notes = Vec::new();
    if !user_space.is_empty() {
        let list = user_space.iter().map(|p| format!("{p}/SCTP")).collect::<Vec<_>>().join(" ");
        match sctp::Responder::open(user_space.iter().copied(), answer.as_bytes()) {
            Ok(r) => {
                threads.push(std::thread::spawn(move || r.run()));
                served += user_space.len();
                let how = "the user-space SCTP responder (INIT answered with INIT ACK over \
                           a raw socket): this kernel has no SCTP";
                eprintln!("serving {list} as {} by {how}", a.pod);
                notes.push(format!("{list}: served by {how}"));
            }
            Err(e) => {
                let why = format!("{}; user-space responder: raw socket: {e}", sctp::UNAVAILABLE);
                eprintln!("not serving {list}: {why}");
                failed.push(format!("{list}: {why}"));
            }
        }
    }
    if let Some(f) = &a.ready_file {
        let text = if failed.is_empty() && notes.is_empty() {
            "ok\n".to_string()
        } else {
            failed.iter().chain(&notes).map(|l| format!("{l}\n")).collect()
        };
        std::fs::write(f, text)?;
    }
    if served == 0 && !a.ports.is_empty() {
        anyhow::bail!("no port could be served");
    }
    for t in threads {
        let _ = t.join();
    }
    Ok(())
}

/// Dual-stack when the namespace has IPv6, IPv4 otherwise.
fn tcp(port: u16) -> std::io::Result<TcpListener> {
    TcpListener::bind(SocketAddr::from(([0u16; 8], port)))
        .or_else(|_| TcpListener::bind(SocketAddr::from(([0, 0, 0, 0], port))))
}

fn udp(port: u16) -> std::io::Result<UdpSocket> {
    UdpSocket::bind(SocketAddr::from(([0u16; 8], port)))
        .or_else(|_| UdpSocket::bind(SocketAddr::from(([0, 0, 0, 0], port))))
}

/// How long a TCP connection may stay idle before the server closes it.
pub const IDLE: Duration = Duration::from_secs(120);

/// The line asking for the client's address.
pub const PEER_QUESTION: &str = "peer?";

fn serve_tcp(l: TcpListener, answer: String) {
    for conn in l.incoming() {
        match conn {
            Ok(c) => {
                let answer = answer.clone();
                let spawned = std::thread::Builder::new()
                    .stack_size(64 * 1024)
                    .spawn(move || converse(c, &answer));
                if let Err(e) = spawned {
                    eprintln!("tcp: no thread for a connection: {e}");
                }
            }
            Err(e) => {
                eprintln!("tcp accept: {e}");
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

/// One TCP connection: the name, then `peer?` answered and lines echoed.
fn converse(mut c: std::net::TcpStream, answer: &str) {
    let _ = c.set_write_timeout(Some(Duration::from_secs(1)));
    let _ = c.set_read_timeout(Some(IDLE));
    if c.write_all(answer.as_bytes()).is_err() {
        return;
    }
    let peer = c.peer_addr().map(|a| canonical(a).to_string()).unwrap_or_else(|_| "?".into());
    let Ok(r) = c.try_clone() else { return };
    for line in BufReader::new(r).lines() {
        let Ok(line) = line else { return };
        let reply = if line.trim() == PEER_QUESTION { peer.clone() } else { line };
        if c.write_all(format!("{reply}\n").as_bytes()).is_err() {
            return;
        }
    }
}

/// IPv4 clients of the dual-stack sockets as IPv4 (`1.2.3.4:5`).
fn canonical(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}

/// The reply to one datagram.
fn udp_reply(req: &[u8], answer: &str, from: SocketAddr) -> Vec<u8> {
    let name = answer.trim_end();
    if let Some(dns) = crate::lab::dns::answer(req, name) {
        return dns;
    }
    if String::from_utf8_lossy(req).trim() == PEER_QUESTION {
        return format!("{name} {}\n", canonical(from)).into_bytes();
    }
    answer.as_bytes().to_vec()
}

fn serve_udp(s: UdpSocket, answer: String) {
    let mut buf = [0u8; 2048];
    loop {
        match s.recv_from(&mut buf) {
            Ok((n, from)) => {
                let _ = s.send_to(&udp_reply(&buf[..n], &answer, from), from);
            }
            Err(e) => {
                eprintln!("udp recv: {e}");
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

fn serve_sctp(l: std::os::fd::OwnedFd, answer: String) {
    loop {
        match sctp::accept(&l) {
            Ok(mut c) => {
                let _ = c.write_all(answer.as_bytes());
            }
            Err(e) => {
                eprintln!("sctp accept: {e}");
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn udp_replies() {
        let from: SocketAddr = "10.65.0.3:4000".parse().unwrap();
        assert_eq!(udp_reply(b"probe\n", "x/a\n", from), b"x/a\n");
        assert_eq!(udp_reply(b"peer?\n", "x/a\n", from), b"x/a 10.65.0.3:4000\n");
        let q = crate::lab::dns::query(7, "whoami.lab");
        let r = udp_reply(&q, "x/a\n", from);
        assert_eq!(crate::lab::dns::read_answer(&r, 7), Ok("x/a".into()));
    }

    #[test]
    fn tcp_conversation() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let at = l.local_addr().unwrap();
        std::thread::spawn(move || serve_tcp(l, "x/a\n".into()));
        let c = std::net::TcpStream::connect(at).unwrap();
        let mine = c.local_addr().unwrap().to_string();
        let mut r = BufReader::new(c.try_clone().unwrap());
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        assert_eq!(line, "x/a\n");
        (&c).write_all(b"hello\npeer?\n").unwrap();
        line.clear();
        r.read_line(&mut line).unwrap();
        assert_eq!(line, "hello\n");
        line.clear();
        r.read_line(&mut line).unwrap();
        assert_eq!(line.trim(), mine);
    }

    #[test]
    fn ports_parse() {
        assert_eq!(parse_port("80"), Ok((80, Protocol::Tcp)));
        assert_eq!(parse_port("81/udp"), Ok((81, Protocol::Udp)));
        assert_eq!(parse_port("82/SCTP"), Ok((82, Protocol::Sctp)));
        assert!(parse_port("80/icmp").is_err());
        assert!(parse_port("x/TCP").is_err());
        assert!(parse_port("70000").is_err());
    }
}

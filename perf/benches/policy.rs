//! Cost of NetworkPolicy in the dataplane.
//!
//! - `policy/verdict`: one classification (peer address, protocol, port)
//!   against an endpoint's compiled ingress rules, for 10, 1,000, 10,000
//!   and 100,000 rules. Each rule allows one peer pod (/32) on one of 16
//!   ports, the shape policies selecting pods by label produce; lookups use
//!   peers spread over the whole set, half allowed. The goal is a cost
//!   flat in the number of rules (within 2x of the 10-rule cost).
//! - `policy/compile`: building the classifier from the same rules.
//! - `conntrack`: inserting new flows and looking up tracked ones in a
//!   table holding 1M flows; the memory per entry is printed.
//!
//! Run: `cargo bench -p ocelot-perf --bench policy`.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ocelot_dataplane::api::Cidr;
use ocelot_dataplane::policy::classify::Classifier;
use ocelot_dataplane::policy::conntrack::{Conntrack, Limits, Packet, Timeouts};
use ocelot_dataplane::policy::{Net, PortRange, Proto, Rule};
use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

fn pod(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(0x0a40_0000 + i)
}

fn rules(n: u32) -> Vec<Rule> {
    (0..n)
        .map(|i| Rule {
            peers: Some(vec![Net {
                cidr: Cidr { addr: IpAddr::V4(pod(i)), len: 32 },
                except: vec![],
            }]),
            ports: Some(vec![PortRange {
                proto: Proto::Tcp,
                first: 8000 + (i % 16) as u16,
                last: 8000 + (i % 16) as u16,
            }]),
        })
        .collect()
}

/// Probes: (peer, port), half of them allowed.
fn probes(n: u32) -> Vec<(Ipv4Addr, u16)> {
    let mut x: u32 = 0x9e37_79b9;
    (0..1024)
        .map(|k| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            let i = x % n;
            let port = if k % 2 == 0 { 8000 + (i % 16) as u16 } else { 9000 };
            (pod(i), port)
        })
        .collect()
}

fn verdict(c: &mut Criterion) {
    let mut g = c.benchmark_group("policy/verdict");
    g.throughput(Throughput::Elements(1024));
    for n in [10u32, 1_000, 10_000, 100_000] {
        let cl = Classifier::compile(&rules(n));
        let ps = probes(n);
        let allowed = ps.iter().filter(|(p, port)| cl.allows(*p, Some(Proto::Tcp), *port)).count();
        assert_eq!(allowed, 512, "{n} rules: half the probes are allowed");
        g.bench_with_input(BenchmarkId::new("rules", n), &ps, |b, ps| {
            b.iter(|| {
                let mut ok = 0;
                for (p, port) in ps {
                    ok += usize::from(black_box(&cl).allows(*p, Some(Proto::Tcp), *port));
                }
                black_box(ok)
            })
        });
    }
    g.finish();
    let mut g = c.benchmark_group("policy/compile");
    g.sample_size(10);
    for n in [10u32, 1_000, 10_000, 100_000] {
        let r = rules(n);
        g.bench_with_input(BenchmarkId::new("rules", n), &r, |b, r| {
            b.iter(|| black_box(Classifier::compile(r)))
        });
    }
    // The hard shape: every rule its own peer and its own port (nothing
    // merges; thousands of classes on both sides).
    for n in [10_000u32, 50_000] {
        let mut r = rules(n);
        for (i, rule) in r.iter_mut().enumerate() {
            let p = 1024 + (i % 60_000) as u16;
            rule.ports = Some(vec![PortRange { proto: Proto::Tcp, first: p, last: p }]);
        }
        g.bench_with_input(BenchmarkId::new("distinct-ports", n), &r, |b, r| {
            b.iter(|| black_box(Classifier::compile(r)))
        });
    }
    g.finish();
}

fn flow(i: u32) -> Packet {
    Packet {
        proto: 17,
        src: (Ipv4Addr::from(0x0a41_0000 + (i >> 12)), (i & 0xfff) as u16 + 1024),
        dst: (Ipv4Addr::new(10, 66, 0, 1), 53),
        flags: 0,
    }
}

fn conntrack(c: &mut Criterion) {
    const FLOWS: u32 = 1_000_000;
    let limits = Limits { tcp: 1 << 20, other: 1 << 21 };
    let mut ct = Conntrack::new(limits, Timeouts::default());
    for i in 0..FLOWS {
        assert!(ct.insert(&flow(i), 0, 1));
    }
    eprintln!(
        "conntrack: {} flows; about {} bytes per entry (key, entry and table control byte)",
        ct.len(),
        Conntrack::entry_bytes()
    );
    let mut g = c.benchmark_group("conntrack");
    g.throughput(Throughput::Elements(1024));
    let mut x: u32 = 1;
    g.bench_function("lookup-1M-flows", |b| {
        b.iter(|| {
            for _ in 0..1024 {
                x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                black_box(ct.track(&flow(x % FLOWS), 1, 1));
            }
        })
    });
    let mut fresh = Conntrack::new(limits, Timeouts::default());
    let mut i = 0u32;
    g.bench_function("insert", |b| {
        b.iter(|| {
            for _ in 0..1024 {
                i = i.wrapping_add(1);
                if fresh.len() >= 1 << 20 {
                    fresh = Conntrack::new(limits, Timeouts::default());
                }
                black_box(fresh.insert(&flow(i % (1 << 22)), 0, 1));
            }
        })
    });
    g.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3))
}

criterion_group! {
    name = benches;
    config = config();
    targets = verdict, conntrack
}
criterion_main!(benches);

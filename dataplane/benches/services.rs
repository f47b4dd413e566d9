//! Services and natOutgoing: the cost of finding a packet's frontend and
//! choosing its backend with 10 and 10,000 services sharing 100,000
//! backends, of building those tables, and of allocating source ports.
//!
//! `cargo bench -p ocelot-dataplane --bench services`

use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput};
use ocelot_dataplane::api::{Backend, Frontend, FrontendKind, ServiceSpec, ServicesSpec};
use ocelot_dataplane::nat::flows::NatFlows;
use ocelot_dataplane::nat::service::{flow_hash, Services};
use ocelot_dataplane::policy::Proto;
use std::hint::black_box;
use std::net::Ipv4Addr;

const BACKENDS: usize = 100_000;

/// `n` services on 10.96.x.y:80, sharing `BACKENDS` backends evenly.
fn spec(n: usize) -> ServicesSpec {
    let per = BACKENDS / n;
    let services = (0..n)
        .map(|i| ServiceSpec {
            name: format!("ns/svc-{i}:80"),
            proto: Proto::Tcp,
            frontends: vec![Frontend {
                addr: Ipv4Addr::from(0x0a60_0000u32 + i as u32).into(),
                port: 80,
                kind: FrontendKind::ClusterIp,
            }],
            backends: (0..per)
                .map(|j| Backend {
                    addr: Ipv4Addr::from(0x0a40_0000u32 + (i * per + j) as u32).into(),
                    port: 8080,
                    local: j % 3 == 0,
                    ready: true,
                    serving: true,
                    terminating: false,
                })
                .collect(),
            affinity_timeout_s: 0,
            external_local: false,
            internal_local: false,
        })
        .collect();
    ServicesSpec { services, ..Default::default() }
}

fn lookup(c: &mut Criterion) {
    let mut g = c.benchmark_group("service_lookup_and_pick");
    g.throughput(Throughput::Elements(1024));
    for n in [10usize, 10_000] {
        let s = Services::compile(&spec(n), &[]).unwrap();
        // 1024 flows to random services from random clients.
        let flows: Vec<(Ipv4Addr, u16, Ipv4Addr)> = (0..1024u32)
            .map(|k| {
                let x = ocelot_dataplane::nat::maglev::mix(u64::from(k));
                let vip = Ipv4Addr::from(0x0a60_0000u32 + (x % n as u64) as u32);
                (Ipv4Addr::from(0x0a41_0000u32 + (x >> 40) as u32), (x >> 16) as u16, vip)
            })
            .collect();
        g.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter(|| {
                let mut sum = 0u64;
                for (src, sport, vip) in &flows {
                    let fe = s.frontend(6, *vip, 80).unwrap();
                    let svc = &s.services[fe.service as usize];
                    let i =
                        svc.set(fe.kind).pick(flow_hash(6, (*src, *sport), (*vip, 80))).unwrap();
                    sum += u64::from(svc.backends[i as usize].port) + u64::from(i);
                }
                black_box(sum)
            })
        });
        // A miss: a packet to no frontend (the common case of all traffic).
        g.bench_with_input(BenchmarkId::new("miss", n), &n, |b, _| {
            b.iter(|| {
                let mut hits = 0;
                for (src, _, _) in &flows {
                    hits += usize::from(s.frontend(6, *src, 80).is_some());
                }
                black_box(hits)
            })
        });
    }
    g.finish();
}

fn compile(c: &mut Criterion) {
    let mut g = c.benchmark_group("services_compile_100k_backends");
    g.sample_size(10);
    for n in [10usize, 10_000] {
        let sp = spec(n);
        g.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter(|| black_box(Services::compile(&sp, &[]).unwrap().table_bytes))
        });
    }
    g.finish();
}

fn snat_ports(c: &mut Criterion) {
    let mut g = c.benchmark_group("snat_port_alloc");
    g.throughput(Throughput::Elements(1));
    let node = Ipv4Addr::new(192, 0, 2, 10);
    let range = (61440, 65535);
    // Allocate and free, with the destination's share `fill` full.
    for fill in [0usize, 2048, 4000] {
        g.bench_with_input(BenchmarkId::new("alloc_free_at_fill", fill), &fill, |b, &fill| {
            let mut n = NatFlows::new(1 << 20);
            let dst = (Ipv4Addr::new(198, 51, 100, 7), 443);
            for k in 0..fill {
                n.alloc_port(6, node, dst, range, k as u64 * 7919).unwrap();
            }
            let mut k = 0u64;
            b.iter(|| {
                k += 1;
                let p = n
                    .alloc_port(6, node, dst, range, ocelot_dataplane::nat::maglev::mix(k))
                    .unwrap();
                n.free_port(&ocelot_dataplane::nat::Tuple { proto: 6, src: (node, p), dst });
                black_box(p)
            })
        });
    }
    // Many destinations, a new port each: the rate of new translated flows.
    g.bench_function("alloc_new_destinations", |b| {
        b.iter_batched_ref(
            || (NatFlows::new(1 << 20), 0u32),
            |(n, k)| {
                *k += 1;
                let dst = (Ipv4Addr::from(0xc633_0000 + *k), 443);
                black_box(n.alloc_port(6, node, dst, range, u64::from(*k)).unwrap())
            },
            BatchSize::LargeInput,
        )
    });
    g.finish();
}

criterion_group!(benches, lookup, compile, snat_ports);
criterion_main!(benches);

//! Cost of the dataplane's packet path on in-memory frames, no I/O.
//!
//! - `pipeline/forward`: a batch of 32 IPv4/UDP frames from pod A to pod B
//!   through `pipeline::process` (parse, validate, route, TTL, MAC rewrite),
//!   for 64-byte and 1514-byte (1500-byte IP packet) frames. Criterion
//!   prints elements/s = packets/s. The pipeline rewrites frames in place
//!   (destination MAC, TTL, header checksum), so each iteration first puts
//!   back the 34 header bytes it changed (not the whole frame); that restore
//!   is measured on its own in `pipeline/reset` so it can be subtracted,
//!   next to the cost of copying whole frames from a template instead.
//! - `lpm`: longest-prefix-match route lookups in a cluster-sized table.
//! - `gso`: software segmentation of a 64 KiB TCP/IPv4 GSO frame, and the
//!   Internet checksum over the same 64 KiB (part of that cost).
//!
//! - `overlay`: the pipeline's encapsulation decision (pod to a pod of
//!   another node over VXLAN: route, tunnel MTU, TTL, VTEP MACs, peer) and
//!   decapsulation (a VXLAN payload from a known node to a local pod:
//!   source, VNI, VTEP MAC, local destination, strip, forward), per batch of
//!   32; the scatter-gather segment headers of a 64 KiB frame (what the
//!   tunnel port computes instead of copying); and receive coalescing of 45
//!   segments back into one frame (checksums verified).
//!
//! Run: `cargo bench -p ocelot-perf --bench pipeline` (about a minute).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use etherparse::PacketBuilder;
use ocelot_dataplane::counters::DropTally;
use ocelot_dataplane::frame::Frame;
use ocelot_dataplane::pipeline::{self, Verdict, ETH_LEN};
use ocelot_dataplane::port::PortId;
use ocelot_dataplane::tables::{Lpm, NextHop, PortEntry, PortKind, Tables};
use ocelot_dataplane::wire::vnet::F_NEEDS_CSUM;
use ocelot_dataplane::wire::{GsoType, MacAddr};
use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

const BATCH: usize = 32;
const GW: MacAddr = MacAddr([0xee; 6]);
const MAC_A: MacAddr = MacAddr([0x02, 0, 0, 0, 0, 0x0a]);
const MAC_B: MacAddr = MacAddr([0x02, 0, 0, 0, 0, 0x0b]);
const MAC_HOST: MacAddr = MacAddr([0x02, 0, 0, 0, 0, 0x99]);
const A: PortId = 0;
const B: PortId = 1;
const HOST: PortId = 2;
/// Ethernet + IPv4 header: everything the forward path writes.
const HDRS: usize = ETH_LEN + 20;

fn ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

fn entry(id: PortId, kind: PortKind, mac: MacAddr, ips: &[&str]) -> PortEntry {
    PortEntry::counting(id, kind, mac, ips.iter().map(|s| IpAddr::V4(ip(s))).collect())
}

/// The tables of a node with two pods and the host port, plus routes of a
/// realistic shape (other nodes' /26 blocks, the pool, a default) so the
/// lookup probes more than one prefix length.
fn node_tables() -> Tables {
    let mut t = Tables::new(GW);
    t.set_port(entry(A, PortKind::Pod, MAC_A, &["10.65.0.2"]));
    t.set_port(entry(B, PortKind::Pod, MAC_B, &["10.65.0.3"]));
    t.set_port(entry(HOST, PortKind::Host, MAC_HOST, &[]));
    t.host_port = Some(HOST);
    t.routes.insert(IpAddr::V4(ip("10.65.0.2")), 32, NextHop::Port(A));
    t.routes.insert(IpAddr::V4(ip("10.65.0.3")), 32, NextHop::Port(B));
    t.routes.insert(IpAddr::V4(ip("10.65.0.0")), 16, NextHop::Unreachable);
    t
}

/// An Ethernet/IPv4/UDP frame of exactly `frame_len` bytes, A -> B.
fn udp_frame(frame_len: usize) -> Vec<u8> {
    let payload = vec![0x5a; frame_len - HDRS - 8];
    let b = PacketBuilder::ethernet2(MAC_A.0, GW.0)
        .ipv4(ip("10.65.0.2").octets(), ip("10.65.0.3").octets(), 64)
        .udp(40000, 5201);
    let mut out = Vec::with_capacity(b.size(payload.len()));
    b.write(&mut out, &payload).unwrap();
    assert_eq!(out.len(), frame_len);
    out
}

/// Put back the bytes the forward path rewrites (MACs, TTL, checksum).
#[inline]
fn restore_headers(frames: &mut [Frame], template: &[u8]) {
    for f in frames {
        f.data_mut()[..HDRS].copy_from_slice(&template[..HDRS]);
    }
}

/// The alternative: rebuild each frame from the template by copying it all.
#[inline]
fn copy_whole(frames: &mut [Frame], template: &[u8]) {
    for f in frames {
        f.data_mut().copy_from_slice(template);
    }
}

fn forward(c: &mut Criterion) {
    let tables = node_tables();
    let mut g = c.benchmark_group("pipeline/forward");
    g.throughput(Throughput::Elements(BATCH as u64));
    for (name, len) in [("64B", 64usize), ("1514B", 1514)] {
        let template = udp_frame(len);
        let mut frames: Vec<Frame> = (0..BATCH).map(|_| Frame::from_bytes(&template)).collect();
        let mut verdicts = Vec::with_capacity(BATCH);
        let mut tally = DropTally::default();
        let mut flows = pipeline::FlowState::default();
        // The batch really is forwarded, and stays forwardable after a reset.
        for _ in 0..3 {
            restore_headers(&mut frames, &template);
            pipeline::process(&tables, A, &mut frames, &mut verdicts, &mut tally, &mut flows);
            assert!(verdicts.iter().all(|v| *v == Verdict::Tx(B)), "{verdicts:?}");
        }
        g.bench_function(BenchmarkId::new("batch32", name), |b| {
            b.iter(|| {
                restore_headers(&mut frames, &template);
                pipeline::process(
                    black_box(&tables),
                    A,
                    &mut frames,
                    &mut verdicts,
                    &mut tally,
                    &mut flows,
                );
                black_box(&verdicts);
            })
        });
    }
    g.finish();

    let mut g = c.benchmark_group("pipeline/reset");
    g.throughput(Throughput::Elements(BATCH as u64));
    for (name, len) in [("64B", 64usize), ("1514B", 1514)] {
        let template = udp_frame(len);
        let mut frames: Vec<Frame> = (0..BATCH).map(|_| Frame::from_bytes(&template)).collect();
        g.bench_function(BenchmarkId::new("restore-34B-headers", name), |b| {
            b.iter(|| {
                restore_headers(black_box(&mut frames), black_box(&template));
            })
        });
        g.bench_function(BenchmarkId::new("copy-whole-frame", name), |b| {
            b.iter(|| {
                copy_whole(black_box(&mut frames), black_box(&template));
            })
        });
    }
    g.finish();
}

/// A cluster-sized route table: 1000 local /32 endpoints, 500 other nodes'
/// /26 blocks, the pool /16 and a default route.
fn cluster_lpm() -> Lpm<u32, NextHop> {
    let mut t = Lpm::default();
    let base = u32::from(ip("10.65.0.0"));
    for i in 0..1000u32 {
        t.insert(base + 2 + i, 32, NextHop::Port(i % 64));
    }
    for i in 0..500u32 {
        t.insert(base + (1 << 12) + (i << 6), 26, NextHop::Port(HOST));
    }
    t.insert(base, 16, NextHop::Unreachable);
    t.insert(0, 0, NextHop::Port(HOST));
    t
}

fn lpm(c: &mut Criterion) {
    const N: usize = 256;
    let t = cluster_lpm();
    let base = u32::from(ip("10.65.0.0"));
    // Addresses that match a /32, a /26, only the /16, only the default.
    let sets: [(&str, Vec<u32>); 4] = [
        ("hit-32", (0..N as u32).map(|i| base + 2 + (i * 3) % 1000).collect()),
        ("hit-26", (0..N as u32).map(|i| base + (1 << 12) + (i << 6) + 5).collect()),
        ("hit-16", (0..N as u32).map(|i| base + 0xff00 + i % 200).collect()),
        ("default", (0..N as u32).map(|i| u32::from(ip("198.51.100.0")) + i).collect()),
    ];
    let mut g = c.benchmark_group("lpm/v4");
    g.throughput(Throughput::Elements(N as u64));
    for (name, addrs) in &sets {
        assert!(addrs.iter().all(|a| t.lookup(*a).is_some()));
        g.bench_function(*name, |b| {
            b.iter(|| {
                let t = black_box(&t);
                let mut hits = 0u32;
                for a in black_box(addrs) {
                    if let Some(NextHop::Port(p)) = t.lookup(*a) {
                        hits = hits.wrapping_add(*p);
                    }
                }
                hits
            })
        });
    }
    g.finish();
}

/// A TCP/IPv4 GSO frame of the largest size (IP total length 65535), as a
/// TAP hands it over with offloads on.
fn tcp_gso_frame(mss: u16) -> (Frame, usize) {
    let payload_len = 65535 - 40;
    let payload: Vec<u8> = (0..payload_len).map(|i| (i * 7) as u8).collect();
    let mut v = Vec::new();
    PacketBuilder::ethernet2(MAC_A.0, GW.0)
        .ipv4(ip("10.65.0.2").octets(), ip("10.65.0.3").octets(), 64)
        .tcp(40000, 5201, 1000, 64000)
        .ack(77)
        .psh()
        .write(&mut v, &payload)
        .unwrap();
    let mut f = Frame::from_bytes(&v);
    f.vnet.flags = F_NEEDS_CSUM;
    f.vnet.gso_type = GsoType::TcpV4;
    f.vnet.gso_size = mss;
    f.vnet.csum_start = 34;
    f.vnet.csum_offset = 16;
    f.vnet.hdr_len = 54;
    (f, payload_len)
}

fn gso(c: &mut Criterion) {
    let mss = 1448u16;
    let (f, payload_len) = tcp_gso_frame(mss);
    let segs = payload_len.div_ceil(usize::from(mss));
    let mut out = Vec::with_capacity(segs);
    ocelot_dataplane::gso::segment(&f, &mut out).unwrap();
    assert_eq!(out.len(), segs);
    let mut g = c.benchmark_group("gso");
    // Bytes of TCP payload cut per second; divide the time by `segs` for
    // the cost per segment.
    g.throughput(Throughput::Bytes(payload_len as u64));
    g.bench_function(format!("tcp4-64KiB-mss{mss}-{segs}segs"), |b| {
        b.iter(|| {
            out.clear();
            ocelot_dataplane::gso::segment(black_box(&f), &mut out).unwrap();
            black_box(&out);
        })
    });
    // The part of it that is the Internet checksum over the whole payload.
    let data = f.data().to_vec();
    g.bench_function("csum-64KiB", |b| {
        b.iter(|| ocelot_dataplane::csum::checksum(black_box(&data)))
    });
    g.finish();
}

/// VXLAN encapsulation and decapsulation of one 64 B and one 1500 B inner
/// frame (building the outer headers, and parsing/validating them).
fn vxlan(c: &mut Criterion) {
    use ocelot_dataplane::wire::vxlan;
    let mut g = c.benchmark_group("vxlan");
    let p = vxlan::EncapParams {
        src_mac: MacAddr([2, 0, 0, 0, 0, 1]),
        dst_mac: MacAddr([2, 0, 0, 0, 0, 2]),
        src_ip: "192.0.2.1".parse().unwrap(),
        dst_ip: "192.0.2.2".parse().unwrap(),
        src_port: vxlan::source_port(12345),
        dst_port: 4789,
        vni: 4096,
        ip_id: 0,
        ttl: 64,
        tos: 0,
        df: true,
        flow_label: 0,
    };
    for len in [64usize, 1500] {
        let inner = udp_frame(len);
        let mut out = Vec::with_capacity(len + 100);
        g.throughput(Throughput::Elements(1));
        g.bench_with_input(BenchmarkId::new("encap", format!("{len}B")), &inner, |b, inner| {
            b.iter(|| vxlan::encapsulate(black_box(inner), &p, &mut out).unwrap())
        });
        vxlan::encapsulate(&inner, &p, &mut out).unwrap();
        let outer = out.clone();
        g.bench_with_input(BenchmarkId::new("decap", format!("{len}B")), &outer, |b, outer| {
            b.iter(|| vxlan::decapsulate(black_box(outer), true).unwrap())
        });
    }
    g.finish();
}

/// A node whose pods reach node-2's block 10.65.1.0/26 over VXLAN.
fn overlay_tables() -> Tables {
    use ocelot_dataplane::tables::{Encap, Overlay, RemoteNode};
    let mut t = node_tables();
    const VX: PortId = 3;
    t.set_port(entry(VX, PortKind::Tunnel(Encap::Vxlan), MacAddr([2; 6]), &[]));
    t.overlay = Overlay {
        local_ip: Some(ip("192.0.2.11")),
        vtep_mac: OUR_VTEP,
        vni: 4096,
        vxlan_port: Some(VX),
        ipip_port: None,
        vxlan_mtu: 1450,
        ipip_mtu: 1480,
        nodes: vec![RemoteNode { name: "node-2".into(), ip: peer(), vtep_mac: PEER_VTEP }],
        by_ip: [(peer(), 0u16)].into_iter().collect(),
    };
    t.routes.insert(
        IpAddr::V4(ip("10.65.1.0")),
        26,
        NextHop::Remote { node: 0, encap: Encap::Vxlan },
    );
    t
}

const OUR_VTEP: MacAddr = MacAddr([0x66, 0, 0, 0, 0, 1]);
const PEER_VTEP: MacAddr = MacAddr([0x66, 0, 0, 0, 0, 2]);

fn peer() -> Ipv4Addr {
    ip("192.0.2.12")
}

fn udp_between(src: &str, dst: &str, smac: MacAddr, dmac: MacAddr, frame_len: usize) -> Vec<u8> {
    let payload = vec![0x5a; frame_len - HDRS - 8];
    let mut out = Vec::new();
    PacketBuilder::ethernet2(smac.0, dmac.0)
        .ipv4(ip(src).octets(), ip(dst).octets(), 64)
        .udp(40000, 5201)
        .write(&mut out, &payload)
        .unwrap();
    out
}

fn overlay(c: &mut Criterion) {
    let tables = overlay_tables();
    let mut verdicts = Vec::with_capacity(BATCH);
    let mut tally = DropTally::default();
    let mut flows = pipeline::FlowState::default();
    let mut g = c.benchmark_group("overlay");
    g.throughput(Throughput::Elements(BATCH as u64));
    for (name, len) in [("64B", 64usize), ("1464B", 1464)] {
        // Encapsulation: pod A to a pod of node-2.
        let template = udp_between("10.65.0.2", "10.65.1.9", MAC_A, GW, len);
        let mut frames: Vec<Frame> = (0..BATCH).map(|_| Frame::from_bytes(&template)).collect();
        pipeline::process(&tables, A, &mut frames, &mut verdicts, &mut tally, &mut flows);
        assert!(verdicts.iter().all(|v| *v == Verdict::Tx(3)), "{verdicts:?}");
        assert!(frames.iter().all(|f| f.meta.peer == Some(peer())));
        g.bench_function(BenchmarkId::new("encap-batch32", name), |b| {
            b.iter(|| {
                restore_headers(&mut frames, &template);
                pipeline::process(
                    black_box(&tables),
                    A,
                    &mut frames,
                    &mut verdicts,
                    &mut tally,
                    &mut flows,
                );
                black_box(&verdicts);
            })
        });
        // Decapsulation: a VXLAN payload from node-2 to pod B.
        let inner = udp_between("10.65.1.9", "10.65.0.3", PEER_VTEP, OUR_VTEP, len);
        let mut payload = vec![0u8; 8];
        ocelot_dataplane::wire::vxlan::emit_header(4096, &mut payload).unwrap();
        payload.extend_from_slice(&inner);
        let mut frames: Vec<Frame> = (0..BATCH).map(|_| Frame::new()).collect();
        let reset = |frames: &mut [Frame]| {
            for f in frames {
                f.set_data(&payload);
                f.meta.peer = Some(peer());
            }
        };
        reset(&mut frames);
        pipeline::process(&tables, 3, &mut frames, &mut verdicts, &mut tally, &mut flows);
        assert!(verdicts.iter().all(|v| *v == Verdict::Tx(B)), "{verdicts:?}");
        g.bench_function(BenchmarkId::new("decap-batch32", name), |b| {
            b.iter(|| {
                reset(&mut frames);
                pipeline::process(
                    black_box(&tables),
                    3,
                    &mut frames,
                    &mut verdicts,
                    &mut tally,
                    &mut flows,
                );
                black_box(&verdicts);
            })
        });
        // What the reset alone costs (subtract it from decap).
        g.bench_function(BenchmarkId::new("decap-reset-only", name), |b| {
            b.iter(|| reset(black_box(&mut frames)))
        });
    }
    g.finish();

    // Segment headers by scatter-gather, and receive coalescing.
    let mss = 1398u16;
    let (f, payload_len) = tcp_gso_frame(mss);
    let plan = ocelot_dataplane::gso::Plan::new(&f).unwrap();
    let segs = plan.count();
    let mut g = c.benchmark_group("overlay-bulk");
    g.throughput(Throughput::Bytes(payload_len as u64));
    let mut hdr = [0u8; 128];
    g.bench_function(format!("segment-headers-64KiB-{segs}segs"), |b| {
        b.iter(|| {
            for i in 0..segs {
                plan.headers(black_box(&f), i, &mut hdr);
            }
            black_box(&hdr);
        })
    });
    let mut seg_frames = Vec::new();
    ocelot_dataplane::gso::segment(&f, &mut seg_frames).unwrap();
    let originals: Vec<Vec<u8>> = seg_frames.iter().map(|s| s.data().to_vec()).collect();
    let mut frames: Vec<Frame> = originals.iter().map(|_| Frame::new()).collect();
    let reset = |frames: &mut [Frame]| {
        for (f, o) in frames.iter_mut().zip(&originals) {
            f.set_data(o);
        }
    };
    let all: Vec<u16> = (0..segs as u16).collect();
    reset(&mut frames);
    let mut sel = all.clone();
    assert_eq!(ocelot_dataplane::gro::coalesce(&mut frames, &mut sel), segs - 1);
    g.bench_function(format!("gro-merge-{segs}segs"), |b| {
        b.iter(|| {
            reset(&mut frames);
            let mut sel = all.clone();
            ocelot_dataplane::gro::coalesce(black_box(&mut frames), &mut sel);
            black_box(&sel);
        })
    });
    g.bench_function(format!("gro-reset-only-{segs}segs"), |b| {
        b.iter(|| reset(black_box(&mut frames)))
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
    targets = forward, lpm, gso, vxlan, overlay
}
criterion_main!(benches);

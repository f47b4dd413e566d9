//! The packets the AF_XDP port writes: byte-exact against the captured
//! VXLAN frames of `../shared/conformance/vxlan_vectors.json`, IPIP against
//! an independent encoder, and GSO frames as their segments behind outer
//! headers that the receive side parses back to what a socket delivers.

use super::*;
use crate::csum;
use crate::wire::GsoType;
use etherparse::PacketBuilder;
use serde_json::Value;

fn vectors() -> Vec<Value> {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/conformance/vxlan_vectors.json");
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| {
        panic!("{}: {e} (the conformance data sits beside the repository)", p.display())
    });
    let v: Value = serde_json::from_str(&text).expect("vectors JSON");
    v["vectors"].as_array().expect("vectors").clone()
}

fn hex(s: &str) -> Vec<u8> {
    (0..s.len() / 2).map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).expect("hex")).collect()
}

fn headers(encap: Encap) -> Headers {
    Headers {
        encap,
        src_mac: MacAddr([2, 0, 0, 0, 0, 0x11]),
        dst_mac: MacAddr([2, 0, 0, 0, 0, 0x12]),
        src: Ipv4Addr::new(192, 0, 2, 11),
        dst: Ipv4Addr::new(192, 0, 2, 12),
        ip_id: 0x1234,
        ttl: TTL,
        tos: 0,
        df: false,
        src_port: vxlan::source_port(77),
        dst_port: 4789,
        vni: 4096,
    }
}

#[test]
fn vxlan_packets_reproduce_the_captured_frames_byte_for_byte() {
    let mut n = 0;
    for v in vectors() {
        let ep = &v["encap_params"];
        let is_gso = v["note"].as_str().is_some_and(|n| n.contains("GSO"));
        if ep.is_null() || is_gso || v["outer_ip"]["version"] != 4 {
            continue;
        }
        let id = v["id"].as_str().unwrap_or("?");
        let s = |k: &str| ep[k].as_str().unwrap_or_else(|| panic!("{id}: {k}"));
        let u = |k: &str| ep[k].as_u64().unwrap_or_else(|| panic!("{id}: {k}"));
        let o = Headers {
            encap: Encap::Vxlan,
            src_mac: s("outer_src_mac").parse().unwrap(),
            dst_mac: s("outer_dst_mac").parse().unwrap(),
            src: s("outer_src_ip").parse().unwrap(),
            dst: s("outer_dst_ip").parse().unwrap(),
            ip_id: u("ip_id") as u16,
            ttl: u("ip_ttl") as u8,
            tos: u("ip_tos") as u8,
            df: ep["ip_df"].as_bool().unwrap_or(false),
            src_port: u("udp_src_port") as u16,
            dst_port: u("udp_dst_port") as u16,
            vni: u("vni") as u32,
        };
        let f = Frame::from_bytes(&hex(v["inner_frame_hex"].as_str().unwrap()));
        let wire = Wire::of(&f).unwrap();
        let mut buf = [0u8; 4096];
        let len = write_packet(&mut buf, &o, &f, &wire, 0).unwrap_or_else(|| panic!("{id}"));
        assert_eq!(buf[..len], hex(v["frame_hex"].as_str().unwrap())[..], "{id}");
        n += 1;
    }
    assert!(n >= 21, "only {n} vectors compared");
}

#[test]
fn ipip_packets_are_the_inner_ip_packet_behind_an_outer_header() {
    let mut inner = Vec::new();
    PacketBuilder::ethernet2([0x66, 0, 0, 0, 0, 2], [0x66, 0, 0, 0, 0, 1])
        .ipv4([10, 65, 0, 2], [10, 65, 2, 5], 63)
        .udp(1000, 2000)
        .write(&mut inner, b"hello over ipip")
        .unwrap();
    let f = Frame::from_bytes(&inner);
    let wire = Wire::of(&f).unwrap();
    let mut buf = [0u8; 4096];
    let o = headers(Encap::Ipip);
    let len = write_packet(&mut buf, &o, &f, &wire, 0).unwrap();
    assert_eq!(len, 14 + 20 + inner.len() - 14);
    let mut want = Vec::new();
    let ip = etherparse::Ipv4Header::new(
        (inner.len() - 14) as u16,
        TTL,
        etherparse::IpNumber(4),
        o.src.octets(),
        o.dst.octets(),
    )
    .map(|mut h| {
        h.identification = o.ip_id;
        h.dont_fragment = false;
        h.header_checksum = h.calc_header_checksum();
        h
    })
    .unwrap();
    want.extend_from_slice(&o.dst_mac.0);
    want.extend_from_slice(&o.src_mac.0);
    want.extend_from_slice(&[0x08, 0x00]);
    want.extend_from_slice(&ip.to_bytes());
    want.extend_from_slice(&inner[14..]);
    assert_eq!(buf[..len], want[..]);
    // The receive side hands the pipeline what the raw socket would.
    let r = outer::parse(&buf[..len], o.dst, 4789).unwrap();
    assert_eq!((r.encap, r.peer), (Encap::Ipip, o.src));
    assert_eq!(&buf[r.payload], &want[14..]);
    // Less than an Ethernet header cannot be carried.
    let tiny = Frame::from_bytes(&inner[..10]);
    assert_eq!(write_packet(&mut buf, &o, &tiny, &Wire::of(&tiny).unwrap(), 0), None);
}

use crate::gso::sample_tcp4_gso as tcp_gso;

#[test]
fn a_gso_frame_becomes_its_segments_each_behind_outer_headers() {
    let f = tcp_gso(20_000, 1398);
    let mut want = Vec::new();
    crate::gso::segment(&f, &mut want).unwrap();
    let wire = Wire::of(&f).unwrap();
    assert_eq!(wire.count(), want.len());
    for encap in [Encap::Vxlan, Encap::Ipip] {
        let mut o = headers(encap);
        for (i, seg) in want.iter().enumerate() {
            o.ip_id = i as u16;
            let mut buf = [0u8; 4096];
            let len = write_packet(&mut buf, &o, &f, &wire, i).unwrap();
            assert_eq!(Some(len), wire_len(encap, &f, &wire, i));
            let pkt = &buf[..len];
            // Outer IPv4: valid checksum, DF clear, TTL 64, counting IDs.
            let ip = etherparse::Ipv4HeaderSlice::from_slice(&pkt[14..]).unwrap();
            assert_eq!(csum::checksum(ip.slice()), 0);
            assert!(!ip.dont_fragment());
            assert_eq!((ip.ttl(), ip.identification()), (TTL, i as u16));
            assert_eq!(usize::from(ip.total_len()), len - 14);
            let r = outer::parse(pkt, o.dst, 4789).unwrap();
            match encap {
                Encap::Vxlan => {
                    let udp = &pkt[34..42];
                    assert_eq!(u16::from_be_bytes([udp[0], udp[1]]), vxlan::source_port(77));
                    assert_eq!(u16::from_be_bytes([udp[6], udp[7]]), 0, "no UDP checksum");
                    assert_eq!(vxlan::parse_header(&pkt[r.payload.clone()]), Ok(4096));
                    assert_eq!(&pkt[r.payload.start + 8..], seg.data(), "segment {i}");
                }
                _ => assert_eq!(&pkt[34..], &seg.data()[14..], "segment {i}"),
            }
        }
    }
}

#[test]
fn a_frame_with_a_partial_checksum_leaves_finished() {
    let mut f = tcp_gso(500, 1398);
    f.vnet.gso_type = GsoType::None;
    f.vnet.gso_size = 0;
    let wire = Wire::of(&f).unwrap();
    let mut buf = [0u8; 4096];
    let len = write_packet(&mut buf, &headers(Encap::Vxlan), &f, &wire, 0).unwrap();
    let p = etherparse::SlicedPacket::from_ethernet(&buf[50..len]).unwrap();
    let Some(etherparse::TransportSlice::Tcp(t)) = p.transport else { panic!("not TCP") };
    let Some(etherparse::NetSlice::Ipv4(ip)) = p.net else { panic!("not IPv4") };
    let want = t.to_header().calc_checksum_ipv4(&ip.header().to_header(), t.payload()).unwrap();
    assert_eq!(t.checksum(), want);
}

#[test]
fn packets_that_do_not_fit_the_buffer_are_refused() {
    let f = Frame::from_bytes(&vec![0u8; 3000]);
    let wire = Wire::of(&f).unwrap();
    let mut small = [0u8; 1500];
    assert_eq!(write_packet(&mut small, &headers(Encap::Vxlan), &f, &wire, 0), None);
    assert_eq!(wire_len(Encap::Native, &f, &wire, 0), None);
}

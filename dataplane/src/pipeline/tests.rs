//! Pipeline decisions on in-memory frames.

use super::*;
use crate::counters::PortStats;
use crate::csum;
use crate::tables::{NextHop, PortEntry, PortKind};
use etherparse::PacketBuilder;
use std::net::{IpAddr, Ipv4Addr};

const GW: MacAddr = MacAddr([0xee; 6]);
const MAC_A: MacAddr = MacAddr([0x02, 0, 0, 0, 0, 0x0a]);
const MAC_B: MacAddr = MacAddr([0x02, 0, 0, 0, 0, 0x0b]);
const MAC_HOST: MacAddr = MacAddr([0x02, 0, 0, 0, 0, 0x99]);
const A: PortId = 0;
const B: PortId = 1;
const HOST: PortId = 2;

fn ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

fn entry(id: PortId, kind: PortKind, mac: MacAddr, ips: &[&str]) -> PortEntry {
    PortEntry::counting(id, kind, mac, ips.iter().map(|s| IpAddr::V4(ip(s))).collect())
}

pub(crate) fn lab_tables() -> Tables {
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

fn udp(
    src_mac: MacAddr,
    dst_mac: MacAddr,
    src: &str,
    dst: &str,
    ttl: u8,
    payload: &[u8],
) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(src_mac.0, dst_mac.0)
        .ipv4(ip(src).octets(), ip(dst).octets(), ttl)
        .udp(4000, 5000);
    let mut out = Vec::with_capacity(b.size(payload.len()));
    b.write(&mut out, payload).unwrap();
    out
}

fn arp_request(src_mac: MacAddr, sender: &str, target: &str) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&[0xff; 6]);
    v.extend_from_slice(&src_mac.0);
    v.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
    v.extend_from_slice(&src_mac.0);
    v.extend_from_slice(&ip(sender).octets());
    v.extend_from_slice(&[0; 6]);
    v.extend_from_slice(&ip(target).octets());
    v
}

fn run(t: &Tables, port: PortId, bytes: &[u8]) -> (Verdict, Frame) {
    let mut frames = vec![Frame::from_bytes(bytes)];
    let mut v = Vec::new();
    let mut tally = DropTally::default();
    process(t, port, &mut frames, &mut v, &mut tally, &mut FlowState::default());
    (v[0], frames.pop().unwrap())
}

#[test]
fn arp_for_gateway_is_answered_with_our_mac() {
    let t = lab_tables();
    let (v, f) = run(&t, A, &arp_request(MAC_A, "10.65.0.2", "169.254.1.1"));
    assert_eq!(v, Verdict::Tx(A));
    let d = f.data();
    assert_eq!(&d[0..6], &MAC_A.0);
    assert_eq!(&d[6..12], &GW.0);
    assert_eq!(&d[20..22], &[0, 2], "opcode reply");
    assert_eq!(&d[22..28], &GW.0, "sender hw = gateway");
    assert_eq!(&d[28..32], &[169, 254, 1, 1]);
    assert_eq!(&d[32..38], &MAC_A.0);
    assert_eq!(&d[38..42], &[10, 65, 0, 2]);
}

#[test]
fn arp_ignored_for_own_address_and_gratuitous() {
    let t = lab_tables();
    assert_eq!(
        run(&t, A, &arp_request(MAC_A, "10.65.0.2", "10.65.0.2")).0,
        Verdict::Drop(DropReason::ArpIgnored)
    );
    assert_eq!(
        run(&t, A, &arp_request(MAC_A, "0.0.0.0", "10.65.0.2")).0,
        Verdict::Drop(DropReason::ArpIgnored)
    );
}

#[test]
fn host_arp_answered_only_for_local_pods() {
    let t = lab_tables();
    assert_eq!(
        run(&t, HOST, &arp_request(MAC_HOST, "192.0.2.1", "10.65.0.3")).0,
        Verdict::Tx(HOST)
    );
    // An address of the pool with no endpoint, and one outside: not ours.
    assert_eq!(
        run(&t, HOST, &arp_request(MAC_HOST, "192.0.2.1", "10.65.0.9")).0,
        Verdict::Drop(DropReason::ArpIgnored)
    );
    assert_eq!(
        run(&t, HOST, &arp_request(MAC_HOST, "192.0.2.1", "192.0.2.7")).0,
        Verdict::Drop(DropReason::ArpIgnored)
    );
}

#[test]
fn pod_to_pod_forwarding_rewrites_macs_and_ttl() {
    let t = lab_tables();
    let (v, f) = run(&t, A, &udp(MAC_A, GW, "10.65.0.2", "10.65.0.3", 64, b"hello"));
    assert_eq!(v, Verdict::Tx(B));
    let d = f.data();
    assert_eq!(&d[0..6], &MAC_B.0);
    assert_eq!(&d[6..12], &GW.0);
    let h = etherparse::Ipv4HeaderSlice::from_slice(&d[14..]).unwrap();
    assert_eq!(h.ttl(), 63);
    assert_eq!(csum::checksum(h.slice()), 0, "header checksum still valid");
}

#[test]
fn unknown_destination_goes_to_host_and_host_never_gets_its_own_back() {
    let t = lab_tables();
    let (v, f) = run(&t, A, &udp(MAC_A, GW, "10.65.0.2", "192.0.2.1", 64, b"x"));
    assert_eq!(v, Verdict::Tx(HOST));
    assert_eq!(&f.data()[0..6], &MAC_HOST.0);
    assert_eq!(
        run(&t, HOST, &udp(MAC_HOST, GW, "192.0.2.1", "198.51.100.1", 64, b"x")).0,
        Verdict::Drop(DropReason::NoRoute)
    );
    assert_eq!(
        run(&t, HOST, &udp(MAC_HOST, GW, "192.0.2.1", "10.65.0.2", 64, b"x")).0,
        Verdict::Tx(A)
    );
}

#[test]
fn pool_address_without_endpoint_is_no_route_with_host_unreachable() {
    let t = lab_tables();
    let (v, f) = run(&t, A, &udp(MAC_A, GW, "10.65.0.2", "10.65.0.77", 64, b"x"));
    assert_eq!(v, Verdict::Reply(A, DropReason::NoRoute));
    let d = f.data();
    assert_eq!(&d[0..6], &MAC_A.0);
    assert_eq!(&d[30..34], &[10, 65, 0, 2], "back to the sender");
    assert_eq!(&d[34..36], &[3, 1], "destination unreachable, host unreachable");
    assert_eq!(csum::checksum(&d[34..]), 0);
}

#[test]
fn ttl_expiry_answers_with_icmp_time_exceeded() {
    let t = lab_tables();
    let orig = udp(MAC_A, GW, "10.65.0.2", "10.65.0.3", 1, b"payload!");
    let (v, f) = run(&t, A, &orig);
    assert_eq!(v, Verdict::Reply(A, DropReason::TtlExceeded));
    let d = f.data();
    assert_eq!(&d[0..6], &MAC_A.0);
    let p = etherparse::SlicedPacket::from_ethernet(d).unwrap();
    let Some(etherparse::NetSlice::Ipv4(ipv4)) = p.net else { panic!("not ipv4") };
    assert_eq!(ipv4.header().source_addr(), ip("169.254.1.1"));
    assert_eq!(ipv4.header().destination_addr(), ip("10.65.0.2"));
    assert_eq!(csum::checksum(ipv4.header().slice()), 0);
    let icmp = ipv4.payload().payload;
    assert_eq!(&icmp[..2], &[11, 0]);
    assert_eq!(csum::checksum(icmp), 0);
    // Quotes the original IP header and the first 8 bytes of its payload.
    assert_eq!(&icmp[8..], &orig[14..14 + 28]);
}

#[test]
fn no_icmp_error_about_an_icmp_error() {
    let t = lab_tables();
    let mut pkt = Vec::new();
    PacketBuilder::ethernet2(MAC_A.0, GW.0)
        .ipv4(ip("10.65.0.2").octets(), ip("10.65.0.3").octets(), 1)
        .icmpv4(etherparse::Icmpv4Type::DestinationUnreachable(
            etherparse::icmpv4::DestUnreachableHeader::Host,
        ))
        .write(&mut pkt, &[0; 28])
        .unwrap();
    assert_eq!(run(&t, A, &pkt).0, Verdict::Drop(DropReason::TtlExceeded));
}

#[test]
fn frames_not_for_us_and_other_ethertypes() {
    let t = lab_tables();
    assert_eq!(
        run(&t, A, &udp(MAC_A, MAC_B, "10.65.0.2", "10.65.0.3", 64, b"x")).0,
        Verdict::Drop(DropReason::NotForUs)
    );
    let mut v6 = udp(MAC_A, GW, "10.65.0.2", "10.65.0.3", 64, b"x");
    v6[12..14].copy_from_slice(&[0x86, 0xdd]);
    assert_eq!(run(&t, A, &v6).0, Verdict::Drop(DropReason::UnsupportedEthertype));
}

#[test]
fn bad_ip_checksum_is_malformed() {
    let t = lab_tables();
    let mut p = udp(MAC_A, GW, "10.65.0.2", "10.65.0.3", 64, b"x");
    p[24] ^= 0xff;
    assert_eq!(run(&t, A, &p).0, Verdict::Drop(DropReason::Malformed));
}

#[test]
fn every_truncation_is_a_counted_drop_never_a_panic() {
    let t = lab_tables();
    for full in [
        udp(MAC_A, GW, "10.65.0.2", "10.65.0.3", 64, b"hello world"),
        arp_request(MAC_A, "10.65.0.2", "169.254.1.1"),
    ] {
        for len in 0..full.len() {
            let (v, _) = run(&t, A, &full[..len]);
            assert!(matches!(v, Verdict::Drop(_)), "len {len}: {v:?}");
        }
    }
}

#[test]
fn inconsistent_vnet_header_is_dropped() {
    let t = lab_tables();
    let mut frames = vec![Frame::from_bytes(&udp(MAC_A, GW, "10.65.0.2", "10.65.0.3", 64, b"x"))];
    frames[0].vnet.flags = crate::wire::vnet::F_NEEDS_CSUM;
    frames[0].vnet.csum_start = 40;
    frames[0].vnet.csum_offset = 6;
    let mut v = Vec::new();
    let mut tally = DropTally::default();
    process(&t, A, &mut frames, &mut v, &mut tally, &mut FlowState::default());
    assert_eq!(v[0], Verdict::Drop(DropReason::BadVnetHdr));
}

#[test]
fn random_bytes_never_panic() {
    let t = lab_tables();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for i in 0..20_000 {
        let len = (i % 120) as usize;
        let mut b: Vec<u8> = (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        if len >= 14 && i % 2 == 0 {
            b[..6].copy_from_slice(&GW.0);
            b[12..14].copy_from_slice(&[0x08, if i % 4 == 0 { 0x00 } else { 0x06 }]);
        }
        let _ = run(&t, A, &b);
    }
}

#[test]
fn drops_are_tallied_per_reason() {
    let t = lab_tables();
    let mut frames = vec![
        Frame::from_bytes(&udp(MAC_A, GW, "10.65.0.2", "10.65.0.3", 64, b"ok")),
        Frame::from_bytes(&[0u8; 5]),
        Frame::from_bytes(&udp(MAC_A, GW, "10.65.0.2", "10.65.0.77", 64, b"x")),
    ];
    let mut v = Vec::new();
    let mut tally = DropTally::default();
    process(&t, A, &mut frames, &mut v, &mut tally, &mut FlowState::default());
    let stats = PortStats::default();
    tally.flush(&[&stats.drops]);
    assert_eq!(stats.drops.get(DropReason::Malformed), 1);
    assert_eq!(stats.drops.get(DropReason::NoRoute), 1);
    assert_eq!(v[0], Verdict::Tx(B));
}

#[test]
fn flow_owner_is_symmetric() {
    let ab = udp(MAC_A, GW, "10.65.0.2", "10.65.0.3", 64, b"x");
    let ba = udp(MAC_B, GW, "10.65.0.3", "10.65.0.2", 64, b"x");
    assert_eq!(flow::symmetric_hash(&ab), flow::symmetric_hash(&ba));
    for n in 1..8 {
        assert_eq!(flow::owner(&ab, &PortKind::Pod, n), flow::owner(&ba, &PortKind::Pod, n));
    }
    let other = udp(MAC_A, GW, "10.65.0.2", "10.65.0.4", 64, b"x");
    assert_ne!(flow::symmetric_hash(&ab), flow::symmetric_hash(&other));
}

mod overlay {
    //! Encapsulation decisions and the checks on decapsulated traffic.
    use super::*;
    use crate::tables::{Encap, Overlay, RemoteNode};
    use crate::wire::vxlan;

    const VX: PortId = 3;
    const IPIP: PortId = 4;
    const OUR_VTEP: MacAddr = MacAddr([0x66, 0, 0, 0, 0, 0x01]);
    const PEER_VTEP: MacAddr = MacAddr([0x66, 0, 0, 0, 0, 0x02]);

    fn peer() -> Ipv4Addr {
        ip("192.0.2.12")
    }

    /// Node 0 owns 10.65.1.0/26 over VXLAN, 10.65.2.0/26 over IPIP, and
    /// 10.65.3.0/26 natively.
    fn tables() -> Tables {
        let mut t = lab_tables();
        t.set_port(entry(VX, PortKind::Tunnel(Encap::Vxlan), MacAddr([2; 6]), &[]));
        t.set_port(entry(IPIP, PortKind::Tunnel(Encap::Ipip), MacAddr([2; 6]), &[]));
        let nodes = vec![RemoteNode { name: "node-2".into(), ip: peer(), vtep_mac: PEER_VTEP }];
        t.overlay = Overlay {
            local_ip: Some(ip("192.0.2.11")),
            vtep_mac: OUR_VTEP,
            vni: 4096,
            vxlan_port: Some(VX),
            ipip_port: Some(IPIP),
            vxlan_mtu: 1450,
            ipip_mtu: 1480,
            by_ip: [(peer(), 0u16)].into_iter().collect(),
            nodes,
        };
        for (net, encap) in
            [("10.65.1.0", Encap::Vxlan), ("10.65.2.0", Encap::Ipip), ("10.65.3.0", Encap::Native)]
        {
            t.routes.insert(IpAddr::V4(ip(net)), 26, NextHop::Remote { node: 0, encap });
        }
        t
    }

    fn run_meta(
        t: &Tables,
        port: PortId,
        bytes: &[u8],
        from: Option<Ipv4Addr>,
    ) -> (Verdict, Frame) {
        let mut f = Frame::from_bytes(bytes);
        f.meta.peer = from;
        let mut frames = vec![f];
        let mut v = Vec::new();
        let mut tally = DropTally::default();
        process(t, port, &mut frames, &mut v, &mut tally, &mut FlowState::default());
        (v[0], frames.pop().unwrap())
    }

    /// A VXLAN payload (header + inner frame) as the UDP socket delivers it.
    fn vxlan_payload(vni: u32, inner: &[u8]) -> Vec<u8> {
        let mut v = vec![0u8; vxlan::HEADER_LEN];
        vxlan::emit_header(vni, &mut v).unwrap();
        v.extend_from_slice(inner);
        v
    }

    /// An IPIP packet as the raw socket delivers it (outer IPv4 header on).
    fn ipip_packet(src: &str, dst: &str, inner_eth: &[u8], proto: u8) -> Vec<u8> {
        let inner = &inner_eth[ETH_LEN..];
        let mut h = etherparse::Ipv4Header::new(
            inner.len() as u16,
            64,
            etherparse::IpNumber(proto),
            ip(src).octets(),
            ip(dst).octets(),
        )
        .unwrap();
        h.header_checksum = h.calc_header_checksum();
        let mut v = h.to_bytes().to_vec();
        v.extend_from_slice(inner);
        v
    }

    #[test]
    fn pod_to_remote_pod_goes_to_the_tunnel_with_vtep_macs_and_peer() {
        let t = tables();
        let (v, f) = run(&t, A, &udp(MAC_A, GW, "10.65.0.2", "10.65.1.5", 64, b"hi"));
        assert_eq!(v, Verdict::Tx(VX));
        assert_eq!(f.meta.peer, Some(peer()));
        assert_eq!(&f.data()[0..6], &PEER_VTEP.0);
        assert_eq!(&f.data()[6..12], &OUR_VTEP.0);
        assert_eq!(f.data()[ETH_LEN + 8], 63, "TTL decremented");
        assert_eq!(csum::checksum(&f.data()[ETH_LEN..ETH_LEN + 20]), 0);
        assert_ne!(f.meta.flow_hash, 0);

        let (v, f) = run(&t, A, &udp(MAC_A, GW, "10.65.0.2", "10.65.2.5", 64, b"hi"));
        assert_eq!(v, Verdict::Tx(IPIP));
        assert_eq!(f.meta.peer, Some(peer()));

        // Natively routed prefixes go to the node's kernel, which has the
        // route via the peer.
        let (v, f) = run(&t, A, &udp(MAC_A, GW, "10.65.0.2", "10.65.3.5", 64, b"hi"));
        assert_eq!(v, Verdict::Tx(HOST));
        assert_eq!(f.meta.peer, None);
        assert_eq!(&f.data()[0..6], &MAC_HOST.0);
    }

    fn with_df(mut pkt: Vec<u8>, df: bool) -> Vec<u8> {
        if df {
            pkt[ETH_LEN + 6] |= 0x40;
        } else {
            pkt[ETH_LEN + 6] &= !0x40;
        }
        pkt[ETH_LEN + 10..ETH_LEN + 12].fill(0);
        let c = csum::checksum(&pkt[ETH_LEN..ETH_LEN + 20]);
        pkt[ETH_LEN + 10..ETH_LEN + 12].copy_from_slice(&c.to_be_bytes());
        pkt
    }

    #[test]
    fn too_big_with_df_gets_frag_needed_with_the_tunnel_mtu() {
        let t = tables();
        let pkt = with_df(udp(MAC_A, GW, "10.65.0.2", "10.65.1.5", 64, &[0u8; 1440]), true);
        let (v, f) = run(&t, A, &pkt);
        assert_eq!(v, Verdict::Reply(A, DropReason::TooBig));
        let icmp = &f.data()[ETH_LEN + 20..];
        assert_eq!((icmp[0], icmp[1]), (3, 4));
        assert_eq!(u16::from_be_bytes([icmp[6], icmp[7]]), 1450);
        assert_eq!(&f.data()[ETH_LEN + 16..ETH_LEN + 20], &ip("10.65.0.2").octets());
        // Over IPIP the same packet fits (1480).
        let mut p2 = pkt.clone();
        p2[ETH_LEN + 16..ETH_LEN + 20].copy_from_slice(&ip("10.65.2.5").octets());
        p2[ETH_LEN + 10..ETH_LEN + 12].fill(0);
        let c = csum::checksum(&p2[ETH_LEN..ETH_LEN + 20]);
        p2[ETH_LEN + 10..ETH_LEN + 12].copy_from_slice(&c.to_be_bytes());
        assert_eq!(run(&t, A, &p2).0, Verdict::Tx(IPIP));
        // Without DF it goes out (the kernel fragments the outer packet).
        let df_clear = with_df(udp(MAC_A, GW, "10.65.0.2", "10.65.1.5", 64, &[0u8; 1440]), false);
        assert_eq!(run(&t, A, &df_clear).0, Verdict::Tx(VX));
    }

    #[test]
    fn gso_frame_whose_segments_exceed_the_tunnel_gets_frag_needed() {
        let t = tables();
        let b = PacketBuilder::ethernet2(MAC_A.0, GW.0)
            .ipv4(ip("10.65.0.2").octets(), ip("10.65.1.5").octets(), 64)
            .tcp(40000, 80, 1, 1000)
            .ack(1);
        let mut pkt = Vec::new();
        b.write(&mut pkt, &[7u8; 6000]).unwrap();
        let mut f = Frame::from_bytes(&pkt);
        f.vnet.flags = crate::wire::vnet::F_NEEDS_CSUM;
        f.vnet.gso_type = crate::wire::GsoType::TcpV4;
        f.vnet.csum_start = 34;
        f.vnet.csum_offset = 16;
        f.vnet.gso_size = 1448; // 1448 + 40 > 1450
        let mut frames = vec![f];
        let mut v = Vec::new();
        process(&t, A, &mut frames, &mut v, &mut DropTally::default(), &mut FlowState::default());
        assert_eq!(v[0], Verdict::Reply(A, DropReason::TooBig));
        let mut f = Frame::from_bytes(&pkt);
        f.vnet.flags = crate::wire::vnet::F_NEEDS_CSUM;
        f.vnet.gso_type = crate::wire::GsoType::TcpV4;
        f.vnet.csum_start = 34;
        f.vnet.csum_offset = 16;
        f.vnet.gso_size = 1410;
        let mut frames = vec![f];
        process(&t, A, &mut frames, &mut v, &mut DropTally::default(), &mut FlowState::default());
        assert_eq!(v[0], Verdict::Tx(VX));
    }

    #[test]
    fn vxlan_from_a_known_node_to_a_local_pod_is_delivered() {
        let t = tables();
        let inner = udp(PEER_VTEP, OUR_VTEP, "10.65.1.5", "10.65.0.3", 64, b"yo");
        let (v, f) = run_meta(&t, VX, &vxlan_payload(4096, &inner), Some(peer()));
        assert_eq!(v, Verdict::Tx(B));
        assert_eq!(&f.data()[0..6], &MAC_B.0);
        assert_eq!(&f.data()[6..12], &GW.0);
        assert_eq!(f.data().len(), inner.len());
        assert_eq!(f.data()[ETH_LEN + 8], 63);
    }

    #[test]
    fn ipip_from_a_known_node_to_a_local_pod_is_delivered() {
        let t = tables();
        let inner = udp(PEER_VTEP, OUR_VTEP, "10.65.2.5", "10.65.0.3", 64, b"yo");
        let pkt = ipip_packet("192.0.2.12", "192.0.2.11", &inner, 4);
        let (v, f) = run_meta(&t, IPIP, &pkt, Some(peer()));
        assert_eq!(v, Verdict::Tx(B));
        assert_eq!(f.data().len(), inner.len());
        assert_eq!(&f.data()[ETH_LEN + 12..], &inner[ETH_LEN + 12..], "addresses and payload");
    }

    #[test]
    fn forged_or_broken_tunnel_packets_are_dropped_and_counted() {
        let t = tables();
        let good = udp(PEER_VTEP, OUR_VTEP, "10.65.1.5", "10.65.0.3", 64, b"yo");
        type Case = (&'static str, PortId, Vec<u8>, Option<Ipv4Addr>, DropReason);
        let cases: Vec<Case> = vec![
            ("wrong VNI", VX, vxlan_payload(77, &good), Some(peer()), DropReason::TunnelWrongVni),
            (
                "unknown source",
                VX,
                vxlan_payload(4096, &good),
                Some(ip("192.0.2.99")),
                DropReason::TunnelUnknownPeer,
            ),
            ("no source", VX, vxlan_payload(4096, &good), None, DropReason::TunnelUnknownPeer),
            ("truncated header", VX, vec![0x08, 0, 0], Some(peer()), DropReason::TunnelMalformed),
            (
                "I flag clear",
                VX,
                {
                    let mut p = vxlan_payload(4096, &good);
                    p[0] = 0;
                    p
                },
                Some(peer()),
                DropReason::TunnelMalformed,
            ),
            (
                "truncated inner",
                VX,
                vxlan_payload(4096, &good[..10]),
                Some(peer()),
                DropReason::TunnelMalformed,
            ),
            (
                "inner not for our VTEP",
                VX,
                vxlan_payload(4096, &udp(PEER_VTEP, MAC_B, "10.65.1.5", "10.65.0.3", 64, b"x")),
                Some(peer()),
                DropReason::NotForUs,
            ),
            (
                "inner for another node (relay)",
                VX,
                vxlan_payload(4096, &udp(PEER_VTEP, OUR_VTEP, "10.65.1.5", "10.65.2.9", 64, b"")),
                Some(peer()),
                DropReason::TunnelNotLocal,
            ),
            (
                "inner for the outside world (relay)",
                VX,
                vxlan_payload(4096, &udp(PEER_VTEP, OUR_VTEP, "10.65.1.5", "8.8.8.8", 64, b"")),
                Some(peer()),
                DropReason::TunnelNotLocal,
            ),
            (
                "IPIP with another protocol",
                IPIP,
                ipip_packet("192.0.2.12", "192.0.2.11", &good, 17),
                Some(peer()),
                DropReason::TunnelMalformed,
            ),
            (
                "IPIP from an unknown node",
                IPIP,
                ipip_packet("192.0.2.99", "192.0.2.11", &good, 4),
                Some(ip("192.0.2.99")),
                DropReason::TunnelUnknownPeer,
            ),
            ("IPIP truncated", IPIP, vec![0x45, 0, 0], Some(peer()), DropReason::TunnelMalformed),
        ];
        for (what, port, bytes, from, want) in cases {
            let mut f = Frame::from_bytes(&bytes);
            f.meta.peer = from;
            let mut frames = vec![f];
            let mut v = Vec::new();
            let mut tally = DropTally::default();
            process(&t, port, &mut frames, &mut v, &mut tally, &mut FlowState::default());
            assert_eq!(v[0], Verdict::Drop(want), "{what}");
            let c = crate::counters::DropCounters::default();
            tally.flush(&[&c]);
            assert_eq!(c.get(want), 1, "{what} counted");
        }
    }

    #[test]
    fn tunnel_frames_of_random_bytes_never_panic() {
        let t = tables();
        let mut x: u32 = 12345;
        for len in 0..300 {
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    x as u8
                })
                .collect();
            for port in [VX, IPIP] {
                let (v, _) = run_meta(&t, port, &bytes, Some(peer()));
                assert!(matches!(v, Verdict::Drop(_)), "{len} bytes on {port}: {v:?}");
            }
        }
    }

    /// A TCP segment from a kernel VTEP whose checksum offload never ran:
    /// the field holds the pseudo-header sum.
    fn partial_tcp(dst: &str) -> Vec<u8> {
        let mut v = Vec::new();
        PacketBuilder::ethernet2(PEER_VTEP.0, OUR_VTEP.0)
            .ipv4(ip("10.65.1.5").octets(), ip(dst).octets(), 64)
            .tcp(40000, 80, 1, 1000)
            .syn()
            .write(&mut v, b"")
            .unwrap();
        let tcp_len = (v.len() - ETH_LEN - 20) as u32;
        let acc = csum::sum(&v[ETH_LEN + 12..ETH_LEN + 20], 0) + 6 + tcp_len;
        let pseudo = csum::fold(acc);
        v[ETH_LEN + 36..ETH_LEN + 38].copy_from_slice(&pseudo.to_be_bytes());
        v
    }

    #[test]
    fn partial_checksums_from_kernel_vteps_are_passed_on_as_partial() {
        let t = tables();
        let inner = partial_tcp("10.65.0.3");
        let (v, f) = run_meta(&t, VX, &vxlan_payload(4096, &inner), Some(peer()));
        assert_eq!(v, Verdict::Tx(B));
        assert!(f.vnet.needs_csum());
        assert_eq!((f.vnet.csum_start, f.vnet.csum_offset), (34, 16));
        // Finishing it gives a valid segment.
        let mut d = f.data().to_vec();
        let mut vn = f.vnet;
        csum::finish_partial(&mut d, &mut vn).unwrap();
        let p = etherparse::SlicedPacket::from_ethernet(&d).unwrap();
        let Some(etherparse::TransportSlice::Tcp(tcp)) = p.transport else { panic!() };
        let Some(etherparse::NetSlice::Ipv4(ip4)) = p.net else { panic!() };
        let want = tcp.to_header().calc_checksum_ipv4(&ip4.header().to_header(), &[]).unwrap();
        assert_eq!(tcp.checksum(), want);
        // A complete checksum is left alone.
        let mut good = Vec::new();
        PacketBuilder::ethernet2(PEER_VTEP.0, OUR_VTEP.0)
            .ipv4(ip("10.65.1.5").octets(), ip("10.65.0.3").octets(), 64)
            .tcp(40000, 80, 1, 1000)
            .syn()
            .write(&mut good, b"")
            .unwrap();
        let (_, f) = run_meta(&t, VX, &vxlan_payload(4096, &good), Some(peer()));
        assert!(!f.vnet.needs_csum());
    }

    #[test]
    fn flow_owner_is_the_same_inside_and_outside_the_tunnel() {
        let ab = udp(MAC_A, GW, "10.65.0.2", "10.65.1.5", 64, b"x");
        let ba = udp(PEER_VTEP, OUR_VTEP, "10.65.1.5", "10.65.0.2", 64, b"x");
        let vx = vxlan_payload(4096, &ba);
        let ip = ipip_packet("192.0.2.12", "192.0.2.11", &ba, 4);
        let h = flow::frame_hash(&ab, &PortKind::Pod);
        assert_eq!(h, flow::frame_hash(&vx, &PortKind::Tunnel(Encap::Vxlan)));
        assert_eq!(h, flow::frame_hash(&ip, &PortKind::Tunnel(Encap::Ipip)));
    }
}

mod policy {
    //! NetworkPolicy and anti-spoofing in the pipeline.
    use super::*;
    use crate::api::Cidr;
    use crate::policy::classify::CompiledPolicy;
    use crate::policy::{EndpointPolicy, Net, PortRange, Proto, Rule};
    use std::sync::Arc;

    /// B accepts UDP/5000 from A only; A may send only to B.
    fn tables() -> Tables {
        let mut t = lab_tables();
        let only = |ip: &str| {
            Some(vec![Net {
                cidr: Cidr { addr: IpAddr::V4(super::ip(ip)), len: 32 },
                except: vec![],
            }])
        };
        let b = EndpointPolicy {
            ingress: Some(vec![Rule {
                peers: only("10.65.0.2"),
                ports: Some(vec![PortRange { proto: Proto::Udp, first: 5000, last: 5000 }]),
            }]),
            egress: None,
        };
        let a = EndpointPolicy {
            ingress: None,
            egress: Some(vec![Rule { peers: only("10.65.0.3"), ports: None }]),
        };
        for (port, p) in [(B, b), (A, a)] {
            if let Some(Some(e)) = t.ports.get_mut(port as usize) {
                e.policy = Some(Arc::new(CompiledPolicy::compile(&p)));
            }
        }
        t.policy_generation = 1;
        t
    }

    fn run_with(t: &Tables, port: PortId, bytes: &[u8], flows: &mut FlowState) -> Verdict {
        let mut frames = vec![Frame::from_bytes(bytes)];
        let mut v = Vec::new();
        process(t, port, &mut frames, &mut v, &mut DropTally::default(), flows);
        v[0]
    }

    #[test]
    fn allowed_flows_and_their_replies_pass_and_the_rest_is_counted() {
        let t = tables();
        let mut flows = FlowState::default();
        assert_eq!(
            run_with(&t, A, &udp(MAC_A, GW, "10.65.0.2", "10.65.0.3", 64, b"q"), &mut flows),
            Verdict::Tx(B)
        );
        // B's reply (UDP 5000 -> 4000) is not allowed by any rule of A's
        // ingress (A has none) nor B's egress (none): it passes as a reply,
        // and it is tracked.
        let mut reply = udp(MAC_B, GW, "10.65.0.3", "10.65.0.2", 64, b"r");
        reply[ETH_LEN + 20..ETH_LEN + 24].copy_from_slice(&[0x13, 0x88, 0x0f, 0xa0]);
        assert_eq!(run_with(&t, B, &reply, &mut flows), Verdict::Tx(A));
        assert_eq!(flows.ct.len(), 1);
        // A to the host (not B): A's egress denies it.
        assert_eq!(
            run_with(&t, A, &udp(MAC_A, GW, "10.65.0.2", "192.0.2.1", 64, b"x"), &mut flows),
            Verdict::Drop(DropReason::PolicyEgress)
        );
        // The host may always reach its pods.
        assert_eq!(
            run_with(&t, HOST, &udp(MAC_HOST, GW, "192.0.2.1", "10.65.0.3", 64, b"x"), &mut flows),
            Verdict::Tx(B)
        );
        // A pod of another node, routed natively, also arrives through the
        // host interface: its source is a pool address, so B's ingress
        // applies.
        assert_eq!(
            run_with(&t, HOST, &udp(MAC_HOST, GW, "10.65.7.7", "10.65.0.3", 64, b"x"), &mut flows),
            Verdict::Drop(DropReason::PolicyIngress)
        );
        // Another port of B: denied by B's ingress, counted on B too.
        let mut other = udp(MAC_A, GW, "10.65.0.2", "10.65.0.3", 64, b"q");
        other[ETH_LEN + 22..ETH_LEN + 24].copy_from_slice(&5001u16.to_be_bytes());
        assert_eq!(run_with(&t, A, &other, &mut flows), Verdict::Drop(DropReason::PolicyIngress));
        assert_eq!(t.port(B).unwrap().stats.drops.get(DropReason::PolicyIngress), 2);
    }

    #[test]
    fn a_pod_cannot_send_from_another_address_or_mac() {
        let t = lab_tables();
        let mut flows = FlowState::default();
        assert_eq!(
            run_with(&t, A, &udp(MAC_A, GW, "10.65.0.3", "10.65.0.2", 64, b"x"), &mut flows),
            Verdict::Drop(DropReason::Spoofed)
        );
        assert_eq!(
            run_with(&t, A, &udp(MAC_B, GW, "10.65.0.2", "10.65.0.3", 64, b"x"), &mut flows),
            Verdict::Drop(DropReason::Spoofed)
        );
        assert_eq!(
            run_with(&t, A, &udp(MAC_A, GW, "10.65.0.2", "10.65.0.3", 64, b"x"), &mut flows),
            Verdict::Tx(B)
        );
    }
}

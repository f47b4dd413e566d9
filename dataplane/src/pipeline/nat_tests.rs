//! The translation stage on in-memory frames: DNAT and its replies with
//! checksums verified by recomputation, rejects, hairpin, affinity,
//! natOutgoing with ICMP errors, hand-off between workers, policy on the
//! translated flow, partial checksums, malformed input.

use super::super::tests::lab_tables;
use super::super::*;
use crate::api::{Backend, Frontend, FrontendKind, NatOutgoingSpec, ServiceSpec, ServicesSpec};
use crate::nat::Services;
use crate::policy::Proto;
use etherparse::{PacketBuilder, SlicedPacket, TransportSlice};
use std::net::Ipv4Addr;
use std::sync::Arc;

const GW: MacAddr = MacAddr([0xee; 6]);
const MAC_A: MacAddr = MacAddr([0x02, 0, 0, 0, 0, 0x0a]);
const MAC_B: MacAddr = MacAddr([0x02, 0, 0, 0, 0, 0x0b]);
const MAC_HOST: MacAddr = MacAddr([0x02, 0, 0, 0, 0, 0x99]);
const MAC_UPLINK: MacAddr = MacAddr([0x02, 0, 0, 0, 0, 0x77]);
const A: PortId = 0;
const B: PortId = 1;
const HOST: PortId = 2;
const NODE: &str = "192.0.2.10";
const VIP: &str = "10.96.0.10";

fn ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

fn backend(addr: &str) -> Backend {
    Backend {
        addr: addr.parse().unwrap(),
        port: 8080,
        local: true,
        ready: true,
        serving: true,
        terminating: false,
    }
}

fn service(proto: Proto, backends: Vec<Backend>) -> ServiceSpec {
    ServiceSpec {
        name: "default/web:80".into(),
        proto,
        frontends: vec![Frontend {
            addr: VIP.parse().unwrap(),
            port: 80,
            kind: FrontendKind::ClusterIp,
        }],
        backends,
        affinity_timeout_s: 0,
        external_local: false,
        internal_local: false,
    }
}

fn tables_with(spec: ServicesSpec) -> Tables {
    let mut t = lab_tables();
    // Backends other than 10.65.0.3 live behind B too.
    t.routes.insert("10.65.0.0".parse().unwrap(), 24, crate::tables::NextHop::Port(B));
    t.services = Arc::new(Services::compile(&spec, &[ip(NODE)]).unwrap());
    t
}

fn tables(services: Vec<ServiceSpec>) -> Tables {
    tables_with(ServicesSpec {
        services,
        nat_outgoing: NatOutgoingSpec {
            sources: vec!["10.65.0.0/16".parse().unwrap()],
            exclude: vec!["10.65.0.0/16".parse().unwrap(), "10.96.0.0/12".parse().unwrap()],
            addr: None,
            ..Default::default()
        },
        ..Default::default()
    })
}

fn tcp(
    src_mac: MacAddr,
    dst_mac: MacAddr,
    src: (&str, u16),
    dst: (&str, u16),
    syn: bool,
) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(src_mac.0, dst_mac.0)
        .ipv4(ip(src.0).octets(), ip(dst.0).octets(), 64)
        .tcp(src.1, dst.1, 1000, 64000);
    let b = if syn { b.syn() } else { b.ack(77) };
    let mut v = Vec::new();
    b.write(&mut v, b"payload").unwrap();
    v
}

fn udp(src_mac: MacAddr, dst_mac: MacAddr, src: (&str, u16), dst: (&str, u16)) -> Vec<u8> {
    let mut v = Vec::new();
    PacketBuilder::ethernet2(src_mac.0, dst_mac.0)
        .ipv4(ip(src.0).octets(), ip(dst.0).octets(), 64)
        .udp(src.1, dst.1)
        .write(&mut v, b"datagram")
        .unwrap();
    v
}

fn run(t: &Tables, port: PortId, bytes: &[u8], flows: &mut FlowState) -> (Verdict, Frame) {
    run_frame(t, port, Frame::from_bytes(bytes), flows)
}

fn run_frame(t: &Tables, port: PortId, f: Frame, flows: &mut FlowState) -> (Verdict, Frame) {
    let mut frames = vec![f];
    let mut v = Vec::new();
    process(t, port, &mut frames, &mut v, &mut DropTally::default(), flows);
    (v[0], frames.pop().unwrap())
}

/// Addresses, ports, and checksums recomputed from scratch.
fn l4(f: &Frame) -> (Ipv4Addr, u16, Ipv4Addr, u16) {
    let p = SlicedPacket::from_ethernet(f.data()).unwrap();
    let Some(etherparse::NetSlice::Ipv4(v4)) = &p.net else { panic!("not IPv4") };
    let h = v4.header();
    assert_eq!(crate::csum::checksum(h.slice()), 0, "IPv4 header checksum");
    let hdr = h.to_header();
    match &p.transport {
        Some(TransportSlice::Tcp(t)) => {
            assert_eq!(t.checksum(), t.to_header().calc_checksum_ipv4(&hdr, t.payload()).unwrap());
            (h.source_addr(), t.source_port(), h.destination_addr(), t.destination_port())
        }
        Some(TransportSlice::Udp(u)) => {
            assert_eq!(u.checksum(), u.to_header().calc_checksum_ipv4(&hdr, u.payload()).unwrap());
            (h.source_addr(), u.source_port(), h.destination_addr(), u.destination_port())
        }
        other => panic!("unexpected transport {other:?}"),
    }
}

#[test]
fn cluster_ip_is_translated_to_a_backend_and_the_reply_back() {
    let t = tables(vec![service(Proto::Tcp, vec![backend("10.65.0.3")])]);
    let mut flows = FlowState::default();
    let (v, f) = run(&t, A, &tcp(MAC_A, GW, ("10.65.0.2", 40000), (VIP, 80), true), &mut flows);
    assert_eq!(v, Verdict::Tx(B));
    assert_eq!(l4(&f), (ip("10.65.0.2"), 40000, ip("10.65.0.3"), 8080));
    // Later packets of the flow, and the replies.
    let (v, f) =
        run(&t, B, &tcp(MAC_B, GW, ("10.65.0.3", 8080), ("10.65.0.2", 40000), false), &mut flows);
    assert_eq!(v, Verdict::Tx(A));
    assert_eq!(l4(&f), (ip(VIP), 80, ip("10.65.0.2"), 40000));
    let (v, f) = run(&t, A, &tcp(MAC_A, GW, ("10.65.0.2", 40000), (VIP, 80), false), &mut flows);
    assert_eq!(v, Verdict::Tx(B));
    assert_eq!(l4(&f).2, ip("10.65.0.3"));
    assert_eq!(flows.nat.counts(), (1, 1));
}

#[test]
fn new_flows_spread_over_every_backend_and_keep_theirs() {
    let t = tables(vec![service(Proto::Udp, vec![backend("10.65.0.3"), backend("10.65.0.9")])]);
    let mut flows = FlowState::default();
    let mut seen = std::collections::HashMap::new();
    for sport in 1000..1100u16 {
        let (_, f) = run(&t, A, &udp(MAC_A, GW, ("10.65.0.2", sport), (VIP, 80)), &mut flows);
        let b = l4(&f).2;
        seen.insert(sport, b);
    }
    let to_b = seen.values().filter(|b| **b == ip("10.65.0.3")).count();
    assert!((20..80).contains(&to_b), "{to_b} of 100 flows to one of two backends");
    // The same flows again meet the same backends.
    for sport in 1000..1100u16 {
        let (_, f) = run(&t, A, &udp(MAC_A, GW, ("10.65.0.2", sport), (VIP, 80)), &mut flows);
        assert_eq!(l4(&f).2, seen[&sport]);
    }
}

#[test]
fn existing_flows_keep_a_terminating_backend_new_ones_do_not_get_it() {
    let spec = |b3_terminating: bool| {
        let mut b3 = backend("10.65.0.3");
        if b3_terminating {
            b3.ready = false;
            b3.terminating = true;
        }
        vec![service(Proto::Udp, vec![b3, backend("10.65.0.9")])]
    };
    let mut flows = FlowState::default();
    let t = tables(spec(false));
    // Find a flow that went to 10.65.0.3.
    let sport = (1000..2000u16)
        .find(|p| {
            let (_, f) = run(&t, A, &udp(MAC_A, GW, ("10.65.0.2", *p), (VIP, 80)), &mut flows);
            l4(&f).2 == ip("10.65.0.3")
        })
        .unwrap();
    let t = tables(spec(true));
    let (_, f) = run(&t, A, &udp(MAC_A, GW, ("10.65.0.2", sport), (VIP, 80)), &mut flows);
    assert_eq!(l4(&f).2, ip("10.65.0.3"), "the established flow stays");
    for p in 3000..3050u16 {
        let (_, f) = run(&t, A, &udp(MAC_A, GW, ("10.65.0.2", p), (VIP, 80)), &mut flows);
        assert_eq!(l4(&f).2, ip("10.65.0.9"), "new flows avoid the terminating backend");
    }
}

#[test]
fn no_backend_is_refused_at_once_with_rst_or_port_unreachable() {
    let t = tables(vec![service(Proto::Tcp, vec![])]);
    let mut flows = FlowState::default();
    let (v, f) = run(&t, A, &tcp(MAC_A, GW, ("10.65.0.2", 40000), (VIP, 80), true), &mut flows);
    assert_eq!(v, Verdict::Reply(A, DropReason::ServiceNoBackend));
    assert_eq!(&f.data()[..6], &MAC_A.0);
    assert_eq!(l4(&f), (ip(VIP), 80, ip("10.65.0.2"), 40000));
    let p = SlicedPacket::from_ethernet(f.data()).unwrap();
    let Some(TransportSlice::Tcp(rst)) = p.transport else { panic!() };
    assert!(rst.rst() && rst.ack());
    assert_eq!(rst.acknowledgment_number(), 1000 + 1 + 7, "SYN and payload acknowledged");

    let t = tables(vec![service(Proto::Udp, vec![])]);
    let (v, f) = run(&t, A, &udp(MAC_A, GW, ("10.65.0.2", 5353), (VIP, 80)), &mut flows);
    assert_eq!(v, Verdict::Reply(A, DropReason::ServiceNoBackend));
    let d = f.data();
    assert_eq!(&d[26..30], &ip(VIP).octets(), "from the frontend");
    assert_eq!(&d[34..36], &[3, 3], "port unreachable");
    assert_eq!(crate::csum::checksum(&d[34..]), 0);
}

#[test]
fn hairpin_is_translated_from_the_service_loopback_address() {
    let t = tables(vec![service(Proto::Tcp, vec![backend("10.65.0.2")])]);
    let mut flows = FlowState::default();
    let (v, f) = run(&t, A, &tcp(MAC_A, GW, ("10.65.0.2", 40000), (VIP, 80), true), &mut flows);
    assert_eq!(v, Verdict::Tx(A));
    let (s, sp, d, dp) = l4(&f);
    assert_eq!((s, d, dp), (crate::nat::service::HAIRPIN_ADDR, ip("10.65.0.2"), 8080));
    assert!(t.services.is_snat_port(sp));
    // The backend (the same pod) answers the loopback address.
    let r = tcp(MAC_A, GW, ("10.65.0.2", 8080), ("169.254.42.1", sp), false);
    let (v, f) = run(&t, A, &r, &mut flows);
    assert_eq!(v, Verdict::Tx(A));
    assert_eq!(l4(&f), (ip(VIP), 80, ip("10.65.0.2"), 40000));
}

#[test]
fn client_ip_affinity_keeps_one_backend_per_client() {
    let mut s = service(Proto::Tcp, (3..13).map(|i| backend(&format!("10.65.0.{i}"))).collect());
    s.affinity_timeout_s = 60;
    let t = tables(vec![s]);
    let mut flows = FlowState::default();
    let mut backends = std::collections::HashSet::new();
    for sport in 40000..40050u16 {
        let (_, f) = run(&t, A, &tcp(MAC_A, GW, ("10.65.0.2", sport), (VIP, 80), true), &mut flows);
        backends.insert(l4(&f).2);
    }
    assert_eq!(backends.len(), 1, "{backends:?}");
    // After the timeout a client may land elsewhere.
    flows.now_ms = 61_000;
    let mut later = std::collections::HashSet::new();
    for sport in 41000..41050u16 {
        let (_, f) = run(&t, A, &tcp(MAC_A, GW, ("10.65.0.2", sport), (VIP, 80), true), &mut flows);
        later.insert(l4(&f).2);
    }
    assert_eq!(later.len(), 1);
}

#[test]
fn nat_outgoing_translates_to_the_node_and_back_with_icmp_errors() {
    let t = tables(vec![]);
    let mut flows = FlowState::default();
    let (v, f) = run(&t, A, &udp(MAC_A, GW, ("10.65.0.2", 5353), ("198.51.100.7", 53)), &mut flows);
    assert_eq!(v, Verdict::Tx(HOST));
    let (s, sp, d, dp) = l4(&f);
    assert_eq!((s, d, dp), (ip(NODE), ip("198.51.100.7"), 53));
    assert!(t.services.is_snat_port(sp));
    // The reply, steered from the uplink: its MAC is the uplink's.
    let r = udp(MAC_UPLINK, MAC_HOST, ("198.51.100.7", 53), (NODE, sp));
    let (v, f) = run(&t, HOST, &r, &mut flows);
    assert_eq!(v, Verdict::Tx(A));
    assert_eq!(l4(&f), (ip("198.51.100.7"), 53, ip("10.65.0.2"), 5353));
    // A router's time-exceeded about the translated packet.
    let mut quoted = Vec::new();
    PacketBuilder::ipv4(ip(NODE).octets(), ip("198.51.100.7").octets(), 1)
        .udp(sp, 53)
        .write(&mut quoted, b"datagram")
        .unwrap();
    let mut e = Vec::new();
    PacketBuilder::ethernet2(MAC_UPLINK.0, MAC_HOST.0)
        .ipv4(ip("203.0.113.1").octets(), ip(NODE).octets(), 64)
        .icmpv4_raw(11, 0, [0; 4])
        .write(&mut e, &quoted)
        .unwrap();
    let (v, f) = run(&t, HOST, &e, &mut flows);
    assert_eq!(v, Verdict::Tx(A));
    let d = f.data();
    assert_eq!(&d[26..30], &ip("203.0.113.1").octets());
    assert_eq!(&d[30..34], &ip("10.65.0.2").octets());
    assert_eq!(crate::csum::checksum(&d[34..]), 0, "ICMP checksum");
    assert_eq!(&d[34 + 8 + 12..34 + 8 + 16], &ip("10.65.0.2").octets(), "quoted source");
    assert_eq!(&d[34 + 8 + 20..34 + 8 + 22], &5353u16.to_be_bytes(), "quoted port");
    // Inside the cluster: untouched.
    let (v, f) = run(&t, A, &udp(MAC_A, GW, ("10.65.0.2", 5353), ("10.65.0.3", 53)), &mut flows);
    assert_eq!(v, Verdict::Tx(B));
    assert_eq!(l4(&f).0, ip("10.65.0.2"));
    // An unsolicited packet to the node's address is not ours.
    let stray = udp(MAC_UPLINK, MAC_HOST, ("198.51.100.7", 53), (NODE, 61999));
    assert_ne!(run(&t, HOST, &stray, &mut flows).0, Verdict::Tx(A));
}

#[test]
fn source_ports_run_out_as_a_counted_drop() {
    let mut spec = ServicesSpec {
        nat_outgoing: NatOutgoingSpec {
            sources: vec!["10.65.0.0/16".parse().unwrap()],
            ports: (61440, 61443),
            ..Default::default()
        },
        ..Default::default()
    };
    spec.nat_outgoing.exclude = vec!["10.65.0.0/16".parse().unwrap()];
    let t = tables_with(spec);
    let mut flows = FlowState::default();
    for sport in 0..4u16 {
        let (v, _) = run(
            &t,
            A,
            &udp(MAC_A, GW, ("10.65.0.2", 5000 + sport), ("198.51.100.7", 53)),
            &mut flows,
        );
        assert_eq!(v, Verdict::Tx(HOST));
    }
    let (v, _) = run(&t, A, &udp(MAC_A, GW, ("10.65.0.2", 6000), ("198.51.100.7", 53)), &mut flows);
    assert_eq!(v, Verdict::Drop(DropReason::SnatPortsExhausted));
    // Another destination still has ports.
    let (v, _) = run(&t, A, &udp(MAC_A, GW, ("10.65.0.2", 6000), ("198.51.100.8", 53)), &mut flows);
    assert_eq!(v, Verdict::Tx(HOST));
}

#[test]
fn a_translated_flow_is_handed_to_the_owner_of_its_translated_pair() {
    let t = tables(vec![service(
        Proto::Tcp,
        (3..40).map(|i| backend(&format!("10.65.0.{i}"))).collect(),
    )]);
    let n = 2;
    let mut workers: Vec<FlowState> = (0..n)
        .map(|w| {
            let mut f = FlowState::default();
            f.nat.worker = w;
            f.nat.workers = n;
            f
        })
        .collect();
    let client = ip("10.65.0.2");
    let w1 = flow::pair_owner(client, ip(VIP), n);
    // A source port whose backend's pair belongs to the other worker.
    let mut handed = None;
    for sport in 40000..40100u16 {
        let syn = tcp(MAC_A, GW, ("10.65.0.2", sport), (VIP, 80), true);
        let (v, f) = run(&t, A, &syn, &mut workers[w1]);
        if let Verdict::Handoff(w2) = v {
            handed = Some((sport, w2, f));
            break;
        }
        assert!(matches!(v, Verdict::Tx(_)), "{v:?}");
    }
    let (sport, w2, f) = handed.expect("some flow crosses workers");
    assert_ne!(w2, w1);
    assert_eq!(f.meta.nat.map(|o| o.dst), Some((ip(VIP), 80)));
    let backend = l4(&f).2;
    assert_eq!(flow::pair_owner(client, backend, n), w2);
    // The owner takes it on (the frame is handed over as it is).
    let copy = f.duplicate();
    let (v, _) = run_frame(&t, A, copy, &mut workers[w2]);
    // Delivered to the backend's port: here backends other than B route
    // into the pool (no endpoint), so the verdict is about routing only.
    assert_ne!(v, Verdict::Handoff(w1));
    assert_eq!(workers[w2].nat.counts().1, 1, "the reverse half lives with the owner");
    assert_eq!(workers[w1].nat.counts(), (1, 0), "the forward half stays");
    // The reply, at the owner, goes back to the VIP.
    let r = tcp(MAC_B, GW, (&backend.to_string(), 8080), ("10.65.0.2", sport), false);
    let mut t2 = t.clone();
    // Let the backend live behind port B for the reply's spoof check.
    if let Some(Some(p)) = t2.ports.get_mut(B as usize) {
        p.ips = vec![backend.into()];
    }
    let (v, f) = run(&t2, B, &r, &mut workers[w2]);
    assert_eq!(v, Verdict::Tx(A));
    assert_eq!(l4(&f), (ip(VIP), 80, client, sport));
}

#[test]
fn policy_judges_the_translated_flow() {
    use crate::api::Cidr;
    use crate::policy::classify::CompiledPolicy;
    use crate::policy::{EndpointPolicy, Net, PortRange, Rule};
    let policy = |port: u16| {
        Arc::new(CompiledPolicy::compile(&EndpointPolicy {
            ingress: Some(vec![Rule {
                peers: Some(vec![Net {
                    cidr: Cidr { addr: "10.65.0.2".parse().unwrap(), len: 32 },
                    except: vec![],
                }]),
                ports: Some(vec![PortRange { proto: Proto::Tcp, first: port, last: port }]),
            }]),
            egress: None,
        }))
    };
    for (allowed_port, expect) in
        [(8080, Verdict::Tx(B)), (80, Verdict::Drop(DropReason::PolicyIngress))]
    {
        let mut t = tables(vec![service(Proto::Tcp, vec![backend("10.65.0.3")])]);
        if let Some(Some(p)) = t.ports.get_mut(B as usize) {
            p.policy = Some(policy(allowed_port));
        }
        t.policy_generation = 1;
        let mut flows = FlowState::default();
        let syn = tcp(MAC_A, GW, ("10.65.0.2", 40000), (VIP, 80), true);
        assert_eq!(run(&t, A, &syn, &mut flows).0, expect, "ingress allows {allowed_port}");
        if expect == Verdict::Tx(B) {
            // The backend's reply passes as part of the allowed flow.
            let synack = tcp(MAC_B, GW, ("10.65.0.3", 8080), ("10.65.0.2", 40000), false);
            assert_eq!(run(&t, B, &synack, &mut flows).0, Verdict::Tx(A));
        }
    }
}

#[test]
fn gso_frames_with_partial_checksums_are_translated() {
    let t = tables(vec![service(Proto::Tcp, vec![backend("10.65.0.3")])]);
    let mut f = crate::gso::sample_tcp4_gso(20_000, 1448);
    // The sample goes 10.65.0.2 -> 10.65.1.3:5201; aim it at the VIP from A.
    let d = f.data_mut();
    d[0..6].copy_from_slice(&GW.0);
    d[6..12].copy_from_slice(&MAC_A.0);
    let (old, new) = (u32::from(ip("10.65.1.3")), u32::from(ip(VIP)));
    d[30..34].copy_from_slice(&ip(VIP).octets());
    d[36..38].copy_from_slice(&80u16.to_be_bytes());
    // Keep the IPv4 and pseudo-header sums right for the new address.
    let fix = |c: u16| {
        crate::csum::update16(
            crate::csum::update16(c, (old >> 16) as u16, (new >> 16) as u16),
            old as u16,
            new as u16,
        )
    };
    let ipc = u16::from_be_bytes([d[24], d[25]]);
    d[24..26].copy_from_slice(&fix(ipc).to_be_bytes());
    let partial = u16::from_be_bytes([d[50], d[51]]);
    d[50..52].copy_from_slice(&(!fix(!partial)).to_be_bytes());
    let mut flows = FlowState::default();
    let (v, f) = run_frame(&t, A, f, &mut flows);
    assert_eq!(v, Verdict::Tx(B));
    assert!(f.vnet.is_gso() && f.vnet.needs_csum());
    let mut segs = Vec::new();
    crate::gso::segment(&f, &mut segs).unwrap();
    assert!(segs.len() > 10);
    for s in &segs {
        assert_eq!(l4(s), (ip("10.65.0.2"), 40000, ip("10.65.0.3"), 8080));
    }
    // And finishing the partial checksum in place gives a valid packet too.
    let mut whole = f.duplicate();
    let mut v = whole.vnet;
    crate::csum::finish_partial(whole.data_mut(), &mut v).unwrap();
    l4(&whole);
}

#[test]
fn truncated_and_random_frames_to_a_frontend_never_panic() {
    let t = tables(vec![service(Proto::Tcp, vec![backend("10.65.0.3")])]);
    let mut flows = FlowState::default();
    let syn = tcp(MAC_A, GW, ("10.65.0.2", 40000), (VIP, 80), true);
    for n in 0..syn.len() {
        let _ = run(&t, A, &syn[..n], &mut flows);
        let _ = run(&t, HOST, &syn[..n], &mut flows);
    }
    let mut x: u64 = 7;
    for _ in 0..3000 {
        x = crate::nat::maglev::mix(x);
        let mut b = syn.clone();
        let i = 14 + (x % (b.len() as u64 - 14)) as usize;
        b[i] = (x >> 32) as u8;
        let _ = run(&t, A, &b, &mut flows);
    }
}

#[test]
fn node_ports_snat_to_the_node_for_remote_backends_and_keep_the_client_when_local() {
    let spec = |external_local: bool| {
        let mut s = service(
            Proto::Tcp,
            vec![backend("10.65.0.3"), Backend { local: false, ..backend("10.65.0.9") }],
        );
        s.frontends = vec![Frontend {
            addr: "0.0.0.0".parse().unwrap(),
            port: 30080,
            kind: FrontendKind::NodePort,
        }];
        s.external_local = external_local;
        tables(vec![s])
    };
    let client = ("203.0.113.5", 50000u16);
    // Cluster policy: flows that land on the remote backend leave with the
    // node's address; the reply, steered in, goes back out to the client.
    let t = spec(false);
    let mut flows = FlowState::default();
    let mut remote_seen = false;
    for sport in 50000..50064u16 {
        let syn = tcp(MAC_UPLINK, MAC_HOST, (client.0, sport), (NODE, 30080), true);
        let (v, f) = run(&t, HOST, &syn, &mut flows);
        assert_eq!(v, Verdict::Tx(B));
        let (s, sp, d, dp) = l4(&f);
        assert_eq!(dp, 8080);
        if d == ip("10.65.0.9") {
            remote_seen = true;
            assert_eq!(s, ip(NODE));
            assert!(t.services.is_snat_port(sp));
            let r = tcp(MAC_UPLINK, MAC_HOST, ("10.65.0.9", 8080), (NODE, sp), false);
            let (v, f) = run(&t, HOST, &r, &mut flows);
            assert_eq!(v, Verdict::Tx(HOST), "back out to the client");
            assert_eq!(l4(&f), (ip(NODE), 30080, ip(client.0), sport));
        } else {
            assert_eq!((s, sp), (ip(client.0), sport), "a local backend sees the client");
        }
    }
    assert!(remote_seen);
    // Local policy: local backends only, client address kept.
    let t = spec(true);
    let mut flows = FlowState::default();
    for sport in 50000..50032u16 {
        let syn = tcp(MAC_UPLINK, MAC_HOST, (client.0, sport), (NODE, 30080), true);
        let (v, f) = run(&t, HOST, &syn, &mut flows);
        assert_eq!(v, Verdict::Tx(B));
        assert_eq!(l4(&f), (ip(client.0), sport, ip("10.65.0.3"), 8080));
    }
}

#[test]
fn the_clients_icmp_error_about_a_reply_reaches_the_backend() {
    let t = tables(vec![service(Proto::Udp, vec![backend("10.65.0.3")])]);
    let mut flows = FlowState::default();
    let (v, _) = run(&t, A, &udp(MAC_A, GW, ("10.65.0.2", 5353), (VIP, 80)), &mut flows);
    assert_eq!(v, Verdict::Tx(B));
    // The client's kernel refuses the reply it saw from the VIP.
    let mut quoted = Vec::new();
    PacketBuilder::ipv4(ip(VIP).octets(), ip("10.65.0.2").octets(), 64)
        .udp(80, 5353)
        .write(&mut quoted, b"reply")
        .unwrap();
    let mut e = Vec::new();
    PacketBuilder::ethernet2(MAC_A.0, GW.0)
        .ipv4(ip("10.65.0.2").octets(), ip(VIP).octets(), 64)
        .icmpv4_raw(3, 3, [0; 4])
        .write(&mut e, &quoted)
        .unwrap();
    let (v, f) = run(&t, A, &e, &mut flows);
    assert_eq!(v, Verdict::Tx(B));
    let d = f.data();
    assert_eq!(&d[30..34], &ip("10.65.0.3").octets(), "to the backend");
    assert_eq!(crate::csum::checksum(&d[34..]), 0, "ICMP checksum");
    assert_eq!(&d[34 + 8 + 12..34 + 8 + 16], &ip("10.65.0.3").octets(), "quoted source");
    assert_eq!(&d[34 + 8 + 20..34 + 8 + 22], &8080u16.to_be_bytes(), "quoted port");
}

/// The node's own connection (from the host port, its source the node's
/// address) to a cluster IP: to another node's backend it leaves with the
/// node's address and a steered port, so the reply comes back here; to a
/// local backend it keeps its source (plain DNAT).
#[test]
fn the_nodes_own_connections_to_remote_backends_are_source_translated() {
    let t = tables(vec![service(
        Proto::Tcp,
        vec![backend("10.65.0.3"), Backend { local: false, ..backend("10.65.0.9") }],
    )]);
    assert!(t.services.needs_steering());
    let mut flows = FlowState::default();
    let (mut remote, mut local) = (false, false);
    for sport in 40000..40064u16 {
        let syn = tcp(MAC_HOST, GW, (NODE, sport), (VIP, 80), true);
        let (v, f) = run(&t, HOST, &syn, &mut flows);
        assert_eq!(v, Verdict::Tx(B));
        let (s, sp, d, dp) = l4(&f);
        assert_eq!(dp, 8080);
        if d == ip("10.65.0.9") {
            remote = true;
            assert_eq!(s, ip(NODE));
            assert!(t.services.is_snat_port(sp), "port {sp} is steered back");
            // The backend's reply, through its node's kernel and ours,
            // steered in from the uplink.
            let r = tcp(MAC_UPLINK, MAC_HOST, ("10.65.0.9", 8080), (NODE, sp), false);
            let (v, f) = run(&t, HOST, &r, &mut flows);
            assert_eq!(v, Verdict::Tx(HOST), "back to the node");
            assert_eq!(l4(&f), (ip(VIP), 80, ip(NODE), sport));
            assert_eq!(&f.data()[..6], &MAC_HOST.0);
            // The node's next packets meet the same translation.
            let ack = tcp(MAC_HOST, GW, (NODE, sport), (VIP, 80), false);
            let (v, f) = run(&t, HOST, &ack, &mut flows);
            assert_eq!(v, Verdict::Tx(B));
            assert_eq!(l4(&f), (ip(NODE), sp, ip("10.65.0.9"), 8080));
        } else {
            local = true;
            assert_eq!((s, sp, d), (ip(NODE), sport, ip("10.65.0.3")), "plain DNAT");
            let r = tcp(MAC_B, GW, ("10.65.0.3", 8080), (NODE, sport), false);
            let (v, f) = run(&t, B, &r, &mut flows);
            assert_eq!(v, Verdict::Tx(HOST));
            assert_eq!(l4(&f), (ip(VIP), 80, ip(NODE), sport));
        }
    }
    assert!(remote && local);
    // A pod's connection to the remote backend keeps its source.
    for sport in 40000..40064u16 {
        let syn = tcp(MAC_A, GW, ("10.65.0.2", sport), (VIP, 80), true);
        let (_, f) = run(&t, A, &syn, &mut flows);
        assert_eq!(l4(&f).0, ip("10.65.0.2"));
        assert_eq!(l4(&f).1, sport);
    }
}

/// Steering is needed as soon as anything is translated to the node's
/// address, including a cluster IP with a remote backend (the node's own
/// connections), and not for cluster IPs with local backends only.
#[test]
fn steering_follows_what_is_translated_to_the_node() {
    let only = |backends: Vec<Backend>| {
        tables_with(ServicesSpec {
            services: vec![service(Proto::Tcp, backends)],
            ..Default::default()
        })
    };
    assert!(!only(vec![backend("10.65.0.3")]).services.needs_steering());
    let remote = Backend { local: false, ..backend("10.65.0.9") };
    assert!(only(vec![backend("10.65.0.3"), remote.clone()]).services.needs_steering());
    // internalTrafficPolicy: Local never picks the remote one.
    let mut s = service(Proto::Tcp, vec![backend("10.65.0.3"), remote.clone()]);
    s.internal_local = true;
    let t = tables_with(ServicesSpec { services: vec![s], ..Default::default() });
    assert!(!t.services.needs_steering());
    assert!(tables(vec![]).services.needs_steering(), "natOutgoing");
    // No node address yet: nothing can be translated to it.
    let spec =
        ServicesSpec { services: vec![service(Proto::Tcp, vec![remote])], ..Default::default() };
    assert!(!Services::compile(&spec, &[]).unwrap().needs_steering());
}

/// [`tables`] on a node whose peer's pods (10.65.3.0/26) are routed
/// natively: through the host port and the node's kernel.
fn native_tables(services: Vec<ServiceSpec>) -> Tables {
    use crate::tables::{Encap, NextHop, Overlay, RemoteNode};
    let mut t = tables(services);
    let peer = ip("192.0.2.11");
    t.overlay = Overlay {
        local_ip: Some(ip(NODE)),
        nodes: vec![RemoteNode { name: "node-2".into(), ip: peer, vtep_mac: MacAddr([3; 6]) }],
        by_ip: [(peer, 0u16)].into_iter().collect(),
        ..Default::default()
    };
    let remote = NextHop::Remote { node: 0, encap: Encap::Native };
    t.routes.insert("10.65.3.0".parse().unwrap(), 26, remote);
    t
}

/// With native routing, another node's backend is reached through the
/// host port, the port a NodePort request (or the node's own connection)
/// came in on: translated, it leaves that way, and so does the reply
/// steered back in. The host's untranslated traffic still never goes back.
#[test]
fn translated_flows_from_the_host_reach_natively_routed_backends_and_back() {
    let mut s = service(Proto::Tcp, vec![Backend { local: false, ..backend("10.65.3.5") }]);
    s.frontends.push(Frontend {
        addr: "0.0.0.0".parse().unwrap(),
        port: 30080,
        kind: FrontendKind::NodePort,
    });
    let t = native_tables(vec![s]);
    let mut flows = FlowState::default();
    // NodePort (Cluster) from outside, then the node's own connection.
    let cases = [
        ((MAC_UPLINK, MAC_HOST), ("203.0.113.5", 50000u16), (NODE, 30080u16)),
        ((MAC_HOST, GW), (NODE, 40000), (VIP, 80)),
    ];
    for ((from_mac, to_mac), client, dst) in cases {
        let syn = tcp(from_mac, to_mac, client, dst, true);
        let (v, f) = run(&t, HOST, &syn, &mut flows);
        assert_eq!(v, Verdict::Tx(HOST), "{client:?} -> {dst:?}");
        assert_eq!(&f.data()[..6], &MAC_HOST.0, "to the node's kernel");
        let (s, sp, d, dp) = l4(&f);
        assert_eq!((s, d, dp), (ip(NODE), ip("10.65.3.5"), 8080));
        assert!(t.services.is_snat_port(sp));
        let r = tcp(MAC_UPLINK, MAC_HOST, ("10.65.3.5", 8080), (NODE, sp), false);
        let (v, f) = run(&t, HOST, &r, &mut flows);
        assert_eq!(v, Verdict::Tx(HOST));
        assert_eq!(l4(&f), (ip(dst.0), dst.1, ip(client.0), client.1));
    }
    // A natively routed pod of the peer as the NodePort's client: its
    // reply, translated back, goes through the host port to its node.
    let syn = tcp(MAC_UPLINK, MAC_HOST, ("10.65.3.9", 41000), (NODE, 30080), true);
    let (v, f) = run(&t, HOST, &syn, &mut flows);
    assert_eq!(v, Verdict::Tx(HOST));
    let sp = l4(&f).1;
    let r = tcp(MAC_UPLINK, MAC_HOST, ("10.65.3.5", 8080), (NODE, sp), false);
    let (v, f) = run(&t, HOST, &r, &mut flows);
    assert_eq!(v, Verdict::Tx(HOST));
    assert_eq!(l4(&f), (ip(NODE), 30080, ip("10.65.3.9"), 41000));
    // Untranslated, the host's traffic to the peer's pods is not sent back.
    let plain = tcp(MAC_HOST, GW, (NODE, 40001), ("10.65.3.5", 8080), true);
    assert_eq!(run(&t, HOST, &plain, &mut flows).0, Verdict::Drop(DropReason::NoRoute));
    // A pod reaches the remote backend through the kernel with its own
    // address (its node's kernel routes it natively).
    let syn = tcp(MAC_A, GW, ("10.65.0.2", 40002), (VIP, 80), true);
    let (v, f) = run(&t, A, &syn, &mut flows);
    assert_eq!(v, Verdict::Tx(HOST));
    assert_eq!(l4(&f), (ip("10.65.0.2"), 40002, ip("10.65.3.5"), 8080));
}

//! The verdict on one packet: connection tracking first, the endpoints'
//! compiled policies for what it does not know.
//!
//! A packet between two endpoints needs the sender's egress and the
//! receiver's ingress, each checked where the endpoint lives: on this node
//! only the directions of local endpoints are known (a remote node checks
//! its own). Replies of an allowed flow pass without classification; so do
//! ICMP errors about a tracked flow. A flow whose verdict was made under an
//! older policy generation is classified again, and ends if now denied.
//! Flows are picked up mid-way (a TCP packet without SYN is classified like
//! a new flow), so connections that predate a policy are judged by it
//! rather than cut for being unknown.

use super::classify::CompiledPolicy;
use super::conntrack::{Conntrack, Packet, Seen};
use super::Proto;
use crate::counters::DropReason;
use std::net::Ipv4Addr;

/// The transport facts of an IPv4 packet that policy and tracking need.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Flow {
    pub packet: Packet,
    /// For an ICMP error: the flow of the packet it quotes, as that packet
    /// went (its source is our destination).
    pub quoted: Option<Packet>,
}

const ICMP: u8 = 1;

/// Read the flow of an IPv4 packet (from its IP header on). `None` for a
/// packet too short for its headers; a non-first fragment has no ports and
/// is read with port 0.
pub fn parse(ip: &[u8]) -> Option<Flow> {
    if ip.len() < 20 {
        return None;
    }
    let hl = usize::from(ip[0] & 0x0f) * 4;
    let proto = ip[9];
    let src = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
    let dst = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
    let later_fragment = u16::from_be_bytes([ip[6], ip[7]]) & 0x1fff != 0;
    let l4 = ip.get(hl..)?;
    let mut packet = Packet { proto, src: (src, 0), dst: (dst, 0), flags: 0 };
    if later_fragment {
        return Some(Flow { packet, quoted: None });
    }
    let mut quoted = None;
    match proto {
        6 | 17 | 132 => {
            let p = l4.get(..4)?;
            packet.src.1 = u16::from_be_bytes([p[0], p[1]]);
            packet.dst.1 = u16::from_be_bytes([p[2], p[3]]);
            if proto == 6 {
                // An ICMP error quotes only 8 bytes: no flags then.
                packet.flags = l4.get(13).copied().unwrap_or(0);
            }
        }
        ICMP => {
            let t = *l4.first()?;
            match t {
                // Echo request/reply, timestamp, info: keyed by identifier.
                0 | 8 | 13 | 14 | 15 | 16 => {
                    let id = u16::from_be_bytes([*l4.get(4)?, *l4.get(5)?]);
                    packet.src.1 = id;
                    packet.dst.1 = id;
                }
                // Errors: the quoted header says which flow they are about.
                3 | 4 | 5 | 11 | 12 => {
                    let inner = l4.get(8..)?;
                    let q = parse(inner)?;
                    quoted = Some(q.packet);
                }
                _ => {}
            }
        }
        _ => {}
    }
    Some(Flow { packet, quoted })
}

/// One side's compiled policy and the generation it belongs to.
pub type Side<'a> = Option<&'a CompiledPolicy>;

fn proto_of(p: u8) -> Option<Proto> {
    Proto::from_number(p)
}

/// Does policy allow a new flow `p` from `src_pol`'s endpoint to
/// `dst_pol`'s (either may be remote or the host: `None`)?
pub fn allowed(p: &Packet, src_pol: Side<'_>, dst_pol: Side<'_>) -> Result<(), DropReason> {
    let proto = proto_of(p.proto);
    if let Some(eg) = src_pol.and_then(|c| c.egress.as_ref()) {
        if !eg.allows(p.dst.0, proto, p.dst.1) {
            return Err(DropReason::PolicyEgress);
        }
    }
    if let Some(ing) = dst_pol.and_then(|c| c.ingress.as_ref()) {
        if !ing.allows(p.src.0, proto, p.dst.1) {
            return Err(DropReason::PolicyIngress);
        }
    }
    Ok(())
}

/// The verdict on `flow` at time `now` (ms) under policy `generation`.
pub fn decide(
    ct: &mut Conntrack,
    now: u64,
    generation: u64,
    flow: &Flow,
    src_pol: Side<'_>,
    dst_pol: Side<'_>,
) -> Result<(), DropReason> {
    let isolated = |s: Side<'_>| s.is_some_and(|c| c.ingress.is_some() || c.egress.is_some());
    if !isolated(src_pol) && !isolated(dst_pol) {
        // Nobody to protect: not even tracked.
        return Ok(());
    }
    if let Some(q) = &flow.quoted {
        // An ICMP error about a flow we carry: the quoted packet went from
        // our destination to our source.
        if ct.related(q.proto, q.src, q.dst, now) {
            return Ok(());
        }
    }
    let p = &flow.packet;
    match ct.track(p, now, generation) {
        Seen::Known { stale: false, .. } => Ok(()),
        Seen::Known { forward, stale: true } => {
            // Judge the flow again, in the direction it was opened.
            let verdict = if forward {
                allowed(p, src_pol, dst_pol)
            } else {
                let opener = Packet { proto: p.proto, src: p.dst, dst: p.src, flags: 0 };
                allowed(&opener, dst_pol, src_pol)
            };
            match verdict {
                Ok(()) => {
                    ct.refresh(p, generation);
                    Ok(())
                }
                Err(r) => {
                    ct.forget(p);
                    Err(r)
                }
            }
        }
        Seen::New | Seen::Invalid => {
            allowed(p, src_pol, dst_pol)?;
            if ct.insert(p, now, generation) {
                Ok(())
            } else {
                Err(DropReason::ConntrackFull)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::Cidr;
    use crate::policy::conntrack::{Limits, Timeouts};
    use crate::policy::{EndpointPolicy, Net, PortRange, Rule};
    use etherparse::PacketBuilder;

    fn a() -> Ipv4Addr {
        Ipv4Addr::new(10, 65, 0, 2)
    }

    fn b() -> Ipv4Addr {
        Ipv4Addr::new(10, 65, 0, 3)
    }

    /// b accepts TCP/80 from a only.
    fn b_policy() -> CompiledPolicy {
        CompiledPolicy::compile(&EndpointPolicy {
            ingress: Some(vec![Rule {
                peers: Some(vec![Net { cidr: Cidr { addr: a().into(), len: 32 }, except: vec![] }]),
                ports: Some(vec![PortRange { proto: Proto::Tcp, first: 80, last: 80 }]),
            }]),
            egress: None,
        })
    }

    fn tcp(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16, flags: u8) -> Flow {
        let mut v = Vec::new();
        let b = PacketBuilder::ipv4(src.octets(), dst.octets(), 64).tcp(sport, dport, 1, 100);
        let b = if flags & 0x02 != 0 { b.syn() } else { b };
        let b = if flags & 0x10 != 0 { b.ack(1) } else { b };
        b.write(&mut v, &[]).unwrap();
        parse(&v).unwrap()
    }

    fn ct() -> Conntrack {
        Conntrack::new(Limits::default(), Timeouts::default())
    }

    #[test]
    fn ingress_allows_the_rule_and_its_replies_only() {
        let pol = b_policy();
        let mut ct = ct();
        // a -> b:80 allowed, and b's reply passes on the tracked flow.
        let syn = tcp(a(), 40000, b(), 80, 0x02);
        assert_eq!(decide(&mut ct, 0, 1, &syn, None, Some(&pol)), Ok(()));
        let synack = tcp(b(), 80, a(), 40000, 0x12);
        assert_eq!(decide(&mut ct, 1, 1, &synack, Some(&pol), None), Ok(()));
        // a -> b:81 denied, b's own new connection to a:80 is egress-free.
        let other = tcp(a(), 40001, b(), 81, 0x02);
        assert_eq!(decide(&mut ct, 2, 1, &other, None, Some(&pol)), Err(DropReason::PolicyIngress));
        // Someone else to b:80: denied.
        let c = Ipv4Addr::new(10, 65, 0, 9);
        assert_eq!(
            decide(&mut ct, 2, 1, &tcp(c, 1, b(), 80, 0x02), None, Some(&pol)),
            Err(DropReason::PolicyIngress)
        );
    }

    #[test]
    fn a_new_policy_ends_established_flows_it_denies() {
        let mut ct = ct();
        let open = CompiledPolicy::compile(&EndpointPolicy {
            ingress: Some(vec![Rule::default()]),
            egress: None,
        });
        let syn = tcp(a(), 40000, b(), 80, 0x02);
        assert_eq!(decide(&mut ct, 0, 1, &syn, None, Some(&open)), Ok(()));
        let deny = CompiledPolicy::compile(&EndpointPolicy { ingress: Some(vec![]), egress: None });
        let ack = tcp(a(), 40000, b(), 80, 0x10);
        assert_eq!(decide(&mut ct, 1, 2, &ack, None, Some(&deny)), Err(DropReason::PolicyIngress));
        assert!(ct.is_empty(), "the flow is forgotten");
        // Reply direction of a stale flow is judged in the opening direction.
        assert_eq!(decide(&mut ct, 2, 2, &syn, None, Some(&b_policy())), Ok(()));
        let reply = tcp(b(), 80, a(), 40000, 0x12);
        assert_eq!(decide(&mut ct, 3, 3, &reply, Some(&b_policy()), None), Ok(()));
    }

    #[test]
    fn icmp_errors_about_tracked_flows_pass_and_others_do_not() {
        let mut ct = ct();
        let pol = b_policy();
        let syn = tcp(a(), 40000, b(), 80, 0x02);
        decide(&mut ct, 0, 1, &syn, None, Some(&pol)).unwrap();
        // b's node says "unreachable" to a about a's packet a -> b:80: the
        // error goes from b to a and quotes a -> b.
        let mut quoted = Vec::new();
        PacketBuilder::ipv4(a().octets(), b().octets(), 64)
            .tcp(40000, 80, 1, 100)
            .syn()
            .write(&mut quoted, &[])
            .unwrap();
        let mut icmp = vec![3u8, 1, 0, 0, 0, 0, 0, 0];
        icmp.extend_from_slice(&quoted[..28]);
        let mut pkt = Vec::new();
        PacketBuilder::ipv4(b().octets(), a().octets(), 64)
            .icmpv4_raw(3, 1, [0; 4])
            .write(&mut pkt, &quoted[..28])
            .unwrap();
        let f = parse(&pkt).unwrap();
        assert!(f.quoted.is_some());
        assert_eq!(decide(&mut ct, 1, 1, &f, Some(&pol), None), Ok(()));
        // About a flow nobody opened: denied by b's egress? b has no egress
        // policy; a's side is not local; but it is an error to a from b on
        // no tracked flow while a is isolated for ingress:
        let a_pol = b_policy();
        let mut q2 = Vec::new();
        PacketBuilder::ipv4(a().octets(), b().octets(), 64).udp(5, 6).write(&mut q2, &[]).unwrap();
        let mut pkt = Vec::new();
        PacketBuilder::ipv4(b().octets(), a().octets(), 64)
            .icmpv4_raw(3, 3, [0; 4])
            .write(&mut pkt, &q2[..28])
            .unwrap();
        let f = parse(&pkt).unwrap();
        assert_eq!(decide(&mut ct, 1, 1, &f, None, Some(&a_pol)), Err(DropReason::PolicyIngress));
    }

    #[test]
    fn unisolated_endpoints_are_not_tracked_and_a_full_table_refuses() {
        let mut ct = Conntrack::new(Limits { tcp: 1, other: 1 }, Timeouts::default());
        let syn = tcp(a(), 40000, b(), 80, 0x02);
        assert_eq!(decide(&mut ct, 0, 1, &syn, None, None), Ok(()));
        assert!(ct.is_empty());
        let pol = b_policy();
        assert_eq!(decide(&mut ct, 0, 1, &syn, None, Some(&pol)), Ok(()));
        let syn2 = tcp(a(), 40001, b(), 80, 0x02);
        assert_eq!(decide(&mut ct, 0, 1, &syn2, None, Some(&pol)), Err(DropReason::ConntrackFull));
    }

    #[test]
    fn parse_never_panics_on_truncations() {
        let f = tcp(a(), 1, b(), 2, 0x02);
        assert_eq!(f.packet.flags, 0x02);
        let mut v = Vec::new();
        PacketBuilder::ipv4(a().octets(), b().octets(), 64)
            .tcp(1, 2, 3, 4)
            .syn()
            .write(&mut v, &[])
            .unwrap();
        assert_eq!(parse(&v).unwrap(), f);
        for n in 0..v.len() {
            let _ = parse(&v[..n]);
        }
    }
}

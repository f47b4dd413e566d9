//! Byte-exact checks against `../shared/conformance/vxlan_vectors.json`
//! (frames from public captures), and bad input.

use super::*;
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

fn params(e: &Value) -> EncapParams {
    let s = |k: &str| e[k].as_str().unwrap_or_else(|| panic!("{k}"));
    let n = |k: &str| e[k].as_u64().unwrap_or(0);
    EncapParams {
        src_mac: s("outer_src_mac").parse().unwrap(),
        dst_mac: s("outer_dst_mac").parse().unwrap(),
        src_ip: s("outer_src_ip").parse().unwrap(),
        dst_ip: s("outer_dst_ip").parse().unwrap(),
        src_port: n("udp_src_port") as u16,
        dst_port: n("udp_dst_port") as u16,
        vni: n("vni") as u32,
        ip_id: n("ip_id") as u16,
        ttl: e.get("ip_ttl").or(e.get("hop_limit")).and_then(Value::as_u64).unwrap_or(64) as u8,
        tos: e.get("ip_tos").or(e.get("traffic_class")).and_then(Value::as_u64).unwrap_or(0) as u8,
        df: e["ip_df"].as_bool().unwrap_or(false),
        flow_label: n("flow_label") as u32,
    }
}

/// GSO super-packets were captured before segmentation: their UDP checksum
/// is partial, so they are for decoding and layout only.
fn is_gso(v: &Value) -> bool {
    v["note"].as_str().is_some_and(|n| n.contains("GSO"))
}

#[test]
fn decapsulation_reproduces_every_vector() {
    let mut n = 0;
    for v in vectors() {
        let Some(frame) = v["frame_hex"].as_str() else { continue };
        let frame = hex(frame);
        let id = v["id"].as_str().unwrap_or("?");
        let d = decapsulate(&frame, !is_gso(&v)).unwrap_or_else(|e| panic!("{id}: {e}"));
        assert_eq!(d.vni, v["vxlan"]["vni"].as_u64().unwrap() as u32, "{id}");
        assert_eq!(frame[d.inner.clone()], hex(v["inner_frame_hex"].as_str().unwrap())[..], "{id}");
        assert_eq!(d.src_port, v["outer_udp"]["src_port"].as_u64().unwrap() as u16, "{id}");
        assert_eq!(d.dst_port, v["outer_udp"]["dst_port"].as_u64().unwrap() as u16, "{id}");
        assert_eq!(d.src_ip.to_string(), v["outer_ip"]["src"].as_str().unwrap(), "{id}");
        n += 1;
    }
    assert!(n >= 25, "only {n} vectors decoded");
}

#[test]
fn encapsulation_reproduces_the_on_wire_vectors_byte_for_byte() {
    let mut n = 0;
    for v in vectors() {
        if is_gso(&v) || v["encap_params"].is_null() {
            continue;
        }
        let id = v["id"].as_str().unwrap_or("?");
        let mut out = Vec::new();
        encapsulate(
            &hex(v["inner_frame_hex"].as_str().unwrap()),
            &params(&v["encap_params"]),
            &mut out,
        )
        .unwrap();
        assert_eq!(out, hex(v["frame_hex"].as_str().unwrap()), "{id}");
        n += 1;
    }
    assert!(n >= 21, "only {n} vectors encoded");
}

#[test]
fn ipv6_outer_layout_matches_the_capture() {
    // The GSO captures over IPv6: everything but the (partial) UDP checksum
    // and the lengths of the unsegmented super-packet must match.
    for v in vectors().into_iter().filter(|v| is_gso(v) && v["outer_ip"]["version"] == 6) {
        let frame = hex(v["frame_hex"].as_str().unwrap());
        let mut out = Vec::new();
        let inner = hex(v["inner_frame_hex"].as_str().unwrap());
        encapsulate(&inner, &params(&v["encap_params"]), &mut out).unwrap();
        assert_eq!(out.len(), frame.len());
        assert_eq!(out[..18], frame[..18], "eth + version/class/flow");
        assert_eq!(out[20..60], frame[20..60], "next header, hop limit, addresses, ports, length");
        assert_eq!(out[62..], frame[62..], "VXLAN header and inner frame");
    }
}

#[test]
fn scapy_header_bytes() {
    let v = vectors()
        .into_iter()
        .find(|v| v["id"].as_str().is_some_and(|i| i.starts_with("scapy")))
        .expect("scapy vector");
    let b = hex(v["udp_plus_vxlan_hex"].as_str().unwrap());
    assert_eq!(parse_header(&b[8..]), Ok(42));
    let mut h = [0u8; 8];
    emit_header(42, &mut h).unwrap();
    assert_eq!(h[..], b[8..]);
}

#[test]
fn forged_and_broken_packets_are_refused() {
    let v = &vectors()[0];
    let frame = hex(v["frame_hex"].as_str().unwrap());
    // Every truncation is an error, never a panic.
    for len in 0..frame.len() {
        assert!(decapsulate(&frame[..len], true).is_err(), "len {len}");
    }
    // No I flag.
    let mut f = frame.clone();
    f[42] = 0;
    assert_eq!(decapsulate(&f, true), Err(VxlanError::NoVniFlag));
    // Reserved bits are ignored on receipt.
    let mut f = frame.clone();
    f[42] = 0xff;
    f[43] = 0xff;
    f[49] = 0xff;
    assert!(decapsulate(&f, true).is_ok());
    // A wrong IPv4 header checksum, a wrong non-zero UDP checksum.
    let mut f = frame.clone();
    f[24] ^= 1;
    assert_eq!(decapsulate(&f, true), Err(VxlanError::BadIpChecksum));
    let mut f = frame.clone();
    f[40] = 0x12;
    assert_eq!(decapsulate(&f, true), Err(VxlanError::BadUdpChecksum));
    assert_eq!(emit_header(1 << 24, &mut [0; 8]), Err(VxlanError::BadVni));
}

#[test]
fn source_port_stays_in_the_dynamic_range() {
    for h in [0, 1, 16383, 16384, u32::MAX] {
        assert!((49152..=65535).contains(&source_port(h)));
    }
}

//! CNI versions: which ones the plugin speaks, and the conversion of results
//! between the agent's 1.1.0 model ([`CniResult`]) and every result shape
//! (checklist §5.2), in both directions: results go out in the runtime's
//! version, `prevResult` comes in in whatever version the runtime holds.

use crate::error::{code, CniError};
use crate::proto::{CniResult, Dns, Interface, IpConfig, Route};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::net::IpAddr;

/// A CNI specification version this plugin supports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum CniVersion {
    V0_1_0,
    V0_2_0,
    V0_3_0,
    V0_3_1,
    V0_4_0,
    V1_0_0,
    V1_1_0,
}

/// Every supported version, oldest first: what VERSION reports (VER-03).
pub const SUPPORTED: [CniVersion; 7] = [
    CniVersion::V0_1_0,
    CniVersion::V0_2_0,
    CniVersion::V0_3_0,
    CniVersion::V0_3_1,
    CniVersion::V0_4_0,
    CniVersion::V1_0_0,
    CniVersion::V1_1_0,
];

/// The newest version: the agent's model, and VERSION's fallback answer.
pub const CURRENT: CniVersion = CniVersion::V1_1_0;

impl CniVersion {
    /// Exact match against the supported list (as libcni's reconciler does:
    /// "1.1" or "1.0.1" are not supported versions).
    pub fn parse(s: &str) -> Option<CniVersion> {
        SUPPORTED.iter().copied().find(|v| v.as_str() == s)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            CniVersion::V0_1_0 => "0.1.0",
            CniVersion::V0_2_0 => "0.2.0",
            CniVersion::V0_3_0 => "0.3.0",
            CniVersion::V0_3_1 => "0.3.1",
            CniVersion::V0_4_0 => "0.4.0",
            CniVersion::V1_0_0 => "1.0.0",
            CniVersion::V1_1_0 => "1.1.0",
        }
    }
}

/// The supported versions as strings.
pub fn supported_strings() -> Vec<&'static str> {
    SUPPORTED.iter().map(|v| v.as_str()).collect()
}

/// [VER-06] code 1 for a `cniVersion` this plugin does not support.
pub fn incompatible(config_version: &str) -> CniError {
    CniError::with_details(
        code::INCOMPATIBLE_VERSION,
        "incompatible CNI versions",
        format!("config is {config_version:?}, plugin supports {:?}", supported_strings()),
    )
}

/// [VER-01]/[VRS-01] The VERSION result.
pub fn version_result(cni_version: CniVersion) -> String {
    #[derive(Serialize)]
    struct Out {
        #[serde(rename = "cniVersion")]
        cni_version: &'static str,
        #[serde(rename = "supportedVersions")]
        supported_versions: Vec<&'static str>,
    }
    let out = Out { cni_version: cni_version.as_str(), supported_versions: supported_strings() };
    serde_json::to_string_pretty(&out).unwrap_or_default()
}

// ---------------------------------------------------------------------------
// Addresses

/// Parses `IP/prefix` (both parts required; the host part may be non-zero, as
/// Go's `net.ParseCIDR` allows).
pub fn parse_cidr(s: &str) -> Option<(IpAddr, u8)> {
    let (ip, prefix) = s.split_once('/')?;
    let ip: IpAddr = ip.parse().ok()?;
    if prefix.is_empty() || !prefix.bytes().all(|b| b.is_ascii_digit()) || prefix.len() > 3 {
        return None;
    }
    let prefix: u8 = prefix.parse().ok()?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    (prefix <= max).then_some((ip, prefix))
}

fn is_v4_cidr(s: &str) -> bool {
    // Only called on validated results.
    matches!(parse_cidr(s), Some((IpAddr::V4(_), _)))
}

/// Checks that a result is well formed: addresses and destinations are
/// CIDRs, gateways are IPs, and every `interface` index points inside
/// `interfaces` (RES-07). Returns the first problem found.
pub fn validate_result(r: &CniResult) -> Result<(), String> {
    for (i, ip) in r.ips.iter().enumerate() {
        if parse_cidr(&ip.address).is_none() {
            return Err(format!("ips[{i}].address {:?} is not an IP/prefix", ip.address));
        }
        if let Some(gw) = &ip.gateway {
            if gw.parse::<IpAddr>().is_err() {
                return Err(format!("ips[{i}].gateway {gw:?} is not an IP address"));
            }
        }
        if let Some(idx) = ip.interface {
            if idx >= r.interfaces.len() {
                return Err(format!(
                    "ips[{i}].interface {idx} is out of range ({} interfaces)",
                    r.interfaces.len()
                ));
            }
        }
    }
    for (i, rt) in r.routes.iter().enumerate() {
        if parse_cidr(&rt.dst).is_none() {
            return Err(format!("routes[{i}].dst {:?} is not an IP/prefix", rt.dst));
        }
        if let Some(gw) = &rt.gw {
            if gw.parse::<IpAddr>().is_err() {
                return Err(format!("routes[{i}].gw {gw:?} is not an IP address"));
            }
        }
    }
    for (i, intf) in r.interfaces.iter().enumerate() {
        if intf.name.is_empty() {
            return Err(format!("interfaces[{i}].name is empty"));
        }
    }
    Ok(())
}

fn dns_is_empty(d: &Dns) -> bool {
    d.nameservers.is_empty() && d.domain.is_none() && d.search.is_empty() && d.options.is_empty()
}

// ---------------------------------------------------------------------------
// Encoding: model -> the runtime's version

#[derive(Serialize)]
struct ResultOut<'a> {
    #[serde(rename = "cniVersion")]
    cni_version: &'static str,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    interfaces: Vec<Interface>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    ips: Vec<IpOut<'a>>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    routes: Vec<Route>,
    #[serde(skip_serializing_if = "dns_is_empty")]
    dns: &'a Dns,
}

#[derive(Serialize)]
struct IpOut<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    version: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    interface: Option<usize>,
    address: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    gateway: Option<&'a str>,
}

#[derive(Serialize)]
struct Result020Out<'a> {
    #[serde(rename = "cniVersion")]
    cni_version: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    ip4: Option<Ip020<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ip6: Option<Ip020<'a>>,
    #[serde(skip_serializing_if = "dns_is_empty")]
    dns: &'a Dns,
}

#[derive(Serialize)]
struct Ip020<'a> {
    ip: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    gateway: Option<&'a str>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    routes: Vec<Route020<'a>>,
}

#[derive(Serialize)]
struct Route020<'a> {
    dst: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    gw: Option<&'a str>,
}

/// Encodes a (validated) result for `v` as a JSON value.
///
/// - 1.1.0: everything.
/// - 1.0.0: no interface `mtu`/`socketPath`/`pciID`, no route
///   `mtu`/`advmss`/`priority`/`table`/`scope`.
/// - 0.3.0, 0.3.1, 0.4.0: as 1.0.0, plus `ips[].version` ("4"/"6").
/// - 0.1.0, 0.2.0: `ip4`/`ip6` with the first address of each family, routes
///   under the family of their destination, `dns` (libcni's conversion); an
///   error (code 1) if the result has no address at all.
pub fn encode_result(r: &CniResult, v: CniVersion) -> Result<Value, CniError> {
    let out = match v {
        CniVersion::V0_1_0 | CniVersion::V0_2_0 => serde_json::to_value(encode_020(r, v)?),
        _ => serde_json::to_value(encode_modern(r, v)),
    };
    out.map_err(|e| CniError::new(code::INTERNAL, format!("encoding the result: {e}")))
}

/// [`encode_result`], as the text printed on stdout.
pub fn encode_result_string(r: &CniResult, v: CniVersion) -> Result<String, CniError> {
    let value = encode_result(r, v)?;
    serde_json::to_string_pretty(&value)
        .map_err(|e| CniError::new(code::INTERNAL, format!("encoding the result: {e}")))
}

fn encode_modern(r: &CniResult, v: CniVersion) -> ResultOut<'_> {
    let full = v >= CniVersion::V1_1_0;
    let with_version = v < CniVersion::V1_0_0;
    let interfaces = r
        .interfaces
        .iter()
        .map(|i| {
            if full {
                i.clone()
            } else {
                Interface {
                    name: i.name.clone(),
                    mac: i.mac.clone(),
                    sandbox: i.sandbox.clone(),
                    ..Default::default()
                }
            }
        })
        .collect();
    let ips = r
        .ips
        .iter()
        .map(|ip| IpOut {
            version: with_version.then(|| if is_v4_cidr(&ip.address) { "4" } else { "6" }),
            interface: ip.interface,
            address: &ip.address,
            gateway: ip.gateway.as_deref(),
        })
        .collect();
    let routes = r
        .routes
        .iter()
        .map(|rt| {
            if full {
                rt.clone()
            } else {
                Route { dst: rt.dst.clone(), gw: rt.gw.clone(), ..Default::default() }
            }
        })
        .collect();
    ResultOut { cni_version: v.as_str(), interfaces, ips, routes, dns: &r.dns }
}

fn encode_020(r: &CniResult, v: CniVersion) -> Result<Result020Out<'_>, CniError> {
    let first = |want_v4: bool| {
        r.ips.iter().find(|ip| is_v4_cidr(&ip.address) == want_v4).map(|ip| Ip020 {
            ip: &ip.address,
            gateway: ip.gateway.as_deref(),
            routes: r
                .routes
                .iter()
                .filter(|rt| is_v4_cidr(&rt.dst) == want_v4)
                .map(|rt| Route020 { dst: &rt.dst, gw: rt.gw.as_deref() })
                .collect(),
        })
    };
    let (ip4, ip6) = (first(true), first(false));
    if ip4.is_none() && ip6.is_none() {
        return Err(CniError::with_details(
            code::INCOMPATIBLE_VERSION,
            format!("cannot express the result in cniVersion {}", v.as_str()),
            "results before 0.3.0 need at least one IP address",
        ));
    }
    Ok(Result020Out { cni_version: v.as_str(), ip4, ip6, dns: &r.dns })
}

// ---------------------------------------------------------------------------
// Decoding: any version -> model

#[derive(Deserialize)]
struct Result020In {
    #[serde(default)]
    ip4: Option<Ip020In>,
    #[serde(default)]
    ip6: Option<Ip020In>,
    #[serde(default)]
    dns: Option<Dns>,
}

#[derive(Deserialize)]
struct Ip020In {
    ip: String,
    #[serde(default)]
    gateway: Option<String>,
    #[serde(default)]
    routes: Option<Vec<Route020In>>,
}

#[derive(Deserialize)]
struct Route020In {
    dst: String,
    #[serde(default)]
    gw: Option<String>,
}

/// Decodes a result (a `prevResult`) in any supported shape into the model,
/// and validates it. The shape is told by its keys: `ip4`/`ip6` (and no
/// `ips`/`interfaces`) is the 0.1.0/0.2.0 shape; anything else is the
/// 0.3.0+ shape, where `ips[].version` (0.3.x/0.4.0) is accepted and dropped,
/// and the 1.1.0-only fields are kept. Fails with code 6.
pub fn decode_result(raw: &Value) -> Result<CniResult, CniError> {
    let bad = |e: String| CniError::with_details(code::DECODING_FAILURE, "invalid prevResult", e);
    let obj = raw.as_object().ok_or_else(|| bad("prevResult is not a JSON object".into()))?;
    // Go's encoder writes absent lists as `null`; treat those as absent.
    let mut cleaned = obj.clone();
    cleaned.retain(|_, v| !v.is_null());
    let legacy = (cleaned.contains_key("ip4") || cleaned.contains_key("ip6"))
        && !cleaned.contains_key("ips")
        && !cleaned.contains_key("interfaces");
    let result = if legacy {
        let old: Result020In =
            serde_json::from_value(Value::Object(cleaned)).map_err(|e| bad(e.to_string()))?;
        let mut r = CniResult { dns: old.dns.unwrap_or_default(), ..Default::default() };
        for ip in [old.ip4, old.ip6].into_iter().flatten() {
            r.ips.push(IpConfig { interface: None, address: ip.ip, gateway: ip.gateway });
            for rt in ip.routes.unwrap_or_default() {
                r.routes.push(Route { dst: rt.dst, gw: rt.gw, ..Default::default() });
            }
        }
        r
    } else {
        serde_json::from_value::<CniResult>(Value::Object(cleaned))
            .map_err(|e| bad(e.to_string()))?
    };
    validate_result(&result).map_err(bad)?;
    Ok(result)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn vectors() -> Vec<Value> {
        let all: Value =
            serde_json::from_str(include_str!("../tests/data/cni_result_vectors.json")).unwrap();
        all["vectors"].as_array().unwrap().clone()
    }

    fn vector(from: &str, test: &str) -> Value {
        vectors()
            .into_iter()
            .find(|v| v["from"] == from && v["test"] == test)
            .unwrap_or_else(|| panic!("no vector {from} / {test}"))["json"]
            .clone()
    }

    const T100: &str = "pkg/types/100/types_test.go";
    const T040: &str = "pkg/types/040/types_test.go";

    /// The model of the libcni test result (from the 1.1.0 golden vector).
    fn golden_model() -> CniResult {
        decode_result(&vector(T100, "correctly encodes a 1.1.0 Result")).unwrap()
    }

    #[test]
    fn res_08_encode_1_1_0_golden() {
        // [RES-02][RES-08] model -> 1.1.0 reproduces libcni's 1.1.0 result,
        // including interface mtu/pciID/socketPath.
        let want = vector(T100, "correctly encodes a 1.1.0 Result");
        assert_eq!(encode_result(&golden_model(), CniVersion::V1_1_0).unwrap(), want);
    }

    #[test]
    fn res_08_encode_0_4_0_golden() {
        // [RES-08] "version" is added, 1.1.0-only fields are dropped.
        let want = vector(T100, "correctly encodes a 0.4.0 Result");
        assert_eq!(encode_result(&golden_model(), CniVersion::V0_4_0).unwrap(), want);
    }

    #[test]
    fn res_08_encode_0_3_1_golden() {
        let want = vector(T040, "correctly encodes a 0.3.x Result");
        assert_eq!(encode_result(&golden_model(), CniVersion::V0_3_1).unwrap(), want);
        // 0.3.0 has the same shape.
        let mut want_030 = want.clone();
        want_030["cniVersion"] = json!("0.3.0");
        assert_eq!(encode_result(&golden_model(), CniVersion::V0_3_0).unwrap(), want_030);
    }

    #[test]
    fn res_08_encode_0_1_0_golden() {
        // Both libcni test files hold the same 0.1.0 vector.
        for file in [T100, T040] {
            let want = vector(file, "correctly encodes a 0.1.0 Result");
            assert_eq!(encode_result(&golden_model(), CniVersion::V0_1_0).unwrap(), want);
        }
        // 0.2.0 has the same shape.
        let mut want = vector(T100, "correctly encodes a 0.1.0 Result");
        want["cniVersion"] = json!("0.2.0");
        assert_eq!(encode_result(&golden_model(), CniVersion::V0_2_0).unwrap(), want);
    }

    #[test]
    fn res_07_encode_1_0_0() {
        // No golden 1.0.0 vector: it is the 1.1.0 one without the 1.1.0-only
        // fields (checklist §5.2 table) and without ips[].version.
        let mut want = vector(T100, "correctly encodes a 1.1.0 Result");
        want["cniVersion"] = json!("1.0.0");
        let intf = want["interfaces"][0].as_object_mut().unwrap();
        for k in ["mtu", "pciID", "socketPath"] {
            intf.remove(k);
        }
        let got = encode_result(&golden_model(), CniVersion::V1_0_0).unwrap();
        assert_eq!(got, want);
        assert!(got["ips"].as_array().unwrap().iter().all(|ip| ip.get("version").is_none()));
    }

    #[test]
    fn res_04_route_fields_only_in_1_1_0() {
        let mut m = golden_model();
        m.routes[0].mtu = Some(1400);
        m.routes[0].advmss = Some(1340);
        m.routes[0].priority = Some(100);
        m.routes[0].table = Some(50);
        m.routes[0].scope = Some(253);
        let r = encode_result(&m, CniVersion::V1_1_0).unwrap();
        assert_eq!(
            r["routes"][0],
            json!({"dst": "15.5.6.0/24", "gw": "15.5.6.8", "mtu": 1400, "advmss": 1340,
                   "priority": 100, "table": 50, "scope": 253})
        );
        for v in [CniVersion::V1_0_0, CniVersion::V0_4_0, CniVersion::V0_3_1] {
            let r = encode_result(&m, v).unwrap();
            assert_eq!(r["routes"][0], json!({"dst": "15.5.6.0/24", "gw": "15.5.6.8"}), "{v:?}");
        }
    }

    #[test]
    fn res_07_interface_index_zero_and_missing() {
        // [RES-07] index 0 is written as 0, a missing index is left out.
        let mut m = CniResult {
            interfaces: vec![Interface { name: "eth0".into(), ..Default::default() }],
            ips: vec![IpConfig {
                interface: Some(0),
                address: "10.1.2.3/24".into(),
                gateway: None,
            }],
            ..Default::default()
        };
        let r = encode_result(&m, CniVersion::V1_1_0).unwrap();
        assert_eq!(
            r["ips"][0],
            vector(T100, "correctly marshals and unmarshals interface index 0")
        );
        let r = encode_result(&m, CniVersion::V0_4_0).unwrap();
        assert_eq!(
            r["ips"][0],
            vector(T040, "correctly marshals and unmarshals interface index 0")
        );
        m.ips[0].interface = None;
        let r = encode_result(&m, CniVersion::V1_0_0).unwrap();
        assert_eq!(r["ips"][0], vector(T100, "correctly marshals a missing interface index"));
        let r = encode_result(&m, CniVersion::V0_3_1).unwrap();
        assert_eq!(r["ips"][0], vector(T040, "correctly marshals a missing interface index"));
        // And they decode back to the same model.
        let back = decode_result(&json!({"interfaces": [{"name": "eth0"}],
            "ips": [vector(T040, "correctly marshals and unmarshals interface index 0")]}))
        .unwrap();
        assert_eq!(back.ips[0].interface, Some(0));
    }

    #[test]
    fn decode_every_golden_version_to_the_model() {
        // prevResult may arrive in any version: each golden encoding decodes
        // to the model, up to what that version can carry.
        let full = golden_model();
        let mut no_11 = full.clone();
        for i in &mut no_11.interfaces {
            i.mtu = None;
            i.pci_id.clear();
            i.socket_path.clear();
        }
        assert_eq!(
            decode_result(&vector(T100, "correctly encodes a 0.4.0 Result")).unwrap(),
            no_11
        );
        assert_eq!(
            decode_result(&vector(T040, "correctly encodes a 0.3.x Result")).unwrap(),
            no_11
        );
        let old = decode_result(&vector(T100, "correctly encodes a 0.1.0 Result")).unwrap();
        assert_eq!(old.interfaces, vec![]);
        assert_eq!(old.ips.len(), 2);
        assert_eq!(old.ips[0].interface, None);
        assert_eq!(old.routes, full.routes);
        assert_eq!(old.dns, full.dns);
        // Every version round-trips through the model.
        for v in SUPPORTED {
            let enc = encode_result(&full, v).unwrap();
            let dec = decode_result(&enc).unwrap();
            assert_eq!(encode_result(&dec, v).unwrap(), enc, "{v:?}");
        }
    }

    #[test]
    fn decode_spec_prev_results() {
        // The SPEC.md chained example: interface index 2 into 3 interfaces.
        let v = vector("SPEC.md", "SPEC.md json block #7");
        let r = decode_result(&v).unwrap();
        assert_eq!(r.interfaces.len(), 3);
        assert_eq!(r.ips[0].interface, Some(2));
        assert_eq!(r.routes[0].dst, "0.0.0.0/0");
        assert_eq!(r.routes[0].gw, None);
        // And encodes back to the same document (plus cniVersion).
        let mut want = v.clone();
        want["cniVersion"] = json!("1.1.0");
        assert_eq!(encode_result(&r, CniVersion::V1_1_0).unwrap(), want);
        // The delegated-plugin (abbreviated) result: no interfaces.
        let r = decode_result(&vector("SPEC.md", "SPEC.md json block #6")).unwrap();
        assert!(r.interfaces.is_empty());
        assert_eq!(r.ips[0].interface, None);
    }

    #[test]
    fn decode_rejects_garbage() {
        for bad in [
            json!("x"),
            json!([1]),
            json!({"ips": [{"address": "10.0.0.1"}]}),
            json!({"ips": [{"address": "10.0.0.1/33"}]}),
            json!({"ips": [{"address": "zz/24"}]}),
            json!({"ips": [{"address": "10.0.0.1/24", "gateway": "x"}]}),
            json!({"ips": [{"address": "10.0.0.1/24", "interface": 0}]}),
            json!({"ips": [{"address": "10.0.0.1/24", "interface": -1}]}),
            json!({"routes": [{"dst": "default"}]}),
            json!({"interfaces": [{"mac": "x"}]}),
            json!({"interfaces": 5}),
            json!({"ip4": {"ip": "1.2.3.4"}}),
            json!({"ip4": {"gateway": "1.2.3.4"}}),
        ] {
            let e = decode_result(&bad).unwrap_err();
            assert_eq!(e.code, 6, "{bad}");
        }
        // Go's nulls and unknown keys are fine.
        let r = decode_result(&json!({"cniVersion": "0.4.0", "interfaces": null, "ips": null,
            "routes": null, "dns": {}, "someday": 1}))
        .unwrap();
        assert_eq!(r, CniResult::default());
    }

    #[test]
    fn encode_020_needs_an_address() {
        let e = encode_result(&CniResult::default(), CniVersion::V0_2_0).unwrap_err();
        assert_eq!(e.code, 1);
        // An empty result is fine from 0.3.0 on (and prints just cniVersion).
        let r = encode_result(&CniResult::default(), CniVersion::V1_1_0).unwrap();
        assert_eq!(r, json!({"cniVersion": "1.1.0"}));
    }

    #[test]
    fn cidr_parsing() {
        assert!(parse_cidr("10.0.0.1/32").is_some());
        assert!(parse_cidr("::/0").is_some());
        assert!(parse_cidr("fd00::1/128").is_some());
        for bad in ["10.0.0.1", "10.0.0.1/", "10.0.0.1/+1", "::/129", "/8", "1.2.3.4/0008"] {
            assert!(parse_cidr(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn vrs_01_version_result_matches_spec_example() {
        // [VER-03][VRS-01] SPEC.md's 1.1.0 VERSION example lists exactly our versions.
        let got: Value = serde_json::from_str(&version_result(CniVersion::V1_1_0)).unwrap();
        assert_eq!(got, vector("SPEC.md", "SPEC.md json block #4"));
    }

    #[test]
    fn ver_06_parse() {
        assert_eq!(CniVersion::parse("0.4.0"), Some(CniVersion::V0_4_0));
        for bad in ["", "1.1", "1.0.1", "9.9.9", "v1.0.0", " 1.0.0"] {
            assert_eq!(CniVersion::parse(bad), None, "{bad}");
        }
        let e = incompatible("9.9.9");
        assert_eq!(e.code, 1);
        assert!(e.details.contains("\"9.9.9\""));
    }
}

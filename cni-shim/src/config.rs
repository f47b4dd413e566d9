//! The plugin configuration on stdin: parsing and validation.
//!
//! Codes: stdin that is not a JSON object, or a standard key of the wrong
//! JSON type, is a decoding failure (6); a value that fails validation is an
//! invalid network config (7); a `cniVersion` this plugin does not speak is
//! code 1. Unknown keys are accepted and passed to the agent untouched.

use crate::env::valid_name;
use crate::error::{code, CniError};
use crate::proto::{Attachment, Dns};
use crate::version::{self, CniVersion};
use serde_json::{Map, Value};
use std::path::PathBuf;
use std::time::Duration;

/// Where the agent listens when the config does not say.
pub const DEFAULT_AGENT_SOCKET: &str = "/run/ocelot/cni.sock";
/// How long to wait for the agent by default (ADD, DEL, CHECK, GC).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long STATUS waits by default: it only asks whether the agent can
/// serve ADD, and a runtime polls it.
pub const DEFAULT_STATUS_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest accepted `timeoutSeconds`.
pub const MAX_TIMEOUT_SECONDS: f64 = 3600.0;
/// `sun_path` is 108 bytes including the terminating NUL.
const MAX_SOCKET_PATH: usize = 107;

/// The GC key (HEAD and libcni) and its old name (tag spec-v1.1.0, GC-08).
pub const VALID_ATTACHMENTS_KEY: &str = "cni.dev/valid-attachments";
pub const OLD_ATTACHMENTS_KEY: &str = "cni.dev/attachments";

/// A parsed, validated plugin configuration.
#[derive(Clone, Debug, PartialEq)]
pub struct NetConf {
    /// The whole object as received (sent to the agent as is).
    pub raw: Value,
    pub cni_version: CniVersion,
    /// `name`: the network name.
    pub name: String,
    /// `type`: the plugin binary name.
    pub plugin_type: String,
    /// `agentSocket`.
    pub agent_socket: PathBuf,
    /// `mtu`, if set (the agent applies it).
    pub mtu: Option<u32>,
    /// `timeoutSeconds`, if set.
    pub timeout: Option<Duration>,
    /// `dns` (CFG-07): used for the result when the agent gives no DNS.
    pub dns: Option<Dns>,
    /// `prevResult`, raw (absent or `null` -> `None`).
    pub prev_result: Option<Value>,
    /// `cni.dev/valid-attachments` ∪ `cni.dev/attachments`, if either key is
    /// there (`null` counts as an empty list, which is what Go sends for a
    /// nil slice).
    pub valid_attachments: Option<Vec<Attachment>>,
}

impl NetConf {
    /// The time to wait for the agent for this command.
    pub fn timeout_for(&self, status: bool) -> Duration {
        match self.timeout {
            Some(t) => t,
            None if status => DEFAULT_STATUS_TIMEOUT,
            None => DEFAULT_TIMEOUT,
        }
    }
}

/// Best effort: the `cniVersion` of `stdin` if it is one we support, for
/// labelling error results before (or without) full parsing.
pub fn peek_version(stdin: &[u8]) -> Option<CniVersion> {
    let v: Value = serde_json::from_slice(stdin).ok()?;
    CniVersion::parse(v.get("cniVersion")?.as_str()?)
}

fn decode_err(msg: impl Into<String>) -> CniError {
    CniError::new(code::DECODING_FAILURE, msg)
}

fn invalid(msg: impl Into<String>, details: impl Into<String>) -> CniError {
    CniError::with_details(code::INVALID_CONFIG, msg, details)
}

/// A string key: `Ok(None)` if absent or null, code 6 if not a string.
fn opt_str<'a>(obj: &'a Map<String, Value>, key: &str) -> Result<Option<&'a str>, CniError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(decode_err(format!("{key} must be a string, not {other}"))),
    }
}

/// Parses the plugin configuration.
pub fn parse(stdin: &[u8]) -> Result<NetConf, CniError> {
    if stdin.iter().all(u8::is_ascii_whitespace) {
        return Err(decode_err("error unmarshalling network config: stdin is empty"));
    }
    let raw: Value = serde_json::from_slice(stdin)
        .map_err(|e| decode_err(format!("error unmarshalling network config: {e}")))?;
    let obj = raw
        .as_object()
        .ok_or_else(|| decode_err("error unmarshalling network config: not a JSON object"))?;

    // [CFG-02][ENV-13] name
    let name = match opt_str(obj, "name")? {
        None | Some("") => return Err(invalid("missing network name", "")),
        Some(n) if !valid_name(n) => {
            return Err(invalid("invalid characters found in network name", n))
        }
        Some(n) => n.to_string(),
    };

    // [VER-06] cniVersion: required (we do not guess 0.1.0, see README).
    let cni_version = match opt_str(obj, "cniVersion")? {
        None | Some("") => {
            return Err(invalid(
                "missing cniVersion",
                format!("plugin supports {:?}", version::supported_strings()),
            ))
        }
        Some(v) => CniVersion::parse(v).ok_or_else(|| version::incompatible(v))?,
    };

    // [CFG-04] type
    let plugin_type = match opt_str(obj, "type")? {
        None | Some("") => return Err(invalid("missing plugin type", "")),
        Some(t) if t.contains('/') || t.contains('\\') => {
            return Err(invalid("invalid plugin type: it must not contain / or \\", t))
        }
        Some(t) => t.to_string(),
    };

    let agent_socket = match obj.get("agentSocket") {
        None | Some(Value::Null) => PathBuf::from(DEFAULT_AGENT_SOCKET),
        Some(Value::String(s)) if s.is_empty() => {
            return Err(invalid("agentSocket is empty", ""));
        }
        Some(Value::String(s)) if s.len() > MAX_SOCKET_PATH => {
            return Err(invalid(
                format!("agentSocket is longer than {MAX_SOCKET_PATH} bytes"),
                s.as_str(),
            ));
        }
        Some(Value::String(s)) if s.contains('\0') => {
            return Err(invalid("agentSocket contains a NUL byte", ""));
        }
        Some(Value::String(s)) => PathBuf::from(s),
        Some(other) => return Err(invalid("agentSocket must be a string", other.to_string())),
    };

    let mtu = match obj.get("mtu") {
        None | Some(Value::Null) => None,
        Some(v) => match v.as_u64() {
            Some(m) if (68..=65535).contains(&m) => Some(m as u32),
            _ => return Err(invalid("mtu must be an integer between 68 and 65535", v.to_string())),
        },
    };

    let timeout = match obj.get("timeoutSeconds") {
        None | Some(Value::Null) => None,
        Some(v) => match v.as_f64() {
            Some(t) if t > 0.0 && t <= MAX_TIMEOUT_SECONDS => Some(Duration::from_secs_f64(t)),
            _ => {
                return Err(invalid(
                    format!("timeoutSeconds must be a number in (0, {MAX_TIMEOUT_SECONDS}]"),
                    v.to_string(),
                ))
            }
        },
    };

    // [CFG-07] the well-known `dns` key keeps its standard meaning.
    let dns = match obj.get("dns") {
        None | Some(Value::Null) => None,
        Some(v) if !v.is_object() => return Err(decode_err("dns must be an object")),
        Some(v) => Some(
            serde_json::from_value::<Dns>(v.clone())
                .map_err(|e| decode_err(format!("dns: {e}")))?,
        ),
    };

    let prev_result = match obj.get("prevResult") {
        None | Some(Value::Null) => None,
        Some(v) => Some(v.clone()),
    };

    // [GC-01][GC-08] both names, merged, duplicates dropped.
    let mut valid_attachments: Option<Vec<Attachment>> = None;
    for key in [VALID_ATTACHMENTS_KEY, OLD_ATTACHMENTS_KEY] {
        let list: Vec<Attachment> = match obj.get(key) {
            None => continue,
            Some(Value::Null) => Vec::new(),
            Some(v) => {
                serde_json::from_value(v.clone()).map_err(|e| decode_err(format!("{key}: {e}")))?
            }
        };
        let acc = valid_attachments.get_or_insert_with(Vec::new);
        for a in list {
            if !acc.contains(&a) {
                acc.push(a);
            }
        }
    }

    Ok(NetConf {
        raw,
        cni_version,
        name,
        plugin_type,
        agent_socket,
        mtu,
        timeout,
        dns,
        prev_result,
        valid_attachments,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn p(v: Value) -> Result<NetConf, CniError> {
        parse(v.to_string().as_bytes())
    }

    fn base() -> Value {
        json!({"cniVersion": "1.1.0", "name": "k8s-pod-network", "type": "ocelot"})
    }

    fn with(k: &str, v: Value) -> Value {
        let mut b = base();
        b[k] = v;
        b
    }

    #[test]
    fn minimal_config_defaults() {
        let c = p(base()).unwrap();
        assert_eq!(c.cni_version, CniVersion::V1_1_0);
        assert_eq!(c.name, "k8s-pod-network");
        assert_eq!(c.plugin_type, "ocelot");
        assert_eq!(c.agent_socket, PathBuf::from(DEFAULT_AGENT_SOCKET));
        assert_eq!(c.mtu, None);
        assert_eq!(c.timeout_for(false), DEFAULT_TIMEOUT);
        assert_eq!(c.timeout_for(true), DEFAULT_STATUS_TIMEOUT);
        assert_eq!(c.prev_result, None);
        assert_eq!(c.valid_attachments, None);
    }

    #[test]
    fn plugin_fields() {
        let mut v = base();
        v["agentSocket"] = json!("/tmp/a.sock");
        v["mtu"] = json!(1450);
        v["timeoutSeconds"] = json!(2.5);
        v["somethingElse"] = json!({"x": 1}); // [CFG-05] unknown keys are fine
        let c = p(v.clone()).unwrap();
        assert_eq!(c.agent_socket, PathBuf::from("/tmp/a.sock"));
        assert_eq!(c.mtu, Some(1450));
        assert_eq!(c.timeout_for(true), Duration::from_millis(2500));
        assert_eq!(c.raw, v);
    }

    #[test]
    fn bad_plugin_fields_are_code_7() {
        for (k, v) in [
            ("agentSocket", json!("")),
            ("agentSocket", json!(5)),
            ("agentSocket", json!("/".repeat(200))),
            ("mtu", json!(0)),
            ("mtu", json!(67)),
            ("mtu", json!(70000)),
            ("mtu", json!("1500")),
            ("mtu", json!(1500.5)),
            ("mtu", json!(-1)),
            ("timeoutSeconds", json!(0)),
            ("timeoutSeconds", json!(-3)),
            ("timeoutSeconds", json!("30")),
            ("timeoutSeconds", json!(1e9)),
        ] {
            assert_eq!(p(with(k, v.clone())).unwrap_err().code, 7, "{k}={v}");
        }
    }

    #[test]
    fn cfg_02_name() {
        // [CFG-02][ENV-13]
        let mut v = base();
        v.as_object_mut().unwrap().remove("name");
        let e = p(v).unwrap_err();
        assert_eq!((e.code, e.msg.as_str()), (7, "missing network name"));
        for bad in ["", "-net", "my net", "a/b", "../x", "ünï", ".hidden", "a\\b"] {
            assert_eq!(p(with("name", json!(bad))).unwrap_err().code, 7, "{bad}");
        }
        for good in ["a", "k8s-pod-network", "net_1.2", "0net"] {
            assert!(p(with("name", json!(good))).is_ok(), "{good}");
        }
        assert_eq!(p(with("name", json!(5))).unwrap_err().code, 6);
    }

    #[test]
    fn cfg_04_type() {
        let mut v = base();
        v.as_object_mut().unwrap().remove("type");
        assert_eq!(p(v).unwrap_err().code, 7);
        for bad in ["", "../ocelot", "a/b", "a\\b"] {
            assert_eq!(p(with("type", json!(bad))).unwrap_err().code, 7, "{bad}");
        }
        assert_eq!(p(with("type", json!(["x"]))).unwrap_err().code, 6);
    }

    #[test]
    fn ver_06_cni_version() {
        for v in version::SUPPORTED {
            assert_eq!(p(with("cniVersion", json!(v.as_str()))).unwrap().cni_version, v);
        }
        for bad in ["9.9.9", "1.1", "1.2.0", "0.0.1"] {
            let e = p(with("cniVersion", json!(bad))).unwrap_err();
            assert_eq!((e.code, e.msg.as_str()), (1, "incompatible CNI versions"), "{bad}");
        }
        assert_eq!(p(with("cniVersion", json!(1.0))).unwrap_err().code, 6);
        let mut v = base();
        v.as_object_mut().unwrap().remove("cniVersion");
        assert_eq!(p(v).unwrap_err().code, 7);
        assert_eq!(p(with("cniVersion", json!(""))).unwrap_err().code, 7);
    }

    #[test]
    fn env_13_not_json_is_code_6() {
        for bad in ["", "   ", "{", "not json", "[1,2]", "\"str\"", "null", "{\"name\": \"a\",}"] {
            assert_eq!(parse(bad.as_bytes()).unwrap_err().code, 6, "{bad:?}");
        }
        assert_eq!(parse(&[0xff, 0xfe, 0x00]).unwrap_err().code, 6);
    }

    #[test]
    fn gc_08_attachments_under_both_names() {
        let a = json!({"containerID": "a", "ifname": "eth0"});
        let b = json!({"containerID": "b", "ifname": "eth0"});
        let mut v = with(VALID_ATTACHMENTS_KEY, json!([a.clone()]));
        v[OLD_ATTACHMENTS_KEY] = json!([a.clone(), b.clone()]);
        let c = p(v).unwrap();
        let got: Vec<&str> =
            c.valid_attachments.as_ref().unwrap().iter().map(|x| x.container_id.as_str()).collect();
        assert_eq!(got, ["a", "b"]);
        // Only the old name.
        let c = p(with(OLD_ATTACHMENTS_KEY, json!([b]))).unwrap();
        assert_eq!(c.valid_attachments.unwrap().len(), 1);
        // null = empty list (Go's nil slice).
        let c = p(with(VALID_ATTACHMENTS_KEY, Value::Null)).unwrap();
        assert_eq!(c.valid_attachments, Some(vec![]));
        // Malformed.
        assert_eq!(p(with(VALID_ATTACHMENTS_KEY, json!([{"x": 1}]))).unwrap_err().code, 6);
        assert_eq!(p(with(VALID_ATTACHMENTS_KEY, json!("a"))).unwrap_err().code, 6);
    }

    #[test]
    fn cfg_07_dns() {
        let c = p(with("dns", json!({"nameservers": ["10.96.0.10"], "search": ["svc"]}))).unwrap();
        let dns = c.dns.unwrap();
        assert_eq!(dns.nameservers, ["10.96.0.10"]);
        assert_eq!(dns.search, ["svc"]);
        assert_eq!(p(with("dns", json!({"nameservers": "x"}))).unwrap_err().code, 6);
        assert_eq!(p(with("dns", json!([]))).unwrap_err().code, 6);
    }

    #[test]
    fn prev_result_kept_raw() {
        let pr = json!({"cniVersion": "0.4.0", "ips": []});
        assert_eq!(p(with("prevResult", pr.clone())).unwrap().prev_result, Some(pr));
        assert_eq!(p(with("prevResult", Value::Null)).unwrap().prev_result, None);
    }

    #[test]
    fn peek() {
        assert_eq!(peek_version(br#"{"cniVersion":"0.4.0"}"#), Some(CniVersion::V0_4_0));
        assert_eq!(peek_version(br#"{"cniVersion":"7"}"#), None);
        assert_eq!(peek_version(b"garbage"), None);
    }
}

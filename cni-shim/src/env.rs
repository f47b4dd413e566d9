//! The environment parameters of a CNI call (spec §2 "Parameters").
//!
//! Which variables each command needs follows the spec's table (checklist
//! ENV-07); the messages follow libcni's `skel` (ENV-09..ENV-12) but always
//! name the offending variable (ENV-08).

use crate::error::{code, CniError};
use std::collections::BTreeMap;
use std::ffi::OsString;

/// `CNI_COMMAND`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CniCommand {
    Add,
    Del,
    Check,
    Status,
    Gc,
    Version,
}

impl CniCommand {
    pub fn parse(s: &str) -> Option<CniCommand> {
        Some(match s {
            "ADD" => CniCommand::Add,
            "DEL" => CniCommand::Del,
            "CHECK" => CniCommand::Check,
            "STATUS" => CniCommand::Status,
            "GC" => CniCommand::Gc,
            "VERSION" => CniCommand::Version,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            CniCommand::Add => "ADD",
            CniCommand::Del => "DEL",
            CniCommand::Check => "CHECK",
            CniCommand::Status => "STATUS",
            CniCommand::Gc => "GC",
            CniCommand::Version => "VERSION",
        }
    }

    /// The protocol command sent to the agent (VERSION never reaches it).
    pub fn to_proto(self) -> Option<crate::proto::Command> {
        use crate::proto::Command;
        Some(match self {
            CniCommand::Add => Command::Add,
            CniCommand::Del => Command::Del,
            CniCommand::Check => Command::Check,
            CniCommand::Status => Command::Status,
            CniCommand::Gc => Command::Gc,
            CniCommand::Version => return None,
        })
    }

    /// Whether this command acts on one attachment (needs container ID and
    /// interface name).
    pub fn is_attachment(self) -> bool {
        matches!(self, CniCommand::Add | CniCommand::Del | CniCommand::Check)
    }
}

/// The validated environment of one call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CniEnv {
    pub command: CniCommand,
    /// `CNI_CONTAINERID` (empty for STATUS, GC, VERSION).
    pub container_id: String,
    /// `CNI_NETNS` (always set for ADD/CHECK, optional for DEL).
    pub netns: Option<String>,
    /// `CNI_IFNAME` (empty for STATUS, GC, VERSION).
    pub ifname: String,
    /// `CNI_ARGS`, parsed.
    pub args: BTreeMap<String, String>,
    /// `CNI_PATH` (unused by this plugin: it delegates to no binary).
    pub path: Option<String>,
    /// `CNI_NETNS_OVERRIDE` = `1`/`true`: skip the "CNI_NETNS is my own
    /// netns" safety check (libcni, ENV-14).
    pub netns_override: bool,
}

/// The variables in the order libcni reports them missing (ENV-09).
const ORDER: [&str; 6] =
    ["CNI_COMMAND", "CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_ARGS", "CNI_PATH"];

/// Whether `var` is required for `cmd` (spec table, checklist ENV-07).
/// CNI_PATH is required for GC only: this plugin runs no delegate, and the
/// spec makes it optional elsewhere (libcni's stricter rule, ENV-09, is not
/// followed on purpose).
fn required(cmd: CniCommand, var: &str) -> bool {
    use CniCommand::*;
    match var {
        "CNI_COMMAND" => true,
        "CNI_CONTAINERID" | "CNI_IFNAME" => matches!(cmd, Add | Del | Check),
        "CNI_NETNS" => matches!(cmd, Add | Check),
        "CNI_PATH" => cmd == Gc,
        _ => false,
    }
}

/// Reads a variable; empty counts as unset (as in libcni). Not UTF-8 is an
/// invalid variable (code 4).
fn read(getenv: &dyn Fn(&str) -> Option<OsString>, name: &str) -> Result<Option<String>, CniError> {
    match getenv(name) {
        None => Ok(None),
        Some(v) => match v.into_string() {
            Ok(s) if s.is_empty() => Ok(None),
            Ok(s) => Ok(Some(s)),
            Err(_) => Err(CniError::new(code::INVALID_ENV, format!("{name} is not valid UTF-8"))),
        },
    }
}

/// Reads and validates the environment for this call.
pub fn from_env(getenv: &dyn Fn(&str) -> Option<OsString>) -> Result<CniEnv, CniError> {
    let command = match read(getenv, "CNI_COMMAND")? {
        None => {
            return Err(CniError::new(
                code::INVALID_ENV,
                "required env variables [CNI_COMMAND] missing",
            ))
        }
        Some(c) => CniCommand::parse(&c)
            .ok_or_else(|| CniError::new(code::INVALID_ENV, format!("unknown CNI_COMMAND: {c}")))?,
    };
    if command == CniCommand::Version {
        return Ok(CniEnv {
            command,
            container_id: String::new(),
            netns: None,
            ifname: String::new(),
            args: BTreeMap::new(),
            path: None,
            netns_override: false,
        });
    }

    let mut values: BTreeMap<&str, String> = BTreeMap::new();
    let mut missing = Vec::new();
    for name in ORDER.iter().skip(1) {
        // Variables a command does not use are not read at all, so a stray
        // odd value (say CNI_IFNAME on STATUS) cannot fail the call.
        let used = required(command, name)
            || (command.is_attachment() && matches!(*name, "CNI_NETNS" | "CNI_ARGS"))
            || *name == "CNI_PATH";
        if !used {
            continue;
        }
        match read(getenv, name)? {
            Some(v) => {
                values.insert(name, v);
            }
            None if required(command, name) => missing.push(*name),
            None => {}
        }
    }
    if !missing.is_empty() {
        return Err(CniError::new(
            code::INVALID_ENV,
            format!("required env variables [{}] missing", missing.join(",")),
        ));
    }

    let container_id = values.remove("CNI_CONTAINERID").unwrap_or_default();
    let ifname = values.remove("CNI_IFNAME").unwrap_or_default();
    if command.is_attachment() {
        validate_container_id(&container_id)?;
        validate_ifname(&ifname)?;
    }
    let args = match values.remove("CNI_ARGS") {
        Some(a) => parse_args(&a)?,
        None => BTreeMap::new(),
    };
    let netns_override = match read(getenv, "CNI_NETNS_OVERRIDE") {
        Ok(Some(v)) => v == "1" || v.eq_ignore_ascii_case("true"),
        _ => false,
    };
    Ok(CniEnv {
        command,
        container_id,
        netns: values.remove("CNI_NETNS"),
        ifname,
        args,
        path: values.remove("CNI_PATH"),
        netns_override,
    })
}

/// `^[A-Za-z0-9][A-Za-z0-9_.-]*$`: the rule for container IDs (ENV-02) and
/// network names (CFG-02).
pub fn valid_name(s: &str) -> bool {
    let mut bytes = s.bytes();
    match bytes.next() {
        Some(b) if b.is_ascii_alphanumeric() => {}
        _ => return false,
    }
    bytes.all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// [ENV-02]/[ENV-10]: the container ID is not empty and has only valid
/// characters.
pub fn validate_container_id(id: &str) -> Result<(), CniError> {
    if id.is_empty() {
        // Only reachable through the API: from the environment, an empty
        // value is "missing" (code 4) as in libcni.
        return Err(CniError::new(code::UNKNOWN_CONTAINER, "CNI_CONTAINERID: missing containerID"));
    }
    if !valid_name(id) {
        return Err(CniError::with_details(
            code::INVALID_ENV,
            "CNI_CONTAINERID: invalid characters in containerID",
            id,
        ));
    }
    Ok(())
}

/// [ENV-04]/[ENV-11]: an interface name Linux accepts.
pub fn validate_ifname(name: &str) -> Result<(), CniError> {
    let bad = |msg: &str, details: String| {
        Err(CniError::with_details(code::INVALID_ENV, format!("CNI_IFNAME: {msg}"), details))
    };
    if name.is_empty() {
        return bad("interface name is empty", String::new());
    }
    if name.len() > 15 {
        return bad(
            "interface name is too long",
            "interface name should be less than 16 characters".into(),
        );
    }
    if name == "." || name == ".." {
        return bad("interface name is . or ..", String::new());
    }
    if name.chars().any(|c| c == '/' || c == ':' || c.is_whitespace()) {
        return bad("interface name contains / or : or whitespace characters", name.to_string());
    }
    Ok(())
}

/// [ENV-05] `CNI_ARGS`: `K=V` pairs separated by `;`. A pair without `=` or
/// with an empty key is an invalid variable (code 4). Empty segments (a
/// trailing `;`) are skipped; a value may itself contain `=`; a repeated key
/// keeps its last value.
pub fn parse_args(s: &str) -> Result<BTreeMap<String, String>, CniError> {
    let mut out = BTreeMap::new();
    for pair in s.split(';') {
        if pair.is_empty() {
            continue;
        }
        match pair.split_once('=') {
            Some((k, v)) if !k.is_empty() => {
                out.insert(k.to_string(), v.to_string());
            }
            _ => {
                return Err(CniError::with_details(
                    code::INVALID_ENV,
                    format!("CNI_ARGS: invalid pair {pair:?}"),
                    "CNI_ARGS must be K=V pairs separated by ';'",
                ))
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(vars: &[(&str, &str)]) -> Result<CniEnv, CniError> {
        let vars: Vec<(String, String)> =
            vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        from_env(&move |name: &str| {
            vars.iter().find(|(k, _)| k == name).map(|(_, v)| OsString::from(v))
        })
    }

    const ADD: [(&str, &str); 5] = [
        ("CNI_COMMAND", "ADD"),
        ("CNI_CONTAINERID", "abc123"),
        ("CNI_NETNS", "/run/netns/x"),
        ("CNI_IFNAME", "eth0"),
        ("CNI_PATH", "/opt/cni/bin"),
    ];

    #[test]
    fn full_add_env() {
        let mut vars = ADD.to_vec();
        vars.push(("CNI_ARGS", "K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0;IgnoreUnknown=1"));
        let e = env(&vars).unwrap();
        assert_eq!(e.command, CniCommand::Add);
        assert_eq!(e.container_id, "abc123");
        assert_eq!(e.netns.as_deref(), Some("/run/netns/x"));
        assert_eq!(e.ifname, "eth0");
        assert_eq!(e.args["K8S_POD_NAMESPACE"], "default");
        assert_eq!(e.args["K8S_POD_NAME"], "web-0");
        assert_eq!(e.args.len(), 3);
    }

    #[test]
    fn env_07_missing_vars_are_all_named_in_order() {
        // [ENV-07][ENV-08][ENV-09]
        let e = env(&[("CNI_COMMAND", "ADD"), ("CNI_CONTAINERID", "x")]).unwrap_err();
        assert_eq!(e.code, 4);
        assert_eq!(e.msg, "required env variables [CNI_NETNS,CNI_IFNAME] missing");
        // CNI_PATH is optional for ADD (spec), empty counts as missing.
        let e = env(&[("CNI_COMMAND", "CHECK"), ("CNI_CONTAINERID", ""), ("CNI_IFNAME", "e")])
            .unwrap_err();
        assert_eq!(e.msg, "required env variables [CNI_CONTAINERID,CNI_NETNS] missing");
    }

    #[test]
    fn env_07_del_netns_optional() {
        let e = env(&[("CNI_COMMAND", "DEL"), ("CNI_CONTAINERID", "x"), ("CNI_IFNAME", "eth0")])
            .unwrap();
        assert_eq!(e.netns, None);
    }

    #[test]
    fn env_07_status_gc_version() {
        assert!(env(&[("CNI_COMMAND", "STATUS")]).is_ok());
        assert!(env(&[("CNI_COMMAND", "VERSION")]).is_ok());
        // Attachment variables on STATUS are ignored, even bad ones.
        assert!(env(&[("CNI_COMMAND", "STATUS"), ("CNI_IFNAME", "a/b")]).is_ok());
        let e = env(&[("CNI_COMMAND", "GC")]).unwrap_err();
        assert_eq!((e.code, e.msg.as_str()), (4, "required env variables [CNI_PATH] missing"));
        assert!(env(&[("CNI_COMMAND", "GC"), ("CNI_PATH", "/opt/cni/bin")]).is_ok());
    }

    #[test]
    fn env_12_command() {
        let e = env(&[]).unwrap_err();
        assert_eq!((e.code, e.msg.as_str()), (4, "required env variables [CNI_COMMAND] missing"));
        let e = env(&[("CNI_COMMAND", "FROB")]).unwrap_err();
        assert_eq!((e.code, e.msg.as_str()), (4, "unknown CNI_COMMAND: FROB"));
        // Lowercase is not a command.
        assert_eq!(env(&[("CNI_COMMAND", "add")]).unwrap_err().code, 4);
    }

    #[test]
    fn env_10_container_id() {
        for bad in ["-abc", "a b", "a/b", "_x", "é"] {
            let mut vars = ADD.to_vec();
            vars[1] = ("CNI_CONTAINERID", bad);
            let e = env(&vars).unwrap_err();
            assert_eq!(e.code, 4, "{bad}");
            assert!(e.msg.contains("CNI_CONTAINERID"));
        }
        for good in ["a", "0", "a.b-c_d", "3f5a9c0e"] {
            assert!(validate_container_id(good).is_ok(), "{good}");
        }
        assert_eq!(validate_container_id("").unwrap_err().code, 3);
    }

    #[test]
    fn env_11_ifname() {
        for bad in ["a23456789012345x", ".", "..", "a/b", "a:b", "a b", "a\tb"] {
            let mut vars = ADD.to_vec();
            vars[3] = ("CNI_IFNAME", bad);
            let e = env(&vars).unwrap_err();
            assert_eq!(e.code, 4, "{bad:?}");
            assert!(e.msg.contains("CNI_IFNAME"), "{}", e.msg);
        }
        assert!(validate_ifname("a23456789012345").is_ok());
        assert!(validate_ifname("eth0.100").is_ok());
        assert_eq!(validate_ifname("").unwrap_err().code, 4);
    }

    #[test]
    fn env_05_args() {
        assert_eq!(parse_args("").unwrap().len(), 0);
        assert_eq!(parse_args("A=1;").unwrap().len(), 1);
        assert_eq!(parse_args("A=x=y").unwrap()["A"], "x=y");
        assert_eq!(parse_args("A=;B=2").unwrap()["A"], "");
        assert_eq!(parse_args("A=1;A=2").unwrap()["A"], "2");
        for bad in ["A", "A=1;B", "=1", "A=1;;=x"] {
            let e = parse_args(bad).unwrap_err();
            assert_eq!(e.code, 4, "{bad}");
            assert!(e.msg.contains("CNI_ARGS"));
        }
        let mut vars = ADD.to_vec();
        vars.push(("CNI_ARGS", "garbage"));
        assert_eq!(env(&vars).unwrap_err().code, 4);
    }

    #[test]
    fn env_14_override() {
        let mut vars = ADD.to_vec();
        vars.push(("CNI_NETNS_OVERRIDE", "TRUE"));
        assert!(env(&vars).unwrap().netns_override);
        vars.pop();
        vars.push(("CNI_NETNS_OVERRIDE", "0"));
        assert!(!env(&vars).unwrap().netns_override);
    }

    #[test]
    fn not_utf8_is_invalid() {
        use std::os::unix::ffi::OsStringExt;
        let e = from_env(&|name: &str| match name {
            "CNI_COMMAND" => Some(OsString::from("ADD")),
            "CNI_IFNAME" => Some(OsString::from_vec(vec![0xff, 0xfe])),
            _ => Some(OsString::from("x")),
        })
        .unwrap_err();
        assert_eq!(e.code, 4);
        assert!(e.msg.contains("CNI_IFNAME"));
    }
}

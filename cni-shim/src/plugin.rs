//! One CNI call: environment + stdin in, stdout + stderr + exit code out.

use crate::client::{self, ClientError};
use crate::config::{self, NetConf};
use crate::env::{self, CniCommand, CniEnv};
use crate::error::{code, CniError};
use crate::proto::{CniRequest, CniResponse, CniResult, Dns};
use crate::version::{self, CniVersion};
use std::ffi::OsString;
use std::io::Read;

/// What the process prints and how it exits.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    pub stdout: String,
    pub stderr: String,
    pub exit_code: i32,
}

impl Outcome {
    fn ok(stdout: String) -> Outcome {
        Outcome { stdout, stderr: String::new(), exit_code: 0 }
    }

    fn error(e: &CniError, cni_version: CniVersion, what: &str) -> Outcome {
        let mut stdout = e.to_json(cni_version.as_str());
        stdout.push('\n');
        Outcome { stdout, stderr: format!("ocelot-cni: {what}: {e}\n"), exit_code: 1 }
    }

    fn warn(mut self, line: String) -> Outcome {
        self.stderr.push_str("ocelot-cni: ");
        self.stderr.push_str(&line);
        self.stderr.push('\n');
        self
    }
}

const ABOUT: &str = "ocelot-cni: the Ocelot CNI plugin (asks the Ocelot agent over a unix socket)";

/// Runs one call. `stdin` is read unless `stdin_is_terminal` (a person
/// running the binary by hand), so that a missing `CNI_COMMAND` answers at
/// once instead of waiting for input.
pub fn run(
    getenv: &dyn Fn(&str) -> Option<OsString>,
    stdin: &mut dyn Read,
    stdin_is_terminal: bool,
) -> Outcome {
    let env = env::from_env(getenv);

    let mut input = Vec::new();
    let read_result = if stdin_is_terminal { Ok(0) } else { stdin.read_to_end(&mut input) };
    // Label errors with the config's version when it is one we speak.
    let label = config::peek_version(&input).unwrap_or(version::CURRENT);

    let env = match env {
        Ok(e) => e,
        Err(e) => {
            let mut out = Outcome::error(&e, label, "invalid environment");
            if getenv("CNI_COMMAND").is_none_or(|c| c.is_empty()) {
                out.stderr.push_str(&format!(
                    "{ABOUT}\nCNI protocol versions supported: {}\n",
                    version::supported_strings().join(", ")
                ));
            }
            return out;
        }
    };

    if env.command == CniCommand::Version {
        // [VER-01][VER-02] echo the input version when we speak it; libcni
        // ignores stdin and says 1.1.0 (VER-04), which is our fallback.
        let mut out = version::version_result(label);
        out.push('\n');
        return Outcome::ok(out);
    }

    let what = env.command.as_str();
    if let Err(e) = read_result {
        let err = CniError::new(code::IO_FAILURE, format!("error reading from stdin: {e}"));
        return Outcome::error(&err, label, what);
    }
    let conf = match config::parse(&input) {
        Ok(c) => c,
        Err(e) => return Outcome::error(&e, label, what),
    };
    let v = conf.cni_version;
    match handle(&env, &conf) {
        Ok(out) => out,
        Err(e) => Outcome::error(&e, v, &describe(&env)),
    }
}

fn describe(env: &CniEnv) -> String {
    if env.command.is_attachment() {
        format!("{} {}/{}", env.command.as_str(), env.container_id, env.ifname)
    } else {
        env.command.as_str().to_string()
    }
}

/// The command, after the environment and config are known good.
fn handle(env: &CniEnv, conf: &NetConf) -> Result<Outcome, CniError> {
    let v = conf.cni_version;
    // [CHK-10][STA-07][GC-08][RES-09] commands the config's version lacks.
    let (min, name) = match env.command {
        CniCommand::Check => (CniVersion::V0_4_0, "CHECK"),
        CniCommand::Status => (CniVersion::V1_1_0, "STATUS"),
        CniCommand::Gc => (CniVersion::V1_1_0, "GC"),
        _ => (CniVersion::V0_1_0, ""),
    };
    if v < min {
        return Err(CniError::with_details(
            code::INCOMPATIBLE_VERSION,
            format!("config version does not allow {name}"),
            format!("config is {:?}, {name} needs {} or later", v.as_str(), min.as_str()),
        ));
    }

    // prevResult: chained ADD from 0.3.0 on, CHECK and DEL from 0.4.0 on.
    let mut warnings = Vec::new();
    let prev_result = match (&conf.prev_result, env.command) {
        (Some(raw), CniCommand::Add) if v >= CniVersion::V0_3_0 => {
            Some(version::decode_result(raw)?)
        }
        (Some(raw), CniCommand::Check) => Some(version::decode_result(raw)?),
        (Some(raw), CniCommand::Del) if v >= CniVersion::V0_4_0 => {
            // [DEL-03][DEL-04] best effort: a broken prevResult does not stop DEL.
            match version::decode_result(raw) {
                Ok(r) => Some(r),
                Err(e) => {
                    warnings.push(format!("DEL: ignoring prevResult: {e}"));
                    None
                }
            }
        }
        _ => None,
    };
    if env.command == CniCommand::Check && prev_result.is_none() {
        // [CHK-01][CHK-08]
        return Err(CniError::new(code::INVALID_CONFIG, "CHECK: required prevResult missing"));
    }

    // [ENV-14] never act on the plugin's own (the host's) network namespace.
    if env.command.is_attachment() && !env.netns_override {
        if let Some(ns) = &env.netns {
            if is_own_netns(ns) {
                return Err(CniError::with_details(
                    code::INVALID_NETNS,
                    "plugin's netns and netns from CNI_NETNS should not be the same",
                    ns.as_str(),
                ));
            }
        }
    }

    let valid_attachments = if env.command == CniCommand::Gc {
        // [GC-01] without the list we cannot tell stale from live: refuse
        // rather than collect everything.
        match &conf.valid_attachments {
            Some(list) => Some(list.clone()),
            None => {
                return Err(CniError::new(
                    code::INVALID_CONFIG,
                    format!("GC: {} missing from the configuration", config::VALID_ATTACHMENTS_KEY),
                ))
            }
        }
    } else {
        None
    };

    let Some(command) = env.command.to_proto() else {
        return Err(CniError::new(code::INTERNAL, "VERSION reached the agent path"));
    };
    let req = CniRequest {
        command,
        container_id: env.container_id.clone(),
        netns: env.netns.clone(),
        ifname: env.ifname.clone(),
        args: env.args.clone(),
        network: conf.name.clone(),
        config: conf.raw.clone(),
        prev_result: prev_result.clone(),
        valid_attachments,
    };
    let status = env.command == CniCommand::Status;
    let answer = client::call(&conf.agent_socket, &req, conf.timeout_for(status));

    let mut out = match answer {
        Ok(CniResponse::Error { code, msg, details }) => {
            // The agent's code goes through unchanged (STATUS 50/51, 11,
            // Ocelot's 100+...).
            return Err(CniError { code, msg, details });
        }
        Ok(CniResponse::Ok { result }) => on_success(env, conf, result, prev_result)?,
        Err(e) => on_agent_failure(env, conf, e)?,
    };
    for w in warnings {
        out = out.warn(w);
    }
    Ok(out)
}

/// The agent said yes.
fn on_success(
    env: &CniEnv,
    conf: &NetConf,
    result: Option<CniResult>,
    prev_result: Option<CniResult>,
) -> Result<Outcome, CniError> {
    if env.command != CniCommand::Add {
        // [DEL-06][CHK-09][STA-01][GC-06] success prints nothing.
        return Ok(Outcome::ok(String::new()));
    }
    // [ADD-02][ADD-03][RES-06] the agent's result (which, chained, includes
    // prevResult), or prevResult unchanged when the agent added nothing.
    let mut result = match (result, prev_result) {
        (Some(r), _) => r,
        (None, Some(prev)) => prev,
        (None, None) => {
            return Err(CniError::new(code::INTERNAL, "the agent returned no result for ADD"))
        }
    };
    // [CFG-07] the config's `dns` when the agent gives none.
    if let Some(dns) = &conf.dns {
        if result.dns == Dns::default() {
            result.dns = dns.clone();
        }
    }
    version::validate_result(&result).map_err(|e| {
        CniError::with_details(code::INTERNAL, "the agent returned an invalid result", e)
    })?;
    let mut text = version::encode_result_string(&result, conf.cni_version)?;
    text.push('\n');
    Ok(Outcome::ok(text))
}

/// The agent could not be asked, or did not answer.
fn on_agent_failure(env: &CniEnv, conf: &NetConf, e: ClientError) -> Result<Outcome, CniError> {
    let socket = conf.agent_socket.display().to_string();
    match (env.command, &e) {
        // [DEL-04][DEL-05] DEL is best effort and idempotent: with no agent
        // running there is nothing this plugin can undo now, and failing
        // would keep the pod's sandbox (and a node drain) stuck until the
        // agent returns. The agent reconciles on start (pods that no longer
        // exist lose their endpoint and address; CNI GC does the same).
        (CniCommand::Del, ClientError::Unreachable(_)) => {
            Ok(Outcome::ok(String::new()).warn(format!(
                "DEL {}/{}: agent not running ({e}, socket {socket}); \
                 nothing to undo here, the agent reconciles when it starts",
                env.container_id, env.ifname
            )))
        }
        // [STA-02][STA-03] the agent is down (or talks nonsense): ADD
        // cannot be served.
        (CniCommand::Status, _) => Err(CniError::with_details(
            code::PLUGIN_NOT_AVAILABLE,
            "plugin not available: the Ocelot agent does not answer",
            format!("{e} (socket {socket})"),
        )),
        (_, ClientError::Protocol(_)) => {
            Err(CniError::with_details(code::INTERNAL, e.to_string(), socket))
        }
        // ADD, CHECK, GC, and DEL that reached an agent which then failed
        // to answer: a transient condition, the runtime retries.
        _ => Err(CniError::with_details(
            code::TRY_AGAIN_LATER,
            "try again later: the Ocelot agent is not reachable",
            format!("{e} (socket {socket})"),
        )),
    }
}

/// Whether `path` is the network namespace this process runs in (same
/// device and inode as `/proc/self/ns/net`). Unreadable paths are not.
fn is_own_netns(path: &str) -> bool {
    use std::os::unix::fs::MetadataExt;
    let (Ok(theirs), Ok(ours)) = (std::fs::metadata(path), std::fs::metadata("/proc/self/ns/net"))
    else {
        return false;
    };
    theirs.dev() == ours.dev() && theirs.ino() == ours.ino()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_with(vars: &[(&str, &str)], stdin: &str) -> Outcome {
        let vars: Vec<(String, String)> =
            vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let getenv =
            move |name: &str| vars.iter().find(|(k, _)| k == name).map(|(_, v)| OsString::from(v));
        run(&getenv, &mut stdin.as_bytes(), false)
    }

    fn code_of(o: &Outcome) -> u64 {
        let v: serde_json::Value = serde_json::from_str(&o.stdout).unwrap();
        v["code"].as_u64().unwrap()
    }

    #[test]
    fn version_echoes_supported_input() {
        let o = run_with(&[("CNI_COMMAND", "VERSION")], r#"{"cniVersion":"0.4.0"}"#);
        assert_eq!(o.exit_code, 0);
        let v: serde_json::Value = serde_json::from_str(&o.stdout).unwrap();
        assert_eq!(v["cniVersion"], "0.4.0");
        for stdin in ["", "junk", r#"{"cniVersion":"7.0.0"}"#] {
            let o = run_with(&[("CNI_COMMAND", "VERSION")], stdin);
            let v: serde_json::Value = serde_json::from_str(&o.stdout).unwrap();
            assert_eq!(v["cniVersion"], "1.1.0");
        }
    }

    #[test]
    fn missing_command_prints_about() {
        let o = run_with(&[], "");
        assert_eq!(o.exit_code, 1);
        assert_eq!(code_of(&o), 4);
        assert!(o.stderr.contains("CNI protocol versions supported"));
    }

    #[test]
    fn check_and_status_need_versions() {
        let base = [
            ("CNI_COMMAND", "CHECK"),
            ("CNI_CONTAINERID", "c"),
            ("CNI_NETNS", "/x"),
            ("CNI_IFNAME", "eth0"),
        ];
        let o = run_with(&base, r#"{"cniVersion":"0.3.1","name":"n","type":"ocelot"}"#);
        assert_eq!(code_of(&o), 1);
        let o = run_with(
            &[("CNI_COMMAND", "STATUS")],
            r#"{"cniVersion":"1.0.0","name":"n","type":"ocelot"}"#,
        );
        assert_eq!(code_of(&o), 1);
        let v: serde_json::Value = serde_json::from_str(&o.stdout).unwrap();
        assert_eq!(v["cniVersion"], "1.0.0");
    }

    #[test]
    fn own_netns_detected() {
        assert!(is_own_netns("/proc/self/ns/net"));
        assert!(!is_own_netns("/nonexistent/netns"));
        assert!(!is_own_netns("/"));
    }
}

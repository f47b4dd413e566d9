//! The container runtime's half of CNI, as containerd does it through
//! libcni: render the conflist, derive each plugin's request configuration,
//! run the chain (ADD in order, each plugin's result the next one's
//! `prevResult`; DEL in reverse, each given the cached final result), with
//! the environment a runtime sets.
//!
//! Request configuration ("Deriving request configuration", CNI spec §3):
//! the plugin object with the list's `cniVersion` and `name` injected,
//! `runtimeConfig` holding the capabilities the plugin declares *and* the
//! runtime supplies, `prevResult` when there is one, and no `capabilities`.

use anyhow::{anyhow, bail, Context};
use serde_json::{Map, Value};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

/// The conflist shipped in `manifests/cni/`, the default template.
pub const TEMPLATE: &str = include_str!("../../../manifests/cni/10-ocelot.conflist");
/// The plugin `type` that is Ocelot's.
pub const OCELOT_TYPE: &str = "ocelot";
/// The binary that implements it.
pub const OCELOT_BINARY: &str = "ocelot-cni";

/// Parse and check a conflist: `cniVersion`, `name`, and a non-empty
/// `plugins` list whose entries have a `type` (a bare file name).
pub fn parse_conflist(text: &str) -> anyhow::Result<Value> {
    let v: Value = serde_json::from_str(text).context("conflist is not JSON")?;
    let o = v.as_object().ok_or_else(|| anyhow!("conflist is not a JSON object"))?;
    for key in ["cniVersion", "name"] {
        if o.get(key).and_then(Value::as_str).is_none_or(str::is_empty) {
            bail!("conflist: `{key}` must be a non-empty string");
        }
    }
    let plugins = o
        .get("plugins")
        .and_then(Value::as_array)
        .filter(|p| !p.is_empty())
        .ok_or_else(|| anyhow!("conflist: `plugins` must be a non-empty list"))?;
    for (i, p) in plugins.iter().enumerate() {
        let t = p.get("type").and_then(Value::as_str).unwrap_or("");
        if t.is_empty() || t.contains('/') || t.contains('\\') {
            bail!("conflist: plugins[{i}].type must be a binary name, not {t:?}");
        }
    }
    Ok(v)
}

/// The plugin types of a conflist, in order.
pub fn plugin_types(list: &Value) -> Vec<String> {
    list["plugins"]
        .as_array()
        .map(|ps| ps.iter().filter_map(|p| p["type"].as_str().map(str::to_string)).collect())
        .unwrap_or_default()
}

/// Render a node's conflist: the `ocelot` plugin gets the node's agent
/// socket and the MTU (none when `mtu` is 0: the agent's automatic one).
pub fn render(template: &Value, agent_socket: &Path, mtu: u32) -> anyhow::Result<Value> {
    let mut v = template.clone();
    let mut found = false;
    for p in v["plugins"].as_array_mut().into_iter().flatten() {
        if p["type"] == OCELOT_TYPE {
            p["agentSocket"] = Value::String(agent_socket.display().to_string());
            match (mtu, p.as_object_mut()) {
                (0, Some(o)) => {
                    o.remove("mtu");
                }
                _ => p["mtu"] = Value::from(mtu),
            }
            found = true;
        }
    }
    if !found {
        bail!("conflist has no plugin of type {OCELOT_TYPE:?}");
    }
    Ok(v)
}

/// `CNI_ARGS` as containerd sets them for a pod sandbox.
pub fn cni_args(namespace: &str, pod: &str, container_id: &str, uid: &str) -> String {
    format!(
        "IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={pod};\
         K8S_POD_INFRA_CONTAINER_ID={container_id};K8S_POD_UID={uid}"
    )
}

/// The capability arguments containerd supplies for a pod: `portMappings`
/// always (one per container port with a `hostPort`, as the kubelet does), and
/// `bandwidth` only when the pod has the `kubernetes.io/ingress-bandwidth`
/// or `kubernetes.io/egress-bandwidth` annotations (rates in bits/s, bursts
/// as containerd sets them).
pub fn capability_args(
    annotations: &std::collections::BTreeMap<String, String>,
    ports: &[crate::model::ContainerPort],
) -> anyhow::Result<Map<String, Value>> {
    let mut caps = Map::new();
    let mappings: Vec<Value> = ports
        .iter()
        .filter_map(|p| {
            let host = p.host_port?;
            Some(serde_json::json!({
                "hostPort": host,
                "containerPort": p.container_port,
                "protocol": p.protocol.to_ascii_lowercase(),
            }))
        })
        .collect();
    caps.insert("portMappings".into(), Value::Array(mappings));
    let mut bw = Map::new();
    for (dir, key) in [
        ("ingress", "kubernetes.io/ingress-bandwidth"),
        ("egress", "kubernetes.io/egress-bandwidth"),
    ] {
        if let Some(q) = annotations.get(key) {
            let rate = parse_quantity(q).with_context(|| format!("annotation {key}={q:?}"))?;
            bw.insert(format!("{dir}Rate"), Value::from(rate));
            bw.insert(format!("{dir}Burst"), Value::from(u64::from(u32::MAX)));
        }
    }
    if !bw.is_empty() {
        caps.insert("bandwidth".into(), Value::Object(bw));
    }
    Ok(caps)
}

/// A Kubernetes quantity (`10M`, `1Gi`, `500k`, `100`) as a whole number.
pub fn parse_quantity(q: &str) -> anyhow::Result<u64> {
    let q = q.trim();
    let split = q.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(q.len());
    let (num, suffix) = q.split_at(split);
    let n: f64 = num.parse().map_err(|_| anyhow!("not a quantity"))?;
    let mult: f64 = match suffix {
        "" => 1.0,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "Ki" => 1024.0,
        "Mi" => 1024.0 * 1024.0,
        "Gi" => 1024.0 * 1024.0 * 1024.0,
        "Ti" => 1024.0f64.powi(4),
        _ => bail!("unknown suffix {suffix:?}"),
    };
    Ok((n * mult).round() as u64)
}

/// The configuration plugin `index` of `list` receives on stdin.
pub fn request_config(
    list: &Value,
    index: usize,
    prev_result: Option<&Value>,
    capability_args: &Map<String, Value>,
) -> anyhow::Result<Value> {
    let plugin = list["plugins"]
        .get(index)
        .and_then(Value::as_object)
        .ok_or_else(|| anyhow!("conflist has no plugin {index}"))?;
    let mut conf = plugin.clone();
    conf.insert("cniVersion".into(), list["cniVersion"].clone());
    conf.insert("name".into(), list["name"].clone());
    let mut rc = Map::new();
    if let Some(caps) = conf.remove("capabilities").as_ref().and_then(Value::as_object) {
        for (cap, on) in caps {
            if on.as_bool() == Some(true) {
                if let Some(arg) = capability_args.get(cap) {
                    rc.insert(cap.clone(), arg.clone());
                }
            }
        }
    }
    if !rc.is_empty() {
        conf.insert("runtimeConfig".into(), Value::Object(rc));
    }
    if let Some(prev) = prev_result {
        conf.insert("prevResult".into(), prev.clone());
    }
    Ok(Value::Object(conf))
}

/// The attachment a runtime call is about.
#[derive(Clone, Debug)]
pub struct Attachment {
    pub container_id: String,
    /// `CNI_NETNS`, the pod's namespace path.
    pub netns: PathBuf,
    pub ifname: String,
    /// `CNI_ARGS`.
    pub args: String,
}

/// How plugins are executed.
#[derive(Clone, Debug)]
pub struct Runner {
    /// `CNI_PATH`: where plugin binaries are looked up, in order.
    pub cni_path: Vec<PathBuf>,
    /// The network namespace the runtime runs in (the node's); `None` runs
    /// plugins in ours.
    pub runtime_netns: Option<PathBuf>,
    /// How long one plugin may take before it is killed.
    pub timeout: Duration,
    /// Where the plugins' stderr is appended, if anywhere.
    pub log: Option<PathBuf>,
}

/// What one plugin execution produced.
#[derive(Debug)]
pub struct Output {
    pub status: Option<i32>,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

impl Runner {
    /// Find `plugin` on `CNI_PATH` (libcni's `FindInPath`).
    pub fn find(&self, plugin: &str) -> anyhow::Result<PathBuf> {
        self.cni_path.iter().map(|d| d.join(plugin)).find(|p| p.is_file()).ok_or_else(|| {
            anyhow!(
                "CNI plugin {plugin:?} not found in {}",
                self.cni_path.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(":")
            )
        })
    }

    fn cni_path_var(&self) -> String {
        self.cni_path.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(":")
    }

    /// Run one plugin with the runtime's environment and `stdin`.
    pub fn exec(
        &self,
        plugin: &str,
        command: &str,
        att: &Attachment,
        stdin: &[u8],
    ) -> anyhow::Result<Output> {
        let path = self.find(plugin)?;
        let mut cmd = Command::new(&path);
        cmd.env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", &att.container_id)
            .env("CNI_NETNS", &att.netns)
            .env("CNI_IFNAME", &att.ifname)
            .env("CNI_ARGS", &att.args)
            .env("CNI_PATH", self.cni_path_var())
            .env_remove("CNI_NETNS_OVERRIDE")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let _ns = match &self.runtime_netns {
            Some(ns) => Some(crate::lab::sys::enter_on_spawn(&mut cmd, ns, false)?),
            None => None,
        };
        let mut child = cmd.spawn().with_context(|| format!("running {}", path.display()))?;
        let pid = child.id() as i32;
        let mut input = child.stdin.take().expect("piped");
        let mut out = child.stdout.take().expect("piped");
        let mut err = child.stderr.take().expect("piped");
        let data = stdin.to_vec();
        // Feed stdin and drain both outputs on threads: no pipe can fill up.
        let writer = std::thread::spawn(move || {
            let _ = input.write_all(&data);
        });
        let out_t = std::thread::spawn(move || {
            let mut b = Vec::new();
            let _ = out.read_to_end(&mut b);
            b
        });
        let err_t = std::thread::spawn(move || {
            let mut b = Vec::new();
            let _ = err.read_to_end(&mut b);
            b
        });
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(child.wait());
        });
        let status = match rx.recv_timeout(self.timeout) {
            Ok(s) => s?.code(),
            Err(_) => {
                // SAFETY: kill has no memory effects; `pid` is our child,
                // not yet reaped (the waiter thread still waits for it).
                unsafe { libc::kill(pid, libc::SIGKILL) };
                let _ = rx.recv();
                bail!("CNI plugin {plugin} {command} timed out after {:?}", self.timeout);
            }
        };
        let _ = writer.join();
        let stdout = out_t.join().unwrap_or_default();
        let stderr = err_t.join().unwrap_or_default();
        if let Some(log) = &self.log {
            if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(log) {
                let _ = writeln!(
                    f,
                    "--- {plugin} {command} {} exit {status:?}\nstdin: {}\nstdout: {}\nstderr: {}",
                    att.container_id,
                    String::from_utf8_lossy(stdin),
                    String::from_utf8_lossy(&stdout).trim(),
                    String::from_utf8_lossy(&stderr).trim()
                );
            }
        }
        Ok(Output { status, stdout, stderr })
    }
}

/// The message of a failed plugin: its CNI error object if it printed
/// one, else its output.
pub fn failure(plugin: &str, command: &str, o: &Output) -> anyhow::Error {
    let err: Option<Value> = serde_json::from_slice(&o.stdout).ok();
    let stderr = String::from_utf8_lossy(&o.stderr);
    let stderr = stderr.trim();
    let mut msg = match err.as_ref().filter(|e| e.get("code").is_some()) {
        Some(e) => {
            let mut m = format!(
                "CNI {command}: plugin {plugin} failed with code {}: {}",
                e["code"],
                e["msg"].as_str().unwrap_or("")
            );
            if let Some(d) = e["details"].as_str().filter(|d| !d.is_empty()) {
                m.push_str(&format!(" ({d})"));
            }
            m
        }
        None => format!(
            "CNI {command}: plugin {plugin} exited with {:?}: {}",
            o.status,
            String::from_utf8_lossy(&o.stdout).trim()
        ),
    };
    if !stderr.is_empty() {
        msg.push_str(&format!("\n  stderr: {}", stderr.lines().last().unwrap_or("")));
    }
    anyhow!(msg)
}

/// ADD the attachment through the whole list; the final result.
pub fn add(
    runner: &Runner,
    list: &Value,
    att: &Attachment,
    caps: &Map<String, Value>,
) -> anyhow::Result<Value> {
    let types = plugin_types(list);
    let mut prev: Option<Value> = None;
    for (i, t) in types.iter().enumerate() {
        let conf = request_config(list, i, prev.as_ref(), caps)?;
        let o = runner.exec(t, "ADD", att, serde_json::to_string(&conf)?.as_bytes())?;
        if o.status != Some(0) {
            return Err(failure(t, "ADD", &o));
        }
        let result: Value = serde_json::from_slice(&o.stdout).with_context(|| {
            format!(
                "CNI ADD: plugin {t} printed no JSON result: {:?}",
                String::from_utf8_lossy(&o.stdout)
            )
        })?;
        prev = Some(result);
    }
    prev.ok_or_else(|| anyhow!("conflist has no plugins"))
}

/// DEL the attachment through the list in reverse order, each plugin given
/// the final ADD result (if there was one). Stops at the first error, as
/// libcni does.
pub fn del(
    runner: &Runner,
    list: &Value,
    att: &Attachment,
    caps: &Map<String, Value>,
    result: Option<&Value>,
) -> anyhow::Result<()> {
    let types = plugin_types(list);
    for (i, t) in types.iter().enumerate().rev() {
        let conf = request_config(list, i, result, caps)?;
        let o = runner.exec(t, "DEL", att, serde_json::to_string(&conf)?.as_bytes())?;
        if o.status != Some(0) {
            return Err(failure(t, "DEL", &o));
        }
    }
    Ok(())
}

/// The addresses of a result (`ips[].address` without the prefix length).
pub fn result_ips(result: &Value) -> Vec<String> {
    result["ips"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|ip| ip["address"].as_str())
        .map(|a| a.split('/').next().unwrap_or(a).to_string())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::os::unix::fs::PermissionsExt;

    fn template() -> Value {
        parse_conflist(TEMPLATE).unwrap()
    }

    #[test]
    fn shipped_template_is_the_documented_chain() {
        let t = template();
        assert_eq!(t["cniVersion"], "1.0.0");
        assert_eq!(plugin_types(&t), ["ocelot", "portmap", "bandwidth"]);
        assert_eq!(t["plugins"][1]["capabilities"], json!({"portMappings": true}));
        assert_eq!(t["plugins"][2]["capabilities"], json!({"bandwidth": true}));
    }

    #[test]
    fn render_sets_socket_and_mtu_only_on_ocelot() {
        let r =
            render(&template(), Path::new("/run/ocelot-lab/d/nodes/n1/cni.sock"), 1450).unwrap();
        assert_eq!(r["plugins"][0]["agentSocket"], "/run/ocelot-lab/d/nodes/n1/cni.sock");
        assert_eq!(r["plugins"][0]["mtu"], 1450);
        assert!(r["plugins"][1].get("agentSocket").is_none());
        let auto = render(&template(), Path::new("/s"), 0).unwrap();
        assert!(auto["plugins"][0].get("mtu").is_none(), "0 leaves the MTU to the agent");
        let no_ocelot = json!({"cniVersion": "1.0.0", "name": "n", "plugins": [{"type": "x"}]});
        assert!(render(&no_ocelot, Path::new("/s"), 1500).is_err());
    }

    #[test]
    fn bad_conflists_are_rejected() {
        for bad in [
            "[]",
            "{\"name\": \"n\", \"plugins\": [{\"type\": \"a\"}]}",
            "{\"cniVersion\": \"1.0.0\", \"name\": \"n\", \"plugins\": []}",
            "{\"cniVersion\": \"1.0.0\", \"name\": \"n\", \"plugins\": [{\"type\": \"../x\"}]}",
            "{\"cniVersion\": \"1.0.0\", \"name\": \"n\", \"plugins\": [{}]}",
        ] {
            assert!(parse_conflist(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn cni_args_like_containerd() {
        assert_eq!(
            cni_args("x", "a", "abc", "u-1"),
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=x;K8S_POD_NAME=a;\
             K8S_POD_INFRA_CONTAINER_ID=abc;K8S_POD_UID=u-1"
        );
    }

    #[test]
    fn request_config_injects_and_filters_capabilities() {
        let list = render(&template(), Path::new("/s"), 1500).unwrap();
        let mut caps = Map::new();
        caps.insert("portMappings".into(), json!([]));
        caps.insert("mac".into(), json!("aa:bb:cc:dd:ee:ff"));
        // First plugin: name and version injected, no prevResult, no runtimeConfig.
        let c0 = request_config(&list, 0, None, &caps).unwrap();
        assert_eq!(
            c0,
            json!({"type": "ocelot", "agentSocket": "/s", "mtu": 1500,
                   "cniVersion": "1.0.0", "name": "ocelot"})
        );
        // portmap declares portMappings, which is supplied.
        let prev = json!({"cniVersion": "1.0.0", "ips": [{"address": "10.65.0.2/32"}]});
        let c1 = request_config(&list, 1, Some(&prev), &caps).unwrap();
        assert_eq!(c1["runtimeConfig"], json!({"portMappings": []}));
        assert_eq!(c1["prevResult"], prev);
        assert!(c1.get("capabilities").is_none());
        assert_eq!(c1["snat"], true, "unknown fields pass unchanged");
        // bandwidth declares bandwidth, which is not supplied: no runtimeConfig.
        let c2 = request_config(&list, 2, Some(&prev), &caps).unwrap();
        assert!(c2.get("runtimeConfig").is_none());
        // A capability set to false is not given either.
        let off = json!({"cniVersion": "1.0.0", "name": "n",
                         "plugins": [{"type": "p", "capabilities": {"mac": false}}]});
        assert!(request_config(&off, 0, None, &caps).unwrap().get("runtimeConfig").is_none());
        // The list's name and version win over the plugin's own.
        let own = json!({"cniVersion": "1.1.0", "name": "list",
                         "plugins": [{"type": "p", "name": "mine", "cniVersion": "0.3.1"}]});
        let c = request_config(&own, 0, None, &caps).unwrap();
        assert_eq!((c["name"].as_str(), c["cniVersion"].as_str()), (Some("list"), Some("1.1.0")));
    }

    #[test]
    fn host_ports_become_port_mappings() {
        let ports: Vec<crate::model::ContainerPort> = serde_json::from_value(json!([
            {"containerPort": 80, "hostPort": 8080},
            {"containerPort": 53, "protocol": "UDP", "hostPort": 5353},
            {"containerPort": 81}
        ]))
        .unwrap();
        let c = capability_args(&Default::default(), &ports).unwrap();
        assert_eq!(
            c["portMappings"],
            json!([
                {"hostPort": 8080, "containerPort": 80, "protocol": "tcp"},
                {"hostPort": 5353, "containerPort": 53, "protocol": "udp"}
            ])
        );
    }

    #[test]
    fn capability_args_from_annotations() {
        let mut ann = std::collections::BTreeMap::new();
        let c = capability_args(&ann, &[]).unwrap();
        assert_eq!(Value::Object(c), json!({"portMappings": []}));
        ann.insert("kubernetes.io/ingress-bandwidth".to_string(), "10M".to_string());
        let c = capability_args(&ann, &[]).unwrap();
        assert_eq!(
            c["bandwidth"],
            json!({"ingressRate": 10_000_000u64, "ingressBurst": 4294967295u64})
        );
        ann.insert("kubernetes.io/egress-bandwidth".to_string(), "what".to_string());
        assert!(capability_args(&ann, &[]).is_err());
    }

    #[test]
    fn quantities() {
        assert_eq!(parse_quantity("100").unwrap(), 100);
        assert_eq!(parse_quantity("1.5k").unwrap(), 1500);
        assert_eq!(parse_quantity("2Mi").unwrap(), 2 * 1024 * 1024);
        assert!(parse_quantity("1Q").is_err());
        assert!(parse_quantity("M").is_err());
    }

    #[test]
    fn result_addresses() {
        let r = json!({"ips": [{"address": "10.65.0.2/26"}, {"address": "fd00::2/128"}]});
        assert_eq!(result_ips(&r), ["10.65.0.2", "fd00::2"]);
        assert!(result_ips(&json!({})).is_empty());
    }

    /// A fake plugin: records its stdin and environment in `<dir>/calls`,
    /// then prints a result naming itself, or a CNI error when the file
    /// `fail-<type>` exists beside it.
    fn fake_plugins(dir: &Path, types: &[&str]) {
        for t in types {
            let script = format!(
                "#!/bin/sh\n\
                 input=$(cat)\n\
                 echo \"{t} $CNI_COMMAND $CNI_CONTAINERID $CNI_IFNAME $CNI_NETNS $CNI_ARGS $CNI_PATH $input\" >> {calls}\n\
                 if [ \"$CNI_COMMAND\" = DEL ]; then exit 0; fi\n\
                 if [ -e {fail} ]; then echo '{{\"cniVersion\":\"1.0.0\",\"code\":7,\"msg\":\"no way\",\"details\":\"d\"}}'; echo oops >&2; exit 1; fi\n\
                 echo '{{\"cniVersion\":\"1.0.0\",\"interfaces\":[{{\"name\":\"{t}\"}}],\"ips\":[{{\"address\":\"10.65.0.9/32\",\"interface\":0}}]}}'\n",
                calls = dir.join("calls").display(),
                fail = dir.join(format!("fail-{t}")).display()
            );
            let p = dir.join(t);
            std::fs::write(&p, script).unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
    }

    #[test]
    fn chain_add_passes_results_and_del_runs_in_reverse() {
        let dir = std::env::temp_dir().join(format!("ocelot-lab-cni-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("bin")).unwrap();
        fake_plugins(&dir.join("bin"), &["ocelot", "portmap", "bandwidth"]);
        // The fake writes `calls` relative to its own dir.
        let calls = dir.join("bin").join("calls");
        let list = render(&template(), Path::new("/s"), 1500).unwrap();
        let runner = Runner {
            cni_path: vec![dir.join("empty"), dir.join("bin")],
            runtime_netns: None,
            timeout: Duration::from_secs(10),
            log: Some(dir.join("cni.log")),
        };
        let att = Attachment {
            container_id: "c0ffee".into(),
            netns: "/run/netns/p".into(),
            ifname: "eth0".into(),
            args: cni_args("x", "a", "c0ffee", "u"),
        };
        let caps = capability_args(&Default::default(), &[]).unwrap();
        let result = add(&runner, &list, &att, &caps).unwrap();
        assert_eq!(result["interfaces"][0]["name"], "bandwidth", "the last plugin's result");
        let text = std::fs::read_to_string(&calls).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[0].starts_with("ocelot ADD c0ffee eth0 /run/netns/p IgnoreUnknown=1;"));
        assert!(lines[0].contains(&format!(
            "{}:{}",
            dir.join("empty").display(),
            dir.join("bin").display()
        )));
        assert!(!lines[0].contains("prevResult"));
        assert!(lines[1].starts_with("portmap ADD"));
        assert!(lines[1].contains(
            "\"prevResult\":{\"cniVersion\":\"1.0.0\",\"interfaces\":[{\"name\":\"ocelot\"}]"
        ));
        assert!(lines[1].contains("\"runtimeConfig\":{\"portMappings\":[]}"));
        assert!(lines[2].contains("\"interfaces\":[{\"name\":\"portmap\"}]"));
        std::fs::remove_file(&calls).unwrap();

        del(&runner, &list, &att, &caps, Some(&result)).unwrap();
        let text = std::fs::read_to_string(&calls).unwrap();
        let order: Vec<&str> = text.lines().map(|l| l.split(' ').next().unwrap()).collect();
        assert_eq!(order, ["bandwidth", "portmap", "ocelot"]);
        assert!(text.lines().all(|l| l.contains("\"interfaces\":[{\"name\":\"bandwidth\"}]")));
        std::fs::remove_file(&calls).unwrap();

        // A failing plugin stops the chain with its CNI error.
        std::fs::write(dir.join("bin").join("fail-portmap"), "").unwrap();
        let e = add(&runner, &list, &att, &caps).unwrap_err().to_string();
        assert!(e.contains("plugin portmap failed with code 7: no way (d)"), "{e}");
        assert!(e.contains("stderr: oops"), "{e}");
        let text = std::fs::read_to_string(&calls).unwrap();
        assert_eq!(text.lines().count(), 2, "bandwidth never ran");
        assert!(std::fs::read_to_string(dir.join("cni.log")).unwrap().contains("--- portmap ADD"));

        // A plugin that is nowhere on CNI_PATH.
        let bare = Runner { cni_path: vec![dir.join("empty")], ..runner.clone() };
        assert!(add(&bare, &list, &att, &caps).unwrap_err().to_string().contains("not found"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_hung_plugin_is_killed() {
        let dir = std::env::temp_dir().join(format!("ocelot-lab-cni-hang-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("hang");
        std::fs::write(&p, "#!/bin/sh\nexec sleep 30\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        let runner = Runner {
            cni_path: vec![dir.clone()],
            runtime_netns: None,
            timeout: Duration::from_millis(300),
            log: None,
        };
        let att = Attachment {
            container_id: "c".into(),
            netns: "/x".into(),
            ifname: "eth0".into(),
            args: String::new(),
        };
        let t0 = std::time::Instant::now();
        let e = runner.exec("hang", "ADD", &att, b"{}").unwrap_err();
        assert!(e.to_string().contains("timed out"), "{e}");
        assert!(t0.elapsed() < Duration::from_secs(5));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

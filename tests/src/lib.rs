//! A small toolkit for privileged tests and benchmarks on network
//! namespaces: uniquely named namespaces that are deleted when dropped (also
//! when a test panics), child processes that are killed when dropped, and
//! the paths of the project's binaries.
//!
//! Tests shell out to `ip` to build their scaffolding (that is test code, not
//! product code: the product configures links through netlink).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A unique name with the given prefix: `<prefix><pid>x<seq>`, short enough
/// for interface names when the prefix is.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}{}x{}", std::process::id() % 100_000, SEQ.fetch_add(1, Ordering::Relaxed))
}

/// Run a command, panicking with its output when it fails.
pub fn sh(cmd: &str) -> String {
    let out = Command::new("sh").arg("-c").arg(cmd).output().expect("spawn sh");
    if !out.status.success() {
        panic!(
            "`{cmd}` failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Run a command and return its output whatever its status.
pub fn sh_out(cmd: &str) -> Output {
    Command::new("sh").arg("-c").arg(cmd).output().expect("spawn sh")
}

/// A network namespace deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(prefix: &str) -> Netns {
        let name = unique(prefix);
        sh(&format!("ip netns add {name}"));
        sh(&format!("ip -n {name} link set lo up"));
        Netns { name }
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/var/run/netns/{}", self.name))
    }

    /// `ip netns exec NAME` + `cmd`, through sh.
    pub fn exec(&self, cmd: &str) -> String {
        sh(&format!("ip netns exec {} {cmd}", self.name))
    }

    pub fn exec_out(&self, cmd: &str) -> Output {
        sh_out(&format!("ip netns exec {} {cmd}", self.name))
    }

    /// Start a long-running command in the namespace.
    pub fn spawn(&self, cmd: &str, log: &Path) -> Proc {
        spawn_in(&self.name, cmd, log)
    }

    /// True when `ping` from this namespace reaches `ip`.
    pub fn ping(&self, ip: &str) -> bool {
        self.exec_out(&format!("ping -c 1 -W 1 {ip}")).status.success()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Kill what still runs inside, then delete.
        let _ = sh_out(&format!("ip netns pids {} | xargs -r kill -9", self.name));
        let _ = sh_out(&format!("ip netns del {}", self.name));
    }
}

/// Start a long-running command (through sh) in the named network
/// namespace, which this test does not own (a lab's, say); its output goes
/// to `log`.
pub fn spawn_in(netns: &str, cmd: &str, log: &Path) -> Proc {
    let f = std::fs::File::create(log).expect("create log");
    let child = Command::new("ip")
        .args(["netns", "exec", netns, "sh", "-c", &format!("exec {cmd}")])
        .stdin(Stdio::null())
        .stdout(Stdio::from(f.try_clone().expect("dup log")))
        .stderr(Stdio::from(f))
        .spawn()
        .expect("spawn");
    Proc { child: Some(child), log: log.to_path_buf() }
}

/// A child process killed (SIGKILL) on drop.
pub struct Proc {
    child: Option<Child>,
    pub log: PathBuf,
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, |c| c.id())
    }

    /// `kill -9` now.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait.
    pub fn terminate(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = sh_out(&format!("kill -TERM {}", c.id()));
            let _ = c.wait();
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Poll `f` until it is true or `timeout` passes.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    f()
}

/// The directory holding the workspace's built binaries (the profile the
/// tests were built with).
pub fn bin_dir() -> PathBuf {
    if let Ok(d) = std::env::var("OCELOT_BIN_DIR") {
        return PathBuf::from(d);
    }
    let exe = std::env::current_exe().expect("current exe");
    let own = exe.parent().expect("exe dir").to_path_buf();
    // A binary in target/<profile>/ has its siblings next to it; a test in
    // target/<profile>/deps/ has them one level up.
    if own.join("ocelot-dataplane").exists() {
        return own;
    }
    own.parent().expect("target dir").to_path_buf()
}

/// Path of a workspace binary, e.g. `ocelot-dataplane`.
pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(p.exists(), "{} not built (run cargo build --workspace --bins first)", p.display());
    p
}

/// A scratch directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(prefix: &str) -> TempDir {
        let p = std::env::temp_dir().join(unique(prefix));
        std::fs::create_dir_all(&p).expect("mkdir");
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A node running the dataplane, with pods attached through its API.
pub struct DataplaneNode {
    pub ns: Netns,
    pub dir: TempDir,
    pub proc: Proc,
    pub node_ip: String,
    extra_args: String,
}

impl DataplaneNode {
    /// A node namespace with `node_ip`/32 on lo, running the dataplane with
    /// `pool` routed to it.
    pub fn start(prefix: &str, node_ip: &str, pool: &str, extra_args: &str) -> DataplaneNode {
        let ns = Netns::new(prefix);
        ns.exec(&format!("ip addr add {node_ip}/32 dev lo"));
        let dir = TempDir::new("ocelot-dp-");
        let extra_args = format!("--pool {pool} {extra_args}");
        let proc = Self::spawn_dataplane(&ns, &dir, &extra_args, "dataplane.log");
        let n = DataplaneNode { ns, dir, proc, node_ip: node_ip.into(), extra_args };
        n.wait_ready();
        n
    }

    fn spawn_dataplane(ns: &Netns, dir: &TempDir, extra: &str, log: &str) -> Proc {
        let d = &dir.0;
        ns.spawn(
            &format!(
                "{} run --state-dir {} --socket {}/dp.sock {extra}",
                bin("ocelot-dataplane").display(),
                d.display(),
                d.display()
            ),
            &d.join(log),
        )
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.0.join("dp.sock")
    }

    fn wait_ready(&self) {
        let ok = wait_until(Duration::from_secs(10), || {
            ocelot_dataplane::api::client::Client::connect(&self.socket(), "test").is_ok()
        });
        assert!(ok, "dataplane did not come up:\n{}", self.proc.log_text());
    }

    /// `kill -9` the dataplane and start it again on the same state.
    pub fn crash_and_restart(&mut self) {
        self.proc.kill();
        let _ = std::fs::remove_file(self.socket());
        self.proc =
            Self::spawn_dataplane(&self.ns, &self.dir, &self.extra_args, "dataplane-restarted.log");
        self.wait_ready();
    }

    /// Attach a new pod namespace with `ip` through the dataplane CLI.
    pub fn add_pod(&self, prefix: &str, ip: &str) -> Netns {
        let pod = Netns::new(prefix);
        let name = unique("ocp");
        sh(&format!(
            "{} endpoint add --socket {} --name {name} --netns {} --ip {ip} --configure",
            bin("ocelot-dataplane").display(),
            self.socket().display(),
            pod.path().display()
        ));
        pod
    }

    /// The dataplane's counters as JSON.
    pub fn counters(&self) -> serde_json::Value {
        let out = sh(&format!(
            "{} stats -o json --socket {}",
            bin("ocelot-dataplane").display(),
            self.socket().display()
        ));
        serde_json::from_str(&out).expect("stats json")
    }
}

/// A node of a small cluster: a node namespace running the dataplane and the
/// agent, over a datastore directory shared with the other nodes.
pub struct AgentNode {
    pub ns: Netns,
    pub dir: TempDir,
    pub name: String,
    pub dataplane: Proc,
    pub agent: Proc,
    datastore: PathBuf,
}

impl AgentNode {
    pub fn start(name: &str, node_ip: &str, datastore: &Path) -> AgentNode {
        let ns = Netns::new("octn");
        ns.exec(&format!("ip addr add {node_ip}/32 dev lo"));
        let dir = TempDir::new("ocelot-node-");
        let dataplane = Self::spawn_dataplane(&ns, &dir, "dataplane.log");
        let agent = Self::spawn_agent(&ns, &dir, name, datastore, "agent.log");
        let n = AgentNode {
            ns,
            dir,
            name: name.into(),
            dataplane,
            agent,
            datastore: datastore.to_path_buf(),
        };
        n.wait_ready();
        n
    }

    fn spawn_dataplane(ns: &Netns, dir: &TempDir, log: &str) -> Proc {
        let d = dir.0.display();
        ns.spawn(
            &format!(
                "{} run --state-dir {d}/dp --socket {d}/dp.sock",
                bin("ocelot-dataplane").display()
            ),
            &dir.0.join(log),
        )
    }

    fn spawn_agent(ns: &Netns, dir: &TempDir, name: &str, datastore: &Path, log: &str) -> Proc {
        let d = dir.0.display();
        ns.spawn(
            &format!(
                "{} agent --node {name} --datastore {} --dataplane-socket {d}/dp.sock --cni-socket {d}/cni.sock --poll-ms 100",
                bin("ocelot").display(),
                datastore.display()
            ),
            &dir.0.join(log),
        )
    }

    pub fn cni_socket(&self) -> PathBuf {
        self.dir.0.join("cni.sock")
    }

    fn wait_ready(&self) {
        let ok = wait_until(Duration::from_secs(10), || {
            self.cni_socket().exists() && self.dir.0.join("dp.sock").exists()
        });
        assert!(
            ok,
            "node did not come up:\n{}\n{}",
            self.dataplane.log_text(),
            self.agent.log_text()
        );
    }

    /// `kill -9` the agent and start it again.
    pub fn restart_agent(&mut self) {
        self.agent.kill();
        let _ = std::fs::remove_file(self.cni_socket());
        self.agent = Self::spawn_agent(
            &self.ns,
            &self.dir,
            &self.name,
            &self.datastore,
            "agent-restarted.log",
        );
        self.wait_ready();
    }

    /// `kill -9` the dataplane and start it again.
    pub fn restart_dataplane(&mut self) {
        self.dataplane.kill();
        let _ = std::fs::remove_file(self.dir.0.join("dp.sock"));
        self.dataplane = Self::spawn_dataplane(&self.ns, &self.dir, "dataplane-restarted.log");
        self.wait_ready();
    }

    /// The plugin configuration for this node.
    pub fn cni_config(&self, version: &str) -> String {
        format!(
            r#"{{"cniVersion":"{version}","name":"ocelot","type":"ocelot","agentSocket":"{}"}}"#,
            self.cni_socket().display()
        )
    }

    /// Run `ocelot-cni` as a runtime would, from the node's namespace.
    pub fn cni(
        &self,
        command: &str,
        container: &str,
        netns: &Path,
        pod: &str,
        stdin: &str,
    ) -> Output {
        let (ns, name) = pod.split_once('/').unwrap_or(("default", pod));
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.ns.name])
            .arg(bin("ocelot-cni"))
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", container)
            .env("CNI_NETNS", netns)
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", bin_dir())
            .env("CNI_ARGS", format!("IgnoreUnknown=1;K8S_POD_NAMESPACE={ns};K8S_POD_NAME={name};K8S_POD_INFRA_CONTAINER_ID={container}"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn ocelot-cni");
        use std::io::Write as _;
        child.stdin.take().expect("stdin").write_all(stdin.as_bytes()).expect("write stdin");
        child.wait_with_output().expect("ocelot-cni")
    }
}

/// A running `ocelot lab` (see `ocelot lab --help`), taken down on drop,
/// also when the test fails. Its namespaces are named as the lab names
/// them: `ocl-<lab>-fabric`, `ocl-<lab>-node-<node>`, `ocl-<lab>-pod-<ns>.<pod>`.
pub struct Lab {
    pub name: String,
    pub run_dir: TempDir,
}

impl Lab {
    /// `ocelot lab up -f file` under a fresh name and run directory.
    pub fn up(file: &str) -> Lab {
        let lab = Lab { name: unique("t"), run_dir: TempDir::new("ocelot-lab-") };
        lab.ocelot(&format!("up -f {file}"));
        lab
    }

    /// `ocelot lab up` of YAML text.
    pub fn up_yaml(yaml: &str) -> Lab {
        let lab = Lab { name: unique("t"), run_dir: TempDir::new("ocelot-lab-") };
        let file = lab.input(yaml);
        lab.ocelot(&format!("up -f {}", file.display()));
        lab
    }

    /// YAML text as a file beside the lab (removed with the run directory).
    fn input(&self, yaml: &str) -> PathBuf {
        let file = self.run_dir.0.join(format!("{}.yaml", unique("input-")));
        std::fs::write(&file, yaml).expect("write lab input");
        file
    }

    /// `ocelot lab <sub> --name .. --run-dir .. <rest>`; panics when it fails.
    pub fn ocelot(&self, args: &str) -> String {
        let (sub, rest) = args.split_once(' ').unwrap_or((args, ""));
        sh(&format!(
            "{} lab {sub} --name {} --run-dir {} {rest} 2>&1",
            bin("ocelot").display(),
            self.name,
            self.run_dir.0.display()
        ))
    }

    /// `ocelot lab apply` of YAML text.
    pub fn apply(&self, yaml: &str) {
        let file = self.input(yaml);
        self.ocelot(&format!("apply -f {}", file.display()));
    }

    /// The reachability matrix for one port: `{"ns/from": {"ns/to": bool}}`.
    pub fn probe(&self, port: u16, proto: &str) -> serde_json::Value {
        let out = self
            .ocelot(&format!("probe --port {port} --protocol {proto} -o json --timeout-ms 500"));
        let start = out.find('[').expect("probe JSON");
        let v: serde_json::Value = serde_json::from_str(&out[start..]).expect("probe JSON");
        v[0]["matrix"].clone()
    }

    /// `ocelot lab get pods -o json`.
    pub fn pods(&self) -> serde_json::Value {
        let out = self.ocelot("get pods -o json");
        let start = out.find(['[', '{']).expect("pods JSON");
        serde_json::from_str(&out[start..]).expect("pods JSON")
    }

    /// `ocelot lab get nodes -o json`.
    pub fn nodes(&self) -> serde_json::Value {
        let out = self.ocelot("get nodes -o json");
        let start = out.find('[').expect("nodes JSON");
        serde_json::from_str(&out[start..]).expect("nodes JSON")
    }

    /// The address of pod `ns/name`.
    pub fn pod_ip(&self, key: &str) -> String {
        let pods = self.pods();
        let list = pods.as_array().expect("pod list");
        let p = list
            .iter()
            .find(|p| {
                format!(
                    "{}/{}",
                    p["namespace"].as_str().unwrap_or(""),
                    p["name"].as_str().unwrap_or("")
                ) == key
            })
            .unwrap_or_else(|| panic!("no pod {key} in {pods}"));
        p["ip"].as_str().unwrap_or_else(|| panic!("pod {key} has no address: {p}")).to_string()
    }

    /// A node's underlay address (its InternalIP).
    pub fn node_ip(&self, node: &str) -> String {
        let nodes = self.nodes();
        let n = nodes
            .as_array()
            .expect("node list")
            .iter()
            .find(|n| n["name"] == node)
            .unwrap_or_else(|| panic!("no node {node} in {nodes}"));
        n["internalIP"].as_str().expect("internalIP").to_string()
    }

    pub fn fabric_netns(&self) -> String {
        format!("ocl-{}-fabric", self.name)
    }

    pub fn node_netns(&self, node: &str) -> String {
        format!("ocl-{}-node-{node}", self.name)
    }

    /// The namespace of pod `ns/name`.
    pub fn pod_netns(&self, key: &str) -> String {
        let (ns, name) = key.split_once('/').expect("pod key ns/name");
        format!("ocl-{}-pod-{ns}.{name}", self.name)
    }

    /// The shared datastore directory the agents watch.
    pub fn datastore(&self) -> PathBuf {
        self.run_dir.0.join(&self.name).join("datastore")
    }

    /// Run `cmd` in a node's namespace; panics when it fails.
    pub fn node_exec(&self, node: &str, cmd: &str) -> String {
        sh(&format!("ip netns exec {} {cmd}", self.node_netns(node)))
    }

    pub fn node_exec_out(&self, node: &str, cmd: &str) -> Output {
        sh_out(&format!("ip netns exec {} {cmd}", self.node_netns(node)))
    }

    /// Run `cmd` in pod `ns/name`'s namespace; panics when it fails.
    pub fn pod_exec(&self, key: &str, cmd: &str) -> String {
        sh(&format!("ip netns exec {} {cmd}", self.pod_netns(key)))
    }

    pub fn pod_exec_out(&self, key: &str, cmd: &str) -> Output {
        sh_out(&format!("ip netns exec {} {cmd}", self.pod_netns(key)))
    }

    /// `ocelot-dataplane <sub> -o json` against a node's dataplane.
    pub fn dataplane(&self, node: &str, sub: &str) -> serde_json::Value {
        let socket = self.run_dir.0.join(&self.name).join("nodes").join(node).join("dp.sock");
        let out = self.node_exec(
            node,
            &format!(
                "{} {sub} -o json --socket {}",
                bin("ocelot-dataplane").display(),
                socket.display()
            ),
        );
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{sub} JSON: {e}: {out}"))
    }

    /// A node's dataplane counters (`ocelot-dataplane stats`).
    pub fn stats(&self, node: &str) -> serde_json::Value {
        self.dataplane(node, "stats")
    }

    /// A node's dataplane state (`ocelot-dataplane state`): endpoints, overlay.
    pub fn state(&self, node: &str) -> serde_json::Value {
        self.dataplane(node, "state")
    }

    /// What the lab left behind: namespaces, processes naming its run
    /// directory, its directory.
    pub fn leftovers(&self) -> Vec<String> {
        let prefix = format!("ocl-{}-", self.name);
        let mut left: Vec<String> = sh("ip netns list")
            .lines()
            .filter(|l| l.starts_with(&prefix))
            .map(String::from)
            .collect();
        // Any process whose command line names this lab's directory.
        let needle = self.run_dir.0.display().to_string();
        for e in std::fs::read_dir("/proc").expect("/proc").flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else { continue };
            let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
            if pid != std::process::id() && String::from_utf8_lossy(&cmd).contains(&needle) {
                left.push(format!(
                    "process {pid}: {}",
                    String::from_utf8_lossy(&cmd).replace('\0', " ")
                ));
            }
        }
        let dir = self.run_dir.0.join(&self.name);
        if dir.exists() {
            left.push(format!("directory {}", dir.display()));
        }
        left
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = sh_out(&format!(
            "{} lab down --name {} --run-dir {}",
            bin("ocelot").display(),
            self.name,
            self.run_dir.0.display()
        ));
    }
}

/// Lab commands whose failure the caller reports rather than panics on,
/// and probes of several ports at once.
impl Lab {
    /// `ocelot lab <sub> --name .. --run-dir .. <rest>`: its output (stdout
    /// and stderr), or, when it fails, an error that includes it.
    pub fn try_ocelot(&self, args: &str) -> Result<String, String> {
        let (sub, rest) = args.split_once(' ').unwrap_or((args, ""));
        let cmd = format!(
            "{} lab {sub} --name {} --run-dir {} {rest} 2>&1",
            bin("ocelot").display(),
            self.name,
            self.run_dir.0.display()
        );
        let out = sh_out(&cmd);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success() {
            Ok(text)
        } else {
            Err(format!("`ocelot lab {sub}` failed ({}):\n{text}", out.status))
        }
    }

    /// `ocelot lab apply` of YAML text; the error names what went wrong.
    pub fn try_apply(&self, yaml: &str) -> Result<(), String> {
        let file = self.input(yaml);
        self.try_ocelot(&format!("apply -f {}", file.display())).map(drop)
    }

    /// `ocelot lab delete` of YAML text (pods get CNI DEL; other objects
    /// leave the datastore).
    pub fn try_delete(&self, yaml: &str) -> Result<(), String> {
        let file = self.input(yaml);
        self.try_ocelot(&format!("delete -f {}", file.display())).map(drop)
    }

    /// Probe several (port, protocol) pairs at once: one `ocelot lab probe`
    /// per pair, all running concurrently. Each pair's answer is its JSON
    /// object, `{"port", "protocol", "matrix": {"ns/from": {"ns/to": bool}},
    /// "note"?}`, or why there is none.
    pub fn probe_many(
        &self,
        targets: &[(u16, &str)],
        timeout_ms: u64,
    ) -> Vec<Result<serde_json::Value, String>> {
        self.probe_many_with(targets, timeout_ms, &[])
    }

    /// [`Lab::probe_many`] with more `ocelot lab probe` flags (say
    /// `--via-services`).
    pub fn probe_many_with(
        &self,
        targets: &[(u16, &str)],
        timeout_ms: u64,
        extra: &[&str],
    ) -> Vec<Result<serde_json::Value, String>> {
        let children: Vec<Result<Child, String>> = targets
            .iter()
            .map(|(port, proto)| {
                Command::new(bin("ocelot"))
                    .args(["lab", "probe", "--name", &self.name, "--run-dir"])
                    .arg(&self.run_dir.0)
                    .args(["--port", &port.to_string(), "--protocol", proto, "-o", "json"])
                    .args(["--timeout-ms", &timeout_ms.to_string()])
                    .args(extra)
                    .stdin(Stdio::null())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .map_err(|e| format!("spawning ocelot lab probe: {e}"))
            })
            .collect();
        children
            .into_iter()
            .map(|child| {
                let out =
                    child?.wait_with_output().map_err(|e| format!("ocelot lab probe: {e}"))?;
                let stdout = String::from_utf8_lossy(&out.stdout);
                if !out.status.success() {
                    return Err(format!(
                        "ocelot lab probe failed ({}): {}{}",
                        out.status,
                        stdout,
                        String::from_utf8_lossy(&out.stderr)
                    ));
                }
                let all: serde_json::Value = serde_json::from_str(&stdout)
                    .map_err(|e| format!("probe JSON: {e}: {stdout}"))?;
                all.get(0).cloned().ok_or_else(|| format!("probe JSON holds no matrix: {stdout}"))
            })
            .collect()
    }

    /// A node's directory: its sockets, `agent.log`, `dataplane.log`.
    pub fn node_dir(&self, node: &str) -> PathBuf {
        self.run_dir.0.join(&self.name).join("nodes").join(node)
    }
}

/// Wait until something listens on TCP `port` in namespace `netns`.
pub fn wait_listening(netns: &str, port: u16) {
    let ok = wait_until(Duration::from_secs(5), || {
        !sh_out(&format!("ip netns exec {netns} ss -Hltn 'sport = :{port}'")).stdout.is_empty()
    });
    assert!(ok, "nothing listens on {port} in {netns}");
}

/// Send `bytes` random bytes over one TCP connection from namespace
/// `client` to `ip`:`port`, where `nc` in namespace `server` counts them;
/// returns how many arrived.
pub fn tcp_transfer(server: &str, client: &str, ip: &str, port: u16, bytes: u64) -> u64 {
    let dir = TempDir::new("ocelot-xfer-");
    let count = dir.0.join("count");
    let _server = spawn_in(
        server,
        &format!("sh -c 'timeout 60 nc -d -l -p {port} | wc -c > {}'", count.display()),
        &dir.0.join("server.log"),
    );
    wait_listening(server, port);
    let out = sh_out(&format!(
        "head -c {bytes} /dev/urandom | ip netns exec {client} timeout 60 nc -N {ip} {port}"
    ));
    assert!(
        out.status.success(),
        "TCP {client} -> {ip}:{port} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let mut got = None;
    wait_until(Duration::from_secs(10), || {
        got = std::fs::read_to_string(&count).ok().and_then(|s| s.trim().parse().ok());
        got.is_some()
    });
    got.unwrap_or_else(|| panic!("the receiver in {server} never finished"))
}

//! Conformance tests of the real `ocelot-cni` binary against the checklist
//! in `shared/conformance/cni_spec_checklist.md`.
//!
//! Each test runs the built binary with a controlled environment (cleared,
//! then only the `CNI_*` variables the test sets) and stdin, against a FAKE
//! agent: a unix-socket server thread that records every request and answers
//! scripted `CniResponse`s. No root and no namespaces are needed: the fake
//! agent does nothing with the netns path. Test names start with the
//! checklist ID they cover (e.g. `env_08_...` is [ENV-08]).

use ocelot_cni::proto::{
    Attachment, CniRequest, CniResponse, CniResult, Command, Interface, IpConfig, Route,
};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command as Process, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_ocelot-cni");
const ALL_VERSIONS: [&str; 7] = ["0.1.0", "0.2.0", "0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];
const NETNS: &str = "/run/netns/ocelot-conformance-pod";

// ---------------------------------------------------------------------------
// Scratch directories

static COUNTER: AtomicUsize = AtomicUsize::new(0);

struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Scratch {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let dir = std::env::temp_dir().join(format!("ocelot-cni-t{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }
    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

// ---------------------------------------------------------------------------
// The fake agent

enum Reply {
    /// Answer this response line.
    Json(CniResponse),
    /// Answer after a delay.
    Delayed(Duration, CniResponse),
    /// Answer these raw bytes.
    Raw(&'static [u8]),
    /// Close without answering.
    Hangup,
}

type Responder = dyn Fn(&CniRequest) -> Reply + Send + Sync;

struct FakeAgent {
    scratch: Scratch,
    socket: PathBuf,
    requests: Arc<Mutex<Vec<CniRequest>>>,
    stop: Arc<AtomicBool>,
}

impl FakeAgent {
    /// An agent that behaves: ADD answers [`pod_result`] for the request's
    /// netns, everything else answers `ok`.
    fn start() -> FakeAgent {
        FakeAgent::with(|req| match req.command {
            Command::Add => Reply::Json(CniResponse::Ok {
                result: Some(pod_result(req.netns.as_deref().unwrap_or_default(), &req.ifname)),
            }),
            _ => Reply::Json(CniResponse::Ok { result: None }),
        })
    }

    fn with(responder: impl Fn(&CniRequest) -> Reply + Send + Sync + 'static) -> FakeAgent {
        let scratch = Scratch::new();
        let socket = scratch.path("cni.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let responder: Arc<Responder> = Arc::new(responder);
        {
            let (requests, stop) = (requests.clone(), stop.clone());
            thread::spawn(move || {
                for conn in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        return;
                    }
                    let Ok(conn) = conn else { continue };
                    let (requests, responder) = (requests.clone(), responder.clone());
                    thread::spawn(move || serve(conn, &requests, &*responder));
                }
            });
        }
        FakeAgent { scratch, socket, requests, stop }
    }

    fn requests(&self) -> Vec<CniRequest> {
        self.requests.lock().unwrap().clone()
    }

    fn last(&self) -> CniRequest {
        self.requests().pop().expect("the agent got no request")
    }

    /// A plugin configuration pointing at this agent.
    fn conf(&self, version: &str) -> Value {
        json!({
            "cniVersion": version,
            "name": "ocelot-net",
            "type": "ocelot",
            "agentSocket": self.socket,
            "timeoutSeconds": 5,
        })
    }
}

impl Drop for FakeAgent {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = UnixStream::connect(&self.socket); // wake the accept loop
        let _ = &self.scratch;
    }
}

fn serve(conn: UnixStream, requests: &Mutex<Vec<CniRequest>>, responder: &Responder) {
    let mut line = String::new();
    if BufReader::new(&conn).read_line(&mut line).is_err() || line.is_empty() {
        return;
    }
    let req: CniRequest = serde_json::from_str(line.trim_end())
        .unwrap_or_else(|e| panic!("the plugin sent a bad request ({e}): {line}"));
    let reply = responder(&req);
    requests.lock().unwrap().push(req);
    let mut conn = conn;
    let answer = |r: &CniResponse| {
        let mut v = serde_json::to_vec(r).unwrap();
        v.push(b'\n');
        v
    };
    let _ = match reply {
        Reply::Json(r) => conn.write_all(&answer(&r)),
        Reply::Delayed(d, r) => {
            thread::sleep(d);
            conn.write_all(&answer(&r))
        }
        Reply::Raw(b) => conn.write_all(b),
        Reply::Hangup => Ok(()),
    };
}

/// What a real agent would answer for a pod: one interface in the pod's
/// netns, one IPv4 and one IPv6 address on it, default routes.
fn pod_result(netns: &str, ifname: &str) -> CniResult {
    CniResult {
        interfaces: vec![Interface {
            name: ifname.to_string(),
            mac: "ee:ee:ee:ee:ee:ee".into(),
            mtu: Some(1450),
            sandbox: netns.to_string(),
            ..Default::default()
        }],
        ips: vec![
            IpConfig {
                interface: Some(0),
                address: "10.244.1.7/32".into(),
                gateway: Some("169.254.1.1".into()),
            },
            IpConfig { interface: Some(0), address: "fd00:10:244::7/128".into(), gateway: None },
        ],
        routes: vec![
            Route { dst: "0.0.0.0/0".into(), gw: Some("169.254.1.1".into()), ..Default::default() },
            Route { dst: "::/0".into(), ..Default::default() },
        ],
        dns: Default::default(),
    }
}

// ---------------------------------------------------------------------------
// Running the binary

struct Call {
    env: Vec<(String, String)>,
    stdin: String,
}

#[derive(Debug)]
struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Out {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {self:?}"))
    }

    /// [EXE-03][EXE-04][ERR-01] a failure: non-zero exit, the error object
    /// on stdout; returns its code.
    fn error_code(&self) -> u64 {
        assert_ne!(self.code, 0, "expected a failure: {self:?}");
        let v = self.json();
        let obj = v.as_object().expect("error is an object");
        assert!(obj["cniVersion"].is_string(), "{v}");
        assert!(obj["msg"].is_string(), "{v}");
        assert!(obj.get("details").is_none_or(Value::is_string), "{v}");
        for k in obj.keys() {
            assert!(["cniVersion", "code", "msg", "details"].contains(&k.as_str()), "{v}");
        }
        obj["code"].as_u64().expect("numeric code")
    }

    fn msg(&self) -> String {
        self.json()["msg"].as_str().unwrap_or_default().to_string()
    }

    /// [EXE-03][DEL-06][CHK-09] success with nothing on stdout.
    fn assert_silent_success(&self) {
        assert_eq!(self.code, 0, "{self:?}");
        assert_eq!(self.stdout.trim(), "", "{self:?}");
    }
}

/// A call with the environment a runtime would give `cmd`.
fn call(cmd: &str) -> Call {
    let mut env = vec![("CNI_COMMAND", cmd)];
    if matches!(cmd, "ADD" | "DEL" | "CHECK") {
        env.extend([
            ("CNI_CONTAINERID", "ctr-0123456789abcdef"),
            ("CNI_NETNS", NETNS),
            ("CNI_IFNAME", "eth0"),
            ("CNI_ARGS", "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0"),
        ]);
    }
    if cmd != "VERSION" {
        env.push(("CNI_PATH", "/opt/cni/bin"));
    }
    Call {
        env: env.into_iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        stdin: String::new(),
    }
}

/// A call with no environment at all.
fn bare() -> Call {
    Call { env: Vec::new(), stdin: String::new() }
}

impl Call {
    fn env(mut self, k: &str, v: &str) -> Call {
        self.env.retain(|(key, _)| key != k);
        self.env.push((k.to_string(), v.to_string()));
        self
    }
    fn unset(mut self, k: &str) -> Call {
        self.env.retain(|(key, _)| key != k);
        self
    }
    fn stdin(mut self, v: &Value) -> Call {
        self.stdin = v.to_string();
        self
    }
    fn raw_stdin(mut self, s: &str) -> Call {
        self.stdin = s.to_string();
        self
    }
    fn run(self) -> Out {
        let mut child = Process::new(BIN)
            .env_clear()
            .envs(self.env)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        let input = self.stdin;
        let writer = thread::spawn(move || {
            let _ = stdin.write_all(input.as_bytes());
        });
        let out = child.wait_with_output().unwrap();
        writer.join().unwrap();
        let code = out.status.code().expect("killed by a signal");
        assert_ne!(code, 101, "the plugin panicked: {}", String::from_utf8_lossy(&out.stderr));
        Out {
            code,
            stdout: String::from_utf8(out.stdout).unwrap(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }
}

fn vectors() -> Vec<Value> {
    let all: Value = serde_json::from_str(include_str!("data/cni_result_vectors.json")).unwrap();
    all["vectors"].as_array().unwrap().clone()
}

fn vector(from: &str, test: &str) -> Value {
    vectors().into_iter().find(|v| v["from"] == from && v["test"] == test).unwrap()["json"].clone()
}

fn with(mut v: Value, k: &str, x: Value) -> Value {
    v[k] = x;
    v
}

fn without(mut v: Value, k: &str) -> Value {
    v.as_object_mut().unwrap().remove(k);
    v
}

/// A configuration whose agent socket does not exist.
fn conf_no_agent(dir: &Scratch, version: &str) -> Value {
    json!({"cniVersion": version, "name": "ocelot-net", "type": "ocelot",
           "agentSocket": dir.path("absent.sock")})
}

// ---------------------------------------------------------------------------
// The test data is the shared one

#[test]
fn res_08_vectors_are_the_shared_copy() {
    // tests/data holds a copy of shared/conformance/cni_result_vectors.json so
    // that the crate builds alone; when the shared tree is next to the
    // checkout, check the copy has not drifted.
    let shared = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/conformance/cni_result_vectors.json");
    if let Ok(text) = std::fs::read_to_string(shared) {
        let theirs: Value = serde_json::from_str(&text).unwrap();
        let ours: Value =
            serde_json::from_str(include_str!("data/cni_result_vectors.json")).unwrap();
        assert_eq!(theirs, ours, "tests/data/cni_result_vectors.json is out of date");
    }
}

// ---------------------------------------------------------------------------
// VERSION

#[test]
fn ver_01_version_reports_every_version() {
    // [VER-01][VER-03][VRS-01] scenario 1: exactly the spec's 1.1.0 example.
    let out = call("VERSION").stdin(&json!({"cniVersion": "1.1.0"})).run();
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(out.json(), vector("SPEC.md", "SPEC.md json block #4"));
    assert_eq!(out.json()["supportedVersions"], json!(ALL_VERSIONS));
}

#[test]
fn ver_02_version_minimal_stdin_needs_only_cni_command() {
    // [VER-02] `{"cniVersion": X}` only (no name, no type), CNI_COMMAND only,
    // and no agent at all. [VER-01] the input version is echoed.
    for v in ALL_VERSIONS {
        let out = bare().env("CNI_COMMAND", "VERSION").stdin(&json!({"cniVersion": v})).run();
        assert_eq!(out.code, 0, "{out:?}");
        assert_eq!(out.json()["cniVersion"], v);
        assert_eq!(out.json()["supportedVersions"], json!(ALL_VERSIONS));
    }
}

#[test]
fn ver_04_version_without_usable_input_says_1_1_0() {
    // [VER-04] like libcni, fall back to "1.1.0" (empty, junk, unknown version).
    for stdin in ["", "not json", r#"{"cniVersion": "9.9.9"}"#, "{}"] {
        let out = bare().env("CNI_COMMAND", "VERSION").raw_stdin(stdin).run();
        assert_eq!(out.code, 0, "{out:?}");
        assert_eq!(out.json()["cniVersion"], "1.1.0");
    }
}

// ---------------------------------------------------------------------------
// Environment

#[test]
fn env_08_missing_ifname_on_add_is_code_4_naming_it() {
    // [ENV-08] scenario 6; the agent is never asked.
    let agent = FakeAgent::start();
    let out = call("ADD").unset("CNI_IFNAME").stdin(&agent.conf("1.1.0")).run();
    assert_eq!(out.error_code(), 4);
    assert!(out.msg().contains("CNI_IFNAME"), "{out:?}");
    assert!(agent.requests().is_empty());
}

#[test]
fn env_07_required_variables_per_command() {
    // [ENV-07][ENV-08][ENV-09] every required variable of every command,
    // missing or empty, is code 4 and named; the list keeps libcni's order.
    let agent = FakeAgent::start();
    let conf = agent.conf("1.1.0");
    let cases: &[(&str, &[&str])] = &[
        ("ADD", &["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"]),
        ("CHECK", &["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"]),
        ("DEL", &["CNI_CONTAINERID", "CNI_IFNAME"]),
        ("GC", &["CNI_PATH"]),
    ];
    for (cmd, vars) in cases {
        for var in *vars {
            for empty in [false, true] {
                let c = call(cmd).stdin(&conf);
                let c = if empty { c.env(var, "") } else { c.unset(var) };
                let out = c.run();
                assert_eq!(out.error_code(), 4, "{cmd} without {var}: {out:?}");
                assert!(out.msg().contains(var), "{cmd} without {var}: {out:?}");
            }
        }
    }
    let out = call("ADD").unset("CNI_NETNS").unset("CNI_IFNAME").stdin(&conf).run();
    assert_eq!(out.msg(), "required env variables [CNI_NETNS,CNI_IFNAME] missing");
    assert!(agent.requests().is_empty());
}

#[test]
fn env_07_optional_variables() {
    // [ENV-07][ENV-06] CNI_ARGS and CNI_PATH are optional for ADD/CHECK/DEL,
    // CNI_NETNS for DEL; STATUS needs nothing but CNI_COMMAND.
    let agent = FakeAgent::start();
    let out = call("ADD").unset("CNI_ARGS").unset("CNI_PATH").stdin(&agent.conf("1.1.0")).run();
    assert_eq!(out.code, 0, "{out:?}");
    assert!(agent.last().args.is_empty());
    call("DEL")
        .unset("CNI_NETNS")
        .unset("CNI_PATH")
        .stdin(&agent.conf("1.1.0"))
        .run()
        .assert_silent_success();
    bare().env("CNI_COMMAND", "STATUS").stdin(&agent.conf("1.1.0")).run().assert_silent_success();
}

#[test]
fn env_12_unknown_or_missing_command() {
    // [ENV-12] unknown -> 4 naming it. Missing -> 4 (ENV-08 is a MUST), with
    // libcni's "about" text on stderr for the human who ran it.
    let out = call("ADD").env("CNI_COMMAND", "FROBNICATE").stdin(&json!({})).run();
    assert_eq!(out.error_code(), 4);
    assert_eq!(out.msg(), "unknown CNI_COMMAND: FROBNICATE");
    let out = bare().run();
    assert_eq!(out.error_code(), 4);
    assert!(out.msg().contains("CNI_COMMAND"));
    assert!(out.stderr.contains("CNI protocol versions supported: 0.1.0"), "{out:?}");
}

#[test]
fn env_10_container_id_validation() {
    // [ENV-02][ENV-10]
    let agent = FakeAgent::start();
    for bad in ["-leading-dash", "has space", "a/b", "semi;colon", "_x"] {
        let out = call("ADD").env("CNI_CONTAINERID", bad).stdin(&agent.conf("1.1.0")).run();
        assert_eq!(out.error_code(), 4, "{bad}");
        assert!(out.msg().contains("CNI_CONTAINERID"), "{out:?}");
        assert_eq!(out.json()["details"], bad);
    }
    assert!(agent.requests().is_empty());
}

#[test]
fn env_11_interface_name_validation() {
    // [ENV-04][ENV-11]
    let agent = FakeAgent::start();
    for bad in ["sixteen-chars-xx", ".", "..", "a/b", "a:b", "a b", "tab\t"] {
        let out = call("ADD").env("CNI_IFNAME", bad).stdin(&agent.conf("1.1.0")).run();
        assert_eq!(out.error_code(), 4, "{bad:?}");
        assert!(out.msg().contains("CNI_IFNAME"), "{out:?}");
    }
    let out = call("ADD").env("CNI_IFNAME", "fifteen-chars-x").stdin(&agent.conf("1.1.0")).run();
    assert_eq!(out.code, 0, "{out:?}");
}

#[test]
fn env_05_cni_args_are_parsed_for_the_agent() {
    // [ENV-05] K=V pairs separated by ';' reach the agent as a map.
    let agent = FakeAgent::start();
    let out = call("ADD")
        .env("CNI_ARGS", "IgnoreUnknown=1;K8S_POD_NAMESPACE=prod;K8S_POD_NAME=db-1;K8S_POD_INFRA_CONTAINER_ID=ctr;K8S_POD_UID=u-1")
        .stdin(&agent.conf("1.1.0"))
        .run();
    assert_eq!(out.code, 0, "{out:?}");
    let args = agent.last().args;
    assert_eq!(args["K8S_POD_NAMESPACE"], "prod");
    assert_eq!(args["K8S_POD_NAME"], "db-1");
    assert_eq!(args["K8S_POD_UID"], "u-1");
    assert_eq!(args["IgnoreUnknown"], "1");
    // Malformed -> 4, naming CNI_ARGS.
    for bad in ["novalue", "A=1;B", "=x"] {
        let out = call("ADD").env("CNI_ARGS", bad).stdin(&agent.conf("1.1.0")).run();
        assert_eq!(out.error_code(), 4, "{bad}");
        assert!(out.msg().contains("CNI_ARGS"), "{out:?}");
    }
    assert_eq!(agent.requests().len(), 1);
}

#[test]
fn env_14_netns_of_the_plugin_itself_is_refused() {
    // [ENV-14] CNI_NETNS = our own netns -> 8 (on DEL too: deleting eth0 in
    // the host's namespace would cut the node off), unless overridden.
    let agent = FakeAgent::start();
    for cmd in ["ADD", "DEL", "CHECK"] {
        let conf = with(agent.conf("1.1.0"), "prevResult", json!({"ips": []}));
        let out = call(cmd).env("CNI_NETNS", "/proc/self/ns/net").stdin(&conf).run();
        assert_eq!(out.error_code(), 8, "{cmd}: {out:?}");
    }
    assert!(agent.requests().is_empty());
    for ov in ["1", "true", "TRUE"] {
        let out = call("ADD")
            .env("CNI_NETNS", "/proc/self/ns/net")
            .env("CNI_NETNS_OVERRIDE", ov)
            .stdin(&agent.conf("1.1.0"))
            .run();
        assert_eq!(out.code, 0, "{out:?}");
    }
}

// ---------------------------------------------------------------------------
// Configuration and decoding errors

#[test]
fn env_13_stdin_not_json_is_code_6() {
    // [ENV-13] scenario 7.
    for bad in ["", "not json", "{\"cniVersion\": ", "[]", "42", "\u{0}\u{1}"] {
        let out = call("ADD").raw_stdin(bad).run();
        assert_eq!(out.error_code(), 6, "{bad:?}");
    }
}

#[test]
fn cfg_02_network_name() {
    // [CFG-02][ENV-13] no name -> 7 "missing network name"; bad characters -> 7.
    let agent = FakeAgent::start();
    let out = call("ADD").stdin(&without(agent.conf("1.1.0"), "name")).run();
    assert_eq!(out.error_code(), 7);
    assert_eq!(out.msg(), "missing network name");
    for bad in ["", "-x", "a b", "../../etc", "a/b", "x\u{0}"] {
        let out = call("ADD").stdin(&with(agent.conf("1.1.0"), "name", json!(bad))).run();
        assert_eq!(out.error_code(), 7, "{bad:?}");
    }
    assert!(agent.requests().is_empty());
}

#[test]
fn cfg_04_plugin_type() {
    // [CFG-04] `type` is required and has no / or \.
    let agent = FakeAgent::start();
    assert_eq!(call("ADD").stdin(&without(agent.conf("1.1.0"), "type")).run().error_code(), 7);
    for bad in ["", "../bin/ocelot", "a\\b"] {
        let out = call("ADD").stdin(&with(agent.conf("1.1.0"), "type", json!(bad))).run();
        assert_eq!(out.error_code(), 7, "{bad:?}");
    }
}

#[test]
fn cfg_05_unknown_keys_accepted_and_config_forwarded_unchanged() {
    // [CFG-05][RUN-09] unknown keys pass; the agent gets the config as is.
    let agent = FakeAgent::start();
    let conf = with(
        with(agent.conf("1.1.0"), "someVendorKey", json!({"deep": [1, 2]})),
        "runtimeConfig",
        json!({"portMappings": [{"hostPort": 8080, "containerPort": 80, "protocol": "tcp"}]}),
    );
    let conf = with(conf, "mtu", json!(1410));
    let out = call("ADD").stdin(&conf).run();
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(agent.last().config, conf);
}

#[test]
fn cfg_plugin_fields_invalid_is_code_7() {
    // Ocelot's own keys: agentSocket, mtu, timeoutSeconds.
    let agent = FakeAgent::start();
    for (k, v) in [
        ("agentSocket", json!("")),
        ("agentSocket", json!(7)),
        ("mtu", json!(10)),
        ("mtu", json!("1450")),
        ("timeoutSeconds", json!(0)),
        ("timeoutSeconds", json!("soon")),
    ] {
        let out = call("ADD").stdin(&with(agent.conf("1.1.0"), k, v.clone())).run();
        assert_eq!(out.error_code(), 7, "{k}={v}");
    }
    assert!(agent.requests().is_empty());
}

#[test]
fn ver_06_unsupported_version_is_code_1() {
    // [VER-06] scenario 7: "9.9.9" -> 1, with libcni's msg and details.
    let agent = FakeAgent::start();
    for cmd in ["ADD", "DEL", "CHECK", "STATUS", "GC"] {
        let out = call(cmd).stdin(&agent.conf("9.9.9")).run();
        assert_eq!(out.error_code(), 1, "{cmd}");
        assert_eq!(out.msg(), "incompatible CNI versions");
        assert!(out.json()["details"].as_str().unwrap().contains("\"9.9.9\""));
    }
    // A missing cniVersion is refused too (we do not guess 0.1.0; README).
    assert_eq!(
        call("ADD").stdin(&without(agent.conf("1.1.0"), "cniVersion")).run().error_code(),
        7
    );
    assert!(agent.requests().is_empty());
}

#[test]
fn err_01_errors_carry_the_config_version() {
    // [ERR-01][EXE-04] the error object is labelled with the config's version.
    let dir = Scratch::new();
    for v in ["0.3.1", "0.4.0", "1.0.0", "1.1.0"] {
        let out = call("ADD").stdin(&conf_no_agent(&dir, v)).run();
        assert_eq!(out.error_code(), 11);
        assert_eq!(out.json()["cniVersion"], v);
    }
}

// ---------------------------------------------------------------------------
// ADD

#[test]
fn add_02_result_in_every_version_matches_the_golden_shape() {
    // [ADD-02][RES-01][RES-02][RES-03][RES-07][RES-08] the agent answers
    // libcni's test result (1.1.0 model); the plugin prints it in the
    // config's version, reproducing the golden encodings.
    let golden = vector("pkg/types/100/types_test.go", "correctly encodes a 1.1.0 Result");
    let model: CniResult = serde_json::from_value(without(golden.clone(), "cniVersion")).unwrap();
    let agent =
        FakeAgent::with(move |_| Reply::Json(CniResponse::Ok { result: Some(model.clone()) }));
    let t100 = "pkg/types/100/types_test.go";
    let t040 = "pkg/types/040/types_test.go";
    let mut want_100 = golden.clone();
    want_100["cniVersion"] = json!("1.0.0");
    for k in ["mtu", "pciID", "socketPath"] {
        want_100["interfaces"][0].as_object_mut().unwrap().remove(k);
    }
    let expect = [
        ("1.1.0", golden.clone()),
        ("1.0.0", want_100),
        ("0.4.0", vector(t100, "correctly encodes a 0.4.0 Result")),
        ("0.3.1", vector(t040, "correctly encodes a 0.3.x Result")),
        (
            "0.3.0",
            with(vector(t040, "correctly encodes a 0.3.x Result"), "cniVersion", json!("0.3.0")),
        ),
        (
            "0.2.0",
            with(vector(t040, "correctly encodes a 0.1.0 Result"), "cniVersion", json!("0.2.0")),
        ),
        ("0.1.0", vector(t100, "correctly encodes a 0.1.0 Result")),
    ];
    for (v, want) in expect {
        let out = call("ADD").stdin(&agent.conf(v)).run();
        assert_eq!(out.code, 0, "{v}: {out:?}");
        assert_eq!(out.json(), want, "{v}");
    }
}

#[test]
fn add_02_request_and_result_for_a_pod() {
    // [ADD-02][RES-01][RES-02][RES-07][RUN-04] scenario 2: cniVersion echoed,
    // an interface whose sandbox is CNI_NETNS, ips[].interface pointing at it;
    // the agent got the attachment's identity.
    let agent = FakeAgent::start();
    for v in ["0.3.1", "0.4.0", "1.0.0", "1.1.0"] {
        let out = call("ADD").stdin(&agent.conf(v)).run();
        assert_eq!(out.code, 0, "{out:?}");
        let r = out.json();
        assert_eq!(r["cniVersion"], v);
        assert_eq!(r["interfaces"][0]["sandbox"], NETNS);
        assert_eq!(r["interfaces"][0]["name"], "eth0");
        for ip in r["ips"].as_array().unwrap() {
            assert_eq!(ip["interface"], 0);
            assert_eq!(ip.get("version").is_some(), v < "1.0.0", "{v}: {ip}");
        }
        assert_eq!(r["interfaces"][0].get("mtu").is_some(), v == "1.1.0");
        let req = agent.last();
        assert_eq!(req.command, Command::Add);
        assert_eq!(req.container_id, "ctr-0123456789abcdef");
        assert_eq!(req.netns.as_deref(), Some(NETNS));
        assert_eq!(req.ifname, "eth0");
        assert_eq!(req.network, "ocelot-net");
        assert_eq!(req.args["K8S_POD_NAME"], "web-0");
        assert_eq!(req.prev_result, None);
    }
}

#[test]
fn add_03_chained_prev_result_in_0_4_0_reaches_the_agent_as_the_model() {
    // [ADD-03][RES-06] scenario 8: a stub's 0.4.0 prevResult is converted to
    // the 1.1.0 model for the agent; when the agent adds nothing, the output
    // is prevResult itself, re-encoded.
    let prev = vector("pkg/types/100/types_test.go", "correctly encodes a 0.4.0 Result");
    let agent = FakeAgent::with(|_| Reply::Json(CniResponse::Ok { result: None }));
    let conf = with(agent.conf("0.4.0"), "prevResult", prev.clone());
    let out = call("ADD").stdin(&conf).run();
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(out.json(), prev);
    let got = agent.last().prev_result.expect("prevResult forwarded");
    assert_eq!(got.interfaces[0].sandbox, "/proc/3553/ns/net");
    assert_eq!(got.ips[1].address, "abcd:1234:ffff::cdde/64");
    assert_eq!(got.ips[1].interface, Some(0));
    assert_eq!(got.routes.len(), 2);
    assert_eq!(got.dns.domain.as_deref(), Some("acompany.com"));
    // The same, for the SPEC.md chain (1.1.0, interface index 2).
    let conf = vector("SPEC.md", "SPEC.md json block #8");
    let conf = with(conf, "agentSocket", json!(agent.socket));
    let out = call("ADD").stdin(&conf).run();
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(out.json(), with(conf["prevResult"].clone(), "cniVersion", json!("1.1.0")));
    assert_eq!(agent.last().prev_result.unwrap().ips[0].interface, Some(2));
}

#[test]
fn add_03_agent_result_is_what_is_printed_when_chained() {
    // The agent's answer is the full result (it merges prevResult itself).
    let agent = FakeAgent::start();
    let prev = json!({"cniVersion": "1.0.0", "interfaces": [{"name": "lo"}],
                      "ips": [{"address": "127.0.0.1/8", "interface": 0}]});
    let out = call("ADD").stdin(&with(agent.conf("1.0.0"), "prevResult", prev)).run();
    assert_eq!(out.code, 0);
    assert_eq!(out.json()["ips"][0]["address"], "10.244.1.7/32");
    assert_eq!(agent.last().prev_result.unwrap().ips[0].address, "127.0.0.1/8");
}

#[test]
fn add_bad_prev_result_is_code_6() {
    let agent = FakeAgent::start();
    for bad in [
        json!("x"),
        json!({"ips": [{"address": "nope"}]}),
        json!({"ips": [{"address": "10.0.0.1/24", "interface": 3}]}),
    ] {
        let out = call("ADD").stdin(&with(agent.conf("1.1.0"), "prevResult", bad.clone())).run();
        assert_eq!(out.error_code(), 6, "{bad}");
    }
    assert!(agent.requests().is_empty());
}

#[test]
fn add_04_agent_refusal_passes_through() {
    // [ADD-04] the agent refuses a second ADD for the same netns/ifname; the
    // plugin fails with the agent's code, msg and details. (The check of the
    // interface itself is the agent's: it owns the netns.)
    let seen = Mutex::new(Vec::<(String, String)>::new());
    let agent = FakeAgent::with(move |req| {
        let key = (req.netns.clone().unwrap_or_default(), req.ifname.clone());
        let mut seen = seen.lock().unwrap();
        if seen.contains(&key) {
            return Reply::Json(CniResponse::Error {
                code: ocelot_cni::proto::codes::DATAPLANE,
                msg: "interface eth0 already exists in the container".into(),
                details: key.0,
            });
        }
        seen.push(key);
        Reply::Json(CniResponse::Ok { result: Some(pod_result(NETNS, "eth0")) })
    });
    assert_eq!(call("ADD").stdin(&agent.conf("1.1.0")).run().code, 0);
    let out = call("ADD").env("CNI_CONTAINERID", "other").stdin(&agent.conf("1.1.0")).run();
    assert_eq!(out.error_code(), 102);
    assert_eq!(out.msg(), "interface eth0 already exists in the container");
    assert_eq!(out.json()["details"], NETNS);
}

#[test]
fn add_agent_errors_pass_through_with_their_code() {
    // Agent error codes (7, 11, Ocelot's 100+) reach the runtime unchanged.
    for (code, msg) in [(100u32, "pool exhausted"), (7, "Invalid Configuration"), (11, "busy")] {
        let agent = FakeAgent::with(move |_| {
            Reply::Json(CniResponse::Error { code, msg: msg.into(), details: "d".into() })
        });
        let out = call("ADD").stdin(&agent.conf("0.4.0")).run();
        assert_eq!(out.error_code(), code as u64);
        assert_eq!(
            out.json(),
            json!({"cniVersion": "0.4.0", "code": code, "msg": msg, "details": "d"})
        );
    }
}

#[test]
fn add_agent_protocol_violations_are_code_999() {
    let cases: Vec<Box<Responder>> = vec![
        Box::new(|_| Reply::Raw(b"this is not json\n")),
        Box::new(|_| Reply::Json(CniResponse::Ok { result: None })), // ADD without a result
        Box::new(|_| {
            // An interface index out of range.
            let mut r = pod_result(NETNS, "eth0");
            r.ips[0].interface = Some(5);
            Reply::Json(CniResponse::Ok { result: Some(r) })
        }),
    ];
    for responder in cases {
        let agent = FakeAgent::with(responder);
        let out = call("ADD").stdin(&agent.conf("1.1.0")).run();
        assert_eq!(out.error_code(), 999, "{out:?}");
    }
}

#[test]
fn cfg_07_dns_from_the_config_when_the_agent_gives_none() {
    // [CFG-07][RES-05] the well-known `dns` key fills an empty result DNS.
    let agent = FakeAgent::start();
    let dns = json!({"nameservers": ["10.96.0.10"], "domain": "cluster.local",
                     "search": ["default.svc.cluster.local"], "options": ["ndots:5"]});
    let out = call("ADD").stdin(&with(agent.conf("1.0.0"), "dns", dns.clone())).run();
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(out.json()["dns"], dns);
    // The agent's own DNS wins.
    let agent = FakeAgent::with(|req| {
        let mut r = pod_result(NETNS, &req.ifname);
        r.dns.nameservers = vec!["10.0.0.53".into()];
        Reply::Json(CniResponse::Ok { result: Some(r) })
    });
    let out = call("ADD").stdin(&with(agent.conf("1.1.0"), "dns", dns)).run();
    assert_eq!(out.json()["dns"], json!({"nameservers": ["10.0.0.53"]}));
}

#[test]
fn err_03_stdin_read_failure_is_code_5() {
    // [ERR-03][ENV-13] code 5: stdin that cannot be read (a directory).
    let dir = Scratch::new();
    let child = Process::new(BIN)
        .env_clear()
        .envs([("CNI_COMMAND", "STATUS")])
        .stdin(std::fs::File::open(&dir.0).unwrap())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let out = Out {
        code: child.status.code().unwrap(),
        stdout: String::from_utf8(child.stdout).unwrap(),
        stderr: String::from_utf8_lossy(&child.stderr).into_owned(),
    };
    assert_eq!(out.error_code(), 5, "{out:?}");
}

#[test]
fn err_03_agent_unreachable_is_code_11() {
    // [ERR-03] code 11 "try again later": no socket, a stale socket file
    // nobody listens on, an agent that hangs up, an agent that is too slow.
    let dir = Scratch::new();
    let out = call("ADD").stdin(&conf_no_agent(&dir, "1.1.0")).run();
    assert_eq!(out.error_code(), 11);
    assert!(out.json()["details"].as_str().unwrap().contains("absent.sock"));

    let stale = dir.path("stale.sock");
    drop(UnixListener::bind(&stale).unwrap());
    let conf = with(conf_no_agent(&dir, "1.1.0"), "agentSocket", json!(stale));
    for cmd in ["ADD", "CHECK", "GC"] {
        let conf = with(conf.clone(), "prevResult", json!({}));
        let conf = with(conf, "cni.dev/valid-attachments", json!([]));
        assert_eq!(call(cmd).stdin(&conf).run().error_code(), 11, "{cmd}");
    }

    let agent = FakeAgent::with(|_| Reply::Hangup);
    assert_eq!(call("ADD").stdin(&agent.conf("1.1.0")).run().error_code(), 11);

    let agent = FakeAgent::with(|_| {
        Reply::Delayed(Duration::from_secs(3), CniResponse::Ok { result: None })
    });
    let started = Instant::now();
    let out = call("ADD").stdin(&with(agent.conf("1.1.0"), "timeoutSeconds", json!(0.3))).run();
    assert_eq!(out.error_code(), 11);
    assert!(out.json()["details"].as_str().unwrap().contains("timed out"));
    assert!(started.elapsed() < Duration::from_secs(2), "timeoutSeconds not honoured");
}

#[test]
fn run_02_parallel_adds() {
    // [RUN-02] concurrent calls for different containers: the plugin keeps
    // no state of its own, each call is its own request.
    let agent = Arc::new(FakeAgent::start());
    let handles: Vec<_> = (0..16)
        .map(|i| {
            let conf = agent.conf("1.1.0");
            thread::spawn(move || {
                call("ADD").env("CNI_CONTAINERID", &format!("ctr{i}")).stdin(&conf).run()
            })
        })
        .collect();
    for h in handles {
        assert_eq!(h.join().unwrap().code, 0);
    }
    let mut ids: Vec<String> = agent.requests().into_iter().map(|r| r.container_id).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 16);
}

// ---------------------------------------------------------------------------
// DEL

#[test]
fn del_05_idempotent_and_silent() {
    // [DEL-05][DEL-06][DEL-03] scenario 5: ADD, DEL, DEL; DEL of an unknown
    // ID; DEL without CNI_NETNS; DEL with a netns that is gone; DEL without
    // prevResult: all exit 0 with nothing on stdout.
    let agent = FakeAgent::start();
    let add = call("ADD").stdin(&agent.conf("1.1.0")).run();
    assert_eq!(add.code, 0);
    let with_prev = with(agent.conf("1.1.0"), "prevResult", add.json());
    call("DEL").stdin(&with_prev).run().assert_silent_success();
    call("DEL").stdin(&with_prev).run().assert_silent_success();
    call("DEL")
        .env("CNI_CONTAINERID", "never-added")
        .stdin(&agent.conf("1.1.0"))
        .run()
        .assert_silent_success();
    call("DEL").unset("CNI_NETNS").stdin(&with_prev).run().assert_silent_success();
    assert_eq!(agent.last().netns, None);
    call("DEL")
        .env("CNI_NETNS", "/run/netns/deleted-long-ago")
        .stdin(&with_prev)
        .run()
        .assert_silent_success();
    call("DEL").stdin(&agent.conf("1.1.0")).run().assert_silent_success();
    assert_eq!(agent.last().prev_result, None);
    let dels = agent.requests().into_iter().filter(|r| r.command == Command::Del).count();
    assert_eq!(dels, 6);
}

#[test]
fn del_02_prev_result_forwarded_and_converted() {
    // [DEL-02][RES-09] prevResult on DEL (0.4.0 on) reaches the agent in the
    // model; before 0.4.0 DEL has no prevResult and it is ignored.
    let agent = FakeAgent::start();
    let prev = vector("pkg/types/040/types_test.go", "correctly encodes a 0.3.x Result");
    let prev04 = with(prev.clone(), "cniVersion", json!("0.4.0"));
    call("DEL")
        .stdin(&with(agent.conf("0.4.0"), "prevResult", prev04))
        .run()
        .assert_silent_success();
    let got = agent.last().prev_result.unwrap();
    assert_eq!(got.ips.len(), 2);
    assert_eq!(got.interfaces[0].name, "eth0");
    call("DEL").stdin(&with(agent.conf("0.3.1"), "prevResult", prev)).run().assert_silent_success();
    assert_eq!(agent.last().prev_result, None);
}

#[test]
fn del_04_broken_prev_result_does_not_stop_del() {
    // [DEL-04] best effort: a prevResult that cannot be decoded is dropped
    // (with a warning on stderr) and DEL goes on.
    let agent = FakeAgent::start();
    let out =
        call("DEL").stdin(&with(agent.conf("1.1.0"), "prevResult", json!({"ips": "x"}))).run();
    out.assert_silent_success();
    assert!(out.stderr.contains("ignoring prevResult"), "{out:?}");
    assert_eq!(agent.last().command, Command::Del);
    assert_eq!(agent.last().prev_result, None);
}

#[test]
fn del_05_agent_not_running_is_success() {
    // [DEL-04][DEL-05] decision (README): with no agent to ask (socket
    // missing, or a stale socket nobody listens on) DEL succeeds, so pod
    // teardown is never blocked; a warning goes to stderr.
    let dir = Scratch::new();
    let out = call("DEL").stdin(&conf_no_agent(&dir, "1.1.0")).run();
    out.assert_silent_success();
    assert!(out.stderr.contains("agent not running"), "{out:?}");
    let stale = dir.path("stale.sock");
    drop(UnixListener::bind(&stale).unwrap());
    let conf = with(conf_no_agent(&dir, "0.4.0"), "agentSocket", json!(stale));
    call("DEL").stdin(&conf).run().assert_silent_success();
}

#[test]
fn del_08_agent_failure_is_reported() {
    // [DEL-08] an agent that is running and fails the DEL: the error goes
    // through; an agent that accepts but does not answer in time: 11.
    let agent = FakeAgent::with(|_| {
        Reply::Json(CniResponse::Error {
            code: 102,
            msg: "dataplane down".into(),
            details: String::new(),
        })
    });
    assert_eq!(call("DEL").stdin(&agent.conf("1.1.0")).run().error_code(), 102);
    let agent = FakeAgent::with(|_| {
        Reply::Delayed(Duration::from_secs(3), CniResponse::Ok { result: None })
    });
    let out = call("DEL").stdin(&with(agent.conf("1.1.0"), "timeoutSeconds", json!(0.2))).run();
    assert_eq!(out.error_code(), 11);
}

// ---------------------------------------------------------------------------
// CHECK

#[test]
fn chk_09_check_success_is_silent_and_gets_prev_result() {
    // [CHK-01][CHK-09] scenario 4: prevResult (here 0.4.0) reaches the agent
    // in the model; success prints nothing.
    let agent = FakeAgent::start();
    let prev = vector("pkg/types/100/types_test.go", "correctly encodes a 0.4.0 Result");
    let out = call("CHECK").stdin(&with(agent.conf("0.4.0"), "prevResult", prev)).run();
    out.assert_silent_success();
    let req = agent.last();
    assert_eq!(req.command, Command::Check);
    assert_eq!(req.netns.as_deref(), Some(NETNS));
    assert_eq!(req.prev_result.unwrap().ips[0].address, "1.2.3.30/24");
}

#[test]
fn chk_03_check_failure_passes_through() {
    // [CHK-03] the agent finds the address gone: non-zero, its code.
    let agent = FakeAgent::with(|_| {
        Reply::Json(CniResponse::Error {
            code: ocelot_cni::proto::codes::CHECK_FAILED,
            msg: "address 10.244.1.7/32 missing on eth0".into(),
            details: String::new(),
        })
    });
    let conf =
        with(agent.conf("1.1.0"), "prevResult", json!({"ips": [{"address": "10.244.1.7/32"}]}));
    assert_eq!(call("CHECK").stdin(&conf).run().error_code(), 104);
}

#[test]
fn chk_10_check_needs_0_4_0_and_prev_result() {
    // [CHK-10] below 0.4.0 -> 1 "config version does not allow CHECK";
    // [CHK-08] without prevResult -> 7.
    let agent = FakeAgent::start();
    for v in ["0.1.0", "0.2.0", "0.3.0", "0.3.1"] {
        let conf = with(agent.conf(v), "prevResult", json!({}));
        let out = call("CHECK").stdin(&conf).run();
        assert_eq!(out.error_code(), 1, "{v}");
        assert_eq!(out.msg(), "config version does not allow CHECK");
    }
    let out = call("CHECK").stdin(&agent.conf("1.1.0")).run();
    assert_eq!(out.error_code(), 7);
    assert!(agent.requests().is_empty());
}

// ---------------------------------------------------------------------------
// STATUS

#[test]
fn sta_01_status_ready_is_silent() {
    // [STA-01][STA-06] agent ready -> exit 0, no output; only CNI_COMMAND set.
    let agent = FakeAgent::start();
    bare().env("CNI_COMMAND", "STATUS").stdin(&agent.conf("1.1.0")).run().assert_silent_success();
    let req = agent.last();
    assert_eq!(req.command, Command::Status);
    assert_eq!(req.container_id, "");
    assert_eq!(req.netns, None);
}

#[test]
fn sta_02_status_agent_unreachable_is_50() {
    // [STA-02][STA-03] scenario 10: daemon stopped -> 50; also when it is
    // too slow or hangs up.
    let dir = Scratch::new();
    let out = call("STATUS").stdin(&conf_no_agent(&dir, "1.1.0")).run();
    assert_eq!(out.error_code(), 50);
    let agent = FakeAgent::with(|_| Reply::Hangup);
    assert_eq!(call("STATUS").stdin(&agent.conf("1.1.0")).run().error_code(), 50);
    let agent = FakeAgent::with(|_| {
        Reply::Delayed(Duration::from_secs(3), CniResponse::Ok { result: None })
    });
    let out = call("STATUS").stdin(&with(agent.conf("1.1.0"), "timeoutSeconds", json!(0.2))).run();
    assert_eq!(out.error_code(), 50);
}

#[test]
fn sta_02_status_agent_codes_pass_through() {
    // [STA-02][STA-03] the agent says 50 (pool exhausted) or 51.
    for code in [50u32, 51] {
        let agent = FakeAgent::with(move |_| {
            Reply::Json(CniResponse::Error {
                code,
                msg: "not ready".into(),
                details: String::new(),
            })
        });
        assert_eq!(call("STATUS").stdin(&agent.conf("1.1.0")).run().error_code(), code as u64);
    }
}

#[test]
fn sta_07_status_needs_1_1_0() {
    // [STA-07][RES-09]
    let agent = FakeAgent::start();
    for v in ["0.4.0", "1.0.0"] {
        let out = call("STATUS").stdin(&agent.conf(v)).run();
        assert_eq!(out.error_code(), 1);
        assert_eq!(out.msg(), "config version does not allow STATUS");
    }
    assert!(agent.requests().is_empty());
}

// ---------------------------------------------------------------------------
// GC

#[test]
fn gc_01_valid_attachments_under_both_names_reach_the_agent() {
    // [GC-01][GC-08][GC-06] scenario 9: the list is sent under both names
    // (libcni); the agent gets their union; success prints nothing.
    let agent = FakeAgent::start();
    let a = json!({"containerID": "ctr-a", "ifname": "eth0"});
    let b = json!({"containerID": "ctr-b", "ifname": "eth0"});
    let conf = with(agent.conf("1.1.0"), "cni.dev/valid-attachments", json!([a]));
    let conf = with(conf, "cni.dev/attachments", json!([a, b]));
    bare()
        .env("CNI_COMMAND", "GC")
        .env("CNI_PATH", "/opt/cni/bin")
        .stdin(&conf)
        .run()
        .assert_silent_success();
    let req = agent.last();
    assert_eq!(req.command, Command::Gc);
    assert_eq!(req.container_id, "");
    assert_eq!(
        req.valid_attachments.unwrap(),
        vec![
            Attachment { container_id: "ctr-a".into(), ifname: "eth0".into() },
            Attachment { container_id: "ctr-b".into(), ifname: "eth0".into() },
        ]
    );
    // Only the old name; an empty list (Go's null) is an empty list.
    let conf = with(agent.conf("1.1.0"), "cni.dev/attachments", json!([b]));
    call("GC").stdin(&conf).run().assert_silent_success();
    assert_eq!(agent.last().valid_attachments.unwrap().len(), 1);
    let conf = with(agent.conf("1.1.0"), "cni.dev/valid-attachments", Value::Null);
    call("GC").stdin(&conf).run().assert_silent_success();
    assert_eq!(agent.last().valid_attachments, Some(vec![]));
}

#[test]
fn gc_01_without_the_list_is_refused() {
    // Without the key we cannot tell stale from live: 7, agent not asked.
    let agent = FakeAgent::start();
    assert_eq!(call("GC").stdin(&agent.conf("1.1.0")).run().error_code(), 7);
    let conf = with(agent.conf("1.1.0"), "cni.dev/valid-attachments", json!([{"containerID": 1}]));
    assert_eq!(call("GC").stdin(&conf).run().error_code(), 6);
    assert!(agent.requests().is_empty());
}

#[test]
fn gc_08_gc_needs_1_1_0_and_reports_agent_errors() {
    // [GC-08] below 1.1.0 -> 1; [GC-03] the agent's error goes through.
    let agent = FakeAgent::start();
    let conf = with(agent.conf("1.0.0"), "cni.dev/valid-attachments", json!([]));
    let out = call("GC").stdin(&conf).run();
    assert_eq!(out.error_code(), 1);
    assert_eq!(out.msg(), "config version does not allow GC");
    let agent = FakeAgent::with(|_| {
        Reply::Json(CniResponse::Error {
            code: 102,
            msg: "2 of 5 releases failed".into(),
            details: String::new(),
        })
    });
    let conf = with(agent.conf("1.1.0"), "cni.dev/valid-attachments", json!([]));
    assert_eq!(call("GC").stdin(&conf).run().error_code(), 102);
}

// ---------------------------------------------------------------------------
// Robustness

#[test]
fn never_panics_on_hostile_input() {
    // Whatever arrives, the answer is a CNI error object (or, for a DEL that
    // finds no agent, a silent success), never a crash.
    let dir = Scratch::new();
    let sock = serde_json::to_string(&dir.path("absent.sock")).unwrap();
    let head = format!(r#""cniVersion":"1.1.0","name":"n","type":"t","agentSocket":{sock}"#);
    let inputs = [
        "[".repeat(100_000),
        format!("{{{head},\"mtu\":1{}}}", "0".repeat(400)),
        "{\"cniVersion\": null, \"name\": null}".to_string(),
        format!(
            r#"{{{head},"prevResult":{{"interfaces":[{{"name":"e"}}],"ips":[{{"address":"1.2.3.4/24","interface":18446744073709551615}}]}}}}"#
        ),
        format!(r#"{{{head},"prevResult":{{"ip4":7}}}}"#),
        format!(
            r#"{{{head},"prevResult":{{"ips":[{{"address":"1.2.3.4/99999999999999999999"}}]}}}}"#
        ),
        "\u{feff}{}".to_string(),
    ];
    for input in &inputs {
        for cmd in ["ADD", "DEL", "CHECK", "STATUS", "GC"] {
            let out = call(cmd).raw_stdin(input).run();
            if out.code == 0 {
                assert_eq!(cmd, "DEL", "{input:.80}");
                out.assert_silent_success();
            } else {
                out.error_code();
            }
        }
    }
}

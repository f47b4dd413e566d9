//! The deployment manifests, checked offline: every YAML document under
//! `manifests/` against the Kubernetes 1.30 schemas (kubernetes-validate,
//! strict) and custom resources against their CRD's schema (see
//! `validate_manifests.py`); what the DaemonSet needs to run a node; the
//! flags the manifests pass exist; `ocelot install-cni` renders the chain.
//!
//! Needs Python with `kubernetes-validate` (`./dev.sh test` installs it in
//! a venv under ~/.cache/ocelot/venv); `OCELOT_VALIDATOR_PYTHON` names
//! another interpreter.

use serde::Deserialize;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The oldest Kubernetes the manifests support.
const K8S_VERSION: &str = "1.30.0";
/// The newest the pinned kubernetes-validate (dev.sh) knows: an API removed
/// since 1.30 fails here.
const K8S_NEWEST: &str = "1.37.0";

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace").to_path_buf()
}

/// The Python that has kubernetes-validate, or a message saying how to get one.
fn python() -> PathBuf {
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/root/.cache"));
    let candidates: Vec<PathBuf> = std::env::var_os("OCELOT_VALIDATOR_PYTHON")
        .map(PathBuf::from)
        .into_iter()
        .chain([cache.join("ocelot/venv/bin/python3"), PathBuf::from("python3")])
        .collect();
    for p in &candidates {
        let ok = Command::new(p)
            .args(["-c", "import kubernetes_validate, jsonschema, yaml"])
            .output()
            .is_ok_and(|o| o.status.success());
        if ok {
            return p.clone();
        }
    }
    panic!(
        "no Python with kubernetes-validate found (tried {candidates:?}). Install it with \
         `./dev.sh deps` (a venv in ~/.cache/ocelot/venv), or set OCELOT_VALIDATOR_PYTHON"
    );
}

#[derive(Debug, Deserialize)]
struct Verdict {
    file: String,
    doc: usize,
    kind: String,
    name: String,
    status: String,
    message: String,
}

fn validate(files: &[PathBuf]) -> Vec<Verdict> {
    validate_for(K8S_VERSION, files)
}

fn validate_for(version: &str, files: &[PathBuf]) -> Vec<Verdict> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/validate_manifests.py");
    let out = Command::new(python())
        .arg(&script)
        .arg(version)
        .args(files)
        .output()
        .expect("run validate_manifests.py");
    assert!(
        out.status.success(),
        "validate_manifests.py failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("validator said {l:?}: {e}")))
        .collect()
}

/// The failures among the verdicts, one clear line each. A custom resource
/// without a schema is tolerated only while no CRD is known at all (before
/// manifests/crds.yaml exists); after that it is an error.
fn failures(verdicts: &[Verdict], crds_known: bool) -> Vec<String> {
    verdicts
        .iter()
        .filter(|v| v.status == "error" || (v.status == "skipped" && crds_known))
        .map(|v| format!("{} document {} ({} {:?}): {}", v.file, v.doc, v.kind, v.name, v.message))
        .collect()
}

/// Every `*.yaml`/`*.yml` under `dir`, sorted.
fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("read manifests dir").flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "yaml" || x == "yml") {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// The documents of a YAML file, as JSON values.
fn documents(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).expect("read manifest");
    serde_norway::Deserializer::from_str(&text)
        .map(|d| Value::deserialize(d).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
        .filter(|v| !v.is_null())
        .collect()
}

fn ocelot_yaml() -> Vec<Value> {
    documents(&root().join("manifests/ocelot.yaml"))
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("manifests/ocelot.yaml has no {kind} {name}"))
}

fn container<'a>(pod: &'a Value, list: &str, name: &str) -> &'a Value {
    pod[list]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["name"] == name))
        .unwrap_or_else(|| panic!("no {list} entry named {name}"))
}

#[test]
fn every_manifest_is_valid_for_kubernetes_1_30() {
    let files = yaml_files(&root().join("manifests"));
    assert!(files.iter().any(|f| f.ends_with("ocelot.yaml")), "{files:?}");
    let crds_known =
        files.iter().flat_map(|f| documents(f)).any(|d| d["kind"] == "CustomResourceDefinition");
    let verdicts = validate(&files);
    assert!(verdicts.len() >= 12, "too few documents validated: {verdicts:?}");
    let bad = failures(&verdicts, crds_known);
    assert!(
        bad.is_empty(),
        "invalid manifests for Kubernetes {K8S_VERSION}:\n  {}",
        bad.join("\n  ")
    );
    let newest = failures(&validate_for(K8S_NEWEST, &files), crds_known);
    assert!(
        newest.is_empty(),
        "invalid manifests for Kubernetes {K8S_NEWEST}:\n  {}",
        newest.join("\n  ")
    );
    // Custom resources are really checked once the CRDs exist.
    if crds_known {
        assert!(
            verdicts.iter().any(|v| v.kind == "IPPool" && v.status == "ok"),
            "no IPPool was checked against its CRD"
        );
    }
}

#[test]
fn broken_manifests_fail_with_a_clear_message() {
    let dir = std::env::temp_dir().join(format!("ocelot-manifests-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("bad.yaml");
    std::fs::write(
        &bad,
        r#"
apiVersion: apps/v1
kind: DaemonSet
metadata: {name: broken, namespace: ocelot-system}
spec:
  selector: {matchLabels: {a: b}}
  template:
    metadata: {labels: {a: b}}
    spec:
      containers:
        - {name: agent, image: x, ports: [{containerPort: "nine"}]}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: typo}
dataa: {x: y}
---
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {name: widgets.example.dev}
spec:
  group: example.dev
  scope: Cluster
  names: {kind: Widget, plural: widgets, singular: widget, listKind: WidgetList}
  versions:
    - name: v1
      served: true
      storage: true
      schema:
        openAPIV3Schema:
          type: object
          properties:
            spec:
              type: object
              properties:
                size: {type: integer}
---
apiVersion: example.dev/v1
kind: Widget
metadata: {name: w}
spec: {size: big}
---
apiVersion: example.dev/v1
kind: Widget
metadata: {name: extra}
spec: {size: 3, colour: red}
---
apiVersion: example.dev/v1
kind: Gadget
metadata: {name: g}
---
kind: ConfigMap
"#,
    )
    .unwrap();
    let verdicts = validate(&[bad]);
    let bad = failures(&verdicts, true);
    let expect = [
        "DaemonSet \"broken\"): spec.template.spec.containers.0.ports.0.containerPort: 'nine' is not of type 'integer'",
        "ConfigMap \"typo\"): (root): Additional properties are not allowed ('dataa' was unexpected)",
        "Widget \"w\"): does not match its CRD's schema: spec.size: 'big' is not of type 'integer'",
        "Widget \"extra\"): does not match its CRD's schema: spec: Additional properties are not allowed ('colour' was unexpected)",
        "Gadget \"g\"): no schema for example.dev/v1 Gadget",
        "not a Kubernetes object (apiVersion and kind are required)",
    ];
    for e in expect {
        assert!(
            bad.iter().any(|b| b.contains(e)),
            "no failure saying {e:?} in:\n{}",
            bad.join("\n")
        );
    }
    assert_eq!(bad.len(), expect.len(), "{bad:#?}");
    assert!(
        verdicts.iter().any(|v| v.kind == "CustomResourceDefinition" && v.status == "ok"),
        "{verdicts:?}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_daemonset_runs_everywhere_with_what_a_node_needs() {
    let docs = ocelot_yaml();
    let ds = find(&docs, "DaemonSet", "ocelot-node");
    assert_eq!(ds["metadata"]["namespace"], "ocelot-system");
    let spec = &ds["spec"]["template"]["spec"];
    assert_eq!(spec["hostNetwork"], true);
    assert_eq!(spec["priorityClassName"], "system-node-critical");
    assert_eq!(spec["serviceAccountName"], "ocelot-node");
    assert!(
        spec["tolerations"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["operator"] == "Exists" && t.get("key").is_none()),
        "a bare `operator: Exists` toleration is needed to run on every node"
    );
    assert_eq!(ds["spec"]["updateStrategy"]["type"], "RollingUpdate");
    assert_eq!(ds["spec"]["updateStrategy"]["rollingUpdate"]["maxUnavailable"], 1);

    let init = container(spec, "initContainers", "install-cni");
    assert_eq!(init["command"], serde_json::json!(["ocelot", "install-cni"]));
    let agent = container(spec, "containers", "agent");
    let dp = container(spec, "containers", "dataplane");
    for c in [agent, dp] {
        assert_eq!(c["securityContext"]["privileged"], true, "{} must be privileged", c["name"]);
    }
    for c in [init, agent, dp] {
        let r = &c["resources"]["requests"];
        assert!(r["cpu"].is_string() && r["memory"].is_string(), "{} has no requests", c["name"]);
    }
    assert!(dp["command"].to_string().contains("ocelot-dataplane run"), "{}", dp["command"]);
    assert!(
        dp["command"].to_string().contains("--cores"),
        "the dataplane's cores come from the ConfigMap"
    );

    // Probes on the agent's HTTP endpoints, on the port it serves.
    let port = agent["ports"][0]["containerPort"].as_u64().expect("agent port");
    assert_eq!(agent["livenessProbe"]["httpGet"]["path"], "/livez");
    assert_eq!(agent["readinessProbe"]["httpGet"]["path"], "/readyz");
    for p in ["livenessProbe", "readinessProbe"] {
        assert_eq!(agent[p]["httpGet"]["port"].as_u64(), Some(port), "{p} port");
    }
    let env = agent["env"].as_array().unwrap();
    let metrics_addr =
        env.iter().find(|e| e["name"] == "OCELOT_METRICS_ADDR").expect("OCELOT_METRICS_ADDR");
    assert_eq!(metrics_addr["value"], format!("0.0.0.0:{port}"));

    // Host paths, and who mounts them.
    let host: std::collections::BTreeMap<String, String> = spec["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| Some((v["name"].as_str()?.into(), v["hostPath"]["path"].as_str()?.into())))
        .collect();
    for p in ["/run/ocelot", "/opt/cni/bin", "/etc/cni/net.d", "/var/run/netns", "/lib/modules"] {
        assert!(host.values().any(|h| h == p), "no hostPath {p}: {host:?}");
    }
    let mounts = |c: &Value| -> Vec<(String, String, bool, String)> {
        c["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| {
                (
                    host[m["name"].as_str().unwrap()].clone(),
                    m["mountPath"].as_str().unwrap().to_string(),
                    m["readOnly"] == true,
                    m["mountPropagation"].as_str().unwrap_or("").to_string(),
                )
            })
            .collect()
    };
    for c in [agent, dp] {
        let m = mounts(c);
        assert!(m.iter().any(|(h, p, _, _)| h == "/run/ocelot" && p == "/run/ocelot"), "{m:?}");
        assert!(
            m.iter().any(|(h, p, _, prop)| h == "/var/run/netns"
                && p == h
                && prop == "HostToContainer"),
            "pods' namespaces must appear as the runtime creates them: {m:?}"
        );
        assert!(m.iter().any(|(h, _, ro, _)| h == "/lib/modules" && *ro), "{m:?}");
    }
    let m = mounts(init);
    for (h, p) in [("/opt/cni/bin", "/host/opt/cni/bin"), ("/etc/cni/net.d", "/host/etc/cni/net.d")]
    {
        assert!(m.iter().any(|(mh, mp, _, _)| mh == h && mp == p), "{m:?}");
        assert!(init["args"].to_string().contains(p), "install-cni is told about {p}");
    }
}

/// The ConfigMap keys the pods read exist, and every `--flag` the
/// manifests pass to `ocelot` is one its `--help` documents.
#[test]
fn the_manifests_use_only_flags_and_keys_that_exist() {
    let docs = ocelot_yaml();
    let cm = find(&docs, "ConfigMap", "ocelot-config");
    for key in [
        "pool_cidr",
        "encapsulation",
        "pool_block_size",
        "pool_nat_outgoing",
        "mtu",
        "dataplane_cores",
    ] {
        assert!(cm["data"][key].is_string(), "ConfigMap lacks {key}");
    }
    assert!(["vxlan", "vxlan-cross-subnet", "ipip", "ipip-cross-subnet", "none"]
        .contains(&cm["data"]["encapsulation"].as_str().unwrap()));
    // The controller makes the default pool from the ConfigMap: each key
    // reaches it as the environment variable of its flag, and the values
    // are ones `ocelot controller` accepts (it refuses bad ones at start).
    let ctl_pod = &find(&docs, "Deployment", "ocelot-controller")["spec"]["template"]["spec"];
    let ctl = container(ctl_pod, "containers", "controller");
    let from_cm = |var: &str| -> Option<String> {
        ctl["env"]
            .as_array()?
            .iter()
            .find(|e| e["name"] == var)
            .and_then(|e| e["valueFrom"]["configMapKeyRef"]["key"].as_str().map(String::from))
    };
    let mut argv = vec!["x".to_string()];
    for (var, key, flag) in [
        ("OCELOT_DEFAULT_IPV4_POOL_CIDR", "pool_cidr", "--default-ipv4-pool-cidr"),
        ("OCELOT_DEFAULT_POOL_ENCAPSULATION", "encapsulation", "--default-pool-encapsulation"),
        ("OCELOT_DEFAULT_POOL_BLOCK_SIZE", "pool_block_size", "--default-pool-block-size"),
        ("OCELOT_DEFAULT_POOL_NAT_OUTGOING", "pool_nat_outgoing", "--default-pool-nat-outgoing"),
    ] {
        assert_eq!(from_cm(var).as_deref(), Some(key), "the controller's {var}");
        argv.push(format!("{flag}={}", cm["data"][key].as_str().unwrap()));
    }
    #[derive(clap::Parser)]
    struct Ctl {
        #[command(flatten)]
        a: ocelot_control::k8s::default_pool::DefaultPoolArgs,
    }
    let pool = <Ctl as clap::Parser>::try_parse_from(&argv)
        .unwrap_or_else(|e| panic!("{argv:?}: {e}"))
        .a
        .spec()
        .unwrap_or_else(|e| panic!("{argv:?}: {e}"))
        .expect("the ConfigMap asks for a default pool");
    // manifests/default-ippool.yaml, the alternative, says the same.
    let alt = &documents(&root().join("manifests/default-ippool.yaml"))[0]["spec"];
    assert_eq!(alt["cidr"], pool.cidr.as_str());
    assert_eq!(alt["blockSize"], pool.block_size);
    assert_eq!(alt["natOutgoing"], pool.nat_outgoing);
    assert_eq!(alt["vxlanMode"], serde_json::to_value(pool.vxlan_mode).unwrap());
    assert_eq!(alt["ipipMode"], serde_json::to_value(pool.ipip_mode).unwrap());
    let mut checked = 0;
    for d in docs
        .iter()
        .filter(|d| ["DaemonSet", "Deployment"].contains(&d["kind"].as_str().unwrap_or("")))
    {
        let spec = &d["spec"]["template"]["spec"];
        for list in ["initContainers", "containers"] {
            for c in spec[list].as_array().into_iter().flatten() {
                for e in c["env"].as_array().into_iter().flatten() {
                    let optional = e["valueFrom"]["configMapKeyRef"]["optional"] == true;
                    if let Some(k) =
                        e["valueFrom"]["configMapKeyRef"]["key"].as_str().filter(|_| !optional)
                    {
                        assert!(
                            cm["data"][k].is_string(),
                            "{} reads ConfigMap key {k}, which is missing",
                            c["name"]
                        );
                    }
                }
                let cmd: Vec<String> = c["command"]
                    .as_array()
                    .map(|a| a.iter().filter_map(|s| s.as_str().map(String::from)).collect())
                    .unwrap_or_default();
                if cmd.first().map(String::as_str) != Some("ocelot") {
                    continue;
                }
                let help = Command::new(env!("CARGO_BIN_EXE_ocelot"))
                    .args(&cmd[1..])
                    .arg("--help")
                    .output()
                    .expect("ocelot --help");
                let help_text = String::from_utf8_lossy(&help.stdout).to_string();
                assert!(
                    help.status.success(),
                    "`{} --help` fails: the manifests run a subcommand that does not exist:\n{}",
                    cmd.join(" "),
                    String::from_utf8_lossy(&help.stderr)
                );
                for a in c["args"].as_array().into_iter().flatten().filter_map(Value::as_str) {
                    let flag = a.split('=').next().unwrap();
                    if flag.starts_with("--") {
                        assert!(
                            help_text.contains(&format!("{flag} "))
                                || help_text.contains(&format!("{flag}\n"))
                                || help_text.contains(&format!("{flag} <")),
                            "{} passes {flag} to `{}`, which does not take it",
                            c["name"],
                            cmd.join(" ")
                        );
                        checked += 1;
                    }
                }
            }
        }
    }
    assert!(checked >= 4, "only {checked} flags checked");

    // The dataplane's command line, against `ocelot-dataplane run --help`
    // (built beside `ocelot` by `cargo build --workspace --bins`).
    let ds = find(&docs, "DaemonSet", "ocelot-node");
    let dp = container(&ds["spec"]["template"]["spec"], "containers", "dataplane");
    let cmd = dp["command"].as_array().unwrap().last().unwrap().as_str().unwrap().to_string();
    let bin = Path::new(env!("CARGO_BIN_EXE_ocelot")).with_file_name("ocelot-dataplane");
    if !bin.exists() {
        eprintln!("note: {} not built; the dataplane's flags are not checked", bin.display());
        return;
    }
    let help =
        Command::new(&bin).args(["run", "--help"]).output().expect("ocelot-dataplane --help");
    let help = String::from_utf8_lossy(&help.stdout).to_string();
    let flags: Vec<&str> = cmd
        .split_whitespace()
        .map(|w| w.trim_start_matches("${OCELOT_DATAPLANE_CORES:+"))
        .filter(|w| w.starts_with("--"))
        .collect();
    assert!(flags.contains(&"--cores"), "{cmd}");
    for f in flags {
        assert!(
            help.contains(&format!("{f} <")),
            "the dataplane is given {f}, which `run` does not take"
        );
    }
    let probe = dp["livenessProbe"]["exec"]["command"].as_array().unwrap();
    assert_eq!(probe[0], "ocelot-dataplane");
    let out = Command::new(&bin).arg(probe[1].as_str().unwrap()).arg("--help").output().unwrap();
    assert!(
        out.status.success(),
        "the dataplane's liveness probe runs `{}`, which does not exist",
        probe[1]
    );
}

#[test]
fn the_images_are_this_version() {
    let want = format!("ghcr.io/ocelot-net/ocelot:{}", env!("CARGO_PKG_VERSION"));
    let text = std::fs::read_to_string(root().join("manifests/ocelot.yaml")).unwrap();
    let images: Vec<&str> = text.lines().filter_map(|l| l.trim().strip_prefix("image: ")).collect();
    assert!(images.len() >= 4, "{images:?}");
    for i in images {
        assert_eq!(i, want, "bump the images with the workspace version");
    }
    let docker = std::fs::read_to_string(root().join("Dockerfile")).unwrap();
    assert!(docker.contains(&want), "the Dockerfile's build example names {want}");
}

/// Least privilege: exactly these rules, no wildcards, no secrets.
#[test]
fn rbac_grants_least_privilege() {
    let docs = ocelot_yaml();
    let rules = |kind: &str, name: &str| -> Vec<(String, String, String)> {
        let mut v = Vec::new();
        for r in find(&docs, kind, name)["rules"].as_array().unwrap() {
            for g in r["apiGroups"].as_array().unwrap() {
                for res in r["resources"].as_array().unwrap() {
                    for verb in r["verbs"].as_array().unwrap() {
                        v.push((
                            g.as_str().unwrap().to_string(),
                            res.as_str().unwrap().to_string(),
                            verb.as_str().unwrap().to_string(),
                        ));
                    }
                }
            }
        }
        v.sort();
        v
    };
    let all = [
        rules("ClusterRole", "ocelot-node"),
        rules("ClusterRole", "ocelot-controller"),
        rules("Role", "ocelot-controller-leader-election"),
    ]
    .concat();
    for (g, r, v) in &all {
        assert!(g != "*" && r != "*" && v != "*", "wildcard rule {g}/{r}/{v}");
        assert!(r != "secrets", "no secrets: {g}/{r}/{v}");
    }
    let agent = rules("ClusterRole", "ocelot-node");
    let has = |set: &[(String, String, String)], g: &str, r: &str, v: &str| {
        set.contains(&(g.to_string(), r.to_string(), v.to_string()))
    };
    for r in ["nodes", "namespaces", "pods", "services"] {
        for v in ["get", "list", "watch"] {
            assert!(has(&agent, "", r, v), "agent: {r} {v}");
        }
    }
    assert!(has(&agent, "networking.k8s.io", "networkpolicies", "watch"));
    assert!(has(&agent, "discovery.k8s.io", "endpointslices", "watch"));
    assert!(has(&agent, "", "nodes", "patch") && has(&agent, "", "nodes/status", "patch"));
    assert!(has(&agent, "", "events", "create"));
    assert!(
        has(&agent, "ocelot.dev", "ippools", "watch")
            && !has(&agent, "ocelot.dev", "ippools", "create")
    );
    for r in ["ipamblocks", "blockaffinities"] {
        for v in ["get", "list", "watch", "create", "update", "delete"] {
            assert!(has(&agent, "ocelot.dev", r, v), "agent: {r} {v}");
        }
    }
    assert!(
        !agent.iter().any(|(_, r, v)| r == "pods" && v != "get" && v != "list" && v != "watch"),
        "the agent only reads pods"
    );
    let ctl = rules("ClusterRole", "ocelot-controller");
    assert!(has(&ctl, "", "pods", "watch") && has(&ctl, "", "nodes", "watch"));
    // The default pool: listed and created, never changed.
    assert!(
        has(&ctl, "ocelot.dev", "ippools", "list") && has(&ctl, "ocelot.dev", "ippools", "create")
    );
    assert!(
        !has(&ctl, "ocelot.dev", "ippools", "update")
            && !has(&ctl, "ocelot.dev", "ippools", "patch")
            && !has(&ctl, "ocelot.dev", "ippools", "delete")
    );
    assert!(
        !ctl.iter().any(|(g, _, _)| g == "coordination.k8s.io"),
        "leases are namespaced: a Role"
    );
    let lease = rules("Role", "ocelot-controller-leader-election");
    assert!(lease.iter().all(|(g, r, _)| g == "coordination.k8s.io" && r == "leases"), "{lease:?}");
    assert_eq!(
        find(&docs, "Role", "ocelot-controller-leader-election")["metadata"]["namespace"],
        "ocelot-system"
    );
}

/// The real `ocelot install-cni` writes a conflist that parses and chains
/// ocelot, portmap and bandwidth, in that order; a second run changes nothing.
#[test]
fn install_cni_renders_the_chain() {
    let dir = std::env::temp_dir().join(format!("ocelot-install-it-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    for d in ["bin", "net.d"] {
        std::fs::create_dir_all(dir.join(d)).unwrap();
    }
    let run = || {
        Command::new(env!("CARGO_BIN_EXE_ocelot"))
            .arg("install-cni")
            .arg("--node-name=node-a")
            .arg("--mtu=1400")
            .arg(format!("--cni-bin-dir={}", dir.join("bin").display()))
            .arg(format!("--cni-conf-dir={}", dir.join("net.d").display()))
            .arg(format!("--plugin-binary={}", env!("CARGO_BIN_EXE_ocelot")))
            .output()
            .expect("run ocelot install-cni")
    };
    let out = run();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("installed"));
    let text = std::fs::read_to_string(dir.join("net.d/10-ocelot.conflist")).unwrap();
    let list: Value = serde_json::from_str(&text).expect("the conflist is JSON");
    let types: Vec<&str> =
        list["plugins"].as_array().unwrap().iter().map(|p| p["type"].as_str().unwrap()).collect();
    assert_eq!(types, ["ocelot", "portmap", "bandwidth"]);
    assert_eq!(list["plugins"][0]["nodename"], "node-a");
    assert_eq!(list["plugins"][0]["mtu"], 1400);
    assert_eq!(list["plugins"][0]["agentSocket"], "/run/ocelot/cni.sock");
    assert!(dir.join("bin/ocelot").is_file(), "the plugin is installed under its type name");
    let again = run();
    assert!(again.status.success());
    let said = String::from_utf8_lossy(&again.stdout);
    assert!(!said.contains("installed") && said.contains("unchanged"), "{said}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The manifests ask for JSON logs (`OCELOT_LOG_FORMAT` from the
/// ConfigMap): every line the agent writes is then one JSON object with a
/// level, a target and the message; and `--log-level` filters.
#[test]
fn the_agent_logs_json_lines_when_asked() {
    let docs = ocelot_yaml();
    assert_eq!(find(&docs, "ConfigMap", "ocelot-config")["data"]["log_format"], "json");
    let dir = std::env::temp_dir().join(format!("ocelot-logs-it-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("ds")).unwrap();
    let run = |level: &str| {
        let mut child = Command::new(env!("CARGO_BIN_EXE_ocelot"))
            .env("OCELOT_LOG_FORMAT", "json")
            .env("OCELOT_LOG", level)
            .env_remove("RUST_LOG")
            .arg("agent")
            .arg("--node=n1")
            .arg(format!("--datastore={}", dir.join("ds").display()))
            .arg(format!("--dataplane-socket={}", dir.join("none.sock").display()))
            .arg(format!("--cni-socket={}", dir.join(format!("cni-{level}.sock")).display()))
            .arg("--metrics-addr=")
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("start the agent");
        std::thread::sleep(std::time::Duration::from_millis(700));
        let _ = child.kill();
        let out = child.wait_with_output().unwrap();
        String::from_utf8_lossy(&out.stderr).to_string()
    };
    let info = run("info");
    let lines: Vec<Value> = info
        .lines()
        .map(|l| {
            serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON log line ({e}): {l:?}"))
        })
        .collect();
    assert!(!lines.is_empty(), "the agent logged nothing");
    for l in &lines {
        assert!(
            l["level"].is_string() && l["target"].is_string() && l["timestamp"].is_string(),
            "{l}"
        );
    }
    assert!(lines
        .iter()
        .any(|l| l["fields"]["message"] == "agent starting" && l["fields"]["node"] == "n1"));
    let errors_only = run("error");
    assert!(
        !errors_only.contains("agent starting"),
        "--log-level error still logs info: {errors_only}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

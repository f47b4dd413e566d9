//! `ocelot install-cni`: what the DaemonSet's init container does on every
//! node — put the CNI plugin in the runtime's plugin directory and the
//! network configuration in its config directory.
//!
//! Both files are replaced atomically (written beside the target, flushed,
//! renamed over it), so the container runtime never executes half a binary
//! or reads half a conflist; running it again with the same inputs changes
//! nothing (files whose content is already right are not touched).
//!
//! The plugin is installed under its `type` name (`ocelot`), the name the
//! runtime executes: the conflist says `"type": "ocelot"`.

use anyhow::{bail, Context};
use std::io::Write as _;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

/// `ocelot install-cni` flags.
#[derive(clap::Args, Debug, Clone)]
pub struct InstallCniArgs {
    /// This node's name, written into the ocelot plugin's `nodename`.
    #[arg(long, env = "OCELOT_NODE_NAME")]
    pub node_name: String,
    /// Pod MTU written into the ocelot plugin's `mtu`; 0 leaves it out, and
    /// the agent picks it (the uplink's MTU minus the encapsulation's).
    #[arg(long, env = "OCELOT_MTU", default_value_t = 0)]
    pub mtu: u32,
    /// Where the container runtime looks for CNI plugins (the host's
    /// /opt/cni/bin, mounted into the init container).
    #[arg(long, default_value = "/host/opt/cni/bin")]
    pub cni_bin_dir: PathBuf,
    /// Where the container runtime reads network configurations (the
    /// host's /etc/cni/net.d).
    #[arg(long, default_value = "/host/etc/cni/net.d")]
    pub cni_conf_dir: PathBuf,
    /// File name of the network configuration in --cni-conf-dir. The
    /// runtime uses the first file in lexical order.
    #[arg(long, default_value = "10-ocelot.conflist")]
    pub conf_name: String,
    /// The CNI plugin binary to install (default: `ocelot-cni` beside this
    /// `ocelot` binary).
    #[arg(long)]
    pub plugin_binary: Option<PathBuf>,
    /// A conflist template to render instead of the built-in one
    /// (manifests/cni/10-ocelot.conflist: ocelot, portmap, bandwidth).
    #[arg(long)]
    pub template: Option<PathBuf>,
    /// The agent's CNI socket, as the plugin sees it on the host.
    #[arg(long, default_value = "/run/ocelot/cni.sock")]
    pub agent_socket: PathBuf,
    /// Directory holding the standard plugins chained after ocelot
    /// (portmap, bandwidth). Each one the conflist names that is missing
    /// from --cni-bin-dir is copied from here; one already there is left
    /// alone (it is the cluster's own).
    #[arg(long)]
    pub chained_plugins_from: Option<PathBuf>,
}

/// What an install did to one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Written(PathBuf),
    Unchanged(PathBuf),
}

/// Render the conflist for a node: the template with `agentSocket`, the
/// `mtu` (left out when 0) and `nodename` set on the ocelot plugin.
pub fn render_conflist(
    template: &str,
    node: &str,
    mtu: u32,
    agent_socket: &Path,
) -> anyhow::Result<String> {
    if node.is_empty() {
        bail!("the node name is empty (set --node-name or OCELOT_NODE_NAME)");
    }
    if mtu != 0 && !(68..=65535).contains(&mtu) {
        bail!("--mtu {mtu}: must be 0 (automatic) or between 68 and 65535");
    }
    let t = crate::lab::cni::parse_conflist(template).context("conflist template")?;
    let mut v = crate::lab::cni::render(&t, agent_socket, mtu)?;
    for p in v["plugins"].as_array_mut().into_iter().flatten() {
        if p["type"] == crate::lab::cni::OCELOT_TYPE {
            p["nodename"] = serde_json::Value::String(node.to_string());
        }
    }
    Ok(serde_json::to_string_pretty(&v)? + "\n")
}

/// Write `content` to `path` atomically with `mode`, unless the file
/// already holds exactly that (and has that mode).
pub fn write_atomic(path: &Path, content: &[u8], mode: u32) -> anyhow::Result<Outcome> {
    if let Ok(old) = std::fs::read(path) {
        let same_mode = std::fs::metadata(path)
            .map(|m| m.permissions().mode() & 0o7777 == mode)
            .unwrap_or(false);
        if old == content && same_mode {
            return Ok(Outcome::Unchanged(path.to_path_buf()));
        }
    }
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .with_context(|| format!("{} has no file name", path.display()))?
        .to_string_lossy();
    let tmp = dir.join(format!(".{name}.ocelot-tmp-{}", std::process::id()));
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(content)?;
        f.set_permissions(std::fs::Permissions::from_mode(mode))?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        // The rename itself is durable once the directory is flushed.
        std::fs::File::open(dir)?.sync_all()
    };
    if let Err(e) = write() {
        let _ = std::fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("cannot write {}", path.display()));
    }
    Ok(Outcome::Written(path.to_path_buf()))
}

/// The `ocelot-cni` binary beside the running `ocelot`.
fn default_plugin() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("cannot find the running binary")?;
    Ok(exe.with_file_name(crate::lab::cni::OCELOT_BINARY))
}

/// Install the plugin and the conflist; returns what was done per file.
pub fn install(a: &InstallCniArgs) -> anyhow::Result<Vec<Outcome>> {
    let template = match &a.template {
        Some(p) => std::fs::read_to_string(p)
            .with_context(|| format!("cannot read the template {}", p.display()))?,
        None => crate::lab::cni::TEMPLATE.to_string(),
    };
    let conflist = render_conflist(&template, &a.node_name, a.mtu, &a.agent_socket)?;
    for d in [&a.cni_bin_dir, &a.cni_conf_dir] {
        if !d.is_dir() {
            bail!("{} is not a directory (is the host path mounted?)", d.display());
        }
    }
    if a.conf_name.contains('/') || !a.conf_name.ends_with(".conflist") {
        bail!("--conf-name {:?}: a file name ending in .conflist", a.conf_name);
    }
    let plugin = match &a.plugin_binary {
        Some(p) => p.clone(),
        None => default_plugin()?,
    };
    let bin = std::fs::read(&plugin)
        .with_context(|| format!("cannot read the CNI plugin {}", plugin.display()))?;
    let mut done = Vec::new();
    // The binary first: a conflist naming a plugin not yet there would
    // fail pod starts.
    done.push(write_atomic(&a.cni_bin_dir.join(crate::lab::cni::OCELOT_TYPE), &bin, 0o755)?);
    if let Some(src) = &a.chained_plugins_from {
        let list: serde_json::Value = serde_json::from_str(&conflist)?;
        for t in crate::lab::cni::plugin_types(&list) {
            if t == crate::lab::cni::OCELOT_TYPE || a.cni_bin_dir.join(&t).exists() {
                continue;
            }
            let from = src.join(&t);
            let b = std::fs::read(&from).with_context(|| {
                format!(
                    "the chained plugin {t:?} is neither in {} nor in {}",
                    a.cni_bin_dir.display(),
                    src.display()
                )
            })?;
            done.push(write_atomic(&a.cni_bin_dir.join(&t), &b, 0o755)?);
        }
    }
    done.push(write_atomic(&a.cni_conf_dir.join(&a.conf_name), conflist.as_bytes(), 0o644)?);
    Ok(done)
}

/// The network configurations in `dir` that the container runtime reads
/// before `ours` (it takes the first in lexical order): another network
/// plugin's, or the runtime's own default, would win over Ocelot.
pub fn shadowing_configs(dir: &Path, ours: &str) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| {
            !n.starts_with('.')
                && [".conf", ".conflist", ".json"].iter().any(|x| n.ends_with(x))
                && n.as_str() < ours
        })
        .collect();
    v.sort();
    v
}

/// The subcommand: install, and say what changed.
pub fn run(a: InstallCniArgs) -> anyhow::Result<()> {
    for o in install(&a)? {
        match o {
            Outcome::Written(p) => println!("installed {}", p.display()),
            Outcome::Unchanged(p) => println!("unchanged {}", p.display()),
        }
    }
    let before = shadowing_configs(&a.cni_conf_dir, &a.conf_name);
    if !before.is_empty() {
        eprintln!(
            "warning: the container runtime reads {} in {} before {}: pods would not use \
             Ocelot until they are removed (or --conf-name sorts first, e.g. 00-ocelot.conflist)",
            before.join(", "),
            a.cni_conf_dir.display(),
            a.conf_name
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("ocelot-install-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn args(root: &Path) -> InstallCniArgs {
        for d in ["bin", "net.d", "src"] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        std::fs::write(root.join("src/ocelot-cni"), b"#!/bin/sh\necho plugin\n").unwrap();
        std::fs::write(root.join("src/portmap"), b"portmap").unwrap();
        std::fs::write(root.join("src/bandwidth"), b"bandwidth").unwrap();
        InstallCniArgs {
            node_name: "node-7".into(),
            mtu: 1410,
            cni_bin_dir: root.join("bin"),
            cni_conf_dir: root.join("net.d"),
            conf_name: "10-ocelot.conflist".into(),
            plugin_binary: Some(root.join("src/ocelot-cni")),
            template: None,
            agent_socket: "/run/ocelot/cni.sock".into(),
            chained_plugins_from: Some(root.join("src")),
        }
    }

    #[test]
    fn installs_atomically_and_idempotently() {
        let root = tmpdir("idem");
        let a = args(&root);
        let first = install(&a).unwrap();
        assert!(first.iter().all(|o| matches!(o, Outcome::Written(_))), "{first:?}");
        assert_eq!(first.len(), 4, "plugin, portmap, bandwidth, conflist: {first:?}");
        let bin = root.join("bin/ocelot");
        assert_eq!(std::fs::metadata(&bin).unwrap().permissions().mode() & 0o777, 0o755);
        let list: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(root.join("net.d/10-ocelot.conflist")).unwrap(),
        )
        .unwrap();
        assert_eq!(crate::lab::cni::plugin_types(&list), ["ocelot", "portmap", "bandwidth"]);
        assert_eq!(list["plugins"][0]["nodename"], "node-7");
        assert_eq!(list["plugins"][0]["mtu"], 1410);
        // Again: nothing rewritten, no temporary file left.
        let second = install(&a).unwrap();
        assert!(second.iter().all(|o| matches!(o, Outcome::Unchanged(_))), "{second:?}");
        let leftovers: Vec<_> = std::fs::read_dir(root.join("bin"))
            .unwrap()
            .chain(std::fs::read_dir(root.join("net.d")).unwrap())
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with('.'))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
        // The cluster's own portmap is never replaced.
        std::fs::write(root.join("bin/portmap"), b"the cluster's").unwrap();
        let mut b = a.clone();
        b.mtu = 0;
        install(&b).unwrap();
        assert_eq!(std::fs::read(root.join("bin/portmap")).unwrap(), b"the cluster's");
        let list: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(root.join("net.d/10-ocelot.conflist")).unwrap(),
        )
        .unwrap();
        assert!(list["plugins"][0].get("mtu").is_none(), "mtu 0 is left to the agent");
        assert!(shadowing_configs(&root.join("net.d"), "10-ocelot.conflist").is_empty());
        std::fs::write(root.join("net.d/10-containerd-net.conflist"), "{}").unwrap();
        std::fs::write(root.join("net.d/99-loopback.conf"), "{}").unwrap();
        assert_eq!(
            shadowing_configs(&root.join("net.d"), "10-ocelot.conflist"),
            ["10-containerd-net.conflist"]
        );
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn bad_inputs_are_clear_errors_and_write_nothing() {
        let root = tmpdir("bad");
        let a = args(&root);
        let mut e = a.clone();
        e.node_name = String::new();
        assert!(install(&e).unwrap_err().to_string().contains("node name is empty"));
        let mut e = a.clone();
        e.mtu = 40;
        assert!(install(&e).unwrap_err().to_string().contains("--mtu 40"));
        let mut e = a.clone();
        e.cni_conf_dir = root.join("missing");
        assert!(format!("{:#}", install(&e).unwrap_err()).contains("is not a directory"));
        let mut e = a.clone();
        e.plugin_binary = Some(root.join("nope"));
        assert!(format!("{:#}", install(&e).unwrap_err()).contains("cannot read the CNI plugin"));
        let mut e = a.clone();
        std::fs::write(root.join("bad.conflist"), "{not json").unwrap();
        e.template = Some(root.join("bad.conflist"));
        assert!(format!("{:#}", install(&e).unwrap_err()).contains("conflist"));
        assert_eq!(std::fs::read_dir(root.join("bin")).unwrap().count(), 0);
        assert_eq!(std::fs::read_dir(root.join("net.d")).unwrap().count(), 0);
        std::fs::remove_dir_all(&root).unwrap();
    }
}

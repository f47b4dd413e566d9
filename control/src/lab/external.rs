//! `ocelot lab external add|delete`: a namespace outside the cluster, on
//! one of the fabric's underlay subnets, like a machine in the same
//! datacenter. It reaches NodePorts on the nodes' addresses, and serves
//! ports (`ocelot lab serve`, answering `external/<name>`) for pods that
//! leave the cluster, through natOutgoing or not.
//!
//! ```text
//!  fabric netns: ocl-br0 ── ocl-x1 ═veth═ eth0 192.0.2.201/24 (ocl-<lab>-ext-<name>), default via 192.0.2.1
//! ```

use crate::lab::cluster::{progress, Lab};
use crate::lab::names;
use crate::lab::state::{ExternalState, PortSpec, Resource};
use crate::lab::sys::{self, ProcRef};
use anyhow::{anyhow, bail, Context};
use std::net::Ipv4Addr;
use std::process::Command;
use std::time::{Duration, Instant};

/// The external's address on its subnet: `.200 + index`.
const HOST_BASE: u32 = 200;

/// `ocl-<lab>-ext-<name>`.
pub fn external_netns(lab: &str, name: &str) -> String {
    format!("ocl-{lab}-ext-{name}")
}

/// External names: as lab names (they end up in namespace names).
pub fn validate_name(name: &str) -> Result<(), String> {
    names::validate_lab_name(name).map_err(|_| {
        format!(
            "external name {name:?}: use 1-20 lowercase letters, digits or '-' (not at either end)"
        )
    })
}

impl Lab {
    /// Attach a new external namespace to subnet `subnet`, serving `ports`.
    pub fn add_external(
        &mut self,
        name: &str,
        subnet: u32,
        ports: Vec<PortSpec>,
    ) -> anyhow::Result<ExternalState> {
        validate_name(name).map_err(|e| anyhow!(e))?;
        if self.state.externals.contains_key(name) {
            bail!("external {name} already exists (`ocelot lab external delete {name}` first)");
        }
        let lab = self.state.name.clone();
        let sn = self.ensure_subnet(subnet)?;
        let used: std::collections::BTreeSet<u32> = self
            .state
            .externals
            .values()
            .filter_map(|e| e.link.strip_prefix("ocl-x").and_then(|i| i.parse().ok()))
            .collect();
        let index = (1..).find(|i| !used.contains(i)).unwrap_or(1);
        let host = HOST_BASE + index;
        if u64::from(host) >= (1u64 << (32 - sn.prefix)) - 1 {
            bail!("subnet {subnet} ({}) has no room for another external", sn.cidr);
        }
        let ip = Ipv4Addr::from(u32::from(sn.base) + host);
        let netns = external_netns(&lab, name);
        let fabric = names::fabric_netns(&lab);
        let link = format!("ocl-x{index}");
        let st = ExternalState {
            name: name.to_string(),
            netns: netns.clone(),
            subnet,
            ip: ip.to_string(),
            prefix: sn.prefix,
            link: link.clone(),
            ports,
            server: None,
        };
        progress!(
            "external {name}: namespace {netns}, subnet {subnet}, address {ip}/{}",
            sn.prefix
        );
        self.state.externals.insert(name.to_string(), st.clone());
        self.state.record(Resource::Netns { name: netns.clone() })?;
        sys::netns_add(&netns)?;
        self.state.record(Resource::Link { netns: fabric.clone(), name: link.clone() })?;
        sys::ip(&[
            "-n", &netns, "link", "add", "eth0", "type", "veth", "peer", "name", &link, "netns",
            &fabric,
        ])?;
        sys::ip(&["-n", &fabric, "link", "set", &link, "master", &sn.bridge, "up"])?;
        sys::ip(&["-n", &netns, "addr", "add", &format!("{ip}/{}", sn.prefix), "dev", "eth0"])?;
        sys::ip(&["-n", &netns, "link", "set", "eth0", "up"])?;
        let gw = sn.gateway().to_string();
        sys::ip(&["-n", &netns, "route", "add", "default", "via", &gw, "dev", "eth0"])?;
        if !st.ports.is_empty() {
            self.start_external_server(name)?;
        }
        Ok(self.state.externals[name].clone())
    }

    /// `ocelot lab serve` in the external, answering `external/<name>`.
    fn start_external_server(&mut self, name: &str) -> anyhow::Result<()> {
        let st = self.state.externals[name].clone();
        let dir = self.state.dir.join("externals").join(name);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let ready = dir.join("serve.ready");
        let _ = std::fs::remove_file(&ready);
        let exe = std::env::current_exe().context("finding the ocelot binary")?;
        let mut cmd = Command::new(exe);
        cmd.args(["lab", "serve", "--pod", &format!("external/{name}"), "--ready-file"])
            .arg(&ready);
        for p in &st.ports {
            cmd.arg("--port").arg(format!("{}/{}", p.port, p.protocol));
        }
        let child = sys::spawn_daemon(cmd, &names::netns_path(&st.netns), &dir.join("serve.log"))?;
        let r = ProcRef::of(child.id(), format!("server external/{name}"));
        self.state.record(Resource::Process { proc: r.clone() })?;
        self.state.externals.get_mut(name).expect("external").server = Some(r);
        self.state.save()?;
        let end = Instant::now() + Duration::from_secs(10);
        while !ready.exists() {
            if Instant::now() >= end {
                bail!(
                    "external {name}: its server did not start; end of its log:\n{}",
                    sys::tail(&dir.join("serve.log"), 5)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// Remove an external: its server, namespace and link.
    pub fn remove_external(&mut self, name: &str) -> anyhow::Result<()> {
        let Some(st) = self.state.externals.get(name).cloned() else {
            bail!("no external {name} in lab {}", self.state.name);
        };
        progress!("external {name}: removing");
        if let Some(p) = &st.server {
            p.stop(Duration::from_secs(2));
            self.state.forget(&Resource::Process { proc: p.clone() })?;
        }
        sys::kill_all_in_netns(&names::netns_path(&st.netns), Duration::from_secs(1));
        sys::netns_del(&st.netns)?;
        self.state.forget(&Resource::Netns { name: st.netns.clone() })?;
        let fabric = names::fabric_netns(&self.state.name);
        sys::link_del(&fabric, &st.link)?;
        self.state.forget(&Resource::Link { netns: fabric, name: st.link.clone() })?;
        self.state.externals.remove(name);
        let _ = std::fs::remove_dir_all(self.state.dir.join("externals").join(name));
        self.state.save()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(external_netns("t1", "client"), "ocl-t1-ext-client");
        assert!(validate_name("client-1").is_ok());
        assert!(validate_name("Client").is_err());
        assert!(validate_name("").is_err());
    }
}

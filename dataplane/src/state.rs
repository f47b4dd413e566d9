//! What the dataplane persists so that a restart (even `kill -9`) resumes
//! with the same endpoints: their specs, written atomically on every change.

use crate::api::{Cidr, EndpointSpec};
use serde::{Deserialize, Serialize};
use std::io;
use std::path::{Path, PathBuf};

const FILE: &str = "dataplane-state.json";
const FORMAT: u32 = 1;

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Persisted {
    pub format: u32,
    pub endpoints: Vec<EndpointSpec>,
    pub pools: Vec<Cidr>,
    #[serde(default)]
    pub overlay: Option<crate::api::OverlaySpec>,
    /// NetworkPolicy per endpoint name.
    #[serde(default)]
    pub policies: std::collections::BTreeMap<String, crate::policy::EndpointPolicy>,
    /// Services and natOutgoing, as last set.
    #[serde(default)]
    pub services: Option<crate::api::ServicesSpec>,
}

/// The state directory, created root-only.
pub struct StateDir(PathBuf);

impl StateDir {
    pub fn open(dir: &Path) -> io::Result<StateDir> {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
        Ok(StateDir(dir.to_path_buf()))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    /// The saved state; empty when there is none. A corrupt file is kept
    /// aside (`.corrupt`) and reported, never silently overwritten.
    pub fn load(&self) -> io::Result<Persisted> {
        let p = self.0.join(FILE);
        let text = match std::fs::read_to_string(&p) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Ok(Persisted { format: FORMAT, ..Default::default() })
            }
            Err(e) => return Err(e),
        };
        match serde_json::from_str::<Persisted>(&text) {
            Ok(s) if s.format == FORMAT => Ok(s),
            Ok(s) => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: unknown format {}", p.display(), s.format),
            )),
            Err(e) => {
                let aside = self.0.join(format!("{FILE}.corrupt"));
                let _ = std::fs::rename(&p, &aside);
                Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{}: {e} (moved to {})", p.display(), aside.display()),
                ))
            }
        }
    }

    pub fn save(&self, s: &Persisted) -> io::Result<()> {
        use std::io::Write;
        let p = self.0.join(FILE);
        let tmp = self.0.join(format!("{FILE}.tmp"));
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(
            &serde_json::to_vec_pretty(&Persisted { format: FORMAT, ..s.clone() })
                .map_err(io::Error::other)?,
        )?;
        // No fsync: the file must survive a crash of the process (rename is
        // atomic for that), not of the machine — after a reboot the pods'
        // TAPs are gone too. An fsync cost 18 ms of every pod ADD here.
        std::fs::rename(&tmp, &p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_corruption() {
        let dir = std::env::temp_dir().join(format!("ocelot-state-test-{}", std::process::id()));
        let sd = StateDir::open(&dir).unwrap();
        assert_eq!(sd.load().unwrap().endpoints.len(), 0);
        let s = Persisted {
            format: FORMAT,
            endpoints: vec![EndpointSpec {
                name: "oc1".into(),
                netns: "/var/run/netns/x".into(),
                ifname: "eth0".into(),
                mac: None,
                ips: vec!["10.65.0.2".parse().unwrap()],
                mtu: 1450,
            }],
            pools: vec!["10.65.0.0/16".parse().unwrap()],
            overlay: Some(crate::api::OverlaySpec {
                local_ip: "192.0.2.11".parse().unwrap(),
                vtep_mac: "66:00:00:00:00:01".parse().unwrap(),
                vni: 4096,
                vxlan_port: 4789,
                uplink_mtu: 0,
                nodes: vec![crate::api::RemoteNodeSpec {
                    name: "node-2".into(),
                    ip: "192.0.2.12".parse().unwrap(),
                    vtep_mac: "66:00:00:00:00:02".parse().unwrap(),
                }],
                routes: vec![crate::api::RemoteRoute {
                    cidr: "10.65.1.0/26".parse().unwrap(),
                    node: "node-2".into(),
                    encap: crate::tables::Encap::Vxlan,
                }],
                uplink_mode: crate::api::UplinkMode::Socket,
            }),
            policies: [(
                "oc1".to_string(),
                crate::policy::EndpointPolicy { ingress: Some(vec![]), egress: None },
            )]
            .into_iter()
            .collect(),
            services: Some(crate::api::ServicesSpec {
                services: vec![crate::api::ServiceSpec {
                    name: "default/web:http".into(),
                    proto: crate::policy::Proto::Tcp,
                    frontends: vec![crate::api::Frontend {
                        addr: "10.96.0.10".parse().unwrap(),
                        port: 80,
                        kind: crate::api::FrontendKind::ClusterIp,
                    }],
                    backends: vec![crate::api::Backend {
                        addr: "10.65.0.2".parse().unwrap(),
                        port: 8080,
                        local: true,
                        ready: true,
                        serving: true,
                        terminating: false,
                    }],
                    affinity_timeout_s: 10800,
                    external_local: false,
                    internal_local: false,
                }],
                service_cidrs: vec!["10.96.0.0/12".parse().unwrap()],
                ..Default::default()
            }),
        };
        sd.save(&s).unwrap();
        assert_eq!(sd.load().unwrap(), s);
        std::fs::write(dir.join(FILE), "{not json").unwrap();
        assert!(sd.load().is_err());
        assert!(dir.join(format!("{FILE}.corrupt")).exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

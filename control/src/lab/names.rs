//! Names of everything the lab makes: namespaces, devices, datastore files,
//! container IDs. Every network namespace carries the prefix `ocl-<lab>-`,
//! and every device lives inside one of the lab's own namespaces (it is
//! created there, never in the host's), so nothing can collide with the
//! host or with another lab.

use crate::model::Object;
use std::io::Read;
use std::path::PathBuf;

/// Where `ip netns add` puts its bind mounts.
pub const NETNS_DIR: &str = "/run/netns";
/// A node's end of its fabric link (inside the node's namespace).
pub const NODE_UPLINK: &str = "ocl-fab";
/// The pod interface, as kubelet asks for it.
pub const POD_IFNAME: &str = "eth0";
/// `sun_path` holds 107 bytes and a NUL.
pub const MAX_SOCKET_PATH: usize = 107;
/// Linux's `IFNAMSIZ` minus the NUL.
pub const MAX_IFNAME: usize = 15;

/// Lab names: lowercase letters, digits and `-`, 1 to 20 characters, not
/// starting or ending with `-` (they end up in namespace names and paths).
pub fn validate_lab_name(name: &str) -> Result<(), String> {
    let ok_chars = name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if name.is_empty()
        || name.len() > 20
        || !ok_chars
        || name.starts_with('-')
        || name.ends_with('-')
    {
        return Err(format!(
            "lab name {name:?}: use 1-20 lowercase letters, digits or '-' (not at either end)"
        ));
    }
    Ok(())
}

/// Kubernetes object names as the lab accepts them in paths: no `/`, no
/// NUL, not `.` or `..`, not empty.
pub fn validate_object_name(kind: &str, name: &str) -> Result<(), String> {
    if name.is_empty()
        || name == "."
        || name == ".."
        || name.len() > 253
        || name.bytes().any(|b| b == b'/' || b == 0 || b.is_ascii_whitespace())
    {
        return Err(format!("{kind} name {name:?} is not a valid Kubernetes name"));
    }
    Ok(())
}

pub fn fabric_netns(lab: &str) -> String {
    format!("ocl-{lab}-fabric")
}

pub fn node_netns(lab: &str, node: &str) -> String {
    format!("ocl-{lab}-node-{node}")
}

/// `.` separates namespace and pod: Kubernetes namespace names cannot hold
/// one, so the mapping is unambiguous.
pub fn pod_netns(lab: &str, namespace: &str, pod: &str) -> String {
    format!("ocl-{lab}-pod-{namespace}.{pod}")
}

pub fn netns_path(name: &str) -> PathBuf {
    PathBuf::from(NETNS_DIR).join(name)
}

/// The bridge of underlay subnet `k` in the fabric namespace (`ocl-br0` is
/// the fabric CIDR's).
pub fn bridge(k: u32) -> String {
    format!("ocl-br{k}")
}

/// The fabric bridge's port for node number `index`.
pub fn bridge_port(index: u32) -> String {
    format!("ocl-n{index}")
}

/// Name of the datastore file holding `o`. Kubernetes names cannot contain
/// `_`, so `pod-<ns>_<name>` never collides.
pub fn datastore_file(o: &Object) -> String {
    match o {
        Object::Pod(p) => format!("pod-{}_{}.yaml", p.namespace(), p.metadata.name),
        Object::Node(n) => format!("node-{}.yaml", n.metadata.name),
        Object::Namespace(n) => format!("namespace-{}.yaml", n.metadata.name),
        Object::IpPool(p) => format!("ippool-{}.yaml", p.metadata.name),
        Object::NetworkPolicy(p) => {
            format!("networkpolicy-{}_{}.yaml", p.namespace(), p.metadata.name)
        }
        Object::Service(s) => format!("service-{}_{}.yaml", s.namespace(), s.metadata.name),
        Object::EndpointSlice(s) => {
            format!("endpointslice-{}_{}.yaml", s.namespace(), s.metadata.name)
        }
    }
}

/// Random bytes from the kernel.
fn random<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        if f.read_exact(&mut b).is_ok() {
            return b;
        }
    }
    // No /dev/urandom: time and pid are unique enough for a lab.
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let seed = t ^ (u128::from(std::process::id()) << 64);
    for (i, x) in b.iter_mut().enumerate() {
        *x = (seed >> ((i % 16) * 8)) as u8 ^ (i as u8).wrapping_mul(151);
    }
    b
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A sandbox ID as containerd makes them: 64 hex digits.
pub fn container_id() -> String {
    hex(&random::<32>())
}

/// A pod UID: a random (version 4) UUID.
pub fn pod_uid() -> String {
    let mut b = random::<16>();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = hex(&b);
    format!("{}-{}-{}-{}-{}", &h[0..8], &h[8..12], &h[12..16], &h[16..20], &h[20..32])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::parse_documents;

    #[test]
    fn lab_names() {
        assert!(validate_lab_name("default").is_ok());
        assert!(validate_lab_name("e2e-12").is_ok());
        for bad in ["", "-a", "a-", "A", "a_b", "a/b", "abcdefghijklmnopqrstu"] {
            assert!(validate_lab_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn object_names() {
        assert!(validate_object_name("Pod", "web-1.x").is_ok());
        for bad in ["", ".", "..", "a/b", "a b"] {
            assert!(validate_object_name("Pod", bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn namespaces_and_devices() {
        assert_eq!(node_netns("default", "node-1"), "ocl-default-node-node-1");
        assert_eq!(pod_netns("default", "x", "a"), "ocl-default-pod-x.a");
        assert_eq!(fabric_netns("e2e"), "ocl-e2e-fabric");
        assert_eq!(netns_path("n").to_str(), Some("/run/netns/n"));
        assert_eq!(bridge(0), "ocl-br0");
        for name in [&bridge(999_999), NODE_UPLINK, POD_IFNAME, &bridge_port(99_999)] {
            assert!(name.len() <= MAX_IFNAME, "{name}");
        }
    }

    #[test]
    fn datastore_files_do_not_collide() {
        let (objs, _) = parse_documents(
            "kind: Pod\nmetadata: {name: b-c, namespace: a}\n---\n\
             kind: Pod\nmetadata: {name: c, namespace: a-b}\n---\n\
             kind: Node\nmetadata: {name: n1}\n---\n\
             kind: Namespace\nmetadata: {name: x}\n---\n\
             apiVersion: ocelot.dev/v1\nkind: IPPool\nmetadata: {name: p}\nspec: {cidr: 10.0.0.0/8}\n",
        )
        .unwrap();
        let names: Vec<String> = objs.iter().map(datastore_file).collect();
        assert_eq!(
            names,
            [
                "pod-a_b-c.yaml",
                "pod-a-b_c.yaml",
                "node-n1.yaml",
                "namespace-x.yaml",
                "ippool-p.yaml"
            ]
        );
    }

    #[test]
    fn ids_look_like_containerds() {
        let id = container_id();
        assert_eq!(id.len(), 64);
        assert!(id.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_ne!(id, container_id());
        let uid = pod_uid();
        assert_eq!(uid.len(), 36);
        assert_eq!(&uid[14..15], "4");
        assert_eq!(uid.matches('-').count(), 4);
    }
}

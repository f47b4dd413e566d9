//! Which pools a node may allocate from.

use crate::ipam::PoolSpec;
use crate::model::{IpPool, Node};
use ocelot_dataplane::api::Cidr;

/// Does `node` match a Calico-style selector? Supported: empty or `all()`,
/// and `key == 'value'` / `key != 'value'` / `has(key)` terms joined by `&&`.
/// An expression we cannot read matches nothing (and is reported).
pub fn selects(selector: Option<&str>, node: Option<&Node>) -> Result<bool, String> {
    let sel = selector.unwrap_or("").trim();
    if sel.is_empty() || sel == "all()" {
        return Ok(true);
    }
    let labels = node.map(|n| n.metadata.labels.clone()).unwrap_or_default();
    for term in sel.split("&&").map(str::trim) {
        let unq = |s: &str| s.trim().trim_matches(|c| c == '\'' || c == '"').to_string();
        let ok = if let Some(k) = term.strip_prefix("has(").and_then(|t| t.strip_suffix(')')) {
            labels.contains_key(k.trim())
        } else if let Some((k, v)) = term.split_once("!=") {
            labels.get(k.trim()) != Some(&unq(v))
        } else if let Some((k, v)) = term.split_once("==") {
            labels.get(k.trim()) == Some(&unq(v))
        } else {
            return Err(format!("unsupported nodeSelector term {term:?}"));
        };
        if !ok {
            return Ok(false);
        }
    }
    Ok(true)
}

/// The enabled IPv4 pools `node` may use, as IPAM specs.
pub fn for_node<'a>(
    pools: impl IntoIterator<Item = &'a IpPool>,
    node: Option<&Node>,
) -> Vec<PoolSpec> {
    pools
        .into_iter()
        .filter(|p| !p.spec.disabled)
        .filter_map(|p| {
            let cidr: Cidr = match p.spec.cidr.parse() {
                Ok(c) => c,
                Err(e) => {
                    tracing::error!(pool = %p.metadata.name, "{e}");
                    return None;
                }
            };
            match selects(p.spec.node_selector.as_deref(), node) {
                Ok(true) => Some(PoolSpec {
                    name: p.metadata.name.clone(),
                    cidr,
                    block_size: p.spec.block_size,
                }),
                Ok(false) => None,
                Err(e) => {
                    tracing::error!(pool = %p.metadata.name, "{e}");
                    None
                }
            }
        })
        .filter(|p| p.cidr.addr.is_ipv4() && p.block_size >= p.cidr.len && p.block_size <= 32)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ObjectMeta;

    fn node(labels: &[(&str, &str)]) -> Node {
        Node {
            metadata: ObjectMeta {
                name: "n".into(),
                labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    #[test]
    fn selectors() {
        let n = node(&[("zone", "a"), ("gpu", "yes")]);
        assert_eq!(selects(None, Some(&n)), Ok(true));
        assert_eq!(selects(Some("all()"), Some(&n)), Ok(true));
        assert_eq!(selects(Some("zone == 'a'"), Some(&n)), Ok(true));
        assert_eq!(selects(Some("zone == 'b'"), Some(&n)), Ok(false));
        assert_eq!(selects(Some("zone == 'a' && has(gpu)"), Some(&n)), Ok(true));
        assert_eq!(selects(Some("zone != 'a'"), Some(&n)), Ok(false));
        assert!(selects(Some("zone in {'a'}"), Some(&n)).is_err());
    }
}

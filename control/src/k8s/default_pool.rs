//! The default IP pool, as calico-node makes it from `CALICO_IPV4POOL_CIDR`
//! and `CALICO_IPV4POOL_VXLAN`, but made by the leader-elected controller
//! (one writer): when the cluster holds no IPPool at all, create
//! `default-ipv4-ippool` from the `--default-*` flags (the ConfigMap's
//! `pool_cidr`, `encapsulation`, `pool_block_size`, `pool_nat_outgoing`).
//!
//! Never modifies an existing pool, never creates one when any pool exists
//! (the user's pools win); `409 AlreadyExists` means another writer made it.
//! The flags are checked at start ([`DefaultPoolArgs::spec`]); the decision
//! is [`decide`], pure; [`ensure`] reads and writes.

use super::crd::{EncapMode, IpPoolObject, IpPoolSpec};
use kube::api::{Api, ListParams, ObjectMeta, PostParams};
use ocelot_dataplane::api::Cidr;
use std::net::IpAddr;

/// The name of the pool the controller creates.
pub const DEFAULT_POOL_NAME: &str = "default-ipv4-ippool";

/// How pods on different nodes reach each other, as the ConfigMap's
/// `encapsulation` spells it.
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PoolEncapsulation {
    /// VXLAN between every two nodes (`vxlanMode: Always`).
    #[default]
    Vxlan,
    /// VXLAN only between nodes on different subnets (`vxlanMode: CrossSubnet`).
    VxlanCrossSubnet,
    /// IP-in-IP between every two nodes (`ipipMode: Always`).
    Ipip,
    /// IP-in-IP only between nodes on different subnets (`ipipMode: CrossSubnet`).
    IpipCrossSubnet,
    /// Routed natively (the nodes share a layer-2 segment).
    None,
}

impl PoolEncapsulation {
    /// `(vxlanMode, ipipMode)`.
    pub fn modes(self) -> (EncapMode, EncapMode) {
        match self {
            PoolEncapsulation::Vxlan => (EncapMode::Always, EncapMode::Never),
            PoolEncapsulation::VxlanCrossSubnet => (EncapMode::CrossSubnet, EncapMode::Never),
            PoolEncapsulation::Ipip => (EncapMode::Never, EncapMode::Always),
            PoolEncapsulation::IpipCrossSubnet => (EncapMode::Never, EncapMode::CrossSubnet),
            PoolEncapsulation::None => (EncapMode::Never, EncapMode::Never),
        }
    }
}

/// `ocelot controller`'s default-pool flags.
#[derive(clap::Args, Debug, Clone)]
pub struct DefaultPoolArgs {
    /// CIDR of the IPv4 pool to create when the cluster has no IPPool at
    /// all (e.g. 10.65.0.0/16); empty: create none. An existing pool is
    /// never modified.
    #[arg(long, env = "OCELOT_DEFAULT_IPV4_POOL_CIDR")]
    pub default_ipv4_pool_cidr: Option<String>,
    /// Encapsulation of the default pool.
    #[arg(long, env = "OCELOT_DEFAULT_POOL_ENCAPSULATION", value_enum, default_value_t)]
    pub default_pool_encapsulation: PoolEncapsulation,
    /// Prefix length of the blocks nodes claim from the default pool
    /// (between the pool's prefix length and 32).
    #[arg(long, env = "OCELOT_DEFAULT_POOL_BLOCK_SIZE", default_value_t = 26)]
    pub default_pool_block_size: u8,
    /// Masquerade the default pool's traffic to destinations outside every
    /// pool (true or false).
    #[arg(
        long,
        env = "OCELOT_DEFAULT_POOL_NAT_OUTGOING",
        default_value_t = true,
        action = clap::ArgAction::Set
    )]
    pub default_pool_nat_outgoing: bool,
}

/// The flags' defaults: no CIDR (no default pool), VXLAN, /26, NAT.
impl Default for DefaultPoolArgs {
    fn default() -> Self {
        DefaultPoolArgs {
            default_ipv4_pool_cidr: None,
            default_pool_encapsulation: PoolEncapsulation::Vxlan,
            default_pool_block_size: 26,
            default_pool_nat_outgoing: true,
        }
    }
}

impl DefaultPoolArgs {
    /// The pool the flags ask for: None when the CIDR is empty; an error
    /// that names the flag when a value cannot make a pool.
    pub fn spec(&self) -> Result<Option<IpPoolSpec>, String> {
        let Some(text) =
            self.default_ipv4_pool_cidr.as_deref().map(str::trim).filter(|s| !s.is_empty())
        else {
            return Ok(None);
        };
        let cidr: Cidr = text.parse().map_err(|e| format!("--default-ipv4-pool-cidr: {e}"))?;
        if !matches!(cidr.addr, IpAddr::V4(_)) {
            return Err(format!("--default-ipv4-pool-cidr: {text:?} is not an IPv4 CIDR"));
        }
        if cidr.network() != cidr {
            return Err(format!(
                "--default-ipv4-pool-cidr: {text:?} has host bits set (did you mean {}?)",
                cidr.network()
            ));
        }
        let bs = self.default_pool_block_size;
        if bs < cidr.len || bs > 32 {
            return Err(format!(
                "--default-pool-block-size: {bs} is out of range for {text}: between {} and 32",
                cidr.len
            ));
        }
        let (vxlan_mode, ipip_mode) = self.default_pool_encapsulation.modes();
        Ok(Some(IpPoolSpec {
            cidr: cidr.to_string(),
            block_size: bs,
            vxlan_mode,
            ipip_mode,
            nat_outgoing: self.default_pool_nat_outgoing,
            node_selector: Some("all()".into()),
            disabled: false,
        }))
    }
}

/// What to do about the default pool.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// No default pool asked for (empty CIDR).
    Disabled,
    /// Pools exist (these): the user's pools win; nothing is written.
    PoolsExist(Vec<String>),
    /// The cluster has no pool: create `default-ipv4-ippool` with this spec.
    Create(IpPoolSpec),
}

/// The decision, from the flags' pool and the names of every IPPool.
pub fn decide(want: Option<&IpPoolSpec>, existing: &[String]) -> Decision {
    match want {
        None => Decision::Disabled,
        Some(_) if !existing.is_empty() => Decision::PoolsExist(existing.to_vec()),
        Some(spec) => Decision::Create(spec.clone()),
    }
}

/// The `default-ipv4-ippool` object with `spec`.
pub fn pool_object(spec: &IpPoolSpec) -> IpPoolObject {
    IpPoolObject {
        metadata: ObjectMeta { name: Some(DEFAULT_POOL_NAME.into()), ..Default::default() },
        spec: spec.clone(),
    }
}

/// What [`ensure`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Disabled,
    PoolsExist(Vec<String>),
    Created,
    /// 409 AlreadyExists: another writer created it first.
    AlreadyExists,
    /// The list or the create failed; try again later.
    Failed(String),
}

impl Outcome {
    /// Settled: nothing more to do for this process.
    pub fn done(&self) -> bool {
        !matches!(self, Outcome::Failed(_))
    }
}

/// List the IPPools (every page) and create the default pool when there is
/// none. Call only while leading.
pub async fn ensure(client: kube::Client, want: Option<&IpPoolSpec>) -> Outcome {
    if want.is_none() {
        return Outcome::Disabled;
    }
    let api: Api<IpPoolObject> = Api::all(client);
    let mut names = Vec::new();
    let mut lp = ListParams::default().limit(500);
    loop {
        match api.list(&lp).await {
            Ok(page) => {
                names.extend(page.items.into_iter().filter_map(|p| p.metadata.name));
                match page.metadata.continue_.filter(|c| !c.is_empty()) {
                    Some(c) => lp.continue_token = Some(c),
                    None => break,
                }
            }
            Err(e) => return Outcome::Failed(format!("cannot list IPPools: {e}")),
        }
    }
    match decide(want, &names) {
        Decision::Disabled => Outcome::Disabled,
        Decision::PoolsExist(n) => Outcome::PoolsExist(n),
        Decision::Create(spec) => {
            match api.create(&PostParams::default(), &pool_object(&spec)).await {
                Ok(_) => Outcome::Created,
                Err(kube::Error::Api(s)) if s.code == 409 => Outcome::AlreadyExists,
                Err(e) => Outcome::Failed(format!("cannot create IPPool {DEFAULT_POOL_NAME}: {e}")),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        a: DefaultPoolArgs,
    }

    fn args(v: &[&str]) -> DefaultPoolArgs {
        let mut all = vec!["x"];
        all.extend_from_slice(v);
        Cli::try_parse_from(all).unwrap().a
    }

    #[test]
    fn flags_make_the_pool() {
        let s = args(&["--default-ipv4-pool-cidr", "10.65.0.0/16"]).spec().unwrap().unwrap();
        assert_eq!(s.cidr, "10.65.0.0/16");
        assert_eq!(s.block_size, 26);
        assert_eq!((s.vxlan_mode, s.ipip_mode), (EncapMode::Always, EncapMode::Never));
        assert!(s.nat_outgoing && !s.disabled);
        assert_eq!(s.node_selector.as_deref(), Some("all()"));
        let s = args(&[
            "--default-ipv4-pool-cidr=10.0.0.0/8",
            "--default-pool-encapsulation=ipip-cross-subnet",
            "--default-pool-block-size=24",
            "--default-pool-nat-outgoing=false",
        ])
        .spec()
        .unwrap()
        .unwrap();
        assert_eq!((s.vxlan_mode, s.ipip_mode), (EncapMode::Never, EncapMode::CrossSubnet));
        assert_eq!(s.block_size, 24);
        assert!(!s.nat_outgoing);
        for (m, want) in [
            ("vxlan-cross-subnet", (EncapMode::CrossSubnet, EncapMode::Never)),
            ("ipip", (EncapMode::Never, EncapMode::Always)),
            ("none", (EncapMode::Never, EncapMode::Never)),
        ] {
            let s =
                args(&["--default-ipv4-pool-cidr=10.0.0.0/8", "--default-pool-encapsulation", m])
                    .spec()
                    .unwrap()
                    .unwrap();
            assert_eq!((s.vxlan_mode, s.ipip_mode), want, "{m}");
        }
    }

    #[test]
    fn empty_cidr_asks_for_nothing() {
        let d = DefaultPoolArgs::default();
        let a = args(&[]);
        assert_eq!(
            (d.default_pool_encapsulation, d.default_pool_block_size, d.default_pool_nat_outgoing),
            (a.default_pool_encapsulation, a.default_pool_block_size, a.default_pool_nat_outgoing),
            "Default is clap's defaults"
        );
        assert_eq!(d.spec(), Ok(None));
        assert_eq!(args(&[]).spec(), Ok(None));
        assert_eq!(args(&["--default-ipv4-pool-cidr", ""]).spec(), Ok(None));
        assert_eq!(args(&["--default-ipv4-pool-cidr", "  "]).spec(), Ok(None));
    }

    #[test]
    fn bad_flags_are_clear_errors() {
        let err = |v: &[&str]| args(v).spec().unwrap_err();
        assert!(err(&["--default-ipv4-pool-cidr=10.65.0.0"]).contains("--default-ipv4-pool-cidr"));
        assert!(err(&["--default-ipv4-pool-cidr=banana/16"]).contains("bad address"));
        assert!(err(&["--default-ipv4-pool-cidr=10.0.0.0/33"]).contains("prefix length"));
        assert!(err(&["--default-ipv4-pool-cidr=fd00::/48"]).contains("not an IPv4"));
        assert!(err(&["--default-ipv4-pool-cidr=10.65.1.0/16"]).contains("10.65.0.0/16"));
        let e = err(&["--default-ipv4-pool-cidr=10.65.0.0/16", "--default-pool-block-size=12"]);
        assert!(e.contains("--default-pool-block-size") && e.contains("between 16 and 32"), "{e}");
        assert!(err(&["--default-ipv4-pool-cidr=10.65.0.0/16", "--default-pool-block-size=33"])
            .contains("out of range"));
        // A bad mode is clap's error, naming the possible values.
        let e = Cli::try_parse_from(["x", "--default-pool-encapsulation=gre"])
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("vxlan-cross-subnet") && e.contains("ipip"), "{e}");
    }

    #[test]
    fn creates_only_when_no_pool_exists() {
        let spec = args(&["--default-ipv4-pool-cidr=10.65.0.0/16"]).spec().unwrap().unwrap();
        assert_eq!(decide(None, &[]), Decision::Disabled);
        assert_eq!(decide(None, &["p".into()]), Decision::Disabled);
        assert_eq!(decide(Some(&spec), &[]), Decision::Create(spec.clone()));
        let o = pool_object(&spec);
        assert_eq!(o.metadata.name.as_deref(), Some(DEFAULT_POOL_NAME));
        assert_eq!(o.spec, spec);
        assert_eq!(
            decide(Some(&spec), &["mine".into()]),
            Decision::PoolsExist(vec!["mine".into()])
        );
        assert_eq!(
            decide(Some(&spec), &[DEFAULT_POOL_NAME.into()]),
            Decision::PoolsExist(vec![DEFAULT_POOL_NAME.into()])
        );
    }
}

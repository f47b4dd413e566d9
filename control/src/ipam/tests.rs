use super::store::FileStore;
use super::*;
use std::collections::HashSet;

fn pool(cidr: &str, bs: u8) -> PoolSpec {
    PoolSpec { name: format!("p-{cidr}"), cidr: cidr.parse().unwrap(), block_size: bs }
}

fn alloc(node: &str, h: &str) -> Allocation {
    Allocation {
        handle: h.into(),
        node: node.into(),
        pod: format!("ns/{h}"),
        attrs: Default::default(),
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

#[test]
fn claims_a_block_then_allocates_from_it() {
    let mut st = IpamState::default();
    let req = Request::Auto { pools: vec![pool("10.65.0.0/16", 26)] };
    let mut a = Ipam { state: &mut st, node: "n1" };
    let r1 = a.allocate(&req, alloc("n1", "c1/eth0")).unwrap();
    let r2 = a.allocate(&req, alloc("n1", "c2/eth0")).unwrap();
    assert_eq!(r1.ips, vec![ip("10.65.0.0")]);
    assert_eq!(r2.ips, vec![ip("10.65.0.1")]);
    let mut b = Ipam { state: &mut st, node: "n2" };
    let r3 = b.allocate(&req, alloc("n2", "c3/eth0")).unwrap();
    assert_eq!(r3.ips, vec![ip("10.65.0.64")], "node 2 claims the next block");
    assert_eq!(st.blocks.len(), 2);
    assert_eq!(st.blocks[&"10.65.0.64/26".parse().unwrap()].affinity.as_deref(), Some("n2"));
}

#[test]
fn repeated_add_returns_the_same_address_and_del_frees_it() {
    let mut st = IpamState::default();
    let req = Request::Auto { pools: vec![pool("10.65.0.0/16", 26)] };
    let mut a = Ipam { state: &mut st, node: "n1" };
    let r1 = a.allocate(&req, alloc("n1", "c1/eth0")).unwrap();
    let again = a.allocate(&req, alloc("n1", "c1/eth0")).unwrap();
    assert_eq!(again.ips, r1.ips);
    assert!(again.existing);
    assert_eq!(a.release("c1/eth0"), r1.ips);
    assert!(a.release("c1/eth0").is_empty(), "second DEL frees nothing and succeeds");
    assert_eq!(
        a.allocate(&req, alloc("n1", "c2/eth0")).unwrap().ips,
        r1.ips,
        "freed address is reused"
    );
}

#[test]
fn borrows_when_the_pool_has_no_free_block() {
    // A /29 pool with /30 blocks: two blocks of 4.
    let mut st = IpamState::default();
    let req = Request::Auto { pools: vec![pool("10.9.0.0/29", 30)] };
    let mut n1 = Ipam { state: &mut st, node: "n1" };
    n1.allocate(&req, alloc("n1", "a")).unwrap();
    let mut n2 = Ipam { state: &mut st, node: "n2" };
    for i in 0..4 {
        n2.allocate(&req, alloc("n2", &format!("b{i}"))).unwrap();
    }
    // n2's block is full and no block is left: n2 borrows from n1's block.
    let r = n2.allocate(&req, alloc("n2", "b4")).unwrap();
    assert_eq!(r.borrowed, r.ips);
    assert_eq!(r.ips, vec![ip("10.9.0.1")]);
    for i in 5..7 {
        n2.allocate(&req, alloc("n2", &format!("b{i}"))).unwrap();
    }
    assert_eq!(n2.allocate(&req, alloc("n2", "b7")), Err(IpamError::Exhausted));
}

#[test]
fn specific_addresses_are_granted_when_free_and_inside_a_pool() {
    let mut st = IpamState::default();
    let pools = vec![pool("10.65.0.0/16", 26)];
    let mut a = Ipam { state: &mut st, node: "n1" };
    let r = a
        .allocate(
            &Request::Specific { ips: vec![ip("10.65.3.7")], pools: pools.clone() },
            alloc("n1", "x"),
        )
        .unwrap();
    assert_eq!(r.ips, vec![ip("10.65.3.7")]);
    assert!(matches!(
        a.allocate(
            &Request::Specific { ips: vec![ip("10.65.3.7")], pools: pools.clone() },
            alloc("n1", "y")
        ),
        Err(IpamError::InUse(..))
    ));
    assert_eq!(
        a.allocate(
            &Request::Specific { ips: vec![ip("192.0.2.1")], pools: pools.clone() },
            alloc("n1", "z")
        ),
        Err(IpamError::OutsidePools(ip("192.0.2.1")))
    );
    // The automatic allocator never hands out the reserved one.
    let auto = Request::Auto { pools };
    for i in 0..100 {
        let r = a.allocate(&auto, alloc("n1", &format!("h{i}"))).unwrap();
        assert_ne!(r.ips[0], ip("10.65.3.7"));
    }
}

#[test]
fn host_local_uses_the_pod_cidr_without_network_and_broadcast() {
    let mut st = IpamState::default();
    let mut a = Ipam { state: &mut st, node: "n1" };
    let req = Request::HostLocal { pod_cidr: "10.244.1.0/30".parse().unwrap() };
    assert_eq!(a.allocate(&req, alloc("n1", "a")).unwrap().ips, vec![ip("10.244.1.1")]);
    assert_eq!(a.allocate(&req, alloc("n1", "b")).unwrap().ips, vec![ip("10.244.1.2")]);
    assert_eq!(a.allocate(&req, alloc("n1", "c")), Err(IpamError::Exhausted));
}

#[test]
fn gc_releases_only_this_nodes_unlisted_handles() {
    let mut st = IpamState::default();
    let req = Request::Auto { pools: vec![pool("10.65.0.0/16", 26)] };
    Ipam { state: &mut st, node: "n1" }.allocate(&req, alloc("n1", "keep")).unwrap();
    Ipam { state: &mut st, node: "n1" }.allocate(&req, alloc("n1", "stale")).unwrap();
    Ipam { state: &mut st, node: "n2" }.allocate(&req, alloc("n2", "other")).unwrap();
    let freed = Ipam { state: &mut st, node: "n1" }.release_unless(|h| h == "keep");
    assert_eq!(freed.len(), 1);
    assert_eq!(freed[0].1, "stale");
    assert_eq!(Ipam { state: &mut st, node: "n2" }.find("other").len(), 1);
}

/// Random ADD/DEL sequences over two nodes and a small pool: never one
/// address twice, nothing leaked, repeated ADDs stable.
#[test]
fn property_no_duplicates_no_leaks() {
    let mut seed: u64 = 0x1234_5678_9abc_def0;
    let mut rnd = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for _round in 0..50 {
        let mut st = IpamState::default();
        let req = Request::Auto { pools: vec![pool("10.9.0.0/27", 29)] };
        let mut live: BTreeMap<String, (String, Vec<IpAddr>)> = BTreeMap::new();
        for step in 0..300 {
            let node = if rnd() % 2 == 0 { "n1" } else { "n2" };
            if rnd() % 3 == 0 && !live.is_empty() {
                let k = live.keys().nth((rnd() as usize) % live.len()).unwrap().clone();
                let (n, ips) = live.remove(&k).unwrap();
                let mut freed = Ipam { state: &mut st, node: &n }.release(&k);
                freed.sort();
                assert_eq!(freed, ips);
            } else {
                let h = format!("h{step}");
                match (Ipam { state: &mut st, node }).allocate(&req, alloc(node, &h)) {
                    Ok(r) => {
                        let again =
                            Ipam { state: &mut st, node }.allocate(&req, alloc(node, &h)).unwrap();
                        assert_eq!(again.ips, r.ips);
                        live.insert(h, (node.to_string(), r.ips));
                    }
                    Err(IpamError::Exhausted) => {
                        assert_eq!(live.len(), 32, "exhausted with free addresses")
                    }
                    Err(e) => panic!("{e}"),
                }
            }
            let all: Vec<IpAddr> = live.values().flat_map(|(_, v)| v.clone()).collect();
            let uniq: HashSet<_> = all.iter().collect();
            assert_eq!(all.len(), uniq.len(), "an address was handed out twice");
            let held: usize = st.blocks.values().map(|b| b.allocations.len()).sum();
            assert_eq!(held, all.len(), "allocations leaked or lost");
        }
    }
}

#[test]
fn concurrent_adds_through_the_file_store_are_distinct_and_survive_a_restart() {
    let dir = std::env::temp_dir().join(format!("ocelot-ipam-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let req = Request::Auto { pools: vec![pool("10.65.0.0/16", 26)] };
    let threads: Vec<_> = (0..200)
        .map(|i| {
            let dir = dir.clone();
            let req = req.clone();
            std::thread::spawn(move || {
                // Each thread opens its own store, as separate agents would.
                let s = FileStore::open(&dir).unwrap();
                let node = if i % 2 == 0 { "n1" } else { "n2" };
                s.transact(|st| {
                    Ipam { state: st, node }.allocate(&req, alloc(node, &format!("c{i}")))
                })
                .unwrap()
                .unwrap()
                .ips[0]
            })
        })
        .collect();
    let ips: Vec<IpAddr> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let uniq: HashSet<_> = ips.iter().collect();
    assert_eq!(uniq.len(), 200);
    // A new store over the same files (an agent restart) sees all of them.
    let s = FileStore::open(&dir).unwrap();
    let st = s.load().unwrap();
    assert_eq!(st.blocks.values().map(|b| b.allocations.len()).sum::<usize>(), 200);
    let again = s
        .transact(|st| Ipam { state: st, node: "n1" }.allocate(&req, alloc("n1", "c0")))
        .unwrap()
        .unwrap();
    assert_eq!(again.ips[0], ips[0]);
    std::fs::write(dir.join("state.json"), "garbage").unwrap();
    assert!(s.transact(|_| ()).is_err(), "a corrupt state is an error, never silently reset");
    std::fs::remove_dir_all(&dir).unwrap();
}

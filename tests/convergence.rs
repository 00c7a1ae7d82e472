//! Randomized convergence (SPEC "Cluster", DESIGN "One model"): three nodes
//! in a full mesh replicate through a misbehaving proxy while random PUTs,
//! re-PUTs and DELETEs go to random nodes and nodes are killed with kill -9
//! and restarted. In the end every node must hold exactly "names ever
//! stored minus names ever deleted", byte for byte, with empty queues.
//!
//! Seeded: `COCKATIEL_SEED=<n> cargo test --test convergence` replays the
//! same sequence of operations, kills and faults (timing still varies).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::cluster::*;
use common::proxy::{Fault, Proxy};
use common::*;

const NODES: usize = 3;
const OPS: usize = 400;
const CONVERGENCE_BOUND: Duration = Duration::from_secs(45);

#[derive(Default, Debug)]
struct Counts {
    puts: usize,
    reputs: usize,
    deletes: usize,
    deletes_unknown: usize,
    gets: usize,
    kills: usize,
    restarts: usize,
    refusal_windows: usize,
    stalls: usize,
    answers: BTreeMap<String, usize>,
}

struct World {
    seed: u64,
    rng: Rng,
    nodes: Vec<Node>,
    up: Vec<bool>,
    /// Every name ever stored (answered 201 or 302), with its content.
    bodies: BTreeMap<String, Vec<u8>>,
    /// Nodes known to hold the name (they answered 201/302 for it).
    has: BTreeMap<String, BTreeSet<usize>>,
    /// Names deleted somewhere, and the nodes that answered the DELETE.
    deleted_on: BTreeMap<String, BTreeSet<usize>>,
    counts: Counts,
}

impl World {
    fn pick_up(&mut self) -> usize {
        let up: Vec<usize> = (0..NODES).filter(|&i| self.up[i]).collect();
        up[self.rng.below(up.len() as u64) as usize]
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.rng.below(items.len() as u64) as usize]
    }

    fn note(&mut self, what: &str, status: u16) {
        *self
            .counts
            .answers
            .entry(format!("{what} {status}"))
            .or_default() += 1;
    }

    fn ctx(&self, op: usize) -> String {
        format!("seed {} op {op}", self.seed)
    }

    fn new_put(&mut self, op: usize) {
        let node = self.pick_up();
        let k = self.rng.below(40);
        let path = match k % 3 {
            0 => format!("/r{k}.txt"),
            1 => format!("/d{}/s{k}.bin", k % 5),
            _ => format!("/d{}/e/x{k}", k % 2),
        };
        let len = if self.rng.below(20) == 0 {
            64 * 1024 + self.rng.below(256 * 1024) as usize
        } else {
            self.rng.below(2048) as usize
        };
        // Few distinct small bodies, so that the same stored name recurs.
        let body = if len < 16 && self.rng.below(2) == 0 {
            vec![b'x'; len]
        } else {
            self.rng.bytes(len)
        };
        let resp = self.nodes[node].put(&path, &body);
        self.counts.puts += 1;
        self.note("PUT", resp.status);
        let ctx = self.ctx(op);
        match resp.status {
            201 | 302 => {
                let loc = resp.header("location").expect("Location");
                let name = decode(&loc);
                let (_, _, sha, _) = split_stored_name(&name)
                    .unwrap_or_else(|| panic!("{ctx}: odd stored name {name}"));
                assert_eq!(sha, sha1_hex(&body), "{ctx}: sha1 in {name}");
                if resp.status == 302 {
                    assert!(
                        self.bodies.contains_key(&name),
                        "{ctx}: 302 for {name} on node {node}, a name never stored before"
                    );
                }
                self.bodies.insert(name.clone(), body);
                self.has.entry(name).or_default().insert(node);
            }
            // Same stem, content and second as a name deleted before.
            409 => {}
            _ => panic!("{ctx}: PUT {path} on node {node}: {}", resp.describe()),
        }
    }

    fn re_put(&mut self, op: usize) {
        let names: Vec<String> = self.bodies.keys().cloned().collect();
        if names.is_empty() {
            return;
        }
        let name = self.pick(&names).clone();
        let node = self.pick_up();
        let body = self.bodies[&name].clone();
        let resp = self.nodes[node].put(&percent_encode(&name), &body);
        self.counts.reputs += 1;
        self.note("re-PUT", resp.status);
        let ctx = self.ctx(op);
        let deleted_here = self
            .deleted_on
            .get(&name)
            .is_some_and(|d| d.contains(&node));
        let deleted = self.deleted_on.contains_key(&name);
        let held_here = self.has.get(&name).is_some_and(|h| h.contains(&node));
        let ok = match resp.status {
            409 => deleted,
            302 => !deleted_here,
            201 => !deleted_here && !held_here,
            _ => false,
        };
        assert!(
            ok,
            "{ctx}: re-PUT {name} on node {node} (deleted here: {deleted_here}, deleted somewhere: {deleted}, held here: {held_here}): {}",
            resp.describe()
        );
        if resp.status == 201 || resp.status == 302 {
            if let Some(loc) = resp.header("location") {
                assert_eq!(decode(&loc), name, "{ctx}: re-PUT must keep the name");
            }
            self.has.entry(name).or_default().insert(node);
        }
    }

    fn delete(&mut self, op: usize) {
        let names: Vec<String> = self.bodies.keys().cloned().collect();
        if names.is_empty() {
            return;
        }
        let name = self.pick(&names).clone();
        let node = self.pick_up();
        let resp = self.nodes[node].delete(&percent_encode(&name));
        self.counts.deletes += 1;
        self.note("DELETE", resp.status);
        let ctx = self.ctx(op);
        let deleted = self.deleted_on.contains_key(&name);
        let held_here = self.has.get(&name).is_some_and(|h| h.contains(&node));
        let ok = match resp.status {
            200 => true,
            404 => deleted || !held_here,
            _ => false,
        };
        assert!(
            ok,
            "{ctx}: DELETE {name} on node {node} (deleted before: {deleted}, held here: {held_here}): {}",
            resp.describe()
        );
        self.deleted_on.entry(name).or_default().insert(node);
    }

    fn delete_unknown(&mut self, op: usize) {
        let node = self.pick_up();
        let sha = sha1_hex(&self.rng.bytes(8));
        let name = format!("/ghost{}_{}_{sha}.txt", self.rng.below(100), unix_now());
        let resp = self.nodes[node].delete(&name);
        self.counts.deletes_unknown += 1;
        self.note("DELETE-unknown", resp.status);
        assert_eq!(
            resp.status,
            404,
            "{}: DELETE of a never-stored name: {}",
            self.ctx(op),
            resp.describe()
        );
    }

    fn get(&mut self, op: usize) {
        let names: Vec<String> = self.bodies.keys().cloned().collect();
        if names.is_empty() {
            return;
        }
        let name = self.pick(&names).clone();
        let node = self.pick_up();
        let resp = self.nodes[node].get(&percent_encode(&name));
        self.counts.gets += 1;
        let ctx = self.ctx(op);
        let deleted_here = self
            .deleted_on
            .get(&name)
            .is_some_and(|d| d.contains(&node));
        let deleted = self.deleted_on.contains_key(&name);
        let held_here = self.has.get(&name).is_some_and(|h| h.contains(&node));
        if deleted_here {
            assert_eq!(resp.status, 404, "{ctx}: GET {name} deleted on node {node}");
        } else if held_here && !deleted {
            assert_eq!(resp.status, 200, "{ctx}: GET {name} stored on node {node}");
        }
        if resp.status == 200 {
            assert!(
                resp.body == self.bodies[&name],
                "{ctx}: GET {name} on node {node}: wrong bytes"
            );
        } else {
            assert_eq!(resp.status, 404, "{ctx}: GET {name}: {}", resp.describe());
        }
    }
}

fn decode(location: &str) -> String {
    String::from_utf8(percent_decode(location)).expect("UTF-8 Location")
}

fn seed() -> u64 {
    match std::env::var("COCKATIEL_SEED") {
        Ok(s) => s.trim().parse().expect("COCKATIEL_SEED must be a u64"),
        Err(_) => {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .expect("clock")
                .as_nanos() as u64
                % 1_000_000_000
        }
    }
}

#[test]
fn random_operations_kills_and_faults_converge() {
    let seed = seed();
    println!("convergence seed: {seed} (replay with COCKATIEL_SEED={seed})");
    let started = Instant::now();

    let proxy = Proxy::start();
    // 3% of bodies corrupted, 3% cut, decided by the seed.
    proxy.random_faults(seed ^ 0x5eed, 30, 30);
    let ports: Vec<u16> = (0..NODES).map(|_| free_port()).collect();
    let nodes: Vec<Node> = ports
        .iter()
        .map(|&p| Node::start_on(p, &node_args(p, &ports, Some(&proxy.url()), &[])))
        .collect();
    let mut w = World {
        seed,
        rng: Rng::new(seed),
        nodes,
        up: vec![true; NODES],
        bodies: BTreeMap::new(),
        has: BTreeMap::new(),
        deleted_on: BTreeMap::new(),
        counts: Counts::default(),
    };
    let mut refusing: Option<(u16, usize)> = None;

    for op in 0..OPS {
        // Network events.
        if let Some((port, until)) = refusing {
            if op >= until {
                proxy.refuse_port(port, false);
                refusing = None;
            }
        } else if w.rng.below(100) == 0 {
            let port = ports[w.rng.below(NODES as u64) as usize];
            proxy.refuse_port(port, true);
            refusing = Some((port, op + 5 + w.rng.below(20) as usize));
            w.counts.refusal_windows += 1;
        }
        if w.rng.below(150) == 0 {
            proxy.stall(1, Duration::from_secs(5));
            w.counts.stalls += 1;
        }
        // Crashes and restarts, between requests (so that no answer a test
        // request waits for is lost).
        let roll = w.rng.below(100);
        let ups = w.up.iter().filter(|&&u| u).count();
        if roll < 4 && ups > 1 {
            let i = w.pick_up();
            w.nodes[i].kill9();
            w.up[i] = false;
            w.counts.kills += 1;
        } else if roll < 11 && ups < NODES {
            let down: Vec<usize> = (0..NODES).filter(|&i| !w.up[i]).collect();
            let i = *w.pick(&down);
            w.nodes[i].restart();
            w.up[i] = true;
            w.counts.restarts += 1;
        }
        // One client operation.
        match w.rng.below(100) {
            0..=44 => w.new_put(op),
            45..=59 => w.re_put(op),
            60..=84 => w.delete(op),
            85..=89 => w.delete_unknown(op),
            _ => w.get(op),
        }
        if w.rng.below(4) == 0 {
            std::thread::sleep(Duration::from_millis(w.rng.below(20)));
        }
    }
    let ops_done = started.elapsed();

    // Everyone back, the network stays as it is (random faults go on).
    if let Some((port, _)) = refusing {
        proxy.refuse_port(port, false);
    }
    for i in 0..NODES {
        if !w.up[i] {
            w.nodes[i].restart();
            w.up[i] = true;
            w.counts.restarts += 1;
        }
    }
    let expected: BTreeSet<String> = w
        .bodies
        .keys()
        .filter(|n| !w.deleted_on.contains_key(*n))
        .map(|n| n.trim_start_matches('/').to_string())
        .collect();
    let all: Vec<&Node> = w.nodes.iter().collect();
    let converged = wait_until(CONVERGENCE_BOUND, || {
        all.iter()
            .all(|n| n.stored_files().into_iter().collect::<BTreeSet<_>>() == expected)
            && queues_empty(&all)
    });
    let summary = format!(
        "seed {seed}: {OPS} steps in {ops_done:?}, {} names stored, {} deleted, {} expected at the end; {:?}; proxy: {} requests, {} corrupted, {} cut, {} stalled, {} refused, {} unreachable",
        w.bodies.len(),
        w.deleted_on.len(),
        expected.len(),
        w.counts,
        proxy.log().len(),
        proxy.count(Fault::Corrupted),
        proxy.count(Fault::Cut),
        proxy.count(Fault::Stalled),
        proxy.count(Fault::Refused),
        proxy.count(Fault::Unreachable),
    );
    if !converged {
        let mut diff = String::new();
        for (i, n) in w.nodes.iter().enumerate() {
            let got: BTreeSet<String> = n.stored_files().into_iter().collect();
            let missing: Vec<_> = expected.difference(&got).collect();
            let extra: Vec<_> = got.difference(&expected).collect();
            diff.push_str(&format!(
                "\nnode {i} ({}): missing {missing:?}, extra {extra:?}",
                n.url()
            ));
        }
        panic!(
            "no convergence within {CONVERGENCE_BOUND:?}: {summary}{diff}\n{}",
            describe_statuses(&all)
        );
    }
    for (i, n) in w.nodes.iter().enumerate() {
        for name in &expected {
            let bytes = n.read_stored(name);
            assert!(
                bytes.as_deref() == Some(&w.bodies[&format!("/{name}")][..]),
                "seed {seed}: node {i} holds wrong bytes for {name}"
            );
        }
        let bad = files_with_wrong_sha1(n);
        assert!(
            bad.is_empty(),
            "seed {seed}: node {i}: sha1 mismatch {bad:?}"
        );
        n.assert_tmp_empty_soon(&format!("seed {seed}: node {i}"));
    }
    // Every deletion is in every node's deletion log.
    for name in w.deleted_on.keys() {
        let body = &w.bodies[name];
        for (i, n) in w.nodes.iter().enumerate() {
            let resp = n.put(&percent_encode(name), body);
            assert_eq!(
                resp.status,
                409,
                "seed {seed}: PUT of deleted {name} on node {i}: {}",
                resp.describe()
            );
        }
    }
    assert!(
        queues_empty(&all),
        "seed {seed}: the 409s must not queue anything\n{}",
        describe_statuses(&all)
    );
    println!("{summary}; converged after {:?}", started.elapsed());
}

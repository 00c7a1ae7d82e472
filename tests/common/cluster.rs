//! Helpers for multi-node tests: nodes on ports chosen in advance (so that
//! they can name each other with `--node`), `/_status` queries, and bounded
//! waits for replication to finish.

use std::collections::BTreeMap;
use std::fs;
use std::time::Duration;

use super::{sha1_hex, split_stored_name, try_request, wait_until, Node};

/// Short retry and timeout values so that failures are retried quickly.
pub const FAST: &[&str] = &[
    "--retry-min",
    "0.05",
    "--retry-max",
    "0.5",
    "--transfer-timeout",
    "2",
    "--connect-timeout",
    "1",
];

/// How long replication in a healthy small cluster may take.
pub const REPLICATION_BOUND: Duration = Duration::from_secs(20);

impl Node {
    /// A node on `port` (chosen in advance) whose directories exist but
    /// whose process is not started: start it with [`Node::restart`].
    pub fn prepare(port: u16, extra: &[String]) -> Node {
        let root = Node::new_root();
        Node {
            child: None,
            port,
            args: extra.to_vec(),
            root,
            starts: 0,
            run_as: None,
        }
    }

    /// Start a node on `port` (chosen in advance with [`super::free_port`]).
    pub fn start_on(port: u16, extra: &[String]) -> Node {
        let mut node = Node::prepare(port, extra);
        node.restart();
        node
    }

    /// `GET /_status` as JSON; None when the node does not answer.
    pub fn status(&self) -> Option<serde_json::Value> {
        status_of(self.port())
    }

    /// `queues.<url>.length` for every neighbour; panics when the node does not answer.
    pub fn queue_lengths(&self) -> BTreeMap<String, u64> {
        let status = self
            .status()
            .unwrap_or_else(|| panic!("node {} does not answer GET /_status", self.url()));
        queue_lengths(&status)
    }

    /// The queue length towards `neighbour`; None when the node does not answer.
    pub fn queue_len(&self, neighbour: &str) -> Option<u64> {
        let status = self.status()?;
        status["queues"][neighbour]["length"].as_u64()
    }

    /// Bytes of a stored file on disk (by decoded stored name), if present.
    pub fn read_stored(&self, name: &str) -> Option<Vec<u8>> {
        let path = self.storage().join(name.trim_start_matches('/'));
        match fs::symlink_metadata(&path) {
            Ok(m) if m.is_file() => fs::read(&path).ok(),
            _ => None,
        }
    }
}

pub fn url_of(port: u16) -> String {
    format!("http://127.0.0.1:{port}")
}

/// Arguments for a cluster node: its own `--url`, one `--node` per entry of
/// `nodes` (which may include itself), [`FAST`], `--proxy` when given,
/// then `extra`.
pub fn node_args(own: u16, nodes: &[u16], proxy: Option<&str>, extra: &[&str]) -> Vec<String> {
    let mut args = vec!["--url".to_string(), url_of(own)];
    for &n in nodes {
        args.push("--node".into());
        args.push(url_of(n));
    }
    args.extend(FAST.iter().map(|s| s.to_string()));
    if let Some(p) = proxy {
        args.push("--proxy".into());
        args.push(p.to_string());
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// Start a full mesh: every node gets the same `--node` list (all of them,
/// itself included).
pub fn full_mesh(n: usize, proxy: Option<&str>, extra: &[&str]) -> Vec<Node> {
    let ports: Vec<u16> = (0..n).map(|_| super::free_port()).collect();
    ports
        .iter()
        .map(|&p| Node::start_on(p, &node_args(p, &ports, proxy, extra)))
        .collect()
}

pub fn status_of(port: u16) -> Option<serde_json::Value> {
    let resp = try_request(port, "GET", "/_status", &[], b"").ok()?;
    if resp.status != 200 {
        return None;
    }
    serde_json::from_slice(&resp.body).ok()
}

pub fn queue_lengths(status: &serde_json::Value) -> BTreeMap<String, u64> {
    status["queues"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v["length"].as_u64().unwrap_or(u64::MAX)))
                .collect()
        })
        .unwrap_or_default()
}

/// True when every given node answers and all its queues are empty.
pub fn queues_empty(nodes: &[&Node]) -> bool {
    nodes.iter().all(|n| match n.status() {
        Some(s) => s["queues"].is_object() && queue_lengths(&s).values().all(|&l| l == 0),
        None => false,
    })
}

/// The `/_status` of each node, for assertion messages.
pub fn describe_statuses(nodes: &[&Node]) -> String {
    nodes
        .iter()
        .map(|n| match n.status() {
            Some(s) => format!("{}: {s}", n.url()),
            None => format!("{}: no answer", n.url()),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Wait (bounded) until every queue of every node is empty; panics otherwise.
pub fn wait_queues_empty(nodes: &[&Node], bound: Duration, what: &str) {
    let ok = wait_until(bound, || queues_empty(nodes));
    assert!(
        ok,
        "{what}: queues not empty after {bound:?}:\n{}",
        describe_statuses(nodes)
    );
}

/// Wait (bounded) until `node` holds `name` with exactly `body` on disk.
pub fn wait_has(node: &Node, name: &str, body: &[u8], bound: Duration) -> bool {
    wait_until(bound, || node.read_stored(name).as_deref() == Some(body))
}

/// Wait (bounded) until `name` is absent from `node`'s storage.
pub fn wait_absent(node: &Node, name: &str, bound: Duration) -> bool {
    wait_until(bound, || {
        fs::symlink_metadata(node.storage().join(name.trim_start_matches('/'))).is_err()
    })
}

/// Every stored file under `storage` matches the SHA1 in its name; returns
/// the names that do not.
pub fn files_with_wrong_sha1(node: &Node) -> Vec<String> {
    let mut bad = Vec::new();
    for rel in node.stored_files() {
        let path = node.storage().join(&rel);
        let bytes = fs::read(&path).unwrap_or_default();
        let ok = split_stored_name(&format!("/{rel}"))
            .is_some_and(|(_, _, sha, _)| sha.eq_ignore_ascii_case(&sha1_hex(&bytes)));
        if !ok {
            bad.push(rel);
        }
    }
    bad
}

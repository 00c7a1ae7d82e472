//! SPEC "Security" and issue 5, black-box against the binary: the write
//! token, headers that keep served files from turning against the linking
//! application, resource limits, a full disk, and a barrage of malformed
//! traffic.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::cluster::{node_args, url_of, wait_absent, wait_has, wait_queues_empty};
use common::*;

const SECRET: &str = "s3cret";

/// The decoded stored name of a `Location`, without the leading slash.
fn stored_name_of(location: &str) -> String {
    String::from_utf8(percent_decode(location.trim_start_matches('/'))).expect("UTF-8 Location")
}

/// `GET /_status` as JSON; panics when the node does not answer.
fn status_json(port: u16) -> serde_json::Value {
    let r = request(port, "GET", "/_status", &[], b"");
    assert_eq!(r.status, 200, "GET /_status: {}", r.describe());
    serde_json::from_slice(&r.body)
        .unwrap_or_else(|e| panic!("/_status is not JSON ({e}): {}", r.describe()))
}

fn queue_len_to(port: u16, neighbour: &str) -> u64 {
    status_json(port)["queues"][neighbour]["length"]
        .as_u64()
        .unwrap_or_else(|| panic!("no queue for {neighbour} in {}", status_json(port)))
}

// ---------------------------------------------------------------------------
// Token
// ---------------------------------------------------------------------------

/// A node whose process this test starts itself, so that it can be given
/// `COCKATIEL_TOKEN` without touching this test process's environment
/// (other tests start nodes in parallel threads).
struct EnvNode {
    node: Node,
    child: Child,
}

impl EnvNode {
    fn start(host: &str, args: &[String], env: &[(&str, &str)]) -> EnvNode {
        let node = Node::prepare(free_port(), &[]);
        let log = fs::File::create(node.stderr_path()).expect("create log");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_cockatiel"));
        cmd.args(["-p", &node.port().to_string(), "-H", host, "--storage"])
            .arg(node.storage())
            .arg("--queue")
            .arg(node.queue())
            .args(args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone log"))
            .stderr(log);
        // Only what the test gives: no token or log filter from outside.
        cmd.env_remove("COCKATIEL_TOKEN").env_remove("RUST_LOG");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("spawn cockatiel");
        let mut this = EnvNode { node, child };
        let port = this.node.port();
        let ready = wait_until(READY_TIMEOUT, || {
            if matches!(this.child.try_wait(), Ok(Some(_))) {
                return true;
            }
            try_request(port, "GET", "/_status", &[], b"").is_ok_and(|r| r.status == 200)
        });
        assert!(
            ready && matches!(this.child.try_wait(), Ok(None)),
            "node with env {env:?} did not start:\n{}",
            this.node.stderr_text()
        );
        this
    }
}

impl Drop for EnvNode {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("---- env node stderr ----\n{}", self.node.stderr_text());
        }
    }
}

/// Args for a node that has one neighbour which never answers, so that
/// every change it accepts stays visible in its queue.
fn with_dead_neighbour(extra: &[&str]) -> (Vec<String>, String) {
    let dead = url_of(free_port());
    let mut args = vec!["--node".to_string(), dead.clone()];
    args.extend(
        common::cluster::FAST
            .iter()
            .chain(extra)
            .map(|s| s.to_string()),
    );
    (args, dead)
}

/// Everything a wrong or missing token must not do, and what the right one does.
fn check_token_enforced(node: &Node, secret: &str, dead: &str) {
    let port = node.port();
    let bearer = format!("Bearer {secret}");
    let auth = [("Authorization", bearer.as_str())];

    // A file stored with the token; its replication waits for the dead neighbour.
    let kept_body = b"stored with the right token".to_vec();
    let r = node.req("PUT", "/t/kept.txt", &auth, &kept_body);
    assert_eq!(r.status, 201, "PUT with the token: {}", r.describe());
    let kept = r.header("location").expect("Location");
    assert_eq!(queue_len_to(port, dead), 1, "the new file is queued");

    // A name in stored form that was never stored: an unauthorized DELETE of
    // it must not enter the deletion log.
    let ghost_body = b"never stored before".to_vec();
    let ghost = format!("/t/ghost_1700000000_{}.txt", sha1_hex(&ghost_body));

    let files_before = node.stored_files();
    let queue_before = queue_len_to(port, dead);
    let short = &secret[..secret.len() - 1];
    let bad_auth: Vec<Option<String>> = vec![
        None,
        Some("Bearer wrong".into()),
        Some(format!("Bearer {secret}x")),
        Some(format!("Bearer {short}")),
        Some(format!("Bearer x{secret}")),
        Some(secret.to_string()),
        Some("Bearer".into()),
        Some("Bearer ".into()),
        Some(format!("Basic {secret}")),
        Some(format!("Token {secret}")),
    ];
    for a in &bad_auth {
        let headers: Vec<(&str, &str)> = a.iter().map(|v| ("Authorization", v.as_str())).collect();
        let what = format!("Authorization {a:?}");
        let checks = [
            (
                "PUT new",
                node.req("PUT", "/t/new.txt", &headers, b"intruder"),
            ),
            ("PUT re-send", node.req("PUT", &kept, &headers, &kept_body)),
            ("PUT ghost", node.req("PUT", &ghost, &headers, &ghost_body)),
            ("DELETE kept", node.req("DELETE", &kept, &headers, b"")),
            ("DELETE ghost", node.req("DELETE", &ghost, &headers, b"")),
        ];
        for (op, r) in &checks {
            assert_eq!(r.status, 401, "{op} with {what}: {}", r.describe());
            assert_error_body(r, &format!("{op} 401"));
            assert!(
                r.header("www-authenticate")
                    .is_some_and(|v| v.to_ascii_lowercase().starts_with("bearer")),
                "{op} with {what}: a 401 names the Bearer scheme: {}",
                r.describe()
            );
            assert!(
                !r.text().contains(secret),
                "{op}: the 401 body leaks the token: {}",
                r.describe()
            );
        }
        let chunks: &[&[u8]] = &[b"chunked ", b"intruder"];
        let r = request_chunked(port, "PUT", "/t/chunked.txt", &headers, chunks);
        assert_eq!(r.status, 401, "chunked PUT with {what}: {}", r.describe());
    }
    // An unauthorized upload that asks before sending its body is refused
    // before the body travels.
    let r = put_asking_first(port, "/t/expect.txt", &[], 1 << 20);
    assert_eq!(
        r.status,
        401,
        "Expect: 100-continue without token: {}",
        r.describe()
    );

    // Nothing changed: not the disk, not the queue, not the deletion log.
    assert_eq!(
        node.stored_files(),
        files_before,
        "a 401 changed the storage directory"
    );
    node.assert_tmp_empty_soon("after refused uploads");
    assert_eq!(
        queue_len_to(port, dead),
        queue_before,
        "a 401 changed the replication queue"
    );
    let r = node.get(&kept);
    assert_eq!(
        r.status,
        200,
        "unauthorized DELETE removed the file: {}",
        r.describe()
    );
    assert_eq!(r.body, kept_body);
    let r = node.req("PUT", &kept, &auth, &kept_body);
    assert_eq!(
        r.status,
        302,
        "re-PUT after an unauthorized DELETE must find the file (409 means the refused DELETE entered the deletion log): {}",
        r.describe()
    );
    let r = node.req("PUT", &ghost, &auth, &ghost_body);
    assert_eq!(
        r.status,
        201,
        "PUT of a name an unauthorized DELETE named (409 means it entered the deletion log): {}",
        r.describe()
    );
    assert_eq!(r.header("location").as_deref(), Some(ghost.as_str()));
    assert_eq!(queue_len_to(port, dead), queue_before + 1);

    // Reads stay public.
    assert_eq!(node.get(&ghost).body, ghost_body, "GET without a token");
    assert_eq!(node.head(&kept).status, 200, "HEAD without a token");
    let r = node.req("GET", &kept, &[("Authorization", "Bearer wrong")], b"");
    assert_eq!(
        r.status, 200,
        "GET with a wrong token is still a public read"
    );
    assert_eq!(node.get("/_status").status, 200, "/_status without a token");

    // The right token deletes, and the deletion is queued.
    let r = node.req("DELETE", &kept, &auth, b"");
    assert_eq!(r.status, 200, "DELETE with the token: {}", r.describe());
    assert_eq!(node.get(&kept).status, 404);
    // The deletion is queued. The upload queued before it may now count as
    // delivered: a sender that retries it finds the file gone and skips it
    // (DESIGN "A queued PUT whose file is absent is skipped").
    let after = queue_len_to(port, dead);
    assert!(
        after == queue_before + 2 || after == queue_before + 1,
        "queue {after}, expected the deletion added to {queue_before} (and maybe the stale upload skipped)"
    );
    let r = node.req(
        "DELETE",
        "/t/other.txt",
        &[("Authorization", &format!("bearer  {secret} "))],
        b"",
    );
    assert_eq!(
        r.status,
        404,
        "the scheme is case-insensitive: {}",
        r.describe()
    );

    // The token is in neither the log nor /_status.
    let status = request(port, "GET", "/_status", &[], b"").text();
    assert!(
        !status.contains(secret),
        "/_status shows the token: {status}"
    );
    let log = fs::read_to_string(node.stderr_path()).unwrap_or_default();
    assert!(
        !log.is_empty(),
        "the node logs something (checked for the token)"
    );
    let leaks: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(secret) && !l.starts_with("===== start #"))
        .collect();
    assert!(leaks.is_empty(), "the token appears in the log: {leaks:#?}");
}

#[test]
fn token_flag_guards_writes() {
    let (args, dead) = with_dead_neighbour(&["--token", SECRET, "-vv"]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let node = Node::start(&args);
    check_token_enforced(&node, SECRET, &dead);
}

#[test]
fn token_from_environment_guards_writes() {
    let secret = "env-Token-42";
    let (args, dead) = with_dead_neighbour(&["-v"]);
    let env = EnvNode::start("127.0.0.1", &args, &[("COCKATIEL_TOKEN", secret)]);
    check_token_enforced(&env.node, secret, &dead);
}

#[test]
fn token_file_guards_writes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("token");
    let secret = "from-a-file-7";
    fs::write(&path, format!("{secret}\n")).unwrap();
    let (args, dead) = with_dead_neighbour(&["-v", "--token-file", path.to_str().unwrap()]);
    // A flag wins over the environment.
    let env = EnvNode::start("127.0.0.1", &args, &[("COCKATIEL_TOKEN", "from-the-env")]);
    let r = request(
        env.node.port(),
        "PUT",
        "/env.txt",
        &[("Authorization", "Bearer from-the-env")],
        b"x",
    );
    assert_eq!(r.status, 401, "the environment's token: {}", r.describe());
    check_token_enforced(&env.node, secret, &dead);
}

#[test]
fn serving_beyond_loopback_without_a_token_warns_at_start() {
    let warned = |node: &EnvNode| {
        let log = node.node.stderr_text();
        log.lines()
            .any(|l| l.contains("WARN") && l.to_ascii_lowercase().contains("token"))
    };
    let open = EnvNode::start("0.0.0.0", &[], &[]);
    assert!(
        warned(&open),
        "no warning for 0.0.0.0 without a token:\n{}",
        open.node.stderr_text()
    );
    let args = vec!["--token".to_string(), SECRET.to_string()];
    let guarded = EnvNode::start("0.0.0.0", &args, &[]);
    assert!(
        !warned(&guarded),
        "warning although a token is set:\n{}",
        guarded.node.stderr_text()
    );
    let local = EnvNode::start("127.0.0.1", &[], &[]);
    assert!(
        !warned(&local),
        "warning for a loopback-only node:\n{}",
        local.node.stderr_text()
    );
}

#[test]
fn cluster_sharing_a_token_replicates_and_a_wrong_token_is_retried() {
    let (a, b, c) = (free_port(), free_port(), free_port());
    let token = ["--token", SECRET];
    // A and B share the token; C has another one, so A's copies to C are refused.
    let node_a = Node::start_on(a, &node_args(a, &[a, b, c], None, &token));
    let node_b = Node::start_on(b, &node_args(b, &[a, b], None, &token));
    let node_c = Node::start_on(c, &node_args(c, &[c], None, &["--token", "another"]));
    let bearer = format!("Bearer {SECRET}");
    let auth = [("Authorization", bearer.as_str())];

    let body = b"replicated with a shared token".to_vec();
    let r = node_a.req("PUT", "/shared/x.txt", &auth, &body);
    assert_eq!(r.status, 201, "{}", r.describe());
    let name = stored_name_of(&r.header("location").unwrap());
    assert!(
        wait_has(&node_b, &name, &body, common::cluster::REPLICATION_BOUND),
        "B did not get the file from A:\n{}",
        node_a.stderr_text()
    );
    let r = node_b.req("PUT", "/shared/y.txt", &auth, b"from b");
    assert_eq!(r.status, 201, "{}", r.describe());
    let y = stored_name_of(&r.header("location").unwrap());
    assert!(wait_has(
        &node_a,
        &y,
        b"from b",
        common::cluster::REPLICATION_BOUND
    ));
    let r = node_b.req("DELETE", &format!("/{name}"), &auth, b"");
    assert_eq!(r.status, 200, "{}", r.describe());
    assert!(
        wait_absent(&node_a, &name, common::cluster::REPLICATION_BOUND),
        "the deletion on B did not reach A"
    );
    wait_queues_empty(
        &[&node_b],
        common::cluster::REPLICATION_BOUND,
        "B's queue to A",
    );

    // C refuses A's token: the operations stay queued with the 401 as the
    // last error, and C holds nothing.
    let url_c = url_of(c);
    let refused = wait_until(Duration::from_secs(15), || {
        let s = status_json(a);
        let q = &s["queues"][&url_c];
        q["length"].as_u64().unwrap_or(0) > 0
            && q["last_error"].as_str().is_some_and(|e| e.contains("401"))
    });
    assert!(
        refused,
        "A's queue to C should hold the refused operations with a 401: {}",
        status_json(a)
    );
    assert!(
        node_c.stored_files().is_empty(),
        "{:?}",
        node_c.stored_files()
    );
    // A echoes what it got from B back to B (B answers "already have it"),
    // so its queue to B empties shortly after, not necessarily already.
    let url_b = url_of(b);
    let drained = wait_until(common::cluster::REPLICATION_BOUND, || {
        status_json(a)["queues"][&url_b]["length"].as_u64() == Some(0)
    });
    assert!(drained, "A's queue to B drains: {}", status_json(a));
}

// ---------------------------------------------------------------------------
// Served files cannot be turned against the linking application
// ---------------------------------------------------------------------------

#[test]
fn file_responses_carry_nosniff_and_active_types_are_sandboxed() {
    let node = Node::start(&[]);
    let cases: &[(&str, bool)] = &[
        ("/f/page.html", true),
        ("/f/image.svg", true),
        ("/f/feed.xml", true),
        ("/f/photo.png", false),
        ("/f/notes.txt", false),
        ("/f/blob", false),
    ];
    for &(path, active) in cases {
        let body = format!("<html><script>alert('{path}')</script></html>").into_bytes();
        let loc = node.put_ok(path, &body);
        let etag = format!("\"{}\"", sha1_hex(&body));
        let responses = [
            ("GET", 200, node.get(&loc)),
            ("HEAD", 200, node.head(&loc)),
            (
                "Range",
                206,
                node.req("GET", &loc, &[("Range", "bytes=1-5")], b""),
            ),
            (
                "If-None-Match",
                304,
                node.req("GET", &loc, &[("If-None-Match", &etag)], b""),
            ),
        ];
        for (what, status, r) in &responses {
            let what = format!("{what} {path}");
            assert_eq!(r.status, *status, "{what}: {}", r.describe());
            assert_eq!(
                r.header("x-content-type-options").as_deref(),
                Some("nosniff"),
                "{what}: every file response carries X-Content-Type-Options: nosniff: {}",
                r.describe()
            );
            if *status == 304 {
                continue; // no content, nothing to render
            }
            let csp = r.header_all("content-security-policy");
            if active {
                assert!(
                    csp.iter().any(|v| v
                        .split(';')
                        .any(|d| d.trim() == "sandbox" || d.trim().starts_with("sandbox "))),
                    "{what}: a type a browser would run needs Content-Security-Policy: sandbox: {}",
                    r.describe()
                );
            } else {
                assert!(
                    csp.is_empty(),
                    "{what}: a passive type gets no CSP: {}",
                    r.describe()
                );
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Limits
// ---------------------------------------------------------------------------

#[test]
fn request_heads_over_16_kib_get_431_with_a_reason() {
    let node = Node::start(&[]);
    let loc = node.put_ok("/h/ok.txt", b"headers");
    // Just over the limit and well over it.
    for size in [16 * 1024 + 100, 40 * 1024] {
        let big = "a".repeat(size);
        let r = node.req("GET", &loc, &[("X-Big", &big)], b"");
        assert_eq!(r.status, 431, "{size}-byte header: {}", r.describe());
        assert_error_body(&r, &format!("431 for a {size}-byte header"));
        let r = node.req("PUT", "/h/big.txt", &[("X-Big", &big)], b"body");
        assert_eq!(
            r.status,
            431,
            "PUT with a {size}-byte header: {}",
            r.describe()
        );
    }
    // A long request target counts too.
    let long_target = format!("/h/{}", "b".repeat(17 * 1024));
    let r = node.get(&long_target);
    assert_eq!(r.status, 431, "17 KiB request target: {}", r.describe());
    // Just under the limit is served.
    let r = node.req("GET", &loc, &[("X-Ok", &"c".repeat(15 * 1024))], b"");
    assert_eq!(r.status, 200, "15 KiB of headers: {}", r.describe());
    assert_eq!(node.stored_files().len(), 1, "{:?}", node.stored_files());
}

#[test]
fn the_head_limit_counts_every_byte_of_the_request_line_and_headers() {
    let node = Node::start(&[]);
    // A head of exactly `size` bytes: request line, two headers, a padding
    // header, and the empty line.
    let head = |size: usize| {
        let start = "GET /_status HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Pad: ";
        let pad = size - start.len() - 4;
        format!("{start}{}\r\n\r\n", "a".repeat(pad)).into_bytes()
    };
    let at_limit = head(16 * 1024);
    assert_eq!(at_limit.len(), 16 * 1024);
    let r = raw(node.port(), &at_limit);
    assert_eq!(r.status, 200, "a 16,384-byte head: {}", r.describe());
    let r = raw(node.port(), &head(16 * 1024 + 1));
    assert_eq!(r.status, 431, "a 16,385-byte head: {}", r.describe());
    assert_error_body(&r, "431 for a 16,385-byte head");
}

#[test]
fn request_heads_far_over_the_limit_get_431() {
    // Heads over 4 x --max-header-size (at least 64 KiB) are cut off by the
    // HTTP layer before the request is parsed, so that a connection never
    // buffers more than that; its 431 carries no reason (docs/SECURITY.md).
    let node = Node::start(&[]);
    for size in [70 * 1024, 200 * 1024] {
        let big = "a".repeat(size);
        let r = node.req("GET", "/_status", &[("X-Big", &big)], b"");
        assert_eq!(r.status, 431, "{size}-byte header: {}", r.describe());
    }
    assert_eq!(node.get("/_status").status, 200);
}

#[test]
fn silent_clients_are_disconnected_after_the_header_timeout() {
    let node = Node::start(&["--header-timeout", "1", "--max-connections", "2"]);
    // Two clients that connect and say nothing take both slots...
    let mut idle: Vec<Conn> = (0..2).map(|_| Conn::open(node.port())).collect();
    let mut partial = Conn::open(node.port());
    partial
        .send(b"GET /_status HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    for (i, c) in idle.iter_mut().enumerate() {
        assert!(
            c.wait_closed(Duration::from_secs(10)).expect("read"),
            "silent connection {i} still open 10 s after a 1 s --header-timeout"
        );
    }
    assert!(
        partial.wait_closed(Duration::from_secs(10)).expect("read"),
        "connection with half a request head still open after 10 s"
    );
    // ...and once they are cut, the node serves again.
    let ok = wait_until(Duration::from_secs(10), || {
        try_request(node.port(), "GET", "/_status", &[], b"").is_ok_and(|r| r.status == 200)
    });
    assert!(ok, "node does not serve after the silent clients were cut");
}

/// Outcome of waiting for the answer to a stalled upload: a 408 or a close.
#[track_caller]
fn assert_408_or_dropped(conn: &mut Conn, what: &str) {
    conn.set_read_timeout(Duration::from_secs(15));
    let start = Instant::now();
    match conn.read_response(false) {
        Ok(r) => {
            assert_eq!(r.status, 408, "{what}: {}", r.describe());
            assert_error_body(&r, what);
        }
        Err(e) => assert!(
            matches!(
                e.kind(),
                io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset
            ),
            "{what}: expected a 408 or a closed connection, got {e}"
        ),
    }
    assert!(
        start.elapsed() < Duration::from_secs(12),
        "{what}: took {:?}",
        start.elapsed()
    );
}

#[test]
fn stalled_bodies_get_408_and_leave_no_temp_file() {
    let node = Node::start(&["--read-timeout", "1"]);
    let keep = node.put_ok("/s/keep.txt", b"stays");
    // Far enough into the body that the server is writing a temp file.
    let sent = Rng::new(5).bytes(1_200_000);
    let mut conn = Conn::open(node.port());
    conn.send(&build_head(
        node.port(),
        "PUT",
        "/s/stall.bin",
        &[],
        Some(3_000_000),
    ))
    .unwrap();
    conn.send(&sent).unwrap();
    assert_408_or_dropped(&mut conn, "Content-Length body stalled after 1.2 MB");

    let mut conn = Conn::open(node.port());
    conn.send(&build_head(
        node.port(),
        "PUT",
        "/s/stall-chunked.bin",
        &[("Transfer-Encoding", "chunked")],
        None,
    ))
    .unwrap();
    conn.send(format!("{:x}\r\n", 2_000_000).as_bytes())
        .unwrap();
    conn.send(&sent).unwrap();
    assert_408_or_dropped(&mut conn, "chunked body stalled inside a chunk");

    // A client that goes away mid-body.
    let mut conn = Conn::open(node.port());
    conn.send(&build_head(
        node.port(),
        "PUT",
        "/s/gone.bin",
        &[],
        Some(3_000_000),
    ))
    .unwrap();
    conn.send(&sent).unwrap();
    drop(conn);

    node.assert_tmp_empty_soon("after stalled and abandoned uploads");
    assert_eq!(
        node.stored_files(),
        vec![stored_name_of(&keep)],
        "nothing of the stalled uploads is stored"
    );
    assert_eq!(node.get(&keep).body, b"stays");
    node.put_ok("/s/after.txt", b"the node still accepts uploads");
}

/// A keep-alive connection that has been served once, so the node holds a
/// connection slot for it.
fn served_keepalive(port: u16) -> Conn {
    let mut c = Conn::open(port);
    c.send(&build_head(
        port,
        "GET",
        "/_status",
        &[("Connection", "keep-alive")],
        None,
    ))
    .unwrap();
    let r = c
        .read_response(false)
        .expect("status on a keep-alive connection");
    assert_eq!(r.status, 200, "{}", r.describe());
    c
}

#[test]
fn max_connections_bounds_concurrent_connections() {
    let node = Node::start(&["--max-connections", "4", "--header-timeout", "60"]);
    let port = node.port();
    let mut held: Vec<Conn> = (0..4).map(|_| served_keepalive(port)).collect();

    // A fifth client connects (the kernel queues it) but is not served.
    let mut fifth = Conn::open(port);
    fifth
        .send(&build_head(port, "GET", "/_status", &[], None))
        .unwrap();
    fifth.set_read_timeout(Duration::from_millis(1500));
    match fifth.read_head() {
        Err(e) if is_read_timeout(&e) => {}
        other => panic!(
            "a fifth connection was served while 4 were open with --max-connections 4: {other:?}"
        ),
    }

    // Closing one lets it in.
    drop(held.pop());
    fifth.set_read_timeout(Duration::from_secs(10));
    let r = fifth
        .read_response(false)
        .expect("the fifth request is served once a connection closed");
    assert_eq!(r.status, 200, "{}", r.describe());

    drop(held);
    let ok = wait_until(Duration::from_secs(10), || {
        (0..4)
            .all(|_| try_request(port, "GET", "/_status", &[], b"").is_ok_and(|r| r.status == 200))
    });
    assert!(ok, "node does not serve again after the connections closed");
    let again: Vec<Conn> = (0..4).map(|_| served_keepalive(port)).collect();
    assert_eq!(again.len(), 4, "all four slots are free again");
}

#[test]
fn a_client_that_reads_nothing_of_an_answer_is_cut_off() {
    // One connection slot: a reader that never reads would hold it for ever.
    let node = Node::start(&["--max-connections", "1", "--read-timeout", "1"]);
    let port = node.port();
    // Larger than the socket buffers on both sides together.
    let big = Rng::new(12).bytes(32 * 1024 * 1024);
    let loc = node.put_ok("/slow/reader.bin", &big);
    let mut stuck = Conn::open(port);
    stuck
        .send(&build_head(port, "GET", &loc, &[], None))
        .unwrap();
    // Reads nothing. Another client is served once the node gives up on it.
    let mut other = Conn::open(port);
    other
        .send(&build_head(port, "GET", "/_status", &[], None))
        .unwrap();
    other.set_read_timeout(Duration::from_secs(20));
    let started = Instant::now();
    let r = other
        .read_response(false)
        .expect("served after the stalled reader was cut off (--read-timeout 1)");
    assert_eq!(r.status, 200, "{}", r.describe());
    assert!(
        started.elapsed() >= Duration::from_millis(500),
        "served while the stalled reader still held the only slot"
    );
    drop(stuck);
    assert_eq!(node.get(&loc).body.len(), big.len(), "the file is intact");
}

#[test]
fn a_client_that_reads_slowly_but_steadily_is_not_cut_off() {
    let node = Node::start(&["--read-timeout", "2"]);
    let port = node.port();
    let big = Rng::new(13).bytes(24 * 1024 * 1024);
    let loc = node.put_ok("/slow/steady.bin", &big);
    let mut conn = Conn::open(port);
    conn.send(&build_head(
        port,
        "GET",
        &loc,
        &[("Connection", "close")],
        None,
    ))
    .unwrap();
    let mut stream = conn.stream;
    let mut got = Vec::with_capacity(big.len());
    let mut chunk = vec![0u8; 16 * 1024];
    // Take 16 KiB every 200 ms for 5 s (the socket buffers fill at once):
    // far below the send rate, but never 2 s without taking anything.
    let slow_until = Instant::now() + Duration::from_secs(5);
    loop {
        if Instant::now() < slow_until {
            // Not a wait for a result: it is how slowly this client reads.
            std::thread::sleep(Duration::from_millis(200));
        }
        let n = std::io::Read::read(&mut stream, &mut chunk).expect("read");
        if n == 0 {
            break;
        }
        got.extend_from_slice(&chunk[..n]);
    }
    let body_at = got
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a head")
        + 4;
    assert!(got.starts_with(b"HTTP/1.1 200"));
    assert_eq!(got.len() - body_at, big.len(), "the whole file arrived");
    assert!(got[body_at..] == big[..], "the file arrived intact");
}

#[test]
fn max_size_is_checked_before_and_while_reading() {
    let node = Node::start(&["--max-size", "1000", "--read-timeout", "30"]);
    let port = node.port();
    let fits = Rng::new(11).bytes(1000);
    let loc = node.put_ok("/m/fits.bin", &fits);

    // Content-Length over the limit with Expect: 100-continue: the 413 comes
    // at once, without a 100 Continue, and without the body.
    let r = put_asking_first(port, "/m/expect.bin", &[], 5000);
    assert_eq!(r.status, 413, "{}", r.describe());
    assert_error_body(&r, "413 before the body");

    // Without Expect the answer does not wait for the body either.
    let mut conn = Conn::open(port);
    conn.send(&build_head(port, "PUT", "/m/huge.bin", &[], Some(10 << 30)))
        .unwrap();
    conn.set_read_timeout(Duration::from_secs(10));
    let r = conn
        .read_response(false)
        .expect("413 for a 10 GiB Content-Length");
    assert_eq!(r.status, 413, "{}", r.describe());

    // Chunked: the 413 comes once the limit is passed, while the body is
    // still open.
    let mut conn = Conn::open(port);
    conn.send(&build_head(
        port,
        "PUT",
        "/m/chunked.bin",
        &[("Transfer-Encoding", "chunked")],
        None,
    ))
    .unwrap();
    // Four chunks of 300 bytes pass the 1000-byte limit. The last one is
    // sent without its closing CRLF and nothing follows, so the server has
    // read every byte when it answers and closes: bytes left unread would
    // make the close a reset, which can destroy the 413 in flight.
    let chunks = Rng::new(12).bytes(1200);
    for (i, chunk) in chunks.chunks(300).enumerate() {
        conn.send(format!("{:x}\r\n", chunk.len()).as_bytes())
            .unwrap();
        conn.send(chunk).unwrap();
        if i < 3 {
            conn.send(b"\r\n").unwrap();
        }
    }
    conn.set_read_timeout(Duration::from_secs(10));
    let r = conn
        .read_response(false)
        .expect("413 while a chunked body is still open");
    assert_eq!(r.status, 413, "{}", r.describe());

    let r = node.put("/m/over.bin", &Rng::new(13).bytes(1001));
    assert_eq!(r.status, 413, "1001 bytes: {}", r.describe());
    let exact = Rng::new(14).bytes(1000);
    let chunks: Vec<&[u8]> = exact.chunks(128).collect();
    let r = request_chunked(port, "PUT", "/m/exact-chunked.bin", &[], &chunks);
    assert_eq!(r.status, 201, "1000 bytes chunked: {}", r.describe());
    let chunked_loc = r.header("location").unwrap();

    node.assert_tmp_empty_soon("after 413s");
    let mut expected = vec![stored_name_of(&loc), stored_name_of(&chunked_loc)];
    expected.sort();
    assert_eq!(node.stored_files(), expected);
}

// ---------------------------------------------------------------------------
// Disk full
// ---------------------------------------------------------------------------

fn is_root() -> bool {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|v| v.split_whitespace().next().map(|u| u == "0"))
        })
        .unwrap_or(false)
}

/// A node whose storage directory is a small tmpfs. Dropping it stops the
/// node first and then unmounts, so a failing test leaves no mount behind.
struct TmpfsNode {
    node: Node,
    mountpoint: PathBuf,
}

impl TmpfsNode {
    /// None (after saying so) when mounting is impossible because this is
    /// not root.
    fn start(port: u16, args: &[String], size: &str) -> Option<TmpfsNode> {
        let node = Node::prepare(port, args);
        let mountpoint = node.storage();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&mountpoint)
            .output();
        match out {
            Ok(o) if o.status.success() => {}
            other if !is_root() => {
                eprintln!("SKIPPED: cannot mount a tmpfs (not root): {other:?}");
                return None;
            }
            other => panic!("mount -t tmpfs failed although running as root: {other:?}"),
        }
        let mut this = TmpfsNode { node, mountpoint };
        this.node.restart();
        Some(this)
    }
}

impl Drop for TmpfsNode {
    fn drop(&mut self) {
        if self.node.is_running() {
            self.node.kill9();
        }
        let ok = Command::new("umount")
            .arg(&self.mountpoint)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let _ = Command::new("umount")
                .arg("-l")
                .arg(&self.mountpoint)
                .status();
        }
    }
}

#[test]
fn disk_full_put_gets_507_leaves_nothing_and_recovers() {
    let Some(t) = TmpfsNode::start(free_port(), &[], "8m") else {
        return;
    };
    let node = &t.node;
    let big = Rng::new(21).bytes(4 << 20);
    let mid = Rng::new(22).bytes(3 << 20);
    let small = Rng::new(23).bytes(50_000);
    let big_loc = node.put_ok("/d/big.bin", &big);
    let mid_loc = node.put_ok("/d/mid.bin", &mid);
    let small_loc = node.put_ok("/d/small.txt", &small);
    let stored = node.stored_files();

    // Larger than what is left (about 1 MiB), and larger than the whole disk.
    let new = Rng::new(24).bytes(2 << 20);
    for (what, body) in [("2 MiB", &new), ("10 MiB", &Rng::new(25).bytes(10 << 20))] {
        let r = node.put("/d/new.bin", body);
        assert_eq!(
            r.status,
            507,
            "{what} PUT onto a full disk: {}",
            r.describe()
        );
        assert_error_body(&r, "507");
        node.assert_tmp_empty_soon(&format!("after the {what} 507"));
        assert_eq!(node.stored_files(), stored, "a 507 left a partial file");
    }
    // Reads still work, and the files are intact.
    for (loc, body) in [(&big_loc, &big), (&mid_loc, &mid), (&small_loc, &small)] {
        let r = node.get(loc);
        assert_eq!(r.status, 200, "GET {loc} on a full disk: {}", r.describe());
        assert_eq!(sha1_hex(&r.body), sha1_hex(body), "{loc} changed");
    }
    // Freeing space makes room for the upload.
    assert_eq!(node.delete(&big_loc).status, 200);
    let loc = node.put_ok("/d/new.bin", &new);
    assert_eq!(node.get(&loc).body, new);
    assert_eq!(sha1_hex(&node.get(&mid_loc).body), sha1_hex(&mid));
    node.assert_tmp_empty_soon("after the successful upload");
}

#[test]
fn replication_into_a_full_node_is_retried_not_lost() {
    let (a, b) = (free_port(), free_port());
    let Some(t) = TmpfsNode::start(b, &node_args(b, &[a, b], None, &[]), "8m") else {
        return;
    };
    let node_b = &t.node;
    let node_a = Node::start_on(a, &node_args(a, &[a, b], None, &[]));
    let url_b = url_of(b);

    // Fill B through its API (A gets copies on its normal disk).
    let filler = Rng::new(31).bytes(5 << 20);
    let filler_loc = node_b.put_ok("/fill/big.bin", &filler);
    let keep = Rng::new(32).bytes(2 << 20);
    let keep_loc = node_b.put_ok("/fill/keep.bin", &keep);
    wait_queues_empty(
        &[node_b, &node_a],
        Duration::from_secs(30),
        "fillers replicated",
    );

    // A accepts a file B has no room for.
    let x = Rng::new(33).bytes(2 << 20);
    let x_loc = node_a.put_ok("/x/new.bin", &x);
    let x_name = stored_name_of(&x_loc);
    let refused = wait_until(Duration::from_secs(15), || {
        let s = status_json(a);
        let q = &s["queues"][&url_b];
        q["length"].as_u64().unwrap_or(0) > 0
            && q["last_error"].as_str().is_some_and(|e| e.contains("507"))
    });
    assert!(
        refused,
        "A's queue to the full B should keep the file with B's 507 as last error: {}",
        status_json(a)
    );
    assert!(
        node_b.read_stored(&x_name).is_none(),
        "B cannot have the file yet"
    );
    node_b.assert_tmp_empty_soon("B after refusing a replica");
    assert!(
        queue_len_to(a, &url_b) > 0,
        "the refused copy is still queued"
    );

    // Free space on B the way an operator would: through the API.
    let r = node_b.delete(&filler_loc);
    assert_eq!(r.status, 200, "{}", r.describe());
    assert!(
        wait_has(node_b, &x_name, &x, Duration::from_secs(30)),
        "the file did not reach B after space was freed: {}",
        status_json(a)
    );
    wait_queues_empty(
        &[&node_a, node_b],
        Duration::from_secs(30),
        "after B had room",
    );
    assert_eq!(sha1_hex(&node_b.get(&keep_loc).body), sha1_hex(&keep));
    assert_eq!(sha1_hex(&node_a.get(&x_loc).body), sha1_hex(&x));
}

// ---------------------------------------------------------------------------
// Malformed traffic
// ---------------------------------------------------------------------------

/// Send `bytes` on a new connection, half-close if asked, and collect what
/// comes back until the server closes or `bound` passes. Returns the bytes
/// and whether the server closed.
fn send_and_drain(port: u16, bytes: &[u8], half_close: bool, bound: Duration) -> (Vec<u8>, bool) {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_secs(2)) else {
        return (Vec::new(), false);
    };
    let _ = s.set_write_timeout(Some(Duration::from_secs(2)));
    let _ = s.set_nodelay(true);
    // The server may answer and close before taking everything.
    let _ = s.write_all(bytes);
    if half_close {
        let _ = s.shutdown(Shutdown::Write);
    }
    let deadline = Instant::now() + bound;
    let mut out = Vec::new();
    let mut buf = [0u8; 16384];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return (out, false);
        }
        let _ = s.set_read_timeout(Some(left.min(Duration::from_millis(250))));
        match s.read(&mut buf) {
            Ok(0) => return (out, true),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if is_read_timeout(&e) => {}
            Err(_) => return (out, true),
        }
    }
}

/// Status codes of the responses in `data`, in order; stops at the first
/// thing that is not a well-formed response. `Err` describes what was not.
fn response_statuses(mut data: &[u8], head_request: bool) -> Result<Vec<u16>, String> {
    let mut out = Vec::new();
    while !data.is_empty() {
        if data.len() < 12 || !data.starts_with(b"HTTP/1.") {
            return Err(format!(
                "not an HTTP response: {:?}",
                String::from_utf8_lossy(&data[..data.len().min(100)])
            ));
        }
        let status: u16 = std::str::from_utf8(&data[9..12])
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("bad status line {:?}", String::from_utf8_lossy(&data[..12])))?;
        out.push(status);
        let Some(end) = data.windows(4).position(|w| w == b"\r\n\r\n") else {
            break; // a head cut short by the close
        };
        let head = String::from_utf8_lossy(&data[..end]).to_ascii_lowercase();
        data = &data[end + 4..];
        let header = |name: &str| {
            head.lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.trim_start_matches(':').trim().to_string())
        };
        if head_request || (100..200).contains(&status) || status == 204 || status == 304 {
            continue;
        }
        if header("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
            // Skip chunks.
            loop {
                let Some(eol) = data.windows(2).position(|w| w == b"\r\n") else {
                    return Ok(out);
                };
                let size = usize::from_str_radix(
                    String::from_utf8_lossy(&data[..eol])
                        .split(';')
                        .next()
                        .unwrap_or("")
                        .trim(),
                    16,
                )
                .map_err(|_| "bad chunk size".to_string())?;
                data = data.get(eol + 2 + size + 2..).unwrap_or(&[]);
                if size == 0 {
                    break;
                }
            }
        } else if let Some(len) = header("content-length").and_then(|v| v.parse::<usize>().ok()) {
            data = data.get(len..).unwrap_or(&[]);
        } else {
            break;
        }
    }
    Ok(out)
}

fn pick<'a>(rng: &mut Rng, items: &[&'a str]) -> &'a str {
    items[rng.below(items.len() as u64) as usize]
}

fn chance(rng: &mut Rng, percent: u64) -> bool {
    rng.below(100) < percent
}

/// One generated request: the bytes, whether to half-close after sending,
/// and whether it is a HEAD (whose responses have no body).
struct Generated {
    bytes: Vec<u8>,
    half_close: bool,
    head: bool,
}

fn random_printable(rng: &mut Rng, n: usize) -> String {
    (0..n)
        .map(|_| char::from(b' ' + rng.below(95) as u8))
        .collect()
}

/// Printable ASCII of `lo..lo+span` characters.
fn printable(rng: &mut Rng, lo: u64, span: u64) -> String {
    let n = lo + rng.below(span);
    random_printable(rng, n as usize)
}

/// Random bytes, `lo..lo+span` of them.
fn some_bytes(rng: &mut Rng, lo: u64, span: u64) -> Vec<u8> {
    let n = lo + rng.below(span);
    rng.bytes(n as usize)
}

fn gen_segment(rng: &mut Rng) -> Vec<u8> {
    let words = [
        "a",
        "photo.jpg",
        "x.tar.gz",
        "page.html",
        "dir",
        "_status",
        "README",
        "%",
        "*",
    ];
    match rng.below(24) {
        0 => b"..".to_vec(),
        1 => b".".to_vec(),
        2 => b"%2e%2e".to_vec(),
        3 => b"%2E%2e%2f..%2F".to_vec(),
        4 => b"%zz".to_vec(),
        5 => b"%4".to_vec(),
        6 => b"%00".to_vec(),
        7 => b"%0a%0d".to_vec(),
        8 => b"%ff%fe".to_vec(),
        9 => b"%C3%A9t%C3%A9%20x".to_vec(),
        10 => "été".as_bytes().to_vec(),
        11 => vec![rng.below(32) as u8],
        12 => vec![0x7f, b'x'],
        13 => vec![b'a'; 150 + rng.below(300) as usize],
        14 => Vec::new(),
        15 => b".hidden".to_vec(),
        16 => b".tmp".to_vec(),
        17 => printable(rng, 1, 12).into_bytes(),
        18 => some_bytes(rng, 1, 6),
        19 => format!("%{:02X}", rng.below(256)).into_bytes(),
        20 => format!("n_{}_{}", rng.below(2_000_000_000), sha1_hex(&rng.bytes(4))).into_bytes(),
        _ => pick(rng, &words).as_bytes().to_vec(),
    }
}

fn gen_path(rng: &mut Rng, canaries: &[String], read: bool) -> Vec<u8> {
    if read && chance(rng, 35) {
        let c = &canaries[rng.below(canaries.len() as u64) as usize];
        return c.clone().into_bytes();
    }
    let mut p = Vec::new();
    if chance(rng, 45) {
        // A plausible name, so that requests get past the name checks.
        let words = [
            "a",
            "b",
            "photos",
            "cat.jpg",
            "x.tar.gz",
            "page.html",
            "f.svg",
            "n",
        ];
        for _ in 0..1 + rng.below(3) {
            p.push(b'/');
            p.extend_from_slice(pick(rng, &words).as_bytes());
        }
        return p;
    }
    match rng.below(40) {
        0 => return b"*".to_vec(),
        1 => p.extend_from_slice(b"http://127.0.0.1"),
        2 => return Vec::new(),
        3 => return b"x/no-leading-slash".to_vec(),
        _ => {}
    }
    for _ in 0..1 + rng.below(5) {
        p.push(b'/');
        p.extend(gen_segment(rng));
    }
    if chance(rng, 2) {
        p.extend("/a".repeat(600 + rng.below(4000) as usize).into_bytes());
    }
    if chance(rng, 8) {
        p.push(b'?');
        p.extend(printable(rng, 0, 20).into_bytes());
    }
    p
}

fn gen_header(rng: &mut Rng, canary_etags: &[String]) -> (String, String) {
    let range = [
        "bytes=0-0",
        "bytes=-1",
        "bytes=5-2",
        "bytes=0-99999999999999999999999",
        "bytes=-0",
        "bytes=-99999999999999999999",
        "bytes=abc",
        "bytes=1-2,3-4,100-200",
        "bytes=0-,0-",
        "bytes=",
        "bytes",
        "items=0-1",
        "bytes=18446744073709551615-",
        "bytes=18446744073709551614-18446744073709551615",
        "bytes=--5",
        "bytes= 3 - 7 ",
        "bytes=1-1,,,,2-2",
    ];
    let inm = [
        "*",
        "\"abc\"",
        "W/\"",
        "\"",
        ",,,",
        "W/*",
        "W/W/\"a\"",
        "\"a\", *",
        "\"\"",
        "\"a,b\"\"c\"",
    ];
    match rng.below(16) {
        0 | 1 => {
            let v = if chance(rng, 20) {
                let n = 1 + rng.below(200);
                let parts: Vec<String> = (0..n)
                    .map(|i| format!("{}-{}", i * 3, rng.below(1_000_000)))
                    .collect();
                format!("bytes={}", parts.join(","))
            } else if chance(rng, 15) {
                format!("bytes={}", printable(rng, 0, 30))
            } else {
                pick(rng, &range).to_string()
            };
            ("Range".into(), v)
        }
        2 | 3 => {
            let v = match rng.below(5) {
                0 => canary_etags[rng.below(canary_etags.len() as u64) as usize].clone(),
                1 => format!(
                    "W/{}, \"x\"",
                    canary_etags[rng.below(canary_etags.len() as u64) as usize]
                ),
                2 => printable(rng, 0, 60),
                3 => vec!["\"zz\""; 1 + rng.below(500) as usize].join(","),
                _ => pick(rng, &inm).to_string(),
            };
            ("If-None-Match".into(), v)
        }
        4 => (
            "If-Range".into(),
            pick(
                rng,
                &[
                    "\"abc\"",
                    "garbage",
                    "Sun, 06 Nov 1994 08:49:37 GMT",
                    "W/\"x\"",
                ],
            )
            .into(),
        ),
        5 => (
            "If-Modified-Since".into(),
            pick(
                rng,
                &[
                    "yesterday",
                    "Sun, 06 Nov 1994 08:49:37 GMT",
                    "Fri, 31 Dec 9999 23:59:59 GMT",
                    "",
                ],
            )
            .into(),
        ),
        6 => (
            "X-Content-SHA1".into(),
            if chance(rng, 50) {
                sha1_hex(&rng.bytes(8))
            } else {
                printable(rng, 0, 50)
            },
        ),
        7 => (
            "Authorization".into(),
            format!("Bearer {}", printable(rng, 0, 40)),
        ),
        8 => (
            "Expect".into(),
            pick(rng, &["100-continue", "200-ok", "", "100-CONTINUE"]).into(),
        ),
        9 => (
            "Transfer-Encoding".into(),
            pick(rng, &["gzip", "chunked, gzip", "identity", "x"]).into(),
        ),
        10 => ("Content-Type".into(), printable(rng, 0, 40)),
        11 if chance(rng, 15) => {
            let n = if chance(rng, 20) {
                70_000
            } else {
                17_000 + rng.below(8000) as usize
            };
            ("X-Huge".into(), "h".repeat(n))
        }
        12 => (
            printable(rng, 1, 10).replace(':', ""),
            printable(rng, 0, 30),
        ),
        13 => ("Host".into(), printable(rng, 0, 30)),
        _ => (format!("X-R{}", rng.below(1000)), printable(rng, 0, 100)),
    }
}

fn generate(rng: &mut Rng, port: u16, canaries: &[String], etags: &[String]) -> Generated {
    // Entirely garbage request heads.
    if chance(rng, 6) {
        let bytes = match rng.below(7) {
            0 => some_bytes(rng, 1, 300),
            1 => b"\r\n\r\n".to_vec(),
            2 => b"GET / HTTP/1.1\n\n".to_vec(),
            3 => b"GET\r\n\r\n".to_vec(),
            4 => b"GET /\r\n".to_vec(),
            5 => format!("{} / HTTP/1.1\r\nHost: x\r\n\r\n", "A".repeat(5000)).into_bytes(),
            _ => {
                let mut b = rng.bytes(20);
                b.extend_from_slice(b" / HTTP/1.1\r\n\r\n");
                b
            }
        };
        return Generated {
            bytes,
            half_close: true,
            head: false,
        };
    }
    let method = match rng.below(20) {
        0..=5 => "GET",
        6..=8 => "HEAD",
        9..=12 => "PUT",
        13..=14 => "DELETE",
        15 => pick(
            rng,
            &["POST", "OPTIONS", "PATCH", "TRACE", "PROPFIND", "MKCOL"],
        ),
        16 => pick(
            rng,
            &["get", "Put", "DELET", "GET GET", "G\u{7f}T", "CONNECT"],
        ),
        17 => "POST",
        _ => "GET",
    };
    let read = matches!(method, "GET" | "HEAD");
    let path = gen_path(rng, canaries, read);
    let version = if chance(rng, 92) {
        "HTTP/1.1"
    } else {
        pick(
            rng,
            &[
                "HTTP/1.0",
                "HTTP/2.0",
                "HTTP/1.2",
                "HTTX/1.1",
                "",
                "HTTP/1.1 extra",
                "http/1.1",
            ],
        )
    };
    let mut head = Vec::new();
    head.extend_from_slice(method.as_bytes());
    head.push(b' ');
    head.extend_from_slice(&path);
    if !version.is_empty() {
        head.push(b' ');
        head.extend_from_slice(version.as_bytes());
    }
    head.extend_from_slice(b"\r\n");
    if chance(rng, 95) {
        head.extend_from_slice(format!("Host: 127.0.0.1:{port}\r\n").as_bytes());
    }
    for _ in 0..rng.below(6) {
        let (n, v) = gen_header(rng, etags);
        head.extend_from_slice(format!("{n}: {v}\r\n").as_bytes());
    }
    if chance(rng, 3) {
        head.extend_from_slice(b"X-Folded: a\r\n continued\r\n");
    }
    if chance(rng, 3) {
        head.extend_from_slice(b"no colon here\r\n");
    }
    let keep_alive = chance(rng, 10);
    if !keep_alive {
        head.extend_from_slice(b"Connection: close\r\n");
    }

    let body_len = if chance(rng, 80) {
        rng.below(3000)
    } else {
        rng.below(200_000)
    } as usize;
    let body = rng.bytes(body_len);
    let mut half_close = keep_alive;
    let mut tail = Vec::new();
    match rng.below(10) {
        // No body.
        0 if !matches!(method, "PUT") => {}
        // Exact Content-Length.
        0..=3 => {
            tail.extend_from_slice(format!("Content-Length: {body_len}\r\n\r\n").as_bytes());
            tail.extend_from_slice(&body);
        }
        // Truncated: more promised than sent, then close.
        4 => {
            let promised = body_len + 1 + rng.below(100_000) as usize;
            tail.extend_from_slice(format!("Content-Length: {promised}\r\n\r\n").as_bytes());
            tail.extend_from_slice(&body);
            half_close = true;
        }
        // Over-long: more sent than promised (the rest looks like a request).
        5 => {
            let promised = body_len / 2;
            tail.extend_from_slice(format!("Content-Length: {promised}\r\n\r\n").as_bytes());
            tail.extend_from_slice(&body);
            if chance(rng, 50) {
                tail.extend_from_slice(b"DELETE /x HTTP/1.1\r\nHost: x\r\n\r\n");
            }
            half_close = true;
        }
        // Chunked, well-formed.
        6 => {
            tail.extend_from_slice(b"Transfer-Encoding: chunked\r\n\r\n");
            let chunks: Vec<&[u8]> = body.chunks(1 + rng.below(4000) as usize).collect();
            tail.extend_from_slice(&chunked_body(&chunks));
        }
        // Chunked, broken.
        7 => {
            tail.extend_from_slice(b"Transfer-Encoding: chunked\r\n\r\n");
            match rng.below(4) {
                0 => tail.extend_from_slice(b"zz\r\nabc\r\n0\r\n\r\n"),
                1 => tail.extend_from_slice(b"ffffffffffffffffffff\r\nabc\r\n"),
                2 => {
                    tail.extend_from_slice(format!("{:x}\r\n", body_len + 10).as_bytes());
                    tail.extend_from_slice(&body);
                }
                _ => {
                    tail.extend_from_slice(format!("{:x}\r\n", body_len).as_bytes());
                    tail.extend_from_slice(&body);
                    tail.extend_from_slice(b"XX");
                }
            }
            half_close = true;
        }
        // Bogus Content-Length values.
        8 => {
            let v = pick(
                rng,
                &[
                    "-1",
                    "abc",
                    "1e3",
                    "18446744073709551616",
                    " 5",
                    "5, 6",
                    "0x10",
                ],
            );
            tail.extend_from_slice(format!("Content-Length: {v}\r\n\r\n").as_bytes());
            tail.extend_from_slice(&body[..body_len.min(10)]);
            half_close = true;
        }
        // Both framings at once.
        _ => {
            tail.extend_from_slice(
                format!("Content-Length: {body_len}\r\nTransfer-Encoding: chunked\r\n\r\n")
                    .as_bytes(),
            );
            tail.extend_from_slice(&chunked_body(&[&body]));
            half_close = true;
        }
    }
    if tail.is_empty() {
        tail.extend_from_slice(b"\r\n");
    }
    head.extend_from_slice(&tail);
    Generated {
        bytes: head,
        half_close,
        head: method == "HEAD",
    }
}

/// What one generator thread saw.
struct Tally {
    sent: usize,
    answered: usize,
    failures: Vec<String>,
    statuses: BTreeMap<u16, usize>,
}

const PER_THREAD: usize = 1250;
/// The barrage stops early after this long, whatever was sent.
const TIME_CAP: Duration = Duration::from_secs(30);

/// Send generated requests one connection each; note 5xx answers, hangs
/// and anything that is not HTTP.
fn barrage(
    t: u64,
    mut rng: Rng,
    port: u16,
    locations: &[String],
    etags: &[String],
    started: Instant,
) -> Tally {
    let mut tally = Tally {
        sent: 0,
        answered: 0,
        failures: Vec::new(),
        statuses: BTreeMap::new(),
    };
    for i in 0..PER_THREAD {
        if started.elapsed() > TIME_CAP || tally.failures.len() >= 5 {
            break;
        }
        let g = generate(&mut rng, port, locations, etags);
        tally.sent += 1;
        let (data, closed) = send_and_drain(port, &g.bytes, g.half_close, Duration::from_secs(6));
        let shown = String::from_utf8_lossy(&g.bytes[..g.bytes.len().min(300)]).into_owned();
        if !closed {
            tally.failures.push(format!(
                "thread {t} request {i}: no close within 6 s (a hang): {shown:?}"
            ));
            continue;
        }
        match response_statuses(&data, g.head) {
            Ok(codes) => {
                if !codes.is_empty() {
                    tally.answered += 1;
                }
                for c in codes {
                    *tally.statuses.entry(c).or_insert(0) += 1;
                    if c >= 500 {
                        tally.failures.push(format!(
                            "thread {t} request {i}: got {c}: {shown:?}\nresponse: {:?}",
                            String::from_utf8_lossy(&data[..data.len().min(300)])
                        ));
                    }
                }
            }
            Err(e) => tally
                .failures
                .push(format!("thread {t} request {i}: {e}: {shown:?}")),
        }
    }
    tally
}

#[test]
fn malformed_traffic_never_gets_5xx_and_harms_nothing() {
    let seed: u64 = std::env::var("COCKATIEL_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
        });
    println!("malformed traffic seed: {seed} (set COCKATIEL_SEED={seed} to repeat)");
    let mut node = Node::start(&["--read-timeout", "2", "--header-timeout", "2"]);
    let port = node.port();

    let mut rng = Rng::new(seed ^ 0xc0ca);
    let originals: Vec<(&str, Vec<u8>)> = vec![
        ("/canary/a.txt", b"plain text canary\n".to_vec()),
        (
            "/canary/page.html",
            b"<html><body>canary</body></html>".to_vec(),
        ),
        ("/canary/big.bin", rng.bytes(300_000)),
        ("/canary/empty.dat", Vec::new()),
        ("/canary/deep/er/x.tar.gz", rng.bytes(5000)),
    ];
    let canaries: Vec<(String, Vec<u8>)> = originals
        .into_iter()
        .map(|(p, b)| (node.put_ok(p, &b), b))
        .collect();
    let locations: Vec<String> = canaries.iter().map(|(l, _)| l.clone()).collect();
    let etags: Vec<String> = canaries
        .iter()
        .map(|(_, b)| format!("\"{}\"", sha1_hex(b)))
        .collect();

    const THREADS: u64 = 4;
    let started = Instant::now();
    let tallies: Vec<Tally> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..THREADS)
            .map(|t| {
                let (locations, etags) = (&locations, &etags);
                let rng = Rng::new(seed.wrapping_add(t + 1));
                scope.spawn(move || barrage(t, rng, port, locations, etags, started))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("generator thread"))
            .collect()
    });

    let mut total_sent = 0;
    let mut total_answered = 0;
    let mut failures = Vec::new();
    let mut statuses = BTreeMap::new();
    for tally in tallies {
        total_sent += tally.sent;
        total_answered += tally.answered;
        failures.extend(tally.failures);
        for (k, v) in tally.statuses {
            *statuses.entry(k).or_insert(0) += v;
        }
    }
    println!(
        "sent {total_sent} malformed requests in {:?}; {total_answered} answered; statuses {statuses:?}",
        started.elapsed()
    );
    assert!(
        failures.is_empty(),
        "seed {seed}: {} failures, first ones:\n{}",
        failures.len(),
        failures
            .iter()
            .take(5)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n\n")
    );
    assert!(
        total_sent >= 1000,
        "only {total_sent} requests sent in {TIME_CAP:?}"
    );
    assert!(
        total_answered * 2 >= total_sent,
        "most requests should get an answer: {total_answered} of {total_sent}"
    );

    assert!(node.is_running(), "the node died:\n{}", node.stderr_text());
    assert_eq!(node.get("/_status").status, 200, "the node still answers");
    for (loc, body) in &canaries {
        let r = node.get(loc);
        assert_eq!(r.status, 200, "seed {seed}: {loc}: {}", r.describe());
        assert_eq!(
            sha1_hex(&r.body),
            sha1_hex(body),
            "seed {seed}: {loc} changed"
        );
        let on_disk = fs::read(node.stored_path(loc)).expect("canary on disk");
        assert_eq!(
            sha1_hex(&on_disk),
            sha1_hex(body),
            "seed {seed}: {loc} changed on disk"
        );
    }
    node.assert_tmp_empty_soon("after malformed traffic");
    let log = node.stderr_text();
    assert!(!log.contains("panicked"), "the node panicked:\n{log}");
}

#[test]
fn response_parser_sees_every_status() {
    let two = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabcHTTP/1.1 500 Oops\r\ncontent-length: 0\r\n\r\n";
    assert_eq!(response_statuses(two, false), Ok(vec![200, 500]));
    let chunked = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\nHTTP/1.1 503 x\r\n\r\n";
    assert_eq!(response_statuses(chunked, false), Ok(vec![100, 201, 503]));
    let head = b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nHTTP/1.1 502 x\r\n\r\n";
    assert_eq!(response_statuses(head, true), Ok(vec![200, 502]));
    assert!(response_statuses(b"garbage", false).is_err());
    assert_eq!(response_statuses(b"", false), Ok(vec![]));
}

/// A tmpfs mounted on a directory until dropped.
struct Mounted(PathBuf);

impl Mounted {
    /// None (after saying so) when mounting is impossible because this is
    /// not root.
    fn tmpfs(at: &std::path::Path, size: &str) -> Option<Mounted> {
        fs::create_dir_all(at).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .output();
        match out {
            Ok(o) if o.status.success() => Some(Mounted(at.to_path_buf())),
            other if !is_root() => {
                eprintln!("SKIPPED: cannot mount a tmpfs (not root): {other:?}");
                None
            }
            other => panic!("mount -t tmpfs failed although running as root: {other:?}"),
        }
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(&self.0)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
}

/// Fill the file system under `dir` with one file until it is full.
fn fill(dir: &std::path::Path) -> PathBuf {
    let path = dir.join("filler");
    let mut f = fs::File::create(&path).unwrap();
    let chunk = vec![0u8; 64 * 1024];
    while f.write_all(&chunk).is_ok() {}
    let _ = f.sync_all();
    path
}

#[test]
fn a_full_state_disk_gets_507_and_the_node_recovers_without_a_restart() {
    // A neighbour that never answers, so that the operation log grows.
    let (port, dead) = (free_port(), free_port());
    let mut node = Node::prepare(port, &node_args(port, &[dead], None, &[]));
    let Some(mount) = Mounted::tmpfs(&node.queue(), "2m") else {
        return;
    };
    node.restart();
    let keep = node.put_ok("/s/keep.txt", b"stored before the disk filled");
    let filler = fill(&node.queue());
    // Uploads until a state commit needs room it cannot have.
    let mut refused = None;
    for i in 0..3000 {
        let r = node.put(&format!("/s/f{i}.txt"), format!("file {i}").as_bytes());
        if r.status != 201 {
            refused = Some(r);
            break;
        }
    }
    let r = refused.expect("the state database never ran out of room");
    assert_eq!(
        r.status,
        507,
        "upload on a full state disk: {}",
        r.describe()
    );
    assert_error_body(&r, "507 for a full state disk");
    let r = node.delete(&keep);
    assert_eq!(
        r.status,
        507,
        "deletion on a full state disk: {}",
        r.describe()
    );
    assert_eq!(node.get(&keep).status, 200, "nothing stored is lost");
    // Room again: uploads and deletions work without a restart.
    fs::remove_file(&filler).unwrap();
    let mut last = None;
    let recovered = wait_until(Duration::from_secs(10), || {
        let r = node.put("/s/after.txt", b"after the disk had room again");
        let ok = matches!(r.status, 201 | 302);
        last = Some(r);
        ok
    });
    assert!(
        recovered,
        "uploads did not recover: {}",
        last.map(|r| r.describe()).unwrap_or_default()
    );
    let r = node.delete(&keep);
    assert_eq!(r.status, 200, "deletion after recovery: {}", r.describe());
    assert!(node.is_running());
    node.kill9();
    drop(mount);
}

// ---------------------------------------------------------------------------
// Files owned by another user
// ---------------------------------------------------------------------------

/// A node running as an unprivileged user serves files placed by hand that
/// another user owns (readable to all), whole, as HEAD and as a range, and
/// its own uploads beside them. Stored files are opened without updating
/// their access time, which only their owner may ask for; the node must
/// fall back to a plain open for the others.
#[test]
fn files_owned_by_another_user_are_served() {
    assert!(
        is_root(),
        "this test starts the node as user nobody (65534) and needs root"
    );
    let node = Node::start_as(65534, &[]);
    let body = b"placed by root, readable to all\n".to_vec();
    let placed = node.storage().join("by-root.txt");
    fs::write(&placed, &body).expect("place a file as root");
    let meta = fs::metadata(&placed).expect("stat the placed file");
    assert_eq!(std::os::unix::fs::MetadataExt::uid(&meta), 0);

    for _ in 0..2 {
        // Twice: the second read may come from the node's memory.
        let r = node.get("/by-root.txt");
        assert_eq!(r.status, 200, "{}", r.describe());
        assert_eq!(r.body, body);
    }
    let r = node.head("/by-root.txt");
    assert_eq!(r.status, 200, "{}", r.describe());
    assert_eq!(
        r.header("content-length").as_deref(),
        Some(body.len().to_string().as_str())
    );
    let r = node.req("GET", "/by-root.txt", &[("Range", "bytes=0-5")], b"");
    assert_eq!(r.status, 206, "{}", r.describe());
    assert_eq!(r.body, &body[..6]);

    let own = b"uploaded to the node running as nobody".to_vec();
    let loc = node.put_ok("/own.txt", &own);
    let r = node.get(&loc);
    assert_eq!(r.status, 200, "{}", r.describe());
    assert_eq!(r.body, own);
}

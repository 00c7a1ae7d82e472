//! Refusals (SPEC "Stored names", "Security"): hostile names and requests get
//! a 4xx with a one-line plain-text reason, never a 5xx, and never touch
//! anything outside the storage directory.

mod common;

use std::fs;
use std::time::{Duration, Instant};

use common::*;

/// A file stored before the barrage; checked intact at the end.
struct Canary {
    location: String,
    sha: String,
}

fn store_canary(node: &Node) -> Canary {
    let body = Rng::new(42).bytes(10_000);
    let location = node.put_ok("/canary/keep.bin", &body);
    Canary {
        location,
        sha: sha1_hex(&body),
    }
}

#[track_caller]
fn assert_canary_intact(node: &Node, canary: &Canary) {
    let r = node.get(&canary.location);
    assert_eq!(
        r.status,
        200,
        "canary {} must survive: {}",
        canary.location,
        r.describe()
    );
    assert_eq!(sha1_hex(&r.body), canary.sha, "canary content changed");
    let on_disk = fs::read(node.stored_path(&canary.location)).expect("canary on disk");
    assert_eq!(sha1_hex(&on_disk), canary.sha, "canary on disk changed");
}

/// Nothing but storage/, queue/ and the log may exist in the node's root:
/// a path escape would have created something next to storage/.
fn assert_nothing_escaped(node: &Node) {
    let mut names: Vec<String> = fs::read_dir(node.root())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["queue", "stderr.log", "storage"],
        "unexpected entries next to the storage dir"
    );
}

#[track_caller]
fn assert_refused(resp: &Response, what: &str) {
    assert!(
        (400..500).contains(&resp.status),
        "{what}: expected a 4xx refusal, got {}",
        resp.describe()
    );
    assert_error_body(resp, what);
}

#[track_caller]
fn assert_400(resp: &Response, what: &str) {
    assert_eq!(
        resp.status,
        400,
        "{what}: expected 400, got {}",
        resp.describe()
    );
    assert_error_body(resp, what);
}

/// Names the spec refuses with 400 for every method.
const BAD_NAMES: &[&str] = &[
    "/..%2f..%2fetc%2fpasswd",
    "/%2e%2e/x",
    "/%2E%2E/%2E%2E/x",
    "/..",
    "/.",
    "/a/..",
    "/a/../b",
    "/a/./b",
    "/a/%2e/b",
    "/a//b",
    "//a",
    "/a/",
    "/.hidden",
    "/a/.b",
    "/.tmp",
    "/.tmp/x",
    "/%2etmp/x",
    "/%00x",
    "/a%00.txt",
    "/a%0Ab",
    "/a%0Db",
    "/a%09b",
    "/a%7Fb",
    "/%zz",
    "/a%4",
    "/%4",
    "/%",
    "/%ff%fe",
    "/a%C0%AFb",
    "/%ED%A0%80",
    "/",
];

#[test]
fn bad_names_are_400_for_put_get_head_delete() {
    let mut node = Node::start(&[]);
    let canary = store_canary(&node);
    let files_before = node.stored_files();
    for name in BAD_NAMES {
        let r = node.put(name, b"evil content");
        assert_400(&r, &format!("PUT {name}"));
        let r = node.get(name);
        assert_400(&r, &format!("GET {name}"));
        let r = node.delete(name);
        assert_400(&r, &format!("DELETE {name}"));
        let r = node.head(name);
        assert_eq!(r.status, 400, "HEAD {name}: {}", r.describe());
        assert!(r.body.is_empty(), "HEAD {name}: no body");
    }
    assert_eq!(
        node.stored_files(),
        files_before,
        "refused PUTs stored nothing"
    );
    node.assert_tmp_empty_soon("after refused PUTs");
    assert_nothing_escaped(&node);
    assert_canary_intact(&node, &canary);
    assert!(node.is_running(), "node survived the barrage");
}

#[test]
fn segment_length_limits() {
    let node = Node::start(&[]);
    let canary = store_canary(&node);
    // PUT: a segment over 200 bytes is refused, 200 is fine.
    let seg201 = format!("/{}.txt", "a".repeat(197));
    let seg200 = format!("/{}.txt", "b".repeat(196));
    assert_eq!(seg201.len(), 202);
    assert_400(&node.put(&seg201, b"x"), "PUT 201-byte segment");
    let loc = node.put_ok(&seg200, b"two hundred");
    assert_eq!(
        node.get(&loc).body,
        b"two hundred",
        "200-byte segment stored and readable"
    );
    let in_dir = format!("/{}/f.txt", "d".repeat(201));
    assert_400(&node.put(&in_dir, b"x"), "PUT 201-byte directory segment");
    // Other methods: over 255 is 400, 255 is merely not found.
    let seg256 = format!("/{}", "c".repeat(256));
    let seg255 = format!("/{}", "c".repeat(255));
    assert_400(&node.get(&seg256), "GET 256-byte segment");
    assert_400(&node.delete(&seg256), "DELETE 256-byte segment");
    let r = node.get(&seg255);
    assert_eq!(
        r.status,
        404,
        "GET 255-byte segment is a valid, absent name: {}",
        r.describe()
    );
    let r = node.delete(&seg255);
    assert_eq!(r.status, 404, "DELETE 255-byte segment: {}", r.describe());
    // A segment that merely looks like a stored name (its hash is not the
    // content's) is an ordinary requested name: 203 bytes is too long.
    let look_alike = format!("/{}_1_{}", "e".repeat(160), sha1_hex(b"other"));
    assert_eq!(look_alike.len(), 204);
    assert_400(
        &node.put(&look_alike, b"x"),
        "PUT 203-byte look-alike segment",
    );
    // With the content's own hash it is kept as it is (a re-PUT).
    let own = format!("/{}_1_{}", "e".repeat(160), sha1_hex(b"x"));
    let r = node.put(&own, b"x");
    assert_eq!(r.status, 201, "PUT to a stored-form name: {}", r.describe());
    assert_eq!(r.header("location").as_deref(), Some(own.as_str()));
    // Multi-byte characters count in bytes: 101 × "é" = 202 bytes.
    let wide = format!("/{}", "%C3%A9".repeat(101));
    assert_400(
        &node.put(&wide, b"x"),
        "PUT 202-byte (101 characters) segment",
    );
    // A name over 1024 bytes, each segment short.
    let long: String = (0..8).map(|i| format!("/{}{i}", "n".repeat(149))).collect();
    assert!(long.len() > 1100);
    assert_400(&node.put(&long, b"x"), "PUT name over 1024 bytes");
    assert_400(&node.get(&long), "GET name over 1024 bytes");
    assert_400(&node.delete(&long), "DELETE name over 1024 bytes");
    assert_nothing_escaped(&node);
    assert_canary_intact(&node, &canary);
}

#[test]
fn put_below_an_existing_file_is_refused() {
    let node = Node::start(&[]);
    let canary = store_canary(&node);
    let file = node.put_ok("/f.txt", b"a file");
    let under = format!("{file}/x.txt");
    assert_400(
        &node.put(&under, b"under a file"),
        "PUT under an existing file",
    );
    let r = node.get(&under);
    assert_eq!(r.status, 404, "GET under a file: {}", r.describe());
    assert_server_header(&r, "GET under a file");
    let r = node.delete(&under);
    assert_eq!(r.status, 404, "DELETE under a file: {}", r.describe());
    assert_eq!(node.get(&file).body, b"a file", "file untouched");
    assert!(node.stored_path(&file).is_file());
    assert_canary_intact(&node, &canary);
}

#[test]
fn put_onto_an_existing_directory_is_refused() {
    let node = Node::start(&[]);
    let body = b"content whose stored name is a directory";
    let dir_name = format!("/d_1700000000_{}.txt", sha1_hex(body));
    // The API never makes a directory with a stored file's name...
    let r = node.put(&format!("{dir_name}/inner.txt"), b"inner");
    assert_refused(&r, "PUT below a directory named like a stored file");
    assert!(!node.stored_path(&dir_name).exists(), "no directory made");
    // ...but an operator may: a file placed below it by hand.
    fs::create_dir_all(node.stored_path(&dir_name)).unwrap();
    let inner_name = format!("{}_1700000000_{}.txt", "inner", sha1_hex(b"inner"));
    fs::write(node.stored_path(&dir_name).join(&inner_name), b"inner").unwrap();
    let inner = format!("{dir_name}/{inner_name}");
    assert!(node.stored_path(&dir_name).is_dir());
    let r = node.put(&dir_name, body);
    assert_refused(&r, "PUT onto an existing directory");
    assert!(node.stored_path(&dir_name).is_dir(), "directory left alone");
    assert_eq!(
        node.get(&inner).body,
        b"inner",
        "file inside the directory untouched"
    );
    let r = node.delete(&dir_name);
    assert!(
        r.status == 404 || r.status == 400 || r.status == 405,
        "DELETE of a directory: {}",
        r.describe()
    );
    assert!(
        node.stored_path(&dir_name).is_dir(),
        "DELETE must not remove a directory"
    );
    assert_eq!(node.get(&inner).body, b"inner");
    node.assert_tmp_empty_soon("after refused PUT onto a directory");
}

#[test]
fn symlinks_out_of_storage_are_not_followed() {
    let node = Node::start(&[]);
    let canary = store_canary(&node);
    let outside = tempfile::tempdir().unwrap();
    fs::write(outside.path().join("hostname"), b"secret outside").unwrap();
    std::os::unix::fs::symlink(outside.path(), node.storage().join("evil")).unwrap();
    std::os::unix::fs::symlink(
        outside.path().join("hostname"),
        node.storage().join("link.txt"),
    )
    .unwrap();
    std::os::unix::fs::symlink("/etc", node.storage().join("etc")).unwrap();

    for path in [
        "/evil/hostname",
        "/link.txt",
        "/etc/passwd",
        "/etc/hostname",
    ] {
        for method in ["GET", "HEAD"] {
            let r = node.req(method, path, &[], b"");
            assert_eq!(
                r.status,
                404,
                "{method} {path} through a symlink out of storage: {}",
                r.describe()
            );
            assert!(
                !r.text().contains("secret outside") && !r.text().contains("root:"),
                "leaked content"
            );
        }
    }
    let hostname_sha = sha1_hex(b"secret outside");
    let named = format!("/evil/h_1700000000_{hostname_sha}.txt");
    for (path, body) in [
        ("/evil/x.txt", &b"written outside?"[..]),
        ("/evil/sub/x.txt", b"written outside?"),
        (named.as_str(), b"secret outside"),
    ] {
        let r = node.put(path, body);
        assert_refused(&r, &format!("PUT {path} through a symlink"));
    }
    let r = node.delete("/evil/hostname");
    assert!(
        (400..500).contains(&r.status),
        "DELETE /evil/hostname through a symlink out of storage: {}",
        r.describe()
    );
    // Removing the links themselves would be harmless; following them is not.
    for path in ["/link.txt", "/evil"] {
        let r = node.delete(path);
        assert!(r.status < 500, "DELETE {path}: {}", r.describe());
    }

    let mut entries: Vec<String> = fs::read_dir(outside.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    entries.sort();
    assert_eq!(
        entries,
        ["hostname"],
        "nothing written in the symlink target"
    );
    assert_eq!(
        fs::read(outside.path().join("hostname")).unwrap(),
        b"secret outside",
        "target file untouched"
    );
    node.assert_tmp_empty_soon("after symlink PUTs");
    assert_canary_intact(&node, &canary);
}

#[test]
fn reserved_api_names_are_not_files() {
    let node = Node::start(&[]);
    let r = node.put("/_status", b"x");
    assert_eq!(r.status, 405, "PUT /_status: {}", r.describe());
    assert_error_body(&r, "PUT /_status");
    let r = node.delete("/_status");
    assert_eq!(r.status, 405, "DELETE /_status: {}", r.describe());
    assert!(node.stored_files().is_empty(), "{:?}", node.stored_files());
    let r = node.get("/_status");
    assert_eq!(r.status, 200);
}

#[test]
fn non_hex_sha1_header_is_400() {
    let node = Node::start(&[]);
    let canary = store_canary(&node);
    for value in ["xyz", &"Z".repeat(40), &format!("{}0", sha1_hex(b"a"))] {
        let r = node.req("PUT", "/h.txt", &[("X-Content-SHA1", value)], b"a");
        assert_400(&r, &format!("X-Content-SHA1: {value:?}"));
    }
    // Repeated with two hashes, the right one first: which would count?
    let (right, wrong) = (sha1_hex(b"a"), sha1_hex(b"b"));
    let r = node.req(
        "PUT",
        "/h.txt",
        &[("X-Content-SHA1", &right), ("X-Content-SHA1", &wrong)],
        b"a",
    );
    assert_400(&r, "two different X-Content-SHA1 lines");
    assert_eq!(node.stored_files().len(), 1, "{:?}", node.stored_files());
    // The same hash twice (in either case) is one hash.
    let r = node.req(
        "PUT",
        "/h.txt",
        &[
            ("X-Content-SHA1", &right),
            ("X-Content-SHA1", &right.to_uppercase()),
        ],
        b"a",
    );
    assert_eq!(r.status, 201, "{}", r.describe());
    assert_canary_intact(&node, &canary);
}

#[test]
fn huge_headers_get_431() {
    let node = Node::start(&[]);
    let canary = store_canary(&node);
    let big = "a".repeat(20 * 1024);
    let req = format!(
        "GET {} HTTP/1.1\r\nHost: x\r\nX-Big: {big}\r\nConnection: close\r\n\r\n",
        canary.location
    );
    let one_big = raw(node.port(), req.as_bytes());
    assert_eq!(
        one_big.status,
        431,
        "one 20 KiB header: {}",
        one_big.describe()
    );
    // Many small headers adding up to 20 KiB.
    let mut req = String::from("PUT /many.txt HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n");
    for i in 0..400 {
        req.push_str(&format!("X-H{i}: {}\r\n", "b".repeat(45)));
    }
    req.push_str("Connection: close\r\n\r\nx");
    let many = raw(node.port(), req.as_bytes());
    assert_eq!(
        many.status,
        431,
        "400 headers, ~20 KiB: {}",
        many.describe()
    );
    // 8 KiB of headers is fine.
    let ok = "c".repeat(8 * 1024);
    let r = node.req("GET", &canary.location, &[("X-Ok", &ok)], b"");
    assert_eq!(
        r.status,
        200,
        "8 KiB of headers is allowed: {}",
        r.describe()
    );
    assert_eq!(node.stored_files().len(), 1, "{:?}", node.stored_files());
    assert_canary_intact(&node, &canary);
    // Like every response, a 431 names the server and says what was wrong,
    // also when the HTTP layer refuses the head before the server sees it:
    // more than 100 header fields (hyper's parse table), or a head far over
    // the limit.
    assert_error_body(&one_big, "431 for one 20 KiB header");
    assert_error_body(&many, "431 for 400 headers");
    let huge = format!(
        "GET {} HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\nConnection: close\r\n\r\n",
        canary.location,
        "d".repeat(200 * 1024)
    );
    let huge = raw(node.port(), huge.as_bytes());
    assert_eq!(huge.status, 431, "one 200 KiB header: {}", huge.describe());
    assert_error_body(&huge, "431 for one 200 KiB header");
    assert_canary_intact(&node, &canary);
}

#[test]
fn slow_headers_are_cut() {
    let node = Node::start(&["--header-timeout", "1"]);
    let mut conn = Conn::open(node.port());
    conn.send(b"GET /_status HTTP/1.1\r\nHost: x\r\n").unwrap();
    let start = Instant::now();
    let closed = conn.wait_closed(Duration::from_secs(10)).expect("read");
    let elapsed = start.elapsed();
    assert!(
        closed,
        "connection with unfinished headers still open after 10 s (--header-timeout 1)"
    );
    assert!(
        elapsed >= Duration::from_millis(800),
        "closed after {elapsed:?}, too early"
    );
    let text = String::from_utf8_lossy(conn.buffered()).into_owned();
    assert!(
        text.is_empty() || text.starts_with("HTTP/1.1 408"),
        "only a 408 (or nothing) may be sent on a header timeout, got {text:?}"
    );
    // A client that never sends anything is cut too.
    let mut idle = Conn::open(node.port());
    assert!(
        idle.wait_closed(Duration::from_secs(10)).expect("read"),
        "idle connection not closed"
    );
    assert_eq!(node.get("/_status").status, 200, "node still serving");
}

#[test]
fn garbage_requests_are_4xx() {
    let node = Node::start(&[]);
    let canary = store_canary(&node);
    let cases: &[&[u8]] = &[
        b"PUT /x.txt HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\nConnection: close\r\n\r\nabc",
        b"PUT /x.txt HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 4\r\nConnection: close\r\n\r\nabcd",
        b"PUT /x.txt HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
        b"GET x.txt HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        // The asterisk form names no file.
        b"PUT * HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nConnection: close\r\n\r\nabc",
        b"GARBAGE\r\n\r\n",
        b"PUT /x.txt HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\nConnection: close\r\n\r\nabc",
    ];
    for req in cases {
        match try_raw(node.port(), req) {
            Ok(r) => {
                assert!(
                    (400..500).contains(&r.status),
                    "malformed request {:?}: expected 4xx, got {}",
                    String::from_utf8_lossy(req),
                    r.describe()
                );
                // Also when the HTTP layer answers by itself.
                assert_error_body(&r, &format!("{:?}", String::from_utf8_lossy(req)));
            }
            Err(e) => assert!(
                matches!(
                    e.kind(),
                    std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset
                ),
                "malformed request {:?}: {e}",
                String::from_utf8_lossy(req)
            ),
        }
    }
    assert_eq!(
        node.stored_files().len(),
        1,
        "nothing stored: {:?}",
        node.stored_files()
    );
    node.assert_tmp_empty_soon("after malformed uploads");
    assert_canary_intact(&node, &canary);
}

fn check_token_protection(node: &Node, secret: &str) {
    let body = b"protected upload";
    let bearer = format!("Bearer {secret}");
    let wrong = format!("Bearer {secret}x");
    for auth in [
        None,
        Some(wrong.as_str()),
        Some("Basic dXNlcjpwYXNz"),
        Some(secret),
    ] {
        let headers: Vec<(&str, &str)> = auth.iter().map(|a| ("Authorization", *a)).collect();
        let r = node.req("PUT", "/p.txt", &headers, body);
        assert_eq!(
            r.status,
            401,
            "PUT with Authorization {auth:?}: {}",
            r.describe()
        );
        assert_error_body(&r, "401");
    }
    assert!(
        node.stored_files().is_empty(),
        "401 stores nothing: {:?}",
        node.stored_files()
    );
    let r = node.req("PUT", "/p.txt", &[("Authorization", &bearer)], body);
    assert_eq!(r.status, 201, "PUT with the token: {}", r.describe());
    let loc = r.header("location").unwrap();
    let r = node.get(&loc);
    assert_eq!(r.status, 200, "reads stay public: {}", r.describe());
    assert_eq!(r.body, body);
    assert_eq!(node.head(&loc).status, 200, "HEAD stays public");
    assert_eq!(node.get("/_status").status, 200, "status stays public");
    let r = node.req("DELETE", &loc, &[("Authorization", &wrong)], b"");
    assert_eq!(r.status, 401, "DELETE with a wrong token: {}", r.describe());
    let r = node.delete(&loc);
    assert_eq!(r.status, 401, "DELETE without a token: {}", r.describe());
    assert_eq!(node.get(&loc).status, 200, "refused DELETE removed nothing");
    let r = node.req("DELETE", &loc, &[("Authorization", &bearer)], b"");
    assert_eq!(r.status, 200, "DELETE with the token: {}", r.describe());
}

#[test]
fn token_protects_put_and_delete() {
    let node = Node::start(&["--token", "s3cret-token"]);
    check_token_protection(&node, "s3cret-token");
}

#[test]
fn token_from_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("token");
    fs::write(&path, "file-token-123\n").unwrap();
    let node = Node::start(&["--token-file", path.to_str().unwrap()]);
    check_token_protection(&node, "file-token-123");
}

/// Stored bytes are served as they are, even when they look like the bare
/// error answer the HTTP layer writes for an unparseable request (which the
/// connection gives our Server header and a reason before the first
/// request is served).
#[test]
fn stored_bytes_that_look_like_an_error_answer_are_served_as_stored() {
    let node = Node::start(&[]);
    let bare = b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n";
    // Over 128 KiB, so streamed from disk in chunks: the whole file, and
    // a file holding such an answer in its middle.
    let mut whole = b"HTTP/1.1 400 Bad Request\r\nx-pad: ".to_vec();
    whole.extend(std::iter::repeat_n(b'a', 200 * 1024));
    whole.extend_from_slice(b"\r\ncontent-length: 0\r\n\r\n");
    let mut middle = Rng::new(7).bytes(300 * 1024);
    let at = 150_000;
    middle[at..at + bare.len()].copy_from_slice(bare);
    for (what, body, range) in [
        ("whole file", &whole, None),
        (
            "a range of the file",
            &middle,
            Some((at, at + bare.len() - 1)),
        ),
    ] {
        let loc = node.put_ok(&format!("/look-alike-{}.bin", body.len()), body);
        let range_header = range.map(|(a, b)| format!("Range: bytes={a}-{b}\r\n"));
        let req = format!(
            "GET {loc} HTTP/1.1\r\nHost: x\r\n{}\r\nGET /_status HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            range_header.unwrap_or_default()
        );
        let mut conn = Conn::open(node.port());
        conn.send(req.as_bytes()).unwrap();
        let r = conn.read_response(false).expect("the file");
        let want: &[u8] = match range {
            Some((a, b)) => &body[a..=b],
            None => body,
        };
        assert_eq!(r.status, if range.is_some() { 206 } else { 200 }, "{what}");
        assert!(r.body == want, "{what}: the bytes changed on the way");
        // The next answer on the connection is the real one.
        let next = conn.read_response(false).expect("the pipelined /_status");
        assert_eq!(next.status, 200, "{what}: {}", next.describe());
        assert!(
            next.text().contains("\"queues\""),
            "{what}: {}",
            next.describe()
        );
        assert!(
            conn.wait_closed(Duration::from_secs(10)).unwrap(),
            "{what}: closed"
        );
        assert!(
            conn.buffered().is_empty(),
            "{what}: nothing after the last answer"
        );
    }
}

/// A request line that cannot be parsed, sent as a HEAD, gets the status
/// and our headers but no body (HEAD answers have none).
#[test]
fn an_unparseable_head_request_gets_no_body() {
    let node = Node::start(&[]);
    let mut conn = Conn::open(node.port());
    conn.send(b"HEAD /x HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n")
        .unwrap();
    let r = conn.read_response(true).expect("an answer");
    assert_eq!(r.status, 400, "{}", r.describe());
    assert_server_header(&r, "400 to HEAD");
    assert!(conn.wait_closed(Duration::from_secs(10)).unwrap());
    assert!(
        conn.buffered().is_empty(),
        "no body after a HEAD answer: {:?}",
        String::from_utf8_lossy(conn.buffered())
    );
}

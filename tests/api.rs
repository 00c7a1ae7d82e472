//! SPEC "Stored names" and "HTTP API (one node)", black-box against the binary.

mod common;

use std::fs;
use std::time::{Duration, Instant};

use common::*;

/// PUT `path` and check the 201 and its Location against the spec's naming
/// rule: `/<expected_stem>_<now>_<sha1><expected_ext>`. Returns the Location.
fn put_new(
    node: &Node,
    path: &str,
    body: &[u8],
    expected_stem: &str,
    expected_ext: &str,
) -> String {
    let before = unix_now();
    let resp = node.put(path, body);
    let after = unix_now();
    assert_eq!(
        resp.status,
        201,
        "PUT {path}: expected 201 Created, got {}",
        resp.describe()
    );
    assert_server_header(&resp, "PUT 201");
    let location = resp
        .header("location")
        .unwrap_or_else(|| panic!("PUT {path}: 201 without Location: {}", resp.describe()));
    let decoded = String::from_utf8(percent_decode(&location)).expect("Location decodes to UTF-8");
    let (stem, secs, sha, ext) = split_stored_name(&decoded).unwrap_or_else(|| {
        panic!("PUT {path}: Location {location:?} is not /<stem>_<secs>_<sha1><ext>")
    });
    assert_eq!(
        stem, expected_stem,
        "PUT {path}: stem of Location {location:?}"
    );
    assert_eq!(
        ext, expected_ext,
        "PUT {path}: extension of Location {location:?}"
    );
    assert_eq!(
        sha,
        sha1_hex(body),
        "PUT {path}: Location {location:?} must carry the body's SHA1 (lower-case hex)"
    );
    assert!(
        secs + 2 >= before && secs <= after + 2,
        "PUT {path}: Location {location:?} has time {secs}, expected about now ({before}..{after})"
    );
    location
}

#[test]
fn put_returns_201_with_generated_location_and_stores_file() {
    let node = Node::start(&[]);
    let body = b"hello world\n";
    let loc = put_new(&node, "/hello.txt", body, "hello", ".txt");
    // The file is a plain file in the storage dir under its stored name.
    let on_disk = fs::read(node.stored_path(&loc)).unwrap_or_else(|e| {
        panic!(
            "stored file for {loc} not on disk at {:?}: {e}",
            node.stored_path(&loc)
        )
    });
    assert_eq!(on_disk, body, "file on disk has the uploaded content");
    assert_eq!(
        node.stored_files().len(),
        1,
        "exactly one file stored: {:?}",
        node.stored_files()
    );
    let get = node.get(&loc);
    assert_eq!(get.status, 200, "GET {loc}: {}", get.describe());
    assert_eq!(get.body, body, "GET {loc} returns the uploaded bytes");
}

#[test]
fn stored_name_extension_rules() {
    let node = Node::start(&[]);
    put_new(&node, "/x.tar.gz", b"tarball", "x.tar", ".gz");
    put_new(&node, "/README", b"no extension", "README", "");
    put_new(
        &node,
        "/dir.d/file",
        b"dot in directory only",
        "dir.d/file",
        "",
    );
    put_new(
        &node,
        "/sub/dir/photo.JPG",
        b"jpeg-ish",
        "sub/dir/photo",
        ".JPG",
    );
}

#[test]
fn reput_to_location_is_302_and_stores_nothing_new() {
    let node = Node::start(&[]);
    let body = b"idempotent content";
    let loc = put_new(&node, "/same.txt", body, "same", ".txt");
    let files_before = node.stored_files();
    let resp = node.put(&loc, body);
    assert_eq!(
        resp.status,
        302,
        "re-PUT of the same content to {loc}: {}",
        resp.describe()
    );
    assert_eq!(
        resp.header("location").as_deref(),
        Some(loc.as_str()),
        "302 keeps the same Location"
    );
    assert_server_header(&resp, "PUT 302");
    assert_eq!(
        node.stored_files(),
        files_before,
        "a 302 must not store another file"
    );
}

#[test]
fn put_to_name_with_matching_suffix_keeps_name() {
    // This is how a neighbour's copy arrives: the stored name is kept.
    let node = Node::start(&[]);
    let body = b"replicated from elsewhere";
    let name = format!("/photo_1234567890_{}.jpg", sha1_hex(body));
    let resp = node.put(&name, body);
    assert_eq!(resp.status, 201, "PUT {name}: {}", resp.describe());
    assert_eq!(
        resp.header("location").as_deref(),
        Some(name.as_str()),
        "name with _<digits>_<sha1> kept"
    );
    assert_eq!(node.get(&name).body, body);
    let again = node.put(&name, body);
    assert_eq!(again.status, 302, "second PUT {name}: {}", again.describe());
}

#[test]
fn put_other_content_to_location_gets_a_new_name() {
    let node = Node::start(&[]);
    let a = b"first content";
    let b = b"second content";
    let loc = put_new(&node, "/doc.txt", a, "doc", ".txt");
    let decoded = String::from_utf8(percent_decode(&loc)).unwrap();
    let stem = decoded
        .strip_suffix(".txt")
        .unwrap()
        .trim_start_matches('/');
    let loc2 = put_new(&node, &loc, b, stem, ".txt");
    assert_ne!(loc, loc2);
    assert_eq!(node.get(&loc).body, a, "first file unchanged");
    assert_eq!(
        node.get(&loc2).body,
        b,
        "second file stored under its own name"
    );
}

#[test]
fn x_content_sha1_checked() {
    let node = Node::start(&[]);
    let body = b"checked body";
    let sha = sha1_hex(body);
    let r = node.req("PUT", "/c.txt", &[("X-Content-SHA1", &sha)], body);
    assert_eq!(
        r.status,
        201,
        "correct lower-case X-Content-SHA1: {}",
        r.describe()
    );
    let body2 = b"checked body, upper-case header";
    let upper = sha1_hex(body2).to_ascii_uppercase();
    let r = node.req("PUT", "/c2.txt", &[("X-Content-SHA1", &upper)], body2);
    assert_eq!(
        r.status,
        201,
        "correct upper-case X-Content-SHA1: {}",
        r.describe()
    );
    assert!(
        r.header("location").unwrap().contains(&sha1_hex(body2)),
        "Location uses lower-case hex: {}",
        r.describe()
    );
}

#[test]
fn wrong_or_invalid_x_content_sha1_is_400_and_stores_nothing() {
    let node = Node::start(&[]);
    let body = b"some body";
    let wrong = sha1_hex(b"other body");
    for value in [
        wrong.as_str(),
        "zz",
        "not-a-sha1-at-all",
        &"g".repeat(40),
        &sha1_hex(body)[..39],
    ] {
        let r = node.req("PUT", "/w.txt", &[("X-Content-SHA1", value)], body);
        assert_eq!(r.status, 400, "X-Content-SHA1: {value:?}: {}", r.describe());
        assert_error_body(&r, &format!("PUT with X-Content-SHA1 {value:?}"));
    }
    assert!(
        node.stored_files().is_empty(),
        "nothing stored after 400s: {:?}",
        node.stored_files()
    );
    node.assert_tmp_empty_soon("after X-Content-SHA1 mismatches");
}

#[test]
fn get_returns_body_and_headers() {
    let node = Node::start(&[]);
    let body = b"plain text body";
    let sha = sha1_hex(body);
    let loc = node.put_ok("/t.txt", body);
    let r = node.get(&loc);
    assert_eq!(r.status, 200, "GET {loc}: {}", r.describe());
    assert_eq!(r.body, body);
    assert_eq!(
        r.header("content-type").as_deref(),
        Some("text/plain"),
        "{}",
        r.describe()
    );
    assert_eq!(
        r.header("content-length").as_deref(),
        Some(body.len().to_string().as_str())
    );
    assert_eq!(
        r.header("etag"),
        Some(format!("\"{sha}\"")),
        "ETag is the SHA1 in quotes"
    );
    assert_eq!(r.header("cache-control").as_deref(), Some(CACHE_CONTROL));
    assert_eq!(
        r.header("x-content-sha1").map(|s| s.to_ascii_lowercase()),
        Some(sha.clone()),
        "X-Content-SHA1 header"
    );
    let lm = r
        .header("last-modified")
        .unwrap_or_else(|| panic!("no Last-Modified: {}", r.describe()));
    let lm_time = httpdate::parse_http_date(&lm)
        .unwrap_or_else(|e| panic!("Last-Modified {lm:?} is not an HTTP date: {e}"));
    let lm_secs = lm_time
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(
        lm_secs.abs_diff(unix_now()) < 120,
        "Last-Modified {lm} should be about now"
    );
    let named_secs: u64 = loc
        .rsplit('_')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no upload time in {loc}"));
    assert_eq!(
        lm_secs, named_secs,
        "Last-Modified is the upload time in the stored name (the same on every node)"
    );
    assert_server_header(&r, "GET 200");
}

#[test]
fn content_type_by_extension_without_charset() {
    let node = Node::start(&[]);
    let cases = [
        ("/a.txt", "text/plain"),
        ("/a.png", "image/png"),
        ("/a.html", "text/html"),
        ("/a.json", "application/json"),
        ("/a.qqqzzz", "application/octet-stream"),
        ("/noext", "application/octet-stream"),
    ];
    for (i, (path, ct)) in cases.iter().enumerate() {
        let loc = node.put_ok(path, format!("content {i}").as_bytes());
        let r = node.get(&loc);
        assert_eq!(r.status, 200, "GET {loc}: {}", r.describe());
        assert_eq!(
            r.header("content-type").as_deref(),
            Some(*ct),
            "Content-Type for {path}: {}",
            r.describe()
        );
        let h = node.head(&loc);
        assert_eq!(
            h.header("content-type").as_deref(),
            Some(*ct),
            "HEAD Content-Type for {path}"
        );
    }
}

#[test]
fn head_has_get_headers_and_no_body() {
    let node = Node::start(&[]);
    let body = Rng::new(7).bytes(5000);
    let loc = node.put_ok("/h.bin", &body);
    let g = node.get(&loc);
    let h = node.head(&loc);
    assert_eq!(h.status, 200, "HEAD {loc}: {}", h.describe());
    assert!(
        h.body.is_empty(),
        "HEAD must not send a body, got {} bytes",
        h.body.len()
    );
    for name in [
        "content-type",
        "content-length",
        "etag",
        "cache-control",
        "x-content-sha1",
        "last-modified",
    ] {
        assert!(
            g.header(name).is_some(),
            "GET lacks {name}: {}",
            g.describe()
        );
        assert_eq!(
            h.header(name),
            g.header(name),
            "HEAD and GET differ in {name}"
        );
    }
    assert_eq!(h.header("content-length").as_deref(), Some("5000"));
    assert_server_header(&h, "HEAD 200");
    let missing = node.head("/missing.txt");
    assert_eq!(missing.status, 404, "HEAD missing: {}", missing.describe());
    assert!(missing.body.is_empty(), "HEAD 404 without body");
    assert_server_header(&missing, "HEAD 404");
}

#[test]
fn if_none_match() {
    let node = Node::start(&[]);
    let body = b"cache me";
    let sha = sha1_hex(body);
    let loc = node.put_ok("/cache.txt", body);
    let etag = format!("\"{sha}\"");
    let matching = [
        etag.clone(),
        format!("\"0000\", {etag}"),
        format!("\"0000\",{etag} , \"1111\""),
        "*".to_string(),
        format!("W/{etag}"),
    ];
    for value in &matching {
        for method in ["GET", "HEAD"] {
            let r = node.req(method, &loc, &[("If-None-Match", value)], b"");
            assert_eq!(
                r.status,
                304,
                "{method} with If-None-Match: {value}: {}",
                r.describe()
            );
            assert_eq!(r.header("etag"), Some(etag.clone()), "304 carries ETag");
            assert_eq!(
                r.header("cache-control").as_deref(),
                Some(CACHE_CONTROL),
                "304 carries Cache-Control"
            );
            assert!(r.body.is_empty(), "304 has no body, got {:?}", r.text());
            assert_server_header(&r, "304");
            // RFC 9110 §8.6: absent, or the length a 200 would have.
            let len = r.header("content-length");
            assert!(
                len.is_none() || len.as_deref() == Some(body.len().to_string().as_str()),
                "{method} 304 with Content-Length {len:?}"
            );
        }
    }
    for value in [
        "\"0000\"",
        &format!("\"{}\"", sha1_hex(b"other")),
        "W/\"abc\", \"def\"",
    ] {
        let r = node.req("GET", &loc, &[("If-None-Match", value)], b"");
        assert_eq!(
            r.status,
            200,
            "non-matching If-None-Match: {value}: {}",
            r.describe()
        );
        assert_eq!(r.body, body);
    }
    // The same list split over several header lines (RFC 9110 §5.3).
    let r = node.req(
        "GET",
        &loc,
        &[("If-None-Match", "\"0000\""), ("If-None-Match", &etag)],
        b"",
    );
    assert_eq!(r.status, 304, "match on a second line: {}", r.describe());
    let r = node.req(
        "GET",
        &loc,
        &[("If-None-Match", "\"0000\""), ("If-None-Match", "\"1111\"")],
        b"",
    );
    assert_eq!(r.status, 200, "no match on any line: {}", r.describe());
    assert_eq!(r.body, body);
}

/// The parts of a `multipart/byteranges` body: (Content-Range, bytes).
fn byteranges(r: &Response) -> Vec<(String, Vec<u8>)> {
    let ct = r.header("content-type").unwrap_or_default();
    let boundary = ct
        .strip_prefix("multipart/byteranges; boundary=")
        .unwrap_or_else(|| panic!("not multipart/byteranges: {}", r.describe()));
    let delimiter = format!("\r\n--{boundary}");
    let text = &r.body;
    let find = |from: usize, what: &[u8]| {
        text[from..]
            .windows(what.len())
            .position(|w| w == what)
            .map(|p| p + from)
    };
    let mut parts = Vec::new();
    let mut at = find(0, delimiter.as_bytes()).expect("first delimiter");
    assert_eq!(at, 0, "the body starts with its first delimiter");
    loop {
        at += delimiter.len();
        if text[at..].starts_with(b"--\r\n") {
            assert_eq!(at + 4, text.len(), "nothing after the closing delimiter");
            return parts;
        }
        let head_end = find(at, b"\r\n\r\n").expect("part head");
        let head = String::from_utf8_lossy(&text[at..head_end]).into_owned();
        let range = head
            .lines()
            .find_map(|l| l.strip_prefix("Content-Range: "))
            .unwrap_or_else(|| panic!("part without Content-Range: {head:?}"))
            .to_string();
        let next = find(head_end + 4, delimiter.as_bytes()).expect("next delimiter");
        parts.push((range, text[head_end + 4..next].to_vec()));
        at = next;
    }
}

#[test]
fn ranges_far_apart_come_as_multipart_byteranges() {
    let node = Node::start(&[]);
    // A small file (answered from memory) and one streamed from disk.
    for size in [1000usize, 300 * 1024] {
        let body = Rng::new(size as u64).bytes(size);
        let loc = node.put_ok(&format!("/parts-{size}.bin"), &body);
        let last = size - 1;
        let r = node.req("GET", &loc, &[("Range", "bytes=500-509,0-1,-3,2-4")], b"");
        assert_eq!(r.status, 206, "{}", r.describe());
        assert_eq!(r.header("content-length"), Some(r.body.len().to_string()));
        assert!(r.header("content-range").is_none(), "{}", r.describe());
        let parts = byteranges(&r);
        // In the header's order; 0-1 and 2-4 coalesced where 0-1 was.
        let want: Vec<(String, Vec<u8>)> = vec![
            (format!("bytes 500-509/{size}"), body[500..510].to_vec()),
            (format!("bytes 0-4/{size}"), body[0..5].to_vec()),
            (
                format!("bytes {}-{last}/{size}", size - 3),
                body[size - 3..].to_vec(),
            ),
        ];
        assert_eq!(parts, want, "size {size}");
        // HEAD ignores Range, as RFC 9110 says.
        let r = node.req("HEAD", &loc, &[("Range", "bytes=0-1,500-509")], b"");
        assert_eq!(r.status, 200, "{}", r.describe());
    }
}

#[test]
fn range_requests() {
    let node = Node::start(&[]);
    let body = b"0123456789";
    let loc = node.put_ok("/r.txt", body);
    for (range, content_range, expect) in [
        ("bytes=0-3", "bytes 0-3/10", &b"0123"[..]),
        ("bytes=5-", "bytes 5-9/10", b"56789"),
        ("bytes=-4", "bytes 6-9/10", b"6789"),
        ("bytes=9-9", "bytes 9-9/10", b"9"),
        ("bytes=8-100", "bytes 8-9/10", b"89"),
        // Several ranges close together come as one part covering them.
        ("bytes=0-1,3-4", "bytes 0-4/10", b"01234"),
    ] {
        let r = node.req("GET", &loc, &[("Range", range)], b"");
        assert_eq!(r.status, 206, "Range: {range}: {}", r.describe());
        assert_eq!(
            r.header("content-range").as_deref(),
            Some(content_range),
            "Content-Range for {range}"
        );
        assert_eq!(r.body, expect, "bytes for Range: {range}");
        assert_eq!(
            r.header("content-length"),
            Some(expect.len().to_string()),
            "Content-Length for {range}"
        );
        assert_server_header(&r, "206");
    }
    for range in ["bytes=1000-", "bytes=10-20"] {
        let r = node.req("GET", &loc, &[("Range", range)], b"");
        assert_eq!(
            r.status,
            416,
            "unsatisfiable Range: {range}: {}",
            r.describe()
        );
        assert_eq!(
            r.header("content-range").as_deref(),
            Some("bytes */10"),
            "416 Content-Range"
        );
        assert_server_header(&r, "416");
    }
}

#[test]
fn get_missing_and_directories_are_404() {
    let node = Node::start(&[]);
    let r = node.get("/nothing-here.txt");
    assert_eq!(r.status, 404, "GET missing: {}", r.describe());
    assert_error_body(&r, "GET missing");
    let loc = node.put_ok("/a/b/c.txt", b"deep");
    assert!(
        node.storage().join("a/b").is_dir(),
        "sub-directories a/b created on disk"
    );
    assert!(
        node.stored_path(&loc).is_file(),
        "file at {:?}",
        node.stored_path(&loc)
    );
    for dir in ["/a/b", "/a", "/a/b/"] {
        let r = node.get(dir);
        assert!(
            r.status == 404 || (dir.ends_with('/') && r.status == 400),
            "GET of directory {dir}: expected 404, got {}",
            r.describe()
        );
        assert_server_header(&r, "GET directory");
    }
    assert_eq!(node.head("/a/b").status, 404, "HEAD of a directory");
    assert_eq!(node.get(&loc).body, b"deep");
}

#[test]
fn non_ascii_name_with_space() {
    let node = Node::start(&[]);
    let body = "unicode content ✓".as_bytes();
    let resp = node.put("/h%C3%A9llo%20w%C3%B6rld.txt", body);
    assert_eq!(resp.status, 201, "PUT non-ASCII name: {}", resp.describe());
    let loc = resp.header("location").unwrap();
    assert!(
        loc.bytes().all(|b| b.is_ascii_graphic()),
        "Location must be percent-encoded (visible ASCII only), got {loc:?}"
    );
    let decoded = String::from_utf8(percent_decode(&loc)).expect("Location decodes to UTF-8");
    let (stem, _, sha, ext) =
        split_stored_name(&decoded).unwrap_or_else(|| panic!("bad Location {loc:?}"));
    assert_eq!(stem, "héllo wörld");
    assert_eq!(ext, ".txt");
    assert_eq!(sha, sha1_hex(body));
    let get = node.get(&loc);
    assert_eq!(get.status, 200, "GET {loc}: {}", get.describe());
    assert_eq!(get.body, body);
    assert!(
        node.storage()
            .join(decoded.trim_start_matches('/'))
            .is_file(),
        "stored on disk under the decoded name"
    );
}

#[test]
fn delete_then_get_404_and_delete_again_404() {
    let node = Node::start(&[]);
    let keep = node.put_ok("/a/keep.txt", b"keep");
    let loc = node.put_ok("/a/b/only.txt", b"to be deleted");
    let r = node.delete(&loc);
    assert_eq!(r.status, 200, "DELETE existing {loc}: {}", r.describe());
    assert_server_header(&r, "DELETE 200");
    assert!(!node.stored_path(&loc).exists(), "file removed from disk");
    let r = node.get(&loc);
    assert_eq!(r.status, 404, "GET after DELETE: {}", r.describe());
    let r = node.delete(&loc);
    assert_eq!(r.status, 404, "second DELETE: {}", r.describe());
    assert_server_header(&r, "DELETE 404");
    assert!(
        wait_until(Duration::from_secs(2), || !node
            .storage()
            .join("a/b")
            .exists()),
        "empty directory a/b should be removed after the delete"
    );
    assert!(
        node.storage().join("a").is_dir(),
        "a/ still holds keep.txt and must stay"
    );
    assert_eq!(node.get(&keep).body, b"keep");
}

#[test]
fn delete_removes_empty_parent_directories() {
    let node = Node::start(&[]);
    let loc = node.put_ok("/a/b/c.txt", b"nested");
    assert_eq!(node.delete(&loc).status, 200);
    assert!(
        wait_until(Duration::from_secs(2), || !node
            .storage()
            .join("a")
            .exists()),
        "a/b and a should be removed when the only file in them is deleted; storage has {:?}",
        fs::read_dir(node.storage())
            .map(|d| d.flatten().map(|e| e.file_name()).collect::<Vec<_>>())
    );
    assert!(
        node.storage().is_dir(),
        "the storage directory itself stays"
    );
}

#[test]
fn put_of_deleted_name_is_409() {
    let node = Node::start(&[]);
    let body = b"soon deleted";
    let loc = node.put_ok("/gone.txt", body);
    assert_eq!(node.delete(&loc).status, 200);
    let r = node.put(&loc, body);
    assert_eq!(
        r.status,
        409,
        "PUT of a deleted stored name: {}",
        r.describe()
    );
    assert_error_body(&r, "PUT 409");
    assert!(
        node.stored_files().is_empty(),
        "409 stores nothing: {:?}",
        node.stored_files()
    );
    assert_eq!(node.get(&loc).status, 404);
}

#[test]
fn delete_of_unknown_name_still_enters_deletion_log() {
    let node = Node::start(&[]);
    let body = b"travelling copy";
    let name = format!("/ghost_1600000000_{}.txt", sha1_hex(body));
    let r = node.delete(&name);
    assert_eq!(r.status, 404, "DELETE of unknown name: {}", r.describe());
    let r = node.put(&name, body);
    assert_eq!(
        r.status,
        409,
        "PUT of a name deleted (while absent): {}",
        r.describe()
    );
    assert!(node.stored_files().is_empty(), "{:?}", node.stored_files());
}

#[test]
fn status_endpoint() {
    let node = Node::start(&[]);
    let r = node.get("/_status");
    assert_eq!(r.status, 200, "{}", r.describe());
    assert_server_header(&r, "GET /_status");
    let json: serde_json::Value = serde_json::from_slice(&r.body)
        .unwrap_or_else(|e| panic!("/_status is not JSON ({e}): {}", r.describe()));
    assert!(
        json["queues"].is_object(),
        "/_status needs a `queues` object: {json}"
    );
    assert_eq!(
        json["queues"].as_object().unwrap().len(),
        0,
        "no neighbours, no queues: {json}"
    );
    for method in ["PUT", "DELETE"] {
        let r = node.req(method, "/_status", &[], b"x");
        assert_eq!(r.status, 405, "{method} /_status: {}", r.describe());
        assert!(
            r.header("allow").is_some(),
            "405 needs an Allow header: {}",
            r.describe()
        );
        assert_server_header(&r, "405 on /_status");
    }
    assert!(
        node.stored_files().is_empty(),
        "nothing stored by PUT /_status"
    );
}

#[test]
fn status_lists_neighbour_queues() {
    // The node's own URL in the --node list is skipped.
    // A neighbour that accepts connections (into the backlog) but never
    // answers: the operation cannot be accepted, so it stays queued.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    // Given with a trailing slash: /_status names it exactly so.
    let dead = format!("http://127.0.0.1:{}/", silent.local_addr().unwrap().port());
    let node = Node::start(&[
        "--url",
        "http://127.0.0.1:{port}",
        "--node",
        "http://127.0.0.1:{port}",
        "--node",
        &dead,
    ]);
    for i in 0..20 {
        node.put_ok(&format!("/q{i}.txt"), format!("queued {i}").as_bytes());
    }
    assert_eq!(node.delete("/q_1_0000.txt").status, 404);
    let r = node.get("/_status");
    assert_eq!(r.status, 200, "{}", r.describe());
    let json: serde_json::Value = serde_json::from_slice(&r.body).expect("JSON");
    let queues = json["queues"]
        .as_object()
        .unwrap_or_else(|| panic!("no queues object: {json}"));
    assert_eq!(queues.len(), 1, "one neighbour (self skipped): {json}");
    let (key, q) = queues.iter().next().unwrap();
    assert_eq!(
        key, &dead,
        "queue keyed by the neighbour URL as given: {json}"
    );
    assert!(
        q["length"].as_u64() == Some(21),
        "a neighbour that never answers has accepted nothing: all 20 PUTs and the DELETE stay queued: {json}"
    );
    drop(silent);
}

#[test]
fn other_methods_are_405_with_allow() {
    let node = Node::start(&[]);
    let loc = node.put_ok("/m.txt", b"methods");
    for method in ["POST", "PATCH"] {
        for path in [loc.as_str(), "/not-there.txt"] {
            let r = node.req(method, path, &[], b"data");
            assert_eq!(r.status, 405, "{method} {path}: {}", r.describe());
            let allow = r
                .header("allow")
                .unwrap_or_else(|| panic!("405 without Allow: {}", r.describe()));
            for m in ["GET", "PUT", "DELETE"] {
                assert!(allow.contains(m), "Allow {allow:?} should list {m}");
            }
            assert!(
                !allow.contains(method),
                "Allow {allow:?} must not list {method}"
            );
            assert_error_body(&r, "405");
        }
    }
    assert_eq!(
        node.get(&loc).body,
        b"methods",
        "file untouched by POST/PATCH"
    );
}

#[test]
fn empty_body_put() {
    let node = Node::start(&[]);
    let loc = put_new(&node, "/empty.txt", b"", "empty", ".txt");
    assert!(loc.contains(EMPTY_SHA1));
    let r = node.get(&loc);
    assert_eq!(r.status, 200, "{}", r.describe());
    assert_eq!(r.header("content-length").as_deref(), Some("0"));
    assert!(r.body.is_empty());
    assert_eq!(fs::metadata(node.stored_path(&loc)).unwrap().len(), 0);
}

#[test]
fn expect_100_continue() {
    let node = Node::start(&[]);
    let body = Rng::new(100).bytes(3000);
    let mut conn = Conn::open(node.port());
    conn.set_read_timeout(Duration::from_secs(10));
    let head = build_head(
        node.port(),
        "PUT",
        "/cont.bin",
        &[("Expect", "100-continue")],
        Some(body.len()),
    );
    conn.send(&head).unwrap();
    let interim = conn
        .read_head()
        .unwrap_or_else(|e| panic!("no `HTTP/1.1 100 Continue` before sending the body: {e}"));
    assert_eq!(
        interim.status, 100,
        "expected 100 Continue first, got {interim:?}"
    );
    conn.send(&body).unwrap();
    let resp = conn.read_response(false).expect("final response");
    assert_eq!(resp.status, 201, "after 100 Continue: {}", resp.describe());
    let loc = resp.header("location").unwrap();
    assert!(loc.contains(&sha1_hex(&body)));
    assert_eq!(node.get(&loc).body, body);
}

#[test]
fn chunked_upload() {
    let node = Node::start(&[]);
    let big = Rng::new(5).bytes(100_000);
    let chunks: [&[u8]; 4] = [b"hello ", b"chunked ", b"world", &big];
    let all: Vec<u8> = chunks.concat();
    let r = request_chunked(node.port(), "PUT", "/chunky.bin", &[], &chunks);
    assert_eq!(r.status, 201, "chunked PUT: {}", r.describe());
    let loc = r.header("location").unwrap();
    assert!(
        loc.contains(&sha1_hex(&all)),
        "Location {loc} has the SHA1 of the whole body"
    );
    let g = node.get(&loc);
    assert_eq!(g.status, 200);
    assert_eq!(
        sha1_hex(&g.body),
        sha1_hex(&all),
        "chunked upload stored completely"
    );
    // With a matching X-Content-SHA1 too.
    let body = b"chunked and checked";
    let r = request_chunked(
        node.port(),
        "PUT",
        "/cc.txt",
        &[("X-Content-SHA1", &sha1_hex(body))],
        &[&body[..5], &body[5..]],
    );
    assert_eq!(
        r.status,
        201,
        "chunked PUT with X-Content-SHA1: {}",
        r.describe()
    );
}

#[test]
fn max_size_413() {
    let node = Node::start(&["--max-size", "1K"]);
    let ok = Rng::new(1).bytes(1024);
    let loc = node.put_ok("/fits.bin", &ok);
    for n in [1025usize, 2000] {
        let body = Rng::new(n as u64).bytes(n);
        let r = node.put("/big.bin", &body);
        assert_eq!(
            r.status,
            413,
            "{n}-byte PUT with --max-size 1K: {}",
            r.describe()
        );
        assert_error_body(&r, "413");
    }
    let body = Rng::new(9).bytes(2000);
    let chunks: Vec<&[u8]> = body.chunks(500).collect();
    let r = request_chunked(node.port(), "PUT", "/bigchunked.bin", &[], &chunks);
    assert_eq!(
        r.status,
        413,
        "2000-byte chunked PUT with --max-size 1K: {}",
        r.describe()
    );
    assert_eq!(
        node.stored_files(),
        vec![loc.trim_start_matches('/').to_string()],
        "only the 1024-byte file is stored"
    );
    node.assert_tmp_empty_soon("after 413s");
}

#[test]
fn stalled_body_gets_408_and_leaves_nothing() {
    let node = Node::start(&["--read-timeout", "1"]);
    let mut conn = Conn::open(node.port());
    let head = build_head(node.port(), "PUT", "/stall.bin", &[], Some(100_000));
    conn.send(&head).unwrap();
    conn.send(&Rng::new(3).bytes(1000)).unwrap();
    let start = Instant::now();
    conn.set_read_timeout(Duration::from_secs(15));
    let outcome = conn.read_response(false);
    let elapsed = start.elapsed();
    match &outcome {
        Ok(r) => assert_eq!(
            r.status,
            408,
            "stalled body: expected 408, got {}",
            r.describe()
        ),
        Err(e) => assert!(
            conn.buffered().is_empty()
                && matches!(
                    e.kind(),
                    std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset
                ),
            "stalled body: expected 408 or a closed connection, got {e}"
        ),
    }
    assert!(
        elapsed >= Duration::from_millis(800),
        "answered after {elapsed:?}, before the 1 s read timeout could have passed: {outcome:?}"
    );
    assert!(
        elapsed < Duration::from_secs(10),
        "took {elapsed:?} to give up on a stalled body"
    );
    assert!(
        node.stored_files().is_empty(),
        "nothing stored: {:?}",
        node.stored_files()
    );
    node.assert_tmp_empty_soon("after a stalled upload");
    // The node still works.
    node.put_ok("/after.txt", b"still alive");
}

#[test]
fn slow_but_steady_body_is_not_cut() {
    // The read timeout is about progress, not total duration.
    let node = Node::start(&["--read-timeout", "1"]);
    let body = b"0123456789";
    let mut conn = Conn::open(node.port());
    conn.send(&build_head(
        node.port(),
        "PUT",
        "/slow.txt",
        &[],
        Some(body.len()),
    ))
    .unwrap();
    for b in body {
        std::thread::sleep(Duration::from_millis(300));
        conn.send(&[*b])
            .expect("server closed a connection that was making progress");
    }
    let r = conn.read_response(false).expect("response");
    assert_eq!(
        r.status,
        201,
        "3 s upload with progress every 0.3 s and --read-timeout 1: {}",
        r.describe()
    );
    assert_eq!(node.get(&r.header("location").unwrap()).body, body);
}

#[test]
fn client_disconnect_mid_body_leaves_nothing() {
    let node = Node::start(&[]);
    let mut conn = Conn::open(node.port());
    let head = build_head(node.port(), "PUT", "/cut/off.bin", &[], Some(1_000_000));
    conn.send(&head).unwrap();
    conn.send(&Rng::new(11).bytes(300_000)).unwrap();
    conn.stream.shutdown(std::net::Shutdown::Both).unwrap();
    drop(conn);
    node.assert_tmp_empty_soon("after a client hung up mid-body");
    assert!(
        node.stored_files().is_empty(),
        "a cut-off upload must not be stored: {:?}",
        node.stored_files()
    );
    assert_eq!(node.get("/_status").status, 200, "node still serving");
    node.put_ok("/cut/off.bin", b"complete this time");
}

#[test]
fn concurrent_puts_of_the_same_name() {
    let node = Node::start(&[]);
    let body = Rng::new(21).bytes(300_000);
    let name = format!("/race_1700000000_{}.bin", sha1_hex(&body));
    let port = node.port();
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let body = body.clone();
            let name = name.clone();
            std::thread::spawn(move || request(port, "PUT", &name, &[], &body))
        })
        .collect();
    let responses: Vec<Response> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let created = responses.iter().filter(|r| r.status == 201).count();
    let existing = responses.iter().filter(|r| r.status == 302).count();
    assert!(
        created == 1 && existing == 7,
        "8 concurrent PUTs of one stored name: expected one 201 and seven 302, got {:?}",
        responses.iter().map(|r| r.status).collect::<Vec<_>>()
    );
    for r in &responses {
        assert_eq!(r.header("location").as_deref(), Some(name.as_str()));
    }
    assert_eq!(sha1_hex(&node.get(&name).body), sha1_hex(&body));
    assert_eq!(node.stored_files().len(), 1, "{:?}", node.stored_files());
    node.assert_tmp_empty_soon("after concurrent PUTs");
}

#[test]
fn reserved_uri_characters_round_trip_through_location() {
    let node = Node::start(&[]);
    let body = b"odd name";
    // Decoded name: `we#ird?na%me+plus;semi[x].txt`
    let r = node.put("/we%23ird%3Fna%25me+plus;semi%5Bx%5D.txt", body);
    assert_eq!(r.status, 201, "{}", r.describe());
    let loc = r.header("location").unwrap();
    let decoded = String::from_utf8(percent_decode(&loc)).unwrap();
    let (stem, _, _, ext) =
        split_stored_name(&decoded).unwrap_or_else(|| panic!("bad Location {loc:?}"));
    assert_eq!(stem, "we#ird?na%me+plus;semi[x]");
    assert_eq!(ext, ".txt");
    for c in ['#', '?', ' '] {
        assert!(
            !loc.contains(c),
            "Location {loc:?} must percent-encode {c:?}"
        );
    }
    let g = node.get(&loc);
    assert_eq!(g.status, 200, "GET of the Location {loc}: {}", g.describe());
    assert_eq!(g.body, body);
    assert_eq!(
        node.put(&loc, body).status,
        302,
        "re-PUT to the Location is idempotent"
    );
}

#[test]
fn query_string_is_not_part_of_the_name() {
    let node = Node::start(&[]);
    let loc = node.put_ok("/q.txt", b"query");
    let r = node.get(&format!("{loc}?v=2"));
    assert_eq!(r.status, 200, "GET with a query string: {}", r.describe());
    assert_eq!(r.body, b"query");
}

#[test]
fn max_size_suffixes_are_powers_of_1024() {
    let node = Node::start(&["--max-size", "1M"]);
    let exact = Rng::new(31).bytes(1024 * 1024);
    node.put_ok("/exact.bin", &exact);
    let over = Rng::new(32).bytes(1024 * 1024 + 1);
    let r = node.put("/over.bin", &over);
    assert_eq!(
        r.status,
        413,
        "1 MiB + 1 byte with --max-size 1M: {}",
        r.describe()
    );
    assert_eq!(node.stored_files().len(), 1, "{:?}", node.stored_files());
    node.assert_tmp_empty_soon("after 413");
}

/// Files held in memory (`--cache-size`), as `/_status` counts them.
fn cached_files(node: &Node) -> u64 {
    let resp = node.get("/_status");
    let status: serde_json::Value = serde_json::from_slice(&resp.body).expect("status JSON");
    status["cache"]["files"]
        .as_u64()
        .unwrap_or_else(|| panic!("no cache.files in {status}"))
}

/// Small stored files are kept in memory once read (`--cache-size`): the
/// answers must be exactly those of a node reading the same file from disk,
/// and a deletion must end them at once.
#[test]
fn a_file_read_often_answers_as_from_disk_and_is_gone_right_after_its_deletion() {
    let cached = Node::start(&[]);
    let from_disk = Node::start(&["--cache-size", "0"]);
    let body = b"0123456789 read again and again\n";
    let loc = cached.put_ok("/hot/page.html", body);
    // The same stored file on the other node, put there by hand.
    let twin = from_disk.stored_path(&loc);
    fs::create_dir_all(twin.parent().expect("parent")).expect("mkdir");
    fs::copy(cached.stored_path(&loc), &twin).expect("copy the stored file");

    assert_eq!(cached_files(&cached), 0, "nothing read yet");
    let etag = cached.get(&loc).header("etag").expect("ETag");
    assert_eq!(cached_files(&cached), 1, "the file read is held in memory");
    assert_eq!(cached_files(&from_disk), 0, "--cache-size 0 holds nothing");
    let requests: Vec<(&str, Vec<(&str, &str)>)> = vec![
        ("GET", vec![]),
        ("HEAD", vec![]),
        ("GET", vec![("Range", "bytes=2-4")]),
        ("GET", vec![("Range", "bytes=100-")]),
        ("GET", vec![("If-None-Match", etag.as_str())]),
        ("GET", vec![("If-None-Match", "\"other\"")]),
        (
            "GET",
            vec![("Range", "bytes=0-0"), ("If-Range", etag.as_str())],
        ),
        (
            "GET",
            vec![("If-Modified-Since", "Fri, 01 Jan 2100 00:00:00 GMT")],
        ),
    ];
    for (method, headers) in &requests {
        let a = cached.req(method, &loc, headers, b"");
        let b = from_disk.req(method, &loc, headers, b"");
        let what = format!("{method} {headers:?}");
        assert_eq!(
            a.status,
            b.status,
            "{what}: {} / {}",
            a.describe(),
            b.describe()
        );
        assert_eq!(a.body, b.body, "{what}");
        for h in [
            "etag",
            "last-modified",
            "content-type",
            "content-length",
            "content-range",
            "accept-ranges",
            "x-content-sha1",
            "content-security-policy",
            "x-content-type-options",
            "cache-control",
        ] {
            assert_eq!(a.header(h), b.header(h), "{what}: header {h}");
        }
    }
    assert_eq!(cached.get(&loc).body, body);

    let r = cached.delete(&loc);
    assert_eq!(r.status, 200, "{}", r.describe());
    assert_eq!(cached.get(&loc).status, 404, "GET right after DELETE");
    assert_eq!(cached.head(&loc).status, 404, "HEAD right after DELETE");
    assert_eq!(cached_files(&cached), 0, "the copy went with the file");
}

/// Readers hammering a file while it is deleted: once DELETE has answered,
/// no GET may find the file, whatever the readers were doing meanwhile.
/// (The narrow race between a read from disk and a deletion is covered by
/// the unit tests in `src/cache.rs`; this checks the whole path.)
#[test]
fn reads_racing_a_deletion_never_outlive_it() {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;
    let node = Node::start(&[]);
    let port = node.port();
    for round in 0..20 {
        let loc = node.put_ok(
            &format!("/race/{round}.txt"),
            format!("round {round}").as_bytes(),
        );
        let stop = Arc::new(AtomicBool::new(false));
        let answered = Arc::new(AtomicUsize::new(0));
        let readers: Vec<_> = (0..3)
            .map(|_| {
                let (stop, answered, loc) = (stop.clone(), answered.clone(), loc.clone());
                std::thread::spawn(move || {
                    let mut conn = Conn::open(port);
                    let request = format!("GET {loc} HTTP/1.1\r\nHost: x\r\n\r\n");
                    let mut seen = 0u32;
                    while !stop.load(Ordering::SeqCst) && seen < 20_000 {
                        conn.send(request.as_bytes()).expect("send GET");
                        let r = conn.read_response(false).expect("GET answer");
                        assert!(r.status == 200 || r.status == 404, "{}", r.describe());
                        answered.fetch_add(1, Ordering::SeqCst);
                        seen += 1;
                    }
                })
            })
            .collect();
        // The readers are under way (and the file in memory) before the DELETE.
        assert!(
            wait_until(Duration::from_secs(10), || answered.load(Ordering::SeqCst)
                >= 30),
            "round {round}: readers got no answers"
        );
        let r = node.delete(&loc);
        assert_eq!(r.status, 200, "round {round}: {}", r.describe());
        for _ in 0..20 {
            let r = node.get(&loc);
            assert_eq!(
                r.status,
                404,
                "round {round}: GET after DELETE answered: {}",
                r.describe()
            );
        }
        stop.store(true, Ordering::SeqCst);
        for r in readers {
            r.join().expect("reader");
        }
        assert_eq!(
            node.get(&loc).status,
            404,
            "round {round}: after the readers stopped"
        );
    }
    assert_eq!(cached_files(&node), 0, "every copy went with its file");
}

/// A file an operator put into the storage directory by hand (not in
/// stored form) may be changed by hand too: it is read from disk each time.
#[test]
fn a_file_put_there_by_hand_is_read_from_disk_each_time() {
    let node = Node::start(&[]);
    let path = node.storage().join("manual.txt");
    fs::write(&path, b"first").expect("write by hand");
    for _ in 0..3 {
        assert_eq!(node.get("/manual.txt").body, b"first");
    }
    fs::write(&path, b"second version").expect("rewrite by hand");
    assert_eq!(node.get("/manual.txt").body, b"second version");
    fs::remove_file(&path).expect("remove by hand");
    assert_eq!(node.get("/manual.txt").status, 404);
}

/// A replica PUT (with `X-Content-SHA1`) of a file the node already has is
/// how every copy a neighbour forwards back arrives. It is answered 302
/// from a quick look before the body, and the connection stays usable even
/// when the body comes after that look (else neighbours would reconnect for
/// every file); deleted, 409.
#[test]
fn replica_of_a_present_file_gets_302_and_keeps_the_connection() {
    let node = Node::start(&[]);
    let body = Rng::new(41).bytes(4096);
    let loc = node.put_ok("/echo/back.bin", &body);
    let sha = sha1_hex(&body);
    let port = node.port();
    let head = build_head(
        port,
        "PUT",
        &loc,
        &[
            ("X-Content-SHA1", sha.as_str()),
            ("Connection", "keep-alive"),
        ],
        Some(body.len()),
    );
    let mut conn = Conn::open(port);
    for round in 0..10 {
        // Head and body in separate writes, as a replicating node sends them;
        // every other round the body comes late, after the node has looked.
        conn.send(&head)
            .unwrap_or_else(|e| panic!("round {round}: the connection was closed: {e}"));
        if round % 2 == 1 {
            // Not a wait for a result: only makes the body arrive late.
            std::thread::sleep(Duration::from_millis(50));
        }
        conn.send(&body)
            .unwrap_or_else(|e| panic!("round {round}: the connection was closed: {e}"));
        let r = conn
            .read_response(false)
            .unwrap_or_else(|e| panic!("round {round}: no answer on the kept connection: {e}"));
        assert_eq!(r.status, 302, "round {round}: {}", r.describe());
        assert_eq!(r.header("location").as_deref(), Some(loc.as_str()));
        assert!(
            !r.header("connection")
                .is_some_and(|c| c.eq_ignore_ascii_case("close")),
            "round {round}: the node announced it closes: {}",
            r.describe()
        );
    }
    // Other content under that name and hash is refused like any body that
    // does not match its X-Content-SHA1, though the node has the name.
    let mut wrong = body.clone();
    wrong[0] ^= 1;
    conn.send(&head).unwrap();
    conn.send(&wrong).unwrap();
    let r = conn.read_response(false).expect("answer to a wrong body");
    assert_eq!(
        r.status,
        400,
        "wrong body for a present name: {}",
        r.describe()
    );
    assert!(r.text().contains("does not match"), "{}", r.describe());
    // The same connection still serves the file, unchanged.
    conn.send(&build_head(port, "GET", &loc, &[], None))
        .unwrap();
    let r = conn.read_response(false).expect("GET after the replicas");
    assert_eq!(r.status, 200, "{}", r.describe());
    assert_eq!(r.body, body);
    assert_eq!(node.stored_files().len(), 1, "{:?}", node.stored_files());
    node.assert_tmp_empty_soon("after replicas of a present file");

    // A replica whose body stalls after the head holds up nothing else:
    // a deletion of the same name is answered while it hangs.
    let mut stalled = Conn::open(port);
    stalled.send(&head).unwrap();
    // Not a wait for a result: lets the node read the head and look first.
    std::thread::sleep(Duration::from_millis(50));
    let r = node.delete(&loc);
    assert_eq!(
        r.status,
        200,
        "DELETE beside a stalled replica: {}",
        r.describe()
    );
    assert_eq!(node.get(&loc).status, 404);
    drop(stalled);
    let body = Rng::new(42).bytes(4096);
    let sha = sha1_hex(&body);
    let loc = node.put_ok("/echo/again.bin", &body);

    // Asked with Expect: 100-continue, the answer comes without the body.
    let r = replica_asking_first(port, &loc, &sha, body.len());
    assert_eq!(r.status, 302, "{}", r.describe());

    // Deleted, the same replica gets 409, body sent or not, and leaves nothing.
    assert_eq!(node.delete(&loc).status, 200);
    let r = node.req("PUT", &loc, &[("X-Content-SHA1", sha.as_str())], &body);
    assert_eq!(r.status, 409, "{}", r.describe());
    let r = replica_asking_first(port, &loc, &sha, body.len());
    assert_eq!(r.status, 409, "{}", r.describe());
    assert!(node.stored_files().is_empty(), "{:?}", node.stored_files());
    node.assert_tmp_empty_soon("after replicas of a deleted file");
}

/// A replica PUT with `Expect: 100-continue`, whose body is never sent: the
/// answer must come without asking for it.
fn replica_asking_first(port: u16, loc: &str, sha: &str, len: usize) -> Response {
    put_asking_first(port, loc, &[("X-Content-SHA1", sha)], len)
}

/// Makes a file immutable (so even root cannot unlink it) until dropped.
struct Immutable(std::path::PathBuf);

impl Immutable {
    fn set(path: &std::path::Path) -> Immutable {
        let out = std::process::Command::new("chattr")
            .arg("+i")
            .arg(path)
            .output()
            .expect("chattr (e2fsprogs) is needed for this test");
        assert!(
            out.status.success(),
            "chattr +i {}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        Immutable(path.to_path_buf())
    }
}

impl Drop for Immutable {
    fn drop(&mut self) {
        let _ = std::process::Command::new("chattr")
            .arg("-i")
            .arg(&self.0)
            .status();
    }
}

/// A DELETE whose unlink fails (here: the file is immutable) answers 500,
/// but the deletion is logged, so the name is deleted for every answer the
/// node gives from then on: GET/HEAD 404, a replica PUT 409 (also the quick
/// answer a copy coming back gets). Repeated once the disk allows it, the
/// DELETE removes the file.
#[test]
fn a_deletion_whose_unlink_failed_still_counts() {
    let mut node = Node::start(&[]);
    let body = Rng::new(43).bytes(4096);
    let sha = sha1_hex(&body);
    let loc = node.put_ok("/stuck/file.bin", &body);
    assert_eq!(node.get(&loc).status, 200, "read once, so it is cached");
    let path = node.stored_path(&loc);
    let lock = Immutable::set(&path);

    let r = node.delete(&loc);
    assert_eq!(r.status, 500, "{}", r.describe());
    assert!(path.exists(), "the file could not be unlinked");
    assert_eq!(node.get(&loc).status, 404, "GET of a deleted name");
    assert_eq!(node.head(&loc).status, 404, "HEAD of a deleted name");
    let r = node.req("PUT", &loc, &[("X-Content-SHA1", sha.as_str())], &body);
    assert_eq!(r.status, 409, "replica of a deleted name: {}", r.describe());
    let r = replica_asking_first(node.port(), &loc, &sha, body.len());
    assert_eq!(r.status, 409, "{}", r.describe());

    // Still immutable: the repeated DELETE fails the same way.
    assert_eq!(node.delete(&loc).status, 500);
    drop(lock);
    let r = node.delete(&loc);
    assert_eq!(
        r.status,
        200,
        "once the unlink can succeed: {}",
        r.describe()
    );
    assert!(!path.exists(), "the file is gone");
    assert!(node.stored_files().is_empty(), "{:?}", node.stored_files());
    assert_eq!(node.get(&loc).status, 404);

    // Nothing is left for start-up to redo, and the name stays deleted.
    let code = node.stop();
    assert!(code.success(), "stopped with {code}");
    node.restart();
    assert_eq!(node.get(&loc).status, 404);
    let r = node.req("PUT", &loc, &[("X-Content-SHA1", sha.as_str())], &body);
    assert_eq!(r.status, 409, "after a restart: {}", r.describe());
    assert!(node.stored_files().is_empty(), "{:?}", node.stored_files());
}

#[test]
fn a_large_replica_of_a_present_name_is_read_and_checked() {
    let node = Node::start(&[]);
    let body = Rng::new(9).bytes(300 * 1024);
    let sha = sha1_hex(&body);
    let loc = node.put_ok("/big/replica.bin", &body);
    // The same content again: 302, and the connection stays usable because
    // the body was taken.
    let mut conn = Conn::open(node.port());
    conn.send(&build_head(
        node.port(),
        "PUT",
        &loc,
        &[
            ("X-Content-SHA1", sha.as_str()),
            ("Connection", "keep-alive"),
        ],
        Some(body.len()),
    ))
    .unwrap();
    conn.send(&body).unwrap();
    let r = conn.read_response(false).expect("answer to the replica");
    assert_eq!(r.status, 302, "{}", r.describe());
    conn.send(&build_head(node.port(), "GET", &loc, &[], None))
        .unwrap();
    let r = conn
        .read_response(false)
        .expect("GET on the same connection");
    assert_eq!(r.status, 200, "{}", r.describe());
    assert_eq!(r.body, body);
    // Other content under the header of this one: 400, nothing changes.
    let mut other = body.clone();
    other[1000] ^= 1;
    let r = node.req("PUT", &loc, &[("X-Content-SHA1", sha.as_str())], &other);
    assert_eq!(r.status, 400, "{}", r.describe());
    assert_eq!(node.get(&loc).body, body);
    assert_eq!(node.stored_files().len(), 1, "{:?}", node.stored_files());
}

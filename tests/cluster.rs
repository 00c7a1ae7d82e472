//! SPEC "Cluster", black-box: real processes on loopback replicating to
//! each other (full mesh, a line, outages, crashes).

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::cluster::*;
use common::proxy::{Fault, Proxy};
use common::*;

/// Check that every node serves `location` with exactly `body` and the same
/// content headers (stored name, ETag, X-Content-SHA1, type, length,
/// Last-Modified).
fn assert_same_everywhere(nodes: &[&Node], location: &str, body: &[u8]) {
    let sha = sha1_hex(body);
    let mut first_type: Option<String> = None;
    let mut first_modified: Option<String> = None;
    for node in nodes {
        let resp = node.get(location);
        assert_eq!(
            resp.status,
            200,
            "GET {location} on {}: {}",
            node.url(),
            resp.describe()
        );
        assert!(
            resp.body == body,
            "GET {location} on {}: body differs ({} bytes, expected {})",
            node.url(),
            resp.body.len(),
            body.len()
        );
        assert_eq!(
            resp.header("etag").as_deref(),
            Some(format!("\"{sha}\"").as_str()),
            "ETag of {location} on {}",
            node.url()
        );
        assert_eq!(
            resp.header("x-content-sha1").as_deref(),
            Some(sha.as_str()),
            "X-Content-SHA1 of {location} on {}",
            node.url()
        );
        assert_eq!(
            resp.header("content-length").as_deref(),
            Some(body.len().to_string().as_str()),
            "Content-Length of {location} on {}",
            node.url()
        );
        let modified = resp.header("last-modified");
        assert!(modified.is_some(), "no Last-Modified on {}", node.url());
        match &first_modified {
            None => first_modified = modified,
            Some(m) => assert_eq!(
                modified.as_ref(),
                Some(m),
                "Last-Modified of {location} differs on {}",
                node.url()
            ),
        }
        let ct = resp.header("content-type");
        match &first_type {
            None => first_type = ct,
            Some(t) => assert_eq!(ct.as_ref(), Some(t), "Content-Type of {location} differs"),
        }
        // Same stored name on disk.
        assert_eq!(
            node.read_stored(&decoded(location)).as_deref(),
            Some(body),
            "{location} on {} is not stored under the same name",
            node.url()
        );
    }
}

/// Decoded stored name from a Location.
fn decoded(location: &str) -> String {
    String::from_utf8(percent_decode(location)).expect("UTF-8 Location")
}

/// Decoded stored names, relative to the storage directory, as `stored_files` lists them.
fn rel(location: &str) -> String {
    decoded(location).trim_start_matches('/').to_string()
}

fn wait_everywhere(nodes: &[&Node], location: &str, body: &[u8]) {
    for node in nodes {
        assert!(
            wait_has(node, &decoded(location), body, REPLICATION_BOUND),
            "{location} did not reach {} within {REPLICATION_BOUND:?}\n{}",
            node.url(),
            describe_statuses(nodes)
        );
    }
}

fn wait_gone_everywhere(nodes: &[&Node], location: &str) {
    for node in nodes {
        assert!(
            wait_absent(node, &decoded(location), REPLICATION_BOUND),
            "{location} still on {} after {REPLICATION_BOUND:?}\n{}",
            node.url(),
            describe_statuses(nodes)
        );
    }
}

fn assert_file_set(node: &Node, expected: &BTreeSet<String>, what: &str) {
    let got: BTreeSet<String> = node.stored_files().into_iter().collect();
    assert_eq!(&got, expected, "{what}: files stored on {}", node.url());
}

#[test]
fn full_mesh_of_three_replicates_puts_and_deletes() {
    // Every node gets the same --node list, itself included.
    let nodes = full_mesh(3, None, &[]);
    let all: Vec<&Node> = nodes.iter().collect();
    let urls: Vec<String> = nodes.iter().map(|n| n.url()).collect();

    // The own URL is skipped: each status lists exactly the two others.
    for (i, node) in nodes.iter().enumerate() {
        let status = node.status().expect("status");
        let keys: BTreeSet<String> = status["queues"]
            .as_object()
            .expect("queues object")
            .keys()
            .cloned()
            .collect();
        let others: BTreeSet<String> = urls
            .iter()
            .enumerate()
            .filter(|&(j, _)| j != i)
            .map(|(_, u)| u.clone())
            .collect();
        assert_eq!(keys, others, "queues of {}: {status}", node.url());
        assert_eq!(status["url"].as_str(), Some(urls[i].as_str()), "{status}");
        assert!(
            status["version"].as_str().is_some_and(|v| !v.is_empty()),
            "status needs a version: {status}"
        );
    }

    // Uploads to each node, including a sub-directory, a name needing
    // percent-encoding, an empty file, one larger than a single read, and
    // the longest name a PUT accepts (its stored name is over 1024 bytes,
    // its last segment over 200, and the neighbours must still take it).
    let mut rng = Rng::new(7);
    let big = rng.bytes(300 * 1024 + 11);
    let longest = format!(
        "/{}/{}.txt",
        vec!["d".repeat(200); 4].join("/"),
        "f".repeat(196)
    );
    let uploads: Vec<(usize, &str, Vec<u8>)> = vec![
        (0, "/mesh/a.txt", b"hello from A\n".to_vec()),
        (0, "/empty.dat", Vec::new()),
        (1, "/b%20file.bin", rng.bytes(5000)),
        (1, "/big/blob.bin", big),
        (2, "/c", b"no extension".to_vec()),
        (2, longest.as_str(), b"the longest name".to_vec()),
    ];
    let mut stored = Vec::new();
    for (i, path, body) in &uploads {
        let location = nodes[*i].put_ok(path, body);
        stored.push((location, body.clone()));
    }
    for (location, body) in &stored {
        wait_everywhere(&all, location, body);
        assert_same_everywhere(&all, location, body);
    }
    wait_queues_empty(&all, REPLICATION_BOUND, "after the uploads");
    let expected: BTreeSet<String> = stored.iter().map(|(l, _)| rel(l)).collect();
    for node in &nodes {
        assert_file_set(node, &expected, "after the uploads");
    }

    // A DELETE on C of A's file reaches everyone.
    let (gone, _) = &stored[0];
    let resp = nodes[2].delete(gone);
    assert_eq!(resp.status, 200, "DELETE on C: {}", resp.describe());
    wait_gone_everywhere(&all, gone);
    for node in &nodes {
        // Gone from the disk a moment before the deletion is done there.
        let answers_404 = wait_until(REPLICATION_BOUND, || node.get(gone).status == 404);
        assert!(answers_404, "GET deleted file on {}", node.url());
    }
    wait_queues_empty(&all, REPLICATION_BOUND, "after the delete");
    let expected: BTreeSet<String> = stored.iter().skip(1).map(|(l, _)| rel(l)).collect();
    for node in &nodes {
        assert_file_set(node, &expected, "after the delete");
        // The deletion is logged everywhere: the name cannot come back.
        let resp = node.put(gone, b"hello from A\n");
        assert_eq!(
            resp.status,
            409,
            "PUT of a deleted name on {}: {}",
            node.url(),
            resp.describe()
        );
    }
    // Queues stay empty: nothing floods after convergence (the 409s above
    // changed nothing, so they queued nothing).
    for node in &nodes {
        let q = node.queue_lengths();
        assert!(q.values().all(|&l| l == 0), "{}: {q:?}", node.url());
    }
}

#[test]
fn line_of_three_forwards_and_flooding_stops() {
    // A - B - C, A and C are not neighbours. All replication goes through a
    // (fault-free) proxy so that the requests can be counted.
    let proxy = Proxy::start();
    let purl = proxy.url();
    let (pa, pb, pc) = (free_port(), free_port(), free_port());
    let a = Node::start_on(pa, &node_args(pa, &[pb], Some(&purl), &[]));
    let b = Node::start_on(pb, &node_args(pb, &[pa, pc], Some(&purl), &[]));
    let c = Node::start_on(pc, &node_args(pc, &[pb], Some(&purl), &[]));
    let all = [&a, &b, &c];
    assert_eq!(
        a.queue_lengths().keys().cloned().collect::<Vec<_>>(),
        vec![b.url()]
    );

    // PUT on A reaches C through B.
    let body = b"travels along the line".to_vec();
    let loc = a.put_ok("/line.txt", &body);
    wait_everywhere(&all, &loc, &body);
    assert_same_everywhere(&all, &loc, &body);
    wait_queues_empty(&all, REPLICATION_BOUND, "after PUT on A");

    // Exactly: A->B 201, B->A 302, B->C 201, C->B 302; nothing more.
    let puts: Vec<_> = proxy
        .log()
        .into_iter()
        .filter(|s| s.method == "PUT" && s.path == loc)
        .collect();
    let mut statuses: Vec<Option<u16>> = puts.iter().map(|s| s.status).collect();
    statuses.sort();
    assert_eq!(
        statuses,
        vec![Some(201), Some(201), Some(302), Some(302)],
        "replication PUTs of one upload in a line\n{}",
        proxy.describe()
    );
    let to = |port: u16| puts.iter().filter(|s| s.port == port).count();
    assert_eq!(
        (to(pa), to(pb), to(pc)),
        (1, 2, 1),
        "targets of the replication PUTs\n{}",
        proxy.describe()
    );

    // PUT on C reaches A.
    let body2 = b"and back again".to_vec();
    let loc2 = c.put_ok("/back/again.txt", &body2);
    wait_everywhere(&all, &loc2, &body2);
    assert_same_everywhere(&all, &loc2, &body2);

    // DELETE on C reaches A.
    let resp = c.delete(&loc);
    assert_eq!(resp.status, 200, "DELETE on C: {}", resp.describe());
    wait_gone_everywhere(&all, &loc);
    wait_queues_empty(&all, REPLICATION_BOUND, "after DELETE on C");
    let deletes: Vec<_> = proxy
        .log()
        .into_iter()
        .filter(|s| s.method == "DELETE" && s.path == loc)
        .collect();
    let mut statuses: Vec<Option<u16>> = deletes.iter().map(|s| s.status).collect();
    statuses.sort();
    // C->B 200, B->A 200, B->C 404, A->B 404.
    assert_eq!(
        statuses,
        vec![Some(200), Some(200), Some(404), Some(404)],
        "replication DELETEs of one deletion in a line\n{}",
        proxy.describe()
    );
    let expected: BTreeSet<String> = [rel(&loc2)].into_iter().collect();
    for node in all {
        assert_file_set(node, &expected, "line, at the end");
    }
    assert_eq!(proxy.count(Fault::Refused), 0);
}

#[test]
fn node_down_and_back_catches_up() {
    let mut nodes = full_mesh(3, None, &[]);
    let (a_url, b_url, c_url) = (nodes[0].url(), nodes[1].url(), nodes[2].url());
    let code = nodes[1].stop();
    assert!(code.success(), "B stopped with {code}");

    let mut rng = Rng::new(11);
    let mut stored = Vec::new();
    for i in 0..20 {
        let body = rng.bytes(100 + i * 37);
        let loc = nodes[0].put_ok(&format!("/down/f{i}.bin"), &body);
        stored.push((loc, body));
    }
    // One of them is deleted on C after it arrived there.
    let (del, del_body) = stored[3].clone();
    assert!(wait_has(
        &nodes[2],
        &decoded(&del),
        &del_body,
        REPLICATION_BOUND
    ));
    let resp = nodes[2].delete(&del);
    assert_eq!(resp.status, 200, "DELETE on C: {}", resp.describe());

    // Everything B has not accepted is queued, on A and on C: 20 PUTs and
    // one DELETE each (C forwards what it learnt from A).
    let queued = wait_until(REPLICATION_BOUND, || {
        nodes[0].queue_len(&b_url) == Some(21)
            && nodes[2].queue_len(&b_url) == Some(21)
            && nodes[0].queue_len(&c_url) == Some(0)
            && nodes[2].queue_len(&a_url) == Some(0)
    });
    let a_status = nodes[0].status().expect("A status");
    assert!(
        queued,
        "expected 21 operations queued for B on A and C\nA: {a_status}\nC: {:?}",
        nodes[2].status()
    );
    assert!(
        a_status["queues"][&b_url]["oldest_age_seconds"].is_number(),
        "oldest_age_seconds of a non-empty queue: {a_status}"
    );
    assert!(nodes[1].stored_files().is_empty());

    // B comes back on the same port and directories and catches up.
    nodes[1].restart();
    let all: Vec<&Node> = nodes.iter().collect();
    wait_queues_empty(&all, REPLICATION_BOUND, "after B came back");
    let expected: BTreeSet<String> = stored
        .iter()
        .filter(|(l, _)| *l != del)
        .map(|(l, _)| rel(l))
        .collect();
    for node in &nodes {
        assert_file_set(node, &expected, "after B came back");
    }
    for (loc, body) in stored.iter().filter(|(l, _)| *l != del) {
        assert_eq!(
            nodes[1].read_stored(&decoded(loc)).as_deref(),
            Some(&body[..])
        );
    }
    let resp = nodes[1].put(&del, &del_body);
    assert_eq!(
        resp.status,
        409,
        "B must have learnt the deletion: {}",
        resp.describe()
    );
}

#[test]
fn hanging_deletion_converges_to_deleted() {
    // Issue 3: B is down, a file is uploaded to A; A goes down, B comes up
    // and the file is deleted on B (404, but the deletion is logged and
    // queued); A comes back; in the end the file is gone from both.
    let (pa, pb) = (free_port(), free_port());
    let mut a = Node::start_on(pa, &node_args(pa, &[pa, pb], None, &[]));
    let mut b = Node::prepare(pb, &node_args(pb, &[pa, pb], None, &[]));

    let body = b"hanging".to_vec();
    let loc = a.put_ok("/hanging.txt", &body);
    assert!(
        wait_until(REPLICATION_BOUND, || a.queue_len(&b.url()) == Some(1)),
        "A should queue the PUT for B: {:?}",
        a.status()
    );
    let code = a.stop();
    assert!(code.success(), "A stopped with {code}");

    b.restart();
    let resp = b.delete(&loc);
    assert_eq!(
        resp.status,
        404,
        "DELETE on B of a file it never had: {}",
        resp.describe()
    );
    assert_eq!(
        b.queue_len(&a.url()),
        Some(1),
        "B must queue the deletion for A: {:?}",
        b.status()
    );

    a.restart();
    assert!(
        wait_absent(&a, &decoded(&loc), REPLICATION_BOUND),
        "the file is still on A\n{}",
        describe_statuses(&[&a, &b])
    );
    wait_queues_empty(&[&a, &b], REPLICATION_BOUND, "hanging deletion");
    assert!(a.stored_files().is_empty(), "A: {:?}", a.stored_files());
    assert!(b.stored_files().is_empty(), "B: {:?}", b.stored_files());
    for node in [&a, &b] {
        assert_eq!(node.get(&loc).status, 404, "GET on {}", node.url());
        assert_eq!(
            node.put(&loc, &body).status,
            409,
            "PUT of the deleted name on {}",
            node.url()
        );
    }
}

#[test]
fn delete_overtaking_its_put_ends_deleted_everywhere() {
    // All replication goes through a proxy that first refuses everything.
    let proxy = Proxy::start();
    let purl = proxy.url();
    let (pa, pb) = (free_port(), free_port());
    let a = Node::start_on(pa, &node_args(pa, &[pb], Some(&purl), &[]));
    let b = Node::start_on(pb, &node_args(pb, &[pa], Some(&purl), &[]));
    proxy.refuse_port(pa, true);
    proxy.refuse_port(pb, true);

    let body = b"overtaken".to_vec();
    let loc = a.put_ok("/overtaken.txt", &body);
    assert!(
        wait_until(REPLICATION_BOUND, || proxy
            .log()
            .iter()
            .any(|s| s.port == pb && s.fault == Fault::Refused)),
        "A should have tried to reach B\n{}",
        proxy.describe()
    );
    // B deletes the name before A's copy arrived.
    let resp = b.delete(&loc);
    assert_eq!(resp.status, 404, "DELETE on B: {}", resp.describe());
    assert_eq!(b.queue_len(&a.url()), Some(1), "{:?}", b.status());

    // Let A's PUT through first: B refuses it with 409 and keeps nothing.
    proxy.refuse_port(pb, false);
    assert!(
        wait_until(REPLICATION_BOUND, || proxy.log().iter().any(|s| s.port
            == pb
            && s.method == "PUT"
            && s.path == loc
            && s.status == Some(409))),
        "A's PUT should reach B and get 409\n{}",
        proxy.describe()
    );
    assert!(
        wait_until(REPLICATION_BOUND, || a.queue_len(&b.url()) == Some(0)),
        "409 is an accepted answer: {:?}",
        a.status()
    );
    assert!(b.stored_files().is_empty(), "B: {:?}", b.stored_files());
    // A still has it until the deletion arrives.
    assert_eq!(a.read_stored(&decoded(&loc)).as_deref(), Some(&body[..]));

    // Then the deletion reaches A.
    proxy.refuse_port(pa, false);
    assert!(
        wait_absent(&a, &decoded(&loc), REPLICATION_BOUND),
        "deletion did not reach A\n{}",
        proxy.describe()
    );
    wait_queues_empty(&[&a, &b], REPLICATION_BOUND, "overtaking delete");
    for node in [&a, &b] {
        assert!(node.stored_files().is_empty(), "{}", node.url());
        let resp = node.put(&loc, &body);
        assert_eq!(
            resp.status,
            409,
            "a later PUT of the name on {}: {}",
            node.url(),
            resp.describe()
        );
    }
}

#[test]
fn kill9_of_a_sender_with_a_full_queue_loses_nothing() {
    let (pa, pb) = (free_port(), free_port());
    let mut a = Node::start_on(pa, &node_args(pa, &[pb], None, &[]));
    let mut b = Node::prepare(pb, &node_args(pb, &[pa], None, &[]));

    let mut rng = Rng::new(23);
    let mut stored = Vec::new();
    for i in 0..60 {
        let body = rng.bytes(64 + i * 13);
        let loc = a.put_ok(&format!("/q/{}/n{i}.dat", i % 4), &body);
        stored.push((loc, body));
    }
    let deleted: Vec<(String, Vec<u8>)> = stored.iter().step_by(6).cloned().collect();
    for (loc, _) in &deleted {
        let resp = a.delete(loc);
        assert_eq!(resp.status, 200, "DELETE {loc} on A: {}", resp.describe());
    }
    // Every live PUT and every DELETE waits for B (a queued PUT whose file
    // was deleted since may count as done: DESIGN says the sender skips it).
    let live_puts = stored.len() - deleted.len();
    let live = (live_puts + deleted.len()) as u64;
    let total = (stored.len() + deleted.len()) as u64;
    let before = a.queue_len(&b.url()).expect("A status");
    assert!(
        (live..=total).contains(&before),
        "queue for B before kill -9: {before}, expected {live}..={total}: {:?}",
        a.status()
    );

    a.kill9();
    a.restart();
    let after = a.queue_len(&b.url()).expect("A status");
    assert!(
        (live..=before).contains(&after),
        "the queue must survive kill -9: {after} operations left of {before}: {:?}",
        a.status()
    );

    b.restart();
    wait_queues_empty(&[&a, &b], REPLICATION_BOUND, "after kill -9 of the sender");
    let expected: BTreeSet<String> = stored
        .iter()
        .filter(|s| !deleted.contains(s))
        .map(|(l, _)| rel(l))
        .collect();
    assert_file_set(&b, &expected, "B after kill -9 of A");
    assert_file_set(&a, &expected, "A after kill -9 of A");
    assert!(files_with_wrong_sha1(&b).is_empty());
    for (loc, body) in &deleted {
        assert_eq!(
            b.put(loc, body).status,
            409,
            "B must have the deletion of {loc}"
        );
    }
}

/// Uploads acknowledged just before a kill -9 are all still queued for the
/// neighbour afterwards, each once, and reach it.
#[test]
fn kill9_right_after_uploads_keeps_every_upload_queued() {
    let (pa, pb) = (free_port(), free_port());
    let mut a = Node::start_on(pa, &node_args(pa, &[pb], None, &[]));
    let mut b = Node::prepare(pb, &node_args(pb, &[pa], None, &[]));
    let mut rng = Rng::new(31);
    let mut stored = Vec::new();
    for i in 0..40 {
        let body = rng.bytes(100 + i * 7);
        stored.push((a.put_ok(&format!("/j/f{i}.bin"), &body), body));
    }
    a.kill9();
    a.restart();
    assert_eq!(
        a.queue_len(&b.url()),
        Some(stored.len() as u64),
        "every acknowledged upload is queued once after kill -9: {:?}",
        a.status()
    );
    b.restart();
    wait_queues_empty(
        &[&a, &b],
        REPLICATION_BOUND,
        "after kill -9 right after uploads",
    );
    let expected: BTreeSet<String> = stored.iter().map(|(l, _)| rel(l)).collect();
    assert_file_set(&b, &expected, "B after A's kill -9");
    assert!(files_with_wrong_sha1(&b).is_empty());
    // Stopped and started cleanly, A has nothing to send again.
    assert!(a.stop().success());
    a.restart();
    assert_eq!(a.queue_len(&b.url()), Some(0), "{:?}", a.status());
}

#[test]
fn kill9_of_a_receiver_during_a_transfer() {
    // A large file travels A -> B through a proxy that stops forwarding it
    // half-way, so that B is killed with certainty in the middle of it.
    let proxy = Proxy::start();
    let purl = proxy.url();
    let (pa, pb) = (free_port(), free_port());
    let a = Node::start_on(pa, &node_args(pa, &[pb], Some(&purl), &[]));
    let mut b = Node::start_on(pb, &node_args(pb, &[pa], None, &[]));
    proxy.stall(1, Duration::from_secs(60));

    let body = Rng::new(99).bytes(50 << 20);
    let loc = a.put_ok("/large/fifty.bin", &body);
    // Half of the body has gone to B and the proxy holds the rest back.
    let mid = wait_until(Duration::from_secs(30), || {
        proxy.stalls_begun() == 1
            && b.tmp_files()
                .iter()
                .any(|f| std::fs::metadata(b.tmp_dir().join(f)).is_ok_and(|m| m.len() > 0))
    });
    assert!(
        mid,
        "B never held a partial upload in {}\n{}",
        b.tmp_dir().display(),
        proxy.describe()
    );
    b.kill9();
    assert!(
        !b.tmp_files().is_empty(),
        "the killed receiver should have left its partial temp file"
    );
    assert!(b.read_stored(&decoded(&loc)).is_none());

    // The sender gives up the stalled transfer (--transfer-timeout) ...
    assert!(
        wait_until(Duration::from_secs(20), || proxy
            .log()
            .iter()
            .any(|s| s.fault == Fault::Stalled && s.client_gave_up)),
        "A did not time out the stalled transfer\n{}",
        proxy.describe()
    );
    // ... and retries until B is back.
    let started = Instant::now();
    b.restart();
    assert!(
        wait_has(&b, &decoded(&loc), &body, Duration::from_secs(40)),
        "the file did not arrive intact on B within 40 s\n{}\n{}",
        proxy.describe(),
        describe_statuses(&[&a, &b])
    );
    eprintln!("50 MiB arrived {:?} after B restarted", started.elapsed());
    b.assert_tmp_empty_soon("B after the transfer");
    wait_queues_empty(&[&a, &b], REPLICATION_BOUND, "after the large transfer");
    assert_eq!(b.stored_files(), vec![rel(&loc)]);
}

#[test]
fn a_neighbour_taken_off_the_list_is_forgotten_with_a_warning() {
    // Nothing listens on `gone`: its operations stay queued.
    let (pa, gone) = (free_port(), free_port());
    let mut a = Node::start_on(pa, &node_args(pa, &[gone], None, &[]));
    a.put_ok("/kept-1.txt", b"one");
    a.put_ok("/kept-2.txt", b"two");
    assert_eq!(a.queue_len(&url_of(gone)), Some(2));
    assert!(a.stop().success());
    a.set_args(node_args(pa, &[], None, &[]));
    a.restart();
    let warning = format!(
        "{} is no longer a --node: forgetting 2 operation(s) it had not accepted",
        url_of(gone)
    );
    assert!(a.stderr_text().contains(&warning), "{}", a.stderr_text());
    assert!(a.queue_lengths().is_empty());
    // Forgotten once: the next start has nothing to say about it.
    assert!(a.stop().success());
    a.restart();
    assert_eq!(a.stderr_text().matches(&warning).count(), 1);
}

#[test]
fn a_neighbour_added_later_gets_every_file_and_deletion() {
    let (pa, pb, pc) = (free_port(), free_port(), free_port());
    let mut a = Node::start_on(pa, &node_args(pa, &[pb], None, &[]));
    let b = Node::start_on(pb, &node_args(pb, &[pa], None, &[]));
    let mut rng = Rng::new(31);
    let mut kept = Vec::new();
    let mut deleted = Vec::new();
    for i in 0..24 {
        // One large file: sent after a HEAD.
        let size = if i == 0 { 300 * 1024 } else { 1 + i * 97 };
        let body = rng.bytes(size);
        let loc = a.put_ok(&format!("/early/d{}/f{i}.bin", i % 3), &body);
        if i % 4 == 1 {
            assert_eq!(a.delete(&loc).status, 200);
            deleted.push((loc, body));
        } else {
            kept.push((loc, body));
        }
    }
    // B accepted everything: A's log is trimmed of it.
    wait_queues_empty(&[&a, &b], REPLICATION_BOUND, "A and B");
    // C joins: it knows A, and A is restarted with C in its list.
    let c = Node::start_on(pc, &node_args(pc, &[pa], None, &[]));
    assert!(a.stop().success());
    a.set_args(node_args(pa, &[pb, pc], None, &[]));
    a.restart();
    for (loc, body) in &kept {
        assert!(
            wait_has(&c, &decoded(loc), body, REPLICATION_BOUND),
            "{loc} never reached the new neighbour\n{}",
            describe_statuses(&[&a, &c])
        );
    }
    wait_queues_empty(&[&a, &c], REPLICATION_BOUND, "after C caught up");
    for (loc, body) in &deleted {
        // The deletion log came along: the name stays deleted on C.
        let r = c.put(loc, body);
        assert_eq!(r.status, 409, "PUT {loc} on C: {}", r.describe());
    }
    assert_eq!(c.stored_files().len(), kept.len(), "{:?}", c.stored_files());
    let catch_up = "needs operations no longer logged here";
    assert_eq!(a.stderr_text().matches(catch_up).count(), 1);
    // Once done, it is done for good: its position was saved durably.
    a.kill9();
    a.restart();
    wait_queues_empty(&[&a, &c], REPLICATION_BOUND, "after A's kill -9");
    assert_eq!(a.stderr_text().matches(catch_up).count(), 1);
}

#[test]
fn files_a_new_neighbour_refuses_hold_up_nothing_else() {
    let (pa, pb, pc) = (free_port(), free_port(), free_port());
    // A window of 2, and more refused files than that.
    let window = ["--max-in-flight", "2"];
    let mut a = Node::start_on(pa, &node_args(pa, &[pb], None, &window));
    let b = Node::start_on(pb, &node_args(pb, &[], None, &[]));
    let early: Vec<(String, Vec<u8>)> = (0..5)
        .map(|i| {
            let body = format!("stored before C joined, {i}").into_bytes();
            (a.put_ok(&format!("/sub/early{i}.txt"), &body), body)
        })
        .collect();
    wait_queues_empty(&[&a], REPLICATION_BOUND, "A to B");
    assert!(a.stop().success());
    // Stored-form names whose content is not their hash (put there by
    // hand): any neighbour answers 400 to them, for ever.
    let bad: Vec<String> = (0..3)
        .map(|i| format!("bad{i}_1700000000_{}.bin", sha1_hex(b"something else")))
        .collect();
    for name in &bad {
        std::fs::write(a.storage().join(name), b"not what the name says").unwrap();
    }
    let c = Node::start_on(pc, &node_args(pc, &[], None, &[]));
    a.set_args(node_args(pa, &[pb, pc], None, &window));
    a.restart();
    let later = a.put_ok("/later.txt", b"stored while C catches up");
    let mut expected = early.clone();
    expected.push((later, b"stored while C catches up".to_vec()));
    for (loc, body) in &expected {
        assert!(
            wait_has(&c, &decoded(loc), body, REPLICATION_BOUND),
            "{loc} never reached C\n{}",
            describe_statuses(&[&a, &c])
        );
    }
    // Not caught up, saying why, and counting only what C lacks.
    let says_why = wait_until(REPLICATION_BOUND, || {
        a.status().is_some_and(|s| {
            let q = &s["queues"][url_of(pc)];
            q["last_error"].as_str().is_some_and(|e| e.contains("400"))
                && q["catch_up"]["accepted"].as_u64() == Some(early.len() as u64)
                && q["length"].as_u64() == Some(bad.len() as u64 + 1)
        })
    });
    assert!(says_why, "{}", describe_statuses(&[&a]));
    for name in &bad {
        assert!(c.read_stored(name).is_none());
    }
    // Stopped mid-pass, the pass is not taken for done: once the files
    // are repaired, the next start delivers them.
    assert!(a.stop().success());
    for name in &bad {
        std::fs::write(a.storage().join(name), b"something else").unwrap();
    }
    a.restart();
    for name in &bad {
        assert!(
            wait_has(&c, name, b"something else", REPLICATION_BOUND),
            "{name} never reached C after the restart\n{}",
            describe_statuses(&[&a, &c])
        );
    }
    wait_queues_empty(&[&a], REPLICATION_BOUND, "A after the repair");
    drop(b);
}

#[test]
fn a_new_log_over_stored_files_sends_them_all() {
    let (pa, pc) = (free_port(), free_port());
    // Files stored by a node with no neighbours; then its state is lost
    // (or, alike, the files were copied in or left by the original tool).
    let mut a = Node::start_on(pa, &node_args(pa, &[], None, &[]));
    let mut rng = Rng::new(7);
    let files: Vec<(String, Vec<u8>)> = (0..12)
        .map(|i| {
            let body = rng.bytes(100 + i * 31);
            (a.put_ok(&format!("/old/f{i}.bin"), &body), body)
        })
        .collect();
    assert!(a.stop().success());
    std::fs::remove_dir_all(a.queue()).unwrap();
    // Copied in by hand below a directory no PUT may make (it has the
    // stored form): no neighbour would take it, so it is passed over.
    let body = b"below a stored-form directory";
    let odd_dir = format!("d_1_{}", sha1_hex(b"a directory"));
    let odd = format!("{odd_dir}/x_1_{}.txt", sha1_hex(body));
    std::fs::create_dir(a.storage().join(&odd_dir)).unwrap();
    std::fs::write(a.storage().join(&odd), body).unwrap();
    let c = Node::start_on(pc, &node_args(pc, &[], None, &[]));
    a.set_args(node_args(pa, &[pc], None, &[]));
    a.restart();
    for (loc, body) in &files {
        assert!(
            wait_has(&c, &decoded(loc), body, REPLICATION_BOUND),
            "{loc} never reached C\n{}",
            describe_statuses(&[&a, &c])
        );
    }
    wait_queues_empty(&[&a], REPLICATION_BOUND, "A to C");
    assert!(c.read_stored(&odd).is_none());
    assert!(a.stderr_text().contains(&format!("passing over {odd}")));
}

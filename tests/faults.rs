//! Replication through a misbehaving network (SPEC "Cluster": retries,
//! X-Content-SHA1, timeouts, `--proxy`), using the fault-injecting proxy of
//! `common::proxy` between a sender A and a receiver B.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::cluster::*;
use common::proxy::{Fault, Proxy};
use common::*;

/// A (replicating to B through the proxy) and B (no neighbours).
fn pair(proxy: &Proxy) -> (Node, Node) {
    let (pa, pb) = (free_port(), free_port());
    let a = Node::start_on(pa, &node_args(pa, &[pb], Some(&proxy.url()), &[]));
    let b = Node::start_on(pb, &node_args(pb, &[], None, &[]));
    (a, b)
}

fn decoded(location: &str) -> String {
    String::from_utf8(percent_decode(location)).expect("UTF-8 Location")
}

/// The `queues.<B>` object of A's status.
fn queue_to(a: &Node, b: &Node) -> serde_json::Value {
    a.status().expect("A status")["queues"][b.url()].clone()
}

/// B ends up with exactly `files`, byte for byte, and nothing else; the
/// queue drains.
fn assert_delivered(a: &Node, b: &Node, files: &[(String, Vec<u8>)], proxy: &Proxy) {
    for (loc, body) in files {
        assert!(
            wait_has(b, &decoded(loc), body, REPLICATION_BOUND),
            "{loc} did not reach B intact\n{}\n{}",
            proxy.describe(),
            describe_statuses(&[a, b])
        );
    }
    wait_queues_empty(&[a, b], REPLICATION_BOUND, "after the faults");
    let expected: BTreeSet<String> = files
        .iter()
        .map(|(l, _)| decoded(l).trim_start_matches('/').to_string())
        .collect();
    let got: BTreeSet<String> = b.stored_files().into_iter().collect();
    assert_eq!(got, expected, "files on B");
    assert!(
        files_with_wrong_sha1(b).is_empty(),
        "B holds files whose bytes do not match their name"
    );
    b.assert_tmp_empty_soon("B after the faults");
}

fn upload(a: &Node, n: usize, size: usize, seed: u64) -> Vec<(String, Vec<u8>)> {
    let mut rng = Rng::new(seed);
    (0..n)
        .map(|i| {
            let body = rng.bytes(size + i);
            (a.put_ok(&format!("/f/{seed}-{i}.bin"), &body), body)
        })
        .collect()
}

#[test]
fn corrupted_bodies_are_refused_and_retried() {
    let proxy = Proxy::start();
    proxy.corrupt(3);
    let (a, b) = pair(&proxy);
    let files = upload(&a, 2, 200 * 1024, 1);
    assert_delivered(&a, &b, &files, &proxy);

    let corrupted: Vec<_> = proxy
        .log()
        .into_iter()
        .filter(|s| s.fault == Fault::Corrupted)
        .collect();
    assert_eq!(
        corrupted.len(),
        3,
        "the proxy should have corrupted 3 bodies\n{}",
        proxy.describe()
    );
    assert!(
        corrupted.iter().all(|s| s.status == Some(400)),
        "the receiver must refuse every corrupted body with 400\n{}",
        proxy.describe()
    );
    let err = queue_to(&a, &b)["last_error"].clone();
    assert!(
        err.as_str().is_some_and(|e| e.contains("400")),
        "last_error should report the 400: {err}"
    );
}

#[test]
fn cut_connections_are_retried() {
    let proxy = Proxy::start();
    proxy.cut(3);
    let (a, b) = pair(&proxy);
    let files = upload(&a, 2, 300 * 1024, 2);
    assert_delivered(&a, &b, &files, &proxy);
    assert_eq!(
        proxy.count(Fault::Cut),
        3,
        "the proxy should have cut 3 transfers\n{}",
        proxy.describe()
    );
    let err = queue_to(&a, &b)["last_error"].clone();
    assert!(
        err.as_str().is_some_and(|e| !e.is_empty()),
        "last_error after cut connections: {err}"
    );
}

#[test]
fn stalled_transfer_is_timed_out_and_retried() {
    // The sender runs with --transfer-timeout 2; the proxy would hold the
    // transfer for 60 s.
    let proxy = Proxy::start();
    proxy.stall(1, Duration::from_secs(60));
    let (a, b) = pair(&proxy);
    let started = Instant::now();
    let files = upload(&a, 1, 1 << 20, 3);
    assert!(
        wait_until(Duration::from_secs(10), || proxy.stalls_begun() == 1),
        "the transfer never stalled\n{}",
        proxy.describe()
    );
    assert_delivered(&a, &b, &files, &proxy);
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(30),
        "delivery took {took:?}: the stall was not timed out"
    );
    let stalled: Vec<_> = proxy
        .log()
        .into_iter()
        .filter(|s| s.fault == Fault::Stalled)
        .collect();
    assert_eq!(stalled.len(), 1, "{}", proxy.describe());
    assert!(
        stalled[0].client_gave_up,
        "the sender should have closed the stalled connection itself\n{}",
        proxy.describe()
    );
    let err = queue_to(&a, &b)["last_error"].clone();
    assert!(
        err.as_str().is_some_and(|e| !e.is_empty()),
        "last_error after a stalled transfer: {err}"
    );
}

#[test]
fn refusal_for_a_while_then_recovery() {
    let proxy = Proxy::start();
    proxy.refuse(true);
    let (a, b) = pair(&proxy);
    let files = upload(&a, 5, 1000, 4);

    // While refused: attempts are made, retried, and reported in /_status.
    let failing = wait_until(REPLICATION_BOUND, || {
        let q = queue_to(&a, &b);
        proxy.count(Fault::Refused) >= 3
            && q["length"].as_u64() == Some(5)
            && q["last_error"].as_str().is_some_and(|e| !e.is_empty())
    });
    let q = queue_to(&a, &b);
    assert!(
        failing,
        "expected retried refusals and a last_error: {q}\n{}",
        proxy.describe()
    );
    assert!(q["last_success"].is_null(), "no success yet: {q}");
    assert!(q["oldest_age_seconds"].is_number(), "{q}");
    assert!(b.stored_files().is_empty(), "B: {:?}", b.stored_files());

    proxy.refuse(false);
    assert_delivered(&a, &b, &files, &proxy);
    let q = queue_to(&a, &b);
    assert!(q["last_success"].is_number(), "after recovery: {q}");
    assert_eq!(q["length"].as_u64(), Some(0), "{q}");
}

#[test]
fn unreachable_target_is_retried_until_it_appears() {
    // B is not running: the proxy answers 502 for it, which is not an
    // accepted answer.
    let proxy = Proxy::start();
    let (pa, pb) = (free_port(), free_port());
    let a = Node::start_on(pa, &node_args(pa, &[pb], Some(&proxy.url()), &[]));
    let mut b = Node::prepare(pb, &node_args(pb, &[], None, &[]));
    let files = upload(&a, 3, 4000, 5);
    let seen_502 = wait_until(REPLICATION_BOUND, || {
        proxy.count(Fault::Unreachable) >= 2
            && queue_to(&a, &b)["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("502"))
    });
    assert!(
        seen_502,
        "A should retry and report the 502: {}\n{}",
        queue_to(&a, &b),
        proxy.describe()
    );
    assert_eq!(queue_to(&a, &b)["length"].as_u64(), Some(3));
    b.restart();
    assert_delivered(&a, &b, &files, &proxy);
}

#[test]
fn a_proxy_that_forwards_whole_bodies_first_still_drains_both_ways() {
    // A simple proxy sends a whole body before it reads the answer, and gives
    // the client nothing when the target stops reading. Every large file
    // also goes back from B to A, which already has it.
    let proxy = Proxy::start();
    proxy.store_and_forward(true);
    let (pa, pb) = (free_port(), free_port());
    let a = Node::start_on(pa, &node_args(pa, &[pb], Some(&proxy.url()), &[]));
    let b = Node::start_on(pb, &node_args(pb, &[pa], Some(&proxy.url()), &[]));
    let mut files = upload(&a, 2, 3 * 1024 * 1024, 7);
    files.extend(upload(&a, 2, 100 * 1024, 8));
    for (loc, body) in &files {
        assert!(
            wait_has(&b, &decoded(loc), body, REPLICATION_BOUND),
            "{loc} did not reach B intact\n{}\n{}",
            proxy.describe(),
            describe_statuses(&[&a, &b])
        );
    }
    wait_queues_empty(
        &[&a, &b],
        REPLICATION_BOUND,
        "through a store-and-forward proxy",
    );
    assert_eq!(
        proxy.count(Fault::Broken),
        0,
        "no request should have lost its answer\n{}",
        proxy.describe()
    );
    // The large files did not travel back to A: B asked first.
    let back_to_a: Vec<_> = proxy
        .log()
        .into_iter()
        .filter(|s| s.port == pa && s.method == "PUT" && s.body_len > 1024 * 1024)
        .collect();
    assert!(
        back_to_a.is_empty(),
        "large copies sent back to A: {back_to_a:?}"
    );
}

/// Read a request head: its first line and its Content-Length (0 when
/// absent); None when the connection ends first.
fn read_head(reader: &mut impl std::io::BufRead) -> Option<(String, usize)> {
    let (mut line, mut first, mut len) = (String::new(), String::new(), 0usize);
    loop {
        line.clear();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return None;
        }
        if first.is_empty() {
            first = line.clone();
        }
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            len = v.trim().parse().unwrap_or(0);
        }
        if line == "\r\n" {
            return Some((first, len));
        }
    }
}

/// A neighbour that answers HEAD slowly (every other time) or with a 200
/// that is not the file (the other times), and records the PUT bodies it
/// gets (answered 201).
fn odd_neighbour() -> (u16, std::sync::Arc<std::sync::Mutex<Vec<Vec<u8>>>>) {
    use std::io::{BufReader, Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let bodies = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let got = bodies.clone();
    std::thread::spawn(move || {
        for (i, conn) in listener.incoming().enumerate() {
            let Ok(conn) = conn else { return };
            let got = got.clone();
            std::thread::spawn(move || {
                let mut reader = BufReader::new(conn.try_clone().unwrap());
                let mut writer = conn;
                let Some((first, len)) = read_head(&mut reader) else {
                    return;
                };
                if first.starts_with("HEAD") {
                    if i % 2 == 0 {
                        std::thread::sleep(Duration::from_millis(2500));
                    }
                    let _ = writer.write_all(
                        b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                    );
                    return;
                }
                let mut body = vec![0u8; len];
                if reader.read_exact(&mut body).is_ok() {
                    got.lock().unwrap().push(body);
                    let _ = writer.write_all(
                        b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                    );
                }
            });
        }
    });
    (port, bodies)
}

#[test]
fn a_large_file_is_sent_whatever_the_question_before_it_got() {
    let (fake, bodies) = odd_neighbour();
    let pa = free_port();
    // node_args gives --transfer-timeout 2: the slow HEAD takes 2.5 s.
    let a = Node::start_on(pa, &node_args(pa, &[fake], None, &[]));
    let body = Rng::new(77).bytes(300 * 1024);
    a.put_ok("/large/odd.bin", &body);
    let arrived = wait_until(REPLICATION_BOUND, || bodies.lock().unwrap().contains(&body));
    assert!(
        arrived,
        "the file never reached a neighbour whose HEAD was slow or not the file\n{}",
        describe_statuses(&[&a])
    );
}

/// A neighbour that answers every request with what `answer` makes of its
/// request line (reading any body first), and counts the requests.
fn scripted_neighbour(
    answer: fn(&str) -> String,
) -> (u16, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::io::{BufReader, Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let count = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = count.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { return };
            let seen = seen.clone();
            std::thread::spawn(move || {
                let mut reader = BufReader::new(conn.try_clone().unwrap());
                let mut writer = conn;
                let Some((first, len)) = read_head(&mut reader) else {
                    return;
                };
                let mut body = vec![0u8; len];
                if reader.read_exact(&mut body).is_ok() {
                    seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    let _ = writer.write_all(answer(first.trim_end()).as_bytes());
                }
            });
        }
    });
    (port, count)
}

#[test]
fn a_redirect_elsewhere_is_not_taken_for_having_the_file() {
    // An http → https redirect in front of a misconfigured neighbour
    // (nginx: `return 302 https://$host$request_uri`): same path.
    let (elsewhere, tries) = scripted_neighbour(|request_line| {
        let path = request_line.split(' ').nth(1).unwrap_or("/");
        format!("HTTP/1.1 302 Found\r\nLocation: https://127.0.0.1{path}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
    });
    // A neighbour that has the file answers 302 naming it.
    let (has_it, _) = scripted_neighbour(|request_line| {
        let path = request_line.split(' ').nth(1).unwrap_or("/");
        format!("HTTP/1.1 302 Found\r\nLocation: {path}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
    });
    let pa = free_port();
    let a = Node::start_on(pa, &node_args(pa, &[elsewhere, has_it], None, &[]));
    a.put_ok("/redirected.txt", b"must reach a real neighbour");
    let elsewhere_url = format!("http://127.0.0.1:{elsewhere}");
    let has_it_url = format!("http://127.0.0.1:{has_it}");
    // Retried (node_args makes retries fast), not counted as delivered.
    assert!(
        wait_until(REPLICATION_BOUND, || tries
            .load(std::sync::atomic::Ordering::SeqCst)
            >= 3),
        "a redirect elsewhere was taken for an answer\n{}",
        describe_statuses(&[&a])
    );
    let status = a.status().expect("A status");
    assert_eq!(
        status["queues"][&elsewhere_url]["length"].as_u64(),
        Some(1),
        "{status}"
    );
    let error = status["queues"][&elsewhere_url]["last_error"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(error.contains("302"), "last_error: {error:?}");
    assert!(
        wait_until(REPLICATION_BOUND, || a.queue_len(&has_it_url) == Some(0)),
        "a 302 naming the file itself is an answer\n{}",
        describe_statuses(&[&a])
    );
}

/// `strace` attached to every thread of `pid`, delaying each `syncfs` by
/// `delay_us`; stopped (by its pid) when dropped.
struct SlowSyncs {
    _strace: KillOnDrop,
}

impl SlowSyncs {
    fn attach(pid: u32, delay_us: u32) -> SlowSyncs {
        SlowSyncs::inject(pid, &format!("syncfs:delay_enter={delay_us}"))
    }

    /// strace's `--inject=` argument of its own.
    fn inject(pid: u32, what: &str) -> SlowSyncs {
        let child = std::process::Command::new("strace")
            .args(["-qq", "-f", "-o", "/dev/null", "-e", "trace=syncfs"])
            .arg(format!("--inject={what}"))
            .args(["-p", &pid.to_string()])
            .spawn()
            .expect("strace is needed for this test (.ci/run installs it)");
        let slow = SlowSyncs {
            _strace: KillOnDrop(child),
        };
        // Attached once every thread of the node has a tracer.
        let traced = || {
            let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
                return false;
            };
            tasks.filter_map(Result::ok).all(|t| {
                std::fs::read_to_string(t.path().join("status")).is_ok_and(|s| {
                    s.lines()
                        .any(|l| l.starts_with("TracerPid:") && l.trim_end() != "TracerPid:\t0")
                })
            })
        };
        assert!(
            wait_until(Duration::from_secs(10), traced),
            "strace did not attach to {pid} (is ptrace allowed here?)"
        );
        slow
    }
}

#[test]
fn a_neighbour_asking_with_no_cache_hears_of_a_file_only_once_it_is_durable() {
    // A sender asks `HEAD` with `Cache-Control: no-cache` before a large
    // file and takes a 200 as "delivered". Between an upload's rename and
    // the sync that makes it durable (before its 201) the file is already
    // in place; such a question must wait for that sync.
    let node = Node::start(&[]);
    let body = Rng::new(5).bytes(20 * 1024);
    let name = format!("/held_{}_{}.bin", unix_now(), sha1_hex(&body));
    let slow = SlowSyncs::attach(node.pid(), 400_000);
    let port = node.port();
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let upload = {
        let (done, name, body) = (done.clone(), name.clone(), body.clone());
        std::thread::spawn(move || {
            let r = request(port, "PUT", &name, &[], &body);
            done.store(true, std::sync::atomic::Ordering::SeqCst);
            r.status
        })
    };
    let mut early = 0;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !done.load(std::sync::atomic::Ordering::SeqCst) && Instant::now() < deadline {
        let r = request(port, "HEAD", &name, &[("Cache-Control", "no-cache")], b"");
        if r.status == 200 && !done.load(std::sync::atomic::Ordering::SeqCst) {
            early += 1;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(upload.join().unwrap(), 201);
    drop(slow);
    // The one question that waited may come back just before the 201 does.
    assert!(
        early <= 1,
        "{early} HEADs with no-cache said 200 before the upload was durable"
    );
    // Without no-cache a reader is not held up by uploads.
    assert_eq!(node.head(&name).status, 200);
}

#[test]
fn an_upload_whose_sync_fails_is_not_kept() {
    // The first sync (the content) succeeds; the one that would make the
    // rename durable fails after a pause, during which a reader finds the
    // file in place and the node keeps a copy of it in memory.
    let node = Node::start(&[]);
    let body = b"written, renamed, never durable".to_vec();
    let name = format!("/failed_{}_{}.txt", unix_now(), sha1_hex(&body));
    let broken = SlowSyncs::inject(node.pid(), "syncfs:error=EIO:delay_enter=1500000:when=2+");
    let port = node.port();
    let upload = {
        let (name, body) = (name.clone(), body.clone());
        std::thread::spawn(move || request(port, "PUT", &name, &[], &body).status)
    };
    let seen = wait_until(Duration::from_secs(10), || node.get(&name).status == 200);
    let status = upload.join().unwrap();
    drop(broken);
    assert!(
        seen,
        "the file never showed up between its rename and its sync"
    );
    assert!(status >= 500, "an upload whose sync failed got {status}");
    // Nothing heard 201: the file is gone, from the disk and from memory.
    assert_eq!(node.get(&name).status, 404);
    assert!(node.stored_files().is_empty(), "{:?}", node.stored_files());
    // The node goes on: the same upload succeeds now.
    assert_eq!(node.put(&name, &body).status, 201);
}

//! Durability (SPEC "HTTP API (one node)" promises of a 201/200, "Command
//! line" shutdown): files survive restarts and crashes, crashes leave nothing
//! partial, big files stream in bounded memory.

mod common;

use std::collections::BTreeSet;
use std::io::ErrorKind;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use sha1::{Digest, Sha1};

use common::*;

const MIB: u64 = 1024 * 1024;

/// Store `count` files of mixed sizes (0 B .. 1 MiB, some in
/// sub-directories) with `threads` parallel clients; returns (Location, sha1).
fn store_mixed(node: &Node, count: usize, threads: usize, seed: u64) -> Vec<(String, String)> {
    let port = node.port();
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            std::thread::spawn(move || {
                let mut out = Vec::new();
                for i in (t..count).step_by(threads) {
                    let mut rng = Rng::new(seed * 100_000 + i as u64);
                    let size = match i % 10 {
                        _ if i == 0 => 0,
                        _ if i == 1 => MIB as usize,
                        0 => rng.below(MIB + 1) as usize,
                        1 | 2 => rng.below(64 * 1024) as usize,
                        _ => rng.below(4096) as usize,
                    };
                    let body = rng.bytes(size);
                    let name = match i % 4 {
                        0 => format!("/top{i}.bin"),
                        1 => format!("/d{}/f{i}.dat", i % 7),
                        2 => format!("/d{}/e{}/g{i}.txt", i % 5, i % 3),
                        _ => format!("/n{i}"),
                    };
                    let r = request(port, "PUT", &name, &[], &body);
                    assert_eq!(r.status, 201, "PUT {name} ({size} bytes): {}", r.describe());
                    let loc = r.header("location").expect("Location");
                    out.push((loc, sha1_hex(&body)));
                }
                out
            })
        })
        .collect();
    handles
        .into_iter()
        .flat_map(|h| h.join().expect("uploader thread"))
        .collect()
}

fn verify_all(node: &Node, files: &[(String, String)], when: &str) {
    for (loc, sha) in files {
        let r = node.get(loc);
        assert_eq!(r.status, 200, "{when}: GET {loc}: {}", r.describe());
        assert_eq!(&sha1_hex(&r.body), sha, "{when}: content of {loc}");
        assert!(
            loc.contains(sha.as_str()),
            "{when}: Location {loc} names the content SHA1"
        );
        let on_disk = std::fs::read(node.stored_path(loc))
            .unwrap_or_else(|e| panic!("{when}: {loc} on disk: {e}"));
        assert_eq!(&sha1_hex(&on_disk), sha, "{when}: {loc} on disk");
    }
}

fn expected_paths(files: &[(String, String)]) -> BTreeSet<String> {
    files
        .iter()
        .map(|(loc, _)| String::from_utf8(percent_decode(loc.trim_start_matches('/'))).unwrap())
        .collect()
}

#[test]
fn many_files_survive_clean_restart() {
    let mut node = Node::start(&[]);
    let files = store_mixed(&node, 300, 3, 1);
    assert_eq!(files.len(), 300);
    verify_all(&node, &files, "before restart");
    assert_eq!(
        node.stored_files().into_iter().collect::<BTreeSet<_>>(),
        expected_paths(&files),
        "storage holds exactly the 300 stored files"
    );
    let status = node.stop();
    assert_eq!(
        status.code(),
        Some(0),
        "SIGTERM must end with exit status 0, got {status}"
    );
    node.restart();
    verify_all(&node, &files, "after clean restart");
    for (loc, _) in files.iter().take(20) {
        let r = node.get(loc);
        let body = r.body.clone();
        let again = node.put(loc, &body);
        assert_eq!(
            again.status,
            302,
            "after restart, re-PUT {loc} is known: {}",
            again.describe()
        );
    }
    node.assert_tmp_empty_soon("after clean restart");
}

#[test]
fn sigterm_exits_zero_even_with_idle_connection() {
    let mut node = Node::start(&[]);
    let loc = node.put_ok("/x.txt", b"x");
    // An idle keep-alive connection must not keep the node from stopping.
    let mut idle = Conn::open(node.port());
    idle.send(b"GET /_status HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let head = idle.read_head().expect("keep-alive response");
    assert_eq!(head.status, 200);
    let status = node.stop_within(Duration::from_secs(15));
    assert_eq!(
        status.code(),
        Some(0),
        "SIGTERM must end with exit status 0, got {status}"
    );
    drop(idle);
    node.restart();
    assert_eq!(node.get(&loc).body, b"x");
}

#[test]
fn kill9_during_large_upload_leaves_nothing_partial() {
    let mut node = Node::start(&[]);
    let before = store_mixed(&node, 10, 1, 2);
    let port = node.port();
    let sent = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let (done_tx, done_rx) = mpsc::channel();
    {
        let sent = sent.clone();
        let stop = stop.clone();
        std::thread::spawn(move || {
            let total: u64 = 200 * MIB;
            let mut conn = Conn::open(port);
            let head = build_head(port, "PUT", "/big/upload.bin", &[], Some(total as usize));
            let mut rng = Rng::new(77);
            let mut buf = vec![0u8; 64 * 1024];
            let mut result = conn.send(&head);
            let mut n = 0u64;
            while result.is_ok() && n < total && !stop.load(Ordering::Relaxed) {
                rng.fill(&mut buf);
                result = conn.send(&buf);
                n += buf.len() as u64;
                sent.store(n, Ordering::Relaxed);
                if n > 16 * MIB {
                    // Slow down so the kill lands mid-body.
                    std::thread::sleep(Duration::from_millis(2));
                }
            }
            let _ = done_tx.send((n, result.err()));
        });
    }
    let reached = wait_until(Duration::from_secs(60), || {
        sent.load(Ordering::Relaxed) >= 24 * MIB
    });
    assert!(reached, "could not send 24 MiB of the upload within 60 s");
    // Not required by the spec, but shows the crash hits a real temp file.
    let tmp_seen = wait_until(Duration::from_secs(5), || !node.tmp_files().is_empty());
    eprintln!(
        "temp files at the kill: {:?} (seen: {tmp_seen})",
        node.tmp_files()
    );
    node.kill9();
    let (n, err) = done_rx
        .recv_timeout(Duration::from_secs(60))
        .expect("uploader ends after the kill");
    stop.store(true, Ordering::Relaxed);
    assert!(
        n < 200 * MIB,
        "the kill must land mid-body (sent {n} bytes)"
    );
    assert!(
        err.as_ref().is_some_and(|e| matches!(
            e.kind(),
            ErrorKind::BrokenPipe | ErrorKind::ConnectionReset
        )),
        "upload should be cut by the kill, got {err:?}"
    );

    node.restart();
    let r = node.get("/_status");
    assert_eq!(r.status, 200, "node serves after kill -9: {}", r.describe());
    assert_eq!(
        node.stored_files().into_iter().collect::<BTreeSet<_>>(),
        expected_paths(&before),
        "only the files stored before the crash are visible"
    );
    node.assert_tmp_empty_soon("leftover temp file of the killed upload after restart");
    verify_all(&node, &before, "after kill -9");
    let r = node.get("/big/upload.bin");
    assert_eq!(
        r.status,
        404,
        "the unfinished upload is not served: {}",
        r.describe()
    );
}

#[test]
fn acknowledged_puts_and_deletes_survive_kill9() {
    let mut node = Node::start(&[]);
    let files = store_mixed(&node, 30, 2, 3);
    let body = b"deleted before the crash";
    let deleted = node.put_ok("/del/me.txt", body);
    let r = node.delete(&deleted);
    assert_eq!(r.status, 200, "DELETE {deleted}: {}", r.describe());
    node.kill9();
    node.restart();
    verify_all(&node, &files, "after kill -9 right after the 201s");
    let r = node.get(&deleted);
    assert_eq!(
        r.status,
        404,
        "deleted file stays deleted after kill -9: {}",
        r.describe()
    );
    let r = node.put(&deleted, body);
    assert_eq!(
        r.status,
        409,
        "deletion log survives kill -9: re-PUT {deleted}: {}",
        r.describe()
    );
    assert!(
        !node.stored_path(&deleted).exists(),
        "no file re-created by the refused PUT"
    );
    assert!(
        !node.storage().join("del").exists(),
        "emptied directory removed"
    );
    let status = node.stop();
    assert_eq!(status.code(), Some(0), "SIGTERM after recovery: {status}");
}

#[test]
fn one_gib_streams_in_bounded_memory() {
    const SIZE: u64 = 1024 * MIB;
    const CHUNK: usize = 256 * 1024;
    let node = Node::start(&[]);
    let started = Instant::now();

    // Upload, generating and hashing on the fly.
    let mut conn = Conn::open(node.port());
    conn.send(&build_head(
        node.port(),
        "PUT",
        "/huge.bin",
        &[],
        Some(SIZE as usize),
    ))
    .unwrap();
    let mut rng = Rng::new(1 << 30);
    let mut hasher = Sha1::new();
    let mut buf = vec![0u8; CHUNK];
    let mut sent = 0u64;
    while sent < SIZE {
        rng.fill(&mut buf);
        hasher.update(&buf);
        conn.send(&buf)
            .unwrap_or_else(|e| panic!("upload cut after {sent} bytes: {e}"));
        sent += CHUNK as u64;
    }
    let sha = hex(&hasher.finalize());
    let r = conn.read_response(false).expect("PUT response");
    assert_eq!(r.status, 201, "1 GiB PUT: {}", r.describe());
    let loc = r.header("location").unwrap();
    assert!(loc.contains(&sha), "Location {loc} should carry SHA1 {sha}");
    let upload_time = started.elapsed();

    // Download, comparing with the regenerated stream (cheaper than hashing).
    let mut conn = Conn::open(node.port());
    conn.send(&build_head(node.port(), "GET", &loc, &[], None))
        .unwrap();
    let head = conn.read_head().expect("GET head");
    assert_eq!(head.status, 200, "GET {loc}: {head:?}");
    assert_eq!(head.header("content-length"), Some(SIZE.to_string()));
    assert_eq!(
        head.header("x-content-sha1")
            .map(|s| s.to_ascii_lowercase()),
        Some(sha.clone())
    );
    let mut rng = Rng::new(1 << 30);
    let mut expect = vec![0u8; CHUNK];
    let mut pos = 0usize; // position inside `expect`
    let mut offset = 0u64;
    let mut mismatch: Option<u64> = None;
    rng.fill(&mut expect);
    let got = conn
        .read_body_with(&head, false, &mut |mut data: &[u8]| {
            while !data.is_empty() {
                if pos == CHUNK {
                    rng.fill(&mut expect);
                    pos = 0;
                }
                let take = data.len().min(CHUNK - pos);
                if mismatch.is_none() && data[..take] != expect[pos..pos + take] {
                    mismatch = Some(offset);
                }
                pos += take;
                offset += take as u64;
                data = &data[take..];
            }
        })
        .expect("download");
    assert_eq!(got, SIZE, "downloaded size");
    assert_eq!(
        mismatch, None,
        "downloaded bytes differ from the uploaded ones (chunk starting near this offset)"
    );

    let hwm_kib = node.peak_rss_kib();
    eprintln!(
        "1 GiB: upload {upload_time:?}, total {:?}, server peak RSS {} MiB",
        started.elapsed(),
        hwm_kib / 1024
    );
    assert!(
        hwm_kib < 64 * 1024,
        "server peak RSS (VmHWM) {hwm_kib} KiB must stay under 64 MiB while streaming 1 GiB"
    );
    let on_disk = std::fs::metadata(node.stored_path(&loc)).unwrap().len();
    assert_eq!(on_disk, SIZE);
}

/// Run the binary with `args` and wait (bounded) for it to exit; returns the
/// exit status and stderr.
fn run_expecting_exit(args: &[&str]) -> (std::process::ExitStatus, String) {
    let ran = run_to_exit(args, Duration::from_secs(10));
    let status = ran.status.unwrap_or_else(|| {
        panic!(
            "cockatiel {args:?} should refuse to start, but was still running after 10 s; stderr:\n{}",
            ran.stderr
        )
    });
    (status, ran.stderr)
}

#[test]
fn unusable_port_flag_or_directory_fails_at_start() {
    let dirs = tempfile::tempdir().unwrap();
    let storage = dirs.path().join("storage");
    let queue = dirs.path().join("queue");
    std::fs::create_dir_all(&storage).unwrap();
    std::fs::create_dir_all(&queue).unwrap();
    let storage = storage.to_str().unwrap();
    let queue = queue.to_str().unwrap();

    // A port someone else holds.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let (status, stderr) = run_expecting_exit(&[
        "-p",
        &port,
        "-H",
        "127.0.0.1",
        "--storage",
        storage,
        "--queue",
        queue,
    ]);
    assert!(
        !status.success(),
        "port in use must give a non-zero exit status, got {status}"
    );
    assert!(
        stderr.contains(&port),
        "stderr should say which port is unusable: {stderr:?}"
    );
    // Such a start leaves no directories behind.
    let fresh_storage = dirs.path().join("fresh-storage");
    let fresh_queue = dirs.path().join("fresh-queue");
    let (status, _) = run_expecting_exit(&[
        "-p",
        &port,
        "-H",
        "127.0.0.1",
        "--storage",
        fresh_storage.to_str().unwrap(),
        "--queue",
        fresh_queue.to_str().unwrap(),
    ]);
    assert!(!status.success(), "port in use: {status}");
    assert!(
        !fresh_storage.exists() && !fresh_queue.exists(),
        "a start that cannot listen created its directories"
    );
    drop(taken);

    // A malformed flag value.
    let free = free_port().to_string();
    let (status, stderr) = run_expecting_exit(&[
        "-p",
        &free,
        "--storage",
        storage,
        "--queue",
        queue,
        "--max-size",
        "lots",
    ]);
    assert!(
        !status.success(),
        "bad --max-size must give a non-zero exit status, got {status}"
    );
    assert!(
        stderr.contains("max-size"),
        "stderr should name the bad flag: {stderr:?}"
    );

    // A stray argument: the one line says what it cannot go with.
    let (status, stderr) =
        run_expecting_exit(&["-p", &free, "--storage", storage, "--queue", queue, "extra"]);
    assert_eq!(status.code(), Some(2), "a stray argument: {status}");
    assert!(
        stderr.contains("'extra'")
            && stderr.contains("--storage")
            && stderr.trim().lines().count() == 1,
        "stderr should say in one line what is wrong: {stderr:?}"
    );

    // A token no client could send in a header.
    let (status, stderr) = run_expecting_exit(&[
        "-p",
        &free,
        "--storage",
        storage,
        "--queue",
        queue,
        "--token",
        "pässwörd",
    ]);
    assert!(
        !status.success(),
        "a non-ASCII token must give a non-zero exit status, got {status}"
    );
    assert!(
        stderr.contains("token") && stderr.trim().lines().count() == 1,
        "stderr should say in one line what is wrong with the token: {stderr:?}"
    );

    // A storage "directory" that is a regular file.
    let file = dirs.path().join("not-a-dir");
    std::fs::write(&file, b"x").unwrap();
    let file = file.to_str().unwrap();
    let (status, stderr) = run_expecting_exit(&["-p", &free, "--storage", file, "--queue", queue]);
    assert!(
        !status.success(),
        "unusable --storage must give a non-zero exit status, got {status}"
    );
    assert!(
        stderr.contains("not-a-dir"),
        "stderr should name the unusable directory: {stderr:?}"
    );
}

#[test]
fn sigterm_during_upload_exits_zero_and_leaves_nothing_partial() {
    let mut node = Node::start(&[]);
    let before = store_mixed(&node, 5, 1, 4);
    let port = node.port();
    let sent = Arc::new(AtomicU64::new(0));
    let (done_tx, done_rx) = mpsc::channel();
    {
        let sent = sent.clone();
        std::thread::spawn(move || {
            let mut conn = Conn::open(port);
            let head = build_head(
                port,
                "PUT",
                "/slow/upload.bin",
                &[],
                Some(100 * MIB as usize),
            );
            let mut result = conn.send(&head);
            let mut rng = Rng::new(5);
            let mut n = 0u64;
            let deadline = Instant::now() + Duration::from_secs(40);
            while result.is_ok() && Instant::now() < deadline {
                result = conn.send(&rng.bytes(4096));
                n += 4096;
                sent.store(n, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = done_tx.send(n);
        });
    }
    assert!(
        wait_until(Duration::from_secs(10), || sent.load(Ordering::Relaxed)
            >= 64 * 1024),
        "upload did not start"
    );
    let status = node.stop();
    assert_eq!(
        status.code(),
        Some(0),
        "SIGTERM with an upload in flight: exit status {status}"
    );
    let n = done_rx
        .recv_timeout(Duration::from_secs(60))
        .expect("uploader ends");
    assert!(n < 100 * MIB, "the upload cannot have completed");
    node.restart();
    assert_eq!(
        node.stored_files().into_iter().collect::<BTreeSet<_>>(),
        expected_paths(&before),
        "no partial file from the upload cut by SIGTERM"
    );
    node.assert_tmp_empty_soon("after SIGTERM during an upload");
    verify_all(&node, &before, "after SIGTERM during an upload");
}

/// A client that hangs up right after sending its upload must not let a
/// DELETE of the same name slip in between the upload's logged operation
/// and its rename (the DELETE would find nothing, and the file would then
/// appear under a deleted name). Dirty data on the file system makes the
/// upload's sync slow, which holds that window open.
#[test]
fn delete_after_a_hung_up_upload_still_deletes() {
    let mut node = Node::start(&[]);
    let body = b"uploaded by a client that hangs up".to_vec();
    // A stored-form name is kept as sent, so the DELETE can name it at once.
    let name = format!("/hang_1700000000_{}.txt", sha1_hex(&body));
    // Half a gigabyte of unsynced data on the same file system.
    let junk = node.root().join("junk.bin");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&junk).expect("junk file");
        let block = vec![7u8; 1 << 20];
        for _ in 0..512 {
            f.write_all(&block).expect("write junk");
        }
    }
    let mut conn = Conn::open(node.port());
    let head = format!(
        "PUT {name} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    conn.send(head.as_bytes()).unwrap();
    conn.send(&body).unwrap();
    // Let the upload reach its commit, then hang up and delete at once.
    std::thread::sleep(Duration::from_millis(50));
    drop(conn);
    let r = node.delete(&name);
    assert!(
        r.status == 200 || r.status == 404,
        "DELETE: {}",
        r.describe()
    );
    let _ = std::fs::remove_file(&junk);
    // Whatever the order, the name ends deleted: absent now and after a restart.
    let gone = wait_until(Duration::from_secs(20), || {
        node.get(&name).status == 404 && !node.stored_path(&name).exists()
    });
    assert!(
        gone,
        "a deleted name is served: GET {} , on disk: {}",
        node.get(&name).status,
        node.stored_path(&name).exists()
    );
    node.kill9();
    node.restart();
    assert_eq!(node.get(&name).status, 404, "after restart");
    assert!(!node.stored_path(&name).exists(), "on disk after restart");
    assert_eq!(node.put(&name, &body).status, 409, "the name stays deleted");
}

#[test]
fn a_state_directory_inside_the_storage_is_out_of_reach() {
    let dirs = tempfile::tempdir().unwrap();
    let storage = dirs.path().join("data");
    let queue = storage.join("state");
    let port = free_port();
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_cockatiel"))
        .args(["-p", &port.to_string(), "-H", "127.0.0.1", "--storage"])
        .arg(&storage)
        .arg("--queue")
        .arg(&queue)
        .env_remove("COCKATIEL_TOKEN")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(dirs.path().join("stderr")).unwrap())
        .spawn()
        .expect("spawn cockatiel");
    let _node = KillOnDrop(child);
    assert!(
        wait_until(Duration::from_secs(10), || try_request(
            port,
            "GET",
            "/_status",
            &[],
            b""
        )
        .is_ok_and(|r| r.status == 200)),
        "node with its state inside its storage did not start: {}",
        std::fs::read_to_string(dirs.path().join("stderr")).unwrap_or_default()
    );
    let stderr = std::fs::read_to_string(dirs.path().join("stderr")).unwrap_or_default();
    assert!(
        stderr.contains("inside the storage directory"),
        "a warning says so: {stderr}"
    );
    let db: Vec<String> = std::fs::read_dir(&queue)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(!db.is_empty(), "the state directory holds the database");
    for file in &db {
        let path = format!("/state/{file}");
        for method in ["GET", "HEAD"] {
            let r = request(port, method, &path, &[], b"");
            assert_eq!(r.status, 404, "{method} {path}: {}", r.describe());
        }
        let r = request(port, "DELETE", &path, &[], b"");
        assert_eq!(r.status, 404, "DELETE {path}: {}", r.describe());
        assert!(queue.join(file).exists(), "{file} is still there");
    }
    // 409, which a neighbour replicating such a name accepts (a 4xx it
    // retries would hold its queue for ever), also for a replica.
    let r = request(port, "PUT", "/state/x.txt", &[], b"x");
    assert_eq!(
        r.status,
        409,
        "PUT into the state directory: {}",
        r.describe()
    );
    assert_error_body(&r, "PUT into the state directory");
    let sha = sha1_hex(b"x");
    let replica = format!("/state/x_1700000000_{sha}.txt");
    let r = request(port, "PUT", &replica, &[("X-Content-SHA1", &sha)], b"x");
    assert_eq!(
        r.status,
        409,
        "replica into the state directory: {}",
        r.describe()
    );
    // Refused before the body is sent.
    let r = put_asking_first(port, "/state/sub/big.bin", &[], 1 << 30);
    assert_eq!(r.status, 409, "{}", r.describe());
    // Names beside it, or whose stored form lies beside it, are ordinary.
    for name in ["/statement.txt", "/state"] {
        let r = request(port, "PUT", name, &[], b"x");
        assert_eq!(r.status, 201, "{name}: {}", r.describe());
        let loc = r.header("location").expect("location");
        assert_eq!(request(port, "GET", &loc, &[], b"").body, b"x");
    }
    assert_eq!(
        std::fs::read_dir(&queue).unwrap().count(),
        db.len(),
        "nothing was stored in the state directory"
    );
}

#[test]
fn a_state_directory_that_is_the_storage_or_in_its_temp_area_is_refused() {
    let dirs = tempfile::tempdir().unwrap();
    let same = dirs.path().join("same");
    let same = same.to_str().unwrap();
    let port = free_port().to_string();
    let (status, stderr) = run_expecting_exit(&["-p", &port, "--storage", same, "--queue", same]);
    assert!(!status.success(), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
    assert!(stderr.contains("is the storage directory"), "{stderr}");

    let storage = dirs.path().join("data");
    let in_temp = storage.join(".tmp").join("state");
    std::fs::create_dir_all(&in_temp).unwrap();
    std::fs::write(in_temp.join("keep"), b"k").unwrap();
    let (status, stderr) = run_expecting_exit(&[
        "-p",
        &port,
        "--storage",
        storage.to_str().unwrap(),
        "--queue",
        in_temp.to_str().unwrap(),
    ]);
    assert!(!status.success(), "{stderr}");
    assert!(stderr.contains("temporary area"), "{stderr}");
    assert!(
        in_temp.join("keep").exists(),
        "refused before anything was emptied"
    );
}

#[test]
fn a_second_node_on_the_same_storage_directory_is_refused() {
    let node = Node::start(&[]);
    let loc = node.put_ok("/shared.txt", b"the first node's file");
    // Its own state directory, the first node's storage: starting would
    // empty the temporary area under the first node's uploads.
    let other_queue = tempfile::tempdir().unwrap();
    let port = free_port().to_string();
    let storage = node.storage();
    // It waits --shutdown-timeout and a few seconds for the lock, then gives up.
    let (status, stderr) = run_expecting_exit(&[
        "-p",
        &port,
        "--storage",
        storage.to_str().unwrap(),
        "--queue",
        other_queue.path().to_str().unwrap(),
        "--shutdown-timeout",
        "0.5",
    ]);
    assert!(
        !status.success(),
        "a second node on one storage directory must not start, got {status}"
    );
    assert!(
        stderr
            .trim()
            .lines()
            .last()
            .is_some_and(|l| l.contains("locked")),
        "stderr should end with one line saying that the storage is locked: {stderr:?}"
    );
    assert_eq!(node.get(&loc).body, b"the first node's file");
    node.put_ok("/after.txt", b"the first node still takes uploads");
}

#[test]
fn a_restart_waits_for_the_stopping_node_to_release_the_storage() {
    // Long enough that the checks below still find the old node draining
    // on a loaded machine (a run of the whole suite once took over 3 s).
    let mut node = Node::start(&["--shutdown-timeout", "8"]);
    let loc = node.put_ok("/kept.txt", b"kept across the restart");
    // A stalled upload keeps the stopping node busy for up to --shutdown-timeout.
    let mut stalled = Conn::open(node.port());
    stalled
        .send(b"PUT /stalled.bin HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\npartial")
        .unwrap();
    let term = std::process::Command::new("kill")
        .args(["-TERM", &node.pid().to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    let old_port = node.port();
    assert!(
        wait_until(Duration::from_secs(5), || {
            std::net::TcpStream::connect(("127.0.0.1", old_port)).is_err()
        }),
        "the stopping node kept listening"
    );
    assert!(node.is_running(), "the old node should still be draining");
    // The new process, as a supervisor would start it as soon as the port is free.
    let port = free_port();
    let stderr = std::fs::File::create(node.root().join("second.stderr")).unwrap();
    let mut second = std::process::Command::new(env!("CARGO_BIN_EXE_cockatiel"))
        .args(["-p", &port.to_string(), "-H", "127.0.0.1", "--storage"])
        .arg(node.storage())
        .arg("--queue")
        .arg(node.queue())
        .stderr(stderr)
        .spawn()
        .unwrap();
    // While it waits for the lock it has its port but does not listen yet:
    // connections are refused rather than left hanging.
    let second_stderr = node.root().join("second.stderr");
    let waiting = wait_until(Duration::from_secs(5), || {
        std::fs::read_to_string(&second_stderr).is_ok_and(|t| t.contains("waiting"))
    });
    let refused_while_waiting =
        waiting && node.is_running() && std::net::TcpStream::connect(("127.0.0.1", port)).is_err();
    let served = wait_until(Duration::from_secs(30), || {
        try_request(port, "GET", "/_status", &[], b"").is_ok_and(|r| r.status == 200)
    });
    let old_exited = !node.is_running();
    let kept = request(port, "GET", &loc, &[], b"");
    let _ = second.kill();
    let _ = second.wait();
    assert!(
        served,
        "the new node never served: {}",
        std::fs::read_to_string(node.root().join("second.stderr")).unwrap_or_default()
    );
    assert!(waiting, "the new node did not say it waits for the lock");
    assert!(
        refused_while_waiting,
        "a node waiting for its storage should refuse connections"
    );
    assert!(old_exited, "the new node served before the old one exited");
    assert_eq!(kept.body, b"kept across the restart");
}

#[test]
fn sigterm_while_waiting_for_the_storage_lock_exits_zero() {
    let node = Node::start(&[]);
    let other_queue = tempfile::tempdir().unwrap();
    let stderr_path = other_queue.path().join("stderr");
    let stderr = std::fs::File::create(&stderr_path).unwrap();
    // Waits up to --shutdown-timeout (60 s here) + 5 s for the first node.
    let mut second = std::process::Command::new(env!("CARGO_BIN_EXE_cockatiel"))
        .args([
            "-p",
            &free_port().to_string(),
            "-H",
            "127.0.0.1",
            "--storage",
        ])
        .arg(node.storage())
        .arg("--queue")
        .arg(other_queue.path().join("q"))
        .args(["--shutdown-timeout", "60"])
        .stderr(stderr)
        .spawn()
        .unwrap();
    let waiting = wait_until(Duration::from_secs(5), || {
        std::fs::read_to_string(&stderr_path).is_ok_and(|t| t.contains("waiting"))
    });
    let term = std::process::Command::new("kill")
        .args(["-TERM", &second.id().to_string()])
        .status()
        .unwrap();
    let mut status = None;
    let exited = wait_until(Duration::from_secs(3), || {
        status = second.try_wait().unwrap();
        status.is_some()
    });
    if !exited {
        let _ = second.kill();
        let _ = second.wait();
    }
    assert!(waiting, "the second node did not wait for the lock");
    assert!(term.success());
    assert!(
        exited,
        "SIGTERM did not stop a node waiting for its storage"
    );
    assert!(
        status.is_some_and(|s| s.success()),
        "exit status {status:?}: {}",
        std::fs::read_to_string(&stderr_path).unwrap_or_default()
    );
    assert_eq!(node.get("/_status").status, 200, "the first node serves on");
}

//! `cockatiel bench`, black-box: the load generator against real nodes on
//! loopback. It must report every phase, check what it reads, clean up
//! after itself unless told to keep the files, and fail clearly.

mod common;

use std::process::Command;
use std::time::Duration;

use common::cluster::*;
use common::*;

/// Run `cockatiel bench ARGS` with a bound; returns (exit code, stdout, stderr).
fn bench(args: &[&str]) -> (Option<i32>, String, String) {
    let all: Vec<&str> = std::iter::once("bench")
        .chain(args.iter().copied())
        .collect();
    let ran = run_to_exit(&all, Duration::from_secs(120));
    assert!(
        ran.status.is_some(),
        "cockatiel bench {args:?} still running after 120 s\n{}\n{}",
        ran.stdout,
        ran.stderr
    );
    (ran.status.and_then(|s| s.code()), ran.stdout, ran.stderr)
}

fn line<'a>(out: &'a str, phase: &str) -> &'a str {
    out.lines()
        .find(|l| l.starts_with(phase))
        .unwrap_or_else(|| panic!("no {phase} line in:\n{out}"))
}

#[test]
fn bench_against_a_cluster_reports_each_phase_and_cleans_up() {
    let nodes = full_mesh(2, None, &[]);
    let all: Vec<&Node> = nodes.iter().collect();
    let (a, b) = (nodes[0].url(), nodes[1].url());
    let (code, out, err) = bench(&[
        "--url",
        &a,
        "--url",
        &b,
        "--files",
        "60",
        "--size",
        "5000",
        "-c",
        "4",
        "--duration",
        "0.5",
        "--prefix",
        "lg/run1",
        "--wait",
        "30",
    ]);
    assert_eq!(code, Some(0), "exit code; stdout:\n{out}\nstderr:\n{err}");
    let put = line(&out, "PUT");
    assert!(
        put.contains(" 60 requests") && put.contains(" 0 errors"),
        "{put}"
    );
    let get = line(&out, "GET");
    assert!(get.contains(" 0 errors"), "{get}");
    let delete = line(&out, "DELETE");
    assert!(
        delete.contains(" 60 requests") && delete.contains(" 0 errors"),
        "{delete}"
    );
    assert!(out.contains("replication: every queue empty"), "{out}");
    assert!(out.contains("deletions: every queue empty"), "{out}");
    // Nothing left behind on either node; the names are in the deletion log.
    wait_queues_empty(&all, REPLICATION_BOUND, "after the bench");
    for node in &nodes {
        assert!(
            node.stored_files().is_empty(),
            "{}: {:?}",
            node.url(),
            node.stored_files()
        );
    }
}

#[test]
fn bench_keeps_its_files_when_asked_and_they_are_intact() {
    let node = Node::start(&[]);
    let (code, out, err) = bench(&[
        "--url",
        &node.url(),
        "--files",
        "20",
        "--size",
        "1K",
        "-c",
        "3",
        "--duration",
        "0.3",
        "--prefix",
        "kept",
        "--keep",
    ]);
    assert_eq!(code, Some(0), "stdout:\n{out}\nstderr:\n{err}");
    assert!(!out.lines().any(|l| l.starts_with("DELETE")), "{out}");
    let files = node.stored_files();
    assert_eq!(files.len(), 20, "{files:?}");
    for f in &files {
        assert!(f.starts_with("kept/"), "{f}");
        let body = std::fs::read(node.storage().join(f)).expect("read stored file");
        assert_eq!(body.len(), 1024, "{f}");
        // The stored name carries the SHA1 of what is on disk.
        assert!(f.contains(&sha1_hex(&body)), "{f}");
    }
}

#[test]
fn bench_fails_clearly_without_a_node_or_with_bad_flags() {
    let port = free_port();
    let (code, _out, err) = bench(&["--url", &format!("http://127.0.0.1:{port}"), "--files", "3"]);
    assert_eq!(code, Some(1), "no node listening: {err}");
    assert!(
        err.starts_with("cockatiel bench: no upload succeeded"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    for bad in [
        &["--files", "0"][..],
        &["--url", "ftp://x"][..],
        &["--prefix", "../up"][..],
        &["-c", "0"][..],
        &["--size", "1T"][..],
    ] {
        let (code, _out, err) = bench(bad);
        assert_eq!(code, Some(2), "{bad:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{bad:?}: one line: {err}");
    }
    // Server flags do not mix with the subcommand.
    let out = Command::new(env!("CARGO_BIN_EXE_cockatiel"))
        .args(["-p", "1", "bench"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn bench_sends_the_token_a_node_requires() {
    let node = Node::start(&["--token", "s3cret"]);
    let url = node.url();
    let (code, out, err) = bench(&[
        "--url",
        &url,
        "--files",
        "5",
        "-c",
        "2",
        "--duration",
        "0.2",
        "--token",
        "s3cret",
    ]);
    assert_eq!(code, Some(0), "with the token: {out}\n{err}");
    assert!(
        node.stored_files().is_empty(),
        "deleted again: {:?}",
        node.stored_files()
    );
    let (code, out, err) = bench(&["--url", &url, "--files", "5", "-c", "2"]);
    assert_eq!(code, Some(1), "without the token: {out}\n{err}");
    assert!(err.contains("PUT answered 401"), "{err}");
    assert!(node.stored_files().is_empty(), "{:?}", node.stored_files());
}

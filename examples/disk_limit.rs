//! How many small uploads per second the disk allows durably, without HTTP or a
//! database: THREADS threads each repeat the steps SPEC promises before a
//! 201 (write a temporary file, fsync it, rename it into place, fsync the
//! directory) for SECONDS seconds, and the files per second are printed as
//! one JSON line. `bench/run.py` runs it on a fresh file system next to the
//! reference harness, so put_small can be compared with what the disk allows.
//!
//!     cargo run --release --example disk_limit -- DIR [THREADS] [SECONDS] [SIZE] [MODE]
//!
//! Two ways of flushing are measured: `per_file` (each thread its own
//! fdatasync and directory fsync, which the kernel's journal batches) and
//! `shared_syncfs` (one thread runs `syncfs` back to back, and each upload
//! waits for two that started after its write: one before the rename, one
//! after; what cockatiel's ingest does). MODE (`per_file` or
//! `shared_syncfs`) measures only that one; the files written in each mode
//! are printed too, so that a caller can divide the CPU time it measured.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// Completed `syncfs` calls, and a condition to wait for the next ones.
struct Flushes {
    done: Mutex<u64>,
    cv: Condvar,
}

impl Flushes {
    /// Return once a flush that started after this call has finished.
    fn wait_for_one_started_now(&self) {
        let Ok(mut done) = self.done.lock() else {
            return;
        };
        // The flush running now may have started before our write: wait
        // for it and the one after.
        let target = *done + 2;
        while *done < target {
            done = match self.cv.wait(done) {
                Ok(d) => d,
                Err(_) => return,
            };
        }
    }
}

/// Files made durable and how many per second.
fn run(
    root: &Path,
    threads: usize,
    secs: f64,
    size: usize,
    shared: bool,
) -> std::io::Result<(u64, f64)> {
    let tmp = root.join(".tmp");
    fs::create_dir_all(&tmp)?;
    let body = vec![b'x'; size];
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let stop = Arc::new(AtomicBool::new(false));
    let flushes = Arc::new(Flushes {
        done: Mutex::new(0),
        cv: Condvar::new(),
    });
    let flusher = shared.then(|| {
        let (stop, flushes, dir) = (stop.clone(), flushes.clone(), File::open(root));
        std::thread::spawn(move || -> std::io::Result<()> {
            let dir = dir?;
            let mut result = Ok(());
            while !stop.load(Ordering::SeqCst) && result.is_ok() {
                result = rustix::fs::syncfs(&dir).map_err(std::io::Error::from);
                if let Ok(mut done) = flushes.done.lock() {
                    // After a failure, release every waiter for good.
                    *done = if result.is_ok() {
                        *done + 1
                    } else {
                        u64::MAX / 2
                    };
                }
                flushes.cv.notify_all();
            }
            result
        })
    });
    let total = Arc::new(AtomicU64::new(0));
    let workers: Vec<_> = (0..threads)
        .map(|t| {
            let (root, tmp, body, flushes, total) = (
                root.to_path_buf(),
                tmp.clone(),
                body.clone(),
                flushes.clone(),
                total.clone(),
            );
            std::thread::spawn(move || -> std::io::Result<()> {
                let dir = File::open(&root)?;
                let mut n = 0u64;
                while Instant::now() < deadline {
                    let temp: PathBuf = tmp.join(format!("{t}-{n}"));
                    let mut f = File::create_new(&temp)?;
                    f.write_all(&body)?;
                    if shared {
                        drop(f);
                        flushes.wait_for_one_started_now();
                        fs::rename(&temp, root.join(format!("f{t}-{n}")))?;
                        flushes.wait_for_one_started_now();
                    } else {
                        f.sync_data()?;
                        drop(f);
                        fs::rename(&temp, root.join(format!("f{t}-{n}")))?;
                        dir.sync_all()?;
                    }
                    n += 1;
                    total.fetch_add(1, Ordering::Relaxed);
                }
                Ok(())
            })
        })
        .collect();
    let started = Instant::now();
    let mut result = Ok(());
    for w in workers {
        match w.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => result = Err(e),
            Err(_) => result = Err(std::io::Error::other("a worker panicked")),
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    stop.store(true, Ordering::SeqCst);
    if let Some(f) = flusher {
        f.join()
            .map_err(|_| std::io::Error::other("the flusher panicked"))??;
    }
    result?;
    let files = total.load(Ordering::Relaxed);
    Ok((files, files as f64 / elapsed))
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(dir) = args.first().map(PathBuf::from) else {
        eprintln!("usage: disk_limit DIR [THREADS] [SECONDS] [SIZE]");
        std::process::exit(2);
    };
    let threads = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(32);
    let secs = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(3.0);
    let size = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(4096);
    let only = args.get(4).map(String::as_str);
    let (mut out, mut counts) = (Vec::new(), Vec::new());
    for (label, shared) in [("per_file", false), ("shared_syncfs", true)] {
        if only.is_some_and(|o| o != label) {
            continue;
        }
        let root = dir.join(label);
        match run(&root, threads, secs, size, shared) {
            Ok((files, rate)) => {
                out.push(format!("\"{label}\": {rate:.0}"));
                counts.push(format!("\"{label}\": {files}"));
            }
            Err(e) => {
                eprintln!("disk_limit {label}: {e}");
                std::process::exit(1);
            }
        }
        // Leave the file system as empty as it was for the next mode.
        let _ = fs::remove_dir_all(&root);
    }
    if out.is_empty() {
        eprintln!("disk_limit: MODE is per_file or shared_syncfs");
        std::process::exit(2);
    }
    println!(
        "{{\"threads\": {threads}, \"size\": {size}, \"files_per_s\": {{{}}}, \"files\": {{{}}}}}",
        out.join(", "),
        counts.join(", ")
    );
}

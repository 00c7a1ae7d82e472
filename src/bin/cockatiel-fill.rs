//! Fills a storage and a state directory with a large, realistic node state
//! for the start-up benchmark: stored files (as if replicated long ago),
//! deleted names in the deletion log, and operations queued for a
//! neighbour that never answers. Not part of the server.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use clap::Parser;
use cockatiel::state::State;

/// Generate a node's storage and state for benchmarks.
#[derive(Debug, Parser)]
#[command(name = "cockatiel-fill")]
struct Args {
    /// Storage directory to fill (created).
    #[arg(long)]
    storage: PathBuf,
    /// State directory to fill (created).
    #[arg(long)]
    queue: PathBuf,
    /// Stored files to create.
    #[arg(long, default_value_t = 1_000_000)]
    files: u64,
    /// Deleted names to put in the deletion log; each is also queued for
    /// the neighbour.
    #[arg(long, default_value_t = 100_000)]
    deletions: u64,
    /// Further uploads queued for the neighbour (their files are created).
    #[arg(long, default_value_t = 0)]
    queued_puts: u64,
    /// The neighbour the operations are queued for (start the node with
    /// the same --node).
    #[arg(long, default_value = "http://127.0.0.1:9")]
    node: String,
    /// Bytes per file.
    #[arg(long, default_value_t = 64)]
    size: usize,
}

fn name_for(i: u64) -> String {
    // Stored form, 1,000 files per directory.
    let sha = format!("{:040x}", u128::from(i) * 0x9e37_79b9_7f4a_7c15);
    format!(
        "d{:04}/f{i}_1700000000_{}.bin",
        i / 1000,
        &sha[sha.len() - 40..]
    )
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let node = cockatiel::config::normalize_url(&args.node)?;
    std::fs::create_dir_all(&args.storage)?;
    let started = Instant::now();
    let body = vec![b'x'; args.size];
    let total = args.files + args.queued_puts;
    for i in 0..total {
        let path = args.storage.join(name_for(i));
        if i % 1000 == 0 {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)?;
            }
        }
        std::fs::File::create(&path)?.write_all(&body)?;
        if i % 100_000 == 99_999 {
            eprintln!("{} files, {:.0?}", i + 1, started.elapsed());
        }
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let state = State::open(&args.queue, std::slice::from_ref(&node))?;
    runtime.block_on(async {
        // Queue the uploads first, then the deletions, in large batches.
        let queued: Vec<String> = (args.files..total).map(name_for).collect();
        for batch in queued.chunks(10_000) {
            let names = batch.to_vec();
            let s = state.clone();
            tokio::task::spawn_blocking(move || s.put_many(names).wait()).await??;
        }
        let mut pending = Vec::new();
        for i in 0..args.deletions {
            let s = state.clone();
            let name = format!("gone/g{i}_1700000000_{:040x}.bin", i);
            pending.push(tokio::spawn(async move {
                s.delete(&name).await?;
                s.unlinked(&name);
                Ok::<_, cockatiel::state::StateError>(())
            }));
            if pending.len() == 10_000 {
                for p in pending.drain(..) {
                    p.await??;
                }
            }
        }
        for p in pending {
            p.await??;
        }
        Ok::<_, Box<dyn std::error::Error>>(())
    })?;
    let queues = state.queues(|_| None)?;
    state.close();
    eprintln!(
        "done in {:.1?}: {} files, {} deletions, queue for {}: {}",
        started.elapsed(),
        total,
        args.deletions,
        node,
        queues.first().map_or(0, |q| q.length)
    );
    Ok(())
}

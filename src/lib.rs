//! cockatiel: a replicating file server. Every node keeps every file as a
//! plain file in its storage directory, and its own state (deletion log,
//! replication queues) in an embedded database.
//!
//! Module map: `config` (command line), `name` (stored-name rules),
//! `store` (files on disk), `state` (the database), `api` (HTTP),
//! `ingest` (making uploads durable in batches), `replicate` (sending to
//! neighbours), `cache` (small files in memory), `error` (errors → status
//! codes), `bench` (the `cockatiel bench` load generator).

pub mod api;
pub mod bench;
pub mod cache;
pub mod config;
pub mod error;
pub mod ingest;
pub mod name;
pub mod replicate;
pub mod state;
pub mod store;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use config::Config;

/// Why a node could not start; each is said in one line.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("storage directory {0}: {1}")]
    Storage(PathBuf, store::StoreError),
    #[error("state directory {0}: {1}")]
    State(PathBuf, state::StateError),
    #[error("cannot listen on {0}: {1}")]
    Listen(String, std::io::Error),
    #[error("{0}")]
    Replicate(#[from] replicate::ReplicateError),
    #[error("finishing interrupted deletions: {0}")]
    Recovery(String),
    #[error("state directory {0}: {1}")]
    Placement(PathBuf, &'static str),
    #[error("state directory {0}: {1}")]
    StateDir(PathBuf, std::io::Error),
}

/// Open the storage and state, finish what a crash interrupted, then serve
/// and replicate until `shutdown` resolves.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), StartError> {
    let config = Arc::new(config);
    tokio::pin!(shutdown);
    // The port is claimed first, so that a start that cannot have it leaves
    // no directories behind; it listens only once it holds the storage, so
    // that while it waits for a stopping node connections are refused.
    let addr = format!("{}:{}", config.host, config.port);
    let socket = bind(&addr)
        .await
        .map_err(|e| StartError::Listen(addr.clone(), e))?;
    // A stop asked for while waiting for the lock ends the start cleanly.
    let locked = tokio::select! {
        locked = lock_storage(&config) => locked?,
        () = &mut shutdown => {
            tracing::info!("stopped before serving");
            return Ok(());
        }
    };
    // Listening now makes the port ours for good (two starting nodes may
    // both have bound it) before anything on disk is touched; requests wait
    // in the backlog while the state opens.
    let listener = socket
        .listen(LISTEN_BACKLOG)
        .map_err(|e| StartError::Listen(addr.clone(), e))?;
    // Before the storage is opened: opening it empties its temporary area.
    let state_dir = state_dir_in_storage(&config)?;
    let store = Arc::new(
        store::Store::open_locked(locked)
            .map_err(|e| StartError::Storage(config.storage.clone(), e))?,
    );
    // A stopping node may close its database a moment after its storage.
    let deadline = tokio::time::Instant::now() + LOCK_GRACE;
    let state = loop {
        match state::State::open_over(&config.queue, &config.neighbours, || {
            store.holds_stored_files()
        }) {
            Err(e) if e.is_already_open() && tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            other => break other.map_err(|e| StartError::State(config.queue.clone(), e))?,
        }
    };
    finish_deletions(&store, &state)?;

    let local: Option<SocketAddr> = listener.local_addr().ok();
    // With -p 0 the kernel picks the port: say which.
    let addr = local.map_or(addr, |a| a.to_string());
    if config.token.is_none() && local.is_some_and(|a| !a.ip().is_loopback()) {
        tracing::warn!(
            "listening on {addr} beyond loopback without a token: anyone who reaches it can write and delete (set --token)"
        );
    }
    let stats = replicate::Stats::default();
    let locks = Arc::new(store::NameLocks::new());
    let senders = replicate::start(&config, &state, &store, &locks, &stats)?;
    tracing::info!(
        "cockatiel {} serving {} on http://{addr} with {} neighbour(s)",
        config::VERSION,
        config.storage.display(),
        config.neighbours.len()
    );
    let ingest = ingest::Ingest::start(store.clone(), state.clone())
        .map_err(|e| StartError::Storage(config.storage.clone(), e.into()))?;
    let api = Arc::new(api::Api::new(
        store,
        state.clone(),
        ingest,
        locks,
        config.clone(),
        stats.clone(),
        state_dir,
    ));
    api::server::serve(listener, api, &config, shutdown).await;
    for s in senders {
        s.abort();
        let _ = s.await;
    }
    // Positions are saved without a flush while running; a clean stop
    // saves the live ones durably, so that nothing is sent again.
    for n in &config.neighbours {
        if let Some(p) = stats.position(n) {
            state.accepted(n, p);
        }
    }
    if let Err(e) = state.flush().await {
        tracing::warn!("saving replication positions at stop: {e}");
    }
    tracing::info!("stopped");
    Ok(())
}

/// Pending connections the kernel keeps for the accept loop.
const LISTEN_BACKLOG: u32 = 1024;

/// A socket bound to `addr` (the first of its addresses that can be had),
/// not yet listening.
async fn bind(addr: &str) -> std::io::Result<tokio::net::TcpSocket> {
    let mut last = std::io::Error::new(std::io::ErrorKind::NotFound, "no address found");
    for a in tokio::net::lookup_host(addr).await? {
        let socket = if a.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        match socket.bind(a) {
            Ok(()) => return Ok(socket),
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// Lock the storage directory. A node being stopped may still hold it while
/// its last requests finish (up to --shutdown-timeout): a restart waits for
/// it, a little longer than that, before giving up.
async fn lock_storage(config: &Config) -> Result<store::Locked, StartError> {
    let deadline = tokio::time::Instant::now() + config.shutdown_timeout + LOCK_GRACE;
    let mut said = false;
    loop {
        match store::lock(&config.storage) {
            Err(store::StoreError::InUse) if tokio::time::Instant::now() < deadline => {
                if !said {
                    tracing::info!(
                        "{} is locked by another process; waiting for it to exit",
                        config.storage.display()
                    );
                    said = true;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            other => return other.map_err(|e| StartError::Storage(config.storage.clone(), e)),
        }
    }
}

/// How much longer than --shutdown-timeout a start waits for the storage lock.
const LOCK_GRACE: Duration = Duration::from_secs(5);

/// Unlink the files of deletions that were logged but maybe not carried
/// out before a crash (DESIGN "At start").
fn finish_deletions(store: &store::Store, state: &state::State) -> Result<(), StartError> {
    let pending = state
        .pending_unlinks()
        .map_err(|e| StartError::Recovery(e.to_string()))?;
    for name in &pending {
        store
            .remove(name)
            .map_err(|e| StartError::Recovery(format!("{name}: {e}")))?;
    }
    if !pending.is_empty() {
        store
            .sync()
            .map_err(|e| StartError::Recovery(e.to_string()))?;
        for name in &pending {
            state.unlinked(name);
        }
    }
    Ok(())
}

/// The state directory's name inside the storage directory, if it lies
/// there (requests must not reach it). Refuses a state directory that is
/// the storage directory itself or inside its temporary area.
fn state_dir_in_storage(config: &Config) -> Result<Option<String>, StartError> {
    let queue_err = |e| StartError::StateDir(config.queue.clone(), e);
    std::fs::create_dir_all(&config.queue).map_err(queue_err)?;
    let queue = std::fs::canonicalize(&config.queue).map_err(queue_err)?;
    let storage_err = |e: std::io::Error| StartError::Storage(config.storage.clone(), e.into());
    if !config.storage.exists() {
        std::fs::create_dir_all(&config.storage).map_err(storage_err)?;
    }
    let storage = std::fs::canonicalize(&config.storage).map_err(storage_err)?;
    match config::state_place(&storage, &queue, store::TEMP_DIR) {
        config::StatePlace::Apart => Ok(None),
        config::StatePlace::Same => Err(StartError::Placement(
            config.queue.clone(),
            "is the storage directory (--storage); give the state a directory of its own",
        )),
        config::StatePlace::InTemp => Err(StartError::Placement(
            config.queue.clone(),
            "is inside the storage directory's temporary area, which is emptied at start",
        )),
        config::StatePlace::Inside(name) => {
            tracing::warn!(
                "the state directory {} is inside the storage directory: cockatiel keeps requests out of /{name}, but a web server serving the storage directory directly would not",
                config.queue.display()
            );
            Ok(Some(name))
        }
    }
}

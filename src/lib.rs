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
    // The port first: a start that cannot listen leaves no directories
    // behind. Connections wait in the backlog until the node serves.
    let addr = format!("{}:{}", config.host, config.port);
    let listener = tokio::net::TcpListener::bind(&addr)
        .await
        .map_err(|e| StartError::Listen(addr.clone(), e))?;
    // Before the storage is opened: opening it empties its temporary area.
    let state_dir = state_dir_in_storage(&config)?;
    let store = Arc::new(
        store::Store::open(&config.storage)
            .map_err(|e| StartError::Storage(config.storage.clone(), e))?,
    );
    let state = state::State::open(&config.queue, &config.neighbours)
        .map_err(|e| StartError::State(config.queue.clone(), e))?;
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

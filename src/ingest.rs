//! The durable half of an upload, done in batches by one thread: for every
//! upload that is waiting, refuse what changes nothing (deleted → 409,
//! present → 302) and write the content to a temp file; one `syncfs` and,
//! at the same time, one state commit logging the batch's replication
//! operations; the no-replace renames; and the next round's `syncfs` makes those renames durable
//! before anyone hears 201. So each round costs one `syncfs` and one
//! commit, shared by everything in it, and a small upload costs one
//! thread hand-off. It never answers before its step is durable, never
//! makes a name visible before its content is durable and its operation
//! logged, and removes one whose sync failed (it syncs through a handle
//! of its own, so such a failure is its to see).

use std::collections::HashSet;
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::oneshot;

use crate::error::Error;
use crate::state::{PendingPuts, PutRecord, State};
use crate::store::{Entry, Placed, Prepared, Store, StoreError, SyncHandle, TempFile};

/// Most uploads made durable together.
const MAX_BATCH: usize = 512;

/// What an upload ended as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// New on this node: 201.
    Created,
    /// This node already had the name: 302.
    Exists,
    /// The name is in the deletion log: 409.
    Deleted,
}

/// The received content: an optional temp file holding the start of a
/// large body, and the rest still in memory.
pub struct Content {
    pub temp: Option<TempFile>,
    pub tail: Bytes,
}

struct Job {
    name: String,
    content: Content,
    reply: oneshot::Sender<Result<Outcome, Error>>,
}

/// Handle to the ingest thread; cheap to clone.
#[derive(Clone)]
pub struct Ingest {
    tx: std_mpsc::Sender<Job>,
    unsettled: Unsettled,
}

/// Names renamed into place whose sync has not returned yet.
#[derive(Clone, Default)]
struct Unsettled(Arc<Mutex<HashSet<String>>>);

impl Unsettled {
    fn set(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Ingest {
    pub fn start(store: Arc<Store>, state: State) -> std::io::Result<Ingest> {
        let (tx, rx) = std_mpsc::channel::<Job>();
        let sync = store.sync_handle().map_err(std::io::Error::other)?;
        let unsettled = Unsettled::default();
        let shared = unsettled.clone();
        std::thread::Builder::new()
            .name("ingest".into())
            .spawn(move || run(&store, &sync, &state, &shared, &rx))?;
        Ok(Ingest { tx, unsettled })
    }

    /// Whether `name` is in place but not yet durable (its upload, holding
    /// the name's lock, has not been answered).
    pub fn is_unsettled(&self, name: &str) -> bool {
        self.unsettled.set().contains(name)
    }

    /// Make `content` durable under the stored name `name`. The caller holds
    /// the name's lock, so no deletion of it runs meanwhile.
    pub async fn submit(&self, name: String, content: Content) -> Result<Outcome, Error> {
        let (reply, rx) = oneshot::channel();
        let gone = || Error::Task("the ingest thread has stopped".into());
        self.tx
            .send(Job {
                name,
                content,
                reply,
            })
            .map_err(|_| gone())?;
        rx.await.map_err(|_| gone())?
    }
}

/// An upload that passed the checks and has its temp file written.
struct Ready {
    name: String,
    temp: TempFile,
    at: Prepared,
    reply: oneshot::Sender<Result<Outcome, Error>>,
}

/// A new file renamed into place: answered `Created` once the next sync
/// has made it durable.
struct Renamed {
    name: String,
    reply: oneshot::Sender<Result<Outcome, Error>>,
}

fn run(
    store: &Store,
    sync: &SyncHandle,
    state: &State,
    unsettled: &Unsettled,
    rx: &std_mpsc::Receiver<Job>,
) {
    let mut renamed: Vec<Renamed> = Vec::new();
    loop {
        // Wait for work only when no renames are waiting for their sync.
        let mut jobs = Vec::new();
        if renamed.is_empty() {
            match rx.recv() {
                Ok(job) => jobs.push(job),
                Err(_) => return,
            }
        }
        while jobs.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(job) => jobs.push(job),
                Err(_) => break,
            }
        }
        let ready = write_temps(store, state, jobs);
        if ready.is_empty() && renamed.is_empty() {
            continue;
        }
        // The operations are logged while the contents sync: both must be
        // durable before any rename, neither needs the other.
        let logging = (!ready.is_empty())
            .then(|| state.put_many(ready.iter().map(|r| r.name.clone()).collect()));
        // One sync: the previous round's renames and this round's contents
        // (and new directories) become durable together.
        let synced = sync.sync();
        for Renamed { name, reply } in renamed.drain(..) {
            let answer = match &synced {
                Ok(()) => Ok(Outcome::Created),
                Err(e) => {
                    // Its content may not have reached the disk, and nobody
                    // heard 201 (its uploader holds the name's lock until
                    // answered): it goes, and its logged operation, finding
                    // no file, is skipped.
                    if let Err(u) = store.remove(&name) {
                        tracing::error!("removing {name} after a failed sync: {u}");
                    }
                    Err(Error::Store(e.copy()))
                }
            };
            // Settled once durable or gone, before anyone hears of it.
            unsettled.set().remove(&name);
            let _ = reply.send(answer);
        }
        if let Err(e) = &synced {
            for r in ready {
                let _ = r.reply.send(Err(Error::Store(e.copy())));
            }
            continue;
        }
        if let Some(logging) = logging {
            renamed = rename(store, unsettled, logging, ready);
        }
    }
}

/// Checks and temp files for a batch; immediate answers for what changes nothing.
fn write_temps(store: &Store, state: &State, jobs: Vec<Job>) -> Vec<Ready> {
    let mut ready: Vec<Ready> = Vec::with_capacity(jobs.len());
    for job in jobs {
        match prepare(store, state, job.name.as_str(), job.content) {
            Ok(Err(outcome)) => {
                let _ = job.reply.send(Ok(outcome));
            }
            Ok(Ok((temp, at))) => ready.push(Ready {
                name: job.name,
                temp,
                at,
                reply: job.reply,
            }),
            Err(e) => {
                let _ = job.reply.send(Err(e));
            }
        }
    }
    ready
}

/// Once their operations are logged, rename a synced batch into place. New
/// names are returned to be answered after the next sync; the rest are
/// answered now.
fn rename(
    store: &Store,
    unsettled: &Unsettled,
    logging: PendingPuts,
    ready: Vec<Ready>,
) -> Vec<Renamed> {
    let records = match logging.wait() {
        Ok(r) => r,
        Err(e) => {
            tracing::error!("logging uploads failed: {e}");
            for r in ready {
                let _ = r.reply.send(Err(Error::State(e.copy())));
            }
            return Vec::new();
        }
    };
    let mut renamed = Vec::with_capacity(ready.len());
    for (mut r, record) in ready.into_iter().zip(records) {
        let outcome = if record == PutRecord::Deleted {
            Ok(Outcome::Deleted)
        } else {
            // Known as unsettled before anyone can find it in place.
            unsettled.set().insert(r.name.clone());
            let placed = place(store, &r.name, &mut r.temp, &mut r.at);
            if !matches!(placed, Ok(Outcome::Created)) {
                unsettled.set().remove(&r.name);
            }
            placed
        };
        if matches!(outcome, Ok(Outcome::Created)) {
            renamed.push(Renamed {
                name: r.name,
                reply: r.reply,
            });
        } else {
            let _ = r.reply.send(outcome);
        }
    }
    renamed
}

/// Refuse what changes nothing, else write the content to its temp file.
fn prepare(
    store: &Store,
    state: &State,
    name: &str,
    content: Content,
) -> Result<Result<(TempFile, Prepared), Outcome>, Error> {
    if state.is_deleted(name)? {
        return Ok(Err(Outcome::Deleted));
    }
    let at = store.prepare(name)?;
    match at.existing {
        Entry::File => return Ok(Err(Outcome::Exists)),
        Entry::Other => return Err(StoreError::NotAFile.into()),
        Entry::Absent => {}
    }
    let mut temp = match content.temp {
        Some(t) => t,
        None => store.create_temp()?,
    };
    temp.write_all(&content.tail)?;
    Ok(Ok((temp, at)))
}

fn place(
    store: &Store,
    name: &str,
    temp: &mut TempFile,
    at: &mut Prepared,
) -> Result<Outcome, Error> {
    // A concurrent deletion may prune the parent directory between prepare
    // and rename; make it again and retry.
    for _ in 0..8 {
        match store.place(temp, at)? {
            Placed::New => return Ok(Outcome::Created),
            Placed::AlreadyThere => return Ok(Outcome::Exists),
            Placed::ParentGone => *at = store.prepare(name)?,
        }
    }
    Err(Error::Task(
        "the parent directory kept disappearing during the upload".into(),
    ))
}

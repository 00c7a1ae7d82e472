//! The durable half of an upload, done in batches: for every upload that
//! is waiting, refuse what changes nothing (deleted → 409, present → 302),
//! write the content to a temp file, then for the whole batch: one
//! `syncfs`, one state commit logging every replication operation, the
//! no-replace renames, and one more `syncfs` before anyone hears 201.
//! One thread does it all, so a small upload costs one hand-off instead of
//! one per step. It never answers before its step is durable, and never
//! makes a name visible before its operation is logged.

use std::sync::mpsc as std_mpsc;
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::oneshot;

use crate::error::Error;
use crate::state::{PutRecord, State};
use crate::store::{Entry, Placed, Prepared, Store, StoreError, TempFile};

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

/// Handle to the ingest thread.
pub struct Ingest {
    tx: std_mpsc::Sender<Job>,
}

impl Ingest {
    pub fn start(store: Arc<Store>, state: State) -> std::io::Result<Ingest> {
        let (tx, rx) = std_mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("ingest".into())
            .spawn(move || {
                while let Ok(first) = rx.recv() {
                    let mut jobs = vec![first];
                    while jobs.len() < MAX_BATCH {
                        match rx.try_recv() {
                            Ok(job) => jobs.push(job),
                            Err(_) => break,
                        }
                    }
                    process(&store, &state, jobs);
                }
            })?;
        Ok(Ingest { tx })
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

fn process(store: &Store, state: &State, jobs: Vec<Job>) {
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
    if ready.is_empty() {
        return;
    }
    // Contents (and new directories) durable before their names are logged.
    if let Err(e) = store.sync() {
        return fail_all(ready, &e);
    }
    let names: Vec<String> = ready.iter().map(|r| r.name.clone()).collect();
    let records = match state.put_many_blocking(names) {
        Ok(r) => r,
        Err(e) => {
            tracing::error!("logging uploads failed: {e}");
            for r in ready {
                let _ = r
                    .reply
                    .send(Err(Error::Task(format!("state database: {e}"))));
            }
            return;
        }
    };
    let mut placed: Vec<(Ready, Result<Outcome, Error>)> = Vec::with_capacity(ready.len());
    for (mut r, record) in ready.into_iter().zip(records) {
        let outcome = if record == PutRecord::Deleted {
            Ok(Outcome::Deleted)
        } else {
            place(store, &r.name, &mut r.temp, &mut r.at)
        };
        placed.push((r, outcome));
    }
    // The renames durable before 201.
    if placed
        .iter()
        .any(|(_, o)| matches!(o, Ok(Outcome::Created)))
    {
        if let Err(e) = store.sync() {
            for (r, _) in placed {
                let _ = r.reply.send(Err(Error::Store(copy_error(&e))));
            }
            return;
        }
    }
    for (r, outcome) in placed {
        let _ = r.reply.send(outcome);
    }
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

fn fail_all(ready: Vec<Ready>, e: &StoreError) {
    for r in ready {
        let _ = r.reply.send(Err(Error::Store(copy_error(e))));
    }
}

/// One error for each waiting upload (io::Error is not Clone).
fn copy_error(e: &StoreError) -> StoreError {
    match e {
        StoreError::DiskFull => StoreError::DiskFull,
        StoreError::ParentNotDir => StoreError::ParentNotDir,
        StoreError::NotAFile => StoreError::NotAFile,
        StoreError::Io(io) => StoreError::Io(std::io::Error::new(io.kind(), io.to_string())),
    }
}

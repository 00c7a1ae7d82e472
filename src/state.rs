//! The node's state database (redb, in the `--queue` directory): the
//! deletion log, the replication operation log with one accepted position
//! per neighbour, and deletions whose unlink may not have finished.
//!
//! All writes go through one writer thread that batches whatever is
//! waiting into a single transaction (group commit), so concurrent uploads
//! share one fsync. Writes that must survive a crash (a new file, a new
//! deletion) are committed durably before the caller is answered; the rest
//! (positions, cleanup) ride along or commit without fsync, because losing
//! them only repeats harmless work. After a failed commit (a full disk,
//! say) the database is opened again before the next one, since redb
//! refuses every write after an I/O error until then. This module never
//! touches stored files.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::mpsc as std_mpsc;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::{oneshot, watch};

const OPLOG: TableDefinition<u64, &[u8]> = TableDefinition::new("oplog");
const DELETED: TableDefinition<&str, u64> = TableDefinition::new("deleted");
const POSITIONS: TableDefinition<&str, u64> = TableDefinition::new("positions");
const PENDING_UNLINK: TableDefinition<&str, ()> = TableDefinition::new("pending_unlink");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const NEXT_SEQ: &str = "next_seq";

/// Most commands folded into one transaction.
const MAX_BATCH: usize = 4096;

/// Least time between two reopenings of a database whose commits fail.
const REOPEN_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("state database: {0}")]
    Db(#[from] redb::Error),
    #[error("state database writer has stopped")]
    WriterGone,
    #[error("corrupt operation {0} in the state database")]
    CorruptOp(u64),
    #[error("the state database is being reopened after an I/O error")]
    Reopening,
}

impl StateError {
    /// Whether the disk (or a quota) is full: 507 rather than 500.
    pub fn is_disk_full(&self) -> bool {
        let io = match self {
            StateError::Db(redb::Error::Io(e)) => e,
            _ => return false,
        };
        crate::store::is_disk_full(io)
    }

    /// Whether another handle (another process) has the database open.
    pub fn is_already_open(&self) -> bool {
        matches!(self, StateError::Db(redb::Error::DatabaseAlreadyOpen))
    }

    /// The same error again, for each of several waiters.
    pub fn copy(&self) -> StateError {
        if self.is_disk_full() {
            return StateError::Db(redb::Error::Io(std::io::Error::from_raw_os_error(
                libc::ENOSPC,
            )));
        }
        match self {
            StateError::WriterGone => StateError::WriterGone,
            StateError::CorruptOp(n) => StateError::CorruptOp(*n),
            StateError::Reopening => StateError::Reopening,
            StateError::Db(e) => {
                StateError::Db(redb::Error::Io(std::io::Error::other(e.to_string())))
            }
        }
    }
}

/// The open database, replaced after an I/O error: redb refuses every write
/// after one ("Previous I/O error occurred") until it is opened again, and
/// only one handle per file may be open.
struct Slot {
    path: PathBuf,
    db: std::sync::RwLock<Option<Arc<Database>>>,
}

impl Slot {
    fn handle(&self) -> Result<Arc<Database>, StateError> {
        self.db
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or(StateError::Reopening)
    }

    /// Drop this handle and open the file again. Readers may still hold the
    /// old one for a moment, so an "already open" is retried briefly; on
    /// failure the slot stays empty and the next batch tries again.
    fn reopen(&self) -> Result<(), StateError> {
        let mut slot = self.db.write().unwrap_or_else(|p| p.into_inner());
        slot.take();
        let mut last = None;
        for _ in 0..50 {
            match Database::create(&self.path) {
                Ok(db) => {
                    *slot = Some(Arc::new(db));
                    return Ok(());
                }
                Err(redb::DatabaseError::DatabaseAlreadyOpen) => {
                    last = Some(redb::DatabaseError::DatabaseAlreadyOpen);
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                Err(e) => return Err(db_err(e)),
            }
        }
        Err(last.map_or(StateError::Reopening, db_err))
    }
}

fn db_err<E: Into<redb::Error>>(e: E) -> StateError {
    StateError::Db(e.into())
}

/// What a replicated operation does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpKind {
    Put,
    Delete,
}

/// One entry of the operation log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Op {
    pub seq: u64,
    pub kind: OpKind,
    /// Unix seconds when the operation was logged.
    pub time: u64,
    pub name: String,
}

fn encode_op(kind: OpKind, time: u64, name: &str) -> Vec<u8> {
    let mut v = Vec::with_capacity(9 + name.len());
    v.push(match kind {
        OpKind::Put => b'P',
        OpKind::Delete => b'D',
    });
    v.extend_from_slice(&time.to_le_bytes());
    v.extend_from_slice(name.as_bytes());
    v
}

fn decode_op(seq: u64, bytes: &[u8]) -> Result<Op, StateError> {
    let bad = || StateError::CorruptOp(seq);
    let (&kind, rest) = bytes.split_first().ok_or_else(bad)?;
    let kind = match kind {
        b'P' => OpKind::Put,
        b'D' => OpKind::Delete,
        _ => return Err(bad()),
    };
    let time = u64::from_le_bytes(
        rest.get(..8)
            .ok_or_else(bad)?
            .try_into()
            .map_err(|_| bad())?,
    );
    let name = std::str::from_utf8(&rest[8..])
        .map_err(|_| bad())?
        .to_string();
    Ok(Op {
        seq,
        kind,
        time,
        name,
    })
}

/// Outcome of logging a stored file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutRecord {
    /// Logged for replication.
    Queued,
    /// The name is in the deletion log; nothing was logged.
    Deleted,
}

/// Outcome of logging a deletion.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeleteRecord {
    /// New in the deletion log, queued for replication.
    New,
    /// Already in the deletion log; nothing was queued again.
    Known,
}

enum Cmd {
    Put(
        Vec<String>,
        oneshot::Sender<Result<Vec<PutRecord>, StateError>>,
    ),
    Delete(String, oneshot::Sender<Result<DeleteRecord, StateError>>),
    /// A durable commit of everything sent before it.
    Flush(oneshot::Sender<Result<(), StateError>>),
    Unlinked(String),
    Accepted(String, u64),
}

/// A commit of uploads in progress (see `State::put_many`).
pub struct PendingPuts(Option<oneshot::Receiver<Result<Vec<PutRecord>, StateError>>>);

impl PendingPuts {
    /// Block until the commit is durable; one record per name, in order.
    pub fn wait(self) -> Result<Vec<PutRecord>, StateError> {
        let rx = self.0.ok_or(StateError::WriterGone)?;
        rx.blocking_recv().map_err(|_| StateError::WriterGone)?
    }
}

/// Per-neighbour figures for `/_status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueInfo {
    pub neighbour: String,
    pub length: u64,
    /// Unix seconds of the oldest operation the neighbour has not accepted.
    pub oldest: Option<u64>,
}

/// Handle to the state database; cheap to clone.
#[derive(Clone)]
pub struct State {
    db: Arc<Slot>,
    tx: std_mpsc::Sender<Cmd>,
    last_seq: watch::Receiver<u64>,
    neighbours: Arc<Vec<String>>,
    writer: Arc<std::sync::Mutex<Option<std::thread::JoinHandle<()>>>>,
    /// Names whose deletion this process logged and whose unlink has not
    /// succeeded yet: only while one is here can its file be present
    /// although deleted (start-up finishes those of earlier runs).
    unlinking: Arc<std::sync::Mutex<HashSet<String>>>,
}

impl State {
    /// Open (or create) `dir/state.redb` and start the writer thread.
    pub fn open(dir: &Path, neighbours: &[String]) -> Result<State, StateError> {
        State::open_over(dir, neighbours, || false)
    }

    /// `open`, for a storage directory that may already hold files: asked
    /// only when the log is new.
    pub fn open_over(
        dir: &Path,
        neighbours: &[String],
        storage_has_files: impl Fn() -> bool,
    ) -> Result<State, StateError> {
        std::fs::create_dir_all(dir).map_err(|e| db_err(redb::StorageError::Io(e)))?;
        let path = dir.join("state.redb");
        let db = Arc::new(Database::create(&path).map_err(db_err)?);
        let next_seq = {
            let txn = db.begin_write().map_err(db_err)?;
            let next = {
                // Create every table so readers never meet a missing one.
                let oplog = txn.open_table(OPLOG).map_err(db_err)?;
                txn.open_table(DELETED).map_err(db_err)?;
                txn.open_table(PENDING_UNLINK).map_err(db_err)?;
                let mut meta = txn.open_table(META).map_err(db_err)?;
                let logged = meta.get(NEXT_SEQ).map_err(db_err)?.map(|v| v.value());
                let next = match logged {
                    Some(next) => next,
                    // A new log over files it does not cover (copied in,
                    // left by the original tool, a new --queue): as if one
                    // operation for all of them had been logged and trimmed,
                    // so that every neighbour is sent everything.
                    None if storage_has_files() => {
                        meta.insert(NEXT_SEQ, 2).map_err(db_err)?;
                        2
                    }
                    None => 1,
                };
                let mut positions = txn.open_table(POSITIONS).map_err(db_err)?;
                // Forget neighbours that are no longer configured (so the
                // log can be trimmed), saying so when that drops operations
                // one of them never accepted.
                let stale: Vec<(String, u64)> = positions
                    .iter()
                    .map_err(db_err)?
                    .filter_map(Result::ok)
                    .map(|(k, v)| (k.value().to_string(), v.value()))
                    .filter(|(k, _)| !neighbours.contains(k))
                    .collect();
                for (k, position) in stale {
                    let unsent = oplog.range(position + 1..).map_err(db_err)?.count();
                    if unsent > 0 {
                        tracing::warn!(
                            "{k} is no longer a --node: forgetting {unsent} operation(s) it had not accepted (added again, it is sent every stored file and deletion)"
                        );
                    }
                    positions.remove(k.as_str()).map_err(db_err)?;
                }
                // Every neighbour has a row (a new one from the start of
                // the log), so one dropped later is known to have had one.
                for n in neighbours {
                    if positions.get(n.as_str()).map_err(db_err)?.is_none() {
                        positions.insert(n.as_str(), 0).map_err(db_err)?;
                    }
                }
                next
            };
            txn.commit().map_err(db_err)?;
            next
        };
        let (tx, rx) = std_mpsc::channel();
        let (seq_tx, last_seq) = watch::channel(next_seq - 1);
        let db = Arc::new(Slot {
            path,
            db: std::sync::RwLock::new(Some(db)),
        });
        let writer = Writer {
            db: db.clone(),
            failed: None,
            reopened_at: None,
            next_seq,
            neighbours: neighbours.to_vec(),
            seq_tx,
        };
        let handle = std::thread::Builder::new()
            .name("state-writer".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| db_err(redb::StorageError::Io(e)))?;
        Ok(State {
            db,
            tx,
            last_seq,
            neighbours: Arc::new(neighbours.to_vec()),
            writer: Arc::new(std::sync::Mutex::new(Some(handle))),
            unlinking: Arc::default(),
        })
    }

    /// Stop the writer after it has committed everything sent to it, and
    /// close the database (when this is the last handle).
    pub fn close(self) {
        let handle = self.writer.lock().unwrap_or_else(|p| p.into_inner()).take();
        drop(self);
        if let Some(handle) = handle {
            let _ = handle.join();
        }
    }

    /// Log a new stored file for replication, durably, unless the name was deleted.
    pub async fn put(&self, name: &str) -> Result<PutRecord, StateError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Cmd::Put(vec![name.to_string()], reply))
            .map_err(|_| StateError::WriterGone)?;
        let records = rx.await.map_err(|_| StateError::WriterGone)??;
        records.first().copied().ok_or(StateError::WriterGone)
    }

    /// `put` for several names at once, from a thread that may block: the
    /// commit starts now and `PendingPuts::wait` returns its outcome, so the
    /// caller can do other work while the database syncs.
    pub fn put_many(&self, names: Vec<String>) -> PendingPuts {
        let (reply, rx) = oneshot::channel();
        let sent = self.tx.send(Cmd::Put(names, reply)).is_ok();
        PendingPuts(sent.then_some(rx))
    }

    /// Log a deletion (and its replication) durably.
    pub async fn delete(&self, name: &str) -> Result<DeleteRecord, StateError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Cmd::Delete(name.to_string(), reply))
            .map_err(|_| StateError::WriterGone)?;
        let record = rx.await.map_err(|_| StateError::WriterGone)??;
        if record == DeleteRecord::New {
            self.unlinking_set().insert(name.to_string());
        }
        Ok(record)
    }

    /// The file of a deleted name is gone from disk; no need to redo it at start.
    pub fn unlinked(&self, name: &str) {
        self.unlinking_set().remove(name);
        let _ = self.tx.send(Cmd::Unlinked(name.to_string()));
    }

    /// Whether `name` was deleted by this process and its unlink has not
    /// succeeded yet (a DELETE that failed after logging the deletion).
    pub fn unlink_pending(&self, name: &str) -> bool {
        self.unlinking_set().contains(name)
    }

    fn unlinking_set(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.unlinking.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `neighbour` has accepted every operation up to and including `upto`.
    pub fn accepted(&self, neighbour: &str, upto: u64) {
        let _ = self.tx.send(Cmd::Accepted(neighbour.to_string(), upto));
    }

    /// Make everything sent to the writer so far durable (positions are
    /// otherwise saved without a flush); for a clean stop.
    pub async fn flush(&self) -> Result<(), StateError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Cmd::Flush(reply))
            .map_err(|_| StateError::WriterGone)?;
        rx.await.map_err(|_| StateError::WriterGone)?
    }

    /// Watch the sequence number of the newest committed operation.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.last_seq.clone()
    }

    pub fn is_deleted(&self, name: &str) -> Result<bool, StateError> {
        let txn = self.db.handle()?.begin_read().map_err(db_err)?;
        let table = txn.open_table(DELETED).map_err(db_err)?;
        Ok(table.get(name).map_err(db_err)?.is_some())
    }

    /// Names whose deletion was logged but whose unlink may not have happened.
    pub fn pending_unlinks(&self) -> Result<Vec<String>, StateError> {
        let txn = self.db.handle()?.begin_read().map_err(db_err)?;
        let table = txn.open_table(PENDING_UNLINK).map_err(db_err)?;
        let mut names = Vec::new();
        for item in table.iter().map_err(db_err)? {
            let (k, _) = item.map_err(db_err)?;
            names.push(k.value().to_string());
        }
        Ok(names)
    }

    /// The position up to which `neighbour` has accepted everything.
    pub fn position(&self, neighbour: &str) -> Result<u64, StateError> {
        let txn = self.db.handle()?.begin_read().map_err(db_err)?;
        let table = txn.open_table(POSITIONS).map_err(db_err)?;
        Ok(table
            .get(neighbour)
            .map_err(db_err)?
            .map_or(0, |v| v.value()))
    }

    /// Up to `limit` operations with a sequence number above `after`.
    pub fn ops_after(&self, after: u64, limit: usize) -> Result<Vec<Op>, StateError> {
        let txn = self.db.handle()?.begin_read().map_err(db_err)?;
        let table = txn.open_table(OPLOG).map_err(db_err)?;
        let mut ops = Vec::new();
        for item in table
            .range(after.saturating_add(1)..)
            .map_err(db_err)?
            .take(limit)
        {
            let (k, v) = item.map_err(db_err)?;
            ops.push(decode_op(k.value(), v.value())?);
        }
        Ok(ops)
    }

    /// Whether `neighbour`, having accepted everything up to `position`,
    /// needs operations the log no longer holds (every neighbour configured
    /// at the time had accepted them: it is new, or came back after being
    /// dropped). Then the answer is the last sequence number such a
    /// neighbour can be said to have once it holds everything stored and
    /// deleted here: the one before the first operation still logged.
    pub fn missing_before(&self, position: u64) -> Result<Option<u64>, StateError> {
        let txn = self.db.handle()?.begin_read().map_err(db_err)?;
        let oplog = txn.open_table(OPLOG).map_err(db_err)?;
        let meta = txn.open_table(META).map_err(db_err)?;
        let next = meta.get(NEXT_SEQ).map_err(db_err)?.map_or(1, |v| v.value());
        let first = oplog
            .first()
            .map_err(db_err)?
            .map_or(next, |(k, _)| k.value());
        Ok((position + 1 < first).then(|| first - 1))
    }

    /// Up to `limit` names of the deletion log after `after` (in key order).
    pub fn deleted_after(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>, StateError> {
        let txn = self.db.handle()?.begin_read().map_err(db_err)?;
        let table = txn.open_table(DELETED).map_err(db_err)?;
        let range = match after {
            Some(a) => {
                table.range::<&str>((std::ops::Bound::Excluded(a), std::ops::Bound::Unbounded))
            }
            None => table.range::<&str>(..),
        }
        .map_err(db_err)?;
        let mut names = Vec::new();
        for item in range.take(limit) {
            let (k, _) = item.map_err(db_err)?;
            names.push(k.value().to_string());
        }
        Ok(names)
    }

    /// Queue figures for every configured neighbour. `live` gives a
    /// neighbour's position when it is newer than the saved one.
    pub fn queues(&self, live: impl Fn(&str) -> Option<u64>) -> Result<Vec<QueueInfo>, StateError> {
        let txn = self.db.handle()?.begin_read().map_err(db_err)?;
        let oplog = txn.open_table(OPLOG).map_err(db_err)?;
        let positions = txn.open_table(POSITIONS).map_err(db_err)?;
        let meta = txn.open_table(META).map_err(db_err)?;
        let last = meta.get(NEXT_SEQ).map_err(db_err)?.map_or(1, |v| v.value()) - 1;
        let first = oplog.first().map_err(db_err)?.map(|(k, _)| k.value());
        let mut out = Vec::with_capacity(self.neighbours.len());
        for n in self.neighbours.iter() {
            let pos = positions
                .get(n.as_str())
                .map_err(db_err)?
                .map_or(0, |v| v.value())
                .max(live(n).unwrap_or(0));
            // Operations before the first one still logged were trimmed.
            let from = first.map_or(last, |f| pos.max(f - 1));
            let length = last.saturating_sub(from);
            let oldest = match oplog.range(from + 1..).map_err(db_err)?.next() {
                Some(item) => {
                    let (k, v) = item.map_err(db_err)?;
                    Some(decode_op(k.value(), v.value())?.time)
                }
                None => None,
            };
            out.push(QueueInfo {
                neighbour: n.clone(),
                length,
                oldest,
            });
        }
        Ok(out)
    }
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

struct Writer {
    db: Arc<Slot>,
    /// The database error of the last commit, if it failed: the database is
    /// reopened before the next one. While it keeps failing (a disk still
    /// full), reopening (which blocks readers) is tried at most every
    /// `REOPEN_EVERY`, and batches in between get this answer at once.
    failed: Option<StateError>,
    reopened_at: Option<std::time::Instant>,
    next_seq: u64,
    neighbours: Vec<String>,
    seq_tx: watch::Sender<u64>,
}

enum Reply {
    Put(
        oneshot::Sender<Result<Vec<PutRecord>, StateError>>,
        Vec<PutRecord>,
    ),
    Delete(
        oneshot::Sender<Result<DeleteRecord, StateError>>,
        DeleteRecord,
    ),
    Flush(oneshot::Sender<Result<(), StateError>>),
}

/// Answer every caller in a batch that could not be committed.
fn fail_batch(batch: Vec<Cmd>, e: &StateError) {
    for cmd in batch {
        match cmd {
            Cmd::Put(_, tx) => {
                let _ = tx.send(Err(e.copy()));
            }
            Cmd::Delete(_, tx) => {
                let _ = tx.send(Err(e.copy()));
            }
            Cmd::Flush(tx) => {
                let _ = tx.send(Err(e.copy()));
            }
            Cmd::Unlinked(_) | Cmd::Accepted(..) => {}
        }
    }
}

impl Writer {
    fn run(mut self, rx: std_mpsc::Receiver<Cmd>) {
        while let Ok(first) = rx.recv() {
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(cmd) => batch.push(cmd),
                    Err(_) => break,
                }
            }
            if let Some(failed) = &self.failed {
                if self
                    .reopened_at
                    .is_some_and(|at| at.elapsed() < REOPEN_EVERY)
                {
                    fail_batch(batch, failed);
                    continue;
                }
                self.reopened_at = Some(std::time::Instant::now());
                match self.reopen() {
                    Ok(()) => self.failed = None,
                    Err(e) => {
                        tracing::error!("reopening the state database: {e}");
                        fail_batch(batch, &e);
                        continue;
                    }
                }
            }
            let start_seq = self.next_seq;
            match self.apply(&mut batch) {
                Ok(replies) => {
                    // Publish before answering, so a caller that got its
                    // answer also sees its operation in the watched sequence.
                    if self.next_seq != start_seq {
                        self.seq_tx.send_replace(self.next_seq - 1);
                    }
                    for reply in replies {
                        match reply {
                            Reply::Put(tx, r) => {
                                let _ = tx.send(Ok(r));
                            }
                            Reply::Delete(tx, r) => {
                                let _ = tx.send(Ok(r));
                            }
                            Reply::Flush(tx) => {
                                let _ = tx.send(Ok(()));
                            }
                        }
                    }
                }
                Err(e) => {
                    self.next_seq = start_seq;
                    tracing::error!("state commit failed: {e}");
                    // redb refuses every write after an I/O error until it
                    // is opened again (e.g. once a full disk has room).
                    fail_batch(batch, &e);
                    self.failed = matches!(e, StateError::Db(_)).then_some(e);
                }
            }
        }
    }

    /// Open the database again and take up its sequence where it stands.
    fn reopen(&mut self) -> Result<(), StateError> {
        self.db.reopen()?;
        let txn = self.db.handle()?.begin_read().map_err(db_err)?;
        let meta = txn.open_table(META).map_err(db_err)?;
        self.next_seq = meta.get(NEXT_SEQ).map_err(db_err)?.map_or(1, |v| v.value());
        tracing::info!("state database reopened");
        Ok(())
    }

    /// Apply a batch in one transaction. Replies are taken out of the batch
    /// only on success, so a failed batch can still answer every caller.
    fn apply(&mut self, batch: &mut Vec<Cmd>) -> Result<Vec<Reply>, StateError> {
        let durable = batch
            .iter()
            .any(|c| matches!(c, Cmd::Put(..) | Cmd::Delete(..) | Cmd::Flush(_)));
        let mut txn = self.db.handle()?.begin_write().map_err(db_err)?;
        txn.set_durability(if durable {
            Durability::Immediate
        } else {
            Durability::None
        })
        .map_err(db_err)?;
        let now = unix_now();
        let mut outcomes: Vec<Option<Result<Vec<PutRecord>, DeleteRecord>>> =
            Vec::with_capacity(batch.len());
        let mut seq = self.next_seq;
        {
            let mut oplog = txn.open_table(OPLOG).map_err(db_err)?;
            let mut deleted = txn.open_table(DELETED).map_err(db_err)?;
            let mut pending = txn.open_table(PENDING_UNLINK).map_err(db_err)?;
            let mut positions = txn.open_table(POSITIONS).map_err(db_err)?;
            let mut meta = txn.open_table(META).map_err(db_err)?;
            let mut positions_moved = false;
            for cmd in batch.iter() {
                let outcome = match cmd {
                    Cmd::Put(names, _) => {
                        let mut records = Vec::with_capacity(names.len());
                        for name in names {
                            if deleted.get(name.as_str()).map_err(db_err)?.is_some() {
                                records.push(PutRecord::Deleted);
                            } else {
                                oplog
                                    .insert(seq, encode_op(OpKind::Put, now, name).as_slice())
                                    .map_err(db_err)?;
                                seq += 1;
                                records.push(PutRecord::Queued);
                            }
                        }
                        Some(Ok(records))
                    }
                    Cmd::Delete(name, _) => {
                        if deleted.get(name.as_str()).map_err(db_err)?.is_some() {
                            Some(Err(DeleteRecord::Known))
                        } else {
                            deleted.insert(name.as_str(), now).map_err(db_err)?;
                            pending.insert(name.as_str(), ()).map_err(db_err)?;
                            oplog
                                .insert(seq, encode_op(OpKind::Delete, now, name).as_slice())
                                .map_err(db_err)?;
                            seq += 1;
                            Some(Err(DeleteRecord::New))
                        }
                    }
                    Cmd::Unlinked(name) => {
                        pending.remove(name.as_str()).map_err(db_err)?;
                        None
                    }
                    Cmd::Flush(_) => None,
                    Cmd::Accepted(neighbour, upto) => {
                        if self.neighbours.contains(neighbour) {
                            let old = positions
                                .get(neighbour.as_str())
                                .map_err(db_err)?
                                .map_or(0, |v| v.value());
                            if *upto > old {
                                positions
                                    .insert(neighbour.as_str(), *upto)
                                    .map_err(db_err)?;
                                positions_moved = true;
                            }
                        }
                        None
                    }
                };
                outcomes.push(outcome);
            }
            if seq != self.next_seq {
                meta.insert(NEXT_SEQ, seq).map_err(db_err)?;
            }
            if seq != self.next_seq || positions_moved {
                // Operations every neighbour has accepted are no longer needed.
                let mut upto = seq - 1;
                for n in &self.neighbours {
                    let p = positions
                        .get(n.as_str())
                        .map_err(db_err)?
                        .map_or(0, |v| v.value());
                    upto = upto.min(p);
                }
                oplog.retain_in(..=upto, |_, _| false).map_err(db_err)?;
            }
        }
        txn.commit().map_err(db_err)?;
        self.next_seq = seq;
        let mut replies = Vec::new();
        for (cmd, outcome) in std::mem::take(batch).into_iter().zip(outcomes) {
            match (cmd, outcome) {
                (Cmd::Put(_, tx), Some(Ok(r))) => replies.push(Reply::Put(tx, r)),
                (Cmd::Delete(_, tx), Some(Err(r))) => replies.push(Reply::Delete(tx, r)),
                (Cmd::Flush(tx), _) => replies.push(Reply::Flush(tx)),
                _ => {}
            }
        }
        Ok(replies)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_disk_is_told_apart_and_survives_the_copy_for_each_waiter() {
        let full = StateError::Db(redb::Error::Io(std::io::Error::from_raw_os_error(
            libc::ENOSPC,
        )));
        assert!(full.is_disk_full());
        assert!(full.copy().is_disk_full());
        let other = StateError::Db(redb::Error::Io(std::io::Error::other("bad sector")));
        assert!(!other.is_disk_full());
        assert!(!other.copy().is_disk_full());
        assert!(!StateError::Reopening.is_disk_full());
    }

    #[tokio::test]
    async fn an_unlink_is_pending_from_a_new_deletion_until_unlinked() {
        let dir = tempfile::tempdir().unwrap();
        let state = State::open(dir.path(), &[]).unwrap();
        assert!(!state.unlink_pending("a"));
        assert_eq!(state.delete("a").await.unwrap(), DeleteRecord::New);
        assert!(state.unlink_pending("a"), "logged, not yet unlinked");
        // A repeated deletion changes nothing: the unlink is still owed.
        assert_eq!(state.delete("a").await.unwrap(), DeleteRecord::Known);
        assert!(state.unlink_pending("a"));
        state.unlinked("a");
        assert!(!state.unlink_pending("a"));
        assert_eq!(state.delete("a").await.unwrap(), DeleteRecord::Known);
        assert!(!state.unlink_pending("a"), "a known deletion owes nothing");
        state.close();
    }

    #[tokio::test]
    async fn deletion_log_blocks_puts_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let neighbours = vec!["http://b".to_string()];
        {
            let state = State::open(dir.path(), &neighbours).unwrap();
            assert_eq!(state.put("a").await.unwrap(), PutRecord::Queued);
            assert_eq!(state.delete("a").await.unwrap(), DeleteRecord::New);
            assert_eq!(state.delete("a").await.unwrap(), DeleteRecord::Known);
            assert_eq!(state.put("a").await.unwrap(), PutRecord::Deleted);
            assert_eq!(
                state.delete("never-stored").await.unwrap(),
                DeleteRecord::New
            );
            state.close();
        }
        let state = State::open(dir.path(), &neighbours).unwrap();
        assert!(state.is_deleted("a").unwrap());
        assert!(!state.is_deleted("b").unwrap());
        let ops = state.ops_after(0, 10).unwrap();
        let kinds: Vec<_> = ops.iter().map(|o| (o.kind, o.name.as_str())).collect();
        assert_eq!(
            kinds,
            vec![
                (OpKind::Put, "a"),
                (OpKind::Delete, "a"),
                (OpKind::Delete, "never-stored")
            ]
        );
        let mut pending = state.pending_unlinks().unwrap();
        pending.sort();
        assert_eq!(pending, vec!["a".to_string(), "never-stored".to_string()]);
        assert_eq!(state.queues(|_| None).unwrap()[0].length, 3);
    }

    #[tokio::test]
    async fn accepted_operations_are_trimmed_and_counted() {
        let dir = tempfile::tempdir().unwrap();
        let neighbours = vec!["http://b".to_string(), "http://c".to_string()];
        let state = State::open(dir.path(), &neighbours).unwrap();
        for i in 0..5 {
            state.put(&format!("f{i}")).await.unwrap();
        }
        state.accepted("http://b", 5);
        state.accepted("http://c", 2);
        // A durable command after the acknowledgements flushes them in order.
        state.put("f5").await.unwrap();
        let q = state.queues(|_| None).unwrap();
        assert_eq!(q[0].length, 1);
        assert_eq!(q[1].length, 4);
        assert_eq!(state.ops_after(0, 100).unwrap().first().unwrap().seq, 3);
        let mut seen = state.subscribe();
        assert_eq!(*seen.borrow_and_update(), 6);
    }

    #[tokio::test]
    async fn without_neighbours_nothing_accumulates() {
        let dir = tempfile::tempdir().unwrap();
        let state = State::open(dir.path(), &[]).unwrap();
        for i in 0..3 {
            state.put(&format!("f{i}")).await.unwrap();
        }
        assert!(state.ops_after(0, 10).unwrap().is_empty());
    }

    #[tokio::test]
    async fn concurrent_puts_share_commits() {
        let dir = tempfile::tempdir().unwrap();
        let state = State::open(dir.path(), &["http://b".to_string()]).unwrap();
        let mut tasks = Vec::new();
        for i in 0..200 {
            let s = state.clone();
            tasks.push(tokio::spawn(async move { s.put(&format!("n{i}")).await }));
        }
        for t in tasks {
            assert_eq!(t.await.unwrap().unwrap(), PutRecord::Queued);
        }
        let ops = state.ops_after(0, 1000).unwrap();
        assert_eq!(ops.len(), 200);
        let seqs: Vec<u64> = ops.iter().map(|o| o.seq).collect();
        assert_eq!(seqs, (1..=200).collect::<Vec<_>>());
    }
}

//! Files on disk: the storage directory (locked while open) and its hidden temporary area.
//! Owns every file-system call on stored files: temp files, the atomic
//! no-replace rename into place, lookups for reading, unlink and the
//! pruning of emptied directories, and making all of it durable (`Syncer`
//! batches concurrent requests into one `syncfs`). `Store` calls block;
//! callers run them off the async workers. It must never follow a symbolic
//! link, never reach outside the storage directory, and never leave a
//! partial file visible under a stored name.

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use rustix::fs::{
    flock, mkdirat, openat, openat2, renameat_with, statat, syncfs, unlinkat, AtFlags, FileType,
    FlockOperation, Mode, OFlags, RenameFlags, ResolveFlags, Stat, CWD,
};
use rustix::io::Errno;

/// The hidden directory for uploads in progress; names starting with `.`
/// are refused by the name rules, so no request can reach it.
pub const TEMP_DIR: &str = ".tmp";

/// Uploads are pushed to disk in stretches of this size while they arrive.
const WRITEBACK_STEP: u64 = 8 * 1024 * 1024;

/// Ask the kernel to start writing a range of a file to disk, without
/// waiting (Linux `sync_file_range(SYNC_FILE_RANGE_WRITE)`). Durability
/// still comes from the sync before the rename; this only starts it early,
/// so a failure here is harmless and ignored.
fn start_writeback(file: &File, offset: u64, len: u64) {
    use std::os::fd::AsRawFd;
    let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
        return;
    };
    // SAFETY: a plain syscall on a file descriptor we own; no memory is passed.
    unsafe {
        libc::sync_file_range(file.as_raw_fd(), offset, len, libc::SYNC_FILE_RANGE_WRITE);
    }
}

/// Chunk size for streaming files: large, so a big transfer costs few
/// thread hops, small enough that memory does not grow with file size.
pub const CHUNK: usize = 512 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("disk full")]
    DiskFull,
    #[error("a parent path of this name is a file")]
    ParentNotDir,
    #[error("a directory or other non-file entry already has this name")]
    NotAFile,
    #[error("locked by another process (is another node running on it?)")]
    InUse,
    #[error("storage I/O error: {0}")]
    Io(io::Error),
}

impl StoreError {
    /// The same error again, for each of several waiters (io::Error is not Clone).
    pub fn copy(&self) -> StoreError {
        match self {
            StoreError::DiskFull => StoreError::DiskFull,
            StoreError::ParentNotDir => StoreError::ParentNotDir,
            StoreError::NotAFile => StoreError::NotAFile,
            StoreError::InUse => StoreError::InUse,
            StoreError::Io(e) => StoreError::Io(io::Error::new(e.kind(), e.to_string())),
        }
    }
}

/// Whether an I/O error means the disk (or a quota) is full; the state
/// database's errors are told apart the same way.
pub fn is_disk_full(e: &io::Error) -> bool {
    e.raw_os_error().is_some_and(|code| {
        code == Errno::NOSPC.raw_os_error() || code == Errno::DQUOT.raw_os_error()
    }) || e.kind() == io::ErrorKind::StorageFull
}

impl From<io::Error> for StoreError {
    fn from(e: io::Error) -> Self {
        if is_disk_full(&e) {
            StoreError::DiskFull
        } else {
            StoreError::Io(e)
        }
    }
}

impl From<Errno> for StoreError {
    fn from(e: Errno) -> Self {
        io::Error::from(e).into()
    }
}

/// What a name points at on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entry {
    Absent,
    File,
    /// A directory, symlink or anything else that is not a regular file.
    Other,
}

/// The storage directory.
#[derive(Debug)]
pub struct Store {
    root: PathBuf,
    root_dir: OwnedFd,
    temp_dir: OwnedFd,
    counter: AtomicU64,
}

/// Resolution that never leaves the directory it starts from and never
/// follows a symbolic link (Linux openat2, kernel 5.6 or later).
fn beneath() -> ResolveFlags {
    ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS
}

fn open_dir_at(dir: BorrowedFd<'_>, path: &str) -> rustix::io::Result<OwnedFd> {
    openat2(
        dir,
        path,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
        beneath(),
    )
}

/// Errors of a lookup that mean "no such stored file" (absent, below a
/// file, through a symlink, outside the root, or too long).
fn is_missing(e: Errno) -> bool {
    matches!(
        e,
        Errno::NOENT | Errno::NOTDIR | Errno::LOOP | Errno::XDEV | Errno::NAMETOOLONG
    )
}

fn entry_of(stat: &Stat) -> Entry {
    if FileType::from_raw_mode(stat.st_mode) == FileType::RegularFile {
        Entry::File
    } else {
        Entry::Other
    }
}

/// The storage directory, open and locked by this process: one node per
/// storage directory, since a second one would empty the temporary area
/// under the first one's uploads. The lock lasts as long as the directory
/// stays open (it moves into the `Store`).
#[derive(Debug)]
pub struct Locked {
    root: PathBuf,
    dir: OwnedFd,
}

/// Open (creating if needed) and lock the storage directory without waiting:
/// `InUse` while another process holds it. A file system without locks is
/// served unguarded rather than not at all.
pub fn lock(root: &Path) -> Result<Locked, StoreError> {
    if root.exists() && !root.is_dir() {
        return Err(StoreError::Io(io::Error::new(
            io::ErrorKind::NotADirectory,
            "exists and is not a directory",
        )));
    }
    std::fs::create_dir_all(root)?;
    let dir = openat(
        CWD,
        root,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    match flock(&dir, FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => {}
        Err(Errno::WOULDBLOCK) => return Err(StoreError::InUse),
        Err(e) => tracing::warn!("cannot lock the storage directory: {e}"),
    }
    Ok(Locked {
        root: root.to_path_buf(),
        dir,
    })
}

impl Store {
    /// Lock and open the storage directory (see `lock` and `open_locked`).
    pub fn open(root: &Path) -> Result<Store, StoreError> {
        Store::open_locked(lock(root)?)
    }

    /// Open a locked storage directory and empty its temporary area:
    /// anything there is an upload a crash interrupted.
    pub fn open_locked(locked: Locked) -> Result<Store, StoreError> {
        let Locked {
            root,
            dir: root_dir,
        } = locked;
        match mkdirat(&root_dir, TEMP_DIR, Mode::from_raw_mode(0o700)) {
            Ok(()) | Err(Errno::EXIST) => {}
            Err(e) => return Err(e.into()),
        }
        let temp_dir = open_dir_at(root_dir.as_fd(), TEMP_DIR)?;
        let store = Store {
            root,
            root_dir,
            temp_dir,
            counter: AtomicU64::new(0),
        };
        store.clear_temp()?;
        // Prove the directory is writable now rather than at the first upload.
        drop(store.create_temp()?);
        Ok(store)
    }

    fn clear_temp(&self) -> Result<(), StoreError> {
        for entry in std::fs::read_dir(self.root.join(TEMP_DIR))? {
            let entry = entry?;
            if entry.file_type()?.is_dir() {
                std::fs::remove_dir_all(entry.path())?;
            } else {
                std::fs::remove_file(entry.path())?;
            }
        }
        Ok(())
    }

    /// A new, empty temporary file in the storage file system.
    pub fn create_temp(&self) -> Result<TempFile, StoreError> {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let name = format!("{}-{n}", std::process::id());
        let fd = openat(
            &self.temp_dir,
            name.as_str(),
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o644),
        )?;
        Ok(TempFile {
            file: File::from(fd),
            path: self.root.join(TEMP_DIR).join(&name),
            name,
            len: 0,
            placed: false,
        })
    }

    /// `openat2` of a stored name for reading, beneath the root without
    /// symlinks, plus `extra` resolve flags.
    fn open_for_read(&self, name: &str, extra: ResolveFlags) -> rustix::io::Result<OwnedFd> {
        // NONBLOCK: opening a FIFO someone left in the directory must not hang.
        let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NONBLOCK;
        // NOATIME: the first read of a new file would otherwise dirty its
        // inode (relatime), one more journal write per replicated file. Only
        // the file's owner may ask; a file placed by another user is opened
        // without it.
        match openat2(
            &self.root_dir,
            name,
            flags | OFlags::NOATIME,
            Mode::empty(),
            beneath() | extra,
        ) {
            Err(rustix::io::Errno::PERM) => openat2(
                &self.root_dir,
                name,
                flags,
                Mode::empty(),
                beneath() | extra,
            ),
            opened => opened,
        }
    }

    /// Open a stored file for reading: None when the name is not a regular
    /// file reached without symbolic links.
    pub fn open_file(&self, name: &str) -> Result<Option<(File, Stat)>, StoreError> {
        let fd = match self.open_for_read(name, ResolveFlags::empty()) {
            Ok(fd) => fd,
            Err(e) if is_missing(e) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let stat = rustix::fs::fstat(&fd)?;
        if entry_of(&stat) != Entry::File {
            return Ok(None);
        }
        Ok(Some((File::from(fd), stat)))
    }

    /// Open a stored file and, when it is at most `read_up_to` bytes, read
    /// it whole. None when there is no regular file by that name.
    pub fn open_read(&self, name: &str, read_up_to: u64) -> Result<Option<Opened>, StoreError> {
        let Some((file, stat)) = self.open_file(name)? else {
            return Ok(None);
        };
        let len = u64::try_from(stat.st_size).unwrap_or(0);
        let small = if len <= read_up_to {
            let mut buf = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
            io::Read::read_to_end(&mut io::Read::take(&file, len), &mut buf)?;
            Some(buf)
        } else {
            None
        };
        Ok(Some(Opened { file, stat, small }))
    }

    /// `open_read` without blocking: lookups and reads that the kernel can
    /// serve from its caches only (RESOLVE_CACHED, RWF_NOWAIT). Anything
    /// else, errors included, is `WouldBlock`, to be retried with `open_read`.
    pub fn open_cached(&self, name: &str, read_up_to: u64) -> Cached {
        let fd = match self.open_for_read(name, ResolveFlags::CACHED) {
            Ok(fd) => fd,
            Err(e) if is_missing(e) => return Cached::Missing,
            Err(_) => return Cached::WouldBlock,
        };
        let Ok(stat) = rustix::fs::fstat(&fd) else {
            return Cached::WouldBlock;
        };
        if entry_of(&stat) != Entry::File {
            return Cached::Missing;
        }
        let len = u64::try_from(stat.st_size).unwrap_or(0);
        let small = if len <= read_up_to {
            let mut buf = vec![0u8; usize::try_from(len).unwrap_or(0)];
            let mut filled = 0;
            while filled < buf.len() {
                match rustix::io::preadv2(
                    &fd,
                    &mut [io::IoSliceMut::new(&mut buf[filled..])],
                    filled as u64,
                    rustix::io::ReadWriteFlags::NOWAIT,
                ) {
                    Ok(0) => break,
                    Ok(n) => filled += n,
                    Err(_) => return Cached::WouldBlock,
                }
            }
            buf.truncate(filled);
            Some(buf)
        } else {
            None
        };
        Cached::Found(Opened {
            file: File::from(fd),
            stat,
            small,
        })
    }

    /// Make sure the parent directories of `name` exist and say what `name`
    /// itself is now. New directories are durable after the next `sync`.
    pub fn prepare(&self, name: &str) -> Result<Prepared, StoreError> {
        // A concurrent deletion may prune a directory we are walking through
        // (mkdirat in it then fails with ENOENT): walk again from the root.
        for _ in 0..8 {
            if let Some(prepared) = self.prepare_once(name)? {
                return Ok(prepared);
            }
        }
        Err(StoreError::Io(io::Error::other(
            "the parent directory kept disappearing",
        )))
    }

    /// One walk for `prepare`; None when a directory vanished under it.
    fn prepare_once(&self, name: &str) -> Result<Option<Prepared>, StoreError> {
        let (dirs, base) = match name.rsplit_once('/') {
            Some((dirs, base)) => (Some(dirs), base),
            None => (None, name),
        };
        let mut parent: Option<OwnedFd> = None;
        for component in dirs.into_iter().flat_map(|d| d.split('/')) {
            let here = parent
                .as_ref()
                .map_or(self.root_dir.as_fd(), |fd| fd.as_fd());
            let next = match open_dir_at(here, component) {
                Ok(fd) => fd,
                Err(Errno::NOENT) => {
                    match mkdirat(here, component, Mode::from_raw_mode(0o755)) {
                        Ok(()) => {}
                        Err(Errno::EXIST) => {} // made by a concurrent upload
                        Err(Errno::NOENT) => return Ok(None), // `here` was pruned
                        Err(e) => return Err(e.into()),
                    }
                    match open_dir_at(here, component) {
                        Ok(fd) => fd,
                        Err(Errno::NOENT) => return Ok(None), // pruned again
                        Err(Errno::NOTDIR | Errno::LOOP | Errno::XDEV) => {
                            return Err(StoreError::ParentNotDir)
                        }
                        Err(e) => return Err(e.into()),
                    }
                }
                Err(Errno::NOTDIR | Errno::LOOP | Errno::XDEV) => {
                    return Err(StoreError::ParentNotDir)
                }
                Err(e) => return Err(e.into()),
            };
            parent = Some(next);
        }
        let here = parent
            .as_ref()
            .map_or(self.root_dir.as_fd(), |fd| fd.as_fd());
        let existing = match statat(here, base, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(stat) => entry_of(&stat),
            Err(Errno::NOENT) => Entry::Absent,
            Err(e) => return Err(e.into()),
        };
        Ok(Some(Prepared {
            parent,
            base: base.to_string(),
            existing,
        }))
    }

    /// Rename a synced temporary file into place, never replacing an
    /// existing entry. The new name is durable after the next `sync`.
    pub fn place(&self, temp: &mut TempFile, at: &Prepared) -> Result<Placed, StoreError> {
        let parent = at
            .parent
            .as_ref()
            .map_or(self.root_dir.as_fd(), |fd| fd.as_fd());
        match renameat_with(
            &self.temp_dir,
            temp.name.as_str(),
            parent,
            at.base.as_str(),
            RenameFlags::NOREPLACE,
        ) {
            Ok(()) => {
                temp.placed = true;
                Ok(Placed::New)
            }
            Err(Errno::EXIST) => Ok(Placed::AlreadyThere),
            // The parent directory was pruned by a concurrent deletion.
            Err(Errno::NOENT) => Ok(Placed::ParentGone),
            Err(e) => Err(e.into()),
        }
    }

    /// Unlink a stored file and prune the directories this leaves empty.
    /// Returns whether a regular file was there. Other entries are left
    /// alone. The unlink is durable after the next `sync`.
    pub fn remove(&self, name: &str) -> Result<bool, StoreError> {
        let (dirs, base) = match name.rsplit_once('/') {
            Some((dirs, base)) => (Some(dirs), base),
            None => (None, name),
        };
        let parent = match dirs {
            None => None,
            Some(dirs) => match open_dir_at(self.root_dir.as_fd(), dirs) {
                Ok(fd) => Some(fd),
                Err(Errno::NOENT | Errno::NOTDIR | Errno::LOOP | Errno::XDEV) => return Ok(false),
                Err(e) => return Err(e.into()),
            },
        };
        let here = parent
            .as_ref()
            .map_or(self.root_dir.as_fd(), |fd| fd.as_fd());
        match statat(here, base, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(stat) if entry_of(&stat) == Entry::File => {}
            Ok(_) | Err(Errno::NOENT) => return Ok(false),
            Err(e) => return Err(e.into()),
        }
        match unlinkat(here, base, AtFlags::empty()) {
            Ok(()) => {}
            Err(Errno::NOENT) => return Ok(false),
            Err(e) => return Err(e.into()),
        }
        if let Some(dirs) = dirs {
            self.prune(dirs);
        }
        Ok(true)
    }

    /// Make every completed write, rename, mkdir and unlink in the storage
    /// file system durable: one `syncfs` covers file data and directory
    /// entries of any number of concurrent uploads.
    pub fn sync(&self) -> Result<(), StoreError> {
        syncfs(&self.root_dir)?;
        Ok(())
    }

    /// A `syncfs` handle of its own. Linux reports a write-back error once
    /// per open file, to the first `syncfs` through it; a party that syncs
    /// for its own writes (the ingest) keeps its own handle, so an error
    /// another party's sync happened to collect still reaches it.
    pub fn sync_handle(&self) -> Result<SyncHandle, StoreError> {
        Ok(SyncHandle(open_dir_at(self.root_dir.as_fd(), ".")?))
    }

    /// Hand every file in stored form whose name a PUT accepts to `each`,
    /// depth first, until it returns false. Hidden entries (the temporary area among them) and
    /// symbolic links are passed over; so is an entry that vanishes
    /// meanwhile (pruned after a deletion) and, with a warning, a directory
    /// this process may not list (a `lost+found` owned by root). Any other
    /// error (out of file descriptors, I/O) ends the walk with it, so that
    /// a caller does not take a partial walk for a whole one. Blocks.
    pub fn for_each_stored(&self, mut each: impl FnMut(String) -> bool) -> Result<(), StoreError> {
        let mut dirs = vec![String::new()];
        while let Some(dir) = dirs.pop() {
            let entries = match std::fs::read_dir(self.root.join(&dir)) {
                Ok(entries) => entries,
                Err(e) if dir.is_empty() => return Err(e.into()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
                    tracing::warn!("passing over /{dir}: {e}");
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            for entry in entries {
                let entry = entry?;
                let Ok(base) = entry.file_name().into_string() else {
                    continue;
                };
                if base.starts_with('.') {
                    continue;
                }
                let rel = if dir.is_empty() {
                    base
                } else {
                    format!("{dir}/{base}")
                };
                let kind = match entry.file_type() {
                    Ok(kind) => kind,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(e.into()),
                };
                if kind.is_dir() {
                    dirs.push(rel);
                } else if kind.is_file() && crate::name::content_sha1(&rel).is_some() {
                    // Held to the rules a neighbour's PUT applies (a file
                    // copied in may sit below a directory no PUT may make).
                    if let Err(e) = crate::name::check(&rel, crate::name::Purpose::Put) {
                        tracing::warn!("passing over {rel}: no node would take that name ({e})");
                    } else if !each(rel) {
                        return Ok(());
                    }
                }
            }
        }
        Ok(())
    }

    /// Whether any file in stored form is here (an unreadable root counts
    /// as yes: sending everything again is the safe side).
    pub fn holds_stored_files(&self) -> bool {
        let mut found = false;
        let walked = self.for_each_stored(|_| {
            found = true;
            false
        });
        walked.is_err() || found
    }

    /// Remove `dirs` and its ancestors while they are empty. Failure to
    /// remove (not empty, raced by an upload) just stops the pruning.
    fn prune(&self, dirs: &str) {
        let mut path = dirs;
        loop {
            if unlinkat(&self.root_dir, path, AtFlags::REMOVEDIR).is_err() {
                return;
            }
            match path.rsplit_once('/') {
                Some((up, _)) => path = up,
                None => return,
            }
        }
    }
}

/// A stored file opened for reading, with its contents when small.
#[derive(Debug)]
pub struct Opened {
    pub file: File,
    pub stat: Stat,
    pub small: Option<Vec<u8>>,
}

/// Result of `open_cached`.
#[derive(Debug)]
pub enum Cached {
    Found(Opened),
    Missing,
    /// Not answerable from the caches alone.
    WouldBlock,
}

/// The parent directory of a name about to be placed, and what is there now.
#[derive(Debug)]
pub struct Prepared {
    /// None: the storage directory itself.
    parent: Option<OwnedFd>,
    base: String,
    pub existing: Entry,
}

/// Result of placing a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placed {
    New,
    AlreadyThere,
    ParentGone,
}

/// An upload in progress; removed on drop unless it was placed.
#[derive(Debug)]
pub struct TempFile {
    file: File,
    name: String,
    path: PathBuf,
    len: u64,
    placed: bool,
}

impl TempFile {
    pub fn write_all(&mut self, buf: &[u8]) -> Result<(), StoreError> {
        self.file.write_all(buf)?;
        let start = self.len;
        self.len += buf.len() as u64;
        // Large uploads: start writing each completed stretch to disk now,
        // so the sync before the rename finds little left to do, and the
        // page cache never fills with one upload's dirty pages.
        if start / WRITEBACK_STEP != self.len / WRITEBACK_STEP {
            let from = (self.len / WRITEBACK_STEP - 1) * WRITEBACK_STEP;
            start_writeback(&self.file, from, WRITEBACK_STEP);
        }
        Ok(())
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.placed {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

type SyncReply = tokio::sync::oneshot::Sender<Result<(), StoreError>>;

/// Group sync: callers that ask while a `syncfs` is running wait for the
/// next one, which then serves all of them. A caller is answered only by a
/// sync that started after it asked, so its writes are covered. Cheap to clone.
#[derive(Clone)]
pub struct Syncer {
    tx: tokio::sync::mpsc::UnboundedSender<SyncReply>,
}

impl Syncer {
    /// Start the sync task (needs a Tokio runtime).
    pub fn start(store: Arc<Store>) -> Syncer {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<SyncReply>();
        tokio::spawn(async move {
            while let Some(first) = rx.recv().await {
                let mut waiters = vec![first];
                while let Ok(w) = rx.try_recv() {
                    waiters.push(w);
                }
                let s = store.clone();
                let result = match tokio::task::spawn_blocking(move || s.sync()).await {
                    Ok(r) => r,
                    Err(e) => Err(StoreError::Io(io::Error::other(e))),
                };
                for w in waiters {
                    let _ = w.send(result.as_ref().map_err(StoreError::copy).copied());
                }
            }
        });
        Syncer { tx }
    }

    /// Wait until everything written before this call is durable.
    pub async fn sync(&self) -> Result<(), StoreError> {
        let (reply, rx) = tokio::sync::oneshot::channel();
        let gone = || StoreError::Io(io::Error::other("the sync task has stopped"));
        self.tx.send(reply).map_err(|_| gone())?;
        rx.await.map_err(|_| gone())?
    }
}

/// See `Store::sync_handle`.
pub struct SyncHandle(OwnedFd);

impl SyncHandle {
    /// `Store::sync` through this handle.
    pub fn sync(&self) -> Result<(), StoreError> {
        syncfs(&self.0)?;
        Ok(())
    }
}

/// Striped locks over names: a PUT and a DELETE of the same name never
/// interleave their commit-and-rename / commit-and-unlink steps, so a
/// deletion can never be overtaken by the rename of a concurrent upload;
/// and a sender that finds a logged file missing knows, once it holds the
/// lock, that the upload is not still between its commit and its rename.
pub struct NameLocks {
    stripes: Vec<tokio::sync::Mutex<()>>,
}

impl NameLocks {
    pub fn new() -> NameLocks {
        NameLocks {
            stripes: (0..256).map(|_| tokio::sync::Mutex::new(())).collect(),
        }
    }

    pub async fn lock(&self, name: &str) -> tokio::sync::MutexGuard<'_, ()> {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        name.hash(&mut h);
        let i = (h.finish() % self.stripes.len() as u64) as usize;
        self.stripes[i].lock().await
    }
}

impl Default for NameLocks {
    fn default() -> Self {
        Self::new()
    }
}

/// Stream `count` bytes of `file` from `start`, one blocking read per chunk.
/// Reads are positional, so streams of one shared file do not disturb each
/// other.
pub fn file_stream(
    file: impl Into<Arc<File>>,
    start: u64,
    count: u64,
) -> impl futures_util::Stream<Item = io::Result<bytes::Bytes>> + Send + 'static {
    futures_util::stream::unfold(
        (Some(file.into()), start, count),
        |(file, offset, left)| async move {
            let file = file?;
            if left == 0 {
                return None;
            }
            let want = usize::try_from(left.min(CHUNK as u64)).unwrap_or(CHUNK);
            let read = tokio::task::spawn_blocking(move || {
                let mut buf = vec![0u8; want];
                let mut filled = 0;
                while filled < want {
                    let n = std::os::unix::fs::FileExt::read_at(
                        &*file,
                        &mut buf[filled..],
                        offset + filled as u64,
                    )?;
                    if n == 0 {
                        break;
                    }
                    filled += n;
                }
                buf.truncate(filled);
                Ok::<_, io::Error>((file, buf))
            })
            .await;
            match read {
                Ok(Ok((file, buf))) if !buf.is_empty() => {
                    let n = buf.len() as u64;
                    Some((
                        Ok(bytes::Bytes::from(buf)),
                        (Some(file), offset + n, left - n),
                    ))
                }
                // Stored files never change; a shorter file is damage, not data.
                Ok(Ok(_)) => Some((
                    Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "file shorter than expected",
                    )),
                    (None, offset, 0),
                )),
                Ok(Err(e)) => Some((Err(e), (None, offset, 0))),
                Err(e) => Some((Err(io::Error::other(e)), (None, offset, 0))),
            }
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(store: &Store, name: &str, body: &[u8]) -> Placed {
        let mut temp = store.create_temp().unwrap();
        temp.write_all(body).unwrap();
        let prepared = store.prepare(name).unwrap();
        store.place(&mut temp, &prepared).unwrap()
    }

    #[test]
    fn place_never_replaces_and_remove_prunes() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(put(&store, "a/b/c.txt", b"one"), Placed::New);
        assert_eq!(put(&store, "a/b/c.txt", b"two"), Placed::AlreadyThere);
        assert_eq!(std::fs::read(dir.path().join("a/b/c.txt")).unwrap(), b"one");
        assert_eq!(
            std::fs::read_dir(dir.path().join(TEMP_DIR))
                .unwrap()
                .count(),
            0
        );
        assert!(store.remove("a/b/c.txt").unwrap());
        assert!(!dir.path().join("a").exists());
        assert!(!store.remove("a/b/c.txt").unwrap());
    }

    #[test]
    fn symlinks_are_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret"), b"s").unwrap();
        let store = Store::open(dir.path()).unwrap();
        std::os::unix::fs::symlink(outside.path(), dir.path().join("evil")).unwrap();
        std::os::unix::fs::symlink(outside.path().join("secret"), dir.path().join("link")).unwrap();
        assert!(store.open_file("evil/secret").unwrap().is_none());
        assert!(store.open_file("link").unwrap().is_none());
        assert!(matches!(
            store.prepare("evil/x"),
            Err(StoreError::ParentNotDir)
        ));
        assert!(!store.remove("link").unwrap());
        assert!(!store.remove("evil/secret").unwrap());
        assert!(outside.path().join("secret").exists());
    }

    #[test]
    fn cached_lookup_agrees_with_blocking_lookup() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        put(&store, "a/f.txt", b"content");
        // Just written, so in the page cache: the fast path finds it.
        match store.open_cached("a/f.txt", 100) {
            Cached::Found(o) => assert_eq!(o.small.as_deref(), Some(&b"content"[..])),
            other => panic!("expected Found, got {other:?}"),
        }
        match store.open_cached("a/f.txt", 3) {
            Cached::Found(o) => assert!(o.small.is_none()),
            other => panic!("expected Found, got {other:?}"),
        }
        // A name never looked up may not be cached (no negative entry yet):
        // after one blocking lookup the fast path knows it is missing.
        assert!(store.open_read("a/none", 100).unwrap().is_none());
        assert!(matches!(store.open_cached("a/none", 100), Cached::Missing));
        assert!(matches!(store.open_cached("a", 100), Cached::Missing));
        let o = store.open_read("a/f.txt", 100).unwrap().unwrap();
        assert_eq!(o.small.as_deref(), Some(&b"content"[..]));
        assert!(store.open_read("a/none", 100).unwrap().is_none());
    }

    #[test]
    fn parent_that_is_a_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        put(&store, "f", b"x");
        assert!(matches!(
            store.prepare("f/x"),
            Err(StoreError::ParentNotDir)
        ));
        assert_eq!(store.prepare("f").unwrap().existing, Entry::File);
        put(&store, "d/x", b"x");
        assert_eq!(store.prepare("d").unwrap().existing, Entry::Other);
    }

    #[test]
    fn a_storage_directory_serves_one_node_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let first = Store::open(dir.path()).unwrap();
        let mut temp = first.create_temp().unwrap();
        temp.write_all(b"in flight").unwrap();
        assert!(matches!(Store::open(dir.path()), Err(StoreError::InUse)));
        // The refused second open left the first one's upload alone.
        assert_eq!(
            std::fs::read_dir(dir.path().join(TEMP_DIR))
                .unwrap()
                .count(),
            1
        );
        drop(temp);
        drop(first);
        Store::open(dir.path()).unwrap();
    }

    #[test]
    fn open_clears_interrupted_uploads() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut temp = store.create_temp().unwrap();
        temp.write_all(b"partial").unwrap();
        std::mem::forget(temp); // as if the process died
        drop(store);
        assert_eq!(
            std::fs::read_dir(dir.path().join(TEMP_DIR))
                .unwrap()
                .count(),
            1
        );
        Store::open(dir.path()).unwrap();
        assert_eq!(
            std::fs::read_dir(dir.path().join(TEMP_DIR))
                .unwrap()
                .count(),
            0
        );
    }
}

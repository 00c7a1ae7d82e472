//! Copies of small stored files in memory, so that reading a hot file costs
//! no system call beyond the socket's. Owns the byte budget and the rule
//! that keeps every entry true: stored files never change (the name carries
//! the content's SHA1), so an entry can only go stale by a deletion, and a
//! deletion forgets the name after its unlink. It must never keep an entry
//! that was read from disk before a deletion it did not see, and never grow
//! past its budget. Which files qualify (stored form, read whole) is the
//! caller's choice; this module does no I/O.

use std::sync::atomic::{AtomicU64, Ordering};

use quick_cache::sync::Cache;
use quick_cache::Weighter;

/// Bookkeeping per entry beyond its key and value (table slot, queue
/// entry, allocation headers), rounded up so that many tiny files cannot
/// exceed the budget.
const ENTRY_OVERHEAD: u64 = 256;

/// A value's share of the budget, in bytes.
pub trait Weighted {
    fn weight(&self) -> u64;
}

#[derive(Clone)]
struct ByWeight;

impl<V: Weighted> Weighter<Box<str>, V> for ByWeight {
    fn weight(&self, key: &Box<str>, value: &V) -> u64 {
        key.len() as u64 + value.weight() + ENTRY_OVERHEAD
    }
}

/// A bounded map from stored name to a copy of the file, evicting what is
/// read least (S3-FIFO, from `quick_cache`).
pub struct FileCache<V> {
    /// None when the budget is zero: nothing is ever kept.
    entries: Option<Cache<Box<str>, V, ByWeight>>,
    /// Deletions so far; a read admits its copy only if none happened
    /// since it started (see `admit`).
    deletions: AtomicU64,
}

impl<V: Clone + Weighted> FileCache<V> {
    /// A cache holding at most `budget` bytes (0: keep nothing).
    pub fn new(budget: u64) -> FileCache<V> {
        let entries = (budget > 0).then(|| {
            // A guess at the number of entries, for the table's initial size.
            let items = usize::try_from(budget / 16_384).unwrap_or(usize::MAX);
            Cache::with_weighter(items.clamp(16, 65_536), budget, ByWeight)
        });
        FileCache {
            entries,
            deletions: AtomicU64::new(0),
        }
    }

    pub fn get(&self, name: &str) -> Option<V> {
        self.entries.as_ref()?.get(name)
    }

    /// Take before opening a file whose copy may be admitted afterwards.
    pub fn ticket(&self) -> u64 {
        self.deletions.load(Ordering::SeqCst)
    }

    /// Keep `value` for `name`, read from disk after `ticket` was taken,
    /// unless any deletion happened since: the file read may be one that a
    /// deletion has unlinked meanwhile, and the copy must not outlive it.
    pub fn admit(&self, name: &str, ticket: u64, value: V) {
        let Some(entries) = &self.entries else {
            return;
        };
        if self.deletions.load(Ordering::SeqCst) != ticket {
            return;
        }
        entries.insert(name.into(), value);
        // A deletion that came between the check and the insert may have
        // looked for the entry before it existed: take the copy back.
        if self.deletions.load(Ordering::SeqCst) != ticket {
            entries.remove(name);
        }
    }

    /// Drop `name`; called after its file was unlinked.
    pub fn forget(&self, name: &str) {
        self.deletions.fetch_add(1, Ordering::SeqCst);
        if let Some(entries) = &self.entries {
            entries.remove(name);
        }
    }

    /// Bytes held now, by the budget's measure.
    pub fn weight(&self) -> u64 {
        self.entries.as_ref().map_or(0, Cache::weight)
    }

    /// Entries held now.
    pub fn len(&self) -> usize {
        self.entries.as_ref().map_or(0, Cache::len)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Debug, PartialEq)]
    struct Copy(Vec<u8>);

    impl Weighted for Copy {
        fn weight(&self) -> u64 {
            self.0.len() as u64
        }
    }

    fn copy(n: usize) -> Copy {
        Copy(vec![7; n])
    }

    #[test]
    fn keeps_what_it_admits_and_forgets_on_deletion() {
        let cache = FileCache::new(1 << 20);
        let t = cache.ticket();
        cache.admit("a_1_x.txt", t, copy(10));
        assert_eq!(cache.get("a_1_x.txt"), Some(copy(10)));
        cache.forget("a_1_x.txt");
        assert_eq!(cache.get("a_1_x.txt"), None);
        assert!(cache.is_empty());
    }

    #[test]
    fn a_read_overtaken_by_a_deletion_is_not_admitted() {
        let cache = FileCache::new(1 << 20);
        let t = cache.ticket();
        // The deletion unlinks and forgets while the read is under way.
        cache.forget("a");
        cache.admit("a", t, copy(10));
        assert_eq!(cache.get("a"), None);
        // Any deletion counts, not only of the same name: the check is cheap
        // and a miss only costs one read from disk.
        let t = cache.ticket();
        cache.forget("b");
        cache.admit("a", t, copy(10));
        assert_eq!(cache.get("a"), None);
        // A read that starts after the deletion is admitted again.
        let t = cache.ticket();
        cache.admit("a", t, copy(10));
        assert_eq!(cache.get("a"), Some(copy(10)));
    }

    #[test]
    fn stays_within_its_budget() {
        let budget = 64 * 1024;
        let cache = FileCache::new(budget);
        for i in 0..1000 {
            let t = cache.ticket();
            cache.admit(&format!("f{i}"), t, copy(4096));
        }
        assert!(cache.weight() <= budget, "{} > {budget}", cache.weight());
        assert!(!cache.is_empty());
        // A copy larger than the whole budget is never kept.
        let t = cache.ticket();
        cache.admit("huge", t, copy(budget as usize + 1));
        assert_eq!(cache.get("huge"), None);
    }

    #[test]
    fn a_zero_budget_keeps_nothing() {
        let cache = FileCache::new(0);
        let t = cache.ticket();
        cache.admit("a", t, copy(1));
        assert_eq!(cache.get("a"), None);
        assert_eq!(cache.weight(), 0);
    }

    #[test]
    fn concurrent_reads_and_deletions_never_leave_a_deleted_name() {
        use std::sync::Arc;
        // Readers admit copies of names while a deleter removes them one by
        // one; afterwards no deleted name may still be held.
        let cache = Arc::new(FileCache::new(1 << 20));
        let deleted = Arc::new(std::sync::Mutex::new(std::collections::HashSet::new()));
        let readers: Vec<_> = (0..4)
            .map(|r| {
                let (cache, deleted) = (cache.clone(), deleted.clone());
                std::thread::spawn(move || {
                    for i in 0..20_000u32 {
                        let name = format!("n{}", (i * 7 + r) % 200);
                        let t = cache.ticket();
                        // "Open" the file: it exists unless deleted.
                        let exists = !deleted.lock().is_ok_and(|d| d.contains(&name));
                        if exists {
                            cache.admit(&name, t, copy(8));
                        }
                    }
                })
            })
            .collect();
        for i in 0..200 {
            let name = format!("n{i}");
            if let Ok(mut d) = deleted.lock() {
                d.insert(name.clone()); // the unlink
            }
            cache.forget(&name);
        }
        for r in readers {
            r.join().expect("reader thread");
        }
        for i in 0..200 {
            assert_eq!(
                cache.get(&format!("n{i}")),
                None,
                "n{i} outlived its deletion"
            );
        }
    }
}

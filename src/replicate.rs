//! Replication to neighbours: one sender task per neighbour that reads the
//! operation log after that neighbour's position, keeps a bounded number of
//! requests in flight, advances the position as answers come back, and
//! backs off while the neighbour fails. It wakes when the log grows and
//! never polls. A neighbour that needs operations no longer logged (new,
//! or dropped and added back) is also sent every deletion and stored file.
//! It never changes files or the deletion log: it only reads
//! the log and stored files and records positions.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use tokio::task::JoinSet;

use crate::config::Config;
use crate::name;
use crate::state::{unix_now, Op, OpKind, State};
use crate::store::{self, Cached, NameLocks, Opened, Store};

/// Save a neighbour's position after this many accepted operations, this
/// much time, or whenever it has caught up.
const SAVE_EVERY_OPS: u64 = 1024;
const SAVE_EVERY: Duration = Duration::from_secs(1);

/// Files up to this size are sent from memory, read in one call; larger
/// ones only after a HEAD shows the neighbour lacks them.
const SMALL_BODY: u64 = 256 * 1024;

/// Why a neighbour did not accept an operation. `refused`: it answered
/// about this operation in particular (`refuses_this_one`), so other
/// operations may well go through.
#[derive(Debug)]
struct Failure {
    text: String,
    refused: bool,
}

impl From<String> for Failure {
    fn from(text: String) -> Failure {
        Failure {
            text,
            refused: false,
        }
    }
}

/// Whether an answer refuses this operation rather than any operation: a
/// body that does not match its hash or a name the neighbour's rules refuse
/// (400), a reserved name (405), over its `--max-size` (413), a name too
/// long for it (414, or 431: the name is the part of the head that
/// varies). Anything else (401, 403 or 404 from a proxy, 407, 5xx) may be
/// about every request and is waited out.
fn refuses_this_one(status: u16) -> bool {
    matches!(status, 400 | 405 | 413 | 414 | 431)
}

/// Files a catch-up pass keeps aside when the neighbour refuses them, to
/// try again once the rest went through; beyond that the pass goes on
/// without keeping them, and is made again after a pause.
const REFUSED_KEPT: usize = 1024;

/// Longest pause between catch-up passes that keep ending short.
const MAX_PASS_PAUSE: Duration = Duration::from_secs(3600);

/// The next retry delay after a failure: doubling from `min`, capped at `max`.
pub fn next_backoff(current: Duration, min: Duration, max: Duration) -> Duration {
    current.saturating_mul(2).clamp(min, max)
}

/// Live figures per neighbour for `/_status` (not persisted).
#[derive(Debug, Clone, Default)]
pub struct NeighbourStats {
    pub last_success: Option<u64>,
    pub last_error: Option<String>,
    pub last_error_at: Option<u64>,
    pub in_flight: usize,
    /// Seconds until the next retry while backing off.
    pub retry_in: Option<f64>,
    /// Everything up to this sequence number is accepted (live; the
    /// database copy is written lazily, and a clean stop writes this).
    pub position: Option<u64>,
    /// During a catch-up pass, how far the log itself is accepted (ahead
    /// of `position`, which waits for the pass): what `/_status` counts.
    pub log_position: Option<u64>,
    /// While a neighbour that needs operations no longer logged is sent
    /// everything: files and deletions found so far, and accepted.
    pub catching_up: Option<(u64, u64)>,
}

/// Shared table of `NeighbourStats`.
#[derive(Debug, Clone, Default)]
pub struct Stats(Arc<Mutex<HashMap<String, NeighbourStats>>>);

impl Stats {
    /// The live accepted position of `neighbour`, if its sender runs.
    pub fn position(&self, neighbour: &str) -> Option<u64> {
        let map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        map.get(neighbour).and_then(|s| s.position)
    }

    /// How far `neighbour` accepted the log (for counting its queue).
    pub fn log_position(&self, neighbour: &str) -> Option<u64> {
        let map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        map.get(neighbour)
            .and_then(|s| s.log_position.or(s.position))
    }

    pub fn get(&self, neighbour: &str) -> Option<NeighbourStats> {
        let map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        map.get(neighbour).cloned()
    }

    fn update(&self, neighbour: &str, f: impl FnOnce(&mut NeighbourStats)) {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        f(map.entry(neighbour.to_string()).or_default());
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReplicateError {
    #[error("cannot build the HTTP client: {0}")]
    Client(#[from] reqwest::Error),
}

/// Start one sender per neighbour.
pub fn start(
    config: &Arc<Config>,
    state: &State,
    store: &Arc<Store>,
    locks: &Arc<NameLocks>,
    stats: &Stats,
) -> Result<Vec<tokio::task::JoinHandle<()>>, ReplicateError> {
    let mut builder = reqwest::Client::builder()
        .connect_timeout(config.connect_timeout)
        .user_agent(concat!("cockatiel/", env!("CARGO_PKG_VERSION")))
        .tcp_nodelay(true)
        .pool_max_idle_per_host(config.max_in_flight)
        .redirect(reqwest::redirect::Policy::none());
    builder = match &config.proxy {
        Some(proxy) => builder.proxy(reqwest::Proxy::all(proxy.as_str())?),
        // Never pick up a proxy from the environment unasked.
        None => builder.no_proxy(),
    };
    let client = builder.build()?;
    let mut handles = Vec::new();
    for neighbour in &config.neighbours {
        stats.update(neighbour, |_| {});
        let sender = Sender {
            neighbour: neighbour.clone(),
            client: client.clone(),
            config: config.clone(),
            state: state.clone(),
            store: store.clone(),
            locks: locks.clone(),
            stats: stats.clone(),
        };
        handles.push(tokio::spawn(sender.run()));
    }
    Ok(handles)
}

struct Sender {
    neighbour: String,
    client: reqwest::Client,
    config: Arc<Config>,
    state: State,
    store: Arc<Store>,
    locks: Arc<NameLocks>,
    stats: Stats,
}

impl Sender {
    async fn run(self) {
        let me = Arc::new(self);
        let mut log = me.state.subscribe();
        let mut position = loop {
            match me.state.position(&me.neighbour) {
                Ok(p) => break p,
                Err(e) => {
                    tracing::error!("replication to {}: {e}", me.neighbour);
                    tokio::time::sleep(me.config.retry_max).await;
                }
            }
        };
        me.stats
            .update(&me.neighbour, |s| s.position = Some(position));
        // The position is saved lazily: losing it to a crash only resends
        // accepted operations, which the model makes harmless.
        let mut saved = (position, Instant::now());
        // Highest sequence number handed out for sending.
        let mut dispatched = position;
        // A neighbour that needs operations the log no longer holds (a new
        // one, or one dropped from --node and added again) is sent every
        // deletion and stored file alongside what is logged; its position
        // moves past the gap only once all of that was accepted.
        let mut pass_pause = me.config.retry_max;
        let mut catching_up: Option<CatchUp> = loop {
            match me.state.missing_before(position) {
                Ok(None) => break None,
                Ok(Some(upto)) => {
                    dispatched = upto;
                    // Owed from now on, as /_status says.
                    me.stats
                        .update(&me.neighbour, |s| s.catching_up = Some((0, 0)));
                    let m = me.clone();
                    break Some(Box::pin(async move { m.catch_up().await }));
                }
                Err(e) => {
                    tracing::error!("replication to {}: {e}", me.neighbour);
                    tokio::time::sleep(me.config.retry_max).await;
                }
            }
        };
        let mut outstanding: BTreeSet<u64> = BTreeSet::new();
        let mut retry: VecDeque<Op> = VecDeque::new();
        let mut in_flight: JoinSet<(Op, Result<(), Failure>)> = JoinSet::new();
        // What each task in flight is sending, should it end without saying.
        let mut sending: HashMap<tokio::task::Id, Op> = HashMap::new();
        let mut backoff = me.config.retry_min;
        let mut resume_at: Option<tokio::time::Instant> = None;
        let window = me.config.max_in_flight;
        loop {
            if resume_at.is_none() {
                // Fill the window: failed operations first, then new ones.
                while in_flight.len() < window {
                    let Some(op) = retry.pop_front() else { break };
                    sending.insert(in_flight.spawn(me.clone().send(op.clone())).id(), op);
                }
                if in_flight.len() < window && dispatched < *log.borrow_and_update() {
                    match me.state.ops_after(dispatched, window - in_flight.len()) {
                        Ok(ops) => {
                            for op in ops {
                                dispatched = op.seq;
                                outstanding.insert(op.seq);
                                sending
                                    .insert(in_flight.spawn(me.clone().send(op.clone())).id(), op);
                            }
                        }
                        Err(e) => {
                            // No later change may come to wake us: look again
                            // after a pause.
                            tracing::error!("replication to {}: {e}", me.neighbour);
                            resume_at = Some(tokio::time::Instant::now() + me.config.retry_min);
                        }
                    }
                }
                me.stats.update(&me.neighbour, |s| {
                    s.in_flight = in_flight.len();
                    s.retry_in = None;
                });
            }
            let can_take_more = resume_at.is_none() && in_flight.len() < window;
            tokio::select! {
                Some(joined) = in_flight.join_next_with_id(), if !in_flight.is_empty() => {
                    let (op, result) = match joined {
                        Ok((id, r)) => {
                            sending.remove(&id);
                            r
                        }
                        // `send` catches panics, so only an abort gets here;
                        // the operation is retried all the same, or the
                        // position would stay behind it for good.
                        Err(e) => match sending.remove(&e.id()) {
                            Some(op) => (op, Err(format!("replication task failed: {e}").into())),
                            None => continue,
                        },
                    };
                    match result {
                        Ok(()) => {
                            outstanding.remove(&op.seq);
                            backoff = me.config.retry_min;
                            me.stats.update(&me.neighbour, |s| s.last_success = Some(unix_now()));
                        }
                        Err(e) => {
                            tracing::debug!("replication of {} to {} failed: {}", op.name, me.neighbour, e.text);
                            me.stats.update(&me.neighbour, |s| {
                                s.last_error = Some(e.text);
                                s.last_error_at = Some(unix_now());
                            });
                            retry.push_back(op);
                            if resume_at.is_none() {
                                resume_at = Some(tokio::time::Instant::now() + backoff);
                                let wait = backoff;
                                me.stats.update(&me.neighbour, |s| s.retry_in = Some(wait.as_secs_f64()));
                                backoff = next_backoff(backoff, me.config.retry_min, me.config.retry_max);
                            }
                        }
                    }
                    // Everything before the oldest unanswered operation is
                    // accepted (and, once caught up, everything before the log).
                    let accepted = outstanding.first().map_or(dispatched, |s| s - 1);
                    if catching_up.is_some() {
                        // /_status counts what the log still holds for it;
                        // the saved position waits for the pass.
                        me.stats.update(&me.neighbour, |s| s.log_position = Some(accepted));
                    } else if accepted > position {
                        position = accepted;
                        me.stats.update(&me.neighbour, |s| s.position = Some(position));
                        let caught_up = in_flight.is_empty() && retry.is_empty();
                        if caught_up
                            || position - saved.0 >= SAVE_EVERY_OPS
                            || saved.1.elapsed() >= SAVE_EVERY
                        {
                            me.state.accepted(&me.neighbour, position);
                            saved = (position, Instant::now());
                        }
                    }
                }
                changed = log.changed(), if can_take_more => {
                    if changed.is_err() {
                        return; // the state database is gone: shutting down
                    }
                }
                () = sleep_until(resume_at), if resume_at.is_some() => {
                    resume_at = None;
                }
                complete = finished(catching_up.as_mut()), if catching_up.is_some() => {
                    if complete {
                        catching_up = None;
                        pass_pause = me.config.retry_max;
                        position = position.max(outstanding.first().map_or(dispatched, |s| s - 1));
                        me.stats.update(&me.neighbour, |s| {
                            s.position = Some(position);
                            s.log_position = None;
                        });
                        // Durably: a lost position means sending everything again.
                        me.state.accepted(&me.neighbour, position);
                        match me.state.flush().await {
                            Ok(()) => saved = (position, Instant::now()),
                            Err(e) => tracing::error!("replication to {}: saving its position: {e}", me.neighbour),
                        }
                    } else {
                        // Made again after a pause that grows while passes
                        // keep ending short (each may send every file).
                        let (m, pause) = (me.clone(), pass_pause);
                        pass_pause = (pass_pause * 2).min(MAX_PASS_PAUSE.max(me.config.retry_max));
                        catching_up = Some(Box::pin(async move {
                            tokio::time::sleep(pause).await;
                            m.catch_up().await
                        }));
                    }
                }
            }
        }
    }

    /// Send every deletion logged and every file stored here, each until
    /// the neighbour accepts it, with a window of requests in flight. False
    /// when the deletion log or the storage directory could not be read to
    /// the end, or more files were refused than are kept aside (the whole
    /// pass is then made again).
    async fn catch_up(self: &Arc<Self>) -> bool {
        tracing::info!(
            "{} needs operations no longer logged here (a new neighbour?): sending it every deletion and stored file",
            self.neighbour
        );
        self.stats
            .update(&self.neighbour, |s| s.catching_up = Some((0, 0)));
        let mut pass = Pass::default();
        let mut complete = true;
        let mut after: Option<String> = None;
        loop {
            let names = match self.state.deleted_after(after.as_deref(), 512) {
                Ok(names) => names,
                Err(e) => {
                    tracing::error!("replication to {}: {e}", self.neighbour);
                    complete = false;
                    break;
                }
            };
            let Some(last) = names.last().cloned() else {
                break;
            };
            for name in names {
                self.offer(&mut pass, Op::catching_up(OpKind::Delete, name), true)
                    .await;
            }
            after = Some(last);
        }
        if complete {
            let (tx, mut rx) = tokio::sync::mpsc::channel::<String>(1024);
            let store = self.store.clone();
            let walk = tokio::task::spawn_blocking(move || {
                store.for_each_stored(|name| tx.blocking_send(name).is_ok())
            });
            while let Some(name) = rx.recv().await {
                self.offer(&mut pass, Op::catching_up(OpKind::Put, name), true)
                    .await;
            }
            match walk.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::error!(
                        "replication to {}: reading the storage directory: {e}",
                        self.neighbour
                    );
                    complete = false;
                }
                Err(e) => {
                    tracing::error!("replication to {}: {e}", self.neighbour);
                    complete = false;
                }
            }
        }
        self.settle_all(&mut pass).await;
        // What the neighbour refused, again, with a pause growing up to an
        // hour (a large file travels whole each time), until it accepts it
        // (or the pass is made again from the start).
        let mut backoff = self.config.retry_min;
        let longest = MAX_PASS_PAUSE.max(self.config.retry_max);
        while complete && !pass.overflow && !pass.refused.is_empty() {
            tokio::time::sleep(backoff).await;
            backoff = next_backoff(backoff, self.config.retry_min, longest);
            for op in std::mem::take(&mut pass.refused) {
                self.offer(&mut pass, op, false).await;
            }
            self.settle_all(&mut pass).await;
        }
        let complete = complete && !pass.overflow && pass.refused.is_empty();
        if complete {
            self.stats.update(&self.neighbour, |s| s.catching_up = None);
        }
        complete
    }

    /// Send `op` as part of a catch-up pass once fewer than the window are
    /// in flight: retried with backoff while the neighbour fails, put aside
    /// in `pass` when it refuses this one (so that it holds up no other).
    async fn offer(self: &Arc<Self>, pass: &mut Pass, op: Op, first_time: bool) {
        while pass.tasks.len() >= self.config.max_in_flight.max(1) {
            if let Some(joined) = pass.tasks.join_next().await {
                self.settle(pass, joined);
            }
        }
        if first_time {
            self.stats.update(&self.neighbour, |s| {
                if let Some((found, _)) = &mut s.catching_up {
                    *found += 1;
                }
            });
        }
        let me = self.clone();
        pass.tasks.spawn(async move {
            let mut backoff = me.config.retry_min;
            loop {
                let (op, result) = me.clone().send(op.clone()).await;
                match result {
                    Ok(()) => return (op, Ok(())),
                    Err(e) if e.refused => return (op, Err(e)),
                    Err(e) => {
                        tracing::debug!(
                            "replication of {} to {} failed: {}",
                            op.name,
                            me.neighbour,
                            e.text
                        );
                        me.stats.update(&me.neighbour, |s| {
                            s.last_error = Some(e.text);
                            s.last_error_at = Some(unix_now());
                        });
                        tokio::time::sleep(backoff).await;
                        backoff = next_backoff(backoff, me.config.retry_min, me.config.retry_max);
                    }
                }
            }
        });
    }

    fn settle(
        &self,
        pass: &mut Pass,
        joined: Result<(Op, Result<(), Failure>), tokio::task::JoinError>,
    ) {
        match joined {
            Ok((_, Ok(()))) => self.stats.update(&self.neighbour, |s| {
                s.last_success = Some(unix_now());
                if let Some((_, accepted)) = &mut s.catching_up {
                    *accepted += 1;
                }
            }),
            Ok((op, Err(e))) => {
                tracing::warn!("{} refuses {}: {}", self.neighbour, op.name, e.text);
                self.stats.update(&self.neighbour, |s| {
                    s.last_error = Some(e.text);
                    s.last_error_at = Some(unix_now());
                });
                if pass.refused.len() < REFUSED_KEPT {
                    pass.refused.push(op);
                } else {
                    pass.overflow = true;
                }
            }
            // Only an abort (at shutdown) gets here; which one is unknown.
            Err(_) => pass.overflow = true,
        }
    }

    async fn settle_all(&self, pass: &mut Pass) {
        while let Some(joined) = pass.tasks.join_next().await {
            self.settle(pass, joined);
        }
    }

    /// Deliver one operation; Ok when the neighbour accepted it. A panic
    /// while delivering counts as a failure, so the operation is retried
    /// and the position is never stuck behind it.
    async fn send(self: Arc<Self>, op: Op) -> (Op, Result<(), Failure>) {
        use futures_util::FutureExt;
        let result = std::panic::AssertUnwindSafe(self.deliver(&op))
            .catch_unwind()
            .await
            .unwrap_or_else(|_| Err("internal error while sending".to_string().into()));
        (op, result)
    }

    /// Whether the neighbour answers a HEAD of `url` with this very file
    /// (200, its length, the ETag of its name's hash): as good as a 302 to
    /// the PUT. Anything else, or no answer in time, means "send it".
    async fn neighbour_has(&self, url: &str, len: u64, name: &str) -> bool {
        let Some(sha1) = name::content_sha1(name) else {
            return false;
        };
        // Not from a cache on the way: the neighbour itself must say so.
        let head = self
            .client
            .head(url)
            .header(reqwest::header::CACHE_CONTROL, "no-cache")
            .send();
        let Ok(Ok(r)) = tokio::time::timeout(self.config.transfer_timeout, head).await else {
            return false;
        };
        let header = |h| r.headers().get(h).and_then(|v| v.to_str().ok());
        r.status() == reqwest::StatusCode::OK
            && header(reqwest::header::CONTENT_LENGTH) == Some(len.to_string().as_str())
            && header(reqwest::header::ETAG)
                .is_some_and(|e| e.trim_matches('"').eq_ignore_ascii_case(&sha1))
    }

    async fn deliver(&self, op: &Op) -> Result<(), Failure> {
        let url = format!("{}{}", self.neighbour, name::location(&op.name));
        let progress = Progress::new();
        let request = match op.kind {
            OpKind::Delete => self.client.delete(&url),
            OpKind::Put => {
                // An upload logs its operation before renaming the file into
                // place, under this lock: holding it, a missing file is really
                // missing, not about to appear.
                let guard = self.locks.lock(&op.name).await;
                let opened = match self.store.open_cached(&op.name, SMALL_BODY) {
                    Cached::Found(opened) => Some(opened),
                    Cached::Missing => None,
                    Cached::WouldBlock => {
                        let (store, n) = (self.store.clone(), op.name.clone());
                        tokio::task::spawn_blocking(move || store.open_read(&n, SMALL_BODY))
                            .await
                            .map_err(|e| e.to_string())?
                            .map_err(|e| e.to_string())?
                    }
                };
                drop(guard);
                // Deleted since it was queued (its deletion is queued too), or
                // never placed because of a crash: nothing to send.
                let Some(Opened { file, stat, small }) = opened else {
                    return Ok(());
                };
                let len = u64::try_from(stat.st_size).unwrap_or(0);
                let body = match small {
                    Some(bytes) => {
                        progress.touch();
                        reqwest::Body::from(bytes)
                    }
                    None => {
                        // A large file: usually a copy going back to where it
                        // came from. It travels only if the neighbour lacks it.
                        if self.neighbour_has(&url, len, &op.name).await {
                            return Ok(());
                        }
                        // The no-progress clock starts with the upload, not
                        // with the question before it.
                        progress.touch();
                        let tick = progress.clone();
                        reqwest::Body::wrap_stream(store::file_stream(file, 0, len).map(
                            move |chunk| {
                                tick.touch();
                                chunk
                            },
                        ))
                    }
                };
                let mut req = self
                    .client
                    .put(&url)
                    .header(reqwest::header::CONTENT_LENGTH, len)
                    .body(body);
                if let Some(sha1) = name::content_sha1(&op.name) {
                    req = req.header("X-Content-SHA1", sha1);
                }
                req
            }
        };
        let request = match &self.config.token {
            Some(token) => request.bearer_auth(token),
            None => request,
        };
        let timeout = self.config.transfer_timeout;
        let response = tokio::select! {
            r = request.send() => r.map_err(|e| crate::error::with_causes(&e))?,
            () = progress.stalled(timeout) => {
                return Err(format!("no progress for {} s", timeout.as_secs_f64()).into());
            }
        };
        let status = response.status().as_u16();
        let accepted = match (op.kind, status) {
            (OpKind::Put, 201 | 409) | (OpKind::Delete, 200 | 404) => true,
            // "I have it" only when it names this very file: a redirect
            // elsewhere (to https, to a login page) would drop the file.
            (OpKind::Put, 302) => response
                .headers()
                .get(reqwest::header::LOCATION)
                .is_some_and(|l| location_names(l.as_bytes(), response.url(), &op.name)),
            _ => false,
        };
        if accepted {
            Ok(())
        } else if status == 302 {
            let to = response
                .headers()
                .get(reqwest::header::LOCATION)
                .map_or("nowhere".into(), |l| String::from_utf8_lossy(l.as_bytes()));
            Err(format!("HTTP 302 to {to}, not to this file").into())
        } else {
            let body = tokio::time::timeout(timeout, response.text())
                .await
                .ok()
                .and_then(Result::ok)
                .unwrap_or_default();
            let reason = body.lines().next().unwrap_or("").trim().to_string();
            Err(Failure {
                text: format!("HTTP {status} {reason}").trim().to_string(),
                refused: refuses_this_one(status),
            })
        }
    }
}

/// Whether a 302's `Location` (the header's bytes) names `name`, the file
/// the request to `request` sent: the path a node answers (`/` and the
/// name, encoded or, as the original tool answers, as it is, Latin-1 if
/// not UTF-8), also when the neighbour's URL has a path of its own (a
/// proxy maps it; the node behind does not know it); or a URI reference
/// that, resolved against the request, keeps its scheme, host, port and
/// (decoded) path, with no query. A redirect elsewhere (to https, another
/// host, a login page) does not.
fn location_names(location: &[u8], request: &reqwest::Url, name: &str) -> bool {
    let text: String = match std::str::from_utf8(location) {
        Ok(s) => s.to_string(),
        Err(_) => location.iter().map(|&b| char::from(b)).collect(),
    };
    let text = text.trim();
    if text.is_empty() {
        return false;
    }
    let encoded = name::location(name);
    let prefix = request.path().strip_suffix(encoded.as_str()).unwrap_or("");
    let bare = |t: &str| t.strip_prefix('/') == Some(name) || t == encoded;
    if bare(text) || text.strip_prefix(prefix).is_some_and(bare) {
        return true;
    }
    let Ok(target) = request.join(text) else {
        return false;
    };
    let decoded = |p: &str| percent_encoding::percent_decode_str(p).collect::<Vec<u8>>();
    target.scheme() == request.scheme()
        && target.host_str() == request.host_str()
        && target.port_or_known_default() == request.port_or_known_default()
        && target.query().is_none()
        && decoded(target.path()) == decoded(request.path())
}

/// What a catch-up pass has in flight and has put aside.
#[derive(Default)]
struct Pass {
    tasks: JoinSet<(Op, Result<(), Failure>)>,
    refused: Vec<Op>,
    /// More refused than kept (or a task lost): the pass must start over.
    overflow: bool,
}

impl Op {
    /// An operation of a catch-up pass, outside the log.
    fn catching_up(kind: OpKind, name: String) -> Op {
        Op {
            seq: 0,
            kind,
            time: unix_now(),
            name,
        }
    }
}

/// A pass sending a neighbour everything stored and deleted: true when
/// all of it was accepted, false when it must be made again.
type CatchUp = std::pin::Pin<Box<dyn std::future::Future<Output = bool> + Send>>;

async fn finished(pass: Option<&mut CatchUp>) -> bool {
    match pass {
        Some(pass) => pass.await,
        None => std::future::pending().await,
    }
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// When a request last made progress (a body chunk went out).
#[derive(Clone)]
struct Progress {
    start: Instant,
    last_ms: Arc<AtomicU64>,
}

impl Progress {
    fn new() -> Progress {
        Progress {
            start: Instant::now(),
            last_ms: Arc::new(AtomicU64::new(0)),
        }
    }

    fn touch(&self) {
        let ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    /// Resolves once `timeout` passes without a `touch`.
    async fn stalled(&self, timeout: Duration) {
        loop {
            let last = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
            let deadline = self.start + last + timeout;
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline.into()).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_302_counts_only_when_it_names_the_file() {
        let name = "dir/caf\u{e9} 100%_1_da39a3ee5e6b4b0d3255bfef95601890afd80709.txt";
        let url =
            |base: &str| reqwest::Url::parse(&format!("{base}{}", name::location(name))).unwrap();
        let plain = url("http://10.0.0.2:8080");
        let ok = |loc: &[u8], u: &reqwest::Url| location_names(loc, u, name);
        // What cockatiel answers: the encoded path, or an absolute URL to it.
        assert!(ok(name::location(name).as_bytes(), &plain));
        assert!(ok(
            format!("http://10.0.0.2:8080{}", name::location(name)).as_bytes(),
            &plain
        ));
        // The original tool: the name as it is, in UTF-8 or Latin-1.
        assert!(ok(format!("/{name}").as_bytes(), &plain));
        let latin1: Vec<u8> = format!("/{name}").chars().map(|c| c as u8).collect();
        assert!(ok(&latin1, &plain));
        // A neighbour under a path prefix.
        let prefixed = url("http://h/files");
        assert!(ok(
            format!("/files{}", name::location(name)).as_bytes(),
            &prefixed
        ));
        assert!(ok(format!("/files/{name}").as_bytes(), &prefixed));
        // The node behind the proxy answers without the prefix.
        assert!(ok(name::location(name).as_bytes(), &prefixed));
        assert!(ok(format!("/{name}").as_bytes(), &prefixed));
        assert!(!ok(
            format!("/other{}", name::location(name)).as_bytes(),
            &prefixed
        ));
        // Redirects elsewhere.
        let https = format!("https://10.0.0.2:8080{}", name::location(name));
        assert!(!ok(https.as_bytes(), &plain));
        assert!(!ok(
            format!("http://other:8080{}", name::location(name)).as_bytes(),
            &plain
        ));
        assert!(!ok(
            format!("{}?login=1", name::location(name)).as_bytes(),
            &plain
        ));
        assert!(!ok(b"https://files.example.com/", &plain));
        assert!(!ok(b"/login", &plain));
        assert!(!ok(b"", &plain));
    }

    #[test]
    fn which_answers_refuse_one_file() {
        // About this file: its body, its name, its size.
        for status in [400, 405, 413, 414, 431] {
            assert!(refuses_this_one(status), "{status}");
        }
        // About every request (a token, a proxy, the neighbour's state).
        for status in [401, 403, 404, 407, 408, 421, 426, 429, 500, 502, 503, 507] {
            assert!(!refuses_this_one(status), "{status}");
        }
    }

    #[test]
    fn backoff_doubles_to_the_cap() {
        let min = Duration::from_millis(500);
        let max = Duration::from_secs(30);
        let mut d = min;
        let mut seen = vec![d];
        for _ in 0..8 {
            d = next_backoff(d, min, max);
            seen.push(d);
        }
        let secs: Vec<f64> = seen.iter().map(Duration::as_secs_f64).collect();
        assert_eq!(secs, vec![0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]);
    }

    #[tokio::test]
    async fn progress_stalls_only_without_touches() {
        let p = Progress::new();
        let t = p.clone();
        let toucher = tokio::spawn(async move {
            for _ in 0..5 {
                tokio::time::sleep(Duration::from_millis(20)).await;
                t.touch();
            }
        });
        let started = Instant::now();
        p.stalled(Duration::from_millis(60)).await;
        // Five touches 20 ms apart keep it alive past 100 ms.
        assert!(started.elapsed() >= Duration::from_millis(100));
        toucher.await.unwrap();
    }
}

//! The HTTP API of one node: requests in, store, state and ingest calls
//! out. Owns the meaning of each method (SPEC "HTTP API"), the response
//! headers, receiving upload bodies, and the order of DELETE's durability
//! steps (PUT's are in `ingest`). It never touches the disk or the database
//! directly; it calls `store` (on blocking threads, or cache-only on the
//! async thread), `cache` (copies of small files read often), `state` and
//! `ingest`.

pub mod precondition;
pub mod range;
pub mod server;

use std::io;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures_util::StreamExt;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use sha1::{Digest, Sha1};

use crate::cache::{FileCache, Weighted};
use crate::config::{Config, VERSION};
use crate::error::Error;
use crate::ingest::{Content, Ingest, Outcome};
use crate::name::{self, Purpose};
use crate::replicate::Stats;
use crate::state::{DeleteRecord, State};
use crate::store::{Cached, NameLocks, Opened, Store, Syncer, TempFile};

pub type Body = BoxBody<Bytes, io::Error>;

/// Files up to this size are read in the same blocking call that opens them.
const SMALL_FILE: u64 = 128 * 1024;
/// Chunk size for streaming large files and for writing uploads.
const CHUNK: usize = crate::store::CHUNK;
const ALLOW_FILE: &str = "GET, HEAD, PUT, DELETE";
const ALLOW_STATUS: &str = "GET, HEAD";
const CACHE_CONTROL: &str = "public, max-age=31536000, immutable";
/// A replica body up to this size is not worth a look at the deletion log
/// before it arrives (a blocking-thread hop): the upload's own checks
/// answer 409 just the same.
const SMALL_REPLICA: u64 = 64 * 1024;
static X_CONTENT_SHA1: HeaderName = HeaderName::from_static("x-content-sha1");

/// Everything a request handler needs; shared by all connections.
pub struct Api {
    store: Arc<Store>,
    syncer: Syncer,
    ingest: Ingest,
    state: State,
    config: Arc<Config>,
    locks: Arc<NameLocks>,
    token_hash: Option<[u8; 20]>,
    stats: Stats,
    server_header: HeaderValue,
    cache: Arc<FileCache<Arc<Hot>>>,
    /// The state directory's name, when it lies inside the storage
    /// directory: no request may reach it.
    state_dir: Option<String>,
}

impl Api {
    pub fn new(
        store: Arc<Store>,
        state: State,
        ingest: Ingest,
        locks: Arc<NameLocks>,
        config: Arc<Config>,
        stats: Stats,
        state_dir: Option<String>,
    ) -> Api {
        let token_hash = config.token.as_deref().map(sha1_of);
        Api {
            cache: Arc::new(FileCache::new(config.cache_size)),
            syncer: Syncer::start(store.clone()),
            ingest,
            store,
            state,
            config,
            locks,
            token_hash,
            stats,
            state_dir,
            server_header: HeaderValue::from_static(concat!(
                "cockatiel/",
                env!("CARGO_PKG_VERSION")
            )),
        }
    }

    /// Answer one request; never fails (errors become responses).
    pub async fn handle(&self, req: Request<Incoming>) -> Response<Body> {
        let method = req.method().clone();
        let logged = tracing::enabled!(tracing::Level::DEBUG).then(|| req.uri().to_string());
        let mut resp = match self.route(req).await {
            Ok(resp) => resp,
            Err(e) => error_response(&e),
        };
        if let Some(uri) = logged {
            tracing::debug!("{method} {uri} -> {}", resp.status().as_u16());
        }
        if method == Method::HEAD {
            // Same headers as GET, no body: the length GET would send stays.
            if !resp.headers().contains_key(header::CONTENT_LENGTH) {
                if let Some(len) = http_body::Body::size_hint(resp.body()).exact() {
                    resp.headers_mut()
                        .insert(header::CONTENT_LENGTH, HeaderValue::from(len));
                }
            }
            *resp.body_mut() = empty();
        }
        resp.headers_mut()
            .insert(header::SERVER, self.server_header.clone());
        resp
    }

    async fn route(&self, req: Request<Incoming>) -> Result<Response<Body>, Error> {
        let limit = self.config.max_header_size;
        if head_size(&req) > limit {
            return Err(Error::HeadersTooLarge(limit));
        }
        let purpose = if req.method() == Method::PUT {
            Purpose::Put
        } else {
            Purpose::Read
        };
        let name = name::from_path(req.uri().path(), purpose)?;
        if name::is_reserved(&name) {
            return match (req.method(), name.as_str()) {
                (&Method::GET | &Method::HEAD, "_status") => self.status().await,
                (&Method::GET | &Method::HEAD, _) => Err(Error::NotFound),
                _ => Err(Error::MethodNotAllowed(ALLOW_STATUS)),
            };
        }
        let in_state_dir = self.in_state_dir(&name);
        match *req.method() {
            Method::GET | Method::HEAD if in_state_dir => Err(Error::NotFound),
            Method::GET | Method::HEAD => self.get(&name, &req).await,
            Method::PUT => {
                self.authorize(req.headers())?;
                self.put(name, req).await
            }
            Method::DELETE => {
                self.authorize(req.headers())?;
                if in_state_dir {
                    return Err(Error::NotFound);
                }
                self.delete(&name).await
            }
            _ => Err(Error::MethodNotAllowed(ALLOW_FILE)),
        }
    }

    /// Whether `name` lies in the state directory (when that is inside the
    /// storage directory): no request may reach it.
    fn in_state_dir(&self, name: &str) -> bool {
        self.state_dir
            .as_deref()
            .is_some_and(|dir| name::is_within(name, dir))
    }

    /// Constant-time check of `Authorization: Bearer <token>` when a token is set.
    fn authorize(&self, headers: &HeaderMap) -> Result<(), Error> {
        let Some(expected) = &self.token_hash else {
            return Ok(());
        };
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, t)| t.trim());
        // Comparing hashes keeps the time independent of where the strings differ.
        let given = sha1_of(given.unwrap_or(""));
        let diff = given
            .iter()
            .zip(expected.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b));
        if diff == 0 {
            Ok(())
        } else {
            Err(Error::Unauthorized)
        }
    }

    async fn get(&self, name: &str, req: &Request<Incoming>) -> Result<Response<Body>, Error> {
        // `no-cache` asks for an answer this node stands by (a neighbour
        // deciding whether to send a file asks so): a file found between
        // its rename and the sync that makes it durable is waited for (its
        // upload holds the name's lock until then) and looked up again.
        // Such a read skips the in-memory copies: a file whose sync failed
        // is unlinked while still counted unsettled, its copy only after.
        let no_cache = asks_no_cache(req.headers());
        for _ in 0..UNSETTLED_LOOKS {
            let answer = self.get_once(name, req, !no_cache).await;
            if no_cache && answer.is_ok() && self.ingest.is_unsettled(name) {
                drop(self.locks.lock(name).await);
                continue;
            }
            return answer;
        }
        Err(Error::Task(format!(
            "{name} stayed between its rename and its sync"
        )))
    }

    async fn get_once(
        &self,
        name: &str,
        req: &Request<Incoming>,
        use_copies: bool,
    ) -> Result<Response<Body>, Error> {
        let want_body = req.method() == Method::GET;
        if let Some(hot) = use_copies.then(|| self.cache.get(name)).flatten() {
            return Ok(file_response(
                &hot.meta,
                Source::Bytes(hot.bytes.clone()),
                req,
            ));
        }
        // A deletion whose unlink failed (answered 500) left its file behind;
        // the name is deleted all the same. Checked before the copy could be
        // cached, and such a DELETE empties the cache of the name.
        if self.state.unlink_pending(name) {
            return Err(Error::NotFound);
        }
        // Taken before the file is opened: a deletion from here on keeps
        // this read's copy out of the cache.
        let ticket = self.cache.ticket();
        let read_up_to = if want_body { SMALL_FILE } else { 0 };
        // Served from the page cache without leaving this thread when it
        // can be; otherwise one blocking call opens and reads.
        let opened = match self.store.open_cached(name, read_up_to) {
            Cached::Found(opened) => Some(opened),
            Cached::Missing => None,
            Cached::WouldBlock => {
                let (store, owned) = (self.store.clone(), name.to_string());
                blocking(move || store.open_read(&owned, read_up_to)).await??
            }
        };
        let Some(Opened { file, stat, small }) = opened else {
            return Err(Error::NotFound);
        };
        let Some(small) = small else {
            let meta = FileMeta::new(name, &stat, u64::try_from(stat.st_size).unwrap_or(0));
            return Ok(file_response(&meta, Source::File(file), req));
        };
        let bytes = Bytes::from(small);
        let meta = FileMeta::new(name, &stat, bytes.len() as u64);
        if meta.etag.is_none() {
            // Not in stored form (put there by hand): it might change, so
            // it is read from disk every time.
            return Ok(file_response(&meta, Source::Bytes(bytes), req));
        }
        let hot = Arc::new(Hot { meta, bytes });
        self.cache.admit(name, ticket, hot.clone());
        Ok(file_response(
            &hot.meta,
            Source::Bytes(hot.bytes.clone()),
            req,
        ))
    }

    async fn put(&self, name: String, req: Request<Incoming>) -> Result<Response<Body>, Error> {
        // Repeated, every line must name the same hash: which one would count?
        let mut expected: Option<String> = None;
        for v in req.headers().get_all(&X_CONTENT_SHA1) {
            let v = v.to_str().map_err(|_| Error::BadSha1Header)?.trim();
            if !name::is_sha1_hex(v)
                || expected
                    .as_deref()
                    .is_some_and(|e| !e.eq_ignore_ascii_case(v))
            {
                return Err(Error::BadSha1Header);
            }
            expected = Some(v.to_ascii_lowercase());
        }
        let length = match req.headers().get(header::CONTENT_LENGTH) {
            Some(len) => {
                let len: u64 = len
                    .to_str()
                    .ok()
                    .and_then(|s| s.trim().parse().ok())
                    .ok_or(Error::BadContentLength)?;
                if let Some(max) = self.config.max_size {
                    if len > max {
                        return Err(Error::TooLarge(max));
                    }
                }
                Some(len)
            }
            None => None,
        };
        // Its stored name keeps its directory: refused before the body
        // travels when that lies in the state directory.
        if name
            .rsplit_once('/')
            .is_some_and(|(dir, _)| self.in_state_dir(dir))
        {
            return Err(Error::InStateDirectory);
        }
        // A replica sent to the name it already has: answer before the body
        // travels (it would change nothing).
        if let Some(sha) = &expected {
            if name::content_sha1(&name).as_deref() == Some(sha.as_str())
                && !self.in_state_dir(&name)
            {
                let asks_first = req.headers().contains_key(header::EXPECT);
                let small = length.is_some_and(|len| len <= SMALL_REPLICA) && !asks_first;
                let known = {
                    // Under the lock: a file still between its commit and its
                    // rename (not yet durable) must not be reported as present.
                    let _guard = self.locks.lock(&name).await;
                    // Usually a copy coming back from a neighbour, found in
                    // the kernel's caches without leaving this thread. A
                    // present file is not a deleted one (a deletion unlinks
                    // under this lock), unless that unlink failed.
                    match self.store.open_cached(&name, 0) {
                        Cached::Found(_) if !self.state.unlink_pending(&name) => Some(Ok(())),
                        // A small body is cheaper to take than a trip to the
                        // blocking pool; the ingest then answers 302 or 409
                        // from the disk and the deletion log all the same.
                        // (A name never looked up has no cached entry, so a
                        // new copy usually lands here as WouldBlock.)
                        Cached::Missing | Cached::WouldBlock if small => None,
                        Cached::Found(_) | Cached::Missing | Cached::WouldBlock => {
                            let (store, state, n) =
                                (self.store.clone(), self.state.clone(), name.clone());
                            blocking(move || -> Result<_, Error> {
                                if state.is_deleted(&n)? {
                                    return Ok(Some(Err(Error::Deleted)));
                                }
                                Ok(store.open_file(&n)?.map(|_| Ok(())))
                            })
                            .await??
                        }
                    }
                };
                if let Some(result) = known {
                    // Not under the lock: a stalled body must not hold up a
                    // deletion or an upload of the name. The body is read and
                    // checked like any other, so that the connection stays
                    // usable and a proxy that forwards a whole body before it
                    // reads the answer gets it taken; only a client that waits
                    // to be asked (Expect: 100-continue) is spared sending it.
                    // (Neighbours ask with HEAD before sending a large file.)
                    if !asks_first {
                        self.check_body(req.into_body(), sha).await?;
                    }
                    result?;
                    return Ok(located(StatusCode::FOUND, &name));
                }
            }
        }

        let (temp, tail, sha1) = self.receive(req.into_body()).await?;
        if let Some(expected) = &expected {
            same_sha1(expected, &sha1)?;
        }
        let stored = name::stored_name_checked(&name, &sha1, crate::state::unix_now())?;
        if self.in_state_dir(&stored) {
            return Err(Error::InStateDirectory);
        }
        let content = Content { temp, tail };
        // From here on the upload runs to its end even if the client goes
        // away (hyper then drops this future): the name lock must cover the
        // whole commit-and-rename, or a sender or a DELETE could slip in
        // between the logged operation and the rename.
        let (locks, ingest, cache, n) = (
            self.locks.clone(),
            self.ingest.clone(),
            self.cache.clone(),
            stored.clone(),
        );
        let outcome = tokio::spawn(async move {
            let _guard = locks.lock(&n).await;
            let outcome = ingest.submit(n.clone(), content).await;
            if outcome.is_err() {
                // A file whose sync failed is removed; a reader may have
                // taken a copy while it was in place.
                cache.forget(&n);
            }
            outcome
        })
        .await
        .map_err(|e| Error::Task(e.to_string()))??;
        match outcome {
            Outcome::Created => Ok(located(StatusCode::CREATED, &stored)),
            Outcome::Exists => Ok(located(StatusCode::FOUND, &stored)),
            Outcome::Deleted => Err(Error::Deleted),
        }
    }

    /// Read the body, hashing as it arrives and writing large bodies to a
    /// temp file in big chunks. Returns the temp file (if one was needed),
    /// the unwritten tail, and the SHA1 in lower-case hex.
    async fn receive(
        &self,
        mut body: Incoming,
    ) -> Result<(Option<TempFile>, Bytes, String), Error> {
        let mut hasher = Sha1::new();
        // Frames are kept as they arrive (no copy) until they add up to a
        // chunk; one chunk is written on a blocking thread while the next
        // arrives.
        let mut frames: Vec<Bytes> = Vec::new();
        let mut buffered = 0;
        let mut writing: Option<tokio::task::JoinHandle<Result<TempFile, Error>>> = None;
        let mut total: u64 = 0;
        while let Some(data) = self.next_data(&mut body).await? {
            total += data.len() as u64;
            if let Some(max) = self.config.max_size {
                if total > max {
                    return Err(Error::TooLarge(max));
                }
            }
            hasher.update(&data);
            buffered += data.len();
            frames.push(data);
            if buffered >= CHUNK {
                let chunk = std::mem::take(&mut frames);
                buffered = 0;
                let previous = match writing.take() {
                    Some(handle) => Some(join(handle).await?),
                    None => None,
                };
                let store = self.store.clone();
                writing = Some(tokio::task::spawn_blocking(move || {
                    let mut t = match previous {
                        Some(t) => t,
                        None => store.create_temp()?,
                    };
                    for frame in &chunk {
                        t.write_all(frame)?;
                    }
                    Ok(t)
                }));
            }
        }
        let temp = match writing {
            Some(handle) => Some(join(handle).await?),
            None => None,
        };
        // The tail is usually one frame (all of a small body): no copy then.
        let tail = match frames.len() {
            0 => Bytes::new(),
            1 => frames.swap_remove(0),
            _ => Bytes::from(frames.concat()),
        };
        Ok((temp, tail, hex(&hasher.finalize())))
    }

    /// Read a body to its end, keeping nothing, and check that its
    /// SHA1 is `expected`.
    async fn check_body(&self, mut body: Incoming, expected: &str) -> Result<(), Error> {
        let mut hasher = Sha1::new();
        let mut total: u64 = 0;
        while let Some(data) = self.next_data(&mut body).await? {
            total += data.len() as u64;
            if let Some(max) = self.config.max_size.filter(|&max| total > max) {
                return Err(Error::TooLarge(max));
            }
            hasher.update(&data);
        }
        same_sha1(expected, &hex(&hasher.finalize()))
    }

    /// The body's next data (trailers skipped), `None` at its end; 408 when
    /// nothing arrives for `--read-timeout`.
    async fn next_data(&self, body: &mut Incoming) -> Result<Option<Bytes>, Error> {
        let timeout = self.config.read_timeout;
        loop {
            match tokio::time::timeout(timeout, body.frame()).await {
                Err(_) => return Err(Error::ReadTimeout(timeout)),
                Ok(None) => return Ok(None),
                Ok(Some(Err(e))) => return Err(Error::BodyRead(e.to_string())),
                Ok(Some(Ok(frame))) => {
                    if let Ok(data) = frame.into_data() {
                        return Ok(Some(data));
                    }
                }
            }
        }
    }

    async fn delete(&self, name: &str) -> Result<Response<Body>, Error> {
        let (locks, state, store, syncer, cache) = (
            self.locks.clone(),
            self.state.clone(),
            self.store.clone(),
            self.syncer.clone(),
            self.cache.clone(),
        );
        let n = name.to_string();
        // Runs to its end even if the client goes away, like an upload.
        let existed = tokio::spawn(async move {
            let _guard = locks.lock(&n).await;
            let record = state.delete(&n).await?;
            // A DELETE repeated after one whose unlink failed finishes it.
            let unfinished = record == DeleteRecord::Known && state.unlink_pending(&n);
            let (s, n2) = (store.clone(), n.clone());
            // Before the unlink too, so that a read racing it rarely finds
            // a copy of a file already gone from the disk.
            cache.forget(&n);
            let removed = blocking(move || s.remove(&n2)).await;
            // After the unlink, whatever came of it: no copy may outlive the
            // file (one admitted since the first forget included).
            cache.forget(&n);
            let existed = removed??;
            if record == DeleteRecord::New || unfinished {
                // Until the unlink is durable, start-up must be able to redo it.
                syncer.sync().await?;
                state.unlinked(&n);
            }
            Ok::<_, Error>(existed)
        })
        .await
        .map_err(|e| Error::Task(e.to_string()))??;
        Ok(if existed {
            text(StatusCode::OK, "deleted")
        } else {
            text(StatusCode::NOT_FOUND, "not found (deletion recorded)")
        })
    }

    async fn status(&self) -> Result<Response<Body>, Error> {
        let state = self.state.clone();
        let stats = self.stats.clone();
        let queues = blocking(move || state.queues(|n| stats.log_position(n))).await??;
        let now = crate::state::unix_now();
        let mut map = serde_json::Map::new();
        for q in queues {
            let stats = self.stats.get(&q.neighbour);
            // While a neighbour is sent everything stored and deleted, what
            // it has not accepted yet is not in the log; it counts too, plus
            // one for what the pass has yet to find.
            let catching_up = stats.as_ref().and_then(|s| s.catching_up);
            let length = q.length
                + catching_up.map_or(0, |(found, accepted)| found.saturating_sub(accepted) + 1);
            let mut entry = serde_json::json!({
                "length": length,
                "oldest_age_seconds": q.oldest.map(|t| now.saturating_sub(t)),
            });
            if let Some(obj) = entry.as_object_mut() {
                if let Some((found, accepted)) = catching_up {
                    obj.insert(
                        "catch_up".into(),
                        serde_json::json!({"found": found, "accepted": accepted}),
                    );
                }
            }
            if let (Some(obj), Some(s)) = (entry.as_object_mut(), stats) {
                obj.insert("last_success".into(), s.last_success.into());
                obj.insert("last_error".into(), s.last_error.into());
                obj.insert("last_error_at".into(), s.last_error_at.into());
                obj.insert("in_flight".into(), s.in_flight.into());
                obj.insert("retry_in_seconds".into(), s.retry_in.into());
            }
            // Named as the operator wrote it, so that it can be looked up
            // with the same string.
            map.insert(
                self.config.neighbour_as_given(&q.neighbour).to_string(),
                entry,
            );
        }
        let body = serde_json::json!({
            "queues": map,
            "cache": {
                "files": self.cache.len(),
                "bytes": self.cache.weight(),
                "budget": self.config.cache_size,
            },
            "url": self.config.url,
            "version": VERSION,
        });
        let mut resp = Response::new(full(body.to_string() + "\n"));
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        resp.headers_mut()
            .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        Ok(resp)
    }
}

/// What a file response says about the file, wherever its bytes come from.
struct FileMeta {
    len: u64,
    mtime: SystemTime,
    /// `"<sha1>"` and the bare SHA1, for names in stored form only.
    etag: Option<HeaderValue>,
    sha1: Option<HeaderValue>,
    last_modified: HeaderValue,
    mime: &'static str,
}

impl FileMeta {
    fn new(name: &str, stat: &rustix::fs::Stat, len: u64) -> FileMeta {
        let stored = name::split_stored(name);
        // The upload time in the stored name, the same on every node; the
        // file's own time (clamped to what HTTP dates can say) otherwise.
        let secs = stored
            .as_ref()
            .and_then(name::StoredParts::upload_secs)
            .unwrap_or_else(|| {
                u64::try_from(stat.st_mtime)
                    .unwrap_or(0)
                    .min(name::MAX_HTTP_SECS)
            });
        let mtime = UNIX_EPOCH + Duration::from_secs(secs);
        let sha1 = stored.map(|p| p.sha1_hex());
        let ext = name::split_ext(name).1.trim_start_matches('.');
        FileMeta {
            len,
            mtime,
            etag: sha1.as_ref().map(|s| hv(&format!("\"{s}\""))),
            sha1: sha1.as_deref().map(hv),
            last_modified: hv(&httpdate::fmt_http_date(mtime)),
            // The static table entry: no parsing, no allocation per request.
            mime: mime_guess::from_ext(ext)
                .first_raw()
                .unwrap_or("application/octet-stream"),
        }
    }

    fn etag(&self) -> Option<&str> {
        self.etag.as_ref().and_then(|v| v.to_str().ok())
    }
}

/// A small stored file kept in memory (`cache`), with its response facts.
pub struct Hot {
    meta: FileMeta,
    bytes: Bytes,
}

impl Weighted for Arc<Hot> {
    fn weight(&self) -> u64 {
        // The header values are short strings of their own.
        self.bytes.len() as u64 + 160
    }
}

/// Where a file response's body comes from.
enum Source {
    /// The whole file, read already.
    Bytes(Bytes),
    /// Open, to be streamed.
    File(std::fs::File),
}

/// The answer to GET or HEAD of a file: headers from `meta`, conditional
/// requests and ranges applied.
fn file_response(meta: &FileMeta, source: Source, req: &Request<Incoming>) -> Response<Body> {
    let want_body = req.method() == Method::GET;
    let (len, mtime, etag) = (meta.len, meta.mtime, meta.etag());
    // Sized for every header a file response gets: no regrowth per request.
    let mut headers = HeaderMap::with_capacity(16);
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    if let Some(etag) = &meta.etag {
        headers.insert(header::ETAG, etag.clone());
    }
    headers.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static(CACHE_CONTROL),
    );
    headers.insert(header::LAST_MODIFIED, meta.last_modified.clone());

    if not_modified(req.headers(), etag, mtime) {
        // The length a 200 would have (RFC 9110 §8.6), which also keeps
        // hyper from calling a HEAD's 304 empty ("Content-Length: 0").
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
        let mut resp = Response::new(empty());
        *resp.status_mut() = StatusCode::NOT_MODIFIED;
        *resp.headers_mut() = headers;
        return resp;
    }

    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(meta.mime));
    if is_active_content(meta.mime) {
        // Opened directly, an uploaded page or image must not run script
        // with the linking application's origin.
        headers.insert(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static("sandbox"),
        );
    }
    if let Some(sha1) = &meta.sha1 {
        headers.insert(X_CONTENT_SHA1.clone(), sha1.clone());
    }
    headers.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));

    let mut status = StatusCode::OK;
    let (mut start, mut end) = (0, len.saturating_sub(1));
    if let Some(range) = req
        .headers()
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
    {
        if want_body && if_range_allows(req.headers(), etag, mtime) {
            match range::evaluate(range, len) {
                range::RangeAnswer::Full => {}
                range::RangeAnswer::Partial { start: s, end: e } => {
                    status = StatusCode::PARTIAL_CONTENT;
                    (start, end) = (s, e);
                    headers.insert(header::CONTENT_RANGE, hv(&format!("bytes {s}-{e}/{len}")));
                }
                range::RangeAnswer::Several(parts) => {
                    return multipart(meta, source, &parts, headers);
                }
                range::RangeAnswer::Unsatisfiable => {
                    let mut resp = text(
                        StatusCode::RANGE_NOT_SATISFIABLE,
                        "the range is outside the file",
                    );
                    resp.headers_mut()
                        .insert(header::CONTENT_RANGE, hv(&format!("bytes */{len}")));
                    return resp;
                }
            }
        }
    }
    let count = if len == 0 { 0 } else { end - start + 1 };
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(count));
    let body = match source {
        _ if !want_body => empty(),
        Source::Bytes(bytes) => {
            let (s, e) = (start as usize, (start + count) as usize);
            Full::new(bytes.slice(s..e))
                .map_err(|never| match never {})
                .boxed()
        }
        Source::File(file) => file_body(file, start, count),
    };
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    *resp.headers_mut() = headers;
    resp
}

/// How often a no-cache read looks again after waiting for an upload of
/// the name (once is enough: an upload in place is never followed by
/// another; the bound is against a bug, not a case).
const UNSETTLED_LOOKS: usize = 4;

fn asks_no_cache(headers: &HeaderMap) -> bool {
    let values = |name| headers.get_all(name).iter().filter_map(|v| v.to_str().ok());
    precondition::no_cache(values(header::CACHE_CONTROL), values(header::PRAGMA))
}

/// 400 unless the body's SHA1 is the one `X-Content-SHA1` announced (both
/// lower-case hex).
fn same_sha1(expected: &str, actual: &str) -> Result<(), Error> {
    if expected == actual {
        return Ok(());
    }
    Err(Error::Sha1Mismatch {
        expected: expected.to_string(),
        actual: actual.to_string(),
    })
}

/// A multipart boundary no one can predict (RFC 2046: it must not occur in
/// the parts): 128 bits from the process's randomly keyed SipHash.
fn boundary() -> String {
    use std::hash::{BuildHasher, Hasher};
    let random = |n: u64| {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(n);
        h.finish()
    };
    format!("cockatiel-{:016x}{:016x}", random(1), random(2))
}

/// A 206 `multipart/byteranges` answer (RFC 9110 §14.6): each part with
/// its own Content-Type and Content-Range. `headers` are the file's.
fn multipart(
    meta: &FileMeta,
    source: Source,
    parts: &[(u64, u64)],
    mut headers: HeaderMap,
) -> Response<Body> {
    let boundary = boundary();
    let len = meta.len;
    let heads: Vec<Bytes> = parts
        .iter()
        .map(|(s, e)| {
            Bytes::from(format!(
                "\r\n--{boundary}\r\nContent-Type: {}\r\nContent-Range: bytes {s}-{e}/{len}\r\n\r\n",
                meta.mime
            ))
        })
        .collect();
    let tail = Bytes::from(format!("\r\n--{boundary}--\r\n"));
    let total = heads.iter().map(|h| h.len() as u64).sum::<u64>()
        + parts.iter().map(|(s, e)| e - s + 1).sum::<u64>()
        + tail.len() as u64;
    let body = match source {
        Source::Bytes(bytes) => {
            let mut out = Vec::with_capacity(usize::try_from(total).unwrap_or(0));
            for (head, &(s, e)) in heads.iter().zip(parts) {
                out.extend_from_slice(head);
                out.extend_from_slice(&bytes[s as usize..=e as usize]);
            }
            out.extend_from_slice(&tail);
            Full::new(Bytes::from(out))
                .map_err(|never| match never {})
                .boxed()
        }
        Source::File(file) => {
            // One descriptor shared by every part: reads are positional.
            let file = Arc::new(file);
            type Piece = std::pin::Pin<
                Box<dyn futures_util::Stream<Item = io::Result<Bytes>> + Send + Sync>,
            >;
            let mut pieces: Vec<Piece> = Vec::with_capacity(parts.len() * 2 + 1);
            for (head, &(s, e)) in heads.into_iter().zip(parts) {
                pieces.push(Box::pin(futures_util::stream::once(std::future::ready(
                    Ok(head),
                ))));
                pieces.push(Box::pin(crate::store::file_stream(
                    file.clone(),
                    s,
                    e - s + 1,
                )));
            }
            pieces.push(Box::pin(futures_util::stream::once(std::future::ready(
                Ok(tail),
            ))));
            BodyExt::boxed(StreamBody::new(
                futures_util::stream::iter(pieces)
                    .flatten()
                    .map(|r| r.map(Frame::data)),
            ))
        }
    };
    headers.insert(
        header::CONTENT_TYPE,
        hv(&format!("multipart/byteranges; boundary={boundary}")),
    );
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(total));
    let mut resp = Response::new(body);
    *resp.status_mut() = StatusCode::PARTIAL_CONTENT;
    *resp.headers_mut() = headers;
    resp
}

/// Bytes of the request line and headers, estimated from the parsed
/// request: exact for the usual `Name: value` layout (the parser drops any
/// other whitespace around values; hyper's own cap bounds such heads).
fn head_size<B>(req: &Request<B>) -> usize {
    let uri = req.uri();
    let target = uri.scheme_str().map_or(0, |s| s.len() + 3)
        + uri.authority().map_or(0, |a| a.as_str().len())
        + uri.path_and_query().map_or(1, |p| p.as_str().len());
    // "METHOD SP target SP HTTP/1.1 CRLF"
    let line = req.method().as_str().len() + target + 12;
    req.headers()
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len() + 4)
        .sum::<usize>()
        + line
        + 2
}

/// Types a browser would render and run script in.
fn is_active_content(mime: &str) -> bool {
    matches!(
        mime,
        "text/html" | "image/svg+xml" | "application/xhtml+xml" | "application/xml" | "text/xml"
    ) || mime.ends_with("+xml")
}

/// 304 per RFC 9110 §13.2.2: If-None-Match decides when present, otherwise If-Modified-Since.
fn not_modified(headers: &HeaderMap, etag: Option<&str>, mtime: SystemTime) -> bool {
    if headers.contains_key(header::IF_NONE_MATCH) {
        // Repeated header lines are one comma-separated list (RFC 9110 §5.3).
        return headers.get_all(header::IF_NONE_MATCH).iter().any(|inm| {
            let Ok(inm) = inm.to_str() else { return false };
            match etag {
                Some(etag) => precondition::none_match(inm, etag),
                None => inm.trim() == "*",
            }
        });
    }
    if let Some(ims) = headers
        .get(header::IF_MODIFIED_SINCE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| httpdate::parse_http_date(v).ok())
    {
        return truncate_secs(mtime) <= ims;
    }
    false
}

/// If-Range (RFC 9110 §13.1.5): the range applies only if the validator still matches.
fn if_range_allows(headers: &HeaderMap, etag: Option<&str>, mtime: SystemTime) -> bool {
    let Some(v) = headers.get(header::IF_RANGE).and_then(|v| v.to_str().ok()) else {
        return true;
    };
    let v = v.trim();
    if v.starts_with('"') {
        return etag == Some(v);
    }
    httpdate::parse_http_date(v).is_ok_and(|d| d == truncate_secs(mtime))
}

fn truncate_secs(t: SystemTime) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()))
}

/// The response body for `count` bytes of `file` from `start`.
fn file_body(file: std::fs::File, start: u64, count: u64) -> Body {
    BodyExt::boxed(StreamBody::new(
        crate::store::file_stream(file, start, count).map(|r| r.map(Frame::data)),
    ))
}

/// The result of a blocking chunk write.
async fn join(handle: tokio::task::JoinHandle<Result<TempFile, Error>>) -> Result<TempFile, Error> {
    handle.await.map_err(|e| Error::Task(e.to_string()))?
}

/// Run blocking file-system work off the async workers.
async fn blocking<T, F>(f: F) -> Result<T, Error>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Task(e.to_string()))
}

fn located(status: StatusCode, stored: &str) -> Response<Body> {
    let location = name::location(stored);
    let mut resp = text(status, &location);
    resp.headers_mut().insert(header::LOCATION, hv(&location));
    resp
}

/// The response for an error: its status and its one-line reason.
pub fn error_response(e: &Error) -> Response<Body> {
    let status = e.status();
    if status.is_server_error() {
        tracing::error!("{e}");
    }
    let mut resp = text(status, &e.to_string());
    match e {
        Error::MethodNotAllowed(allow) => {
            resp.headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static(allow));
        }
        Error::Unauthorized => {
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        // The body was not (fully) read: the connection cannot be reused.
        Error::ReadTimeout(_)
        | Error::TooLarge(_)
        | Error::BodyRead(_)
        | Error::HeadersTooLarge(_) => {
            resp.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        _ => {}
    }
    resp
}

fn text(status: StatusCode, msg: &str) -> Response<Body> {
    let mut resp = Response::new(full(format!("{msg}\n")));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

fn full(s: String) -> Body {
    Full::new(Bytes::from(s))
        .map_err(|never| match never {})
        .boxed()
}

fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed()
}

/// A header value from text we built; anything unrepresentable is dropped to empty.
fn hv(s: &str) -> HeaderValue {
    HeaderValue::from_str(s).unwrap_or_else(|_| HeaderValue::from_static(""))
}

fn sha1_of(s: &str) -> [u8; 20] {
    Sha1::digest(s.as_bytes()).into()
}

pub fn hex(bytes: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(HEX[usize::from(b >> 4)] as char);
        s.push(HEX[usize::from(b & 15)] as char);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn active_content_types() {
        for m in [
            "text/html",
            "image/svg+xml",
            "application/xml",
            "application/atom+xml",
        ] {
            assert!(is_active_content(m), "{m}");
        }
        for m in [
            "text/plain",
            "image/png",
            "application/octet-stream",
            "application/json",
        ] {
            assert!(!is_active_content(m), "{m}");
        }
    }

    #[test]
    fn hex_encodes() {
        assert_eq!(hex(&[0, 15, 255]), "000fff");
    }

    #[test]
    fn conditional_get_rules() {
        let mtime = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let etag = Some("\"abc\"");
        let mut h = HeaderMap::new();
        assert!(!not_modified(&h, etag, mtime));
        h.insert(
            header::IF_MODIFIED_SINCE,
            hv(&httpdate::fmt_http_date(mtime)),
        );
        assert!(not_modified(&h, etag, mtime));
        // If-None-Match wins over If-Modified-Since.
        h.insert(header::IF_NONE_MATCH, hv("\"other\""));
        assert!(!not_modified(&h, etag, mtime));
        h.insert(header::IF_NONE_MATCH, hv("W/\"abc\""));
        assert!(not_modified(&h, etag, mtime));
        // Repeated lines form one list: a match on any line counts.
        h.insert(header::IF_NONE_MATCH, hv("\"other\""));
        h.append(header::IF_NONE_MATCH, hv("\"abc\""));
        assert!(not_modified(&h, etag, mtime));
        h.insert(header::IF_NONE_MATCH, hv("\"x\""));
        h.append(header::IF_NONE_MATCH, hv("\"y\""));
        assert!(!not_modified(&h, etag, mtime));
    }

    #[test]
    fn if_range_needs_the_current_validator() {
        let mtime = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let mut h = HeaderMap::new();
        assert!(if_range_allows(&h, Some("\"abc\""), mtime));
        h.insert(header::IF_RANGE, hv("\"abc\""));
        assert!(if_range_allows(&h, Some("\"abc\""), mtime));
        h.insert(header::IF_RANGE, hv("\"old\""));
        assert!(!if_range_allows(&h, Some("\"abc\""), mtime));
        h.insert(header::IF_RANGE, hv(&httpdate::fmt_http_date(mtime)));
        assert!(if_range_allows(&h, Some("\"abc\""), mtime));
    }
}

//! `cockatiel bench`: a load generator an operator points at running nodes
//! (as SeaweedFS has `weed benchmark`). Owns the phases (PUT, replication
//! wait, GET, DELETE, deletion wait), checking every answer, and the figures
//! it prints. It speaks HTTP to the nodes only: it never touches a storage
//! or state directory, and it removes the files it made unless told to keep
//! them (their names stay in the deletion log, as every deletion does).

use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use sha1::{Digest, Sha1};

use crate::error::with_causes as why;

/// What `cockatiel bench` was asked to do.
#[derive(Debug, Clone)]
pub struct BenchConfig {
    /// Nodes, normalised; requests go to them in turn.
    pub urls: Vec<String>,
    pub files: usize,
    pub size: usize,
    pub concurrency: usize,
    /// How long the GET phase runs.
    pub duration: Duration,
    /// Longest wait for replication to finish.
    pub wait: Duration,
    pub token: Option<String>,
    /// Names are `<prefix>/<n>.bin`.
    pub prefix: String,
    pub keep: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("cannot build the HTTP client: {0}")]
    Client(#[from] reqwest::Error),
    #[error("no upload succeeded (first error: {0})")]
    NothingStored(String),
    #[error("replication did not finish within {0:.0?}: {1}")]
    NotReplicated(Duration, String),
}

/// The figures of one phase.
#[derive(Debug, Clone, Default)]
pub struct Phase {
    pub name: &'static str,
    pub requests: usize,
    pub errors: usize,
    /// The first error seen, to say what went wrong.
    pub first_error: Option<String>,
    pub elapsed: Duration,
    pub bytes: u64,
    /// Latencies in microseconds, sorted.
    latencies: Vec<u32>,
}

impl Phase {
    pub fn per_second(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// The latency below which `pct` percent of the requests finished.
    pub fn percentile(&self, pct: f64) -> Duration {
        Duration::from_micros(u64::from(percentile(&self.latencies, pct)))
    }
}

/// Nearest-rank percentile of sorted values (0 when there are none).
fn percentile(sorted: &[u32], pct: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((pct / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:<7} {:>8} requests in {:>6.2} s: {:>9.0} req/s, {:>8.1} MB/s, latency p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms, {} errors",
            self.name,
            self.requests,
            self.elapsed.as_secs_f64(),
            self.per_second(),
            self.bytes as f64 / self.elapsed.as_secs_f64().max(1e-9) / 1e6,
            self.percentile(50.0).as_secs_f64() * 1e3,
            self.percentile(99.0).as_secs_f64() * 1e3,
            self.percentile(100.0).as_secs_f64() * 1e3,
            self.errors,
        )?;
        if let Some(e) = &self.first_error {
            write!(f, " (first: {e})")?;
        }
        Ok(())
    }
}

/// Everything a run measured.
#[derive(Debug, Default)]
pub struct Report {
    pub phases: Vec<Phase>,
    /// Lines about replication: how long until every node had everything.
    pub notes: Vec<String>,
    /// What went wrong beyond single requests (replication that did not finish).
    pub failures: Vec<String>,
}

impl Report {
    /// Failed requests and other failures.
    pub fn errors(&self) -> usize {
        self.phases.iter().map(|p| p.errors).sum::<usize>() + self.failures.len()
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for p in &self.phases {
            writeln!(f, "{p}")?;
        }
        for n in &self.notes {
            writeln!(f, "{n}")?;
        }
        for e in &self.failures {
            writeln!(f, "FAILED: {e}")?;
        }
        Ok(())
    }
}

/// One request's outcome: bytes moved, or why it failed, and how long the
/// request itself took (the client's own work, making and checking bodies,
/// is left out).
struct Outcome {
    result: Result<u64, String>,
    latency: Duration,
}

impl Outcome {
    fn ok(bytes: u64, since: Instant) -> Outcome {
        Outcome {
            result: Ok(bytes),
            latency: since.elapsed(),
        }
    }

    fn failed(why: String, since: Instant) -> Outcome {
        Outcome {
            result: Err(why),
            latency: since.elapsed(),
        }
    }
}

/// Run `job(i)` for i in 0..count (or, with a deadline, for ever-growing i
/// until it passes) from `concurrency` workers. Rates and latencies count
/// the requests that succeeded; failures are counted apart.
async fn drive<F, Fut>(
    name: &'static str,
    concurrency: usize,
    count: Option<usize>,
    deadline: Option<Instant>,
    job: F,
) -> Phase
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Outcome> + Send,
{
    let job = Arc::new(job);
    let next = Arc::new(AtomicUsize::new(0));
    let first_error = Arc::new(Mutex::new(None::<String>));
    let started = Instant::now();
    let workers: Vec<_> = (0..concurrency.max(1))
        .map(|_| {
            let (job, next, first_error) = (job.clone(), next.clone(), first_error.clone());
            tokio::spawn(async move {
                let (mut lat, mut errors, mut bytes) = (Vec::new(), 0usize, 0u64);
                loop {
                    if deadline.is_some_and(|d| Instant::now() >= d) {
                        break;
                    }
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if count.is_some_and(|c| i >= c) {
                        break;
                    }
                    let outcome = job(i).await;
                    match outcome.result {
                        Ok(n) => {
                            bytes += n;
                            let micros = outcome.latency.as_micros();
                            lat.push(u32::try_from(micros).unwrap_or(u32::MAX));
                        }
                        Err(e) => {
                            errors += 1;
                            if let Ok(mut first) = first_error.lock() {
                                first.get_or_insert(e);
                            }
                        }
                    }
                }
                (lat, errors, bytes)
            })
        })
        .collect();
    let mut phase = Phase {
        name,
        ..Phase::default()
    };
    for w in workers {
        match w.await {
            Ok((lat, errors, bytes)) => {
                phase.latencies.extend(lat);
                phase.errors += errors;
                phase.bytes += bytes;
            }
            Err(e) => {
                phase.errors += 1;
                phase
                    .first_error
                    .get_or_insert(format!("worker failed: {e}"));
            }
        }
    }
    phase.elapsed = started.elapsed();
    phase.requests = phase.latencies.len();
    phase.latencies.sort_unstable();
    if let Ok(mut first) = first_error.lock() {
        if let Some(e) = first.take() {
            phase.first_error.get_or_insert(e);
        }
    }
    phase
}

/// The body of file `i`: a unique first line, then filler, `size` bytes.
pub fn body_of(prefix: &str, i: usize, size: usize) -> Bytes {
    let mut body = format!("{prefix} file {i}\n").into_bytes();
    let mut x = (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    while body.len() < size {
        // xorshift: cheap bytes that do not compress away
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        body.extend_from_slice(&x.to_le_bytes());
    }
    body.truncate(size);
    Bytes::from(body)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Sum of the queue lengths a node reports in `/_status`.
async fn queued(client: &reqwest::Client, url: &str, nodes: &[String]) -> Result<u64, String> {
    let resp = client
        .get(format!("{url}/_status"))
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .map_err(|e| format!("{url}: {}", why(&e)))?;
    let body = resp
        .bytes()
        .await
        .map_err(|e| format!("{url}: {}", why(&e)))?;
    let status: serde_json::Value =
        serde_json::from_slice(&body).map_err(|e| format!("{url}/_status: {e}"))?;
    let Some(queues) = status["queues"].as_object() else {
        return Ok(0);
    };
    Ok(queued_towards(queues, nodes))
}

/// Operations queued towards the nodes under test; towards every neighbour
/// when none of them is named as given (another spelling of the URLs).
fn queued_towards(queues: &serde_json::Map<String, serde_json::Value>, nodes: &[String]) -> u64 {
    let length = |v: &serde_json::Value| v["length"].as_u64().unwrap_or(0);
    let named: Vec<_> = queues
        .iter()
        .filter(|(url, _)| nodes.contains(url))
        .collect();
    if named.is_empty() {
        queues.values().map(length).sum()
    } else {
        named.into_iter().map(|(_, v)| length(v)).sum()
    }
}

/// Poll every node's `/_status` until its queues towards the others are
/// empty, within `wait`.
async fn wait_replicated(
    client: &reqwest::Client,
    urls: &[String],
    wait: Duration,
) -> Result<(), BenchError> {
    let deadline = Instant::now() + wait;
    loop {
        let mut pending = Vec::new();
        for url in urls {
            match queued(client, url, urls).await {
                Ok(0) => {}
                Ok(n) => pending.push(format!("{url} has {n} queued")),
                Err(e) => pending.push(e),
            }
        }
        if pending.is_empty() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(BenchError::NotReplicated(wait, pending.join("; ")));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Run every phase against the nodes and return the figures.
pub async fn run(cfg: BenchConfig) -> Result<Report, BenchError> {
    let client = reqwest::Client::builder()
        .user_agent(concat!("cockatiel-bench/", env!("CARGO_PKG_VERSION")))
        .tcp_nodelay(true)
        .pool_max_idle_per_host(cfg.concurrency)
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(60))
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .build()?;
    let cfg = Arc::new(cfg);
    let locations: Arc<Vec<Mutex<Option<String>>>> =
        Arc::new((0..cfg.files).map(|_| Mutex::new(None)).collect());
    let mut report = Report::default();
    let node = |cfg: &BenchConfig, i: usize| cfg.urls[i % cfg.urls.len()].clone();

    // PUT: each file to one node, in turn, with its SHA1 so the node checks it.
    let put = {
        let (client, cfg, locations) = (client.clone(), cfg.clone(), locations.clone());
        drive("PUT", cfg.concurrency, Some(cfg.files), None, move |i| {
            let (client, cfg, locations) = (client.clone(), cfg.clone(), locations.clone());
            async move {
                let body = body_of(&cfg.prefix, i, cfg.size);
                let sha1 = hex(&Sha1::digest(&body));
                let mut req = client
                    .put(format!("{}/{}/{i}.bin", node(&cfg, i), cfg.prefix))
                    .header("X-Content-SHA1", sha1)
                    .body(body);
                if let Some(t) = &cfg.token {
                    req = req.bearer_auth(t);
                }
                let t0 = Instant::now();
                let resp = match req.send().await {
                    Ok(resp) => resp,
                    Err(e) => return Outcome::failed(why(&e), t0),
                };
                let status = resp.status().as_u16();
                let location = resp
                    .headers()
                    .get("location")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string);
                // The whole answer, so the connection can be used again.
                let answered = resp.bytes().await;
                let outcome = Outcome::ok(cfg.size as u64, t0);
                match (status, location, answered) {
                    (_, _, Err(e)) => Outcome::failed(why(&e), t0),
                    (201 | 302, Some(location), Ok(_)) => {
                        if let Some(Ok(mut slot)) = locations.get(i).map(|s| s.lock()) {
                            *slot = Some(location);
                        }
                        outcome
                    }
                    (201 | 302, None, Ok(_)) => {
                        Outcome::failed("PUT answered without Location".into(), t0)
                    }
                    (s, _, Ok(_)) => Outcome::failed(format!("PUT answered {s}"), t0),
                }
            }
        })
        .await
    };
    let put_started = Instant::now() - put.elapsed;
    let stored: Vec<(usize, String)> = locations
        .iter()
        .enumerate()
        .filter_map(|(i, l)| l.lock().ok().and_then(|l| l.clone()).map(|l| (i, l)))
        .collect();
    if stored.is_empty() {
        let why = put.first_error.clone().unwrap_or_else(|| "none".into());
        return Err(BenchError::NothingStored(why));
    }
    report.phases.push(put);

    if cfg.urls.len() > 1 {
        match wait_replicated(&client, &cfg.urls, cfg.wait).await {
            Ok(()) => {
                let drained = put_started.elapsed();
                report.notes.push(format!(
                    "replication: every queue empty {:.2} s after the first PUT ({:.0} files/s to {} nodes)",
                    drained.as_secs_f64(),
                    stored.len() as f64 / drained.as_secs_f64().max(1e-9),
                    cfg.urls.len()
                ));
            }
            // Reading from every node would only count missing files; the
            // files are still deleted below (unless --keep).
            Err(e) => report.failures.push(e.to_string()),
        }
    }

    // GET: every stored file from every node in turn, bytes checked.
    let stored = Arc::new(stored);
    let get = if !report.failures.is_empty() {
        None
    } else {
        let (client, cfg, stored) = (client.clone(), cfg.clone(), stored.clone());
        let deadline = Instant::now() + cfg.duration;
        let phase = drive("GET", cfg.concurrency, None, Some(deadline), move |k| {
            let (client, cfg, stored) = (client.clone(), cfg.clone(), stored.clone());
            async move {
                let (i, location) = &stored[k % stored.len()];
                // Each round over the files starts at the next node.
                let url = node(&cfg, k + k / stored.len());
                let t0 = Instant::now();
                let resp = match client.get(format!("{url}{location}")).send().await {
                    Ok(resp) => resp,
                    Err(e) => return Outcome::failed(why(&e), t0),
                };
                let status = resp.status().as_u16();
                let got = match resp.bytes().await {
                    Ok(got) => got,
                    Err(e) => return Outcome::failed(why(&e), t0),
                };
                let outcome = Outcome::ok(got.len() as u64, t0);
                if status != 200 {
                    return Outcome::failed(format!("GET {url}{location} answered {status}"), t0);
                }
                // Checked after the clock stopped: the client's work, not the node's.
                if got != body_of(&cfg.prefix, *i, cfg.size) {
                    return Outcome::failed(format!("GET {url}{location}: content differs"), t0);
                }
                outcome
            }
        })
        .await;
        Some(phase)
    };
    report.phases.extend(get);

    if cfg.keep {
        report.notes.push(format!(
            "kept {} files under /{}/ (delete them with DELETE)",
            stored.len(),
            cfg.prefix
        ));
        return Ok(report);
    }

    // DELETE: each file once, on one node; the cluster removes it everywhere.
    let delete = {
        let (client, cfg, stored) = (client.clone(), cfg.clone(), stored.clone());
        drive(
            "DELETE",
            cfg.concurrency,
            Some(stored.len()),
            None,
            move |k| {
                let (client, cfg, stored) = (client.clone(), cfg.clone(), stored.clone());
                async move {
                    let (i, location) = &stored[k];
                    let mut req = client.delete(format!("{}{location}", node(&cfg, *i)));
                    if let Some(t) = &cfg.token {
                        req = req.bearer_auth(t);
                    }
                    let t0 = Instant::now();
                    let status = match req.send().await {
                        Ok(resp) => {
                            let status = resp.status().as_u16();
                            match resp.bytes().await {
                                Ok(_) => status,
                                Err(e) => return Outcome::failed(why(&e), t0),
                            }
                        }
                        Err(e) => return Outcome::failed(why(&e), t0),
                    };
                    match status {
                        200 => Outcome::ok(0, t0),
                        s => Outcome::failed(format!("DELETE answered {s}"), t0),
                    }
                }
            },
        )
        .await
    };
    let delete_started = Instant::now() - delete.elapsed;
    report.phases.push(delete);
    if cfg.urls.len() > 1 && report.failures.is_empty() {
        match wait_replicated(&client, &cfg.urls, cfg.wait).await {
            Ok(()) => report.notes.push(format!(
                "deletions: every queue empty {:.2} s after the first DELETE",
                delete_started.elapsed().as_secs_f64()
            )),
            Err(e) => report.failures.push(e.to_string()),
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_by_nearest_rank() {
        let v: Vec<u32> = (1..=100).collect();
        assert_eq!(percentile(&v, 50.0), 50);
        assert_eq!(percentile(&v, 99.0), 99);
        assert_eq!(percentile(&v, 100.0), 100);
        assert_eq!(percentile(&v, 0.0), 1);
        assert_eq!(percentile(&[7], 99.0), 7);
        assert_eq!(percentile(&[], 50.0), 0);
    }

    #[test]
    fn replication_is_awaited_towards_the_nodes_under_test() {
        let queues: serde_json::Map<String, serde_json::Value> = serde_json::from_str(
            r#"{"http://a:1": {"length": 3}, "http://other:9": {"length": 50}}"#,
        )
        .expect("JSON");
        let nodes = vec!["http://a:1".to_string(), "http://b:2".to_string()];
        // A neighbour outside the test (say, one that is down) is not waited for.
        assert_eq!(queued_towards(&queues, &nodes), 3);
        // Spelled otherwise than the nodes know each other: every queue counts.
        let other = vec!["http://127.0.0.1:1".to_string()];
        assert_eq!(queued_towards(&queues, &other), 53);
        assert_eq!(queued_towards(&serde_json::Map::new(), &nodes), 0);
    }

    #[test]
    fn bodies_are_sized_unique_and_repeatable() {
        for size in [0, 1, 10, 4096, 10_001] {
            let a = body_of("p", 1, size);
            assert_eq!(a.len(), size);
            assert_eq!(a, body_of("p", 1, size));
        }
        assert_ne!(body_of("p", 1, 4096), body_of("p", 2, 4096));
        assert_ne!(body_of("p", 1, 4096), body_of("q", 1, 4096));
    }
}

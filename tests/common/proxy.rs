//! A small fault-injecting HTTP/1.1 forward proxy for the replication tests
//! (`cockatiel --proxy http://127.0.0.1:PORT`).
//!
//! It takes one request per client connection, in absolute form
//! (`PUT http://127.0.0.1:9001/name HTTP/1.1`), opens a fresh connection to
//! the target with `Connection: close`, forwards the head and the body
//! (Content-Length or chunked) and relays the answer until the target closes
//! or its Content-Length is met, then closes the client connection too.
//!
//! Faults are switched on at run time through shared atomics and apply to
//! the next requests that arrive:
//! - `corrupt(n)`: flip one byte in the middle of the next `n` request bodies;
//! - `cut(n)`: forward half of the next `n` bodies, then close both sides;
//! - `stall(n, d)`: forward half of the next `n` bodies, then forward
//!   nothing more for `d` (or until the client gives up), then close both;
//! - `refuse(true)` / `refuse_port(port, true)`: read the request head and
//!   close the connection without an answer;
//! - `random_faults(seed, per_mille_corrupt, per_mille_cut)`: like
//!   `corrupt`/`cut`, decided per request by a seeded RNG.
//!
//! - `store_and_forward(true)`: like a simple proxy, forward the whole body
//!   before reading the answer; a target that stops reading the body (the
//!   write fails) gets the client no answer at all.
//!
//! Faults that touch a body apply only to requests with a non-empty body.
//! Every request is recorded (`log()`) with the fault applied to it and the
//! status the target answered, so tests can check that faults really
//! happened and what the receiver said about them.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use super::Rng;

/// What the proxy did to one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    None,
    Corrupted,
    Cut,
    Stalled,
    Refused,
    /// The target could not be reached; the client got 502.
    Unreachable,
    /// The request could not be parsed or relayed.
    Broken,
}

/// One request seen by the proxy.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    /// Target port (from the absolute-form request target).
    pub port: u16,
    /// Path of the request target (still percent-encoded).
    pub path: String,
    pub body_len: u64,
    pub fault: Fault,
    /// Status the target answered (None when there was no answer).
    pub status: Option<u16>,
    /// For a stalled request: the client closed its side during the stall
    /// (it timed the transfer out) before the stall ended.
    pub client_gave_up: bool,
}

#[derive(Default)]
struct Shared {
    stop: AtomicBool,
    refuse_all: AtomicBool,
    store_and_forward: AtomicBool,
    refuse_ports: Mutex<Vec<u16>>,
    corrupt_left: AtomicUsize,
    cut_left: AtomicUsize,
    stall_left: AtomicUsize,
    stall_ms: AtomicU64,
    /// Per-mille probabilities for random faults, and their RNG.
    random_corrupt: AtomicU64,
    random_cut: AtomicU64,
    rng: Mutex<Option<Rng>>,
    connections: AtomicUsize,
    /// Requests that reached the point where their stall begins.
    stalls_begun: AtomicUsize,
    log: Mutex<Vec<Seen>>,
}

/// Decrement `counter` if it is positive; true when it was.
fn take(counter: &AtomicUsize) -> bool {
    counter
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
}

pub struct Proxy {
    port: u16,
    shared: Arc<Shared>,
    accept_thread: Option<thread::JoinHandle<()>>,
}

impl Proxy {
    /// Start a proxy on a free 127.0.0.1 port, with no faults.
    pub fn start() -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("proxy: bind 127.0.0.1:0");
        let port = listener.local_addr().expect("proxy: local_addr").port();
        let shared = Arc::new(Shared::default());
        let s = shared.clone();
        let accept_thread = thread::Builder::new()
            .name(format!("proxy-{port}"))
            .spawn(move || accept_loop(listener, s))
            .expect("spawn proxy thread");
        Proxy {
            port,
            shared,
            accept_thread: Some(accept_thread),
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The value for `--proxy`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Flip one byte in each of the next `n` request bodies.
    pub fn corrupt(&self, n: usize) {
        self.shared.corrupt_left.store(n, Ordering::SeqCst);
    }

    /// Cut each of the next `n` requests with a body in the middle of it.
    pub fn cut(&self, n: usize) {
        self.shared.cut_left.store(n, Ordering::SeqCst);
    }

    /// Stop forwarding each of the next `n` bodies half-way, for `pause`.
    pub fn stall(&self, n: usize, pause: Duration) {
        self.shared
            .stall_ms
            .store(pause.as_millis() as u64, Ordering::SeqCst);
        self.shared.stall_left.store(n, Ordering::SeqCst);
    }

    /// Forward each whole body before reading the answer, while `on`.
    pub fn store_and_forward(&self, on: bool) {
        self.shared.store_and_forward.store(on, Ordering::SeqCst);
    }

    /// Close every new connection without an answer while `on`.
    pub fn refuse(&self, on: bool) {
        self.shared.refuse_all.store(on, Ordering::SeqCst);
    }

    /// Close connections to target `port` without an answer while `on`.
    pub fn refuse_port(&self, port: u16, on: bool) {
        let mut ports = self.shared.refuse_ports.lock().unwrap();
        ports.retain(|&p| p != port);
        if on {
            ports.push(port);
        }
    }

    /// Corrupt / cut requests with bodies at random, with the given
    /// probabilities in per mille (0 turns a kind off).
    pub fn random_faults(&self, seed: u64, corrupt_per_mille: u64, cut_per_mille: u64) {
        *self.shared.rng.lock().unwrap() = Some(Rng::new(seed));
        self.shared
            .random_corrupt
            .store(corrupt_per_mille, Ordering::SeqCst);
        self.shared
            .random_cut
            .store(cut_per_mille, Ordering::SeqCst);
    }

    /// Turn every fault off (counters to zero, no refusal, no random faults).
    pub fn heal(&self) {
        let s = &self.shared;
        s.refuse_all.store(false, Ordering::SeqCst);
        s.refuse_ports.lock().unwrap().clear();
        s.corrupt_left.store(0, Ordering::SeqCst);
        s.cut_left.store(0, Ordering::SeqCst);
        s.stall_left.store(0, Ordering::SeqCst);
        s.random_corrupt.store(0, Ordering::SeqCst);
        s.random_cut.store(0, Ordering::SeqCst);
    }

    /// Stalled requests that have reached the point where forwarding stops
    /// (half of the body has been forwarded).
    pub fn stalls_begun(&self) -> usize {
        self.shared.stalls_begun.load(Ordering::SeqCst)
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.shared.connections.load(Ordering::SeqCst)
    }

    /// Every request seen so far (whose handling has finished).
    pub fn log(&self) -> Vec<Seen> {
        self.shared.log.lock().unwrap().clone()
    }

    /// How many finished requests got `fault`.
    pub fn count(&self, fault: Fault) -> usize {
        self.shared
            .log
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.fault == fault)
            .count()
    }

    /// A short summary of the log, for assertion messages.
    pub fn describe(&self) -> String {
        let log = self.log();
        let mut s = format!("proxy {}: {} request(s)", self.port, log.len());
        let shown: Vec<&Seen> = if log.len() > 40 {
            s.push_str(" (first 10 and last 30 shown)");
            log[..10].iter().chain(&log[log.len() - 30..]).collect()
        } else {
            log.iter().collect()
        };
        for r in shown {
            s.push_str(&format!(
                "\n  {} :{}{} ({} B) {:?} -> {:?}{}",
                r.method,
                r.port,
                r.path,
                r.body_len,
                r.fault,
                r.status,
                if r.client_gave_up {
                    " (client gave up)"
                } else {
                    ""
                }
            ));
        }
        s
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop.
        let _ = TcpStream::connect_timeout(
            &SocketAddr::from(([127, 0, 0, 1], self.port)),
            Duration::from_secs(1),
        );
        if let Some(t) = self.accept_thread.take() {
            let _ = t.join();
        }
    }
}

fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    for conn in listener.incoming() {
        if shared.stop.load(Ordering::SeqCst) {
            return;
        }
        let Ok(conn) = conn else { continue };
        shared.connections.fetch_add(1, Ordering::SeqCst);
        let s = shared.clone();
        let _ = thread::Builder::new()
            .name("proxy-conn".into())
            .spawn(move || {
                if let Some(seen) = handle(conn, &s) {
                    s.log.lock().unwrap().push(seen);
                }
            });
    }
}

const IO_TIMEOUT: Duration = Duration::from_secs(30);

/// Read until the end of a head (`\r\n\r\n`); returns (head, bytes after it).
fn read_head(stream: &mut TcpStream) -> io::Result<(Vec<u8>, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16384];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let rest = buf.split_off(end + 4);
            return Ok((buf, rest));
        }
        if buf.len() > 64 * 1024 {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "head too long"));
        }
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "EOF before the end of the head",
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn header<'a>(lines: &'a [(String, String)], name: &str) -> Option<&'a str> {
    lines
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// Parse `METHOD http://host:port/path HTTP/1.1` and the header lines.
/// A parsed proxy request head: method, target host, port, path, headers.
type RequestHead = (String, String, u16, String, Vec<(String, String)>);

fn parse_request(head: &[u8]) -> Option<RequestHead> {
    let text = String::from_utf8_lossy(head);
    let mut lines = text.trim_end_matches("\r\n").split("\r\n");
    let mut first = lines.next()?.split(' ');
    let method = first.next()?.to_string();
    let target = first.next()?;
    let rest = target.strip_prefix("http://")?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) => (h.to_string(), p.parse().ok()?),
        None => (authority.to_string(), 80),
    };
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_string(), v.trim().to_string()))
        .collect();
    Some((method, host, port, path.to_string(), headers))
}

/// Serve one client connection: one request, one answer, then close.
fn handle(mut client: TcpStream, shared: &Arc<Shared>) -> Option<Seen> {
    client.set_read_timeout(Some(IO_TIMEOUT)).ok()?;
    client.set_write_timeout(Some(IO_TIMEOUT)).ok()?;
    let _ = client.set_nodelay(true);
    let (head, early_body) = read_head(&mut client).ok()?;
    let Some((method, host, port, path, headers)) = parse_request(&head) else {
        let _ = client.write_all(
            b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        );
        return Some(Seen {
            method: String::from_utf8_lossy(&head[..head.len().min(60)]).into_owned(),
            port: 0,
            path: String::new(),
            body_len: 0,
            fault: Fault::Broken,
            status: None,
            client_gave_up: false,
        });
    };
    let chunked = header(&headers, "transfer-encoding")
        .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
    let content_length: u64 = if chunked {
        0
    } else {
        header(&headers, "content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let mut seen = Seen {
        method: method.clone(),
        port,
        path: path.clone(),
        body_len: content_length,
        fault: Fault::None,
        status: None,
        client_gave_up: false,
    };

    let refused = shared.refuse_all.load(Ordering::SeqCst)
        || shared.refuse_ports.lock().unwrap().contains(&port);
    if refused {
        seen.fault = Fault::Refused;
        let _ = client.shutdown(Shutdown::Both);
        return Some(seen);
    }

    // Decide the fault for this request (body faults need a body).
    let has_body = chunked || content_length > 0;
    if has_body {
        if take(&shared.stall_left) {
            seen.fault = Fault::Stalled;
        } else if take(&shared.cut_left) {
            seen.fault = Fault::Cut;
        } else if take(&shared.corrupt_left) {
            seen.fault = Fault::Corrupted;
        } else if let Some(rng) = shared.rng.lock().unwrap().as_mut() {
            let roll = rng.below(1000);
            let corrupt = shared.random_corrupt.load(Ordering::SeqCst);
            let cut = shared.random_cut.load(Ordering::SeqCst);
            if roll < corrupt {
                seen.fault = Fault::Corrupted;
            } else if roll < corrupt + cut {
                seen.fault = Fault::Cut;
            }
        }
    }
    // Faults in the middle of a chunked body are not supported: pass it through.
    if chunked && seen.fault != Fault::None {
        seen.fault = Fault::None;
    }

    let addr = format!("{host}:{port}");
    let upstream = addr
        .parse::<SocketAddr>()
        .ok()
        .and_then(|a| TcpStream::connect_timeout(&a, Duration::from_secs(2)).ok());
    let Some(mut upstream) = upstream else {
        seen.fault = Fault::Unreachable;
        let _ = client.write_all(
            b"HTTP/1.1 502 Bad Gateway\r\nContent-Type: text/plain\r\nContent-Length: 25\r\nConnection: close\r\n\r\ntarget refused connection",
        );
        let _ = client.shutdown(Shutdown::Both);
        return Some(seen);
    };
    upstream.set_read_timeout(Some(IO_TIMEOUT)).ok()?;
    upstream.set_write_timeout(Some(IO_TIMEOUT)).ok()?;
    let _ = upstream.set_nodelay(true);

    // The head, in origin form, with Connection: close.
    let mut out = format!("{method} {path} HTTP/1.1\r\n");
    for (n, v) in &headers {
        let lower = n.to_ascii_lowercase();
        if matches!(
            lower.as_str(),
            "connection" | "proxy-connection" | "keep-alive" | "proxy-authorization"
        ) {
            continue;
        }
        out.push_str(&format!("{n}: {v}\r\n"));
    }
    out.push_str("Connection: close\r\n\r\n");
    if upstream.write_all(out.as_bytes()).is_err() {
        seen.fault = Fault::Broken;
        return Some(seen);
    }

    // Body: a separate thread copies client -> upstream while this one
    // relays upstream -> client, so an early answer (302/409/400 before
    // the whole body) still gets through.
    let body_thread = {
        let mut client_r = client.try_clone().ok()?;
        let mut upstream_w = upstream.try_clone().ok()?;
        let client_s = client.try_clone().ok()?;
        let upstream_s = upstream.try_clone().ok()?;
        let fault = seen.fault;
        let stall = Duration::from_millis(shared.stall_ms.load(Ordering::SeqCst));
        let shared_b = shared.clone();
        thread::spawn(move || -> (bool, bool) {
            if chunked {
                let complete = upstream_w.write_all(&early_body).is_ok()
                    && io::copy(&mut client_r, &mut upstream_w).is_ok();
                return (false, complete);
            }
            let half = content_length / 2;
            let mut sent: u64 = 0;
            let mut pending = early_body;
            let mut chunk = vec![0u8; 65536];
            let mut gave_up = false;
            while sent < content_length {
                if pending.is_empty() {
                    match client_r.read(&mut chunk) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => pending.extend_from_slice(&chunk[..n]),
                    }
                }
                let take = (pending.len() as u64).min(content_length - sent) as usize;
                let mut piece: Vec<u8> = pending.drain(..take).collect();
                let stop_at = match fault {
                    Fault::Cut | Fault::Stalled if sent + take as u64 > half => {
                        Some((half - sent) as usize)
                    }
                    _ => None,
                };
                if fault == Fault::Corrupted && sent <= half && half < sent + take as u64 {
                    piece[(half - sent) as usize] ^= 0x5a;
                }
                if let Some(stop) = stop_at {
                    let _ = upstream_w.write_all(&piece[..stop]);
                    let _ = upstream_w.flush();
                    if fault == Fault::Stalled {
                        shared_b.stalls_begun.fetch_add(1, Ordering::SeqCst);
                        gave_up = wait_for_close(&mut client_r, stall);
                    }
                    let _ = upstream_s.shutdown(Shutdown::Both);
                    let _ = client_s.shutdown(Shutdown::Both);
                    return (gave_up, false);
                }
                if upstream_w.write_all(&piece).is_err() {
                    break;
                }
                sent += take as u64;
            }
            (gave_up, sent == content_length)
        })
    };
    let mut body_thread = Some(body_thread);
    if shared.store_and_forward.load(Ordering::SeqCst) && seen.fault == Fault::None {
        let complete = body_thread
            .take()
            .and_then(|t| t.join().ok())
            .is_some_and(|(_, complete)| complete);
        if !complete {
            seen.fault = Fault::Broken;
            let _ = client.shutdown(Shutdown::Both);
            let _ = upstream.shutdown(Shutdown::Both);
            return Some(seen);
        }
    }

    // Relay the answer.
    let mut status = None;
    if let Ok((resp_head, first)) = read_head(&mut upstream) {
        let text = String::from_utf8_lossy(&resp_head).into_owned();
        status = text
            .split(' ')
            .nth(1)
            .and_then(|s| s.trim().parse::<u16>().ok());
        let resp_len: Option<u64> = text
            .split("\r\n")
            .filter_map(|l| l.split_once(':'))
            .find(|(n, _)| n.trim().eq_ignore_ascii_case("content-length"))
            .and_then(|(_, v)| v.trim().parse().ok());
        if seen.fault == Fault::Cut || seen.fault == Fault::Stalled {
            // The target answered before the fault hit (e.g. an early 302):
            // the client still gets nothing.
        } else if client.write_all(&resp_head).is_ok() {
            let mut relayed = first.len() as u64;
            let mut ok = client.write_all(&first).is_ok();
            let mut chunk = vec![0u8; 65536];
            while ok && resp_len.is_none_or(|l| relayed < l) {
                match upstream.read(&mut chunk) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        relayed += n as u64;
                        ok = client.write_all(&chunk[..n]).is_ok();
                    }
                }
            }
        }
    }
    seen.status = status;
    if matches!(seen.fault, Fault::Cut | Fault::Stalled) {
        // The body thread ends these itself; closing the client first would
        // look like the client giving up.
        seen.client_gave_up = body_thread
            .and_then(|t| t.join().ok())
            .is_some_and(|(gave_up, _)| gave_up);
        let _ = client.shutdown(Shutdown::Both);
        let _ = upstream.shutdown(Shutdown::Both);
    } else {
        let _ = client.shutdown(Shutdown::Both);
        let _ = upstream.shutdown(Shutdown::Both);
        if let Some(t) = body_thread {
            let _ = t.join();
        }
    }
    Some(seen)
}

/// Discard what the client sends until it closes (true) or `bound` passes (false).
fn wait_for_close(client: &mut TcpStream, bound: Duration) -> bool {
    let deadline = Instant::now() + bound;
    let mut chunk = vec![0u8; 65536];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        let _ = client.set_read_timeout(Some(left.min(Duration::from_millis(200))));
        match client.read(&mut chunk) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if super::is_read_timeout(&e) => {}
            Err(_) => return true,
        }
    }
}

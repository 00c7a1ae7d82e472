//! The listening socket: accepts connections (bounded in number), applies
//! the connection-level limits (header size and time, TCP_NODELAY, a client
//! that takes none of an answer for `--read-timeout` is cut off), hands each
//! request to `Api::handle`, and drains connections on shutdown. The answer
//! hyper writes by itself to an unparseable first request of a connection
//! gets our `Server` header and a one-line reason (`Conn`). It never
//! interprets request contents beyond that first request's method.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use super::Api;
use crate::config::Config;

/// Serve until `shutdown` resolves, then let in-flight requests finish for
/// up to `config.shutdown_timeout`.
pub async fn serve(
    listener: TcpListener,
    api: Arc<Api>,
    config: &Config,
    shutdown: impl Future<Output = ()>,
) {
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(config.header_timeout)
        // hyper answers heads far over the limit itself (`Conn` adds the
        // Server header and a reason); `Api` answers the rest with 431.
        // (hyper's header count limit stays at its default of 100: a higher
        // one costs every request the initialisation of that many slots;
        // 4,096, all that fit in 16 KiB, cut get_small by a third, and 256
        // by 7%: 98,343 against 105,645 req/s in one harness run. Apache's
        // LimitRequestFields is 100 too.)
        .max_header_size(config.max_header_size.saturating_mul(4).max(64 * 1024))
        .keep_alive(true);
    let slots = Arc::new(Semaphore::new(config.max_connections));
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            () = &mut shutdown => break,
            permit = slots.clone().acquire_owned() => match permit {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let stream = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors and the like: wait instead of spinning.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let api = api.clone();
        let served = Arc::new(AtomicBool::new(false));
        let io = Conn::new(stream, served.clone(), config.read_timeout);
        let service = service_fn(move |req| {
            // From now on every byte written may be ours (see `Conn`).
            served.store(true, Ordering::Relaxed);
            let api = api.clone();
            async move { Ok::<_, Infallible>(api.handle(req).await) }
        });
        let conn = graceful.watch(builder.serve_connection(TokioIo::new(io), service));
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!("connection ended: {e}");
            }
            drop(permit);
        });
    }
    drop(listener);
    tokio::select! {
        () = graceful.shutdown() => {}
        () = tokio::time::sleep(config.shutdown_timeout) => {
            tracing::warn!("cutting connections still open after {:?}", config.shutdown_timeout);
        }
    }
}

/// A connection whose outgoing bytes pass through unchanged, except the
/// answer hyper writes by itself when the first request on the connection
/// cannot be parsed (no `Server` header, empty body), which is replaced by
/// the same status with our `Server` header and a one-line reason, as SPEC
/// wants of every error. Only before the service has been called: after
/// that, bytes written may be a stored file's, whatever they look like,
/// and a later unparseable request keeps hyper's bare answer.
/// A client that takes nothing of an answer for `stall_limit` is cut off,
/// so readers that stopped cannot hold connections (and their slots) for
/// ever; one that reads slowly but steadily is not.
struct Conn {
    inner: TcpStream,
    stall_limit: Duration,
    /// Armed while a write waits for the client to take bytes; made once,
    /// reset after.
    stall: Option<Pin<Box<tokio::time::Sleep>>>,
    /// The bytes queued in the socket when the stall timer was armed.
    stall_queued: Option<usize>,
    /// Set by the service when it is first called on this connection.
    served: Arc<AtomicBool>,
    /// The connection's first bytes, until they show the first request's
    /// method (a space within 8 bytes) or cannot.
    first: Vec<u8>,
    /// The first request began with `HEAD`: its answer has no body.
    head: bool,
    /// A replacement being written, and how many bytes of hyper's buffer it
    /// stands for (reported once all of it is written).
    pending: Option<(Vec<u8>, usize, usize)>,
}

impl Conn {
    fn new(inner: TcpStream, served: Arc<AtomicBool>, stall_limit: Duration) -> Conn {
        Conn {
            inner,
            stall_limit,
            stall: None,
            stall_queued: None,
            served,
            first: Vec::new(),
            head: false,
            pending: None,
        }
    }

    /// The bare error hyper is writing, explained; `None` for anything else.
    fn explain(&self, buf: &[u8]) -> Option<Vec<u8>> {
        if self.served.load(Ordering::Relaxed) {
            return None;
        }
        explain_bare_error(buf, self.head)
    }

    /// Pass a write's outcome on; a write that still waits after
    /// `stall_limit`, with the client having taken nothing of what the
    /// socket holds meanwhile, fails instead (hyper then closes the
    /// connection). The kernel reports a full socket writable only once a
    /// good part of it drained, so a slow reader's progress shows in the
    /// socket's queue, not in writes.
    fn watch<T>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        if polled.is_ready() {
            self.stall_queued = None;
            return polled;
        }
        if self.stall_queued.is_none() {
            self.stall_queued = Some(unsent(&self.inner));
            let deadline = tokio::time::Instant::now() + self.stall_limit;
            match &mut self.stall {
                Some(sleep) => sleep.as_mut().reset(deadline),
                None => self.stall = Some(Box::pin(tokio::time::sleep_until(deadline))),
            }
        }
        let Some(sleep) = &mut self.stall else {
            return Poll::Pending;
        };
        while sleep.as_mut().poll(cx).is_ready() {
            let queued = unsent(&self.inner);
            if self.stall_queued.is_some_and(|before| queued >= before) {
                self.stall_queued = None;
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the client took nothing of the answer in time",
                )));
            }
            // It took some: wait again from now.
            self.stall_queued = Some(queued);
            sleep
                .as_mut()
                .reset(tokio::time::Instant::now() + self.stall_limit);
        }
        Poll::Pending
    }

    fn write_pending(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        let Some((bytes, written, stands_for)) = &mut self.pending else {
            return Poll::Ready(Ok(0));
        };
        while *written < bytes.len() {
            match Pin::new(&mut self.inner).poll_write(cx, &bytes[*written..]) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => *written += n,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        // (The caller watches for stalls; `written` keeps the progress.)
        let n = *stands_for;
        self.pending = None;
        Poll::Ready(Ok(n))
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if self.first.len() < 8 && !self.first.contains(&b' ') {
            // The first bytes of a connection start its first request.
            let read = &buf.filled()[before..];
            let take = read.len().min(8 - self.first.len());
            self.first.extend_from_slice(&read[..take]);
            self.head = request_method(&self.first) == Some(&b"HEAD"[..]);
        }
        polled
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.pending.is_none() {
            if let Some(replacement) = self.explain(buf) {
                self.pending = Some((replacement, 0, buf.len()));
            }
        }
        let polled = if self.pending.is_some() {
            self.write_pending(cx)
        } else {
            Pin::new(&mut self.inner).poll_write(cx, buf)
        };
        self.watch(cx, polled)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if let Some(first) = bufs.iter().find(|b| !b.is_empty()) {
            if self.pending.is_some() || self.explain(first).is_some() {
                return self.poll_write(cx, first);
            }
        }
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.watch(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.inner).poll_flush(cx);
        self.watch(cx, polled)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Bytes written to the socket that the client has not yet acknowledged
/// (Linux `SIOCOUTQ`); 0 when unknown, which counts as no progress.
fn unsent(stream: &TcpStream) -> usize {
    use std::os::fd::AsRawFd;
    let mut queued: libc::c_int = 0;
    // SAFETY: SIOCOUTQ writes one int through the pointer, which points to
    // a live c_int; the descriptor is open for as long as `stream` lives.
    let rc = unsafe { libc::ioctl(stream.as_raw_fd(), libc::TIOCOUTQ, &mut queued) };
    if rc == 0 {
        usize::try_from(queued).unwrap_or(0)
    } else {
        0
    }
}

/// The method token at the start of `bytes`, if they start like a request
/// line (capital letters, then a space).
fn request_method(bytes: &[u8]) -> Option<&[u8]> {
    let len = bytes.iter().take(8).position(|&b| b == b' ')?;
    let method = &bytes[..len];
    (len > 0 && method.iter().all(u8::is_ascii_uppercase)).then_some(method)
}

/// If `buf` is a whole error response hyper wrote by itself (status 4xx or
/// 5xx, no `Server` header, `content-length: 0`), the same response with
/// our `Server` header and a one-line plain-text reason (its length only,
/// when it answers a HEAD request).
fn explain_bare_error(buf: &[u8], to_head: bool) -> Option<Vec<u8>> {
    // Cheap first test: every other response fails it on its 10th byte.
    if buf.len() < 12 || !buf.starts_with(b"HTTP/1.1 ") || !matches!(buf[9], b'4' | b'5') {
        return None;
    }
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n")?;
    if end + 4 != buf.len() {
        return None;
    }
    let head = std::str::from_utf8(&buf[..end]).ok()?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next()?;
    let mut rest = Vec::new();
    let mut empty_body = false;
    for line in lines {
        let (field, value) = line.split_once(':')?;
        match field.to_ascii_lowercase().as_str() {
            "server" => return None,
            "content-length" => empty_body = value.trim() == "0",
            _ => rest.push(line),
        }
    }
    if !empty_body {
        return None;
    }
    let reason = match status_line.get(9..12)? {
        "400" => "malformed request: the request line or a header could not be parsed",
        "408" => "the request headers took too long to arrive",
        "413" => "the request is too large",
        "414" => "the request target is too long",
        "431" => "the request headers are too large or too many",
        "501" => "not implemented",
        "505" => "HTTP version not supported (HTTP/1.1 and 1.0 are)",
        _ => status_line.get(13..).unwrap_or("error"),
    };
    let mut out = String::with_capacity(256);
    out.push_str(status_line);
    out.push_str(concat!("\r\nserver: cockatiel/", env!("CARGO_PKG_VERSION")));
    out.push_str("\r\ncontent-type: text/plain; charset=utf-8");
    for line in rest {
        out.push_str("\r\n");
        out.push_str(line);
    }
    out.push_str(&format!("\r\ncontent-length: {}\r\n\r\n", reason.len() + 1));
    if !to_head {
        out.push_str(reason);
        out.push('\n');
    }
    Some(out.into_bytes())
}

#[cfg(test)]
mod tests {
    use super::{explain_bare_error, request_method};

    #[test]
    fn hyper_error_answers_get_a_server_header_and_a_reason() {
        let bare = b"HTTP/1.1 431 Request Header Fields Too Large\r\nconnection: close\r\ncontent-length: 0\r\ndate: Fri, 27 Nov 2026 15:34:18 GMT\r\n\r\n";
        let fixed =
            String::from_utf8(explain_bare_error(bare, false).expect("rewritten")).expect("utf-8");
        let (head, body) = fixed.split_once("\r\n\r\n").expect("a head");
        assert!(head.starts_with("HTTP/1.1 431 Request Header Fields Too Large\r\n"));
        assert!(head.contains(concat!("\r\nserver: cockatiel/", env!("CARGO_PKG_VERSION"))));
        assert!(head.contains("\r\nconnection: close"));
        assert!(head.contains("\r\ndate: Fri, 27 Nov 2026 15:34:18 GMT"));
        assert!(head.contains(&format!("\r\ncontent-length: {}", body.len())));
        assert!(
            body.ends_with('\n') && body.lines().count() == 1,
            "{body:?}"
        );
        let bad = b"HTTP/1.1 400 Bad Request\r\nconnection: close\r\ncontent-length: 0\r\n\r\n";
        let fixed =
            String::from_utf8(explain_bare_error(bad, false).expect("rewritten")).expect("utf-8");
        assert!(fixed.ends_with(
            "\r\n\r\nmalformed request: the request line or a header could not be parsed\n"
        ));
    }

    #[test]
    fn a_head_request_gets_the_reason_s_length_but_no_body() {
        let bad = b"HTTP/1.1 400 Bad Request\r\nconnection: close\r\ncontent-length: 0\r\n\r\n";
        let fixed =
            String::from_utf8(explain_bare_error(bad, true).expect("rewritten")).expect("utf-8");
        assert!(fixed.contains("\r\nserver: cockatiel/"));
        assert!(fixed.ends_with("\r\n\r\n"), "{fixed:?}");
        assert!(!fixed.contains("content-length: 0"), "{fixed:?}");
    }

    #[test]
    fn a_read_starting_with_a_method_starts_a_request() {
        assert_eq!(request_method(b"HEAD /x HTTP/1.1\r\n"), Some(&b"HEAD"[..]));
        assert_eq!(request_method(b"GET / HTTP/1.1"), Some(&b"GET"[..]));
        assert_eq!(request_method(b"DELETE /a"), Some(&b"DELETE"[..]));
        assert_eq!(request_method(b"tinue\r\nHost: x"), None);
        assert_eq!(request_method(b" HEAD"), None);
        assert_eq!(request_method(b"HEA"), None);
        assert_eq!(request_method(b""), None);
    }

    #[test]
    fn our_own_answers_pass_unchanged() {
        for ours in [
            &b"HTTP/1.1 404 Not Found\r\ncontent-type: text/plain; charset=utf-8\r\nserver: cockatiel/0.1.0\r\ncontent-length: 10\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n",
            b"HTTP/1.1 302 Found\r\nlocation: /a\r\ncontent-length: 0\r\n\r\n",
            // An error with a body, or a head without its end: not hyper's own.
            b"HTTP/1.1 400 Bad Request\r\ncontent-length: 3\r\n\r\nbad",
            b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n",
            b"",
            b"HTTP/1.1 4",
        ] {
            assert_eq!(explain_bare_error(ours, false), None, "{:?}", String::from_utf8_lossy(ours));
        }
    }
}

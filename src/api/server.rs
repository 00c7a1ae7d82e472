//! The listening socket: accepts connections (bounded in number), applies
//! the connection-level limits (header size and time, TCP_NODELAY), hands
//! each request to `Api::handle`, and drains connections on shutdown.
//! It never looks at request contents.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
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
        // hyper's own 431 carries neither a reason nor our Server header, so
        // it only catches heads far over the limit; `Api` answers the rest.
        // (hyper's header count limit stays at its default of 100: a higher
        // one costs every request the initialisation of that many slots.)
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
        let service = service_fn(move |req| {
            let api = api.clone();
            async move { Ok::<_, Infallible>(api.handle(req).await) }
        });
        let conn = graceful.watch(builder.serve_connection(TokioIo::new(stream), service));
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

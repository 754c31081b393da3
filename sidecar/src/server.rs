//! Serving an HTTP router on an address until shutdown — the admin server and the read API both:
//! HTTP/1.1 with keep-alive and HTTP/2 on one port, plain or over TLS with a certificate that is
//! reloaded when its files change, and at most a fixed number of connections at once.
//!
//! The connection limit is enforced at accept, before a byte of HTTP is parsed: under overload
//! the CPU that parsing and routing the excess would take is what the admitted requests need
//! (issue 27: an open-loop client at twice a CPU-bound sidecar's capacity opens a connection for
//! every request that finds the others busy, and those connections, not the requests the
//! admission layer sees, were what took the sidecar's CPU). A connection past the limit gets a
//! fixed 503 with `Retry-After` written straight to the socket (over TLS, where no answer can be
//! written before a handshake, it is closed at once).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use axum::Router;
use axum_server::tls_rustls::RustlsConfig;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use prometheus::{IntCounter, IntGauge};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};

/// A certificate chain and its key, for TLS.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Counts of one server's connections, for /metrics.
#[derive(Clone)]
pub struct ConnectionMetrics {
    /// connections open now
    pub open: IntGauge,
    /// connections refused because `max_connections` were open
    pub refused: IntCounter,
}

/// What to serve and how.
pub struct Listening {
    /// for logs: which server this is
    pub what: &'static str,
    pub addr: SocketAddr,
    /// `None`: plain HTTP
    pub tls: Option<TlsFiles>,
    /// connections open at once at most; past it a connection is refused at accept
    pub max_connections: usize,
    pub metrics: Option<ConnectionMetrics>,
}

/// A request's headers must arrive within this; it is also how long an idle HTTP/1.1 keep-alive
/// connection is kept (hyper starts the same timer while it waits for the next request), so idle
/// connections do not hold the limited slots for ever.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// A TLS handshake must finish within this.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// HTTP/2 requests in flight on one connection at most (the read API's own admission layer
/// bounds what runs across all connections).
const H2_MAX_STREAMS: u32 = 256;
/// An HTTP/2 connection is pinged when idle this long, and closed when the ping is not
/// answered within [`H2_PING_TIMEOUT`]: a vanished client does not keep its slot.
const H2_PING_INTERVAL: Duration = Duration::from_secs(30);
const H2_PING_TIMEOUT: Duration = Duration::from_secs(20);
/// At shutdown, requests in flight are given this long to finish.
const DRAIN_FOR: Duration = Duration::from_secs(5);
/// After a failed accept (out of file descriptors, most often), the loop pauses this long
/// instead of spinning on the error.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);
/// How long a refused connection waits for its client's request before it is answered.
const REFUSED_WAIT_FOR_REQUEST: Duration = Duration::from_secs(1);
/// How long a refused connection is kept to let the client read the 503 and close first
/// (closing on unread bytes would reset the connection and could lose the answer).
const REFUSED_LINGER: Duration = Duration::from_millis(500);

/// The answer to a connection past the limit: the read API's 503 body, `Retry-After: 1`, and
/// `Connection: close`.
static AT_CAPACITY: LazyLock<Vec<u8>> = LazyLock::new(|| {
    let body = crate::read::shedding::OVERLOADED_BODY;
    format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\n\
         connection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
});

/// Serves `app` as `listening` says until `shutdown` turns true.
pub async fn serve(
    listening: Listening,
    app: Router,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let Listening {
        what,
        addr,
        tls,
        max_connections,
        metrics,
    } = listening;
    let listener = TcpListener::bind(addr).await?;
    let tls = match tls {
        Some(files) => {
            let config = RustlsConfig::from_pem_file(&files.cert, &files.key).await?;
            tokio::spawn(reload_on_change(config.clone(), files, shutdown.clone()));
            Some(config)
        }
        None => None,
    };
    let protocol = if tls.is_some() { "HTTPS" } else { "HTTP" };
    tracing::info!(%addr, max_connections, "{what} listening ({protocol}; HTTP/1.1 and HTTP/2)");
    let slots = Arc::new(Semaphore::new(max_connections.max(1)));
    let http = http_builder();
    let graceful = GracefulShutdown::new();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shutdown.wait_for(|stop| *stop) => break,
        };
        let stream = match accepted {
            Ok((stream, _peer)) => stream,
            Err(err) => {
                tracing::warn!(error = %err, "{what}: accepting a connection failed");
                tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                continue;
            }
        };
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            if let Some(metrics) = &metrics {
                metrics.refused.inc();
            }
            tokio::spawn(refuse(stream, tls.is_some()));
            continue;
        };
        // answers are small and written whole: Nagle's algorithm would only hold them back
        let _ = stream.set_nodelay(true);
        let open = OpenConnection::new(slot, metrics.clone());
        let service = TowerToHyperService::new(app.clone());
        let (http, watcher, tls) = (http.clone(), graceful.watcher(), tls.clone());
        tokio::spawn(async move {
            let _open = open;
            let served = match tls {
                None => {
                    let connection = http.serve_connection(TokioIo::new(stream), service).into_owned();
                    watcher.watch(connection).await
                }
                Some(config) => {
                    let acceptor = tokio_rustls::TlsAcceptor::from(config.get_inner());
                    let stream =
                        match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                            Ok(Ok(stream)) => stream,
                            Ok(Err(err)) => {
                                tracing::debug!(error = %err, "TLS handshake failed");
                                return;
                            }
                            Err(_) => return,
                        };
                    let connection = http.serve_connection(TokioIo::new(stream), service).into_owned();
                    watcher.watch(connection).await
                }
            };
            if let Err(err) = served {
                tracing::debug!(error = %err, "connection ended with an error");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(DRAIN_FOR, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::info!("{what}: requests still in flight after {DRAIN_FOR:?} were cut at shutdown");
    }
    Ok(())
}

/// HTTP/1.1 (keep-alive) and HTTP/2 (by ALPN over TLS, by its preface over plain TCP) on one port.
fn http_builder() -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(H2_MAX_STREAMS)
        .keep_alive_interval(H2_PING_INTERVAL)
        .keep_alive_timeout(H2_PING_TIMEOUT);
    builder
}

/// A connection's slot among `max_connections`, counted in the open-connections gauge while held.
struct OpenConnection {
    _slot: OwnedSemaphorePermit,
    metrics: Option<ConnectionMetrics>,
}

impl OpenConnection {
    fn new(slot: OwnedSemaphorePermit, metrics: Option<ConnectionMetrics>) -> Self {
        if let Some(metrics) = &metrics {
            metrics.open.inc();
        }
        Self { _slot: slot, metrics }
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        if let Some(metrics) = &self.metrics {
            metrics.open.dec();
        }
    }
}

/// Answers a connection past the limit without parsing it: the fixed 503 over plain HTTP, then
/// close; over TLS a close at once.
async fn refuse(mut stream: TcpStream, tls: bool) {
    if tls {
        return;
    }
    let mut discard = [0u8; 4096];
    // The answer waits for the request's first bytes (not parsed, only read): an HTTP client
    // takes an answer that comes before its request for a broken connection, and bytes left
    // unread would turn the close below into a reset. A client that sends nothing gets the
    // answer after the wait.
    let _ = tokio::time::timeout(REFUSED_WAIT_FOR_REQUEST, stream.read(&mut discard)).await;
    if stream.write_all(&AT_CAPACITY).await.is_err() {
        return;
    }
    let _ = stream.shutdown().await;
    let _ = tokio::time::timeout(REFUSED_LINGER, async {
        while matches!(stream.read(&mut discard).await, Ok(read) if read > 0) {}
    })
    .await;
}

/// Reloads the certificate and key when either file changes (checked every 2 s): a renewed
/// certificate is served without a restart. A pair that does not load is logged and the old one
/// kept.
async fn reload_on_change(config: RustlsConfig, files: TlsFiles, mut shutdown: watch::Receiver<bool>) {
    let stamp = |files: &TlsFiles| {
        [&files.cert, &files.key].map(|path| std::fs::metadata(path).and_then(|m| m.modified()).ok())
    };
    let mut seen = stamp(&files);
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
            _ = shutdown.wait_for(|stop| *stop) => return,
        }
        let now = stamp(&files);
        if now == seen {
            continue;
        }
        match config.reload_from_pem_file(&files.cert, &files.key).await {
            Ok(()) => {
                tracing::info!(cert = %files.cert.display(), "reloaded the read API's TLS certificate");
                seen = now;
            }
            Err(err) => {
                tracing::warn!(error = %err, "the read API's new certificate does not load; keeping the old one")
            }
        }
    }
}

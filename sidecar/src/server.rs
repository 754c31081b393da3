//! Serving an HTTP router on an address until shutdown, plain or over TLS with a certificate
//! that is reloaded when its files change: the admin server and the read API both.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use axum::Router;
use axum_server::tls_rustls::RustlsConfig;
use tokio::sync::watch;

/// A certificate chain and its key, for TLS.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Serves `app` on `addr` until `shutdown` turns true; over TLS with `tls`.
pub async fn serve(
    what: &'static str,
    addr: SocketAddr,
    app: Router,
    tls: Option<TlsFiles>,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let Some(files) = tls else {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        tracing::info!(%addr, "{what} listening (HTTP)");
        return axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = shutdown.wait_for(|stop| *stop).await;
            })
            .await;
    };
    let config = RustlsConfig::from_pem_file(&files.cert, &files.key).await?;
    tokio::spawn(reload_on_change(config.clone(), files, shutdown.clone()));
    let handle = axum_server::Handle::new();
    let stopper = handle.clone();
    tokio::spawn(async move {
        let _ = shutdown.wait_for(|stop| *stop).await;
        stopper.graceful_shutdown(Some(Duration::from_secs(5)));
    });
    tracing::info!(%addr, "{what} listening (HTTPS)");
    axum_server::bind_rustls(addr, config)
        .handle(handle)
        .serve(app.into_make_service())
        .await
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

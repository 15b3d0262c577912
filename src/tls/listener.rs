//! The HTTPS accept loop. `axum::serve` cannot hand handlers the client's
//! certificate, so this loop does what it does (HTTP/1.1, `ConnectInfo`,
//! graceful shutdown) and adds the TLS handshake:
//!
//! - each connection is handshaken in its own task, under a timeout, with a
//!   cap on handshakes in progress (a full handshake may wait for an HSM
//!   signature; the cap keeps a flood of ClientHellos from queueing
//!   unbounded work on the HSM and the runtime's blocking threads);
//! - after a *resumed* handshake, which skips certificate verification, the
//!   client certificate is checked against the revocation hook again, so a
//!   device revoked since its first connection cannot come back on a ticket;
//! - requests carry `ConnectInfo<SocketAddr>` and, when the client
//!   authenticated, [`PeerCertificate`];
//! - on shutdown the loop stops accepting, open connections finish their
//!   request in flight and close, and the call returns when all are gone
//!   (as `axum::serve(..).with_graceful_shutdown(..)` does).

use super::PeerCertificate;
use super::client_auth::{ClientCertCheck, run_check};
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use rustls::server::ServerConfig;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt;

/// Handshake limits (`server.tls.handshake_timeout_secs`, `server.tls.max_handshakes`).
#[derive(Debug, Clone, Copy)]
pub struct HandshakeLimits {
    /// A client that has not finished its handshake by then is dropped.
    pub timeout: Duration,
    /// Handshakes in progress at once; further connections wait in the
    /// kernel's accept queue.
    pub max_in_progress: usize,
}

/// Serves `router` over TLS on `listener` until `shutdown` resolves, then
/// drains open connections.
pub async fn serve(
    listener: TcpListener,
    config: Arc<ServerConfig>,
    check: Option<Arc<dyn ClientCertCheck>>,
    limits: HandshakeLimits,
    router: axum::Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let acceptor = TlsAcceptor::from(config);
    let handshakes = Arc::new(Semaphore::new(limits.max_in_progress.max(1)));
    let graceful = GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            () = &mut shutdown => break,
            p = handshakes.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let (tcp, addr) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    if !is_connection_error(&e) {
                        // EMFILE and friends: back off instead of spinning.
                        tracing::error!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(250)).await;
                    }
                    continue;
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let check = check.clone();
        let router = router.clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(limits.timeout, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    tracing::debug!(%addr, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%addr, "TLS handshake timed out");
                    return;
                }
            };
            drop(permit);
            let (_, conn) = tls.get_ref();
            let peer = conn
                .peer_certificates()
                .and_then(|chain| chain.first())
                .map(|leaf| PeerCertificate(Arc::from(leaf.as_ref())));
            let resumed = conn.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
            if let (true, Some(peer), Some(check)) = (resumed, &peer, &check)
                && run_check(check.as_ref(), &peer.0).is_err()
            {
                return;
            }
            let service = router.map_request(move |mut req: axum::http::Request<Incoming>| {
                req.extensions_mut().insert(ConnectInfo(addr));
                if let Some(p) = &peer {
                    req.extensions_mut().insert(p.clone());
                }
                req
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tls), TowerToHyperService::new(service));
            if let Err(e) = watcher.watch(conn).await {
                tracing::debug!(%addr, error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

fn is_connection_error(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::ConnectionRefused
            | std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::ConnectionReset
    )
}

//! The proxy listener: HTTP/1.1 and HTTP/2 on one socket, optional TLS and mTLS, connection and
//! header limits, and graceful shutdown.
//!
//! [`serve`] takes a bound listener and a shutdown future (the mini-redis shape), so tests bind
//! port 0. Invariants: at most `limits.max_connections` connections are served at once (more wait
//! in the accept queue); a client must finish its TLS handshake and request head within
//! `limits.header_read_timeout`; on shutdown no new connection is accepted and in-flight requests
//! get `limits.shutdown_grace` to finish.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;

use crate::gateway::Gateway;
use crate::pipeline::{ConnectionInfo, handle};
use crate::tls::certificate_identities;

/// hyper's own head buffer: larger than our limit so that oversized heads reach our check (and get
/// a Stripe JSON 431); beyond it hyper answers a bare 431 itself.
fn hyper_buffer_size(max_header_bytes: usize) -> usize {
    (max_header_bytes.saturating_mul(2)).max(16 * 1024)
}

fn connection_builder(gateway: &Gateway) -> auto::Builder<TokioExecutor> {
    let limits = &gateway.config.limits;
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(hyper_buffer_size(limits.max_header_bytes))
        .max_headers(limits.max_headers.saturating_mul(2).max(100))
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(hyper_buffer_size(limits.max_header_bytes)).unwrap_or(u32::MAX))
        .max_concurrent_streams(256);
    builder
}

/// Serves the proxy on `listener` until `shutdown` completes, then drains.
pub async fn serve(
    listener: TcpListener,
    gateway: Arc<Gateway>,
    tls: Option<Arc<rustls::ServerConfig>>,
    shutdown: impl Future<Output = ()>,
) {
    let builder = Arc::new(connection_builder(&gateway));
    let acceptor = tls.map(TlsAcceptor::from);
    let permits = Arc::new(Semaphore::new(gateway.config.limits.max_connections));
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            permit = permits.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
            () = &mut shutdown => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let gateway = gateway.clone();
        let builder = builder.clone();
        let acceptor = acceptor.clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let _permit = permit;
            let _open = OpenConnection::new(&gateway);
            let identities = match acceptor {
                None => Vec::new(),
                Some(acceptor) => {
                    let handshake_timeout = gateway.config.limits.header_read_timeout;
                    let tls_stream = match tokio::time::timeout(handshake_timeout, acceptor.accept(stream)).await {
                        Ok(Ok(tls_stream)) => tls_stream,
                        Ok(Err(error)) => {
                            tracing::info!(%peer, error = %error, "TLS handshake failed");
                            return;
                        }
                        Err(_) => {
                            tracing::info!(%peer, "TLS handshake timed out");
                            return;
                        }
                    };
                    let identities = tls_stream
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|chain| chain.first())
                        .map(certificate_identities)
                        .unwrap_or_default();
                    let info = ConnectionInfo { peer, identities: Arc::new(identities) };
                    serve_connection(&builder, watcher, gateway.clone(), info, TokioIo::new(tls_stream)).await;
                    return;
                }
            };
            let info = ConnectionInfo { peer, identities: Arc::new(identities) };
            serve_connection(&builder, watcher, gateway.clone(), info, TokioIo::new(stream)).await;
        });
    }
    drop(listener);
    let grace = gateway.config.limits.shutdown_grace;
    gateway.begin_shutdown();
    tokio::select! {
        () = graceful.shutdown() => tracing::info!("all connections drained"),
        () = tokio::time::sleep(grace) => tracing::warn!(grace_s = grace.as_secs(), "shutdown grace period over; closing remaining connections"),
    }
}

/// Runs hyper over one accepted connection (plain or TLS) until it closes or shutdown drains it.
async fn serve_connection<I>(
    builder: &auto::Builder<TokioExecutor>,
    watcher: hyper_util::server::graceful::Watcher,
    gateway: Arc<Gateway>,
    info: ConnectionInfo,
    io: I,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let peer = info.peer;
    let service = service_fn(move |request| {
        // The pipeline runs in its own task so that a client that goes away mid-request does
        // not cancel it: a request already forwarded still gets its audit record and log line.
        let exchange = tokio::spawn(handle(gateway.clone(), info.clone(), request));
        async move {
            Ok::<_, Infallible>(match exchange.await {
                Ok(response) => response,
                Err(_) => crate::error::ProxyError::Internal.to_reply().into_response(),
            })
        }
    });
    let connection = builder.serve_connection(io, service);
    if let Err(error) = watcher.watch(connection.into_owned()).await {
        tracing::debug!(%peer, error = %error, "connection ended with an error");
    }
}

/// Counts an open connection for as long as it lives.
struct OpenConnection(Arc<Gateway>);

impl OpenConnection {
    fn new(gateway: &Arc<Gateway>) -> OpenConnection {
        gateway.metrics.open_connections.inc();
        OpenConnection(gateway.clone())
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.metrics.open_connections.dec();
    }
}

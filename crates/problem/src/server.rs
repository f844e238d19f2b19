//! Serving a router over TCP with the limits a public-facing service needs: a bound on open
//! connections, and timeouts on reading headers, on reading the body and on the whole request.
//! (axum's own `serve` has none of them: a client trickling header bytes holds a connection
//! and its task for as long as it likes.)

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::http::StatusCode;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tower::ServiceExt as _;

/// The limits; every field has a flag and an environment variable in the `coffer` binary.
#[derive(Debug, Clone, Copy)]
pub struct HttpLimits {
    /// Connections served at once; more wait in the listen backlog (`COFFER_HTTP_MAX_CONNECTIONS`).
    pub max_connections: usize,
    /// From a connection's first byte (or the end of the previous request) to the end of the
    /// request headers (`COFFER_HTTP_HEADER_TIMEOUT_MS`).
    pub header_read_timeout: Duration,
    /// Reading the request body (`COFFER_HTTP_BODY_TIMEOUT_MS`): `408 request_timeout`.
    pub body_read_timeout: Duration,
    /// The whole request, handler included (`COFFER_HTTP_REQUEST_TIMEOUT_MS`): `408`. Longer
    /// than any answer the services wait for (a writer's command deadline plus grace).
    pub request_timeout: Duration,
}

impl Default for HttpLimits {
    fn default() -> Self {
        Self {
            max_connections: 4_096,
            header_read_timeout: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(30),
        }
    }
}

/// Serves `router` on `listener` until `shutdown`, then lets open requests finish.
/// Handlers may extract `ConnectInfo<SocketAddr>`.
pub async fn serve(
    listener: TcpListener,
    router: axum::Router,
    limits: HttpLimits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let router = router
        .layer(tower_http::timeout::RequestBodyTimeoutLayer::new(
            limits.body_read_timeout,
        ))
        .layer(tower_http::timeout::TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            limits.request_timeout,
        ));
    let permits = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let (stop, stopped) = watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop.send(true);
    });
    let mut accepting = stopped.clone();
    loop {
        let permit = tokio::select! {
            permit = permits.clone().acquire_owned() => permit,
            _ = stop_signalled(&mut accepting) => break,
        };
        let Ok(permit) = permit else { break };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors, say: pause instead of spinning.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop_signalled(&mut accepting) => break,
        };
        let service = router.clone().map_request(
            move |mut request: axum::http::Request<hyper::body::Incoming>| {
                request.extensions_mut().insert(ConnectInfo(peer));
                request.map(axum::body::Body::new)
            },
        );
        let mut stopped = stopped.clone();
        tokio::spawn(async move {
            let _permit = permit;
            // HTTP/1.1 only: its header timeout also covers a connection that sends nothing
            // (protocol auto-detection would wait for a first byte without one).
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_read_timeout)
                .serve_connection(TokioIo::new(stream), TowerToHyperService::new(service))
                .with_upgrades();
            tokio::pin!(connection);
            let mut draining = false;
            loop {
                tokio::select! {
                    result = connection.as_mut() => {
                        if let Err(error) = result {
                            tracing::debug!(%peer, %error, "connection ended");
                        }
                        break;
                    }
                    _ = stop_signalled(&mut stopped), if !draining => {
                        draining = true;
                        connection.as_mut().graceful_shutdown();
                    }
                }
            }
        });
    }
    // Wait for the connections to drain: every permit back.
    let _ = permits
        .acquire_many(u32::try_from(limits.max_connections.max(1)).unwrap_or(u32::MAX))
        .await;
}

/// Completes once the stop signal is set. (The guard `wait_for` returns is not `Send`; it is
/// dropped here, so callers' futures stay `Send`.)
async fn stop_signalled(receiver: &mut watch::Receiver<bool>) {
    let _ = receiver.wait_for(|stop| *stop).await;
}

/// Whether an error (a body read that failed, say) was the body read timeout.
pub fn is_body_timeout(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut current = Some(error);
    while let Some(error) = current {
        if error.is::<tower_http::timeout::TimeoutError>() {
            return true;
        }
        current = error.source();
    }
    false
}

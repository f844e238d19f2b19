//! Serving a router over TCP with the limits a public-facing service needs: a bound on open
//! connections, and timeouts on reading headers, on reading the body and on the whole request.
//! (axum's own `serve` has none of them: a client trickling header bytes holds a connection
//! and its task for as long as it likes.)

use std::future::Future;
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::response::IntoResponse as _;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tower::ServiceExt as _;

/// The limits; every field has a flag and an environment variable in the `coffer` binary.
#[derive(Debug, Clone, Copy)]
pub struct HttpLimits {
    /// Connections served at once; more wait in the listen backlog (`COFFER_HTTP_MAX_CONNECTIONS`).
    pub max_connections: usize,
    /// From a connection's first byte (or the end of the previous request) to the end of the
    /// request headers (`COFFER_HTTP_HEADER_TIMEOUT_MS`).
    pub header_read_timeout: Duration,
    /// The longest pause while reading a request body (`COFFER_HTTP_BODY_TIMEOUT_MS`):
    /// `408 request_timeout`. Also the longest a response write may stall (a client that
    /// does not read): the connection is then closed.
    pub body_read_timeout: Duration,
    /// The whole request, handler included, until the handler hands its work over
    /// ([`work_taken`]) (`COFFER_HTTP_REQUEST_TIMEOUT_MS`): `408 request_timeout`. A writer
    /// refuses to start unless it is longer than a command's deadline plus grace, so a command
    /// taken in time is answered before it too.
    pub request_timeout: Duration,
    /// How long open connections may take to finish after the stop signal; then they are
    /// dropped.
    pub drain_timeout: Duration,
}

impl Default for HttpLimits {
    fn default() -> Self {
        Self {
            max_connections: 4_096,
            header_read_timeout: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(30),
            drain_timeout: Duration::from_secs(8),
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
    let request_timeout = limits.request_timeout;
    let router = router
        .layer(tower_http::timeout::RequestBodyTimeoutLayer::new(
            limits.body_read_timeout,
        ))
        .layer(axum::middleware::from_fn(
            move |request: axum::extract::Request, next: axum::middleware::Next| {
                timed(within_request_timeout(request_timeout, next.run(request)))
            },
        ));
    let max_connections = limits.max_connections.max(1);
    let (stop, stopped) = watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop.send(true);
    });
    let mut accepting = stopped.clone();
    let mut connections = tokio::task::JoinSet::new();
    'accepting: loop {
        // The open connections are the tasks in the set: at the limit, wait for one to end.
        while connections.try_join_next().is_some() {}
        while connections.len() >= max_connections {
            tokio::select! {
                _ = connections.join_next() => {}
                _ = stop_signalled(&mut accepting) => break 'accepting,
            }
        }
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
        let stream = WriteTimeout::new(stream, limits.body_read_timeout);
        connections.spawn(async move {
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
    // New connections now wait in no backlog of ours.
    drop(listener);
    // Let the connections drain, within the bound; then drop what is left.
    let drained = tokio::time::timeout(limits.drain_timeout, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            open = connections.len(),
            "connections still open after the drain timeout; closing them"
        );
        connections.shutdown().await;
    }
}

/// A connection whose writes fail once they make no progress for `timeout` (a client that
/// stops reading would otherwise hold its connection, and a shutdown, forever).
struct WriteTimeout<T> {
    inner: T,
    timeout: Duration,
    stalled: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
}

impl<T> WriteTimeout<T> {
    fn new(inner: T, timeout: Duration) -> Self {
        Self {
            inner,
            timeout,
            stalled: None,
        }
    }

    /// Turns a pending write into an error once it has been pending for the timeout.
    fn watch<R>(
        &mut self,
        context: &mut std::task::Context<'_>,
        poll: std::task::Poll<std::io::Result<R>>,
    ) -> std::task::Poll<std::io::Result<R>> {
        use std::future::Future as _;
        if poll.is_ready() {
            self.stalled = None;
            return poll;
        }
        let timeout = self.timeout;
        let stalled = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        match stalled.as_mut().poll(context) {
            std::task::Poll::Ready(()) => std::task::Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the client stopped reading",
            ))),
            std::task::Poll::Pending => std::task::Poll::Pending,
        }
    }
}

impl<T: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for WriteTimeout<T> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        context: &mut std::task::Context<'_>,
        buffer: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_read(context, buffer)
    }
}

impl<T: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for WriteTimeout<T> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        context: &mut std::task::Context<'_>,
        data: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let poll = std::pin::Pin::new(&mut self.inner).poll_write(context, data);
        self.watch(context, poll)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        context: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let poll = std::pin::Pin::new(&mut self.inner).poll_flush(context);
        self.watch(context, poll)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        context: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(context)
    }
}

tokio::task_local! {
    /// The request being handled on this task: where a handler records that it handed its
    /// work over ([`work_taken`]).
    static REQUEST: std::sync::Arc<std::sync::OnceLock<tokio::time::Instant>>;
}

/// Requests of this process answered `503 outcome_unknown` by [`within_request_timeout`]
/// because their handler, which had handed its work over, had not answered by its deadline.
static UNANSWERED_BY_DEADLINE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// How many requests this process answered `503 outcome_unknown` because a handler that had
/// handed its work over did not answer by its deadline (a service exports it as a counter).
pub fn unanswered_by_deadline() -> u64 {
    UNANSWERED_BY_DEADLINE.load(std::sync::atomic::Ordering::Relaxed)
}

/// Records that the request being handled has handed its work to something that will finish it
/// whatever happens to this request (a command given to its account's actor), and that the
/// handler answers by `answer_by` (its deadline and grace).
///
/// From then on the request timeout no longer applies: a `408` tells a client that nothing
/// happened, which is no longer known. The request then ends with the handler's own answer, or
/// `503 outcome_unknown` if the handler has not answered by `answer_by`. Call it before the hand
/// over, in the handler's own task (the timeout cannot strike between the two: it only runs when
/// the handler yields). Outside a served request (a test calling a handler directly) it does
/// nothing.
pub fn work_taken(answer_by: tokio::time::Instant) {
    let _ = REQUEST.try_with(|taken| taken.set(answer_by));
}

/// Runs a handler under the request timeout: `408 request_timeout` if it has not answered in
/// time and has not handed its work over ([`work_taken`]).
async fn within_request_timeout(
    request_timeout: Duration,
    handler: impl Future<Output = axum::response::Response>,
) -> axum::response::Response {
    let taken = std::sync::Arc::new(std::sync::OnceLock::new());
    let handler = REQUEST.scope(taken.clone(), handler);
    tokio::pin!(handler);
    if let Ok(response) = tokio::time::timeout(request_timeout, &mut handler).await {
        return response;
    }
    // The handler is not running now (this task polls it), so what it recorded is final: either
    // nothing was handed over and dropping it cancels everything, or it must be waited for.
    match taken.get().copied() {
        None => crate::Problem::new(
            408,
            "request_timeout",
            "Request timeout",
            format!("the request took longer than {request_timeout:?}"),
        )
        .into_response(),
        Some(answer_by) => match tokio::time::timeout_at(answer_by, &mut handler).await {
            Ok(response) => response,
            Err(_) => {
                UNANSWERED_BY_DEADLINE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::warn!(
                    "a handler that handed its work over did not answer by its deadline"
                );
                crate::Problem::unavailable(
                    "outcome_unknown",
                    "the request was taken but not answered in time: it may or may not have \
                     been applied. Retry only with the same Idempotency-Key (or transfer id); \
                     a command sent without one may have been applied",
                    1,
                )
                .into_response()
            }
        },
    }
}

/// Adds `Server-Timing: app;dur={ms}` (the time from the request's headers to its response's,
/// body reading included): a client, a load balancer or a benchmark tells the server's time from
/// the network's and its own.
async fn timed(
    handler: impl Future<Output = axum::response::Response>,
) -> axum::response::Response {
    let started = std::time::Instant::now();
    let mut response = handler.await;
    let millis = started.elapsed().as_secs_f64() * 1_000.0;
    if let Ok(value) = axum::http::HeaderValue::from_str(&format!("app;dur={millis:.3}")) {
        response.headers_mut().insert("server-timing", value);
    }
    response
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

#[cfg(test)]
mod tests {
    use super::*;
    use axum::routing::get;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    const REQUEST_TIMEOUT: Duration = Duration::from_millis(300);

    /// Serves three handlers that outlast the request timeout: one that handed its work over
    /// and answers later, one that did not, and one that handed it over and never answers.
    async fn served() -> (String, tokio::sync::oneshot::Sender<()>) {
        let router = axum::Router::new()
            .route(
                "/taken",
                get(|| async {
                    work_taken(tokio::time::Instant::now() + Duration::from_secs(5));
                    tokio::time::sleep(REQUEST_TIMEOUT * 3).await;
                    "the outcome"
                }),
            )
            .route(
                "/not-taken",
                get(|| async {
                    tokio::time::sleep(REQUEST_TIMEOUT * 3).await;
                    "too late"
                }),
            )
            .route(
                "/stuck",
                get(|| async {
                    work_taken(tokio::time::Instant::now() + REQUEST_TIMEOUT * 2);
                    std::future::pending::<()>().await;
                    "never"
                }),
            );
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let limits = HttpLimits {
            request_timeout: REQUEST_TIMEOUT,
            ..HttpLimits::default()
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(serve(listener, router, limits, async move {
            let _ = stopped.await;
        }));
        (address, stop)
    }

    async fn get_path(address: &str, path: &str) -> (String, Duration) {
        let started = std::time::Instant::now();
        let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
        let request = format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).await.unwrap();
        (answer, started.elapsed())
    }

    #[tokio::test]
    async fn a_request_whose_work_was_taken_gets_its_outcome_not_408() {
        let (address, _stop) = served().await;
        let (answer, took) = get_path(&address, "/taken").await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(answer.ends_with("the outcome"), "{answer}");
        assert!(took >= REQUEST_TIMEOUT * 3, "{took:?}");
        // The server's own time, which covers the wait for the taken work.
        let timing = answer
            .lines()
            .find_map(|line| {
                line.to_ascii_lowercase()
                    .strip_prefix("server-timing: app;dur=")
                    .map(str::to_owned)
            })
            .unwrap_or_else(|| panic!("no Server-Timing: {answer}"));
        let server_ms: f64 = timing.trim().parse().unwrap();
        assert!(
            server_ms >= (REQUEST_TIMEOUT * 3).as_secs_f64() * 1_000.0
                && server_ms <= took.as_secs_f64() * 1_000.0,
            "{server_ms} ms against {took:?}"
        );
    }

    #[tokio::test]
    async fn a_request_that_took_nothing_gets_408_at_the_request_timeout() {
        let (address, _stop) = served().await;
        let (answer, took) = get_path(&address, "/not-taken").await;
        assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
        assert!(answer.contains("\"code\":\"request_timeout\""), "{answer}");
        assert!(took < REQUEST_TIMEOUT * 3, "{took:?}");
    }

    #[tokio::test]
    async fn a_taken_request_with_no_answer_by_its_deadline_is_outcome_unknown() {
        let (address, _stop) = served().await;
        let counted_before = unanswered_by_deadline();
        let (answer, took) = get_path(&address, "/stuck").await;
        assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
        assert!(answer.contains("\"code\":\"outcome_unknown\""), "{answer}");
        // Other tests of this process only add to it.
        assert!(unanswered_by_deadline() > counted_before);
        assert!(
            answer.to_ascii_lowercase().contains("retry-after: 1"),
            "{answer}"
        );
        assert!(took >= REQUEST_TIMEOUT * 2, "{took:?}");
    }
}

//! The NATS command API: a NATS micro service named `coffer` (visible to `nats micro ls`) with one
//! endpoint per verb on `coffer.cmd.{account_id}.{verb}`. Bodies and errors are the HTTP ones;
//! errors also carry the micro headers `Nats-Service-Error` and `Nats-Service-Error-Code`.

use std::sync::{Arc, OnceLock};

use async_nats::service::{self, ServiceExt};
use async_nats::HeaderMap;
use futures::StreamExt;
use tokio::sync::watch;
use tracing::Instrument;

use crate::bulk;
use crate::dispatch::Dispatcher;
use crate::idempotency::IdempotencyKey;
use crate::request::{self, CommandRequest, Intent, Verb};
use crate::Error;

pub const SERVICE_NAME: &str = "coffer";
/// Requests one writer handles at once per endpoint; more wait in the subscription.
const CONCURRENCY_MAX: usize = 256;
/// Bulks one writer runs at once (each up to 1 000 commands); more wait in the subscription.
const BULKS_CONCURRENT_MAX: usize = 16;
/// How long in-flight requests get to finish at shutdown.
const DRAIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(6);

/// Starts the service and serves until `shutdown`; then stops it so other writers take over.
pub async fn serve(
    client: async_nats::Client,
    commands: Arc<OnceLock<Dispatcher>>,
    served: &std::sync::atomic::AtomicBool,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), Error> {
    let service = client
        .service_builder()
        .description(
            "Coffer ledger commands: open, deposit, withdraw, transfer, close, hold, capture, void, transaction, metadata; batch for many at once",
        )
        .start(SERVICE_NAME, env!("CARGO_PKG_VERSION"))
        .await
        .map_err(|error| Error::Unavailable(format!("start NATS service: {error}")))?;
    let group = service.group("coffer.cmd");
    let mut tasks = Vec::new();
    for verb in Verb::ALL {
        let endpoint = group
            .endpoint_builder()
            .name(verb.name())
            .add(format!("*.{}", verb.name()))
            .await
            .map_err(|error| {
                Error::Unavailable(format!("add endpoint {}: {error}", verb.name()))
            })?;
        let commands = commands.clone();
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            endpoint
                .for_each_concurrent(CONCURRENCY_MAX, |request| {
                    let commands = commands.clone();
                    let client = client.clone();
                    let span = request_span(&request.message);
                    async move { handle(verb, request, &commands, &client).await }.instrument(span)
                })
                .await;
        }));
    }
    let endpoint = group
        .endpoint_builder()
        .name("batch")
        .add("batch")
        .await
        .map_err(|error| Error::Unavailable(format!("add endpoint batch: {error}")))?;
    let (bulk_commands, bulk_client) = (commands.clone(), client.clone());
    tasks.push(tokio::spawn(async move {
        endpoint
            .for_each_concurrent(BULKS_CONCURRENT_MAX, |request| {
                let commands = bulk_commands.clone();
                let client = bulk_client.clone();
                let span = request_span(&request.message);
                async move { handle_bulk(request, &commands, &client).await }.instrument(span)
            })
            .await;
    }));
    // Ready for NATS clients once the server has the subscriptions (a flush is a round trip).
    if client.flush().await.is_ok() {
        served.store(true, std::sync::atomic::Ordering::Release);
    }
    let _ = shutdown.wait_for(|stop| *stop).await;
    served.store(false, std::sync::atomic::Ordering::Release);
    // Stop taking requests, then let the ones in flight finish (or fail) and answer.
    if let Err(error) = service.stop().await {
        tracing::warn!(%error, "stopping the NATS service");
    }
    let aborts: Vec<_> = tasks.iter().map(|task| task.abort_handle()).collect();
    if tokio::time::timeout(DRAIN_TIMEOUT, futures::future::join_all(tasks))
        .await
        .is_err()
    {
        tracing::warn!("NATS requests still in flight at shutdown were abandoned");
        for abort in aborts {
            abort.abort();
        }
    }
    Ok(())
}

async fn handle(
    verb: Verb,
    request: service::Request,
    commands: &OnceLock<Dispatcher>,
    client: &async_nats::Client,
) {
    // The command's hop of the caller's trace, linked to the request span when it is exported.
    let span = tracing::Span::current();
    let trace = trace_context::otel::hop(&span, traceparent(&request.message));
    span.record("trace_id", trace.trace_id());
    let answer = match commands.get() {
        Some(commands) => match client_deadline(&request.message)
            .and_then(|limit| Ok((parse(verb, &request.message, trace)?, limit)))
        {
            Ok((command, None)) => commands.execute(command).await,
            Ok((command, Some(until))) => commands.execute_until(command, until).await,
            Err(error) => Err(error),
        },
        None => Err(Error::Unavailable("the writer is starting".into())),
    };
    answer_with(
        client,
        &request.message,
        answer.map(|outcome| outcome.body()),
        verb.name(),
    )
    .await;
}

/// Sends `answer` to the request's reply subject: a JSON body, or the problem with the micro
/// error headers.
async fn answer_with(
    client: &async_nats::Client,
    message: &async_nats::Message,
    answer: Result<serde_json::Value, Error>,
    endpoint: &str,
) {
    let Some(reply) = message.reply.clone() else {
        return; // A publish without a reply subject: nobody to answer.
    };
    let published = match answer {
        Ok(body) => {
            let body = serde_json::to_vec(&body).unwrap_or_default();
            client.publish(reply, body.into()).await
        }
        Err(error) => {
            // `Request::respond(Err)` sends an empty body; clients want the problem too.
            let problem = error.problem();
            let mut headers = HeaderMap::new();
            headers.insert("Nats-Service-Error", problem.title.as_str());
            headers.insert(
                "Nats-Service-Error-Code",
                problem.status.to_string().as_str(),
            );
            headers.insert("Content-Type", problem::CONTENT_TYPE);
            client
                .publish_with_headers(reply, headers, problem.to_json_bytes().into())
                .await
        }
    };
    if let Err(error) = published {
        tracing::warn!(%error, endpoint, "could not send the NATS reply");
    }
}

/// `coffer.cmd.batch`: a bulk ([`crate::bulk`]), answered `{"results": [...]}` like
/// `POST /v1/batch`.
async fn handle_bulk(
    request: service::Request,
    commands: &OnceLock<Dispatcher>,
    client: &async_nats::Client,
) {
    let span = tracing::Span::current();
    let trace = trace_context::otel::hop(&span, traceparent(&request.message));
    span.record("trace_id", trace.trace_id());
    let headers = request.message.headers.clone().unwrap_or_default();
    let answer = match commands.get() {
        None => Err(Error::Unavailable("the writer is starting".into())),
        Some(_) if headers.get("Idempotency-Key").is_some() => Err(bulk::keyed_bulk()),
        Some(commands) => run_bulk(commands, &request.message, trace).await,
    };
    answer_with(client, &request.message, answer, "batch").await;
}

/// Parses and runs a bulk within its start window and the client's deadline.
async fn run_bulk(
    commands: &Dispatcher,
    message: &async_nats::Message,
    trace: trace_context::TraceParent,
) -> Result<serde_json::Value, Error> {
    // The HTTP API's default request timeout bounds a NATS bulk too, and no command starts
    // after the client's deadline.
    let window = bulk::start_window(
        problem::HttpLimits::default().request_timeout,
        commands.registry().call_timeout(),
        crate::registry::ANSWER_GRACE,
    );
    let client_deadline = client_deadline(message)?;
    let start_by = tokio::time::Instant::now() + window;
    let start_by = client_deadline.map_or(start_by, |until| start_by.min(until));
    let headers = message.headers.clone().unwrap_or_default();
    let parsed = bulk::parse(&message.payload, &correlation_id(&headers), trace)?;
    let _running = bulk::admit()?;
    let results = bulk::run(commands, parsed, start_by, client_deadline).await;
    serde_json::to_value(bulk::BulkResults { results })
        .map_err(|error| Error::Internal(format!("encode a bulk answer: {error}")))
}

/// The header a NATS client may set to its own deadline, in Unix milliseconds.
pub const DEADLINE_HEADER: &str = "Coffer-Deadline";

/// The client's deadline ([`DEADLINE_HEADER`]) on this process's clock, if it gave one. A
/// request that waited in the subscription past it is refused without starting (`unavailable`:
/// the client has given up, and nothing was done); a command never starts after it.
fn client_deadline(message: &async_nats::Message) -> Result<Option<tokio::time::Instant>, Error> {
    let Some(value) = message
        .headers
        .as_ref()
        .and_then(|headers| headers.get(DEADLINE_HEADER))
    else {
        return Ok(None);
    };
    let unix_ms: u64 = value.as_str().trim().parse().map_err(|_| {
        Error::InvalidRequest(format!(
            "{DEADLINE_HEADER} must be a time in Unix milliseconds, not {:?}",
            value.as_str()
        ))
    })?;
    let deadline = std::time::UNIX_EPOCH + std::time::Duration::from_millis(unix_ms);
    // Both clocks read together: a pause after this cannot lengthen what is left.
    let (now, now_unix) = (tokio::time::Instant::now(), std::time::SystemTime::now());
    match deadline.duration_since(now_unix) {
        Ok(left) if !left.is_zero() => Ok(Some(now + left)),
        _ => Err(Error::Unavailable(format!(
            "the client's deadline ({DEADLINE_HEADER}: {unix_ms}) passed before the command \
             started; nothing was done"
        ))),
    }
}

/// The caller's `Coffer-Correlation-Id`, or a fresh one.
fn correlation_id(headers: &HeaderMap) -> String {
    headers
        .get("Coffer-Correlation-Id")
        .map(|value| value.as_str().to_owned())
        .unwrap_or_else(|| uuid::Uuid::now_v7().to_string())
}

/// The span of one request, linked to the caller's trace when it is exported.
fn request_span(message: &async_nats::Message) -> tracing::Span {
    let span = tracing::info_span!(
        "nats",
        subject = %message.subject,
        trace_id = tracing::field::Empty
    );
    trace_context::otel::link(&span, traceparent(message));
    span
}

fn traceparent(message: &async_nats::Message) -> Option<&str> {
    message
        .headers
        .as_ref()
        .and_then(|headers| headers.get(trace_context::HEADER))
        .map(async_nats::HeaderValue::as_str)
}

fn parse(
    verb: Verb,
    message: &async_nats::Message,
    trace: trace_context::TraceParent,
) -> Result<CommandRequest, Error> {
    let account = message.subject.split('.').nth(2).ok_or_else(|| {
        Error::InvalidRequest("subject must be coffer.cmd.{account_id}.{verb}".into())
    })?;
    let headers = message.headers.clone().unwrap_or_default();
    let key_text = headers
        .get("Idempotency-Key")
        .map(|value| value.as_str().to_owned());
    let key: Option<IdempotencyKey> = IdempotencyKey::parse_optional(key_text.as_deref())?;
    let body = &message.payload;
    let mut transfer_id_generated = false;
    let (account_id, intent) = match verb {
        Verb::Open => {
            let (id, command) = request::open(body, Some(account), key.as_ref())?;
            (id, Intent::Account(command))
        }
        Verb::Deposit => (
            request::addressed_account(account)?,
            Intent::Account(request::deposit(body)?),
        ),
        Verb::Withdraw => (
            request::addressed_account(account)?,
            Intent::Account(request::withdraw(body)?),
        ),
        Verb::Metadata => (
            request::addressed_account(account)?,
            Intent::Account(request::change_metadata(body)?),
        ),
        Verb::Transfer => {
            let (from, transfer, generated) = request::transfer(body, Some(account))?;
            transfer_id_generated = generated;
            (from, Intent::Transfer(transfer))
        }
        Verb::Close => (
            request::addressed_account(account)?,
            Intent::Account(request::close(body)?),
        ),
        Verb::Hold => {
            let (from, hold, generated) = request::hold(body, Some(account))?;
            transfer_id_generated = generated;
            (from, Intent::Hold(hold))
        }
        Verb::Capture => (
            request::addressed_account(account)?,
            Intent::Capture(request::capture_message(body)?),
        ),
        Verb::Void => (
            request::addressed_account(account)?,
            Intent::Release(request::void_message(body)?, domain::Release::Void),
        ),
        Verb::Transaction => {
            let (from, transaction, generated) = request::transaction(body, Some(account))?;
            transfer_id_generated = generated;
            (from, Intent::Transaction(transaction))
        }
    };
    Ok(
        CommandRequest::new(account_id, intent, key, correlation_id(&headers))
            .with_generated_transfer_id(transfer_id_generated)
            .with_trace(trace),
    )
}

//! The HTTP command API (axum). Handlers only translate: body -> [`request`] parser ->
//! [`Registry`] -> status and JSON, errors through [`Error::problem`].

use std::sync::{Arc, OnceLock};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use eventlog::{codec, EventLog, RecordedEvent};
use problem::Problem;
use serde::Deserialize;
use serde_json::{json, Value};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::idempotency::{IdempotencyKey, TransferRecord};
use crate::metrics::Metrics;
use crate::outcome::Outcome;
use crate::registry::Registry;
use crate::request::{self, CommandRequest, Intent};
use crate::Error;

/// Largest request body: the contract's 64 KiB.
pub const BODY_SIZE_MAX: usize = 64 * 1024;
/// Most events one `GET /v1/events` returns.
pub const EVENTS_LIMIT_MAX: usize = 1_000;
const EVENTS_LIMIT_DEFAULT: usize = 100;

/// What the handlers share.
#[derive(Clone)]
pub struct AppState {
    /// Set once the stream and the idempotency bucket are set up; commands get 503 before.
    pub registry: Arc<OnceLock<Registry>>,
    pub log: EventLog,
    pub metrics: Arc<Metrics>,
    /// The bearer token the command API requires (`COFFER_HTTP_TOKEN`); none: no auth.
    pub http_token: Option<problem::BearerToken>,
}

pub fn router(state: AppState) -> Router {
    let routes = Router::new()
        .route("/v1/accounts", post(open_account))
        .route(
            "/v1/accounts/{id}/deposits",
            account_command(request::deposit, false),
        )
        .route(
            "/v1/accounts/{id}/withdrawals",
            account_command(request::withdraw, false),
        )
        .route(
            "/v1/accounts/{id}/close",
            account_command(request::close, true),
        )
        .route("/v1/transfers", post(transfer))
        .route("/v1/holds", post(place_hold))
        .route("/v1/holds/{id}/capture", post(capture_hold))
        .route("/v1/holds/{id}/void", post(void_hold))
        .route("/v1/events", get(events))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics));
    let router = problem::with_service_routes(
        routes,
        "Coffer command API (writer)",
        crate::openapi::document_part,
    )
    .layer(DefaultBodyLimit::max(BODY_SIZE_MAX));
    let router = problem::with_bearer_token(router, state.http_token.clone());
    problem::with_request_ids(router).with_state(state)
}

fn problem_response(error: &Error) -> Response {
    error.problem().into_response()
}

/// Checks the content type and the size, and returns the body.
fn json_body(
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
    empty_allowed: bool,
) -> Result<Bytes, Problem> {
    let body = body.map_err(|rejection| {
        if problem::server::is_body_timeout(&rejection) {
            Problem::new(
                408,
                "request_timeout",
                "Request timeout",
                "the request body was not received in time",
            )
        } else if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            Problem::new(
                413,
                "payload_too_large",
                "Payload too large",
                format!("request bodies are limited to {BODY_SIZE_MAX} bytes"),
            )
        } else {
            Problem::invalid_request(rejection.body_text())
        }
    })?;
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .unwrap_or("");
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    let is_json = essence == "application/json" || essence.ends_with("+json");
    if !(is_json || empty_allowed && body.is_empty()) {
        return Err(Problem::new(
            415,
            "unsupported_media_type",
            "Unsupported media type",
            format!("expected Content-Type: application/json, got {content_type:?}"),
        ));
    }
    Ok(body)
}

fn request_id(headers: &HeaderMap) -> String {
    headers
        .get("x-request-id")
        .and_then(|value| value.to_str().ok())
        .unwrap_or("")
        .to_owned()
}

fn idempotency_key(headers: &HeaderMap) -> Result<Option<IdempotencyKey>, Error> {
    let text = match headers.get("idempotency-key") {
        None => None,
        Some(value) => Some(value.to_str().map_err(|_| {
            Error::InvalidRequest("Idempotency-Key must be printable ASCII".into())
        })?),
    };
    IdempotencyKey::parse_optional(text)
}

async fn run(state: &AppState, request: CommandRequest) -> Response {
    let Some(registry) = state.registry.get() else {
        return problem_response(&Error::Unavailable("the writer is starting".into()));
    };
    let verb = request.verb();
    let account = request.account_id.clone();
    match registry.execute(request).await {
        Ok(outcome) => outcome_response(&outcome),
        Err(error) => {
            let problem = error.problem();
            if problem.status >= 500 {
                tracing::warn!(%account, %error, command = verb, "command failed");
            }
            problem.into_response()
        }
    }
}

fn outcome_response(outcome: &Outcome) -> Response {
    let status = StatusCode::from_u16(outcome.status()).unwrap_or(StatusCode::OK);
    let body = outcome.body();
    let mut response = (status, Json(body)).into_response();
    if let Some(path) = outcome.location() {
        if let Ok(location) = HeaderValue::from_str(&path) {
            response.headers_mut().insert(header::LOCATION, location);
        }
    }
    response
}

/// Parses what every command needs and runs it.
async fn command(
    state: &AppState,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
    empty_allowed: bool,
    parse: impl FnOnce(
        &[u8],
        Option<&IdempotencyKey>,
    ) -> Result<(domain::AccountId, Intent, bool), Error>,
) -> Response {
    let body = match json_body(headers, body, empty_allowed) {
        Ok(body) => body,
        Err(problem) => return problem.into_response(),
    };
    let key = match idempotency_key(headers) {
        Ok(key) => key,
        Err(error) => return problem_response(&error),
    };
    let (account_id, intent, transfer_id_generated) = match parse(&body, key.as_ref()) {
        Ok(parsed) => parsed,
        Err(error) => return problem_response(&error),
    };
    let request = CommandRequest::new(account_id, intent, key, request_id(headers))
        .with_generated_transfer_id(transfer_id_generated)
        .with_trace(problem::request_trace(headers));
    run(state, request).await
}

async fn open_account(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    command(&state, &headers, body, false, |body, key| {
        request::open(body, None, key).map(|(id, command)| (id, Intent::Account(command), false))
    })
    .await
}

/// A command on the account in the path: `parse` turns the body into the command.
fn account_command(
    parse: fn(&[u8]) -> Result<domain::Command, Error>,
    empty_body_allowed: bool,
) -> axum::routing::MethodRouter<AppState> {
    post(
        move |State(state): State<AppState>,
              Path(id): Path<String>,
              headers: HeaderMap,
              body: Result<Bytes, BytesRejection>| async move {
            command(&state, &headers, body, empty_body_allowed, |body, _| {
                Ok((
                    request::addressed_account(&id)?,
                    Intent::Account(parse(body)?),
                    false,
                ))
            })
            .await
        },
    )
}

async fn transfer(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    command(&state, &headers, body, false, |body, _| {
        request::transfer(body, None)
            .map(|(from, transfer, generated)| (from, Intent::Transfer(transfer), generated))
    })
    .await
}

async fn place_hold(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    command(&state, &headers, body, false, |body, _| {
        request::hold(body, None)
            .map(|(from, hold, generated)| (from, Intent::Hold(hold), generated))
    })
    .await
}

/// The account a hold was placed on, from its id's claim in the stream: capture and void name
/// only the hold, and the decision belongs to that account's actor.
async fn hold_sender(state: &AppState, hold_id: &str) -> Result<domain::AccountId, Error> {
    let hold_id = request::hold_reference(hold_id)?;
    let claim = state
        .log
        .read_marker(&eventlog::subject::transfer_marker(&hold_id))
        .await?;
    let not_found = || Error::Rejected(domain::DomainError::HoldNotFound(hold_id.clone()));
    let claim = claim.ok_or_else(not_found)?;
    let record = TransferRecord::decode(&claim.payload)?;
    let from = record.hold_sender().ok_or_else(not_found)?;
    request::addressed_account(from)
}

/// A capture or void of the hold in the path: the body is parsed first (so a bad body is a
/// `400` whatever the hold), then the hold's account is found.
async fn settle_hold(
    state: &AppState,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
    id: &str,
    parse: impl FnOnce(&[u8]) -> Result<Intent, Error>,
) -> Response {
    let body = match json_body(headers, body, true) {
        Ok(body) => body,
        Err(problem) => return problem.into_response(),
    };
    let (key, intent) = match idempotency_key(headers).and_then(|key| Ok((key, parse(&body)?))) {
        Ok(parsed) => parsed,
        Err(error) => return problem_response(&error),
    };
    let from = match hold_sender(state, id).await {
        Ok(from) => from,
        Err(error) => return problem_response(&error),
    };
    run(
        state,
        CommandRequest::new(from, intent, key, request_id(headers))
            .with_trace(problem::request_trace(headers)),
    )
    .await
}

async fn capture_hold(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    settle_hold(&state, &headers, body, &id, |body| {
        Ok(Intent::Capture(request::capture(body, &id)?))
    })
    .await
}

async fn void_hold(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    settle_hold(&state, &headers, body, &id, |body| {
        Ok(Intent::Release(
            request::void(body, &id)?,
            domain::Release::Void,
        ))
    })
    .await
}

#[derive(Debug, Deserialize)]
struct EventsQuery {
    after: Option<String>,
    since: Option<String>,
    limit: Option<String>,
}

async fn events(State(state): State<AppState>, Query(query): Query<EventsQuery>) -> Response {
    match read_events(&state, &query).await {
        Ok(body) => Json(body).into_response(),
        Err(error) => problem_response(&error),
    }
}

async fn read_events(state: &AppState, query: &EventsQuery) -> Result<Value, Error> {
    let limit = match &query.limit {
        None => EVENTS_LIMIT_DEFAULT,
        Some(text) => match text.parse::<usize>() {
            Ok(limit) if (1..=EVENTS_LIMIT_MAX).contains(&limit) => limit,
            _ => {
                return Err(Error::InvalidRequest(format!(
                    "limit must be an integer from 1 to {EVENTS_LIMIT_MAX}"
                )))
            }
        },
    };
    let after = match &query.after {
        None => None,
        Some(text) => Some(text.parse::<u64>().map_err(|_| {
            Error::InvalidRequest("after must be a non-negative integer position".into())
        })?),
    };
    let events = match (after, &query.since) {
        (Some(_), Some(_)) => {
            return Err(Error::InvalidRequest(
                "give either after or since, not both".into(),
            ))
        }
        (None, Some(since)) => {
            let since = OffsetDateTime::parse(since, &Rfc3339)
                .map_err(|_| Error::InvalidRequest("since must be an RFC 3339 time".into()))?;
            state.log.read_since(since, limit).await
        }
        (after, None) => state.log.read_after(after.unwrap_or(0), limit).await,
    }
    .map_err(|error| match error {
        eventlog::Error::Unavailable(detail) => Error::Unavailable(detail),
        other => Error::Internal(other.to_string()),
    })?;
    let next = events
        .last()
        .map(|event| event.position)
        .or(after)
        .unwrap_or(0);
    let events: Vec<Value> = events.iter().map(event_json).collect();
    Ok(json!({"events": events, "next": next}))
}

/// An event as the pull endpoint shows it.
pub fn event_json(recorded: &RecordedEvent) -> Value {
    json!({
        "position": recorded.position,
        "subject": recorded.subject,
        "account_id": recorded.account_id.as_str(),
        "type": recorded.event.event_type(),
        "time": recorded.time.format(&Rfc3339).unwrap_or_default(),
        "data": codec::to_json(&recorded.event),
    })
}

async fn readyz(State(state): State<AppState>) -> Response {
    let ready = state.registry.get().is_some() && state.log.is_connected();
    if ready {
        (StatusCode::OK, "ready").into_response()
    } else {
        Problem::unavailable("unavailable", "not connected to NATS or still starting", 1)
            .into_response()
    }
}

async fn metrics(State(state): State<AppState>) -> Response {
    (
        [(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)],
        state.metrics.render(),
    )
        .into_response()
}

//! The HTTP command API (axum). Handlers only translate: body -> [`request`] parser ->
//! [`Registry`] -> status and JSON, errors through [`Error::problem`].

use std::sync::{Arc, OnceLock};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use domain::{AccountId, TransferId};
use eventlog::{codec, EventLog, RecordedEvent};
use problem::query::ValidQuery;
use problem::Problem;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::{router::OpenApiRouter, routes};

use crate::bulk::{self, BulkBody, BulkResults, BULK_BODY_SIZE_MAX};
use crate::dispatch::Dispatcher;
use crate::idempotency::{Claim, IdempotencyKey};
use crate::metrics::Metrics;
use crate::openapi::{BulkProblems, CommandProblems, OpenProblems, ReadProblems};
use crate::outcome::{
    AccountMetadata, AccountPosition, Balance, HoldCaptured, HoldPlaced, HoldReleased, Outcome,
    TransactionCompleted, TransferCompleted,
};
use crate::request::{
    self, CaptureBody, CommandRequest, HoldBody, Intent, MetadataBody, MoneyMovement, NoFields,
    OpenAccountBody, ReverseBody, TransactionBody, TransferBody,
};
use crate::Error;

/// Largest request body: the contract's 64 KiB.
pub const BODY_SIZE_MAX: usize = 64 * 1024;

/// What the handlers share.
#[derive(Clone)]
pub struct AppState {
    /// Set once the stream and the idempotency bucket are set up; commands get 503 before.
    pub commands: Arc<OnceLock<Dispatcher>>,
    /// Shared, not cloned: axum clones the state for every request, and a log clone copies a NATS
    /// client (several allocations).
    pub log: Arc<EventLog>,
    pub metrics: Arc<Metrics>,
    /// The bearer token the command API requires (`COFFER_HTTP_TOKEN`); none: no auth.
    pub http_token: Option<problem::BearerToken>,
    /// How long a bulk's commands may start after it arrives ([`bulk::start_window`]).
    pub bulk_start_window: std::time::Duration,
    /// The NATS command service is subscribed (and the server has seen it): a writer is ready
    /// for NATS clients only from then on.
    pub nats_commands_served: Arc<std::sync::atomic::AtomicBool>,
}

/// The command routes with their OpenAPI operations: one list serves both, so a route cannot be
/// missing from the document or the other way round.
pub fn api() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(open_account))
        .routes(routes!(deposit))
        .routes(routes!(withdraw))
        .routes(routes!(close_account))
        .routes(routes!(change_metadata))
        .routes(routes!(transfer))
        .routes(routes!(transaction))
        .routes(with_body_limit(routes!(bulk), BULK_BODY_SIZE_MAX))
        .routes(routes!(reverse_transfer))
        .routes(routes!(reverse_transaction))
        .routes(routes!(place_hold))
        .routes(routes!(capture_hold))
        .routes(routes!(void_hold))
        .routes(routes!(events))
}

/// A route whose bodies may be larger than [`BODY_SIZE_MAX`] (the layer nearest the handler
/// decides).
fn with_body_limit(
    (schemas, paths, method): utoipa_axum::router::UtoipaMethodRouter<AppState>,
    limit: usize,
) -> utoipa_axum::router::UtoipaMethodRouter<AppState> {
    (schemas, paths, method.layer(DefaultBodyLimit::max(limit)))
}

pub fn router(state: AppState) -> Router {
    let (routes, _) = api().split_for_parts();
    let routes = routes
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics));
    let router = problem::with_service_routes(routes, crate::openapi::document())
        .layer(DefaultBodyLimit::max(BODY_SIZE_MAX));
    let router = problem::with_bearer_token(router, state.http_token.clone());
    problem::with_request_ids(router).with_state(state)
}

/// The account a command addresses.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
pub struct AccountPath {
    /// The account's id.
    #[param(inline)]
    pub id: AccountId,
}

/// The hold a capture or void settles.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
pub struct HoldPath {
    /// The hold's id.
    #[param(inline)]
    pub id: TransferId,
}

/// Headers every command takes.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Header)]
pub struct CommandHeaders {
    /// A retry with the same key on the same account within 24 h returns the first outcome
    /// (same status and body) and appends nothing. 1-128 printable ASCII characters; HTTP
    /// drops spaces around a header value, so the key starts and ends with a visible one.
    #[serde(rename = "Idempotency-Key")]
    #[param(
        rename = "Idempotency-Key",
        nullable = false,
        min_length = 1,
        max_length = 128,
        pattern = r"^[!-~]([ -~]{0,126}[!-~])?$"
    )]
    pub idempotency_key: Option<String>,
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
    let Some(commands) = state.commands.get() else {
        return problem_response(&Error::Unavailable("the writer is starting".into()));
    };
    let verb = request.verb();
    let account = request.account_id.clone();
    // From here the command may be stored: its answer is its outcome or `outcome_unknown`,
    // never the request timeout's 408.
    problem::server::work_taken(commands.registry().answered_by(tokio::time::Instant::now()));
    match commands.execute(request).await {
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

#[utoipa::path(post, path = "/v1/accounts", tag = "writer",
    operation_id = "openAccount",
    summary = "Open an account",
    params(CommandHeaders),
    request_body(content = OpenAccountBody, content_type = "application/json"),
    responses((status = 201, description = "Opened", body = AccountPosition), OpenProblems))]
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
async fn account_command(
    state: &AppState,
    id: &str,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
    empty_body_allowed: bool,
    parse: fn(&[u8]) -> Result<domain::Command, Error>,
) -> Response {
    command(state, headers, body, empty_body_allowed, |body, _| {
        Ok((
            request::addressed_account(id)?,
            Intent::Account(parse(body)?),
            false,
        ))
    })
    .await
}

#[utoipa::path(post, path = "/v1/accounts/{id}/deposits", tag = "writer",
    operation_id = "deposit",
    summary = "Deposit",
    params(AccountPath, CommandHeaders),
    request_body(content = MoneyMovement, content_type = "application/json"),
    responses((status = 200, description = "The balance after the deposit", body = Balance), CommandProblems))]
async fn deposit(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    account_command(&state, &id, &headers, body, false, request::deposit).await
}

#[utoipa::path(post, path = "/v1/accounts/{id}/withdrawals", tag = "writer",
    operation_id = "withdraw",
    summary = "Withdraw (never below the overdraft limit, holds included)",
    params(AccountPath, CommandHeaders),
    request_body(content = MoneyMovement, content_type = "application/json"),
    responses((status = 200, description = "The balance after the withdrawal", body = Balance), CommandProblems))]
async fn withdraw(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    account_command(&state, &id, &headers, body, false, request::withdraw).await
}

#[utoipa::path(post, path = "/v1/accounts/{id}/close", tag = "writer",
    operation_id = "closeAccount",
    summary = "Close an account (zero balance, no open holds)",
    params(AccountPath, CommandHeaders),
    request_body(content = Option<NoFields>, content_type = "application/json",
        description = "None, or an empty object"),
    responses((status = 200, description = "Closed", body = AccountPosition), CommandProblems))]
async fn close_account(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    account_command(&state, &id, &headers, body, true, request::close).await
}

#[utoipa::path(post, path = "/v1/accounts/{id}/metadata", tag = "writer",
    operation_id = "changeAccountMetadata",
    summary = "Set and unset entries of an account's metadata",
    params(AccountPath, CommandHeaders),
    request_body(content = MetadataBody, content_type = "application/json"),
    responses((status = 200, description = "The account's metadata after the change", body = AccountMetadata), CommandProblems))]
async fn change_metadata(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    account_command(&state, &id, &headers, body, false, request::change_metadata).await
}

#[utoipa::path(post, path = "/v1/transfers", tag = "writer",
    operation_id = "transfer",
    summary = "Transfer atomically: the debit and the credit are committed together or not at all",
    params(CommandHeaders),
    request_body(content = TransferBody, content_type = "application/json"),
    responses((status = 201, description = "Completed", body = TransferCompleted,
        headers(("Location" = String, description = "/v1/transfers/{transfer_id}"))), CommandProblems))]
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

#[utoipa::path(post, path = "/v1/transactions", tag = "writer",
    operation_id = "transaction",
    summary = "Move money along 1-64 postings at once: all of them or none",
    description = "Every touched account's event and the id's claim are one atomic append, each \
        account guarded by its last position. Only an account's net outflow counts against its \
        limit (holds included). A refusal names the first failing posting (`posting`, 0-based). \
        The idempotency key is scoped to the first posting's sender.",
    params(CommandHeaders),
    request_body(content = TransactionBody, content_type = "application/json"),
    responses((status = 201, description = "Completed", body = TransactionCompleted,
        headers(("Location" = String, description = "/v1/transactions/{transaction_id}"))), CommandProblems))]
async fn transaction(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    command(&state, &headers, body, false, |body, _| {
        request::transaction(body, None).map(|(from, transaction, generated)| {
            (from, Intent::Transaction(transaction), generated)
        })
    })
    .await
}

#[utoipa::path(post, path = "/v1/batch", tag = "writer",
    operation_id = "bulk",
    summary = "Submit 1-1000 commands at once, each decided and answered as if sent alone",
    description = "Each command is exactly-once by its own `idempotency_key` and refused on its \
        own: `results[i]` is the status and body its single request would have answered. A \
        command starts once every earlier command of the bulk touching one of its accounts has \
        been answered; the others run at once and share the stream's atomic batches. Nothing is \
        atomic across commands. A malformed envelope is `400` and runs nothing. Bodies up to \
        1 MiB; the `Idempotency-Key` header is refused (keys are per command).",
    request_body(content = BulkBody, content_type = "application/json"),
    responses((status = 200, description = "One result per command, in request order", body = BulkResults),
        BulkProblems))]
async fn bulk(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let body = match json_body(&headers, body, false) {
        Ok(body) => body,
        Err(problem) => return problem.into_response(),
    };
    if headers.contains_key("idempotency-key") {
        return problem_response(&bulk::keyed_bulk());
    }
    let Some(commands) = state.commands.get() else {
        return problem_response(&Error::Unavailable("the writer is starting".into()));
    };
    let start_by = tokio::time::Instant::now() + state.bulk_start_window;
    let parsed = match bulk::parse(
        &body,
        &request_id(&headers),
        problem::request_trace(&headers),
    ) {
        Ok(parsed) => parsed,
        Err(error) => return problem_response(&error),
    };
    let _running = match bulk::admit() {
        Ok(permit) => permit,
        Err(error) => return problem_response(&error),
    };
    // The last command starts by `start_by` and each is answered (`bulk::run` bounds them) by its
    // deadline, grace and margin: the bulk's own answer comes before this.
    problem::server::work_taken(
        commands.registry().answered_by(start_by) + crate::registry::ANSWER_MARGIN,
    );
    let results = bulk::run(commands, parsed, start_by, None).await;
    (StatusCode::OK, Json(BulkResults { results })).into_response()
}

/// What can be reversed: a transfer or a transaction (captures are holds', not reversible here).
#[derive(Debug, Clone, Copy)]
enum Reversible {
    Transfer,
    Transaction,
}

/// The reversal of the transfer or transaction `id`: its postings, read from its id's claim,
/// moved back as a new transaction with a server-made id, addressed to the first of them.
async fn reverse(
    state: &AppState,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
    id: &str,
    kind: Reversible,
) -> Response {
    let body = match json_body(headers, body, true) {
        Ok(body) => body,
        Err(problem) => return problem.into_response(),
    };
    let parsed = idempotency_key(headers)
        .and_then(|key| Ok((key, request::reverse(&body, id)?, request::reversal_id()?)));
    let (key, (original, reason), reversal_id) = match parsed {
        Ok(parsed) => parsed,
        Err(error) => return problem_response(&error),
    };
    let reversal = match reversed_postings(state, &original, kind)
        .await
        .and_then(|postings| {
            Ok(domain::reverse(
                &original,
                &postings,
                None,
                reversal_id,
                reason,
            )?)
        }) {
        Ok(reversal) => reversal,
        Err(error) => return problem_response(&error),
    };
    let Some(anchor) = reversal
        .postings
        .first()
        .map(|posting| posting.from.clone())
    else {
        return problem_response(&Error::Internal("a reversal without postings".into()));
    };
    run(
        state,
        CommandRequest::new(
            anchor,
            Intent::Transaction(reversal),
            key,
            request_id(headers),
        )
        .with_generated_transfer_id(true)
        .with_trace(problem::request_trace(headers)),
    )
    .await
}

/// The postings of the transfer or transaction `original`, from its id's claim in the stream.
async fn reversed_postings(
    state: &AppState,
    original: &TransferId,
    kind: Reversible,
) -> Result<Vec<domain::Posting>, Error> {
    let claim = state
        .log
        .read_marker(&eventlog::subject::transfer_marker(original))
        .await?;
    let claim = claim
        .map(|claim| Claim::decode(&claim.payload))
        .transpose()?;
    let account = |text: &str| request::addressed_account(text);
    match (kind, claim) {
        (Reversible::Transfer, Some(Claim::Transfer(record))) if record.hold.is_none() => {
            Ok(vec![domain::Posting {
                from: account(&record.from)?,
                to: account(&record.to)?,
                amount: domain::Amount::new(record.amount.into())
                    .map_err(|error| Error::Internal(format!("transfer marker: {error}")))?,
            }])
        }
        // A captured hold is a transfer of what was captured (the reader shows it as one).
        (Reversible::Transfer, Some(Claim::Transfer(record))) => {
            let amount = captured_amount(state, original).await?;
            Ok(vec![domain::Posting {
                from: account(&record.from)?,
                to: account(&record.to)?,
                amount,
            }])
        }
        (Reversible::Transfer, _) => Err(Error::TransferNotFound(original.to_string())),
        (Reversible::Transaction, Some(Claim::Transaction(record))) => record.postings(),
        (Reversible::Transaction, _) => Err(Error::TransactionNotFound(original.to_string())),
    }
}

/// What a hold's capture moved: the `transfer_credited` right before its settlement marker (a
/// capture's batch is the debit, the credit, then that marker, at consecutive positions). A hold
/// never captured (held, voided, expired) has no such marker and is no transfer.
async fn captured_amount(state: &AppState, hold_id: &TransferId) -> Result<domain::Amount, Error> {
    let not_found = || Error::TransferNotFound(hold_id.to_string());
    let settled = state
        .log
        .read_marker(&crate::idempotency::settlement_marker(hold_id))
        .await?
        .ok_or_else(not_found)?;
    let credit_position = settled.position.saturating_sub(1);
    let events = state
        .log
        .read_after(credit_position.saturating_sub(1), 1)
        .await?;
    match events.first() {
        Some(recorded) if recorded.position == credit_position => match &recorded.event {
            domain::Event::TransferCredited {
                transfer_id,
                amount,
                ..
            } if transfer_id == hold_id => Ok(*amount),
            // Settled without a capture: a void or an expiry moved nothing.
            _ => Err(not_found()),
        },
        // A replica behind the leader's marker: nothing was done, ask again.
        _ => Err(Error::Unavailable(format!(
            "the capture of {hold_id} is not readable yet"
        ))),
    }
}

/// The transfer or transaction a reversal names.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
pub struct FlowPath {
    /// The transfer's or transaction's id.
    #[param(inline)]
    pub id: TransferId,
}

#[utoipa::path(post, path = "/v1/transfers/{id}/reverse", tag = "writer",
    operation_id = "reverseTransfer",
    summary = "Reverse a transfer: move it back as a new transaction, at most once",
    params(FlowPath, CommandHeaders),
    request_body(content = Option<ReverseBody>, content_type = "application/json",
        description = "None, or `{\"reason\"?}`"),
    responses((status = 201, description = "Reversed", body = TransactionCompleted,
        headers(("Location" = String, description = "/v1/transactions/{transaction_id}"))), CommandProblems))]
async fn reverse_transfer(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    reverse(&state, &headers, body, &id, Reversible::Transfer).await
}

#[utoipa::path(post, path = "/v1/transactions/{id}/reverse", tag = "writer",
    operation_id = "reverseTransaction",
    summary = "Reverse a transaction: move every posting back as a new transaction, at most once",
    params(FlowPath, CommandHeaders),
    request_body(content = Option<ReverseBody>, content_type = "application/json",
        description = "None, or `{\"reason\"?}`"),
    responses((status = 201, description = "Reversed", body = TransactionCompleted,
        headers(("Location" = String, description = "/v1/transactions/{transaction_id}"))), CommandProblems))]
async fn reverse_transaction(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    reverse(&state, &headers, body, &id, Reversible::Transaction).await
}

#[utoipa::path(post, path = "/v1/holds", tag = "writer",
    operation_id = "placeHold",
    summary = "Place a hold: reserve money on `from` for `to` until captured, voided or expired",
    params(CommandHeaders),
    request_body(content = HoldBody, content_type = "application/json"),
    responses((status = 201, description = "Held", body = HoldPlaced,
        headers(("Location" = String, description = "/v1/holds/{hold_id}"))), CommandProblems))]
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
    let Ok(Claim::Transfer(record)) = Claim::decode(&claim.payload) else {
        return Err(not_found());
    };
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

#[utoipa::path(post, path = "/v1/holds/{id}/capture", tag = "writer",
    operation_id = "captureHold",
    summary = "Capture all or part of a hold: debit and credit together, the rest released",
    params(HoldPath, CommandHeaders),
    request_body(content = Option<CaptureBody>, content_type = "application/json",
        description = "None or `{}` captures the whole hold"),
    responses((status = 200, description = "Captured", body = HoldCaptured), CommandProblems))]
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

#[utoipa::path(post, path = "/v1/holds/{id}/void", tag = "writer",
    operation_id = "voidHold",
    summary = "Void a hold: release everything",
    params(HoldPath, CommandHeaders),
    request_body(content = Option<NoFields>, content_type = "application/json",
        description = "None, or an empty object"),
    responses((status = 200, description = "Voided", body = HoldReleased), CommandProblems))]
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

/// Where a page of events starts and how long it is.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct EventsQuery {
    /// Events after this position (exclusive). Not together with `since`.
    #[param(inline)]
    pub after: Option<problem::query::Position>,
    /// Events at or after this time (RFC 3339). Not together with `after`.
    #[serde(default, with = "time::serde::rfc3339::option")]
    #[param(value_type = Option<String>, format = DateTime)]
    pub since: Option<OffsetDateTime>,
    #[param(inline)]
    pub limit: Option<problem::query::PageLimit>,
}

/// A page of events in stream order.
#[derive(Debug, Serialize, ToSchema)]
pub struct EventPage {
    pub events: Vec<EventView>,
    /// The position of the last event returned, or `after` when the page is empty: the next
    /// page's `after`.
    pub next: u64,
}

/// An event decoded to JSON.
#[derive(Debug, Serialize, ToSchema)]
pub struct EventView {
    pub position: u64,
    pub subject: String,
    pub account_id: AccountId,
    /// The event type (`deposited`, `transfer_debited`, ...), or `unreadable` for a stored
    /// message that cannot be read as an event (`data.reason` says why).
    #[serde(rename = "type")]
    pub event_type: String,
    #[schema(format = DateTime)]
    pub time: String,
    /// The event's own fields.
    #[schema(value_type = Object)]
    pub data: Value,
}

#[utoipa::path(get, path = "/v1/events", tag = "writer",
    operation_id = "listEvents",
    summary = "Events in stream order, decoded to JSON",
    params(EventsQuery),
    responses((status = 200, description = "A page of events", body = EventPage), ReadProblems))]
async fn events(
    State(state): State<AppState>,
    ValidQuery(query): ValidQuery<EventsQuery>,
) -> Response {
    match read_events(&state, &query).await {
        Ok(page) => Json(page).into_response(),
        Err(error) => problem_response(&error),
    }
}

async fn read_events(state: &AppState, query: &EventsQuery) -> Result<EventPage, Error> {
    let limit = query.limit.unwrap_or_default().get();
    let after = query.after.map(problem::query::Position::get);
    let events = match (after, query.since) {
        (Some(_), Some(_)) => {
            return Err(Error::InvalidRequest(
                "give either after or since, not both".into(),
            ))
        }
        (None, Some(since)) => state.log.read_since_each(since, limit).await,
        (after, None) => state.log.read_after_each(after.unwrap_or(0), limit).await,
    }
    .map_err(|error| match error {
        eventlog::Error::Unavailable(detail) => Error::Unavailable(detail),
        other => Error::Internal(other.to_string()),
    })?;
    let next = events
        .last()
        .map(|event| match event {
            Ok(recorded) => recorded.position,
            Err(unreadable) => unreadable.position,
        })
        .or(after)
        .unwrap_or(0);
    Ok(EventPage {
        events: events
            .iter()
            .filter_map(|event| match event {
                Ok(recorded) => Some(event_json(recorded)),
                Err(unreadable) => unreadable_json(unreadable),
            })
            .collect(),
        next,
    })
}

/// An event as the pull endpoint shows it.
pub fn event_json(recorded: &RecordedEvent) -> EventView {
    EventView {
        position: recorded.position,
        subject: recorded.subject.clone(),
        account_id: recorded.account_id.clone(),
        event_type: recorded.event.event_type().to_owned(),
        time: recorded.time.format(&Rfc3339).unwrap_or_default(),
        data: codec::to_json(&recorded.event),
    }
}

/// A message that cannot be read as an event, shown in its place as type `unreadable` (event
/// consumers skip types they do not know) with the reason in `data`, so a page never fails for
/// it and the cursor goes past it. One whose subject names no valid account is left out.
fn unreadable_json(unreadable: &eventlog::Unreadable) -> Option<EventView> {
    tracing::warn!(position = unreadable.position, subject = %unreadable.subject, reason = %unreadable.reason, "an event page passes an unreadable message");
    Some(EventView {
        position: unreadable.position,
        subject: unreadable.subject.clone(),
        account_id: unreadable.account.clone()?,
        event_type: "unreadable".to_owned(),
        time: unreadable.time.format(&Rfc3339).unwrap_or_default(),
        data: serde_json::json!({ "reason": unreadable.reason }),
    })
}

async fn readyz(State(state): State<AppState>) -> Response {
    let ready = state.commands.get().is_some()
        && state.log.is_connected()
        && state
            .nats_commands_served
            .load(std::sync::atomic::Ordering::Acquire);
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

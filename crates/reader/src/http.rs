//! The query API (axum): accounts, statements and transfers, each response stamped with the
//! applied position (`X-Coffer-Position`), and `min_position` waits for read-your-writes.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{ConnectInfo, Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use problem::query::{PageLimit, Position, ValidQuery};
use problem::Problem;
use redb::{Database, ReadableDatabase};
use serde::Deserialize;
use time::OffsetDateTime;
use utoipa::IntoParams;
use utoipa_axum::{router::OpenApiRouter, routes};

use crate::answers::{
    AccountList, AccountView, Audit, BalanceAsOf, HoldView, Statement, StatementItem,
    TransactionView, TransferView,
};
use crate::openapi::{
    AccountProblems, AuditProblems, HoldProblems, ListProblems, RebuildStartProblems,
    RebuildStatusProblems, TransactionProblems, TransferProblems,
};
use crate::rebuild::RebuildStatus;

use crate::rebuild::{Rebuilder, Refusal};
use crate::served::Served;
use crate::views::{self, AccountRow, AuditRow, StatementEntry, TransactionRow, TransferRow};

pub const POSITION_HEADER: &str = "x-coffer-position";
pub const MIN_POSITION_HEADER: &str = "x-coffer-min-position";
/// How long a read waits for its position before asking whether the stream holds it at all.
const BEYOND_CHECK_AFTER: Duration = Duration::from_millis(100);

#[derive(Clone)]
pub struct QueryState {
    pub served: Arc<Served>,
    pub rebuilder: Arc<Rebuilder>,
    /// Longest `min_position` wait before `503 stale`.
    pub min_position_wait: Duration,
    pub nats: async_nats::Client,
    pub catch_up: Arc<crate::service::CatchUp>,
    /// Largest lag (in positions) behind the catch-up target at which `/readyz` is 200.
    pub ready_max_lag: u64,
    pub http_token: Option<problem::BearerToken>,
    /// Permits for reads waiting on `min_position` (or a balance position).
    pub waiters: Arc<tokio::sync::Semaphore>,
    pub stream_end: Arc<crate::stream_end::StreamEnd>,
}

/// The query routes with their OpenAPI operations: one list serves both.
pub fn api() -> OpenApiRouter<QueryState> {
    OpenApiRouter::new()
        .routes(routes!(list_accounts))
        .routes(routes!(account))
        .routes(routes!(transactions))
        .routes(routes!(balance_as_of))
        .routes(routes!(transfer))
        .routes(routes!(transaction))
        .routes(routes!(audit))
        .routes(routes!(hold))
        .routes(routes!(rebuild_status, start_rebuild))
}

pub fn router(state: QueryState) -> Router {
    let (routes, _) = api().split_for_parts();
    let routes = routes
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics));
    let router = problem::with_service_routes(routes, crate::openapi::document()).layer(
        middleware::from_fn_with_state(state.clone(), stamp_position),
    );
    // Outside the position stamp, so an unauthorized request waits for nothing.
    let router = problem::with_bearer_token(router, state.http_token.clone());
    problem::with_request_ids(router).with_state(state)
}

/// Read-your-writes, as a query parameter.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct MinPosition {
    /// Wait until the view has applied this position (the `position` a writer answered), up to
    /// the configured bound; then `503 stale`. A position beyond the stream's end is answered
    /// `503 stale` after a short grace.
    #[param(inline)]
    pub min_position: Option<Position>,
}

/// Read-your-writes, as a header (the query parameter wins when both are given).
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Header)]
pub struct MinPositionHeader {
    /// As `min_position`.
    #[serde(rename = "X-Coffer-Min-Position")]
    #[param(rename = "X-Coffer-Min-Position", nullable = false, inline)]
    pub min_position: Option<Position>,
}

/// An account addressed in the path.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
pub struct IdPath {
    /// The id: 1-64 of `[A-Za-z0-9_-]`.
    #[param(pattern = "^[A-Za-z0-9_-]{1,64}$")]
    pub id: String,
}

/// Waits until the view has applied `wanted`, up to the configured bound; then `503 stale`.
///
/// A read beyond the bound on waiting reads is answered at once (`503 unavailable`): waits are
/// cheap, but not free. A position beyond the stream's last one is answered after a short grace
/// (`503 stale`): a position a writer acknowledged is nearly always applied within it, so the
/// stream is asked only about positions that are likely bogus.
async fn wait_applied(state: &QueryState, wanted: u64) -> Result<(), Problem> {
    if state.served.position_now() >= wanted {
        return Ok(());
    }
    let Ok(_waiting) = state.waiters.try_acquire() else {
        return Err(Problem::unavailable(
            "unavailable",
            "too many reads are waiting for a position; retry shortly",
            1,
        ));
    };
    let mut applied = state.served.position();
    let grace = BEYOND_CHECK_AFTER.min(state.min_position_wait);
    let early = matches!(
        tokio::time::timeout(grace, applied.wait_for(|position| *position >= wanted)).await,
        Ok(Ok(_))
    );
    if early {
        return Ok(());
    }
    if let Some(last) = state.stream_end.beyond(wanted).await {
        return Err(Problem::unavailable(
            "stale",
            format!("position {wanted} is beyond the stream's last position {last}"),
            1,
        ));
    }
    let reached = tokio::time::timeout(
        state.min_position_wait.saturating_sub(grace),
        applied.wait_for(|position| *position >= wanted),
    )
    .await;
    if matches!(reached, Ok(Ok(_))) {
        return Ok(());
    }
    let current = state.served.position_now();
    Err(Problem::unavailable(
        "stale",
        format!(
            "the view has applied position {current}, not {wanted}, after waiting {} ms",
            state.min_position_wait.as_millis()
        ),
        1,
    ))
}

/// Waits for `min_position` (query or header) before the handler runs, and stamps every
/// response with the position the view had applied when it was read.
async fn stamp_position(State(state): State<QueryState>, request: Request, next: Next) -> Response {
    let wanted = match min_position(request.uri(), request.headers()) {
        Ok(wanted) => wanted,
        Err(problem) => return with_position(problem.into_response(), state.served.position_now()),
    };
    if let Some(wanted) = wanted {
        if let Err(problem) = wait_applied(&state, wanted).await {
            return with_position(problem.into_response(), state.served.position_now());
        }
    }
    // Read the position before the handler reads the view: the view is at least this fresh.
    // And after: a repair swap may have lowered it meanwhile (see `served`); the lower holds.
    let before = state.served.position_now();
    let response = next.run(request).await;
    with_position(response, before.min(state.served.position_now()))
}

fn with_position(mut response: Response, position: u64) -> Response {
    response
        .headers_mut()
        .insert(POSITION_HEADER, HeaderValue::from(position));
    response
}

fn min_position(uri: &axum::http::Uri, headers: &HeaderMap) -> Result<Option<u64>, Problem> {
    let from_query = ValidQuery::<MinPosition>::from_uri(uri)?
        .0
        .min_position
        .map(Position::get);
    let from_header = match headers.get(MIN_POSITION_HEADER) {
        None => None,
        Some(value) => Some(
            value
                .to_str()
                .ok()
                .and_then(Position::parse)
                .map(Position::get)
                .ok_or_else(|| {
                    Problem::invalid_request(format!(
                        "X-Coffer-Min-Position: expected a position from 0 to {}",
                        Position::MAX
                    ))
                })?,
        ),
    };
    Ok(from_query.or(from_header))
}

/// The serving view's file, or `503 unavailable` while it is being reopened after a storage
/// failure.
fn view_database(state: &QueryState) -> Result<Arc<Database>, Problem> {
    let view = state.served.current();
    // Between a failed commit and the file's closing, redb refuses reads too: say so.
    let failed = view
        .health
        .storage_failed
        .load(std::sync::atomic::Ordering::Acquire);
    let database = if failed { None } else { view.database.clone() };
    database.ok_or_else(|| {
        Problem::unavailable(
            "unavailable",
            format!(
                "the view's storage is being reopened ({})",
                view.health.failure().unwrap_or_default()
            ),
            1,
        )
    })
}

fn storage_problem(error: impl std::fmt::Display) -> Problem {
    tracing::error!(%error, "view read failed");
    Problem::new(
        500,
        "internal",
        "Internal error",
        "the view could not be read",
    )
}

/// One MessagePack row of a view, read in its own transaction.
fn read_row<T: for<'de> serde::Deserialize<'de>>(
    database: &Database,
    table: redb::TableDefinition<&str, &[u8]>,
    key: &str,
) -> Result<Option<T>, Problem> {
    let transaction = database.begin_read().map_err(storage_problem)?;
    let table = transaction.open_table(table).map_err(storage_problem)?;
    let bytes = table.get(key).map_err(storage_problem)?;
    bytes
        .map(|bytes| views::decode(bytes.value()).map_err(storage_problem))
        .transpose()
}

/// The account's row, unless the account is unreadable ([`ensure_readable`]).
fn read_account(database: &Database, id: &str) -> Result<Option<AccountRow>, Problem> {
    let transaction = database.begin_read().map_err(storage_problem)?;
    ensure_readable(&transaction, id)?;
    let table = transaction
        .open_table(views::ACCOUNTS)
        .map_err(storage_problem)?;
    let bytes = table.get(id).map_err(storage_problem)?;
    bytes
        .map(|bytes| views::decode(bytes.value()).map_err(storage_problem))
        .transpose()
}

/// Refuses an account whose history holds a message that cannot be read as an event: its
/// views would be wrong from there on. Other accounts are served as usual.
fn ensure_readable(transaction: &redb::ReadTransaction, id: &str) -> Result<(), Problem> {
    match views::unreadable_at(transaction, id).map_err(storage_problem)? {
        None => Ok(()),
        Some((position, row)) => Err(Problem::new(
            500,
            "account_unreadable",
            "Account unreadable",
            format!(
                "the event at position {position} of account {id} cannot be read ({}); this \
                 reader does not serve the account's views until it is repaired",
                row.reason
            ),
        )),
    }
}

fn account_not_found(id: &str) -> Problem {
    Problem::not_found("account_not_found", format!("no account {id}"))
}

#[utoipa::path(get, path = "/v1/accounts/{id}", tag = "reader",
    operation_id = "getAccount",
    summary = "Account view",
    params(IdPath, MinPosition, MinPositionHeader),
    responses((status = 200, description = "The account as of the applied position", body = AccountView,
        headers(("X-Coffer-Position" = u64, description = "The stream position the view has applied"))),
        AccountProblems))]
async fn account(State(state): State<QueryState>, Path(id): Path<String>) -> Response {
    match view_database(&state).and_then(|database| read_account(&database, &id)) {
        Ok(Some(row)) => Json(AccountView::from(&row)).into_response(),
        Ok(None) => account_not_found(&id).into_response(),
        Err(problem) => problem.into_response(),
    }
}

/// An account's status, as a listing filters on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum StatusFilter {
    Open,
    Closed,
}

/// The filters (combined with AND) and the page of an accounts listing. Metadata filters are
/// `metadata.{key}={value}` parameters, any number of them.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// Only accounts in this currency.
    #[param(pattern = "^[A-Z]{3}$")]
    pub currency: Option<String>,
    /// Only accounts with this owner.
    pub owner: Option<String>,
    #[param(inline)]
    pub status: Option<StatusFilter>,
    /// Accounts after this id (exclusive): the previous page's `next`.
    #[param(pattern = "^[A-Za-z0-9_-]{1,64}$")]
    pub after: Option<String>,
    #[param(inline)]
    pub limit: Option<PageLimit>,
}

/// Every filter of a listing, checked.
struct Filters {
    currency: Option<String>,
    owner: Option<String>,
    status: Option<StatusFilter>,
    metadata: Vec<(String, String)>,
}

impl Filters {
    fn parse(query: &ListQuery, uri: &axum::http::Uri) -> Result<Self, Problem> {
        if let Some(currency) = &query.currency {
            domain::Currency::parse(currency)
                .map_err(|error| Problem::invalid_request(format!("currency: {error}")))?;
        }
        let pairs = Query::<Vec<(String, String)>>::try_from_uri(uri)
            .map_err(|rejection| Problem::invalid_request(rejection.body_text()))?
            .0;
        let mut metadata = Vec::new();
        for (name, value) in pairs {
            let Some(key) = name.strip_prefix("metadata.") else {
                continue;
            };
            domain::metadata::check_key(key)
                .map_err(|error| Problem::invalid_request(format!("{name}: {error}")))?;
            metadata.push((key.to_owned(), value));
        }
        Ok(Self {
            currency: query.currency.clone(),
            owner: query.owner.clone(),
            status: query.status,
            metadata,
        })
    }

    /// Every filter as an index term, the usually most selective first (metadata, owner,
    /// status, currency); none: every account is listed.
    fn terms(&self) -> Vec<String> {
        let mut terms: Vec<String> = self
            .metadata
            .iter()
            .map(|(key, value)| views::metadata_term(key, value))
            .collect();
        terms.extend(self.owner.as_deref().map(views::owner_term));
        terms.extend(self.status.map(|status| {
            views::status_term(match status {
                StatusFilter::Open => "open",
                StatusFilter::Closed => "closed",
            })
        }));
        terms.extend(self.currency.as_deref().map(views::currency_term));
        terms
    }

    fn matches(&self, row: &AccountRow) -> bool {
        self.currency
            .as_ref()
            .is_none_or(|currency| &row.currency == currency)
            && self
                .owner
                .as_ref()
                .is_none_or(|owner| row.owner.as_ref() == Some(owner))
            && self
                .status
                .is_none_or(|status| row.closed == (status == StatusFilter::Closed))
            && self
                .metadata
                .iter()
                .all(|(key, value)| row.metadata.get(key) == Some(value))
    }
}

#[utoipa::path(get, path = "/v1/accounts", tag = "reader",
    operation_id = "listAccounts",
    summary = "List accounts by id, filtered by currency, owner, status and metadata (metadata.{key}={value}), combined with AND",
    params(ListQuery, MinPosition, MinPositionHeader),
    responses((status = 200, description = "A page of accounts, by id ascending", body = AccountList,
        headers(("X-Coffer-Position" = u64, description = "The stream position the view has applied"))),
        ListProblems))]
async fn list_accounts(
    State(state): State<QueryState>,
    uri: axum::http::Uri,
    ValidQuery(query): ValidQuery<ListQuery>,
) -> Response {
    let listed = match Filters::parse(&query, &uri).and_then(|filters| {
        let database = view_database(&state)?;
        Ok((filters, database))
    }) {
        // Index walks and row reads are blocking file IO: off the async workers.
        Ok((filters, database)) => {
            tokio::task::spawn_blocking(move || account_page(&database, &filters, &query))
                .await
                .unwrap_or_else(|error| Err(storage_problem(error)))
        }
        Err(problem) => Err(problem),
    };
    match listed {
        Ok(list) => Json(list).into_response(),
        Err(problem) => problem.into_response(),
    }
}

/// What the other terms say of an id the first term holds.
enum Seen {
    /// Every term holds it.
    InEvery,
    /// One does not; the next id it holds.
    NextAt(String),
    /// One holds nothing at or after it: nothing more matches.
    NoMore,
}

/// Index seeks one page may make before it is answered: a filter whose terms rarely
/// meet (each common, together rare) answers a short page with a `next` to go on from, rather
/// than walking its terms' whole indexes in one request.
const LISTING_STEPS_MAX: usize = 10_000;

/// One page of a listing: the accounts in every filter's index entries, found by leapfrogging
/// the terms' id-ordered ranges (each seek jumps to the largest id any other term is at), so a
/// page costs about its size times the filters, plus the entries of terms that rarely meet
/// (bounded by [`LISTING_STEPS_MAX`] seeks). Without filters, a range of the accounts.
fn account_page(
    database: &Database,
    filters: &Filters,
    query: &ListQuery,
) -> Result<AccountList, Problem> {
    let limit = query.limit.unwrap_or_default().get();
    let after = match query.after.as_deref() {
        Some(after) => domain::AccountId::parse(after)
            .map(|_| after)
            .map_err(|error| Problem::invalid_request(format!("after: {error}")))?,
        None => "",
    };
    let transaction = database.begin_read().map_err(storage_problem)?;
    let accounts = transaction
        .open_table(views::ACCOUNTS)
        .map_err(storage_problem)?;
    let mut page: Vec<AccountView> = Vec::new();
    // Where the next page starts when this one ends before its filters' ranges do.
    let mut next: Option<String> = None;
    // Takes a matching id; false once the page is full (it has one more).
    let mut take = |id: &str| -> Result<bool, Problem> {
        let Some(bytes) = accounts.get(id).map_err(storage_problem)? else {
            return Ok(true);
        };
        let row: AccountRow = views::decode(bytes.value()).map_err(storage_problem)?;
        // The index and the rows are written in one transaction; checked all the same.
        if !filters.matches(&row) {
            return Ok(true);
        }
        if page.len() == limit {
            return Ok(false);
        }
        page.push(AccountView::from(&row));
        Ok(true)
    };
    let terms = filters.terms();
    if terms.is_empty() {
        for entry in accounts.range(after..).map_err(storage_problem)? {
            let (key, _) = entry.map_err(storage_problem)?;
            let id = key.value().to_owned();
            if id.as_str() == after {
                continue;
            }
            if !take(&id)? {
                next = page.last().map(|view| view.account_id.clone());
                break;
            }
        }
    } else {
        let index = transaction
            .open_table(views::ACCOUNT_INDEX)
            .map_err(storage_problem)?;
        // The first id at or after `from` (after it, when `inclusive` is false) under `term`.
        let seek = |term: &str, from: &str, inclusive: bool| -> Result<Option<String>, Problem> {
            for entry in index.range((term, from)..).map_err(storage_problem)? {
                let (key, _) = entry.map_err(storage_problem)?;
                let (found_term, id) = key.value();
                if found_term != term {
                    return Ok(None);
                }
                if inclusive || id != from {
                    return Ok(Some(id.to_owned()));
                }
            }
            Ok(None)
        };
        let mut steps = 0;
        let mut candidate = seek(&terms[0], after, after.is_empty())?;
        // Every id before `candidate` is decided: listed, or missing from some term.
        while let Some(id) = candidate.take() {
            let mut seen = Seen::InEvery;
            for term in &terms[1..] {
                steps += 1;
                match seek(term, &id, true)? {
                    Some(found) if found == id => {}
                    Some(found) => {
                        seen = Seen::NextAt(found);
                        break;
                    }
                    None => {
                        seen = Seen::NoMore;
                        break;
                    }
                }
            }
            match seen {
                Seen::NoMore => break,
                Seen::NextAt(found) => {
                    if steps >= LISTING_STEPS_MAX {
                        next = Some(id);
                        break;
                    }
                    steps += 1;
                    candidate = seek(&terms[0], &found, true)?;
                }
                Seen::InEvery => {
                    if !take(&id)? {
                        next = page.last().map(|view| view.account_id.clone());
                        break;
                    }
                    steps += 1;
                    if steps >= LISTING_STEPS_MAX {
                        next = Some(id);
                        break;
                    }
                    candidate = seek(&terms[0], &id, false)?;
                }
            }
        }
    }
    Ok(AccountList {
        accounts: page,
        next,
    })
}

/// The bound of a balance lookup: exactly one of the two.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct BalanceQuery {
    /// A stream position (not together with `at`); one the view has not applied yet is waited
    /// for like `min_position`.
    #[param(inline)]
    pub position: Option<Position>,
    /// An RFC 3339 time (not together with `position`).
    #[serde(default, with = "time::serde::rfc3339::option")]
    #[param(value_type = Option<String>, format = DateTime)]
    pub at: Option<OffsetDateTime>,
}

/// The balance as of a position or a time: the account's last statement line at or before the
/// bound, found with one range lookup (no scan of the history). A position the view has not
/// applied yet is waited for like `min_position`.
#[utoipa::path(get, path = "/v1/accounts/{id}/balance", tag = "reader",
    operation_id = "getBalanceAsOf",
    summary = "Balance as of a position or a time: the account's last event at or before it",
    params(IdPath, BalanceQuery, MinPosition, MinPositionHeader),
    responses((status = 200, description = "The balance at the bound", body = BalanceAsOf,
        headers(("X-Coffer-Position" = u64, description = "The stream position the view has applied"))),
        AccountProblems))]
async fn balance_as_of(
    State(state): State<QueryState>,
    Path(id): Path<String>,
    ValidQuery(query): ValidQuery<BalanceQuery>,
) -> Response {
    match balance_line(&state, &id, &query).await {
        Ok(entry) => Json(BalanceAsOf::new(&id, &entry)).into_response(),
        Err(problem) => problem.into_response(),
    }
}

async fn balance_line(
    state: &QueryState,
    id: &str,
    query: &BalanceQuery,
) -> Result<StatementEntry, Problem> {
    let position = match (query.position.map(Position::get), query.at) {
        (Some(position), None) => {
            wait_applied(state, position).await?;
            Some(position)
        }
        (None, Some(_)) => None,
        _ => {
            return Err(Problem::invalid_request(
                "give exactly one of position and at",
            ))
        }
    };
    // One view and one read transaction for both lookups, whatever a rebuild swaps meanwhile.
    let transaction = view_database(state)?
        .begin_read()
        .map_err(storage_problem)?;
    ensure_readable(&transaction, id)?;
    let position = match (position, query.at) {
        (Some(position), _) => Some(position),
        (None, Some(at)) => {
            let times = transaction
                .open_table(views::STATEMENT_TIMES)
                .map_err(storage_problem)?;
            let found = times
                .range((id, i128::MIN)..=(id, at.unix_timestamp_nanos()))
                .map_err(storage_problem)?
                .next_back()
                .transpose()
                .map_err(storage_problem)?
                .map(|(_, position)| position.value());
            found
        }
        (None, None) => None,
    };
    let not_then = || {
        Problem::not_found(
            "account_not_found",
            format!("account {id} did not exist at that bound"),
        )
    };
    let position = position.ok_or_else(not_then)?;
    let statements = transaction
        .open_table(views::STATEMENTS)
        .map_err(storage_problem)?;
    let line = statements
        .range((id, 0)..=(id, position))
        .map_err(storage_problem)?
        .next_back()
        .transpose()
        .map_err(storage_problem)?
        .ok_or_else(not_then)?;
    views::decode(line.1.value()).map_err(storage_problem)
}

/// A page of a statement.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PageQuery {
    /// Items after this position (exclusive).
    #[param(inline)]
    pub after: Option<Position>,
    #[param(inline)]
    pub limit: Option<PageLimit>,
    /// Only the items with this reference.
    pub reference: Option<String>,
}

#[utoipa::path(get, path = "/v1/accounts/{id}/transactions", tag = "reader",
    operation_id = "listTransactions",
    summary = "Statement, ascending by position",
    params(IdPath, PageQuery, MinPosition, MinPositionHeader),
    responses((status = 200, description = "A page of the statement", body = Statement,
        headers(("X-Coffer-Position" = u64, description = "The stream position the view has applied"))),
        AccountProblems))]
async fn transactions(
    State(state): State<QueryState>,
    Path(id): Path<String>,
    ValidQuery(page): ValidQuery<PageQuery>,
) -> Response {
    match view_database(&state).and_then(|database| statement_page(&database, &id, &page)) {
        Ok(body) => Json(body).into_response(),
        Err(problem) => problem.into_response(),
    }
}

fn statement_page(database: &Database, id: &str, page: &PageQuery) -> Result<Statement, Problem> {
    let limit = page.limit.unwrap_or_default().get();
    let after = page.after.map_or(0, Position::get);
    if read_account(database, id)?.is_none() {
        return Err(account_not_found(id));
    }
    let transaction = database.begin_read().map_err(storage_problem)?;
    let table = transaction
        .open_table(views::STATEMENTS)
        .map_err(storage_problem)?;
    let start = after.saturating_add(1);
    let mut items = Vec::new();
    let mut next = after;
    if let Some(reference) = &page.reference {
        let references = transaction
            .open_table(views::STATEMENT_REFERENCES)
            .map_err(storage_problem)?;
        for key in references
            .range((id, reference.as_str(), start)..=(id, reference.as_str(), u64::MAX))
            .map_err(storage_problem)?
            .take(limit)
        {
            let position = key.map_err(storage_problem)?.0.value().2;
            let Some(value) = table.get((id, position)).map_err(storage_problem)? else {
                continue;
            };
            let entry: StatementEntry = views::decode(value.value()).map_err(storage_problem)?;
            next = position;
            items.push(StatementItem::from(&entry));
        }
        return Ok(Statement { items, next });
    }
    for row in table
        .range((id, start)..=(id, u64::MAX))
        .map_err(storage_problem)?
    {
        if items.len() == limit {
            break;
        }
        let (key, value) = row.map_err(storage_problem)?;
        let entry: StatementEntry = views::decode(value.value()).map_err(storage_problem)?;
        next = key.value().1;
        items.push(StatementItem::from(&entry));
    }
    Ok(Statement { items, next })
}

#[utoipa::path(get, path = "/v1/transfers/{id}", tag = "reader",
    operation_id = "getTransfer",
    summary = "Transfer view",
    params(IdPath, MinPosition, MinPositionHeader),
    responses((status = 200, description = "The transfer", body = TransferView,
        headers(("X-Coffer-Position" = u64, description = "The stream position the view has applied"))),
        TransferProblems))]
async fn transfer(State(state): State<QueryState>, Path(id): Path<String>) -> Response {
    let row: Result<Option<TransferRow>, Problem> = view_database(&state)
        .and_then(|database| read_row(&database, views::TRANSFERS, id.as_str()));
    match row {
        Ok(Some(row)) => Json(TransferView::from(&row)).into_response(),
        Ok(None) => {
            Problem::not_found("transfer_not_found", format!("no transfer {id}")).into_response()
        }
        Err(problem) => problem.into_response(),
    }
}

#[utoipa::path(get, path = "/v1/transactions/{id}", tag = "reader",
    operation_id = "getTransaction",
    summary = "Transaction view: every posting, and its reversal once there is one",
    params(IdPath, MinPosition, MinPositionHeader),
    responses((status = 200, description = "The transaction", body = TransactionView,
        headers(("X-Coffer-Position" = u64, description = "The stream position the view has applied"))),
        TransactionProblems))]
async fn transaction(State(state): State<QueryState>, Path(id): Path<String>) -> Response {
    let row: Result<Option<TransactionRow>, Problem> = view_database(&state)
        .and_then(|database| read_row(&database, views::TRANSACTIONS, id.as_str()));
    match row {
        // Parts are committed together; a view that applied only some of them does not show it.
        Ok(Some(row)) if row.complete() => Json(TransactionView::from(&row)).into_response(),
        Ok(_) => Problem::not_found("transaction_not_found", format!("no transaction {id}"))
            .into_response(),
        Err(problem) => problem.into_response(),
    }
}

#[derive(Debug, Deserialize)]
struct ReadyQuery {
    /// `reads=1`: ready to serve reads, whether or not NATS is reachable. Kubernetes uses this
    /// for the reader's readiness probe, so that reads stay routed during a NATS outage (the
    /// views are local); plain `/readyz` is the contract's full readiness.
    reads: Option<String>,
}

async fn readyz(State(state): State<QueryState>, Query(query): Query<ReadyQuery>) -> Response {
    use std::sync::atomic::Ordering;
    let view = state.served.current();
    if let Some(failure) = view.health.failure() {
        return Problem::unavailable("view_failed", failure, 30).into_response();
    }
    let catch_up = &state.catch_up;
    let caught_up =
        catch_up.reached.load(Ordering::Relaxed) || view.health.caught_up(state.ready_max_lag);
    if !caught_up {
        let health = &view.health;
        let detail = if health.start_known.load(Ordering::Acquire) {
            format!(
                "catching up: {} of the {} events pending at start applied",
                health.events_applied.get(),
                health.pending_at_start.load(Ordering::Relaxed)
            )
        } else {
            "not consuming yet (NATS unreachable since start)".to_owned()
        };
        return Problem::unavailable("catching_up", detail, 1).into_response();
    }
    catch_up.reached.store(true, Ordering::Relaxed);
    if query
        .reads
        .as_deref()
        .is_some_and(|reads| reads == "1" || reads == "true")
    {
        return (StatusCode::OK, "ready to serve reads").into_response();
    }
    let connected = state.nats.connection_state() == async_nats::connection::State::Connected;
    let consuming = view
        .health
        .consuming
        .load(std::sync::atomic::Ordering::Relaxed);
    if connected && consuming {
        (StatusCode::OK, "ready").into_response()
    } else {
        Problem::unavailable(
            "unavailable",
            "not connected to NATS; reads are served from the local view",
            1,
        )
        .into_response()
    }
}

#[utoipa::path(get, path = "/v1/holds/{id}", tag = "reader",
    operation_id = "getHold",
    summary = "Hold view",
    params(IdPath, MinPosition, MinPositionHeader),
    responses((status = 200, description = "The hold and what became of it", body = HoldView,
        headers(("X-Coffer-Position" = u64, description = "The stream position the view has applied"))),
        HoldProblems))]
async fn hold(State(state): State<QueryState>, Path(id): Path<String>) -> Response {
    let row: Result<Option<views::HoldRow>, Problem> =
        view_database(&state).and_then(|database| read_row(&database, views::HOLDS, id.as_str()));
    match row {
        Ok(Some(row)) => Json(HoldView::from(&row)).into_response(),
        Ok(None) => Problem::not_found("hold_not_found", format!("no hold {id}")).into_response(),
        Err(problem) => problem.into_response(),
    }
}

/// The conservation audit at the last settled position the view has applied.
#[utoipa::path(get, path = "/v1/audit", tag = "reader",
    operation_id = "getAudit",
    summary = "Conservation audit: per currency, the sum of balances against deposits minus withdrawals",
    params(MinPosition, MinPositionHeader),
    responses((status = 200, description = "The audit at the last position the view applied with no transfer half applied", body = Audit,
        headers(("X-Coffer-Position" = u64, description = "The stream position the view has applied"))),
        AuditProblems))]
async fn audit(State(state): State<QueryState>) -> Response {
    let row: Result<Option<AuditRow>, Problem> = view_database(&state)
        .and_then(|database| read_row(&database, views::AUDIT, views::AUDIT_SETTLED));
    match row {
        Ok(row) => Json(Audit::from(&row.unwrap_or_default())).into_response(),
        Err(problem) => problem.into_response(),
    }
}

/// Starts a blue/green rebuild of this reader's views (`coffer projection rebuild`).
///
/// Without a bearer token configured, only local callers may start one (`kubectl
/// port-forward`, `kubectl exec`), not through a proxy: a rebuild costs a full replay and a
/// second copy of the views.
#[utoipa::path(post, path = "/v1/projection/rebuild", tag = "reader",
    operation_id = "startRebuild",
    summary = "Start a blue/green rebuild of this reader's views: a fresh view from position 0, swapped in once caught up (`coffer projection rebuild`)",
    responses((status = 202, description = "Rebuild started", body = RebuildStatus), RebuildStartProblems))]
async fn start_rebuild(
    State(state): State<QueryState>,
    ConnectInfo(peer): ConnectInfo<std::net::SocketAddr>,
    headers: axum::http::HeaderMap,
) -> Response {
    if !rebuild_allowed(state.http_token.is_some(), peer.ip(), &headers) {
        return Problem::new(
            403,
            "forbidden",
            "Forbidden",
            "without COFFER_HTTP_TOKEN, rebuilds are accepted from this host only (port-forward or exec), and not through a proxy",
        )
        .into_response();
    }
    match state.rebuilder.start() {
        Ok(status) => (StatusCode::ACCEPTED, Json(status)).into_response(),
        Err(Refusal::Running(running)) => Problem::new(
            409,
            "rebuild_running",
            "Rebuild running",
            format!(
                "a rebuild started at {} is running; follow it with GET /v1/projection/rebuild",
                running.started_at.unwrap_or_default()
            ),
        )
        .into_response(),
        Err(Refusal::Unfinished(reason)) => Problem::new(
            409,
            "rebuild_unfinished",
            "Rebuild unfinished",
            format!("restart the reader before another rebuild: {reason}"),
        )
        .into_response(),
        Err(Refusal::NotReady) => Problem::unavailable(
            "not_ready",
            "the serving view has not set up its consumer yet; retry shortly",
            1,
        )
        .into_response(),
    }
}

/// Whether a caller at `peer` may start a rebuild (a token, when configured, was checked
/// already by the auth layer). Without a token, a loopback peer is trusted only when the request
/// does not say it was forwarded: a proxy or sidecar on this host (an ingress, a mesh's) connects
/// from loopback on behalf of anyone, and says so in these headers. A proxy that hides it is
/// trusted like the host; deployments with one set a token (docs/security.md).
fn rebuild_allowed(
    token_configured: bool,
    peer: std::net::IpAddr,
    headers: &axum::http::HeaderMap,
) -> bool {
    const FORWARDED: [&str; 5] = [
        "forwarded",
        "x-forwarded-for",
        "x-forwarded-host",
        "x-real-ip",
        "via",
    ];
    token_configured
        || (peer.is_loopback() && !FORWARDED.iter().any(|name| headers.contains_key(*name)))
}

#[utoipa::path(get, path = "/v1/projection/rebuild", tag = "reader",
    operation_id = "getRebuild",
    summary = "The last rebuild's progress",
    responses((status = 200, description = "Rebuild status", body = RebuildStatus), RebuildStatusProblems))]
async fn rebuild_status(State(state): State<QueryState>) -> Response {
    Json(state.rebuilder.status()).into_response()
}

async fn metrics(State(state): State<QueryState>) -> Response {
    let mut out = String::new();
    let view = state.served.current();
    let mut registry = prometheus_client::registry::Registry::default();
    view.health.register(&mut registry);
    view.integrity.register(&mut registry);
    if let Err(error) = prometheus_client::encoding::text::encode(&mut out, &registry) {
        tracing::warn!(%error, "encoding the metrics");
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        out,
    )
        .into_response()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::served::{Running, View};
    use serde_json::Value;
    use tower::ServiceExt as _;

    /// A query API over an empty view that never advances, on a stream holding `events`.
    async fn frozen_reader(
        nats: &testkit::NatsServer,
        events: u64,
        waiters: usize,
    ) -> (Router, tempfile::TempDir) {
        let client = async_nats::connect(nats.url()).await.unwrap();
        let log = eventlog::EventLog::open(client.clone(), &eventlog::StreamSettings::default())
            .await
            .unwrap();
        for index in 0..events {
            let account = domain::AccountId::parse(&format!("acc-{index}")).unwrap();
            let opened = domain::Event::AccountOpened(domain::OpenAccount {
                metadata: Default::default(),
                currency: domain::Currency::parse("EUR").unwrap(),
                owner: None,
                overdraft_limit: domain::OverdraftLimit::new(0).unwrap(),
            });
            log.append(&account, 0, &opened, &eventlog::EventMetadata::default())
                .await
                .unwrap();
        }
        let data = tempfile::tempdir().unwrap();
        let database = Arc::new(redb::Database::create(data.path().join("views.redb")).unwrap());
        let (_applied, receiver) = tokio::sync::watch::channel(0);
        std::mem::forget(_applied); // the view stays at 0, never closed
        let view = View {
            database: Some(database),
            path: data.path().join("views.redb"),
            health: Arc::default(),
            integrity: Arc::default(),
            applied: receiver,
            consumer_name: "frozen".into(),
        };
        let (stop, _) = tokio::sync::watch::channel(false);
        let served = Served::new(
            view,
            Running {
                stop,
                task: tokio::spawn(async {}),
            },
        );
        let (_, shutdown) = tokio::sync::watch::channel(false);
        let rebuilder =
            Rebuilder::new(served.clone(), log.clone(), data.path(), "frozen", shutdown);
        let state = QueryState {
            served,
            rebuilder,
            min_position_wait: Duration::from_millis(600),
            nats: client,
            catch_up: Arc::default(),
            ready_max_lag: 0,
            http_token: None,
            waiters: Arc::new(tokio::sync::Semaphore::new(waiters)),
            stream_end: Arc::new(crate::stream_end::StreamEnd::new(log)),
        };
        (router(state), data)
    }

    async fn get(router: &Router, uri: &str) -> (StatusCode, Value, Duration) {
        let started = std::time::Instant::now();
        let request = axum::http::Request::get(uri)
            .body(axum::body::Body::empty())
            .unwrap();
        let response = router.clone().oneshot(request).await.unwrap();
        let status = response.status();
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .unwrap();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
            started.elapsed(),
        )
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_position_beyond_the_stream_is_answered_at_once_and_waiters_are_bounded() {
        let nats = testkit::NatsServer::start();
        let (router, _data) = frozen_reader(&nats, 3, 1).await;
        // Within the stream but not applied: waited for, then stale.
        let (status, body, took) = get(&router, "/v1/accounts/acc-0?min_position=3").await;
        assert_eq!(
            (status, body["code"].as_str()),
            (StatusCode::SERVICE_UNAVAILABLE, Some("stale"))
        );
        assert!(took >= Duration::from_millis(600), "{took:?}");
        // Beyond the stream's last position: at once.
        let (status, body, took) = get(&router, "/v1/accounts/acc-0?min_position=4").await;
        assert_eq!(
            (status, body["code"].as_str()),
            (StatusCode::SERVICE_UNAVAILABLE, Some("stale"))
        );
        assert!(body["detail"]
            .as_str()
            .unwrap()
            .contains("beyond the stream's last position 3"));
        assert!(took < Duration::from_millis(400), "{took:?}");
        // One waiter allowed: a second is refused at once while the first waits.
        let first = tokio::spawn({
            let router = router.clone();
            async move { get(&router, "/v1/accounts/acc-0?min_position=2").await }
        });
        tokio::time::sleep(Duration::from_millis(150)).await;
        let (status, body, took) = get(&router, "/v1/accounts/acc-0?min_position=2").await;
        assert_eq!(
            (status, body["code"].as_str()),
            (StatusCode::SERVICE_UNAVAILABLE, Some("unavailable"))
        );
        assert!(took < Duration::from_millis(300), "{took:?}");
        let (status, body, _) = first.await.unwrap();
        assert_eq!(
            (status, body["code"].as_str()),
            (StatusCode::SERVICE_UNAVAILABLE, Some("stale"))
        );
        // The permit is back: the next waiter waits again.
        let (_, body, took) = get(&router, "/v1/accounts/acc-0?min_position=2").await;
        assert_eq!(body["code"].as_str(), Some("stale"));
        assert!(took >= Duration::from_millis(600), "{took:?}");
    }

    #[test]
    fn rebuilds_come_from_this_host_not_through_a_proxy_unless_a_token_guards_them() {
        let local = std::net::IpAddr::from([127, 0, 0, 1]);
        let remote = std::net::IpAddr::from([10, 0, 0, 7]);
        let direct = axum::http::HeaderMap::new();
        assert!(rebuild_allowed(false, local, &direct));
        assert!(rebuild_allowed(
            false,
            std::net::IpAddr::from(std::net::Ipv6Addr::LOCALHOST),
            &direct
        ));
        assert!(!rebuild_allowed(false, remote, &direct));
        assert!(rebuild_allowed(true, remote, &direct));
        // A proxy on this host, forwarding someone else's request.
        for (name, value) in [
            ("forwarded", "for=10.0.0.7"),
            ("x-forwarded-for", "10.0.0.7"),
            ("x-forwarded-host", "reader.example"),
            ("x-real-ip", "10.0.0.7"),
            ("via", "1.1 envoy"),
        ] {
            let mut proxied = axum::http::HeaderMap::new();
            proxied.insert(name, value.parse().unwrap());
            assert!(!rebuild_allowed(false, local, &proxied), "{name}");
            assert!(rebuild_allowed(true, local, &proxied), "{name}");
        }
    }
}

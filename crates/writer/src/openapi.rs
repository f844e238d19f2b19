//! The writer's part of the OpenAPI document, built from the same code that serves the API: the
//! routes come from [`ROUTES`] (checked against the router by a test) and every error status and
//! `code` from [`Error::problem`] over every rejection the domain has.

use domain::{AccountId, Currency, DomainError};
use serde_json::{json, Map, Value};

use crate::Error;

/// Method and path of every command-side route, as the router has them.
pub const ROUTES: &[(&str, &str)] = &[
    ("post", "/v1/accounts"),
    ("post", "/v1/accounts/{id}/deposits"),
    ("post", "/v1/accounts/{id}/withdrawals"),
    ("post", "/v1/accounts/{id}/close"),
    ("post", "/v1/transfers"),
    ("get", "/v1/events"),
];

/// One example of every error the writer answers, for the documented statuses and codes.
fn every_error() -> Vec<Error> {
    let mut rejections = vec![
        DomainError::AccountExists,
        DomainError::InsufficientFunds {
            balance: 0,
            amount: 1,
            floor: 0,
        },
        DomainError::BalanceNotZero { balance: 1 },
        DomainError::SameAccount,
    ];
    if let Ok(account) = AccountId::parse("a") {
        rejections.push(DomainError::AccountNotFound(account.clone()));
        rejections.push(DomainError::AccountClosed(account.clone()));
        rejections.push(DomainError::BalanceOverflow(account));
    }
    if let Ok(currency) = Currency::parse("EUR") {
        rejections.push(DomainError::CurrencyMismatch {
            expected: currency,
            actual: currency,
        });
    }
    let mut errors = vec![
        Error::InvalidRequest(String::new()),
        Error::IdempotencyKeyReused,
        Error::Unavailable(String::new()),
        Error::OutcomeUnknown(String::new()),
        Error::Internal(String::new()),
    ];
    errors.extend(rejections.into_iter().map(Error::Rejected));
    errors
}

/// Status -> the problem codes answered with it.
fn error_responses(statuses: &[u16]) -> Map<String, Value> {
    let mut by_status: std::collections::BTreeMap<u16, Vec<String>> = Default::default();
    for error in every_error() {
        let problem = error.problem();
        if statuses.contains(&problem.status) {
            let codes = by_status.entry(problem.status).or_default();
            if !codes.contains(&problem.code) {
                codes.push(problem.code);
            }
        }
    }
    for (status, code) in [(413, "payload_too_large"), (415, "unsupported_media_type")] {
        if statuses.contains(&status) {
            by_status.entry(status).or_default().push(code.into());
        }
    }
    by_status
        .into_iter()
        .map(|(status, codes)| {
            (
                status.to_string(),
                json!({
                    "description": format!("Problem with code {}", codes.join(", ")),
                    "content": {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}},
                }),
            )
        })
        .collect()
}

fn command(summary: &str, body: Option<&str>, success: (u16, &str), errors: &[u16]) -> Value {
    let mut responses = error_responses(errors);
    responses.insert(
        success.0.to_string(),
        json!({"description": summary, "content": {"application/json": {"schema": {"$ref": format!("#/components/schemas/{}", success.1)}}}}),
    );
    let mut operation = json!({
        "summary": summary,
        "parameters": [{"$ref": "#/components/parameters/IdempotencyKey"}],
        "responses": responses,
    });
    if let Some(schema) = body {
        operation["requestBody"] = json!({
            "required": true,
            "content": {"application/json": {"schema": {"$ref": format!("#/components/schemas/{schema}")}}},
        });
    }
    operation
}

fn with_account_id(mut operation: Value) -> Value {
    if let Some(parameters) = operation["parameters"].as_array_mut() {
        parameters.push(json!({"$ref": "#/components/parameters/AccountId"}));
    }
    operation
}

/// Paths and components of the command API.
pub fn document_part() -> Value {
    let money_errors = [400, 404, 409, 413, 415, 422, 503];
    let paths = json!({
        "/v1/accounts": {"post": command("Open an account", Some("OpenAccount"), (201, "Opened"), &[400, 409, 413, 415, 503])},
        "/v1/accounts/{id}/deposits": {"post": with_account_id(command("Deposit", Some("MoneyMovement"), (200, "Balance"), &money_errors))},
        "/v1/accounts/{id}/withdrawals": {"post": with_account_id(command("Withdraw", Some("MoneyMovement"), (200, "Balance"), &money_errors))},
        "/v1/accounts/{id}/close": {"post": with_account_id(command("Close an account (zero balance)", None, (200, "Opened"), &money_errors))},
        "/v1/transfers": {"post": command("Transfer atomically: the debit and the credit are committed together or not at all", Some("Transfer"), (201, "TransferCompleted"), &money_errors)},
        "/v1/events": {"get": {
            "summary": "Events in stream order, decoded to JSON",
            "parameters": [
                {"name": "after", "in": "query", "schema": {"type": "integer", "minimum": 0}},
                {"name": "since", "in": "query", "schema": {"type": "string", "format": "date-time"}},
                {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": crate::http::EVENTS_LIMIT_MAX, "default": 100}},
            ],
            "responses": {
                "200": {"description": "A page of events", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/EventPage"}}}},
                "400": error_responses(&[400])["400"],
                "503": error_responses(&[503])["503"],
            },
        }},
    });
    let amount = json!({"type": "integer", "minimum": 1, "maximum": domain::values::AMOUNT_MAX});
    let id = json!({"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"});
    let schemas = json!({
        "OpenAccount": {"type": "object", "required": ["currency"], "properties": {
            "account_id": id, "currency": {"type": "string", "pattern": "^[A-Z]{3}$"},
            "owner": {"type": "string", "maxLength": crate::request::TEXT_LENGTH_MAX},
            "overdraft_limit": {"type": "integer", "minimum": 0, "maximum": domain::values::AMOUNT_MAX, "default": 0}}},
        "MoneyMovement": {"type": "object", "required": ["amount"], "properties": {
            "amount": amount, "reference": {"type": "string", "maxLength": crate::request::TEXT_LENGTH_MAX}}},
        "Transfer": {"type": "object", "required": ["from", "to", "amount"], "properties": {
            "transfer_id": id, "from": id, "to": id, "amount": amount,
            "reference": {"type": "string", "maxLength": crate::request::TEXT_LENGTH_MAX}}},
        "Opened": {"type": "object", "required": ["account_id", "position"], "properties": {
            "account_id": id, "position": {"type": "integer"}}},
        "Balance": {"type": "object", "required": ["account_id", "balance", "position"], "properties": {
            "account_id": id, "balance": {"type": "integer"}, "position": {"type": "integer"}}},
        "TransferCompleted": {"type": "object", "required": ["transfer_id", "status", "position"], "properties": {
            "transfer_id": id, "status": {"const": "completed"}, "position": {"type": "integer"}}},
        "EventPage": {"type": "object", "required": ["events", "next"], "properties": {
            "events": {"type": "array", "items": {"type": "object", "required": ["position", "subject", "account_id", "type", "time", "data"]}},
            "next": {"type": "integer"}}},
    });
    let parameters = json!({
        "IdempotencyKey": {"name": "Idempotency-Key", "in": "header", "required": false,
            "description": "A retry with the same key on the same account within 24 h returns the first outcome and appends nothing.",
            "schema": {"type": "string", "minLength": 1, "maxLength": crate::idempotency::KEY_LENGTH_MAX}},
        "AccountId": {"name": "id", "in": "path", "required": true, "schema": id},
    });
    json!({"paths": paths, "components": {"schemas": schemas, "parameters": parameters}})
}

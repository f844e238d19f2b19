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
    ("post", "/v1/holds"),
    ("post", "/v1/holds/{id}/capture"),
    ("post", "/v1/holds/{id}/void"),
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
    if let Ok(hold) = domain::TransferId::parse("h") {
        rejections.push(DomainError::HoldNotFound(hold.clone()));
        rejections.push(DomainError::HoldSettled(hold));
    }
    rejections.push(DomainError::AmountExceedsHold {
        held: 1,
        requested: 2,
    });
    rejections.push(DomainError::HoldsOpen { count: 1 });
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

fn with_hold_id(mut operation: Value) -> Value {
    if let Some(parameters) = operation["parameters"].as_array_mut() {
        parameters.push(json!({"$ref": "#/components/parameters/HoldId"}));
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
        "/v1/holds": {"post": command("Place a hold: reserve money on `from` for `to` until captured, voided or expired", Some("PlaceHold"), (201, "HoldPlaced"), &money_errors)},
        "/v1/holds/{id}/capture": {"post": with_hold_id(command("Capture all or part of a hold: debit and credit together, the rest released", Some("Capture"), (200, "HoldCaptured"), &money_errors))},
        "/v1/holds/{id}/void": {"post": with_hold_id(command("Void a hold: release everything", None, (200, "HoldReleased"), &money_errors))},
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
        "PlaceHold": {"type": "object", "required": ["from", "to", "amount"], "additionalProperties": false, "properties": {
            "hold_id": id, "from": id, "to": id, "amount": amount,
            "expires_in_seconds": {"type": "integer", "minimum": 1, "maximum": domain::account::HOLD_SECONDS_MAX, "default": crate::request::HOLD_SECONDS_DEFAULT},
            "reference": {"type": "string", "maxLength": crate::request::TEXT_LENGTH_MAX}}},
        "Capture": {"type": "object", "additionalProperties": false, "properties": {"amount": amount}},
        "HoldPlaced": {"type": "object", "required": ["hold_id", "status", "expires_at", "position"], "properties": {
            "hold_id": id, "status": {"const": "held"}, "expires_at": {"type": "string", "format": "date-time"}, "position": {"type": "integer"}}},
        "HoldCaptured": {"type": "object", "required": ["hold_id", "status", "amount", "position"], "properties": {
            "hold_id": id, "status": {"const": "captured"}, "amount": {"type": "integer"}, "position": {"type": "integer"}}},
        "HoldReleased": {"type": "object", "required": ["hold_id", "status", "position"], "properties": {
            "hold_id": id, "status": {"const": "voided"}, "position": {"type": "integer"}}},
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
        "HoldId": {"name": "id", "in": "path", "required": true, "schema": id},
    });
    json!({"paths": paths, "components": {"schemas": schemas, "parameters": parameters}})
}

//! The reader's part of the OpenAPI document, built next to the code that serves it; a test
//! checks [`ROUTES`] against the router.

use serde_json::{json, Value};

/// Method and path of every query route.
pub const ROUTES: &[(&str, &str)] = &[
    ("get", "/v1/accounts/{id}"),
    ("get", "/v1/accounts/{id}/transactions"),
    ("get", "/v1/accounts/{id}/balance"),
    ("get", "/v1/transfers/{id}"),
    ("get", "/v1/audit"),
    ("get", "/v1/holds/{id}"),
    ("get", "/v1/projection/rebuild"),
    ("post", "/v1/projection/rebuild"),
];

fn problem(description: &str) -> Value {
    json!({"description": description,
        "content": {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}})
}

fn query(summary: &str, id_name: &str, schema: &str, not_found: &str, extra: &[Value]) -> Value {
    let mut parameters = vec![
        json!({"name": "id", "in": "path", "required": true, "description": id_name,
            "schema": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"}}),
        json!({"$ref": "#/components/parameters/MinPosition"}),
        json!({"$ref": "#/components/parameters/MinPositionHeader"}),
    ];
    parameters.extend(extra.iter().cloned());
    json!({"get": {
        "summary": summary,
        "parameters": parameters,
        "responses": {
            "200": {"description": summary,
                "headers": {"X-Coffer-Position": {"$ref": "#/components/headers/Position"}},
                "content": {"application/json": {"schema": {"$ref": format!("#/components/schemas/{schema}")}}}},
            "400": problem("Problem with code invalid_request"),
            "404": problem(&format!("Problem with code {not_found}")),
            "503": problem("Problem with code stale (min_position not applied within the bound)"),
        },
    }})
}

/// Paths and components of the query API.
pub fn document_part() -> Value {
    let page = [
        json!({"name": "after", "in": "query", "schema": {"type": "integer", "minimum": 0}}),
        json!({"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1,
            "maximum": crate::http::STATEMENT_LIMIT_MAX, "default": 100}}),
    ];
    let paths = json!({
        "/v1/accounts/{id}": query("Account view", "account id", "Account", "account_not_found", &[]),
        "/v1/accounts/{id}/transactions": query("Statement, ascending by position", "account id", "Statement", "account_not_found", &page),
        "/v1/transfers/{id}": query("Transfer view", "transfer id", "TransferView", "transfer_not_found", &[]),
        "/v1/accounts/{id}/balance": query("Balance as of a position or a time: the account's last event at or before it", "account id", "BalanceAsOf", "account_not_found (also when the account did not exist at the bound)", &[
            json!({"name": "position", "in": "query", "description": "A stream position (exclusive with at); waited for like min_position", "schema": {"type": "integer", "minimum": 0}}),
            json!({"name": "at", "in": "query", "description": "An RFC 3339 time (exclusive with position)", "schema": {"type": "string", "format": "date-time"}}),
        ]),
        "/v1/holds/{id}": query("Hold view", "hold id", "HoldView", "hold_not_found", &[]),
        "/v1/audit": {"get": {
            "summary": "Conservation audit: per currency, the sum of balances against deposits minus withdrawals",
            "parameters": [{"$ref": "#/components/parameters/MinPosition"}, {"$ref": "#/components/parameters/MinPositionHeader"}],
            "responses": {
                "200": {"description": "The audit at the last position the view applied with no transfer half applied",
                    "headers": {"X-Coffer-Position": {"$ref": "#/components/headers/Position"}},
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Audit"}}}},
                "400": problem("Problem with code invalid_request"),
                "503": problem("Problem with code stale (min_position not applied within the bound)"),
            }}},
        "/v1/projection/rebuild": {
            "post": {
                "summary": "Start a blue/green rebuild of this reader's views: a fresh view from position 0, swapped in once caught up (`coffer projection rebuild`)",
                "responses": {
                    "202": {"description": "Rebuild started",
                        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/RebuildStatus"}}}},
                    "401": problem("Problem with code unauthorized (a token is configured)"),
                    "403": problem("Problem with code forbidden (no token configured and the caller is not on the reader's host)"),
                    "409": problem("Problem with code rebuild_running (one rebuild at a time) or rebuild_unfinished (restart the reader first)"),
                    "503": problem("Problem with code not_ready (the serving view has not set up its consumer yet)"),
                }},
            "get": {
                "summary": "The last rebuild's progress",
                "responses": {
                    "200": {"description": "Rebuild status",
                        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/RebuildStatus"}}}},
                    "401": problem("Problem with code unauthorized (a token is configured)"),
                }}},
    });
    let time = json!({"type": "string", "format": "date-time"});
    let sums = json!({"type": "object", "required": ["balances", "external_in", "external_out"], "properties": {
        "balances": {"type": "integer"}, "external_in": {"type": "integer"}, "external_out": {"type": "integer"}}});
    let schemas = json!({
        "RebuildStatus": {"type": "object",
            "required": ["state", "started_at", "finished_at", "applied_position", "target_position", "pending_events", "events_applied", "error"],
            "properties": {
                "state": {"enum": ["idle", "building", "swapping", "completed", "failed", "unfinished"]},
                "started_at": {"type": ["string", "null"], "format": "date-time"},
                "finished_at": {"type": ["string", "null"], "format": "date-time"},
                "applied_position": {"type": "integer", "description": "Position the new view has applied"},
                "target_position": {"type": "integer", "description": "The serving view's position; the new view swaps in once it has applied it"},
                "pending_events": {"type": "integer"},
                "events_applied": {"type": "integer"},
                "error": {"type": ["string", "null"]}}},
        "BalanceAsOf": {"type": "object", "required": ["account_id", "balance", "position", "time"], "properties": {
            "account_id": {"type": "string"}, "balance": {"type": "integer"}, "position": {"type": "integer"}, "time": time}},
        "HoldView": {"type": "object", "required": ["hold_id", "from", "to", "amount", "status", "expires_at", "position"], "properties": {
            "hold_id": {"type": "string"}, "from": {"type": "string"}, "to": {"type": "string"}, "amount": {"type": "integer"},
            "status": {"enum": ["held", "captured", "voided", "expired"]}, "captured_amount": {"type": "integer"},
            "expires_at": time, "position": {"type": "integer"}}},
        "Audit": {"type": "object", "required": ["position", "currencies", "balanced"], "properties": {
            "position": {"type": "integer"}, "currencies": {"type": "object", "additionalProperties": sums},
            "balanced": {"type": "boolean"}}},
        "Account": {"type": "object", "required": ["account_id", "currency", "balance", "overdraft_limit", "status", "version", "position", "opened_at", "updated_at"],
            "properties": {"account_id": {"type": "string"}, "currency": {"type": "string"}, "owner": {"type": ["string", "null"]},
                "balance": {"type": "integer"}, "overdraft_limit": {"type": "integer"}, "held": {"type": "integer"},
                "available": {"type": "integer"}, "status": {"enum": ["open", "closed"]},
                "version": {"type": "integer"}, "position": {"type": "integer"}, "opened_at": time, "updated_at": time}},
        "Statement": {"type": "object", "required": ["items", "next"], "properties": {
            "items": {"type": "array", "items": {"type": "object", "required": ["position", "type", "amount", "balance_after", "time"],
                "properties": {"position": {"type": "integer"}, "type": {"type": "string"}, "amount": {"type": "integer"},
                    "balance_after": {"type": "integer"}, "time": time, "transfer_id": {"type": "string"},
                    "counterparty": {"type": "string"}, "reference": {"type": "string"}}}},
            "next": {"type": "integer"}}},
        "TransferView": {"type": "object", "required": ["transfer_id", "from", "to", "amount", "currency", "status", "position", "time"],
            "properties": {"transfer_id": {"type": "string"}, "from": {"type": "string"}, "to": {"type": "string"},
                "amount": {"type": "integer"}, "currency": {"type": "string"}, "status": {"const": "completed"},
                "reference": {"type": "string"}, "position": {"type": "integer"}, "time": time}},
    });
    let parameters = json!({
        "MinPosition": {"name": "min_position", "in": "query", "required": false,
            "description": "Wait until the view has applied this position (read-your-writes).",
            "schema": {"type": "integer", "minimum": 0}},
        "MinPositionHeader": {"name": "X-Coffer-Min-Position", "in": "header", "required": false,
            "schema": {"type": "integer", "minimum": 0}},
    });
    let headers = json!({"Position": {"description": "The stream position the view has applied.",
        "schema": {"type": "integer"}}});
    json!({"paths": paths, "components": {"schemas": schemas, "parameters": parameters, "headers": headers}})
}

//! Bulk submission (contract v3): `POST /v1/batch` and `coffer.cmd.batch` carry up to
//! [`BULK_COMMANDS_MAX`] commands, so that a client with many commands reaches the stream's batch
//! throughput without hundreds of connections.
//!
//! A bulk is only a way to send: each command is parsed, decided, stored and answered exactly as
//! if it had been sent alone (same parser, same [`Dispatcher::execute`], same idempotency by its
//! own `idempotency_key`), so one refusal refuses only itself and a retried bulk is answered from
//! each command's markers. Nothing is atomic across commands; a transaction is the atomic tool.
//!
//! Order: a command starts only when every earlier command of the bulk that touches one of its
//! accounts has been answered, so an `open` followed by a `deposit` on that account, or a
//! transfer to it, behaves as the same requests sent one after another. Commands on distinct
//! accounts run at once and reach group commit together, which is where the throughput comes
//! from. Only a malformed envelope (not an object with 1-1000 `commands`, a command that is not
//! an object, an unknown `op`) refuses the whole bulk, before anything runs.
//!
//! Bounds: at most [`BULKS_RUNNING_MAX`] bulks run at once in a writer (more are `503`, nothing
//! done), and no command starts after the bulk's start window ([`start_window`]): a chain of
//! commands on one slow account would otherwise outlast the HTTP request timeout, whose `408`
//! could hide stored commands. A command not started in time is answered `503 unavailable`:
//! true, it was not applied, and the bulk's answer still comes before the request times out.

use std::collections::HashMap;
use std::time::Duration;

use domain::AccountId;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tokio::sync::watch;
use utoipa::ToSchema;

use crate::dispatch::Dispatcher;
use crate::idempotency::IdempotencyKey;
use crate::request::{self, CommandRequest, Intent};
use crate::{Error, Result};

/// Most commands in one bulk (contract v3).
pub const BULK_COMMANDS_MAX: usize = 1_000;
/// Most bulks one writer runs at once (HTTP and NATS together): 16 000 commands in flight.
pub const BULKS_RUNNING_MAX: usize = 16;

static RUNNING: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(BULKS_RUNNING_MAX);

/// A place among the bulks running, or `503` when [`BULKS_RUNNING_MAX`] already are.
pub fn admit() -> Result<tokio::sync::SemaphorePermit<'static>> {
    RUNNING.try_acquire().map_err(|_| {
        Error::Unavailable(format!(
            "{BULKS_RUNNING_MAX} bulks are running on this writer; retry shortly"
        ))
    })
}

/// The refusal of an `Idempotency-Key` on a whole bulk (HTTP header or NATS header alike).
pub fn keyed_bulk() -> Error {
    Error::InvalidRequest(
        "Idempotency-Key: a bulk is not idempotent as a whole; give each command its own \
         idempotency_key"
            .into(),
    )
}

/// How long after a bulk arrives its commands may still start, so that the last one is
/// answered (its deadline `call_timeout`, then `answer_grace`) before `request_timeout`.
pub fn start_window(
    request_timeout: Duration,
    call_timeout: Duration,
    answer_grace: Duration,
) -> Duration {
    request_timeout.saturating_sub(call_timeout + answer_grace + crate::registry::ANSWER_MARGIN)
}
/// Largest bulk body: NATS's default `max_payload`, so both APIs take the same bulks. The
/// contract's 64 KiB applies to single commands; 1 000 commands of ~100 bytes need more.
pub const BULK_BODY_SIZE_MAX: usize = 1024 * 1024;

/// The verbs a bulk may carry.
const OPS: [&str; 6] = [
    "open",
    "deposit",
    "withdraw",
    "transfer",
    "transaction",
    "close",
];

/// `{"commands": [...]}`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, expecting = "a JSON object")]
pub struct BulkBody {
    /// 1-1000 commands, run in order per account, each as if sent alone.
    #[schema(min_items = 1, max_items = 1000, value_type = Vec<BulkCommand>)]
    pub commands: Vec<StrictObject>,
}

/// A JSON object read like the single requests' bodies are: a key given twice is refused, at
/// any depth (`serde_json::Map` would keep the last one silently, so a bulk could carry an
/// `amount` its single request refuses).
#[derive(Debug)]
pub struct StrictObject(Map<String, Value>);

/// Any JSON value, with [`StrictObject`]'s rule for the objects in it.
struct StrictValue(Value);

impl<'de> Deserialize<'de> for StrictObject {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        match StrictValue::deserialize(deserializer)?.0 {
            Value::Object(fields) => Ok(Self(fields)),
            other => Err(serde::de::Error::custom(format!(
                "expected a JSON object, got {}",
                kind(&other)
            ))),
        }
    }
}

fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

impl<'de> Deserialize<'de> for StrictValue {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(StrictVisitor)
    }
}

struct StrictVisitor;

impl<'de> serde::de::Visitor<'de> for StrictVisitor {
    type Value = StrictValue;

    fn expecting(&self, formatter: &mut std::fmt::Formatter) -> std::fmt::Result {
        formatter.write_str("any JSON value")
    }

    fn visit_bool<E>(self, value: bool) -> Result<StrictValue, E> {
        Ok(StrictValue(Value::Bool(value)))
    }

    fn visit_i64<E>(self, value: i64) -> Result<StrictValue, E> {
        Ok(StrictValue(Value::from(value)))
    }

    fn visit_u64<E>(self, value: u64) -> Result<StrictValue, E> {
        Ok(StrictValue(Value::from(value)))
    }

    fn visit_f64<E>(self, value: f64) -> Result<StrictValue, E> {
        Ok(StrictValue(Value::from(value)))
    }

    fn visit_str<E>(self, value: &str) -> Result<StrictValue, E> {
        Ok(StrictValue(Value::String(value.to_owned())))
    }

    fn visit_string<E>(self, value: String) -> Result<StrictValue, E> {
        Ok(StrictValue(Value::String(value)))
    }

    fn visit_unit<E>(self) -> Result<StrictValue, E> {
        Ok(StrictValue(Value::Null))
    }

    fn visit_none<E>(self) -> Result<StrictValue, E> {
        Ok(StrictValue(Value::Null))
    }

    fn visit_some<D: serde::Deserializer<'de>>(
        self,
        deserializer: D,
    ) -> Result<StrictValue, D::Error> {
        StrictValue::deserialize(deserializer)
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<StrictValue, A::Error> {
        let mut items = Vec::new();
        while let Some(StrictValue(item)) = seq.next_element()? {
            items.push(item);
        }
        Ok(StrictValue(Value::Array(items)))
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<StrictValue, A::Error> {
        let mut fields = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            let StrictValue(value) = map.next_value()?;
            if fields.contains_key(&key) {
                return Err(serde::de::Error::custom(format!("duplicate field `{key}`")));
            }
            fields.insert(key, value);
        }
        Ok(StrictValue(Value::Object(fields)))
    }
}

/// One command of a bulk: `op`, its own optional `idempotency_key`, `account_id` for the
/// account verbs (`deposit`, `withdraw`, `close`; optional for `open`), and the fields of the
/// op's single-request body (`amount`, `reference`, `from`, `to`, `postings`, ...). Those fields
/// are checked as strictly as the single request checks them, and refuse only this command.
#[derive(Debug, Deserialize, ToSchema)]
#[allow(dead_code)] // The schema of one element; the code reads elements as JSON objects.
pub struct BulkCommand {
    /// The single request this command stands for.
    op: BulkOp,
    /// Scopes exactly-once to this command, as the `Idempotency-Key` header of a single request
    /// (1-128 printable ASCII characters, starting and ending with a visible one; otherwise this
    /// command alone is refused).
    idempotency_key: Option<String>,
    account_id: Option<String>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
#[allow(dead_code)]
enum BulkOp {
    Open,
    Deposit,
    Withdraw,
    Transfer,
    Transaction,
    Close,
}

/// What one command answered: the status and body its single request would have answered.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct BulkResult {
    pub status: u16,
    #[schema(value_type = Object)]
    pub body: Value,
}

/// `200` to a bulk: one result per command, in request order.
#[derive(Debug, Serialize, ToSchema)]
pub struct BulkResults {
    pub results: Vec<BulkResult>,
}

/// Parses a bulk: `Err` only for a malformed envelope (nothing runs); each command is parsed on
/// its own, and a command that does not parse is answered with its own `400`.
pub fn parse(
    body: &[u8],
    correlation_id: &str,
    trace: trace_context::TraceParent,
) -> Result<Vec<Result<CommandRequest>>> {
    let body: BulkBody = request::parse(body, false)?;
    if body.commands.is_empty() || body.commands.len() > BULK_COMMANDS_MAX {
        return Err(Error::InvalidRequest(format!(
            "commands: expected 1 to {BULK_COMMANDS_MAX} commands, got {}",
            body.commands.len()
        )));
    }
    for (index, StrictObject(fields)) in body.commands.iter().enumerate() {
        match fields.get("op") {
            Some(Value::String(op)) if OPS.contains(&op.as_str()) => {}
            Some(_) => {
                return Err(Error::InvalidRequest(format!(
                    "commands[{index}].op: expected one of {}",
                    OPS.join(", ")
                )))
            }
            None => {
                return Err(Error::InvalidRequest(format!(
                    "commands[{index}]: missing field `op`"
                )))
            }
        }
        // The envelope's own fields (a single request has them in its header and path, where
        // they are always text): any other type makes the envelope malformed.
        for field in ["idempotency_key", "account_id"] {
            if let Some(value) = fields.get(field) {
                if !matches!(value, Value::Null | Value::String(_)) {
                    return Err(Error::InvalidRequest(format!(
                        "commands[{index}].{field}: expected a string, got {}",
                        kind(value)
                    )));
                }
            }
        }
    }
    Ok(body
        .commands
        .into_iter()
        .map(|StrictObject(fields)| command(fields, correlation_id, trace))
        .collect())
}

/// One command of a bulk, as its single request would be parsed.
fn command(
    mut fields: Map<String, Value>,
    correlation_id: &str,
    trace: trace_context::TraceParent,
) -> Result<CommandRequest> {
    let op = match fields.remove("op") {
        Some(Value::String(op)) => op,
        _ => return Err(Error::InvalidRequest("op: missing".into())),
    };
    let key = match fields.remove("idempotency_key") {
        None | Some(Value::Null) => None,
        // An HTTP header cannot start or end with a space (they are dropped), so neither may a
        // key here: the same key sent alone later must be the same key.
        Some(Value::String(key)) if key.starts_with(' ') || key.ends_with(' ') => {
            return Err(Error::InvalidRequest(
                "idempotency_key: must start and end with a visible character".into(),
            ))
        }
        Some(Value::String(key)) => IdempotencyKey::parse_optional(Some(&key))?,
        Some(other) => {
            return Err(Error::InvalidRequest(format!(
                "idempotency_key: expected a string, got {}",
                kind(&other)
            )))
        }
    };
    // The single requests' account verbs take their account from the path.
    let addressed = if matches!(op.as_str(), "deposit" | "withdraw" | "close") {
        match fields.remove("account_id") {
            Some(Value::String(id)) => Some(request::addressed_account(&id)?),
            Some(other) => {
                return Err(Error::InvalidRequest(format!(
                    "account_id: expected a string, got {}",
                    kind(&other)
                )))
            }
            None => {
                return Err(Error::InvalidRequest(
                    "account_id: missing field `account_id`".into(),
                ))
            }
        }
    } else {
        None
    };
    let body = serde_json::to_vec(&fields)
        .map_err(|error| Error::Internal(format!("re-encode a bulk command: {error}")))?;
    let (account_id, intent, generated) = match (op.as_str(), addressed) {
        ("open", _) => {
            let (id, command) = request::open(&body, None, key.as_ref())?;
            (id, Intent::Account(command), false)
        }
        ("deposit", Some(id)) => (id, Intent::Account(request::deposit(&body)?), false),
        ("withdraw", Some(id)) => (id, Intent::Account(request::withdraw(&body)?), false),
        ("close", Some(id)) => (id, Intent::Account(request::close(&body)?), false),
        ("transfer", _) => {
            let (from, transfer, generated) = request::transfer(&body, None)?;
            (from, Intent::Transfer(transfer), generated)
        }
        ("transaction", _) => {
            let (from, transaction, generated) = request::transaction(&body, None)?;
            (from, Intent::Transaction(transaction), generated)
        }
        (op, _) => return Err(Error::InvalidRequest(format!("op: unknown {op:?}"))),
    };
    Ok(
        CommandRequest::new(account_id, intent, key, correlation_id.to_owned())
            .with_generated_transfer_id(generated)
            .with_trace(trace),
    )
}

/// Every account a command reads or changes.
fn touched(request: &CommandRequest) -> Vec<&AccountId> {
    let mut accounts = vec![&request.account_id];
    match &request.intent {
        Intent::Transfer(transfer) => accounts.push(&transfer.to),
        Intent::Hold(hold) => accounts.push(&hold.to),
        Intent::Transaction(transaction) => accounts.extend(
            transaction
                .postings
                .iter()
                .flat_map(|posting| [&posting.from, &posting.to]),
        ),
        Intent::Account(_) | Intent::Capture(_) | Intent::Release(..) => {}
    }
    accounts.sort();
    accounts.dedup();
    accounts
}

/// For each command, the earlier commands it waits for: the last earlier one touching each of
/// its accounts (which waits, in turn, for the ones before it).
fn dependencies(commands: &[Result<CommandRequest>]) -> Vec<Vec<usize>> {
    let mut last_toucher: HashMap<&AccountId, usize> = HashMap::new();
    commands
        .iter()
        .enumerate()
        .map(|(index, command)| {
            let Ok(command) = command else {
                return Vec::new();
            };
            let mut waits: Vec<usize> = touched(command)
                .into_iter()
                .filter_map(|account| last_toucher.insert(account, index))
                .collect();
            waits.sort_unstable();
            waits.dedup();
            waits
        })
        .collect()
}

/// Runs a parsed bulk and answers each command as its single request would have been; a command
/// that could not start by `start_by` is answered `503` and not applied, and none is decided or
/// sent after the client's own deadline (`client_deadline`, NATS `Coffer-Deadline`).
pub async fn run(
    dispatcher: &Dispatcher,
    commands: Vec<Result<CommandRequest>>,
    start_by: tokio::time::Instant,
    client_deadline: Option<tokio::time::Instant>,
) -> Vec<BulkResult> {
    let dependencies = dependencies(&commands);
    // A command is done for its dependents when its sender is dropped (after its answer).
    let (done, finished): (Vec<_>, Vec<_>) = commands.iter().map(|_| watch::channel(())).unzip();
    let runs = commands
        .into_iter()
        .zip(done)
        .zip(dependencies)
        .map(|((command, done), waits)| {
            let waiting: Vec<watch::Receiver<()>> =
                waits.iter().map(|&index| finished[index].clone()).collect();
            async move {
                for mut earlier in waiting {
                    // `Err` is the answer: the earlier command's sender is gone.
                    while earlier.changed().await.is_ok() {}
                }
                let answer = match command {
                    Ok(_) if tokio::time::Instant::now() >= start_by => Err(Error::Unavailable(
                        "the bulk ran out of time before this command could start; it was not \
                         applied"
                            .into(),
                    )),
                    // Each command is answered by itself, so a late one is `outcome_unknown` alone
                    // and the bulk's answer still carries every other outcome.
                    Ok(command) => {
                        let answer_by = dispatcher
                            .registry()
                            .answered_by(tokio::time::Instant::now());
                        let running = async {
                            match client_deadline {
                                Some(until) => dispatcher.execute_until(command, until).await,
                                None => dispatcher.execute(command).await,
                            }
                        };
                        tokio::time::timeout_at(answer_by, running)
                            .await
                            .unwrap_or_else(|_| {
                                Err(Error::OutcomeUnknown(
                                    "no answer came in time for this command".into(),
                                ))
                            })
                    }
                    Err(error) => Err(error),
                };
                drop(done);
                result(answer)
            }
        });
    futures::future::join_all(runs).await
}

fn result(answer: Result<crate::outcome::Outcome>) -> BulkResult {
    match answer {
        Ok(outcome) => BulkResult {
            status: outcome.status(),
            body: outcome.body(),
        },
        Err(error) => {
            let problem = error.problem();
            BulkResult {
                status: problem.status,
                body: serde_json::to_value(&problem).unwrap_or_default(),
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn parsed(body: Value) -> Result<Vec<Result<CommandRequest>>> {
        parse(
            &serde_json::to_vec(&body).unwrap(),
            "c",
            trace_context::TraceParent::new_root(),
        )
    }

    #[test]
    fn a_malformed_envelope_refuses_the_whole_bulk() {
        for body in [
            serde_json::json!({"commands": []}),
            serde_json::json!({"commands": [{"op": "teleport"}]}),
            serde_json::json!({"commands": [{"amount": 5}]}),
            serde_json::json!({"commands": [5]}),
            serde_json::json!({"commands": {}}),
            serde_json::json!({"commands": [{"op": "open", "currency": "EUR"}], "atomic": true}),
            serde_json::json!([]),
            serde_json::json!({"commands": [{"op": "deposit", "account_id": {}, "amount": 1}]}),
            serde_json::json!({"commands": [{"op": "deposit", "account_id": "a", "amount": 1,
                "idempotency_key": 7}]}),
        ] {
            let error = parsed(body.clone()).err().unwrap();
            assert_eq!(error.problem().status, 400, "{body}");
        }
        let many: Vec<Value> = (0..=BULK_COMMANDS_MAX)
            .map(|_| serde_json::json!({"op": "deposit", "account_id": "a", "amount": 1}))
            .collect();
        assert!(parsed(serde_json::json!({ "commands": many })).is_err());
    }

    #[test]
    fn a_field_given_twice_is_refused_as_the_single_request_refuses_it() {
        let body = br#"{"commands":[
            {"op":"withdraw","account_id":"a","amount":1,"amount":100000},
            {"op":"deposit","account_id":"a","amount":1}]}"#;
        let error = parse(body, "c", trace_context::TraceParent::new_root())
            .err()
            .unwrap();
        assert!(error.problem().detail.contains("duplicate field `amount`"));
        let nested = br#"{"commands":[
            {"op":"transaction","postings":[{"from":"a","to":"b","amount":1,"amount":9}]}]}"#;
        assert!(parse(nested, "c", trace_context::TraceParent::new_root()).is_err());
        let keys = parse(
            br#"{"commands":[{"op":"deposit","account_id":"a","amount":1,"idempotency_key":" k"}]}"#,
            "c",
            trace_context::TraceParent::new_root(),
        )
        .unwrap();
        assert_eq!(keys[0].as_ref().err().unwrap().problem().status, 400);
    }

    #[test]
    fn the_start_window_leaves_the_last_command_its_deadline_within_the_request_timeout() {
        let window = start_window(
            Duration::from_secs(30),
            Duration::from_secs(10),
            Duration::from_millis(3_500),
        );
        assert_eq!(window, Duration::from_millis(14_500));
        let none = start_window(
            Duration::from_secs(5),
            Duration::from_secs(10),
            Duration::ZERO,
        );
        assert_eq!(none, Duration::ZERO);
    }

    #[test]
    fn a_command_that_does_not_parse_refuses_only_itself() {
        let commands = parsed(serde_json::json!({"commands": [
            {"op": "deposit", "account_id": "a", "amount": 0},
            {"op": "deposit", "amount": 5},
            {"op": "deposit", "account_id": "a", "amount": 5, "memo": "x"},
            {"op": "deposit", "account_id": "a", "amount": 5, "idempotency_key": ""},
            {"op": "deposit", "account_id": "a", "amount": 5, "idempotency_key": "k"},
            {"op": "open", "account_id": "b", "currency": "EUR"},
            {"op": "close", "account_id": "b"},
        ]}))
        .unwrap();
        for refused in &commands[..4] {
            assert_eq!(refused.as_ref().err().unwrap().problem().status, 400);
        }
        let deposit = commands[4].as_ref().unwrap();
        assert_eq!(deposit.account_id.as_str(), "a");
        assert_eq!(deposit.idempotency_key.as_ref().unwrap().as_str(), "k");
        assert_eq!(commands[5].as_ref().unwrap().account_id.as_str(), "b");
        assert_eq!(commands[6].as_ref().unwrap().verb(), "close");
    }

    #[test]
    fn a_command_waits_for_the_last_earlier_one_on_each_of_its_accounts() {
        let commands = parsed(serde_json::json!({"commands": [
            {"op": "open", "account_id": "a", "currency": "EUR"},
            {"op": "open", "account_id": "b", "currency": "EUR"},
            {"op": "deposit", "account_id": "a", "amount": 5},
            {"op": "transfer", "from": "a", "to": "b", "amount": 1},
            {"op": "deposit", "account_id": "c", "amount": 5},
            {"op": "deposit", "account_id": "x", "amount": 0},
            {"op": "transaction", "postings": [{"from": "c", "to": "b", "amount": 1}]},
        ]}))
        .unwrap();
        assert_eq!(
            dependencies(&commands),
            vec![
                vec![],
                vec![],
                vec![0],
                vec![1, 2],
                vec![],
                vec![],
                vec![3, 4]
            ]
        );
    }
}

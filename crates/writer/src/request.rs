//! Parsing request bodies into validated commands. HTTP and NATS share this, so both APIs accept
//! and refuse exactly the same things.

use domain::account::HOLD_SECONDS_MAX;
use domain::{
    AccountId, Amount, Capture, Command, Currency, OpenAccount, OverdraftLimit, PlaceHold, Release,
    Transfer, TransferId,
};
use serde_json::{Map, Value};
use tokio::time::Instant;

use crate::idempotency::{self, IdempotencyKey};
use crate::{Error, Result};

/// Longest `owner`, `reference` accepted, in bytes: they are stored in every event.
pub const TEXT_LENGTH_MAX: usize = 256;

/// The command verbs of the contract.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verb {
    Open,
    Deposit,
    Withdraw,
    Transfer,
    Close,
    Hold,
    Capture,
    Void,
}

impl Verb {
    pub const ALL: [Verb; 8] = [
        Verb::Open,
        Verb::Deposit,
        Verb::Withdraw,
        Verb::Transfer,
        Verb::Close,
        Verb::Hold,
        Verb::Capture,
        Verb::Void,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Verb::Open => "open",
            Verb::Deposit => "deposit",
            Verb::Withdraw => "withdraw",
            Verb::Transfer => "transfer",
            Verb::Close => "close",
            Verb::Hold => "hold",
            Verb::Capture => "capture",
            Verb::Void => "void",
        }
    }
}

/// What a request asks of the account it is addressed to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Intent {
    /// A command on that account alone.
    Account(Command),
    /// A transfer from that account to another.
    Transfer(Transfer),
    /// A hold placed on that account for another.
    Hold(PlaceHold),
    /// A capture of one of that account's holds.
    Capture(Capture),
    /// A void or expiry of one of that account's holds.
    Release(TransferId, Release),
}

/// A validated command for one account, with what idempotency needs.
#[derive(Debug, Clone)]
pub struct CommandRequest {
    /// The account acted on: the sender of a transfer.
    pub account_id: AccountId,
    pub intent: Intent,
    pub idempotency_key: Option<IdempotencyKey>,
    /// Ties the resulting events to the request that caused them.
    pub correlation_id: String,
    /// After this instant the command is not started and nothing more is appended for it: its
    /// caller has answered `outcome_unknown` by then. Set by the registry.
    pub deadline: Option<Instant>,
    /// The transfer id was made by the server, so it is not part of what the client asked
    /// (a keyed retry gets another one and must still count as the same request).
    pub transfer_id_generated: bool,
    /// The writer's hop of the request's W3C trace; its events carry it.
    pub trace: trace_context::TraceParent,
}

impl CommandRequest {
    pub fn new(
        account_id: AccountId,
        intent: Intent,
        idempotency_key: Option<IdempotencyKey>,
        correlation_id: String,
    ) -> Self {
        Self {
            account_id,
            intent,
            idempotency_key,
            correlation_id,
            deadline: None,
            transfer_id_generated: false,
            trace: trace_context::TraceParent::new_root(),
        }
    }

    /// Sets the trace the request continues.
    pub fn with_trace(mut self, trace: trace_context::TraceParent) -> Self {
        self.trace = trace;
        self
    }

    /// Marks the transfer id as made by the server.
    pub fn with_generated_transfer_id(mut self, generated: bool) -> Self {
        self.transfer_id_generated = generated;
        self
    }

    /// A short name of what is asked, for logs.
    pub fn verb(&self) -> &'static str {
        match &self.intent {
            Intent::Account(Command::Open(_)) => "open",
            Intent::Account(Command::Deposit { .. }) => "deposit",
            Intent::Account(Command::Withdraw { .. }) => "withdraw",
            Intent::Account(Command::Close) => "close",
            Intent::Transfer(_) => "transfer",
            Intent::Hold(_) => "hold",
            Intent::Capture(_) => "capture",
            Intent::Release(_, Release::Void) => "void",
            Intent::Release(_, Release::Expire) => "expire",
        }
    }
}

fn invalid(detail: impl Into<String>) -> Error {
    Error::InvalidRequest(detail.into())
}

/// Parses a JSON object body whose fields are all among `fields`: a field the operation does not
/// define is refused by name (contract v2: strict bodies), so a client never believes a field was
/// honoured when it was not. An empty body counts as `{}` only where `empty_allowed`.
fn object(body: &[u8], fields: &[&str], empty_allowed: bool) -> Result<Map<String, Value>> {
    if empty_allowed && body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Map::new());
    }
    let map = match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(map)) => map,
        Ok(_) => return Err(invalid("the body must be a JSON object")),
        Err(error) => return Err(invalid(format!("malformed JSON: {error}"))),
    };
    if let Some(unknown) = map.keys().find(|key| !fields.contains(&key.as_str())) {
        return Err(invalid(format!(
            "unknown field {unknown:?}: this operation takes {}",
            if fields.is_empty() {
                "no fields".to_owned()
            } else {
                fields.join(", ")
            }
        )));
    }
    Ok(map)
}

fn integer(map: &Map<String, Value>, field: &str) -> Result<Option<i128>> {
    match map.get(field) {
        None => Ok(None),
        Some(Value::Number(number)) => {
            if let Some(value) = number.as_i64() {
                Ok(Some(value.into()))
            } else if let Some(value) = number.as_u64() {
                Ok(Some(value.into()))
            } else {
                Err(invalid(format!("{field} must be an integer")))
            }
        }
        Some(_) => Err(invalid(format!("{field} must be an integer"))),
    }
}

fn text<'a>(map: &'a Map<String, Value>, field: &str) -> Result<Option<&'a str>> {
    match map.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(text)) => Ok(Some(text)),
        Some(_) => Err(invalid(format!("{field} must be a string"))),
    }
}

fn free_text(map: &Map<String, Value>, field: &str) -> Result<Option<String>> {
    match text(map, field)? {
        Some(value) if value.len() > TEXT_LENGTH_MAX => Err(invalid(format!(
            "{field} must be at most {TEXT_LENGTH_MAX} bytes"
        ))),
        value => Ok(value.map(str::to_owned)),
    }
}

fn amount(map: &Map<String, Value>) -> Result<Amount> {
    let units = integer(map, "amount")?.ok_or_else(|| invalid("amount is required"))?;
    Amount::new(units).map_err(|error| invalid(error.to_string()))
}

fn account_id(text: &str) -> Result<AccountId> {
    AccountId::parse(text).map_err(|error| invalid(error.to_string()))
}

/// Checks an id given both in the subject/path and the body agrees.
fn same_account(body_id: Option<&str>, addressed: &AccountId) -> Result<()> {
    match body_id {
        Some(id) if id != addressed.as_str() => Err(invalid(format!(
            "account_id {id:?} in the body differs from {addressed} in the address"
        ))),
        _ => Ok(()),
    }
}

/// The account money leaves: the subject's over NATS (a `from` in the body must agree), the
/// body's `from` over HTTP.
fn sender(map: &Map<String, Value>, addressed: Option<&str>) -> Result<AccountId> {
    match (addressed, text(map, "from")?) {
        (Some(addressed), body_from) => {
            let id = account_id(addressed)?;
            same_account(body_from, &id)?;
            Ok(id)
        }
        (None, Some(from)) => account_id(from),
        (None, None) => Err(invalid("from is required")),
    }
}

/// `open`: `{"account_id"?, "currency", "owner"?, "overdraft_limit"?}`. Over NATS the account
/// comes from the subject (`addressed`).
pub fn open(
    body: &[u8],
    addressed: Option<&str>,
    key: Option<&IdempotencyKey>,
) -> Result<(AccountId, Command)> {
    let map = object(
        body,
        &["account_id", "currency", "owner", "overdraft_limit"],
        false,
    )?;
    let currency = match map.get("currency") {
        Some(Value::String(code)) => Currency::parse(code).map_err(|e| invalid(e.to_string()))?,
        Some(_) => return Err(invalid("currency must be a string")),
        None => return Err(invalid("currency is required")),
    };
    let overdraft_limit = OverdraftLimit::new(integer(&map, "overdraft_limit")?.unwrap_or(0))
        .map_err(|error| invalid(error.to_string()))?;
    let body_id = text(&map, "account_id")?;
    let id = match (addressed, body_id, key) {
        (Some(addressed), body_id, _) => {
            let id = account_id(addressed)?;
            same_account(body_id, &id)?;
            id
        }
        (None, Some(id), _) => account_id(id)?,
        // Without an id the key decides it, so a retried create finds the account it made.
        (None, None, Some(key)) => account_id(&idempotency::derived_id("acc_", "open", key))?,
        (None, None, None) => account_id(&uuid::Uuid::now_v7().simple().to_string())?,
    };
    let command = Command::Open(OpenAccount {
        currency,
        owner: free_text(&map, "owner")?,
        overdraft_limit,
    });
    Ok((id, command))
}

/// `deposit`: `{"amount", "reference"?}`.
pub fn deposit(body: &[u8]) -> Result<Command> {
    let map = object(body, &["amount", "reference"], false)?;
    Ok(Command::Deposit {
        amount: amount(&map)?,
        reference: free_text(&map, "reference")?,
    })
}

/// `withdraw`: `{"amount", "reference"?}`.
pub fn withdraw(body: &[u8]) -> Result<Command> {
    let map = object(body, &["amount", "reference"], false)?;
    Ok(Command::Withdraw {
        amount: amount(&map)?,
        reference: free_text(&map, "reference")?,
    })
}

/// `transfer`: HTTP `{"transfer_id"?, "from", "to", "amount", "reference"?}`; over NATS the
/// sender is the subject's account and `from` may be omitted. Without a `transfer_id` the server
/// makes a fresh one (the third value is then true): an `Idempotency-Key` retry is answered from
/// the key's marker, which holds the id of the first attempt, so the id is not derived from the
/// key (it would outlive the key's 24 hours and turn a later reuse of the key into a replay).
pub fn transfer(body: &[u8], addressed: Option<&str>) -> Result<(AccountId, Transfer, bool)> {
    let map = object(
        body,
        &["transfer_id", "from", "to", "amount", "reference"],
        false,
    )?;
    let from = sender(&map, addressed)?;
    let to = account_id(text(&map, "to")?.ok_or_else(|| invalid("to is required"))?)?;
    let given = text(&map, "transfer_id")?;
    let transfer_id = match given {
        Some(id) => TransferId::parse(id).map_err(|error| invalid(error.to_string()))?,
        None => TransferId::parse(&uuid::Uuid::now_v7().simple().to_string())
            .map_err(|error| invalid(error.to_string()))?,
    };
    let transfer = Transfer {
        transfer_id,
        to,
        amount: amount(&map)?,
        reference: free_text(&map, "reference")?,
    };
    Ok((from, transfer, given.is_none()))
}

/// Default lifetime of a hold: one hour.
pub const HOLD_SECONDS_DEFAULT: i64 = 3_600;

/// `hold`: HTTP `{"hold_id"?, "from", "to", "amount", "expires_in_seconds"?, "reference"?}`; over
/// NATS the sender is the subject's account. Without a `hold_id` the server makes one (the third
/// value is then true), as for transfers.
pub fn hold(body: &[u8], addressed: Option<&str>) -> Result<(AccountId, PlaceHold, bool)> {
    let map = object(
        body,
        &[
            "hold_id",
            "from",
            "to",
            "amount",
            "expires_in_seconds",
            "reference",
        ],
        false,
    )?;
    let from = sender(&map, addressed)?;
    let to = account_id(text(&map, "to")?.ok_or_else(|| invalid("to is required"))?)?;
    let given = text(&map, "hold_id")?;
    let hold_id = TransferId::parse(
        &given
            .map(str::to_owned)
            .unwrap_or_else(|| uuid::Uuid::now_v7().simple().to_string()),
    )
    .map_err(|error| invalid(format!("hold_id: {error}")))?;
    let expires_in_seconds = match integer(&map, "expires_in_seconds")? {
        None => HOLD_SECONDS_DEFAULT,
        Some(seconds) if (1..=i128::from(HOLD_SECONDS_MAX)).contains(&seconds) => seconds as i64,
        Some(_) => {
            return Err(invalid(format!(
                "expires_in_seconds must be an integer from 1 to {HOLD_SECONDS_MAX}"
            )))
        }
    };
    let hold = PlaceHold {
        hold_id,
        to,
        amount: amount(&map)?,
        expires_in_seconds,
        reference: free_text(&map, "reference")?,
    };
    Ok((from, hold, given.is_none()))
}

/// `capture` over HTTP: `{"amount"?}` (the hold is in the path).
pub fn capture(body: &[u8], hold_id: &str) -> Result<Capture> {
    let map = object(body, &["amount"], true)?;
    capture_from(&map, hold_id)
}

fn capture_from(map: &Map<String, Value>, hold_id: &str) -> Result<Capture> {
    let amount = match integer(map, "amount")? {
        None => None,
        Some(units) => Some(Amount::new(units).map_err(|error| invalid(error.to_string()))?),
    };
    Ok(Capture {
        hold_id: hold_reference(hold_id)?,
        amount,
    })
}

/// `capture` over NATS: `{"hold_id", "amount"?}`.
pub fn capture_message(body: &[u8]) -> Result<Capture> {
    let map = object(body, &["hold_id", "amount"], false)?;
    let hold_id = text(&map, "hold_id")?.ok_or_else(|| invalid("hold_id is required"))?;
    capture_from(&map, hold_id)
}

/// `void` over HTTP: an empty body or `{}` (the hold is in the path).
pub fn void(body: &[u8], hold_id: &str) -> Result<TransferId> {
    object(body, &[], true)?;
    hold_reference(hold_id)
}

/// `void` over NATS: `{"hold_id"}`.
pub fn void_message(body: &[u8]) -> Result<TransferId> {
    let map = object(body, &["hold_id"], false)?;
    hold_reference(text(&map, "hold_id")?.ok_or_else(|| invalid("hold_id is required"))?)
}

/// Parses a hold id given in a path or body.
pub fn hold_reference(text: &str) -> Result<TransferId> {
    TransferId::parse(text).map_err(|error| invalid(format!("hold_id: {error}")))
}

/// `close`: an empty body or `{}`.
pub fn close(body: &[u8]) -> Result<Command> {
    object(body, &[], true)?;
    Ok(Command::Close)
}

/// Parses a path or subject account id.
pub fn addressed_account(text: &str) -> Result<AccountId> {
    account_id(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amounts_must_be_integers_in_range() {
        for body in [
            r#"{"amount":0}"#,
            r#"{"amount":-5}"#,
            r#"{"amount":1.5}"#,
            r#"{"amount":"10"}"#,
            r#"{"amount":null}"#,
            r#"{"amount":9007199254740992}"#,
            r#"{"amount":1e3}"#,
            r#"{}"#,
            r#"[1]"#,
            r#"{not json"#,
        ] {
            assert!(
                matches!(deposit(body.as_bytes()), Err(Error::InvalidRequest(_))),
                "{body} accepted"
            );
        }
        assert!(deposit(br#"{"amount":9007199254740991}"#).is_ok());
    }

    #[test]
    fn open_validates_currency_id_and_limit() {
        for body in [
            r#"{"currency":"eur"}"#,
            r#"{"currency":978}"#,
            r#"{}"#,
            r#"{"currency":"EUR","account_id":"has.dot"}"#,
            r#"{"currency":"EUR","account_id":""}"#,
            r#"{"currency":"EUR","overdraft_limit":-1}"#,
            r#"{"currency":"EUR","owner":5}"#,
        ] {
            assert!(
                open(body.as_bytes(), None, None).is_err(),
                "{body} accepted"
            );
        }
        let (id, _) = open(br#"{"currency":"EUR","account_id":"a-1"}"#, None, None).unwrap();
        assert_eq!(id.as_str(), "a-1");
        assert!(open(br#"{"currency":"EUR","account_id":"b"}"#, Some("a"), None).is_err());
    }

    #[test]
    fn a_key_derives_the_same_generated_id_on_retry() {
        let key = IdempotencyKey::parse("k").unwrap();
        let (first, _) = open(br#"{"currency":"EUR"}"#, None, Some(&key)).unwrap();
        let (second, _) = open(br#"{"currency":"EUR"}"#, None, Some(&key)).unwrap();
        assert_eq!(first, second);
        let (x, _) = open(br#"{"currency":"EUR"}"#, None, None).unwrap();
        let (y, _) = open(br#"{"currency":"EUR"}"#, None, None).unwrap();
        assert_ne!(x, y);
    }

    #[test]
    fn close_accepts_an_empty_body_or_an_object() {
        assert!(close(b"").is_ok());
        assert!(close(b"{}").is_ok());
        assert!(close(b"{x").is_err());
        assert!(close(br#"{"force":true}"#).is_err());
    }

    #[test]
    fn unknown_fields_are_refused_by_name() {
        let refused = |result: Result<Command>| match result {
            Err(Error::InvalidRequest(detail)) => detail,
            other => panic!("accepted: {other:?}"),
        };
        let detail = refused(deposit(br#"{"amount":5,"account_id":"other"}"#));
        assert!(detail.contains("account_id"), "{detail}");
        assert!(refused(withdraw(br#"{"amount":5,"memo":"x"}"#)).contains("memo"));
        let misspelt = transfer(br#"{"from":"a","to":"b","amount":1,"amout":2}"#, None);
        assert!(matches!(misspelt, Err(Error::InvalidRequest(detail)) if detail.contains("amout")));
        assert!(open(br#"{"currency":"EUR","limit":5}"#, None, None).is_err());
    }
}

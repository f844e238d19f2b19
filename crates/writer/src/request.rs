//! Parsing request bodies into validated commands. HTTP and NATS share this, so both APIs accept
//! and refuse exactly the same things.

use domain::account::HOLD_SECONDS_MAX;
use domain::metadata::METADATA_ENTRIES_MAX;
use domain::{
    AccountId, Amount, Capture, Command, Currency, Metadata, OpenAccount, OverdraftLimit,
    PlaceHold, Posting, Release, Transaction, Transfer, TransferId, POSTINGS_MAX,
};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::idempotency::{self, IdempotencyKey};
use crate::{Error, Result};

/// Longest `owner`, `reference` accepted, in characters: they are stored in every event.
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
    Transaction,
    Metadata,
}

impl Verb {
    pub const ALL: [Verb; 10] = [
        Verb::Open,
        Verb::Deposit,
        Verb::Withdraw,
        Verb::Transfer,
        Verb::Close,
        Verb::Hold,
        Verb::Capture,
        Verb::Void,
        Verb::Transaction,
        Verb::Metadata,
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
            Verb::Transaction => "transaction",
            Verb::Metadata => "metadata",
        }
    }
}

/// What a request asks of the account it is addressed to (serde: handed to the account's
/// owner between writers).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
    /// A multi-posting transaction, or the reversal of a transfer or transaction, addressed to
    /// the `from` of its first posting.
    Transaction(Transaction),
}

impl Intent {
    /// The accounts the command names besides the one it is addressed to (a capture's receiver
    /// is in the hold, not in the command, so it names none).
    pub fn accounts_named(&self) -> Vec<&AccountId> {
        match self {
            Intent::Transfer(transfer) => vec![&transfer.to],
            Intent::Hold(hold) => vec![&hold.to],
            Intent::Transaction(transaction) => transaction
                .postings
                .iter()
                .flat_map(|posting| [&posting.from, &posting.to])
                .collect(),
            Intent::Account(_) | Intent::Capture(_) | Intent::Release(..) => Vec::new(),
        }
    }

    /// Whether the command has metadata to store.
    pub fn carries_metadata(&self) -> bool {
        match self {
            Intent::Account(Command::Open(open)) => !open.metadata.is_empty(),
            Intent::Account(
                Command::Deposit { metadata, .. } | Command::Withdraw { metadata, .. },
            ) => !metadata.is_empty(),
            Intent::Account(Command::ChangeMetadata { .. }) => true,
            Intent::Account(Command::Close) => false,
            Intent::Transfer(transfer) => !transfer.metadata.is_empty(),
            Intent::Hold(hold) => !hold.metadata.is_empty(),
            Intent::Transaction(transaction) => !transaction.metadata.is_empty(),
            Intent::Capture(_) | Intent::Release(..) => false,
        }
    }
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
    /// Set by the dispatcher when ownership is on and the command is not itself a hand-over:
    /// a flow that keeps losing races to an account another writer owns comes back as
    /// [`crate::Error::Contended`] (nothing of it stored) for that writer to decide.
    pub hand_over_when_contended: bool,
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
            hand_over_when_contended: false,
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
            Intent::Account(Command::ChangeMetadata { .. }) => "metadata",
            Intent::Transfer(_) => "transfer",
            Intent::Hold(_) => "hold",
            Intent::Capture(_) => "capture",
            Intent::Release(_, Release::Void) => "void",
            Intent::Release(_, Release::Expire) => "expire",
            Intent::Transaction(Transaction {
                reverses: Some(_), ..
            }) => "reverse",
            Intent::Transaction(_) => "transaction",
        }
    }
}

fn invalid(detail: impl Into<String>) -> Error {
    Error::InvalidRequest(detail.into())
}

/// Free text stored in every event (`owner`, `reference`): at most [`TEXT_LENGTH_MAX`]
/// characters, counted as JSON Schema's `maxLength` counts them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Text(String);

impl Text {
    /// Whether `text` is short enough to be stored.
    pub fn fits(text: &str) -> bool {
        text.chars().count() <= TEXT_LENGTH_MAX
    }

    pub fn into_string(self) -> String {
        self.0
    }
}

impl<'de> Deserialize<'de> for Text {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        if Text::fits(&text) {
            Ok(Self(text))
        } else {
            Err(serde::de::Error::custom(format!(
                "expected at most {TEXT_LENGTH_MAX} characters, got {}",
                text.chars().count()
            )))
        }
    }
}

impl utoipa::PartialSchema for Text {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        utoipa::openapi::ObjectBuilder::new()
            .schema_type(utoipa::openapi::schema::Type::String)
            .max_length(Some(TEXT_LENGTH_MAX))
            .description(Some("Free text kept in the events"))
            .into()
    }
}
impl utoipa::ToSchema for Text {}

fn text(value: Option<Text>) -> Option<String> {
    value.map(Text::into_string)
}

/// How long a hold lasts, in seconds: 1 to [`HOLD_SECONDS_MAX`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HoldSeconds(i64);

impl utoipa::PartialSchema for HoldSeconds {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        utoipa::openapi::ObjectBuilder::new()
            .schema_type(utoipa::openapi::schema::Type::Integer)
            .minimum(Some(1))
            .maximum(Some(HOLD_SECONDS_MAX))
            .default(Some(HOLD_SECONDS_DEFAULT.into()))
            .description(Some(
                "Seconds until the hold expires and its money is released",
            ))
            .into()
    }
}
impl utoipa::ToSchema for HoldSeconds {}

impl Default for HoldSeconds {
    fn default() -> Self {
        Self(HOLD_SECONDS_DEFAULT)
    }
}

impl<'de> Deserialize<'de> for HoldSeconds {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        // An integral float is an integer in JSON Schema, as for amounts.
        let number = serde_json::Number::deserialize(deserializer)?;
        let seconds = number.as_i64().or_else(|| {
            number
                .as_f64()
                .filter(|seconds| seconds.fract() == 0.0 && seconds.abs() < 1e15)
                .map(|seconds| seconds as i64)
        });
        match seconds {
            Some(seconds) if (1..=HOLD_SECONDS_MAX).contains(&seconds) => Ok(Self(seconds)),
            _ => Err(serde::de::Error::custom(format!(
                "expected an integer from 1 to {HOLD_SECONDS_MAX}, got {number}"
            ))),
        }
    }
}

/// `POST /v1/accounts`, NATS `open`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields, expecting = "a JSON object")]
pub struct OpenAccountBody {
    /// Made by the server when absent (derived from the `Idempotency-Key` when there is one, so a
    /// retried create finds the account it made). Over NATS the subject's account.
    pub account_id: Option<AccountId>,
    pub currency: Currency,
    pub owner: Option<Text>,
    #[serde(default)]
    #[schema(default = 0)]
    pub overdraft_limit: OverdraftLimit,
    #[serde(default)]
    pub metadata: Metadata,
}

/// Deposits and withdrawals.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields, expecting = "a JSON object")]
pub struct MoneyMovement {
    pub amount: Amount,
    pub reference: Option<Text>,
    #[serde(default)]
    pub metadata: Metadata,
}

/// `POST /v1/transfers`; over NATS the sender is the subject's account and `from` may be left
/// out (when given it must agree).
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields, expecting = "a JSON object")]
pub struct TransferBody {
    /// Made by the server when absent. Unique forever: the same id with the same parameters
    /// answers the first outcome again.
    pub transfer_id: Option<TransferId>,
    #[schema(value_type = AccountId, required = true)]
    pub from: Option<AccountId>,
    pub to: AccountId,
    pub amount: Amount,
    pub reference: Option<Text>,
    #[serde(default)]
    pub metadata: Metadata,
}

/// `POST /v1/holds`; over NATS the sender is the subject's account.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields, expecting = "a JSON object")]
pub struct HoldBody {
    /// Made by the server when absent, as for transfers.
    pub hold_id: Option<TransferId>,
    #[schema(value_type = AccountId, required = true)]
    pub from: Option<AccountId>,
    pub to: AccountId,
    pub amount: Amount,
    #[serde(default)]
    pub expires_in_seconds: HoldSeconds,
    pub reference: Option<Text>,
    #[serde(default)]
    pub metadata: Metadata,
}

/// `POST /v1/holds/{id}/capture`: the whole hold, or `amount` of it (the rest is released).
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields, expecting = "a JSON object")]
pub struct CaptureBody {
    pub amount: Option<Amount>,
}

/// One posting of a transaction: `amount` moves from `from` to `to`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields, expecting = "a JSON object")]
pub struct PostingBody {
    pub from: AccountId,
    pub to: AccountId,
    pub amount: Amount,
}

/// 1 to 64 postings, checked while parsing so that the schema and the server agree.
#[derive(Debug)]
pub struct Postings(Vec<PostingBody>);

impl<'de> Deserialize<'de> for Postings {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let postings = Vec::<PostingBody>::deserialize(deserializer)?;
        if postings.is_empty() || postings.len() > POSTINGS_MAX {
            return Err(serde::de::Error::custom(format!(
                "expected 1 to {POSTINGS_MAX} postings, got {}",
                postings.len()
            )));
        }
        Ok(Self(postings))
    }
}

impl utoipa::PartialSchema for Postings {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        utoipa::openapi::schema::ArrayBuilder::new()
            .items(<PostingBody as utoipa::PartialSchema>::schema())
            .min_items(Some(1))
            .max_items(Some(POSTINGS_MAX))
            .into()
    }
}
impl utoipa::ToSchema for Postings {}

/// `POST /v1/transactions`; over NATS (`coffer.cmd.{account}.transaction`) the subject's account
/// is the first posting's `from`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields, expecting = "a JSON object")]
pub struct TransactionBody {
    /// Made by the server when absent. Shares the forever-claimed namespace of transfer and
    /// hold ids: the same id with the same body answers the first outcome again.
    pub transaction_id: Option<TransferId>,
    /// Applied all together or not at all; an account may appear in several, and only its net
    /// outflow counts against its limit.
    pub postings: Postings,
    pub reference: Option<Text>,
    #[serde(default)]
    pub metadata: Metadata,
}

/// `POST /v1/accounts/{id}/metadata`: `set` is written over the account's metadata, then the
/// keys of `unset` are removed (a key in both ends up removed); the account keeps at most 16
/// entries. Neither given: nothing changes, and the answer shows the metadata as it is.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields, expecting = "a JSON object")]
pub struct MetadataBody {
    #[serde(default)]
    pub set: Metadata,
    /// Keys to remove (absent ones are fine).
    #[serde(default)]
    #[schema(max_items = 16)]
    pub unset: Vec<domain::metadata::MetadataKey>,
}

/// `POST /v1/transfers/{id}/reverse`, `POST /v1/transactions/{id}/reverse`.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields, expecting = "a JSON object")]
pub struct ReverseBody {
    /// Why: kept as the reversal's reference.
    pub reason: Option<Text>,
}

/// A body that takes no fields: `close`, `void` over HTTP (an empty body is fine too).
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields, expecting = "a JSON object")]
pub struct NoFields {}

/// NATS `capture`: the hold is named in the body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a JSON object")]
struct CaptureMessage {
    hold_id: TransferId,
    amount: Option<Amount>,
}

/// NATS `void`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a JSON object")]
struct VoidMessage {
    hold_id: TransferId,
}

/// Parses a JSON body into `T`; a refusal names the field and the reason (`amount: expected an
/// integer from 1 to ..., got 0`, `unknown field "memo", expected one of ...`), so a client never
/// believes a field was honoured when it was not (contract v2: strict bodies). An empty body
/// counts as `{}` only where `empty_allowed`.
pub fn parse<T: DeserializeOwned>(body: &[u8], empty_allowed: bool) -> Result<T> {
    let body: &[u8] = if empty_allowed && body.iter().all(u8::is_ascii_whitespace) {
        b"{}"
    } else {
        body
    };
    let mut deserializer = serde_json::Deserializer::from_slice(body);
    let value = serde_path_to_error::deserialize(&mut deserializer)
        .map_err(|error| {
            let path = error.path().to_string();
            let error = error.into_inner();
            let reason = without_position(&error);
            if error.is_data() && path != "." {
                invalid(format!("{path}: {reason}"))
            } else if error.is_data() {
                invalid(reason)
            } else {
                invalid(format!("malformed JSON: {error}"))
            }
        })
        .and_then(|value| {
            deserializer
                .end()
                .map(|()| value)
                .map_err(|error| invalid(format!("malformed JSON: {error}")))
        })?;
    Ok(value)
}

/// serde_json's message without its " at line 1 column 12" (the path says where).
fn without_position(error: &serde_json::Error) -> String {
    let message = error.to_string();
    match message.rfind(" at line ") {
        Some(index) => message[..index].to_owned(),
        None => message,
    }
}

/// Checks an id given both in the subject/path and the body agrees.
fn same_account(body_id: Option<&AccountId>, addressed: &AccountId) -> Result<()> {
    match body_id {
        Some(id) if id != addressed => Err(invalid(format!(
            "account_id {id:?} in the body differs from {addressed} in the address",
            id = id.as_str()
        ))),
        _ => Ok(()),
    }
}

/// The account money leaves: the subject's over NATS (a `from` in the body must agree), the
/// body's `from` over HTTP.
fn sender(from: Option<AccountId>, addressed: Option<&str>) -> Result<AccountId> {
    match (addressed, from) {
        (Some(addressed), from) => {
            let id = addressed_account(addressed)?;
            same_account(from.as_ref(), &id)?;
            Ok(id)
        }
        (None, Some(from)) => Ok(from),
        (None, None) => Err(invalid("from: missing field `from`")),
    }
}

fn fresh_id() -> Result<TransferId> {
    TransferId::parse(&uuid::Uuid::now_v7().simple().to_string())
        .map_err(|error| invalid(error.to_string()))
}

/// `open`: `{"account_id"?, "currency", "owner"?, "overdraft_limit"?}`. Over NATS the account
/// comes from the subject (`addressed`).
pub fn open(
    body: &[u8],
    addressed: Option<&str>,
    key: Option<&IdempotencyKey>,
) -> Result<(AccountId, Command)> {
    let body: OpenAccountBody = parse(body, false)?;
    let id = match (addressed, body.account_id, key) {
        (Some(addressed), body_id, _) => {
            let id = addressed_account(addressed)?;
            same_account(body_id.as_ref(), &id)?;
            id
        }
        (None, Some(id), _) => id,
        // Without an id the key decides it, so a retried create finds the account it made.
        (None, None, Some(key)) => {
            addressed_account(&idempotency::derived_id("acc_", "open", key))?
        }
        (None, None, None) => addressed_account(&uuid::Uuid::now_v7().simple().to_string())?,
    };
    let command = Command::Open(OpenAccount {
        currency: body.currency,
        owner: text(body.owner),
        overdraft_limit: body.overdraft_limit,
        metadata: body.metadata,
    });
    Ok((id, command))
}

/// `deposit`: `{"amount", "reference"?}`.
pub fn deposit(body: &[u8]) -> Result<Command> {
    let body: MoneyMovement = parse(body, false)?;
    Ok(Command::Deposit {
        amount: body.amount,
        reference: text(body.reference),
        metadata: body.metadata,
    })
}

/// `withdraw`: `{"amount", "reference"?}`.
pub fn withdraw(body: &[u8]) -> Result<Command> {
    let body: MoneyMovement = parse(body, false)?;
    Ok(Command::Withdraw {
        amount: body.amount,
        reference: text(body.reference),
        metadata: body.metadata,
    })
}

/// `transfer`: HTTP `{"transfer_id"?, "from", "to", "amount", "reference"?}`; over NATS the
/// sender is the subject's account and `from` may be omitted. Without a `transfer_id` the server
/// makes a fresh one (the third value is then true): an `Idempotency-Key` retry is answered from
/// the key's marker, which holds the id of the first attempt, so the id is not derived from the
/// key (it would outlive the key's 24 hours and turn a later reuse of the key into a replay).
pub fn transfer(body: &[u8], addressed: Option<&str>) -> Result<(AccountId, Transfer, bool)> {
    let body: TransferBody = parse(body, false)?;
    let from = sender(body.from, addressed)?;
    let generated = body.transfer_id.is_none();
    let transfer = Transfer {
        transfer_id: body.transfer_id.map_or_else(fresh_id, Ok)?,
        to: body.to,
        amount: body.amount,
        reference: text(body.reference),
        metadata: body.metadata,
    };
    Ok((from, transfer, generated))
}

/// Default lifetime of a hold: one hour.
pub const HOLD_SECONDS_DEFAULT: i64 = 3_600;

/// `hold`: HTTP `{"hold_id"?, "from", "to", "amount", "expires_in_seconds"?, "reference"?}`; over
/// NATS the sender is the subject's account. Without a `hold_id` the server makes one (the third
/// value is then true), as for transfers.
pub fn hold(body: &[u8], addressed: Option<&str>) -> Result<(AccountId, PlaceHold, bool)> {
    let body: HoldBody = parse(body, false)?;
    let from = sender(body.from, addressed)?;
    let generated = body.hold_id.is_none();
    let hold = PlaceHold {
        hold_id: body.hold_id.map_or_else(fresh_id, Ok)?,
        to: body.to,
        amount: body.amount,
        expires_in_seconds: body.expires_in_seconds.0,
        reference: text(body.reference),
        metadata: body.metadata,
    };
    Ok((from, hold, generated))
}

/// `capture` over HTTP: `{"amount"?}` (the hold is in the path).
pub fn capture(body: &[u8], hold_id: &str) -> Result<Capture> {
    let body: CaptureBody = parse(body, true)?;
    Ok(Capture {
        hold_id: hold_reference(hold_id)?,
        amount: body.amount,
    })
}

/// `capture` over NATS: `{"hold_id", "amount"?}`.
pub fn capture_message(body: &[u8]) -> Result<Capture> {
    let body: CaptureMessage = parse(body, false)?;
    Ok(Capture {
        hold_id: body.hold_id,
        amount: body.amount,
    })
}

/// `void` over HTTP: an empty body or `{}` (the hold is in the path).
pub fn void(body: &[u8], hold_id: &str) -> Result<TransferId> {
    parse::<NoFields>(body, true)?;
    hold_reference(hold_id)
}

/// `void` over NATS: `{"hold_id"}`.
pub fn void_message(body: &[u8]) -> Result<TransferId> {
    let body: VoidMessage = parse(body, false)?;
    Ok(body.hold_id)
}

/// `transaction`: `{"transaction_id"?, "postings": [...], "reference"?}`, addressed to the first
/// posting's `from` (over NATS the subject's account must be it). Without a `transaction_id` the
/// server makes one (the third value is then true), as for transfers.
pub fn transaction(body: &[u8], addressed: Option<&str>) -> Result<(AccountId, Transaction, bool)> {
    let body: TransactionBody = parse(body, false)?;
    let postings: Vec<Posting> = body
        .postings
        .0
        .into_iter()
        .map(|posting| Posting {
            from: posting.from,
            to: posting.to,
            amount: posting.amount,
        })
        .collect();
    let first = postings
        .first()
        .map(|posting| posting.from.clone())
        .ok_or_else(|| invalid("postings: expected 1 to 64 postings, got 0"))?;
    if let Some(addressed) = addressed {
        let id = addressed_account(addressed)?;
        if id != first {
            return Err(invalid(format!(
                "postings[0].from {first} differs from {id} in the subject: a transaction is \
                 addressed to its first posting's sender"
            )));
        }
    }
    let generated = body.transaction_id.is_none();
    let transaction = Transaction {
        transaction_id: body.transaction_id.map_or_else(fresh_id, Ok)?,
        postings,
        reference: text(body.reference),
        reverses: None,
        metadata: body.metadata,
    };
    Ok((first, transaction, generated))
}

/// `reverse` of the transfer or transaction `original`: `{"reason"?}` or an empty body.
pub fn reverse(body: &[u8], original: &str) -> Result<(TransferId, Option<String>)> {
    let body: ReverseBody = parse(body, true)?;
    let original = TransferId::parse(original).map_err(|error| invalid(format!("id: {error}")))?;
    Ok((original, text(body.reason)))
}

/// `metadata`: `{"set"?, "unset"?}`.
pub fn change_metadata(body: &[u8]) -> Result<Command> {
    let body: MetadataBody = parse(body, false)?;
    if body.unset.len() > METADATA_ENTRIES_MAX {
        return Err(invalid(format!(
            "unset: at most {METADATA_ENTRIES_MAX} keys, got {}",
            body.unset.len()
        )));
    }
    Ok(Command::ChangeMetadata {
        set: body.set,
        unset: body
            .unset
            .into_iter()
            .map(domain::metadata::MetadataKey::into_string)
            .collect(),
    })
}

/// A fresh server-made id for a reversal.
pub fn reversal_id() -> Result<TransferId> {
    fresh_id()
}

/// Parses a hold id given in a path or body.
pub fn hold_reference(text: &str) -> Result<TransferId> {
    TransferId::parse(text).map_err(|error| invalid(format!("hold_id: {error}")))
}

/// `close`: an empty body or `{}`.
pub fn close(body: &[u8]) -> Result<Command> {
    parse::<NoFields>(body, true)?;
    Ok(Command::Close)
}

/// Parses a path or subject account id.
pub fn addressed_account(text: &str) -> Result<AccountId> {
    AccountId::parse(text).map_err(|error| invalid(error.to_string()))
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
            r#"{"amount":1e300}"#,
            r#"{"amount":0.5}"#,
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

    #[test]
    fn refusals_name_the_field_and_the_reason() {
        let detail = |result: Result<Command>| match result {
            Err(Error::InvalidRequest(detail)) => detail,
            other => panic!("accepted: {other:?}"),
        };
        let zero = detail(deposit(br#"{"amount":0}"#));
        assert!(
            zero.starts_with("amount: expected an integer from 1 to"),
            "{zero}"
        );
        assert!(!zero.contains("line"), "{zero}");
        let missing = detail(deposit(br#"{"reference":"x"}"#));
        assert!(missing.contains("missing field `amount`"), "{missing}");
        let twice = detail(deposit(br#"{"amount":1,"amount":2}"#));
        assert!(twice.contains("duplicate field `amount`"), "{twice}");
        let long = format!(r#"{{"amount":1,"reference":"{}"}}"#, "é".repeat(257));
        assert!(detail(deposit(long.as_bytes())).starts_with("reference: expected at most 256"));
        let not_object = detail(deposit(b"[1]"));
        assert!(not_object.contains("a JSON object"), "{not_object}");
        assert!(detail(deposit(b"{\"amount\":1} x")).starts_with("malformed JSON"));
        match transfer(br#"{"from":"a","to":"b.c","amount":1}"#, None) {
            Err(Error::InvalidRequest(detail)) => {
                assert!(
                    detail.starts_with("to: expected 1-64 characters"),
                    "{detail}"
                )
            }
            other => panic!("accepted: {other:?}"),
        }
        match hold(
            br#"{"from":"a","to":"b","amount":1,"expires_in_seconds":0}"#,
            None,
        ) {
            Err(Error::InvalidRequest(detail)) => {
                assert!(
                    detail.starts_with("expires_in_seconds: expected"),
                    "{detail}"
                )
            }
            other => panic!("accepted: {other:?}"),
        }
    }

    #[test]
    fn transactions_take_1_to_64_strict_postings() {
        let one = r#"{"postings":[{"from":"a","to":"b","amount":5}],"reference":"r"}"#;
        let (anchor, parsed, generated) = transaction(one.as_bytes(), None).unwrap();
        assert_eq!((anchor.as_str(), generated), ("a", true));
        assert_eq!(parsed.postings.len(), 1);
        assert!(transaction(one.as_bytes(), Some("a")).is_ok());
        assert!(transaction(one.as_bytes(), Some("b")).is_err());
        let posting = r#"{"from":"a","to":"b","amount":1}"#;
        for count in [0, 65] {
            let body = format!(r#"{{"postings":[{}]}}"#, vec![posting; count].join(","));
            match transaction(body.as_bytes(), None) {
                Err(Error::InvalidRequest(detail)) => {
                    assert!(detail.starts_with("postings: expected 1 to 64"), "{detail}")
                }
                other => panic!("{count} postings accepted: {other:?}"),
            }
        }
        let body = format!(r#"{{"postings":[{}]}}"#, vec![posting; 64].join(","));
        assert!(transaction(body.as_bytes(), None).is_ok());
        for bad in [
            r#"{"postings":[{"from":"a","to":"b","amount":0}]}"#,
            r#"{"postings":[{"from":"a","to":"b","amount":1,"memo":"x"}]}"#,
            r#"{"postings":[{"from":"a","amount":1}]}"#,
            r#"{"postings":[],"currency":"EUR"}"#,
            r#"{"postings":{"from":"a"}}"#,
        ] {
            assert!(transaction(bad.as_bytes(), None).is_err(), "{bad} accepted");
        }
        assert!(reverse(b"", "t-1").is_ok());
        assert!(reverse(br#"{"reason":"refund"}"#, "t-1").is_ok());
        assert!(reverse(br#"{"amount":1}"#, "t-1").is_err());
        assert!(reverse(b"{}", "bad.id").is_err());
    }

    #[test]
    fn what_the_schema_allows_is_accepted() {
        // 256 two-byte characters fit: the limit counts characters as JSON Schema does.
        let long = format!(r#"{{"amount":1,"reference":"{}"}}"#, "é".repeat(256));
        assert!(deposit(long.as_bytes()).is_ok());
        // Integral floats are integers in JSON Schema; optional fields may be null.
        assert!(matches!(
            deposit(br#"{"amount":912.0,"reference":null}"#),
            Ok(Command::Deposit { amount, reference: None, metadata: _ }) if amount.minor_units() == 912
        ));
        let (_, placed, generated) = hold(
            br#"{"from":"a","to":"b","amount":1,"expires_in_seconds":60.0,"hold_id":null}"#,
            None,
        )
        .unwrap();
        assert_eq!(placed.expires_in_seconds, 60);
        assert!(generated);
        let (_, open) = open(
            br#"{"currency":"EUR","overdraft_limit":0.0,"owner":null}"#,
            None,
            None,
        )
        .unwrap();
        assert!(matches!(
            open,
            Command::Open(OpenAccount { owner: None, .. })
        ));
        assert!(capture(b"", "h").is_ok());
        assert!(capture(br#"{"amount":null}"#, "h").is_ok());
    }
}

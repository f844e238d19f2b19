//! `Idempotency-Key`: a retry with the same key on the same account returns the first outcome and
//! appends nothing.
//!
//! How it holds across writers and restarts:
//! - A command that appends carries its key and a hash of its request in the event's headers
//!   (`Coffer-Idempotency-Key`, `Coffer-Request-Hash`). An account actor rebuilds the outcome of
//!   every keyed event of the last [`KEY_RETENTION`] from the stream, so whichever writer serves
//!   the retry answers as the first one did. A racing retry on another writer loses the
//!   optimistic-concurrency check, reloads, finds the key, and answers the same.
//! - Every keyed answer, success or refusal, is also stored in the JetStream KV bucket [`BUCKET`]
//!   with a [`KEY_RETENTION`] TTL: a refusal appends nothing, and an actor keeps only the last
//!   `KEYS_PER_ACCOUNT_MAX` keys in memory.
//! - The key also derives the event's `Nats-Msg-Id`, so the server drops a duplicate append.

use std::time::Duration;

use async_nats::jetstream::{self, kv};
use domain::{AccountId, Command, DomainError, TransferId};
use problem::Problem;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::outcome::Outcome;
use crate::{Error, Result};

/// How long a key is remembered: the contract promises at least 24 hours.
pub const KEY_RETENTION: Duration = Duration::from_secs(24 * 60 * 60);
/// Longest key accepted.
pub const KEY_LENGTH_MAX: usize = 128;
/// KV bucket of keyed answers.
pub const BUCKET: &str = "COFFER_IDEMPOTENCY";
/// KV bucket mapping each transfer id to the account that sent it, forever: transfer ids are
/// global (`GET /v1/transfers/{id}`), so a second sender may not reuse one.
pub const TRANSFER_IDS_BUCKET: &str = "COFFER_TRANSFER_IDS";

/// A validated `Idempotency-Key`: 1-128 printable ASCII characters.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct IdempotencyKey(String);

impl IdempotencyKey {
    pub fn parse(text: &str) -> Result<Self> {
        let printable = text.bytes().all(|byte| (0x20..=0x7e).contains(&byte));
        if !text.is_empty() && text.len() <= KEY_LENGTH_MAX && printable {
            Ok(Self(text.to_owned()))
        } else {
            Err(Error::InvalidRequest(format!(
                "Idempotency-Key must be 1-{KEY_LENGTH_MAX} printable ASCII characters"
            )))
        }
    }

    /// Parses an optional header value: absent is fine, present must be valid.
    pub fn parse_optional(text: Option<&str>) -> Result<Option<Self>> {
        text.map(Self::parse).transpose()
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

fn digest(parts: &[&str]) -> String {
    let mut hasher = Sha256::new();
    for part in parts {
        hasher.update(part.as_bytes());
        // A separator that cannot occur in ids keeps ("ab","c") and ("a","bc") apart.
        hasher.update([0u8]);
    }
    hex::encode(hasher.finalize())
}

/// The command id of a keyed command: stable across retries, so it can be the `Nats-Msg-Id`.
pub fn command_id(account: &AccountId, key: &IdempotencyKey) -> String {
    format!("key-{}", &digest(&[account.as_str(), key.as_str()])[..32])
}

/// A fingerprint of what was asked, to tell a retry from a reuse of the key for something else.
pub fn request_hash(account: &AccountId, command: &Command) -> String {
    digest(&[account.as_str(), &format!("{command:?}")])[..32].to_owned()
}

/// An id derived from a key, for creates without an explicit id: retrying the create with the
/// same key then addresses the same account or transfer instead of making a second one.
pub fn derived_id(prefix: &str, scope: &str, key: &IdempotencyKey) -> String {
    format!("{prefix}{}", &digest(&[scope, key.as_str()])[..26])
}

/// What the KV bucket holds for a keyed command: the answer it got.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Answer {
    request_hash: String,
    status: u16,
    body: serde_json::Value,
}

/// The KV record of keyed answers.
#[derive(Clone)]
pub struct AnswerStore {
    store: kv::Store,
}

impl AnswerStore {
    /// Creates the bucket if needed (idempotent).
    pub async fn open(context: &jetstream::Context, replicas: usize) -> Result<Self> {
        let store = match context.get_key_value(BUCKET).await {
            Ok(store) => store,
            Err(_) => context
                .create_key_value(kv::Config {
                    bucket: BUCKET.into(),
                    description: "First answers to keyed commands, by account and Idempotency-Key"
                        .into(),
                    history: 1,
                    max_age: KEY_RETENTION,
                    storage: jetstream::stream::StorageType::File,
                    num_replicas: replicas,
                    ..Default::default()
                })
                .await
                .map_err(|error| Error::Unavailable(format!("idempotency bucket: {error}")))?,
        };
        Ok(Self { store })
    }

    fn kv_key(account: &AccountId, key: &IdempotencyKey) -> String {
        format!("{account}.{}", &digest(&[key.as_str()])[..40])
    }

    /// The stored answer for this key, if any: the outcome or problem to repeat, or
    /// `IdempotencyKeyReused` when the key came with another request.
    pub async fn lookup(
        &self,
        account: &AccountId,
        key: &IdempotencyKey,
        request_hash: &str,
    ) -> Result<Option<Outcome>> {
        let entry = self
            .store
            .get(Self::kv_key(account, key))
            .await
            .map_err(|error| Error::Unavailable(format!("idempotency lookup: {error}")))?;
        let Some(bytes) = entry else {
            return Ok(None);
        };
        let answer: Answer = serde_json::from_slice(&bytes)
            .map_err(|error| Error::Internal(format!("corrupt idempotency record: {error}")))?;
        if answer.request_hash != request_hash {
            return Err(Error::IdempotencyKeyReused);
        }
        if answer.status >= 400 {
            let problem: Problem = serde_json::from_value(answer.body)
                .map_err(|error| Error::Internal(format!("corrupt idempotency record: {error}")))?;
            return Err(Error::Replayed(problem));
        }
        Ok(Some(Outcome::Replayed {
            status: answer.status,
            body: answer.body,
        }))
    }

    /// Remembers an answer. Best effort: a success is also recorded in the stream (and rebuilt
    /// from it), and a refusal changed nothing, so deciding a retry afresh is still safe.
    pub async fn remember(
        &self,
        account: &AccountId,
        key: &IdempotencyKey,
        request_hash: &str,
        answer: &Result<Outcome>,
    ) {
        let (status, body) = match answer {
            Ok(outcome) => (outcome.status(), outcome.body()),
            Err(error) => {
                let problem = error.problem();
                (
                    problem.status,
                    serde_json::to_value(&problem).unwrap_or_default(),
                )
            }
        };
        let record = Answer {
            request_hash: request_hash.to_owned(),
            status,
            body,
        };
        let Ok(bytes) = serde_json::to_vec(&record) else {
            return;
        };
        // `create`: the first answer is the one a retry gets, whoever writes second.
        match self
            .store
            .create(Self::kv_key(account, key), bytes.into())
            .await
        {
            Ok(_) => {}
            Err(error) if error.kind() == kv::CreateErrorKind::AlreadyExists => {}
            Err(error) => tracing::warn!(%account, %error, "could not remember a keyed answer"),
        }
    }
}

/// Claims of transfer ids by their senders.
#[derive(Clone)]
pub struct TransferIdClaims {
    store: kv::Store,
}

impl TransferIdClaims {
    /// Creates the bucket if needed (idempotent).
    pub async fn open(context: &jetstream::Context, replicas: usize) -> Result<Self> {
        let store = match context.get_key_value(TRANSFER_IDS_BUCKET).await {
            Ok(store) => store,
            Err(_) => context
                .create_key_value(kv::Config {
                    bucket: TRANSFER_IDS_BUCKET.into(),
                    description: "Transfer id -> sending account".into(),
                    history: 1,
                    storage: jetstream::stream::StorageType::File,
                    num_replicas: replicas,
                    ..Default::default()
                })
                .await
                .map_err(|error| Error::Unavailable(format!("transfer id bucket: {error}")))?,
        };
        Ok(Self { store })
    }

    /// Claims `transfer_id` for `sender`; succeeds again for the same sender (a retry).
    pub async fn claim(&self, transfer_id: &TransferId, sender: &AccountId) -> Result<()> {
        let unavailable = |error: String| Error::Unavailable(format!("transfer id claim: {error}"));
        match self
            .store
            .create(transfer_id.as_str(), sender.as_str().to_owned().into())
            .await
        {
            Ok(_) => Ok(()),
            Err(error) if error.kind() == kv::CreateErrorKind::AlreadyExists => {
                let owner = self
                    .store
                    .get(transfer_id.as_str())
                    .await
                    .map_err(|error| unavailable(error.to_string()))?;
                if owner.as_deref() == Some(sender.as_str().as_bytes()) {
                    Ok(())
                } else {
                    Err(Error::Rejected(DomainError::TransferIdReused(
                        transfer_id.clone(),
                    )))
                }
            }
            Err(error) => Err(unavailable(error.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_printable_ascii_up_to_128() {
        assert!(IdempotencyKey::parse("k1").is_ok());
        assert!(IdempotencyKey::parse(&"k".repeat(128)).is_ok());
        assert!(IdempotencyKey::parse(&"k".repeat(129)).is_err());
        assert!(IdempotencyKey::parse("").is_err());
        assert!(IdempotencyKey::parse("tab\tkey").is_err());
        assert!(IdempotencyKey::parse("ключ").is_err());
    }

    #[test]
    fn hashes_separate_accounts_and_requests() {
        let a = AccountId::parse("a").unwrap();
        let b = AccountId::parse("b").unwrap();
        let key = IdempotencyKey::parse("k").unwrap();
        assert_ne!(command_id(&a, &key), command_id(&b, &key));
        assert_eq!(command_id(&a, &key), command_id(&a, &key));
        let deposit = |units| Command::Deposit {
            amount: domain::Amount::new(units).unwrap(),
            reference: None,
        };
        assert_eq!(request_hash(&a, &deposit(5)), request_hash(&a, &deposit(5)));
        assert_ne!(request_hash(&a, &deposit(5)), request_hash(&a, &deposit(6)));
        let derived = derived_id("acc_", "open", &key);
        assert!(AccountId::parse(&derived).is_ok());
    }
}

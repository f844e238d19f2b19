//! Every way a command can fail, and its one mapping to problem+json.

use domain::DomainError;
use problem::Problem;

/// Seconds a client should wait before retrying after a 503.
const RETRY_AFTER_SECONDS: u32 = 1;

/// Serde: an account's owner answers a command handed to it with the error itself.
#[derive(Debug, Clone, thiserror::Error, serde::Serialize, serde::Deserialize)]
pub enum Error {
    /// The request itself is malformed or out of range.
    #[error("{0}")]
    InvalidRequest(String),
    /// A business rule refused the command; nothing was appended.
    #[error(transparent)]
    Rejected(#[from] DomainError),
    /// A business rule refused a posting of a transaction or reversal; nothing was appended.
    #[error("{}", .0)]
    PostingRejected(domain::PostingRefusal),
    /// A reversal named a transfer that does not exist (or is a hold).
    #[error("no transfer {0}")]
    TransferNotFound(String),
    /// A reversal named a transaction that does not exist.
    #[error("no transaction {0}")]
    TransactionNotFound(String),
    /// The idempotency key (or the transfer id) was first used with a different request.
    #[error("the Idempotency-Key or transfer id was already used with a different request")]
    IdempotencyKeyReused,
    /// A retried request whose first outcome was a refusal: answered as it was then.
    #[error("{}", .0.detail)]
    Replayed(Problem),
    /// NATS is unreachable or the writer is overloaded; nothing was appended.
    #[error("{0}")]
    Unavailable(String),
    /// The append was sent but not acknowledged: it may or may not have happened.
    #[error("{0}")]
    OutcomeUnknown(String),
    /// Another writer kept winning the race for this account.
    #[error("gave up after {0} concurrent-update retries")]
    TooManyConflicts(usize),
    /// A flow lost races for the other accounts it appends to (listed) again and again, and
    /// nothing of it was stored: the dispatcher hands it to the writer that owns one of them.
    /// Never an answer.
    #[error("kept losing races for accounts {0:?} to their owner")]
    Contended(Vec<domain::AccountId>),
    /// The account's history holds a message that cannot be read as an event (malformed, or of
    /// a newer version than this build): nothing can be decided on it until an operator acts.
    /// Other accounts are not affected.
    #[error("{0}")]
    AccountUnreadable(String),
    #[error("internal error: {0}")]
    Internal(String),
    /// Settings that contradict each other: the writer refuses to start.
    #[error("invalid configuration: {0}")]
    Config(String),
}

/// The event log's errors as a command sees them: a conflict that reaches an answer means the
/// retries ran out; anything unexpected is internal.
impl From<eventlog::Error> for Error {
    fn from(error: eventlog::Error) -> Self {
        match error {
            eventlog::Error::Unavailable(detail) => Error::Unavailable(detail),
            eventlog::Error::OutcomeUnknown(detail) => Error::OutcomeUnknown(detail),
            eventlog::Error::Conflict { .. } | eventlog::Error::Duplicate(_) => {
                Error::TooManyConflicts(0)
            }
            eventlog::Error::Untrusted(detail) => Error::AccountUnreadable(format!(
                "{detail}; commands that need it are refused until an operator repairs it \
                 (docs/operations.md, \"CofferSignatureInvalid\")"
            )),
            eventlog::Error::Unreadable(unreadable) => Error::AccountUnreadable(format!(
                "{unreadable}; this account's commands are refused until an operator repairs \
                 it (docs/operations.md, \"An unreadable event\")"
            )),
            other => Error::Internal(other.to_string()),
        }
    }
}

impl Error {
    /// Whether this is a business refusal (decided on state that may be stale).
    pub fn is_refusal(&self) -> bool {
        matches!(self, Error::Rejected(_) | Error::PostingRejected(_))
    }

    pub fn problem(&self) -> Problem {
        let detail = self.to_string();
        match self {
            Error::InvalidRequest(_) => Problem::invalid_request(detail),
            Error::Rejected(rejection) => rejected(rejection, detail),
            Error::PostingRejected(refusal) => Problem {
                posting: u16::try_from(refusal.posting).ok(),
                ..rejected(&refusal.error, detail)
            },
            Error::TransferNotFound(_) => Problem::not_found("transfer_not_found", detail),
            Error::TransactionNotFound(_) => Problem::not_found("transaction_not_found", detail),
            Error::IdempotencyKeyReused => {
                Problem::new(409, "idempotency_key_reused", "Idempotency key reused", detail)
            }
            Error::Replayed(problem) => problem.clone(),
            Error::Unavailable(_) | Error::TooManyConflicts(_) | Error::Contended(_) => {
                Problem::unavailable("unavailable", detail, RETRY_AFTER_SECONDS)
            }
            Error::OutcomeUnknown(_) => Problem::unavailable(
                "outcome_unknown",
                format!("{detail}; the command may or may not have been applied, retry with the same Idempotency-Key"),
                RETRY_AFTER_SECONDS,
            ),
            Error::AccountUnreadable(_) => {
                Problem::new(500, "account_unreadable", "Account unreadable", detail)
            }
            Error::Internal(_) | Error::Config(_) => {
                Problem::new(500, "internal", "Internal error", detail)
            }
        }
    }
}

fn rejected(rejection: &DomainError, detail: String) -> Problem {
    let (status, code, title) = match rejection {
        DomainError::AccountNotFound(_) => (404, "account_not_found", "Account not found"),
        DomainError::AccountExists => (409, "account_exists", "Account exists"),
        DomainError::AccountClosed(_) => (409, "account_closed", "Account closed"),
        DomainError::CurrencyMismatch { .. } => (409, "currency_mismatch", "Currency mismatch"),
        DomainError::InsufficientFunds { .. } => (422, "insufficient_funds", "Insufficient funds"),
        DomainError::BalanceOverflow(_) => (422, "balance_overflow", "Balance overflow"),
        DomainError::BalanceNotZero { .. } => (422, "balance_not_zero", "Balance not zero"),
        DomainError::SameAccount => (422, "same_account", "Same account"),
        DomainError::HoldNotFound(_) => (404, "hold_not_found", "Hold not found"),
        DomainError::HoldSettled(_) => (409, "hold_settled", "Hold settled"),
        DomainError::AmountExceedsHold { .. } => {
            (422, "amount_exceeds_hold", "Amount exceeds hold")
        }
        DomainError::HoldsOpen { .. } => (422, "holds_open", "Holds open"),
        // Only the system expires holds; a hold not yet due is retried later, never shown.
        DomainError::HoldNotDue { .. } => (409, "hold_not_due", "Hold not due"),
        // The request parser refuses these first; the domain's own check answers the same.
        DomainError::PostingCount { .. } => (400, "invalid_request", "Invalid request"),
        DomainError::AlreadyReversed { .. } => (409, "already_reversed", "Already reversed"),
        // The bound applies to the account's metadata after the change: still a bad request.
        DomainError::MetadataFull { .. } => (400, "invalid_request", "Invalid request"),
    };
    Problem::new(status, code, title, detail)
}

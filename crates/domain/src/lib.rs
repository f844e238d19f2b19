//! The ledger's rules, free of IO.
//!
//! # Layout
//! - [`values`]: validated newtypes (account id, transfer id, currency, amount, overdraft limit).
//! - [`account`]: the account aggregate: its [`Command`]s, [`Transfer`]s, [`Event`]s,
//!   [`AccountState`], and the pure functions [`decide`], [`decide_transfer`] and [`evolve`].
//! - [`metadata`]: the caller's bounded labels on accounts and movements.
//! - [`flow`]: money flows: every movement between accounts (transfer, capture, multi-posting
//!   transaction, reversal) is a list of [`Posting`]s decided by [`decide_postings`].
//!
//! Nothing here knows about time, NATS, MessagePack, HTTP or storage: the adapters translate at the
//! edges. A single-account command yields one event; a transfer yields one event on each of its two
//! accounts, which the event log commits in one atomic batch guarded by both accounts'
//! optimistic-concurrency checks (see `ARCHITECTURE.md`).

pub mod account;
pub mod flow;
pub mod metadata;
pub mod values;

pub use account::{
    decide, decide_capture, decide_hold, decide_import, decide_release, decide_transfer, evolve,
    replay, AccountState, Capture, Command, DomainError, Event, OpenAccount, PlaceHold, Release,
    Transfer, TransferEvents,
};
pub use flow::{
    decide_postings, decide_transaction, reverse, Leg, Movement, Posting, PostingRefusal,
    Transaction, POSTINGS_MAX,
};
pub use metadata::Metadata;
pub use values::{AccountId, Amount, Currency, OverdraftLimit, TransferId, ValueError};

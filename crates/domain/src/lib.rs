//! The ledger's rules, free of IO.
//!
//! # Layout
//! - [`values`]: validated newtypes (account id, transfer id, currency, amount, overdraft limit).
//! - [`account`]: the account aggregate: its [`Command`]s, [`Event`]s, [`AccountState`], and the two
//!   pure functions [`decide`] and [`evolve`].
//!
//! Nothing here knows about time, NATS, MessagePack, HTTP or storage: the adapters translate at the
//! edges. Every command yields at most one event, which lets the event log append it with a single
//! optimistic-concurrency check (see `ARCHITECTURE.md`).

pub mod account;
pub mod values;

pub use account::{decide, evolve, replay, AccountState, Command, DomainError, Event, OpenAccount};
pub use values::{AccountId, Amount, Currency, OverdraftLimit, TransferId, ValueError};

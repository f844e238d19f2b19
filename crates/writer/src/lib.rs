//! The command side of Coffer.
//!
//! # Layout
//! - [`request`]: parsing JSON bodies (HTTP and NATS alike) into validated domain commands.
//! - [`outcome`]: what a successful command answers, and how it is rendered.
//! - [`error`]: [`Error`], every way a command can fail, mapped once to problem+json.
//! - [`idempotency`]: exactly-once answers: `Idempotency-Key` and transfer-id markers, request
//!   hashes.
//! - [`import`]: `coffer import`: accounts from another system with their opening balances.
//! - [`actor`]: the per-account actor: gathers the states a command reads, has it decided
//!   ([`plan`]), appends the plan atomically with the markers (`commit`), retries a lost race
//!   holding its accounts, replies.
//! - [`plan`]: a command's decision as data: the messages to append and the answer.
//! - [`states`]: the account states the actors share; [`loading`]: bringing them up to date.
//! - [`expiry`]: hold expiry: due messages the stream schedules, on a consumer all writers share.
//! - [`registry`]: spawns, caps, passivates and supervises account actors; deadlines.
//! - [`ownership`]: one owner per account across writers: partitions, leases, rendezvous.
//! - [`dispatch`]: runs a command here or hands it to its account's owner over NATS.
//! - [`bulk`]: bulk submission: many commands in one request, each run as if sent alone.
//! - [`http`] and [`nats_api`]: the two command APIs, thin adapters over
//!   [`dispatch::Dispatcher`].
//! - [`openapi`]: the command API's part of the OpenAPI document, built from the same code.
//! - [`service`]: wiring, readiness and graceful shutdown.

pub mod actor;
pub mod bulk;
pub mod dispatch;
pub mod error;
pub mod expiry;
pub mod http;
pub mod idempotency;
pub mod import;
pub mod loading;
pub mod metrics;
pub mod nats_api;
pub mod nats_store;
pub mod openapi;
pub mod outcome;
pub mod ownership;
pub mod plan;
pub mod registry;
pub mod request;
pub mod service;
pub mod states;

pub use error::Error;
pub use service::{run, WriterConfig};

pub type Result<T, E = Error> = std::result::Result<T, E>;

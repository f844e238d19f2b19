//! The query side of Coffer.
//!
//! # Layout
//! - [`views`]: the account, statement and transfer views: pure folds plus the redb code that
//!   stores them, run by the `projection` engine.
//! - [`http`]: the query API, with read-your-writes waits on the applied position.
//! - [`answers`]: the response bodies, built from view rows.
//! - [`openapi`]: the query API's OpenAPI document and problem responses.
//! - [`served`]: the view being served and the position responses state.
//! - [`rebuild`]: blue/green rebuild of the views beside the serving one.
//! - [`service`]: wiring, readiness and graceful shutdown.
//!
//! Reads come from the local redb file only, so they keep working while NATS or the writers are
//! down; they are as fresh as the last applied position, which every response states.

pub mod answers;
pub mod http;
pub mod openapi;
pub mod rebuild;
pub mod served;
pub mod service;
pub mod storage;
pub mod stream_end;
pub mod views;

pub use service::{run, ReaderConfig};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("view storage: {0}")]
    Storage(String),
    #[error(transparent)]
    Projection(#[from] projection::Error),
    #[error("startup: {0}")]
    Startup(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

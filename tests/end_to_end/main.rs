//! End-to-end tests across real nats-server and `coffer` processes (build the binary first:
//! `cargo build -p coffer`, which `just test` does).
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod account_cli;
mod auth;
mod bank;
mod bulk;
mod cluster;
mod decode;
mod holds;
mod http_limits;
mod import;
mod integrity;
mod listing;
mod ownership;
mod permissions;
mod reader;
mod rebuild;
mod storage;
mod support;
mod tail;
mod tls;
mod traces;

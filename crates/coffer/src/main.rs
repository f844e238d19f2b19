//! `coffer`: the one binary. Thin: parse configuration, set up logging, run a subcommand until
//! SIGTERM or Ctrl-C.

use std::io::Read;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Small blocks to mimalloc, large ones to glibc, and glibc alone in a reader: chosen by
/// measurement ([`allocator`]).
#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: allocator::SizeSplit = allocator::SizeSplit;

mod account;
mod reader_api;
mod telemetry;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use eventlog::{NatsSettings, StreamSettings};

#[derive(Parser)]
#[command(
    name = "coffer",
    version,
    about = "Event-sourced account ledger on NATS JetStream"
)]
struct Cli {
    #[command(subcommand)]
    command: Commands,
}

#[derive(Subcommand)]
enum Commands {
    /// Command side: account actors, atomic transfers, HTTP and NATS command APIs.
    Writer(WriterArgs),
    /// Query side: projections in redb served over HTTP.
    Reader(ReaderArgs),
    /// Reads one MessagePack event payload on stdin and prints it as JSON
    /// (for `nats sub 'coffer.events.>' --translate 'coffer decode'`).
    Decode,
    /// Prints the OpenAPI document of both HTTP APIs (also in docs/openapi.json).
    Openapi,
    /// Recomputes the hash chains (`Coffer-Chain`) from the stream and prints, per broken
    /// account, the first position that does not match; exits 1 if any.
    Verify(VerifyArgs),
    /// Operator views of the event log.
    Events {
        #[command(subcommand)]
        command: EventsCommand,
    },
    /// Imports accounts from another system with their balances (CSV with the header
    /// `account_id,currency,balance[,owner][,overdraft_limit]`, or JSON lines): each opens its
    /// account and books an `opening_balance`; re-running the same file appends nothing.
    Import(ImportArgs),
    /// Open accounts, move money and show balances from a terminal: writes over NATS, reads
    /// from a reader's HTTP API, `--output table|json`.
    Account {
        #[command(subcommand)]
        command: account::AccountCommand,
    },
    /// Creates or updates what the services use (streams COFFER_EVENTS and COFFER_SCHEDULES,
    /// the writers' shared hold-expiry consumer) without weakening what exists; run it with
    /// the setup role when the services' NATS users may not (a Kubernetes Job). Idempotent.
    Setup(SetupArgs),
    /// Operator views of a reader's projection.
    Projection {
        #[command(subcommand)]
        command: ProjectionCommand,
    },
    /// Signing keys: what writers sign appended events and snapshots with, so that a NATS
    /// credential alone cannot forge the ledger (docs/security.md).
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Generates an Ed25519 signing key: writes it to FILE (mode 0600; refuses to overwrite)
    /// and prints its trusted-keys line (`KEY_ID HEX_PUBLIC_KEY`) for COFFER_TRUSTED_KEYS_FILE.
    Generate {
        /// The key's id, named in every signature it makes (1-64 of A-Z a-z 0-9 . _ -).
        #[arg(long = "key-id")]
        key_id: String,
        /// Where to write the signing key.
        #[arg(long = "out")]
        out: PathBuf,
    },
}

/// Signature keys of the services that read or write the ledger.
#[derive(Args, Clone)]
struct TrustArgs {
    /// The trusted writers' public keys (lines `KEY_ID HEX_PUBLIC_KEY [until=POSITION]`, and
    /// optionally `unsigned-until POSITION`): every event must carry a valid signature by one
    /// of them, or its account is refused (`account_unreadable`). Unset: not checked.
    #[arg(long = "trusted-keys-file", env = "COFFER_TRUSTED_KEYS_FILE")]
    trusted_keys_file: Option<PathBuf>,
}

impl TrustArgs {
    fn trusted_keys(&self) -> anyhow::Result<Option<std::sync::Arc<eventlog::TrustedKeys>>> {
        let Some(path) = &self.trusted_keys_file else {
            return Ok(None);
        };
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("read COFFER_TRUSTED_KEYS_FILE {}", path.display()))?;
        let keys = eventlog::TrustedKeys::parse(&text)
            .with_context(|| format!("COFFER_TRUSTED_KEYS_FILE {}", path.display()))?;
        Ok(Some(std::sync::Arc::new(keys)))
    }
}

/// The key a process that appends events signs them with.
#[derive(Args, Clone)]
struct SigningArgs {
    /// This writer's signing key (`coffer keys generate`): a line `KEY_ID HEX_SEED`. Unset:
    /// events are not signed (and the writer may not check signatures either).
    #[arg(long = "signing-key-file", env = "COFFER_SIGNING_KEY_FILE")]
    signing_key_file: Option<PathBuf>,
    #[command(flatten)]
    trust: TrustArgs,
}

impl SigningArgs {
    /// The signing key and the trusted keys, refusing a key the trusted set does not list:
    /// what this process appends would be refused by everyone else.
    #[allow(clippy::type_complexity)]
    fn keys(
        &self,
    ) -> anyhow::Result<(
        Option<std::sync::Arc<eventlog::SigningKey>>,
        Option<std::sync::Arc<eventlog::TrustedKeys>>,
    )> {
        let signing = match &self.signing_key_file {
            None => None,
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("read COFFER_SIGNING_KEY_FILE {}", path.display()))?;
                Some(std::sync::Arc::new(
                    eventlog::SigningKey::parse(&text)
                        .with_context(|| format!("COFFER_SIGNING_KEY_FILE {}", path.display()))?,
                ))
            }
        };
        let trusted = self.trust.trusted_keys()?;
        eventlog::signing::check_pair(signing.as_deref(), trusted.as_deref())?;
        Ok((signing, trusted))
    }

    /// `log` signing what it appends and checking what it loads, as configured.
    fn apply(&self, log: eventlog::EventLog) -> anyhow::Result<eventlog::EventLog> {
        let (signing, trusted) = self.keys()?;
        let log = match signing {
            Some(key) => log.with_signer(key),
            None => log,
        };
        Ok(match trusted {
            Some(keys) => log.with_trusted_keys(keys),
            None => log,
        })
    }
}

/// `coffer keys generate`.
fn generate_key(key_id: &str, out: &std::path::Path) -> anyhow::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).map_err(|error| anyhow::anyhow!("no random source: {error}"))?;
    let key = eventlog::SigningKey::from_seed(key_id, seed)?;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(out)
        .with_context(|| format!("create {}", out.display()))?;
    writeln!(
        file,
        "# Coffer signing key {key_id}: keep it secret (COFFER_SIGNING_KEY_FILE)\n{}",
        key.secret_line()
    )
    .with_context(|| format!("write {}", out.display()))?;
    println!("{}", key.public_line());
    Ok(())
}

#[derive(Args)]
struct SetupArgs {
    #[command(flatten)]
    nats: NatsArgs,
    /// Move an event stream made with per-message TTLs (before this build) onto one without,
    /// keeping every event's position and time. Stop the writers first: the stream is sealed
    /// while it is copied. Resumable: run it again if it stopped. See docs/operations.md.
    #[arg(long)]
    remove_message_ttl: bool,
    /// With --remove-message-ttl: seconds to wait between a copy found complete and deleting
    /// what it copied, so that servers not running with `sync_interval: always` (the shipped
    /// configurations do) have written the copy to disk. Longer than their sync_interval.
    #[arg(long, default_value_t = 130)]
    settle_seconds: u64,
}

#[derive(Args)]
struct ImportArgs {
    #[command(flatten)]
    nats: NatsArgs,
    #[command(flatten)]
    signing: SigningArgs,
    /// The file to import.
    file: PathBuf,
    /// Batches (of up to 400 rows) written at once.
    #[arg(long, default_value_t = 4)]
    concurrency: usize,
}

#[derive(Subcommand)]
enum ProjectionCommand {
    /// How far a reader's view is: applied position, the stream's end, lag in events and
    /// seconds, from its durable consumer (no need to reach the reader itself).
    Status(StatusArgs),
    /// Builds a fresh view from position 0 beside the serving one, on the reader itself, with
    /// a progress bar, and swaps it in when caught up (no read fails or goes back meanwhile).
    /// Reaches the reader over its HTTP API (`POST /v1/projection/rebuild`, behind its token).
    Rebuild(RebuildArgs),
}

#[derive(Args)]
struct RebuildArgs {
    #[command(flatten)]
    reader: reader_api::ReaderAccess,
    /// Start the rebuild and return at once (follow it with `GET /v1/projection/rebuild`).
    #[arg(long)]
    no_wait: bool,
}

#[derive(Args)]
struct StatusArgs {
    #[command(flatten)]
    nats: NatsArgs,
    /// The reader's durable consumer name (its `COFFER_READER_NAME`).
    #[arg(
        long = "reader-name",
        env = "COFFER_READER_NAME",
        default_value = "reader"
    )]
    reader_name: String,
}

#[derive(Subcommand)]
enum EventsCommand {
    /// Prints events as JSON lines, in stream order (an ordered consumer: no state on the
    /// server, any number of users at once).
    Tail(TailArgs),
}

#[derive(Args)]
struct TailArgs {
    #[command(flatten)]
    nats: NatsArgs,
    /// Only this account's events.
    #[arg(long)]
    account: Option<String>,
    /// Only events of this type (e.g. `deposited`).
    #[arg(long = "type")]
    event_type: Option<String>,
    /// Start at this position (default: the beginning of the stream).
    #[arg(long)]
    from_position: Option<u64>,
    /// Keep printing new events as they are committed (default: stop at the end).
    #[arg(long)]
    follow: bool,
}

#[derive(Args)]
struct VerifyArgs {
    #[command(flatten)]
    nats: NatsArgs,
    #[command(flatten)]
    trust: TrustArgs,
    /// Verify one account only (default: the whole stream, with a progress bar).
    #[arg(long)]
    account: Option<String>,
}

#[derive(Args, Clone)]
struct NatsArgs {
    /// NATS server URL(s), comma-separated.
    #[arg(
        long = "nats-url",
        env = "COFFER_NATS_URL",
        default_value = "nats://127.0.0.1:4222"
    )]
    url: String,
    #[arg(long = "nats-user", env = "COFFER_NATS_USER")]
    user: Option<String>,
    #[arg(
        long = "nats-password",
        env = "COFFER_NATS_PASSWORD",
        hide_env_values = true
    )]
    password: Option<String>,
    /// The password, read from a file (a mounted Secret); used when --nats-password is not
    /// given. Kubernetes readers name their own: each replica is its own NATS user.
    #[arg(long = "nats-password-file", env = "COFFER_NATS_PASSWORD_FILE")]
    password_file: Option<PathBuf>,
    #[arg(long = "nats-token", env = "COFFER_NATS_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Credentials file (JWT and NKey seed).
    #[arg(long = "nats-creds", env = "COFFER_NATS_CREDS")]
    creds: Option<PathBuf>,
    /// CA certificate for TLS to NATS (enables TLS).
    #[arg(long = "nats-tls-ca", env = "COFFER_NATS_TLS_CA")]
    tls_ca: Option<PathBuf>,
    /// Client certificate for mutual TLS.
    #[arg(long = "nats-tls-cert", env = "COFFER_NATS_TLS_CERT")]
    tls_cert: Option<PathBuf>,
    /// Client key for mutual TLS.
    #[arg(long = "nats-tls-key", env = "COFFER_NATS_TLS_KEY")]
    tls_key: Option<PathBuf>,
    /// Prefix of this client's reply inboxes (each role its own, e.g. `_INBOX_writer`, so
    /// permissions keep other users' replies private).
    #[arg(long = "nats-inbox-prefix", env = "COFFER_NATS_INBOX_PREFIX")]
    inbox_prefix: Option<String>,
    /// Replicas of the event stream and buckets: 1 on one node, 3 in a cluster.
    #[arg(
        long = "stream-replicas",
        env = "COFFER_STREAM_REPLICAS",
        default_value_t = 1
    )]
    stream_replicas: usize,
    /// Server-side duplicate window of the event stream, in seconds.
    #[arg(
        long = "duplicate-window-seconds",
        env = "COFFER_DUPLICATE_WINDOW_SECONDS",
        default_value_t = 120
    )]
    duplicate_window_seconds: u64,
}

impl NatsArgs {
    fn settings(&self, client_name: &str) -> anyhow::Result<NatsSettings> {
        let password = match (&self.password, &self.password_file) {
            (Some(password), _) => Some(password.clone()),
            (None, Some(path)) => Some(
                std::fs::read_to_string(path)
                    .with_context(|| format!("read the NATS password from {}", path.display()))?
                    .trim()
                    .to_owned(),
            ),
            (None, None) => None,
        };
        Ok(NatsSettings {
            url: self.url.clone(),
            user: self.user.clone(),
            password,
            token: self.token.clone(),
            creds_file: self.creds.clone(),
            tls_ca: self.tls_ca.clone(),
            tls_cert: self.tls_cert.clone(),
            tls_key: self.tls_key.clone(),
            client_name: client_name.into(),
            inbox_prefix: self.inbox_prefix.clone(),
        })
    }

    fn stream(&self) -> StreamSettings {
        StreamSettings {
            replicas: self.stream_replicas,
            duplicate_window: Duration::from_secs(self.duplicate_window_seconds),
            ..StreamSettings::default()
        }
    }
}

#[derive(Args)]
struct WriterArgs {
    #[command(flatten)]
    nats: NatsArgs,
    /// Address of the HTTP command API.
    #[arg(
        long = "http-addr",
        env = "COFFER_HTTP_ADDR",
        default_value = "127.0.0.1:8080"
    )]
    http_address: SocketAddr,
    /// Most account actors kept in memory.
    #[arg(long, env = "COFFER_ACTORS_MAX", default_value_t = 10_000)]
    actors_max: usize,
    /// Seconds an idle account actor is kept.
    #[arg(long, env = "COFFER_ACTOR_IDLE_SECONDS", default_value_t = 300)]
    actor_idle_seconds: u64,
    /// Commands queued per account before 503.
    #[arg(long, env = "COFFER_MAILBOX_CAPACITY", default_value_t = 1_000)]
    mailbox_capacity: usize,
    /// Most messages in one group-commit batch (appends of many accounts in one atomic
    /// batch); 1 sends every append on its own.
    #[arg(long, env = "COFFER_GROUP_COMMIT_MESSAGES_MAX", default_value_t = 1_000,
        value_parser = clap::value_parser!(u16).range(1..=1000))]
    group_commit_messages_max: u16,
    /// Snapshot an account every this many of its events, so a long history loads fast (0:
    /// never).
    #[arg(long, env = "COFFER_SNAPSHOT_EVERY", default_value_t = 1_000)]
    snapshot_every: u64,
    /// Most group-commit batches awaiting their acknowledgement at once.
    #[arg(long, env = "COFFER_GROUP_COMMIT_IN_FLIGHT_MAX", default_value_t = 1,
        value_parser = clap::value_parser!(u8).range(1..=32))]
    group_commit_in_flight_max: u8,
    /// Longest a group-commit batch waits, after the previous one is acknowledged, for the
    /// commands of the callers just answered, in microseconds (0: send what has queued at once).
    #[arg(long, env = "COFFER_GROUP_COMMIT_FILL_WAIT_US",
        default_value_t = eventlog::group_commit::FILL_WAIT_DEFAULT.as_micros() as u64,
        value_parser = clap::value_parser!(u64).range(0..=100_000))]
    group_commit_fill_wait_us: u64,
    /// A group-commit batch waiting to fill goes once no command has arrived for this many
    /// microseconds.
    #[arg(long, env = "COFFER_GROUP_COMMIT_FILL_QUIET_US",
        default_value_t = eventlog::group_commit::FILL_QUIET_DEFAULT.as_micros() as u64,
        value_parser = clap::value_parser!(u64).range(0..=100_000))]
    group_commit_fill_quiet_us: u64,
    /// A command's deadline in milliseconds: it is not started, and nothing is appended for it,
    /// later; its caller then answers `outcome_unknown`.
    #[arg(long, env = "COFFER_COMMAND_DEADLINE_MS", default_value_t = 10_000)]
    command_deadline_ms: u64,
    /// One owner per account across writers: accounts hash to 64 partitions leased to writers
    /// in the COFFER_OWNERS bucket, and a command reaching another writer is handed to the
    /// owner. Off (false): every writer decides for any account and the stream arbitrates.
    #[arg(long, env = "COFFER_OWNERSHIP", default_value_t = true, action = clap::ArgAction::Set)]
    ownership: bool,
    /// This writer's name in the owners bucket (default: the host name); a random suffix per
    /// process is added. 1-55 characters of A-Z a-z 0-9 _ -.
    #[arg(long, env = "COFFER_WRITER_NAME")]
    writer_name: Option<String>,
    /// Most queued deposits and withdrawals (without an Idempotency-Key) of one account decided
    /// together and appended in one atomic batch; 1 decides and appends each alone.
    #[arg(long, env = "COFFER_ACCOUNT_BATCH_MAX", default_value_t = 100,
        value_parser = clap::value_parser!(u16).range(1..=1000))]
    account_batch_max: u16,
    /// How long after a hold's expiry the backstop expires it if its scheduled expiry never
    /// came (a lost or late due message), in milliseconds.
    #[arg(long, env = "COFFER_HOLD_BACKSTOP_DELAY_MS", default_value_t = 90_000,
        value_parser = clap::value_parser!(u64).range(1_000..=86_400_000))]
    hold_backstop_delay_ms: u64,
    /// The NATS servers' monitoring addresses, comma-separated (`http://nats-0:8222,...`): their
    /// `/varz` is read every 15 s for the JetStream store's use and limit, exported as
    /// `coffer_writer_nats_store_used_bytes` and `_limit_bytes` per server. Unset: not read.
    #[arg(long, env = "COFFER_NATS_MONITOR_URLS", default_value = "")]
    nats_monitor_urls: String,
    /// Failpoint for tests: every command waits this long in its actor first.
    #[arg(long, env = "COFFER_FAILPOINT_ACTOR_DELAY_MS", hide = true)]
    failpoint_actor_delay_ms: Option<u64>,
    #[command(flatten)]
    token: TokenArgs,
    #[command(flatten)]
    limits: HttpLimitsArgs,
    #[command(flatten)]
    signing: SigningArgs,
}

/// Limits of an HTTP API.
#[derive(Args)]
struct HttpLimitsArgs {
    /// Connections served at once; more wait in the listen backlog.
    #[arg(long, env = "COFFER_HTTP_MAX_CONNECTIONS", default_value_t = 4_096,
        value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    http_max_connections: u32,
    /// Time to receive a request's headers (slow clients are cut off).
    #[arg(long, env = "COFFER_HTTP_HEADER_TIMEOUT_MS", default_value_t = 10_000,
        value_parser = clap::value_parser!(u64).range(1..=3_600_000))]
    http_header_timeout_ms: u64,
    /// Time to receive a request's body: then 408.
    #[arg(long, env = "COFFER_HTTP_BODY_TIMEOUT_MS", default_value_t = 10_000,
        value_parser = clap::value_parser!(u64).range(1..=3_600_000))]
    http_body_timeout_ms: u64,
    /// Time for a request until its command is taken: then 408 (nothing was done). A writer
    /// needs it longer than the command deadline + 5.5 s, the longest a taken command's answer
    /// may take after it.
    #[arg(long, env = "COFFER_HTTP_REQUEST_TIMEOUT_MS", default_value_t = 30_000,
        value_parser = clap::value_parser!(u64).range(1..=3_600_000))]
    http_request_timeout_ms: u64,
}

impl HttpLimitsArgs {
    fn limits(&self) -> problem::HttpLimits {
        problem::HttpLimits {
            max_connections: self.http_max_connections as usize,
            header_read_timeout: Duration::from_millis(self.http_header_timeout_ms),
            body_read_timeout: Duration::from_millis(self.http_body_timeout_ms),
            request_timeout: Duration::from_millis(self.http_request_timeout_ms),
            // Within the contract's 10 s for a SIGTERM, with room for the rest of the stop.
            drain_timeout: Duration::from_secs(7),
        }
    }
}

/// The HTTP API's bearer token.
#[derive(Args)]
struct TokenArgs {
    /// Require `Authorization: Bearer <token>` on the API (probes and metrics stay open).
    #[arg(long = "http-token", env = "COFFER_HTTP_TOKEN", hide_env_values = true)]
    http_token: Option<String>,
    /// The same, read from a file (a mounted Secret); used when --http-token is not given.
    #[arg(long = "http-token-file", env = "COFFER_HTTP_TOKEN_FILE")]
    http_token_file: Option<PathBuf>,
}

impl TokenArgs {
    fn token(&self) -> anyhow::Result<Option<problem::BearerToken>> {
        let Some(text) = token_text(self.http_token.as_deref(), self.http_token_file.as_deref())?
        else {
            return Ok(None);
        };
        problem::BearerToken::new(&text)
            .map(Some)
            .context("the HTTP token is empty")
    }
}

/// A bearer token given as text, or else read from a file (a mounted Secret); trimmed.
fn token_text(
    token: Option<&str>,
    file: Option<&std::path::Path>,
) -> anyhow::Result<Option<String>> {
    let text = match (token, file) {
        (Some(token), _) => token.to_owned(),
        (None, Some(path)) => std::fs::read_to_string(path)
            .with_context(|| format!("read the HTTP token from {}", path.display()))?,
        (None, None) => return Ok(None),
    };
    Ok(Some(text.trim().to_owned()))
}

#[derive(Args)]
struct ReaderArgs {
    #[command(flatten)]
    nats: NatsArgs,
    /// Address of the HTTP query API.
    #[arg(
        long = "http-addr",
        env = "COFFER_HTTP_ADDR",
        default_value = "127.0.0.1:8081"
    )]
    http_address: SocketAddr,
    /// Directory of the redb views.
    #[arg(
        long = "data-dir",
        env = "COFFER_DATA_DIR",
        default_value = "./data/reader"
    )]
    data_dir: PathBuf,
    /// Durable consumer name: unique per reader replica.
    #[arg(
        long = "reader-name",
        env = "COFFER_READER_NAME",
        default_value = "reader"
    )]
    reader_name: String,
    /// Longest wait for `min_position`, in milliseconds, before 503 stale.
    #[arg(long, env = "COFFER_MIN_POSITION_WAIT_MS", default_value_t = 5_000)]
    min_position_wait_ms: u64,
    /// Crash tests only: abort after this many view commits, before acking them.
    #[arg(long, env = "COFFER_FAILPOINT_CRASH_AFTER_COMMITS", hide = true)]
    failpoint_crash_after_commits: Option<u64>,
    /// `/readyz` is 200 once the view is within this many positions of the stream's last event
    /// as seen at start.
    #[arg(long, env = "COFFER_READY_MAX_LAG", default_value_t = 1_000)]
    ready_max_lag: u64,
    /// Test failpoint: while this file exists, writes to the view file fail (a full disk).
    #[arg(long, env = "COFFER_FAILPOINT_STORAGE_FILE", hide = true)]
    failpoint_storage_file: Option<PathBuf>,
    /// Most requests waiting for `min_position` at once; more are answered 503 at once.
    #[arg(long, env = "COFFER_MAX_POSITION_WAITERS", default_value_t = 1_024,
        value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    max_position_waiters: u32,
    #[command(flatten)]
    token: TokenArgs,
    #[command(flatten)]
    limits: HttpLimitsArgs,
    #[command(flatten)]
    trust: TrustArgs,
}

/// Completes on SIGTERM or Ctrl-C.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = terminate => {}
    }
}

fn decode() -> anyhow::Result<()> {
    let mut payload = Vec::new();
    std::io::stdin()
        .read_to_end(&mut payload)
        .context("read stdin")?;
    let json = eventlog::codec::msgpack_to_json(&payload).context("decode MessagePack")?;
    println!("{}", serde_json::to_string(&json)?);
    Ok(())
}

/// Waits for a one-shot command's NATS connection (services connect in the background).
async fn connected(args: &NatsArgs, name: &str) -> anyhow::Result<async_nats::Client> {
    let client = args
        .settings(name)?
        .connect()
        .await
        .context("connect to NATS")?;
    let connected_by = tokio::time::Instant::now() + VERIFY_CONNECT_TIMEOUT;
    while client.connection_state() != async_nats::connection::State::Connected {
        anyhow::ensure!(
            tokio::time::Instant::now() < connected_by,
            "could not connect to NATS within {VERIFY_CONNECT_TIMEOUT:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(client)
}

/// `coffer events tail`.
async fn tail(args: TailArgs) -> anyhow::Result<()> {
    use async_nats::jetstream::consumer;
    use futures::StreamExt;
    use std::io::Write;
    let account = match &args.account {
        Some(account) => domain::AccountId::parse(account)
            .context("--account")?
            .to_string(),
        None => "*".into(),
    };
    let event_type = match &args.event_type {
        Some(event_type)
            if !event_type.is_empty()
                && event_type
                    .bytes()
                    .all(|byte| byte.is_ascii_lowercase() || byte == b'_') =>
        {
            event_type.clone()
        }
        Some(other) => anyhow::bail!("--type {other:?} is not an event type (snake_case)"),
        None => "*".into(),
    };
    let client = connected(&args.nats, "coffer-events-tail").await?;
    let settings = args.nats.stream();
    let stream = async_nats::jetstream::new(client)
        .get_stream(&settings.name)
        .await
        .context("the event stream")?;
    let consumer = stream
        .create_consumer(consumer::pull::OrderedConfig {
            filter_subject: format!(
                "{}.{account}.{event_type}",
                eventlog::subject::EVENTS_PREFIX
            ),
            deliver_policy: match args.from_position {
                Some(position) => consumer::DeliverPolicy::ByStartSequence {
                    start_sequence: position.max(1),
                },
                None => consumer::DeliverPolicy::All,
            },
            ..Default::default()
        })
        .await
        .context("create an ordered consumer")?;
    let mut remaining = consumer.cached_info().num_pending;
    if remaining == 0 && !args.follow {
        return Ok(());
    }
    let mut messages = consumer.messages().await.context("consume")?;
    let mut out = std::io::stdout().lock();
    while let Some(message) = messages.next().await {
        let message = message.context("receive")?;
        let info = message.info().map_err(|error| anyhow::anyhow!("{error}"))?;
        let (position, published) = (info.stream_sequence, info.published);
        let headers = message.headers.clone().unwrap_or_default();
        let line = match eventlog::log::decode_stored(
            &message.subject,
            position,
            published,
            &headers,
            message.payload.clone(),
        ) {
            Ok(recorded) => {
                serde_json::to_value(writer::http::event_json(&recorded)).unwrap_or_default()
            }
            // An event this build cannot read is shown, not skipped.
            Err(error) => serde_json::json!({
                "position": position,
                "subject": message.subject.as_str(),
                "error": error.to_string(),
            }),
        };
        writeln!(out, "{line}")?;
        remaining = remaining.saturating_sub(1);
        if remaining == 0 && !args.follow {
            break;
        }
    }
    out.flush()?;
    Ok(())
}

/// `coffer import`: returns whether every row was imported or already present.
async fn import(args: ImportArgs) -> anyhow::Result<bool> {
    use futures::StreamExt;
    use writer::import::{import_chunk, parse, RowOutcome, ROWS_PER_BATCH_MAX};
    let text = std::fs::read_to_string(&args.file)
        .with_context(|| format!("read {}", args.file.display()))?;
    let (rows, mut refused) = parse(&text);
    let client = connected(&args.nats, "coffer-import").await?;
    let log = args.signing.apply(
        eventlog::EventLog::open(client, &args.nats.stream())
            .await
            .context("the event stream")?,
    )?;
    let bar = indicatif::ProgressBar::new(rows.len() as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "importing {bar:40} {pos}/{len} rows ({per_sec}, {eta})",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let started = std::time::Instant::now();
    let outcomes: Vec<_> = futures::stream::iter(rows.chunks(ROWS_PER_BATCH_MAX))
        .map(|chunk| {
            let (log, bar) = (&log, &bar);
            async move {
                let outcomes = import_chunk(log, chunk).await;
                bar.inc(chunk.len() as u64);
                outcomes
            }
        })
        .buffer_unordered(args.concurrency.max(1))
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .flatten()
        .collect();
    bar.finish_and_clear();
    let (mut imported, mut present, mut failed) = (0usize, 0usize, 0usize);
    for (line, outcome) in outcomes {
        match outcome {
            Ok(RowOutcome::Imported { .. }) => imported += 1,
            Ok(RowOutcome::AlreadyPresent) => present += 1,
            Ok(RowOutcome::Refused(reason)) => refused.push((line, reason)),
            Err(error) => {
                failed += 1;
                refused.push((line, format!("not imported, retry the file: {error}")));
            }
        }
    }
    refused.sort();
    for (line, reason) in &refused {
        println!("line {line}: refused: {reason}");
    }
    let elapsed = started.elapsed().as_secs_f64();
    println!(
        "imported {imported}, already present {present}, refused {} ({:.0} rows/s)",
        refused.len() - failed,
        rows.len() as f64 / elapsed.max(f64::EPSILON)
    );
    if failed > 0 {
        println!("{failed} row(s) could not be written (NATS): run the import again");
    }
    Ok(refused.is_empty())
}

/// `coffer setup`: streams and the shared consumer, checked after; prints what it found.
async fn setup(args: SetupArgs) -> anyhow::Result<()> {
    let client = connected(&args.nats, "coffer-setup").await?;
    let settings = args.nats.stream();
    let context = async_nats::jetstream::new(client);
    let migration = if args.remove_message_ttl {
        let settle = std::time::Duration::from_secs(args.settle_seconds);
        Some(remove_message_ttl(&context, &settings, settle).await?)
    } else {
        None
    };
    settings
        .ensure(&context)
        .await
        .context("create or update the streams")?;
    eventlog::leases::ensure_bucket(&context, settings.replicas)
        .await
        .context("the owners bucket")?;
    // `ensure` tolerates an update it may not make (services run it too); setup must not.
    let mut events = context
        .get_stream(&settings.name)
        .await
        .context("the event stream")?;
    let current = events.info().await.context("stream info")?.config.clone();
    anyhow::ensure!(
        settings.merged_into(&current) == current,
        "stream {} could not be brought up to date: does this user have the setup role?",
        settings.name
    );
    context
        .get_stream(&settings.snapshots_name)
        .await
        .context("the snapshots stream")?;
    let schedules = context
        .get_stream(&settings.schedules_name)
        .await
        .context("the schedules stream")?;
    schedules
        .get_or_create_consumer(
            writer::expiry::CONSUMER_NAME,
            writer::expiry::consumer_config(),
        )
        .await
        .map_err(|error| anyhow::anyhow!("the hold-expiry consumer: {error}"))?;
    events
        .get_or_create_consumer(
            writer::expiry::BACKSTOP_CONSUMER_NAME,
            writer::expiry::backstop_consumer_config(),
        )
        .await
        .map_err(|error| anyhow::anyhow!("the hold-expiry backstop consumer: {error}"))?;
    if current.allow_message_ttl {
        eprintln!(
            "warning: stream {} allows per-message TTLs, so a writer credential can append events \
             that vanish later (readers refuse them). Stop the writers and run \
             `coffer setup --remove-message-ttl` (docs/operations.md)",
            settings.name
        );
    }
    let summary = serde_json::json!({
        "streams": [
            {"name": settings.name, "replicas": current.num_replicas, "subjects": current.subjects,
             "message_ttl": current.allow_message_ttl},
            {"name": settings.schedules_name},
            {"name": settings.snapshots_name},
        ],
        "buckets": [{"name": eventlog::leases::BUCKET}],
        "message_ttl_removal": migration.map(|stage| format!("{stage:?}")),
        "consumers": [
            {"stream": settings.schedules_name, "name": writer::expiry::CONSUMER_NAME},
            {"stream": settings.name, "name": writer::expiry::BACKSTOP_CONSUMER_NAME},
        ],
    });
    println!("{}", serde_json::to_string_pretty(&summary)?);
    Ok(())
}

/// `coffer setup --remove-message-ttl`: the migration, with a progress bar while it copies.
async fn remove_message_ttl(
    context: &async_nats::jetstream::Context,
    settings: &eventlog::StreamSettings,
    settle: std::time::Duration,
) -> anyhow::Result<eventlog::ttl_migration::Stage> {
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg} {bar:40} {pos}/{len} messages ({eta})")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let report = |step: &str, done: u64, total: u64| {
        bar.set_message(step.to_owned());
        bar.set_length(total);
        bar.set_position(done);
    };
    let found = eventlog::ttl_migration::remove_message_ttl(context, settings, settle, &report)
        .await
        .context("remove per-message TTLs from the event stream")?;
    bar.finish_and_clear();
    Ok(found)
}

/// `coffer projection status`: one JSON object.
async fn projection_status(args: StatusArgs) -> anyhow::Result<()> {
    let client = connected(&args.nats, "coffer-projection-status").await?;
    let settings = args.nats.stream();
    let log = eventlog::EventLog::new(client, &settings);
    let mut stream = log
        .context()
        .get_stream(&settings.name)
        .await
        .context("the event stream")?;
    let stream_end = stream
        .info()
        .await
        .context("stream info")?
        .state
        .last_sequence;
    let mut consumer: async_nats::jetstream::consumer::PullConsumer = stream
        .get_consumer(&args.reader_name)
        .await
        .map_err(|error| {
            anyhow::anyhow!(
                "no consumer {:?} ({error}): is the reader running?",
                args.reader_name
            )
        })?;
    let info = consumer.info().await.context("consumer info")?;
    // The ack floor is what the view has committed (it acks after each commit).
    let applied = info.ack_floor.stream_sequence;
    let lag_events = info.num_pending + info.num_ack_pending as u64;
    let oldest_unapplied = log
        .read_after(applied, 1)
        .await
        .context("read the stream")?
        .into_iter()
        .next();
    let lag_seconds = oldest_unapplied.map_or(0.0, |event| {
        (time::OffsetDateTime::now_utc() - event.time)
            .as_seconds_f64()
            .max(0.0)
    });
    let status = serde_json::json!({
        "reader": args.reader_name,
        "applied_position": applied,
        "stream_last_position": stream_end,
        "lag_events": lag_events,
        "lag_seconds": (lag_seconds * 1000.0).round() / 1000.0,
    });
    println!("{}", serde_json::to_string_pretty(&status)?);
    Ok(())
}

/// Most events read per page while verifying.
const VERIFY_PAGE_SIZE: usize = 1_000;
/// How long a one-shot command (`verify`, `events tail`) waits for its NATS connection.
const VERIFY_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// `coffer verify`: returns whether every chain is intact.
async fn verify(args: VerifyArgs) -> anyhow::Result<bool> {
    let client = connected(&args.nats, "coffer-verify").await?;
    let log = eventlog::EventLog::new(client, &args.nats.stream());
    let trusted = args.trust.trusted_keys()?;
    let mut verifier = eventlog::chain::Verifier::default();
    // Messages that cannot be read as events: reported, and the check goes on past them.
    let mut unreadable: Vec<eventlog::Unreadable> = Vec::new();
    // Per account, the first event no trusted writer signed, and why.
    let mut unsigned: std::collections::BTreeMap<String, (u64, String)> = Default::default();
    let mut unsigned_count = 0u64;
    let mut check = |recorded: &eventlog::RecordedEvent| {
        verifier.check_recorded(recorded);
        if let Some(trusted) = &trusted {
            if let Err(error) = trusted.verify_event(
                recorded.position,
                recorded.chain.as_deref(),
                recorded.signature.as_deref(),
            ) {
                unsigned_count += 1;
                unsigned
                    .entry(recorded.account_id.as_str().to_owned())
                    .or_insert((recorded.position, error.to_string()));
            }
        }
    };
    match &args.account {
        Some(account) => {
            let account = domain::AccountId::parse(account).context("account id")?;
            match log.load_account(&account, 0).await {
                Ok(history) => history.iter().for_each(&mut check),
                Err(eventlog::Error::Unreadable(message)) => unreadable.push(message),
                Err(error) => return Err(error).context("read the account"),
            }
        }
        None => {
            let last = log.last_position().await.context("read the stream")?;
            let bar = indicatif::ProgressBar::new(last);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "verifying {bar:40} {pos}/{len} positions ({per_sec}, {eta})",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            let mut after = 0;
            loop {
                let page = log
                    .read_after_each(after, VERIFY_PAGE_SIZE)
                    .await
                    .context("read the stream")?;
                let Some(newest) = page.last().map(|message| match message {
                    Ok(recorded) => recorded.position,
                    Err(message) => message.position,
                }) else {
                    break;
                };
                for message in page {
                    match message {
                        Ok(recorded) => check(&recorded),
                        Err(message) => unreadable.push(message),
                    }
                }
                after = newest;
                bar.set_position(newest.min(last));
            }
            bar.finish_and_clear();
        }
    }
    for message in &unreadable {
        let account = message
            .account
            .as_ref()
            .map_or("(no account)", |account| account.as_str());
        println!(
            "{account}: unreadable event at position {}: {}",
            message.position, message.reason
        );
    }
    for (account, position) in &verifier.first_breaks {
        println!("{account}: chain broken at position {position}");
    }
    for (account, (position, reason)) in &unsigned {
        println!("{account}: untrusted event at position {position}: {reason}");
    }
    let signatures = match &trusted {
        Some(_) => format!(", {unsigned_count} event(s) without a trusted signature"),
        None => String::new(),
    };
    println!(
        "{} events checked, {} account(s) with a broken chain, {} unreadable event(s){signatures}",
        verifier.events_checked,
        verifier.first_breaks.len(),
        unreadable.len()
    );
    Ok(verifier.first_breaks.is_empty() && unreadable.is_empty() && unsigned.is_empty())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Commands::Decode => decode(),
        Commands::Events {
            command: EventsCommand::Tail(args),
        } => tail(args).await,
        Commands::Projection {
            command: ProjectionCommand::Status(args),
        } => projection_status(args).await,
        Commands::Keys {
            command: KeysCommand::Generate { key_id, out },
        } => generate_key(&key_id, &out),
        Commands::Projection {
            command: ProjectionCommand::Rebuild(args),
        } => {
            if reader_api::rebuild(&args.reader, !args.no_wait).await? {
                Ok(())
            } else {
                std::process::exit(1)
            }
        }
        Commands::Setup(args) => setup(args).await,
        Commands::Account { command } => {
            if account::run(command).await? {
                Ok(())
            } else {
                std::process::exit(1)
            }
        }
        Commands::Import(args) => {
            if import(args).await? {
                Ok(())
            } else {
                std::process::exit(1)
            }
        }
        Commands::Verify(args) => {
            if verify(args).await? {
                Ok(())
            } else {
                std::process::exit(1)
            }
        }
        Commands::Openapi => {
            let document = problem::openapi::document(
                "Coffer HTTP API (POST to writers, GET to readers; GET /v1/events to writers)",
                [writer::openapi::document(), reader::openapi::document()],
            );
            println!("{}", document.to_pretty_json()?);
            Ok(())
        }
        Commands::Writer(args) => {
            let _telemetry = telemetry::init("coffer-writer")?;
            let (signing_key, trusted_keys) = args.signing.keys()?;
            let config = writer::WriterConfig {
                nats: args.nats.settings("coffer-writer")?,
                http_address: args.http_address,
                stream: args.nats.stream(),
                registry: writer::registry::RegistrySettings {
                    actors_live_max: args.actors_max,
                    idle_timeout: Duration::from_secs(args.actor_idle_seconds),
                    mailbox_capacity: args.mailbox_capacity,
                    call_timeout: Duration::from_millis(args.command_deadline_ms),
                },
                group_commit: eventlog::GroupCommitSettings {
                    messages_max: usize::from(args.group_commit_messages_max),
                    batches_in_flight_max: usize::from(args.group_commit_in_flight_max),
                    fill_wait: Duration::from_micros(args.group_commit_fill_wait_us),
                    fill_quiet: Duration::from_micros(args.group_commit_fill_quiet_us),
                    ..Default::default()
                },
                snapshot_every: args.snapshot_every,
                failpoint_actor_delay: args.failpoint_actor_delay_ms.map(Duration::from_millis),
                http_token: args.token.token()?,
                http_limits: args.limits.limits(),
                ownership: args.ownership,
                account_batch_max: usize::from(args.account_batch_max),
                writer_name: args.writer_name,
                hold_backstop: writer::expiry::Backstop {
                    delay: Duration::from_millis(args.hold_backstop_delay_ms),
                },
                nats_monitor_urls: writer::nats_store::monitor_urls(&args.nats_monitor_urls)
                    .map_err(|reason| anyhow::anyhow!(reason))?,
                signing_key,
                trusted_keys,
            };
            writer::run(config, shutdown_signal()).await?;
            Ok(())
        }
        Commands::Reader(args) => {
            // A reader's catch-up is faster on glibc alone (measured: `allocator`).
            #[cfg(feature = "mimalloc")]
            allocator::system_only();
            let _telemetry = telemetry::init("coffer-reader")?;
            let config = reader::ReaderConfig {
                nats: args
                    .nats
                    .settings(&format!("coffer-reader-{}", args.reader_name))?,
                http_address: args.http_address,
                stream: args.nats.stream(),
                data_directory: args.data_dir,
                reader_name: args.reader_name,
                min_position_wait: Duration::from_millis(args.min_position_wait_ms),
                crash_after_commits: args.failpoint_crash_after_commits,
                ready_max_lag: args.ready_max_lag,
                http_token: args.token.token()?,
                http_limits: args.limits.limits(),
                max_position_waiters: args.max_position_waiters as usize,
                failpoint_storage_file: args.failpoint_storage_file,
                trusted_keys: args.trust.trusted_keys()?,
            };
            reader::run(config, shutdown_signal()).await?;
            Ok(())
        }
    }
}

//! Connecting to NATS with the credentials and TLS settings both services take from the
//! environment (`COFFER_NATS_*`).

use std::path::PathBuf;
use std::time::Duration;

use crate::{Error, Result};

/// How to reach NATS. Every field has an environment variable twin in the binary.
#[derive(Debug, Clone, Default)]
pub struct NatsSettings {
    /// Comma-separated server URLs (`COFFER_NATS_URL`).
    pub url: String,
    pub user: Option<String>,
    pub password: Option<String>,
    pub token: Option<String>,
    /// A `.creds` file (JWT + NKey seed).
    pub creds_file: Option<PathBuf>,
    /// CA certificate to verify the servers with; setting it requires TLS.
    pub tls_ca: Option<PathBuf>,
    /// Client certificate and key for mutual TLS.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// Connection name shown by `nats server report connections`.
    pub client_name: String,
    /// Prefix of this client's reply inboxes (`COFFER_NATS_INBOX_PREFIX`; NATS's `_INBOX` when
    /// unset): give each role its own, so permissions can keep others' replies private.
    pub inbox_prefix: Option<String>,
}

/// How long one connection attempt may take. Short, so a dead server is noticed quickly.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(2);
/// Bound of plain request/reply calls (JetStream API calls have their own timeout).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

impl NatsSettings {
    /// Connects, retrying in the background when no server is up yet, so that a service starts
    /// (and answers `/healthz`) before NATS does.
    pub async fn connect(&self) -> Result<async_nats::Client> {
        let mut options = async_nats::ConnectOptions::new()
            .name(&self.client_name)
            .connection_timeout(CONNECTION_TIMEOUT)
            .request_timeout(Some(REQUEST_TIMEOUT))
            .retry_on_initial_connect()
            .event_callback(|event| async move {
                tracing::info!(%event, "NATS connection event");
            });
        if let (Some(user), Some(password)) = (&self.user, &self.password) {
            options = options.user_and_password(user.clone(), password.clone());
        }
        if let Some(prefix) = &self.inbox_prefix {
            options = options.custom_inbox_prefix(prefix.clone());
        }
        if let Some(token) = &self.token {
            options = options.token(token.clone());
        }
        if let Some(path) = &self.creds_file {
            options = options
                .credentials_file(path)
                .await
                .map_err(|error| Error::Unavailable(format!("read creds file: {error}")))?;
        }
        if let Some(ca) = &self.tls_ca {
            options = options.add_root_certificates(ca.clone()).require_tls(true);
        }
        if let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) {
            options = options.add_client_certificate(cert.clone(), key.clone());
        }
        let servers: Vec<async_nats::ServerAddr> = self
            .url
            .split(',')
            .map(str::trim)
            .filter(|url| !url.is_empty())
            .map(|url| {
                url.parse()
                    .map_err(|error| Error::Unavailable(format!("bad NATS URL {url:?}: {error}")))
            })
            .collect::<Result<_>>()?;
        options
            .connect(servers)
            .await
            .map_err(|error| Error::Unavailable(format!("connect to NATS: {error}")))
    }
}

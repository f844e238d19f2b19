//! How full the NATS servers' JetStream stores are, read from their monitoring endpoints
//! (`/varz`: `jetstream.stats.storage` against `jetstream.config.max_storage`) and exported with
//! the writer's metrics, so one alert rule covers "the event log is about to refuse appends".
//!
//! Why here: the services' own users may not see server-wide figures over NATS (`$JS.API.INFO`
//! shows the account's use, and the account has no limit of its own: `max_file_store` bounds the
//! server), and every server has its own volume, so each is read on its own. Only when
//! `COFFER_NATS_MONITOR_URLS` names them; a server that does not answer loses its series (a stale
//! figure would hide a full disk) and counts an error.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use serde::Deserialize;

/// How often the servers are read: well inside an alert's `for`, cheap for the server.
pub const READ_EVERY: Duration = Duration::from_secs(15);
/// A monitoring endpoint that has not answered by then is counted as failed for this round.
const READ_TIMEOUT: Duration = Duration::from_secs(3);

/// The series' label: the server's `server_name`.
pub type ServerLabel = Vec<(&'static str, String)>;

/// The gauges and the error counter, registered by [`crate::metrics::Metrics`].
#[derive(Default)]
pub struct StoreGauges {
    /// Bytes the server's JetStream file store holds (all streams, all replicas it keeps).
    pub used: Family<ServerLabel, Gauge>,
    /// The most it may hold (`max_file_store`, or what the server derived from the disk).
    pub limit: Family<ServerLabel, Gauge>,
    /// Reads of a monitoring endpoint that failed (unreachable, not JSON, JetStream off).
    pub read_errors: Counter,
}

impl StoreGauges {
    fn forget(&self, server: &str) {
        let label = vec![("server", server.to_owned())];
        self.used.remove(&label);
        self.limit.remove(&label);
    }
}

#[derive(Deserialize)]
struct Varz {
    server_name: String,
    jetstream: Option<JetStreamVarz>,
}

#[derive(Deserialize)]
struct JetStreamVarz {
    config: JetStreamConfig,
    stats: JetStreamStats,
}

#[derive(Deserialize)]
struct JetStreamConfig {
    max_storage: i64,
}

#[derive(Deserialize)]
struct JetStreamStats {
    storage: i64,
}

/// One server's store, as its `/varz` says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreUse {
    pub server: String,
    pub used: i64,
    pub limit: i64,
}

/// Reads `varz`'s JSON. `None` when it is not a JetStream server's `/varz`.
pub fn parse_varz(body: &[u8]) -> Option<StoreUse> {
    let varz: Varz = serde_json::from_slice(body).ok()?;
    let jetstream = varz.jetstream?;
    Some(StoreUse {
        server: varz.server_name,
        used: jetstream.stats.storage,
        limit: jetstream.config.max_storage,
    })
}

/// Parses `COFFER_NATS_MONITOR_URLS`: comma-separated `http://host:port` monitoring addresses
/// (the `/varz` path is added).
pub fn monitor_urls(list: &str) -> Result<Vec<String>, String> {
    list.split(',')
        .map(str::trim)
        .filter(|url| !url.is_empty())
        .map(|url| {
            let url = url.trim_end_matches('/');
            if url.starts_with("http://") || url.starts_with("https://") {
                Ok(format!("{url}/varz"))
            } else {
                Err(format!(
                    "COFFER_NATS_MONITOR_URLS: {url:?} is not an http:// or https:// address"
                ))
            }
        })
        .collect()
}

/// Reads every server's `/varz` every [`READ_EVERY`] until `stop` turns true.
pub async fn run(
    urls: Vec<String>,
    gauges: Arc<StoreGauges>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    if urls.is_empty() {
        return;
    }
    let client = match reqwest::Client::builder().timeout(READ_TIMEOUT).build() {
        Ok(client) => client,
        Err(error) => {
            tracing::error!(%error, "cannot build the HTTP client for the NATS monitoring endpoints");
            return;
        }
    };
    // Which server each endpoint named last, so a failed read removes that server's series.
    let mut last_seen: HashMap<String, String> = HashMap::new();
    let mut every = tokio::time::interval(READ_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = every.tick() => {}
            _ = stop.changed() => return,
        }
        if *stop.borrow() {
            return;
        }
        for url in &urls {
            match read(&client, url).await {
                Ok(store) => {
                    if let Some(before) =
                        last_seen.get(url).filter(|before| **before != store.server)
                    {
                        gauges.forget(before);
                    }
                    let label = vec![("server", store.server.clone())];
                    gauges.used.get_or_create(&label).set(store.used);
                    gauges.limit.get_or_create(&label).set(store.limit);
                    last_seen.insert(url.clone(), store.server);
                }
                Err(reason) => {
                    gauges.read_errors.inc();
                    tracing::warn!(%url, %reason, "reading a NATS server's store use");
                    if let Some(before) = last_seen.remove(url) {
                        gauges.forget(&before);
                    }
                }
            }
        }
    }
}

async fn read(client: &reqwest::Client, url: &str) -> Result<StoreUse, String> {
    let response = client
        .get(url)
        .send()
        .await
        .map_err(|error| error.to_string())?;
    if !response.status().is_success() {
        return Err(format!("status {}", response.status()));
    }
    let body = response.bytes().await.map_err(|error| error.to_string())?;
    parse_varz(&body).ok_or_else(|| "not a JetStream server's /varz".to_owned())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn varz_gives_the_servers_store_use_and_limit() {
        let body = br#"{"server_name":"nats-1","jetstream":{"config":{"max_storage":1000,"store_dir":"/data"},"stats":{"storage":250,"memory":0}},"connections":3}"#;
        assert_eq!(
            parse_varz(body),
            Some(StoreUse {
                server: "nats-1".into(),
                used: 250,
                limit: 1000
            })
        );
    }

    #[test]
    fn a_server_without_jetstream_or_another_body_gives_nothing() {
        assert_eq!(parse_varz(br#"{"server_name":"n"}"#), None);
        assert_eq!(parse_varz(b"<html>"), None);
    }

    #[test]
    fn monitor_urls_take_a_comma_list_and_refuse_what_is_not_http() {
        assert_eq!(
            monitor_urls(" http://nats-0:8222/, http://nats-1:8222 ,").unwrap(),
            vec!["http://nats-0:8222/varz", "http://nats-1:8222/varz"]
        );
        assert!(monitor_urls("").unwrap().is_empty());
        assert!(monitor_urls("nats-0:8222").is_err());
    }
}

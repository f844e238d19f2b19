//! The CLI's side of a reader's HTTP API: `coffer projection rebuild` and the account reads.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use serde_json::Value;

/// Where a reader's query API is, and its bearer token if it requires one.
#[derive(Args, Clone)]
pub struct ReaderAccess {
    /// Base URL of a reader's query API.
    #[arg(
        long = "reader-url",
        env = "COFFER_READER_URL",
        default_value = "http://127.0.0.1:8081"
    )]
    pub reader_url: String,
    /// The reader's bearer token, if it requires one.
    #[arg(long = "http-token", env = "COFFER_HTTP_TOKEN", hide_env_values = true)]
    pub http_token: Option<String>,
    /// The same, read from a file (a mounted Secret); used when --http-token is not given.
    #[arg(long = "http-token-file", env = "COFFER_HTTP_TOKEN_FILE")]
    pub http_token_file: Option<PathBuf>,
}

const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// A reader's answer: status and JSON body (a problem document when it is an error).
pub struct Answer {
    pub status: u16,
    pub body: Value,
}

impl Answer {
    /// The problem's `detail` (or the whole body) for an error message.
    pub fn detail(&self) -> String {
        self.body
            .get("detail")
            .and_then(Value::as_str)
            .map_or_else(|| self.body.to_string(), str::to_owned)
    }
}

pub struct ReaderClient {
    http: reqwest::Client,
    base: String,
    token: Option<String>,
}

impl ReaderClient {
    pub fn new(access: &ReaderAccess) -> anyhow::Result<Self> {
        let token = crate::token_text(
            access.http_token.as_deref(),
            access.http_token_file.as_deref(),
        )?;
        let http = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .build()
            .context("HTTP client")?;
        Ok(Self {
            http,
            base: access.reader_url.trim_end_matches('/').to_owned(),
            token,
        })
    }

    pub async fn get(&self, path: &str) -> anyhow::Result<Answer> {
        self.send(self.http.get(format!("{}{path}", self.base)))
            .await
    }

    pub async fn post(&self, path: &str) -> anyhow::Result<Answer> {
        self.send(self.http.post(format!("{}{path}", self.base)))
            .await
    }

    async fn send(&self, request: reqwest::RequestBuilder) -> anyhow::Result<Answer> {
        let request = match &self.token {
            Some(token) => request.bearer_auth(token),
            None => request,
        };
        let response = request
            .send()
            .await
            .with_context(|| format!("reach the reader at {}", self.base))?;
        let status = response.status().as_u16();
        let text = response.text().await.context("read the reader's answer")?;
        let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
        Ok(Answer { status, body })
    }
}

const REBUILD_PATH: &str = "/v1/projection/rebuild";
const REBUILD_POLL: Duration = Duration::from_millis(200);

/// `coffer projection rebuild`: starts a rebuild on the reader (or follows the one running),
/// shows its progress, and prints the final status. Returns whether it completed.
pub async fn rebuild(access: &ReaderAccess, wait: bool) -> anyhow::Result<bool> {
    let client = ReaderClient::new(access)?;
    let started = client.post(REBUILD_PATH).await?;
    let following_another = match (started.status, started.body["code"].as_str()) {
        (202, _) => false,
        (409, Some("rebuild_running")) if wait => {
            eprintln!("a rebuild is already running; following it");
            true
        }
        _ => anyhow::bail!(
            "the reader refused the rebuild ({}): {}",
            started.status,
            started.detail()
        ),
    };
    if !wait {
        println!("{}", serde_json::to_string_pretty(&started.body)?);
        return Ok(true);
    }
    // The status must stay the one of the rebuild we started: another start time means another
    // replica answered (a load-balanced URL) or the reader restarted.
    let mut started_at = (!following_another)
        .then(|| started.body["started_at"].as_str().map(str::to_owned))
        .flatten();
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "rebuilding {bar:40} {pos}/{len} positions, {msg} ({elapsed})",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    loop {
        let answer = client.get(REBUILD_PATH).await?;
        anyhow::ensure!(
            answer.status == 200,
            "rebuild status ({}): {}",
            answer.status,
            answer.detail()
        );
        let status = &answer.body;
        let this_start = status["started_at"].as_str().map(str::to_owned);
        if started_at.is_none() {
            started_at.clone_from(&this_start);
        }
        anyhow::ensure!(
            this_start.is_some() && this_start == started_at,
            "the rebuild status belongs to another rebuild (started {:?}, ours {:?}): the reader \
             restarted, or the URL reaches several replicas (use one replica's address)",
            this_start,
            started_at
        );
        let number = |field: &str| status.get(field).and_then(Value::as_u64).unwrap_or(0);
        let applied = number("applied_position");
        // The consumer's pending count says how far the stream goes beyond what is applied.
        let end = (applied + number("pending_events")).max(number("target_position"));
        bar.set_length(end.max(applied));
        bar.set_position(applied);
        bar.set_message(format!("{} events pending", number("pending_events")));
        match status.get("state").and_then(Value::as_str) {
            Some("completed") => {
                bar.finish_and_clear();
                println!("{}", serde_json::to_string_pretty(status)?);
                return Ok(true);
            }
            Some("failed" | "unfinished") => {
                bar.abandon();
                println!("{}", serde_json::to_string_pretty(status)?);
                return Ok(false);
            }
            _ => tokio::time::sleep(REBUILD_POLL).await,
        }
    }
}

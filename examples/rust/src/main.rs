//! Coffer from Rust with the official NATS client (async-nats): opens two accounts, deposits
//! and transfers over NATS request-reply (the `coffer` micro service), follows one account's
//! events from the JetStream stream, and reads its own write from a reader.
//!
//! Usage: `coffer-client-example NATS_URL READER_URL` (with `./just up`:
//! `nats://127.0.0.1:4222 http://127.0.0.1:8081`).

use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use async_nats::jetstream::consumer::{pull::OrderedConfig, DeliverPolicy};
use futures::StreamExt;
use serde_json::{json, Value};

const STREAM: &str = "COFFER_EVENTS";

/// One command on `coffer.cmd.{account}.{verb}`; a refusal is an error with its problem code.
async fn command(
    client: &async_nats::Client,
    account: &str,
    verb: &str,
    body: Value,
    key: Option<&str>,
) -> anyhow::Result<Value> {
    let mut headers = async_nats::HeaderMap::new();
    if let Some(key) = key {
        headers.insert("Idempotency-Key", key);
    }
    let reply = tokio::time::timeout(
        Duration::from_secs(10),
        client.request_with_headers(
            format!("coffer.cmd.{account}.{verb}"),
            headers,
            serde_json::to_vec(&body)?.into(),
        ),
    )
    .await
    .context("no answer in 10 s")??;
    let answer: Value = serde_json::from_slice(&reply.payload)?;
    if let Some(status) = reply
        .headers
        .as_ref()
        .and_then(|headers| headers.get("Nats-Service-Error-Code"))
    {
        bail!("{verb} on {account}: {status} {answer}");
    }
    Ok(answer)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut arguments = std::env::args().skip(1);
    let (Some(nats_url), Some(reader_url)) = (arguments.next(), arguments.next()) else {
        bail!("usage: coffer-client-example NATS_URL READER_URL");
    };
    let run = &uuid::Uuid::new_v4().simple().to_string()[..8];
    let (alice, bob) = (format!("alice-{run}"), format!("bob-{run}"));
    let client = async_nats::connect(&nats_url).await?;

    // Writers append on coffer.append.{account}.{type}; the stream stores (and republishes) each
    // event as coffer.events.{account}.{type}. Bind to the stream by name, and filter on the
    // stored subjects.
    let stream = async_nats::jetstream::new(client.clone())
        .get_stream(STREAM)
        .await?;
    let mut events = stream
        .create_consumer(OrderedConfig {
            filter_subject: format!("coffer.events.{alice}.>"),
            deliver_policy: DeliverPolicy::All,
            ..Default::default()
        })
        .await?
        .messages()
        .await?;

    command(
        &client,
        &alice,
        "open",
        json!({"currency": "EUR", "metadata": {"example": "rust"}}),
        None,
    )
    .await?;
    command(&client, &bob, "open", json!({"currency": "EUR"}), None).await?;
    // A retry with the same key is answered from the first run: the money moves once.
    let key = format!("deposit-{run}");
    let mut deposited = Value::Null;
    for _ in 0..2 {
        deposited = command(
            &client,
            &alice,
            "deposit",
            json!({"amount": 500}),
            Some(&key),
        )
        .await?;
    }
    if deposited["balance"] != 500 {
        bail!("alice after one deposit of 500: {deposited}");
    }
    let moved = command(
        &client,
        &alice,
        "transfer",
        json!({"to": bob, "amount": 120, "transfer_id": format!("t-{run}")}),
        None,
    )
    .await?;
    let position = moved["position"]
        .as_u64()
        .ok_or_else(|| anyhow!("a transfer answer without its position: {moved}"))?;
    println!(
        "transfer {} {} at position {position}",
        moved["transfer_id"].as_str().unwrap_or_default(),
        moved["status"].as_str().unwrap_or_default()
    );

    // Alice's history from the stream: payloads are MessagePack, described by the headers.
    let mut seen = Vec::new();
    while seen.len() < 3 {
        let message = tokio::time::timeout(Duration::from_secs(10), events.next())
            .await
            .context("no event in 10 s")?
            .ok_or_else(|| anyhow!("the event stream ended"))??;
        let event_type = message
            .headers
            .as_ref()
            .and_then(|headers| headers.get("Coffer-Event-Type"))
            .map(|value| value.as_str().to_owned())
            .unwrap_or_default();
        let data: Value = rmp_serde::from_slice(&message.payload)?;
        let sequence = message
            .info()
            .map_err(|error| anyhow!("{error}"))?
            .stream_sequence;
        println!("{sequence:>6} {} {event_type} {data}", message.subject);
        seen.push(event_type);
    }
    if seen != ["account_opened", "deposited", "transfer_debited"] {
        bail!("alice's events: {seen:?}");
    }

    // Read your own write: the reader answers once its view has applied the transfer.
    let view: Value = reqwest::Client::new()
        .get(format!(
            "{reader_url}/v1/accounts/{bob}?min_position={position}"
        ))
        .timeout(Duration::from_secs(30))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    if view["balance"] != 120 {
        bail!("bob after the transfer: {view}");
    }
    println!(
        "{bob}: balance {} {} (reader at position >= {position})",
        view["balance"],
        view["currency"].as_str().unwrap_or_default()
    );
    Ok(())
}

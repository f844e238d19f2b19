//! One W3C trace followed across processes: from the HTTP request (or NATS command), through
//! the event's headers in the stream, to the reader's log line when it applies the event.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use testkit::NatsServer;

use crate::support::{self, read_stream, Http};

const SAMPLED: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
const SAMPLED_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const NATS_TRACE: &str = "0af7651916cd43dd8448eb211c80319c";

/// Opens `account` with the sampled [`SAMPLED`] traceparent; returns the one the writer echoed.
async fn open_with_trace(writer: &str, account: &str) -> trace_context::TraceParent {
    let opened = reqwest::Client::new()
        .post(format!("{writer}/v1/accounts"))
        .header("traceparent", SAMPLED)
        .json(&json!({"account_id": account, "currency": "EUR"}))
        .send()
        .await
        .unwrap();
    assert_eq!(opened.status(), 201);
    trace_context::TraceParent::parse(opened.headers()["traceparent"].to_str().unwrap()).unwrap()
}

/// The reader's JSON log lines saying an event was applied, as (trace id, position).
fn applied_lines(log: &str) -> Vec<(String, u64)> {
    log.lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|line| line["fields"]["message"] == "event applied")
        .map(|line| {
            (
                line["fields"]["trace_id"].as_str().unwrap_or("").to_owned(),
                line["fields"]["position"].as_u64().unwrap_or(0),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trace_goes_from_the_request_through_the_event_to_the_reader_log() {
    let nats = NatsServer::start();
    let writer = support::writer(
        "w",
        &nats.url(),
        &[("COFFER_LOG_FORMAT", "json".to_string())],
    );
    let data = tempfile::tempdir().unwrap();
    let reader = support::reader(
        "tr",
        &nats.url(),
        data.path(),
        &[("COFFER_LOG_FORMAT", "json".to_string())],
    );
    support::wait_ready(&reader.url());
    let account = support::unique("trace");
    let client = reqwest::Client::new();

    // HTTP with a sampled traceparent: continued (same trace, our own span id) and echoed.
    let echoed = open_with_trace(&writer.url(), &account).await;
    assert_eq!(echoed.trace_id(), SAMPLED_TRACE);
    assert_ne!(echoed.span_id(), "00f067aa0ba902b7");
    assert!(echoed.sampled());

    // NATS with a sampled traceparent header.
    let nats_client = async_nats::connect(nats.url()).await.unwrap();
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(
        "traceparent",
        format!("00-{NATS_TRACE}-b7ad6b7169203331-01").as_str(),
    );
    let reply = nats_client
        .request_with_headers(
            format!("coffer.cmd.{account}.deposit"),
            headers,
            r#"{"amount":5}"#.into(),
        )
        .await
        .unwrap();
    assert!(reply.headers.is_none(), "{:?}", reply.headers);

    // HTTP without one: a new trace, not sampled, still echoed and stored.
    let plain = client
        .post(format!("{}/v1/accounts/{account}/deposits", writer.url()))
        .json(&json!({"amount": 7}))
        .send()
        .await
        .unwrap();
    assert_eq!(plain.status(), 200);
    let fresh = trace_context::TraceParent::parse(plain.headers()["traceparent"].to_str().unwrap())
        .unwrap();
    assert!(!fresh.sampled());
    let plain_position = plain.json::<Value>().await.unwrap()["position"]
        .as_u64()
        .unwrap();

    // The stream: each event carries its request's trace.
    let events = read_stream(&nats.url()).await;
    let traces: Vec<(u64, Option<String>)> = events
        .iter()
        .map(|event| (event.position, event.metadata.trace_id()))
        .collect();
    assert_eq!(traces.len(), 3, "{traces:?}");
    assert_eq!(traces[0].1.as_deref(), Some(SAMPLED_TRACE));
    assert_eq!(traces[1].1.as_deref(), Some(NATS_TRACE));
    assert_eq!(traces[2].1, Some(fresh.trace_id()));
    assert_eq!(traces[2].0, plain_position);
    // Raw headers too, as `nats stream view` shows them.
    assert_eq!(
        events[0].metadata.traceparent.as_deref().map(|t| &t[..35]),
        Some(&SAMPLED[..35])
    );

    // The reader logs the sampled ones when it applies them (info), not the unsampled one.
    let reply = Http::new()
        .get(&format!(
            "{}/v1/accounts/{account}?min_position={plain_position}",
            reader.url()
        ))
        .await
        .unwrap();
    assert_eq!(reply.status, 200);
    let deadline = Instant::now() + Duration::from_secs(10);
    let lines = loop {
        let lines = applied_lines(&reader.log());
        if lines.len() >= 2 || Instant::now() > deadline {
            break lines;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        lines,
        [
            (SAMPLED_TRACE.to_string(), traces[0].0),
            (NATS_TRACE.to_string(), traces[1].0)
        ]
    );
}

/// A stand-in OTLP/HTTP collector: records the body of every export.
async fn collector() -> (String, Arc<Mutex<Vec<Vec<u8>>>>) {
    let bodies: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
    let kept = bodies.clone();
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |body: axum::body::Bytes| {
            let kept = kept.clone();
            async move {
                kept.lock().unwrap().push(body.to_vec());
                axum::http::StatusCode::OK
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, bodies)
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack
        .windows(needle.len())
        .any(|window| window == needle)
}

fn hex_bytes(text: &str) -> Vec<u8> {
    (0..text.len())
        .step_by(2)
        .map(|index| u8::from_str_radix(&text[index..index + 2], 16).unwrap())
        .collect()
}

/// With OTLP configured, the writer exports its request span (child of the caller's span), the
/// event carries that span as its parent, and the reader exports its apply span under it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_otlp_configured_writer_and_reader_export_one_trace() {
    let (collector_url, bodies) = collector().await;
    let otlp = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", collector_url.clone()),
        ("OTEL_BSP_SCHEDULE_DELAY", "100".to_string()),
    ];
    let nats = NatsServer::start();
    let writer = support::writer("w", &nats.url(), &otlp);
    let data = tempfile::tempdir().unwrap();
    let reader = support::reader("otlp", &nats.url(), data.path(), &otlp);
    support::wait_ready(&reader.url());
    let account = support::unique("otlp");
    let hop = open_with_trace(&writer.url(), &account).await;
    assert_eq!(hop.trace_id(), SAMPLED_TRACE);
    let events = read_stream(&nats.url()).await;
    assert_eq!(
        events[0].metadata.traceparent.as_deref(),
        Some(hop.to_string().as_str()),
        "the event's parent is the writer's exported request span"
    );

    // Protobuf carries ids as raw bytes: find the trace id, and the writer's span id both as a
    // span (writer) and as a parent (reader).
    let (trace, span, caller) = (
        hex_bytes(SAMPLED_TRACE),
        hex_bytes(&hop.span_id()),
        hex_bytes("00f067aa0ba902b7"),
    );
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let exported = bodies.lock().unwrap().clone();
        let from = |service: &str| {
            exported
                .iter()
                .filter(|body| contains(body, service.as_bytes()))
                .any(|body| contains(body, &trace) && contains(body, &span))
        };
        let writer_linked = exported
            .iter()
            .any(|body| contains(body, b"coffer-writer") && contains(body, &caller));
        if from("coffer-writer") && from("coffer-reader") && writer_linked {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no linked spans exported: {} bodies",
            exported.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

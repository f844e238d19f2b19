//! The HTTP servers against slow and idle clients: header, body and connection limits.

use std::time::{Duration, Instant};

use serde_json::json;
use testkit::NatsServer;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::{self, Http};

const HEADER_TIMEOUT_MS: u64 = 1_500;

/// Reads until the server closes the connection; returns what it sent and when it closed.
async fn until_closed(
    mut stream: impl AsyncRead + Unpin,
    bound: Duration,
) -> Option<(String, Instant)> {
    let mut received = Vec::new();
    let mut buffer = [0u8; 1024];
    let deadline = tokio::time::Instant::now() + bound;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buffer)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                return Some((
                    String::from_utf8_lossy(&received).into_owned(),
                    Instant::now(),
                ))
            }
            Ok(Ok(read)) => received.extend_from_slice(&buffer[..read]),
            Err(_) => return None,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_are_cut_off_and_do_not_stop_a_normal_request() {
    let nats = NatsServer::start();
    let writer = support::writer(
        "w",
        &nats.url(),
        &[
            (
                "COFFER_HTTP_HEADER_TIMEOUT_MS",
                HEADER_TIMEOUT_MS.to_string(),
            ),
            ("COFFER_HTTP_BODY_TIMEOUT_MS", "1500".into()),
        ],
    );
    let address = writer.url().trim_start_matches("http://").to_owned();
    // 300 clients that send a request line, then a header byte every 100 ms, never finishing.
    let started = Instant::now();
    let mut slow = Vec::new();
    for _ in 0..300 {
        let mut stream = TcpStream::connect(&address).await.unwrap();
        stream
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: coffer\r\nX-Slow: ")
            .await
            .unwrap();
        slow.push(stream);
    }
    let watchers: Vec<_> = slow
        .into_iter()
        .map(|stream| {
            let (reader, mut writer) = stream.into_split();
            tokio::spawn(async move {
                let trickle = tokio::spawn(async move {
                    while writer.write_all(b"a").await.is_ok() {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                });
                let closed = until_closed(reader, Duration::from_secs(10)).await;
                trickle.abort();
                closed.map(|(_, at)| at)
            })
        })
        .collect();
    // Meanwhile, normal requests are answered at once.
    let http = Http::new();
    for _ in 0..5 {
        let asked = Instant::now();
        let account = support::unique("busy");
        assert_eq!(http.open_account(&writer.url(), &account).await.status, 201);
        assert!(
            asked.elapsed() < Duration::from_secs(1),
            "{:?}",
            asked.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Every slow client is cut off once its headers took longer than the timeout.
    for watcher in watchers {
        let closed = watcher
            .await
            .unwrap()
            .expect("a slow client was never cut off");
        let after = closed - started;
        assert!(
            after >= Duration::from_millis(HEADER_TIMEOUT_MS - 200)
                && after < Duration::from_secs(6),
            "cut off after {after:?}"
        );
    }

    // A body that stalls: 408 once the body timeout passes.
    let mut stream = TcpStream::connect(&address).await.unwrap();
    stream
        .write_all(
            b"POST /v1/accounts HTTP/1.1\r\nHost: coffer\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"currency\":",
        )
        .await
        .unwrap();
    let asked = Instant::now();
    let (answer, _) = until_closed(stream, Duration::from_secs(10))
        .await
        .expect("a stalled body was never answered");
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("request_timeout"), "{answer}");
    assert!(
        asked.elapsed() >= Duration::from_millis(1_300),
        "{:?}",
        asked.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_past_the_limit_wait_and_are_cut_off_by_the_header_timeout() {
    let nats = NatsServer::start();
    let writer = support::writer(
        "w",
        &nats.url(),
        &[
            (
                "COFFER_HTTP_HEADER_TIMEOUT_MS",
                HEADER_TIMEOUT_MS.to_string(),
            ),
            ("COFFER_HTTP_MAX_CONNECTIONS", "20".into()),
        ],
    );
    let address = writer.url().trim_start_matches("http://").to_owned();
    // Twenty connections that send nothing fill the server's slots.
    let mut idle = Vec::new();
    for _ in 0..20 {
        idle.push(TcpStream::connect(&address).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let asked = Instant::now();
    let reply = Http::new()
        .post(
            &format!("{}/v1/accounts", writer.url()),
            &json!({"currency": "EUR"}),
            None,
        )
        .await
        .unwrap();
    // Served, but only once the idle ones were cut off: the limit held.
    assert_eq!(reply.status, 201, "{:?}", reply.body);
    let waited = asked.elapsed();
    assert!(
        waited >= Duration::from_millis(HEADER_TIMEOUT_MS - 500) && waited < Duration::from_secs(8),
        "{waited:?}"
    );
    for stream in idle {
        assert!(until_closed(stream, Duration::from_secs(5)).await.is_some());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_cut_off() {
    let nats = NatsServer::start();
    let writer = support::writer(
        "w",
        &nats.url(),
        &[("COFFER_HTTP_BODY_TIMEOUT_MS", "1000".into())],
    );
    let address = writer.url().trim_start_matches("http://").to_owned();
    let mut stream = TcpStream::connect(&address).await.unwrap();
    // Pipelined requests for a large document, far more than the socket buffers hold, and no
    // reading: the server's writes stall.
    let request = b"GET /openapi.json HTTP/1.1\r\nHost: coffer\r\n\r\n";
    let pipelined: Vec<u8> = request
        .iter()
        .copied()
        .cycle()
        .take(request.len() * 2_000)
        .collect();
    let (mut reader, mut sender) = stream.into_split();
    let sending = tokio::spawn(async move {
        let _ = sender.write_all(&pipelined).await;
        sender
    });
    tokio::time::sleep(Duration::from_secs(3)).await;
    // Now read: what was buffered arrives, then the server's close, long before 2 000 answers.
    let mut received = 0usize;
    let mut buffer = vec![0u8; 1 << 16];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        match tokio::time::timeout_at(deadline, reader.read(&mut buffer)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(read)) => received += read,
            Err(_) => panic!("the stalled connection was never closed ({received} bytes read)"),
        }
    }
    assert!(
        received < 2_000 * 50_000,
        "every answer arrived: {received} bytes"
    );
    drop(sending);
    stream = TcpStream::connect(&address).await.unwrap();
    drop(stream);
    // The server is fine for everyone else.
    let account = support::unique("after");
    assert_eq!(
        Http::new()
            .open_account(&writer.url(), &account)
            .await
            .status,
        201
    );
}

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

/// A command whose body trickled in until just before the request timeout, on a busy account:
/// once it is handed to its actor its answer is its outcome (here `200`), never the request
/// timeout's `408` for a command that is then stored (a 4xx tells a client nothing happened).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_taken_before_the_request_timeout_is_answered_with_its_outcome() {
    let nats = NatsServer::start();
    // Deadline 1.5 s: the request timeout must exceed 1.5 s + 3.5 s grace + 2 s.
    let writer = support::writer(
        "w",
        &nats.url(),
        &[
            ("COFFER_HTTP_REQUEST_TIMEOUT_MS", "8000".into()),
            ("COFFER_COMMAND_DEADLINE_MS", "1500".into()),
            ("COFFER_FAILPOINT_ACTOR_DELAY_MS", "900".into()),
        ],
    );
    let http = Http::new();
    let account = support::unique("trickle");
    assert_eq!(http.open_account(&writer.url(), &account).await.status, 201);

    let address = writer.url().trim_start_matches("http://").to_owned();
    let body = json!({ "amount": 700 }).to_string();
    let mut stream = TcpStream::connect(&address).await.unwrap();
    let head = format!(
        "POST /v1/accounts/{account}/deposits HTTP/1.1\r\nHost: coffer\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let asked = Instant::now();
    // The body's last byte arrives ~7.5 s in; the actor then takes 0.9 s: past the 8 s timeout.
    let (last, first) = body.as_bytes().split_last().unwrap();
    stream.write_all(first).await.unwrap();
    tokio::time::sleep(Duration::from_millis(7_500)).await;
    stream.write_all(&[*last]).await.unwrap();
    let (answer, _) = until_closed(stream, Duration::from_secs(15))
        .await
        .expect("the command was never answered");
    assert!(
        asked.elapsed() > Duration::from_secs(8),
        "answered before the request timeout: {:?}: {answer}",
        asked.elapsed()
    );
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("\"balance\":700"), "{answer}");
    // Stored once: the next deposit lands on it.
    let next = http
        .deposit(&writer.url(), &account, &json!({ "amount": 1 }), None)
        .await
        .unwrap();
    assert_eq!(next.body["balance"], 701, "{:?}", next.body);
}

/// A request timeout no longer than a command's deadline plus its grace contradicts the
/// promise that commands are answered within it: the writer refuses to start and says why.
#[tokio::test]
async fn a_writer_refuses_a_request_timeout_shorter_than_a_command_can_take() {
    let nats = NatsServer::start();
    let (succeeded, stderr) = support::run_to_exit(
        &nats.url(),
        &["writer"],
        &[
            ("COFFER_HTTP_REQUEST_TIMEOUT_MS", "12000".into()),
            ("COFFER_COMMAND_DEADLINE_MS", "10000".into()),
        ],
    );
    assert!(
        !succeeded,
        "the writer ran with a request timeout shorter than a command's answer"
    );
    assert!(
        stderr.contains("COFFER_HTTP_REQUEST_TIMEOUT_MS (12000 ms)")
            && stderr.contains("COFFER_COMMAND_DEADLINE_MS (10000 ms)"),
        "{stderr}"
    );
    // The same deadline with room for its answer runs.
    let writer = support::writer(
        "w",
        &nats.url(),
        &[
            ("COFFER_HTTP_REQUEST_TIMEOUT_MS", "16000".into()),
            ("COFFER_COMMAND_DEADLINE_MS", "10000".into()),
        ],
    );
    let http = Http::new();
    let account = support::unique("fits");
    assert_eq!(http.open_account(&writer.url(), &account).await.status, 201);
}

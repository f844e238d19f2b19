//! The client examples run against real processes: nats-server, a writer and a reader (the
//! coffer binary, built by `just test` before this runs), the Rust example as built here, and
//! the Python one with nats-py from the project's tools (`just test-tools`).

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use testkit::{CofferProcess, NatsServer};

async fn wait_ready(url: &str) {
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        let ready = http
            .get(format!("{url}/readyz"))
            .send()
            .await
            .is_ok_and(|response| response.status().is_success());
        if ready {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{url} not ready in 30 s");
}

/// A writer and a reader on a fresh nats-server.
async fn system() -> (NatsServer, CofferProcess, CofferProcess, tempfile::TempDir) {
    let nats = NatsServer::start();
    let writer = CofferProcess::start("writer", "writer", &[("COFFER_NATS_URL", nats.url())]);
    let data = tempfile::tempdir().unwrap();
    let reader = CofferProcess::start(
        "reader",
        "reader",
        &[
            ("COFFER_NATS_URL", nats.url()),
            ("COFFER_READER_NAME", "reader".into()),
            ("COFFER_DATA_DIR", data.path().display().to_string()),
        ],
    );
    wait_ready(&writer.url()).await;
    wait_ready(&reader.url()).await;
    (nats, writer, reader, data)
}

fn repository() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Runs an example to its end and returns what it printed; a failure shows all of it.
fn run(mut command: Command) -> String {
    let output = command.output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{command:?}: {}\n{stdout}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

fn checks(printed: &str) {
    for expected in [
        " account_opened ",
        " deposited {",
        " transfer_debited ",
        "balance 120 EUR",
    ] {
        assert!(
            printed.contains(expected),
            "{expected:?} missing from:\n{printed}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rust_example_opens_transfers_follows_and_reads_its_write() {
    let (nats, _writer, reader, _data) = system().await;
    let mut command = Command::new(env!("CARGO_BIN_EXE_coffer-client-example"));
    command.args([nats.url(), reader.url()]);
    checks(
        &tokio::task::spawn_blocking(move || run(command))
            .await
            .unwrap(),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_example_opens_transfers_follows_and_reads_its_write() {
    let (nats, _writer, reader, _data) = system().await;
    // The project's Python tools (nats-py, msgpack) when installed there, else the PATH's.
    let venv = repository().join(".tools/venv/bin/python3");
    let python = if venv.exists() {
        venv
    } else {
        PathBuf::from("python3")
    };
    let mut command = Command::new(python);
    command.args([
        repository()
            .join("examples/python/wallet.py")
            .display()
            .to_string(),
        nats.url(),
        reader.url(),
    ]);
    checks(
        &tokio::task::spawn_blocking(move || run(command))
            .await
            .unwrap(),
    );
}

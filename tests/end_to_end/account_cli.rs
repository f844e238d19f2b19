//! `coffer account ...` against a real writer (over NATS) and reader (over HTTP).

use std::process::Output;

use serde_json::Value;
use testkit::NatsServer;

use crate::support;

fn coffer(nats_url: &str, reader_url: &str, args: &[&str]) -> Output {
    std::process::Command::new(testkit::coffer_binary())
        .arg("account")
        .args(args)
        .env("COFFER_NATS_URL", nats_url)
        .env("COFFER_READER_URL", reader_url)
        .env_remove("COFFER_HTTP_TOKEN")
        .output()
        .unwrap()
}

fn json_of(output: &Output) -> Value {
    assert!(
        output.status.success(),
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn account_commands_write_over_nats_and_show_from_the_reader() {
    let nats = NatsServer::start();
    let _writer = support::writer("w", &nats.url(), &[]);
    let data = tempfile::tempdir().unwrap();
    let reader = support::reader("cli", &nats.url(), data.path(), &[]);
    support::wait_ready(&reader.url());
    let (n, r) = (nats.url(), reader.url());
    let (a, b) = (support::unique("cli-a"), support::unique("cli-b"));
    let run = |args: &[&str]| {
        let (n, r) = (n.clone(), r.clone());
        let args: Vec<String> = args.iter().map(|arg| arg.to_string()).collect();
        async move {
            tokio::task::spawn_blocking(move || {
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                coffer(&n, &r, &args)
            })
            .await
            .unwrap()
        }
    };

    let opened = json_of(
        &run(&[
            "open",
            &a,
            "--currency",
            "EUR",
            "--owner",
            "ann",
            "--output",
            "json",
        ])
        .await,
    );
    assert_eq!(opened["account_id"], a.as_str());
    // Table output by default: aligned `field  value` lines.
    let table = run(&["open", &b, "--currency", "EUR"]).await;
    assert!(table.status.success());
    let text = String::from_utf8_lossy(&table.stdout).into_owned();
    assert!(
        text.lines()
            .any(|line| line.starts_with("account_id") && line.ends_with(&b)),
        "{text}"
    );

    let deposited = json_of(
        &run(&[
            "deposit",
            &a,
            "500",
            "--reference",
            "salary",
            "--output",
            "json",
        ])
        .await,
    );
    assert_eq!(deposited["balance"], 500);
    let withdrawn = json_of(&run(&["withdraw", &a, "50", "--output", "json"]).await);
    assert_eq!(withdrawn["balance"], 450);
    let transfer = json_of(
        &run(&[
            "transfer",
            &a,
            &b,
            "200",
            "--transfer-id",
            &format!("{a}-t1"),
            "--output",
            "json",
        ])
        .await,
    );
    assert_eq!(transfer["status"], "completed");
    let position = transfer["position"].as_u64().unwrap().to_string();

    // A refusal: exit status 1, the problem on stderr (table) or stdout (json).
    let refused = run(&["withdraw", &a, "10000"]).await;
    assert_eq!(refused.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&refused.stderr).into_owned();
    assert!(stderr.contains("error 422 insufficient_funds"), "{stderr}");
    let refused = run(&["withdraw", &a, "10000", "--output", "json"]).await;
    assert_eq!(refused.status.code(), Some(1));
    let problem: Value = serde_json::from_slice(&refused.stdout).unwrap();
    assert_eq!(problem["code"], "insufficient_funds");
    // The same key and body answer the first outcome again.
    let once = json_of(
        &run(&[
            "deposit",
            &b,
            "7",
            "--idempotency-key",
            "k-1",
            "--output",
            "json",
        ])
        .await,
    );
    let again = json_of(
        &run(&[
            "deposit",
            &b,
            "7",
            "--idempotency-key",
            "k-1",
            "--output",
            "json",
        ])
        .await,
    );
    assert_eq!(once, again);

    // Show: the account and its statement, after the transfer's position.
    let shown = json_of(&run(&["show", &a, "--min-position", &position, "--output", "json"]).await);
    assert_eq!(shown["account"]["balance"], 250);
    assert_eq!(shown["account"]["owner"], "ann");
    let types: Vec<&str> = shown["transactions"]["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|item| item["type"].as_str().unwrap())
        .collect();
    assert_eq!(
        types,
        [
            "account_opened",
            "deposited",
            "withdrawn",
            "transfer_debited"
        ]
    );
    let table = run(&["show", &a, "--min-position", &position]).await;
    assert!(table.status.success());
    let text = String::from_utf8_lossy(&table.stdout).into_owned();
    assert!(
        text.lines()
            .any(|line| line.starts_with("balance") && line.ends_with("250")),
        "{text}"
    );
    assert!(text.contains("reference=salary"), "{text}");
    assert!(text.contains(&format!("transfer_id={a}-t1")), "{text}");
    let missing = run(&["show", "no-such-account"]).await;
    assert_eq!(missing.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("404 account_not_found"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_without_a_writer_says_so() {
    let nats = NatsServer::start();
    let url = nats.url();
    let output = tokio::task::spawn_blocking(move || {
        coffer(&url, "http://127.0.0.1:1", &["deposit", "nobody", "5"])
    })
    .await
    .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(
        stderr.contains("no writer answers on coffer.cmd.nobody.deposit"),
        "{stderr}"
    );
}

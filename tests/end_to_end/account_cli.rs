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

/// `coffer account` with metadata: opened and moved with `--metadata`, changed with `account
/// metadata`, found with `account list` (filters combined, pages with `--after`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn account_metadata_is_set_and_listed_from_the_command_line() {
    let nats = NatsServer::start();
    let _writer = support::writer("w", &nats.url(), &[]);
    let data = tempfile::tempdir().unwrap();
    let reader = support::reader("cli-list", &nats.url(), data.path(), &[]);
    support::wait_ready(&reader.url());
    let (n, r) = (nats.url(), reader.url());
    let run = |args: Vec<String>| {
        let (n, r) = (n.clone(), r.clone());
        async move {
            tokio::task::spawn_blocking(move || {
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                coffer(&n, &r, &args)
            })
            .await
            .unwrap()
        }
    };
    let args = |text: &str| text.split(' ').map(str::to_owned).collect::<Vec<_>>();
    let tag = support::unique("cli");
    let mut last = 0;
    for (index, tier) in ["gold", "basic", "gold"].iter().enumerate() {
        let opened = json_of(
            &run(args(&format!(
                "open {tag}-{index} --currency EUR --metadata batch={tag} --metadata tier={tier} --output json"
            )))
            .await,
        );
        last = opened["position"].as_u64().unwrap();
    }
    let gold = json_of(
        &run(args(&format!(
            "list --metadata batch={tag} --metadata tier=gold --min-position {last} --output json"
        )))
        .await,
    );
    let ids: Vec<&str> = gold["accounts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|account| account["account_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [format!("{tag}-0"), format!("{tag}-2")]);
    // Pages: one account at a time, the table says how to go on.
    let page = run(args(&format!("list --metadata batch={tag} --limit 1"))).await;
    let text = String::from_utf8_lossy(&page.stdout).into_owned();
    assert!(
        text.contains(&format!("more: --after {tag}-0")) && text.contains("tier=gold"),
        "{text}"
    );
    let changed = json_of(
        &run(args(&format!(
            "metadata {tag}-1 --set tier=gold --unset batch --output json"
        )))
        .await,
    );
    assert_eq!(changed["metadata"], serde_json::json!({"tier": "gold"}));
    let deposited = json_of(
        &run(args(&format!(
            "deposit {tag}-1 5 --reference inv-1 --metadata invoice=1 --output json"
        )))
        .await,
    );
    let position = deposited["position"].as_u64().unwrap();
    let shown = json_of(
        &run(args(&format!(
            "show {tag}-1 --min-position {position} --output json"
        )))
        .await,
    );
    assert_eq!(
        shown["account"]["metadata"],
        serde_json::json!({"tier": "gold"})
    );
    let items = shown["transactions"]["items"].as_array().unwrap();
    assert_eq!(
        items.last().unwrap()["metadata"],
        serde_json::json!({"invoice": "1"})
    );
    let refused = run(args("list --status frozen")).await;
    assert!(!refused.status.success());
}

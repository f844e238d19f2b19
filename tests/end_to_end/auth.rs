//! Bearer tokens on both HTTP APIs: the API needs the token, probes and metrics stay open, a
//! token can come from a file (a mounted Secret), and a wrong one is refused like a missing one.

use serde_json::json;
use testkit::NatsServer;

use crate::support::{self, Http};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_apis_require_their_bearer_token_and_the_probes_stay_open() {
    let nats = NatsServer::start();
    let secrets = tempfile::tempdir().unwrap();
    let reader_token = secrets.path().join("reader-token");
    std::fs::write(&reader_token, "r-secret\n").unwrap();
    let writer = support::writer(
        "w-auth",
        &nats.url(),
        &[("COFFER_HTTP_TOKEN", "w-secret".into())],
    );
    let data = tempfile::tempdir().unwrap();
    let reader = support::reader(
        "r-auth",
        &nats.url(),
        data.path(),
        &[("COFFER_HTTP_TOKEN_FILE", reader_token.display().to_string())],
    );
    let client = reqwest::Client::new();
    let open = |token: Option<&str>| {
        let mut request = client
            .post(format!("{}/v1/accounts", writer.url()))
            .json(&json!({"account_id": support::unique("auth"), "currency": "EUR"}));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        request.send()
    };
    for token in [None, Some("r-secret"), Some("w-secre"), Some("w-secretx")] {
        let response = open(token).await.unwrap();
        assert_eq!(response.status(), 401, "{token:?}");
        assert_eq!(response.headers()["www-authenticate"], "Bearer");
        let body: serde_json::Value = response.json().await.unwrap();
        assert_eq!(body["code"], "unauthorized");
    }
    let opened = open(Some("w-secret")).await.unwrap();
    assert_eq!(opened.status(), 201);
    let events = client
        .get(format!("{}/v1/events", writer.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(events.status(), 401);
    support::wait_ready(&reader.url());
    let query = format!("{}/v1/audit", reader.url());
    assert_eq!(client.get(&query).send().await.unwrap().status(), 401);
    let with_token = client
        .get(&query)
        .bearer_auth("r-secret")
        .send()
        .await
        .unwrap();
    assert_eq!(with_token.status(), 200);
    let http = Http::new();
    for base in [writer.url(), reader.url()] {
        for probe in ["/healthz", "/readyz", "/metrics"] {
            let reply = http.get(&format!("{base}{probe}")).await.unwrap();
            assert_eq!(reply.status, 200, "{base}{probe}");
        }
    }
}

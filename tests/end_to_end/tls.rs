//! NATS over TLS with client verification: a CA and certificates made here (rcgen), nats-server
//! requiring TLS and a client certificate, writer and reader configured through
//! `COFFER_NATS_TLS_*`; clients without a certificate, or without TLS, are refused.

use std::path::Path;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use serde_json::json;
use testkit::NatsServer;

use crate::support::{self, Http};

/// Writes `ca.pem`, `server.pem`/`server-key.pem` (127.0.0.1, localhost) and
/// `client.pem`/`client-key.pem` into `directory`.
fn certificates(directory: &Path) {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "coffer test CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    std::fs::write(directory.join("ca.pem"), ca.pem()).unwrap();
    for (name, names, usage) in [
        (
            "server",
            vec!["127.0.0.1".to_string(), "localhost".to_string()],
            ExtendedKeyUsagePurpose::ServerAuth,
        ),
        (
            "client",
            vec!["coffer-writer".to_string()],
            ExtendedKeyUsagePurpose::ClientAuth,
        ),
    ] {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(names).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![usage];
        let certificate = params.signed_by(&key, &issuer).unwrap();
        std::fs::write(directory.join(format!("{name}.pem")), certificate.pem()).unwrap();
        std::fs::write(
            directory.join(format!("{name}-key.pem")),
            key.serialize_pem(),
        )
        .unwrap();
    }
}

fn tls_environment(directory: &Path, url: &str) -> Vec<(&'static str, String)> {
    vec![
        ("COFFER_NATS_URL", url.to_owned()),
        (
            "COFFER_NATS_TLS_CA",
            directory.join("ca.pem").display().to_string(),
        ),
        (
            "COFFER_NATS_TLS_CERT",
            directory.join("client.pem").display().to_string(),
        ),
        (
            "COFFER_NATS_TLS_KEY",
            directory.join("client-key.pem").display().to_string(),
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_system_runs_over_tls_with_client_certificates_and_refuses_clients_without() {
    let certs = tempfile::tempdir().unwrap();
    certificates(certs.path());
    let path = |name: &str| certs.path().join(name).display().to_string();
    let nats = NatsServer::start_with(
        &format!(
            "tls {{ cert_file: \"{}\", key_file: \"{}\", ca_file: \"{}\", verify: true, timeout: 2 }}",
            path("server.pem"),
            path("server-key.pem"),
            path("ca.pem")
        ),
        &[],
    );
    let url = nats.url();
    let environment = tls_environment(certs.path(), &url);
    let writer = testkit::CofferProcess::start("w", "writer", &environment);
    let data = tempfile::tempdir().unwrap();
    let reader = support::reader("tls", &url, data.path(), &environment[1..]);
    support::wait_ready(&writer.url());
    support::wait_ready(&reader.url());
    let http = Http::new();
    let account = support::unique("tls");
    assert_eq!(http.open_account(&writer.url(), &account).await.status, 201);
    let deposit = http
        .deposit(&writer.url(), &account, &json!({"amount": 42}), None)
        .await
        .unwrap();
    let read = http
        .get(&format!(
            "{}/v1/accounts/{account}?min_position={}",
            reader.url(),
            deposit.body["position"]
        ))
        .await
        .unwrap();
    assert_eq!((read.status, &read.body["balance"]), (200, &json!(42)));

    // The CLI over the same settings: with the client certificate it works, without it not.
    let directory = certs.path().to_owned();
    let (cli_url, cli_account) = (url.clone(), account.clone());
    let accepted = tokio::task::spawn_blocking(move || {
        let cli = |with_certificate: bool| {
            let mut command = std::process::Command::new(testkit::coffer_binary());
            command
                .args(["account", "deposit", &cli_account, "1", "--output", "json"])
                .env("COFFER_NATS_URL", &cli_url)
                .env("COFFER_NATS_TLS_CA", directory.join("ca.pem"));
            if with_certificate {
                command
                    .env("COFFER_NATS_TLS_CERT", directory.join("client.pem"))
                    .env("COFFER_NATS_TLS_KEY", directory.join("client-key.pem"));
            }
            command.output().unwrap()
        };
        (cli(true), cli(false))
    })
    .await
    .unwrap();
    assert!(
        accepted.0.status.success(),
        "{}",
        String::from_utf8_lossy(&accepted.0.stderr)
    );
    assert!(
        !accepted.1.status.success(),
        "a client without a certificate got in"
    );

    // A plain client is refused too.
    let plain = tokio::time::timeout(
        Duration::from_secs(5),
        async_nats::ConnectOptions::new()
            .connection_timeout(Duration::from_secs(2))
            .connect(&url),
    )
    .await;
    assert!(
        !matches!(plain, Ok(Ok(_))),
        "a client without TLS connected"
    );
}

//! Test support: real `nats-server` processes on free loopback ports with temporary stores.
//!
//! A [`NatsServer`] is killed and its store deleted on Drop, so a failing test leaves nothing
//! behind. The binary is found in `NATS_SERVER_BIN`, the workspace's `.tools/bin`, or on `PATH`
//! (`just tools` installs the pinned version). [`NatsCluster`] starts three routed nodes.
//! [`CofferProcess`] runs the `coffer` binary built by `cargo build -p coffer`.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test support: failing loudly is the point

use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a server gets to accept connections before the test fails.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// The workspace root, from this crate's manifest directory.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .expect("crates/testkit sits two levels below the workspace root")
        .to_path_buf()
}

/// Finds nats-server: `NATS_SERVER_BIN`, then `.tools/bin`, then `PATH`.
pub fn nats_server_binary() -> PathBuf {
    if let Ok(path) = std::env::var("NATS_SERVER_BIN") {
        return PathBuf::from(path);
    }
    let local = workspace_root().join(".tools/bin/nats-server");
    if local.exists() {
        return local;
    }
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join("nats-server"))
                .find(|candidate| candidate.exists())
        })
        .expect("nats-server not found: run `just tools` or set NATS_SERVER_BIN")
}

/// Finds the coffer binary: `COFFER_BIN`, then `target/{debug,release}/coffer`.
pub fn coffer_binary() -> PathBuf {
    if let Ok(path) = std::env::var("COFFER_BIN") {
        return PathBuf::from(path);
    }
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| workspace_root().join("target"));
    ["debug", "release"]
        .iter()
        .map(|profile| target.join(profile).join("coffer"))
        .find(|path| path.exists())
        .expect("coffer binary not found: run `cargo build -p coffer` or set COFFER_BIN")
}

/// A free loopback port. Another process may take it before we bind it; tests accept that
/// small risk rather than sharing ports.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|address| address.port())
        .expect("bind an ephemeral port")
}

fn wait_for_port(port: u16, child: &mut Child, log: &Path) {
    let deadline = Instant::now() + START_TIMEOUT;
    let address = SocketAddr::from(([127, 0, 0, 1], port));
    while Instant::now() < deadline {
        if TcpStream::connect_timeout(&address, Duration::from_millis(200)).is_ok() {
            return;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "process exited with {status} before listening on {port}:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("nothing listened on port {port} within {START_TIMEOUT:?}");
}

/// One nats-server with JetStream, file storage and `sync_interval: always`.
pub struct NatsServer {
    pub port: u16,
    pub cluster_port: Option<u16>,
    pub name: String,
    directory: tempfile::TempDir,
    routes: Vec<u16>,
    child: Option<Child>,
    /// Appended to the generated configuration (an `include`, say).
    extra_config: String,
    environment: Vec<(String, String)>,
    /// `sync_interval: always` (the default here, as in production); false: the NATS default.
    sync_always: bool,
}

impl NatsServer {
    /// Starts a single-node server.
    pub fn start() -> Self {
        Self::start_node("n1".into(), free_port(), None, Vec::new())
    }

    /// Starts a single-node server with the NATS default sync (`sync_interval` left to the
    /// server: every 2 minutes) instead of a sync per write, for benchmarks of both modes.
    pub fn start_with_default_sync() -> Self {
        let mut server = Self::prepare("n1".into(), free_port(), None, Vec::new());
        server.sync_always = false;
        server.write_config();
        server.spawn();
        server
    }

    /// Starts a single-node server with `extra_config` appended to its configuration and
    /// `environment` set (NATS config variables such as `$PASSWORD` read it).
    pub fn start_with(extra_config: &str, environment: &[(&str, &str)]) -> Self {
        let mut server = Self::prepare("n1".into(), free_port(), None, Vec::new());
        server.extra_config = extra_config.to_owned();
        server.environment = environment
            .iter()
            .map(|(key, value)| (key.to_string(), value.to_string()))
            .collect();
        server.write_config();
        server.spawn();
        server
    }

    fn start_node(name: String, port: u16, cluster_port: Option<u16>, routes: Vec<u16>) -> Self {
        let mut server = Self::prepare(name, port, cluster_port, routes);
        server.write_config();
        server.spawn();
        server
    }

    fn prepare(name: String, port: u16, cluster_port: Option<u16>, routes: Vec<u16>) -> Self {
        let directory = tempfile::Builder::new()
            .prefix("coffer-nats-")
            .tempdir()
            .expect("temp dir");
        Self {
            port,
            cluster_port,
            name,
            directory,
            routes,
            child: None,
            extra_config: String::new(),
            environment: Vec::new(),
            sync_always: true,
        }
    }

    fn write_config(&self) {
        let store = self.directory.path().join("store");
        let sync = if self.sync_always {
            ", sync_interval: always"
        } else {
            ""
        };
        let mut config = format!(
            "server_name: {}\nlisten: \"127.0.0.1:{}\"\njetstream {{ store_dir: \"{}\"{sync} }}\n",
            self.name,
            self.port,
            store.display()
        );
        if let Some(cluster_port) = self.cluster_port {
            let routes: Vec<String> = self
                .routes
                .iter()
                .map(|port| format!("\"nats://127.0.0.1:{port}\""))
                .collect();
            config.push_str(&format!(
                "cluster {{ name: coffer-test, listen: \"127.0.0.1:{cluster_port}\", routes: [{}] }}\n",
                routes.join(", ")
            ));
        }
        config.push_str(&self.extra_config);
        config.push('\n');
        let mut file = std::fs::File::create(self.config_path()).expect("write nats config");
        file.write_all(config.as_bytes())
            .expect("write nats config");
    }

    fn config_path(&self) -> PathBuf {
        self.directory.path().join("nats.conf")
    }

    fn log_path(&self) -> PathBuf {
        self.directory.path().join("nats.log")
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("open nats log");
        let mut child = Command::new(nats_server_binary())
            .arg("-c")
            .arg(self.config_path())
            .envs(self.environment.iter().map(|(key, value)| (key, value)))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn nats-server");
        wait_for_port(self.port, &mut child, &self.log_path());
        self.child = Some(child);
    }

    /// `nats://127.0.0.1:{port}`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The server's process id while it runs (benchmarks read its CPU time).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Kills the server with SIGKILL; the store stays, so [`NatsServer::restart`] brings it back.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port with the same store.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// SIGSTOP: the process freezes with its connections open (a stalled VM, a GC pause).
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// SIGCONT after [`NatsServer::pause`].
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, signal: &str) {
        if let Some(child) = &self.child {
            let status = Command::new("kill")
                .arg(signal)
                .arg(child.id().to_string())
                .status()
                .expect("run kill");
            assert!(status.success(), "kill {signal} failed");
        }
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// The server's log so far, for failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Three routed nodes on loopback.
pub struct NatsCluster {
    pub nodes: Vec<NatsServer>,
}

impl NatsCluster {
    pub fn start() -> Self {
        let client_ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let cluster_ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let nodes = (0..3)
            .map(|index| {
                let routes = cluster_ports
                    .iter()
                    .enumerate()
                    .filter(|(other, _)| *other != index)
                    .map(|(_, port)| *port)
                    .collect();
                NatsServer::start_node(
                    format!("n{}", index + 1),
                    client_ports[index],
                    Some(cluster_ports[index]),
                    routes,
                )
            })
            .collect();
        Self { nodes }
    }

    /// A comma-separated URL list for clients, so they fail over between nodes.
    pub fn urls(&self) -> String {
        self.nodes
            .iter()
            .map(NatsServer::url)
            .collect::<Vec<_>>()
            .join(",")
    }

    pub fn node_by_name(&mut self, name: &str) -> Option<&mut NatsServer> {
        self.nodes.iter_mut().find(|node| node.name == name)
    }
}

/// A `coffer` subcommand running as a child process, with its log in a temp dir.
pub struct CofferProcess {
    pub name: String,
    pub http_port: u16,
    arguments: Vec<String>,
    environment: Vec<(String, String)>,
    log_directory: tempfile::TempDir,
    child: Option<Child>,
}

impl CofferProcess {
    /// Starts `coffer <subcommand>` with `COFFER_HTTP_ADDR` on a free port plus `environment`,
    /// and waits until `/healthz` answers.
    pub fn start(name: &str, subcommand: &str, environment: &[(&str, String)]) -> Self {
        let http_port = free_port();
        let mut environment: Vec<(String, String)> = environment
            .iter()
            .map(|(key, value)| (key.to_string(), value.clone()))
            .collect();
        environment.push(("COFFER_HTTP_ADDR".into(), format!("127.0.0.1:{http_port}")));
        let mut process = Self {
            name: name.into(),
            http_port,
            arguments: vec![subcommand.into()],
            environment,
            log_directory: tempfile::Builder::new()
                .prefix("coffer-log-")
                .tempdir()
                .expect("temp dir"),
            child: None,
        };
        process.spawn();
        process
    }

    fn log_path(&self) -> PathBuf {
        self.log_directory.path().join(format!("{}.log", self.name))
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("open log");
        let mut command = Command::new(coffer_binary());
        command
            .args(&self.arguments)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdout(log.try_clone().expect("clone log handle"))
            .stderr(log);
        for (key, value) in &self.environment {
            command.env(key, value);
        }
        let mut child = command.spawn().expect("spawn coffer");
        wait_for_port(self.http_port, &mut child, &self.log_path());
        self.child = Some(child);
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.http_port)
    }

    /// The OS process id while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGKILL: no chance to flush or ack.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, then waits up to `timeout`; returns the exit code.
    pub fn terminate(&mut self, timeout: Duration) -> Option<i32> {
        let mut child = self.child.take()?;
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status();
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        None
    }

    /// Waits up to `timeout` for the process to exit by itself; returns whether it did.
    pub fn wait_exit(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(_)) = child.try_wait() {
                    self.child = None;
                    return true;
                }
            } else {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// Changes (or with `None` removes) an environment variable for the next (re)start.
    pub fn set_env(&mut self, key: &str, value: Option<String>) {
        self.environment.retain(|(existing, _)| existing != key);
        if let Some(value) = value {
            self.environment.push((key.to_string(), value));
        }
    }

    /// Starts the same command again (same port, same environment).
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }
}

impl Drop for CofferProcess {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("--- {} log:\n{}", self.name, self.log());
        }
    }
}

/// Every operation of an OpenAPI document as `"{method} {path}"`, sorted.
pub fn documented_operations(document: &serde_json::Value) -> Vec<String> {
    let mut operations: Vec<String> = document["paths"]
        .as_object()
        .into_iter()
        .flatten()
        .flat_map(|(path, methods)| {
            methods
                .as_object()
                .into_iter()
                .flatten()
                .map(move |(method, _)| format!("{method} {path}"))
        })
        .collect();
    operations.sort();
    operations
}

/// The value of the sample `name` (with its labels, if any) in an OpenMetrics text, as served
/// at `/metrics`.
pub fn metric_value(text: &str, name: &str) -> Option<f64> {
    let prefix = format!("{name} ");
    text.lines()
        .find_map(|line| line.strip_prefix(&prefix))
        .and_then(|value| value.trim().parse().ok())
}

//! The whole path on free ports: PostgreSQL, Tansu, and the gateway, workers and edge binaries, with dev
//! credentials whose JWKS the gateway trusts.

use std::path::{Path, PathBuf};
use std::time::Duration;

use devkit::{Claims, SigningKey};
use tempfile::TempDir;

use crate::{Postgres, Service, Tansu, bin_path, eventually, free_port};

pub const ISSUER: &str = "https://idp.test/realms/orders";
pub const AUDIENCE: &str = "orders-api";

/// A policy that limits nothing in practice, for tests about something else.
pub const PERMISSIVE_POLICY: &str = "[zones.all]\nrate = \"100000r/s\"\nburst = 100000\nmode = \"nodelay\"\n\
                                     [[routes]]\npath_prefix = \"/\"\nzones = [\"all\"]\n";

/// Which services to start, and the edge's rate-limit policy.
#[derive(Debug, Clone)]
pub struct StackOptions {
    pub gateway: bool,
    pub workers: bool,
    pub edge: bool,
    /// The edge's policy file (TOML), written to `{dir}/policies/policy.toml`.
    pub policy: String,
    /// Extra environment variables (service, name, value), service being `edge`, `gateway`, `workers` or `*`
    /// for all; they also apply to the replicas started later with `spawn_gateway` and `spawn_worker`.
    pub env: Vec<(&'static str, String, String)>,
}

impl Default for StackOptions {
    fn default() -> Self {
        Self { gateway: true, workers: true, edge: true, policy: PERMISSIVE_POLICY.to_owned(), env: Vec::new() }
    }
}

/// A running stack. Field order is drop order: services stop before the broker and the database.
pub struct Stack {
    pub edge: Option<Service>,
    /// With an edge but no gateway: an echo server (see [`crate::echo`]) on the gateway's port, so that the edge
    /// has a healthy upstream.
    pub echo: Option<AbortOnDrop>,
    pub gateway: Option<Service>,
    pub workers: Option<Service>,
    pub tansu: Tansu,
    pub postgres: Postgres,
    pub key: SigningKey,
    pub ports: Ports,
    pub dir: TempDir,
    env: Vec<(&'static str, String, String)>,
    /// Where the edge checks its upstream's health: the gateway's admin port, or 0 (the traffic port: the echo
    /// server answers every path).
    gateway_health_port: u16,
}

/// A task stopped when this is dropped.
pub struct AbortOnDrop(pub tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The ports the services listen on.
#[derive(Debug, Clone, Copy)]
pub struct Ports {
    pub edge: u16,
    pub edge_admin: u16,
    pub gateway: u16,
    pub gateway_admin: u16,
    pub workers_admin: u16,
}

impl Stack {
    pub async fn start(opts: StackOptions) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new().prefix("testkit-stack-").tempdir()?;
        std::fs::create_dir_all(dir.path().join("policies"))?;
        std::fs::write(dir.path().join("policies").join("policy.toml"), &opts.policy)?;
        let (postgres, tansu) = tokio::try_join!(Postgres::start(), Tansu::start())?;
        let key = SigningKey::generate()?;
        std::fs::write(dir.path().join("jwks.json"), serde_json::to_vec(&devkit::jwks(&[&key]))?)?;
        let ports = Ports {
            edge: free_port(),
            edge_admin: free_port(),
            gateway: free_port(),
            gateway_admin: free_port(),
            workers_admin: free_port(),
        };
        let mut stack = Self {
            edge: None,
            echo: None,
            gateway: None,
            workers: None,
            tansu,
            postgres,
            key,
            ports,
            dir,
            env: opts.env,
            gateway_health_port: if opts.gateway { ports.gateway_admin } else { 0 },
        };
        if opts.edge && !opts.gateway {
            stack.echo = Some(AbortOnDrop(crate::echo::start(ports.gateway).await?));
        }
        if opts.workers {
            stack.workers = Some(stack.spawn_workers()?);
        }
        if opts.gateway {
            stack.gateway =
                Some(stack.spawn("gateway", &stack.gateway_env(stack.ports.gateway, stack.ports.gateway_admin))?);
        }
        if opts.edge {
            stack.edge = Some(stack.spawn("edge", &stack.edge_env())?);
        }
        stack.wait_ready().await?;
        Ok(stack)
    }

    fn spawn(&self, name: &str, env: &[(String, String)]) -> anyhow::Result<Service> {
        let env = self.with_extra(name, env.to_vec());
        Service::spawn(name, &bin_path(name), &[], &env, self.dir.path())
    }

    /// `env` and then the options' extra variables for `service`.
    fn with_extra(&self, service: &str, mut env: Vec<(String, String)>) -> Vec<(String, String)> {
        let extra = self.env.iter().filter(|(s, _, _)| *s == "*" || *s == service);
        env.extend(extra.map(|(_, k, v)| (k.clone(), v.clone())));
        env
    }

    fn spawn_workers(&self) -> anyhow::Result<Service> {
        self.spawn_worker("workers", &[], self.ports.workers_admin)
    }

    /// Another workers process named `name` (its log is `{name}.log`) running `jobs` (all when empty), with its
    /// admin listener on `admin_port`.
    pub fn spawn_worker(&self, name: &str, jobs: &[&str], admin_port: u16) -> anyhow::Result<Service> {
        let env = vec![
            kv("WORKERS_ADMIN_LISTEN", format!("127.0.0.1:{admin_port}")),
            kv("WORKERS_DATABASE__URL", self.postgres.url()),
            kv("WORKERS_KAFKA__BROKERS", self.tansu.brokers()),
            kv("WORKERS_KAFKA__FETCH_WAIT_MAX_MS", "10".into()),
            kv("WORKERS_KAFKA__STATS_INTERVAL_MS", "1000".into()),
            kv("WORKERS_KAFKA__PROPERTIES__BATCH_NUM_MESSAGES", "1".into()), // see tansu.rs
            kv("RUST_LOG", std::env::var("TESTKIT_WORKERS_LOG").unwrap_or_else(|_| "info".into())),
        ];
        let env = self.with_extra("workers", env);
        let mut args = vec!["run"];
        args.extend_from_slice(jobs);
        Service::spawn(name, &bin_path("workers"), &args, &env, self.dir.path())
    }

    /// Another gateway replica named `name` on `port` (admin `admin_port`), sharing the broker and database,
    /// with `extra` environment variables (`GATEWAY_...` settings) on top of the stack's.
    pub fn spawn_gateway(
        &self,
        name: &str,
        port: u16,
        admin_port: u16,
        extra: &[(&str, &str)],
    ) -> anyhow::Result<Service> {
        let mut env = self.with_extra("gateway", self.gateway_env(port, admin_port));
        env.extend(extra.iter().map(|(k, v)| kv(k, (*v).to_owned())));
        Service::spawn(name, &bin_path("gateway"), &[], &env, self.dir.path())
    }

    /// An edge named `name` with `args` on the stack's edge ports (start the stack with `edge: false`, or pass
    /// `--upgrade` to take the running edge's sockets over), with `extra`
    /// environment variables (`EDGE_...` settings) on top of the stack's.
    pub fn spawn_edge(&self, name: &str, args: &[&str], extra: &[(&str, String)]) -> anyhow::Result<Service> {
        let mut env = self.with_extra("edge", self.edge_env());
        env.extend(extra.iter().map(|(k, v)| kv(k, v.clone())));
        Service::spawn(name, &bin_path("edge"), args, &env, self.dir.path())
    }

    fn gateway_env(&self, port: u16, admin_port: u16) -> Vec<(String, String)> {
        vec![
            kv("GATEWAY_LISTEN", format!("127.0.0.1:{port}")),
            kv("GATEWAY_ADMIN_LISTEN", format!("127.0.0.1:{admin_port}")),
            kv("GATEWAY_KAFKA__BROKERS", self.tansu.brokers()),
            kv("GATEWAY_KAFKA__PROPERTIES__BATCH_NUM_MESSAGES", "1".into()), // see tansu.rs
            kv("GATEWAY_DATABASE__URL", self.postgres.url()),
            kv("GATEWAY_AUTH__ISSUER", ISSUER.into()),
            kv("GATEWAY_AUTH__AUDIENCE", AUDIENCE.into()),
            kv("GATEWAY_AUTH__JWKS_FILE", self.dir.path().join("jwks.json").display().to_string()),
            kv("RUST_LOG", "info".into()),
        ]
    }

    fn edge_env(&self) -> Vec<(String, String)> {
        vec![
            kv("EDGE_LISTEN", format!("127.0.0.1:{}", self.ports.edge)),
            kv("EDGE_ADMIN_LISTEN", format!("127.0.0.1:{}", self.ports.edge_admin)),
            kv("EDGE_UPSTREAM__ADDRESS", format!("127.0.0.1:{}", self.ports.gateway)),
            kv("EDGE_UPSTREAM__HEALTH__PORT", self.gateway_health_port.to_string()),
            kv("EDGE_UPSTREAM__HEALTH__INTERVAL_MS", "500".into()),
            kv("EDGE_TLS__DEV_CERT_DIR", self.tls_dir().display().to_string()),
            kv("EDGE_UPGRADE_SOCK", self.dir.path().join("upgrade.sock").display().to_string()),
            kv("EDGE_SHUTDOWN__GRACE_PERIOD_SECS", "0".into()),
            kv("EDGE_POLICY__DIR", self.policy_dir().display().to_string()),
            kv("EDGE_POLICY__RELOAD_INTERVAL_SECS", "1".into()),
            kv("RUST_LOG", "info".into()),
        ]
    }

    /// The edge's policy directory (tests rewrite `policy.toml` to exercise reloads).
    pub fn policy_dir(&self) -> PathBuf {
        self.dir.path().join("policies")
    }

    /// Where the edge wrote its development certificate.
    pub fn tls_dir(&self) -> PathBuf {
        self.dir.path().join("tls")
    }

    /// Waits until every started service answers `/readyz` with 200.
    pub async fn wait_ready(&self) -> anyhow::Result<()> {
        let mut admin = Vec::new();
        if self.workers.is_some() {
            admin.push(("workers", self.ports.workers_admin));
        }
        if self.gateway.is_some() {
            admin.push(("gateway", self.ports.gateway_admin));
        }
        if self.edge.is_some() {
            admin.push(("edge", self.ports.edge_admin));
        }
        for (name, port) in admin {
            wait_admin_ready(name, port).await?;
        }
        Ok(())
    }

    /// Restarts the workers process (after a stop) and waits until it is ready.
    pub async fn start_workers(&mut self) -> anyhow::Result<()> {
        match &mut self.workers {
            Some(w) => w.start()?,
            None => self.workers = Some(self.spawn_workers()?),
        }
        self.wait_ready().await
    }

    /// A token for `sub` with both order roles, valid for an hour.
    pub fn token(&self) -> String {
        self.key.sign(&self.claims()).unwrap_or_else(|e| panic!("signing: {e}"))
    }

    /// Claims this stack's gateway accepts; tests bend them to make bad tokens.
    pub fn claims(&self) -> Claims {
        Claims::new(ISSUER, AUDIENCE, "test-user", 3600)
    }

    /// An HTTPS client that trusts only the edge's development certificate.
    pub fn https_client(&self) -> anyhow::Result<reqwest::Client> {
        https_client_trusting(&self.tls_dir().join("dev-cert.pem"), None)
    }

    /// The same, connecting from the loopback address `source` (127.0.0.2, ...): a distinct client to the edge.
    pub fn https_client_from(&self, source: std::net::IpAddr) -> anyhow::Result<reqwest::Client> {
        https_client_trusting(&self.tls_dir().join("dev-cert.pem"), Some(source))
    }

    /// `https://127.0.0.1:{edge}`
    pub fn edge_url(&self) -> String {
        format!("https://127.0.0.1:{}", self.ports.edge)
    }

    pub fn admin_url(&self, port: u16, path: &str) -> String {
        format!("http://127.0.0.1:{port}{path}")
    }
}

/// Waits up to 60 s until the admin listener on loopback `port` answers `/readyz` with 200.
pub async fn wait_admin_ready(name: &str, port: u16) -> anyhow::Result<()> {
    let http = reqwest::Client::new();
    let url = format!("http://127.0.0.1:{port}/readyz");
    eventually(Duration::from_secs(60), &format!("{name} to be ready"), || {
        let (http, url) = (&http, url.clone());
        async move { http.get(url).send().await.ok()?.status().is_success().then_some(()) }
    })
    .await
}

/// An HTTPS client whose only trust anchor is the PEM certificate at `cert`, optionally bound to `source`.
pub fn https_client_trusting(cert: &Path, source: Option<std::net::IpAddr>) -> anyhow::Result<reqwest::Client> {
    let pem = std::fs::read(cert)?;
    Ok(reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(&pem)?])
        .local_address(source)
        .timeout(Duration::from_secs(60))
        .build()?)
}

fn kv(k: &str, v: String) -> (String, String) {
    (k.to_owned(), v)
}

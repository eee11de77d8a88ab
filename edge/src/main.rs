//! The edge: the public HTTPS entrypoint, built on Pingora. Terminates TLS and forwards to the gateway.
//!
//! Signals: SIGTERM and SIGINT drain and exit 0 (stop accepting, keep serving established connections for
//! `shutdown.grace_period_secs`, then give in-flight requests up to `shutdown.timeout_secs`); SIGQUIT hands the
//! listening sockets to a new edge process started with `--upgrade` (Pingora's zero-downtime upgrade).

mod admin;
mod config;
mod proxy;
mod tls;

use std::path::PathBuf;
use std::sync::Mutex;

use anyhow::Context;
use async_trait::async_trait;
use clap::Parser;
use pingora::prelude::Opt;
use pingora::server::configuration::ServerConf;
use pingora::server::{RunArgs, Server, ShutdownSignal, ShutdownSignalWatch};
use pingora::services::background::background_service;
use service_core::admin::{AdminState, Readiness};
use service_core::metrics::Metrics;
use tokio::signal::unix::{SignalKind, signal};

use crate::config::Config;

#[derive(Parser)]
#[command(about = "HTTPS edge proxy")]
struct Cli {
    /// TOML configuration file; environment variables `EDGE_*` override it.
    #[arg(long, env = "EDGE_CONFIG")]
    config: Option<PathBuf>,
    /// Take the listening sockets over from a running edge (send it SIGQUIT).
    #[arg(long)]
    upgrade: bool,
}

/// SIGTERM and SIGINT both drain (the contract of every service here); SIGQUIT hands over to a new process.
struct Signals;

#[async_trait]
impl ShutdownSignalWatch for Signals {
    async fn recv(&self) -> ShutdownSignal {
        let (Ok(mut term), Ok(mut int), Ok(mut quit)) =
            (signal(SignalKind::terminate()), signal(SignalKind::interrupt()), signal(SignalKind::quit()))
        else {
            tracing::error!("cannot install signal handlers; shutting down");
            return ShutdownSignal::FastShutdown;
        };
        tokio::select! {
            _ = term.recv() => ShutdownSignal::GracefulTerminate,
            _ = int.recv() => ShutdownSignal::GracefulTerminate,
            _ = quit.recv() => ShutdownSignal::GracefulUpgrade,
        }
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let config: Config = service_core::config::load(cli.config.as_deref(), "EDGE_")?;
    service_core::logging::init(&config.log);

    let (cert, key) = tls::resolve_files(&config.tls)?;
    let tls_settings = tls::settings(&cert, &key)?;

    let metrics = Metrics::new("edge")?;
    let readiness = Readiness::new(&["proxy"]);
    let duration = metrics
        .meter()
        .f64_histogram("http.server.request.duration")
        .with_unit("s")
        .with_description("Duration of HTTPS requests handled by the edge, upstream time included")
        .with_boundaries(vec![0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0])
        .build();

    let admin_listener = std::net::TcpListener::bind(config.admin_listen)
        .with_context(|| format!("binding admin listener {}", config.admin_listen))?;
    admin_listener.set_nonblocking(true)?;

    let server_conf = ServerConf {
        threads: config.threads.max(1),
        grace_period_seconds: Some(config.shutdown.grace_period_secs),
        graceful_shutdown_timeout_seconds: Some(config.shutdown.timeout_secs),
        upgrade_sock: config.upgrade_sock.to_string_lossy().into_owned(),
        ..ServerConf::default()
    };
    let opt = Opt { upgrade: cli.upgrade, ..Opt::default() };
    let mut server = Server::new_with_opt_and_conf(Some(opt), server_conf);
    server.bootstrap();

    let proxy = proxy::EdgeProxy { upstream: config.upstream.address.clone(), duration };
    let mut service = pingora::proxy::http_proxy_service(&server.configuration, proxy);
    service.add_tls_with_settings(&config.listen.to_string(), None, tls_settings);
    server.add_service(service);
    server.add_service(background_service(
        "admin",
        admin::AdminService { listener: Mutex::new(Some(admin_listener)), state: AdminState { readiness, metrics } },
    ));

    tracing::info!(listen = %config.listen, admin = %config.admin_listen, upstream = %config.upstream.address,
        cert = %cert.display(), "edge starting");
    server.run(RunArgs { shutdown_signal: Box::new(Signals) });
    tracing::info!("edge stopped");
    Ok(())
}

//! The edge: the public HTTPS entrypoint, built on Pingora. Terminates TLS and forwards to the gateway.
//!
//! Signals: SIGTERM and SIGINT drain and exit 0 (stop accepting, keep serving established connections for
//! `shutdown.grace_period_secs`, then give in-flight requests up to `shutdown.timeout_secs`); SIGQUIT hands the
//! listening sockets to a new edge process started with `--upgrade` (Pingora's zero-downtime upgrade).

mod admin;
mod config;
mod connections;
mod health;
mod metric_cache;
mod proxy;
mod ratelimit;
mod redirect;
mod reload;
mod respond;
mod tls;

use edge::{access_log, wire};

/// mimalloc, not glibc's malloc: measured in `loadtest/edge-bench`, glibc's heap fragments under HTTP/2 load and
/// every later request costs ~10% more CPU (mimalloc: none), HTTP/2 itself is ~10% cheaper. Built without its
/// transparent-huge-page advice (the workspace enables the crate's `no_thp`): it advised huge pages on its arenas,
/// so every 2 MiB region it touched became resident whole (RSS under HTTP/1.1 load 46 -> 33 MiB). Only the
/// rate-limit zone tables ask for huge pages now (see `limits::table`), which is where they pay.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use async_trait::async_trait;
use clap::{Parser, Subcommand};
use edge::limiter::Limiter;
use edge::limits::Zone;
use edge::policy;
use opentelemetry::KeyValue;
use pingora::prelude::Opt;
use pingora::protocols::l4::stream::L4BufferSettings;
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
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Validate the rate-limit policy files and exit (0: valid; 1: errors, printed as file:line:column).
    Check {
        /// Policy directory (default: the configured `policy.dir`).
        #[arg(long)]
        policies: Option<PathBuf>,
    },
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

/// Every 100 ms, through the drain too: writes the buffered access log lines (the last ones are written when
/// the server has stopped), and hands back to the OS the memory the allocator has held unused for its purge
/// delay.
///
/// mimalloc returns freed memory to the OS (`MADV_DONTNEED`) only once it has been free for `purge_delay`
/// (1 s), and only when a thread calls into it after that; the proxy thread that freed it sits idle after a
/// burst. So the memory of a burst of HTTP/2 streams stayed resident until the next burst: 22.9 MiB anonymous
/// 2 s after an HTTP/2 load against 9.0 after HTTP/1.1 (`/proc/PID/smaps_rollup`; 8.0 with this).
/// `mi_collect(false)` from this thread does the purges that are due, for the whole process; when none is, it
/// costs a clock read.
struct Housekeeping;

#[async_trait]
impl pingora::services::background::BackgroundService for Housekeeping {
    async fn start(&self, _shutdown: pingora::server::ShutdownWatch) {
        let mut every = tokio::time::interval(Duration::from_millis(100));
        loop {
            every.tick().await;
            access_log::flush();
            // SAFETY: no preconditions; it touches only the allocator's own state, under its own locks.
            unsafe { libmimalloc_sys::mi_collect(false) };
        }
    }
}

/// A metrics callback observing `value` of every zone of the active policy, labelled by zone name.
fn per_zone(
    limiter: Arc<Limiter>,
    value: fn(&Zone) -> u64,
) -> impl Fn(&dyn opentelemetry::metrics::AsyncInstrument<u64>) + Send + Sync + 'static {
    move |observer| {
        let active = limiter.active();
        for (spec, zone) in active.policy.zones.iter().zip(&active.zones) {
            observer.observe(value(zone), &[KeyValue::new("zone", spec.name.clone())]);
        }
    }
}

/// Bytes read from a client's socket at a time, under TLS: 17 KiB, more than one whole TLS record (16 KiB of
/// plaintext, a 5-byte header and at most 256 bytes a cipher adds), so OpenSSL still reads a record in one go.
/// Pingora's default is 64 KiB per connection. Measured with 64 keep-alive clients (scratch A/B, release build,
/// 6 s x 3 rounds of HTTP/1.1, HTTP/2 and a handshake per request): the edge's RSS 4-4.5 MiB lower at the same
/// CPU per request (64 KiB: 35.1 MiB, 37.6 us; 17 KiB: 31.0 MiB, 38.9 us, within the rounds' spread); no buffer
/// at all cost 11% more CPU.
const CLIENT_READ_BUFFER: usize = 17 * 1024;

/// Buckets (seconds) of the request and upstream latency histograms.
const LATENCY_BUCKETS: [f64; 12] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

fn main() -> anyhow::Result<()> {
    // Before anything can make OpenSSL allocate (the configuration may generate a development certificate).
    // SAFETY: the process has one thread yet.
    let openssl_on_mimalloc = unsafe { edge::openssl_alloc::use_mimalloc() };
    let cli = Cli::parse();
    let config: Config = service_core::config::load(cli.config.as_deref(), "EDGE_")?;
    if let Some(Cmd::Check { policies }) = cli.cmd {
        let dir = policies.unwrap_or(config.policy.dir);
        return match policy::load_dir(&dir) {
            Ok(p) => {
                println!("{}: valid ({} zones, {} routes)", dir.display(), p.zones.len(), p.routes.len());
                Ok(())
            }
            Err(errors) => {
                eprintln!("{errors}");
                std::process::exit(1);
            }
        };
    }
    // Pingora's server ends the process with `exit`: nothing would flush a background writer's queue.
    let _logs = service_core::logging::init(&config.log, service_core::logging::Writer::Inline);
    if !openssl_on_mimalloc {
        tracing::warn!("OpenSSL allocated before main: its allocations stay with glibc's malloc");
    }
    let tracing = service_core::telemetry::init("edge")?;
    let initial_policy = policy::load_dir(&config.policy.dir)
        .map_err(|e| anyhow::anyhow!("invalid rate-limit policy, refusing to start:\n{e}"))?;
    let limiter = Arc::new(Limiter::new(initial_policy));

    let (cert, key) = tls::resolve_files(&config.tls)?;
    let certs = tls::CertStore::open(cert.clone(), key)?;
    let tls_settings = tls::settings(certs.clone())?;

    let metrics = Metrics::new("edge")?;
    let readiness = Readiness::new(&["proxy", "policy", "upstream"]);
    metrics.observe_readiness(&readiness);
    readiness.set("policy", true);
    let meter = metrics.meter();
    let limit_metrics = ratelimit::LimitMetrics {
        decisions: metrics.hot_counter(
            "edge_ratelimit_decisions_total",
            "Rate-limit decisions per zone and outcome",
            &["zone", "outcome"],
        )?,
        delay: meter
            .f64_histogram("edge.ratelimit.delay")
            .with_unit("s")
            .with_description("Delay imposed by a zone on accepted requests")
            .with_boundaries(vec![0.1, 0.5, 1.0, 2.0, 5.0, 10.0, 15.0, 20.0, 25.0, 30.0, 60.0])
            .build(),
    };
    let reloads =
        meter.u64_counter("edge.ratelimit.policy.reloads").with_description("Policy reloads by result").build();
    let cert_reloads =
        meter.u64_counter("edge.tls.certificate.reloads").with_description("TLS certificate reloads by result").build();
    {
        let certs = certs.clone();
        meter
            .i64_observable_gauge("edge.tls.certificate.not_after")
            .with_unit("s")
            .with_description("Expiry of the served certificate, Unix seconds")
            .with_callback(move |o| o.observe(certs.current().not_after_unix, &[]))
            .build();
    }
    meter
        .u64_observable_gauge("edge.ratelimit.tracked_keys")
        .with_description("Client keys tracked per zone")
        .with_callback(per_zone(limiter.clone(), Zone::len_u64))
        .build();
    meter
        .u64_observable_counter("edge.ratelimit.evictions")
        .with_description("Live keys evicted because a zone was full")
        .with_callback(per_zone(limiter.clone(), Zone::evictions))
        .build();
    // The three instruments recorded on every request are kept out of the SDK's per-call attribute hashing
    // (see `Metrics::hot_histogram`); names and labels are those the exporter gave them.
    let duration = metrics.hot_histogram(
        "http_server_request_duration_seconds",
        "Duration of HTTPS requests handled by the edge, upstream time included",
        LATENCY_BUCKETS.to_vec(),
        &["http_request_method", "http_response_status_code", "status_class", "http_route"],
    )?;

    let admin_listener = std::net::TcpListener::bind(config.admin_listen)
        .with_context(|| format!("binding admin listener {}", config.admin_listen))?;
    admin_listener.set_nonblocking(true)?;

    let server_conf = ServerConf {
        threads: config.threads.max(1),
        grace_period_seconds: Some(config.shutdown.grace_period_secs),
        graceful_shutdown_timeout_seconds: Some(config.shutdown.timeout_secs),
        upgrade_sock: config.upgrade_sock.to_string_lossy().into_owned(),
        work_stealing: config.work_stealing,
        // Pingora's "fast" timeouts share a clock thread that wakes 100 times a second and wakes the worker
        // threads from outside; the runtime's own timers cost the edge 6% less CPU per request (each request has a
        // few: the upstream's answer, the keep-alive wait). Only timeouts under a second (a `connect_timeout_ms`
        // below 1000, say) stay Pingora's.
        fast_timeout_to_tokio_threshold_seconds: Some(0),
        // The trust store of Pingora's upstream connectors, which the edge never consults: it speaks plain HTTP
        // to its gateways (`HttpPeer::new(.., false, ..)` in `proxy.rs`). Without a `ca_file` Pingora exports
        // `SSL_CERT_FILE` (found by openssl-probe) for the whole process and parses the system's CA bundle (~140
        // certificates) into each of its two connectors (HTTP/1, HTTP/2), where the vendored OpenSSL alone would
        // load none: 2.4 MiB of memory for the process's life (bare proxy, idle, `/proc/PID/status`). Given the
        // edge's own certificate file instead, it loads that; a shell that sets `SSL_CERT_FILE` itself still
        // has the openssl crate's `SslConnector::builder` load the bundle (not configurable). Upstream TLS, if it
        // is ever added, brings its own trust setting: with this store it would fail closed.
        ca_file: Some(tls::upstream_trust_file(&cert)?),
        ..ServerConf::default()
    };
    let opt = Opt { upgrade: cli.upgrade, ..Opt::default() };
    let mut server = Server::new_with_opt_and_conf(Some(opt), server_conf);
    server.bootstrap();

    let up = &config.upstream;
    let pool = Arc::new(edge::upstream::Pool::new(
        up.balance,
        up.max_fails,
        Duration::from_secs(up.fail_timeout_secs),
        up.health.clone(),
    ));
    {
        let pool = pool.clone();
        metrics
            .meter()
            .u64_observable_gauge("edge.upstream.healthy")
            .with_description("Whether each gateway instance passes its health checks (1) or not (0)")
            .with_callback(move |o| {
                for i in pool.instances() {
                    o.observe(u64::from(i.is_healthy()), &[KeyValue::new("instance", i.addr.to_string())]);
                }
            })
            .build();
    }
    let lim = &config.limits;
    let conns = connections::Connections::new(
        connections::Settings {
            max_connections: lim.max_connections.max(1),
            header_timeout: Duration::from_secs(lim.header_timeout_secs.max(1)),
            keepalive_timeout: Duration::from_secs(lim.keepalive_timeout_secs.max(1)),
            max_requests_per_client: lim.max_requests_per_client,
        },
        connections::Metrics {
            handshakes: meter
                .u64_counter("edge.tls.handshakes")
                .with_description("TLS handshakes by result (failed: the connection closed before completing one)")
                .build(),
            refused: meter
                .u64_counter("edge.connections.refused")
                .with_description("Connections closed before TLS, by reason")
                .build(),
            closed: meter
                .u64_counter("edge.connections.closed")
                .with_description("Connections the edge closed for sending no complete request in time, by reason")
                .build(),
        },
    );
    {
        let conns = conns.clone();
        meter
            .u64_observable_gauge("edge.connections")
            .with_description("Open client connections by state (handshaking, established)")
            .with_callback(move |o| {
                let (handshaking, established) = conns.counts();
                o.observe(handshaking, &[KeyValue::new("state", "handshaking")]);
                o.observe(established, &[KeyValue::new("state", "established")]);
            })
            .build();
    }
    let proxy = proxy::EdgeProxy {
        pool: pool.clone(),
        timeouts: proxy::PeerTimeouts {
            connect: Duration::from_millis(up.connect_timeout_ms.max(1)),
            read: Duration::from_millis(up.read_timeout_ms.max(1)),
            idle: Duration::from_secs(up.idle_timeout_secs),
        },
        max_tries: up.max_tries.max(1),
        access_log: config.access_log,
        limits: config.limits.clone(),
        conns: conns.clone(),
        upstream_duration: metrics.hot_histogram(
            "edge_upstream_duration_seconds",
            "Time from choosing a gateway instance to its response header",
            LATENCY_BUCKETS.to_vec(),
            &["instance", "status_class"],
        )?,
        retries: metrics
            .meter()
            .u64_counter("edge.upstream.retries")
            .with_description("Requests tried again on another gateway instance, by reason")
            .build(),
        duration,
        limiter: limiter.clone(),
        limit_metrics,
        tracer: service_core::telemetry::tracer("edge"),
    };
    let mut http = pingora::proxy::http_proxy(&server.configuration, proxy);
    // HTTP/2: Pingora's bounded defaults, with room above `limits.max_header_bytes` so that the edge's own
    // check answers (problem+json) and the h2 crate's bare 431 is only a backstop; idle connections close.
    let mut h2 = pingora::protocols::http::v2::server::default_h2_options();
    h2.max_header_list_size(u32::try_from(lim.max_header_bytes.saturating_mul(2).max(64 * 1024)).unwrap_or(u32::MAX));
    http.h2_options = Some(h2);
    let mut server_options = pingora::apps::HttpServerOptions::default();
    server_options.h2_idle_timeout = Some(Duration::from_secs(lim.keepalive_timeout_secs.max(1)));
    http.server_options = Some(server_options);
    let mut service = pingora::services::listening::Service::new(
        "edge".to_owned(),
        connections::Tracked { inner: Arc::new(http), conns: conns.clone() },
    );
    service.set_connection_filter(Arc::new(connections::Cap(conns.clone())));
    service.endpoints().set_pre_tls_callback(Arc::new(connections::Register(conns)));
    service.add_listener(
        pingora::listeners::ListenerConfig::tcp(config.listen.to_string())
            .tls(tls_settings)
            .l4_buffer(L4BufferSettings { read: Some(CLIENT_READ_BUFFER), write: None }),
    );
    let proxy = server.add_service(service);
    if let Some(addr) = config.redirect.listen {
        let mut redirect = pingora::services::listening::Service::new(
            "https-redirect".to_owned(),
            redirect::Redirect { https_port: config.redirect.https_port },
        );
        redirect.add_tcp(&addr.to_string());
        server.add_service(redirect);
        tracing::info!(listen = %addr, "plain-HTTP listener redirects to HTTPS");
    }
    server.add_service(background_service(
        "policy-reload",
        reload::PolicyReloader {
            dir: config.policy.dir.clone(),
            interval: Duration::from_secs(config.policy.reload_interval_secs.max(1)),
            limiter,
            reloads,
        },
    ));
    // The proxy accepts only once the upstream pool has been resolved and checked once: its instances start out
    // of rotation, and a request in between would get 503 (at start, and in a binary upgrade right after the old
    // process handed its sockets over; connections wait in the listen backlog meanwhile).
    let upstream_watch = server.add_service(background_service(
        "upstream",
        health::UpstreamWatch {
            pool,
            discovery: tokio::sync::Mutex::new(edge::upstream::Discovery::new(up.server_list())),
            resolve_every: Duration::from_secs(up.resolve_interval_secs.max(1)),
            check_every: Duration::from_millis(up.health.interval_ms.max(100)),
            readiness: readiness.clone(),
        },
    ));
    proxy.add_dependency(&upstream_watch);
    server.add_service(background_service(
        "tls-reload",
        reload::CertReloader {
            store: certs.clone(),
            interval: Duration::from_secs(config.tls.reload_interval_secs.max(1)),
            reloads: cert_reloads,
        },
    ));
    server.add_service(background_service("housekeeping", Housekeeping));
    server.add_service(background_service(
        "admin",
        admin::AdminService { listener: Mutex::new(Some(admin_listener)), state: AdminState { readiness, metrics } },
    ));

    tracing::info!(listen = %config.listen, admin = %config.admin_listen, upstream = ?config.upstream.server_list(),
        cert = %cert.display(), sha256 = %certs.current().fingerprint, "edge starting");
    server.run(RunArgs { shutdown_signal: Box::new(Signals) });
    access_log::flush();
    tracing.shutdown();
    tracing::info!("edge stopped");
    Ok(())
}

//! A Pingora HTTPS reverse proxy with no logic at all: TLS 1.2/1.3 with h2 and http/1.1 by ALPN, every request
//! to one upstream over kept-alive connections. The edge benchmark (`loadtest/edge-bench`) measures it beside
//! the edge: the difference is what the edge's own work costs.
//!
//! `bare-proxy LISTEN UPSTREAM CERT KEY [THREADS]`, e.g. `bare-proxy 127.0.0.1:9443 127.0.0.1:9080 cert.pem key.pem 1`

/// The edge's allocator, built the same way (see the edge's `main`): the floor is measured with the same one.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

// OpenSSL's allocations through mimalloc, as the edge's (the same file).
#[path = "../../../edge/src/openssl_alloc.rs"]
mod openssl_alloc;

use std::time::Duration;

use async_trait::async_trait;
use pingora::listeners::tls::TlsSettings;
use pingora::prelude::{HttpPeer, Opt, ProxyHttp, Result, Session};
use pingora::server::Server;
use pingora::server::configuration::ServerConf;

struct Bare {
    upstream: String,
    /// `BARE_PEER_TIMEOUTS=1`: the edge's default upstream timeouts (connect 1 s, read 30 s, idle 60 s). Pingora
    /// arms a runtime timer for each (an upstream read that has to wait, a connection put back in the pool), which
    /// the bare proxy without them never pays: with them it is the framework's floor as a production proxy runs it.
    timeouts: bool,
}

#[async_trait]
impl ProxyHttp for Bare {
    type CTX = ();

    fn new_ctx(&self) -> Self::CTX {}

    async fn upstream_peer(&self, _session: &mut Session, _ctx: &mut ()) -> Result<Box<HttpPeer>> {
        let mut peer = HttpPeer::new(self.upstream.as_str(), false, String::new());
        if self.timeouts {
            peer.options.connection_timeout = Some(Duration::from_secs(1));
            peer.options.read_timeout = Some(Duration::from_secs(30));
            peer.options.idle_timeout = Some(Duration::from_secs(60));
        }
        Ok(Box::new(peer))
    }
}

fn main() -> anyhow::Result<()> {
    // SAFETY: the process has one thread yet.
    anyhow::ensure!(unsafe { openssl_alloc::use_mimalloc() }, "OpenSSL allocated before main");
    let args: Vec<String> = std::env::args().collect();
    let [_, listen, upstream, cert, key, rest @ ..] = args.as_slice() else {
        anyhow::bail!("usage: bare-proxy LISTEN UPSTREAM CERT KEY [THREADS]");
    };
    let threads = rest.first().map(|t| t.parse()).transpose()?.unwrap_or(1);
    // The framework run as the edge runs it (see the edge's `main`): one single-threaded runtime per thread, the
    // runtime's own timers. `PINGORA_DEFAULTS=1`: Pingora's defaults (work stealing, its clock-thread timers).
    let defaults = std::env::var("PINGORA_DEFAULTS").is_ok_and(|v| v == "1");
    let conf = ServerConf {
        threads,
        work_stealing: defaults,
        fast_timeout_to_tokio_threshold_seconds: if defaults {
            ServerConf::default().fast_timeout_to_tokio_threshold_seconds
        } else {
            Some(0)
        },
        // As the edge: its plain-HTTP upstream needs no trust store; without this Pingora loads the system's CA
        // bundle into its two upstream connectors (2.4 MiB of heap). See `ca_file` in the edge's `main`.
        ca_file: Some(cert.clone()),
        ..ServerConf::default()
    };
    // The certificate first: an unreadable one is this error, not a panic in the upstream connector (`ca_file`).
    let mut tls = TlsSettings::intermediate(cert, key)?;
    let mut server = Server::new_with_opt_and_conf(Some(Opt::default()), conf);
    server.bootstrap();
    let mut service = pingora::proxy::http_proxy_service(
        &server.configuration,
        Bare { upstream: upstream.clone(), timeouts: std::env::var("BARE_PEER_TIMEOUTS").is_ok_and(|v| v == "1") },
    );
    tls.enable_h2();
    service.add_tls_with_settings(listen, None, tls);
    server.add_service(service);
    server.run_forever()
}

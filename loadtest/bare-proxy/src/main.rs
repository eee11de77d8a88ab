//! A Pingora HTTPS reverse proxy with no logic at all: TLS 1.2/1.3 with h2 and http/1.1 by ALPN, every request
//! to one upstream over kept-alive connections. The edge benchmark (`loadtest/edge-bench`) measures it beside
//! the edge: the difference is what the edge's own work costs.
//!
//! `bare-proxy LISTEN UPSTREAM CERT KEY [THREADS]`, e.g. `bare-proxy 127.0.0.1:9443 127.0.0.1:9080 cert.pem key.pem 1`

/// The edge's allocator (see the edge's `main`): the floor is measured with the same one.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The edge's memory setting too (see its `THP_OFF_AT_LOAD`): no transparent huge pages unless
/// `MIMALLOC_ALLOW_THP` is set, from a constructor that runs before mimalloc's.
#[cfg(target_os = "linux")]
#[used]
#[unsafe(link_section = ".init_array.00100")]
static THP_OFF_AT_LOAD: extern "C" fn() = thp_off_at_load;

#[cfg(target_os = "linux")]
extern "C" fn thp_off_at_load() {
    // SAFETY: a NUL-terminated literal; nothing writes the environment while constructors run.
    if unsafe { libc::getenv(c"MIMALLOC_ALLOW_THP".as_ptr()) }.is_null() {
        // SAFETY: PR_SET_THP_DISABLE only sets a flag on this process. A failure leaves the default (a benchmark
        // binary: the edge logs it).
        unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
    }
}

use async_trait::async_trait;
use pingora::listeners::tls::TlsSettings;
use pingora::prelude::{HttpPeer, Opt, ProxyHttp, Result, Session};
use pingora::server::Server;
use pingora::server::configuration::ServerConf;

struct Bare {
    upstream: String,
}

#[async_trait]
impl ProxyHttp for Bare {
    type CTX = ();

    fn new_ctx(&self) -> Self::CTX {}

    async fn upstream_peer(&self, _session: &mut Session, _ctx: &mut ()) -> Result<Box<HttpPeer>> {
        Ok(Box::new(HttpPeer::new(self.upstream.as_str(), false, String::new())))
    }
}

fn main() -> anyhow::Result<()> {
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
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(Some(Opt::default()), conf);
    server.bootstrap();
    let mut service = pingora::proxy::http_proxy_service(&server.configuration, Bare { upstream: upstream.clone() });
    let mut tls = TlsSettings::intermediate(cert, key)?;
    tls.enable_h2();
    service.add_tls_with_settings(listen, None, tls);
    server.add_service(service);
    server.run_forever()
}

//! The same traffic against our edge and against a real nginx with the equivalent `limit_req` configuration,
//! side by side: the same requests accepted and rejected, each accepted request leaving within ±150 ms of
//! nginx's.

use std::time::Duration;

use testkit::burst::{self, Seen};
use testkit::{Nginx, Stack, StackOptions};

const EDGE_POLICY: &str = "[zones.per_client]\nrate = \"1r/s\"\nburst = 25\n\
                           [zones.queue]\nrate = \"10r/s\"\nburst = 20\n\
                           [[routes]]\npath_prefix = \"/v1/\"\nzones = [\"per_client\"]\n\
                           [zones.multi_a]\nrate = \"2r/s\"\nburst = 3\n\
                           [zones.multi_b]\nrate = \"1r/s\"\nburst = 5\n\
                           [[routes]]\npath_prefix = \"/v1/queue\"\nzones = [\"queue\"]\n\
                           [[routes]]\npath_prefix = \"/v1/multi\"\nzones = [\"multi_a\", \"multi_b\"]\n";

const NGINX_HTTP: &str = "limit_req_zone $binary_remote_addr zone=per_client:10m rate=1r/s;\n\
                          limit_req_zone $binary_remote_addr zone=queue:10m rate=10r/s;\n\
                          limit_req_zone $binary_remote_addr zone=multi_a:10m rate=2r/s;\n\
                          limit_req_zone $binary_remote_addr zone=multi_b:10m rate=1r/s;\n\
                          limit_req_status 429;";

const NGINX_LOCATIONS: &str = "location /v1/queue { limit_req zone=queue burst=20; try_files /x =404; }\n\
                               location /v1/multi { limit_req zone=multi_a burst=3; limit_req zone=multi_b burst=5; \
                               try_files /x =404; }\n\
                               location /v1/ { limit_req zone=per_client burst=25; try_files /x =404; }";

/// One server under test: its base URL and a client from `source` with an open connection.
async fn client(ca: &std::path::Path, base: &str, source: &str) -> anyhow::Result<reqwest::Client> {
    burst::warm_client(ca, source, &format!("{base}/warmup")).await
}

/// The same burst from `source` against both servers at once: (edge, nginx).
async fn side_by_side(
    ca: &std::path::Path,
    edge_url: &str,
    nginx_url: &str,
    source: &str,
    path: &str,
    n: usize,
) -> anyhow::Result<(Vec<Seen>, Vec<Seen>)> {
    let (e, ng) = (client(ca, edge_url, source).await?, client(ca, nginx_url, source).await?);
    let (edge_target, nginx_target) = (format!("{edge_url}{path}"), format!("{nginx_url}{path}"));
    tokio::try_join!(burst::burst(&e, &edge_target, n), burst::burst(&ng, &nginx_target, n))
}

fn compare(case: &str, ours: &[Seen], nginx: &[Seen]) {
    let (our_ok, our_rejected) = burst::split(ours, 429);
    let (their_ok, their_rejected) = burst::split(nginx, 429);
    assert_eq!(
        (our_ok.len(), our_rejected.len()),
        (their_ok.len(), their_rejected.len()),
        "{case}: accepted/rejected differ\nours: {ours:?}\nnginx: {nginx:?}"
    );
    for (k, (a, b)) in our_ok.iter().zip(&their_ok).enumerate() {
        assert!(
            a.at.abs_diff(b.at) <= Duration::from_millis(150),
            "{case}: accepted request {k} left at {:?} on the edge, {:?} on nginx",
            a.at,
            b.at
        );
    }
    for r in our_rejected {
        assert!(r.at <= Duration::from_millis(100), "{case}: a rejection waited: {r:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_edge_limits_exactly_like_nginx() -> anyhow::Result<()> {
    let stack =
        Stack::start(StackOptions { workers: false, policy: EDGE_POLICY.to_owned(), ..StackOptions::default() })
            .await?;
    let ca = stack.tls_dir().join("dev-cert.pem");
    let nginx = Nginx::start(NGINX_HTTP, NGINX_LOCATIONS, &ca, &stack.tls_dir().join("dev-key.pem")).await?;
    let (edge_url, nginx_url) = (stack.edge_url(), nginx.url());

    // Each case from its own address, on both servers at the same time.
    let forty = side_by_side(&ca, &edge_url, &nginx_url, "127.0.0.30", "/v1/x", 40);
    let twenty_six = side_by_side(&ca, &edge_url, &nginx_url, "127.0.0.31", "/v1/x", 26);
    // Two limits on one route: checked in order, the first rejection charges nothing, the longest delay wins.
    let multi = side_by_side(&ca, &edge_url, &nginx_url, "127.0.0.33", "/v1/multi", 8);
    let second_burst = async {
        let (e, n) = (client(&ca, &edge_url, "127.0.0.32").await?, client(&ca, &nginx_url, "127.0.0.32").await?);
        let run = |c: reqwest::Client, url: String| async move {
            let first = tokio::spawn({
                let (c, url) = (c.clone(), url.clone());
                async move { burst::burst(&c, &url, 10).await }
            });
            tokio::time::sleep(Duration::from_millis(300)).await;
            let second = burst::burst(&c, &url, 5).await?;
            let first = first.await??;
            anyhow::Ok((first, second))
        };
        let ((e1, e2), (n1, n2)) =
            tokio::try_join!(run(e, format!("{edge_url}/v1/queue")), run(n, format!("{nginx_url}/v1/queue")))?;
        anyhow::Ok(((e1, n1), (e2, n2)))
    };
    let (forty, twenty_six, multi, ((first_e, first_n), (second_e, second_n))) =
        tokio::try_join!(forty, twenty_six, multi, second_burst)?;

    compare("40 at once", &forty.0, &forty.1);
    assert_eq!(burst::split(&forty.1, 429).1.len(), 14, "nginx itself rejects 14 of 40: {:?}", forty.1);
    compare("26 at once", &twenty_six.0, &twenty_six.1);
    compare("two zones on one route", &multi.0, &multi.1);
    assert_eq!(burst::split(&multi.1, 429).1.len(), 4, "nginx: multi_a (burst 3) lets 4 of 8 through: {:?}", multi.1);
    compare("first burst", &first_e, &first_n);
    compare("second burst", &second_e, &second_n);
    Ok(())
}

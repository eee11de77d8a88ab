//! The edge's rate limits through the real binary over HTTPS, each client a distinct loopback address.
//! Timings are checked with the issue's tolerance (±150 ms) against nginx's schedule.

use std::time::Duration;

use testkit::burst::{self, Seen};
use testkit::{Stack, StackOptions, eventually};

async fn stack_with(policy: &str) -> anyhow::Result<Stack> {
    Stack::start(StackOptions { workers: false, policy: policy.to_owned(), ..StackOptions::default() }).await
}

/// A client from `source` whose TLS connection is already open (through the unlimited `/warmup`).
async fn warm_client(stack: &Stack, source: &str) -> anyhow::Result<reqwest::Client> {
    burst::warm_client(&stack.tls_dir().join("dev-cert.pem"), source, &format!("{}/warmup", stack.edge_url())).await
}

/// Sends `n` GETs to `path` at once; what each saw, sorted by completion.
async fn burst(stack: &Stack, client: &reqwest::Client, path: &str, n: usize) -> Vec<Seen> {
    burst::burst(client, &format!("{}{path}", stack.edge_url()), n).await.expect("burst")
}

/// Asserts the accepted requests completed on nginx's schedule: the k-th at k * `step` (±150 ms).
fn assert_schedule(accepted: &[&Seen], step_ms: u64, immediate: usize) {
    for (k, s) in accepted.iter().enumerate() {
        let expected = Duration::from_millis(k.saturating_sub(immediate - 1) as u64 * step_ms);
        let expected = if k < immediate { Duration::ZERO } else { expected };
        let diff = s.at.abs_diff(expected);
        assert!(
            diff <= Duration::from_millis(150),
            "request {k} completed at {:?}, expected {expected:?} ±150ms",
            s.at
        );
    }
}

const LIMITED_V1: &str = "[zones.per_client]\nrate = \"1r/s\"\nburst = 25\n\
                          [[routes]]\npath_prefix = \"/v1/\"\nzones = [\"per_client\"]\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bursts_of_26_and_40_follow_nginx_and_clients_are_independent() -> anyhow::Result<()> {
    let stack = stack_with(LIMITED_V1).await?;
    let (a, b) = (warm_client(&stack, "127.0.0.2").await?, warm_client(&stack, "127.0.0.3").await?);
    let (forty, twenty_six) = tokio::join!(burst(&stack, &a, "/v1/x", 40), burst(&stack, &b, "/v1/x", 26));

    let rejected: Vec<&Seen> = forty.iter().filter(|s| s.status == 429).collect();
    let accepted: Vec<&Seen> = forty.iter().filter(|s| s.status != 429).collect();
    assert_eq!((accepted.len(), rejected.len()), (26, 14), "{forty:?}");
    for r in &rejected {
        assert!(r.at <= Duration::from_millis(100), "rejections are immediate: {r:?}");
        assert_eq!(r.content_type.as_deref(), Some("application/problem+json"));
        assert!(r.retry_after.is_some_and(|s| s >= 1), "{r:?}");
    }
    assert_schedule(&accepted, 1000, 1);
    // The IETF headers on every answer: the zone's quota (burst + 1) and window, and the room left after this
    // request (the whole burst of 25 for the first, none once it is used up; none on a rejection) with the
    // seconds until all of it is back (at 1r/s: room + seconds = 25).
    let room = |s: &Seen| {
        assert_eq!(s.ratelimit_policy.as_deref(), Some("\"per_client\";q=26;w=26"), "{s:?}");
        let text = s.ratelimit.as_deref().unwrap_or_else(|| panic!("no RateLimit: {s:?}"));
        let fields = text.strip_prefix("\"per_client\";r=").and_then(|t| t.split_once(";t="));
        let (r, t) = fields.unwrap_or_else(|| panic!("RateLimit {text:?}"));
        let (r, t): (u64, u64) = (r.parse().expect("r"), t.parse().expect("t"));
        assert_eq!(r + t, 25, "{s:?}");
        r
    };
    assert!(rejected.iter().all(|s| room(s) == 0), "{rejected:?}");
    let left: Vec<u64> = accepted.iter().map(|s| room(s)).collect();
    assert_eq!((left.iter().max(), left.iter().min()), (Some(&25), Some(&0)), "{accepted:?}");

    assert!(twenty_six.iter().all(|s| s.status != 429), "26 at once are all accepted: {twenty_six:?}");
    assert_schedule(&twenty_six.iter().collect::<Vec<_>>(), 1000, 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nodelay_delay_n_second_burst_and_dry_run() -> anyhow::Result<()> {
    let policy = "[zones.nodelay]\nrate = \"2r/s\"\nburst = 5\nmode = \"nodelay\"\n\
                  [zones.paced]\nrate = \"10r/s\"\nburst = 5\nmode = \"delay=2\"\n\
                  [zones.queue]\nrate = \"10r/s\"\nburst = 20\n\
                  [zones.observe]\nrate = \"1r/s\"\nburst = 1\ndry_run = true\n\
                  [[routes]]\npath_prefix = \"/v1/nodelay\"\nzones = [\"nodelay\"]\n\
                  [[routes]]\npath_prefix = \"/v1/paced\"\nzones = [\"paced\"]\n\
                  [[routes]]\npath_prefix = \"/v1/queue\"\nzones = [\"queue\"]\n\
                  [[routes]]\npath_prefix = \"/v1/observe\"\nzones = [\"observe\"]\n";
    let stack = stack_with(policy).await?;

    // nodelay: burst + 1 pass at once, the rest are rejected, nobody waits.
    let c = warm_client(&stack, "127.0.0.4").await?;
    let seen = burst(&stack, &c, "/v1/nodelay", 9).await;
    assert_eq!(seen.iter().filter(|s| s.status == 429).count(), 3, "{seen:?}");
    assert!(seen.iter().all(|s| s.at <= Duration::from_millis(150)), "{seen:?}");

    // delay=2 at 10r/s: the first 3 at once, then one every 100 ms.
    let c = warm_client(&stack, "127.0.0.5").await?;
    let seen = burst(&stack, &c, "/v1/paced", 6).await;
    assert!(seen.iter().all(|s| s.status != 429), "{seen:?}");
    assert_schedule(&seen.iter().collect::<Vec<_>>(), 100, 3);

    // A second burst queues behind the first one's schedule: 10 at once, then 5 more 300 ms later.
    let c = warm_client(&stack, "127.0.0.6").await?;
    let first: Vec<_> = (0..10)
        .map(|_| {
            let (c, url) = (c.clone(), format!("{}/v1/queue", stack.edge_url()));
            tokio::spawn(async move { c.get(url).send().await.map(|r| r.status().as_u16()) })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let second = burst(&stack, &c, "/v1/queue", 5).await;
    for f in first {
        assert_ne!(f.await??, 429);
    }
    // The first burst's last request leaves at 900 ms; the second's follow at 1000..1400 ms after the start.
    for (k, s) in second.iter().enumerate() {
        assert_ne!(s.status, 429);
        let expected = Duration::from_millis(1000 + 100 * k as u64);
        let at = s.at + Duration::from_millis(300);
        assert!(at.abs_diff(expected) <= Duration::from_millis(150), "second burst {k}: {at:?} vs {expected:?}");
    }

    // Dry run: nothing waits, nothing is rejected, and the would-be decisions are counted.
    let c = warm_client(&stack, "127.0.0.7").await?;
    let seen = burst(&stack, &c, "/v1/observe", 5).await;
    assert!(seen.iter().all(|s| s.status != 429 && s.at <= Duration::from_millis(150)), "{seen:?}");
    let metrics = reqwest::get(stack.admin_url(stack.ports.edge_admin, "/metrics")).await?.text().await?;
    let count = |outcome: &str| {
        let label = format!("outcome=\"{outcome}\"");
        testkit::metric(&metrics, "edge_ratelimit_decisions_total", &["zone=\"observe\"", &label])
    };
    assert_eq!(count("dry_run_rejected"), 3.0, "{metrics}");
    assert_eq!(count("dry_run_delayed"), 1.0, "{metrics}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_valid_policy_change_applies_and_an_invalid_one_is_refused() -> anyhow::Result<()> {
    let tight = "[zones.z]\nrate = \"1r/s\"\nburst = 0\nmode = \"nodelay\"\n[[routes]]\npath_prefix = \"/v1/\"\nzones = [\"z\"]\n";
    let stack = stack_with(tight).await?;
    let c = warm_client(&stack, "127.0.0.8").await?;
    let seen = burst(&stack, &c, "/v1/r", 3).await;
    assert_eq!(seen.iter().filter(|s| s.status == 429).count(), 2);

    // A broken file: refused, counted, the old policy stays.
    std::fs::write(stack.policy_dir().join("policy.toml"), "[zones.z]\nrate = \"lots\"\n")?;
    let metrics_url = stack.admin_url(stack.ports.edge_admin, "/metrics");
    eventually(Duration::from_secs(10), "the refused reload to be counted", || {
        let url = metrics_url.clone();
        async move {
            let m = reqwest::get(url).await.ok()?.text().await.ok()?;
            (testkit::metric(&m, "edge_ratelimit_policy_reloads_total", &["result=\"failed\""]) > 0.0).then_some(())
        }
    })
    .await?;
    let c = warm_client(&stack, "127.0.0.9").await?;
    let seen = burst(&stack, &c, "/v1/r", 3).await;
    assert_eq!(seen.iter().filter(|s| s.status == 429).count(), 2, "old policy still in force");

    // A valid change: applied without a restart. The route gets a name: the request metrics carry it from then
    // on (the edge remembers metric children per thread keyed by the address of the route's name as loaded,
    // which a reload replaces: new keys, looked up in the family again).
    let renamed = tight.replace("burst = 0", "burst = 10").replace("[[routes]]\n", "[[routes]]\nname = \"renamed\"\n");
    std::fs::write(stack.policy_dir().join("policy.toml"), renamed)?;
    let c = warm_client(&stack, "127.0.0.10").await?;
    eventually(Duration::from_secs(10), "the new policy", || {
        let (c, url) = (c.clone(), format!("{}/v1/r", stack.edge_url()));
        async move {
            let mut ok = 0;
            for _ in 0..3 {
                if c.get(&url).send().await.ok()?.status() != 429 {
                    ok += 1;
                }
            }
            (ok == 3).then_some(())
        }
    })
    .await?;
    let m = reqwest::get(metrics_url).await?.text().await?;
    // Requests by route, whatever their status.
    let by_route = |route: &str| -> f64 {
        let label = format!("http_route=\"{route}\"");
        m.lines()
            .filter(|l| l.starts_with("http_server_request_duration_seconds_count{") && l.contains(&label))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    assert!(by_route("renamed") >= 3.0, "{m}");
    assert!(by_route("/v1/") >= 6.0, "the two bursts before the change, under the old name: {m}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edge_check_reports_file_line_and_reason() -> anyhow::Result<()> {
    let dir = tempfile_dir()?;
    std::fs::write(dir.join("bad.toml"), "[zones.z]\nrate = \"1r/s\"\nmode = \"later\"\n")?;
    let out =
        std::process::Command::new(testkit::bin_path("edge")).arg("check").arg("--policies").arg(&dir).output()?;
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.toml:3:8: mode \"later\" is invalid"), "{err}");
    let repo_policies = concat!(env!("CARGO_MANIFEST_DIR"), "/../policies");
    let out = std::process::Command::new(testkit::bin_path("edge"))
        .arg("check")
        .arg("--policies")
        .arg(repo_policies)
        .output()?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

fn tempfile_dir() -> anyhow::Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("edge-check-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x_forwarded_for_counts_only_from_trusted_proxies() -> anyhow::Result<()> {
    let policy = "[client]\ntrusted_proxies = [\"127.0.0.40/32\"]\n\
                  [zones.ip]\nrate = \"1r/m\"\nburst = 0\nmode = \"nodelay\"\n\
                  [[routes]]\npath_prefix = \"/v1/\"\nzones = [\"ip\"]\n";
    let stack = stack_with(policy).await?;
    let get = |c: reqwest::Client, xff: &'static str| {
        let url = format!("{}/v1/x", stack.edge_url());
        async move { anyhow::Ok(c.get(url).header("x-forwarded-for", xff).send().await?.status().as_u16()) }
    };
    let proxy = warm_client(&stack, "127.0.0.40").await?;
    // Behind the trusted proxy, each forwarded client has its own bucket; a spoofed left part changes nothing.
    assert_ne!(get(proxy.clone(), "198.51.100.1").await?, 429);
    assert_eq!(get(proxy.clone(), "6.6.6.6, 198.51.100.1").await?, 429, "same client, spoofed prefix");
    assert_ne!(get(proxy.clone(), "198.51.100.2").await?, 429, "another client behind the proxy");
    // From an untrusted peer the header is ignored: the peer is the client, whatever it claims.
    let direct = warm_client(&stack, "127.0.0.41").await?;
    assert_ne!(get(direct.clone(), "198.51.100.3").await?, 429);
    assert_eq!(get(direct.clone(), "198.51.100.4").await?, 429, "spoofing a new address does not buy a bucket");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_zones_on_one_route_the_first_rejection_charges_nothing() -> anyhow::Result<()> {
    let policy = "[zones.ip]\nrate = \"1r/m\"\nburst = 5\nmode = \"nodelay\"\n\
                  [zones.tenant]\nkey = \"header:x-tenant\"\nrate = \"1r/m\"\nburst = 2\nmode = \"nodelay\"\nstatus = 503\n\
                  [[routes]]\npath_prefix = \"/v1/\"\nzones = [\"ip\", \"tenant\"]\n";
    let stack = stack_with(policy).await?;
    let c = warm_client(&stack, "127.0.0.50").await?;
    let url = format!("{}/v1/x", stack.edge_url());
    let mut statuses = Vec::new();
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    for tenant in ["a", "a", "a", "a", "b", "b", "b", "c"] {
        let traceparent = format!("00-{trace_id}-00f067aa0ba902b7-01");
        let r = c.get(&url).header("x-tenant", tenant).header("traceparent", traceparent).send().await?;
        statuses.push(r.status().as_u16());
    }
    let limited: Vec<u16> = statuses.iter().map(|s| if *s == 429 || *s == 503 { *s } else { 0 }).collect();
    // a: 3 pass, the 4th is refused by the tenant zone (503) without charging the address zone;
    // b: 3 pass (the address zone now holds 5 = its burst); c: refused by the address zone (429).
    assert_eq!(limited, vec![0, 0, 0, 503, 0, 0, 0, 429], "{statuses:?}");
    // Each refusal is logged with the zone and the trace's id (the client's trace, continued by the edge).
    let edge = stack.edge.as_ref().ok_or_else(|| anyhow::anyhow!("no edge"))?;
    eventually(Duration::from_secs(5), "two 'rate limited' lines with the trace id", || {
        let log = edge.log_text();
        let lines = log
            .lines()
            .filter(|l| l.contains("rate limited") && l.contains(&format!("trace_id={trace_id}")))
            .map(str::to_owned)
            .collect::<Vec<_>>();
        let zones = ["zone=tenant", "zone=ip"].iter().all(|z| lines.iter().any(|l| l.contains(z)));
        async move { zones.then_some(()) }
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv6_clients_are_keyed_by_their_64_prefix() -> anyhow::Result<()> {
    // IPv6 clients reach the edge through a trusted load balancer here (loopback has one IPv6 address only).
    let policy = "[client]\ntrusted_proxies = [\"127.0.0.60/32\"]\nipv6_prefix = 64\n\
                  [zones.ip]\nrate = \"1r/m\"\nburst = 1\nmode = \"nodelay\"\n\
                  [[routes]]\npath_prefix = \"/v1/\"\nzones = [\"ip\"]\n";
    let stack = stack_with(policy).await?;
    let lb = warm_client(&stack, "127.0.0.60").await?;
    let url = format!("{}/v1/x", stack.edge_url());
    let mut statuses = Vec::new();
    for client in ["2001:db8:1:2::1", "2001:db8:1:2:ffff::9", "2001:db8:1:2::7", "2001:db8:1:3::1"] {
        statuses.push(lb.get(&url).header("x-forwarded-for", client).send().await?.status().as_u16() == 429);
    }
    // Three hosts of one /64 share a bucket of 2 (the third is refused); another /64 has its own.
    assert_eq!(statuses, vec![false, false, true, false]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_waiting_in_a_bucket_survive_reloads() -> anyhow::Result<()> {
    let paced = "[zones.z]\nrate = \"5r/s\"\nburst = 20\n[[routes]]\npath_prefix = \"/v1/\"\nzones = [\"z\"]\n";
    let stack = stack_with(paced).await?;
    let c = warm_client(&stack, "127.0.0.70").await?;
    // 15 at once: they leave over 2.8 s. Meanwhile the policy changes twice (the zone itself, then back).
    let waiting = tokio::spawn({
        let (c, url) = (c.clone(), format!("{}/v1/wait", stack.edge_url()));
        async move { burst::burst(&c, &url, 15).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    std::fs::write(stack.policy_dir().join("policy.toml"), paced.replace("burst = 20", "burst = 30"))?;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    std::fs::write(stack.policy_dir().join("policy.toml"), paced)?;
    let seen = waiting.await??;
    assert_eq!(seen.len(), 15);
    assert!(seen.iter().all(|s| s.status != 429), "every admitted request is served: {seen:?}");
    assert!(seen.last().is_some_and(|s| s.at >= Duration::from_millis(2600)), "they really waited: {seen:?}");
    let metrics = reqwest::get(stack.admin_url(stack.ports.edge_admin, "/metrics")).await?.text().await?;
    let reloads = testkit::metric(&metrics, "edge_ratelimit_policy_reloads_total", &["result=\"ok\""]);
    assert!(reloads >= 1.0, "{metrics}");
    Ok(())
}

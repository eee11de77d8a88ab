//! The edge's certificate: checked at start (an expired certificate or a key that does not match stops it with
//! the reason), and reloaded without a restart when its files change, as cert-manager rewrites a Secret: new
//! connections get the new certificate; a bad replacement is refused, counted, and the old one stays served.

use std::path::Path;
use std::time::{Duration, Instant};

use testkit::certs::{Pair, self_signed, served_certificate};
use testkit::{Service, Stack, StackOptions, bin_path, eventually, free_port, https_client_trusting, metric};

/// Replaces the live files with `cert` and `key` the way a Secret volume does: new files renamed into place.
fn install(cert: &Path, key: &Path, live: &Path) -> anyhow::Result<()> {
    for (from, name) in [(key, "tls.key"), (cert, "tls.crt")] {
        let tmp = live.join(format!(".{name}.new"));
        std::fs::copy(from, &tmp)?;
        std::fs::rename(&tmp, live.join(name))?;
    }
    Ok(())
}

async fn served(port: u16) -> anyhow::Result<String> {
    tokio::task::spawn_blocking(move || served_certificate(port)).await?
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_certificate_is_reloaded_without_a_restart_and_bad_ones_are_refused() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let live = dir.path().join("live");
    std::fs::create_dir_all(&live)?;
    let day = 86_400;
    let a = self_signed(dir.path(), "a", -60, day)?;
    let b = self_signed(dir.path(), "b", -60, day)?;
    let expired = self_signed(dir.path(), "expired", -2 * day, -day)?;
    install(&a.cert, &a.key, &live)?;
    let edge = |k: &str, v: String| ("edge", k.to_owned(), v);
    let stack = Stack::start(StackOptions {
        gateway: false,
        workers: false,
        env: vec![
            edge("EDGE_TLS__CERT_PATH", live.join("tls.crt").display().to_string()),
            edge("EDGE_TLS__KEY_PATH", live.join("tls.key").display().to_string()),
            edge("EDGE_TLS__RELOAD_INTERVAL_SECS", "1".into()),
        ],
        ..StackOptions::default()
    })
    .await?;
    let port = stack.ports.edge;
    let url = format!("https://localhost:{port}/v1/echo");
    assert_eq!(served(port).await?, a.sha256);
    assert_eq!(https_client_trusting(&a.cert, None)?.get(&url).send().await?.status(), 200);

    // Rotation: new connections get the new certificate within a reload interval.
    let rotated = Instant::now();
    install(&b.cert, &b.key, &live)?;
    eventually(Duration::from_secs(10), "the new certificate to be served", || async {
        (served(port).await.ok()? == b.sha256).then_some(())
    })
    .await?;
    println!("new certificate served {:?} after the files changed", rotated.elapsed());
    assert_eq!(https_client_trusting(&b.cert, None)?.get(&url).send().await?.status(), 200);

    // Bad replacements are refused: an expired certificate, then a key of another certificate.
    let admin = reqwest::Client::new();
    let metrics_url = stack.admin_url(stack.ports.edge_admin, "/metrics");
    for (bad, cert, key, reason) in
        [("expired", &expired.cert, &expired.key, "expired on"), ("mismatched", &a.cert, &b.key, "does not match")]
    {
        let before = metric(
            &admin.get(&metrics_url).send().await?.text().await?,
            "edge_tls_certificate_reloads_total",
            &["result=\"failed\""],
        );
        install(cert, key, &live)?;
        let log = eventually(Duration::from_secs(10), &format!("the {bad} certificate to be refused"), || async {
            let log = stack.edge.as_ref()?.log_text();
            (log.matches("TLS certificate refused").count() as f64 > before && log.contains(reason)).then_some(log)
        })
        .await?;
        assert!(log.contains(reason), "{bad}");
        let failed = metric(
            &admin.get(&metrics_url).send().await?.text().await?,
            "edge_tls_certificate_reloads_total",
            &["result=\"failed\""],
        );
        assert!(failed >= before + 1.0, "{bad} refusal counted (and retried every interval)");
        assert_eq!(served(port).await?, b.sha256, "after the {bad} one, the previous certificate is still served");
    }
    let text = admin.get(&metrics_url).send().await?.text().await?;
    assert!(metric(&text, "edge_tls_certificate_not_after_seconds", &[]) > 1.7e9, "{text}");
    assert!(metric(&text, "edge_tls_certificate_reloads_total", &["result=\"ok\""]) >= 1.0);

    // At start, the same checks stop the edge with the reason.
    for (bad, pair, key, reason) in [
        ("expired", &expired, &expired.key, "expired on"),
        ("mismatched", &a, &b.key, "does not match the certificate"),
    ] {
        let status_and_log = refused_start(&stack, pair, key, dir.path()).await?;
        assert!(status_and_log.1.contains(reason), "{bad}: {}", status_and_log.1);
        assert!(!status_and_log.0, "{bad}: the edge must not start");
    }
    Ok(())
}

/// Starts another edge with `pair.cert` and `key`; returns whether it was still running after 10 s, and its log.
async fn refused_start(stack: &Stack, pair: &Pair, key: &Path, dir: &Path) -> anyhow::Result<(bool, String)> {
    let name = format!("edge-refused-{}", free_port());
    let env: Vec<(String, String)> = [
        ("EDGE_LISTEN", format!("127.0.0.1:{}", free_port())),
        ("EDGE_ADMIN_LISTEN", format!("127.0.0.1:{}", free_port())),
        ("EDGE_UPSTREAM__ADDRESS", format!("127.0.0.1:{}", stack.ports.gateway)),
        ("EDGE_POLICY__DIR", stack.policy_dir().display().to_string()),
        ("EDGE_UPGRADE_SOCK", dir.join(format!("{name}.sock")).display().to_string()),
        ("EDGE_TLS__CERT_PATH", pair.cert.display().to_string()),
        ("EDGE_TLS__KEY_PATH", key.display().to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    let mut edge = Service::spawn(&name, &bin_path("edge"), &[], &env, dir)?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Some(status) = edge.exited() {
            assert!(!status.success());
            return Ok((false, edge.log_text()));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok((true, edge.log_text()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_plain_http_listener_only_redirects_to_https() -> anyhow::Result<()> {
    let redirect_port = free_port();
    let edge = |k: &str, v: String| ("edge", k.to_owned(), v);
    let mut opts = StackOptions { gateway: false, workers: false, ..StackOptions::default() };
    opts.env.push(edge("EDGE_REDIRECT__LISTEN", format!("127.0.0.1:{redirect_port}")));
    let _stack = Stack::start(opts).await?;
    // Without `redirect.https_port` the Location names no port: the standard 443 of a public load balancer.
    testkit::wait_listening(redirect_port, Duration::from_secs(10), "the redirect listener").await?;
    let http = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build()?;
    let base = format!("http://localhost:{redirect_port}");

    let r = http.get(format!("{base}/v1/orders/42?verbose=1")).send().await?;
    assert_eq!(r.status(), 301);
    assert_eq!(r.headers()["location"], "https://localhost/v1/orders/42?verbose=1");
    let r = http.post(format!("{base}/v1/orders")).body("{}").send().await?;
    assert_eq!(r.status(), 308, "other methods keep their method");
    assert_eq!(r.headers()["location"], "https://localhost/v1/orders");

    // HTTP/1.0 without Host: no redirect to a made-up host.
    let raw = tokio::task::spawn_blocking(move || -> anyhow::Result<String> {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", redirect_port))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(b"GET / HTTP/1.0\r\nConnection: close\r\n\r\n")?;
        // The answer, up to the end of its headers (whether the server then closes is not the point here).
        let (mut out, mut buf) = (Vec::new(), [0u8; 1024]);
        while !out.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = s.read(&mut buf)?;
            anyhow::ensure!(n > 0, "closed without an answer");
            out.extend_from_slice(&buf[..n]);
        }
        Ok(String::from_utf8_lossy(&out).into_owned())
    })
    .await??;
    assert!(raw.starts_with("HTTP/1.0 400") || raw.starts_with("HTTP/1.1 400"), "{raw}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_redirect_names_the_public_https_port_and_leads_to_the_api() -> anyhow::Result<()> {
    let (redirect_port, https_port) = (free_port(), free_port());
    let edge = |k: &str, v: String| ("edge", k.to_owned(), v);
    let mut opts = StackOptions { gateway: false, workers: false, ..StackOptions::default() };
    opts.env.push(edge("EDGE_REDIRECT__LISTEN", format!("127.0.0.1:{redirect_port}")));
    opts.env.push(edge("EDGE_REDIRECT__HTTPS_PORT", https_port.to_string()));
    opts.env.push(edge("EDGE_LISTEN", format!("127.0.0.1:{https_port}")));
    let stack = Stack::start(opts).await?;
    testkit::wait_listening(redirect_port, Duration::from_secs(10), "the redirect listener").await?;
    let http = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build()?;
    let r = http.get(format!("http://127.0.0.1:{redirect_port}/v1/echo")).send().await?;
    assert_eq!(r.status(), 301);
    let location = r.headers()["location"].to_str()?.to_owned();
    assert_eq!(location, format!("https://127.0.0.1:{https_port}/v1/echo"));
    // Following it reaches the API over TLS.
    let https = https_client_trusting(&stack.tls_dir().join("dev-cert.pem"), None)?;
    assert_eq!(https.get(&location).send().await?.status(), 200);
    Ok(())
}

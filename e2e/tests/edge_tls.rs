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
    let _echo = testkit::echo::start(stack.ports.gateway).await?;
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
        assert_eq!(failed, before + 1.0, "{bad} refusal counted");
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

//! The edge's protective limits, each with its answer and the connection state a client sees: heads with too
//! many or too large header fields (431), a slowloris client that never completes its head (closed while
//! other clients are served), HTTP/1.0 without keep-alive (closed after the response), a kept-alive connection
//! left idle (closed after `keepalive_timeout_secs`, not while in use), a client that stalls its body (408, and
//! the instance is not blamed), requests in flight per client (429), and the global connection cap (closed
//! before TLS), with the connection and handshake metrics.

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};

use testkit::{Stack, StackOptions, metric};

async fn edge_stack(extra: &[(&str, &str)]) -> anyhow::Result<Stack> {
    let env = extra.iter().map(|(k, v)| ("edge", (*k).to_owned(), (*v).to_owned())).collect();
    // No gateway: the edge forwards to testkit's echo upstream, which reads bodies and can answer slowly.
    Stack::start(StackOptions { gateway: false, workers: false, env, ..StackOptions::default() }).await
}

/// An HTTP/1.1-only client trusting the edge's certificate.
fn http1_client(stack: &Stack) -> anyhow::Result<reqwest::Client> {
    let pem = std::fs::read(stack.tls_dir().join("dev-cert.pem"))?;
    Ok(reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(&pem)?])
        .http1_only()
        .timeout(Duration::from_secs(30))
        .build()?)
}

/// A raw TLS connection to the edge (blocking), to send exactly the bytes a test wants.
fn tls_connect(port: u16, ca: &Path) -> anyhow::Result<openssl::ssl::SslStream<TcpStream>> {
    let mut builder = openssl::ssl::SslConnector::builder(openssl::ssl::SslMethod::tls_client())?;
    builder.set_ca_file(ca)?;
    builder.set_alpn_protos(b"\x08http/1.1")?;
    let tcp = TcpStream::connect(("127.0.0.1", port))?;
    tcp.set_read_timeout(Some(Duration::from_secs(15)))?;
    Ok(builder.build().connect("localhost", tcp)?)
}

/// One HTTP/1.1 response read off `tls` (head and a `Content-Length` body): its status line.
fn read_response(tls: &mut openssl::ssl::SslStream<TcpStream>) -> anyhow::Result<String> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&got[..end]).into_owned();
            let length = head
                .lines()
                .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse::<usize>()))
                .transpose()?
                .unwrap_or(0);
            if got.len() >= end + 4 + length {
                return Ok(head.lines().next().unwrap_or_default().to_owned());
            }
        }
        let n = tls.read(&mut buf)?;
        anyhow::ensure!(n > 0, "the connection closed mid-response");
        got.extend_from_slice(&buf[..n]);
    }
}

/// Waits (up to the socket's read timeout) for the edge to close `tls`. The edge sends no TLS close_notify, which
/// OpenSSL 3 may report as an unexpected end of file: that is a close too; the read timeout is not.
fn expect_closed(tls: &mut openssl::ssl::SslStream<TcpStream>, what: &str) -> anyhow::Result<()> {
    let mut buf = [0u8; 64];
    match tls.read(&mut buf) {
        Ok(0) => Ok(()),
        Ok(n) => anyhow::bail!("{what} got {n} more bytes"),
        Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
            anyhow::bail!("{what} was not closed: {e}")
        }
        Err(_) => Ok(()),
    }
}

async fn metrics(stack: &Stack) -> anyhow::Result<String> {
    Ok(reqwest::get(stack.admin_url(stack.ports.edge_admin, "/metrics")).await?.text().await?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heads_over_the_limits_get_431_and_the_connection_is_closed() -> anyhow::Result<()> {
    let stack = edge_stack(&[("EDGE_LIMITS__MAX_HEADERS", "20"), ("EDGE_LIMITS__MAX_HEADER_BYTES", "4096")]).await?;
    let url = format!("{}/v1/anything", stack.edge_url());
    for (name, client) in [("HTTP/1.1", http1_client(&stack)?), ("HTTP/2", stack.https_client()?)] {
        let ok = client.get(&url).header("x-small", "v").send().await?;
        assert_eq!(ok.status(), 200, "{name}: a modest head passes");

        let mut many = client.get(&url);
        for i in 0..25 {
            many = many.header(format!("x-field-{i}"), "v");
        }
        let r = many.send().await?;
        assert_eq!(r.status(), 431, "{name}: 25 header fields");
        assert_eq!(r.headers()["content-type"], "application/problem+json");
        if name == "HTTP/1.1" {
            assert_eq!(r.headers().get("connection").map(|v| v.as_bytes()), Some(&b"close"[..]), "{name}");
        }
        let body: serde_json::Value = r.json().await?;
        assert!(body["detail"].as_str().is_some_and(|d| d.contains("at most 20")), "{name}: {body}");

        let r = client.get(&url).header("x-big", "a".repeat(6000)).send().await?;
        assert_eq!(r.status(), 431, "{name}: a 6,000-byte field");
        let body: serde_json::Value = r.json().await?;
        assert!(body["detail"].as_str().is_some_and(|d| d.contains("at most 4096")), "{name}: {body}");
    }
    // Refused before the rate limits and the upstream: nothing of them reached the echo upstream, and the
    // metrics count them as 4xx.
    let m = metrics(&stack).await?;
    assert!(metric(&m, "http_server_request_duration_seconds_count", &["http_response_status_code=\"431\""]) >= 1.0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slowloris_client_is_cut_off_while_other_clients_are_served() -> anyhow::Result<()> {
    let stack = edge_stack(&[("EDGE_LIMITS__HEADER_TIMEOUT_SECS", "2")]).await?;
    let ca = stack.tls_dir().join("dev-cert.pem");
    let port = stack.ports.edge;
    // One client drips a header field every 300 ms and never ends its head; another opens a connection and
    // says nothing.
    let drip = tokio::task::spawn_blocking({
        let ca = ca.clone();
        move || -> anyhow::Result<Duration> {
            let mut tls = tls_connect(port, &ca)?;
            let start = Instant::now();
            tls.write_all(b"GET /v1/slow HTTP/1.1\r\nHost: localhost\r\n")?;
            for i in 0..100 {
                std::thread::sleep(Duration::from_millis(300));
                if tls.write_all(format!("x-drip-{i}: 1\r\n").as_bytes()).and_then(|()| tls.flush()).is_err() {
                    return Ok(start.elapsed());
                }
                // A closed connection shows on read too (without waiting: the socket has a short timeout now).
                tls.get_ref().set_read_timeout(Some(Duration::from_millis(1)))?;
                let mut buf = [0u8; 64];
                if matches!(tls.read(&mut buf), Ok(0)) {
                    return Ok(start.elapsed());
                }
            }
            anyhow::bail!("the dripping client was never cut off")
        }
    });
    let silent = tokio::task::spawn_blocking(move || -> anyhow::Result<Duration> {
        let mut tls = tls_connect(port, &ca)?;
        let start = Instant::now();
        let mut buf = [0u8; 64];
        let n = tls.read(&mut buf).unwrap_or(0);
        anyhow::ensure!(n == 0, "the silent client got {n} bytes");
        Ok(start.elapsed())
    });
    let client = stack.https_client()?;
    let mut served = 0;
    let until = Instant::now() + Duration::from_secs(4);
    while Instant::now() < until {
        let r = client.get(format!("{}/v1/normal", stack.edge_url())).send().await?;
        assert_eq!(r.status(), 200);
        served += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (drip, silent) = (drip.await??, silent.await??);
    assert!(
        drip >= Duration::from_millis(1500) && drip <= Duration::from_secs(5),
        "dripping client cut off after {drip:?}"
    );
    assert!(
        silent >= Duration::from_millis(1500) && silent <= Duration::from_secs(5),
        "silent client cut off after {silent:?}"
    );
    assert!(served >= 10, "only {served} normal requests meanwhile");
    let m = metrics(&stack).await?;
    assert_eq!(metric(&m, "edge_connections_closed_total", &["reason=\"header_timeout\""]), 2.0, "{m}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_alive_connection_closes_when_idle_for_keepalive_timeout_and_not_while_in_use() -> anyhow::Result<()> {
    // A header timeout far above the keep-alive one: the idle close must come from the latter alone.
    let stack =
        edge_stack(&[("EDGE_LIMITS__KEEPALIVE_TIMEOUT_SECS", "2"), ("EDGE_LIMITS__HEADER_TIMEOUT_SECS", "30")]).await?;
    let ca = stack.tls_dir().join("dev-cert.pem");
    let port = stack.ports.edge;
    let idle = tokio::task::spawn_blocking(move || -> anyhow::Result<Duration> {
        let mut tls = tls_connect(port, &ca)?;
        // A pause before the first request: the edge first sees a new connection that sent nothing (its
        // deadline is then the header timeout's, 30 s), which must not delay the keep-alive one later.
        std::thread::sleep(Duration::from_millis(300));
        // In use for over 6 s, three times the keep-alive timeout: pauses shorter than it, then one request in
        // flight for longer than it (the upstream answers after 3 s). Never closed.
        for i in 0..5 {
            if i > 0 {
                std::thread::sleep(Duration::from_millis(900));
            }
            let query = if i == 4 { "?delay_ms=3000" } else { "" };
            tls.write_all(format!("GET /v1/kept/{i}{query} HTTP/1.1\r\nHost: localhost\r\n\r\n").as_bytes())?;
            let status = read_response(&mut tls)?;
            anyhow::ensure!(status.starts_with("HTTP/1.1 200"), "request {i}: {status}");
        }
        // Then idle: closed by the edge after about 2 s.
        let start = Instant::now();
        expect_closed(&mut tls, "the idle connection")?;
        Ok(start.elapsed())
    })
    .await??;
    assert!(
        idle >= Duration::from_millis(1500) && idle <= Duration::from_secs(4),
        "idle connection closed after {idle:?}"
    );
    let m = metrics(&stack).await?;
    assert_eq!(metric(&m, "edge_connections_closed_total", &["reason=\"idle\""]), 1.0, "{m}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_1_0_connections_close_after_the_response_unless_kept_alive() -> anyhow::Result<()> {
    let stack = edge_stack(&[]).await?;
    let ca = stack.tls_dir().join("dev-cert.pem");
    let port = stack.ports.edge;
    tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        // HTTP/1.0 without `Connection: keep-alive`: one response, then the edge closes (as nginx does).
        let mut tls = tls_connect(port, &ca)?;
        tls.get_ref().set_read_timeout(Some(Duration::from_secs(5)))?;
        tls.write_all(b"GET /v1/old HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
        let status = read_response(&mut tls)?;
        anyhow::ensure!(status.starts_with("HTTP/1.1 200") || status.starts_with("HTTP/1.0 200"), "{status}");
        expect_closed(&mut tls, "the HTTP/1.0 connection")?;
        // With `Connection: keep-alive` it is kept for another request.
        let mut tls = tls_connect(port, &ca)?;
        for i in 0..2 {
            tls.write_all(
                format!("GET /v1/old/{i} HTTP/1.0\r\nHost: localhost\r\nConnection: keep-alive\r\n\r\n").as_bytes(),
            )?;
            let status = read_response(&mut tls)?;
            anyhow::ensure!(status.contains(" 200"), "keep-alive request {i}: {status}");
        }
        Ok(())
    })
    .await??;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_body_gets_408_and_the_instance_is_not_blamed() -> anyhow::Result<()> {
    let stack = edge_stack(&[("EDGE_LIMITS__BODY_TIMEOUT_SECS", "2"), ("EDGE_UPSTREAM__MAX_FAILS", "1")]).await?;
    let ca = stack.tls_dir().join("dev-cert.pem");
    let port = stack.ports.edge;
    let (head, elapsed) = tokio::task::spawn_blocking(move || -> anyhow::Result<(String, Duration)> {
        let mut tls = tls_connect(port, &ca)?;
        tls.write_all(b"POST /v1/upload HTTP/1.1\r\nHost: localhost\r\nContent-Length: 100\r\n\r\n0123456789")?;
        let start = Instant::now();
        let mut buf = vec![0u8; 4096];
        let n = tls.read(&mut buf)?;
        Ok((String::from_utf8_lossy(&buf[..n]).into_owned(), start.elapsed()))
    })
    .await??;
    assert!(head.starts_with("HTTP/1.1 408"), "{head}");
    assert!(head.to_ascii_lowercase().contains("connection: close"), "{head}");
    assert!(elapsed >= Duration::from_millis(1500) && elapsed <= Duration::from_secs(6), "408 after {elapsed:?}");
    // The instance kept its place (max_fails 1 would have ejected it): the next request is served.
    let r = stack.https_client()?.get(format!("{}/v1/after", stack.edge_url())).send().await?;
    assert_eq!(r.status(), 200);
    let m = metrics(&stack).await?;
    assert_eq!(metric(&m, "edge_upstream_healthy", &[]), 1.0, "{m}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_gets_at_most_its_share_of_requests_in_flight() -> anyhow::Result<()> {
    let stack = edge_stack(&[("EDGE_LIMITS__MAX_REQUESTS_PER_CLIENT", "2")]).await?;
    let slow = format!("{}/v1/slow?delay_ms=1500", stack.edge_url());
    let client = stack.https_client()?;
    let other = stack.https_client_from("127.0.0.2".parse()?)?;
    let send = |c: &reqwest::Client| {
        let (c, url) = (c.clone(), slow.clone());
        tokio::spawn(async move {
            let r = c.get(url).send().await?;
            Ok::<_, reqwest::Error>((r.status().as_u16(), r.headers().get("retry-after").is_some()))
        })
    };
    let first = [send(&client), send(&client)];
    tokio::time::sleep(Duration::from_millis(300)).await;
    let third = send(&client);
    let elsewhere = send(&other);
    let third = third.await??;
    assert_eq!(third, (429, true), "the third request in flight from one client");
    for f in first {
        assert_eq!(f.await??.0, 200);
    }
    assert_eq!(elsewhere.await??.0, 200, "another client is not affected");
    // The slots are free again.
    assert_eq!(client.get(format!("{}/v1/again", stack.edge_url())).send().await?.status(), 200);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_cap_are_closed_before_tls_and_counted() -> anyhow::Result<()> {
    let stack = edge_stack(&[("EDGE_LIMITS__MAX_CONNECTIONS", "3")]).await?;
    let ca = stack.tls_dir().join("dev-cert.pem");
    let port = stack.ports.edge;
    let held = tokio::task::spawn_blocking({
        let ca = ca.clone();
        move || (0..3).map(|_| tls_connect(port, &ca)).collect::<anyhow::Result<Vec<_>>>()
    })
    .await??;
    let m = metrics(&stack).await?;
    assert_eq!(metric(&m, "edge_connections", &["state=\"established\""]), 3.0, "{m}");
    assert_eq!(metric(&m, "edge_tls_handshakes_total", &["result=\"ok\""]), 3.0, "{m}");
    let refused = tokio::task::spawn_blocking({
        let ca = ca.clone();
        move || tls_connect(port, &ca).is_err()
    })
    .await?;
    assert!(refused, "a fourth connection completed its handshake");
    let m = metrics(&stack).await?;
    assert_eq!(metric(&m, "edge_connections_refused_total", &["reason=\"max_connections\""]), 1.0, "{m}");
    drop(held);
    // Freed: a client gets in again; a client speaking plain HTTP to the TLS port counts as a failed handshake.
    testkit::eventually(Duration::from_secs(5), "a connection after the others closed", || {
        let ca = ca.clone();
        async move { tokio::task::spawn_blocking(move || tls_connect(port, &ca).ok().map(|_| ())).await.ok().flatten() }
    })
    .await?;
    tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        let mut tcp = TcpStream::connect(("127.0.0.1", port))?;
        tcp.set_read_timeout(Some(Duration::from_secs(5)))?;
        tcp.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")?;
        let mut buf = [0u8; 256];
        let _ = tcp.read(&mut buf);
        Ok(())
    })
    .await??;
    let failed = testkit::eventually(Duration::from_secs(5), "the failed handshake counted", || {
        let stack = &stack;
        async move {
            let m = metrics(stack).await.ok()?;
            let n = metric(&m, "edge_tls_handshakes_total", &["result=\"failed\""]);
            (n >= 1.0).then_some(n)
        }
    })
    .await?;
    assert_eq!(failed, 1.0);
    Ok(())
}

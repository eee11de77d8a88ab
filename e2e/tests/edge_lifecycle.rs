//! The edge's operations under load: SIGTERM lets the requests in flight finish (none is cut), and a new edge
//! process started with `--upgrade` takes the listening socket over from the old one on SIGQUIT (Pingora's
//! zero-downtime upgrade) while clients keep being served.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use testkit::{Stack, StackOptions, eventually};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_every_request_in_flight_finish() -> anyhow::Result<()> {
    let mut stack = Stack::start(StackOptions {
        gateway: false,
        workers: false,
        // Pingora keeps serving during the grace period; after it, the runtimes stop (at most `timeout_secs`).
        env: vec![
            ("edge", "EDGE_SHUTDOWN__GRACE_PERIOD_SECS".into(), "3".into()),
            ("edge", "EDGE_SHUTDOWN__TIMEOUT_SECS".into(), "5".into()),
        ],
        ..StackOptions::default()
    })
    .await?;
    // Ten slow requests (the upstream answers after 2 s), each on its own connection.
    let slow: Vec<_> = (0..10)
        .map(|_| {
            let client = stack.https_client();
            let url = format!("{}/v1/echo?delay_ms=2000", stack.edge_url());
            tokio::spawn(async move { anyhow::Ok(client?.get(url).send().await?.status().as_u16()) })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let edge = stack.edge.as_mut().ok_or_else(|| anyhow::anyhow!("no edge"))?;
    let stopping = Instant::now();
    let status = edge.terminate()?;
    let stopped_after = stopping.elapsed();
    for s in slow {
        assert_eq!(s.await??, 200, "a request in flight at SIGTERM was cut");
    }
    assert!(status.success(), "{status}");
    assert!(stopped_after >= Duration::from_millis(1000), "exited before the requests finished: {stopped_after:?}");
    // And it no longer accepts connections.
    assert!(std::net::TcpStream::connect(("127.0.0.1", stack.ports.edge)).is_err());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_hands_the_socket_over_without_failing_a_request() -> anyhow::Result<()> {
    let stack =
        Stack::start(StackOptions { gateway: false, workers: false, edge: false, ..StackOptions::default() }).await?;
    let _echo = testkit::echo::start(stack.ports.gateway).await?; // the upstream (no gateway here)
    // The old process keeps serving its connections for a grace period after handing the socket over.
    let mut old = stack.spawn_edge("edge-old", &[], &[("EDGE_SHUTDOWN__GRACE_PERIOD_SECS", "2".into())])?;
    testkit::wait_admin_ready("edge-old", stack.ports.edge_admin).await?;

    // Clients keep sending (fresh connections and keep-alive ones) through the hand-over.
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..4)
        .map(|i| {
            let (stop, url) = (stop.clone(), format!("{}/v1/echo?delay_ms=50", stack.edge_url()));
            let cert = stack.tls_dir().join("dev-cert.pem");
            tokio::spawn(async move {
                let mut client = testkit::https_client_trusting(&cert, None)?;
                let (mut ok, mut failed) = (0u32, Vec::new());
                while !stop.load(Ordering::Relaxed) {
                    if i % 2 == 0 {
                        // A new connection per request for half of the clients, keep-alive for the others.
                        client = testkit::https_client_trusting(&cert, None)?;
                    }
                    let mut answer = client.get(&url).send().await;
                    if answer.is_err() && i % 2 == 1 {
                        // A kept-alive connection the old process closed as this request went out: the race every
                        // keep-alive client has with a server that closes idle connections (nginx's reload too).
                        // Browsers and HTTP libraries retry an idempotent request once on a new connection.
                        client = testkit::https_client_trusting(&cert, None)?;
                        answer = client.get(&url).send().await;
                    }
                    match answer {
                        Ok(r) if r.status() == 200 => ok += 1,
                        Ok(r) => failed.push(r.status().to_string()),
                        Err(e) => failed.push(e.to_string()),
                    }
                }
                anyhow::Ok((ok, failed))
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(1)).await;

    // The new process waits for the sockets; SIGQUIT makes the old one send them and drain.
    let new_admin = testkit::free_port();
    let _new =
        stack.spawn_edge("edge-new", &["--upgrade"], &[("EDGE_ADMIN_LISTEN", format!("127.0.0.1:{new_admin}"))])?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    old.stop_with(libc::SIGQUIT, Duration::from_secs(30))?;
    testkit::wait_admin_ready("edge-new", new_admin).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    let (mut ok, mut failed) = (0, Vec::new());
    for c in clients {
        let (o, f) = c.await??;
        ok += o;
        failed.extend(f);
    }
    println!("{ok} requests served across the upgrade, {} failed", failed.len());
    assert!(ok > 20);
    assert!(failed.is_empty(), "{failed:?}");
    // The new process serves on the same port.
    let served = eventually(Duration::from_secs(5), "the new edge to answer", || async {
        let r = stack.https_client().ok()?.get(format!("{}/v1/echo", stack.edge_url())).send().await.ok()?;
        (r.status() == 200).then_some(())
    })
    .await;
    assert!(served.is_ok());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_request_is_served_not_refused_while_the_first_health_check_runs() -> anyhow::Result<()> {
    let stack =
        Stack::start(StackOptions { gateway: false, workers: false, edge: false, ..StackOptions::default() }).await?;
    let _echo = testkit::echo::start(stack.ports.gateway).await?;
    // A slow health endpoint: the edge's first check of its only instance takes 1.5 s. Until it is done the
    // instance is out of rotation, so the edge must not take requests yet (they would get 503).
    let _edge = stack.spawn_edge(
        "edge",
        &[],
        &[
            ("EDGE_UPSTREAM__HEALTH__PATH", "/readyz?delay_ms=1500".into()),
            ("EDGE_UPSTREAM__HEALTH__TIMEOUT_MS", "5000".into()),
        ],
    )?;
    let start = Instant::now();
    // The first request goes out as soon as the edge has written its certificate and its port takes connections.
    let status = loop {
        let answer = match stack.https_client() {
            Ok(client) => {
                client.get(format!("{}/v1/first", stack.edge_url())).send().await.map_err(anyhow::Error::from)
            }
            Err(e) => Err(e),
        };
        match answer {
            Ok(r) => break r.status(),
            Err(_) if start.elapsed() < Duration::from_secs(30) => tokio::time::sleep(Duration::from_millis(10)).await,
            Err(e) => return Err(e),
        }
    };
    assert_eq!(status, 200, "the first request, {:?} after start", start.elapsed());
    Ok(())
}

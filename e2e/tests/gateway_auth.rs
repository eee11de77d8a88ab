//! The gateway finds its keys the way it would at Keycloak: from the issuer's OIDC discovery document, over real
//! HTTP. A token signed by a key it has not seen yet makes it reload the keys at once (a rotation is picked up
//! without waiting for the periodic reload), but forged key ids cannot make it fetch more than once per period.

use std::time::{Duration, Instant};

use devkit::{Claims, SigningKey};
use testkit::idp::Idp;
use testkit::{Stack, StackOptions, free_port};

const MIN_REFRESH_SECS: u64 = 4;

/// `GET /v1/orders/{unknown id}` on the gateway: 404 once authenticated, 401 when not.
async fn status_with(http: &reqwest::Client, port: u16, token: &str) -> anyhow::Result<(u16, String)> {
    let url = format!("http://127.0.0.1:{port}/v1/orders/{}", uuid::Uuid::now_v7());
    let r = http.get(url).bearer_auth(token).send().await?;
    let status = r.status().as_u16();
    let challenge = r.headers().get("www-authenticate").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
    Ok((status, challenge))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_come_from_discovery_and_rotation_is_picked_up_at_once() -> anyhow::Result<()> {
    let old_key = SigningKey::generate()?;
    let idp = Idp::start(&[&old_key]).await?;
    let gw = |k: &str, v: String| ("gateway", k.to_owned(), v);
    let stack = Stack::start(StackOptions {
        edge: false, // workers run the migrations the read side needs
        env: vec![
            gw("GATEWAY_AUTH__DISCOVERY", "true".into()),
            gw("GATEWAY_AUTH__ISSUER", idp.issuer.clone()),
            gw("GATEWAY_AUTH__JWKS_MIN_REFRESH_SECS", MIN_REFRESH_SECS.to_string()),
        ],
        ..StackOptions::default()
    })
    .await?;
    let http = reqwest::Client::new();
    let port = stack.ports.gateway;
    let token = |key: &SigningKey| key.sign(&Claims::new(&idp.issuer, testkit::AUDIENCE, "alice", 3600));

    // Ready means discovery and the first JWKS load succeeded.
    assert_eq!(status_with(&http, port, &token(&old_key)?).await?.0, 404);
    let first_loads = idp.jwks_fetches();
    assert!(first_loads >= 1);
    // Past the period that began with that load, an unknown key may cause a reload.
    tokio::time::sleep(Duration::from_secs(MIN_REFRESH_SECS) + Duration::from_millis(300)).await;

    // The IdP rotates: a token signed by the new key is accepted at once (periodic reload is 300 s away).
    let new_key = SigningKey::generate()?;
    idp.rotate(&[&old_key, &new_key]);
    let rotated_at = Instant::now();
    assert_eq!(status_with(&http, port, &token(&new_key)?).await?.0, 404, "new key accepted after one reload");
    assert_eq!(idp.jwks_fetches(), first_loads + 1);
    assert_eq!(status_with(&http, port, &token(&old_key)?).await?.0, 404, "old key still trusted");

    // Forged key ids: 60 concurrent tokens from unknown keys, all 401 invalid_token, and no further fetch
    // within the period.
    let forger = SigningKey::generate()?;
    let forged = token(&forger)?;
    let answers = futures_util::future::join_all((0..60).map(|_| status_with(&http, port, &forged))).await;
    for a in answers {
        let (status, challenge) = a?;
        assert_eq!(status, 401);
        assert!(challenge.contains("error=\"invalid_token\""), "{challenge}");
    }
    if rotated_at.elapsed() < Duration::from_secs(MIN_REFRESH_SECS) {
        assert_eq!(idp.jwks_fetches(), first_loads + 1, "forged kids caused a fetch within the period");
    }
    // Once the period is over, an unknown key may cause one reload again (and only one).
    tokio::time::sleep(Duration::from_secs(MIN_REFRESH_SECS) + Duration::from_millis(300)).await;
    let before = idp.jwks_fetches();
    for _ in 0..5 {
        assert_eq!(status_with(&http, port, &forged).await?.0, 401);
    }
    assert_eq!(idp.jwks_fetches(), before + 1);

    // A discovery document that names another issuer is refused: that replica never becomes ready.
    let (bad_port, bad_admin) = (free_port(), free_port());
    let mut bad = stack.spawn_gateway(
        "gateway-wrong-issuer",
        bad_port,
        bad_admin,
        &[("GATEWAY_AUTH__ISSUER", &format!("{}/", idp.issuer))],
    )?;
    let readyz = format!("http://127.0.0.1:{bad_admin}/readyz");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let log = bad.log_text();
        if log.contains("names issuer") {
            break;
        }
        assert!(Instant::now() < deadline, "no discovery error logged:\n{log}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let r = http.get(&readyz).send().await?;
    assert_eq!(r.status().as_u16(), 503);
    assert!(r.text().await?.contains("jwks"));
    assert_eq!(status_with(&http, bad_port, &token(&old_key)?).await?.0, 503, "no keys: 503, not 401");
    assert!(bad.terminate()?.success());
    Ok(())
}

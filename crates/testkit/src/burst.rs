//! Bursts of concurrent requests from one client, and what each request saw: the traffic of rate-limit tests.

use std::net::IpAddr;
use std::path::Path;
use std::time::{Duration, Instant};

/// What one request saw: status, when it completed (since the burst started), `Retry-After`, `Content-Type`,
/// `RateLimit` and `RateLimit-Policy`.
#[derive(Debug, Clone)]
pub struct Seen {
    pub status: u16,
    pub at: Duration,
    pub retry_after: Option<u64>,
    pub content_type: Option<String>,
    pub ratelimit: Option<String>,
    pub ratelimit_policy: Option<String>,
}

/// An HTTPS client from loopback address `source` trusting `ca`, with its connection already open (one request
/// to `warmup_url`, which must not be limited), so that a burst arrives within a few milliseconds.
pub async fn warm_client(ca: &Path, source: &str, warmup_url: &str) -> anyhow::Result<reqwest::Client> {
    let client = crate::stack::https_client_trusting(ca, Some(source.parse::<IpAddr>()?))?;
    client.get(warmup_url).send().await?;
    Ok(client)
}

/// Sends `n` GETs to `url` at once; returns what each saw, sorted by completion.
pub async fn burst(client: &reqwest::Client, url: &str, n: usize) -> anyhow::Result<Vec<Seen>> {
    let start = Instant::now();
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let (client, url) = (client.clone(), url.to_owned());
            tokio::spawn(async move {
                let r = client.get(url).send().await?;
                let header = |k: &str| r.headers().get(k).and_then(|v| v.to_str().ok()).map(str::to_owned);
                Ok::<_, reqwest::Error>(Seen {
                    status: r.status().as_u16(),
                    at: start.elapsed(),
                    retry_after: header("retry-after").and_then(|v| v.parse().ok()),
                    content_type: header("content-type"),
                    ratelimit: header("ratelimit"),
                    ratelimit_policy: header("ratelimit-policy"),
                })
            })
        })
        .collect();
    let mut seen = Vec::new();
    for t in tasks {
        seen.push(t.await??);
    }
    seen.sort_by_key(|s| s.at);
    Ok(seen)
}

/// Splits a burst's answers into (accepted, rejected with `reject_status`).
pub fn split(seen: &[Seen], reject_status: u16) -> (Vec<&Seen>, Vec<&Seen>) {
    seen.iter().partition(|s| s.status != reject_status)
}

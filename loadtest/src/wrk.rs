//! wrk with `loadtest/wrk/orders.lua`: one load, its summary line and the order ids it was given.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The script, next to this crate.
pub fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("wrk").join("orders.lua")
}

/// What to send (the script's environment, see its header).
#[derive(Debug, Clone)]
pub struct Load {
    /// A label for the report ("async, many clients").
    pub name: String,
    /// `async`, `sync`, `get` or `mix`.
    pub mode: &'static str,
    /// `many`, `one` or `peer`.
    pub clients: &'static str,
    /// Requests per second over all connections (0: as fast as possible).
    pub rate: f64,
    pub connections: usize,
    pub duration: Duration,
    pub invalid_ratio: f64,
}

/// wrk's summary (the script's `LOADTEST` line), and the ids of the orders the API created.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Summary {
    pub requests: u64,
    pub duration_us: u64,
    pub statuses: BTreeMap<String, u64>,
    pub errors: SocketErrors,
    pub latency_us: Percentiles,
    #[serde(skip)]
    pub created: Vec<(u16, uuid::Uuid)>,
    /// The connections of the run.
    #[serde(skip)]
    pub connections: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SocketErrors {
    pub connect: u64,
    pub read: u64,
    pub write: u64,
    pub timeout: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Percentiles {
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub max: u64,
}

impl Summary {
    pub fn rps(&self) -> f64 {
        if self.duration_us == 0 { 0.0 } else { self.requests as f64 * 1e6 / self.duration_us as f64 }
    }

    pub fn count(&self, status: u16) -> u64 {
        self.statuses.get(&status.to_string()).copied().unwrap_or(0)
    }

    /// Requests that got no answer: connection, read, write errors and timeouts.
    pub fn unanswered(&self) -> u64 {
        self.errors.connect + self.errors.read + self.errors.write + self.errors.timeout
    }

    /// Requests that may have reached the API without wrk reading the answer: the unanswered ones, and one per
    /// connection, in flight when wrk stopped at its deadline (it does not wait for them).
    pub fn unseen(&self) -> u64 {
        self.unanswered() + self.connections
    }

    /// Answers whose status is not in `expected`, plus requests without an answer.
    pub fn errors_except(&self, expected: &[u16]) -> u64 {
        let unexpected: u64 =
            self.statuses.iter().filter(|(s, _)| !expected.iter().any(|e| e.to_string() == **s)).map(|(_, n)| n).sum();
        unexpected + self.unanswered()
    }
}

/// Runs wrk against `base_url` with `load`, `token`, writing its files under `dir` (named after `tag`).
pub async fn run(dir: &Path, tag: &str, base_url: &str, token: &str, load: &Load) -> anyhow::Result<Summary> {
    let ids_out = dir.join(format!("ids-{tag}.txt"));
    let threads = load.connections.clamp(1, 2);
    let secs = load.duration.as_secs().max(1);
    let out = tokio::process::Command::new("wrk")
        .args(["-t", &threads.to_string(), "-c", &load.connections.to_string(), "-d", &format!("{secs}s")])
        .args(["--timeout", "30s", "-s"])
        .arg(script())
        .arg(base_url)
        .env("TOKEN", token)
        .env("MODE", load.mode)
        .env("CLIENTS", load.clients)
        .env("RATE", load.rate.to_string())
        .env("CONNECTIONS", load.connections.to_string())
        .env("INVALID_RATIO", load.invalid_ratio.to_string())
        .env("IDS_OUT", &ids_out)
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| anyhow::anyhow!("running wrk (apt-get install wrk): {e}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    std::fs::write(dir.join(format!("wrk-{tag}.txt")), format!("{stdout}{}", String::from_utf8_lossy(&out.stderr)))?;
    anyhow::ensure!(
        out.status.success(),
        "wrk failed ({}): {stdout}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("LOADTEST "))
        .ok_or_else(|| anyhow::anyhow!("wrk printed no LOADTEST line: {stdout}"))?;
    let mut summary: Summary = serde_json::from_str(line)?;
    summary.created = read_ids(&ids_out)?;
    summary.connections = load.connections as u64;
    Ok(summary)
}

/// `status id` lines.
fn read_ids(path: &Path) -> anyhow::Result<Vec<(u16, uuid::Uuid)>> {
    let text = std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let (status, id) = l.split_once(' ').ok_or_else(|| anyhow::anyhow!("bad ids line {l:?}"))?;
            Ok((status.parse()?, id.trim().parse()?))
        })
        .collect()
}

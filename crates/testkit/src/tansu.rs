//! A throwaway Tansu broker (Kafka protocol) on a free loopback port, with the order topics.
//!
//! Storage is in memory (`memory://`), which has one trap: Tansu 0.6's in-memory store answers a fetch at an
//! offset inside a record batch from the next batch on, silently skipping the rest of that batch (its
//! `dynostore` keeps whole batches and selects those whose base offset is at or above the requested one), so a
//! consumer that resumes from a committed offset inside a batch loses messages. Every producer in the tests
//! therefore sends one record per batch ([`ONE_RECORD_PER_BATCH`]). The SQL stores (`sqlite://`, used by the
//! local stack) are exact but fetch in time proportional to what is stored: about 1 ms of broker CPU per
//! message consumed with 10-20k messages stored, too slow for the 10,000-order tests.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use tempfile::TempDir;

use crate::process::Service;

/// The librdkafka producer setting that keeps Tansu's in-memory store exact (see the module's documentation).
pub const ONE_RECORD_PER_BATCH: (&str, &str) = ("batch.num.messages", "1");

/// Topics every test stack gets, with their partition counts.
pub const TOPICS: &[(&str, u32)] =
    &[("orders.commands", 3), ("orders.validated", 3), ("orders.replies", 3), ("orders.dlq", 1)];

pub struct Tansu {
    pub port: u16,
    service: Service,
    _dir: TempDir,
}

impl Tansu {
    /// Starts a broker and creates [`TOPICS`].
    pub async fn start() -> anyhow::Result<Self> {
        let bin = tansu_bin();
        let dir = tempfile::Builder::new().prefix("testkit-tansu-").tempdir()?;
        let port = crate::free_port();
        let url = format!("tcp://127.0.0.1:{port}");
        let service = Service::spawn(
            "tansu",
            &bin,
            &[
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
                "--storage-engine",
                "memory://tansu/",
            ],
            &[],
            dir.path(),
        )?;
        crate::wait_listening(port, Duration::from_secs(20), "tansu to listen").await?;
        for (topic, partitions) in TOPICS {
            create_topic(&bin, &url, topic, *partitions)?;
        }
        Ok(Self { port, service, _dir: dir })
    }

    /// The broker's process id (benchmarks read its CPU time).
    pub fn pid(&self) -> Option<u32> {
        self.service.pid()
    }

    /// Freezes the broker (SIGSTOP): connections stay open and nothing is answered, as in a network partition or
    /// a stalled host. [`Tansu::thaw`] resumes it with its log intact.
    pub fn freeze(&self) -> anyhow::Result<()> {
        self.signal(libc::SIGSTOP)
    }

    /// Resumes a frozen broker (SIGCONT).
    pub fn thaw(&self) -> anyhow::Result<()> {
        self.signal(libc::SIGCONT)
    }

    /// Stops the broker (SIGTERM; its in-memory log is gone).
    pub fn stop(&mut self) -> anyhow::Result<()> {
        self.service.terminate()?;
        Ok(())
    }

    fn signal(&self, signal: i32) -> anyhow::Result<()> {
        let pid = self.service.pid().ok_or_else(|| anyhow::anyhow!("tansu is not running"))?;
        // SAFETY: kill(2) on the PID of a child we spawned and have not reaped.
        anyhow::ensure!(unsafe { libc::kill(pid as i32, signal) } == 0, "signal {signal} to tansu failed");
        Ok(())
    }

    /// `127.0.0.1:{port}`, for `bootstrap.servers`.
    pub fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

impl Drop for Tansu {
    fn drop(&mut self) {
        // A frozen broker would ignore the SIGTERM that stops it.
        let _ = self.thaw();
    }
}

fn create_topic(bin: &PathBuf, url: &str, topic: &str, partitions: u32) -> anyhow::Result<()> {
    let out = Command::new(bin)
        .args(["topic", "create", "--broker", url, "--partitions", &partitions.to_string(), topic])
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "creating topic {topic}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// `$TANSU_BIN`, else `tansu` from cargo's bin directory, else from `PATH`.
fn tansu_bin() -> PathBuf {
    if let Ok(p) = std::env::var("TANSU_BIN") {
        return PathBuf::from(p);
    }
    let home = std::env::var("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cargo"));
    let candidate = home.join("bin").join("tansu");
    if candidate.is_file() { candidate } else { PathBuf::from("tansu") }
}

//! A throwaway PostgreSQL cluster: `initdb` into a temporary directory, a server on a free loopback port,
//! a database `orders` owned by the superuser `orders`. PostgreSQL refuses to run as root, so when the tests
//! run as root (as in CI) the cluster belongs to Debian's `postgres` system user and is driven with `runuser`.

use std::path::{Path, PathBuf};
use std::process::Command;

use tempfile::TempDir;

/// Row counts: orders, those among some ids, the persist job's inbox rows, status history rows, order lines,
/// rejected orders.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stored {
    pub orders: i64,
    pub of_ids: i64,
    pub inbox: i64,
    pub history: i64,
    pub items: i64,
    pub rejected: i64,
}

pub struct Postgres {
    dir: TempDir,
    bin: PathBuf,
    pub port: u16,
    opts: String,
}

impl Postgres {
    /// Creates and starts a cluster. Takes a couple of seconds.
    pub async fn start() -> anyhow::Result<Self> {
        let bin = pg_bindir()?;
        let dir = tempfile::Builder::new().prefix("testkit-pg-").tempdir_in("/tmp")?;
        if is_root() {
            chown_to_postgres(dir.path())?;
        }
        let port = crate::free_port();
        let opts = format!(
            "-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off",
            dir.path().display()
        );
        let pg = Self { dir, bin, port, opts };
        let data = pg.data_dir();
        pg.run("initdb", &["-D", &data, "-U", "orders", "--auth=trust", "-E", "UTF8", "--no-sync"])?;
        pg.start_server()?;
        let (client, conn) = tokio_postgres::connect(&pg.url_for("postgres"), tokio_postgres::NoTls).await?;
        let task = tokio::spawn(conn);
        client.batch_execute("CREATE DATABASE orders").await?;
        drop(client);
        let _ = task.await;
        Ok(pg)
    }

    fn start_server(&self) -> anyhow::Result<()> {
        let log = self.dir.path().join("postgres.log").display().to_string();
        self.run("pg_ctl", &["-D", &self.data_dir(), "-l", &log, "-w", "-t", "60", "-o", &self.opts, "start"])
    }

    /// Stops the server (`pg_ctl stop -m fast`: sessions are disconnected), as an outage would.
    pub fn stop(&self) -> anyhow::Result<()> {
        self.run("pg_ctl", &["-D", &self.data_dir(), "-m", "fast", "-w", "stop"])
    }

    /// Starts the server again after [`Postgres::stop`], on the same port with the same data.
    pub fn start_again(&self) -> anyhow::Result<()> {
        self.start_server()
    }

    /// `postgres://orders@127.0.0.1:{port}/orders`
    pub fn url(&self) -> String {
        self.url_for("orders")
    }

    fn url_for(&self, db: &str) -> String {
        format!("postgres://orders@127.0.0.1:{}/{db}", self.port)
    }

    /// A connected client to the `orders` database (its connection task runs in the background).
    pub async fn client(&self) -> anyhow::Result<tokio_postgres::Client> {
        let (client, conn) = tokio_postgres::connect(&self.url(), tokio_postgres::NoTls).await?;
        tokio::spawn(conn);
        Ok(client)
    }

    /// The postmaster's PID (first line of `postmaster.pid`), when the server runs. Its children (backends,
    /// checkpointer, ...) are found through `/proc`.
    pub fn pid(&self) -> Option<u32> {
        let text = std::fs::read_to_string(self.dir.path().join("data").join("postmaster.pid")).ok()?;
        text.lines().next()?.trim().parse().ok()
    }

    /// What the database holds, in all and of the orders `ids`: what exactly-once checks compare.
    pub async fn stored(&self, ids: &[uuid::Uuid]) -> anyhow::Result<Stored> {
        let row = self
            .client()
            .await?
            .query_one(
                "SELECT (SELECT count(*) FROM orders),
                        (SELECT count(*) FROM orders WHERE id = ANY($1)),
                        (SELECT count(*) FROM processed_events WHERE consumer = 'persist'),
                        (SELECT count(*) FROM order_status_history),
                        (SELECT count(*) FROM order_items),
                        (SELECT count(*) FROM orders WHERE status = 'rejected')",
                &[&ids],
            )
            .await?;
        Ok(Stored {
            orders: row.get(0),
            of_ids: row.get(1),
            inbox: row.get(2),
            history: row.get(3),
            items: row.get(4),
            rejected: row.get(5),
        })
    }

    fn data_dir(&self) -> String {
        self.dir.path().join("data").display().to_string()
    }

    fn run(&self, tool: &str, args: &[&str]) -> anyhow::Result<()> {
        let program = self.bin.join(tool);
        let out = if is_root() {
            Command::new("runuser").arg("-u").arg("postgres").arg("--").arg(&program).args(args).output()?
        } else {
            Command::new(&program).args(args).output()?
        };
        anyhow::ensure!(
            out.status.success(),
            "{tool} failed: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let data = self.data_dir();
        let _ = self.run("pg_ctl", &["-D", &data, "-m", "immediate", "-w", "stop"]);
    }
}

/// PostgreSQL's server binaries: `$PG_BIN`, else the newest `/usr/lib/postgresql/<v>/bin` (Debian's layout).
fn pg_bindir() -> anyhow::Result<PathBuf> {
    if let Ok(dir) = std::env::var("PG_BIN") {
        return Ok(PathBuf::from(dir));
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")?
        .filter_map(Result::ok)
        .filter_map(|e| {
            let v = e.file_name().to_string_lossy().parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").is_file().then_some((v, bin))
        })
        .collect();
    versions.sort();
    versions
        .pop()
        .map(|(_, b)| b)
        .ok_or_else(|| anyhow::anyhow!("no PostgreSQL server under /usr/lib/postgresql: apt-get install postgresql"))
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn chown_to_postgres(path: &Path) -> anyhow::Result<()> {
    let status = Command::new("chown").arg("postgres:postgres").arg(path).status()?;
    anyhow::ensure!(status.success(), "chown postgres {} failed", path.display());
    Ok(())
}

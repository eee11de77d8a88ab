//! Our binaries as child processes, with their output captured to a log file.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Where a workspace binary was built: `$E2E_BIN_DIR`, else next to the running test's `deps/` folder.
pub fn bin_path(name: &str) -> PathBuf {
    if let Ok(dir) = std::env::var("E2E_BIN_DIR") {
        return Path::new(&dir).join(name);
    }
    let exe = std::env::current_exe().unwrap_or_else(|e| panic!("current_exe: {e}"));
    // target/<profile>/deps/<test binary> -> target/<profile>/<name>
    let profile_dir = exe.parent().and_then(Path::parent).unwrap_or_else(|| Path::new("."));
    profile_dir.join(name)
}

/// A running child process that is stopped (SIGKILL) on drop if still alive.
pub struct Service {
    pub name: String,
    child: Option<Child>,
    log: PathBuf,
    program: PathBuf,
    args: Vec<String>,
    envs: Vec<(String, String)>,
    cwd: PathBuf,
}

impl Service {
    /// Starts `program` with `args` and `envs` in `cwd`; its stdout and stderr go to `{cwd}/{name}.log`.
    pub fn spawn(
        name: &str,
        program: &Path,
        args: &[&str],
        envs: &[(String, String)],
        cwd: &Path,
    ) -> anyhow::Result<Self> {
        let mut s = Self {
            name: name.to_owned(),
            child: None,
            log: cwd.join(format!("{name}.log")),
            program: program.to_path_buf(),
            args: args.iter().map(|a| (*a).to_owned()).collect(),
            envs: envs.to_vec(),
            cwd: cwd.to_path_buf(),
        };
        s.start()?;
        Ok(s)
    }

    /// (Re)starts the process with the same command line; output is appended to the same log.
    pub fn start(&mut self) -> anyhow::Result<()> {
        anyhow::ensure!(self.child.is_none(), "{} is already running", self.name);
        if self.program.components().count() > 1 && !self.program.is_file() {
            anyhow::bail!(
                "{} not found: build the workspace binaries first (cargo build --workspace --bins)",
                self.program.display()
            );
        }
        let out = File::options().create(true).append(true).open(&self.log)?;
        let child = Command::new(&self.program)
            .args(&self.args)
            .envs(self.envs.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .current_dir(&self.cwd)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .map_err(|e| anyhow::anyhow!("spawning {}: {e}", self.program.display()))?;
        self.child = Some(child);
        Ok(())
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Sends `signal` and waits up to `timeout` for the exit status.
    pub fn stop_with(&mut self, signal: i32, timeout: Duration) -> anyhow::Result<ExitStatus> {
        let mut child = self.child.take().ok_or_else(|| anyhow::anyhow!("{} is not running", self.name))?;
        // SAFETY: kill(2) on the PID of a child we spawned and have not reaped yet.
        unsafe { libc::kill(child.id() as i32, signal) };
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                anyhow::bail!("{} did not exit within {timeout:?} after signal {signal}", self.name);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, and the exit status.
    pub fn terminate(&mut self) -> anyhow::Result<ExitStatus> {
        self.stop_with(libc::SIGTERM, Duration::from_secs(30))
    }

    /// Whether the process has exited on its own.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.as_mut().and_then(|c| c.try_wait().ok().flatten())
    }

    /// Everything the process wrote so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        // A test that returns `Err` does not panic: `TESTKIT_LOGS=1` shows the logs in that case too.
        if std::thread::panicking() || std::env::var_os("TESTKIT_LOGS").is_some() {
            let n = std::env::var("TESTKIT_LOGS").ok().and_then(|v| v.parse().ok()).unwrap_or(60);
            eprintln!("----- {} log (last {n} lines) -----\n{}", self.name, self.log_tail(n));
        }
    }
}

/// utime + stime of `pid`, in seconds (0 when it is gone).
pub fn cpu_seconds(pid: Option<u32>) -> f64 {
    let Some(pid) = pid else { return 0.0 };
    let Some(fields) = stat_fields(pid) else { return 0.0 };
    let ticks: f64 = [11, 12].iter().filter_map(|i| fields.get(*i)?.parse::<f64>().ok()).sum();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    ticks / hz
}

/// [`cpu_seconds`] of `pid` and of its live descendants (PostgreSQL's backends are children of the postmaster).
pub fn tree_cpu_seconds(pid: Option<u32>) -> f64 {
    let Some(pid) = pid else { return 0.0 };
    with_descendants(&[pid]).into_iter().map(|p| cpu_seconds(Some(p))).sum()
}

/// `pids` and every live process descended from them, from `/proc/*/stat`'s parent field.
pub fn with_descendants(pids: &[u32]) -> Vec<u32> {
    let parents: Vec<(u32, u32)> = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .filter_map(|e| {
            let pid: u32 = e.ok()?.file_name().to_str()?.parse().ok()?;
            let ppid = stat_fields(pid)?.get(1)?.parse().ok()?;
            Some((pid, ppid))
        })
        .collect();
    let mut all: Vec<u32> = pids.to_vec();
    let mut i = 0;
    while i < all.len() {
        let parent = all[i];
        all.extend(parents.iter().filter(|(_, pp)| *pp == parent).map(|(p, _)| *p));
        i += 1;
    }
    all.sort_unstable();
    all.dedup();
    all
}

/// The fields of `/proc/{pid}/stat` after the command name (which may hold spaces): state, ppid, ...
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

//! Starving a process tree of CPU (and memory): a cgroup when the machine lets us make one (v2, else v1's `cpu`
//! and `memory` controllers), otherwise stopping and continuing the processes in a duty cycle (SIGSTOP/SIGCONT),
//! which gives the same CPU share but no memory limit. Released on drop: the processes go back to the root
//! cgroup (or are continued) and the cgroup is removed.

use std::path::{Path, PathBuf};
use std::time::Duration;

const ROOT: &str = "/sys/fs/cgroup";

pub struct Throttle {
    how: How,
    pub description: String,
}

enum How {
    /// The cgroup directories made (one for v2; `cpu` and maybe `memory` for v1), and where processes go back.
    Cgroup {
        dirs: Made,
    },
    DutyCycle {
        stop: tokio::sync::watch::Sender<bool>,
        task: tokio::task::JoinHandle<()>,
        pids: Vec<u32>,
    },
}

impl Throttle {
    /// Limits `pids` and their descendants (present and future) to `cpu` of one CPU and, where the cgroup allows,
    /// `memory` bytes. `name` names the cgroup.
    pub fn apply(name: &str, pids: &[u32], cpu: f64, memory: Option<u64>) -> anyhow::Result<Self> {
        let pids = testkit::with_descendants(pids);
        anyhow::ensure!(!pids.is_empty(), "no process to throttle");
        let period = 100_000u64;
        let limits = Limits { quota: ((cpu * period as f64) as u64).max(1000), period, memory };
        let mem = memory.map(|m| format!(", memory {} MiB", m / (1024 * 1024))).unwrap_or_default();
        match cgroup_v2(name, &pids, limits)
            .or_else(|e2| cgroup_v1(name, &pids, limits).map_err(|e1| anyhow::anyhow!("v2: {e2}; v1: {e1}")))
        {
            Ok((dirs, version)) => Ok(Self {
                how: How::Cgroup { dirs },
                description: format!("{:.0}% of a CPU{mem} (cgroup {version})", cpu * 100.0),
            }),
            Err(e) => {
                let (stop, task) = duty_cycle(pids.clone(), cpu);
                Ok(Self {
                    how: How::DutyCycle { stop, task, pids },
                    description: format!(
                        "{:.0}% of a CPU by SIGSTOP/SIGCONT every 100 ms, no memory limit (no cgroup: {e})",
                        cpu * 100.0
                    ),
                })
            }
        }
    }
}

impl Drop for Throttle {
    fn drop(&mut self) {
        match &mut self.how {
            How::Cgroup { dirs, .. } => undo(dirs),
            How::DutyCycle { stop, task, pids } => {
                let _ = stop.send(true);
                task.abort();
                // The aborted task may have left them stopped.
                signal_all(pids, libc::SIGCONT);
            }
        }
    }
}

/// CPU time allowed per period (µs), and the memory limit.
#[derive(Clone, Copy)]
struct Limits {
    quota: u64,
    period: u64,
    memory: Option<u64>,
}

/// The cgroup directories made, each with where its processes go back.
type Made = Vec<(PathBuf, PathBuf)>;

fn cgroup_v2(
    name: &str,
    pids: &[u32],
    Limits { quota, period, memory }: Limits,
) -> anyhow::Result<(Made, &'static str)> {
    let root = Path::new(ROOT);
    let controllers = std::fs::read_to_string(root.join("cgroup.controllers"))?;
    anyhow::ensure!(controllers.split_whitespace().any(|c| c == "cpu"), "no cpu controller");
    // One controller per write: a missing memory controller must not keep cpu off.
    let _ = std::fs::write(root.join("cgroup.subtree_control"), "+cpu");
    let _ = std::fs::write(root.join("cgroup.subtree_control"), "+memory");
    let dir = root.join(name);
    make_dir(&dir)?;
    let made = vec![(dir.clone(), root.to_path_buf())];
    let setup = || -> anyhow::Result<()> {
        std::fs::write(dir.join("cpu.max"), format!("{quota} {period}"))?;
        if let Some(m) = memory {
            std::fs::write(dir.join("memory.max"), m.to_string())?;
        }
        move_pids(&dir, pids)
    };
    setup().inspect_err(|_| undo(&made))?;
    Ok((made, "v2"))
}

fn cgroup_v1(
    name: &str,
    pids: &[u32],
    Limits { quota, period, memory }: Limits,
) -> anyhow::Result<(Made, &'static str)> {
    let cpu_root = Path::new(ROOT).join("cpu");
    let cpu = cpu_root.join(name);
    make_dir(&cpu)?;
    let mut made = vec![(cpu.clone(), cpu_root)];
    let setup = |made: &mut Made| -> anyhow::Result<()> {
        std::fs::write(cpu.join("cpu.cfs_period_us"), period.to_string())?;
        std::fs::write(cpu.join("cpu.cfs_quota_us"), quota.to_string())?;
        move_pids(&cpu, pids)?;
        if let Some(m) = memory {
            let mem_root = Path::new(ROOT).join("memory");
            let dir = mem_root.join(name);
            make_dir(&dir)?;
            made.push((dir.clone(), mem_root));
            std::fs::write(dir.join("memory.limit_in_bytes"), m.to_string())?;
            move_pids(&dir, pids)?;
        }
        Ok(())
    };
    setup(&mut made).inspect_err(|_| undo(&made))?;
    Ok((made, "v1"))
}

fn make_dir(dir: &Path) -> anyhow::Result<()> {
    // A cgroup left by a run that was killed: empty it into the parent first.
    if dir.exists() {
        undo(&[(dir.to_path_buf(), dir.parent().unwrap_or(Path::new(ROOT)).to_path_buf())]);
    }
    std::fs::create_dir(dir).map_err(|e| anyhow::anyhow!("mkdir {}: {e}", dir.display()))
}

fn move_pids(dir: &Path, pids: &[u32]) -> anyhow::Result<()> {
    for pid in pids {
        std::fs::write(dir.join("cgroup.procs"), pid.to_string())
            .map_err(|e| anyhow::anyhow!("moving {pid} into {}: {e}", dir.display()))?;
    }
    Ok(())
}

/// Lifts the limits first (a process forked meanwhile is then not held), moves every process back to the
/// parent until none is left, and removes the cgroup.
fn undo(dirs: &[(PathBuf, PathBuf)]) {
    for (dir, parent) in dirs {
        for (file, unlimited) in [
            ("cpu.max", "max 100000"),
            ("memory.max", "max"),
            ("cpu.cfs_quota_us", "-1"),
            ("memory.limit_in_bytes", "-1"),
        ] {
            if dir.join(file).exists() {
                let _ = std::fs::write(dir.join(file), unlimited);
            }
        }
        for _ in 0..50 {
            let members = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
            if members.trim().is_empty() && std::fs::remove_dir(dir).is_ok() {
                break;
            }
            for pid in members.lines() {
                let _ = std::fs::write(parent.join("cgroup.procs"), pid);
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}

fn duty_cycle(pids: Vec<u32>, cpu: f64) -> (tokio::sync::watch::Sender<bool>, tokio::task::JoinHandle<()>) {
    let (stop, mut stopped) = tokio::sync::watch::channel(false);
    let on = Duration::from_micros((cpu.clamp(0.01, 1.0) * 100_000.0) as u64);
    let off = Duration::from_millis(100).saturating_sub(on);
    let task = tokio::spawn(async move {
        loop {
            signal_all(&pids, libc::SIGSTOP);
            tokio::select! {
                _ = tokio::time::sleep(off) => {}
                _ = stopped.changed() => break,
            }
            signal_all(&pids, libc::SIGCONT);
            tokio::select! {
                _ = tokio::time::sleep(on) => {}
                _ = stopped.changed() => break,
            }
        }
        signal_all(&pids, libc::SIGCONT);
    });
    (stop, task)
}

fn signal_all(pids: &[u32], signal: i32) {
    for pid in pids {
        // SAFETY: kill(2) on PIDs of processes this run started (and their children).
        unsafe { libc::kill(*pid as i32, signal) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(pid: u32) -> Option<char> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        stat.rsplit_once(')')?.1.split_whitespace().next()?.chars().next()
    }

    /// Without cgroups the duty cycle stops the processes most of the time; dropping the throttle at any
    /// moment must leave them running.
    #[tokio::test]
    async fn a_dropped_duty_cycle_leaves_its_processes_running() -> anyhow::Result<()> {
        let mut child = std::process::Command::new("sleep").arg("30").spawn()?;
        let pid = child.id();
        for _ in 0..5 {
            let (stop, task) = duty_cycle(vec![pid], 0.02);
            tokio::time::sleep(Duration::from_millis(150)).await;
            drop(Throttle { how: How::DutyCycle { stop, task, pids: vec![pid] }, description: String::new() });
            tokio::time::sleep(Duration::from_millis(20)).await;
            assert_ne!(state(pid), Some('T'), "left stopped");
        }
        child.kill()?;
        child.wait()?;
        Ok(())
    }
}

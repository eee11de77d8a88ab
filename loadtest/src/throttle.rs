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
        pids: Vec<u32>,
    },
    DutyCycle {
        stop: tokio::sync::watch::Sender<bool>,
        task: tokio::task::JoinHandle<()>,
    },
}

impl Throttle {
    /// Limits `pids` and their descendants (present and future) to `cpu` of one CPU and, where the cgroup allows,
    /// `memory` bytes. `name` names the cgroup.
    pub fn apply(name: &str, pids: &[u32], cpu: f64, memory: Option<u64>) -> anyhow::Result<Self> {
        let pids = with_descendants(pids);
        anyhow::ensure!(!pids.is_empty(), "no process to throttle");
        let period = 100_000u64;
        let limits = Limits { quota: ((cpu * period as f64) as u64).max(1000), period, memory };
        let mem = memory.map(|m| format!(", memory {} MiB", m / (1024 * 1024))).unwrap_or_default();
        match cgroup_v2(name, &pids, limits)
            .or_else(|e2| cgroup_v1(name, &pids, limits).map_err(|e1| anyhow::anyhow!("v2: {e2}; v1: {e1}")))
        {
            Ok((dirs, version)) => Ok(Self {
                how: How::Cgroup { dirs, pids: pids.clone() },
                description: format!("{:.0}% of a CPU{mem} (cgroup {version})", cpu * 100.0),
            }),
            Err(e) => {
                let (stop, task) = duty_cycle(pids, cpu);
                Ok(Self {
                    how: How::DutyCycle { stop, task },
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
            How::Cgroup { dirs, pids } => {
                for (dir, parent) in dirs.iter() {
                    // Every process still in the cgroup (the listed ones and those forked since) goes back.
                    let members = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
                    for pid in members.lines().map(str::to_owned).chain(pids.iter().map(u32::to_string)) {
                        let _ = std::fs::write(parent.join("cgroup.procs"), &pid);
                    }
                    let _ = std::fs::remove_dir(dir);
                }
            }
            How::DutyCycle { stop, task } => {
                let _ = stop.send(true);
                task.abort();
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
    let _ = std::fs::write(root.join("cgroup.subtree_control"), "+cpu +memory");
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

fn undo(dirs: &[(PathBuf, PathBuf)]) {
    for (dir, parent) in dirs {
        for pid in std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default().lines() {
            let _ = std::fs::write(parent.join("cgroup.procs"), pid);
        }
        let _ = std::fs::remove_dir(dir);
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

/// `pids` and every process descended from them, from `/proc/*/stat`'s parent field.
pub fn with_descendants(pids: &[u32]) -> Vec<u32> {
    let parents: Vec<(u32, u32)> = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
            let ppid = stat.rsplit_once(')')?.1.split_whitespace().nth(1)?.parse().ok()?;
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

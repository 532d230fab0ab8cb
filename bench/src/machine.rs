//! What a figure was measured on: CPUs, kernel, memory, versions, commit, and how busy the
//! machine was. Every field is best effort: a figure without its machine is still printed.

use std::path::Path;
use std::process::Command;
use std::time::SystemTime;

/// The machine, the software and the code under test.
#[derive(Debug, Clone)]
pub struct Machine {
    pub date: String,
    pub cpus: usize,
    pub cpu_model: String,
    pub kernel: String,
    pub memory: String,
    pub postgres: String,
    pub etcd: String,
    pub commit: String,
}

impl Machine {
    pub fn describe() -> Machine {
        Machine {
            date: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
            cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
            cpu_model: proc_field("/proc/cpuinfo", "model name")
                .unwrap_or_else(|| "unknown CPU".into()),
            kernel: read_trimmed("/proc/sys/kernel/osrelease")
                .map_or_else(|| "unknown kernel".into(), |k| format!("Linux {k}")),
            memory: proc_field("/proc/meminfo", "MemTotal")
                .and_then(|m| m.split_whitespace().next()?.parse::<u64>().ok())
                .map_or_else(
                    || "unknown memory".into(),
                    |kib| format!("{:.1} GiB RAM", kib as f64 / 1024.0 / 1024.0),
                ),
            postgres: first_line(&pgherd_tests::pg_bin_dir().join("postgres"), &["--version"]),
            etcd: first_line(Path::new("/usr/bin/etcd"), &["--version"]),
            commit: commit(),
        }
    }

    /// One line for the report header.
    pub fn line(&self) -> String {
        format!(
            "{} CPUs ({}), {}, {}; {}; {}; commit {}",
            self.cpus,
            self.cpu_model,
            self.kernel,
            self.memory,
            self.postgres,
            self.etcd,
            self.commit
        )
    }
}

/// `/proc/loadavg`'s 1, 5 and 15 minute load averages.
pub fn load_average() -> String {
    read_trimmed("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|| "unknown".into())
}

fn read_trimmed(path: &str) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_string())
}

/// The value of the first `key: value` line of a /proc file.
fn proc_field(path: &str, key: &str) -> Option<String> {
    std::fs::read_to_string(path).ok()?.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        (k.trim() == key).then(|| v.trim().to_string())
    })
}

fn first_line(program: &Path, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .map(str::to_string)
        })
        .unwrap_or_else(|| format!("{} --version failed", program.display()))
}

/// `git describe --always --dirty` of the repository this was built from.
fn commit() -> String {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    Command::new("git")
        .arg("-C")
        .arg(&repo)
        .args(["describe", "--always", "--dirty", "--abbrev=12"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".into())
}

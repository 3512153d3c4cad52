//! What the harness reads from /proc about the processes it measures: CPU time (utime + stime
//! from `/proc/<pid>/stat`, which includes threads that have exited), peak resident memory
//! (`VmHWM` from `/proc/<pid>/status`), child processes (nginx's worker), the load average.

use std::path::Path;
use std::process::Command;
use std::sync::OnceLock;

use crate::error::BenchError;

/// Kernel clock ticks per second (`getconf CLK_TCK`; 100 on every Linux this runs on).
pub fn clock_ticks_per_second() -> u64 {
    static TICKS: OnceLock<u64> = OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|out| String::from_utf8(out.stdout).ok())
            .and_then(|text| text.trim().parse().ok())
            .filter(|ticks| *ticks > 0)
            .unwrap_or(100)
    })
}

/// utime + stime of `/proc/<pid>/stat`'s contents, in clock ticks.
pub fn parse_stat_cpu_ticks(stat: &str) -> Option<u64> {
    // The command name (field 2) is in parentheses and may contain spaces: split after the last
    // ')'. The remaining fields start at field 3 (state); utime and stime are fields 14 and 15.
    let (_, rest) = stat.rsplit_once(')')?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// CPU time (user + system) of process `pid` so far, in seconds.
pub fn cpu_seconds(pid: u32) -> Result<f64, BenchError> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).map_err(|e| BenchError::io("read process CPU time", &path, e))?;
    let ticks = parse_stat_cpu_ticks(&stat)
        .ok_or_else(|| BenchError::Invalid(format!("{path}: no utime/stime fields in {stat:?}")))?;
    Ok(ticks as f64 / clock_ticks_per_second() as f64)
}

/// CPU time of this process so far, in seconds.
pub fn self_cpu_seconds() -> Result<f64, BenchError> {
    let stat = std::fs::read_to_string("/proc/self/stat")
        .map_err(|e| BenchError::io("read own CPU time", "/proc/self/stat", e))?;
    let ticks = parse_stat_cpu_ticks(&stat)
        .ok_or_else(|| BenchError::Invalid("/proc/self/stat: no utime/stime fields".to_owned()))?;
    Ok(ticks as f64 / clock_ticks_per_second() as f64)
}

/// A `Vm…:` line of `/proc/<pid>/status`'s contents, in KiB.
pub fn parse_status_kib(status: &str, field: &str) -> Option<u64> {
    status.lines().find_map(|line| {
        let value = line.strip_prefix(field)?.strip_prefix(':')?;
        value.trim().trim_end_matches("kB").trim().parse().ok()
    })
}

/// Peak resident set size (`VmHWM`) of process `pid`, in KiB.
pub fn peak_rss_kib(pid: u32) -> Result<u64, BenchError> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).map_err(|e| BenchError::io("read process memory", &path, e))?;
    parse_status_kib(&status, "VmHWM").ok_or_else(|| BenchError::Invalid(format!("{path}: no VmHWM line")))
}

/// The process and all its descendants (nginx's master and worker), from `/proc/<pid>/task/*/children`.
pub fn process_tree(pid: u32) -> Vec<u32> {
    let mut tree = vec![pid];
    let mut next = 0;
    while next < tree.len() {
        let parent = tree[next];
        next += 1;
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{parent}/task")) else { continue };
        for task in tasks.flatten() {
            let Ok(children) = std::fs::read_to_string(task.path().join("children")) else { continue };
            tree.extend(children.split_whitespace().filter_map(|c| c.parse::<u32>().ok()));
        }
    }
    tree
}

/// The 1-, 5- and 15-minute load averages.
pub fn load_average() -> Result<[f64; 3], BenchError> {
    let text = std::fs::read_to_string("/proc/loadavg")
        .map_err(|e| BenchError::io("read the load average", "/proc/loadavg", e))?;
    let mut values = text.split_whitespace().map(|v| v.parse::<f64>().unwrap_or(f64::NAN));
    Ok([values.next().unwrap_or(f64::NAN), values.next().unwrap_or(f64::NAN), values.next().unwrap_or(f64::NAN)])
}

/// The filesystem holding `dir`, as "<type> on <device> (<mount point>)", from /proc/mounts.
pub fn filesystem_of(dir: &Path) -> String {
    let dir = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    let Ok(mounts) = std::fs::read_to_string("/proc/mounts") else { return "unknown".to_owned() };
    mounts
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let device = fields.next()?;
            let mount_point = fields.next()?;
            let fs_type = fields.next()?;
            dir.starts_with(mount_point).then(|| (mount_point.len(), format!("{fs_type} on {device} ({mount_point})")))
        })
        .max_by_key(|(len, _)| *len)
        .map(|(_, description)| description)
        .unwrap_or_else(|| "unknown".to_owned())
}

/// The CPU model name from /proc/cpuinfo.
pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|text| {
            text.lines().find_map(|line| {
                line.strip_prefix("model name").map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
            })
        })
        .unwrap_or_else(|| "unknown".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_read_after_the_command_name() {
        // A command name with spaces and a parenthesis, as /proc allows.
        let stat = "4242 (tokio (x) rt) S 1 4242 4242 0 -1 4194560 1234 0 0 0 731 269 0 0 20 0 3 0 100 0 0";
        assert_eq!(parse_stat_cpu_ticks(stat), Some(731 + 269));
        assert_eq!(parse_stat_cpu_ticks("garbage"), None);
    }

    #[test]
    fn own_process_has_cpu_time_and_a_peak_rss() {
        let pid = std::process::id();
        assert!(cpu_seconds(pid).is_ok());
        assert!(peak_rss_kib(pid).expect("VmHWM") > 0);
        assert_eq!(process_tree(pid)[0], pid);
    }

    #[test]
    fn status_lines_are_parsed_in_kib() {
        let status = "Name:\tkeygate\nVmPeak:\t  200000 kB\nVmHWM:\t   31337 kB\nVmRSS:\t 30000 kB\n";
        assert_eq!(parse_status_kib(status, "VmHWM"), Some(31337));
        assert_eq!(parse_status_kib(status, "VmSwap"), None);
    }
}

//! The broker's resident memory and CPU time, read from `/proc/PID/status` and
//! `/proc/PID/stat`.

use std::time::Duration;

/// One reading of a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcSample {
    /// Resident set size (`VmRSS`), in KiB.
    pub rss_kib: u64,
    /// User plus system CPU time of all its threads, living and exited.
    pub cpu: Duration,
}

/// Why a process could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ProcError {
    /// The files of the process could not be read (gone, or not ours).
    #[error(
        "cannot read /proc/{pid}/{file}: {error} (is the broker's pid right and the process running?)"
    )]
    Read {
        /// The pid.
        pid: u32,
        /// Which file.
        file: &'static str,
        /// The error.
        error: std::io::Error,
    },
    /// The file did not have the expected shape.
    #[error("unexpected content in /proc/{pid}/{file}")]
    Format {
        /// The pid.
        pid: u32,
        /// Which file.
        file: &'static str,
    },
}

/// Clock ticks per second of `/proc/PID/stat` times. Linux reports them in USER_HZ, which is
/// 100 on every architecture it runs on; `getconf` confirms it when available.
fn ticks_per_second() -> u64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|out| String::from_utf8(out.stdout).ok())
        .and_then(|text| text.trim().parse::<u64>().ok())
        .filter(|&hz| hz > 0)
        .unwrap_or(100)
}

/// Reads processes by pid.
#[derive(Debug, Clone, Copy)]
pub struct ProcReader {
    hz: u64,
}

impl Default for ProcReader {
    fn default() -> Self {
        Self::new()
    }
}

impl ProcReader {
    /// A reader that knows the tick length.
    pub fn new() -> Self {
        Self {
            hz: ticks_per_second(),
        }
    }

    /// Reads the memory and CPU time of `pid`.
    pub fn sample(&self, pid: u32) -> Result<ProcSample, ProcError> {
        let read = |file: &'static str| {
            std::fs::read_to_string(format!("/proc/{pid}/{file}"))
                .map_err(|error| ProcError::Read { pid, file, error })
        };
        let status = read("status")?;
        let rss_kib = parse_vm_rss(&status).ok_or(ProcError::Format {
            pid,
            file: "status",
        })?;
        let stat = read("stat")?;
        let ticks = parse_cpu_ticks(&stat).ok_or(ProcError::Format { pid, file: "stat" })?;
        let ticked = Duration::from_nanos(ticks.saturating_mul(1_000_000_000) / self.hz);
        // The tick count has a 10 ms grain, too coarse for a few hundred wake-ups; the
        // scheduler's nanosecond run time of the living threads is exact but forgets threads
        // that exited. The larger of the two is the better estimate.
        let cpu = ticked.max(threads_run_time(pid));
        Ok(ProcSample { rss_kib, cpu })
    }
}

/// The summed run time of the living threads of `pid` (`/proc/PID/task/*/schedstat`, first
/// field, nanoseconds); zero when unreadable.
fn threads_run_time(pid: u32) -> Duration {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Duration::ZERO;
    };
    let nanos: u64 = tasks
        .filter_map(Result::ok)
        .filter_map(|task| std::fs::read_to_string(task.path().join("schedstat")).ok())
        .filter_map(|text| text.split_whitespace().next()?.parse::<u64>().ok())
        .sum();
    Duration::from_nanos(nanos)
}

/// `VmRSS:    12345 kB` → 12345.
fn parse_vm_rss(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

/// utime + stime of `/proc/PID/stat`.
fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    parse_user_system_ticks(stat).map(|(user, system)| user + system)
}

/// utime and stime (fields 14 and 15) of a `/proc/.../stat` line, in ticks. The command name
/// (field 2) may hold spaces and parentheses, so the fields are counted after its last `)`.
pub(crate) fn parse_user_system_ticks(stat: &str) -> Option<(u64, u64)> {
    let after_name = &stat[stat.rfind(')')? + 1..];
    let mut fields = after_name.split_whitespace();
    // After the name come field 3 (state) onwards: utime is field 14, the 12th here.
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some((utime, stime))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_rss_from_status() {
        let status = "Name:\tmosquitto\nVmPeak:\t  9999 kB\nVmRSS:\t   5120 kB\nThreads:\t1\n";
        assert_eq!(parse_vm_rss(status), Some(5120));
        assert_eq!(parse_vm_rss("Name:\tx\n"), None);
    }

    #[test]
    fn reads_cpu_ticks_even_with_a_strange_name() {
        let stat =
            "1234 (a (b) c) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 75 0 0 20 0 1 0 99 1000 200";
        assert_eq!(parse_cpu_ticks(stat), Some(325));
        assert_eq!(parse_cpu_ticks("1234 (x) S 1"), None);
    }

    #[test]
    fn samples_this_process() {
        let sample = ProcReader::new()
            .sample(std::process::id())
            .expect("own /proc entry");
        assert!(sample.rss_kib > 0);
    }
}

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

/// The resident memory (`VmRSS`) of `pid`, in KiB.
pub fn rss_kib(pid: u32) -> Result<u64, ProcError> {
    memory(pid).map(|m| m.rss_kib)
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
    status_field(status, "VmRSS")
}

/// The number of a `/proc/PID/status` line: `RssAnon:    123 kB` → 123 for `RssAnon`.
fn status_field(status: &str, name: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

/// Where a process's resident memory is, from `/proc/PID/status`, in KiB: heap and stacks
/// (anonymous) apart from the pages of the program and libraries mapped from files.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MemorySample {
    /// `VmRSS`: all resident pages.
    pub rss_kib: u64,
    /// `RssAnon`: heap, stacks, other anonymous pages.
    pub anon_kib: u64,
    /// `RssFile`: pages of the executable and libraries (shared with other processes that
    /// map the same files).
    pub file_kib: u64,
    /// `RssShmem`: shared memory.
    pub shmem_kib: u64,
    /// `VmHWM`: the highest `VmRSS` so far.
    pub peak_kib: u64,
    /// `Threads`.
    pub threads: u64,
}

/// Reads the memory of `pid` from `/proc/PID/status`.
pub fn memory(pid: u32) -> Result<MemorySample, ProcError> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).map_err(|error| {
        ProcError::Read {
            pid,
            file: "status",
            error,
        }
    })?;
    parse_memory(&status).ok_or(ProcError::Format {
        pid,
        file: "status",
    })
}

fn parse_memory(status: &str) -> Option<MemorySample> {
    let field = |name| status_field(status, name);
    Some(MemorySample {
        rss_kib: field("VmRSS")?,
        anon_kib: field("RssAnon")?,
        file_kib: field("RssFile")?,
        shmem_kib: field("RssShmem")?,
        peak_kib: field("VmHWM")?,
        threads: field("Threads")?,
    })
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

/// The process that is `root` or descends from it and runs the program `name`: the file name
/// of its first command-line word, or its `/proc/PID/comm` (cut to 15 bytes by the kernel).
/// Finds the program a runner such as `wine` started (Wine names the process after the
/// program's main thread, so the command line is the surer sign).
pub fn find_in_tree(root: u32, name: &str) -> Option<u32> {
    let short = &name.as_bytes()[..name.len().min(15)];
    let mut parent_of = std::collections::HashMap::new();
    let mut named = Vec::new();
    for entry in std::fs::read_dir("/proc").ok()?.filter_map(Result::ok) {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        let Some((comm, ppid)) = parse_name_and_parent(&stat) else {
            continue;
        };
        parent_of.insert(pid, ppid);
        let program = std::fs::read(entry.path().join("cmdline")).ok();
        let program = program
            .as_deref()
            .and_then(|c| c.split(|&b| b == 0).next())
            .and_then(|first| first.rsplit(|&b| b == b'/' || b == b'\\').next());
        if comm.as_bytes() == short || program == Some(name.as_bytes()) {
            named.push(pid);
        }
    }
    named.into_iter().find(|&pid| {
        let mut at = pid;
        // A chain of parents ends at pid 1 (or 0); the bound guards against a cycle read
        // while processes come and go.
        for _ in 0..64 {
            if at == root {
                return true;
            }
            match parent_of.get(&at) {
                Some(&parent) if parent > 1 => at = parent,
                _ => return false,
            }
        }
        false
    })
}

/// The command name (field 2) and parent pid (field 4) of a `/proc/PID/stat` line.
fn parse_name_and_parent(stat: &str) -> Option<(&str, u32)> {
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let name = stat.get(open + 1..close)?;
    let ppid = stat[close + 1..].split_whitespace().nth(1)?.parse().ok()?;
    Some((name, ppid))
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
    fn reads_where_the_memory_is() {
        let status = "Name:\tbeckon\nVmHWM:\t   13000 kB\nVmRSS:\t   12500 kB\n\
                      RssAnon:\t    4000 kB\nRssFile:\t    8500 kB\nRssShmem:\t       0 kB\n\
                      Threads:\t1\n";
        assert_eq!(
            parse_memory(status),
            Some(MemorySample {
                rss_kib: 12500,
                anon_kib: 4000,
                file_kib: 8500,
                shmem_kib: 0,
                peak_kib: 13000,
                threads: 1,
            })
        );
        assert_eq!(parse_memory("VmRSS:\t1 kB\n"), None, "a field missing");
    }

    #[test]
    fn reads_cpu_ticks_even_with_a_strange_name() {
        let stat =
            "1234 (a (b) c) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 75 0 0 20 0 1 0 99 1000 200";
        assert_eq!(parse_cpu_ticks(stat), Some(325));
        assert_eq!(parse_cpu_ticks("1234 (x) S 1"), None);
    }

    #[test]
    fn finds_a_named_child_in_the_tree_of_its_parent() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("start sleep");
        let me = std::process::id();
        let found = find_in_tree(me, "sleep");
        let not_mine = find_in_tree(1, "no-such-program");
        let _ = child.kill();
        let _ = child.wait();
        assert_eq!(found, Some(child.id()));
        assert_eq!(not_mine, None);
        assert_eq!(
            parse_name_and_parent("42 (a (b) c) S 7 42 42"),
            Some(("a (b) c", 7))
        );
    }

    #[test]
    fn reads_the_rss_of_a_process_or_names_the_missing_one() {
        let own = rss_kib(std::process::id()).expect("own /proc entry");
        assert!(own > 0);
        // Above the kernel's largest pid (4,194,304): never a running process.
        let error = rss_kib(4_999_999).expect_err("no such process").to_string();
        assert!(error.contains("/proc/4999999/status"), "{error}");
    }

    #[test]
    fn samples_this_process() {
        let sample = ProcReader::new()
            .sample(std::process::id())
            .expect("own /proc entry");
        assert!(sample.rss_kib > 0);
    }
}

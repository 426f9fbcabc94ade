//! The storm phase: the broker restarted (or every connection cut), a cluster node SIGKILLed
//! (`--storm-kill`), or nats-server SIGKILLed and started again (`--storm-restart`); then the
//! agents' return is timed.

use std::ffi::OsString;
#[cfg(unix)]
use std::os::unix::ffi::OsStringExt as _;
#[cfg(unix)]
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::cli::LoadArgs;
use crate::conn::Target;
use crate::fleet::{BrokerControl, Fleet};
use crate::nats::{NatsMonitor, Varz};
use crate::procstat::ProcReader;
use crate::protocol::{Command, Reply, StormOutcome, unix_ns};
use crate::report::{EndpointBack, NatsStorm, StormReport};

/// How long the workers keep counting lost connections after a kill before they may answer
/// "all back": a SIGKILLed process's sockets close at once, so its agents see the end within
/// milliseconds even across a network.
const LOST_SETTLE: Duration = Duration::from_secs(2);

/// Bound on the wait for a SIGKILLed process to be gone.
const KILL_LIMIT: Duration = Duration::from_secs(10);

/// How the storm is made.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum StormMethod {
    /// Restart the broker when the bench started it, else cut every connection.
    #[default]
    Broker,
    /// SIGKILL a cluster node the bench does not manage; its agents move to the others.
    KillNode {
        /// The node's process id.
        pid: u32,
    },
    /// SIGKILL nats-server, wait the outage, start it again with the same command line and
    /// working directory.
    RestartNats {
        /// nats-server's process id.
        pid: u32,
        /// Where the restarted nats-server writes its output.
        log: PathBuf,
    },
}

impl StormMethod {
    /// The name the report gives it.
    fn name(&self, restart: bool) -> &'static str {
        match self {
            Self::Broker if restart => "restart",
            Self::Broker => "cut",
            Self::KillNode { .. } => "kill node",
            Self::RestartNats { .. } => "restart nats",
        }
    }
}

/// What the bench needs to start a process again as it runs now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessImage {
    /// The executable (`/proc/PID/exe`, or the first word of the command line when that
    /// file is gone).
    pub program: PathBuf,
    /// The command line, its first word included.
    pub argv: Vec<OsString>,
    /// The working directory.
    pub cwd: PathBuf,
}

/// The option that names a process, for errors.
fn option_of(method: &StormMethod) -> &'static str {
    match method {
        StormMethod::RestartNats { .. } => "--storm-restart",
        _ => "--storm-kill",
    }
}

/// Fails unless process `pid` runs (a zombie, already dead, does not count).
pub fn check_running(pid: u32, option: &str) -> anyhow::Result<()> {
    if pid == 0 || pid == std::process::id() {
        bail!("{option} {pid}: not a process the bench may kill");
    }
    match process_state(pid) {
        Some('Z' | 'X') => bail!("{option} {pid}: that process has already exited"),
        Some(_) => Ok(()),
        None => bail!("{option} {pid}: no such process (/proc/{pid} does not exist)"),
    }
}

/// The state letter of `/proc/PID/stat` (R, S, Z...), `None` when the process is gone.
fn process_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name in parentheses may hold spaces: the state follows the last ')'.
    stat.rsplit_once(')')
        .and_then(|(_, rest)| rest.trim_start().chars().next())
}

impl ProcessImage {
    /// Reads how process `pid` was started, from /proc (same user or root).
    pub fn read(pid: u32, option: &str) -> anyhow::Result<Self> {
        check_running(pid, option)?;
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline"))
            .with_context(|| format!("{option} {pid}: cannot read /proc/{pid}/cmdline"))?;
        let argv = parse_cmdline(&cmdline);
        if argv.is_empty() {
            bail!("{option} {pid}: /proc/{pid}/cmdline is empty (a kernel thread, or exiting)");
        }
        let cwd = std::fs::read_link(format!("/proc/{pid}/cwd")).with_context(|| {
            format!(
                "{option} {pid}: cannot read /proc/{pid}/cwd (run the bench as the user of that \
                 process, or as root)"
            )
        })?;
        // A binary replaced since the start reads "... (deleted)": start the command line's.
        let program = std::fs::read_link(format!("/proc/{pid}/exe"))
            .ok()
            .filter(|exe| exe.is_file())
            .unwrap_or_else(|| PathBuf::from(&argv[0]));
        Ok(Self { program, argv, cwd })
    }

    /// Starts the process again, in its own process group and with no terminal, so that the
    /// bench exiting (or a Ctrl-C to it) leaves it running; its output is appended to `log`.
    pub fn spawn_detached(&self, log: &Path) -> anyhow::Result<std::process::Child> {
        let out = std::fs::File::options()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("opening {} for the restarted process", log.display()))?;
        let mut command = std::process::Command::new(&self.program);
        // The bench's storms read /proc, so they run on Linux; this compiles elsewhere too
        // (the bench is part of every build of the binary).
        #[cfg(unix)]
        command.arg0(&self.argv[0]).process_group(0);
        command
            .args(&self.argv[1..])
            .current_dir(&self.cwd)
            .stdin(Stdio::null())
            .stdout(out.try_clone().context("duplicating the log file")?)
            .stderr(out)
            .spawn()
            .with_context(|| {
                format!(
                    "cannot start {} again in {}",
                    self.program.display(),
                    self.cwd.display()
                )
            })
    }
}

/// The words of a `/proc/PID/cmdline`: each one followed by a NUL.
pub fn parse_cmdline(raw: &[u8]) -> Vec<OsString> {
    if raw.is_empty() {
        return Vec::new();
    }
    raw.strip_suffix(&[0])
        .unwrap_or(raw)
        .split(|&b| b == 0)
        .map(os_string)
        .collect()
}

#[cfg(unix)]
fn os_string(word: &[u8]) -> OsString {
    OsString::from_vec(word.to_vec())
}

#[cfg(not(unix))]
fn os_string(word: &[u8]) -> OsString {
    OsString::from(String::from_utf8_lossy(word).into_owned())
}

/// SIGKILLs `pid` with kill(1) and waits until it is gone (or a zombie: its sockets are
/// closed then). Returns when the signal was sent (Unix ns).
pub fn kill(pid: u32, option: &str) -> anyhow::Result<u64> {
    check_running(pid, option)?;
    let at = unix_ns();
    let out = std::process::Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .output()
        .with_context(|| format!("{option} {pid}: cannot run kill"))?;
    if !out.status.success() {
        bail!(
            "{option} {pid}: kill -KILL failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let started = Instant::now();
    while !matches!(process_state(pid), None | Some('Z' | 'X')) {
        if started.elapsed() > KILL_LIMIT {
            bail!("{option} {pid}: still running {KILL_LIMIT:?} after SIGKILL");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(at)
}

/// Sum of the CPU time of `pids`; `None` when there are none or one cannot be read.
fn cpu_of(reader: &ProcReader, pids: &[u32]) -> Option<Duration> {
    if pids.is_empty() {
        return None;
    }
    pids.iter()
        .map(|&pid| reader.sample(pid).ok().map(|s| s.cpu))
        .sum()
}

/// What the storm phase needs beyond the fleet and the broker.
pub(crate) struct StormSetup<'a> {
    pub(crate) method: &'a StormMethod,
    pub(crate) load: &'a LoadArgs,
    pub(crate) targets: &'a [Target],
    pub(crate) node_pids: &'a [u32],
    pub(crate) nats: Option<&'a NatsMonitor>,
}

/// Where the agents of worker `worker` connect first (its home), then in order: the other
/// targets, round robin from its own.
pub(crate) fn endpoint_order(worker: usize, targets: usize) -> impl Iterator<Item = usize> {
    let targets = targets.max(1);
    (0..targets).map(move |k| (worker + k) % targets)
}

pub(crate) async fn storm(
    fleet: &mut Fleet,
    broker: &mut dyn BrokerControl,
    setup: &StormSetup<'_>,
) -> anyhow::Result<StormReport> {
    let (method, load) = (setup.method, setup.load);
    let restart = *method == StormMethod::Broker && broker.can_restart();
    let reader = ProcReader::new();
    // CPU of the storm: the broker's for a restart or a cut; in a cluster, that of the nodes
    // read with --node-pid, the killed one left out.
    let cluster_pids: Vec<u32> = match method {
        StormMethod::Broker => Vec::new(),
        StormMethod::KillNode { pid } | StormMethod::RestartNats { pid, .. } => {
            let pids: Vec<u32> = if setup.node_pids.is_empty() {
                broker.pid().into_iter().collect()
            } else {
                setup.node_pids.to_vec()
            };
            pids.into_iter().filter(|p| p != pid).collect()
        }
    };
    let cpu_now = |broker: &dyn BrokerControl| match method {
        StormMethod::Broker => broker
            .pid()
            .and_then(|pid| reader.sample(pid).ok())
            .map(|s| s.cpu),
        _ => cpu_of(&reader, &cluster_pids),
    };
    // From just before the cut or kill, or from the restarted broker's first moment of
    // listening (its start-up left out), to the end of the wait.
    let mut before = if restart { None } else { cpu_now(&*broker) };
    let nats_before = match (method, setup.nats) {
        (StormMethod::RestartNats { .. }, Some(nats)) => Some(
            nats.read()
                .await
                .context("--nats-monitor before the nats-server restart")?,
        ),
        _ => None,
    };
    let cut_unix_ns = unix_ns();
    let lost_only = *method != StormMethod::Broker;
    fleet
        .broadcast(&Command::ArmStorm {
            cut: *method == StormMethod::Broker && !restart,
            lost_only,
        })
        .await?;
    fleet
        .gather(Duration::from_secs(30), "arming the storm")
        .await?;
    let outage = Duration::from_secs_f64(load.outage_secs.max(0.0));
    let wait = Duration::from_secs_f64(load.storm_wait_secs.max(1.0));
    let mut killed_pid = None;
    let mut restarted = None;
    let mut nats = None;
    let (down_unix_ns, up_unix_ns) = match method {
        StormMethod::Broker if restart => {
            let times = tokio::task::block_in_place(|| broker.restart(outage))
                .context("restarting the broker for the storm")?;
            before = cpu_now(&*broker);
            times
        }
        StormMethod::Broker => (cut_unix_ns, cut_unix_ns),
        StormMethod::KillNode { pid } => {
            let at = tokio::task::block_in_place(|| kill(*pid, option_of(method)))?;
            killed_pid = Some(*pid);
            (at, at)
        }
        StormMethod::RestartNats { pid, log } => {
            let option = option_of(method);
            let image = ProcessImage::read(*pid, option)?;
            let down = tokio::task::block_in_place(|| kill(*pid, option))?;
            killed_pid = Some(*pid);
            tokio::time::sleep(outage).await;
            let mut child = image.spawn_detached(log).with_context(|| {
                format!("{option} {pid}: nats-server was killed and could not be started again")
            })?;
            restarted = Some((child.id(), log.clone()));
            let up = wait_started(&mut child, setup.nats, wait, log).await?;
            if let (Some(monitor), Some(before)) = (setup.nats, nats_before) {
                nats = Some(nats_back(monitor, before, up, wait).await);
            }
            (down, up)
        }
    };
    fleet
        .broadcast(&Command::CollectStorm {
            wait_ms: u64::try_from(wait.as_millis()).unwrap_or(u64::MAX),
            settle_ms: if lost_only {
                u64::try_from(LOST_SETTLE.as_millis()).unwrap_or(0)
            } else {
                0
            },
        })
        .await?;
    let outcomes: Vec<(usize, StormOutcome)> = fleet
        .gather(wait + Duration::from_secs(30), "storm")
        .await?
        .into_iter()
        .enumerate()
        .filter_map(|(worker, r)| match r {
            Reply::Storm(s) => Some((worker, s)),
            _ => None,
        })
        .collect();
    let after = cpu_now(&*broker);
    let mut back_times: Vec<u64> = outcomes
        .iter()
        .flat_map(|(_, o)| o.back_unix_ns.iter().copied())
        .collect();
    back_times.sort_unstable();
    let expected: usize = outcomes.iter().map(|(_, o)| o.expected).sum();
    let back: usize = outcomes.iter().map(|(_, o)| o.back).sum();
    // The 99th percentile of the whole fleet, not of those that came back.
    let needed = (expected as f64 * 0.99).ceil() as usize;
    let at_99 = (needed > 0)
        .then(|| back_times.get(needed - 1).copied())
        .flatten();
    let seconds = |from: u64, to: u64| to.saturating_sub(from) as f64 / 1e9;
    Ok(StormReport {
        method: method.name(restart).to_owned(),
        outage_s: if restart || matches!(method, StormMethod::RestartNats { .. }) {
            load.outage_secs
        } else {
            0.0
        },
        expected,
        back,
        not_back: expected.saturating_sub(back),
        back_99_after_up_s: at_99.map(|t| seconds(up_unix_ns, t)),
        back_99_after_down_s: at_99.map(|t| seconds(down_unix_ns, t)),
        back_all_after_up_s: (back == expected && expected > 0)
            .then(|| back_times.last().map(|&t| seconds(up_unix_ns, t)))
            .flatten(),
        peak_connects_per_s: peak_rate(&back_times),
        cpu_per_reconnect_us: match (before, after) {
            (Some(b), Some(a)) if back > 0 => {
                Some(a.saturating_sub(b).as_secs_f64() * 1e6 / back as f64)
            }
            _ => None,
        },
        attempts: outcomes.iter().map(|(_, o)| o.attempts).sum(),
        first_error: outcomes.iter().find_map(|(_, o)| o.first_error.clone()),
        wait_s: wait.as_secs_f64(),
        killed_pid,
        up_after_down_s: (up_unix_ns != down_unix_ns).then(|| seconds(down_unix_ns, up_unix_ns)),
        restarted_pid: restarted.as_ref().map(|(pid, _)| *pid),
        restarted_log: restarted.map(|(_, log)| log.display().to_string()),
        back_per_endpoint: if setup.targets.len() > 1 {
            back_per_endpoint(setup.targets, &outcomes)
        } else {
            Vec::new()
        },
        nats,
    })
}

/// The agents back on each target, from each worker's counts in its own endpoint order.
fn back_per_endpoint(targets: &[Target], outcomes: &[(usize, StormOutcome)]) -> Vec<EndpointBack> {
    let mut counts = vec![0; targets.len()];
    for (worker, outcome) in outcomes {
        for (target, n) in endpoint_order(*worker, targets.len()).zip(&outcome.back_per_endpoint) {
            counts[target] += n;
        }
    }
    targets
        .iter()
        .zip(counts)
        .map(|(t, back)| EndpointBack {
            endpoint: format!("{}:{}", t.host, t.port),
            back,
        })
        .collect()
}

/// Waits until the restarted nats-server answers on its monitoring port and returns that
/// moment (Unix ns); without a monitor, waits a second and returns when it was started.
/// Fails when it exits.
async fn wait_started(
    child: &mut std::process::Child,
    monitor: Option<&NatsMonitor>,
    wait: Duration,
    log: &Path,
) -> anyhow::Result<u64> {
    let (started, spawned_unix_ns) = (Instant::now(), unix_ns());
    loop {
        if let Some(status) = child
            .try_wait()
            .context("watching the restarted nats-server")?
        {
            bail!(
                "the restarted nats-server exited at start ({status}); its output is in {}",
                log.display()
            );
        }
        let up = match monitor {
            Some(monitor) => monitor.read().await.is_ok().then(unix_ns),
            None => (started.elapsed() >= Duration::from_secs(1)).then_some(spawned_unix_ns),
        };
        if let Some(at) = up {
            return Ok(at);
        }
        if started.elapsed() > wait {
            bail!(
                "the restarted nats-server (pid {}) did not answer on {} within {wait:?}; its \
                 output is in {}",
                child.id(),
                monitor.map(NatsMonitor::url).unwrap_or_default(),
                log.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Polls `/varz` until nats-server holds as many client connections and subscriptions as
/// before the kill (the nodes' NATS clients reconnected and subscribed again), within `wait`.
async fn nats_back(
    monitor: &NatsMonitor,
    before: Varz,
    up_unix_ns: u64,
    wait: Duration,
) -> NatsStorm {
    let started = Instant::now();
    let mut last: Result<Varz, String> = Err("not read".to_owned());
    let mut back_at = None;
    while started.elapsed() <= wait {
        last = monitor.read().await.map_err(|e| format!("{e:#}"));
        if let Ok(v) = &last
            && v.connections >= before.connections
            && v.subscriptions >= before.subscriptions
        {
            back_at = Some(unix_ns());
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (after, error) = match last {
        Ok(v) => (Some(v), None),
        Err(e) => (None, Some(e)),
    };
    NatsStorm {
        url: monitor.url(),
        connections_before: before.connections,
        subscriptions_before: before.subscriptions,
        connections_after: after.map(|v| v.connections),
        subscriptions_after: after.map(|v| v.subscriptions),
        back_after_up_s: back_at.map(|t| t.saturating_sub(up_unix_ns) as f64 / 1e9),
        error,
    }
}

/// The most reconnections completed within any one second.
pub(crate) fn peak_rate(sorted_times: &[u64]) -> usize {
    let mut peak = 0;
    let mut start = 0;
    // A sliding window over the sorted times gives the true peak, not one bound to buckets.
    for (end, &t) in sorted_times.iter().enumerate() {
        while sorted_times[start] + 1_000_000_000 <= t {
            start += 1;
        }
        peak = peak.max(end + 1 - start);
    }
    peak
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peak_rate_counts_the_busiest_second() {
        let s = 1_000_000_000;
        let times = [0, s * 6 / 10, s + s / 4, s + s / 3, s + s / 2, 5 * s];
        // From 0.6 s to 1.5 s: four reconnections.
        assert_eq!(peak_rate(&times), 4);
        assert_eq!(peak_rate(&[]), 0);
    }

    #[test]
    fn agents_fail_over_round_robin_from_their_own_node() {
        assert_eq!(endpoint_order(1, 4).collect::<Vec<_>>(), [1, 2, 3, 0]);
        assert_eq!(endpoint_order(4, 4).collect::<Vec<_>>(), [0, 1, 2, 3]);
        assert_eq!(endpoint_order(3, 1).collect::<Vec<_>>(), [0]);
    }

    #[test]
    fn command_lines_split_on_nul() {
        assert_eq!(
            parse_cmdline(b"nats-server\0-p\x004222\0-m\0\0"),
            ["nats-server", "-p", "4222", "-m", ""]
                .map(OsString::from)
                .to_vec()
        );
        assert!(parse_cmdline(b"").is_empty());
    }

    #[test]
    fn processes_that_do_not_run_are_refused_with_their_option() {
        // Far above any pid_max.
        let error = check_running(999_999_999, "--storm-kill").expect_err("no such process");
        assert!(
            error
                .to_string()
                .contains("--storm-kill 999999999: no such process"),
            "{error}"
        );
        let error = check_running(std::process::id(), "--storm-kill").expect_err("the bench");
        assert!(error.to_string().contains("not a process"), "{error}");
        let error = ProcessImage::read(999_999_999, "--storm-restart").expect_err("none");
        assert!(
            error.to_string().starts_with("--storm-restart 999999999"),
            "{error}"
        );
    }

    #[test]
    fn reads_and_restarts_a_process_as_it_was_started() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .current_dir(dir.path())
            .spawn()
            .expect("sleep");
        // Until it has exec'd, the child's command line is still this test program's.
        let started = Instant::now();
        while std::fs::read(format!("/proc/{}/cmdline", child.id()))
            .is_ok_and(|c| !c.starts_with(b"sleep\0"))
        {
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "sleep did not start"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        let image = ProcessImage::read(child.id(), "--storm-restart").expect("readable");
        assert_eq!(image.argv, ["sleep", "30"].map(OsString::from).to_vec());
        assert_eq!(image.cwd, dir.path().canonicalize().expect("dir"));
        assert!(image.program.is_file());
        let log = dir.path().join("out.log");
        let mut again = image.spawn_detached(&log).expect("started again");
        kill(child.id(), "--storm-restart").expect("killed");
        assert!(matches!(process_state(child.id()), Some('Z') | None));
        child.wait().expect("reaped");
        assert_eq!(
            ProcessImage::read(again.id(), "--storm-restart")
                .expect("again")
                .argv,
            image.argv
        );
        kill(again.id(), "--storm-restart").expect("killed again");
        again.wait().expect("reaped");
        let error = kill(again.id(), "--storm-kill").expect_err("gone");
        assert!(error.to_string().contains("--storm-kill"), "{error}");
    }
}

//! Starting the console and the broker as processes, and the call workers that hold the
//! simulated agents.

use super::*;
use crate::worker_process::{WorkerGroup, impl_worker_reply};

/// A process the bench started; killed when dropped.
pub(crate) struct Service {
    pub(crate) child: Child,
    pub(crate) pid: u32,
}

impl Service {
    /// Asks it to stop (SIGTERM) and waits a little, then kills it.
    pub(crate) async fn stop(mut self) {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &self.pid.to_string()])
            .status();
        if tokio::time::timeout(Duration::from_secs(10), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
    }
}

pub(crate) fn free_port() -> anyhow::Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").context("finding a free port on 127.0.0.1")?;
    Ok(l.local_addr()?.port())
}

/// Starts `program args`, logs to `log`, and waits (at most 60 s) for a stdout line
/// containing `ready`; returns the service and the stdout lines read until then.
pub(crate) async fn start_service(
    name: &'static str,
    program: &Path,
    args: &[String],
    env: &[(&str, String)],
    log: &Path,
    ready: &str,
) -> anyhow::Result<(Service, Vec<String>)> {
    let log_file = std::fs::File::create(log)
        .with_context(|| format!("creating the {name} log {}", log.display()))?;
    let mut command = tokio::process::Command::new(program);
    command
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(log_file))
        .kill_on_drop(true)
        .env("RUST_LOG", "warn");
    for (k, v) in env {
        command.env(k, v);
    }
    let mut child = command.spawn().with_context(|| {
        format!(
            "starting the {name}: {} {}",
            program.display(),
            args.join(" ")
        )
    })?;
    let pid = child.id().context("the started process has no pid")?;
    let stdout = child.stdout.take().context("no stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let mut seen = Vec::new();
    let wait = async {
        while let Some(line) = lines.next_line().await? {
            let done = line.contains(ready);
            seen.push(line);
            if done {
                return Ok::<bool, std::io::Error>(true);
            }
        }
        Ok(false)
    };
    let ok = tokio::time::timeout(Duration::from_secs(60), wait).await;
    let log_tail = || {
        std::fs::read_to_string(log)
            .unwrap_or_default()
            .lines()
            .rev()
            .take(5)
            .collect::<Vec<_>>()
            .join(" | ")
    };
    match ok {
        Ok(Ok(true)) => {}
        Ok(Ok(false)) | Ok(Err(_)) => {
            bail!("the {name} exited before it was ready: {}", log_tail())
        }
        Err(_) => bail!("the {name} was not ready within 60 s: {}", log_tail()),
    }
    // Keep draining stdout so that the service never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok((Service { child, pid }, seen))
}

/// The call's worker processes.
pub(super) type Workers = WorkerGroup<CallReply>;

impl_worker_reply!(CallReply);

pub(super) fn sum_phase(replies: Vec<CallReply>, enrolled: bool) -> anyhow::Result<PhaseOutcome> {
    let mut total = PhaseOutcome::default();
    for r in replies {
        let p = match (r, enrolled) {
            (CallReply::Enrolled(p), true) | (CallReply::Connected(p), false) => p,
            (other, _) => bail!("a call worker answered out of turn: {other:?}"),
        };
        total.ok += p.ok;
        total.failed += p.failed;
        total.elapsed_ms = total.elapsed_ms.max(p.elapsed_ms);
        if total.first_error.is_none() {
            total.first_error = p.first_error;
        }
    }
    Ok(total)
}

pub(crate) fn load_average() -> Option<[f64; 3]> {
    let text = std::fs::read_to_string("/proc/loadavg").ok()?;
    let mut it = text.split_whitespace().map(|v| v.parse::<f64>().ok());
    Some([it.next()??, it.next()??, it.next()??])
}

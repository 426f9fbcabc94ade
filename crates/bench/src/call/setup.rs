//! Starting the console and the broker as processes, and the call workers that hold the
//! simulated agents.

use super::*;

/// A process the bench started; killed when dropped.
pub(super) struct Service {
    pub(super) child: Child,
    pub(super) pid: u32,
}

impl Service {
    /// Asks it to stop (SIGTERM) and waits a little, then kills it.
    pub(super) async fn stop(mut self) {
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

pub(super) fn free_port() -> anyhow::Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").context("finding a free port on 127.0.0.1")?;
    Ok(l.local_addr()?.port())
}

/// Starts `program args`, logs to `log`, and waits (at most 60 s) for a stdout line
/// containing `ready`; returns the service and the stdout lines read until then.
pub(super) async fn start_service(
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

pub(super) struct CallWorker {
    pub(super) index: usize,
    pub(super) pid: Option<u32>,
    pub(super) child: Child,
    pub(super) stdin: ChildStdin,
    pub(super) replies: mpsc::UnboundedReceiver<Result<CallReply, String>>,
}

impl CallWorker {
    pub(super) async fn spawn(program: &Path, config: &CallWorkerConfig) -> anyhow::Result<Self> {
        let mut child = tokio::process::Command::new(program)
            .args(["bench", "call-worker"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting call worker {}", program.display()))?;
        let mut stdin = child.stdin.take().context("worker stdin missing")?;
        let stdout = child.stdout.take().context("worker stdout missing")?;
        let (tx, replies) = mpsc::unbounded_channel();
        let index = config.worker;
        tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            loop {
                let item = match lines.next_line().await {
                    Ok(Some(line)) => serde_json::from_str::<CallReply>(&line).map_err(|e| {
                        format!("call worker {index} wrote an unreadable line ({e}): {line:.200}")
                    }),
                    Ok(None) => Err(format!("call worker {index} exited")),
                    Err(e) => Err(format!("reading call worker {index}: {e}")),
                };
                let end = item.is_err();
                if tx.send(item).is_err() || end {
                    return;
                }
            }
        });
        let mut line = serde_json::to_string(config).context("encoding a worker configuration")?;
        line.push('\n');
        stdin
            .write_all(line.as_bytes())
            .await
            .with_context(|| format!("sending call worker {index} its configuration"))?;
        Ok(Self {
            index,
            pid: child.id(),
            child,
            stdin,
            replies,
        })
    }

    pub(super) async fn send(&mut self, command: &CallCommand) -> anyhow::Result<()> {
        let mut line = serde_json::to_string(command).context("encoding a worker command")?;
        line.push('\n');
        self.stdin
            .write_all(line.as_bytes())
            .await
            .with_context(|| format!("call worker {} takes no commands (exited?)", self.index))
    }

    pub(super) async fn reply(
        &mut self,
        deadline: Instant,
        what: &str,
    ) -> anyhow::Result<CallReply> {
        match tokio::time::timeout_at(deadline, self.replies.recv()).await {
            Err(_) => bail!("call worker {} did not answer ({what}) in time", self.index),
            Ok(None) => bail!("call worker {} is gone ({what})", self.index),
            Ok(Some(Err(m))) => bail!("{m} ({what})"),
            Ok(Some(Ok(CallReply::Failed { message }))) => {
                bail!("call worker {} failed ({what}): {message}", self.index)
            }
            Ok(Some(Ok(r))) => Ok(r),
        }
    }
}

pub(super) struct Workers(pub(super) Vec<CallWorker>);

impl Workers {
    pub(super) async fn ask(
        &mut self,
        command: &CallCommand,
        within: Duration,
        what: &str,
    ) -> anyhow::Result<Vec<CallReply>> {
        for w in &mut self.0 {
            w.send(command).await?;
        }
        let deadline = Instant::now() + within;
        let mut out = Vec::new();
        for w in &mut self.0 {
            out.push(w.reply(deadline, what).await?);
        }
        Ok(out)
    }

    pub(super) async fn shutdown(mut self) {
        for w in &mut self.0 {
            let _ = w.send(&CallCommand::Shutdown).await;
        }
        let deadline = Instant::now() + Duration::from_secs(15);
        for w in &mut self.0 {
            if tokio::time::timeout_at(deadline, w.child.wait())
                .await
                .is_err()
            {
                let _ = w.child.kill().await;
            }
        }
    }
}

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

pub(super) fn load_average() -> Option<[f64; 3]> {
    let text = std::fs::read_to_string("/proc/loadavg").ok()?;
    let mut it = text.split_whitespace().map(|v| v.parse::<f64>().ok());
    Some([it.next()??, it.next()??, it.next()??])
}

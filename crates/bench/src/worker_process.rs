//! The parent's end of the bench's worker processes (`bench worker` for fleet and compare,
//! `bench call-worker` for call): each is started with its configuration as the first JSON
//! line on its stdin, then takes one JSON command per line and answers with one JSON reply
//! per line on its stdout.

use std::fmt::Debug;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::fleet::WorkerLauncher;

/// A reply of a worker process.
pub(crate) trait WorkerReply: Serialize + DeserializeOwned + Debug + Send + 'static {
    /// The reply saying that the worker could not do what was asked, and why.
    fn failed(message: String) -> Self;
    /// The worker's message when this reply says it could not do what was asked.
    fn failure(&self) -> Option<&str>;
}

/// Implements [`WorkerReply`] for a reply enum whose failure is `Failed { message }`.
macro_rules! impl_worker_reply {
    ($reply:ty) => {
        impl $crate::worker_process::WorkerReply for $reply {
            fn failed(message: String) -> Self {
                Self::Failed { message }
            }

            fn failure(&self) -> Option<&str> {
                match self {
                    Self::Failed { message } => Some(message),
                    _ => None,
                }
            }
        }
    };
}
pub(crate) use impl_worker_reply;

/// One running worker process.
pub(crate) struct WorkerProcess<R> {
    /// Its number, as in its configuration.
    pub(crate) index: usize,
    /// Its process id, to read its CPU time.
    pub(crate) pid: Option<u32>,
    /// What it is called in errors ("worker", "call worker").
    name: &'static str,
    child: Child,
    stdin: ChildStdin,
    replies: mpsc::UnboundedReceiver<Result<R, String>>,
}

impl<R: WorkerReply> WorkerProcess<R> {
    /// Starts worker `index` (called `name` in errors) as `launcher` says and hands it
    /// `config`.
    pub(crate) async fn spawn(
        name: &'static str,
        launcher: &WorkerLauncher,
        index: usize,
        config: &impl Serialize,
    ) -> anyhow::Result<Self> {
        let mut child = tokio::process::Command::new(&launcher.program)
            .args(&launcher.args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| {
                format!(
                    "cannot start {name} process {} {}",
                    launcher.program.display(),
                    launcher.args.join(" ")
                )
            })?;
        let mut stdin = child.stdin.take().context("worker stdin missing")?;
        let stdout = child.stdout.take().context("worker stdout missing")?;
        let (tx, replies) = mpsc::unbounded_channel();
        // Read replies all the time, so that a worker never blocks on a full pipe while the
        // parent waits on another one.
        tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            loop {
                let item = match lines.next_line().await {
                    Ok(Some(line)) => serde_json::from_str::<R>(&line).map_err(|e| {
                        format!("{name} {index} wrote an unreadable line ({e}): {line:.200}")
                    }),
                    Ok(None) => Err(format!("{name} {index} exited")),
                    Err(e) => Err(format!("reading {name} {index}: {e}")),
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
            .with_context(|| format!("sending {name} {index} its configuration"))?;
        Ok(Self {
            index,
            pid: child.id(),
            name,
            child,
            stdin,
            replies,
        })
    }

    /// Sends one command.
    pub(crate) async fn send(&mut self, command: &impl Serialize) -> anyhow::Result<()> {
        let mut line = serde_json::to_string(command).context("encoding a worker command")?;
        line.push('\n');
        self.stdin
            .write_all(line.as_bytes())
            .await
            .with_context(|| format!("{} {} takes no commands (exited?)", self.name, self.index))
    }

    /// The next reply, by `deadline`; a failure the worker reports is an error.
    pub(crate) async fn reply(
        &mut self,
        deadline: Instant,
        waiting_for: &str,
    ) -> anyhow::Result<R> {
        let (name, index) = (self.name, self.index);
        match tokio::time::timeout_at(deadline, self.replies.recv()).await {
            Err(_) => bail!("{name} {index} did not answer ({waiting_for}) in time"),
            Ok(None) => bail!("{name} {index} is gone ({waiting_for})"),
            Ok(Some(Err(message))) => bail!("{message} ({waiting_for})"),
            Ok(Some(Ok(reply))) => match reply.failure() {
                Some(message) => bail!("{name} {index} failed ({waiting_for}): {message}"),
                None => Ok(reply),
            },
        }
    }
}

/// The worker processes of one run.
pub(crate) struct WorkerGroup<R>(pub(crate) Vec<WorkerProcess<R>>);

impl<R: WorkerReply> WorkerGroup<R> {
    /// Sends `command` to every worker.
    pub(crate) async fn broadcast(&mut self, command: &impl Serialize) -> anyhow::Result<()> {
        for worker in &mut self.0 {
            worker.send(command).await?;
        }
        Ok(())
    }

    /// One reply of every worker, all `within` the given time.
    pub(crate) async fn gather(
        &mut self,
        within: Duration,
        waiting_for: &str,
    ) -> anyhow::Result<Vec<R>> {
        let deadline = Instant::now() + within;
        let mut replies = Vec::with_capacity(self.0.len());
        for worker in &mut self.0 {
            replies.push(worker.reply(deadline, waiting_for).await?);
        }
        Ok(replies)
    }

    /// Sends `command` to every worker and gathers their replies.
    pub(crate) async fn ask(
        &mut self,
        command: &impl Serialize,
        within: Duration,
        waiting_for: &str,
    ) -> anyhow::Result<Vec<R>> {
        self.broadcast(command).await?;
        self.gather(within, waiting_for).await
    }

    /// Asks every worker to exit with `command` and waits for them (15 s, then kills).
    pub(crate) async fn shutdown(mut self, command: &impl Serialize) {
        for worker in &mut self.0 {
            let _ = worker.send(command).await;
        }
        let deadline = Instant::now() + Duration::from_secs(15);
        for worker in &mut self.0 {
            if tokio::time::timeout_at(deadline, worker.child.wait())
                .await
                .is_err()
            {
                let _ = worker.child.kill().await;
            }
        }
    }
}

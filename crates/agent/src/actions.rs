//! The actions a wake-up triggers: a program (argv, never a shell unless the configuration
//! asks for `cmd` or PowerShell; the wake-up in environment variables and as JSON on stdin;
//! killed at its timeout) and an HTTP request to a local URL
//! (beckon-net's HTTP client, directly over TCP: one request, its answer's status).

use std::process::Stdio;
use std::time::{Duration, Instant};

use beckon_net::http::{HttpClient, HttpSettings, Url};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::config::CommandAction;
use crate::wakeup::WakeUp;

/// How an action ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActionOutcome {
    /// `ok`, `failed`, `timeout` or `error`.
    pub status: &'static str,
    /// Exit code of the program, when it exited by itself.
    pub exit_code: Option<i32>,
    /// What went wrong, in plain words.
    pub detail: Option<String>,
    /// How long it took.
    pub duration: Duration,
}

impl ActionOutcome {
    fn new(
        status: &'static str,
        exit_code: Option<i32>,
        detail: Option<String>,
        started: Instant,
    ) -> Self {
        Self {
            status,
            exit_code,
            detail,
            duration: started.elapsed(),
        }
    }

    /// True when the action succeeded.
    pub fn ok(&self) -> bool {
        self.status == "ok"
    }
}

/// The environment a command sees for a run answering `batch` (latest wake-up last).
pub fn wakeup_env(batch: &[WakeUp], agent_id: &str, tenant: &str) -> Vec<(String, String)> {
    let mut env = vec![
        ("BECKON_AGENT_ID".to_owned(), agent_id.to_owned()),
        ("BECKON_TENANT".to_owned(), tenant.to_owned()),
        ("BECKON_WAKEUP_COUNT".to_owned(), batch.len().to_string()),
        (
            "BECKON_WAKEUP_IDS".to_owned(),
            batch
                .iter()
                .map(|w| w.id.as_str())
                .collect::<Vec<_>>()
                .join(","),
        ),
    ];
    if let Some(latest) = batch.last() {
        env.extend([
            ("BECKON_WAKEUP_ID".to_owned(), latest.id.clone()),
            ("BECKON_WAKEUP_REASON".to_owned(), latest.reason.clone()),
            (
                "BECKON_WAKEUP_ACTION".to_owned(),
                // Every distinct action of the batch, in arrival order.
                distinct_actions(batch).join(","),
            ),
            (
                "BECKON_WAKEUP_ISSUED_AT".to_owned(),
                crate::timefmt::format_rfc3339(latest.issued_at),
            ),
            (
                "BECKON_WAKEUP_EXPIRES_AT".to_owned(),
                crate::timefmt::format_rfc3339(latest.expires_at),
            ),
            ("BECKON_WAKEUP_SPREAD".to_owned(), latest.spread.to_string()),
        ]);
    }
    env
}

fn distinct_actions(batch: &[WakeUp]) -> Vec<&str> {
    let mut actions: Vec<&str> = Vec::new();
    for action in batch.iter().filter_map(|w| w.action.as_deref()) {
        if !actions.contains(&action) {
            actions.push(action);
        }
    }
    actions
}

/// Runs the configured program once for `batch`; `stdin` is the latest wake-up's JSON.
pub async fn run_command(
    action: &CommandAction,
    env: &[(String, String)],
    stdin: &[u8],
    default_dir: &std::path::Path,
) -> ActionOutcome {
    let started = Instant::now();
    let Some((program, mut command)) = crate::platform::action_command(action.shell, &action.argv)
    else {
        return ActionOutcome::new("error", None, Some("no program configured".into()), started);
    };
    command
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .current_dir(action.working_dir.as_deref().unwrap_or(default_dir))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(e) => {
            return ActionOutcome::new(
                "error",
                None,
                Some(format!(
                    "cannot start {program}: {e}; check actions.command.argv"
                )),
                started,
            );
        }
    };
    // stdin, stdout and stderr are serviced concurrently so that a chatty or stdin-ignoring
    // program never blocks on a full pipe.
    let mut stdin_pipe = child.stdin.take();
    let payload = stdin.to_vec();
    let feed = tokio::spawn(async move {
        if let Some(pipe) = stdin_pipe.as_mut() {
            // A program that does not read stdin closes it: not an error.
            let _ = pipe.write_all(&payload).await;
            let _ = pipe.shutdown().await;
        }
    });
    let stdout = child.stdout.take().map(|p| tokio::spawn(read_tail(p)));
    let stderr = child.stderr.take().map(|p| tokio::spawn(read_tail(p)));

    let outcome = match tokio::time::timeout(action.timeout, child.wait()).await {
        Ok(Ok(status)) => match status.code() {
            Some(0) => ActionOutcome::new("ok", Some(0), None, started),
            Some(code) => ActionOutcome::new(
                "failed",
                Some(code),
                Some(format!("{program} exited with code {code}")),
                started,
            ),
            None => ActionOutcome::new(
                "failed",
                None,
                Some(format!("{program} was killed by a signal")),
                started,
            ),
        },
        Ok(Err(e)) => ActionOutcome::new(
            "error",
            None,
            Some(format!("waiting for {program}: {e}")),
            started,
        ),
        Err(_) => {
            let _ = child.kill().await;
            ActionOutcome::new(
                "timeout",
                None,
                Some(format!(
                    "{program} was still running after {:?} and was killed; raise actions.command.timeout if it needs longer",
                    action.timeout
                )),
                started,
            )
        }
    };
    feed.abort();
    // Output of children that outlive the program could hold the pipes open: bounded wait.
    for (name, task) in [("stdout", stdout), ("stderr", stderr)] {
        if let Some(task) = task {
            match tokio::time::timeout(Duration::from_secs(2), task).await {
                Ok(Ok(text)) if !text.is_empty() => {
                    tracing::info!(stream = name, output = %text.trim_end(), "action command output");
                }
                Ok(_) => {}
                Err(_) => tracing::debug!(stream = name, "command output still open; not waiting"),
            }
        }
    }
    outcome
}

/// Reads a pipe to its end, keeping the last 4 KiB for the log.
async fn read_tail(mut pipe: impl tokio::io::AsyncRead + Unpin) -> String {
    const KEEP: usize = 4096;
    let mut tail = Vec::new();
    let mut chunk = [0u8; 1024];
    loop {
        match pipe.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                tail.extend_from_slice(&chunk[..n]);
                if tail.len() > 2 * KEEP {
                    tail.drain(..tail.len() - KEEP);
                }
            }
        }
    }
    if tail.len() > KEEP {
        tail.drain(..tail.len() - KEEP);
    }
    String::from_utf8_lossy(&tail).into_owned()
}

/// Sends one request with a JSON body and waits for the answer's head (its body is not
/// read); the whole exchange is bounded by `limit`. Returns the status code.
pub async fn http_request(
    url: &Url,
    method: &str,
    headers: &[(&str, String)],
    body: &[u8],
    limit: Duration,
) -> Result<u16, String> {
    let request = crate::http::json_request(method, headers, body).map_err(|e| e.to_string())?;
    let client = HttpClient::new(HttpSettings {
        connect_timeout: limit,
        user_agent: crate::http::USER_AGENT.to_owned(),
        ..HttpSettings::default()
    });
    let exchange = async {
        let conn = client.connect(url).await?;
        conn.open(&url.path, request, limit).await
    };
    match tokio::time::timeout(limit, exchange).await {
        Ok(Ok(answer)) => Ok(answer.status),
        Ok(Err(e)) => Err(format!("{method} {url}: {e}")),
        Err(_) => Err(format!("{method} {url} got no answer within {limit:?}")),
    }
}

/// Runs the HTTP action: `Ok` on a 2xx answer.
pub async fn run_http(
    url: &Url,
    method: &str,
    limit: Duration,
    headers: &[(&str, String)],
    body: &[u8],
) -> ActionOutcome {
    let started = Instant::now();
    match http_request(url, method, headers, body, limit).await {
        Ok(status) if (200..300).contains(&status) => ActionOutcome::new("ok", None, None, started),
        Ok(status) => ActionOutcome::new(
            "failed",
            None,
            Some(format!("{method} {url} answered HTTP {status}")),
            started,
        ),
        Err(e) => ActionOutcome::new("error", None, Some(e), started),
    }
}

//! The measurement around the call: an API token and an enrollment token from the console,
//! the workers' enrollment and connects, then the call, and the broker's drop count.

use super::setup::{Workers, sum_phase};
use super::the_call::ConsoleApi;
use super::*;
use crate::fleet::{WorkerLauncher, source_addresses};
use crate::worker_process::{WorkerGroup, WorkerProcess};

pub(super) async fn measure(
    args: &CallArgs,
    broker_admin: SocketAddr,
    console_addr: SocketAddr,
    broker_addr: SocketAddr,
    password: &str,
    console: &Service,
    broker: &Service,
) -> anyhow::Result<CallReport> {
    let mut report = CallReport {
        agents: args.size.agents,
        acks: match args.acks {
            AckStages::Received => "received".into(),
            AckStages::Finished => "received, started, finished".into(),
        },
        ..Default::default()
    };
    let (mut console_api, enrollment_token) = console_tokens(console_addr, password).await?;
    let mut workers = start_workers(args, console_addr, broker_addr, &enrollment_token).await?;
    let outcome = async {
        for w in &mut workers.0 {
            match w
                .reply(Instant::now() + Duration::from_secs(30), "start")
                .await?
            {
                CallReply::Ready { .. } => {}
                other => bail!("call worker {} answered {other:?} at start", w.index),
            }
        }
        let enrolled = sum_phase(
            workers
                .ask(
                    &CallCommand::Enroll,
                    Duration::from_secs(3600),
                    "enrollment",
                )
                .await?,
            true,
        )?;
        report.enrolled = enrolled.ok;
        report.enroll_s = enrolled.elapsed_ms as f64 / 1000.0;
        report.first_error = enrolled.first_error;
        let connected = sum_phase(
            workers
                .ask(&CallCommand::Connect, Duration::from_secs(1800), "connect")
                .await?,
            false,
        )?;
        report.connected = connected.ok;
        report.connect_s = connected.elapsed_ms as f64 / 1000.0;
        if report.first_error.is_none() {
            report.first_error = connected.first_error;
        }
        the_call(
            args,
            &mut report,
            &mut console_api,
            &mut workers,
            console,
            broker,
        )
        .await?;
        report.broker_messages_dropped = broker_dropped(broker_admin).await;
        Ok(())
    }
    .await;
    workers.shutdown(&CallCommand::Shutdown).await;
    outcome.map(|()| report)
}

/// The broker's count of messages it dropped (queue full, expired, too large), from its
/// metrics.
pub(super) async fn broker_dropped(admin: SocketAddr) -> Option<u64> {
    // The broker copies its counters into the metrics once a second.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut client = HttpClient::new(admin);
    let r = client
        .request("GET", "/metrics", None, Duration::from_secs(10))
        .await
        .ok()?;
    let text = String::from_utf8_lossy(&r.body);
    text.lines()
        .find_map(|l| l.strip_prefix("beckon_broker_messages_dropped_total "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|v| v as u64)
}

/// An API token (through a session of the first user), once the console is connected to the
/// broker, and an enrollment token for the simulated agents; returns the console's API with
/// the API token, and the enrollment token.
pub(crate) async fn console_tokens(
    console_addr: SocketAddr,
    password: &str,
) -> anyhow::Result<(ConsoleApi, String)> {
    let mut client = HttpClient::new(console_addr);
    let login = client
        .request(
            "POST",
            "/api/v1/login",
            Some(&serde_json::json!({"user": "admin", "password": password})),
            API_LIMIT,
        )
        .await?;
    if login.status != 200 {
        bail!(
            "logging in to the console failed ({}): {}",
            login.status,
            login.error_message()
        );
    }
    let cookie = login
        .header("set-cookie")
        .and_then(|c| c.split(';').next())
        .context("the console set no session cookie")?
        .to_owned();
    client.headers.push(("Cookie".into(), cookie));
    let token = create_token(
        &mut client,
        "/api/v1/api-tokens",
        serde_json::json!({"name": "beckon bench call"}),
    )
    .await?;
    client.headers.clear();
    client.set_bearer(&token);

    // The console's broker connection (it retries with backoff since it started first).
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let status = api(&mut client, "GET", "/api/v1/status", None, 200).await?;
        if status["push_service"]["connected"] == serde_json::Value::Bool(true) {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "the console did not connect to the broker within 60 s: {}",
                status["push_service"]["message"]
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let enrollment_token = create_token(
        &mut client,
        "/api/v1/enrollment-tokens",
        serde_json::json!({"label": "beckon bench call", "max_uses": 0, "expires_in_secs": 86400}),
    )
    .await?;

    let console_api = ConsoleApi {
        addr: console_addr,
        token,
        client,
    };
    Ok((console_api, enrollment_token))
}

/// Creates a token (`POST` of `body` to `path`, `201 Created`) and returns its secret.
async fn create_token(
    client: &mut HttpClient,
    path: &str,
    body: serde_json::Value,
) -> anyhow::Result<String> {
    let created = api(client, "POST", path, Some(body), 201).await?;
    let token = created["token"]
        .as_str()
        .with_context(|| format!("no token in the answer of POST {path}"))?;
    Ok(token.to_owned())
}

/// Starts the call workers: this program (the bench under test), whatever runs console and
/// broker.
async fn start_workers(
    args: &CallArgs,
    console_addr: SocketAddr,
    broker_addr: SocketAddr,
    enrollment_token: &str,
) -> anyhow::Result<Workers> {
    let launcher = WorkerLauncher {
        program: std::env::current_exe()
            .context("cannot find this program's path to start workers")?,
        args: vec!["bench".to_owned(), "call-worker".to_owned()],
    };
    let per_worker = args.size.agents_per_worker.clamp(1, 19_000);
    let count = args.size.agents.div_ceil(per_worker);
    let per_address = args.size.agents_per_source_address.max(1);
    let sources = source_addresses(broker_addr.ip(), args.size.agents, per_address);
    let mut workers = WorkerGroup(Vec::with_capacity(count));
    for w in 0..count {
        let first_agent = w * per_worker;
        let config = CallWorkerConfig {
            worker: w,
            first_agent,
            agents: per_worker.min(args.size.agents - first_agent),
            id_prefix: args.id_prefix.clone(),
            console: console_addr,
            enrollment_token: enrollment_token.to_owned(),
            enroll_concurrency: args.enroll_concurrency.max(1).div_ceil(count).max(1),
            broker: broker_addr,
            server_name: "localhost".into(),
            source_addresses: sources.clone(),
            agents_per_source_address: per_address,
            connect_concurrency: args.connect_concurrency.max(1).div_ceil(count).max(1),
            connect_timeout_ms: 30_000,
            acks: args.acks,
        };
        workers
            .0
            .push(WorkerProcess::spawn("call worker", &launcher, w, &config).await?);
    }
    Ok(workers)
}

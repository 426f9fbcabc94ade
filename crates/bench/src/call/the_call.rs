//! The call itself and its readings: live delivery events, CPU and memory of console and
//! broker, the agents' arrivals and the stored per-agent states.

use super::setup::{Workers, load_average};
use super::*;

/// The state changes of one call read live, as the bench saw them.
#[derive(Default)]
pub(super) struct LiveStates {
    /// (call id, agent id, state) → when the bench read it (Unix ns); first only.
    pub(super) first_seen: std::collections::HashMap<(String, String, String), u64>,
    pub(super) missed: u64,
}

#[derive(Deserialize)]
pub(crate) struct DeliveryEvent {
    pub(crate) call_id: String,
    pub(crate) agent_id: String,
    pub(crate) state: String,
}

/// The console's API as the bench uses it around the call: its address, an API token, and a
/// client that carries the token (the live events take a connection of their own).
pub(crate) struct ConsoleApi {
    pub(crate) addr: SocketAddr,
    pub(crate) token: String,
    pub(crate) client: HttpClient,
}

/// Makes the call and takes its readings, the CPU and memory of the `console` and `broker`
/// processes among them.
pub(super) async fn the_call(
    args: &CallArgs,
    report: &mut CallReport,
    console_api: &mut ConsoleApi,
    workers: &mut Workers,
    console: &Service,
    broker: &Service,
) -> anyhow::Result<()> {
    let ConsoleApi {
        addr: console_addr,
        token,
        client,
    } = console_api;
    wait_online(client, report).await?;
    earlier_calls(client, report, args.earlier_calls, args.wait_secs).await?;
    tokio::time::sleep(Duration::from_secs_f64(args.settle_secs.max(0.0))).await;

    // Live state changes, subscribed before the call.
    let (reader, mut live_rx) = subscribe_live(*console_addr, token).await?;

    // The workers' replies only say that they are armed.
    workers
        .ask(&CallCommand::Arm, Duration::from_secs(30), "arm")
        .await?;
    for w in &mut workers.0 {
        w.send(&CallCommand::Collect {
            wait_ms: (args.wait_secs.max(1.0) * 1000.0) as u64,
        })
        .await?;
    }
    let reader_procs = ProcReader::new();
    let console_before = reader_procs.sample(console.pid).ok();
    let worker_pids: Vec<u32> = workers.0.iter().filter_map(|w| w.pid).collect();
    let workers_cpu = |reader: &ProcReader| -> Option<f64> {
        let mut total = 0.0;
        for pid in &worker_pids {
            total += reader.sample(*pid).ok()?.cpu.as_secs_f64();
        }
        Some(total)
    };
    let workers_before = workers_cpu(&reader_procs);
    let broker_before = reader_procs.sample(broker.pid).ok();
    report.console_rss_before_kib = console_before.map(|s| s.rss_kib);
    report.load_average = load_average();

    // The call.
    let t0 = unix_ns();
    let started = Instant::now();
    let call_id = create_call(client, report, started).await?;

    // Follow the live events until every addressed agent is delivered (or the bound).
    let target = report.call_agents;
    let mut live = LiveStates::default();
    let mut delivered_live = 0u64;
    let mut last_sent = None;
    let mut last_delivered = None;
    let mut sent_live = 0u64;
    let deadline = started + Duration::from_secs_f64(args.wait_secs.max(1.0));
    let mut poll = tokio::time::interval(Duration::from_millis(500));
    let mut end_sample: Option<(ProcSample, Option<ProcSample>)> = None;
    loop {
        tokio::select! {
            item = live_rx.recv() => {
                let Some((at, item)) = item else { break };
                match item {
                    Err(missed) => live.missed += missed,
                    Ok(d) if d.call_id == call_id => {
                        let key = (d.call_id, d.agent_id, d.state.clone());
                        if live.first_seen.insert(key, at).is_none() {
                            match d.state.as_str() {
                                "sent" => { sent_live += 1; last_sent = Some(at); }
                                "delivered" => { delivered_live += 1; last_delivered = Some(at); }
                                _ => {}
                            }
                        }
                    }
                    Ok(_) => {}
                }
                if delivered_live >= target {
                    end_sample = reader_procs.sample(console.pid).ok().map(|c| (c, reader_procs.sample(broker.pid).ok()));
                    break;
                }
            }
            _ = poll.tick() => {
                // When live events were missed, the stored counts decide.
                if live.missed > 0 {
                    let calls = api(client, "GET", "/api/v1/calls?limit=5", None, 200).await?;
                    let done = calls.as_array().and_then(|a| a.iter().find(|c| c["id"] == call_id.as_str())).map(|c| {
                        ["delivered", "started", "finished"].iter().map(|s| c["counts"][*s].as_u64().unwrap_or(0)).sum::<u64>()
                    }).unwrap_or(0);
                    if done >= target {
                        end_sample = reader_procs.sample(console.pid).ok().map(|c| (c, reader_procs.sample(broker.pid).ok()));
                        break;
                    }
                }
                if Instant::now() > deadline { break; }
            }
        }
    }
    reader.abort();
    if end_sample.is_none() {
        end_sample = reader_procs
            .sample(console.pid)
            .ok()
            .map(|c| (c, reader_procs.sample(broker.pid).ok()));
    }
    let _ = sent_live;
    report.events_missed = live.missed;
    let ms_since_t0 = |at: u64| at.saturating_sub(t0) as f64 / 1e6;
    if live.missed == 0 {
        report.all_sent_ms = last_sent.map(ms_since_t0);
        report.all_delivered_ms = (delivered_live >= target)
            .then_some(())
            .and_then(|()| last_delivered.map(ms_since_t0));
    }
    if let (Some(before), Some(after)) = (workers_before, workers_cpu(&reader_procs)) {
        report.agents_cpu_ms = Some((after - before) * 1000.0);
    }
    if let (Some(before), Some((after, broker_after))) = (console_before, end_sample) {
        let cpu = after.cpu.saturating_sub(before.cpu).as_secs_f64() * 1000.0;
        report.console_cpu_ms = Some(cpu);
        report.console_cpu_per_agent_us = (target > 0).then(|| cpu * 1000.0 / target as f64);
        report.console_rss_after_kib = Some(after.rss_kib);
        if let (Some(b0), Some(b1)) = (broker_before, broker_after) {
            report.broker_cpu_ms = Some(b1.cpu.saturating_sub(b0.cpu).as_secs_f64() * 1000.0);
        }
    }

    // The agents' side.
    collect_wakeups(args, report, workers, t0).await?;

    read_stored(client, report, &call_id, t0, target).await
}

/// Makes `n` calls to every agent, one after the other, each until the console counts all
/// of its deliveries `delivered` or further (read from the calls list), within `wait_secs` each.
async fn earlier_calls(
    client: &mut HttpClient,
    report: &mut CallReport,
    n: usize,
    wait_secs: f64,
) -> anyhow::Result<()> {
    let started = Instant::now();
    for i in 0..n {
        let mut scratch = CallReport::default();
        let call_id = create_call(client, &mut scratch, Instant::now()).await?;
        let deadline = Instant::now() + Duration::from_secs_f64(wait_secs.max(1.0));
        loop {
            let calls = api(client, "GET", "/api/v1/calls?limit=5", None, 200).await?;
            let done = calls
                .as_array()
                .and_then(|a| a.iter().find(|c| c["id"] == call_id.as_str()))
                .map_or(0, |c| {
                    ["delivered", "started", "finished"]
                        .iter()
                        .map(|s| c["counts"][*s].as_u64().unwrap_or(0))
                        .sum::<u64>()
                });
            if done >= scratch.call_agents {
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "earlier call {} of {n}: {done} of {} agents delivered after {wait_secs} s",
                    i + 1,
                    scratch.call_agents
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    report.earlier_calls = n;
    report.earlier_calls_s = started.elapsed().as_secs_f64();
    Ok(())
}

/// Waits until the console has taken in every agent's presence (it resends pending
/// wake-ups per agent coming online; the call must not race that work).
async fn wait_online(client: &mut HttpClient, report: &mut CallReport) -> anyhow::Result<()> {
    let online_started = Instant::now();
    let deadline = online_started + Duration::from_secs(300);
    loop {
        let status = api(client, "GET", "/api/v1/status", None, 200).await?;
        let online = status["agents_online"].as_u64().unwrap_or(0);
        report.console_online = online;
        if online >= report.connected as u64 {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "the console counted {online} of {} agents online after 300 s",
                report.connected
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    report.console_online_wait_s = online_started.elapsed().as_secs_f64();
    Ok(())
}

/// A live event as read: when (unix ns), and a delivery's change or how many the console
/// dropped for this listener (`lagged`).
pub(crate) type LiveItem = (u64, Result<DeliveryEvent, u64>);

/// Subscribes to the console's live events; the deliveries (and missed counts) arrive on
/// the receiver, stamped when read.
pub(crate) async fn subscribe_live(
    console_addr: SocketAddr,
    token: &str,
) -> anyhow::Result<(
    tokio::task::JoinHandle<()>,
    mpsc::UnboundedReceiver<LiveItem>,
)> {
    let mut events_client = HttpClient::new(console_addr);
    events_client.set_bearer(token);
    let mut events = events_client
        .open_events("/api/v1/events", API_LIMIT)
        .await
        .context("subscribing to the console's live events")?;
    let (live_tx, live_rx) = mpsc::unbounded_channel::<LiveItem>();
    let reader = tokio::spawn(async move {
        while let Ok(Some(ev)) = events.next().await {
            let at = unix_ns();
            let item = match ev.event.as_str() {
                "delivery" => match serde_json::from_str::<DeliveryEvent>(&ev.data) {
                    Ok(d) => Ok(d),
                    Err(_) => continue,
                },
                "lagged" => Err(serde_json::from_str::<serde_json::Value>(&ev.data)
                    .ok()
                    .and_then(|v| v["missed"].as_u64())
                    .unwrap_or(1)),
                _ => continue,
            };
            if live_tx.send((at, item)).is_err() {
                return;
            }
        }
    });

    Ok((reader, live_rx))
}

/// The call: `POST /api/v1/calls` to all agents; returns its id.
async fn create_call(
    client: &mut HttpClient,
    report: &mut CallReport,
    started: Instant,
) -> anyhow::Result<String> {
    let created = client
        .request(
            "POST",
            "/api/v1/calls",
            Some(&serde_json::json!({"target": "all", "reason": "beckon bench call"})),
            API_LIMIT,
        )
        .await
        .context("POST /api/v1/calls")?;
    report.api_response_ms = started.elapsed().as_secs_f64() * 1000.0;
    if created.status != 201 {
        bail!(
            "POST /api/v1/calls answered {}: {}",
            created.status,
            created.error_message()
        );
    }
    let body = created.json().context("the call's answer is not JSON")?;
    let call_id = body["id"]
        .as_str()
        .context("the call has no id")?
        .to_owned();
    report.call_agents = body["agents"].as_u64().unwrap_or(0);
    report.call_id = Some(call_id.clone());
    Ok(call_id)
}

/// The workers' readings: wake-ups acknowledged, refused, duplicated, and their arrivals.
async fn collect_wakeups(
    args: &CallArgs,
    report: &mut CallReport,
    workers: &mut Workers,
    t0: u64,
) -> anyhow::Result<()> {
    let mut wake = WakeOutcome::default();
    for w in &mut workers.0 {
        let r = w
            .reply(
                Instant::now() + Duration::from_secs_f64(args.wait_secs.max(1.0) + 30.0),
                "wake-ups",
            )
            .await?;
        if let CallReply::Wakeups(o) = r {
            wake.expected += o.expected;
            wake.acked += o.acked;
            wake.rejected += o.rejected;
            wake.duplicates += o.duplicates;
            if wake.first_rejection.is_none() {
                wake.first_rejection = o.first_rejection;
            }
            wake.arrivals_unix_ns.extend(o.arrivals_unix_ns);
        }
    }
    report.rejected = wake.rejected;
    report.first_rejection = wake.first_rejection;
    report.duplicates = wake.duplicates;
    let mut arrivals: Vec<u64> = wake
        .arrivals_unix_ns
        .iter()
        .map(|a| a.saturating_sub(t0) / 1000)
        .collect();
    report.arrival_ms = Percentiles::of_micros(&mut arrivals);
    Ok(())
}

/// The stored per-agent states and times of the call.
async fn read_stored(
    client: &mut HttpClient,
    report: &mut CallReport,
    call_id: &str,
    t0: u64,
    target: u64,
) -> anyhow::Result<()> {
    // The stored states, once the acks have had a moment to be written.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let t0_ms = (t0 / 1_000_000) as i64;
    let mut delivered_us = Vec::new();
    let mut max_sent: Option<i64> = None;
    let mut max_delivered: Option<i64> = None;
    // A page at a time (the bench's agent ids need no escaping in a query string).
    let mut after: Option<String> = None;
    loop {
        let mut path = format!("/api/v1/calls/{call_id}/deliveries?limit=5000");
        if let Some(a) = &after {
            path.push_str(&format!("&after={a}"));
        }
        let page = api(client, "GET", &path, None, 200).await?;
        let list = page["deliveries"].as_array().cloned().unwrap_or_default();
        for d in &list {
            let state = d["state"].as_str().unwrap_or("?").to_owned();
            *report.states.entry(state).or_default() += 1;
            if let Some(s) = d["sent_at"].as_i64() {
                max_sent = Some(max_sent.map_or(s, |m| m.max(s)));
            }
            if let Some(s) = d["delivered_at"].as_i64() {
                max_delivered = Some(max_delivered.map_or(s, |m| m.max(s)));
                delivered_us.push(u64::try_from((s - t0_ms).max(0)).unwrap_or(0) * 1000);
            }
        }
        match page["next_after"].as_str() {
            Some(next) => after = Some(next.to_owned()),
            None => break,
        }
    }
    report.delivered = ["delivered", "started", "finished"]
        .iter()
        .map(|s| report.states.get(*s).copied().unwrap_or(0))
        .sum();
    report.missing = target.saturating_sub(report.delivered);
    report.all_sent_stored_ms = max_sent.map(|m| (m - t0_ms) as f64);
    report.all_delivered_stored_ms = max_delivered.map(|m| (m - t0_ms) as f64);
    report.delivered_latency_ms = Percentiles::of_micros(&mut delivered_us);
    Ok(())
}

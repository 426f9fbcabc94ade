//! One simulated agent: connect, subscribe to its own wake-up topic, acknowledge wake-ups, keep
//! the connection alive, and after a lost connection come back with the agent's backoff, on
//! the next node of a cluster when its own does not answer.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use beckon_client::Event;
use beckon_mqtt::{Publish, ReasonCode};
use beckon_net::{Backoff, BackoffConfig};
use tokio::sync::{Semaphore, mpsc, watch};

use crate::conn::{ClientError, Connector, MqttConn, wake_topic};
use crate::protocol::unix_ns;

/// What the worker tells all its agents at once.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Control {
    /// Raised by one to make every agent drop its connection (a cut).
    pub cut_generation: u64,
    /// Disconnect and stop.
    pub shutdown: bool,
}

/// What an agent tells its worker.
#[derive(Debug)]
pub enum AgentEvent {
    /// The first connect finished: the latency to CONNACK, or why it failed.
    Initial {
        /// Local agent index.
        agent: usize,
        /// Latency or error message.
        result: Result<Duration, String>,
        /// When (Unix ns).
        at_unix_ns: u64,
    },
    /// A wake-up arrived.
    Wakeup {
        /// Local agent index.
        agent: usize,
        /// Send time read from the payload (Unix ns), if readable.
        sent_unix_ns: Option<u64>,
        /// Arrival time (Unix ns).
        arrived_unix_ns: u64,
    },
    /// The connection was lost or cut.
    Down {
        /// Local agent index.
        agent: usize,
    },
    /// A reconnect attempt failed.
    AttemptFailed {
        /// Local agent index.
        agent: usize,
        /// Why.
        error: String,
    },
    /// The agent is connected and subscribed again.
    Up {
        /// Local agent index.
        agent: usize,
        /// When (Unix ns).
        at_unix_ns: u64,
        /// On which endpoint (index into [`AgentContext::connectors`]).
        endpoint: usize,
    },
}

/// What all agents of a worker share.
pub struct AgentContext {
    /// Opens connections: to the worker's own endpoint first, then to the other nodes of a
    /// cluster in the order the agent tries them after a failed reconnect attempt.
    pub connectors: Vec<Connector>,
    /// Bounds the connects running at once in the connect phase (not in a storm: a storm is
    /// every agent on its own schedule, as in the field).
    pub connect_gate: Semaphore,
    /// The agent's reconnect schedule (each agent keeps its own state).
    pub backoff: BackoffConfig,
    /// Where events go.
    pub events: mpsc::UnboundedSender<AgentEvent>,
    /// Bound on SUBSCRIBE to SUBACK.
    pub subscribe_timeout: Duration,
}

/// One agent's identity.
pub struct AgentSpec {
    /// Index within the worker.
    pub local: usize,
    /// Client identifier.
    pub client_id: String,
    /// Source address to bind.
    pub source: Option<IpAddr>,
    /// Password of its own (a tenant agent's token), instead of the target's.
    pub password: Option<String>,
}

enum End {
    Shutdown,
    Cut,
    Lost,
}

/// Runs one agent until shutdown.
pub async fn run(ctx: Arc<AgentContext>, spec: AgentSpec, mut control: watch::Receiver<Control>) {
    let topic = wake_topic(&spec.client_id);
    let first = {
        let permit = ctx.connect_gate.acquire().await;
        let started = Instant::now();
        let result = establish(&ctx, &spec, &topic, 0).await;
        drop(permit);
        result.map(|(conn, connack)| (conn, connack.duration_since(started)))
    };
    let mut conn = match first {
        Ok((conn, latency)) => {
            let _ = ctx.events.send(AgentEvent::Initial {
                agent: spec.local,
                result: Ok(latency),
                at_unix_ns: unix_ns(),
            });
            conn
        }
        Err(error) => {
            let _ = ctx.events.send(AgentEvent::Initial {
                agent: spec.local,
                result: Err(error.to_string()),
                at_unix_ns: unix_ns(),
            });
            return;
        }
    };
    // The agent's own backoff, used as the agent uses it: connected, lost, next delay.
    let Ok(mut backoff) = Backoff::new(ctx.backoff) else {
        return;
    };
    backoff.connected(Instant::now());
    let mut seen_cut = control.borrow().cut_generation;
    // The endpoint the agent is connected to, or tries next.
    let mut endpoint = 0;
    loop {
        match serve(&ctx, &spec, &mut conn, &mut control, &mut seen_cut).await {
            End::Shutdown => {
                conn.close().await;
                return;
            }
            // Dropping the stream closes the socket without DISCONNECT: the broker sees the
            // connection vanish, as after a network cut.
            End::Cut | End::Lost => drop(conn),
        }
        backoff.disconnected(Instant::now());
        let _ = ctx.events.send(AgentEvent::Down { agent: spec.local });
        conn = match reconnect(
            &ctx,
            &spec,
            &topic,
            &mut backoff,
            &mut control,
            &mut endpoint,
        )
        .await
        {
            Some(conn) => conn,
            None => return,
        };
        backoff.connected(Instant::now());
        seen_cut = control.borrow().cut_generation;
        let _ = ctx.events.send(AgentEvent::Up {
            agent: spec.local,
            at_unix_ns: unix_ns(),
            endpoint,
        });
    }
}

/// Connects to endpoint `endpoint` and subscribes; returns the connection and the moment
/// CONNACK arrived.
async fn establish(
    ctx: &AgentContext,
    spec: &AgentSpec,
    topic: &str,
    endpoint: usize,
) -> Result<(MqttConn, Instant), ClientError> {
    let mut conn = ctx.connectors[endpoint]
        .connect_as(spec.source, &spec.client_id, spec.password.as_deref())
        .await?;
    let connack = Instant::now();
    conn.subscribe(topic, ctx.subscribe_timeout).await?;
    Ok((conn, connack))
}

/// Reconnects with the agent's backoff until it works or the worker shuts down: a full-jitter
/// wait before each attempt, and the longer "busy" wait after a broker refused with server
/// busy or connection rate exceeded, as the agent does. The first attempt goes to the
/// endpoint it lost (`endpoint`); after each failed attempt the next one goes to the next
/// endpoint of the list, round robin, as the agent moves through `broker.more_hosts`.
async fn reconnect(
    ctx: &AgentContext,
    spec: &AgentSpec,
    topic: &str,
    backoff: &mut Backoff,
    control: &mut watch::Receiver<Control>,
    endpoint: &mut usize,
) -> Option<MqttConn> {
    let mut delay = backoff.next_delay();
    loop {
        let attempt_result = tokio::select! {
            biased;
            () = shutdown(control) => return None,
            result = async {
                tokio::time::sleep(delay).await;
                establish(ctx, spec, topic, *endpoint).await
            } => result,
        };
        match attempt_result {
            Ok((conn, _)) => return Some(conn),
            Err(error) => {
                delay = match error {
                    ClientError::Refused(
                        ReasonCode::SERVER_BUSY | ReasonCode::CONNECTION_RATE_EXCEEDED,
                    ) => backoff.next_busy_delay(),
                    _ => backoff.next_delay(),
                };
                *endpoint = (*endpoint + 1) % ctx.connectors.len();
                let _ = ctx.events.send(AgentEvent::AttemptFailed {
                    agent: spec.local,
                    error: error.to_string(),
                });
            }
        }
    }
}

/// Resolves when the worker asks for shutdown (or is gone).
async fn shutdown(control: &mut watch::Receiver<Control>) {
    let _ = control.wait_for(|c| c.shutdown).await;
}

/// Serves an open connection until it ends. The session acknowledges wake-ups and keeps
/// the connection alive with pings.
async fn serve(
    ctx: &AgentContext,
    spec: &AgentSpec,
    conn: &mut MqttConn,
    control: &mut watch::Receiver<Control>,
    seen_cut: &mut u64,
) -> End {
    loop {
        tokio::select! {
            event = conn.next_event() => match event {
                Ok(Event::Message(publish)) => wakeup(ctx, spec, &publish),
                Ok(_) => {}
                Err(_) => return End::Lost,
            },
            changed = control.changed() => {
                let now = *control.borrow_and_update();
                if changed.is_err() || now.shutdown {
                    return End::Shutdown;
                }
                if now.cut_generation != *seen_cut {
                    *seen_cut = now.cut_generation;
                    return End::Cut;
                }
            }
        }
    }
}

/// Reports a wake-up with its send time (from the payload) and arrival time.
fn wakeup(ctx: &AgentContext, spec: &AgentSpec, publish: &Publish) {
    let arrived_unix_ns = unix_ns();
    let sent_unix_ns = std::str::from_utf8(&publish.payload)
        .ok()
        .and_then(|text| text.strip_prefix(crate::publisher::WAKE_PREFIX))
        .and_then(|ns| ns.trim().parse::<u64>().ok());
    let _ = ctx.events.send(AgentEvent::Wakeup {
        agent: spec.local,
        sent_unix_ns,
        arrived_unix_ns,
    });
}

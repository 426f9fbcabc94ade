//! The random start delay: skipped on the very first start (just enrolled, the operator waits
//! to see the agent online), applied on later starts (many agents restarted at once). Every
//! wait is bounded.

mod common;

use std::time::Duration;

use beckon_agent::state::AgentState;
use common::*;

/// A start delay this long is never drawn within the test's few seconds by chance
/// (probability 3 s / 1 day).
const LONG: Duration = Duration::from_secs(86_400);

#[tokio::test]
async fn the_first_start_connects_at_once_and_a_restart_waits_its_random_delay() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = test_config(dir.path(), "");
    config.reconnect.start_delay_max = LONG;

    // First start: connects at once despite the long start delay.
    let (connector, mut rx, _log) = channel_connector();
    let agent = RunningAgent::start(config.clone(), connector);
    let mut broker = next_connection(&mut rx).await;
    broker.accept_agent().await;
    eventually("the agent says it is connected", || {
        connected(dir.path(), Some("memory"))
    })
    .await;
    agent.stop().await;
    let state = AgentState::read(dir.path()).expect("state").expect("state");
    assert_eq!(state.last_working_path.as_deref(), Some("memory"));

    // A restart: the agent waits (up to a day here) before connecting.
    let (connector, mut rx, log) = channel_connector();
    let agent = RunningAgent::start(config, connector);
    let early = tokio::time::timeout(Duration::from_secs(3), rx.recv()).await;
    assert!(
        early.is_err(),
        "the restarted agent connected without its start delay"
    );
    assert_eq!(log.lock().expect("log").connects, 0);
    // It still stops promptly while waiting.
    agent.stop().await;
}

//! Measures an idle, connected agent's memory: starts Mosquitto on a free loopback port,
//! runs the agent exactly as `beckon agent run` does (one-thread runtime, plain MQTT to the
//! loopback broker), waits, then prints VmRSS and VmHWM from /proc/self/status.
//!
//! `cargo run --release -p beckon-agent --example idle_rss [seconds]` (default 10 s).

use std::io::Write as _;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

fn status_field(name: &str) -> String {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(name))
        .map(|l| l.trim_start_matches(name).trim().to_owned())
        .unwrap_or_else(|| "?".into())
}

fn main() {
    let seconds: u64 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    let dir = tempfile::tempdir().expect("temporary folder");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port");
    let conf = dir.path().join("mosquitto.conf");
    std::fs::write(
        &conf,
        format!("listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"),
    )
    .expect("mosquitto.conf");
    let broker = Command::new("/usr/sbin/mosquitto")
        .arg("-c")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start /usr/sbin/mosquitto (apt-get install mosquitto)");
    let broker = Arc::new(Mutex::new(broker));
    std::thread::sleep(Duration::from_millis(300));

    let key = beckon_identity::SigningKey::generate(
        beckon_identity::KeyId::new("console-1").expect("kid"),
    )
    .expect("key");
    let config = dir.path().join("agent.toml");
    let state_dir = dir.path().join("state");
    std::fs::write(
        &config,
        format!(
            r#"agent_id = "rss-probe"
tenant = "acme"
state_dir = "{}"
[broker]
host = "127.0.0.1"
plain_port = {port}
[reconnect]
start_delay_max = "0s"
[wakeup.console_keys]
console-1 = "{}"
[actions.command]
argv = ["/bin/true"]
"#,
            state_dir.display(),
            key.public_key().to_base64()
        ),
    )
    .expect("agent.toml");

    let probe_broker = Arc::clone(&broker);
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(seconds));
        let connected = beckon_agent::state::AgentState::read(&state_dir)
            .ok()
            .flatten()
            .is_some_and(|s| s.connected);
        println!("idle agent after {seconds} s (connected: {connected})");
        println!("  VmRSS   {}", status_field("VmRSS:"));
        println!("  VmHWM   {}", status_field("VmHWM:"));
        println!("  Threads {}", status_field("Threads:"));
        let _ = std::io::stdout().flush();
        if let Ok(mut child) = probe_broker.lock() {
            let _ = child.kill();
            let _ = child.wait();
        }
        std::process::exit(if connected { 0 } else { 1 });
    });

    let result = beckon_agent::run(beckon_agent::AgentCommand::Run { config });
    eprintln!("agent ended early: {result:?}");
    if let Ok(mut child) = broker.lock() {
        let _ = child.kill();
    }
    std::process::exit(2);
}

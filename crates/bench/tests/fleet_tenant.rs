//! `beckon bench fleet --tenant-dir` against a cluster of two `beckon broker` nodes (the
//! binary named by `BECKON_BIN`) over a nats-server this test starts: the nodes know nothing
//! but `tenants_dir`, refuse anonymous clients, and still admit every agent with its token;
//! every wake-up arrives across the nodes; each node's memory and nats-server's figures are
//! read. A second run reuses the tenant's key against the same nodes. Correctness only: the
//! figures are printed, never judged.

mod common;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use beckon_bench::compare::{ManagedBroker, free_port};
use beckon_bench::fleet::BrokerControl;

fn main() -> ExitCode {
    common::main_with(&[(
        "tenant_agents_on_two_nodes_get_every_wake_up",
        tenant_agents_on_two_nodes_get_every_wake_up,
    )])
}

/// nats-server from Debian's package (or on the PATH); the test fails (not skips) without it.
fn nats_server_bin() -> PathBuf {
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("nats-server"))
            .find(|p| p.is_file())
    });
    let path = on_path.unwrap_or_else(|| PathBuf::from("/usr/sbin/nats-server"));
    assert!(
        path.is_file(),
        "nats-server not found on the PATH nor at /usr/sbin/nats-server: install it (apt-get install nats-server)"
    );
    path
}

/// One cluster node: plain MQTT on `port`, tenants from `tenants`, no anonymous clients.
fn node(dir: &Path, name: &str, port: u16, nats: &str, tenants: &Path) -> ManagedBroker {
    let node_dir = dir.join(name);
    std::fs::create_dir_all(&node_dir).expect("node folder");
    let config = node_dir.join("broker.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = {data:?}\ntenants_dir = {tenants:?}\n\n[listeners]\nmqtts = \"off\"\n\
             mqtt = \"127.0.0.1:{port}\"\n\n[cluster]\nnats = [\"{nats}\"]\nnode = \"{name}\"\n",
            data = node_dir.join("data"),
        ),
    )
    .expect("node config");
    let mut broker = ManagedBroker::new(
        name,
        &common::beckon_bin(),
        vec![
            "broker".to_owned(),
            "--config".to_owned(),
            config.display().to_string(),
        ],
        port,
        node_dir.join("broker.log"),
    );
    broker.start().expect("the node starts");
    broker
}

fn tenant_agents_on_two_nodes_get_every_wake_up() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (nats_port, monitor_port) = (free_port().expect("port"), free_port().expect("port"));
    let mut nats = ManagedBroker::new(
        "nats-server",
        &nats_server_bin(),
        ["-a", "127.0.0.1", "-p", &nats_port.to_string()]
            .into_iter()
            .chain(["-m", &monitor_port.to_string()])
            .map(str::to_owned)
            .collect(),
        nats_port,
        dir.path().join("nats.log"),
    );
    nats.start().expect("nats-server starts");
    let nats_url = format!("nats://127.0.0.1:{nats_port}");
    // The nodes start before the bench writes the tenant file, as they would in a lab: the
    // bench waits until they have loaded it.
    let tenants = dir.path().join("tenants");
    std::fs::create_dir_all(&tenants).expect("tenants folder");
    let (port_a, port_b) = (free_port().expect("port"), free_port().expect("port"));
    let node_a = node(dir.path(), "a", port_a, &nats_url, &tenants);
    let node_b = node(dir.path(), "b", port_b, &nats_url, &tenants);
    let (pid_a, pid_b) = (
        node_a.pid().expect("pid").to_string(),
        node_b.pid().expect("pid").to_string(),
    );

    let (port_a, endpoint_b) = (port_a.to_string(), format!("127.0.0.1:{port_b}"));
    let monitor = format!("http://127.0.0.1:{monitor_port}");
    let tenants_arg = tenants.display().to_string();
    let run = |agents: &str, phases: &str, extra: &[&str]| {
        let mut args = vec![
            "fleet",
            "--port",
            &port_a,
            "--endpoint",
            &endpoint_b,
            "--tenant-dir",
            &tenants_arg,
            "--agents",
            agents,
            "--phases",
            phases,
            "--settle-secs",
            "0.5",
            "--fanout-wait-secs",
            "20",
            "--json",
        ];
        args.extend_from_slice(extra);
        let json = common::report_json(&common::run_bench(&args, Duration::from_secs(180)));
        eprintln!("{json:#}");
        json
    };

    let json = run(
        "50",
        "connect,idle,fanout",
        &[
            "--node-pid",
            &pid_a,
            "--node-pid",
            &pid_b,
            "--nats-monitor",
            &monitor,
        ],
    );
    assert!(
        tenants.join("bench.toml").is_file() && tenants.join("bench.key").is_file(),
        "the bench wrote the tenant file and its key"
    );
    assert_eq!(json["tenant"], "bench", "{json:#}");
    assert_eq!(json["nodes"], 2);
    assert_eq!(common::number(&json, "/connect/connected"), 50.0);
    assert_eq!(common::number(&json, "/connect/failed"), 0.0);
    assert_eq!(common::number(&json, "/fanout/acknowledged"), 50.0);
    assert_eq!(common::number(&json, "/fanout/delivered"), 50.0);
    assert_eq!(common::number(&json, "/fanout/missing"), 0.0);
    assert_eq!(common::number(&json, "/fanout/latency_ms/samples"), 50.0);

    let nodes = json["node_memory"].as_array().expect("node_memory");
    assert_eq!(nodes.len(), 2, "{json:#}");
    assert_eq!(nodes[0]["endpoint"], format!("127.0.0.1:{port_a}"));
    assert_eq!(nodes[1]["endpoint"], endpoint_b);
    assert_eq!(nodes[0]["pid"].to_string(), pid_a);
    assert_eq!(
        common::number(&json, "/node_memory/0/agents")
            + common::number(&json, "/node_memory/1/agents"),
        50.0
    );
    for n in 0..2 {
        assert!(common::number(&json, &format!("/node_memory/{n}/agents")) > 0.0);
        assert!(common::number(&json, &format!("/node_memory/{n}/rss_after_kib")) > 0.0);
        common::number(&json, &format!("/node_memory/{n}/rss_per_agent_kib"));
    }
    // Both nodes stay connected to NATS; the figures per agent are there (not judged).
    assert!(
        common::number(&json, "/nats/connections_after") >= 2.0,
        "{json:#}"
    );
    assert!(common::number(&json, "/nats/mem_after_kib") > 0.0);
    common::number(&json, "/nats/mem_per_agent_kib");
    common::number(&json, "/nats/subscriptions_per_agent");
    assert_eq!(common::number(&json, "/nats/agents"), 50.0);

    // Again with the same nodes: the key is reused, so they admit the new tokens at once.
    let key_before = std::fs::read(tenants.join("bench.key")).expect("key");
    let again = run("10", "connect,fanout", &[]);
    assert_eq!(
        std::fs::read(tenants.join("bench.key")).expect("key"),
        key_before
    );
    assert_eq!(common::number(&again, "/fanout/delivered"), 10.0);
    assert_eq!(common::number(&again, "/fanout/missing"), 0.0);
    assert!(again.get("node_memory").is_none() && again.get("nats").is_none());
    drop((node_a, node_b, nats));
}

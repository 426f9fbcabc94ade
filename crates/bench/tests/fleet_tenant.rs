//! `beckon bench fleet --tenant-dir` against a cluster of two `beckon broker` nodes (the
//! binary named by `BECKON_BIN`) over a nats-server this test starts: the nodes know nothing
//! but `tenants_dir`, refuse anonymous clients, and still admit every agent with its token;
//! every wake-up arrives across the nodes; each node's memory and nats-server's figures are
//! read. A second run reuses the tenant's key against the same nodes. Then the two cluster
//! storms, each on a cluster of its own: node b SIGKILLed (`--storm-kill`), its agents back
//! on node a and every wake-up delivered after; nats-server SIGKILLed and started again
//! (`--storm-restart`), every wake-up delivered after. Correctness only: the figures are
//! printed, never judged.

mod common;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use beckon_bench::compare::{ManagedBroker, free_port};
use beckon_bench::fleet::BrokerControl;

fn main() -> ExitCode {
    common::main_with(&[
        (
            "tenant_agents_on_two_nodes_get_every_wake_up",
            tenant_agents_on_two_nodes_get_every_wake_up,
        ),
        (
            "a_killed_node_s_agents_come_back_on_the_other_node",
            a_killed_node_s_agents_come_back_on_the_other_node,
        ),
        (
            "every_wake_up_arrives_after_nats_server_restarts",
            every_wake_up_arrives_after_nats_server_restarts,
        ),
    ])
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

/// A nats-server with its monitoring port and two nodes `a` and `b` on it, all killed on
/// drop, in a temporary folder.
struct Cluster {
    // Dropped in this order: the nodes, then NATS, then the folder.
    node_a: ManagedBroker,
    node_b: ManagedBroker,
    nats: ManagedBroker,
    nats_args: Vec<String>,
    port_a: u16,
    port_b: u16,
    monitor_port: u16,
    tenants: PathBuf,
    dir: tempfile::TempDir,
}

impl Cluster {
    fn start() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let (nats_port, monitor_port) = (free_port().expect("port"), free_port().expect("port"));
        let nats_args: Vec<String> = ["-a", "127.0.0.1", "-p", &nats_port.to_string()]
            .into_iter()
            .chain(["-m", &monitor_port.to_string()])
            .map(str::to_owned)
            .collect();
        let mut nats = ManagedBroker::new(
            "nats-server",
            &nats_server_bin(),
            nats_args.clone(),
            nats_port,
            dir.path().join("nats.log"),
        );
        nats.start().expect("nats-server starts");
        let nats_url = format!("nats://127.0.0.1:{nats_port}");
        // The nodes start before the bench writes the tenant file, as they would in a lab:
        // the bench waits until they have loaded it.
        let tenants = dir.path().join("tenants");
        std::fs::create_dir_all(&tenants).expect("tenants folder");
        let (port_a, port_b) = (free_port().expect("port"), free_port().expect("port"));
        let node_a = node(dir.path(), "a", port_a, &nats_url, &tenants);
        let node_b = node(dir.path(), "b", port_b, &nats_url, &tenants);
        Self {
            node_a,
            node_b,
            nats,
            nats_args,
            port_a,
            port_b,
            monitor_port,
            tenants,
            dir,
        }
    }

    fn endpoint_b(&self) -> String {
        format!("127.0.0.1:{}", self.port_b)
    }

    fn monitor(&self) -> String {
        format!("http://127.0.0.1:{}", self.monitor_port)
    }

    /// `bench fleet` over both nodes (the publisher on a) with the tenant's agents; the JSON
    /// report.
    fn run(&self, agents: &str, phases: &str, extra: &[&str]) -> serde_json::Value {
        let (port_a, endpoint_b) = (self.port_a.to_string(), self.endpoint_b());
        let tenants = self.tenants.display().to_string();
        let mut args = vec![
            "fleet",
            "--port",
            &port_a,
            "--endpoint",
            &endpoint_b,
            "--tenant-dir",
            &tenants,
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
        let json = common::report_json(&common::run_bench(&args, Duration::from_secs(120)));
        eprintln!("{json:#}");
        json
    }
}

/// Whether process `pid` still runs (a zombie does not).
fn running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            let (_, rest) = stat.rsplit_once(')')?;
            rest.trim_start().chars().next()
        })
        .is_some_and(|state| state != 'Z' && state != 'X')
}

/// Kills, when dropped, every process of this user running `program args` in `cwd` other
/// than those given: the nats-server the bench started again (it outlives the bench on
/// purpose), even when the test fails before reading its pid from the report.
struct KillRestarted {
    argv: Vec<String>,
    keep: Vec<u32>,
}

impl Drop for KillRestarted {
    fn drop(&mut self) {
        let wanted: Vec<u8> = self
            .argv
            .iter()
            .flat_map(|a| a.bytes().chain([0]))
            .collect();
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return;
        };
        for entry in entries.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            if self.keep.contains(&pid) {
                continue;
            }
            if std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| c == wanted) {
                let _ = std::process::Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .status();
            }
        }
    }
}

fn tenant_agents_on_two_nodes_get_every_wake_up() {
    let cluster = Cluster::start();
    let (pid_a, pid_b) = (
        cluster.node_a.pid().expect("pid").to_string(),
        cluster.node_b.pid().expect("pid").to_string(),
    );
    let (port_a, endpoint_b) = (cluster.port_a.to_string(), cluster.endpoint_b());
    let monitor = cluster.monitor();
    let tenants = cluster.tenants.clone();
    let run = |agents: &str, phases: &str, extra: &[&str]| cluster.run(agents, phases, extra);

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
}

fn a_killed_node_s_agents_come_back_on_the_other_node() {
    let cluster = Cluster::start();
    let (pid_a, pid_b) = (
        cluster.node_a.pid().expect("pid"),
        cluster.node_b.pid().expect("pid"),
    );
    let (pid_a_arg, pid_b_arg) = (pid_a.to_string(), pid_b.to_string());
    let json = cluster.run(
        "40",
        "connect,storm,fanout-after-storm",
        &[
            "--storm-kill",
            &pid_b_arg,
            "--node-pid",
            &pid_a_arg,
            "--node-pid",
            &pid_b_arg,
            "--backoff-base-ms",
            "200",
            "--backoff-cap-secs",
            "2",
            "--storm-wait-secs",
            "30",
        ],
    );
    assert!(!running(pid_b), "node b was killed");
    assert!(running(pid_a), "node a lives");
    assert_eq!(common::number(&json, "/connect/connected"), 40.0);
    let storm = &json["storm"];
    assert_eq!(storm["method"], "kill node", "{json:#}");
    assert_eq!(storm["killed_pid"].as_u64(), Some(u64::from(pid_b)));
    // Node b held half the agents (one worker each): those, and only those, moved.
    assert_eq!(common::number(&json, "/storm/expected"), 20.0);
    assert_eq!(common::number(&json, "/storm/back"), 20.0);
    assert_eq!(common::number(&json, "/storm/not_back"), 0.0);
    assert_eq!(
        storm["back_per_endpoint"],
        serde_json::json!([
            {"endpoint": format!("127.0.0.1:{}", cluster.port_a), "back": 20},
            {"endpoint": cluster.endpoint_b(), "back": 0},
        ]),
        "{json:#}"
    );
    assert!(common::number(&json, "/storm/back_99_after_down_s") < 30.0);
    common::number(&json, "/storm/cpu_per_reconnect_us");
    // Every agent, moved or not, gets its wake-up from the publisher on node a.
    assert_eq!(common::number(&json, "/fanout_after_storm/expected"), 40.0);
    assert_eq!(common::number(&json, "/fanout_after_storm/delivered"), 40.0);
    assert_eq!(common::number(&json, "/fanout_after_storm/missing"), 0.0);
    assert_eq!(common::number(&json, "/fanout_after_storm/duplicates"), 0.0);

    // The first node is the publisher's: killing it is refused before anything connects.
    let (status, stderr) = common::run_bench_stderr(
        &[
            "fleet",
            "--port",
            &cluster.port_a.to_string(),
            "--endpoint",
            &cluster.endpoint_b(),
            "--agents",
            "2",
            "--node-pid",
            &pid_a_arg,
            "--storm-kill",
            &pid_a_arg,
        ],
        Duration::from_secs(30),
    );
    assert!(!status.success());
    assert!(
        stderr.contains("--storm-kill") && stderr.contains("the first node"),
        "{stderr}"
    );
    assert!(running(pid_a), "node a was not killed");
    // A pid that is no process.
    let (status, stderr) = common::run_bench_stderr(
        &[
            "fleet",
            "--port",
            &cluster.port_a.to_string(),
            "--agents",
            "2",
            "--storm-restart",
            "999999999",
        ],
        Duration::from_secs(30),
    );
    assert!(!status.success());
    assert!(
        stderr.contains("--storm-restart 999999999: no such process"),
        "{stderr}"
    );
}

fn every_wake_up_arrives_after_nats_server_restarts() {
    let cluster = Cluster::start();
    let nats_pid = cluster.nats.pid().expect("pid");
    let _restarted = KillRestarted {
        argv: std::iter::once(nats_server_bin().display().to_string())
            .chain(cluster.nats_args.iter().cloned())
            .collect(),
        keep: vec![nats_pid],
    };
    let nats_pid_arg = nats_pid.to_string();
    let monitor = cluster.monitor();
    let json = cluster.run(
        "40",
        "connect,fanout,storm,fanout-after-storm",
        &[
            "--storm-restart",
            &nats_pid_arg,
            "--outage-secs",
            "2",
            "--nats-monitor",
            &monitor,
            "--backoff-base-ms",
            "200",
            "--backoff-cap-secs",
            "2",
            "--storm-wait-secs",
            "30",
        ],
    );
    assert!(!running(nats_pid), "the first nats-server was killed");
    let storm = &json["storm"];
    assert_eq!(storm["method"], "restart nats", "{json:#}");
    assert_eq!(storm["killed_pid"].as_u64(), Some(u64::from(nats_pid)));
    let restarted =
        u32::try_from(storm["restarted_pid"].as_u64().expect("restarted_pid")).expect("pid");
    assert!(running(restarted), "the restarted nats-server runs on");
    assert!(
        cluster
            .dir
            .path()
            .join("nats-server-restarted.log")
            .is_file(),
        "its output goes next to the tenants folder"
    );
    assert_eq!(common::number(&json, "/storm/outage_s"), 2.0);
    assert!(common::number(&json, "/storm/up_after_down_s") >= 2.0);
    // The agents' connections are to the nodes, not to NATS: whatever was lost came back.
    assert_eq!(common::number(&json, "/storm/not_back"), 0.0, "{json:#}");
    assert_eq!(
        common::number(&json, "/storm/back"),
        common::number(&json, "/storm/expected")
    );
    // Both nodes reconnected to the new nats-server and subscribed again.
    let before = common::number(&json, "/storm/nats/connections_before");
    assert!(before >= 2.0, "{json:#}");
    assert!(common::number(&json, "/storm/nats/connections_after") >= before);
    assert!(
        common::number(&json, "/storm/nats/subscriptions_after")
            >= common::number(&json, "/storm/nats/subscriptions_before")
    );
    common::number(&json, "/storm/nats/back_after_up_s");
    assert_eq!(common::number(&json, "/fanout/delivered"), 40.0);
    assert_eq!(common::number(&json, "/fanout_after_storm/expected"), 40.0);
    assert_eq!(common::number(&json, "/fanout_after_storm/delivered"), 40.0);
    assert_eq!(common::number(&json, "/fanout_after_storm/missing"), 0.0);
    assert_eq!(common::number(&json, "/fanout_after_storm/duplicates"), 0.0);
}

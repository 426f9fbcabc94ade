//! `beckon bench fleet` against a Mosquitto this test starts: every agent connects, every
//! wake-up arrives, every agent comes back after a storm, and the JSON report parses.
//! Correctness only: the figures are printed, never asserted.

mod common;

use std::process::ExitCode;
use std::time::Duration;

use beckon_bench::cli::{FleetSize, LoadArgs, Phase};
use beckon_bench::compare::{ManagedBroker, free_port};
use beckon_bench::conn::{MqttVersion, Target};
use beckon_bench::fleet::{WorkerLauncher, run_fleet};
use beckon_testkit::{Mosquitto, TestCa};

fn main() -> ExitCode {
    common::main_with(&[
        (
            "fleet_over_tls_reports_every_phase",
            fleet_over_tls_reports_every_phase,
        ),
        (
            "fleet_mqtt5_survives_a_broker_restart",
            fleet_mqtt5_survives_a_broker_restart,
        ),
        (
            "fleet_presents_client_certificate_and_password",
            fleet_presents_client_certificate_and_password,
        ),
    ])
}

/// The CLI end to end: TLS, three workers over three source addresses, all four phases (the
/// storm is a cut: the bench did not start this broker), JSON out.
fn fleet_over_tls_reports_every_phase() {
    let dir = tempfile::tempdir().expect("temp dir");
    let certs = beckon_bench::certs::generate(dir.path()).expect("certificates");
    let port = free_port().expect("port");
    let mut broker =
        ManagedBroker::mosquitto(&common::mosquitto_bin(), dir.path(), port, Some(&certs))
            .expect("mosquitto config");
    broker.start().expect("mosquitto starts");
    let pid = beckon_bench::fleet::BrokerControl::pid(&broker).expect("pid");

    let port = port.to_string();
    let pid = pid.to_string();
    let ca = certs.ca.display().to_string();
    let stdout = common::run_bench(
        &[
            "fleet",
            "--host",
            "127.0.0.1",
            "--port",
            &port,
            "--ca",
            &ca,
            "--server-name",
            "localhost",
            "--agents",
            "300",
            "--agents-per-worker",
            "120",
            "--agents-per-source-address",
            "100",
            "--settle-secs",
            "0.5",
            "--broker-pid",
            &pid,
            "--label",
            "mosquitto",
            "--json",
        ],
        Duration::from_secs(240),
    );
    let json = common::report_json(&stdout);
    eprintln!("{json:#}");
    assert_eq!(json["workers"], 3, "300 agents at 120 per worker");
    assert_eq!(json["source_addresses"], 3, "300 agents at 100 per address");
    assert_eq!(common::number(&json, "/connect/connected"), 300.0);
    assert_eq!(common::number(&json, "/connect/failed"), 0.0);
    // The broker was read: memory and CPU figures are present (their values are not judged).
    common::number(&json, "/idle/rss_per_connection_kib");
    common::number(&json, "/idle/cpu_per_connect_us");
    common::number(&json, "/fanout/cpu_per_wakeup_us");
    assert_eq!(common::number(&json, "/fanout/delivered"), 300.0);
    assert_eq!(common::number(&json, "/fanout/missing"), 0.0);
    assert_eq!(common::number(&json, "/fanout/latency_ms/samples"), 300.0);
    assert_eq!(json["storm"]["method"], "cut");
    assert_eq!(common::number(&json, "/storm/back"), 300.0);
    assert_eq!(common::number(&json, "/storm/not_back"), 0.0);
    assert_eq!(
        common::number(&json, "/fanout_after_storm/delivered"),
        300.0,
        "every agent subscribed again after the cut"
    );
}

/// The library path with a broker the bench restarts: MQTT 5, plain, a one-second outage,
/// every agent back and receiving its wake-up from the restarted broker.
fn fleet_mqtt5_survives_a_broker_restart() {
    let dir = tempfile::tempdir().expect("temp dir");
    let port = free_port().expect("port");
    let mut broker = ManagedBroker::mosquitto(&common::mosquitto_bin(), dir.path(), port, None)
        .expect("mosquitto config");
    broker.start().expect("mosquitto starts");
    let target = Target {
        host: "127.0.0.1".to_owned(),
        port,
        tls: None,
        version: MqttVersion::V5,
        username: None,
        password: None,
        keep_alive: 60,
        connect_timeout_ms: 10_000,
    };
    let load = LoadArgs {
        size: FleetSize {
            agents: 200,
            agents_per_worker: 100,
            agents_per_source_address: 5000,
        },
        connect_concurrency: 32,
        phases: vec![
            Phase::Connect,
            Phase::Fanout,
            Phase::Storm,
            Phase::FanoutAfterStorm,
        ],
        settle_secs: 0.0,
        publishers: 2,
        publish_window: 1000,
        fanout_wait_secs: 20.0,
        outage_secs: 1.0,
        storm_wait_secs: 60.0,
        backoff_base_ms: 1000,
        backoff_cap_secs: 300,
        client_id_prefix: "restart-".to_owned(),
    };
    let launcher = WorkerLauncher::current_exe().expect("own path");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let report = runtime
        .block_on(async {
            tokio::time::timeout(
                Duration::from_secs(180),
                run_fleet(&target, &load, &mut broker, &launcher),
            )
            .await
        })
        .expect("the fleet run ends within 3 minutes")
        .expect("the fleet run succeeds");
    eprint!("{}", report.table());
    let connect = report.connect.expect("connect phase");
    assert_eq!(connect.connected, 200);
    let fanout = report.fanout.expect("fan-out phase");
    assert_eq!(fanout.delivered, 200);
    assert_eq!(fanout.missing, 0);
    assert!(report.idle.is_none(), "idle was not asked for");
    let storm = report.storm.expect("storm phase");
    assert_eq!(storm.method, "restart");
    assert_eq!(storm.back, 200, "every agent reconnects after the restart");
    assert_eq!(storm.not_back, 0);
    assert!(storm.back_99_after_up_s.is_some());
    let again = report.fanout_after_storm.expect("fan-out after the storm");
    assert_eq!(
        again.delivered, 200,
        "every agent subscribed to the new broker"
    );
    assert_eq!(again.missing, 0);
}

/// Client certificates and user names reach the broker: a Mosquitto that requires a
/// certificate (its name becomes the user name) and a password admits the fleet that
/// presents both, and the report names the refusal when the password is wrong.
fn fleet_presents_client_certificate_and_password() {
    let dir = tempfile::tempdir().expect("temp dir");
    let ca = TestCa::new("fleet test CA");
    let broker = Mosquitto::start_tls_requiring_client_cert(
        &ca.server_cert(&["localhost", "127.0.0.1"]),
        &ca,
        "fleet",
        "s3cret",
    );
    let ca_file = ca.write_pem(dir.path(), "ca.pem");
    let (cert, key) = ca.write_client_cert(dir.path(), "fleet");

    let port = broker.port.to_string();
    let ca_file = ca_file.display().to_string();
    let cert = cert.display().to_string();
    let key = key.display().to_string();
    let run = |password: &str| {
        let stdout = common::run_bench(
            &[
                "fleet",
                "--port",
                &port,
                "--ca",
                &ca_file,
                "--server-name",
                "localhost",
                "--client-cert",
                &cert,
                "--client-key",
                &key,
                "--username",
                "fleet",
                "--password",
                password,
                "--mqtt-version",
                "5",
                "--agents",
                "50",
                "--phases",
                "connect,fanout",
                "--json",
            ],
            Duration::from_secs(120),
        );
        common::report_json(&stdout)
    };
    let admitted = run("s3cret");
    assert_eq!(common::number(&admitted, "/connect/connected"), 50.0);
    assert_eq!(common::number(&admitted, "/fanout/delivered"), 50.0);

    let refused = run("wrong");
    assert_eq!(common::number(&refused, "/connect/connected"), 0.0);
    assert_eq!(common::number(&refused, "/connect/failed"), 50.0);
    let error = refused["connect"]["first_error"]
        .as_str()
        .unwrap_or_default();
    assert!(
        error.contains("refused CONNECT"),
        "the first error names the refusal: {error}"
    );
    let publisher = refused["fanout"]["publisher_error"]
        .as_str()
        .unwrap_or_default();
    assert!(
        publisher.contains("refused CONNECT"),
        "the fan-out reports its refused publisher: {publisher}"
    );
}

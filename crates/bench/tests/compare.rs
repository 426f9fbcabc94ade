//! `beckon bench compare` at a small scale against Mosquitto and the `beckon` binary named by
//! `BECKON_BIN`: both brokers get every wake-up, every agent back after the restart, the
//! JSON parses, exit 0. Correctness only: the figures are printed, never asserted.

mod common;

use std::process::ExitCode;
use std::time::Duration;

fn main() -> ExitCode {
    common::main_with(&[
        (
            "a_broker_that_fails_does_not_hide_the_other",
            a_broker_that_fails_does_not_hide_the_other,
        ),
        (
            "compare_over_tls_at_small_scale",
            compare_over_tls_at_small_scale,
        ),
        ("floor_at_small_scale", floor_at_small_scale),
    ])
}

/// `bench floor`: every connection got its message and answered (the run ends only when
/// every reply was read), spread over the peer processes and sending threads asked for;
/// JSON parses. The
/// figures are printed, never judged.
fn floor_at_small_scale() {
    let floor = |args: &[&str]| {
        let args: Vec<&str> = ["floor"]
            .iter()
            .chain(args)
            .chain(&["--json"])
            .copied()
            .collect();
        common::report_json(&common::run_bench(&args, Duration::from_secs(60)))
    };
    let json = floor(&[
        "--agents",
        "300",
        "--agents-per-worker",
        "120",
        "--settle-secs",
        "0.3",
        "--threads",
        "2",
    ]);
    eprintln!("{json:#}");
    assert_eq!(common::number(&json, "/connections"), 300.0);
    assert_eq!(common::number(&json, "/workers"), 3.0);
    assert_eq!(common::number(&json, "/threads"), 2.0);
    let send = common::number(&json, "/send_cpu_us");
    let receive = common::number(&json, "/receive_cpu_us");
    let both = common::number(&json, "/per_wakeup_us");
    assert!(send > 0.0 && receive > 0.0, "{json:#}");
    assert!(common::number(&json, "/peer_cpu_us") > 0.0, "{json:#}");
    assert!((both - (send + receive)).abs() < 0.01, "{json:#}");
    assert!(
        common::number(&json, "/last_reply_s") >= common::number(&json, "/all_written_s"),
        "{json:#}"
    );

    // Connections that do not divide evenly among the threads: 5 over 4 is 2, 2 and 1.
    let json = floor(&[
        "--agents",
        "5",
        "--agents-per-worker",
        "2",
        "--settle-secs",
        "0",
        "--threads",
        "4",
    ]);
    assert_eq!(common::number(&json, "/connections"), 5.0, "{json:#}");
    assert_eq!(common::number(&json, "/workers"), 3.0, "{json:#}");
    assert_eq!(common::number(&json, "/threads"), 3.0, "{json:#}");

    let (status, stdout) =
        common::run_bench_status(&["floor", "--agents", "0"], Duration::from_secs(30));
    assert!(!status.success(), "no connections is refused: {stdout}");
    // More connections than this process may hold: refused before any peer starts.
    let (status, stdout) =
        common::run_bench_status(&["floor", "--agents", "2000000"], Duration::from_secs(30));
    assert!(
        !status.success(),
        "over the file limit is refused: {stdout}"
    );
}

fn compare_over_tls_at_small_scale() {
    let beckon = common::beckon_bin().display().to_string();
    let mosquitto = common::mosquitto_bin().display().to_string();
    let stdout = common::run_bench(
        &[
            "compare",
            "--agents",
            "300",
            "--agents-per-worker",
            "150",
            "--settle-secs",
            "0.5",
            "--outage-secs",
            "1",
            "--storm-wait-secs",
            "60",
            "--mosquitto-bin",
            &mosquitto,
            "--beckon-bin",
            &beckon,
            "--json",
        ],
        Duration::from_secs(420),
    );
    let json = common::report_json(&stdout);
    eprintln!("{json:#}");
    let runs = json["runs"].as_array().expect("runs");
    let brokers: Vec<&str> = runs
        .iter()
        .map(|r| r["broker"].as_str().expect("broker name"))
        .collect();
    assert_eq!(brokers, ["mosquitto", "beckon"]);
    for run in runs {
        let report = &run["report"];
        let name = report["broker"].as_str().unwrap_or("?");
        assert_eq!(report["tls"], true, "{name}");
        assert_eq!(
            common::number(report, "/connect/connected"),
            300.0,
            "{name}"
        );
        assert_eq!(common::number(report, "/fanout/delivered"), 300.0, "{name}");
        assert_eq!(common::number(report, "/fanout/missing"), 0.0, "{name}");
        assert_eq!(report["storm"]["method"], "restart", "{name}");
        assert_eq!(common::number(report, "/storm/back"), 300.0, "{name}");
        assert_eq!(common::number(report, "/storm/not_back"), 0.0, "{name}");
        common::number(report, "/idle/rss_per_connection_kib");
        assert_eq!(
            common::number(report, "/fanout_after_storm/delivered"),
            300.0,
            "{name}: every agent subscribed again after the restart"
        );
    }
    let floor = &json["floor"];
    assert_eq!(
        common::number(floor, "/connections"),
        300.0,
        "the kernel floor ran at the same scale: {json:#}"
    );
    assert!(common::number(floor, "/per_wakeup_us") > 0.0, "{json:#}");
    let summary = json["summary"].as_array().expect("summary");
    assert!(
        summary.iter().any(|row| row["name"] == "wake-ups delivered"
            && row["mosquitto"] == 300.0
            && row["beckon"] == 300.0),
        "the summary sets both brokers side by side"
    );
}

/// A Beckon that will not start (here: a program that exits at once) makes the comparison
/// fail, but Mosquitto's figures are still printed and the failure is named.
fn a_broker_that_fails_does_not_hide_the_other() {
    let mosquitto = common::mosquitto_bin().display().to_string();
    let (status, stdout) = common::run_bench_status(
        &[
            "compare",
            "--plain",
            "--agents",
            "50",
            "--phases",
            "connect,fanout",
            "--mosquitto-bin",
            &mosquitto,
            "--beckon-bin",
            "/bin/false",
            "--json",
        ],
        Duration::from_secs(120),
    );
    assert!(
        !status.success(),
        "a failed run makes the exit status non-zero"
    );
    let json = common::report_json(&stdout);
    let runs = json["runs"].as_array().expect("runs");
    assert_eq!(runs.len(), 2);
    assert_eq!(runs[0]["broker"], "mosquitto");
    assert_eq!(
        common::number(&runs[0]["report"], "/fanout/delivered"),
        50.0
    );
    assert_eq!(runs[1]["broker"], "beckon");
    assert!(runs[1]["report"].is_null());
    let error = runs[1]["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("exited at start"),
        "the failure is named: {error}"
    );
}

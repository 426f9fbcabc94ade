//! `beckon bench compare` at a small scale against Mosquitto and the `beckon` binary named by
//! `BECKON_BIN`: both brokers get every wake-up, every agent back after the restart, the
//! JSON parses, exit 0. Correctness only: the figures are printed, never asserted.

mod common;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

fn main() -> ExitCode {
    common::main_with(&[(
        "compare_over_tls_at_small_scale",
        compare_over_tls_at_small_scale,
    )])
}

fn beckon_bin() -> PathBuf {
    let path = std::env::var_os("BECKON_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            panic!(
                "BECKON_BIN is not set: build the beckon binary (cargo build -p beckon) and set \
             BECKON_BIN to its path, e.g. BECKON_BIN=target/debug/beckon"
            )
        });
    assert!(
        path.is_file(),
        "BECKON_BIN={} is not a file: build it with cargo build -p beckon",
        path.display()
    );
    path
}

fn compare_over_tls_at_small_scale() {
    let beckon = beckon_bin().display().to_string();
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
    let json: serde_json::Value = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("the report is not JSON ({e}):\n{stdout}"));
    eprintln!("{json:#}");
    let runs = json["runs"].as_array().expect("runs");
    let brokers: Vec<&str> = runs
        .iter()
        .map(|r| r["report"]["broker"].as_str().expect("broker name"))
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
    let summary = json["summary"].as_array().expect("summary");
    assert!(
        summary.iter().any(|row| row["name"] == "wake-ups delivered"
            && row["mosquitto"] == 300.0
            && row["beckon"] == 300.0),
        "the summary sets both brokers side by side"
    );
}

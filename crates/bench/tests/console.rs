//! `beckon bench console` at a tiny size on SQLite, with the `beckon` binary named by
//! `BECKON_BIN` as console and broker: the registry is written, every page is timed,
//! Wake-on-LAN sends its packet and asks a relay, the call's first wake-up is seen sent, idle
//! CPU and memory are read, and the table names each figure with its target. Correctness
//! only: the figures are printed, never asserted.

mod common;

use std::process::ExitCode;
use std::time::Duration;

fn main() -> ExitCode {
    common::main_with(&[(
        "a_small_registry_gets_every_figure",
        a_small_registry_gets_every_figure,
    )])
}

fn a_small_registry_gets_every_figure() {
    let beckon = common::beckon_bin().display().to_string();
    let args = [
        "console",
        "--agents",
        "2000",
        "--calls",
        "3",
        "--deliveries-per-call",
        "500",
        "--group-size",
        "400",
        "--requests",
        "5",
        "--idle-secs",
        "1",
        "--beckon-bin",
        &beckon,
    ];
    let stdout = common::run_bench(&[&args[..], &["--json"]].concat(), Duration::from_secs(120));
    let json = common::report_json(&stdout);
    eprintln!("{json:#}");
    assert_eq!(json["backend"], "sqlite");
    for (pointer, want) in [
        ("/agents", 2000.0),
        ("/calls", 3.0),
        ("/deliveries", 1500.0),
        ("/call_agents", 400.0),
        // 60% online; one in twenty stale.
        ("/agents_online", 1200.0),
        ("/agents_stale", 100.0),
    ] {
        assert_eq!(
            common::number(&json, pointer),
            want,
            "{pointer} in:\n{json:#}"
        );
    }
    let pages = json["pages"].as_array().expect("pages");
    let names: Vec<&str> = pages.iter().filter_map(|p| p["what"].as_str()).collect();
    assert_eq!(
        names,
        [
            "agents page: list",
            "agents page: search by name",
            "agents page: filter by group",
            "agents page: filter by presence",
            "dashboard counts",
            "calls list",
            "one call's page",
            "a call's deliveries by state",
            "Wake-on-LAN to one machine",
        ]
    );
    for p in pages {
        assert_eq!(p["latency"]["samples"], 5, "{p:#}");
    }
    for pointer in [
        "/first_sent_ms",
        "/call_response_ms",
        "/wol_first_ms",
        "/idle_cpu_percent",
        "/rss_idle_kib",
        "/rss_after_kib",
        "/seed_s",
    ] {
        assert!(common::number(&json, pointer) >= 0.0, "{pointer}");
    }

    // The table: every figure beside its target, with its verdict.
    let table = common::run_bench(&args, Duration::from_secs(120));
    eprintln!("{table}");
    let verdicts = table
        .lines()
        .filter(|l| l.ends_with(" PASS") || l.ends_with(" MISS"))
        .count();
    assert_eq!(
        verdicts, 11,
        "idle CPU, 8 pages, Wake-on-LAN, first wake-up:\n{table}"
    );
    assert!(!table.contains("  -\n"), "a figure is missing:\n{table}");
}

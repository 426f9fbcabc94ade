//! `beckon bench call` at a small scale with the `beckon` binary named by `BECKON_BIN` as
//! console and broker: every agent enrolled through the API, connected with its own
//! certificate, every wake-up verified by its agent and the call `finished` for all, the JSON
//! parses, exit 0. And `beckon bench agent-memory` with the same binary as `beckon up` and
//! agent: the agent enrolled, online, its wake-up finished, its memory read. Correctness
//! only: the figures are printed, never asserted.

mod common;

use std::process::ExitCode;
use std::time::Duration;

fn main() -> ExitCode {
    common::main_with(&[
        (
            "one_call_reaches_every_enrolled_agent",
            one_call_reaches_every_enrolled_agent,
        ),
        (
            "a_missing_console_program_is_named",
            a_missing_console_program_is_named,
        ),
        (
            "agent_memory_reads_a_real_idle_agent",
            agent_memory_reads_a_real_idle_agent,
        ),
    ])
}

fn one_call_reaches_every_enrolled_agent() {
    let beckon = common::beckon_bin().display().to_string();
    let stdout = common::run_bench(
        &[
            "call",
            "--agents",
            "300",
            "--agents-per-worker",
            "150",
            "--agents-per-source-address",
            "100",
            "--acks",
            "finished",
            // A console with history: the measured call is its third.
            "--earlier-calls",
            "2",
            "--settle-secs",
            "0.2",
            "--wait-secs",
            "60",
            "--beckon-bin",
            &beckon,
            "--json",
        ],
        Duration::from_secs(300),
    );
    let json = common::report_json(&stdout);
    eprintln!("{json:#}");
    for (pointer, want) in [
        ("/agents", 300.0),
        ("/enrolled", 300.0),
        ("/connected", 300.0),
        ("/console_online", 300.0),
        ("/earlier_calls", 2.0),
        ("/call_agents", 300.0),
        ("/delivered", 300.0),
        ("/states/finished", 300.0),
        ("/missing", 0.0),
        ("/rejected", 0.0),
        ("/duplicates", 0.0),
    ] {
        assert_eq!(
            common::number(&json, pointer),
            want,
            "{pointer} in:\n{json:#}"
        );
    }
    assert_eq!(
        common::number(&json, "/arrival_ms/samples"),
        300.0,
        "every agent's arrival is timed"
    );
    assert_eq!(
        common::number(&json, "/delivered_latency_ms/samples"),
        300.0
    );
    assert!(common::number(&json, "/api_response_ms") > 0.0);
    assert!(json["call_id"].is_string(), "{json:#}");
}

fn a_missing_console_program_is_named() {
    let (status, stdout) = common::run_bench_status(
        &[
            "call",
            "--agents",
            "3",
            "--beckon-bin",
            "/nonexistent/beckon",
        ],
        Duration::from_secs(60),
    );
    assert!(!status.success(), "exit 0 without a console: {stdout}");
}

fn agent_memory_reads_a_real_idle_agent() {
    let beckon = common::beckon_bin().display().to_string();
    let stdout = common::run_bench(
        &[
            "agent-memory",
            "--beckon-bin",
            &beckon,
            "--idle-secs",
            "1",
            "--json",
        ],
        Duration::from_secs(240),
    );
    let json = common::report_json(&stdout);
    eprintln!("{json:#}");
    assert_eq!(json["wake_state"], "finished", "{json:#}");
    assert_eq!(json["online_at_end"], true, "{json:#}");
    assert!(
        json["agent_command"]
            .as_str()
            .is_some_and(|c| c.ends_with("beckon-agent")),
        "the agent runs from a copy of the binary: {json:#}"
    );
    let kib = |field: &str| common::number(&json, &format!("/memory/{field}"));
    assert!(kib("rss_kib") > 0.0, "{json:#}");
    assert_eq!(
        kib("rss_kib"),
        kib("anon_kib") + kib("file_kib") + kib("shmem_kib"),
        "the parts add up to VmRSS"
    );
    assert!(kib("threads") >= 1.0, "{json:#}");
    assert!(common::number(&json, "/wake_after_idle_ms") >= 0.0);
}

//! The system proxy on Unix as a person meets it: `beckon doctor --proxy system` looks the
//! proxy up the way the agent with `broker.proxy = "system"` does, from `https_proxy` (an
//! address without a scheme, as curl allows), says where it came from, and its tunnel goes
//! through that proxy; with `no_proxy` naming the broker it goes direct and says why. The
//! broker's port is closed: only the way there matters. Every run is bounded.

mod common;

use std::process::Command;
use std::time::Duration;

use beckon_testkit::Tinyproxy;
use common::{beckon_bin, free_port, output_within};

const LIMIT: Duration = Duration::from_secs(60);

fn doctor(broker_port: u16, env: &[(&str, &str)]) -> String {
    let mut command = Command::new(beckon_bin());
    command
        .args(["doctor", "--broker", "127.0.0.1", "--ports"])
        .arg(broker_port.to_string())
        .args(["--proxy", "system", "--timeout", "5"])
        .env("RUST_LOG", "warn");
    for name in [
        "https_proxy",
        "HTTPS_PROXY",
        "all_proxy",
        "ALL_PROXY",
        "no_proxy",
        "NO_PROXY",
    ] {
        command.env_remove(name);
    }
    command.envs(env.iter().copied());
    let out = output_within(command, LIMIT);
    assert_eq!(out.status.code(), Some(1), "no path works: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn the_system_proxy_comes_from_https_proxy_and_no_proxy_bypasses_it() {
    let broker_port = free_port();
    let proxy = Tinyproxy::start(&[broker_port]);
    let address = format!("127.0.0.1:{}", proxy.port);

    let report = doctor(broker_port, &[("https_proxy", &address)]);
    assert!(
        report.contains(&format!(
            "proxy http://{address} (system proxy: the environment variable https_proxy)"
        )),
        "the report names the proxy and where it came from:\n{report}"
    );
    assert!(
        proxy.output().contains("CONNECT"),
        "the tunnel went through the proxy: {}",
        proxy.output()
    );

    let report = doctor(
        broker_port,
        &[
            ("https_proxy", &address),
            ("no_proxy", "localhost,127.0.0.1"),
        ],
    );
    assert!(
        report.contains("no proxy (system proxy: no_proxy holds 127.0.0.1)"),
        "{report}"
    );
}

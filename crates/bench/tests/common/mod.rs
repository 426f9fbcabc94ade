//! Shared by the bench's test programs. They run without the libtest harness so that the
//! fleet under test can start this very program again as its worker processes
//! (`<test program> bench worker`), as it starts `beckon bench worker` in production.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

/// Runs the tests, or, when started as `bench ...` by a fleet, the bench itself.
pub fn main_with(tests: &[(&str, fn())]) -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("bench") {
        return match beckon_bench::run_standalone() {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    if args.iter().any(|a| a == "--list") {
        // None of these is ignored: a runner asking for the ignored ones gets an empty list
        // (otherwise nextest would file every test as ignored and skip it).
        if args.iter().any(|a| a == "--ignored") {
            return ExitCode::SUCCESS;
        }
        for (name, _) in tests {
            println!("{name}: test");
        }
        return ExitCode::SUCCESS;
    }
    let filter = args.iter().skip(1).find(|a| !a.starts_with('-'));
    let mut failed = Vec::new();
    for (name, test) in tests {
        if filter.is_some_and(|f| !name.contains(f.as_str())) {
            continue;
        }
        eprintln!("test {name} ...");
        let started = Instant::now();
        match std::panic::catch_unwind(test) {
            Ok(()) => eprintln!(
                "test {name} ... ok ({:.1} s)",
                started.elapsed().as_secs_f64()
            ),
            Err(_) => {
                eprintln!("test {name} ... FAILED");
                failed.push(*name);
            }
        }
    }
    if failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        eprintln!("failed: {}", failed.join(", "));
        ExitCode::FAILURE
    }
}

/// Mosquitto from Debian's package; the test fails (not skips) without it.
pub fn mosquitto_bin() -> PathBuf {
    let path = PathBuf::from(
        std::env::var_os("MOSQUITTO_BIN").unwrap_or_else(|| "/usr/sbin/mosquitto".into()),
    );
    assert!(
        path.is_file(),
        "Mosquitto not found at {}: install it (apt-get install mosquitto) or set MOSQUITTO_BIN",
        path.display()
    );
    path
}

/// The `beckon` binary named by `BECKON_BIN`; the test fails (not skips) without it.
pub fn beckon_bin() -> PathBuf {
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

/// Runs this program as `bench <args>`, killed if it outlives `limit`; returns stdout after
/// asserting exit 0.
pub fn run_bench(args: &[&str], limit: Duration) -> String {
    let (status, stdout) = run_bench_status(args, limit);
    assert!(
        status.success(),
        "bench {args:?} exited with {status}; stdout:\n{stdout}"
    );
    stdout
}

/// Runs this program as `bench <args>`, killed if it outlives `limit`; returns its exit
/// status and stdout.
pub fn run_bench_status(args: &[&str], limit: Duration) -> (std::process::ExitStatus, String) {
    run_bench_to(args, limit, Stdio::inherit())
}

/// Runs this program as `bench <args>`, killed if it outlives `limit`; returns its exit
/// status and what it wrote on stderr (its errors).
pub fn run_bench_stderr(args: &[&str], limit: Duration) -> (std::process::ExitStatus, String) {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("stderr");
    let file = std::fs::File::create(&path).expect("stderr file");
    let (status, _) = run_bench_to(args, limit, file.into());
    let stderr = read(&path);
    eprint!("{stderr}");
    (status, stderr)
}

fn run_bench_to(
    args: &[&str],
    limit: Duration,
    stderr: Stdio,
) -> (std::process::ExitStatus, String) {
    let exe = std::env::current_exe().expect("own path");
    let out_dir = tempfile::tempdir().expect("temp dir");
    let out_path = out_dir.path().join("stdout");
    let out_file = std::fs::File::create(&out_path).expect("stdout file");
    let mut child = Command::new(exe)
        .arg("bench")
        .args(args)
        .stdin(Stdio::null())
        .stdout(out_file)
        .stderr(stderr)
        .spawn()
        .expect("start the bench");
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for the bench") {
            break status;
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("bench {args:?} ran longer than {limit:?}; killed");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    (status, read(&out_path))
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).expect("read the bench's stdout")
}

/// A bench's `--json` output, failing with the output when it does not parse.
pub fn report_json(stdout: &str) -> serde_json::Value {
    serde_json::from_str(stdout)
        .unwrap_or_else(|e| panic!("the report is not JSON ({e}):\n{stdout}"))
}

/// The number at `pointer` in `json`, failing with the document when absent.
pub fn number(json: &serde_json::Value, pointer: &str) -> f64 {
    json.pointer(pointer)
        .and_then(serde_json::Value::as_f64)
        .unwrap_or_else(|| panic!("no number at {pointer} in:\n{json:#}"))
}

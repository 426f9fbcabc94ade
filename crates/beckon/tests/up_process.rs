//! `beckon up` as a process, as a newcomer runs it: the first start creates everything and
//! prints the admin password once; the console reaches its own broker; a second start on the
//! same folder reuses everything and prints no new password. A normal start logs no warning
//! (the console connects to its broker once it listens). Every wait is bounded.

mod common;

use std::time::Duration;

use common::Up;

#[test]
fn first_start_creates_everything_and_the_second_reuses_it() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("beckon-data");

    let first = Up::start(&data, 0, true);
    let password = first
        .password()
        .unwrap_or_else(|| panic!("no admin password printed: {:?}", first.stdout));
    let cookie = first.login(&password);
    first.wait_push_connected(&cookie);
    // A moment for anything that would still be logged about the start.
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        first.warnings(),
        Vec::<String>::new(),
        "a normal start logs no warning"
    );
    assert!(data.join("console/tenant-ca.pem").exists());
    let server_cert = std::fs::read(data.join("broker/server.pem")).unwrap();
    drop(first);

    let second = Up::start(&data, 0, true);
    assert_eq!(
        second.password(),
        None,
        "a second start must not print a new password: {:?}",
        second.stdout
    );
    assert_eq!(
        std::fs::read(data.join("broker/server.pem")).unwrap(),
        server_cert,
        "the broker certificate is reused"
    );
    let cookie = second.login(&password);
    second.wait_push_connected(&cookie);
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        second.warnings(),
        Vec::<String>::new(),
        "a second start logs no warning"
    );
}

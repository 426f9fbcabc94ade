//! PostgreSQL stopped under a running store, then started again: calls fail while it is
//! down, with an error that says the database is the trouble, and succeed again by
//! themselves once it is back (a broken connection is dropped and a fresh one opened).
//! Runs with `BECKON_TEST_POSTGRES` set (the PostgreSQL binaries are there); this test starts
//! a cluster of its own with scripts/test-postgres, since it stops it.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use beckon_console::store::*;

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/test-postgres")
}

/// Runs scripts/test-postgres with `args`; returns what it printed.
fn cluster(args: &[&str]) -> String {
    let out = Command::new(script()).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "scripts/test-postgres {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// Stops the cluster in the folder when the test ends, however it ends.
struct Stop(String);

impl Drop for Stop {
    fn drop(&mut self) {
        let _ = Command::new(script()).args(["stop", &self.0]).status();
    }
}

#[test]
fn the_store_fails_while_postgresql_is_down_and_recovers_by_itself() {
    if std::env::var(common::POSTGRES_VAR).is_err() {
        eprintln!(
            "{} is not set: PostgreSQL not tested here",
            common::POSTGRES_VAR
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let folder = dir.path().join("cluster").display().to_string();
    let admin = cluster(&["start", &folder]);
    let _stop = Stop(folder.clone());
    let port = admin
        .rsplit_once(':')
        .and_then(|(_, rest)| rest.split('/').next())
        .unwrap()
        .to_owned();
    let url = DatabaseUrl::Postgres(common::create_postgres_database(&admin));
    let store = url.open().unwrap();
    store.create_group("lab", "", 1).unwrap();

    cluster(&["stop", &folder]);
    let err = store.list_groups().unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::Unavailable { .. } | StoreError::Database { .. }
        ),
        "{err}"
    );
    // The next call finds no server either, and says so.
    let err = store.list_groups().unwrap_err().to_string();
    assert!(err.contains("cannot reach the database"), "{err}");
    assert!(err.contains(&format!("127.0.0.1:{port}")), "{err}");

    cluster(&["start", &folder, &port]);
    let deadline = Instant::now() + common::WAIT;
    loop {
        match store.list_groups() {
            Ok(groups) => {
                assert_eq!(groups.len(), 1, "the data is still there");
                break;
            }
            Err(e) if Instant::now() < deadline => {
                eprintln!("not yet: {e}");
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(e) => panic!("the store did not recover within {:?}: {e}", common::WAIT),
        }
    }
}

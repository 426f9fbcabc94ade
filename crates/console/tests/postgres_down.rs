//! PostgreSQL stopped under a running store, then started again: calls fail while it is
//! down, with an error that says the database is the trouble, and succeed again by
//! themselves once it is back (a broken connection is dropped and a fresh one opened).
//! Runs with `BECKON_TEST_POSTGRES` set (the PostgreSQL binaries are there); this test starts
//! a cluster of its own with scripts/test-postgres, since it stops it.

mod common;

use std::time::{Duration, Instant};

use beckon_console::store::*;
use common::cluster;

#[test]
fn the_store_fails_while_postgresql_is_down_and_recovers_by_itself() {
    let Some(own) = common::own_cluster() else {
        return;
    };
    let (folder, admin) = (own.folder.clone(), own.admin.clone());
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

//! TLS to PostgreSQL: with `sslmode=verify-full` and the server's CA the store talks TLS
//! (the server itself says so), without the CA it refuses the server and says why, and
//! without `sslmode` it talks in the clear as before. Runs with `BECKON_TEST_POSTGRES` set;
//! the cluster is the test's own (scripts/test-postgres, TLS from its `ca.pem`).

mod common;

use std::path::Path;

use beckon_console::store::*;

/// Whether each connection of the console to `database` uses TLS, as the server sees it.
fn console_connections_tls(admin: &str, database: &str) -> Vec<bool> {
    let mut client = postgres::Client::connect(admin, postgres::NoTls).unwrap();
    client
        .query(
            "SELECT s.ssl FROM pg_stat_ssl s JOIN pg_stat_activity a ON a.pid = s.pid \
             WHERE a.application_name = 'beckon-console' AND a.datname = $1",
            &[&database],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

fn open(url: &str) -> Result<SqlStore, String> {
    let url: DatabaseUrl = url.parse()?;
    url.open().map_err(|e| e.to_string())
}

#[test]
fn the_store_talks_tls_to_postgresql_and_checks_the_server() {
    let Some(own) = common::own_cluster() else {
        return;
    };
    let admin = own.admin.clone();
    let ca = Path::new(&own.folder).join("ca.pem");
    let plain = common::create_postgres_database(&admin);
    let database = plain.rsplit('/').next().unwrap().to_owned();

    let store = open(&format!(
        "{plain}?sslmode=verify-full&sslrootcert={}",
        ca.display()
    ))
    .unwrap();
    store.create_group("lab", "", 1).unwrap();
    let tls = console_connections_tls(&admin, &database);
    assert!(!tls.is_empty() && tls.iter().all(|t| *t), "{tls:?}");
    drop(store);

    // The system store does not know the cluster's CA: refused, and the reason given.
    let err = open(&format!("{plain}?sslmode=verify-full"))
        .err()
        .expect("an unknown CA is refused");
    assert!(err.contains("certificate"), "{err}");

    // Without sslmode, in the clear, as before (the server offers TLS, it is not used).
    let store = open(&plain).unwrap();
    assert_eq!(store.list_groups().unwrap().len(), 1);
    // (The first store's connections may still be closing.)
    let tls = console_connections_tls(&admin, &database);
    assert!(tls.iter().any(|t| !*t), "{tls:?}");
}

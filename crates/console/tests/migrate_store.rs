//! `beckon console migrate-store`: a store filled through the store's API is copied from
//! SQLite into another database (PostgreSQL when `BECKON_TEST_POSTGRES` is set, else another
//! SQLite file) and reads back the same; a target that holds rows is refused untouched.
//! And PostgreSQL's own schema version: a database from a newer Beckon is refused.

mod common;

use beckon_console::model::*;
use beckon_console::settings::Settings;
use beckon_console::store::*;
use beckon_console::{MigrateStoreArgs, migrate_store};
use serde_json::{Value, json};

const NOW: Millis = 1_700_000_000_000;

fn new_agent(id: &str, serial: &str) -> NewAgent {
    NewAgent {
        name: format!("{id} name"),
        secret_hash: [7; 32],
        certificate: Some(CertificateRecord {
            serial: serial.into(),
            issued_at: NOW,
            not_after: NOW + 86_400_000,
        }),
        ..common::new_agent(id)
    }
}

/// Every kind of data, written through the store.
fn fill(s: &SqlStore) -> String {
    s.create_group("lab", "the lab", NOW).unwrap();
    s.create_enrollment_token(NewEnrollmentToken {
        id: "et1".into(),
        hash: [1; 32],
        label: "lab machines".into(),
        created_by: "user:admin".into(),
        expires_at: Some(NOW + 1_000_000),
        max_uses: Some(5),
        groups: vec!["lab".into()],
    })
    .unwrap();
    for (id, serial) in [("pc-1", "0a01"), ("pc-2", "0a02"), ("pc-3", "0a03")] {
        s.enroll_agent(&[1; 32], new_agent(id, serial), NOW)
            .unwrap();
    }
    s.record_certificate(
        "pc-1",
        &CertificateRecord {
            serial: "0b01".into(),
            issued_at: NOW + 5,
            not_after: NOW + 86_400_000,
        },
    )
    .unwrap();
    s.set_presence(PresenceUpdate {
        agent_id: "pc-1".into(),
        presence: Presence::Online,
        at: NOW + 10,
        path: Some("direct".into()),
        remote_addr: Some("192.0.2.7:50000".into()),
    })
    .unwrap();
    s.record_checkin("pc-2", None, false, NOW + 20).unwrap();
    let mut n = 0;
    let mut ids = move || {
        n += 1;
        format!("w{n}")
    };
    let (call, deliveries) = s
        .create_call(
            NewCall {
                id: "c1".into(),
                created_by: "user:admin".into(),
                reason: "patch day".into(),
                action: Some("update".into()),
                target: CallTarget::Group("lab".into()),
                expires_at: NOW + 3_600_000,
                spread: None,
                default_spread: (1000, 60),
            },
            NOW + 30,
            &mut ids,
        )
        .unwrap();
    s.advance_delivery(DeliveryAdvance {
        agent_id: deliveries[0].agent_id.clone(),
        wakeup_id: deliveries[0].wakeup_id.clone(),
        state: CallState::Finished,
        update: DeliveryUpdate {
            status: Some("ok".into()),
            exit_code: Some(0),
            duration_ms: Some(1234),
            detail: Some("done".into()),
        },
        at: NOW + 40,
    })
    .unwrap();
    s.set_carried_by(&[deliveries[2].wakeup_id.clone()], &deliveries[1].wakeup_id)
        .unwrap();
    s.revoke_agent("pc-3", NOW + 50).unwrap();
    s.create_user(
        "admin",
        "$argon2id$v=19$m=19456,t=2,p=1$c2FsdA$aGFzaA",
        Role::Operator,
        NOW,
    )
    .unwrap();
    s.create_session(NewSession {
        hash: [2; 32],
        user: "admin".into(),
        created_at: NOW,
        expires_at: i64::MAX,
    })
    .unwrap();
    for (id, hash) in [("at1", 3), ("at2", 4)] {
        s.create_api_token(NewApiToken {
            id: id.into(),
            hash: [hash; 32],
            name: format!("ci-{id}"),
            created_at: NOW + i64::from(hash),
            role: Role::Viewer,
            created_by: Some("user:admin".into()),
        })
        .unwrap();
    }
    s.revoke_api_token("at2").unwrap();
    let mut settings = Settings::default();
    settings.wol.port = 7;
    s.put_settings(&settings, "user:admin", NOW + 60).unwrap();
    s.audit(NewAuditEntry {
        who: "token:ci-at1".into(),
        what: "agent.revoke".into(),
        detail: json!({"agent": "pc-3"}),
        at: NOW + 70,
    })
    .unwrap();
    s.record_wol_send(&WolSend {
        agent_id: "pc-2".into(),
        call_id: Some("c1".into()),
        mac: "00:11:22:33:44:55".into(),
        destination: "192.168.1.255:9".into(),
        at: NOW + 80,
        packets: 3,
        error: None,
        via_agent: Some("pc-1".into()),
        relay_id: Some("r1".into()),
        relay_state: Some("answered".into()),
    })
    .unwrap();
    // Not copied: a failed login only matters for the throttles' five minutes.
    s.record_auth_failure(FailureKind::LoginUser, "admin", NOW + 90, NOW)
        .unwrap();
    call.id
}

/// What the store shows of everything [`fill`] wrote, as JSON.
fn snapshot(s: &SqlStore, call: &str) -> Value {
    let all = AgentFilter {
        include_revoked: true,
        ..Default::default()
    };
    let agents = s.list_agents(&all).unwrap();
    json!({
        "agents": agents,
        "groups": s.list_groups().unwrap(),
        "revocations": format!("{:?}", s.revocations(NOW).unwrap()),
        "enrollment_tokens": s.list_enrollment_tokens().unwrap(),
        "call": s.call(call).unwrap(),
        "deliveries": s.call_deliveries(call, &DeliveryQuery { limit: 100, ..Default::default() }).unwrap(),
        "calls": s.list_calls(100).unwrap(),
        "password": s.password_hash("admin").unwrap(),
        "session": s.session(&[2; 32], NOW).unwrap().name,
        "api_token": s.api_token(&[3; 32]).unwrap().name,
        "api_tokens": s.list_api_tokens().unwrap(),
        "settings": s.settings().unwrap(),
        "audit": s.audit_log(100).unwrap(),
        "wol": s.wol_sends("pc-2", 10).unwrap(),
        "secret": s.agent_by_secret("pc-1", &[7; 32]).unwrap().id,
    })
}

#[test]
fn a_store_moves_whole_into_an_empty_database_and_not_into_a_used_one() {
    let dir = tempfile::tempdir().unwrap();
    let from = DatabaseUrl::Sqlite(dir.path().join("console.db"));
    let source = from.open().unwrap();
    let call = fill(&source);
    let before = snapshot(&source, &call);
    drop(source);

    let to =
        common::test_database().unwrap_or_else(|| DatabaseUrl::Sqlite(dir.path().join("copy.db")));
    let args = MigrateStoreArgs {
        from: from.clone(),
        to: to.clone(),
    };
    let report = migrate_store(&args).unwrap();
    let count = |table: &str| report.iter().find(|(t, _)| *t == table).unwrap().1;
    // Every table of the schema is copied, or left behind knowingly: what only matters
    // while consoles run (their dispatch leases, the throttles' recent failures), and the
    // search index (FTS5's table and its shadow tables) and the agents' counts, which the
    // target's triggers make from the agents copied.
    let DatabaseUrl::Sqlite(path) = &from else {
        unreachable!()
    };
    let conn = rusqlite::Connection::open(path).unwrap();
    let mut schema: Vec<String> = conn
        .prepare("SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    schema.sort();
    let mut handled: Vec<String> = report
        .iter()
        .map(|(t, _)| (*t).to_owned())
        .chain(
            [
                "agent_count_changes",
                "agent_counts",
                "auth_failures",
                "console_leases",
                "revocation_seq",
                "agents_search",
                "agents_search_config",
                "agents_search_data",
                "agents_search_docsize",
                "agents_search_idx",
            ]
            .map(String::from),
        )
        .collect();
    handled.sort();
    assert_eq!(schema, handled);
    assert_eq!(count("agents"), 3);
    assert_eq!(count("deliveries"), 3);
    assert_eq!(count("agent_certificates"), 4);
    assert_eq!(count("revocation_feed"), 1, "pc-3's removal");
    assert_eq!(count("audit_log"), 2);

    let target = to.open().unwrap();
    assert_eq!(snapshot(&target, &call), before);
    // The copied agents are found by the search index, as in the source.
    let found: Vec<String> = target
        .list_agents(&AgentFilter {
            search: Some("PC-2".into()),
            ..Default::default()
        })
        .unwrap()
        .into_iter()
        .map(|a| a.id)
        .collect();
    assert_eq!(found, ["pc-2"]);
    assert_eq!(
        [Presence::Online, Presence::Offline, Presence::Unknown]
            .map(|p| target.count_agents(p).unwrap()),
        [Presence::Online, Presence::Offline, Presence::Unknown].map(|p| target
            .list_agents(&AgentFilter {
                presence: Some(p),
                limit: 1000,
                ..Default::default()
            })
            .unwrap()
            .len() as u64),
        "the target counts the copied agents"
    );
    // Brokers keep their feed cursors: the copied entry keeps its cursor, the next removal
    // comes after it.
    let feed = target.revocation_feed(0, 10, NOW).unwrap();
    assert_eq!(feed.changes.len(), 1);
    assert_eq!(feed.changes[0].id, "pc-3");
    target.revoke_agent("pc-2", NOW + 60).unwrap();
    let next = target.revocation_feed(feed.next, 10, NOW).unwrap();
    assert_eq!(next.changes.len(), 1);
    assert!(next.changes[0].cursor > feed.next);
    assert!(
        target
            .recent_auth_failures(FailureKind::LoginUser, "admin", 0, 10)
            .unwrap()
            .is_empty()
    );
    // New rows continue the copied numbering.
    target
        .audit(NewAuditEntry {
            who: "user:admin".into(),
            what: "after".into(),
            detail: Value::Null,
            at: NOW + 90,
        })
        .unwrap();
    let log = target.audit_log(10).unwrap();
    assert_eq!(log[0].what, "after");
    assert!(log[0].id > log[1].id, "{log:?}");
    drop(target);

    // Again into the same, now used, database: refused, and the target keeps what it has.
    let err = migrate_store(&args).unwrap_err().to_string();
    assert!(err.contains("empty database"), "{err}");
    let target = to.open().unwrap();
    assert_eq!(target.audit_log(10).unwrap().len(), 3);
    assert_eq!(
        target.list_agents(&AgentFilter::default()).unwrap().len(),
        1,
        "pc-1 (pc-2 was removed after the copy)"
    );

    // From a file that does not exist: a clear error, no file created.
    let missing = dir.path().join("missing.db");
    let err = migrate_store(&MigrateStoreArgs {
        from: DatabaseUrl::Sqlite(missing.clone()),
        to,
    })
    .unwrap_err()
    .to_string();
    assert!(err.contains("no database file"), "{err}");
    assert!(!missing.exists());
}

#[test]
fn database_urls_parse_and_never_show_the_password() {
    let url: DatabaseUrl = "postgres://beckon:s3cret@db.example:5432/beckon"
        .parse()
        .unwrap();
    assert_eq!(
        url.to_string(),
        "postgres://beckon:***@db.example:5432/beckon"
    );
    assert_eq!(format!("{url:?}"), url.to_string());
    assert_eq!(
        "sqlite:/var/lib/beckon/console.db"
            .parse::<DatabaseUrl>()
            .unwrap(),
        DatabaseUrl::Sqlite("/var/lib/beckon/console.db".into())
    );
    for (bad, says) in [
        ("mysql://x/y", "sqlite:PATH"),
        ("sqlite:", "no path"),
        (
            "postgres://u:pw@h/db?sslmode=prefer",
            "fall back to cleartext",
        ),
        ("postgres://u:pw@h/db?sslmode=bogus", "sslmode=bogus"),
        ("postgres://u:pw@h/db?sslrootcert=/ca.pem", "no sslmode"),
        (
            "postgres://u:pw@h/db?sslmode=verify-full&sslrootcert=/no/such/ca.pem",
            "cannot read the CA file /no/such/ca.pem",
        ),
        ("postgres://u:pw@h:notaport/db", "not valid"),
        ("postgres://u:pw@h:5432", "names no database"),
    ] {
        let err = bad.parse::<DatabaseUrl>().unwrap_err();
        assert!(err.contains(says), "{bad}: {err}");
        assert!(!err.contains("pw@"), "{bad}: {err}");
    }
}

/// On PostgreSQL (run with `BECKON_TEST_POSTGRES`): a new database gets the schema, and one
/// marked by a newer Beckon is refused with what to do.
#[test]
fn a_postgres_database_is_migrated_and_a_newer_one_is_refused() {
    let Some(url) = common::test_database() else {
        eprintln!(
            "{} is not set: PostgreSQL not tested here",
            common::POSTGRES_VAR
        );
        return;
    };
    let store = url.open().unwrap();
    assert_eq!(store.schema_version().unwrap(), POSTGRES_SCHEMA_VERSION);
    store.create_group("lab", "", 1).unwrap();
    drop(store);
    let store = url.open().unwrap();
    assert_eq!(
        store.list_groups().unwrap().len(),
        1,
        "reopened, not migrated again"
    );
    drop(store);
    let DatabaseUrl::Postgres(raw) = &url else {
        unreachable!()
    };
    let mut client = postgres::Client::connect(raw, postgres::NoTls).unwrap();
    client
        .execute(
            "UPDATE schema_version SET version = $1",
            &[&(POSTGRES_SCHEMA_VERSION + 1)],
        )
        .unwrap();
    drop(client);
    let err = url.open().err().expect("refused").to_string();
    assert!(err.contains("newer than this Beckon supports"), "{err}");
    assert!(err.contains("restore a backup"), "{err}");
}

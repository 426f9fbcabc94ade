//! The store: migrations, file modes, enrollment tokens, call states, and crash safety.
//! Tests of behaviour run on PostgreSQL when `BECKON_TEST_POSTGRES` is set (see
//! common::store), on SQLite otherwise; those of the SQLite file on SQLite.

mod common;

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use beckon_console::model::*;
use beckon_console::store::*;

fn token(hash: u8, max_uses: Option<u32>, expires_at: Option<i64>) -> NewEnrollmentToken {
    NewEnrollmentToken {
        id: format!("t{hash}"),
        hash: [hash; 32],
        label: "test".into(),
        created_by: "user:admin".into(),
        expires_at,
        max_uses,
        groups: vec![],
    }
}

fn agent(id: &str) -> NewAgent {
    common::new_agent(id)
}

#[test]
fn a_new_database_is_private_migrated_and_a_newer_one_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("console.db");
    let store = SqlStore::open_sqlite(&path).unwrap();
    assert_eq!(store.schema_version().unwrap(), SCHEMA_VERSION);
    store.create_group("lab", "", 1).unwrap();
    drop(store);
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "database file mode");
    // Reopening keeps the data and does not migrate again.
    let store = SqlStore::open_sqlite(&path).unwrap();
    assert_eq!(store.list_groups().unwrap().len(), 1);
    drop(store);
    // A database from a newer Beckon is refused with a message that says what to do.
    let conn = rusqlite::Connection::open(&path).unwrap();
    conn.pragma_update(None, "user_version", SCHEMA_VERSION + 1)
        .unwrap();
    drop(conn);
    let err = SqlStore::open_sqlite(&path).err().expect("refused");
    let text = err.to_string();
    assert!(text.contains("newer than this Beckon supports"), "{text}");
    assert!(text.contains("restore a backup"), "{text}");
}

/// A stored proxy policy without `direct_fallback` (or no stored policy at all, with other
/// groups saved) reads as "agents may go direct", as documented.
#[test]
fn a_stored_proxy_policy_without_the_field_allows_going_direct() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("console.db");
    drop(SqlStore::open_sqlite(&path).unwrap());
    let conn = rusqlite::Connection::open(&path).unwrap();
    conn.execute(
        "INSERT INTO settings (key, value) VALUES ('wol', ?1)",
        [r#"{"addresses":[],"subnet_broadcast":true,"port":7,"repeats":3,"secureon":"","relay":true}"#],
    )
    .unwrap();
    drop(conn);
    let store = SqlStore::open_sqlite(&path).unwrap();
    let s = store.settings().unwrap();
    assert_eq!(s.wol.port, 7);
    assert!(s.proxy.direct_fallback, "no stored proxy group: {s:?}");
    drop(store);
    let conn = rusqlite::Connection::open(&path).unwrap();
    conn.execute(
        "INSERT INTO settings (key, value) VALUES ('proxy', ?1)",
        [r#"{"url":"http://proxy.example:3128"}"#],
    )
    .unwrap();
    drop(conn);
    let s = SqlStore::open_sqlite(&path).unwrap().settings().unwrap();
    assert_eq!(s.proxy.url, "http://proxy.example:3128");
    assert!(s.proxy.direct_fallback, "a stored proxy without the field");
}

#[test]
fn enrollment_tokens_are_used_up_expire_and_revoke_and_refusals_change_nothing() {
    let s = common::store();
    s.create_enrollment_token(token(1, Some(1), None)).unwrap();
    s.create_enrollment_token(token(2, None, None)).unwrap();
    s.create_enrollment_token(token(3, Some(5), Some(1_000)))
        .unwrap();

    s.enroll_agent(&[1; 32], agent("a1"), 10).unwrap();
    let err = s.enroll_agent(&[1; 32], agent("a2"), 10).unwrap_err();
    assert!(err.to_string().contains("used up"), "{err}");
    assert!(matches!(s.agent("a2"), Err(StoreError::NotFound { .. })));

    // Multi-use.
    s.enroll_agent(&[2; 32], agent("a2"), 10).unwrap();
    s.enroll_agent(&[2; 32], agent("a3"), 10).unwrap();
    // Duplicate id: conflict, and the token is not used.
    let err = s.enroll_agent(&[2; 32], agent("a3"), 10).unwrap_err();
    assert!(matches!(err, StoreError::Conflict(_)), "{err}");
    let t2 = s
        .list_enrollment_tokens()
        .unwrap()
        .into_iter()
        .find(|t| t.id == "t2")
        .unwrap();
    assert_eq!(t2.uses, 2);

    // Expired.
    let err = s.enroll_agent(&[3; 32], agent("a4"), 2_000).unwrap_err();
    assert!(err.to_string().contains("expired"), "{err}");
    // Revoked.
    s.revoke_enrollment_token("t2").unwrap();
    let err = s.enroll_agent(&[2; 32], agent("a5"), 10).unwrap_err();
    assert!(err.to_string().contains("revoked"), "{err}");
    // Unknown.
    let err = s.enroll_agent(&[7; 32], agent("a6"), 10).unwrap_err();
    assert!(err.to_string().contains("not known"), "{err}");
    assert_eq!(
        s.list_agents(&AgentFilter::default()).unwrap().len(),
        3,
        "only the accepted enrollments made agents"
    );
}

#[test]
fn agents_filter_by_search_group_and_presence() {
    let s = common::store();
    s.create_enrollment_token(token(1, None, None)).unwrap();
    for id in ["pc-1", "pc-2", "srv-1"] {
        s.enroll_agent(&[1; 32], agent(id), 10).unwrap();
    }
    s.create_group("servers", "", 1).unwrap();
    s.update_agent(
        "srv-1",
        Some("Server one".into()),
        Some(vec!["servers".into()]),
    )
    .unwrap();
    let err = s
        .update_agent("pc-1", None, Some(vec!["nope".into()]))
        .unwrap_err();
    assert!(err.to_string().contains("does not exist"), "{err}");
    s.set_presence(PresenceUpdate {
        path: Some("8883".into()),
        ..presence("pc-2", Presence::Online, 100)
    })
    .unwrap();
    // An older presence event does not overwrite a newer one.
    s.set_presence(presence("pc-2", Presence::Offline, 50))
        .unwrap();
    let ids = |f: AgentFilter| -> Vec<String> {
        s.list_agents(&f)
            .unwrap()
            .into_iter()
            .map(|a| a.id)
            .collect()
    };
    assert_eq!(
        ids(AgentFilter {
            search: Some("pc-".into()),
            ..Default::default()
        }),
        ["pc-1", "pc-2"]
    );
    assert_eq!(
        ids(AgentFilter {
            group: Some("servers".into()),
            ..Default::default()
        }),
        ["srv-1"]
    );
    assert_eq!(
        ids(AgentFilter {
            presence: Some(Presence::Online),
            ..Default::default()
        }),
        ["pc-2"]
    );
    s.revoke_agent("pc-1", 5).unwrap();
    assert_eq!(ids(AgentFilter::default()).len(), 2);
    assert!(s.agent_by_secret("pc-1", &[9; 32]).is_err(), "revoked");
    assert!(s.agent_by_secret("pc-2", &[8; 32]).is_err(), "wrong secret");
    assert!(s.agent_by_secret("pc-2", &[9; 32]).is_ok());
}

/// `agent` seen with `presence` at `at`, without a path or remote address.
fn presence(agent: &str, presence: Presence, at: Millis) -> PresenceUpdate {
    PresenceUpdate {
        agent_id: agent.into(),
        presence,
        at,
        path: None,
        remote_addr: None,
    }
}

/// `agent`'s delivery of wake-up `wakeup_id` moving to `state` at `at`, with no ack details.
fn advance(agent: &str, wakeup_id: &str, state: CallState, at: Millis) -> DeliveryAdvance {
    DeliveryAdvance {
        agent_id: agent.into(),
        wakeup_id: wakeup_id.into(),
        state,
        update: DeliveryUpdate::default(),
        at,
    }
}

fn ids() -> impl FnMut() -> String {
    let mut n = 0;
    move || {
        n += 1;
        format!("w{n}")
    }
}

#[test]
fn delivery_states_only_move_forward_and_expire() {
    let s = common::store();
    s.create_enrollment_token(token(1, None, None)).unwrap();
    for id in ["a", "b"] {
        s.enroll_agent(&[1; 32], agent(id), 10).unwrap();
    }
    let call = |id: &str, target, expires_at| NewCall {
        id: id.into(),
        created_by: "user:admin".into(),
        reason: "policy".into(),
        action: None,
        target,
        expires_at,
        spread: None,
        default_spread: (50, 60),
    };
    let (c, d) = s
        .create_call(call("c1", CallTarget::All, 10_000), 100, &mut ids())
        .unwrap();
    assert_eq!(d.len(), 2);
    assert_eq!(c.counts.get(&CallState::Queued), Some(&2));
    let wa = d
        .iter()
        .find(|d| d.agent_id == "a")
        .unwrap()
        .wakeup_id
        .clone();

    assert_eq!(
        s.advance_delivery(advance("a", &wa, CallState::Sent, 110))
            .unwrap()
            .len(),
        1
    );
    // An ack from another agent for this wake-up id changes nothing.
    assert!(
        s.advance_delivery(advance("b", &wa, CallState::Delivered, 120))
            .unwrap()
            .is_empty()
    );
    s.advance_delivery(DeliveryAdvance {
        update: DeliveryUpdate {
            status: Some("ok".into()),
            exit_code: Some(0),
            duration_ms: Some(1500),
            detail: None,
        },
        ..advance("a", &wa, CallState::Finished, 130)
    })
    .unwrap();
    // A late `received` does not move it back.
    assert!(
        s.advance_delivery(advance("a", &wa, CallState::Delivered, 140))
            .unwrap()
            .is_empty()
    );
    // Expiry: only b's (still queued) expires.
    assert!(s.expire_due(9_999).unwrap().is_empty());
    let expired = s.expire_due(10_000).unwrap();
    assert_eq!(expired.len(), 1);
    assert_eq!(expired[0].agent_id, "b");
    let (c, d) = s.call("c1").unwrap();
    assert_eq!(c.counts.get(&CallState::Finished), Some(&1));
    assert_eq!(c.counts.get(&CallState::Expired), Some(&1));
    let a = d.iter().find(|d| d.agent_id == "a").unwrap();
    assert_eq!(
        (a.status.as_deref(), a.exit_code, a.duration_ms),
        (Some("ok"), Some(0), Some(1500))
    );
    assert_eq!(a.sent_at, Some(110));

    // Unknown target agent: refused, nothing recorded.
    let err = s
        .create_call(
            call("c2", CallTarget::Agents(vec!["zz".into()]), 10_000),
            100,
            &mut ids(),
        )
        .unwrap_err();
    assert!(err.to_string().contains("not enrolled"), "{err}");
    assert!(matches!(s.call("c2"), Err(StoreError::NotFound { .. })));
}

#[test]
fn carried_deliveries_follow_their_carrier() {
    let s = common::store();
    s.create_enrollment_token(token(1, None, None)).unwrap();
    s.enroll_agent(&[1; 32], agent("a"), 10).unwrap();
    let mut next = ids();
    for c in ["c1", "c2", "c3"] {
        s.create_call(
            NewCall {
                id: c.into(),
                created_by: "x".into(),
                reason: c.into(),
                action: None,
                target: CallTarget::Agents(vec!["a".into()]),
                expires_at: 100_000,
                spread: Some(0),
                default_spread: (50, 60),
            },
            100,
            &mut next,
        )
        .unwrap();
    }
    let pending = s.pending_for_agent("a", 200).unwrap();
    assert_eq!(pending.len(), 3);
    let out = beckon_console::dispatch::merge_pending(&pending);
    assert_eq!(out.len(), 1, "three pending wake-ups go out as one");
    assert_eq!(out[0].carrier.wakeup_id, "w3");
    assert_eq!(out[0].carried, ["w1", "w2"]);
    assert_eq!(out[0].reason, "c1, c2, c3");
    s.set_carried_by(&out[0].carried, "w3").unwrap();
    let changed = s
        .advance_delivery(advance("a", "w3", CallState::Delivered, 300))
        .unwrap();
    assert_eq!(changed.len(), 3, "one ack moves all three calls");
}

const CHILD_ENV: &str = "BECKON_CONSOLE_CRASH_CHILD_DB";

/// Run as a child by the test below: commits groups in a loop and prints each committed
/// number, until killed.
#[test]
fn crash_child_writer() {
    let Ok(path) = std::env::var(CHILD_ENV) else {
        return;
    };
    let s = SqlStore::open_sqlite(std::path::Path::new(&path)).unwrap();
    for i in 0.. {
        s.create_group(&format!("g{i}"), "written before the kill", i)
            .unwrap();
        println!("committed {i}");
    }
}

#[test]
fn a_process_killed_mid_write_loses_nothing_it_committed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("console.db");
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "crash_child_writer",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, &path)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let stdout = child.stdout.take().unwrap();
    let mut child = Kill(child);
    let mut committed = Vec::new();
    let started = Instant::now();
    for line in BufReader::new(stdout).lines() {
        let Ok(line) = line else { break };
        if let Some(n) = line.strip_prefix("committed ") {
            committed.push(n.parse::<i64>().unwrap());
            if committed.len() == 300 {
                // SIGKILL: no destructor, no clean close of the database.
                child.0.kill().unwrap();
                break;
            }
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "child too slow"
        );
    }
    let _ = child.0.wait();
    assert_eq!(committed.len(), 300, "the child wrote before it was killed");
    let s = SqlStore::open_sqlite(&path).unwrap();
    let names: std::collections::HashSet<String> = s
        .list_groups()
        .unwrap()
        .into_iter()
        .map(|g| g.name)
        .collect();
    for n in committed {
        assert!(names.contains(&format!("g{n}")), "commit {n} lost");
    }
    let conn = rusqlite::Connection::open(&path).unwrap();
    let check: String = conn
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(check, "ok");
}

#[test]
fn a_relay_result_counts_only_from_the_agent_asked_and_a_failure_marks_what_was_requested() {
    let s = common::store();
    let requested = |mac: &str, relay_id: &str| WolSend {
        agent_id: "sleeper".into(),
        call_id: None,
        mac: mac.into(),
        destination: "192.168.1.255:9".into(),
        at: 5,
        packets: 0,
        error: None,
        via_agent: Some("relay-1".into()),
        relay_id: Some(relay_id.into()),
        relay_state: Some("requested".into()),
    };
    s.record_wol_send(&requested("00:11:22:33:44:55", "r1"))
        .unwrap();
    s.record_wol_send(&requested("00:11:22:33:44:66", "r1"))
        .unwrap();
    s.record_wol_send(&requested("00:11:22:33:44:55", "r2"))
        .unwrap();
    let answer = vec![(
        "00:11:22:33:44:55".to_owned(),
        "192.168.1.255:9".to_owned(),
        3,
        None,
    )];
    // Another agent cannot answer for relay-1.
    assert!(
        s.record_relay_result("intruder", "r1", &answer)
            .unwrap()
            .is_empty()
    );
    let changed = s.record_relay_result("relay-1", "r1", &answer).unwrap();
    assert_eq!(changed.len(), 1);
    assert_eq!(changed[0].packets, 3);
    assert_eq!(changed[0].relay_state.as_deref(), Some("answered"));
    s.fail_relay(
        "r2",
        "not sent: the console is not connected to the push service",
    )
    .unwrap();
    // An answered send is not failed afterwards.
    s.fail_relay("r1", "late").unwrap();
    let sends = s.wol_sends("sleeper", 10).unwrap();
    let state = |mac: &str, id: &str| {
        sends
            .iter()
            .find(|w| w.mac == mac && w.relay_id.as_deref() == Some(id))
            .map(|w| (w.relay_state.clone().unwrap(), w.packets, w.error.clone()))
            .unwrap()
    };
    assert_eq!(
        state("00:11:22:33:44:55", "r1"),
        ("answered".into(), 3, None)
    );
    assert_eq!(
        state("00:11:22:33:44:66", "r1"),
        ("failed".into(), 0, Some("late".into()))
    );
    assert_eq!(state("00:11:22:33:44:55", "r2").0, "failed");
}

/// The login and enrollment throttles' failures, kept in the store so that every console on
/// the database counts them: ten within the window throttle a key until the oldest of them
/// leaves it (the Retry-After), other keys and kinds are not held up, a success clears the
/// key, and failures spread wider than the window never throttle.
#[test]
fn ten_failures_in_the_window_throttle_a_key_until_the_oldest_leaves_it() {
    use beckon_console::guard::{self, FAILURES, WINDOW};
    let store = common::store();
    let s: &dyn Store = &store;
    let (user, address) = (FailureKind::LoginUser, FailureKind::LoginAddress);
    let window = WINDOW.as_millis() as Millis;
    let start: Millis = 1_000_000_000;
    let at = |secs: i64| start + secs * 1000;
    for i in 0..i64::from(FAILURES) {
        assert_eq!(guard::check(s, user, "admin", at(i)).unwrap(), Ok(()));
        assert_eq!(
            guard::fail(s, user, "admin", at(i)).unwrap(),
            i == i64::from(FAILURES) - 1,
            "throttled by the tenth failure only ({i})"
        );
    }
    assert_eq!(
        guard::check(s, user, "admin", at(20)).unwrap(),
        Err(WINDOW - Duration::from_secs(20))
    );
    // Another user, or the same text as another kind's key, is not held up.
    assert_eq!(guard::check(s, user, "bob", at(20)).unwrap(), Ok(()));
    assert_eq!(guard::check(s, address, "admin", at(20)).unwrap(), Ok(()));
    // The first failure left the window: nine remain.
    assert_eq!(
        guard::check(s, user, "admin", start + window).unwrap(),
        Ok(())
    );
    assert_eq!(
        s.recent_auth_failures(user, "admin", start, 100)
            .unwrap()
            .len(),
        9
    );
    // A success clears the user name; its other kinds stay.
    guard::fail(s, address, "admin", at(30)).unwrap();
    s.clear_auth_failures(user, "admin").unwrap();
    assert_eq!(guard::check(s, user, "admin", at(20)).unwrap(), Ok(()));
    assert!(
        s.recent_auth_failures(user, "admin", 0, 100)
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        s.recent_auth_failures(address, "admin", 0, 100)
            .unwrap()
            .len(),
        1
    );

    // More than ten (consoles failing at once): throttled until the tenth newest leaves.
    for i in 0..12 {
        s.record_auth_failure(address, "192.0.2.1", at(i), at(i) - window)
            .unwrap();
    }
    assert_eq!(
        guard::check(s, address, "192.0.2.1", at(20)).unwrap(),
        Err(WINDOW - Duration::from_secs(18))
    );

    // Spread wider than the window: never throttled, and each failure deletes the key's
    // failures that left the window.
    for i in 0..30 {
        assert!(!guard::fail(s, user, "spread", start + window / 5 * i).unwrap());
    }
    assert_eq!(
        s.recent_auth_failures(user, "spread", 0, 100)
            .unwrap()
            .len(),
        5
    );
}

/// Failures that left the window are deleted by the sweep, a bounded number per statement,
/// whatever their keys; recent ones stay.
#[test]
fn old_failures_are_swept_in_bounded_batches() {
    use beckon_console::guard::{self, WINDOW};
    let store = common::store();
    let s: &dyn Store = &store;
    let kind = FailureKind::EnrollAddress;
    let window = WINDOW.as_millis() as Millis;
    let now: Millis = 1_000_000_000;
    for i in 0..5 {
        let old = now - window - 1_000 + i;
        s.record_auth_failure(kind, &format!("203.0.113.{i}"), old, old - window)
            .unwrap();
    }
    s.record_auth_failure(kind, "203.0.113.9", now - 1_000, now - 1_000 - window)
        .unwrap();
    assert_eq!(s.prune_auth_failures(now - window, 2).unwrap(), 2);
    // The oldest go first.
    assert!(
        s.recent_auth_failures(kind, "203.0.113.0", 0, 10)
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        s.recent_auth_failures(kind, "203.0.113.4", 0, 10)
            .unwrap()
            .len(),
        1
    );
    assert_eq!(guard::sweep(s, now).unwrap(), 3);
    assert_eq!(guard::sweep(s, now).unwrap(), 0);
    for i in 0..5 {
        let key = format!("203.0.113.{i}");
        assert!(
            s.recent_auth_failures(kind, &key, 0, 10)
                .unwrap()
                .is_empty()
        );
    }
    assert_eq!(
        s.recent_auth_failures(kind, "203.0.113.9", 0, 10).unwrap(),
        vec![now - 1_000]
    );
}

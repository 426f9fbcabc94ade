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

/// The dashboard's counts by presence, [online, offline, unknown] (revoked agents not
/// counted), as the store keeps them.
fn presence_counts(s: &SqlStore) -> [u64; 3] {
    [Presence::Online, Presence::Offline, Presence::Unknown].map(|p| s.count_agents(p).unwrap())
}

/// The same, counted from the agents themselves.
fn presence_counted(s: &SqlStore) -> [u64; 3] {
    [Presence::Online, Presence::Offline, Presence::Unknown].map(|p| {
        s.list_agents(&AgentFilter {
            presence: Some(p),
            limit: 100_000,
            ..Default::default()
        })
        .unwrap()
        .len() as u64
    })
}

#[test]
fn agent_counts_follow_presence_removal_and_enrolment() {
    let s = common::store();
    s.create_enrollment_token(token(1, None, None)).unwrap();
    for id in ["a", "b", "c", "d", "e", "f"] {
        s.enroll_agent(&[1; 32], agent(id), 10).unwrap();
    }
    assert_eq!(presence_counts(&s), [0, 0, 6]);
    s.set_presences(
        ["a", "b", "c"]
            .map(|id| presence(id, Presence::Online, 20))
            .into_iter()
            .chain([presence("d", Presence::Offline, 20)])
            .collect(),
    )
    .unwrap();
    assert_eq!(presence_counts(&s), [3, 1, 2]);
    // Older than what is recorded, and the same event twice (two consoles): no change.
    s.set_presences(vec![
        presence("a", Presence::Offline, 15),
        presence("b", Presence::Online, 20),
    ])
    .unwrap();
    assert_eq!(presence_counts(&s), [3, 1, 2]);
    assert!(s.fold_agent_counts().unwrap() > 0);
    assert_eq!(s.fold_agent_counts().unwrap(), 0, "folded once");
    assert_eq!(presence_counts(&s), [3, 1, 2], "the same after folding");
    s.revoke_agent("b", 30).unwrap();
    assert_eq!(
        presence_counts(&s),
        [2, 1, 2],
        "a removed agent is not counted"
    );
    s.reconcile_presence(&["a".to_owned()], 40).unwrap();
    assert_eq!(presence_counts(&s), [1, 2, 2]);
    // The removed agent enrolled again: a new agent, presence unknown.
    s.enroll_agent(&[1; 32], agent("b"), 50).unwrap();
    assert_eq!(presence_counts(&s), [1, 2, 3]);
    s.fold_agent_counts().unwrap();
    assert_eq!(presence_counts(&s), [1, 2, 3]);
    assert_eq!(presence_counts(&s), presence_counted(&s));
}

/// Two consoles writing presence at once while both fold: every count stays exact, and
/// neither waits for the other's count (on PostgreSQL, a count row locked by each
/// presence transaction would also deadlock with the agents' rows locked in order).
#[test]
fn agent_counts_stay_exact_with_two_consoles_writing_presence_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let url = common::reopenable_database(dir.path());
    let stores = [common::open_store(&url), common::open_store(&url)];
    stores[0]
        .create_enrollment_token(token(1, None, None))
        .unwrap();
    let agents: Vec<String> = (0..200).map(|i| format!("agent-{i:03}")).collect();
    for id in &agents {
        stores[0].enroll_agent(&[1; 32], agent(id), 10).unwrap();
    }
    std::thread::scope(|scope| {
        for (k, s) in stores.iter().enumerate() {
            let agents = &agents;
            scope.spawn(move || {
                for round in 0..30i64 {
                    // Each console hears every agent's events, with their own times; one
                    // in three agents goes offline each round.
                    let updates = agents
                        .iter()
                        .enumerate()
                        .map(|(i, id)| {
                            let online = (i as i64 + round) % 3 != 0;
                            let p = if online {
                                Presence::Online
                            } else {
                                Presence::Offline
                            };
                            presence(id, p, 100 + round * 10 + k as i64)
                        })
                        .collect();
                    s.set_presences(updates).unwrap();
                    if round % 4 == k as i64 {
                        s.fold_agent_counts().unwrap();
                    }
                }
            });
        }
    });
    assert_eq!(presence_counts(&stores[0]), presence_counted(&stores[0]));
    assert_eq!(presence_counts(&stores[1]), presence_counted(&stores[1]));
    let [online, offline, unknown] = presence_counted(&stores[0]);
    assert_eq!((online + offline, unknown), (200, 0));
    stores[1].fold_agent_counts().unwrap();
    assert_eq!(presence_counts(&stores[0]), [online, offline, 0]);
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

/// A query for every delivery of a small call.
fn every() -> DeliveryQuery {
    DeliveryQuery {
        limit: MAX_DELIVERY_PAGE,
        ..Default::default()
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
    let c = s.call("c1").unwrap();
    let d = s.call_deliveries("c1", &every()).unwrap().deliveries;
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

/// The agents a Wake-on-LAN relay is chosen from: every online agent that is not removed,
/// however many (the console once looked at the first 1,000 only), with the addresses of
/// its last check-in; and the machines a call's Wake-on-LAN is for.
#[test]
fn wake_on_lan_reads_every_online_agent_as_a_relay_and_the_calls_agents_not_online() {
    let s = common::store();
    let ids: Vec<String> = (0..1200).map(|i| format!("pc-{i:04}")).collect();
    common::enroll_in_store(&s, &ids).unwrap();
    let online = |id: &String| presence(id, Presence::Online, 20);
    s.set_presences(ids[..1150].iter().map(online).collect())
        .unwrap();
    s.set_presences(vec![presence("pc-0000", Presence::Offline, 30)])
        .unwrap();
    s.revoke_agent("pc-0001", 30).unwrap();
    s.revoke_agent("pc-1199", 30).unwrap();
    let moved = Inventory {
        addresses: vec![AgentAddress {
            address: "10.9.8.7".parse().unwrap(),
            prefix_len: 22,
        }],
        ..common::new_agent("pc-1149").inventory
    };
    s.record_checkin("pc-1149", Some(moved.clone()), false, 40)
        .unwrap();

    let mut candidates = s.relay_candidates().unwrap();
    candidates.sort_by(|a, b| a.id.cmp(&b.id));
    let want: Vec<&String> = ids[2..1150].iter().collect();
    let got: Vec<&String> = candidates.iter().map(|c| &c.id).collect();
    assert_eq!(got, want, "online and not removed, beyond the first 1,000");
    let last = candidates.last().unwrap();
    assert_eq!(last.addresses, moved.addresses);
    assert_eq!(last.presence_at, Some(20));
    assert_eq!(
        candidates[0].addresses,
        common::new_agent("pc-0002").inventory.addresses
    );

    // What a call's Wake-on-LAN reads: of its agents (more than one statement's worth, and an
    // id that is not enrolled), those not online and not removed.
    let mut call_ids = ids.clone();
    call_ids.push("nobody".into());
    let mut asleep: Vec<String> = s
        .agents_not_online(&call_ids)
        .unwrap()
        .into_iter()
        .map(|a| {
            assert_ne!(a.presence, Presence::Online, "{a:?}");
            assert_eq!(a.inventory.macs, ["00:11:22:33:44:55"], "{a:?}");
            a.id
        })
        .collect();
    asleep.sort();
    let mut want = vec!["pc-0000".to_owned()];
    want.extend(ids[1150..1199].iter().cloned());
    assert_eq!(
        asleep, want,
        "offline or never seen (unknown); not online or removed"
    );
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

/// A call's counts as the store keeps them, checked against its deliveries' states.
fn kept_counts(s: &SqlStore, call: &str) -> std::collections::BTreeMap<CallState, u32> {
    let kept = s.call(call).unwrap().counts;
    let mut counted = std::collections::BTreeMap::new();
    for d in s.call_deliveries(call, &every()).unwrap().deliveries {
        *counted.entry(d.state).or_insert(0) += 1;
    }
    assert_eq!(kept, counted, "the counts of {call} against its deliveries");
    kept
}

fn new_call(id: &str, target: CallTarget, expires_at: Millis) -> NewCall {
    NewCall {
        id: id.into(),
        created_by: "user:admin".into(),
        reason: "test".into(),
        action: None,
        target,
        expires_at,
        spread: Some(0),
        default_spread: (50, 60),
    }
}

/// The id of `agent`'s wake-up in `call`.
fn wakeup_of(s: &SqlStore, call: &str, agent: &str) -> String {
    s.call_deliveries(call, &every())
        .unwrap()
        .deliveries
        .into_iter()
        .find(|d| d.agent_id == agent)
        .unwrap()
        .wakeup_id
}

#[test]
fn call_counts_follow_every_state_change() {
    use CallState::*;
    let s = common::store();
    s.create_enrollment_token(token(1, None, None)).unwrap();
    for id in ["a", "b", "c", "d", "e"] {
        s.enroll_agent(&[1; 32], agent(id), 10).unwrap();
    }
    let mut next = ids();
    let (made, _) = s
        .create_call(new_call("c1", CallTarget::All, 10_000), 100, &mut next)
        .unwrap();
    assert_eq!(made.counts, [(Queued, 5)].into());
    s.create_call(
        new_call("c2", CallTarget::Agents(vec!["c".into()]), 50_000),
        100,
        &mut next,
    )
    .unwrap();
    assert_eq!(kept_counts(&s, "c1"), [(Queued, 5)].into());

    // Acks one by one, a jump over states, a late ack that changes nothing.
    let wa = wakeup_of(&s, "c1", "a");
    for (state, at) in [
        (Sent, 110),
        (Started, 120),
        (Finished, 130),
        (Delivered, 140),
    ] {
        s.advance_delivery(advance("a", &wa, state, at)).unwrap();
        kept_counts(&s, "c1");
    }
    let wb = wakeup_of(&s, "c1", "b");
    s.advance_delivery(advance("b", &wb, Delivered, 150))
        .unwrap();
    // One ack for a carrier moves what it carried, in another call.
    let carried = wakeup_of(&s, "c1", "c");
    let carrier = wakeup_of(&s, "c2", "c");
    s.set_carried_by(std::slice::from_ref(&carried), &carrier)
        .unwrap();
    let moved = s
        .advance_delivery(advance("c", &carrier, Sent, 160))
        .unwrap();
    assert_eq!(moved.len(), 2);
    assert_eq!(
        kept_counts(&s, "c1"),
        [(Queued, 2), (Sent, 1), (Delivered, 1), (Finished, 1)].into()
    );
    assert_eq!(kept_counts(&s, "c2"), [(Sent, 1)].into());
    // Several in one batch.
    s.advance_deliveries(vec![
        advance("b", &wb, Started, 170),
        advance("b", &wb, Finished, 171),
        advance("c", &carrier, Delivered, 172),
    ])
    .unwrap();
    assert_eq!(kept_counts(&s, "c2"), [(Delivered, 1)].into());

    // A removed agent's unfinished wake-ups fail.
    s.revoke_agent("d", 200).unwrap();
    assert_eq!(
        kept_counts(&s, "c1"),
        [(Queued, 1), (Delivered, 1), (Finished, 2), (Failed, 1)].into()
    );

    // Expiry: e's (queued) expires; c's (delivered) stays.
    assert_eq!(s.expire_due(10_000).unwrap().len(), 1);
    assert_eq!(
        kept_counts(&s, "c1"),
        [(Delivered, 1), (Finished, 2), (Expired, 1), (Failed, 1)].into()
    );
    // The totals are the calls' counts added up.
    let totals = s.count_deliveries().unwrap();
    let mut expected = [0u64; 7];
    for call in ["c1", "c2"] {
        for (state, n) in kept_counts(&s, call) {
            expected[CallState::ALL.iter().position(|x| *x == state).unwrap()] += u64::from(n);
        }
    }
    assert_eq!(totals, expected);
    assert_eq!(totals.iter().sum::<u64>(), 6);
}

#[test]
fn the_expiry_sweep_skips_settled_calls_and_sweeps_once() {
    use CallState::*;
    let s = common::store();
    s.create_enrollment_token(token(1, None, None)).unwrap();
    for id in ["a", "b"] {
        s.enroll_agent(&[1; 32], agent(id), 10).unwrap();
    }
    let mut next = ids();
    // Every wake-up of c1 finished before it expires: nothing of it is ever swept.
    s.create_call(new_call("c1", CallTarget::All, 1_000), 100, &mut next)
        .unwrap();
    for a in ["a", "b"] {
        let w = wakeup_of(&s, "c1", a);
        s.advance_delivery(advance(a, &w, Finished, 200)).unwrap();
    }
    // c2: one wake-up sent, one delivered.
    s.create_call(new_call("c2", CallTarget::All, 2_000), 100, &mut next)
        .unwrap();
    let w = wakeup_of(&s, "c2", "a");
    s.advance_delivery(advance("a", &w, Sent, 300)).unwrap();
    let w = wakeup_of(&s, "c2", "b");
    s.advance_delivery(advance("b", &w, Delivered, 300))
        .unwrap();

    assert!(s.expire_due(1_999).unwrap().is_empty(), "c1 is settled");
    let swept = s.expire_due(2_000).unwrap();
    assert_eq!(
        swept
            .iter()
            .map(|d| (d.call_id.as_str(), d.agent_id.as_str(), d.state))
            .collect::<Vec<_>>(),
        [("c2", "a", Expired)]
    );
    assert!(s.expire_due(3_000).unwrap().is_empty(), "swept once");
    assert_eq!(kept_counts(&s, "c1"), [(Finished, 2)].into());
    assert_eq!(kept_counts(&s, "c2"), [(Delivered, 1), (Expired, 1)].into());
}

#[test]
fn a_calls_deliveries_come_in_pages_that_join_up_and_filter_by_state() {
    let s = common::store();
    s.create_enrollment_token(token(1, None, None)).unwrap();
    let agents: Vec<String> = (0..12).map(|i| format!("p{i:02}")).collect();
    for id in &agents {
        s.enroll_agent(&[1; 32], agent(id), 10).unwrap();
    }
    s.create_call(new_call("c1", CallTarget::All, 100_000), 100, &mut ids())
        .unwrap();
    let page = |state: Option<CallState>, after: Option<&str>, limit: u32| {
        s.call_deliveries(
            "c1",
            &DeliveryQuery {
                state,
                after: after.map(String::from),
                limit,
            },
        )
        .unwrap()
    };
    // Every page in turn, by the next_after of the one before.
    let read_all = |state: Option<CallState>, limit: u32| {
        let mut seen = Vec::new();
        let mut sizes = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let p = page(state, after.as_deref(), limit);
            sizes.push(p.deliveries.len());
            seen.extend(p.deliveries.into_iter().map(|d| d.agent_id));
            match p.next_after {
                Some(n) => {
                    assert_eq!(Some(&n), seen.last(), "next_after is the page's last agent");
                    after = Some(n);
                }
                None => return (seen, sizes),
            }
        }
    };
    assert_eq!(read_all(None, 5), (agents.clone(), vec![5, 5, 2]));
    assert_eq!(read_all(None, 12), (agents.clone(), vec![12]));

    for a in ["p01", "p05", "p09"] {
        let w = wakeup_of(&s, "c1", a);
        s.advance_delivery(advance(a, &w, CallState::Sent, 200))
            .unwrap();
    }
    let (sent, _) = read_all(Some(CallState::Sent), 2);
    assert_eq!(sent, ["p01", "p05", "p09"]);
    let (queued, sizes) = read_all(Some(CallState::Queued), 4);
    assert_eq!(queued.len(), 9);
    assert_eq!(sizes, [4, 4, 1]);
    assert!(!queued.iter().any(|a| sent.contains(a)));
    assert_eq!(read_all(Some(CallState::Failed), 4), (vec![], vec![0]));

    // Limits are clamped: 0 reads as 1, anything above the most as the most.
    let one = page(None, None, 0);
    assert_eq!(one.deliveries.len(), 1);
    assert_eq!(one.next_after.as_deref(), Some("p00"));
    assert_eq!(page(None, None, u32::MAX).deliveries.len(), 12);
    // After the last agent: an empty last page.
    let past = page(None, Some("p11"), 5);
    assert!(past.deliveries.is_empty() && past.next_after.is_none());
    let err = s.call_deliveries("nope", &every()).unwrap_err();
    assert!(matches!(err, StoreError::NotFound { .. }), "{err}");
}

/// The queries the console runs every second or per event, planned by the database over
/// 100,000 finished deliveries and 20,000 agents (statistics taken): none reads the whole
/// deliveries or agents table, the expiry sweep reads the partial index of open calls, and
/// the dashboard's counts and the read of the agents recorded online read agents' indexes, and
/// the agents page's search reads the search index. Run with `--nocapture` to see
/// the plans (docs/console.md, "At scale").
#[test]
fn periodic_queries_read_no_whole_deliveries_table() {
    let dir = tempfile::tempdir().unwrap();
    let url = common::reopenable_database(dir.path());
    let open = || common::open_store(&url);
    drop(open());
    let numbers = |n: u32| {
        format!("WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i < {n})")
    };
    // 5,000 finished calls of 20 deliveries each, to 2,000 agents; one open call.
    common::execute_sql(
        &url,
        &format!(
            "INSERT INTO calls (id, created_at, created_by, reason, action, target, expires_at, spread, dispatcher, n_finished) {} SELECT 'call-' || i, i, 'test', 'filled', NULL, 'all', 1000 + i, 0, 'console', 20 FROM n",
            numbers(4_999)
        ),
    );
    common::execute_sql(
        &url,
        &format!(
            "INSERT INTO deliveries (wakeup_id, call_id, agent_id, state, queued_at, finished_at) {} SELECT 'w-' || i, 'call-' || (i / 20), 'agent-' || (i % 2000), 'finished', i, i + 1 FROM n",
            numbers(99_999)
        ),
    );
    common::execute_sql(
        &url,
        "INSERT INTO calls (id, created_at, created_by, reason, action, target, expires_at, spread, dispatcher, n_queued) VALUES ('call-open', 1, 'test', 'open', NULL, 'all', 1000000000000, 0, 'console', 1)",
    );
    common::execute_sql(
        &url,
        "INSERT INTO deliveries (wakeup_id, call_id, agent_id, state, queued_at) VALUES ('w-open', 'call-open', 'agent-1', 'queued', 1)",
    );
    // 20,000 agents: 1 in 100 online, 1 in 50 last seen long ago, the others offline.
    common::execute_sql(
        &url,
        &format!(
            "INSERT INTO agents (id, name, hostname, os, addresses, macs, enrolled_at, secret_hash, presence, presence_at) {} SELECT 'agent-' || i, 'agent-' || i, 'host-' || i, 'Debian 13', '[]', '[]', 10, '00', CASE WHEN i % 100 = 0 THEN 'online' ELSE 'offline' END, CASE WHEN i % 50 = 1 THEN 20 ELSE 2000000 END FROM n",
            numbers(19_999)
        ),
    );
    // On PostgreSQL the statistics and visibility map a database in use has (autovacuum).
    // A console never takes SQLite's statistics (ANALYZE): its plans are those without them.
    if let DatabaseUrl::Postgres(_) = &url {
        common::execute_sql(&url, "VACUUM ANALYZE");
    }
    let s = open();
    let plans = s.periodic_query_plans(1_000_000).unwrap();
    assert_eq!(plans.len(), 18);
    for (what, plan) in &plans {
        println!("{what}:\n{plan}\n");
        for line in plan.lines().map(str::trim) {
            let whole_sqlite = line.starts_with("SCAN d ")
                || line == "SCAN d"
                || line.starts_with("SCAN deliveries")
                || line == "SCAN agents"
                || line.starts_with("SCAN agents ")
                || line.starts_with("SCAN a ");
            let whole_postgres =
                line.contains("Seq Scan on deliveries") || line.contains("Seq Scan on agents");
            assert!(
                !whole_sqlite && !whole_postgres,
                "{what} reads the whole deliveries or agents table:\n{plan}"
            );
        }
    }
    for (what, index) in [
        (
            "dashboard (every 3 s) and metrics: agents online",
            "agent_counts",
        ),
        ("dashboard (every 3 s): stale agents", "agents_last_seen"),
        (
            "connecting to the broker: agents recorded online",
            "agents_presence",
        ),
    ] {
        let plan = &plans.iter().find(|(w, _)| *w == what).unwrap().1;
        assert!(plan.contains(index), "{what} reads {index}:\n{plan}");
    }
    // The search reads the search index (SQLite: the FTS5 table, then agents by rowid), not
    // the agents in name order.
    for what in [
        "agents page: search",
        "agents page: search among a presence",
    ] {
        let plan = &plans.iter().find(|(w, _)| *w == what).unwrap().1;
        let from_index = match &url {
            DatabaseUrl::Sqlite(_) => {
                plan.contains("SCAN agents_search VIRTUAL TABLE")
                    && plan.contains("SEARCH agents USING INTEGER PRIMARY KEY (rowid=?)")
            }
            DatabaseUrl::Postgres(_) => plan.contains("Bitmap Index Scan on agents_search"),
        };
        assert!(from_index, "{what} reads agents_search:\n{plan}");
        assert!(
            !plan.contains("agents_name"),
            "{what} walks no agents in name order:\n{plan}"
        );
    }
    let (_, sweep) = &plans[0];
    assert!(
        sweep.contains("calls_open"),
        "the expiry sweep reads the open calls' index:\n{sweep}"
    );
    assert!(!sweep.contains("SCAN calls") && !sweep.contains("Seq Scan on calls"));
    let plan_of = |what: &str| &plans.iter().find(|(w, _)| *w == what).unwrap().1;
    // Deliveries are kept: an ack looks up its own wake-up (and those it carried), not
    // every delivery the agent had.
    let ack = plan_of("an ack or PUBACK: the deliveries it moves");
    assert!(!ack.contains("deliveries_agent_state"), "{ack}");
    // The newest calls from the end of an index, not every call sorted; on SQLite also an
    // agent's latest Wake-on-LAN sends and the revoked certificates (PostgreSQL plans these
    // empty tables as it likes), and the token's user by name, not every user.
    let calls_page = plan_of("calls page: the latest calls");
    assert!(calls_page.contains("calls_created"), "{calls_page}");
    if let DatabaseUrl::Sqlite(_) = &url {
        for (what, index) in [
            ("calls page: the latest calls", "calls_created"),
            ("an agent's Wake-on-LAN history", "wol_sends_agent_id"),
            (
                "tenant file: revoked certificates",
                "agent_certificates_revoked",
            ),
        ] {
            let plan = plan_of(what);
            assert!(
                plan.contains(index) && !plan.contains("TEMP B-TREE"),
                "{what} reads {index} in order:\n{plan}"
            );
        }
        let token = plan_of("each API request with a token: the token");
        assert!(!token.contains("SCAN u"), "{token}");
    }
    // The recorder reads the calls being recorded only, not every call.
    let recorder = &plans
        .iter()
        .find(|(w, _)| w.starts_with("recorder"))
        .unwrap()
        .1;
    assert!(
        !recorder
            .lines()
            .any(|l| l.trim() == "SCAN c" || l.trim().starts_with("SCAN c "))
            && !recorder.contains("Seq Scan on calls"),
        "{recorder}"
    );
}

/// The migration that brought the kept counts fills them for the calls already stored:
/// a database taken back to the schema before it (counts and their indexes gone) opens with
/// each call's counts as its deliveries say.
#[test]
fn the_migration_to_kept_counts_counts_existing_calls() {
    use CallState::*;
    let dir = tempfile::tempdir().unwrap();
    let url = common::reopenable_database(dir.path());
    let open = || common::open_store(&url);
    let s = open();
    s.create_enrollment_token(token(1, None, None)).unwrap();
    for id in ["a", "b", "c"] {
        s.enroll_agent(&[1; 32], agent(id), 10).unwrap();
    }
    // Removed before the revocation feed existed: its migration lists it.
    s.enroll_agent(&[1; 32], agent_with_certificate("d", "0d", 1_000_000), 10)
        .unwrap();
    s.revoke_agent("d", 50).unwrap();
    s.create_call(new_call("c1", CallTarget::All, 100_000), 100, &mut ids())
        .unwrap();
    let w = wakeup_of(&s, "c1", "a");
    s.advance_delivery(advance("a", &w, Finished, 200)).unwrap();
    let w = wakeup_of(&s, "c1", "b");
    s.advance_delivery(advance("b", &w, Sent, 200)).unwrap();
    drop(s);

    // Back to the version before the kept counts (SQLite 7, PostgreSQL 5), without what the
    // versions after them added.
    common::step_back_before(&url, 8);

    let s = open();
    assert_eq!(
        kept_counts(&s, "c1"),
        [(Queued, 1), (Sent, 1), (Finished, 1)].into()
    );
    assert_eq!(
        s.call("c1").unwrap().targeted,
        3,
        "a call made before it counts its deliveries as its targeted agents"
    );
    assert!(
        s.expire_due(100_000).unwrap().len() == 2,
        "the open call is swept"
    );
    assert_eq!(
        presence_counts(&s),
        [0, 0, 3],
        "the agents' counts migration counts the live agents stored"
    );
    let feed = s.revocation_feed(0, 10, 100).unwrap();
    assert_eq!(feed_ids(&feed), ["d"]);
    s.revoke_agent("c", 300).unwrap();
    assert_eq!(presence_counts(&s), [0, 0, 2]);
    let next = s.revocation_feed(feed.next, 10, 100).unwrap();
    assert_eq!(
        feed_ids(&next),
        ["c"],
        "the counter continues after the migrated entries"
    );
}

/// `agent(id)` with a certificate of serial `serial` valid until `not_after`.
fn agent_with_certificate(id: &str, serial: &str, not_after: Millis) -> NewAgent {
    NewAgent {
        certificate: Some(CertificateRecord {
            serial: serial.into(),
            issued_at: 0,
            not_after,
        }),
        ..agent(id)
    }
}

/// The ids of a feed page, in order.
fn feed_ids(page: &RevocationPage) -> Vec<&str> {
    page.changes.iter().map(|c| c.id.as_str()).collect()
}

#[test]
fn the_revocation_feed_lists_removals_in_order_and_moves_changed_ids_to_the_end() {
    let s = common::store();
    s.create_enrollment_token(token(1, None, None)).unwrap();
    let day = 86_400_000;
    s.enroll_agent(&[1; 32], agent_with_certificate("a1", "0a", 10 * day), 10)
        .unwrap();
    s.enroll_agent(&[1; 32], agent_with_certificate("a2", "0b", 10 * day), 10)
        .unwrap();
    // Enrolled before certificates were recorded.
    s.enroll_agent(&[1; 32], agent("old"), 10).unwrap();
    let empty = s.revocation_feed(0, 10, 100).unwrap();
    assert_eq!((empty.changes.len(), empty.next, empty.more), (0, 0, false));

    s.revoke_agent("a2", 2_000).unwrap();
    s.revoke_agent("a1", 3_500).unwrap();
    s.revoke_agent("old", 4_000).unwrap();
    let page = s.revocation_feed(0, 10, 100).unwrap();
    assert_eq!(feed_ids(&page), ["a2", "a1", "old"]);
    assert!(!page.more);
    assert_eq!(page.next, page.changes[2].cursor);
    assert_eq!(
        page.changes[0].revoked,
        Some(RevokedCredentials {
            certificates: Some(vec![("0b".into(), 10 * day)]),
            revoked_at: Some(2_000),
        })
    );
    assert_eq!(
        page.changes[2].revoked,
        Some(RevokedCredentials {
            certificates: None,
            revoked_at: None,
        }),
        "an agent without a recorded certificate is revoked whole"
    );

    // One at a time: the pages join up, `more` says whether to ask again.
    let first = s.revocation_feed(0, 1, 100).unwrap();
    assert_eq!((feed_ids(&first), first.more), (vec!["a2"], true));
    let second = s.revocation_feed(first.next, 2, 100).unwrap();
    assert_eq!((feed_ids(&second), second.more), (vec!["a1", "old"], false));
    let after = s.revocation_feed(second.next, 10, 100).unwrap();
    assert_eq!((after.changes.len(), after.next), (0, second.next));

    // Enrolled again: both ids move to the end. a2's old certificate stays revoked; "old"
    // is not revoked any more.
    s.enroll_agent(
        &[1; 32],
        agent_with_certificate("a2", "0c", 10 * day),
        5_000,
    )
    .unwrap();
    s.enroll_agent(
        &[1; 32],
        agent_with_certificate("old", "0d", 10 * day),
        5_000,
    )
    .unwrap();
    let moved = s.revocation_feed(second.next, 10, 100).unwrap();
    assert_eq!(feed_ids(&moved), ["a2", "old"]);
    assert_eq!(
        moved.changes[0].revoked.as_ref().unwrap().certificates,
        Some(vec![("0b".into(), 10 * day)])
    );
    assert_eq!(moved.changes[1].revoked, None);
    assert_eq!(
        feed_ids(&s.revocation_feed(0, 10, 100).unwrap()),
        ["a1", "a2", "old"],
        "a reader from the start sees each id once, at its last change"
    );

    // Certificates past their end are not listed: nothing of a1 is refused any more.
    let later = s.revocation_feed(0, 10, 11 * day).unwrap();
    assert!(
        later.changes.iter().all(|c| c.revoked.is_none()),
        "{later:?}"
    );
}

#[test]
fn the_revocation_feed_comes_in_pages_without_gaps_or_repeats() {
    let s = common::store();
    s.create_enrollment_token(token(1, None, None)).unwrap();
    let n = 250;
    for i in 0..n {
        let id = format!("pc-{i:03}");
        s.enroll_agent(
            &[1; 32],
            agent_with_certificate(&id, &format!("{i:04x}"), 1_000_000),
            10,
        )
        .unwrap();
    }
    // Removed in an order unlike the ids'.
    let mut order: Vec<usize> = (0..n).map(|i| (i * 7) % n).collect();
    order.dedup();
    for (k, i) in order.iter().enumerate() {
        s.revoke_agent(&format!("pc-{i:03}"), 100 + k as i64)
            .unwrap();
    }
    let (mut seen, mut cursor, mut pages) = (Vec::new(), 0, 0);
    loop {
        let page = s.revocation_feed(cursor, 100, 50).unwrap();
        assert!(page.changes.iter().all(|c| c.cursor > cursor));
        seen.extend(page.changes.iter().map(|c| c.id.clone()));
        cursor = page.next;
        pages += 1;
        if !page.more {
            break;
        }
    }
    let want: Vec<String> = order.iter().map(|i| format!("pc-{i:03}")).collect();
    assert_eq!(seen, want, "every removal once, in the order of removal");
    assert_eq!(pages, 3);
}

#[test]
fn a_reader_of_the_feed_misses_no_removal_made_by_two_consoles_at_once() {
    use std::sync::Arc;
    let dir = tempfile::tempdir().unwrap();
    let url = common::reopenable_database(dir.path());
    let first = common::open_store(&url);
    first.create_enrollment_token(token(1, None, None)).unwrap();
    let n = 60;
    for i in 0..n {
        let id = format!("pc-{i}");
        first
            .enroll_agent(
                &[1; 32],
                agent_with_certificate(&id, &format!("{i:04x}"), 1_000_000),
                10,
            )
            .unwrap();
    }
    // Two consoles on one database remove agents at the same time while a broker reads.
    let stores = [Arc::new(first), Arc::new(common::open_store(&url))];
    let removers: Vec<_> = (0..2)
        .map(|k| {
            let s = stores[k].clone();
            std::thread::spawn(move || {
                for i in (k..n).step_by(2) {
                    s.revoke_agent(&format!("pc-{i}"), 100).unwrap();
                }
            })
        })
        .collect();
    let (mut seen, mut cursor) = (std::collections::BTreeSet::new(), 0);
    loop {
        let done = removers.iter().all(|r| r.is_finished());
        let page = stores[0].revocation_feed(cursor, 7, 50).unwrap();
        for c in &page.changes {
            assert!(seen.insert(c.id.clone()), "{} read twice", c.id);
        }
        cursor = page.next;
        if done && !page.more {
            break;
        }
    }
    for r in removers {
        r.join().unwrap();
    }
    assert_eq!(seen.len(), n, "every removal read once, none skipped");
}

/// The registry `beckon bench console` writes, and the agents page over it: a large group
/// (listed by walking the agents in name order) and a small one (its members, sorted) both
/// give their members in name order, a page at a time; the dashboard's counts and a seeded
/// call's kept counts are as written.
#[test]
fn a_seeded_registry_lists_large_and_small_groups_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let s = common::open_store(&common::reopenable_database(dir.path()));
    let now = 1_000_000_000_000;
    let plan = SeedPlan {
        agents: 30_000,
        wake_group: 15_000,
        calls: 2,
        deliveries_per_call: 100,
        now,
    };
    let report = s.seed_registry(&plan, &mut |_, _| {}).unwrap();
    assert_eq!(
        report,
        SeedReport {
            agents: 30_000,
            memberships: 45_000,
            calls: 2,
            deliveries: 200
        }
    );
    let err = s.seed_registry(&plan, &mut |_, _| {}).unwrap_err();
    assert!(matches!(err, StoreError::Conflict(_)), "{err}");

    // seed-wake: every other agent (15,000: the large form); seed-site-3: every tenth.
    for (group, members) in [
        ("seed-wake", (0..30_000).step_by(2).collect::<Vec<u32>>()),
        ("seed-site-3", (3..30_000).step_by(10).collect()),
    ] {
        let mut names: Vec<String> = members.iter().map(|i| format!("ws-{i}")).collect();
        names.sort();
        for offset in [0, 200, names.len() as u32 - 50] {
            let page = s
                .list_agents(&AgentFilter {
                    group: Some(group.into()),
                    limit: 100,
                    offset,
                    ..Default::default()
                })
                .unwrap();
            let got: Vec<&str> = page.iter().map(|a| a.name.as_str()).collect();
            let want: Vec<&str> = names
                .iter()
                .skip(offset as usize)
                .take(100)
                .map(String::as_str)
                .collect();
            assert_eq!(got, want, "{group} from {offset}");
            assert!(page.iter().all(|a| a.groups.iter().any(|g| g == group)));
        }
    }
    assert_eq!(s.count_agents(Presence::Online).unwrap(), 18_000);
    let stale_before = now - 30 * 24 * 3600 * 1000;
    assert_eq!(s.count_stale_agents(stale_before).unwrap(), 1_500);
    let call = s.call("seed-call-1").unwrap();
    let counts: Vec<(CallState, u32)> = call.counts.into_iter().collect();
    assert_eq!(
        counts,
        [
            (CallState::Finished, 85),
            (CallState::Expired, 10),
            (CallState::Failed, 5)
        ]
    );
}

/// Every agent of `call` with its delivery's state, checked to have one delivery each.
fn deliveries_by_agent(s: &SqlStore, call: &str) -> std::collections::BTreeMap<String, CallState> {
    let mut out = std::collections::BTreeMap::new();
    for d in s.call_deliveries(call, &every()).unwrap().deliveries {
        assert!(
            out.insert(d.agent_id.clone(), d.state).is_none(),
            "{} has two deliveries in {call}",
            d.agent_id
        );
    }
    out
}

#[test]
fn a_call_larger_than_a_chunk_is_recorded_a_chunk_at_a_time_with_each_agent_once() {
    use CallState::*;
    let s = common::store().with_call_chunk(4);
    s.create_enrollment_token(token(1, None, None)).unwrap();
    let agents: Vec<String> = (0..10).map(|i| format!("pc-{i:02}")).collect();
    for id in &agents {
        s.enroll_agent(&[1; 32], agent(id), 10).unwrap();
    }
    let mut next = ids();
    let (made, first) = s
        .create_call(new_call("big", CallTarget::All, 100_000), 100, &mut next)
        .unwrap();
    // The first chunk only, and the call says how many it addresses.
    assert_eq!(first.len(), 4);
    assert_eq!(made.targeted, 10);
    assert_eq!(made.counts, [(Queued, 4)].into());
    assert_eq!(kept_counts(&s, "big"), [(Queued, 4)].into());
    assert_eq!(s.calls_to_record(200).unwrap(), ["big"]);

    // Acks for the first chunk while the rest is recorded; an agent of a later chunk is
    // removed before its chunk is recorded; another joins after the call was made.
    s.advance_delivery(advance(&first[0].agent_id, &first[0].wakeup_id, Sent, 150))
        .unwrap();
    s.revoke_agent("pc-09", 160).unwrap();
    s.enroll_agent(&[1; 32], agent("pc-10"), 170).unwrap();

    let second = s.record_chunk("big", 200, &mut next).unwrap().unwrap();
    assert_eq!(second.queued.len(), 4);
    assert!(second.failed.is_empty());
    assert!(second.dispatched_here);
    assert_eq!(second.call.counts, [(Queued, 7), (Sent, 1)].into());
    s.advance_delivery(advance(
        &second.queued[0].agent_id,
        &second.queued[0].wakeup_id,
        Finished,
        210,
    ))
    .unwrap();
    let third = s.record_chunk("big", 300, &mut next).unwrap().unwrap();
    assert_eq!(third.queued.len(), 1);
    assert_eq!(third.failed.len(), 1, "the removed agent's delivery failed");
    assert_eq!(third.failed[0].agent_id, "pc-09");
    assert!(s.record_chunk("big", 300, &mut next).unwrap().is_none());
    assert!(s.calls_to_record(400).unwrap().is_empty());

    let stored = deliveries_by_agent(&s, "big");
    assert_eq!(
        stored.keys().cloned().collect::<Vec<_>>(),
        agents,
        "the agents of the moment the call was made, each once"
    );
    assert_eq!(stored["pc-09"], Failed);
    let counts = kept_counts(&s, "big");
    assert_eq!(
        counts,
        [(Queued, 7), (Sent, 1), (Finished, 1), (Failed, 1)].into()
    );
    assert_eq!(
        counts.values().sum::<u32>(),
        s.call("big").unwrap().targeted
    );
    // Its wake-ups expire with the call, those recorded late too.
    assert_eq!(s.expire_due(100_000).unwrap().len(), 8);
    assert_eq!(
        kept_counts(&s, "big"),
        [(Finished, 1), (Expired, 8), (Failed, 1)].into()
    );

    // A call within one chunk is one transaction, as before: nothing left to record.
    let (small, ds) = s
        .create_call(
            new_call("small", CallTarget::Agents(vec!["pc-01".into()]), 100_000),
            500,
            &mut next,
        )
        .unwrap();
    assert_eq!((small.targeted, ds.len()), (1, 1));
    assert!(s.calls_to_record(600).unwrap().is_empty());
}

#[test]
fn a_recording_cut_off_is_finished_after_a_restart_with_each_agent_once() {
    use CallState::*;
    let dir = tempfile::tempdir().unwrap();
    let url = common::reopenable_database(dir.path());
    let open = || common::open_store(&url).with_call_chunk(3);
    let s = open();
    s.create_enrollment_token(token(1, None, None)).unwrap();
    for i in 0..8 {
        s.enroll_agent(&[1; 32], agent(&format!("pc-{i}")), 10)
            .unwrap();
    }
    let mut next = ids();
    s.create_call(new_call("c1", CallTarget::All, 100_000), 100, &mut next)
        .unwrap();
    s.record_chunk("c1", 110, &mut next).unwrap().unwrap();
    // Killed after the second chunk: what it committed stays, the rest is still to record.
    drop(s);

    let s = open();
    assert_eq!(kept_counts(&s, "c1"), [(Queued, 6)].into());
    assert_eq!(s.calls_to_record(200).unwrap(), ["c1"]);
    let mut recorded = 0;
    while let Some(chunk) = s.record_chunk("c1", 200, &mut next).unwrap() {
        recorded += chunk.queued.len();
    }
    assert_eq!(recorded, 2);
    assert_eq!(deliveries_by_agent(&s, "c1").len(), 8);
    assert_eq!(kept_counts(&s, "c1"), [(Queued, 8)].into());
    assert!(s.calls_to_record(200).unwrap().is_empty());
}

//! Several consoles on one database: the dispatch lease and the takeover of a stopped
//! console's calls, delivery changes told to the other consoles, login sessions that work
//! (and end) on every console, and login throttles that count every console's failures. On
//! PostgreSQL when `BECKON_TEST_POSTGRES` is set (see common::store), else on one SQLite
//! file opened twice; the changes told to other consoles are PostgreSQL's only.
//! `crates/beckon/tests/consoles.rs` runs two console processes.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::http::StatusCode;
use beckon_console::model::*;
use beckon_console::store::*;

/// One database opened once per console of `ids` (as those consoles would), each store
/// working for its console, and where the database is.
fn consoles<const N: usize>(ids: [&str; N]) -> ([SqlStore; N], DatabaseUrl, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let url = common::reopenable_database(dir.path());
    let opening = url.clone();
    // The PostgreSQL client runs its own runtime: keep it off any test runtime.
    let stores = std::thread::spawn(move || [(); N].map(|()| opening.open().unwrap()))
        .join()
        .unwrap();
    let mut ids = ids.into_iter();
    let stores = stores.map(|s| s.for_console(ids.next().unwrap()));
    (stores, url, dir)
}

fn enroll(s: &SqlStore, ids: &[impl AsRef<str>]) {
    common::enroll_in_store(s, ids).unwrap();
}

fn call(id: &str, expires_at: Millis) -> NewCall {
    NewCall {
        id: id.into(),
        created_by: "user:admin".into(),
        reason: "test".into(),
        action: None,
        target: CallTarget::All,
        expires_at,
        spread: None,
        default_spread: (50, 60),
    }
}

fn wakeup_ids(prefix: &'static str) -> impl FnMut() -> String {
    let mut n = 0;
    move || {
        n += 1;
        format!("{prefix}{n}")
    }
}

const LEASE: Millis = 6_000;

#[test]
fn a_console_whose_lease_runs_out_loses_its_unfinished_calls_to_one_other_console() {
    // The fourth is b started again, later.
    let ([a, b, c, b_again], _, _dir) = consoles(["a", "b", "c", "b"]);
    enroll(&a, &["online", "offline", "done"]);
    a.set_presence(PresenceUpdate {
        agent_id: "online".into(),
        presence: Presence::Online,
        at: 500,
        path: None,
        remote_addr: None,
    })
    .unwrap();
    for s in [&a, &b, &c] {
        assert!(s.hold_lease(1_000, LEASE).unwrap());
    }
    let (_, deliveries) = a
        .create_call(call("c1", 100_000), 1_000, &mut wakeup_ids("w"))
        .unwrap();
    let done = deliveries.iter().find(|d| d.agent_id == "done").unwrap();
    a.advance_delivery(DeliveryAdvance {
        agent_id: "done".into(),
        wakeup_id: done.wakeup_id.clone(),
        state: CallState::Finished,
        update: DeliveryUpdate::default(),
        at: 1_100,
    })
    .unwrap();
    // An expired call is left alone.
    a.create_call(call("old", 2_000), 1_000, &mut wakeup_ids("x"))
        .unwrap();

    // The call is a's to send: b sees nothing pending for it.
    assert_eq!(a.pending_for_agent("online", 1_000).unwrap().len(), 2);
    assert!(b.pending_for_agent("online", 1_000).unwrap().is_empty());
    assert_eq!(a.agents_with_queued(1_000).unwrap().len(), 3);
    assert!(b.agents_with_queued(1_000).unwrap().is_empty());

    // While a renews, nobody takes its calls.
    assert!(a.hold_lease(5_000, LEASE).unwrap());
    assert_eq!(b.take_over_calls(10_999).unwrap(), Takeover::default());
    // a stops renewing: at its lease's end, the first console to look takes the call, with
    // the agents still waiting (not the one that finished), and the next finds nothing.
    assert!(b.hold_lease(11_000, LEASE).unwrap());
    assert!(c.hold_lease(11_000, LEASE).unwrap());
    let taken = b.take_over_calls(11_000).unwrap();
    assert_eq!(
        taken,
        Takeover {
            calls: vec![("c1".into(), Some("a".into()))],
            online: vec!["online".into()],
            offline: vec!["offline".into()],
        }
    );
    assert_eq!(c.take_over_calls(11_000).unwrap(), Takeover::default());
    assert_eq!(b.pending_for_agent("online", 11_000).unwrap().len(), 1);
    assert!(a.pending_for_agent("online", 11_000).unwrap().is_empty());
    assert!(c.pending_for_agent("online", 11_000).unwrap().is_empty());

    // A second process with b's id cannot hold b's lease while b renews it; once b's has
    // run out (b was killed and this is b started again), it can.
    assert!(b.hold_lease(15_000, LEASE).unwrap());
    assert!(!b_again.hold_lease(20_999, LEASE).unwrap());
    assert!(b_again.hold_lease(21_000, LEASE).unwrap());
    assert!(!b.hold_lease(21_500, LEASE).unwrap());
    // b started again keeps its calls: nobody takes over what its id still holds.
    assert_eq!(c.take_over_calls(22_000).unwrap(), Takeover::default());
    assert_eq!(
        b_again.pending_for_agent("online", 22_000).unwrap().len(),
        1
    );

    // The taken call's counts follow what its new console writes: an ack, then expiry.
    let (_, pending) = b_again
        .pending_for_agent("online", 22_000)
        .unwrap()
        .remove(0);
    b_again
        .advance_delivery(DeliveryAdvance {
            agent_id: "online".into(),
            wakeup_id: pending.wakeup_id,
            state: CallState::Delivered,
            update: DeliveryUpdate::default(),
            at: 22_100,
        })
        .unwrap();
    // offline's of c1, and the three of the old call, which nobody swept before.
    assert_eq!(b_again.expire_due(100_000).unwrap().len(), 4);
    assert_eq!(
        c.call("old").unwrap().counts,
        [(CallState::Expired, 3)].into()
    );
    let counts = a.call("c1").unwrap().counts;
    assert_eq!(
        counts,
        [
            (CallState::Delivered, 1),
            (CallState::Finished, 1),
            (CallState::Expired, 1)
        ]
        .into()
    );
}

#[test]
fn a_large_call_cut_off_mid_recording_is_finished_by_the_console_taking_it_over() {
    let ([a, b], _, _dir) = consoles(["a", "b"]);
    let (a, b) = (a.with_call_chunk(2), b.with_call_chunk(2));
    let agents: Vec<String> = (0..9).map(|i| format!("pc-{i}")).collect();
    enroll(&a, &agents);
    assert!(a.hold_lease(1_000, LEASE).unwrap());
    assert!(b.hold_lease(1_000, LEASE).unwrap());
    let mut next = wakeup_ids("w");
    a.create_call(call("big", 100_000), 1_000, &mut next)
        .unwrap();
    a.create_call(call("old", 3_000), 1_000, &mut next).unwrap();
    a.record_chunk("big", 1_100, &mut next).unwrap().unwrap();
    // a's calls are a's to record while it holds its lease.
    assert_eq!(a.calls_to_record(1_200).unwrap(), ["big", "old"]);
    assert!(b.calls_to_record(1_200).unwrap().is_empty());

    // a is killed mid-recording. b takes the call over and records the rest; a (were it
    // still running its last look) records nothing of a call no longer its own.
    assert!(b.hold_lease(11_000, LEASE).unwrap());
    let taken = b.take_over_calls(11_000).unwrap();
    assert_eq!(taken.calls, [("big".into(), Some("a".into()))]);
    assert_eq!(b.calls_to_record(11_000).unwrap(), ["big", "old"]);
    let refused = a.record_chunk("big", 11_000, &mut next).unwrap().unwrap();
    assert!(!refused.dispatched_here && refused.queued.is_empty());
    let mut queued = 0;
    while let Some(chunk) = b.record_chunk("big", 11_100, &mut next).unwrap() {
        assert!(chunk.dispatched_here);
        queued += chunk.queued.len();
    }
    assert_eq!(queued, 5);
    // The expired call nobody takes over is recorded by whoever looks (its wake-ups only
    // expire): two consoles at once, each chunk once.
    let mut turn = 0;
    loop {
        let s = if turn % 2 == 0 { &b } else { &a };
        turn += 1;
        if s.record_chunk("old", 11_200, &mut next).unwrap().is_none() {
            break;
        }
    }
    assert!(turn > 3, "both recorded chunks");
    assert!(b.calls_to_record(11_300).unwrap().is_empty());
    for id in ["big", "old"] {
        let page = b
            .call_deliveries(
                id,
                &DeliveryQuery {
                    limit: 100,
                    ..Default::default()
                },
            )
            .unwrap();
        let got: Vec<String> = page.deliveries.iter().map(|d| d.agent_id.clone()).collect();
        assert_eq!(got, agents, "{id}: one delivery per agent addressed");
        let call = b.call(id).unwrap();
        assert_eq!(call.counts.values().sum::<u32>(), call.targeted);
    }
}

/// Removes pc-3 while another session holds what `hold` locks (uncommitted), and runs
/// `meanwhile` once the removal waits for it; then commits the hold. Returns what
/// `meanwhile` returned, whether the removal waited for the hold, and whether `meanwhile`
/// waited for the removal. Nothing stays blocked: the hold is committed whatever happened
/// (or rolled back by unwinding) before the threads are joined.
fn remove_pc3_while_held<T: Send>(
    s: &SqlStore,
    server: &str,
    hold: &[String],
    meanwhile: impl FnOnce() -> T + Send,
) -> (T, bool, bool) {
    let mut holder = postgres::Client::connect(server, postgres::NoTls).unwrap();
    let mut watcher = postgres::Client::connect(server, postgres::NoTls).unwrap();
    let mut waiting_on_locks = || waiting_on_locks(&mut watcher);
    let mut held = holder.transaction().unwrap();
    for statement in hold {
        held.execute(statement.as_str(), &[]).unwrap();
    }
    let (revoked, result, removal_waited, waited) = std::thread::scope(|scope| {
        let revoke = scope.spawn(|| s.revoke_agent("pc-3", 2_000));
        let removal_waited = until(|| waiting_on_locks() == 1);
        let running = scope.spawn(meanwhile);
        // Ordered, it waits for the removal; unordered, it finishes meanwhile.
        let waited = removal_waited
            && until(|| running.is_finished() || waiting_on_locks() == 2)
            && !running.is_finished();
        held.commit().unwrap();
        (
            revoke.join().unwrap(),
            running.join().unwrap(),
            removal_waited,
            waited,
        )
    });
    revoked.unwrap();
    (result, removal_waited, waited)
}

/// On PostgreSQL an agent's revocation and the recording of a call to it run on separate
/// connections. The recording reads which agents are live; the revocation fails the agent's
/// unfinished deliveries. If each read before the other committed, the revoked agent kept a
/// queued delivery in the call (published to an agent the broker refuses, until it expired).
/// Here the revocation of pc-3 is held after its read of the deliveries (another session
/// holds the row of a call whose counts it must change) while `record` writes a call to it.
/// Returns what `record` returned and whether it waited for the revocation.
fn record_while_pc3_is_revoked<T: Send>(
    s: &SqlStore,
    server: &str,
    record: impl FnOnce() -> T + Send,
) -> (T, bool) {
    let hold = ["SELECT 1 FROM calls WHERE id = 'earlier' FOR UPDATE".to_owned()];
    let (recorded, _, waited) = remove_pc3_while_held(s, server, &hold, record);
    (recorded, waited)
}

/// The sessions of this test's database waiting for a lock.
fn waiting_on_locks(watcher: &mut postgres::Client) -> i64 {
    watcher
        .query_one(
            "SELECT COUNT(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'",
            &[],
        )
        .unwrap()
        .get(0)
}

/// On PostgreSQL a removal reads the agent's unfinished deliveries, then fails each in the
/// state it read. The dispatcher (another connection) may move one meanwhile, queued to
/// sent: that update then changed nothing, and the removed agent kept a `sent` delivery.
/// Here the move is held uncommitted across the removal's read.
#[test]
fn a_delivery_moved_while_its_agent_is_removed_fails_on_postgresql() {
    let (s, Some(server), _dir) = four_agents_called_earlier(4_096) else {
        return;
    };
    let (_, pending) = s.pending_for_agent("pc-3", 1_500).unwrap().remove(0);
    let moving = [
        format!(
            "UPDATE deliveries SET state = 'sent', sent_at = 1500 WHERE wakeup_id = '{}'",
            pending.wakeup_id
        ),
        "UPDATE calls SET n_queued = n_queued - 1, n_sent = n_sent + 1 WHERE id = 'earlier'"
            .to_owned(),
    ];
    let ((), held, _) = remove_pc3_while_held(&s, &server, &moving, || ());
    assert!(held, "the removal never waited for the moving delivery");
    assert!(states_of(&s, "earlier").contains(&("pc-3".into(), CallState::Failed)));
    let earlier = s.call("earlier").unwrap();
    assert_eq!(
        earlier.counts.get(&CallState::Sent),
        None,
        "{:?}",
        earlier.counts
    );
    assert_eq!(earlier.counts.values().sum::<u32>(), earlier.targeted);
}

/// Four agents, and a call "earlier" to all of them recorded (pc-3's revocation then changes
/// that call's counts); the database's server, or `None` on SQLite.
fn four_agents_called_earlier(chunk: usize) -> (SqlStore, Option<String>, tempfile::TempDir) {
    let ([s], url, dir) = consoles(["a"]);
    let s = s.with_call_chunk(chunk);
    enroll(&s, &["pc-0", "pc-1", "pc-2", "pc-3"]);
    let mut next = wakeup_ids("e");
    s.create_call(call("earlier", 100_000), 1_000, &mut next)
        .unwrap();
    while s
        .record_chunk("earlier", 1_000, &mut next)
        .unwrap()
        .is_some()
    {}
    let server = match url {
        DatabaseUrl::Postgres(server) => Some(server),
        DatabaseUrl::Sqlite(_) => {
            println!(
                "skipped: SQLite writes one transaction at a time; set BECKON_TEST_POSTGRES to run this test"
            );
            None
        }
    };
    (s, server, dir)
}

fn states_of(s: &SqlStore, call: &str) -> Vec<(String, CallState)> {
    let query = DeliveryQuery {
        limit: 100,
        ..Default::default()
    };
    let page = s.call_deliveries(call, &query).unwrap();
    page.deliveries
        .into_iter()
        .map(|d| (d.agent_id, d.state))
        .collect()
}

#[test]
fn an_agent_revoked_while_its_chunk_is_recorded_fails_in_that_call_on_postgresql() {
    let (s, Some(server), _dir) = four_agents_called_earlier(2) else {
        return;
    };
    // The first chunk (pc-0, pc-1) now, pc-2 and pc-3 left to record.
    s.create_call(call("big", 100_000), 1_100, &mut wakeup_ids("w"))
        .unwrap();
    let mut next = wakeup_ids("r");
    let (chunk, waited) =
        record_while_pc3_is_revoked(&s, &server, || s.record_chunk("big", 2_100, &mut next));
    let chunk = chunk.unwrap().unwrap();
    let ids = |d: &[CallDelivery]| d.iter().map(|d| d.agent_id.clone()).collect::<Vec<_>>();
    assert_eq!(ids(&chunk.queued), ["pc-2"]);
    assert_eq!(
        ids(&chunk.failed),
        ["pc-3"],
        "the revoked agent's delivery failed"
    );
    assert!(waited, "the recording did not wait for the revocation");
    assert!(states_of(&s, "big").contains(&("pc-3".into(), CallState::Failed)));
    assert!(s.pending_for_agent("pc-3", 3_000).unwrap().is_empty());
    let big = s.call("big").unwrap();
    assert_eq!(big.counts.values().sum::<u32>(), big.targeted);
}

#[test]
fn a_call_made_while_an_agent_is_revoked_does_not_address_it_on_postgresql() {
    let (s, Some(server), _dir) = four_agents_called_earlier(4_096) else {
        return;
    };
    let mut next = wakeup_ids("w");
    let (made, waited) = record_while_pc3_is_revoked(&s, &server, || {
        s.create_call(call("new", 100_000), 2_100, &mut next)
    });
    let (made, queued) = made.unwrap();
    assert_eq!(made.targeted, 3, "the revoked agent is not addressed");
    assert!(queued.iter().all(|d| d.agent_id != "pc-3"));
    assert!(waited, "the call did not wait for the revocation");
    assert!(
        states_of(&s, "new")
            .iter()
            .all(|(agent, _)| agent != "pc-3")
    );
    assert!(s.pending_for_agent("pc-3", 3_000).unwrap().is_empty());
}

/// Whether `condition` held within 20 s (looked at every 10 ms).
fn until(mut condition: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while std::time::Instant::now() < deadline {
        if condition() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

#[test]
fn calls_from_before_several_consoles_are_taken_by_the_first_console() {
    let ([a], url, _dir) = consoles(["a"]);
    enroll(&a, &["pc"]);
    a.create_call(call("c1", 100_000), 1_000, &mut wakeup_ids("w"))
        .unwrap();
    // As a database migrated from before dispatchers has it.
    assert_eq!(
        common::execute_sql(&url, "UPDATE calls SET dispatcher = NULL"),
        1
    );
    assert!(a.pending_for_agent("pc", 1_000).unwrap().is_empty());
    assert!(a.hold_lease(1_000, LEASE).unwrap());
    let taken = a.take_over_calls(1_000).unwrap();
    assert_eq!(taken.calls, vec![("c1".to_owned(), None)]);
    assert_eq!(a.pending_for_agent("pc", 1_000).unwrap().len(), 1);
}

#[test]
fn delivery_changes_reach_the_other_consoles_on_postgresql() {
    let ([a, b], url, _dir) = consoles(["a", "b"]);
    let postgres = matches!(url, DatabaseUrl::Postgres(_));
    // The recorder of large calls paces itself on SQLite's one connection only.
    assert_eq!(a.shares_one_connection(), !postgres);
    let a = Arc::new(a);
    let stop = Arc::new(AtomicBool::new(false));
    if !postgres {
        // One console per SQLite file: there is nobody to tell.
        a.follow_changes(&mut |_| panic!("no changes on SQLite"), &stop)
            .unwrap();
        println!(
            "skipped: changes told to other consoles are PostgreSQL's; set BECKON_TEST_POSTGRES to run this test"
        );
        return;
    }
    enroll(&b, &["pc"]);
    let (tx, rx) = std::sync::mpsc::channel();
    let follower = {
        let (a, stop) = (a.clone(), stop.clone());
        std::thread::spawn(move || {
            a.follow_changes(&mut |c| tx.send(c).unwrap(), &stop)
                .unwrap()
        })
    };
    // Listening takes a connection first.
    std::thread::sleep(Duration::from_millis(500));
    let (_, d) = b
        .create_call(call("c1", 100_000), 1_000, &mut wakeup_ids("w"))
        .unwrap();
    let advance = |s: &SqlStore, state, at| {
        s.advance_delivery(DeliveryAdvance {
            agent_id: "pc".into(),
            wakeup_id: d[0].wakeup_id.clone(),
            state,
            update: DeliveryUpdate::default(),
            at,
        })
        .unwrap()
    };
    assert_eq!(advance(&b, CallState::Sent, 1_100).len(), 1);
    let heard = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("b's change");
    assert_eq!(
        heard,
        vec![DeliveryChange {
            call_id: "c1".into(),
            agent_id: "pc".into(),
            state: CallState::Sent,
        }]
    );
    // a's own change is not told back to a (its own listeners heard of it already); the
    // same ack written by b after a changes nothing, so nothing is told twice.
    assert_eq!(advance(&a, CallState::Delivered, 1_200).len(), 1);
    assert!(advance(&b, CallState::Delivered, 1_200).is_empty());
    // Heard after a quiet while too.
    std::thread::sleep(Duration::from_millis(1_200));
    assert_eq!(advance(&b, CallState::Finished, 1_300).len(), 1);
    let heard = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("b's change");
    assert_eq!(heard[0].state, CallState::Finished, "{heard:?}");
    assert!(rx.recv_timeout(Duration::from_millis(300)).is_err());
    stop.store(true, Ordering::Relaxed);
    follower.join().unwrap();
}

#[tokio::test]
async fn a_session_works_on_every_console_and_ends_on_all_after_its_idle_time() {
    let dir = tempfile::tempdir().unwrap();
    let database = common::reopenable_database(dir.path());
    let idle = |c: &mut beckon_console::ConsoleConfig| {
        c.session_idle_timeout = Duration::from_millis(1500);
    };
    let shared = database.clone();
    let a = common::start_with(|c| {
        idle(c);
        c.database = Some(shared);
        c.console_id = "a".into();
    })
    .await;
    let b = common::start_with(|c| {
        idle(c);
        c.database = Some(database);
        c.console_id = "b".into();
    })
    .await;
    let password = a.handle.initial_admin_password.clone().unwrap();
    let status = |cookie: &str| common::with_cookie("GET", "/api/v1/status", cookie, None);

    let (s, headers, _) = a.raw(common::login("admin", &password)).await;
    assert_eq!(s, StatusCode::OK);
    let cookie = common::session_cookie(&headers);
    assert_eq!(b.raw(status(&cookie)).await.0, StatusCode::OK, "made on a");
    // Used on a for longer than the idle time: still alive on b.
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert_eq!(a.raw(status(&cookie)).await.0, StatusCode::OK);
    }
    assert_eq!(b.raw(status(&cookie)).await.0, StatusCode::OK, "used on a");
    // Unused for the idle time: ended on both.
    tokio::time::sleep(Duration::from_millis(1700)).await;
    let (s, _, body) = b.raw(status(&cookie)).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "{body}");
    assert!(body["error"].as_str().unwrap().contains("without use"));
    assert_eq!(a.raw(status(&cookie)).await.0, StatusCode::UNAUTHORIZED);
}

/// The login throttle counts the failures of every console on the database, and a console
/// started again still refuses: five wrong passwords for admin on a and five on b (each from
/// another address, so that only the user name's throttle holds) make the right password
/// wait on both, and on a started anew.
#[tokio::test]
async fn failed_logins_count_on_every_console_and_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let database = common::reopenable_database(dir.path());
    let start = |id: &'static str| {
        let database = database.clone();
        common::start_with(move |c| {
            c.database = Some(database);
            c.console_id = id.into();
        })
    };
    let a = start("a").await;
    let b = start("b").await;
    let password = a.handle.initial_admin_password.clone().unwrap();
    let login =
        |i: u8, password: &str| common::from([10, 0, 0, i], common::login("admin", password));

    for i in 0..5 {
        assert_eq!(a.raw(login(i, "wrong")).await.0, StatusCode::UNAUTHORIZED);
        assert_eq!(
            b.raw(login(10 + i, "wrong")).await.0,
            StatusCode::UNAUTHORIZED
        );
    }
    for console in [&a, &b] {
        let (s, headers, body) = console.raw(login(100, &password)).await;
        assert_eq!(s, StatusCode::TOO_MANY_REQUESTS, "{body}");
        let wait = common::retry_after(&headers);
        assert!((250..=300).contains(&wait), "{wait}");
    }
    // The tenth failure, on b, was audited once (the audit log is shared too).
    let (_, log) = a.call("GET", "/api/v1/audit?limit=100", None).await;
    let throttled: Vec<_> = log
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["what"] == "login.throttled")
        .collect();
    assert_eq!(throttled.len(), 1, "{log}");
    assert_eq!(throttled[0]["detail"]["by_user"], true);

    // a stops and starts again: the failures are still counted.
    a.handle.shutdown().await;
    let a = start("a").await;
    let (s, headers, body) = a.raw(login(101, &password)).await;
    assert_eq!(s, StatusCode::TOO_MANY_REQUESTS, "{body}");
    assert!(common::retry_after(&headers) > 0);
    // Behind the consoles' back, as if the window had passed (ten failures for the user
    // name, one for each of the ten addresses): the right password works.
    let aged = a.execute_sql("UPDATE auth_failures SET at = at - 300000");
    assert_eq!(aged, 20);
    assert_eq!(a.raw(login(101, &password)).await.0, StatusCode::OK);
    assert_eq!(b.raw(login(102, &password)).await.0, StatusCode::OK);
}

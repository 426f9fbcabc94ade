//! The agents' search (`GET /api/v1/agents?search=`): a case-insensitive substring of the id,
//! name, host name, addresses or MACs, read from the search index (SQLite's FTS5 trigram
//! table, PostgreSQL's pg_trgm index) from three characters on. Run on PostgreSQL too with
//! BECKON_TEST_POSTGRES.

mod common;

use beckon_console::model::*;
use beckon_console::store::*;

fn token() -> NewEnrollmentToken {
    NewEnrollmentToken {
        id: "t1".into(),
        hash: [1; 32],
        label: "test".into(),
        created_by: "test".into(),
        expires_at: None,
        max_uses: None,
        groups: vec![],
    }
}

/// An agent with the given name, host name, addresses and MACs.
fn machine(id: &str, name: &str, hostname: &str, addresses: &[&str], macs: &[&str]) -> NewAgent {
    let mut a = common::new_agent(id);
    a.name = name.into();
    a.inventory = inventory(hostname, addresses, macs);
    a
}

fn inventory(hostname: &str, addresses: &[&str], macs: &[&str]) -> Inventory {
    Inventory {
        hostname: hostname.into(),
        os: "Debian 13".into(),
        addresses: addresses
            .iter()
            .map(|a| AgentAddress {
                address: a.parse().unwrap(),
                prefix_len: 24,
            })
            .collect(),
        macs: macs.iter().map(|m| m.to_string()).collect(),
    }
}

fn found(s: &SqlStore, text: &str) -> Vec<String> {
    listed(
        s,
        AgentFilter {
            search: Some(text.into()),
            ..Default::default()
        },
    )
}

fn listed(s: &SqlStore, f: AgentFilter) -> Vec<String> {
    s.list_agents(&f)
        .unwrap()
        .into_iter()
        .map(|a| a.id)
        .collect()
}

/// What the search found before the index: the agents (by name, then id) with `text` a
/// substring of one column, ASCII letters in any case; the addresses and MACs as stored
/// (JSON).
fn reference(agents: &[Agent], text: &str) -> Vec<String> {
    let text = text.to_ascii_lowercase();
    let mut hits: Vec<&Agent> = agents
        .iter()
        .filter(|a| {
            [
                a.id.clone(),
                a.name.clone(),
                a.inventory.hostname.clone(),
                serde_json::to_string(&a.inventory.addresses).unwrap(),
                serde_json::to_string(&a.inventory.macs).unwrap(),
            ]
            .iter()
            .any(|column| column.to_ascii_lowercase().contains(&text))
        })
        .collect();
    hits.sort_by(|a, b| (&a.name, &a.id).cmp(&(&b.name, &b.id)));
    hits.into_iter().map(|a| a.id.clone()).collect()
}

fn registry() -> SqlStore {
    let s = common::store();
    s.create_enrollment_token(token()).unwrap();
    for a in [
        machine(
            "pc-0001",
            "Reception PC",
            "reception.corp.example",
            &["10.1.2.3"],
            &["aa:bb:cc:00:11:22"],
        ),
        machine(
            "pc-0002",
            "Büro Müller",
            "buero-mueller",
            &["10.1.2.30", "fe80::1"],
            &["AA:BB:CC:00:11:33"],
        ),
        machine(
            "srv_01",
            "100% uptime",
            "srv_01.corp.example",
            &["192.168.7.1"],
            &["de:ad:be:ef:00:01"],
        ),
        machine(
            "srvx01",
            "O'Brien's laptop",
            "obrien",
            &["192.168.7.2"],
            &["de:ad:be:ef:00:02"],
        ),
        machine(
            "lab-a\\b",
            "Lab \"quoted\" 日本語ホスト",
            "lab.example",
            &["172.16.0.9"],
            &[],
        ),
    ] {
        s.enroll_agent(&[1; 32], a, 10).unwrap();
    }
    s
}

/// Each column, any case, short and long text, and the characters `LIKE` and FTS5 give a
/// meaning to: found as before the index, taken literally.
#[test]
fn search_finds_a_substring_of_any_column_as_before() {
    let s = registry();
    let all = s.list_agents(&AgentFilter::default()).unwrap();
    assert_eq!(all.len(), 5);
    for (text, expected) in [
        // id, name, host name, address, MAC; any case.
        ("PC-000", &["pc-0002", "pc-0001"][..]),
        ("reception pc", &["pc-0001"]),
        ("CORP.EXAMPLE", &["srv_01", "pc-0001"]),
        ("10.1.2.3", &["pc-0002", "pc-0001"]),
        ("10.1.2.30", &["pc-0002"]),
        ("fe80::1", &["pc-0002"]),
        ("aa:bb:cc:00:11", &["pc-0002", "pc-0001"]),
        ("DE:AD:BE:EF:00:02", &["srvx01"]),
        // Unicode, as written (SQLite's LIKE folds ASCII letters only).
        ("büro", &["pc-0002"]),
        ("日本語", &["lab-a\\b"]),
        // `_` and `%` are themselves, not wildcards: srvx01 is not found by srv_01.
        ("srv_01", &["srv_01"]),
        ("v_0", &["srv_01"]),
        ("100%", &["srv_01"]),
        ("0% up", &["srv_01"]),
        // Quotes (SQL's and FTS5's) and the escape character.
        ("o'brien's", &["srvx01"]),
        ("\"quoted\"", &["lab-a\\b"]),
        ("a\\b", &["lab-a\\b"]),
        // Short text: looked for without the index, same results.
        // (Every agent's addresses hold `"prefix_len"`, as stored.)
        ("x", &["srv_01", "pc-0002", "lab-a\\b", "srvx01", "pc-0001"]),
        ("_", &["srv_01", "pc-0002", "lab-a\\b", "srvx01", "pc-0001"]),
        ("%", &["srv_01"]),
        ("'", &["srvx01"]),
        ("ü", &["pc-0002"]),
        ("PC", &["pc-0002", "pc-0001"]),
        // Nothing, and text spanning two columns (the name and the host name).
        ("nowhere", &[]),
        ("pcreception", &[]),
        ("laptopobrien", &[]),
    ] {
        assert_eq!(found(&s, text), expected, "search {text:?}");
        assert_eq!(
            found(&s, text),
            reference(&all, text),
            "search {text:?} as before"
        );
    }
    // Every substring of every column, up to five characters, as the reference says.
    let mut texts = std::collections::BTreeSet::new();
    for a in &all {
        for column in [&a.name, &a.inventory.hostname, &a.id] {
            let chars: Vec<char> = column.chars().collect();
            for len in 1..=5 {
                for w in chars.windows(len) {
                    texts.insert(w.iter().collect::<String>());
                }
            }
        }
    }
    for text in &texts {
        assert_eq!(found(&s, text), reference(&all, text), "search {text:?}");
    }
}

/// The index follows the registry: a renamed agent is found by its new name and not its old
/// one, an agent whose machine changed by its new host name and address, and a removed agent
/// not at all; one removed and enrolled again by its new values only.
#[test]
fn search_follows_renames_machine_changes_and_removals() {
    let s = registry();
    s.update_agent("pc-0001", Some("Front desk".into()), None)
        .unwrap();
    assert_eq!(found(&s, "front desk"), ["pc-0001"]);
    assert!(found(&s, "reception pc").is_empty());
    s.record_checkin(
        "pc-0001",
        Some(inventory("kiosk-7", &["10.9.9.9"], &["aa:bb:cc:99:99:99"])),
        false,
        100,
    )
    .unwrap();
    assert_eq!(found(&s, "kiosk-7"), ["pc-0001"]);
    assert_eq!(found(&s, "10.9.9.9"), ["pc-0001"]);
    assert_eq!(found(&s, "cc:99:99"), ["pc-0001"]);
    assert!(found(&s, "reception.corp").is_empty());
    assert!(found(&s, "10.1.2.3\"").is_empty());
    assert_eq!(found(&s, "10.1.2.3"), ["pc-0002"]);
    // The same machine again changes nothing.
    s.record_checkin(
        "pc-0001",
        Some(inventory("kiosk-7", &["10.9.9.9"], &["aa:bb:cc:99:99:99"])),
        false,
        200,
    )
    .unwrap();
    assert_eq!(found(&s, "kiosk"), ["pc-0001"]);

    s.revoke_agent("srv_01", 300).unwrap();
    assert!(
        found(&s, "srv_01").is_empty(),
        "a removed agent is not found"
    );
    assert_eq!(
        listed(
            &s,
            AgentFilter {
                search: Some("srv_01".into()),
                include_revoked: true,
                ..Default::default()
            }
        ),
        ["srv_01"],
        "unless removed agents are asked for"
    );
    // Enrolled again under its id (the removed row is deleted and a new one written).
    s.enroll_agent(
        &[1; 32],
        machine("srv_01", "Rebuilt", "rebuilt.example", &["10.7.7.7"], &[]),
        400,
    )
    .unwrap();
    assert_eq!(found(&s, "rebuilt"), ["srv_01"]);
    assert_eq!(found(&s, "srv_01"), ["srv_01"]);
    assert!(found(&s, "100% uptime").is_empty());
    assert!(found(&s, "192.168.7.1").is_empty());
}

/// A search combines with the other filters and pages in name order, whether few agents
/// match (read from the index) or many (SQLite walks the agents in name order past 10,000
/// index matches).
#[test]
fn search_pages_in_name_order_with_the_other_filters() {
    let dir = tempfile::tempdir().unwrap();
    let url = common::reopenable_database(dir.path());
    drop(common::open_store(&url));
    // 12,000 agents named bulk-N (with `a` in the names of the even ones), behind the store's
    // back as the bench seeds them: the triggers index them.
    common::execute_sql(
        &url,
        "INSERT INTO agents (id, name, hostname, os, addresses, macs, enrolled_at, secret_hash, presence) \
         WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i < 11999) \
         SELECT 'id-' || i, CASE WHEN i % 2 = 0 THEN 'bulka-' ELSE 'bulk-' END || i, 'host-' || i, 'Debian 13', '[]', '[]', 10, '00', \
         CASE WHEN i % 3 = 0 THEN 'online' ELSE 'offline' END FROM n",
    );
    let s = common::open_store(&url);
    s.create_group("few", "", 1).unwrap();
    for id in ["id-10", "id-11", "id-12", "id-1100"] {
        s.update_agent(id, None, Some(vec!["few".into()])).unwrap();
    }
    let page = |search: &str, presence: Option<Presence>, group: Option<&str>, offset| {
        listed(
            &s,
            AgentFilter {
                search: Some(search.into()),
                presence,
                group: group.map(str::to_owned),
                limit: 100,
                offset,
                ..Default::default()
            },
        )
    };
    // Many matches: every agent's name has "bulk".
    let names: Vec<String> = {
        let mut n: Vec<(String, String)> = (0..12_000)
            .map(|i| {
                let prefix = if i % 2 == 0 { "bulka-" } else { "bulk-" };
                (format!("{prefix}{i}"), format!("id-{i}"))
            })
            .collect();
        n.sort();
        n.into_iter().map(|(_, id)| id).collect()
    };
    assert_eq!(page("BULK", None, None, 0), names[..100]);
    assert_eq!(page("bulk", None, None, 5_000), names[5_000..5_100]);
    // Few matches: bulk-1100 .. bulk-1109 and bulka-11000 ..
    let expected: Vec<String> = names
        .iter()
        .filter(|id| {
            let i: u32 = id[3..].parse().unwrap();
            let prefix = if i.is_multiple_of(2) {
                "bulka-"
            } else {
                "bulk-"
            };
            let name = format!("{prefix}{i}");
            name.contains("-110")
        })
        .cloned()
        .collect();
    assert_eq!(expected.len(), 1 + 10 + 100);
    assert_eq!(page("-110", None, None, 0), expected[..100]);
    assert_eq!(page("-110", None, None, 100), expected[100..]);
    // With a presence or a group.
    let online: Vec<String> = expected
        .iter()
        .filter(|id| id[3..].parse::<u32>().unwrap() % 3 == 0)
        .cloned()
        .collect();
    assert_eq!(page("-110", Some(Presence::Online), None, 0), online);
    assert_eq!(page("-11", None, Some("few"), 0), ["id-11", "id-1100"]);
    assert_eq!(
        page("ulka-1", None, Some("few"), 0),
        ["id-10", "id-1100", "id-12"]
    );
}

/// The migration that brought the index fills it for the agents already stored: a database
/// taken back to the version before it (index gone) opens with every agent found.
#[test]
fn the_migration_to_the_search_index_indexes_existing_agents() {
    let dir = tempfile::tempdir().unwrap();
    let url = common::reopenable_database(dir.path());
    let s = common::open_store(&url);
    s.create_enrollment_token(token()).unwrap();
    s.enroll_agent(
        &[1; 32],
        machine("old-1", "Old timer", "old.example", &["10.3.3.3"], &[]),
        10,
    )
    .unwrap();
    drop(s);
    common::step_back_before(&url, 11);
    let s = common::open_store(&url);
    assert_eq!(found(&s, "OLD TIMER"), ["old-1"]);
    assert_eq!(found(&s, "10.3.3"), ["old-1"]);
}

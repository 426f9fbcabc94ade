//! The console's revocation feed (`[[revocation_feed]]`, docs/tenants.md): the broker polls
//! `GET /api/v1/revocations?after=<cursor>` of a tenant's console, keeps what it learns in
//! memory beside the tenant file's `[[revoked]]` entries, refuses those credentials at
//! CONNECT and closes the live connections that hold one.
//!
//! The logic is plain and tested on its own: [`parse_page`] checks a page, [`FeedRevocations`]
//! keeps the entries and says what they refuse, [`LogLimit`] spaces out the complaints about
//! a console that does not answer. [`feed_loop`] is the thin tokio loop around them.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use beckon_identity::{Credential, Role, canonical_serial, validate_id};
use beckon_net::http::{HttpClient, Request, Url};
use serde::Deserialize;
use tokio::sync::{mpsc, watch};

use crate::core_task::Event;
use crate::metrics::Metrics;
use crate::tenancy::{Tenancy, unix_now};

/// Entries asked for per request (the console's largest page).
pub(crate) const PAGE_LIMIT: u32 = 10_000;

/// Largest answer accepted: a full page with room to spare.
pub(crate) const MAX_PAGE_BYTES: usize = 32 * 1024 * 1024;

/// Longest a request may take, connection included.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// How often a failing feed is complained about, at most.
const LOG_EVERY: Duration = Duration::from_secs(60);

/// What an entry of the feed refuses of one identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FeedRevocation {
    /// Revoked certificates (canonical serial, end of validity in unix seconds); `None`: every
    /// certificate of the identity.
    pub(crate) certificates: Option<Vec<(String, i64)>>,
    /// Tokens issued at or before this time (unix seconds) are refused; `None`: every token.
    pub(crate) tokens_issued_until: Option<i64>,
}

impl FeedRevocation {
    /// Whether this entry refuses `credential` at `now` (unix seconds). Once every listed
    /// certificate has expired the entry refuses nothing, as the console's tenant file drops
    /// it then (an expired certificate is refused anyway).
    pub(crate) fn revokes(&self, credential: Credential<'_>, now: i64) -> bool {
        if let Some(list) = &self.certificates
            && !list.is_empty()
            && list.iter().all(|(_, not_after)| *not_after < now)
        {
            return false;
        }
        match credential {
            Credential::Certificate(serial) => self
                .certificates
                .as_ref()
                .is_none_or(|list| list.iter().any(|(s, _)| s == serial)),
            Credential::Token(iat) => self.tokens_issued_until.is_none_or(|until| iat <= until),
        }
    }
}

/// One checked entry of a page: the identity and what is refused of it now (`None`: nothing,
/// forget earlier entries).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FeedChange {
    pub(crate) role: Role,
    pub(crate) id: String,
    pub(crate) revocation: Option<FeedRevocation>,
}

/// A checked page of the feed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FeedPage {
    pub(crate) changes: Vec<FeedChange>,
    /// The cursor to ask from next.
    pub(crate) next: u64,
    /// More entries follow at once.
    pub(crate) more: bool,
}

#[derive(Deserialize)]
struct WirePage {
    revocations: Vec<WireEntry>,
    next: u64,
    more: bool,
}

#[derive(Deserialize)]
struct WireEntry {
    cursor: u64,
    role: String,
    id: String,
    revoked: bool,
    certificates: Option<Vec<WireCertificate>>,
    tokens_issued_until: Option<i64>,
}

#[derive(Deserialize)]
struct WireCertificate {
    serial: String,
    not_after: i64,
}

/// Checks a page the console answered to `?after=<after>`: JSON of the documented shape,
/// entries after `after` in rising cursor order, valid roles, ids and serials. A page with
/// any fault is refused whole (the error says which entry), so that nothing known is lost
/// to a half-read page.
pub(crate) fn parse_page(body: &[u8], after: u64) -> Result<FeedPage, String> {
    let wire: WirePage = serde_json::from_slice(body)
        .map_err(|e| format!("the answer is not a revocation feed page: {e}"))?;
    let mut last = after;
    let mut changes = Vec::with_capacity(wire.revocations.len());
    for (i, entry) in wire.revocations.into_iter().enumerate() {
        let at = |what: String| format!("revocations[{i}]: {what}");
        if entry.cursor <= last {
            return Err(at(format!(
                "cursor {} does not follow {last}: entries must come after the cursor asked, in rising order",
                entry.cursor
            )));
        }
        last = entry.cursor;
        let role: Role = entry.role.parse().map_err(|e| at(format!("role: {e}")))?;
        validate_id(&entry.id).map_err(|e| at(format!("id: {e}")))?;
        let revocation = if entry.revoked {
            let certificates = match entry.certificates {
                None => None,
                Some(list) => Some(
                    list.into_iter()
                        .map(|c| {
                            canonical_serial(&c.serial)
                                .map(|s| (s, c.not_after))
                                .ok_or_else(|| {
                                    at(format!("{:?} is not a certificate serial", c.serial))
                                })
                        })
                        .collect::<Result<Vec<_>, _>>()?,
                ),
            };
            Some(FeedRevocation {
                certificates,
                tokens_issued_until: entry.tokens_issued_until,
            })
        } else {
            None
        };
        changes.push(FeedChange {
            role,
            id: entry.id,
            revocation,
        });
    }
    if wire.next < last {
        return Err(format!(
            "next ({}) is before the last entry's cursor ({last})",
            wire.next
        ));
    }
    if wire.more && wire.next == after {
        return Err("more entries are announced but the cursor does not move".to_owned());
    }
    Ok(FeedPage {
        changes,
        next: wire.next,
        more: wire.more,
    })
}

/// What one tenant's feed refuses, by role and id.
#[derive(Debug, Default)]
pub(crate) struct FeedRevocations {
    entries: HashMap<(Role, String), FeedRevocation>,
}

impl FeedRevocations {
    /// Applies a page's changes in order (a later entry of an identity replaces an earlier
    /// one); returns the identities that now have something refused.
    pub(crate) fn apply(&mut self, changes: Vec<FeedChange>) -> Vec<(Role, String)> {
        let mut revoked = Vec::new();
        for change in changes {
            let key = (change.role, change.id);
            match change.revocation {
                Some(r) => {
                    if self.entries.get(&key) != Some(&r) {
                        revoked.push(key.clone());
                    }
                    self.entries.insert(key, r);
                }
                None => {
                    self.entries.remove(&key);
                }
            }
        }
        revoked
    }

    /// The entry of an identity, if it refuses `credential` at `now`.
    pub(crate) fn revokes(
        &self,
        role: Role,
        id: &str,
        credential: Credential<'_>,
        now: i64,
    ) -> bool {
        self.entries
            .get(&(role, id.to_owned()))
            .is_some_and(|r| r.revokes(credential, now))
    }

    /// How many identities have an entry.
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }
}

/// Spaces out log lines about a failing feed: the first failure, then one a minute saying
/// how many were left out; and one line when it works again.
#[derive(Debug, Default)]
pub(crate) struct LogLimit {
    failing: bool,
    last: Option<Instant>,
    left_out: u64,
}

impl LogLimit {
    /// A failure at `now`: `Some(left out since the last line)` when it should be logged.
    pub(crate) fn failure(&mut self, now: Instant) -> Option<u64> {
        self.failing = true;
        if self.last.is_some_and(|t| now.duration_since(t) < LOG_EVERY) {
            self.left_out += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.left_out))
    }

    /// A success: whether it ends a run of failures (worth a line).
    pub(crate) fn success(&mut self) -> bool {
        let recovered = self.failing;
        *self = Self::default();
        recovered
    }
}

/// Where one tenant's feed is read from.
#[derive(Debug, Clone)]
pub(crate) struct FeedSource {
    pub(crate) tenant: String,
    /// `.../api/v1/revocations` of the console.
    pub(crate) url: Url,
    /// The file holding the API token, read at each poll (so that it can be replaced).
    pub(crate) token_file: PathBuf,
    pub(crate) client: HttpClient,
    pub(crate) interval: Duration,
}

impl FeedSource {
    /// Reads one page after `after`.
    async fn fetch(&self, after: u64) -> Result<FeedPage, String> {
        let token = tokio::fs::read_to_string(&self.token_file)
            .await
            .map_err(|e| {
                format!(
                    "cannot read the API token file {}: {e}",
                    self.token_file.display()
                )
            })?;
        let token = token.trim();
        if token.is_empty() {
            return Err(format!(
                "the API token file {} is empty",
                self.token_file.display()
            ));
        }
        let url = self.url.with_path(&format!(
            "{}?after={after}&limit={PAGE_LIMIT}",
            self.url.path
        ));
        let request = Request::get().header("authorization", &format!("Bearer {token}"));
        let answer = self
            .client
            .request(&url, request, REQUEST_TIMEOUT)
            .await
            .map_err(|e| e.to_string())?;
        if answer.status != 200 {
            return Err(format!(
                "{} answered {}: {}",
                self.url,
                answer.status,
                answer.error_message()
            ));
        }
        parse_page(&answer.body, after).map_err(|e| format!("{}: {e}", self.url))
    }
}

/// Polls one tenant's feed until shutdown: pages follow each other at once while `more`,
/// then every `interval`. A failure keeps every revocation known and is retried at the next
/// interval; a restart reads the feed from the beginning.
pub(crate) async fn feed_loop(
    source: FeedSource,
    tenancy: Arc<Tenancy>,
    events: mpsc::Sender<Event>,
    metrics: Arc<Metrics>,
    mut shutdown: watch::Receiver<bool>,
) {
    let tenant = source.tenant.clone();
    let mut cursor = 0;
    let mut log = LogLimit::default();
    tracing::info!(tenant = %tenant, url = %source.url, interval = ?source.interval, "following the console's revocation feed");
    loop {
        let mut more = false;
        match source.fetch(cursor).await {
            Ok(page) => {
                if log.success() {
                    tracing::info!(tenant = %tenant, url = %source.url, "the revocation feed answers again");
                }
                let read = page.changes.len();
                cursor = page.next;
                more = page.more;
                let (closed, known) = tenancy.apply_feed(&tenant, page.changes, unix_now());
                metrics.revocation_feed_read(&tenant, known);
                if read > 0 {
                    tracing::info!(tenant = %tenant, entries = read, known, cursor, "revocation feed read");
                }
                if !closed.is_empty() && events.send(Event::Revoked(closed)).await.is_err() {
                    return;
                }
            }
            Err(e) => {
                metrics.revocation_feed_failed(&tenant);
                if let Some(left_out) = log.failure(Instant::now()) {
                    tracing::warn!(tenant = %tenant, error = %e, similar_failures_not_logged = left_out, "cannot read the console's revocation feed; the revocations already known stay in force, retrying");
                }
            }
        }
        if more {
            continue;
        }
        tokio::select! {
            _ = tokio::time::sleep(source.interval) => {}
            _ = shutdown.changed() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn page(v: serde_json::Value, after: u64) -> Result<FeedPage, String> {
        parse_page(v.to_string().as_bytes(), after)
    }

    fn entry(cursor: u64, id: &str, serials: &[&str], until: i64) -> serde_json::Value {
        let certificates: Vec<_> = serials
            .iter()
            .map(|s| json!({"serial": s, "not_after": 2_000_000_000}))
            .collect();
        json!({"cursor": cursor, "role": "agent", "id": id, "revoked": true,
               "certificates": certificates, "tokens_issued_until": until})
    }

    #[test]
    fn a_page_is_checked_whole() {
        let good = page(
            json!({"revocations": [entry(3, "pc-1", &["0A:1b"], 100), entry(5, "pc-2", &[], 100)], "next": 5, "more": false}),
            2,
        )
        .expect("good page");
        assert_eq!(good.next, 5);
        assert_eq!(
            good.changes[0].revocation.as_ref().unwrap().certificates,
            Some(vec![("0a1b".to_owned(), 2_000_000_000)]),
            "serials are kept canonical"
        );
        let bad = [
            (json!("garbage"), "not a revocation feed page"),
            (
                json!({"revocations": [entry(2, "pc-1", &[], 1)], "next": 2, "more": false}),
                "does not follow 2",
            ),
            (
                json!({"revocations": [entry(4, "pc-1", &[], 1), entry(3, "pc-2", &[], 1)], "next": 4, "more": false}),
                "revocations[1]",
            ),
            (
                json!({"revocations": [entry(4, "pc/1", &[], 1)], "next": 4, "more": false}),
                "id",
            ),
            (
                json!({"revocations": [entry(4, "pc-1", &["xyz"], 1)], "next": 4, "more": false}),
                "not a certificate serial",
            ),
            (
                json!({"revocations": [{"cursor": 4, "role": "robot", "id": "pc-1", "revoked": true}], "next": 4, "more": false}),
                "role",
            ),
            (
                json!({"revocations": [entry(4, "pc-1", &[], 1)], "next": 3, "more": false}),
                "before the last",
            ),
            (
                json!({"revocations": [], "next": 2, "more": true}),
                "does not move",
            ),
        ];
        for (body, want) in bad {
            let e = page(body.clone(), 2).expect_err(&body.to_string());
            assert!(e.contains(want), "{body}: {e}");
        }
        let raw = parse_page(b"<html>502 Bad Gateway</html>", 0).unwrap_err();
        assert!(raw.contains("not a revocation feed page"), "{raw}");
    }

    #[test]
    fn entries_replace_earlier_ones_and_say_what_they_refuse() {
        let mut feed = FeedRevocations::default();
        let now = 1_000;
        let p = page(
            json!({"revocations": [entry(1, "pc-1", &["0a"], 500), entry(2, "pc-2", &["0b"], 500)], "next": 2, "more": false}),
            0,
        )
        .unwrap();
        let revoked = feed.apply(p.changes);
        assert_eq!(revoked.len(), 2);
        let cert = |s| Credential::Certificate(s);
        assert!(feed.revokes(Role::Agent, "pc-1", cert("0a"), now));
        assert!(
            !feed.revokes(Role::Agent, "pc-1", cert("0c"), now),
            "a new certificate of the id connects"
        );
        assert!(
            !feed.revokes(Role::Server, "pc-1", cert("0a"), now),
            "roles are apart"
        );
        assert!(feed.revokes(Role::Agent, "pc-1", Credential::Token(500), now));
        assert!(!feed.revokes(Role::Agent, "pc-1", Credential::Token(501), now));
        // A later entry of pc-1 replaces the first; one that says "not revoked" removes it.
        let p = page(
            json!({"revocations": [entry(3, "pc-1", &["0a", "0c"], 700),
                   {"cursor": 4, "role": "agent", "id": "pc-2", "revoked": false, "certificates": [], "tokens_issued_until": null}],
                   "next": 4, "more": false}),
            2,
        )
        .unwrap();
        let revoked = feed.apply(p.changes);
        assert_eq!(revoked, vec![(Role::Agent, "pc-1".to_owned())]);
        assert!(feed.revokes(Role::Agent, "pc-1", cert("0c"), now));
        assert!(!feed.revokes(Role::Agent, "pc-2", cert("0b"), now));
        assert_eq!(feed.len(), 1);
        // Everything of the id; and nothing once every listed certificate has expired.
        let whole = FeedRevocation {
            certificates: None,
            tokens_issued_until: None,
        };
        assert!(whole.revokes(cert("ff"), now) && whole.revokes(Credential::Token(i64::MAX), now));
        let expired = FeedRevocation {
            certificates: Some(vec![("0a".into(), now - 1)]),
            tokens_issued_until: Some(now),
        };
        assert!(!expired.revokes(Credential::Token(now - 10), now));
    }

    #[test]
    fn a_failing_feed_is_logged_once_a_minute_and_its_recovery_once() {
        let mut log = LogLimit::default();
        let t0 = Instant::now();
        assert_eq!(log.failure(t0), Some(0));
        for s in 1..12 {
            assert_eq!(log.failure(t0 + Duration::from_secs(s * 5)), None);
        }
        assert_eq!(log.failure(t0 + Duration::from_secs(61)), Some(11));
        assert!(log.success());
        assert!(!log.success());
        assert_eq!(log.failure(t0 + Duration::from_secs(62)), Some(0));
    }

    /// A console stand-in answering each request with the next of `answers` (status, body).
    async fn console(answers: Vec<(u16, String)>) -> Url {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = Url::parse(&format!(
            "http://{}/api/v1/revocations",
            listener.local_addr().expect("addr")
        ))
        .expect("url");
        tokio::spawn(async move {
            for (status, body) in answers {
                let Ok((mut tcp, _)) = listener.accept().await else {
                    return;
                };
                let mut request = vec![0u8; 4096];
                let _ = tcp.read(&mut request).await;
                let answer = format!(
                    "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = tcp.write_all(answer.as_bytes()).await;
            }
        });
        url
    }

    #[tokio::test]
    async fn a_failing_console_gives_errors_that_say_what_it_answered() {
        let dir = tempfile::tempdir().expect("tempdir");
        let token_file = dir.path().join("token");
        std::fs::write(&token_file, "bkt_x\n").expect("token");
        let good = json!({"revocations": [entry(1, "pc-1", &["0a"], 5)], "next": 1, "more": false});
        let url = console(vec![
            (
                500,
                r#"{"error":"the console could not read its database"}"#.into(),
            ),
            (401, r#"{"error":"the API token is not valid"}"#.into()),
            (200, "<html>garbage</html>".into()),
            (200, good.to_string()),
        ])
        .await;
        let source = FeedSource {
            tenant: "acme".into(),
            url,
            token_file: token_file.clone(),
            client: HttpClient::new(beckon_net::http::HttpSettings::default()),
            interval: Duration::from_secs(1),
        };
        for want in [
            "500: the console could not read its database",
            "401: the API token is not valid",
            "not a revocation feed page",
        ] {
            let e = source.fetch(0).await.expect_err(want);
            assert!(e.contains(want), "{e}");
        }
        let page = source.fetch(0).await.expect("good page");
        assert_eq!(page.changes.len(), 1);
        let missing = FeedSource {
            token_file: dir.path().join("nothing"),
            ..source
        };
        let e = missing.fetch(0).await.expect_err("no token file");
        assert!(e.contains("cannot read the API token file"), "{e}");
    }

    #[test]
    fn a_hundred_thousand_entries_are_held_and_looked_up_quickly() {
        let mut feed = FeedRevocations::default();
        let changes: Vec<FeedChange> = (0..100_000u32)
            .map(|i| FeedChange {
                role: Role::Agent,
                id: format!("pc-{i}"),
                revocation: Some(FeedRevocation {
                    certificates: Some(vec![(format!("{i:08x}"), 2_000_000_000)]),
                    tokens_issued_until: Some(1_000),
                }),
            })
            .collect();
        assert_eq!(feed.apply(changes).len(), 100_000);
        let started = Instant::now();
        for i in (0..100_000u32).step_by(7) {
            assert!(feed.revokes(
                Role::Agent,
                &format!("pc-{i}"),
                Credential::Certificate(&format!("{i:08x}")),
                1_000
            ));
        }
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
    }
}

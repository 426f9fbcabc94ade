//! `beckon agent status`: what the state folder says, in plain words. Reads the file only; it
//! never talks to the running agent, so it works whether the agent is up or not.

use std::fmt::Write as _;
use std::path::Path;

use crate::platform::process_alive;
use crate::state::{AgentState, IdentityConflict, STATE_FILE, StateError};
use crate::timefmt::{format_rfc3339, unix_now};

/// `3m 20s ago` style age.
fn age(at: i64, now: i64) -> String {
    let secs = (now - at).max(0);
    let text = match secs {
        0..60 => format!("{secs}s"),
        60..3600 => format!("{}m {}s", secs / 60, secs % 60),
        3600..86_400 => format!("{}h {}m", secs / 3600, (secs / 60) % 60),
        _ => format!("{}d {}h", secs / 86_400, (secs / 3600) % 24),
    };
    format!("{} ({text} ago)", format_rfc3339(at))
}

/// The status text for a state folder.
pub fn status_text(state_dir: &Path) -> Result<String, StateError> {
    let Some(state) = AgentState::read(state_dir)? else {
        return Ok(format!(
            "Agent:        never ran here (no {STATE_FILE} in {})\n",
            state_dir.display()
        ));
    };
    let mut text = render(&state, unix_now(), state.pid.is_some_and(process_alive));
    text.push_str(&certificate_line(&state_dir.join("agent.pem"), unix_now()));
    Ok(text)
}

/// `Certificate:` with its end and when renewal starts, for an enrolled agent's
/// `agent.pem`; empty when there is none.
pub fn certificate_line(cert: &Path, now: i64) -> String {
    if !cert.exists() {
        return String::new();
    }
    match crate::renew::certificate_validity(cert) {
        Ok(v) => {
            let due = crate::renew::renewal_due_at(v);
            let state = if v.not_after < now {
                "EXPIRED: enroll again (beckon agent enroll --force)"
            } else if due <= now {
                "renewal due: the running agent renews it through the console"
            } else {
                "renewed automatically when a third of its lifetime is left"
            };
            format!(
                "Certificate:  valid until {}, renewal from {} ({state})\n",
                format_rfc3339(v.not_after),
                format_rfc3339(due)
            )
        }
        Err(e) => format!("Certificate:  {e}\n"),
    }
}

/// The status as JSON: the state plus whether the agent process is running.
pub fn status_json(state_dir: &Path) -> Result<String, StateError> {
    let state = AgentState::read(state_dir)?.unwrap_or_default();
    let running = state.pid.is_some_and(process_alive);
    let mut value = serde_json::to_value(&state).unwrap_or_default();
    if let Some(map) = value.as_object_mut() {
        map.remove("replay_guard");
        map.insert("running".into(), running.into());
        map.insert("connected".into(), (running && state.connected).into());
    }
    Ok(serde_json::to_string_pretty(&value).unwrap_or_default())
}

/// What the agent does about another machine with its identity, and the fix.
pub fn identity_conflict_text(c: &IdentityConflict, now: i64) -> String {
    let window = match c.window_secs {
        s if s >= 3600 && s % 3600 == 0 => format!("{}h", s / 3600),
        s if s >= 60 && s % 60 == 0 => format!("{}m", s / 60),
        s => format!("{s}s"),
    };
    let wait = if c.paused_until > now {
        format!("not reconnecting until {}", format_rfc3339(c.paused_until))
    } else {
        "reconnecting after a pause; one more takeover pauses again".to_owned()
    };
    format!(
        "IN USE ON ANOTHER MACHINE: the push session was taken over {} times within {window} by another connection with this agent's id (a copied state folder or disk image); {wait}. Fix: on one of the machines run `beckon agent enroll --force` to give it an identity of its own, then restart its agent",
        c.takeovers
    )
}

/// Renders a state; `running` says whether its writer is still alive.
pub fn render(state: &AgentState, now: i64, running: bool) -> String {
    let mut out = String::new();
    let id = state.agent_id.as_deref().unwrap_or("?");
    let process = match (state.pid, running) {
        (Some(pid), true) => format!("running (pid {pid})"),
        (Some(pid), false) => format!("NOT running (pid {pid} is gone; it did not stop cleanly)"),
        (None, _) => "NOT running (stopped)".to_owned(),
    };
    let _ = writeln!(out, "Agent:        {id}, {process}");
    let since = state
        .since
        .map(|t| age(t, now))
        .unwrap_or_else(|| "?".into());
    let connection = if running && state.connected {
        format!(
            "connected via {} since {since}",
            state.path.as_deref().unwrap_or("?")
        )
    } else if running {
        format!("NOT connected since {since}")
    } else {
        "NOT connected (agent not running)".to_owned()
    };
    let _ = writeln!(out, "Push service: {connection}");
    if let Some(proxy) = &state.proxy {
        let _ = writeln!(out, "Proxy:        {proxy}");
    }
    if let Some(c) = state.identity_conflict.as_ref().filter(|_| running) {
        let _ = writeln!(out, "Identity:     {}", identity_conflict_text(c, now));
    }
    let _ = writeln!(
        out,
        "Last path:    {}",
        state.last_working_path.as_deref().unwrap_or("none yet")
    );
    match &state.last_wakeup {
        Some(w) => {
            let reason = if w.reason.is_empty() {
                "no reason given"
            } else {
                &w.reason
            };
            let _ = writeln!(
                out,
                "Last wake-up: {} ({reason}) at {}",
                w.id,
                age(w.received_at, now)
            );
        }
        None => {
            let _ = writeln!(out, "Last wake-up: none");
        }
    }
    match &state.last_result {
        Some(r) => {
            let code = r
                .exit_code
                .map(|c| format!(", exit code {c}"))
                .unwrap_or_default();
            let merged = if r.wakeup_ids.len() > 1 {
                format!(", {} wake-ups merged", r.wakeup_ids.len())
            } else {
                String::new()
            };
            let _ = writeln!(
                out,
                "Last result:  {}{code}, {} ms{merged}, at {}",
                r.status,
                r.duration_ms,
                age(r.finished_at, now)
            );
            if let Some(detail) = &r.detail {
                let _ = writeln!(out, "              {detail}");
            }
        }
        None => {
            let _ = writeln!(out, "Last result:  none");
        }
    }
    if let Some(d) = &state.last_disconnect {
        let _ = writeln!(out, "Last drop:    {} at {}", d.message, age(d.at, now));
    }
    match &state.last_error {
        Some(e) => {
            let _ = writeln!(out, "Last error:   {} at {}", e.message, age(e.at, now));
        }
        None => {
            let _ = writeln!(out, "Last error:   none");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{LastError, LastResult, LastWakeUp};
    use std::time::Duration;

    #[test]
    fn names_every_part_of_the_state() {
        let state = AgentState {
            pid: Some(1),
            agent_id: Some("laptop-42".into()),
            connected: true,
            path: Some("direct:8883".into()),
            last_working_path: Some("direct:8883".into()),
            since: Some(1000),
            proxy: Some("none (system proxy: WinHTTP is set to direct access)".into()),
            last_wakeup: Some(LastWakeUp {
                id: "w-1".into(),
                reason: "policy changed".into(),
                received_at: 1100,
            }),
            last_result: Some(LastResult {
                wakeup_ids: vec!["w-1".into()],
                status: "failed".into(),
                exit_code: Some(3),
                duration_ms: 42,
                finished_at: 1101,
                detail: Some("/usr/bin/x exited with code 3".into()),
            }),
            last_error: Some(LastError {
                message: "broker refused the connection: server busy".into(),
                at: 900,
            }),
            last_disconnect: Some(LastError {
                message: "broker closed the session: server shutting down (0x8B)".into(),
                at: 800,
            }),
            ..AgentState::default()
        };
        let text = render(&state, 1200, true);
        for needle in [
            "laptop-42",
            "running (pid 1)",
            "connected via direct:8883 since 1970-01-01T00:16:40Z (3m 20s ago)",
            "w-1 (policy changed)",
            "failed, exit code 3, 42 ms",
            "server busy",
            "Last drop:    broker closed the session: server shutting down (0x8B) at",
            "Proxy:        none (system proxy: WinHTTP is set to direct access)",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in\n{text}");
        }
        let dead = render(&state, 1200, false);
        assert!(dead.contains("NOT connected (agent not running)"), "{dead}");
        assert!(!text.contains("Identity:"), "{text}");
    }

    #[test]
    fn a_paused_clone_says_why_and_what_to_do() {
        let state = AgentState {
            pid: Some(1),
            agent_id: Some("laptop-42".into()),
            since: Some(1000),
            identity_conflict: Some(IdentityConflict {
                takeovers: 3,
                window_secs: 600,
                paused_at: 1000,
                paused_until: 4600,
            }),
            ..AgentState::default()
        };
        let text = render(&state, 1200, true);
        for needle in [
            "Identity:     IN USE ON ANOTHER MACHINE",
            "taken over 3 times within 10m",
            "not reconnecting until 1970-01-01T01:16:40Z",
            "beckon agent enroll --force",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in\n{text}");
        }
        let later = render(&state, 5000, true);
        assert!(later.contains("reconnecting after a pause"), "{later}");
        // A stopped agent's conflict is history: the next start counts afresh.
        assert!(!render(&state, 1200, false).contains("Identity:"));
    }

    #[test]
    fn the_certificate_line_says_when_renewal_starts() {
        let dir = tempfile::tempdir().unwrap();
        let cert = dir.path().join("agent.pem");
        assert_eq!(certificate_line(&cert, 0), "");
        let ca =
            beckon_pki::CertificateAuthority::generate("t", Duration::from_secs(3600)).unwrap();
        let issued = ca
            .issue_client(
                "pc-1",
                Some("acme"),
                Some("agent"),
                Duration::from_secs(3000),
            )
            .unwrap();
        std::fs::write(&cert, &issued.cert_pem).unwrap();
        let now = unix_now();
        let line = certificate_line(&cert, now);
        assert!(line.contains("renewed automatically"), "{line}");
        assert!(certificate_line(&cert, now + 2500).contains("renewal due"));
        assert!(certificate_line(&cert, now + 4000).contains("EXPIRED"));
        std::fs::write(&cert, "garbage").unwrap();
        assert!(certificate_line(&cert, now).contains("agent.pem"));
    }

    #[test]
    fn empty_folder_says_never_ran() {
        let dir = tempfile::tempdir().expect("tempdir");
        let text = status_text(dir.path()).expect("status");
        assert!(text.contains("never ran"), "{text}");
    }
}

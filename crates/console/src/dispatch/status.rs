//! The push service status the console shows: connected or not, since when, the last
//! error, and the doctor's report while the broker stays unreachable.

use std::time::Duration;

use crate::model::now_ms;
use crate::{AppState, BrokerLink};

/// How often the doctor runs while the push service stays unreachable.
pub(super) const DIAGNOSIS_EVERY: Duration = Duration::from_secs(60);

pub(super) fn set_status(st: &AppState, connected: bool, error: Option<String>) {
    if let Ok(mut p) = st.push.lock() {
        if p.connected != connected || error.is_some() {
            p.since = now_ms();
        }
        p.connected = connected;
        if connected {
            p.diagnosis = None;
        }
        p.message = if connected {
            "Push service servers are reachable".into()
        } else {
            format!(
                "Push service servers are not reachable: {}",
                error.as_deref().unwrap_or("not connected")
            )
        };
        if error.is_some() {
            p.last_error = error;
        }
    }
}

/// Runs the doctor's checks on the broker paths with the console's own identity; returns
/// the summary line and the report.
pub(super) async fn diagnose(st: &AppState) -> Option<(String, serde_json::Value)> {
    let BrokerLink::Tls {
        host,
        port,
        ca_file,
    } = &st.config.broker
    else {
        return None;
    };
    let issued = st
        .ca
        .issue_client(
            &st.config.console_id,
            Some(st.tenant.as_str()),
            Some("server"),
            Duration::from_secs(24 * 3600),
        )
        .ok()?;
    let mut config = beckon_doctor::DoctorConfig::new(host.clone());
    config.primary_port = *port;
    config.tls.trust = match ca_file {
        Some(p) => beckon_net::TrustAnchors::CaFile(p.clone()),
        None => beckon_net::TrustAnchors::CaPem(st.ca.cert_pem().as_bytes().to_vec()),
    };
    config.ca_label = Some(match ca_file {
        Some(p) => format!("the broker CA file {} (--broker-ca)", p.display()),
        None => "the console's tenant CA (set --broker-ca if the broker's certificate comes from another CA)".into(),
    });
    config.tls.identity = Some(beckon_net::ClientIdentity::Pem {
        cert: issued.cert_pem.into_bytes(),
        key: issued.key_pem.into_bytes(),
    });
    // The console is not connected, so checking under its own client id takes nothing over.
    config.client_id = Some(st.config.console_id.clone());
    config.step_timeout = Duration::from_secs(5);
    let report = beckon_doctor::diagnose(&config).await;
    let value = serde_json::to_value(&report).ok()?;
    Some((report.summary.clone(), value))
}

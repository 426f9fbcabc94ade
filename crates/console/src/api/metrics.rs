//! `GET /metrics`: the console's Prometheus metrics ([`crate::metrics`]) for any API token
//! or session (the viewer role is enough).

use axum::http::header::CONTENT_TYPE;
use axum::response::IntoResponse;

use super::Viewer;
use crate::metrics::DatabaseFigures;
use crate::model::Presence;

/// The broker's admin listener serves the same format.
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

pub(super) async fn metrics(a: Viewer) -> impl IntoResponse {
    let m = &a.st.metrics;
    if m.database_figures_due() {
        // One trip to the store; on failure the figures keep their last values and the
        // failure shows in beckon_console_database_errors_total.
        let read = a
            .run(|s| {
                let deliveries = s.count_deliveries()?;
                let mut agents =
                    [Presence::Online, Presence::Offline, Presence::Unknown].map(|p| (p, 0));
                for (presence, n) in &mut agents {
                    *n = s.count_agents(*presence)?;
                }
                Ok(DatabaseFigures { deliveries, agents })
            })
            .await;
        match read {
            Ok(figures) => m.set_database_figures(&figures),
            Err(e) => {
                tracing::warn!(error = %e.message, "metrics: reading the database figures failed")
            }
        }
    }
    let queue = a.st.dispatch.max_capacity() - a.st.dispatch.capacity();
    let connected = a.st.push.lock().is_ok_and(|p| p.connected);
    ([(CONTENT_TYPE, OPENMETRICS)], m.render(queue, connected))
}

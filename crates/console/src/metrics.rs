//! Prometheus metrics of the console, served at `GET /metrics` on the console's own port to
//! any API token or session (the viewer role is enough), in the text format the broker's
//! admin listener serves (`prometheus-client`, names prefixed `beckon_console_`).
//!
//! Counters are atomics bumped where things happen; per-route request counters and latency
//! histograms are created with the router, so a request takes no lock to count itself. The
//! figures that live in the database (deliveries by state, agents by presence) are read when
//! scraped, in one trip to the store, at most once per [`DATABASE_GAUGES_EVERY`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::Request;
use axum::http::{Method, StatusCode};
use axum::middleware::Next;
use axum::response::Response;
use prometheus_client::encoding::{EncodeLabelSet, EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::Registry;

use crate::model::{CallState, Presence};
use crate::store::StoreError;

/// The database figures are read again at most this often, however many scrapers ask.
pub const DATABASE_GAUGES_EVERY: Duration = Duration::from_secs(10);

/// Upper bounds (seconds) of the latency histograms: 1 ms to 10 s.
const LATENCY_BOUNDS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

/// A latency histogram of atomics: observing takes no lock (prometheus-client's own
/// histogram takes one per observation).
#[derive(Clone, Debug, Default)]
pub struct Latency(Arc<LatencyInner>);

#[derive(Debug, Default)]
struct LatencyInner {
    /// One per bound of [`LATENCY_BOUNDS`], then +Inf; not cumulative (the encoder adds up).
    buckets: [AtomicU64; LATENCY_BOUNDS.len() + 1],
    sum_nanos: AtomicU64,
}

impl Latency {
    /// Counts one operation that took `took`.
    pub fn observe(&self, took: Duration) {
        let secs = took.as_secs_f64();
        let i = LATENCY_BOUNDS
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(LATENCY_BOUNDS.len());
        self.0.buckets[i].fetch_add(1, Ordering::Relaxed);
        let nanos = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
        self.0.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }
}

impl TypedMetric for Latency {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for Latency {
    fn encode(&self, mut encoder: MetricEncoder<'_>) -> Result<(), std::fmt::Error> {
        let buckets: Vec<(f64, u64)> = LATENCY_BOUNDS
            .iter()
            .copied()
            .chain([f64::INFINITY])
            .zip(&self.0.buckets)
            .map(|(bound, n)| (bound, n.load(Ordering::Relaxed)))
            .collect();
        let count = buckets.iter().map(|(_, n)| n).sum();
        let sum = Duration::from_nanos(self.0.sum_nanos.load(Ordering::Relaxed)).as_secs_f64();
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PresenceLabels {
    presence: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: &'static str,
}

/// The route is the template (`/api/v1/agents/{id}`), never the path asked for: the
/// label's values are bounded by the route list.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    route: &'static str,
    method: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteStatusLabels {
    route: &'static str,
    method: &'static str,
    status: &'static str,
}

/// How an enrollment or a login ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Enrolled, or logged in.
    Accepted,
    /// Refused: a wrong token or password, or a request that does not fit.
    Refused,
    /// Answered 429 by the throttle of failed attempts (docs/console.md, Limits).
    Throttled,
    /// The console failed (its database, say): 5xx.
    Failed,
}

impl Outcome {
    const ALL: [Outcome; 4] = [
        Outcome::Accepted,
        Outcome::Refused,
        Outcome::Throttled,
        Outcome::Failed,
    ];

    fn as_str(self) -> &'static str {
        match self {
            Outcome::Accepted => "accepted",
            Outcome::Refused => "refused",
            Outcome::Throttled => "throttled",
            Outcome::Failed => "failed",
        }
    }

    /// The outcome an API answer with `status` stands for.
    pub fn of_status(status: StatusCode) -> Self {
        if status.is_success() {
            Outcome::Accepted
        } else if status == StatusCode::TOO_MANY_REQUESTS {
            Outcome::Throttled
        } else if status.is_server_error() {
            Outcome::Failed
        } else {
            Outcome::Refused
        }
    }
}

/// What the store said when last asked (see [`DATABASE_GAUGES_EVERY`]).
#[derive(Debug, Clone)]
pub struct DatabaseFigures {
    /// Deliveries per state, in [`CallState::ALL`]'s order.
    pub deliveries: [u64; 7],
    /// Agents online, offline, not yet seen.
    pub agents: [(Presence, u64); 3],
}

/// Every metric of the console.
pub struct ConsoleMetrics {
    registry: Registry,
    calls: Counter,
    /// Deliveries entering each state, in [`CallState::ALL`]'s order.
    delivery_changes: [Counter; 7],
    resends: Counter,
    enrollments: [Counter; 4],
    logins: [Counter; 4],
    requests: Family<RouteStatusLabels, Counter>,
    request_latency: Family<RouteLabels, Latency>,
    database_latency: Latency,
    database_errors: Family<KindLabels, Counter>,
    // Read at scrape time.
    dispatch_queue: Gauge,
    broker_connected: Gauge,
    deliveries: Family<StateLabels, Gauge>,
    agents: Family<PresenceLabels, Gauge>,
    database_read_at: Mutex<Option<Instant>>,
}

impl std::fmt::Debug for ConsoleMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ConsoleMetrics")
    }
}

impl Default for ConsoleMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl ConsoleMetrics {
    /// Every metric at zero.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("beckon_console");
        let delivery_changes_family = Family::<StateLabels, Counter>::default();
        let enrollments_family = Family::<OutcomeLabels, Counter>::default();
        let logins_family = Family::<OutcomeLabels, Counter>::default();
        let outcomes = |family: &Family<OutcomeLabels, Counter>| {
            Outcome::ALL.map(|o| {
                family
                    .get_or_create(&OutcomeLabels {
                        outcome: o.as_str(),
                    })
                    .clone()
            })
        };
        let m = Self {
            registry: Registry::default(),
            calls: Counter::default(),
            delivery_changes: CallState::ALL.map(|s| {
                delivery_changes_family
                    .get_or_create(&StateLabels { state: s.as_str() })
                    .clone()
            }),
            resends: Counter::default(),
            enrollments: outcomes(&enrollments_family),
            logins: outcomes(&logins_family),
            requests: Family::default(),
            request_latency: Family::default(),
            database_latency: Latency::default(),
            database_errors: Family::default(),
            dispatch_queue: Gauge::default(),
            broker_connected: Gauge::default(),
            deliveries: Family::default(),
            agents: Family::default(),
            database_read_at: Mutex::new(None),
        };
        for kind in ["unavailable", "failure"] {
            // Shown at zero from the start.
            let _ = m.database_errors.get_or_create(&KindLabels { kind });
        }
        registry.register("calls", "Wake-up calls made", m.calls.clone());
        registry.register(
            "delivery_changes",
            "Deliveries (one per agent of a call) entering each state",
            delivery_changes_family,
        );
        registry.register(
            "resends",
            "Wake-ups published again: queued ones when the broker link comes up, pending ones when their agent comes online",
            m.resends.clone(),
        );
        registry.register(
            "enrollments",
            "Enrollment requests by outcome: accepted, refused, throttled (429), failed (5xx)",
            enrollments_family,
        );
        registry.register(
            "logins",
            "Login requests by outcome: accepted, refused, throttled (429), failed (5xx)",
            logins_family,
        );
        registry.register(
            "http_requests",
            "API requests by route template, method and status class",
            m.requests.clone(),
        );
        registry.register(
            "http_request_duration_seconds",
            "API request latency (until the answer's head) by route template and method",
            m.request_latency.clone(),
        );
        registry.register(
            "database_duration_seconds",
            "Time of each store operation, waiting for a connection included",
            m.database_latency.clone(),
        );
        registry.register(
            "database_errors",
            "Store operations that failed: unavailable (the server cannot be reached) or failure",
            m.database_errors.clone(),
        );
        registry.register(
            "dispatch_queue",
            "Calls and relay requests waiting for the dispatcher",
            m.dispatch_queue.clone(),
        );
        registry.register(
            "broker_connected",
            "1 while the console's broker connection is up",
            m.broker_connected.clone(),
        );
        registry.register(
            "deliveries",
            "Deliveries by state, as stored (read at most every 10 s); queued is the backlog waiting for the broker",
            m.deliveries.clone(),
        );
        registry.register(
            "agents",
            "Agents by presence, as stored (read at most every 10 s)",
            m.agents.clone(),
        );
        Self { registry, ..m }
    }

    /// A wake-up call was made for `deliveries` agents (each starts `queued`).
    pub fn call_made(&self, deliveries: usize) {
        self.calls.inc();
        self.delivery_changes[0].inc_by(u64::try_from(deliveries).unwrap_or(u64::MAX));
    }

    /// `n` deliveries of a call already counted were recorded queued (a large call's
    /// later chunk).
    pub fn deliveries_queued(&self, n: usize) {
        self.delivery_changes[0].inc_by(u64::try_from(n).unwrap_or(u64::MAX));
    }

    /// A delivery entered `state`.
    pub fn delivery_changed(&self, state: CallState) {
        if let Some(i) = CallState::ALL.iter().position(|s| *s == state) {
            self.delivery_changes[i].inc();
        }
    }

    /// `n` wake-ups were published again.
    pub fn resent(&self, n: usize) {
        self.resends.inc_by(u64::try_from(n).unwrap_or(u64::MAX));
    }

    /// An enrollment request ended with `outcome`.
    pub fn enrollment(&self, outcome: Outcome) {
        self.enrollments[Outcome::ALL.iter().position(|o| *o == outcome).unwrap_or(0)].inc();
    }

    /// A login request ended with `outcome`.
    pub fn login(&self, outcome: Outcome) {
        self.logins[Outcome::ALL.iter().position(|o| *o == outcome).unwrap_or(0)].inc();
    }

    /// A store operation took `took` and ended with `error` (if any). Errors of the request
    /// (not found, conflict, refused, invalid) are answers, not database errors.
    pub fn database_call(&self, took: Duration, error: Option<&StoreError>) {
        self.database_latency.observe(took);
        let kind = match error {
            None
            | Some(
                StoreError::NotFound { .. }
                | StoreError::Conflict(_)
                | StoreError::Refused(_)
                | StoreError::Invalid(_),
            ) => return,
            Some(StoreError::Unavailable { .. }) => "unavailable",
            Some(_) => "failure",
        };
        self.database_errors
            .get_or_create(&KindLabels { kind })
            .inc();
    }

    /// The request counters of one route, created now so that requests take no lock.
    pub(crate) fn route(&self, route: &'static str, methods: &[&'static str]) -> RouteMetrics {
        let methods = methods
            .iter()
            .map(|name| {
                let method =
                    Method::from_bytes(name.to_ascii_uppercase().as_bytes()).unwrap_or(Method::GET);
                let method_label = method_label(&method);
                let by_class = STATUS_CLASSES.map(|status| {
                    self.requests
                        .get_or_create(&RouteStatusLabels {
                            route,
                            method: method_label,
                            status,
                        })
                        .clone()
                });
                let latency = self
                    .request_latency
                    .get_or_create(&RouteLabels {
                        route,
                        method: method_label,
                    })
                    .clone();
                (method, by_class, latency)
            })
            .collect::<Vec<_>>();
        RouteMetrics {
            methods: methods.into(),
        }
    }

    /// Whether the database figures are due for a new read, and if so marks them read now.
    pub fn database_figures_due(&self) -> bool {
        let mut at = self
            .database_read_at
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let due = at.is_none_or(|t| t.elapsed() >= DATABASE_GAUGES_EVERY);
        if due {
            *at = Some(Instant::now());
        }
        due
    }

    /// Sets the figures read from the database.
    pub fn set_database_figures(&self, figures: &DatabaseFigures) {
        for (state, n) in CallState::ALL.iter().zip(figures.deliveries) {
            self.deliveries
                .get_or_create(&StateLabels {
                    state: state.as_str(),
                })
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
        for (presence, n) in figures.agents {
            self.agents
                .get_or_create(&PresenceLabels {
                    presence: presence.as_str(),
                })
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
    }

    /// The text exposition, with the in-memory gauges as they are now.
    pub fn render(&self, dispatch_queue: usize, broker_connected: bool) -> String {
        self.dispatch_queue
            .set(i64::try_from(dispatch_queue).unwrap_or(i64::MAX));
        self.broker_connected.set(i64::from(broker_connected));
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

/// Status classes counted per route; others (1xx, 3xx) are not answered by the API.
const STATUS_CLASSES: [&str; 3] = ["2xx", "4xx", "5xx"];

fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        _ => "other",
    }
}

/// The counters of one route, per method it takes.
#[derive(Clone)]
pub(crate) struct RouteMetrics {
    methods: Arc<[(Method, [Counter; 3], Latency)]>,
}

impl RouteMetrics {
    /// Runs the request and counts it under its method and status class. A method the
    /// route does not take (405) is not counted.
    pub(crate) async fn count(self, req: Request, next: Next) -> Response {
        let started = Instant::now();
        let method = req.method().clone();
        let response = next.run(req).await;
        if let Some((_, by_class, latency)) = self.methods.iter().find(|(m, ..)| *m == method) {
            latency.observe(started.elapsed());
            let class = match response.status().as_u16() {
                200..=299 => Some(0),
                400..=499 => Some(1),
                500..=599 => Some(2),
                _ => None,
            };
            if let Some(i) = class {
                by_class[i].inc();
            }
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_latency_lands_in_its_bucket_and_the_sum() {
        let m = ConsoleMetrics::new();
        let route = m.route("/api/v1/agents/{id}", &["get"]);
        route.methods[0].2.observe(Duration::from_millis(3));
        route.methods[0].2.observe(Duration::from_secs(60));
        let text = m.render(0, false);
        let bucket = |le: &str| {
            format!(
                "beckon_console_http_request_duration_seconds_bucket{{le=\"{le}\",route=\"/api/v1/agents/{{id}}\",method=\"GET\"}} "
            )
        };
        let value = |prefix: String| {
            text.lines()
                .find_map(|l| l.strip_prefix(&prefix))
                .unwrap_or_else(|| panic!("no {prefix} in\n{text}"))
                .to_owned()
        };
        assert_eq!(value(bucket("0.0025")), "0");
        assert_eq!(value(bucket("0.005")), "1");
        assert_eq!(value(bucket("10.0")), "1");
        assert_eq!(value(bucket("+Inf")), "2");
        assert!(text.contains(
            "beckon_console_http_request_duration_seconds_sum{route=\"/api/v1/agents/{id}\",method=\"GET\"} 60.003"
        ));
    }
}

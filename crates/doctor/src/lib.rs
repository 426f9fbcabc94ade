//! beckon-doctor: walks each path of the agent's connection ladder, step by step, and names the
//! fix for each failure. The same checks serve `beckon doctor` and the console's push-service
//! status.
//!
//! For each path, in the ladder's order (with a proxy: through it to 8883, to 443 with ALPN
//! `mqtt`, to 443 over WebSocket, then the same three direct; without: the three direct), the
//! doctor runs:
//!
//! 1. DNS: the broker's name (or the proxy's, on proxied paths), addresses and time;
//! 2. TCP to the port (or to the proxy), timed;
//! 3. the proxy's CONNECT tunnel, on proxied paths;
//! 4. TLS: version, suite, ALPN, the chain's subjects, issuers and expiry, the host name;
//! 5. the WebSocket upgrade, on WebSocket paths;
//! 6. MQTT 5 CONNECT and the CONNACK reason code;
//! 7. a round trip through the broker: PINGREQ/PINGRESP; for an agent's id, SUBSCRIBE to
//!    `agents/{id}/wake` must be granted; and a publish/subscribe echo on `--echo-topic` (by
//!    default `beckon-doctor/{client id}` for the doctor's own throw-away id; none for an
//!    agent's id, which may only publish its acks). An agent's session is resumed, not
//!    cleaned, and messages queued in it are left unacknowledged for the agent.
//!
//! Each step passes, fails (with the fix in one sentence) or is skipped after an earlier
//! failure. The [`Report`] says which path agents will use: the first that works.
//!
//! ```no_run
//! # async fn status() {
//! let config = beckon_doctor::DoctorConfig::new("broker.example").with_ca_file("ca.pem");
//! let report = beckon_doctor::diagnose(&config).await;
//! if !report.ok {
//!     eprintln!("Push service servers are not reachable: {}", report.summary);
//! }
//! # }
//! ```

#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod cli;
mod config;
mod diagnose;
mod fix;
mod mqtt;
mod report;
mod tls;

pub use cli::{DoctorArgs, run};
pub use config::{DEFAULT_RESUMED_SESSION_EXPIRY, DEFAULT_STEP_TIMEOUT, DoctorConfig};
pub use diagnose::diagnose;
pub use report::{CertificateFacts, PathReport, Report, StepName, StepReport, TlsFacts, Verdict};

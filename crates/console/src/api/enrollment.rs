//! Enrollment: enrollment tokens, enrolling an agent, check-in, certificate renewal, and
//! what the broker reads: the tenant file and the revocation feed.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::*;
use crate::metrics::Outcome;
use crate::model::*;
use crate::secrets::{new_id, new_token, token_hash};
use crate::store::{CertificateRecord, FailureKind, NewAgent, NewEnrollmentToken};
use crate::{AppState, guard};

// --- Enrollment ---

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct NewEnrollmentTokenRequest {
    #[serde(default)]
    label: String,
    /// Lifetime in seconds; absent: never expires.
    expires_in_secs: Option<u64>,
    /// Use limit; absent: one-time (1). 0 means unlimited.
    max_uses: Option<u32>,
    #[serde(default)]
    groups: Vec<String>,
}

/// An enrollment token just made, with its secret (shown this once).
#[derive(Serialize, JsonSchema)]
pub(super) struct CreatedEnrollmentToken {
    #[serde(flatten)]
    record: EnrollmentToken,
    /// The secret agents enroll with (`bke_...`).
    token: String,
}

pub(super) async fn create_enrollment_token(
    a: Admin,
    Body(req): Body<NewEnrollmentTokenRequest>,
) -> ApiResult<(StatusCode, Json<CreatedEnrollmentToken>)> {
    check_text("label", &req.label, 0, 200)?;
    for g in &req.groups {
        check_group_name(g)?;
    }
    let now = now_ms();
    let expires_at = match req.expires_in_secs {
        None => None,
        Some(0) => {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "expires_in_secs must be at least 1 (omit it for a token that does not expire)",
            ));
        }
        Some(s) if s > 10 * 365 * 24 * 3600 => {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "expires_in_secs must be at most ten years",
            ));
        }
        Some(s) => Some(now + s as i64 * 1000),
    };
    let max_uses = match req.max_uses {
        None => Some(1),
        Some(0) => None,
        Some(n) => Some(n),
    };
    let secret = new_token("bke_");
    let new = NewEnrollmentToken {
        id: new_id(),
        hash: token_hash(&secret),
        label: req.label,
        created_by: a.who.name.clone(),
        expires_at,
        max_uses,
        groups: req.groups,
    };
    let token = a.run(move |s| s.create_enrollment_token(new)).await?;
    a.audit("enrollment_token.create", json!({"id": token.id}))
        .await;
    Ok((
        StatusCode::CREATED,
        Json(CreatedEnrollmentToken {
            record: token,
            token: secret,
        }),
    ))
}

pub(super) async fn list_enrollment_tokens(a: Viewer) -> ApiResult<Json<Vec<EnrollmentToken>>> {
    Ok(Json(a.run(|s| s.list_enrollment_tokens()).await?))
}

pub(super) async fn revoke_enrollment_token(
    a: Admin,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    let detail = json!({"id": id});
    a.audited("enrollment_token.revoke", detail, move |s| {
        s.revoke_enrollment_token(&id)
    })
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct EnrollRequest {
    token: String,
    /// The id the agent asks for; absent: the console makes one.
    agent_id: Option<String>,
    /// A PEM certificate signing request for the agent's own key pair.
    csr: String,
    name: Option<String>,
    #[serde(default)]
    inventory: Inventory,
}

pub(super) fn check_inventory(inv: &Inventory) -> ApiResult<()> {
    check_text("inventory.hostname", &inv.hostname, 0, 253)?;
    check_text("inventory.os", &inv.os, 0, 200)?;
    if inv.addresses.len() > 64 || inv.macs.len() > 32 {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "inventory: at most 64 addresses and 32 MAC addresses",
        ));
    }
    for a in &inv.addresses {
        let max = if a.address.is_ipv4() { 32 } else { 128 };
        if a.prefix_len > max {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!(
                    "inventory.addresses: prefix length {} is too long for {}",
                    a.prefix_len, a.address
                ),
            ));
        }
    }
    for m in &inv.macs {
        m.parse::<crate::wol::MacAddress>().map_err(|e| {
            ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!("inventory.macs: {e}"),
            )
        })?;
    }
    Ok(())
}

/// What an agent gets back from enrollment.
#[derive(Serialize, JsonSchema)]
pub(super) struct EnrollResponse {
    agent_id: String,
    tenant: String,
    certificate: String,
    ca: String,
    broker_endpoints: Vec<String>,
    /// The agent trusts the system's CA store for the broker as well as `ca`.
    broker_system_roots: bool,
    proxy: crate::settings::ProxySettings,
    wakeup_key: WakeupKey,
    checkin_token: String,
    checkin_url: String,
}

/// The key that signs wake-ups, for agents to check them.
#[derive(Serialize, JsonSchema)]
pub(super) struct WakeupKey {
    /// Key id, carried in each wake-up.
    kid: String,
    /// The public key, base64.
    public_key: String,
}

pub(super) async fn enroll(
    State(st): State<AppState>,
    source: Source,
    headers: HeaderMap,
    body: Body<EnrollRequest>,
) -> ApiResult<(StatusCode, Json<EnrollResponse>)> {
    let metrics = st.metrics.clone();
    let answer = check_enrollment(st, source, headers, body).await;
    metrics.enrollment(Outcome::of_status(match &answer {
        Ok((status, _)) => *status,
        Err(e) => e.status,
    }));
    answer
}

/// An enrollment: the token, then the agent's certificate and record.
async fn check_enrollment(
    st: AppState,
    Source(from): Source,
    headers: HeaderMap,
    Body(req): Body<EnrollRequest>,
) -> ApiResult<(StatusCode, Json<EnrollResponse>)> {
    // The failures of every console on the database count (crate::guard).
    let address = from.to_string();
    let throttled = {
        let address = address.clone();
        st.store
            .run(move |s| guard::check(s, FailureKind::EnrollAddress, &address, now_ms()))
            .await?
    };
    if let Err(wait) = throttled {
        return Err(ApiError::too_many(
            format!(
                "too many failed enrollments from this address: try again in {} s",
                wait.as_secs().max(1)
            ),
            wait,
        ));
    }
    // The token first: nobody without a valid one makes the CA do any work.
    let token_h = token_hash(&req.token);
    let checked = if req.token.starts_with("bke_") {
        st.store
            .run(move |s| s.check_enrollment_token(&token_h, now_ms()))
            .await
            .map_err(ApiError::from)
    } else {
        Err(ApiError::unauthorized(
            "the enrollment token is not valid (they start with bke_): ask an administrator for one",
        ))
    };
    if let Err(e) = checked {
        if e.status == StatusCode::UNAUTHORIZED
            && st
                .store
                .run(move |s| guard::fail(s, FailureKind::EnrollAddress, &address, now_ms()))
                .await?
        {
            tracing::warn!(address = %from, "failed enrollments throttled");
            let detail = json!({
                "address": from.to_string(),
                "failures": guard::FAILURES,
                "window_secs": guard::WINDOW.as_secs(),
            });
            write_audit(&st, format!("address:{from}"), "enroll.throttled", detail).await;
        }
        return Err(e);
    }
    let agent_id = match req.agent_id {
        Some(id) => {
            beckon_identity::validate_id(&id).map_err(|e| {
                ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, format!("agent_id: {e}"))
            })?;
            id
        }
        None => uuid::Uuid::now_v7().hyphenated().to_string(),
    };
    check_inventory(&req.inventory)?;
    let name = req
        .name
        .clone()
        .filter(|n| !n.trim().is_empty())
        .unwrap_or_else(|| {
            if req.inventory.hostname.is_empty() {
                agent_id.clone()
            } else {
                req.inventory.hostname.clone()
            }
        });
    check_text("name", &name, 1, 200)?;
    // Sign before recording: a bad CSR must not use up the token.
    let (certificate, record) = sign_agent_csr(&st, &req.csr, &agent_id)?;
    let checkin_token = new_token("bka_");
    let new = NewAgent {
        id: agent_id.clone(),
        name,
        inventory: req.inventory,
        secret_hash: token_hash(&checkin_token),
        certificate: Some(record),
    };
    // Checked again in the same transaction that uses it up.
    let agent = st
        .store
        .run(move |s| s.enroll_agent(&token_h, new, now_ms()))
        .await?;
    let settings = st.store.run(|s| s.settings()).await?;
    let broker_endpoints = if settings.broker.endpoints.is_empty() {
        st.config.default_broker_endpoints.clone()
    } else {
        settings.broker.endpoints.clone()
    };
    tracing::info!(agent = %agent.id, "agent enrolled");
    Ok((
        StatusCode::CREATED,
        Json(EnrollResponse {
            agent_id: agent.id,
            tenant: st.tenant.to_string(),
            certificate: certificate.cert_pem,
            ca: st.ca.cert_pem().to_owned(),
            broker_endpoints,
            broker_system_roots: st.config.agent_broker_system_roots,
            proxy: settings.proxy,
            wakeup_key: WakeupKey {
                kid: st.signer.key().kid().as_str().to_owned(),
                public_key: st.signer.key().public_key().to_base64(),
            },
            checkin_token,
            checkin_url: console_url(&st, &headers),
        }),
    ))
}

/// The console's URL as agents reach it: `--public-url`, else this request's scheme and
/// `Host` header (what the client used; behind a proxy or NAT that may not be what agents
/// elsewhere can reach).
pub(super) fn console_url(st: &AppState, headers: &HeaderMap) -> String {
    if let Some(url) = &st.config.public_url {
        return url.clone();
    }
    let host = headers
        .get(axum::http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("localhost");
    let scheme = if st.config.plain_http {
        "http"
    } else {
        "https"
    };
    format!("{scheme}://{host}")
}

/// The agent certificate for `csr` (a PEM signing request, checked for size and form first)
/// issued by the tenant CA to `agent_id`, and its serial and validity to record.
pub(super) fn sign_agent_csr(
    st: &AppState,
    csr: &str,
    agent_id: &str,
) -> ApiResult<(beckon_pki::IssuedCertificate, CertificateRecord)> {
    if csr.len() > 16 * 1024 || !csr.contains("CERTIFICATE REQUEST") {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "csr must be a PEM certificate signing request (-----BEGIN CERTIFICATE REQUEST-----)",
        ));
    }
    let certificate = st
        .ca
        .issue_client_for_csr(
            csr,
            agent_id,
            Some(st.tenant.as_str()),
            Some("agent"),
            st.config.agent_certificate_validity,
        )
        .map_err(|e| {
            ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!("csr could not be signed: {e}"),
            )
        })?;
    let record = certificate_record(&certificate)?;
    Ok((certificate, record))
}

/// Serial and validity of a certificate the console just issued.
pub(super) fn certificate_record(
    issued: &beckon_pki::IssuedCertificate,
) -> ApiResult<CertificateRecord> {
    let internal = |what: &str| {
        tracing::error!(what, "a certificate the console issued cannot be read back");
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "the console could not read the certificate it issued; see the console's log",
        )
    };
    let der = issued.cert_der().map_err(|_| internal("pem"))?;
    let serial = beckon_identity::certificate_serial(&der).ok_or_else(|| internal("serial"))?;
    let not_after = beckon_pki::not_after(&der)
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .ok_or_else(|| internal("not_after"))?;
    Ok(CertificateRecord {
        serial,
        issued_at: now_ms(),
        not_after,
    })
}

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct RenewRequest {
    /// A PEM certificate signing request for a fresh key pair.
    csr: String,
}

/// A renewed agent certificate.
#[derive(Serialize, JsonSchema)]
pub(super) struct RenewResponse {
    agent_id: String,
    certificate: String,
    ca: String,
    /// End of the new certificate's validity, unix ms.
    not_after: Millis,
}

/// Renews an agent's certificate: authenticated by its check-in token, refused for revoked
/// and unknown agents; the new certificate is recorded (so that removing the agent revokes
/// it too). The old one stays valid until it expires.
pub(super) async fn renew_certificate(
    State(st): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    Body(req): Body<RenewRequest>,
) -> ApiResult<Json<RenewResponse>> {
    let Some(token) = bearer(&headers) else {
        return Err(ApiError::unauthorized(
            "certificate renewal needs Authorization: Bearer <the checkin_token from enrollment>",
        ));
    };
    let hash = token_hash(token);
    let i = id.clone();
    st.store.run(move |s| s.agent_by_secret(&i, &hash)).await?;
    let (certificate, record) = sign_agent_csr(&st, &req.csr, &id)?;
    let not_after = record.not_after;
    let i = id.clone();
    st.store
        .run(move |s| s.record_certificate(&i, &record))
        .await?;
    tracing::info!(agent = %id, "agent certificate renewed");
    Ok(Json(RenewResponse {
        agent_id: id,
        certificate: certificate.cert_pem,
        ca: st.ca.cert_pem().to_owned(),
        not_after,
    }))
}

/// The query of the tenant file.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct TenantFileQuery {
    /// `false`: without the `[[revoked]]` entries, for a broker that follows the revocation
    /// feed. Default `true`.
    revoked: Option<bool>,
}

/// The broker's tenant file for this tenant, with the revocations in force (TOML).
pub(super) async fn get_tenant_file(
    a: Viewer,
    Query(q): Query<TenantFileQuery>,
) -> ApiResult<Response> {
    let text = if q.revoked.unwrap_or(true) {
        crate::tenant_file::current(&a.st).await?
    } else {
        crate::tenant_file::without_revocations(&a.st)
    };
    Ok((
        [(
            axum::http::header::CONTENT_TYPE,
            "application/toml; charset=utf-8",
        )],
        text,
    )
        .into_response())
}

/// Most entries one page of the revocation feed holds.
pub const MAX_REVOCATIONS_PAGE: u32 = 10_000;

/// The query of the revocation feed.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct RevocationsQuery {
    /// The `next` of the previous page; absent or 0: from the beginning.
    after: Option<u64>,
    /// How many entries: 1 to 10000; absent: 10000.
    limit: Option<u32>,
}

/// A page of the revocation feed.
#[derive(Serialize, JsonSchema)]
pub(super) struct RevocationsPage {
    /// The entries after `after`, in cursor order. An entry replaces whatever an earlier
    /// one said of the same role and id.
    revocations: Vec<RevocationEntry>,
    /// The `after` of the next request: the last entry's cursor, or `after` itself.
    next: u64,
    /// Whether more entries follow now (ask again at once with `next`).
    more: bool,
}

/// The revoked credentials of one identity, as they are now.
#[derive(Serialize, JsonSchema)]
pub(super) struct RevocationEntry {
    /// Feed position of this identity's last change.
    cursor: u64,
    /// Always `agent`: the console revokes agents.
    role: &'static str,
    /// The identity's id.
    id: String,
    /// `false`: nothing of the identity is refused any more; forget what earlier entries said.
    revoked: bool,
    /// The revoked certificates that are still valid; `null`: every certificate of the id
    /// (an agent removed before the console recorded certificates).
    certificates: Option<Vec<RevokedCertificate>>,
    /// Tokens whose `iat` is at or before this time (unix seconds) are refused; `null` with
    /// `revoked`: every token of the id.
    tokens_issued_until: Option<i64>,
}

/// A revoked certificate.
#[derive(Serialize, JsonSchema)]
pub(super) struct RevokedCertificate {
    /// Serial number, lowercase hex without separators.
    serial: String,
    /// End of its validity, unix seconds: after it the broker refuses it anyway.
    not_after: i64,
}

/// The revocation feed: the revoked credentials of removed agents after a cursor, for
/// brokers that poll it (docs/tenants.md, "Revocation feed").
pub(super) async fn revocations(
    a: Viewer,
    Query(q): Query<RevocationsQuery>,
) -> ApiResult<Json<RevocationsPage>> {
    let limit = q.limit.unwrap_or(MAX_REVOCATIONS_PAGE);
    if !(1..=MAX_REVOCATIONS_PAGE).contains(&limit) {
        return Err(ApiError::bad_request(format!(
            "limit must be 1 to {MAX_REVOCATIONS_PAGE}"
        )));
    }
    let after = q.after.unwrap_or(0);
    let now = now_ms();
    let page =
        a.st.store
            .run(move |s| s.revocation_feed(after, limit, now))
            .await?;
    let revocations = page
        .changes
        .into_iter()
        .map(|c| {
            let (revoked, certificates, tokens_issued_until) = match c.revoked {
                None => (false, Some(Vec::new()), None),
                Some(r) => (
                    true,
                    r.certificates.map(|list| {
                        list.into_iter()
                            .map(|(serial, not_after)| RevokedCertificate {
                                serial,
                                not_after: not_after.div_euclid(1000),
                            })
                            .collect()
                    }),
                    r.revoked_at.map(|at| at.div_euclid(1000)),
                ),
            };
            RevocationEntry {
                cursor: c.cursor,
                role: "agent",
                id: c.id,
                revoked,
                certificates,
                tokens_issued_until,
            }
        })
        .collect();
    Ok(Json(RevocationsPage {
        revocations,
        next: page.next,
        more: page.more,
    }))
}

/// The check-in body: the agent runtime's fields, plus an optional fresh inventory.
#[derive(Deserialize, JsonSchema)]
pub(super) struct CheckinRequest {
    #[serde(default)]
    agent_id: Option<String>,
    #[serde(default)]
    wakeup_id: Option<String>,
    #[serde(default)]
    inventory: Option<Inventory>,
    /// The agent checks in because its push session was just taken over by another
    /// connection with its id.
    #[serde(default)]
    taken_over: bool,
}

/// A check-in recorded.
#[derive(Serialize, JsonSchema)]
pub(super) struct CheckedIn {
    agent_id: String,
    /// This check-in, unix ms.
    last_checkin: Option<Millis>,
    /// The wake-up the agent answered, as it sent it.
    wakeup_id: Option<String>,
}

pub(super) async fn checkin(
    State(st): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    Body(req): Body<CheckinRequest>,
) -> ApiResult<Json<CheckedIn>> {
    let Some(token) = bearer(&headers) else {
        return Err(ApiError::unauthorized(
            "check-in needs Authorization: Bearer <the checkin_token from enrollment>",
        ));
    };
    if req.agent_id.as_deref().is_some_and(|a| a != id) {
        return Err(ApiError::bad_request(
            "agent_id in the body differs from the one in the URL",
        ));
    }
    if let Some(inv) = &req.inventory {
        check_inventory(inv)?;
    }
    let hash = token_hash(token);
    let i = id.clone();
    st.store.run(move |s| s.agent_by_secret(&i, &hash)).await?;
    let (inv, taken_over) = (req.inventory, req.taken_over);
    let checkin = st
        .store
        .run(move |s| s.record_checkin(&id, inv, taken_over, now_ms()))
        .await?;
    let agent = checkin.agent;
    if checkin.newly_cloned {
        let machines: Vec<&str> = agent
            .cloned
            .iter()
            .flat_map(|c| c.machines.iter().map(|m| m.hostname.as_str()))
            .collect();
        tracing::warn!(agent = %agent.id, ?machines, "one agent identity is in use on two machines: {}", crate::clones::CLONE_FIX);
        let detail = json!({"id": agent.id, "machines": machines});
        write_audit(&st, format!("agent:{}", agent.id), "agent.cloned", detail).await;
    }
    Ok(Json(CheckedIn {
        agent_id: agent.id,
        last_checkin: agent.last_checkin,
        wakeup_id: req.wakeup_id,
    }))
}

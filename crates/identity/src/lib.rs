//! Who may do what on the Beckon push service, as plain logic (no sockets, no clock reads):
//!
//! - [`Identity`]: `(tenant, role, id)` and its character rules;
//! - [`TenantDirectory`]: tenants loaded from `tenants/<id>.toml`, with their CAs and token keys;
//! - [`Authenticator`]: client certificate and/or token to identity, or a [`Refusal`] with its
//!   MQTT reason code;
//! - [`TokenSigner`] / [`TokenVerifier`]: the signed, expiring token used as MQTT password;
//! - [`acl`]: the tenant topic namespace, publish/subscribe rules and presence events;
//! - [`wakeup`]: the signed wake-up message, its verification and replay guard, and acks.
//!
//! Formats are documented in `docs/tenants.md` and `docs/wake-up.md`.
#![forbid(unsafe_code)]

pub mod acl;
mod auth;
mod identity;
mod keys;
mod tenant;
mod token;
pub mod wakeup;

pub use acl::{Access, AclDenied, ConnectionPath, PresenceEvent, PresenceState};
pub use auth::{
    AuthMethod, Authenticated, Authenticator, BAD_USER_NAME_OR_PASSWORD,
    CLIENT_IDENTIFIER_NOT_VALID, Credentials, NOT_AUTHORIZED, QUOTA_EXCEEDED, Refusal,
    check_client_id, check_quota, identity_from_certificate,
};
pub use identity::{
    Identity, IdentityError, MAX_ID_LEN, MAX_TENANT_LEN, Role, TenantId, validate_id,
};
pub use keys::{KeyError, KeyId, PublicKey, SigningKey};
pub use tenant::{CaCertificate, CaError, LoadOutcome, Tenant, TenantDirectory, TenantFileError};
pub use token::{
    DEFAULT_CLOCK_SKEW_SECS, MAX_TOKEN_LEN, TOKEN_PREFIX, TokenClaims, TokenIssueError,
    TokenSigner, TokenVerifier, VerifiedToken,
};

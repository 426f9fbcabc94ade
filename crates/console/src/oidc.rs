//! Single sign-on with OpenID Connect: the authorization code flow with PKCE (S256), state
//! and nonce, against any provider that publishes `/.well-known/openid-configuration`.
//!
//! The steps around the token are written here over the workspace's one HTTP client
//! (`beckon_net::http`, rustls); the ID token's signature and its `iss`, `aud`, `exp` and
//! `nbf` are checked by `jsonwebtoken` on aws-lc-rs, the crypto the rest of Beckon uses
//! (docs/console.md says why not the `openidconnect` crate). A claim of the ID token
//! (`groups` by default) is mapped to a Beckon role; no mapped value, no login.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use aws_lc_rs::digest;
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use beckon_net::http::{HttpClient, HttpSettings, Request, Url};
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use crate::ConsoleError;
use crate::model::Role;

/// The path of the callback under the console's public URL (register
/// `<public-url>/api/v1/oidc/callback` at the provider).
pub const CALLBACK_PATH: &str = "/api/v1/oidc/callback";

/// How long a started sign-in may take at the provider.
pub const SIGN_IN_TIMEOUT: Duration = Duration::from_secs(10 * 60);

/// Sign-ins started and not finished, at most (older ones are dropped first).
const MAX_PENDING: usize = 10_000;

/// Sign-ins started and not finished from one address, at most: one address starting
/// sign-ins in a loop drops only its own, never the others' under way.
const MAX_PENDING_PER_ADDRESS: usize = 64;

/// How long the provider's discovery document and keys are used before they are read again.
const PROVIDER_TTL: Duration = Duration::from_secs(3600);

/// An ID token whose key is unknown reads the keys again, at most this often (key rotation).
const KEYS_REFRESH: Duration = Duration::from_secs(10);

/// Limit of each request to the provider.
const PROVIDER_TIMEOUT: Duration = Duration::from_secs(10);

/// The password hash of a user made by single sign-on: no password matches it (the `!` of a
/// locked account in /etc/shadow), so such a user can only sign in through the provider.
pub const SSO_PASSWORD_HASH: &str = "!oidc";

/// The client secret; never printed (its `Debug` hides it).
#[derive(Clone, PartialEq, Eq)]
pub struct ClientSecret(pub String);

impl std::fmt::Debug for ClientSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClientSecret(hidden)")
    }
}

/// Single sign-on settings (`--oidc-*`, see docs/console.md).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OidcConfig {
    /// The provider's issuer URL, exactly as its discovery document names it.
    pub issuer: String,
    /// The console's client id at the provider.
    pub client_id: String,
    /// The console's client secret.
    pub client_secret: ClientSecret,
    /// Shown on the login page: "Sign in with <name>".
    pub provider_name: String,
    /// The ID token claim holding the user's groups or roles (a string or a list of strings).
    pub roles_claim: String,
    /// Claim value to Beckon role; a user with several mapped values gets the highest role.
    pub role_map: Vec<(String, Role)>,
    /// Scopes asked for; `openid` is always among them.
    pub scopes: Vec<String>,
    /// CA file that signed the provider's HTTPS certificate; default: the system store.
    pub ca_file: Option<PathBuf>,
}

/// Why a sign-in through the provider failed; the message ends on the login page.
#[derive(Debug, thiserror::Error)]
pub enum OidcError {
    /// The provider answered the sign-in with an error (the user refused, ...).
    #[error("{provider} refused the sign-in: {code}{}", .description.as_deref().map(|d| format!(" ({d})")).unwrap_or_default())]
    Refused {
        /// The provider's name.
        provider: String,
        /// The OAuth error code, e.g. `access_denied`.
        code: String,
        /// The provider's explanation.
        description: Option<String>,
    },
    /// The callback's state is not one this console started (or it expired).
    #[error(
        "this sign-in was not started by this console or took longer than {} minutes: sign in again",
        SIGN_IN_TIMEOUT.as_secs() / 60
    )]
    UnknownState,
    /// The provider could not be reached or answered something unusable.
    #[error("the sign-in provider failed: {0}; try again, or log in with a local user")]
    Provider(String),
    /// The ID token did not pass its checks.
    #[error("the provider's ID token was refused: {0}")]
    Token(String),
    /// The user's claim holds no value mapped to a role.
    #[error(
        "{user} has no Beckon role: the provider's {claim:?} claim holds {values:?}, and none is mapped to a role (an admin maps them with --oidc-role VALUE=ROLE)"
    )]
    NoRole {
        /// Who signed in.
        user: String,
        /// The claim read.
        claim: String,
        /// Its values.
        values: Vec<String>,
    },
    /// The user's name is not usable as a Beckon user name.
    #[error(
        "the provider's user name {0:?} is not usable: it must be 1 to 64 characters without control characters"
    )]
    Name(String),
}

/// Who signed in, with the role their claim maps to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedIn {
    /// The user name (`preferred_username`, else `email`, else `sub`).
    pub name: String,
    /// The provider's subject identifier.
    pub subject: String,
    /// The role.
    pub role: Role,
}

/// What the provider publishes that the flow uses.
#[derive(Debug, Deserialize)]
struct Discovery {
    issuer: String,
    authorization_endpoint: String,
    token_endpoint: String,
    jwks_uri: String,
    #[serde(default)]
    token_endpoint_auth_methods_supported: Option<Vec<String>>,
}

struct Provider {
    discovery: Discovery,
    keys: JwkSet,
    read_at: Instant,
}

/// A sign-in sent to the provider and not back yet.
struct Pending {
    nonce: String,
    verifier: String,
    started: Instant,
    from: IpAddr,
}

/// Single sign-on at run time: the configuration, the provider's metadata (read on first
/// use, kept an hour) and the sign-ins under way (in memory: a restart ends them).
pub struct Oidc {
    config: OidcConfig,
    redirect_uri: String,
    http: HttpClient,
    provider: tokio::sync::Mutex<Option<Arc<Provider>>>,
    pending: std::sync::Mutex<HashMap<String, Pending>>,
}

impl std::fmt::Debug for Oidc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Oidc")
            .field("issuer", &self.config.issuer)
            .field("redirect_uri", &self.redirect_uri)
            .finish_non_exhaustive()
    }
}

/// Random URL-safe text of `bytes` random bytes.
fn random_text(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    rand::fill(&mut buf[..]);
    URL_SAFE_NO_PAD.encode(buf)
}

/// The PKCE S256 challenge of `verifier` (RFC 7636 section 4.2).
pub fn pkce_challenge(verifier: &str) -> String {
    URL_SAFE_NO_PAD.encode(digest::digest(&digest::SHA256, verifier.as_bytes()))
}

/// `key=value&...`, form-encoded.
fn form(pairs: &[(&str, &str)]) -> String {
    serde_urlencoded::to_string(pairs).unwrap_or_default()
}

/// One value, form-encoded.
fn form_value(value: &str) -> String {
    form(&[("", value)]).trim_start_matches('=').to_owned()
}

impl Oidc {
    /// Checks `config` and builds the client; `public_url` is the console's `--public-url`,
    /// under which the provider sends the browser back.
    pub fn new(config: OidcConfig, public_url: Option<&str>) -> Result<Self, ConsoleError> {
        let bad = |why: String| ConsoleError::Config(format!("single sign-on: {why}"));
        let public_url = public_url.ok_or_else(|| {
            bad("--oidc-issuer needs --public-url (the console's address as browsers reach it): the provider sends the browser back to <public-url>/api/v1/oidc/callback".into())
        })?;
        let issuer = Url::parse(&config.issuer).map_err(|e| bad(format!("--oidc-issuer: {e}")))?;
        if issuer.scheme == beckon_net::http::Scheme::Http
            && !issuer.host.parse::<IpAddr>().is_ok_and(|a| a.is_loopback())
            && issuer.host != "localhost"
        {
            return Err(bad(format!(
                "--oidc-issuer {} is plain http: use https (http is accepted on loopback only)",
                config.issuer
            )));
        }
        if config.client_id.is_empty() {
            return Err(bad("--oidc-client-id is empty".into()));
        }
        if config.client_secret.0.is_empty() {
            return Err(bad(
                "no client secret: give --oidc-client-secret-file FILE or BECKON_OIDC_CLIENT_SECRET"
                    .into(),
            ));
        }
        if config.role_map.is_empty() {
            return Err(bad(format!(
                "no --oidc-role VALUE=ROLE: map at least one value of the {:?} claim to viewer, operator or admin (users without a mapped value cannot sign in)",
                config.roles_claim
            )));
        }
        let trust = match &config.ca_file {
            Some(p) => beckon_net::TrustAnchors::CaFile(p.clone()),
            None => beckon_net::TrustAnchors::System,
        };
        let tls = if issuer.scheme == beckon_net::http::Scheme::Https {
            Some(Arc::new(
                beckon_net::TlsClient::new(&beckon_net::TlsSettings {
                    trust,
                    ..Default::default()
                })
                .map_err(|e| bad(format!("TLS client for the provider: {e}")))?,
            ))
        } else {
            None
        };
        let http = HttpClient::new(HttpSettings {
            tls,
            connect_timeout: PROVIDER_TIMEOUT,
            max_body: 1024 * 1024,
            ..Default::default()
        });
        Ok(Self {
            redirect_uri: format!("{public_url}{CALLBACK_PATH}"),
            config,
            http,
            provider: tokio::sync::Mutex::new(None),
            pending: std::sync::Mutex::new(HashMap::new()),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &OidcConfig {
        &self.config
    }

    /// Where the provider sends the browser back.
    pub fn redirect_uri(&self) -> &str {
        &self.redirect_uri
    }

    async fn get_json<T: serde::de::DeserializeOwned>(
        &self,
        url: &str,
        what: &str,
    ) -> Result<T, OidcError> {
        let parsed = Url::parse(url).map_err(|e| OidcError::Provider(format!("{what}: {e}")))?;
        let answer = self
            .http
            .request(
                &parsed,
                Request::get().header("Accept", "application/json"),
                PROVIDER_TIMEOUT,
            )
            .await
            .map_err(|e| OidcError::Provider(format!("reading {what} at {url}: {e}")))?;
        if answer.status != 200 {
            return Err(OidcError::Provider(format!(
                "{what} at {url} answered {}: {}",
                answer.status,
                answer.error_message()
            )));
        }
        serde_json::from_slice(&answer.body)
            .map_err(|e| OidcError::Provider(format!("{what} at {url} is not usable: {e}")))
    }

    /// The provider's metadata and keys, read again when older than [`PROVIDER_TTL`] or
    /// when `stale_keys` (an ID token named a key not in the set).
    async fn provider(&self, stale_keys: bool) -> Result<Arc<Provider>, OidcError> {
        let mut cached = self.provider.lock().await;
        if let Some(p) = cached.as_ref() {
            let age = p.read_at.elapsed();
            if age < PROVIDER_TTL && !(stale_keys && age >= KEYS_REFRESH) {
                return Ok(p.clone());
            }
        }
        let url = format!(
            "{}/.well-known/openid-configuration",
            self.config.issuer.trim_end_matches('/')
        );
        let discovery: Discovery = self.get_json(&url, "the discovery document").await?;
        if discovery.issuer != self.config.issuer {
            return Err(OidcError::Provider(format!(
                "the discovery document names the issuer {:?}, not {:?}: set --oidc-issuer to the provider's issuer exactly",
                discovery.issuer, self.config.issuer
            )));
        }
        let keys: JwkSet = self
            .get_json(&discovery.jwks_uri, "the provider's keys (jwks_uri)")
            .await?;
        let p = Arc::new(Provider {
            discovery,
            keys,
            read_at: Instant::now(),
        });
        *cached = Some(p.clone());
        Ok(p)
    }

    /// Keeps a sign-in under way under its `state`, dropping the oldest of its address (or of
    /// all) when at the limit.
    fn remember(&self, state: String, sign_in: Pending) {
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        pending.retain(|_, p| p.started.elapsed() < SIGN_IN_TIMEOUT);
        let oldest = |only: Option<IpAddr>| {
            pending
                .iter()
                .filter(|(_, p)| only.is_none_or(|a| p.from == a))
                .min_by_key(|(_, p)| p.started)
                .map(|(k, _)| k.clone())
        };
        let mine = pending.values().filter(|p| p.from == sign_in.from).count();
        let drop = if mine >= MAX_PENDING_PER_ADDRESS {
            oldest(Some(sign_in.from))
        } else if pending.len() >= MAX_PENDING {
            oldest(None)
        } else {
            None
        };
        if let Some(k) = drop {
            pending.remove(&k);
        }
        pending.insert(state, sign_in);
    }

    /// Starts a sign-in for a browser at `from`: returns the provider's authorization URL to
    /// send it to, and the state to bind to it (a cookie).
    pub async fn begin(&self, from: IpAddr) -> Result<(String, String), OidcError> {
        let provider = self.provider(false).await?;
        let state = random_text(24);
        let nonce = random_text(24);
        let verifier = random_text(32);
        let challenge = pkce_challenge(&verifier);
        self.remember(
            state.clone(),
            Pending {
                nonce: nonce.clone(),
                verifier,
                started: Instant::now(),
                from,
            },
        );
        let mut scopes = vec!["openid".to_owned()];
        scopes.extend(
            self.config
                .scopes
                .iter()
                .filter(|s| s.as_str() != "openid")
                .cloned(),
        );
        let query = form(&[
            ("response_type", "code"),
            ("client_id", &self.config.client_id),
            ("redirect_uri", &self.redirect_uri),
            ("scope", &scopes.join(" ")),
            ("state", &state),
            ("nonce", &nonce),
            ("code_challenge", &challenge),
            ("code_challenge_method", "S256"),
        ]);
        let endpoint = &provider.discovery.authorization_endpoint;
        let sep = if endpoint.contains('?') { '&' } else { '?' };
        Ok((format!("{endpoint}{sep}{query}"), state))
    }

    /// Finishes a sign-in the provider sent back with `code` for `state`: exchanges the code,
    /// checks the ID token and maps its claim to a role.
    pub async fn finish(&self, state: &str, code: &str) -> Result<SignedIn, OidcError> {
        let pending = self
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(state)
            .filter(|p| p.started.elapsed() < SIGN_IN_TIMEOUT)
            .ok_or(OidcError::UnknownState)?;
        let provider = self.provider(false).await?;
        let id_token = self.exchange(&provider, code, &pending.verifier).await?;
        let claims = self.check_id_token(&id_token, &pending.nonce).await?;
        self.signed_in(&claims)
    }

    /// The token request: the code and the PKCE verifier for the ID token.
    async fn exchange(
        &self,
        provider: &Provider,
        code: &str,
        verifier: &str,
    ) -> Result<String, OidcError> {
        let endpoint = &provider.discovery.token_endpoint;
        let url = Url::parse(endpoint)
            .map_err(|e| OidcError::Provider(format!("the token endpoint: {e}")))?;
        let mut fields = vec![
            ("grant_type", "authorization_code"),
            ("code", code),
            ("redirect_uri", self.redirect_uri.as_str()),
            ("code_verifier", verifier),
        ];
        let mut request = Request::new("POST")
            .map_err(|e| OidcError::Provider(e.to_string()))?
            .header("Accept", "application/json");
        // client_secret_basic unless the provider only takes client_secret_post.
        let post_only = provider
            .discovery
            .token_endpoint_auth_methods_supported
            .as_ref()
            .is_some_and(|m| {
                !m.iter().any(|m| m == "client_secret_basic")
                    && m.iter().any(|m| m == "client_secret_post")
            });
        if post_only {
            fields.push(("client_id", self.config.client_id.as_str()));
            fields.push(("client_secret", self.config.client_secret.0.as_str()));
        } else {
            // RFC 6749 section 2.3.1: both parts form-encoded before base64.
            let basic = STANDARD.encode(format!(
                "{}:{}",
                form_value(&self.config.client_id),
                form_value(&self.config.client_secret.0)
            ));
            request = request.header("Authorization", &format!("Basic {basic}"));
        }
        let request = request
            .header("Content-Type", "application/x-www-form-urlencoded")
            .body(form(&fields));
        let answer = self
            .http
            .request(&url, request, PROVIDER_TIMEOUT)
            .await
            .map_err(|e| OidcError::Provider(format!("the token request to {endpoint}: {e}")))?;
        let body: serde_json::Value = serde_json::from_slice(&answer.body).unwrap_or_default();
        if answer.status != 200 {
            let code = body["error"].as_str().unwrap_or("no error code");
            let description = body["error_description"].as_str().unwrap_or_default();
            return Err(OidcError::Provider(format!(
                "the token request answered {}: {code} {description}",
                answer.status
            )));
        }
        body["id_token"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| OidcError::Provider("the token answer holds no id_token".into()))
    }

    /// Checks the ID token's signature against the provider's keys, its issuer, audience,
    /// times and nonce; returns its claims.
    async fn check_id_token(
        &self,
        token: &str,
        nonce: &str,
    ) -> Result<serde_json::Map<String, serde_json::Value>, OidcError> {
        let header =
            jsonwebtoken::decode_header(token).map_err(|e| OidcError::Token(e.to_string()))?;
        // Signed by the provider's keys only: no `none`, no HMAC.
        if !matches!(
            header.alg,
            Algorithm::RS256
                | Algorithm::RS384
                | Algorithm::RS512
                | Algorithm::PS256
                | Algorithm::PS384
                | Algorithm::PS512
                | Algorithm::ES256
                | Algorithm::ES384
                | Algorithm::EdDSA
        ) {
            return Err(OidcError::Token(format!(
                "it is signed with {:?}, which the console does not accept (it wants the provider's public keys: RS*, PS*, ES256, ES384 or EdDSA)",
                header.alg
            )));
        }
        let mut provider = self.provider(false).await?;
        let mut jwk = find_key(&provider.keys, header.kid.as_deref(), header.alg);
        if jwk.is_none() {
            provider = self.provider(true).await?;
            jwk = find_key(&provider.keys, header.kid.as_deref(), header.alg);
        }
        let jwk = jwk.ok_or_else(|| {
            OidcError::Token(format!(
                "no key {:?} among the provider's keys",
                header.kid.as_deref().unwrap_or("(unnamed)")
            ))
        })?;
        let key = DecodingKey::from_jwk(jwk).map_err(|e| OidcError::Token(e.to_string()))?;
        let mut validation = Validation::new(header.alg);
        validation.set_issuer(&[&self.config.issuer]);
        validation.set_audience(&[&self.config.client_id]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        validation.leeway = 60;
        let data = jsonwebtoken::decode::<serde_json::Map<String, serde_json::Value>>(
            token,
            &key,
            &validation,
        )
        .map_err(|e| OidcError::Token(token_check(&e)))?;
        let claims = data.claims;
        if claims.get("nonce").and_then(|n| n.as_str()) != Some(nonce) {
            return Err(OidcError::Token(
                "its nonce is not the one this sign-in sent (a replayed token?)".into(),
            ));
        }
        // Several audiences: the token must be meant for this console (OIDC Core 3.1.3.7).
        if claims.get("aud").is_some_and(|a| a.is_array())
            && claims
                .get("azp")
                .is_some_and(|azp| azp.as_str() != Some(&self.config.client_id))
        {
            return Err(OidcError::Token(
                "its authorized party (azp) is another client".into(),
            ));
        }
        Ok(claims)
    }

    /// The user and role the claims name.
    fn signed_in(
        &self,
        claims: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<SignedIn, OidcError> {
        let text = |k: &str| {
            claims
                .get(k)
                .and_then(|v| v.as_str())
                .filter(|s| !s.is_empty())
        };
        let subject = text("sub").unwrap_or_default().to_owned();
        let name = text("preferred_username")
            .or_else(|| text("email"))
            .unwrap_or(subject.as_str())
            .to_owned();
        if name.is_empty() || name.chars().count() > 64 || name.chars().any(char::is_control) {
            return Err(OidcError::Name(name));
        }
        let values = claim_values(claims.get(&self.config.roles_claim));
        match map_role(&self.config.role_map, &values) {
            Some(role) => Ok(SignedIn {
                name,
                subject,
                role,
            }),
            None => Err(OidcError::NoRole {
                user: name,
                claim: self.config.roles_claim.clone(),
                values,
            }),
        }
    }
}

/// Which check an ID token failed, in words.
fn token_check(e: &jsonwebtoken::errors::Error) -> String {
    use jsonwebtoken::errors::ErrorKind;
    match e.kind() {
        ErrorKind::InvalidSignature => "its signature does not match the provider's keys".into(),
        ErrorKind::ExpiredSignature => {
            "it has expired (check that the console's and the provider's clocks agree)".into()
        }
        ErrorKind::ImmatureSignature => "it is not valid yet (nbf): check the clocks".into(),
        ErrorKind::InvalidAudience => {
            "it is meant for another client (aud), not this --oidc-client-id".into()
        }
        ErrorKind::InvalidIssuer => "another issuer (iss) made it".into(),
        ErrorKind::MissingRequiredClaim(c) => format!("it has no {c:?} claim"),
        _ => e.to_string(),
    }
}

/// The key of `kid` (or, without a kid, the one key of `alg`'s kind).
fn find_key<'a>(
    keys: &'a JwkSet,
    kid: Option<&str>,
    alg: Algorithm,
) -> Option<&'a jsonwebtoken::jwk::Jwk> {
    match kid {
        Some(kid) => keys.find(kid),
        None => {
            let family = alg.family();
            let mut fitting = keys.keys.iter().filter(|k| {
                DecodingKey::from_jwk(k).is_ok_and(|d| d.family() == family)
                    && k.common
                        .public_key_use
                        .as_ref()
                        .is_none_or(|u| matches!(u, jsonwebtoken::jwk::PublicKeyUse::Signature))
            });
            let one = fitting.next();
            // Several candidates and no kid: refuse rather than guess.
            fitting.next().is_none().then_some(one).flatten()
        }
    }
}

/// A claim's values: a string (several separated by spaces or commas) or a list of strings.
pub fn claim_values(claim: Option<&serde_json::Value>) -> Vec<String> {
    match claim {
        Some(serde_json::Value::String(s)) => s
            .split([' ', ','])
            .filter(|v| !v.is_empty())
            .map(str::to_owned)
            .collect(),
        Some(serde_json::Value::Array(items)) => items
            .iter()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect(),
        _ => Vec::new(),
    }
}

/// The highest role any of `values` maps to.
pub fn map_role(role_map: &[(String, Role)], values: &[String]) -> Option<Role> {
    role_map
        .iter()
        .filter(|(v, _)| values.iter().any(|x| x == v))
        .map(|(_, r)| *r)
        .max()
}

/// Parses `VALUE=ROLE` (`--oidc-role`).
pub fn parse_role_mapping(text: &str) -> Result<(String, Role), String> {
    let (value, role) = text
        .rsplit_once('=')
        .ok_or_else(|| format!("{text:?} is not VALUE=ROLE, e.g. beckon-admins=admin"))?;
    let role = Role::parse(role.trim()).ok_or_else(|| {
        format!("{text:?}: the role must be viewer, operator or admin, not {role:?}")
    })?;
    if value.is_empty() {
        return Err(format!("{text:?}: the claim value before = is empty"));
    }
    Ok((value.to_owned(), role))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pkce_challenge_matches_rfc_7636() {
        // RFC 7636 appendix B.
        assert_eq!(
            pkce_challenge("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"),
            "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
        );
    }

    #[test]
    fn the_highest_mapped_value_gives_the_role() {
        let map = vec![
            ("ops".to_owned(), Role::Operator),
            ("staff".to_owned(), Role::Viewer),
            ("root".to_owned(), Role::Admin),
        ];
        let v = claim_values(Some(&serde_json::json!(["staff", "ops", "other"])));
        assert_eq!(map_role(&map, &v), Some(Role::Operator));
        let v = claim_values(Some(&serde_json::json!("staff root")));
        assert_eq!(map_role(&map, &v), Some(Role::Admin));
        assert_eq!(
            map_role(&map, &claim_values(Some(&serde_json::json!(["other"])))),
            None
        );
        assert_eq!(map_role(&map, &claim_values(None)), None);
        assert_eq!(
            map_role(&map, &claim_values(Some(&serde_json::json!(7)))),
            None
        );
    }

    #[test]
    fn role_mappings_parse_or_say_why_not() {
        assert_eq!(
            parse_role_mapping("cn=ops,dc=example=operator").unwrap(),
            ("cn=ops,dc=example".to_owned(), Role::Operator)
        );
        assert!(
            parse_role_mapping("ops")
                .unwrap_err()
                .contains("VALUE=ROLE")
        );
        assert!(
            parse_role_mapping("ops=root")
                .unwrap_err()
                .contains("viewer, operator or admin")
        );
        assert!(parse_role_mapping("=admin").unwrap_err().contains("empty"));
    }

    fn config() -> OidcConfig {
        OidcConfig {
            issuer: "https://id.example.com".into(),
            client_id: "beckon".into(),
            client_secret: ClientSecret("s3cret".into()),
            provider_name: "Example".into(),
            roles_claim: "groups".into(),
            role_map: vec![("ops".into(), Role::Operator)],
            scopes: vec!["openid".into()],
            ca_file: None,
        }
    }

    #[test]
    fn one_address_starting_sign_ins_in_a_loop_drops_only_its_own() {
        let o = Oidc::new(config(), Some("https://c.example")).unwrap();
        let sign_in = |from: [u8; 4]| Pending {
            nonce: String::new(),
            verifier: String::new(),
            started: Instant::now(),
            from: IpAddr::from(from),
        };
        o.remember("victim".into(), sign_in([192, 0, 2, 1]));
        for i in 0..3 * MAX_PENDING_PER_ADDRESS {
            o.remember(format!("flood-{i}"), sign_in([198, 51, 100, 7]));
        }
        let pending = o.pending.lock().unwrap();
        assert!(pending.contains_key("victim"));
        assert_eq!(pending.len(), MAX_PENDING_PER_ADDRESS + 1);
        assert!(pending.contains_key(&format!("flood-{}", 3 * MAX_PENDING_PER_ADDRESS - 1)));
    }

    #[test]
    fn unusable_settings_are_refused_with_the_fix() {
        let err = Oidc::new(config(), None).unwrap_err().to_string();
        assert!(err.contains("--public-url"), "{err}");
        let mut c = config();
        c.role_map.clear();
        let err = Oidc::new(c, Some("https://c.example"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("--oidc-role VALUE=ROLE"), "{err}");
        let mut c = config();
        c.client_secret.0.clear();
        let err = Oidc::new(c, Some("https://c.example"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("--oidc-client-secret-file"), "{err}");
        let mut c = config();
        c.issuer = "http://id.example.com".into();
        let err = Oidc::new(c, Some("https://c.example"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("use https"), "{err}");
        let o = Oidc::new(config(), Some("https://c.example:8080")).unwrap();
        assert_eq!(
            o.redirect_uri(),
            "https://c.example:8080/api/v1/oidc/callback"
        );
        // The secret never shows in a debug print of the settings.
        assert!(!format!("{:?}", config()).contains("s3cret"));
    }
}

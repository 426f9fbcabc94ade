//! How a node secures its NATS connection: TLS verified against the NATS servers' CA, and
//! the credentials NATS asks for (user and password, a token, an NKey, or a user JWT and its
//! NKey seed from a `.creds` file).

use std::fmt;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;

use crate::link::ClusterError;

/// The credentials a node shows NATS.
#[derive(Clone, Default, PartialEq, Eq)]
pub enum NatsAuth {
    /// None (or those written in the URLs, `nats://user:password@host:4222`).
    #[default]
    None,
    /// A user and its password (nats-server `authorization { user, password }` or `users`).
    UserPassword {
        /// The user.
        user: String,
        /// Its password.
        password: String,
    },
    /// A token (nats-server `authorization { token }`).
    Token(String),
    /// An NKey user's seed (`SU...`; nats-server `authorization { users = [{ nkey: U... }] }`):
    /// the node signs the server's challenge, no secret crosses the network.
    NKey(String),
    /// A user of NATS' decentralized accounts (operator mode), as a `.creds` file holds it:
    /// the user JWT its account signed, and the user's NKey seed (`SU...`) that signs the
    /// server's challenge.
    Credentials {
        /// The user JWT.
        jwt: String,
        /// The user's NKey seed.
        seed: String,
    },
}

// Secrets stay out of logs.
impl fmt::Debug for NatsAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::None => f.write_str("None"),
            Self::UserPassword { user, .. } => write!(f, "UserPassword({user:?}, <secret>)"),
            Self::Token(_) => f.write_str("Token(<secret>)"),
            Self::NKey(_) => f.write_str("NKey(<secret>)"),
            // A bearer JWT is a secret on its own.
            Self::Credentials { .. } => f.write_str("Credentials(<secret>, <secret>)"),
        }
    }
}

/// TLS and credentials towards NATS.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NatsSecurity {
    /// The CA certificates (PEM) the NATS servers' certificates are verified against. When
    /// set, every connection to NATS uses TLS; the server's certificate must name the host of
    /// its URL.
    pub ca: Option<PathBuf>,
    /// The credentials.
    pub auth: NatsAuth,
}

impl NatsSecurity {
    /// Applies TLS and credentials to the client's options; the server certificates that fail
    /// verification are noted in `rejected`.
    pub(crate) fn apply(
        &self,
        options: async_nats::ConnectOptions,
        servers: &[String],
        rejected: &Rejected,
    ) -> Result<async_nats::ConnectOptions, ClusterError> {
        let options = match &self.ca {
            None => options,
            Some(ca) => {
                let bad = |reason: String| ClusterError::Connect {
                    servers: servers.to_vec(),
                    reason: format!("cluster.ca: {reason}"),
                };
                let roots = beckon_pki::load_roots(ca).map_err(|e| bad(e.to_string()))?;
                let verifier = beckon_pki::observing_server_verifier(roots, rejected.clone())
                    .map_err(|e| bad(e.to_string()))?;
                let tls = beckon_pki::client_config(
                    beckon_pki::ServerVerification::Custom(verifier),
                    None,
                    &beckon_pki::ClientTlsOptions::default(),
                )
                .map_err(|e| bad(e.to_string()))?;
                options.require_tls(true).tls_client_config(tls)
            }
        };
        Ok(match &self.auth {
            NatsAuth::None => options,
            NatsAuth::Credentials { jwt, seed } => {
                let pair = nkeys::KeyPair::from_seed(seed).map_err(|e| ClusterError::Connect {
                    servers: servers.to_vec(),
                    reason: format!("cluster.credentials_file: invalid NKey seed: {e}"),
                })?;
                let pair = Arc::new(pair);
                // What async-nats' `credentials` does with a parsed `.creds` text.
                options.jwt(jwt.clone(), move |nonce| {
                    let pair = pair.clone();
                    async move { pair.sign(&nonce).map_err(async_nats::AuthError::new) }
                })
            }
            NatsAuth::UserPassword { user, password } => {
                options.user_and_password(user.clone(), password.clone())
            }
            NatsAuth::Token(token) => options.token(token.clone()),
            NatsAuth::NKey(seed) => options.nkey(seed.clone()),
        })
    }
}

/// Why the last NATS server certificate was rejected: the NATS client reports a failed
/// handshake as an I/O error, like a refused connection, so the verifier keeps the reason.
pub(crate) type Rejected = Arc<beckon_pki::Observations>;

/// The host of a NATS URL (`nats://host:4222`, `tls://user:pw@[::1]:4222`, `host:4222`, `host`).
pub fn url_host(url: &str) -> &str {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let rest = rest.split(['/', '?']).next().unwrap_or_default();
    let rest = rest.rsplit_once('@').map_or(rest, |(_, r)| r);
    if let Some(v6) = rest.strip_prefix('[') {
        return v6.split(']').next().unwrap_or_default();
    }
    rest.split(':').next().unwrap_or_default()
}

/// Whether the URL names this machine (`localhost`, 127.0.0.0/8, `::1`): traffic that never
/// leaves it needs no TLS.
pub fn is_loopback(url: &str) -> bool {
    let host = url_host(url);
    host.eq_ignore_ascii_case("localhost")
        || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// The servers that cannot be reached without leaving the machine in clear text: every one
/// not on loopback when no CA is configured (TLS off).
pub fn plain_remote_servers<'a>(servers: &'a [String], security: &NatsSecurity) -> Vec<&'a str> {
    if security.ca.is_some() {
        return Vec::new();
    }
    servers
        .iter()
        .map(String::as_str)
        .filter(|s| !is_loopback(s))
        .collect()
}

/// Why a connection attempt failed for a reason of the node's own configuration, from what
/// the NATS client reported (a kind, given as its display text) and a rejected certificate;
/// `auth` names the keys to check.
pub(crate) fn refusal(client_error: &str, rejected: &Rejected, auth: &NatsAuth) -> Option<String> {
    if client_error == "authorization violation" {
        let check = match auth {
            NatsAuth::None => {
                "this node shows NATS no credentials: set cluster.user and cluster.password (or cluster.token, cluster.nkey_seed_file or cluster.credentials_file) as the nats-server configuration asks"
            }
            NatsAuth::UserPassword { .. } => {
                "check cluster.user and cluster.password against the nats-server authorization block"
            }
            NatsAuth::Token(_) => "check cluster.token against the nats-server authorization block",
            NatsAuth::NKey(_) => {
                "check that the public key of cluster.nkey_seed_file is listed in the nats-server authorization block"
            }
            NatsAuth::Credentials { .. } => {
                "check that the account which signed the user JWT of cluster.credentials_file is known to the nats-server resolver (operator mode), that the JWT has not expired and that the user is not revoked"
            }
        };
        return Some(format!(
            "NATS refused this node's credentials (authorization violation): {check}"
        ));
    }
    let certificate = rejected.take_rejection()?;
    Some(format!(
        "the TLS handshake with NATS failed, its certificate was rejected: {certificate}; check that cluster.ca holds the CA that signed the nats-server certificate and that the certificate names the host of the URL"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_of_urls() {
        for (url, host) in [
            ("nats://10.0.0.5:4222", "10.0.0.5"),
            ("tls://user:pw@nats.example.com:4222", "nats.example.com"),
            ("nats://[::1]:4222", "::1"),
            ("127.0.0.1:4222", "127.0.0.1"),
            ("localhost", "localhost"),
            ("nats://a:b@c@host", "host"),
        ] {
            assert_eq!(url_host(url), host, "{url}");
        }
    }

    #[test]
    fn only_loopback_may_go_without_tls() {
        let servers: Vec<String> = [
            "nats://127.0.0.1:4222",
            "nats://LOCALHOST:4222",
            "nats://[::1]:4222",
            "nats://10.0.0.5:4222",
            "nats.example.com:4222",
        ]
        .map(String::from)
        .to_vec();
        assert_eq!(
            plain_remote_servers(&servers, &NatsSecurity::default()),
            ["nats://10.0.0.5:4222", "nats.example.com:4222"]
        );
        let tls = NatsSecurity {
            ca: Some("ca.pem".into()),
            auth: NatsAuth::None,
        };
        assert!(plain_remote_servers(&servers, &tls).is_empty());
    }

    #[test]
    fn secrets_stay_out_of_debug_output() {
        let auth = NatsAuth::UserPassword {
            user: "beckon".into(),
            password: "hunter2".into(),
        };
        assert!(!format!("{auth:?}").contains("hunter2"));
        assert!(!format!("{:?}", NatsAuth::Token("t0ken".into())).contains("t0ken"));
        assert!(!format!("{:?}", NatsAuth::NKey("SUA".into())).contains("SUA"));
        let creds = NatsAuth::Credentials {
            jwt: "eyJhead.eyJclaims.sig".into(),
            seed: "SUA".into(),
        };
        let text = format!("{creds:?}");
        assert!(!text.contains("eyJ") && !text.contains("SUA"), "{text}");
    }

    #[test]
    fn a_refusal_names_the_keys_of_the_credentials_in_use() {
        let refused = |auth: NatsAuth| {
            refusal("authorization violation", &Rejected::default(), &auth).expect("refusal")
        };
        let creds = refused(NatsAuth::Credentials {
            jwt: "a.b.c".into(),
            seed: "SU".into(),
        });
        assert!(
            creds.contains("cluster.credentials_file") && !creds.contains("cluster.password"),
            "{creds}"
        );
        let nkey = refused(NatsAuth::NKey("SU".into()));
        assert!(nkey.contains("cluster.nkey_seed_file"), "{nkey}");
        assert!(refused(NatsAuth::None).contains("no credentials"));
        assert_eq!(
            refusal("connection refused", &Rejected::default(), &NatsAuth::None),
            None
        );
    }
}

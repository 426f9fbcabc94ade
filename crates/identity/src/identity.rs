//! Who a connection is: `(tenant, role, id)`, with the character rules that keep every part
//! safe inside an MQTT topic, a file name and a log line.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Longest tenant id, in bytes.
pub const MAX_TENANT_LEN: usize = 64;
/// Longest agent or server id, in bytes.
pub const MAX_ID_LEN: usize = 128;

/// Why a tenant id, an agent/server id or a role was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    /// The value is empty.
    #[error("{what} is empty")]
    Empty {
        /// Which part of the identity ("tenant id", "id").
        what: &'static str,
    },
    /// The value is longer than the limit.
    #[error("{what} {value:?} is {len} bytes long; the limit is {max}")]
    TooLong {
        /// Which part of the identity.
        what: &'static str,
        /// The refused value (cut to the limit, for the log).
        value: String,
        /// Its length in bytes.
        len: usize,
        /// The limit in bytes.
        max: usize,
    },
    /// The value contains a character that is not allowed.
    #[error("{what} {value:?} contains {ch:?}, which is not allowed: {rule}")]
    ForbiddenCharacter {
        /// Which part of the identity.
        what: &'static str,
        /// The refused value.
        value: String,
        /// The first offending character.
        ch: char,
        /// The rule it broke, in words.
        rule: &'static str,
    },
    /// The role is neither `agent` nor `server`.
    #[error("role {0:?} is unknown: use \"agent\" or \"server\"")]
    UnknownRole(String),
}

/// `value` (a `what`) is 1 to `max` bytes long.
fn check_length(what: &'static str, value: &str, max: usize) -> Result<(), IdentityError> {
    if value.is_empty() {
        return Err(IdentityError::Empty { what });
    }
    if value.len() > max {
        return Err(IdentityError::TooLong {
            what,
            value: shorten(value, max),
            len: value.len(),
            max,
        });
    }
    Ok(())
}

fn shorten(value: &str, max: usize) -> String {
    let mut end = max.min(value.len());
    while !value.is_char_boundary(end) {
        end -= 1;
    }
    value[..end].to_owned()
}

/// A tenant id: 1 to 64 bytes of lowercase ASCII letters, digits, `-`, `_` and `.`, starting
/// with a letter or a digit. Tenant ids name files (`tenants/<id>.toml`) and the first level of
/// the tenant's topic namespace, hence the narrow alphabet.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct TenantId(String);

impl TenantId {
    /// Checks `value` against the tenant id rules.
    pub fn new(value: impl Into<String>) -> Result<Self, IdentityError> {
        let value = value.into();
        const WHAT: &str = "tenant id";
        check_length(WHAT, &value, MAX_TENANT_LEN)?;
        for (i, ch) in value.chars().enumerate() {
            let allowed = ch.is_ascii_lowercase()
                || ch.is_ascii_digit()
                || (i > 0 && matches!(ch, '-' | '_' | '.'));
            if !allowed {
                let rule = if i == 0 && matches!(ch, '-' | '_' | '.') {
                    "a tenant id starts with a lowercase letter or a digit"
                } else {
                    "a tenant id uses only lowercase ASCII letters, digits, '-', '_' and '.'"
                };
                return Err(IdentityError::ForbiddenCharacter {
                    what: WHAT,
                    value,
                    ch,
                    rule,
                });
            }
        }
        Ok(Self(value))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for TenantId {
    type Error = IdentityError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        Self::new(value)
    }
}

impl From<TenantId> for String {
    fn from(value: TenantId) -> Self {
        value.0
    }
}

impl FromStr for TenantId {
    type Err = IdentityError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl fmt::Display for TenantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

// Ordering and hashing are the inner string's, so maps keyed by TenantId can be queried by &str.
impl std::borrow::Borrow<str> for TenantId {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl AsRef<str> for TenantId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

/// Checks an agent or server id: 1 to 128 bytes of printable characters without white space,
/// control characters or the MQTT topic characters `/`, `+`, `#` and `$`.
pub fn validate_id(value: &str) -> Result<(), IdentityError> {
    const WHAT: &str = "id";
    check_length(WHAT, value, MAX_ID_LEN)?;
    for ch in value.chars() {
        let rule = match ch {
            '/' => "'/' separates topic levels",
            '+' | '#' => "'+' and '#' are MQTT wildcards",
            '$' => "'$' marks broker-reserved topics",
            c if c.is_control() => "control characters (NUL included) are not allowed",
            c if c.is_whitespace() => "white space is not allowed",
            _ => continue,
        };
        return Err(IdentityError::ForbiddenCharacter {
            what: WHAT,
            value: value.to_owned(),
            ch,
            rule,
        });
    }
    Ok(())
}

/// What a connection is allowed to be: an endpoint agent or a management server (console).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// An endpoint agent: receives its own wake-ups, publishes its own acks.
    Agent,
    /// A management server: addresses the agents of its tenant, reads their acks and presence.
    Server,
}

impl Role {
    /// The role as written in tokens, certificates (OU) and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Agent => "agent",
            Role::Server => "server",
        }
    }
}

impl FromStr for Role {
    type Err = IdentityError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "agent" => Ok(Role::Agent),
            "server" => Ok(Role::Server),
            other => Err(IdentityError::UnknownRole(shorten(other, 32))),
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An authenticated identity: tenant, role and id. Two connections with the same identity are
/// the same MQTT client (the second takes the session over).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "IdentityParts")]
pub struct Identity {
    /// The tenant the connection belongs to.
    pub tenant: TenantId,
    /// Agent or server.
    pub role: Role,
    /// The agent or server id, unique within tenant and role.
    id: String,
}

impl Identity {
    /// Builds an identity, checking the id rules ([`validate_id`]).
    pub fn new(tenant: TenantId, role: Role, id: impl Into<String>) -> Result<Self, IdentityError> {
        let id = id.into();
        validate_id(&id)?;
        Ok(Self { tenant, role, id })
    }

    /// Builds an identity from three strings, checking every rule.
    pub fn parse(tenant: &str, role: &str, id: &str) -> Result<Self, IdentityError> {
        Self::new(TenantId::new(tenant)?, role.parse()?, id)
    }

    /// The agent or server id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// A key that names this identity uniquely across tenants and roles
    /// (`{tenant}/{role}/{id}`): the broker keys sessions and cluster-wide client-id ownership
    /// by it, because two tenants may well both have an agent called `pc-1`.
    pub fn session_key(&self) -> String {
        format!("{}/{}/{}", self.tenant, self.role, self.id)
    }
}

/// The unchecked shape of a serialized [`Identity`]; deserialization goes through the checks.
#[derive(Deserialize)]
struct IdentityParts {
    tenant: TenantId,
    role: Role,
    id: String,
}

impl TryFrom<IdentityParts> for Identity {
    type Error = IdentityError;
    fn try_from(parts: IdentityParts) -> Result<Self, Self::Error> {
        Self::new(parts.tenant, parts.role, parts.id)
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}/{}", self.tenant, self.role, self.id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenant_ids_follow_the_file_name_rules() {
        for good in ["acme", "a", "acme-corp.eu_1", "0day"] {
            assert!(TenantId::new(good).is_ok(), "{good}");
        }
        let err = TenantId::new("Acme").unwrap_err();
        assert!(err.to_string().contains("lowercase"), "{err}");
        let err = TenantId::new(".hidden").unwrap_err();
        assert!(err.to_string().contains("starts with"), "{err}");
        assert!(matches!(
            TenantId::new("a/b"),
            Err(IdentityError::ForbiddenCharacter { ch: '/', .. })
        ));
        assert_eq!(
            TenantId::new(""),
            Err(IdentityError::Empty { what: "tenant id" })
        );
        let long = "a".repeat(65);
        assert!(matches!(
            TenantId::new(long),
            Err(IdentityError::TooLong {
                len: 65,
                max: 64,
                ..
            })
        ));
        assert!(TenantId::new("a".repeat(64)).is_ok());
    }

    #[test]
    fn ids_refuse_topic_characters_and_say_which_rule_broke() {
        for good in [
            "pc-42",
            "PC_42.example.com",
            "550e8400-e29b",
            "ünïcødé",
            "a:b@c",
        ] {
            assert!(validate_id(good).is_ok(), "{good}");
        }
        let cases = [
            ("a/b", '/', "separates topic levels"),
            ("a+b", '+', "wildcards"),
            ("a#", '#', "wildcards"),
            ("$SYS", '$', "broker-reserved"),
            ("a\0b", '\0', "NUL"),
            ("a b", ' ', "white space"),
            ("a\tb", '\t', "control"),
        ];
        for (value, bad, rule) in cases {
            match validate_id(value) {
                Err(err @ IdentityError::ForbiddenCharacter { ch, .. }) => {
                    assert_eq!(ch, bad, "{value:?}");
                    assert!(err.to_string().contains(rule), "{err}");
                }
                other => panic!("{value:?}: {other:?}"),
            }
        }
        assert!(validate_id(&"x".repeat(128)).is_ok());
        assert!(matches!(
            validate_id(&"é".repeat(65)),
            Err(IdentityError::TooLong { len: 130, .. })
        ));
        assert!(validate_id("").is_err());
    }

    #[test]
    fn roles_parse_and_print() {
        assert_eq!("agent".parse::<Role>(), Ok(Role::Agent));
        assert_eq!("server".parse::<Role>(), Ok(Role::Server));
        assert_eq!(
            "admin".parse::<Role>(),
            Err(IdentityError::UnknownRole("admin".into()))
        );
        assert_eq!(Role::Server.to_string(), "server");
    }

    #[test]
    fn identity_displays_and_keys_sessions_by_all_three_parts() {
        let a = Identity::parse("acme", "agent", "pc-1").unwrap();
        let b = Identity::parse("globex", "agent", "pc-1").unwrap();
        let s = Identity::parse("acme", "server", "pc-1").unwrap();
        assert_eq!(a.to_string(), "acme/agent/pc-1");
        assert_ne!(a.session_key(), b.session_key());
        assert_ne!(a.session_key(), s.session_key());
        assert!(Identity::parse("acme", "agent", "pc/1").is_err());
    }

    #[test]
    fn tenant_id_deserialization_checks_the_rules() {
        let ok: TenantId = serde_json::from_str("\"acme\"").unwrap();
        assert_eq!(ok.as_str(), "acme");
        assert!(serde_json::from_str::<TenantId>("\"ac/me\"").is_err());
        let id: Identity =
            serde_json::from_str(r#"{"tenant":"acme","role":"agent","id":"pc-1"}"#).unwrap();
        assert_eq!(id.id(), "pc-1");
        assert!(
            serde_json::from_str::<Identity>(r#"{"tenant":"acme","role":"agent","id":"a/#"}"#)
                .is_err()
        );
    }
}

//! Users, sessions, API tokens and enrollment tokens, and the failed authentications the
//! throttles count (`auth_failures`, which `migrate-store` leaves behind: they only matter
//! for five minutes).

use super::agents::{check_groups_exist, usable_token};
use super::*;
use crate::model::*;
use crate::oidc::SSO_PASSWORD_HASH;
use crate::store::*;

/// The tables of who may do what, for `migrate-store`.
pub(in crate::store) const AUTH_TABLES: &[&Table] = &[
    &Table {
        name: "enrollment_tokens",
        key: "id",
        columns: "id, hash, label, created_at, created_by, expires_at, max_uses, uses, groups, revoked",
        identity: None,
    },
    &Table {
        name: "users",
        key: "name",
        columns: "name, password_hash, created_at, role",
        identity: None,
    },
    &Table {
        name: "sessions",
        key: "hash",
        columns: "hash, user_name, created_at, expires_at, last_used_at",
        identity: None,
    },
    &Table {
        name: "api_tokens",
        key: "id",
        columns: "id, hash, name, created_at, revoked, role, created_by",
        identity: None,
    },
];

pub(super) fn token_from_row(row: &Row) -> Result<EnrollmentToken, DbError> {
    let groups: String = row.get(7)?;
    Ok(EnrollmentToken {
        id: row.get(0)?,
        label: row.get(1)?,
        created_at: row.get(2)?,
        created_by: row.get(3)?,
        expires_at: row.get(4)?,
        max_uses: row.get(5)?,
        uses: row.get(6)?,
        groups: json_list(&groups),
        revoked: row.get(8)?,
    })
}

pub(super) const TOKEN_COLUMNS: &str =
    "id, label, created_at, created_by, expires_at, max_uses, uses, groups, revoked";

impl AuthStore for SqlStore {
    fn check_enrollment_token(&self, token_hash: &[u8; 32], now: Millis) -> StoreResult<()> {
        self.read(|conn| usable_token(conn, token_hash, now).map(drop))
    }

    fn create_enrollment_token(&self, t: NewEnrollmentToken) -> StoreResult<EnrollmentToken> {
        let now = now_ms();
        self.write(|tx| {
            check_groups_exist(tx, &t.groups)?;
            exec(
                tx,
                "INSERT INTO enrollment_tokens (id, hash, label, created_at, created_by, expires_at, max_uses, groups) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                params![&t.id, &t.hash, &t.label, now, &t.created_by, t.expires_at, t.max_uses, to_json(&t.groups)?],
                "recording an enrollment token",
            )?;
            Ok(())
        })?;
        Ok(EnrollmentToken {
            id: t.id,
            label: t.label,
            created_at: now,
            created_by: t.created_by,
            expires_at: t.expires_at,
            max_uses: t.max_uses,
            uses: 0,
            groups: t.groups,
            revoked: false,
        })
    }

    fn list_enrollment_tokens(&self) -> StoreResult<Vec<EnrollmentToken>> {
        self.read(|conn| {
            query_all(
                conn,
                &format!(
                    "SELECT {TOKEN_COLUMNS} FROM enrollment_tokens ORDER BY created_at DESC, id"
                ),
                params![],
                token_from_row,
                "listing enrollment tokens",
            )
        })
    }

    fn revoke_enrollment_token(&self, id: &str) -> StoreResult<()> {
        self.change_one(
            "UPDATE enrollment_tokens SET revoked = 1 WHERE id = ?1",
            "enrollment token",
            id,
            "revoking an enrollment token",
        )
    }

    fn create_user(
        &self,
        name: &str,
        password_hash: &str,
        role: Role,
        now: Millis,
    ) -> StoreResult<()> {
        self.write(|tx| {
            let exists: bool = query_one(
                tx,
                "SELECT EXISTS(SELECT 1 FROM users WHERE name = ?1)",
                params![name],
                "checking a user",
            )?;
            if exists {
                return Err(StoreError::Conflict(format!(
                    "user {name:?} already exists"
                )));
            }
            exec(
                tx,
                "INSERT INTO users (name, password_hash, role, created_at) VALUES (?1, ?2, ?3, ?4)",
                params![name, password_hash, role.as_str(), now],
                "creating a user",
            )?;
            Ok(())
        })
    }

    fn list_users(&self) -> StoreResult<Vec<User>> {
        self.read(|conn| {
            query_all(
                conn,
                "SELECT name, role, created_at, password_hash FROM users ORDER BY name",
                params![],
                |r| {
                    Ok(User {
                        name: r.get(0)?,
                        role: role_column(r, 1)?,
                        created_at: r.get(2)?,
                        sso: r.get::<String>(3)? == SSO_PASSWORD_HASH,
                    })
                },
                "listing users",
            )
        })
    }

    fn set_user_role(&self, name: &str, role: Role) -> StoreResult<Role> {
        self.write(|tx| {
            let (before, hash) = query_opt(
                tx,
                "SELECT role, password_hash FROM users WHERE name = ?1",
                params![name],
                |r| Ok((role_column(r, 0)?, r.get::<String>(1)?)),
                "reading a user",
            )?
            .ok_or_else(|| not_found("user", name))?;
            if hash == SSO_PASSWORD_HASH {
                return Err(StoreError::Conflict(format!(
                    "{name:?} signs in through single sign-on: the role comes from the provider's claim at each sign-in; change it at the provider"
                )));
            }
            if before == Role::Admin && role != Role::Admin {
                let admins: i64 = query_one(
                    tx,
                    "SELECT COUNT(*) FROM users WHERE role = 'admin'",
                    params![],
                    "counting admins",
                )?;
                if admins <= 1 {
                    return Err(StoreError::Conflict(format!(
                        "{name:?} is the only admin: make another user admin first, so that someone can still manage the console"
                    )));
                }
            }
            exec(
                tx,
                "UPDATE users SET role = ?1 WHERE name = ?2",
                params![role.as_str(), name],
                "changing a user's role",
            )?;
            Ok(before)
        })
    }

    fn sign_in_sso_user(&self, name: &str, role: Role, now: Millis) -> StoreResult<Option<Role>> {
        self.write(|tx| {
            let found = query_opt(
                tx,
                "SELECT role, password_hash FROM users WHERE name = ?1",
                params![name],
                |r| Ok((role_column(r, 0)?, r.get::<String>(1)?)),
                "reading a user",
            )?;
            match found {
                Some((_, hash)) if hash != SSO_PASSWORD_HASH => Err(StoreError::Conflict(format!(
                    "a local user named {name:?} exists: single sign-on does not take over local users (sign in as that local user, or use another name at the provider)"
                ))),
                Some((before, _)) => {
                    exec(
                        tx,
                        "UPDATE users SET role = ?1 WHERE name = ?2",
                        params![role.as_str(), name],
                        "changing a user's role",
                    )?;
                    Ok(Some(before))
                }
                None => {
                    exec(
                        tx,
                        "INSERT INTO users (name, password_hash, role, created_at) VALUES (?1, ?2, ?3, ?4)",
                        params![name, SSO_PASSWORD_HASH, role.as_str(), now],
                        "creating a user",
                    )?;
                    Ok(None)
                }
            }
        })
    }

    fn set_password(&self, name: &str, password_hash: &str) -> StoreResult<()> {
        self.write(|tx| {
            let n = exec(
                tx,
                "UPDATE users SET password_hash = ?1 WHERE name = ?2",
                params![password_hash, name],
                "changing a password",
            )?;
            touched(n, "user", name)?;
            exec(
                tx,
                "DELETE FROM sessions WHERE user_name = ?1",
                params![name],
                "ending a user's sessions",
            )?;
            Ok(())
        })
    }

    fn user_count(&self) -> StoreResult<u64> {
        self.read(|conn| {
            query_one(
                conn,
                "SELECT COUNT(*) FROM users",
                params![],
                "counting users",
            )
        })
    }

    fn password_hash(&self, name: &str) -> StoreResult<String> {
        self.read(|conn| {
            query_opt(
                conn,
                "SELECT password_hash FROM users WHERE name = ?1",
                params![name],
                |r| r.get(0),
                "reading a user",
            )?
            .ok_or_else(|| not_found("user", name))
        })
    }

    fn upgrade_password_hash(
        &self,
        name: &str,
        current: &str,
        upgraded: &str,
    ) -> StoreResult<bool> {
        self.read(|conn| {
            exec(
                conn,
                "UPDATE users SET password_hash = ?1 WHERE name = ?2 AND password_hash = ?3",
                params![upgraded, name, current],
                "upgrading a password hash",
            )
            .map(|n| n > 0)
        })
    }

    fn create_session(&self, session: NewSession) -> StoreResult<()> {
        self.write(|tx| {
            // Old sessions are cleared as new ones are made, so the table stays small.
            exec(
                tx,
                "DELETE FROM sessions WHERE expires_at <= ?1",
                params![session.created_at],
                "clearing old sessions",
            )?;
            exec(
                tx,
                "INSERT INTO sessions (hash, user_name, created_at, expires_at, last_used_at) VALUES (?1, ?2, ?3, ?4, ?3)",
                params![&session.hash, &session.user, session.created_at, session.expires_at],
                "recording a session",
            )?;
            Ok(())
        })
    }

    fn session(&self, hash: &[u8; 32], now: Millis) -> StoreResult<Principal> {
        self.read(|conn| {
            query_opt(
                conn,
                "SELECT s.user_name, u.role FROM sessions s JOIN users u ON u.name = s.user_name WHERE s.hash = ?1 AND s.expires_at > ?2",
                params![hash, now],
                |r| {
                    Ok(Principal {
                        name: format!("user:{}", r.get::<String>(0)?),
                        role: role_column(r, 1)?,
                    })
                },
                "reading a session",
            )
        })?
        .ok_or_else(|| StoreError::Refused("the session has ended: log in again".into()))
    }

    fn record_session_use(&self, hash: &[u8; 32], now: Millis) -> StoreResult<()> {
        self.read(|conn| {
            exec(
                conn,
                "UPDATE sessions SET last_used_at = ?2 WHERE hash = ?1",
                params![hash, now],
                "recording a session's use",
            )?;
            Ok(())
        })
    }

    fn resume_session(&self, hash: &[u8; 32], now: Millis, idle: Millis) -> StoreResult<bool> {
        self.read(|conn| {
            let resumed = exec(
                conn,
                "UPDATE sessions SET last_used_at = ?2 WHERE hash = ?1 AND COALESCE(last_used_at, created_at) > ?3",
                params![hash, now, now.saturating_sub(idle)],
                "resuming a session",
            )?;
            Ok(resumed == 1)
        })
    }

    fn delete_session(&self, hash: &[u8; 32]) -> StoreResult<()> {
        self.read(|conn| {
            exec(
                conn,
                "DELETE FROM sessions WHERE hash = ?1",
                params![hash],
                "ending a session",
            )?;
            Ok(())
        })
    }

    fn create_api_token(&self, t: NewApiToken) -> StoreResult<ApiToken> {
        self.read(|conn| {
            exec(
                conn,
                "INSERT INTO api_tokens (id, hash, name, created_at, role, created_by) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![&t.id, &t.hash, &t.name, t.created_at, t.role.as_str(), &t.created_by],
                "recording an API token",
            )
        })?;
        Ok(ApiToken {
            id: t.id,
            name: t.name,
            created_at: t.created_at,
            revoked: false,
            role: t.role,
            created_by: t.created_by,
        })
    }

    fn api_token(&self, hash: &[u8; 32]) -> StoreResult<Principal> {
        // A token made by a user is held to that user's role now (a demoted or removed
        // creator takes their tokens' rights down too).
        self.read(|conn| {
            query_opt(
                conn,
                API_TOKEN,
                params![hash],
                |r| {
                    let own = role_column(r, 1)?;
                    let by_user = r
                        .get::<Option<String>>(2)?
                        .is_some_and(|c| c.starts_with("user:"));
                    let creator: Option<String> = r.get(3)?;
                    let role = match (by_user, creator.as_deref().and_then(Role::parse)) {
                        (false, _) => own,
                        (true, Some(c)) => own.min(c),
                        (true, None) => Role::Viewer,
                    };
                    Ok(Principal {
                        name: format!("token:{}", r.get::<String>(0)?),
                        role,
                    })
                },
                "reading an API token",
            )
        })?
        .ok_or_else(|| {
            StoreError::Refused(
                "the API token is not valid (unknown or revoked): create a new one on the API tokens page in the console (or POST /api/v1/api-tokens)".into(),
            )
        })
    }

    fn list_api_tokens(&self) -> StoreResult<Vec<ApiToken>> {
        self.read(|conn| {
            query_all(
                conn,
                "SELECT id, name, created_at, revoked, role, created_by FROM api_tokens ORDER BY created_at DESC, id",
                params![],
                |r| {
                    Ok(ApiToken {
                        id: r.get(0)?,
                        name: r.get(1)?,
                        created_at: r.get(2)?,
                        revoked: r.get(3)?,
                        role: role_column(r, 4)?,
                        created_by: r.get(5)?,
                    })
                },
                "listing API tokens",
            )
        })
    }

    fn revoke_api_token(&self, id: &str) -> StoreResult<()> {
        self.change_one(
            "UPDATE api_tokens SET revoked = 1 WHERE id = ?1",
            "API token",
            id,
            "revoking an API token",
        )
    }

    fn record_auth_failure(
        &self,
        kind: FailureKind,
        key: &str,
        at: Millis,
        since: Millis,
    ) -> StoreResult<u64> {
        // Consoles recording failures of one key at once delete the same old rows.
        self.write_again_on_deadlock(|tx| {
            exec(
                tx,
                "DELETE FROM auth_failures WHERE kind = ?1 AND key = ?2 AND at <= ?3",
                params![kind.as_str(), key, since],
                "forgetting old failed authentications",
            )?;
            exec(
                tx,
                "INSERT INTO auth_failures (kind, key, at) VALUES (?1, ?2, ?3)",
                params![kind.as_str(), key, at],
                "recording a failed authentication",
            )?;
            query_one(
                tx,
                "SELECT COUNT(*) FROM auth_failures WHERE kind = ?1 AND key = ?2 AND at > ?3",
                params![kind.as_str(), key, since],
                "counting failed authentications",
            )
        })
    }

    fn recent_auth_failures(
        &self,
        kind: FailureKind,
        key: &str,
        since: Millis,
        limit: u32,
    ) -> StoreResult<Vec<Millis>> {
        self.read(|conn| {
            query_all(
                conn,
                "SELECT at FROM auth_failures WHERE kind = ?1 AND key = ?2 AND at > ?3 ORDER BY at DESC LIMIT ?4",
                params![kind.as_str(), key, since, limit],
                |r| r.get(0),
                "reading failed authentications",
            )
        })
    }

    fn clear_auth_failures(&self, kind: FailureKind, key: &str) -> StoreResult<()> {
        self.read(|conn| {
            exec(
                conn,
                "DELETE FROM auth_failures WHERE kind = ?1 AND key = ?2",
                params![kind.as_str(), key],
                "forgetting failed authentications",
            )?;
            Ok(())
        })
    }

    fn prune_auth_failures(&self, before: Millis, limit: u32) -> StoreResult<u64> {
        self.read(|conn| {
            exec(
                conn,
                "DELETE FROM auth_failures WHERE id IN (SELECT id FROM auth_failures WHERE at <= ?1 ORDER BY at LIMIT ?2)",
                params![before, limit],
                "deleting old failed authentications",
            )
        })
    }
}

/// A role column; a value this build does not know reads as the least role.
fn role_column(r: &Row, i: usize) -> Result<Role, DbError> {
    Ok(Role::parse(&r.get::<String>(i)?).unwrap_or(Role::Viewer))
}

/// The unrevoked API token with the hash `?1`, and the role of the user who made it: a
/// lookup of users by name (matching `'user:' || name` instead read every user each time).
pub(super) const API_TOKEN: &str = "SELECT t.name, t.role, t.created_by, u.role FROM api_tokens t LEFT JOIN users u ON u.name = substr(t.created_by, 6) AND substr(t.created_by, 1, 5) = 'user:' WHERE t.hash = ?1 AND t.revoked = 0";

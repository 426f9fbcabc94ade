//! Users, sessions, API tokens and enrollment tokens.

use super::agents::{check_groups_exist, usable_token};
use super::*;
use crate::model::*;
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
        columns: "name, password_hash, created_at",
        identity: None,
    },
    &Table {
        name: "sessions",
        key: "hash",
        columns: "hash, user_name, created_at, expires_at",
        identity: None,
    },
    &Table {
        name: "api_tokens",
        key: "id",
        columns: "id, hash, name, created_at, revoked",
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

    fn create_user(&self, name: &str, password_hash: &str, now: Millis) -> StoreResult<()> {
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
                "INSERT INTO users (name, password_hash, created_at) VALUES (?1, ?2, ?3)",
                params![name, password_hash, now],
                "creating a user",
            )?;
            Ok(())
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
                "INSERT INTO sessions (hash, user_name, created_at, expires_at) VALUES (?1, ?2, ?3, ?4)",
                params![&session.hash, &session.user, session.created_at, session.expires_at],
                "recording a session",
            )?;
            Ok(())
        })
    }

    fn session(&self, hash: &[u8; 32], now: Millis) -> StoreResult<Principal> {
        let user: Option<String> = self.read(|conn| {
            query_opt(
                conn,
                "SELECT user_name FROM sessions WHERE hash = ?1 AND expires_at > ?2",
                params![hash, now],
                |r| r.get(0),
                "reading a session",
            )
        })?;
        user.map(|u| Principal {
            name: format!("user:{u}"),
        })
        .ok_or_else(|| StoreError::Refused("the session has ended: log in again".into()))
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
                "INSERT INTO api_tokens (id, hash, name, created_at) VALUES (?1, ?2, ?3, ?4)",
                params![&t.id, &t.hash, &t.name, t.created_at],
                "recording an API token",
            )
        })?;
        Ok(ApiToken {
            id: t.id,
            name: t.name,
            created_at: t.created_at,
            revoked: false,
        })
    }

    fn api_token(&self, hash: &[u8; 32]) -> StoreResult<Principal> {
        let name: Option<String> = self.read(|conn| {
            query_opt(
                conn,
                "SELECT name FROM api_tokens WHERE hash = ?1 AND revoked = 0",
                params![hash],
                |r| r.get(0),
                "reading an API token",
            )
        })?;
        name.map(|n| Principal {
            name: format!("token:{n}"),
        })
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
                "SELECT id, name, created_at, revoked FROM api_tokens ORDER BY created_at DESC, id",
                params![],
                |r| {
                    Ok(ApiToken {
                        id: r.get(0)?,
                        name: r.get(1)?,
                        created_at: r.get(2)?,
                        revoked: r.get(3)?,
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
}

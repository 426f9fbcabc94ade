//! Users, sessions, API tokens and enrollment tokens in SQLite.

use rusqlite::{Row, params};

use super::agents::check_groups_exist;
use super::*;
use crate::model::*;
use crate::store::*;

pub(super) fn token_from_row(row: &Row<'_>) -> rusqlite::Result<EnrollmentToken> {
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

impl AuthStore for SqliteStore {
    fn create_enrollment_token(&self, t: NewEnrollmentToken) -> StoreResult<EnrollmentToken> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(sql("starting a transaction"))?;
        check_groups_exist(&tx, &t.groups)?;
        let now = now_ms();
        tx.execute(
            "INSERT INTO enrollment_tokens (id, hash, label, created_at, created_by, expires_at, max_uses, groups) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            params![t.id, &t.hash[..], t.label, now, t.created_by, t.expires_at, t.max_uses, to_json(&t.groups)?],
        )
        .map_err(sql("recording an enrollment token"))?;
        tx.commit().map_err(sql("recording an enrollment token"))?;
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
        let conn = self.conn();
        query_all(
            &conn,
            &format!("SELECT {TOKEN_COLUMNS} FROM enrollment_tokens ORDER BY created_at DESC, id"),
            [],
            token_from_row,
            "listing enrollment tokens",
        )
    }

    fn revoke_enrollment_token(&self, id: &str) -> StoreResult<()> {
        let n = self
            .conn()
            .execute(
                "UPDATE enrollment_tokens SET revoked = 1 WHERE id = ?1",
                [id],
            )
            .map_err(sql("revoking an enrollment token"))?;
        touched(n, "enrollment token", id)
    }

    fn create_user(
        &self,
        name: &str,
        password_hash: &str,
        role: Role,
        now: Millis,
    ) -> StoreResult<()> {
        let conn = self.conn();
        let exists: bool = conn
            .query_row(
                "SELECT EXISTS(SELECT 1 FROM users WHERE name = ?1)",
                [name],
                |r| r.get(0),
            )
            .map_err(sql("checking a user"))?;
        if exists {
            return Err(StoreError::Conflict(format!(
                "user {name:?} already exists"
            )));
        }
        conn.execute(
            "INSERT INTO users (name, password_hash, role, created_at) VALUES (?1, ?2, ?3, ?4)",
            params![name, password_hash, role.as_str(), now],
        )
        .map_err(sql("creating a user"))?;
        Ok(())
    }

    fn list_users(&self) -> StoreResult<Vec<User>> {
        query_all(
            &self.conn(),
            "SELECT name, role, created_at FROM users ORDER BY name",
            [],
            |r| {
                Ok(User {
                    name: r.get(0)?,
                    role: role_column(r, 1)?,
                    created_at: r.get(2)?,
                })
            },
            "listing users",
        )
    }

    fn set_user_role(&self, name: &str, role: Role) -> StoreResult<Role> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(sql("starting a transaction"))?;
        let before = query_opt(
            &tx,
            "SELECT role FROM users WHERE name = ?1",
            [name],
            |r| role_column(r, 0),
            "reading a user",
        )?
        .ok_or_else(|| not_found("user", name))?;
        if before == Role::Admin && role != Role::Admin {
            let admins: i64 = tx
                .query_row("SELECT COUNT(*) FROM users WHERE role = 'admin'", [], |r| {
                    r.get(0)
                })
                .map_err(sql("counting admins"))?;
            if admins <= 1 {
                return Err(StoreError::Conflict(format!(
                    "{name:?} is the only admin: make another user admin first, so that someone can still manage the console"
                )));
            }
        }
        tx.execute(
            "UPDATE users SET role = ?1 WHERE name = ?2",
            params![role.as_str(), name],
        )
        .map_err(sql("changing a user's role"))?;
        tx.commit().map_err(sql("changing a user's role"))?;
        Ok(before)
    }

    fn set_password(&self, name: &str, password_hash: &str) -> StoreResult<()> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(sql("starting a transaction"))?;
        let n = tx
            .execute(
                "UPDATE users SET password_hash = ?1 WHERE name = ?2",
                params![password_hash, name],
            )
            .map_err(sql("changing a password"))?;
        touched(n, "user", name)?;
        tx.execute("DELETE FROM sessions WHERE user_name = ?1", [name])
            .map_err(sql("ending a user's sessions"))?;
        tx.commit().map_err(sql("changing a password"))
    }

    fn user_count(&self) -> StoreResult<u64> {
        self.conn()
            .query_row("SELECT COUNT(*) FROM users", [], |r| r.get::<_, i64>(0))
            .map(|n| n.max(0) as u64)
            .map_err(sql("counting users"))
    }

    fn password_hash(&self, name: &str) -> StoreResult<String> {
        query_opt(
            &self.conn(),
            "SELECT password_hash FROM users WHERE name = ?1",
            [name],
            |r| r.get(0),
            "reading a user",
        )?
        .ok_or_else(|| not_found("user", name))
    }

    fn upgrade_password_hash(
        &self,
        name: &str,
        current: &str,
        upgraded: &str,
    ) -> StoreResult<bool> {
        self.conn()
            .execute(
                "UPDATE users SET password_hash = ?1 WHERE name = ?2 AND password_hash = ?3",
                params![upgraded, name, current],
            )
            .map(|n| n > 0)
            .map_err(sql("upgrading a password hash"))
    }

    fn create_session(&self, session: NewSession) -> StoreResult<()> {
        let conn = self.conn();
        // Old sessions are cleared as new ones are made, so the table stays small.
        conn.execute(
            "DELETE FROM sessions WHERE expires_at <= ?1",
            [session.created_at],
        )
        .map_err(sql("clearing old sessions"))?;
        conn.execute(
            "INSERT INTO sessions (hash, user_name, created_at, expires_at) VALUES (?1, ?2, ?3, ?4)",
            params![
                &session.hash[..],
                session.user,
                session.created_at,
                session.expires_at
            ],
        )
        .map_err(sql("recording a session"))?;
        Ok(())
    }

    fn session(&self, hash: &[u8; 32], now: Millis) -> StoreResult<Principal> {
        query_opt(
            &self.conn(),
            "SELECT s.user_name, u.role FROM sessions s JOIN users u ON u.name = s.user_name WHERE s.hash = ?1 AND s.expires_at > ?2",
            params![&hash[..], now],
            |r| {
                Ok(Principal {
                    name: format!("user:{}", r.get::<_, String>(0)?),
                    role: role_column(r, 1)?,
                })
            },
            "reading a session",
        )?
        .ok_or_else(|| StoreError::Refused("the session has ended: log in again".into()))
    }

    fn delete_session(&self, hash: &[u8; 32]) -> StoreResult<()> {
        self.conn()
            .execute("DELETE FROM sessions WHERE hash = ?1", [&hash[..]])
            .map_err(sql("ending a session"))?;
        Ok(())
    }

    fn create_api_token(&self, t: NewApiToken) -> StoreResult<ApiToken> {
        self.conn()
            .execute(
                "INSERT INTO api_tokens (id, hash, name, created_at, role, created_by) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![t.id, &t.hash[..], t.name, t.created_at, t.role.as_str(), t.created_by],
            )
            .map_err(sql("recording an API token"))?;
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
        query_opt(
            &self.conn(),
            "SELECT t.name, t.role, COALESCE(t.created_by LIKE 'user:%', 0), u.role FROM api_tokens t LEFT JOIN users u ON 'user:' || u.name = t.created_by WHERE t.hash = ?1 AND t.revoked = 0",
            [&hash[..]],
            |r| {
                let own = role_column(r, 1)?;
                let by_user: bool = r.get(2)?;
                let creator: Option<String> = r.get(3)?;
                let role = match (by_user, creator.as_deref().and_then(Role::parse)) {
                    (false, _) => own,
                    (true, Some(c)) => own.min(c),
                    (true, None) => Role::Viewer,
                };
                Ok(Principal {
                    name: format!("token:{}", r.get::<_, String>(0)?),
                    role,
                })
            },
            "reading an API token",
        )?
        .ok_or_else(|| {
            StoreError::Refused(
                "the API token is not valid (unknown or revoked): create a new one on the API tokens page in the console (or POST /api/v1/api-tokens)".into(),
            )
        })
    }

    fn list_api_tokens(&self) -> StoreResult<Vec<ApiToken>> {
        let conn = self.conn();
        query_all(
            &conn,
            "SELECT id, name, created_at, revoked, role, created_by FROM api_tokens ORDER BY created_at DESC",
            [],
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
    }

    fn revoke_api_token(&self, id: &str) -> StoreResult<()> {
        let n = self
            .conn()
            .execute("UPDATE api_tokens SET revoked = 1 WHERE id = ?1", [id])
            .map_err(sql("revoking an API token"))?;
        touched(n, "API token", id)
    }
}

/// A role column; a value this build does not know reads as the least role.
fn role_column(r: &Row<'_>, i: usize) -> rusqlite::Result<Role> {
    Ok(Role::parse(&r.get::<_, String>(i)?).unwrap_or(Role::Viewer))
}

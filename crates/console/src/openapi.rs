//! The OpenAPI 3.1 document served at `/api/v1/openapi.json`. It lists every route of
//! [`crate::api::routes`]; a test walks both and fails when they drift apart.

use serde_json::{Value, json};

use crate::model::Role;

/// (path, method, summary, the role it needs (`None`: no login), has JSON body)
const OPERATIONS: &[(&str, &str, &str, Option<Role>, bool)] = &[
    ("/api/v1/openapi.json", "get", "This document", None, false),
    (
        "/api/v1/login",
        "post",
        "Log in with user and password; sets the session cookie",
        None,
        true,
    ),
    ("/api/v1/logout", "post", "End the session", None, false),
    (
        "/api/v1/oidc",
        "get",
        "Whether single sign-on is configured, and the provider's name for the login page",
        None,
        false,
    ),
    (
        "/api/v1/oidc/login",
        "get",
        "Start single sign-on: redirects the browser to the OpenID provider",
        None,
        false,
    ),
    (
        "/api/v1/oidc/callback",
        "get",
        "Where the OpenID provider sends the browser back (code, state); sets the session cookie and redirects to the console, or to its login page with sso_error",
        None,
        false,
    ),
    (
        "/api/v1/users",
        "get",
        "List users with their roles",
        Some(Role::Viewer),
        false,
    ),
    (
        "/api/v1/users",
        "post",
        "Create a user (name, password of at least 10 characters, role: viewer (default), operator or admin)",
        Some(Role::Admin),
        true,
    ),
    (
        "/api/v1/users/{name}",
        "patch",
        "Change a user's role (the last admin stays admin; audited)",
        Some(Role::Admin),
        true,
    ),
    (
        "/api/v1/account",
        "get",
        "Who is calling (user:NAME or token:NAME) and its role",
        Some(Role::Viewer),
        false,
    ),
    (
        "/api/v1/account/password",
        "post",
        "Change the logged-in user's password (ends the user's sessions)",
        Some(Role::Viewer),
        true,
    ),
    (
        "/api/v1/enroll",
        "post",
        "Enroll an agent with an enrollment token and a CSR; returns its certificate, the CA, broker endpoints, proxy policy, wake-up key and check-in token",
        None,
        true,
    ),
    (
        "/api/v1/agents/{id}/checkin",
        "post",
        "Agent check-in (Authorization: Bearer <checkin_token>)",
        None,
        true,
    ),
    (
        "/api/v1/agents/{id}/certificate",
        "post",
        "Renew an agent's certificate with a CSR for a fresh key pair (Authorization: Bearer <checkin_token>); refused for removed agents",
        None,
        true,
    ),
    (
        "/api/v1/tenant-file",
        "get",
        "The broker's tenant file for this tenant (TOML): CA, token key and the revoked credentials of removed agents",
        Some(Role::Viewer),
        false,
    ),
    (
        "/api/v1/enrollment-tokens",
        "get",
        "List enrollment tokens",
        Some(Role::Viewer),
        false,
    ),
    (
        "/api/v1/enrollment-tokens",
        "post",
        "Create an enrollment token (the secret is returned once)",
        Some(Role::Admin),
        true,
    ),
    (
        "/api/v1/enrollment-tokens/{id}",
        "delete",
        "Revoke an enrollment token",
        Some(Role::Admin),
        false,
    ),
    (
        "/api/v1/agents",
        "get",
        "List agents (search, group, presence, stale, cloned, include_revoked, limit, offset); stale=true: only those not seen for the setting agents.stale_after_days; cloned=true: only identities in use on two machines",
        Some(Role::Viewer),
        false,
    ),
    (
        "/api/v1/agents/remove",
        "post",
        "Remove (revoke) many agents at once, e.g. the stale ones: {\"ids\": [...]}, 1 to 1000",
        Some(Role::Admin),
        true,
    ),
    (
        "/api/v1/agents/{id}",
        "get",
        "One agent",
        Some(Role::Viewer),
        false,
    ),
    (
        "/api/v1/agents/{id}",
        "patch",
        "Rename an agent or set its groups",
        Some(Role::Admin),
        true,
    ),
    (
        "/api/v1/agents/{id}",
        "delete",
        "Revoke (delete) an agent",
        Some(Role::Admin),
        false,
    ),
    (
        "/api/v1/agents/{id}/clone",
        "delete",
        "Clear an agent's cloned flag once one of its machines enrolled again (audited)",
        Some(Role::Admin),
        false,
    ),
    (
        "/api/v1/agents/{id}/wol",
        "get",
        "Wake-on-LAN sends for an agent",
        Some(Role::Viewer),
        false,
    ),
    (
        "/api/v1/agents/{id}/wol",
        "post",
        "Send Wake-on-LAN to an agent now",
        Some(Role::Operator),
        false,
    ),
    (
        "/api/v1/groups",
        "get",
        "List groups",
        Some(Role::Viewer),
        false,
    ),
    (
        "/api/v1/groups",
        "post",
        "Create a group",
        Some(Role::Admin),
        true,
    ),
    (
        "/api/v1/groups/{name}",
        "delete",
        "Delete a group",
        Some(Role::Admin),
        false,
    ),
    (
        "/api/v1/calls",
        "get",
        "List wake-up calls, newest first",
        Some(Role::Viewer),
        false,
    ),
    (
        "/api/v1/calls",
        "post",
        "Create a wake-up call to agents, a group or all",
        Some(Role::Operator),
        true,
    ),
    (
        "/api/v1/calls/{id}",
        "get",
        "A call with its per-agent states",
        Some(Role::Viewer),
        false,
    ),
    (
        "/api/v1/calls/{id}/events",
        "get",
        "Server-Sent Events: live state changes of a call",
        Some(Role::Viewer),
        false,
    ),
    (
        "/api/v1/events",
        "get",
        "Server-Sent Events: live state changes of every call",
        Some(Role::Viewer),
        false,
    ),
    (
        "/api/v1/settings",
        "get",
        "Current settings",
        Some(Role::Viewer),
        false,
    ),
    (
        "/api/v1/settings",
        "put",
        "Replace settings (validated; audited)",
        Some(Role::Admin),
        true,
    ),
    (
        "/api/v1/audit",
        "get",
        "Audit log, newest first",
        Some(Role::Viewer),
        false,
    ),
    (
        "/api/v1/status",
        "get",
        "Push-service status",
        Some(Role::Viewer),
        false,
    ),
    (
        "/api/v1/api-tokens",
        "get",
        "List API tokens",
        Some(Role::Viewer),
        false,
    ),
    (
        "/api/v1/api-tokens",
        "post",
        "Create an API token (the secret is returned once)",
        Some(Role::Admin),
        true,
    ),
    (
        "/api/v1/api-tokens/{id}",
        "delete",
        "Revoke an API token",
        Some(Role::Admin),
        false,
    ),
];

/// The document.
pub fn document() -> Value {
    let mut paths = serde_json::Map::new();
    for (path, method, summary, role, body) in OPERATIONS {
        let params: Vec<Value> = path
            .split('/')
            .filter_map(|l| l.strip_prefix('{')?.strip_suffix('}'))
            .map(|name| json!({"name": name, "in": "path", "required": true, "schema": {"type": "string"}}))
            .collect();
        let mut op = json!({
            "summary": summary,
            "parameters": params,
            "responses": {
                "200": {"description": "Success (201 for creations, 204 for deletions)"},
                "4XX": {"description": "The request cannot be served", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}},
            },
        });
        if let Some(role) = role {
            op["security"] = json!([{"bearer": []}, {"session": []}]);
            op["x-beckon-role"] = json!(role);
            op["description"] = json!(format!("Needs the {} role.", role.as_str()));
        }
        if *body {
            op["requestBody"] = json!({"required": true, "content": {"application/json": {"schema": {"type": "object"}}}});
        }
        let entry = paths.entry(path.to_string()).or_insert_with(|| json!({}));
        entry[*method] = op;
    }
    json!({
        "openapi": "3.1.0",
        "info": {"title": "Beckon console API", "version": "1"},
        "paths": paths,
        "components": {
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "description": "An API token (bkt_...)"},
                "session": {"type": "apiKey", "in": "cookie", "name": "beckon_session"},
            },
            "schemas": {
                "Error": {"type": "object", "required": ["error"], "properties": {
                    "error": {"type": "string"},
                    "needs_role": {"type": "string", "description": "With 403: the role the route needs"},
                    "role": {"type": "string", "description": "With 403: the caller's role"},
                }},
            },
        },
    })
}

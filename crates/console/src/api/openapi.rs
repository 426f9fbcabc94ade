//! The OpenAPI 3.1 document served at `/api/v1/openapi.json`: every route of [`super::routes`]
//! with the role it needs and the schemas of what it reads and answers. The schemas are
//! generated from the very types the handlers deserialise and serialise; a test sends each
//! route a request that fits its schema and checks the answer against the documented one.
//!
//! Schemas come from schemars' `JsonSchema` derive rather than utoipa: schemars reads serde's
//! own attributes (renames, defaults, `flatten`, `deny_unknown_fields`, enums as strings), so
//! a schema cannot drift from what serde does; it writes JSON Schema 2020-12, the dialect of
//! OpenAPI 3.1; and it describes either what a type accepts or what it produces, which differ
//! for fields with defaults (optional in a request, always present in an answer). The table
//! below (path, method, summary, role, types) stays the only hand-kept part: utoipa's path
//! macros would not remove it, only spread it over the handlers.

use std::collections::BTreeSet;

use axum::http::StatusCode;
use schemars::generate::{SchemaGenerator, SchemaSettings};
use schemars::{JsonSchema, Schema, json_schema};
use serde_json::{Map, Value, json};

use super::agents::*;
use super::auth::*;
use super::calls::*;
use super::enrollment::*;
use super::oidc::*;
use super::settings::*;
use super::tokens::*;
use super::users::*;
use super::{ErrorBody, LimitQuery};
use crate::model::*;
use crate::settings::Settings;
use crate::store::Principal;

/// Makes the schema of one type, recording the types it refers to as components.
type SchemaFn = fn(&mut SchemaGenerator) -> Schema;

/// A reference to `T`'s schema (or `T`'s schema itself for lists, strings, numbers).
fn schema<T: JsonSchema>(generator: &mut SchemaGenerator) -> Schema {
    generator.subschema_for::<T>()
}

/// `T`'s own object schema, whose properties become query parameters.
fn fields<T: JsonSchema>(generator: &mut SchemaGenerator) -> Schema {
    T::json_schema(generator)
}

/// What a route reads besides its path parameters.
enum Input {
    Nothing,
    Json(SchemaFn),
    Query(SchemaFn),
}

/// What a route answers when it succeeds.
enum Answer {
    Json(StatusCode, SchemaFn),
    /// 204, no body.
    NoContent,
    /// A text body of this content type, described.
    Text(&'static str, &'static str),
    /// 303 to the page described.
    Redirect(&'static str),
    /// Server-sent events, one per delivery state change.
    Events,
}

struct Operation {
    method: &'static str,
    path: &'static str,
    summary: &'static str,
    /// The role it needs; `None`: no login.
    role: Option<Role>,
    input: Input,
    answer: Answer,
    /// The success answer sets (or clears) the session cookie.
    sets_session: bool,
}

impl Operation {
    fn body<T: JsonSchema>(self) -> Self {
        Self {
            input: Input::Json(schema::<T>),
            ..self
        }
    }

    fn query<T: JsonSchema>(self) -> Self {
        Self {
            input: Input::Query(fields::<T>),
            ..self
        }
    }

    fn ok<T: JsonSchema>(self) -> Self {
        Self {
            answer: Answer::Json(StatusCode::OK, schema::<T>),
            ..self
        }
    }

    fn created<T: JsonSchema>(self) -> Self {
        Self {
            answer: Answer::Json(StatusCode::CREATED, schema::<T>),
            ..self
        }
    }

    fn answers(self, answer: Answer) -> Self {
        Self { answer, ..self }
    }

    fn sets_session(self) -> Self {
        Self {
            sets_session: true,
            ..self
        }
    }
}

/// An operation without input that answers 204 until told otherwise.
fn op(
    method: &'static str,
    path: &'static str,
    role: Option<Role>,
    summary: &'static str,
) -> Operation {
    Operation {
        method,
        path,
        summary,
        role,
        input: Input::Nothing,
        answer: Answer::NoContent,
        sets_session: false,
    }
}

const PUBLIC: Option<Role> = None;
const VIEWER: Option<Role> = Some(Role::Viewer);
const OPERATOR: Option<Role> = Some(Role::Operator);
const ADMIN: Option<Role> = Some(Role::Admin);

/// Every operation, in the order of [`super::routes`].
fn operations() -> Vec<Operation> {
    vec![
        op("get", "/api/v1/openapi.json", PUBLIC, "This document").answers(Answer::Json(
            StatusCode::OK,
            |_| json_schema!({"type": "object", "description": "An OpenAPI 3.1 document"}),
        )),
        op(
            "post",
            "/api/v1/login",
            PUBLIC,
            "Log in with user and password; sets the session cookie",
        )
        .body::<LoginRequest>()
        .ok::<LoggedIn>()
        .sets_session(),
        op("post", "/api/v1/logout", PUBLIC, "End the session").sets_session(),
        op(
            "get",
            "/api/v1/oidc",
            PUBLIC,
            "Whether single sign-on is configured, and the provider's name for the login page",
        )
        .ok::<OidcInfo>(),
        op(
            "get",
            "/api/v1/oidc/login",
            PUBLIC,
            "Start single sign-on: redirects the browser to the OpenID provider",
        )
        .answers(Answer::Redirect(
            "the provider's sign-in page, or the console's login page with sso_error",
        )),
        op(
            "get",
            "/api/v1/oidc/callback",
            PUBLIC,
            "Where the OpenID provider sends the browser back (code, state); sets the session cookie and redirects to the console, or to its login page with sso_error",
        )
        .query::<Callback>()
        .answers(Answer::Redirect(
            "the console's dashboard, or its login page with sso_error",
        )),
        op("get", "/api/v1/users", VIEWER, "List users with their roles").ok::<Vec<User>>(),
        op(
            "post",
            "/api/v1/users",
            ADMIN,
            "Create a user (name, password of at least 10 characters, role: viewer (default), operator or admin)",
        )
        .body::<NewUserRequest>()
        .created::<User>(),
        op(
            "patch",
            "/api/v1/users/{name}",
            ADMIN,
            "Change a user's role (the last admin stays admin; audited)",
        )
        .body::<UserUpdate>()
        .ok::<UserRole>(),
        op(
            "get",
            "/api/v1/account",
            VIEWER,
            "Who is calling (user:NAME or token:NAME) and its role",
        )
        .ok::<Principal>(),
        op(
            "post",
            "/api/v1/account/password",
            VIEWER,
            "Change the logged-in user's password (ends the user's sessions)",
        )
        .body::<PasswordChange>(),
        op(
            "post",
            "/api/v1/enroll",
            PUBLIC,
            "Enroll an agent with an enrollment token and a CSR; returns its certificate, the CA, broker endpoints, proxy policy, wake-up key and check-in token",
        )
        .body::<EnrollRequest>()
        .created::<EnrollResponse>(),
        op(
            "post",
            "/api/v1/agents/{id}/checkin",
            PUBLIC,
            "Agent check-in (Authorization: Bearer <checkin_token>)",
        )
        .body::<CheckinRequest>()
        .ok::<CheckedIn>(),
        op(
            "post",
            "/api/v1/agents/{id}/certificate",
            PUBLIC,
            "Renew an agent's certificate with a CSR for a fresh key pair (Authorization: Bearer <checkin_token>); refused for removed agents",
        )
        .body::<RenewRequest>()
        .ok::<RenewResponse>(),
        op(
            "get",
            "/api/v1/tenant-file",
            VIEWER,
            "The broker's tenant file for this tenant (TOML): CA, token key and the revoked credentials of removed agents (revoked=false: without them, for brokers that follow the revocation feed)",
        )
        .query::<TenantFileQuery>()
        .answers(Answer::Text(
            "application/toml",
            "the tenant file, as the broker reads it",
        )),
        op(
            "get",
            "/api/v1/revocations",
            VIEWER,
            "The revocation feed brokers poll: the revoked credentials of removed agents after a cursor, in cursor order (each entry replaces earlier ones of its id)",
        )
        .query::<RevocationsQuery>()
        .ok::<RevocationsPage>(),
        op(
            "get",
            "/api/v1/enrollment-tokens",
            VIEWER,
            "List enrollment tokens",
        )
        .ok::<Vec<EnrollmentToken>>(),
        op(
            "post",
            "/api/v1/enrollment-tokens",
            ADMIN,
            "Create an enrollment token (the secret is returned once)",
        )
        .body::<NewEnrollmentTokenRequest>()
        .created::<CreatedEnrollmentToken>(),
        op(
            "delete",
            "/api/v1/enrollment-tokens/{id}",
            ADMIN,
            "Revoke an enrollment token",
        ),
        op(
            "get",
            "/api/v1/agents",
            VIEWER,
            "List agents (search, group, presence, stale, cloned, include_revoked, limit, offset); stale=true: only those not seen for the setting agents.stale_after_days; cloned=true: only identities in use on two machines",
        )
        .query::<AgentQuery>()
        .ok::<Vec<Agent>>(),
        op(
            "post",
            "/api/v1/agents/remove",
            ADMIN,
            "Remove (revoke) many agents at once, e.g. the stale ones: {\"ids\": [...]}, 1 to 1000",
        )
        .body::<RemoveAgents>()
        .ok::<RemovedAgents>(),
        op("get", "/api/v1/agents/{id}", VIEWER, "One agent").ok::<Agent>(),
        op(
            "patch",
            "/api/v1/agents/{id}",
            ADMIN,
            "Rename an agent or set its groups",
        )
        .body::<AgentUpdate>()
        .ok::<Agent>(),
        op("delete", "/api/v1/agents/{id}", ADMIN, "Revoke (delete) an agent"),
        op(
            "delete",
            "/api/v1/agents/{id}/clone",
            ADMIN,
            "Clear an agent's cloned flag once one of its machines enrolled again (audited)",
        )
        .ok::<Agent>(),
        op(
            "get",
            "/api/v1/agents/{id}/wol",
            VIEWER,
            "Wake-on-LAN sends for an agent",
        )
        .ok::<Vec<WolSend>>(),
        op(
            "post",
            "/api/v1/agents/{id}/wol",
            OPERATOR,
            "Send Wake-on-LAN to an agent now",
        )
        .ok::<Vec<WolSend>>(),
        op("get", "/api/v1/groups", VIEWER, "List groups").ok::<Vec<Group>>(),
        op("post", "/api/v1/groups", ADMIN, "Create a group")
            .body::<NewGroup>()
            .created::<Group>(),
        op("delete", "/api/v1/groups/{name}", ADMIN, "Delete a group"),
        op("get", "/api/v1/calls", VIEWER, "List wake-up calls, newest first")
            .query::<LimitQuery>()
            .ok::<Vec<WakeCall>>(),
        op(
            "post",
            "/api/v1/calls",
            OPERATOR,
            "Create a wake-up call to agents, a group or all",
        )
        .body::<NewCallRequest>()
        .created::<CreatedCall>(),
        op(
            "get",
            "/api/v1/calls/{id}",
            VIEWER,
            "A call with its counts and the first page of its per-agent states",
        )
        .ok::<CallWithDeliveries>(),
        op(
            "get",
            "/api/v1/calls/{id}/deliveries",
            VIEWER,
            "A page of a call's per-agent states, in agent id order, of one state if asked",
        )
        .query::<DeliveriesQuery>()
        .ok::<crate::store::DeliveryPage>(),
        op(
            "get",
            "/api/v1/calls/{id}/events",
            VIEWER,
            "Server-Sent Events: live state changes of a call",
        )
        .answers(Answer::Events),
        op(
            "get",
            "/api/v1/events",
            VIEWER,
            "Server-Sent Events: live state changes of every call",
        )
        .answers(Answer::Events),
        op("get", "/api/v1/settings", VIEWER, "Current settings").ok::<Settings>(),
        op(
            "put",
            "/api/v1/settings",
            ADMIN,
            "Replace settings (validated; audited)",
        )
        .body::<Settings>()
        .ok::<Settings>(),
        op("get", "/api/v1/audit", VIEWER, "Audit log, newest first")
            .query::<LimitQuery>()
            .ok::<Vec<AuditEntry>>(),
        op("get", "/api/v1/status", VIEWER, "Push-service status").ok::<Status>(),
        op("get", "/api/v1/api-tokens", VIEWER, "List API tokens").ok::<Vec<ApiToken>>(),
        op(
            "post",
            "/api/v1/api-tokens",
            ADMIN,
            "Create an API token (the secret is returned once)",
        )
        .body::<NewApiTokenRequest>()
        .created::<CreatedApiToken>(),
        op("delete", "/api/v1/api-tokens/{id}", ADMIN, "Revoke an API token"),
    ]
}

/// Where the generated schemas go, as OpenAPI 3.1 wants them.
fn generator(settings: SchemaSettings) -> SchemaGenerator {
    settings
        .with(|s| {
            s.definitions_path = "/components/schemas".into();
            s.meta_schema = None;
        })
        .into_generator()
}

/// The document.
pub fn document() -> Value {
    // Requests are described as serde reads them, answers as serde writes them.
    let mut reads = generator(SchemaSettings::draft2020_12().for_deserialize());
    let mut writes = generator(SchemaSettings::draft2020_12().for_serialize());
    let error = writes.subschema_for::<ErrorBody>().to_value();
    let event = writes.subschema_for::<CallEvent>().to_value();
    let mut built: Vec<(&str, &str, Value)> = Vec::new();
    for o in operations() {
        let mut params: Vec<Value> = o
            .path
            .split('/')
            .filter_map(|l| l.strip_prefix('{')?.strip_suffix('}'))
            .map(|name| json!({"name": name, "in": "path", "required": true, "schema": {"type": "string"}}))
            .collect();
        let mut op = json!({"summary": o.summary});
        match o.input {
            Input::Nothing => {}
            Input::Json(f) => {
                op["requestBody"] = json!({"required": true, "content": {"application/json": {"schema": f(&mut reads).to_value()}}});
            }
            Input::Query(f) => params.extend(query_parameters(f(&mut reads).to_value())),
        }
        op["parameters"] = params.into();
        let (status, mut success) = match o.answer {
            Answer::Json(status, f) => (
                status.as_u16(),
                json!({"description": status.canonical_reason(), "content": {"application/json": {"schema": f(&mut writes).to_value()}}}),
            ),
            Answer::NoContent => (204, json!({"description": "Done; no body"})),
            Answer::Text(content_type, what) => (
                200,
                json!({"description": what, "content": {content_type: {"schema": {"type": "string"}}}}),
            ),
            Answer::Redirect(to) => (
                303,
                json!({"description": format!("Redirects the browser to {to}"), "headers": {"Location": {"required": true, "schema": {"type": "string"}}}}),
            ),
            Answer::Events => (
                200,
                json!({
                    "description": "A stream of `delivery` events whose data is a CallEvent (JSON), and `lagged` events ({\"missed\": n}) when this listener fell behind",
                    "content": {"text/event-stream": {"schema": {"type": "string"}, "x-beckon-event-data": event}},
                }),
            ),
        };
        if o.sets_session {
            success["headers"] = json!({"Set-Cookie": {"required": true, "description": "The session cookie, beckon_session (HttpOnly, SameSite=Strict)", "schema": {"type": "string"}}});
        }
        let failure = json!({"description": "The request cannot be served; `error` says why", "content": {"application/json": {"schema": error}}});
        op["responses"] = json!({status.to_string(): success, "4XX": failure, "5XX": failure});
        if let Some(role) = o.role {
            op["security"] = json!([{"bearer": []}, {"session": []}]);
            op["x-beckon-role"] = json!(role);
            op["description"] = json!(format!("Needs the {} role.", role.as_str()));
        }
        built.push((o.path, o.method, op));
    }
    let written = writes.take_definitions(true);
    let read = reads.take_definitions(true);
    let renamed = request_only(&read, &written);
    let mut schemas = written;
    for (name, mut schema) in read {
        rename_refs(&mut schema, &renamed);
        schemas.insert(input_name(&name, &renamed), schema);
    }
    let mut paths = Map::new();
    for (path, method, mut op) in built {
        // The request parts refer to the schemas of reading.
        for part in ["requestBody", "parameters"] {
            if let Some(part) = op.get_mut(part) {
                rename_refs(part, &renamed);
            }
        }
        let entry = paths.entry(path.to_owned()).or_insert_with(|| json!({}));
        entry[method] = op;
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
            "schemas": schemas,
        },
    })
}

/// One query parameter per property of an object schema.
fn query_parameters(object: Value) -> Vec<Value> {
    let required: BTreeSet<&str> = object["required"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    let Some(properties) = object["properties"].as_object() else {
        return Vec::new();
    };
    properties
        .iter()
        .map(|(name, schema)| {
            let mut schema = schema.clone();
            without_null(&mut schema);
            let description = schema
                .as_object_mut()
                .and_then(|s| s.remove("description"));
            let mut p = json!({"name": name, "in": "query", "required": required.contains(name.as_str()), "schema": schema});
            if let Some(d) = description {
                p["description"] = d;
            }
            p
        })
        .collect()
}

/// An optional parameter's schema without `null`: a query leaves it out instead.
fn without_null(schema: &mut Value) {
    let Some(o) = schema.as_object_mut() else {
        return;
    };
    if let Some(Value::Array(types)) = o.get_mut("type") {
        types.retain(|t| t != "null");
        if let [only] = types.as_slice() {
            let only = only.clone();
            o.insert("type".into(), only);
        }
    }
    if let Some(Value::Array(options)) = o.get_mut("anyOf") {
        options.retain(|s| s != &json!({"type": "null"}));
        if let [only] = options.as_slice() {
            let only = only.as_object().cloned().unwrap_or_default();
            o.remove("anyOf");
            o.extend(only);
        }
    }
}

/// The types read in another shape than they are written (fields with defaults), and those
/// that refer to them: their request schemas get their own names.
fn request_only(read: &Map<String, Value>, written: &Map<String, Value>) -> BTreeSet<String> {
    let mut renamed: BTreeSet<String> = read
        .iter()
        .filter(|(name, schema)| written.get(*name).is_some_and(|w| w != *schema))
        .map(|(name, _)| name.clone())
        .collect();
    loop {
        let more: Vec<String> = read
            .iter()
            .filter(|(name, schema)| {
                written.contains_key(*name)
                    && !renamed.contains(*name)
                    && refers_to(schema, &renamed)
            })
            .map(|(name, _)| name.clone())
            .collect();
        if more.is_empty() {
            return renamed;
        }
        renamed.extend(more);
    }
}

/// The component name of `name` as a request reads it.
fn input_name(name: &str, renamed: &BTreeSet<String>) -> String {
    if renamed.contains(name) {
        format!("{name}Input")
    } else {
        name.to_owned()
    }
}

const COMPONENT: &str = "#/components/schemas/";

fn refers_to(schema: &Value, names: &BTreeSet<String>) -> bool {
    match schema {
        Value::Object(o) => o.iter().any(|(k, v)| {
            (k == "$ref"
                && v.as_str()
                    .and_then(|r| r.strip_prefix(COMPONENT))
                    .is_some_and(|n| names.contains(n)))
                || refers_to(v, names)
        }),
        Value::Array(a) => a.iter().any(|v| refers_to(v, names)),
        _ => false,
    }
}

fn rename_refs(schema: &mut Value, renamed: &BTreeSet<String>) {
    match schema {
        Value::Object(o) => {
            for (k, v) in o.iter_mut() {
                match (
                    k.as_str(),
                    v.as_str().and_then(|r| r.strip_prefix(COMPONENT)),
                ) {
                    ("$ref", Some(name)) => {
                        *v = format!("{COMPONENT}{}", input_name(name, renamed)).into()
                    }
                    _ => rename_refs(v, renamed),
                }
            }
        }
        Value::Array(a) => a.iter_mut().for_each(|v| rename_refs(v, renamed)),
        _ => {}
    }
}

//! The OpenAPI document against the routes it describes: it is a well-formed OpenAPI 3.1
//! document; every route of `routes()` gets a request that fits the documented schema, is
//! accepted with the documented status and answers what the documented schema says (no
//! field more, none missing); and every way a JSON body can break its schema (a required
//! field missing, a field of the wrong type, a field not in the schema) is refused.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use axum::http::StatusCode;
use beckon_console::model::Role;
use common::{Api, csr, request};
use serde_json::{Map, Value, json};
use tower::ServiceExt;

const COMPONENT: &str = "#/components/schemas/";

/// How a request authenticates.
#[derive(Clone, Copy)]
enum Auth<'a> {
    /// No credentials.
    Anonymous,
    /// The test's API token (admin).
    Token,
    /// A session cookie (`name=value`).
    Cookie(&'a str),
    /// An agent's check-in token.
    Agent(&'a str),
}

/// `schema` checked against JSON Schema 2020-12, its `$ref`s resolved in `components`.
fn validator(components: &Value, schema: &Value) -> jsonschema::Validator {
    let root = json!({"components": {"schemas": components}, "allOf": [schema]});
    jsonschema::draft202012::new(&root)
        .unwrap_or_else(|e| panic!("not a JSON Schema 2020-12: {e}: {schema}"))
}

/// Why `instance` does not fit (empty: it fits).
fn misfits(v: &jsonschema::Validator, instance: &Value) -> Vec<String> {
    v.iter_errors(instance)
        .map(|e| format!("{} at {}", e, e.instance_path()))
        .collect()
}

/// `schema` with every object schema that names its properties refusing any other: what an
/// answer carries beyond its documented fields is drift too.
fn closed(schema: &Value) -> Value {
    match schema {
        Value::Object(o) => {
            let mut o: Map<String, Value> = o.iter().map(|(k, v)| (k.clone(), closed(v))).collect();
            if o.contains_key("properties") && !o.contains_key("additionalProperties") {
                o.insert("additionalProperties".into(), false.into());
            }
            Value::Object(o)
        }
        Value::Array(a) => Value::Array(a.iter().map(closed).collect()),
        other => other.clone(),
    }
}

/// Every `$ref` in `v`, with where it stands.
fn refs(v: &Value, at: &str, out: &mut Vec<(String, String)>) {
    match v {
        Value::Object(o) => {
            for (k, v) in o {
                match (k.as_str(), v) {
                    ("$ref", Value::String(r)) => out.push((at.to_owned(), r.clone())),
                    _ => refs(v, &format!("{at}/{k}"), out),
                }
            }
        }
        Value::Array(a) => {
            for (i, v) in a.iter().enumerate() {
                refs(v, &format!("{at}/{i}"), out);
            }
        }
        _ => {}
    }
}

/// The success status an operation documents (the one 2xx or 3xx answer).
fn success(op: &Value) -> (u16, &Value) {
    let answers: Vec<(u16, &Value)> = op["responses"]
        .as_object()
        .expect("responses")
        .iter()
        .filter_map(|(code, r)| Some((code.parse::<u16>().ok()?, r)))
        .filter(|(code, _)| (200..400).contains(code))
        .collect();
    assert_eq!(answers.len(), 1, "one success answer: {op}");
    answers[0]
}

fn routes() -> BTreeSet<(String, String)> {
    beckon_console::api::routes()
        .into_iter()
        .flat_map(|(path, methods, _)| {
            methods
                .iter()
                .map(move |m| (path.to_owned(), m.to_string()))
        })
        .collect()
}

#[test]
fn the_document_is_a_well_formed_openapi_3_1_document() {
    let doc = beckon_console::api::openapi::document();
    assert_eq!(doc["openapi"], "3.1.0");
    // The OpenAPI Initiative's schema of 3.1 documents (Apache-2.0; its $id names the
    // version), which checks the structure but not the schemas inside.
    let oas: Value = serde_json::from_str(include_str!("data/openapi-3.1-schema.json")).unwrap();
    let wrong = misfits(&jsonschema::draft202012::new(&oas).unwrap(), &doc);
    assert!(wrong.is_empty(), "not an OpenAPI 3.1 document: {wrong:?}");
    assert!(doc["info"]["title"].is_string() && doc["info"]["version"].is_string());
    let schemas = &doc["components"]["schemas"];
    let schemes = doc["components"]["securitySchemes"].as_object().unwrap();
    // Every reference points at a schema of components.schemas.
    let mut found = Vec::new();
    refs(&doc, "#", &mut found);
    assert!(found.len() > 50, "{found:?}");
    for (at, r) in &found {
        let name = r
            .strip_prefix(COMPONENT)
            .unwrap_or_else(|| panic!("{at}: {r} is not in {COMPONENT}"));
        assert!(schemas.get(name).is_some(), "{at}: {r} resolves to nothing");
    }
    // Every schema is a JSON Schema 2020-12 (the dialect of OpenAPI 3.1).
    for (name, schema) in schemas.as_object().unwrap() {
        validator(schemas, schema);
        assert!(schema.is_object(), "{name}");
    }
    let mut documented = BTreeSet::new();
    for (path, ops) in doc["paths"].as_object().unwrap() {
        let in_path: BTreeSet<&str> = path
            .split('/')
            .filter_map(|l| l.strip_prefix('{')?.strip_suffix('}'))
            .collect();
        for (method, op) in ops.as_object().unwrap() {
            documented.insert((path.clone(), method.clone()));
            assert!(
                ["get", "put", "post", "delete", "patch"].contains(&method.as_str()),
                "{method} {path}"
            );
            assert!(op["summary"].is_string(), "{method} {path}");
            let params = op["parameters"].as_array().unwrap();
            let named: BTreeSet<&str> = params
                .iter()
                .filter(|p| p["in"] == "path")
                .map(|p| {
                    assert_eq!(p["required"], true, "{method} {path}: {p}");
                    p["name"].as_str().unwrap()
                })
                .collect();
            assert_eq!(named, in_path, "{method} {path}: path parameters");
            for p in params {
                assert!(
                    ["path", "query"].contains(&p["in"].as_str().unwrap()),
                    "{p}"
                );
                validator(schemas, &p["schema"]);
            }
            if let Some(body) = op.get("requestBody") {
                validator(schemas, &body["content"]["application/json"]["schema"]);
            }
            let (_, answer) = success(op);
            assert!(answer["description"].is_string(), "{method} {path}");
            for (media, content) in answer["content"].as_object().into_iter().flatten() {
                assert!(media.contains('/'), "{method} {path}: {media}");
                validator(schemas, &content["schema"]);
            }
            assert_eq!(
                op["responses"]["4XX"]["content"]["application/json"]["schema"]["$ref"],
                format!("{COMPONENT}Error")
            );
            match op.get("x-beckon-role") {
                Some(role) => {
                    assert!(Role::parse(role.as_str().unwrap()).is_some(), "{role}");
                    for requirement in op["security"].as_array().unwrap() {
                        for scheme in requirement.as_object().unwrap().keys() {
                            assert!(schemes.contains_key(scheme), "{scheme}");
                        }
                    }
                }
                None => assert!(op.get("security").is_none(), "{method} {path}"),
            }
        }
    }
    assert_eq!(
        documented,
        routes(),
        "the document lists exactly the routes"
    );
}

/// Sends each route a request that fits its documented schema and checks the answer.
struct Checker {
    api: Api,
    doc: Value,
    /// The answers' schemas, closed to fields they do not name.
    closed: Value,
    /// The routes sent a request so far.
    covered: BTreeSet<(String, String)>,
}

/// An answer: its headers and body (JSON, `Null` when empty or a stream).
struct Answer {
    headers: Vec<(String, String)>,
    body: Value,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

impl Checker {
    fn operation(&self, method: &str, template: &str) -> Value {
        self.doc["paths"][template][method]
            .as_object()
            .unwrap_or_else(|| {
                panic!("{method} {template} is a route but not in the OpenAPI document")
            })
            .clone()
            .into()
    }

    /// `method template` with `args` for its path parameters and `input` as its JSON body
    /// or (an object) its query, as the document says: checked to fit the documented schema,
    /// sent with `auth`, and the answer checked against the documented status and schema.
    /// Before it, each way of breaking a JSON body's schema is sent and must be refused.
    async fn check(
        &mut self,
        method: &str,
        template: &str,
        args: &[&str],
        auth: Auth<'_>,
        input: Option<Value>,
    ) -> Answer {
        let what = format!("{} {template}", method.to_uppercase());
        let op = self.operation(method, template);
        let mut args = args.iter();
        let path: Vec<String> = template
            .split('/')
            .map(|l| match l.starts_with('{') {
                true => args
                    .next()
                    .expect("an argument per path parameter")
                    .to_string(),
                false => l.to_owned(),
            })
            .collect();
        let mut uri = path.join("/");
        let schemas = &self.doc["components"]["schemas"];
        let mut body = None;
        if let Some(request_body) = op.get("requestBody") {
            let input = input
                .as_ref()
                .unwrap_or_else(|| panic!("{what}: documented with a body"));
            let schema = &request_body["content"]["application/json"]["schema"];
            let v = validator(schemas, schema);
            let wrong = misfits(&v, input);
            assert!(
                wrong.is_empty(),
                "{what}: the test's body does not fit the document: {wrong:?}"
            );
            let broken = broken_bodies(schemas, schema, input, &v);
            assert!(
                !broken.is_empty(),
                "{what}: no way to break its body's schema"
            );
            for (how, broken) in broken {
                let refused = self
                    .send(method, &uri, auth, Some(broken.to_string()))
                    .await;
                let (status, _, bytes) = refused;
                let answer: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
                // Refused by the body reader (serde), not later for another reason.
                let read = [
                    "the JSON does not fit this request",
                    "the body is not valid JSON",
                ];
                let error = answer["error"].as_str().unwrap_or_default();
                assert!(
                    matches!(status.as_u16(), 400 | 422)
                        && read.iter().any(|r| error.starts_with(r)),
                    "{what} with {how} ({broken}) is outside the schema, yet: {status} {answer}"
                );
                self.fits_error(&what, &answer);
            }
            body = Some(input.to_string());
        } else if let Some(query) = self.query_schema(&op) {
            let input = input.clone().unwrap_or_else(|| json!({}));
            let v = validator(schemas, &query);
            let wrong = misfits(&v, &input);
            assert!(
                wrong.is_empty(),
                "{what}: the test's query does not fit the document: {wrong:?}"
            );
            let redirects = success(&op).0 == 303;
            for name in query["properties"].as_object().unwrap().keys() {
                // A value that is no parameter's: refused unless the parameter takes any text.
                let mut broken = input.clone();
                broken[name] = json!("not-a-value");
                if redirects || misfits(&v, &broken).is_empty() {
                    continue;
                }
                let (status, _, bytes) = self
                    .send(
                        method,
                        &format!("{uri}?{}", query_string(&broken)),
                        auth,
                        None,
                    )
                    .await;
                let answer: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
                assert_eq!(
                    status,
                    StatusCode::BAD_REQUEST,
                    "{what} with {name}=not-a-value: {answer}"
                );
                self.fits_error(&what, &answer);
            }
            if input.as_object().is_some_and(|o| !o.is_empty()) {
                uri = format!("{uri}?{}", query_string(&input));
            }
        } else {
            assert!(input.is_none(), "{what}: documented without input");
        }

        let (code, documented) = success(&op);
        let (status, headers, bytes) = self.send(method, &uri, auth, body).await;
        let text = String::from_utf8_lossy(&bytes).into_owned();
        assert_eq!(status.as_u16(), code, "{what}: {text}");
        let answer = Answer {
            headers,
            body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        };
        for (name, header) in documented["headers"].as_object().into_iter().flatten() {
            if header["required"] == true {
                let name = name.to_lowercase();
                assert!(answer.header(&name).is_some(), "{what}: no {name} header");
            }
        }
        let content = documented["content"].as_object();
        match content.and_then(|c| c.iter().next()) {
            None => {
                assert!(
                    bytes.is_empty(),
                    "{what}: documented without a body: {text}"
                );
            }
            Some((media, content)) => {
                let got = answer.header("content-type").unwrap_or_default();
                assert!(
                    got.starts_with(media.as_str()),
                    "{what}: {got}, documented {media}"
                );
                if media == "application/json" {
                    let v = validator(&self.closed, &closed(&content["schema"]));
                    let wrong = misfits(&v, &answer.body);
                    assert!(
                        wrong.is_empty(),
                        "{what}: the answer does not fit the documented schema: {wrong:?}\n{text}"
                    );
                }
            }
        }
        self.covered
            .insert((template.to_owned(), method.to_owned()));
        answer
    }

    /// An error answer fits the documented error schema.
    fn fits_error(&self, what: &str, answer: &Value) {
        let v = validator(&self.closed, &json!({"$ref": format!("{COMPONENT}Error")}));
        let wrong = misfits(&v, answer);
        assert!(
            wrong.is_empty(),
            "{what}: the error does not fit the schema: {wrong:?}"
        );
    }

    /// The query parameters of `op` as one object schema (`None`: it takes none).
    fn query_schema(&self, op: &Value) -> Option<Value> {
        let params: Vec<&Value> = op["parameters"]
            .as_array()?
            .iter()
            .filter(|p| p["in"] == "query")
            .collect();
        if params.is_empty() {
            return None;
        }
        let properties: Map<String, Value> = params
            .iter()
            .map(|p| (p["name"].as_str().unwrap().to_owned(), p["schema"].clone()))
            .collect();
        let required: Vec<&Value> = params
            .iter()
            .filter(|p| p["required"] == true)
            .map(|p| &p["name"])
            .collect();
        Some(json!({"type": "object", "properties": properties, "required": required}))
    }

    /// One request through the router. A stream's body is not read (it does not end).
    async fn send(
        &self,
        method: &str,
        uri: &str,
        auth: Auth<'_>,
        body: Option<String>,
    ) -> (StatusCode, Vec<(String, String)>, Vec<u8>) {
        let bearer = match auth {
            Auth::Token => Some(format!("Bearer {}", self.api.token)),
            Auth::Agent(token) => Some(format!("Bearer {token}")),
            Auth::Anonymous | Auth::Cookie(_) => None,
        };
        let mut req = request(&method.to_uppercase(), uri, bearer.as_deref(), body);
        if let Auth::Cookie(cookie) = auth {
            req.headers_mut().insert("cookie", cookie.parse().unwrap());
        }
        let is_stream = uri.ends_with("/events");
        if !is_stream {
            return self.api.respond(req).await;
        }
        let resp = self.api.router.clone().oneshot(req).await.unwrap();
        let headers = resp
            .headers()
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_owned()))
            .collect();
        (resp.status(), headers, Vec::new())
    }
}

fn query_string(query: &Value) -> String {
    let pairs: Vec<(String, String)> = query
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| {
            (
                k.clone(),
                v.as_str().map_or_else(|| v.to_string(), str::to_owned),
            )
        })
        .collect();
    serde_urlencoded::to_string(pairs).unwrap()
}

/// `value` with each way of breaking `schema` (an object schema or a reference to one): each
/// required field left out, each field given a value of another type, and a field it does
/// not name when it names all it takes. Each is checked to be outside the schema.
fn broken_bodies(
    schemas: &Value,
    schema: &Value,
    value: &Value,
    v: &jsonschema::Validator,
) -> Vec<(String, Value)> {
    let object = match schema["$ref"].as_str() {
        Some(r) => &schemas[r.strip_prefix(COMPONENT).unwrap()],
        None => schema,
    };
    let mut broken = Vec::new();
    for name in object["required"].as_array().into_iter().flatten() {
        let name = name.as_str().unwrap();
        let mut b = value.clone();
        b.as_object_mut().unwrap().remove(name);
        broken.push((format!("{name} missing"), b));
    }
    for name in object["properties"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, _)| k)
    {
        let others = [
            json!(12345),
            json!("text"),
            json!(true),
            json!([1]),
            json!({"x": 1}),
        ];
        // A field whose schema takes anything cannot be given a wrong type.
        if let Some(other) = others.into_iter().find(|o| {
            let mut b = value.clone();
            b[name] = o.clone();
            !v.is_valid(&b)
        }) {
            let mut b = value.clone();
            b[name] = other.clone();
            broken.push((format!("{name}: {other}"), b));
        }
    }
    if object["additionalProperties"] == false {
        let mut b = value.clone();
        b["not_a_field"] = json!(1);
        broken.push(("a field it does not name".into(), b));
    }
    for (how, b) in &broken {
        assert!(!v.is_valid(b), "{how}: {b} still fits {schema}");
    }
    broken
}

/// The inventory an agent reports, on loopback addresses only.
fn inventory() -> Value {
    json!({
        "hostname": "pc-1.example",
        "os": "Debian 13",
        "addresses": [{"address": "127.0.0.5", "prefix_len": 8}],
        "macs": ["00:11:22:33:44:55"],
    })
}

#[tokio::test]
async fn every_route_accepts_and_answers_what_its_schemas_say() {
    tokio::time::timeout(Duration::from_secs(120), every_route())
        .await
        .expect("the routes answered within two minutes");
}

async fn every_route() {
    // Single sign-on configured with a provider nobody listens for: its routes answer with
    // redirects to the login page.
    let closed_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let api = common::start_with(|c| {
        c.public_url = Some("https://console.example".into());
        c.oidc = Some(common::oidc_config(format!(
            "http://127.0.0.1:{closed_port}"
        )));
    })
    .await;
    let (s, doc) = api.call_as("GET", "/api/v1/openapi.json", None, None).await;
    assert_eq!(s, StatusCode::OK);
    let closed = closed(&doc["components"]["schemas"]);
    let mut c = Checker {
        api,
        doc,
        closed,
        covered: BTreeSet::new(),
    };
    use Auth::*;

    c.check("get", "/api/v1/openapi.json", &[], Anonymous, None)
        .await;
    let sso = c.check("get", "/api/v1/oidc", &[], Anonymous, None).await;
    assert_eq!(sso.body["provider"], "Example ID");
    c.check("get", "/api/v1/oidc/login", &[], Anonymous, None)
        .await;
    let query = json!({"code": "c", "state": "s"});
    c.check("get", "/api/v1/oidc/callback", &[], Anonymous, Some(query))
        .await;

    // Users and sessions.
    let ada = json!({"name": "ada", "password": "a long password", "role": "operator"});
    c.check("post", "/api/v1/users", &[], Token, Some(ada))
        .await;
    c.check("get", "/api/v1/users", &[], Token, None).await;
    let role = json!({"role": "viewer"});
    c.check("patch", "/api/v1/users/{name}", &["ada"], Token, Some(role))
        .await;
    let login = json!({"user": "ada", "password": "a long password"});
    let session = c
        .check("post", "/api/v1/login", &[], Anonymous, Some(login))
        .await;
    let cookie = common::session_cookie(&session.headers);
    let me = c
        .check("get", "/api/v1/account", &[], Cookie(&cookie), None)
        .await;
    assert_eq!(me.body, json!({"name": "user:ada", "role": "viewer"}));
    let change = json!({"current": "a long password", "new": "another long password"});
    c.check(
        "post",
        "/api/v1/account/password",
        &[],
        Cookie(&cookie),
        Some(change),
    )
    .await;
    c.check("post", "/api/v1/logout", &[], Cookie(&cookie), None)
        .await;

    // Groups, enrollment tokens, enrollment, check-in, renewal.
    let group = json!({"name": "laptops", "description": "the office's"});
    c.check("post", "/api/v1/groups", &[], Token, Some(group))
        .await;
    let spare = json!({"name": "spare"});
    c.check("post", "/api/v1/groups", &[], Token, Some(spare))
        .await;
    c.check("get", "/api/v1/groups", &[], Token, None).await;
    let token =
        json!({"label": "office", "expires_in_secs": 3600, "max_uses": 2, "groups": ["laptops"]});
    let token = c
        .check("post", "/api/v1/enrollment-tokens", &[], Token, Some(token))
        .await;
    c.check("get", "/api/v1/enrollment-tokens", &[], Token, None)
        .await;
    let enroll = json!({"token": token.body["token"], "agent_id": "pc-1", "csr": csr(), "name": "PC 1", "inventory": inventory()});
    let enrolled = c
        .check("post", "/api/v1/enroll", &[], Anonymous, Some(enroll))
        .await;
    let agent = enrolled.body["checkin_token"].as_str().unwrap().to_owned();
    let checkin = json!({"agent_id": "pc-1", "wakeup_id": null, "inventory": inventory(), "taken_over": false});
    c.check(
        "post",
        "/api/v1/agents/{id}/checkin",
        &["pc-1"],
        Agent(&agent),
        Some(checkin),
    )
    .await;
    let renewal = json!({"csr": csr()});
    c.check(
        "post",
        "/api/v1/agents/{id}/certificate",
        &["pc-1"],
        Agent(&agent),
        Some(renewal),
    )
    .await;
    let token_id = token.body["id"].as_str().unwrap();
    c.check(
        "delete",
        "/api/v1/enrollment-tokens/{id}",
        &[token_id],
        Token,
        None,
    )
    .await;
    c.check("get", "/api/v1/tenant-file", &[], Token, None)
        .await;

    // Agents.
    let query = json!({"search": "pc", "group": "laptops", "presence": "unknown", "stale": false, "cloned": false, "include_revoked": true, "limit": 10, "offset": 0});
    let listed = c
        .check("get", "/api/v1/agents", &[], Token, Some(query))
        .await;
    assert_eq!(
        listed.body.as_array().map(Vec::len),
        Some(1),
        "{}",
        listed.body
    );
    c.check("get", "/api/v1/agents/{id}", &["pc-1"], Token, None)
        .await;
    let update = json!({"name": "PC one", "groups": ["laptops"]});
    c.check(
        "patch",
        "/api/v1/agents/{id}",
        &["pc-1"],
        Token,
        Some(update),
    )
    .await;
    c.check(
        "delete",
        "/api/v1/agents/{id}/clone",
        &["pc-1"],
        Token,
        None,
    )
    .await;

    // Settings, then Wake-on-LAN to a loopback socket of this test only.
    let wol = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut settings = c
        .check("get", "/api/v1/settings", &[], Token, None)
        .await
        .body;
    settings["wol"]["addresses"] = json!(["127.0.0.1"]);
    settings["wol"]["subnet_broadcast"] = json!(false);
    settings["wol"]["relay"] = json!(false);
    settings["wol"]["port"] = json!(wol.local_addr().unwrap().port());
    c.check("put", "/api/v1/settings", &[], Token, Some(settings))
        .await;
    let sent = c
        .check("post", "/api/v1/agents/{id}/wol", &["pc-1"], Token, None)
        .await;
    assert_eq!(sent.body.as_array().map(Vec::len), Some(1), "{}", sent.body);
    c.check("get", "/api/v1/agents/{id}/wol", &["pc-1"], Token, None)
        .await;

    // Calls and their events.
    let call = json!({"target": {"agents": ["pc-1"]}, "reason": "patch day", "action": null, "expires_in_secs": 600, "spread_secs": 0, "wake_on_lan": false});
    let call = c
        .check("post", "/api/v1/calls", &[], Token, Some(call))
        .await;
    let call_id = call.body["id"].as_str().unwrap();
    c.check(
        "get",
        "/api/v1/calls",
        &[],
        Token,
        Some(json!({"limit": 10})),
    )
    .await;
    c.check("get", "/api/v1/calls/{id}", &[call_id], Token, None)
        .await;
    let page = json!({"state": "queued", "after": "a", "limit": 10});
    let page = c
        .check(
            "get",
            "/api/v1/calls/{id}/deliveries",
            &[call_id],
            Token,
            Some(page),
        )
        .await;
    assert!(page.body["deliveries"].as_array().unwrap().len() <= 1);
    c.check("get", "/api/v1/calls/{id}/events", &[call_id], Token, None)
        .await;
    c.check("get", "/api/v1/events", &[], Token, None).await;

    // The console's own records.
    c.check(
        "get",
        "/api/v1/audit",
        &[],
        Token,
        Some(json!({"limit": 50})),
    )
    .await;
    c.check("get", "/api/v1/status", &[], Token, None).await;
    let ci = json!({"name": "ci", "role": "operator"});
    c.check("post", "/api/v1/api-tokens", &[], Token, Some(ci))
        .await;
    let tokens = c
        .check("get", "/api/v1/api-tokens", &[], Token, None)
        .await
        .body;
    let ci = tokens
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "ci")
        .unwrap();
    let ci = ci["id"].as_str().unwrap();
    c.check("delete", "/api/v1/api-tokens/{id}", &[ci], Token, None)
        .await;

    // Removals last.
    c.api.enroll("pc-2", inventory()).await;
    let remove = json!({"ids": ["pc-2", "nobody"]});
    let removed = c
        .check("post", "/api/v1/agents/remove", &[], Token, Some(remove))
        .await;
    assert_eq!(
        removed.body,
        json!({"removed": ["pc-2"], "not_found": ["nobody"]})
    );
    c.check("delete", "/api/v1/agents/{id}", &["pc-1"], Token, None)
        .await;
    let feed = c
        .check(
            "get",
            "/api/v1/revocations",
            &[],
            Token,
            Some(json!({"after": 0, "limit": 10})),
        )
        .await;
    let ids: Vec<&str> = feed.body["revocations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["pc-2", "pc-1"], "{}", feed.body);
    c.check("delete", "/api/v1/groups/{name}", &["spare"], Token, None)
        .await;

    let missing: Vec<_> = routes().difference(&c.covered).cloned().collect();
    assert!(
        missing.is_empty(),
        "routes this test sends no request to: {missing:?}"
    );
}

//! A cluster whose NATS requires TLS and credentials: a nats-server started by the test with a
//! certificate from a CA made in the test and a user with a password (or a token, an NKey, or
//! in operator mode a user JWT from a `.creds` file). With the right CA and credentials a
//! wake-up crosses nodes; a wrong password, token, NKey or JWT, or a CA that did not sign the
//! server's certificate, stops the node at start with the reason; clear text to a NATS off this
//! machine is refused before any connection.

mod cluster_support;
mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use beckon_identity::{PresenceEvent, PresenceState, Role};
use beckon_pki::CertificateAuthority;

use cluster_support::{Client, Node, Tenant, WAIT, nats_server_binary, wait_for_port};
use common::{Process, free_port};

const PASSWORD: &str = "correct horse battery staple";
const TOKEN: &str = "s3cr3t-t0ken-for-the-cluster";

/// A nats-server that accepts only TLS clients showing the user `beckon` and its password
/// (or, with `token`, the token).
struct SecureNats {
    url: String,
    /// The CA that signed its certificate.
    ca: PathBuf,
    dir: tempfile::TempDir,
    _process: Process,
}

impl SecureNats {
    fn start() -> Self {
        Self::start_with(&format!("user: beckon\n  password: \"{PASSWORD}\""))
    }

    /// `authorization` holds the lines of the server's authorization block.
    fn start_with(authorization: &str) -> Self {
        Self::start_configured(|_| format!("authorization {{\n  {authorization}\n}}\n"))
    }

    /// `auth` gives the server configuration's lines about clients' credentials; it may write
    /// files into the server's folder, which it is given.
    fn start_configured(auth: impl FnOnce(&Path) -> String) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let day = Duration::from_secs(24 * 3600);
        let ca = CertificateAuthority::generate("nats test CA", day).expect("CA");
        let ca_path = dir.path().join("nats-ca.pem");
        std::fs::write(&ca_path, ca.cert_pem()).expect("write CA");
        let (cert, key) = (dir.path().join("nats.pem"), dir.path().join("nats.key"));
        ca.issue_server(&["127.0.0.1".to_owned(), "localhost".to_owned()], day)
            .expect("issue")
            .save(&cert, &key)
            .expect("save");
        let port = free_port();
        let conf = dir.path().join("nats.conf");
        let auth = auth(dir.path());
        std::fs::write(
            &conf,
            format!(
                "listen: \"127.0.0.1:{port}\"\ntls {{\n  cert_file: {cert:?}\n  key_file: {key:?}\n  timeout: 5\n}}\n{auth}"
            ),
        )
        .expect("nats.conf");
        let mut command = Command::new(nats_server_binary());
        command.arg("-c").arg(&conf).stderr(Stdio::null());
        let process = Process::spawn("nats-server", command);
        wait_for_port(SocketAddr::from(([127, 0, 0, 1], port)), "nats-server");
        Self {
            url: format!("nats://127.0.0.1:{port}"),
            ca: ca_path,
            dir,
            _process: process,
        }
    }

    /// The `[cluster]` lines of a node trusting `ca` and showing `password`.
    fn node_lines(ca: &Path, password: &str) -> String {
        format!("ca = {ca:?}\nuser = \"beckon\"\npassword = \"{password}\"\n")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_nats_ca_and_password_a_wake_up_crosses_nodes() {
    let nats = SecureNats::start();
    let tenant = Tenant::create();
    let lines = SecureNats::node_lines(&nats.ca, PASSWORD);
    let n0 = Node::start_with("n0", &nats.url, tenant.dir.path(), &lines);
    let n1 = Node::start_with("n1", &nats.url, tenant.dir.path(), &lines);
    a_wake_up_crosses(&n0, &n1, &tenant).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_token_a_wake_up_crosses_nodes_and_a_wrong_token_is_refused() {
    let nats = SecureNats::start_with(&format!("token: \"{TOKEN}\""));
    let tenant = Tenant::create();
    let lines = |token: &str| format!("ca = {:?}\ntoken = \"{token}\"\n", nats.ca);
    let n0 = Node::start_with("n0", &nats.url, tenant.dir.path(), &lines(TOKEN));
    let n1 = Node::start_with("n1", &nats.url, tenant.dir.path(), &lines(TOKEN));
    a_wake_up_crosses(&n0, &n1, &tenant).await;
    let text = Node::refused("n2", &nats.url, tenant.dir.path(), &lines("wrong"));
    assert!(
        text.contains("authorization violation") && text.contains("cluster.token"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_an_nkey_a_wake_up_crosses_nodes_and_an_unknown_nkey_is_refused() {
    let user = nkeys::KeyPair::new_user();
    let nats = SecureNats::start_with(&format!("users = [{{ nkey: \"{}\" }}]", user.public_key()));
    let tenant = Tenant::create();
    let seed_file = |pair: &nkeys::KeyPair, name: &str| {
        let path = nats.dir.path().join(name);
        // Framed as nsc writes it.
        let seed = pair.seed().expect("seed");
        std::fs::write(
            &path,
            format!("-----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n"),
        )
        .expect("seed file");
        format!("ca = {:?}\nnkey_seed_file = {path:?}\n", nats.ca)
    };
    let lines = seed_file(&user, "node.nk");
    let n0 = Node::start_with("n0", &nats.url, tenant.dir.path(), &lines);
    let n1 = Node::start_with("n1", &nats.url, tenant.dir.path(), &lines);
    a_wake_up_crosses(&n0, &n1, &tenant).await;
    let stranger = seed_file(&nkeys::KeyPair::new_user(), "stranger.nk");
    let text = Node::refused("n2", &nats.url, tenant.dir.path(), &stranger);
    assert!(
        text.contains("authorization violation") && text.contains("cluster.nkey_seed_file"),
        "{text}"
    );
}

/// A JWT of NATS' decentralized accounts (what `nsc` writes): header and claims in base64url
/// without padding, signed with `issuer`'s NKey over `header.claims`.
fn nats_jwt(issuer: &nkeys::KeyPair, subject: &str, name: &str, nats: serde_json::Value) -> String {
    use base64::Engine;
    let b64 = |bytes: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
    let claims = serde_json::json!({
        "jti": format!("{name}-{subject}"),
        "iat": cluster_support::unix_now(),
        "iss": issuer.public_key(),
        "sub": subject,
        "name": name,
        "nats": nats,
    });
    let signed = format!(
        "{}.{}",
        b64(br#"{"typ":"JWT","alg":"ed25519-nkey"}"#),
        b64(claims.to_string().as_bytes())
    );
    let signature = issuer.sign(signed.as_bytes()).expect("sign");
    format!("{signed}.{}", b64(&signature))
}

/// A user JWT for `user` signed by `account`, with its seed, framed as `nsc generate creds`
/// writes it.
fn creds(account: &nkeys::KeyPair, user: &nkeys::KeyPair) -> String {
    let jwt = nats_jwt(
        account,
        &user.public_key(),
        "beckon-node",
        serde_json::json!({
            "type": "user", "version": 2, "pub": {}, "sub": {},
            "subs": -1, "data": -1, "payload": -1,
        }),
    );
    let seed = user.seed().expect("seed");
    format!(
        "-----BEGIN NATS USER JWT-----\n{jwt}\n------END NATS USER JWT------\n\n************************* IMPORTANT *************************\nNKEY Seed printed below can be used to sign and prove identity.\nNKEYs are sensitive and should be treated as secrets.\n\n-----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n\n*************************************************************\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_creds_file_in_operator_mode_a_wake_up_crosses_nodes_and_a_foreign_account_is_refused()
 {
    // Operator mode: the operator signs the account, the account signs the user; the server
    // knows the operator and, through its memory resolver, the account.
    let operator = nkeys::KeyPair::new_operator();
    let account = nkeys::KeyPair::new_account();
    let limits = serde_json::json!({
        "subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1,
        "wildcards": true, "conn": -1, "leaf": -1,
    });
    let operator_jwt = nats_jwt(
        &operator,
        &operator.public_key(),
        "beckon-test-operator",
        serde_json::json!({ "type": "operator", "version": 2 }),
    );
    let account_jwt = nats_jwt(
        &operator,
        &account.public_key(),
        "beckon",
        serde_json::json!({ "type": "account", "version": 2, "limits": limits }),
    );
    let nats = SecureNats::start_configured(|dir| {
        let path = dir.join("operator.jwt");
        std::fs::write(&path, &operator_jwt).expect("operator JWT");
        format!(
            "operator: {path:?}\nresolver: MEMORY\nresolver_preload: {{\n  {}: \"{account_jwt}\"\n}}\n",
            account.public_key()
        )
    });
    let tenant = Tenant::create();
    let creds_file = |account: &nkeys::KeyPair, name: &str| {
        let path = nats.dir.path().join(name);
        std::fs::write(&path, creds(account, &nkeys::KeyPair::new_user())).expect("creds");
        format!("ca = {:?}\ncredentials_file = {path:?}\n", nats.ca)
    };
    // Each node a user of its own, as nsc would make them.
    let n0 = Node::start_with(
        "n0",
        &nats.url,
        tenant.dir.path(),
        &creds_file(&account, "n0.creds"),
    );
    let n1 = Node::start_with(
        "n1",
        &nats.url,
        tenant.dir.path(),
        &creds_file(&account, "n1.creds"),
    );
    a_wake_up_crosses(&n0, &n1, &tenant).await;
    // A well-formed user JWT, but signed by an account this NATS does not know.
    let foreign = creds_file(&nkeys::KeyPair::new_account(), "foreign.creds");
    let text = Node::refused("n2", &nats.url, tenant.dir.path(), &foreign);
    assert!(
        text.contains("authorization violation") && text.contains("cluster.credentials_file"),
        "{text}"
    );
}

/// An agent connects to `n1`; once its presence reached a server on `n0` through NATS, a
/// wake-up the server publishes on `n0` reaches it.
async fn a_wake_up_crosses(n0: &Node, n1: &Node, tenant: &Tenant) {
    let mut server = Client::connect(n0.addr, &tenant.token(Role::Server, "console"))
        .await
        .expect("server connects to n0");
    server.subscribe("agents/+/presence").await;
    let mut agent = Client::connect(n1.addr, &tenant.token(Role::Agent, "pc-1"))
        .await
        .expect("agent connects to n1");
    agent.subscribe("agents/pc-1/wake").await;

    // Presence crossed from n1 to n0 through NATS, and says where the agent is.
    loop {
        let msg = server
            .message(WAIT)
            .await
            .expect("pc-1's presence reaches the server on n0");
        let event = PresenceEvent::from_json(&msg.payload).expect("presence JSON");
        if msg.topic == "agents/pc-1/presence" && event.state == PresenceState::Connected {
            assert_eq!(event.node.as_deref(), Some("n1"));
            break;
        }
    }
    server.publish("agents/pc-1/wake", "w-tls", Some(600)).await;
    let msg = agent
        .message(WAIT)
        .await
        .expect("the wake-up published on n0 reaches the agent on n1");
    assert_eq!(msg.payload, &b"w-tls"[..]);
}

#[test]
fn a_wrong_password_stops_the_node_with_the_reason() {
    let nats = SecureNats::start();
    let tenant = Tenant::create();
    let text = Node::refused(
        "n0",
        &nats.url,
        tenant.dir.path(),
        &SecureNats::node_lines(&nats.ca, "wrong password"),
    );
    assert!(
        text.contains("authorization violation") && text.contains("cluster.password"),
        "{text}"
    );
}

#[test]
fn a_ca_that_did_not_sign_the_nats_certificate_stops_the_node() {
    let nats = SecureNats::start();
    let tenant = Tenant::create();
    let other =
        CertificateAuthority::generate("another CA", Duration::from_secs(3600)).expect("CA");
    let other_path = nats.dir.path().join("other-ca.pem");
    std::fs::write(&other_path, other.cert_pem()).expect("write");
    let text = Node::refused(
        "n0",
        &nats.url,
        tenant.dir.path(),
        &SecureNats::node_lines(&other_path, PASSWORD),
    );
    assert!(
        text.contains("TLS handshake") && text.contains("cluster.ca"),
        "{text}"
    );
}

#[test]
fn clear_text_to_a_nats_off_this_machine_is_refused() {
    let tenant = Tenant::create();
    // 192.0.2.0/24 is reserved for documentation: nothing answers there, nothing is tried.
    let text = Node::refused("n0", "nats://192.0.2.7:4222", tenant.dir.path(), "");
    assert!(
        text.contains("192.0.2.7") && text.contains("cluster.ca") && text.contains("insecure"),
        "{text}"
    );
}

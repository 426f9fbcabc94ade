//! Loading and reloading the tenant folder.

mod common;

use std::fs;
use std::path::Path;

use beckon_identity::{KeyId, Role, SigningKey, TenantDirectory, TokenSigner, TokenVerifier};
use common::{NOW, TestCa};

fn write(dir: &Path, name: &str, text: &str) {
    fs::write(dir.join(name), text).unwrap();
}

fn key(kid: &str) -> SigningKey {
    SigningKey::generate(KeyId::new(kid).unwrap()).unwrap()
}

fn acme_toml(ca_pem: &str, public_key: &str) -> String {
    format!(
        r#"name = "ACME Corp"
max_connections = 5000

[[ca]]
file = "acme-ca.pem"

[[ca]]
pem = """
{ca_pem}"""

[[token_key]]
kid = "console-2026"
public_key = "{public_key}"
"#
    )
}

#[test]
fn a_folder_loads_its_valid_tenants_and_names_every_broken_file() {
    let dir = tempfile::tempdir().unwrap();
    let ca1 = TestCa::new("acme", "acme CA 1");
    let ca2 = TestCa::new("acme", "acme CA 2");
    let console = key("console-2026");
    write(dir.path(), "acme-ca.pem", &ca1.pem);
    write(
        dir.path(),
        "acme.toml",
        &acme_toml(&ca2.pem, &console.public_key().to_base64()),
    );
    write(dir.path(), "empty.toml", "");
    write(
        dir.path(),
        "syntax.toml",
        "name = \"x\"\nmax_connections = \n",
    );
    write(
        dir.path(),
        "typo.toml",
        "name = \"x\"\nmax_conections = 5\n",
    );
    write(
        dir.path(),
        "badkey.toml",
        "[[token_key]]\nkid = \"k\"\npublic_key = \"AAAA\"\n",
    );
    write(
        dir.path(),
        "missingca.toml",
        "[[ca]]\nfile = \"nope.pem\"\n",
    );
    write(
        dir.path(),
        "both.toml",
        "[[ca]]\nfile = \"acme-ca.pem\"\npem = \"x\"\n",
    );
    write(
        dir.path(),
        "notca.toml",
        &format!("[[ca]]\npem = \"\"\"\n{}\"\"\"\n", {
            let leaf = ca1.agent("notca", "x");
            let b64 = base64_std(&leaf);
            format!("-----BEGIN CERTIFICATE-----\n{b64}\n-----END CERTIFICATE-----\n")
        }),
    );
    let k = key("k").public_key().to_base64();
    write(
        dir.path(),
        "dupkid.toml",
        &format!(
            "[[token_key]]\nkid = \"k\"\npublic_key = \"{k}\"\n[[token_key]]\nkid = \"k\"\npublic_key = \"{k}\"\n"
        ),
    );
    write(dir.path(), "zero.toml", "max_connections = 0\n");
    write(dir.path(), "Upper.toml", "");
    write(dir.path(), ".acme.toml.swp", "garbage");
    write(dir.path(), "README.txt", "not a tenant");

    let outcome = TenantDirectory::load(dir.path());
    let ids: Vec<&str> = outcome.directory.iter().map(|t| t.id.as_str()).collect();
    assert_eq!(ids, ["acme", "empty"]);
    let acme = outcome.directory.get("acme").unwrap();
    assert_eq!(acme.name.as_deref(), Some("ACME Corp"));
    assert_eq!(acme.max_connections, Some(5000));
    assert_eq!(acme.ca_certificates.len(), 2);
    assert_eq!(acme.ca_certificates[0].der(), ca1.der.as_slice());
    assert_eq!(
        acme.token_keys.get(&KeyId::new("console-2026").unwrap()),
        Some(&console.public_key())
    );

    let errors: Vec<String> = outcome.errors.iter().map(ToString::to_string).collect();
    let find = |file: &str| {
        errors
            .iter()
            .find(|e| e.contains(&format!("{file}:")))
            .unwrap_or_else(|| panic!("no error for {file}: {errors:#?}"))
            .clone()
    };
    assert_eq!(errors.len(), 9, "{errors:#?}");
    assert!(find("syntax.toml").contains("line 2"), "{errors:#?}");
    let typo = find("typo.toml");
    assert!(
        typo.contains("line 2") && typo.contains("max_conections"),
        "{typo}"
    );
    let badkey = find("badkey.toml");
    assert!(
        badkey.contains("token_key[0].public_key") && badkey.contains("3 bytes"),
        "{badkey}"
    );
    let missing = find("missingca.toml");
    assert!(
        missing.contains("ca[0].file") && missing.contains("nope.pem"),
        "{missing}"
    );
    assert!(find("both.toml").contains("exactly one of"), "{errors:#?}");
    assert!(
        find("notca.toml").contains("not a CA certificate"),
        "{errors:#?}"
    );
    assert!(find("dupkid.toml").contains("appears twice"), "{errors:#?}");
    assert!(find("zero.toml").contains("max_connections"), "{errors:#?}");
    assert!(
        find("Upper.toml").contains("<tenant id>.toml"),
        "{errors:#?}"
    );

    // Tokens signed by the listed key verify against the loaded directory.
    let signer = TokenSigner::new("acme".parse().unwrap(), console);
    let token = signer.issue(Role::Agent, "pc-1", NOW, 60).unwrap();
    assert!(
        TokenVerifier::default()
            .verify(&outcome.directory, token.as_bytes(), NOW)
            .is_ok()
    );
}

fn base64_std(bytes: &[u8]) -> String {
    // Tiny encoder so the test does not need its own base64 dependency.
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[test]
fn reloading_keeps_good_versions_and_notices_every_change() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("acme", "acme CA");
    let k1 = key("k1").public_key().to_base64();
    write(dir.path(), "acme-ca.pem", &ca.pem);
    write(
        dir.path(),
        "acme.toml",
        &format!(
            "[[ca]]\nfile = \"acme-ca.pem\"\n[[token_key]]\nkid = \"k1\"\npublic_key = \"{k1}\"\n"
        ),
    );
    write(dir.path(), "globex.toml", "max_connections = 10\n");
    let first = TenantDirectory::load(dir.path());
    assert!(first.errors.is_empty(), "{:?}", first.errors);
    assert_eq!(first.directory.len(), 2);
    assert!(first.directory.reload_if_changed().is_none());

    // A broken edit: acme keeps its previous version, and the error says so.
    write(dir.path(), "acme.toml", "[[ca]]\nfile = \n");
    let second = first
        .directory
        .reload_if_changed()
        .expect("the change is noticed");
    assert_eq!(second.errors.len(), 1);
    assert!(
        second.errors[0].to_string().contains("previous version"),
        "{}",
        second.errors[0]
    );
    let acme = second.directory.get("acme").unwrap();
    assert_eq!(acme.ca_certificates.len(), 1);
    assert_eq!(acme.token_keys.len(), 1);
    // Nothing changed since: no reload, no repeated error.
    assert!(second.directory.reload_if_changed().is_none());

    // A deleted file removes its tenant; a new file adds one.
    fs::remove_file(dir.path().join("globex.toml")).unwrap();
    write(dir.path(), "initech.toml", "name = \"Initech\"\n");
    let third = second.directory.reload_if_changed().unwrap();
    let ids: Vec<&str> = third.directory.iter().map(|t| t.id.as_str()).collect();
    assert_eq!(ids, ["acme", "initech"]);

    // Fix acme, then change only its CA file: both are noticed.
    write(dir.path(), "acme.toml", "[[ca]]\nfile = \"acme-ca.pem\"\n");
    let fourth = third.directory.reload_if_changed().unwrap();
    assert!(fourth.errors.is_empty(), "{:?}", fourth.errors);
    assert_eq!(fourth.directory.get("acme").unwrap().token_keys.len(), 0);
    let ca2 = TestCa::new("acme", "acme CA 2");
    write(dir.path(), "acme-ca.pem", &format!("{}{}", ca.pem, ca2.pem));
    let fifth = fourth.directory.reload_if_changed().unwrap();
    assert_eq!(
        fifth.directory.get("acme").unwrap().ca_certificates.len(),
        2
    );
}

#[test]
fn a_missing_folder_is_reported_and_keeps_what_was_loaded() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "acme.toml", "");
    let loaded = TenantDirectory::load(dir.path());
    assert_eq!(loaded.directory.len(), 1);
    let gone = dir.path().to_path_buf();
    drop(dir);
    let reloaded = loaded.directory.reload();
    assert_eq!(reloaded.directory.len(), 1);
    assert!(
        reloaded.errors[0]
            .to_string()
            .contains("cannot list the tenant folder"),
        "{}",
        reloaded.errors[0]
    );
    let fresh = TenantDirectory::load(&gone);
    assert!(fresh.directory.is_empty());
    assert_eq!(fresh.errors.len(), 1);
}

/// A `file` that is a device or a pipe has no size to check: reading it could take forever
/// (`/dev/zero`) or block (a FIFO). It is refused without being read, and the others load.
#[test]
fn a_ca_file_that_is_not_a_regular_file_is_refused_unread() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "dev.toml", "[[ca]]\nfile = \"/dev/zero\"\n");
    write(dir.path(), "ok.toml", "name = \"fine\"\n");
    let folder = dir.path().to_owned();
    let (done, outcome) = std::sync::mpsc::channel();
    std::thread::spawn(move || done.send(TenantDirectory::load(&folder)));
    let outcome = outcome
        .recv_timeout(std::time::Duration::from_secs(10))
        .expect("loading does not read /dev/zero forever");
    let ids: Vec<&str> = outcome.directory.iter().map(|t| t.id.as_str()).collect();
    assert_eq!(ids, ["ok"]);
    let [error] = &outcome.errors[..] else {
        panic!("{:?}", outcome.errors);
    };
    let text = error.to_string();
    assert!(
        text.contains("ca[0].file") && text.contains("not a regular file"),
        "{text}"
    );
}

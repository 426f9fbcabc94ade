use super::*;
use proptest::prelude::*;

const NOW_MS: i64 = 1_790_000_000_250;
const NOW: i64 = 1_790_000_000;

fn key(kid: &str) -> SigningKey {
    SigningKey::generate(KeyId::new(kid).unwrap()).unwrap()
}

fn acme() -> TenantId {
    TenantId::new("acme").unwrap()
}

struct Fixture {
    signer: WakeUpSigner,
    verifier: WakeUpVerifier,
    guard: ReplayGuard,
}

fn fixture() -> Fixture {
    let k = key("console-1");
    let verifier = WakeUpVerifier::new(acme(), "pc-42", [(k.kid().clone(), k.public_key())]);
    Fixture {
        signer: WakeUpSigner::new(k),
        verifier,
        guard: ReplayGuard::default(),
    }
}

fn wakeup(agent: &str) -> WakeUp {
    WakeUp::new(&acme(), agent, "policy-changed", NOW_MS, 600, 30).unwrap()
}

/// Builds an envelope by hand from inner JSON text, as `docs/wake-up.md` describes.
fn hand_made(inner: &str, key: &SigningKey) -> Vec<u8> {
    let mut message = b"beckon.wakeup.v1.".to_vec();
    message.extend_from_slice(inner.as_bytes());
    let sig = key.sign(&message);
    serde_json::to_vec(&serde_json::json!({
        "wakeup": inner, "kid": key.kid().as_str(), "sig": b64url(&sig)
    }))
    .unwrap()
}

#[test]
fn new_wake_ups_carry_a_uuid_v7_and_the_documented_fields() {
    let w = wakeup("pc-42").with_action("inventory");
    let id = uuid::Uuid::parse_str(&w.id).unwrap();
    assert_eq!(id.get_version_num(), 7);
    let (secs, _) = id.get_timestamp().unwrap().to_unix();
    assert_eq!(secs as i64, NOW);
    assert_eq!((w.issued_at, w.expires_at, w.spread), (NOW, NOW + 600, 30));
    assert_ne!(w.id, wakeup("pc-42").id);
    let json: serde_json::Value = serde_json::to_value(&w).unwrap();
    let keys: Vec<&str> = json
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(
        keys,
        [
            "action",
            "agent",
            "expires_at",
            "id",
            "issued_at",
            "reason",
            "spread",
            "tenant",
            "v"
        ]
    );
    assert!(WakeUp::new(&acme(), "a/b", "x", NOW_MS, 600, 0).is_err());
    assert!(WakeUp::new(&acme(), "a", "x", NOW_MS, 0, 0).is_err());
    assert!(WakeUp::new(&acme(), "a", "x", NOW_MS, 600, MAX_SPREAD_SECS + 1).is_err());
    assert!(WakeUp::new(&acme(), "a", &"r".repeat(257), NOW_MS, 600, 0).is_err());
}

#[test]
fn a_signed_wake_up_verifies_once() {
    let mut f = fixture();
    let w = wakeup("pc-42");
    let payload = f.signer.sign(&w).unwrap();
    assert!(payload.len() < 600, "{}", payload.len());
    assert_eq!(
        f.verifier.verify(&payload, NOW + 5, &mut f.guard),
        Ok(w.clone())
    );
    assert_eq!(
        f.verifier.verify(&payload, NOW + 6, &mut f.guard),
        Err(WakeUpRejected::Replayed(w.id))
    );
}

#[test]
fn a_hand_made_envelope_verifies() {
    let mut f = fixture();
    let inner = format!(
        r#"{{"v":1,"id":"01999999-9999-7999-8999-999999999999","tenant":"acme","agent":"pc-42","reason":"manual","issued_at":{NOW},"expires_at":{},"spread":0,"action":"inventory"}}"#,
        NOW + 600
    );
    let payload = hand_made(&inner, f.signer.key());
    let w = f.verifier.verify(&payload, NOW, &mut f.guard).unwrap();
    assert_eq!(w.action.as_deref(), Some("inventory"));
    assert_eq!(w.reason, "manual");
    // A signed field a version-1 agent does not know is ignored, not fatal.
    let newer = inner
        .replace(
            "01999999-9999-7999-8999-999999999999",
            "01999999-9999-7999-8999-999999999998",
        )
        .replace(r#""spread":0"#, r#""spread":0,"priority":"high""#);
    assert!(
        f.verifier
            .verify(&hand_made(&newer, f.signer.key()), NOW, &mut f.guard)
            .is_ok()
    );
}

#[test]
fn tampering_anywhere_breaks_the_signature() {
    let mut f = fixture();
    let payload = f.signer.sign(&wakeup("pc-42")).unwrap();
    let mut env: serde_json::Value = serde_json::from_slice(&payload).unwrap();
    let inner = env["wakeup"]
        .as_str()
        .unwrap()
        .replace("\"spread\":30", "\"spread\":0");
    env["wakeup"] = inner.into();
    let tampered = serde_json::to_vec(&env).unwrap();
    assert!(matches!(
        f.verifier.verify(&tampered, NOW, &mut f.guard),
        Err(WakeUpRejected::BadSignature(_))
    ));
    // Same JSON value, different bytes (a space): still refused, the bytes are signed.
    let mut env: serde_json::Value = serde_json::from_slice(&payload).unwrap();
    let inner = env["wakeup"].as_str().unwrap().replacen('{', "{ ", 1);
    env["wakeup"] = inner.into();
    assert!(matches!(
        f.verifier
            .verify(&serde_json::to_vec(&env).unwrap(), NOW, &mut f.guard),
        Err(WakeUpRejected::BadSignature(_))
    ));
    // Flipped signature bit.
    let mut env: serde_json::Value = serde_json::from_slice(&payload).unwrap();
    let mut sig = b64url_decode(env["sig"].as_str().unwrap().as_bytes()).unwrap();
    sig[0] ^= 0x80;
    env["sig"] = b64url(&sig).into();
    assert!(matches!(
        f.verifier
            .verify(&serde_json::to_vec(&env).unwrap(), NOW, &mut f.guard),
        Err(WakeUpRejected::BadSignature(_))
    ));
    assert!(
        f.guard.is_empty(),
        "nothing refused may enter the replay guard"
    );
}

#[test]
fn unknown_or_wrong_keys_are_refused() {
    let mut f = fixture();
    let rogue = WakeUpSigner::new(key("console-2"));
    let err = f
        .verifier
        .verify(&rogue.sign(&wakeup("pc-42")).unwrap(), NOW, &mut f.guard)
        .unwrap_err();
    assert_eq!(err, WakeUpRejected::UnknownKey("console-2".into()));
    // A different key claiming the trusted key id.
    let impostor = WakeUpSigner::new(key("console-1"));
    let err = f
        .verifier
        .verify(&impostor.sign(&wakeup("pc-42")).unwrap(), NOW, &mut f.guard)
        .unwrap_err();
    assert!(matches!(err, WakeUpRejected::BadSignature(_)), "{err}");
}

#[test]
fn another_agents_or_tenants_wake_up_is_refused() {
    let mut f = fixture();
    let err = f
        .verifier
        .verify(&f.signer.sign(&wakeup("pc-43")).unwrap(), NOW, &mut f.guard)
        .unwrap_err();
    assert!(matches!(err, WakeUpRejected::WrongAgent { .. }), "{err}");
    let mut other = wakeup("pc-42");
    other.tenant = "globex".into();
    let err = f
        .verifier
        .verify(&f.signer.sign(&other).unwrap(), NOW, &mut f.guard)
        .unwrap_err();
    assert!(matches!(err, WakeUpRejected::WrongTenant { .. }), "{err}");
}

#[test]
fn expiry_is_checked_against_the_given_clock() {
    let mut f = fixture();
    let payload = f.signer.sign(&wakeup("pc-42")).unwrap();
    let skew = f.verifier.clock_skew_secs;
    let err = f
        .verifier
        .verify(&payload, NOW + 600 + skew, &mut f.guard)
        .unwrap_err();
    assert!(matches!(err, WakeUpRejected::Expired { .. }), "{err}");
    let err = f
        .verifier
        .verify(&payload, NOW - skew - 1, &mut f.guard)
        .unwrap_err();
    assert!(matches!(err, WakeUpRejected::NotYetValid { .. }), "{err}");
    assert!(
        f.verifier
            .verify(&payload, NOW + 600 + skew - 1, &mut f.guard)
            .is_ok()
    );
}

#[test]
fn signed_but_invalid_fields_are_refused() {
    let mut f = fixture();
    let base = format!(
        r#"{{"v":1,"id":"01999999-9999-7999-8999-999999999999","tenant":"acme","agent":"pc-42","reason":"r","issued_at":{NOW},"expires_at":{},"spread":0}}"#,
        NOW + 600
    );
    for (from, to, expected) in [
        (r#""v":1"#, r#""v":2"#, "version 2"),
        ("-7999-", "-4999-", "UUID v7"),
        (r#""spread":0"#, r#""spread":-1"#, "not valid"),
        (r#""spread":0"#, r#""spread":90000"#, "spread"),
        (
            &format!(r#""expires_at":{}"#, NOW + 600),
            &format!(r#""expires_at":{}"#, NOW + 8 * 86400),
            "expires_at",
        ),
        (r#""tenant":"acme""#, r#""tenant":"ACME""#, "tenant"),
        (r#","reason":"r""#, "", "missing field"),
    ] {
        let inner = base.replace(from, to);
        assert_ne!(inner, base);
        let err = f
            .verifier
            .verify(&hand_made(&inner, f.signer.key()), NOW, &mut f.guard)
            .unwrap_err();
        assert!(err.to_string().contains(expected), "{expected}: {err}");
    }
}

#[test]
fn malformed_payloads_are_refused_without_panicking() {
    let mut f = fixture();
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (b"".to_vec(), "envelope"),
        (b"{".to_vec(), "envelope"),
        (b"[1,2]".to_vec(), "envelope"),
        (vec![0xff; 10], "envelope"),
        (br#"{"wakeup":"{}","kid":"console-1"}"#.to_vec(), "envelope"),
        (
            br#"{"wakeup":"{}","kid":"console-1","sig":"!!","x":1}"#.to_vec(),
            "envelope",
        ),
        (
            br#"{"wakeup":"{}","kid":"console-1","sig":"!!"}"#.to_vec(),
            "base64url",
        ),
        (
            br#"{"wakeup":"{}","kid":"console-1","sig":"AAAA"}"#.to_vec(),
            "64 bytes",
        ),
        (
            br#"{"wakeup":"{}","kid":"../../x","sig":"AAAA"}"#.to_vec(),
            "does not know",
        ),
        (vec![b' '; MAX_WAKEUP_LEN + 1], "limit"),
    ];
    for (payload, expected) in cases {
        let err = f.verifier.verify(&payload, NOW, &mut f.guard).unwrap_err();
        assert!(err.to_string().contains(expected), "{expected}: {err}");
    }
    // Signed garbage inner text.
    let err = f
        .verifier
        .verify(&hand_made("not json", f.signer.key()), NOW, &mut f.guard)
        .unwrap_err();
    assert!(matches!(err, WakeUpRejected::Malformed(_)), "{err}");
}

#[test]
fn the_replay_guard_stays_bounded_and_never_lets_a_replay_through() {
    let mut g = ReplayGuard::new(3);
    for (i, until) in [(1, 100), (2, 200), (3, 300)] {
        g.admit(&format!("id{i}"), until, 0).unwrap();
    }
    // Full: id1 (earliest) is pushed out and everything expiring by 100 is refused.
    g.admit("id4", 400, 0).unwrap();
    assert_eq!(g.len(), 3);
    assert_eq!(
        g.admit("id1", 100, 0),
        Err(WakeUpRejected::OutsideReplayWindow("id1".into()))
    );
    assert_eq!(
        g.admit("id2", 200, 0),
        Err(WakeUpRejected::Replayed("id2".into()))
    );
    // A new one expiring before everything kept is admitted once, by raising the floor.
    g.admit("id5", 150, 0).unwrap();
    assert!(g.admit("id5", 150, 0).is_err());
    assert_eq!(g.len(), 3);
    // Time passes: expired ids are forgotten, fresh ones are admitted again.
    g.admit("id6", 1000, 500).unwrap();
    assert_eq!(g.len(), 1);
}

#[test]
fn the_replay_guard_survives_a_restart() {
    let mut f = fixture();
    let payload = f.signer.sign(&wakeup("pc-42")).unwrap();
    f.verifier.verify(&payload, NOW, &mut f.guard).unwrap();
    let saved = f.guard.to_json();
    let mut restored = ReplayGuard::from_json(&saved).unwrap();
    assert_eq!(restored, f.guard);
    assert!(matches!(
        f.verifier.verify(&payload, NOW + 1, &mut restored),
        Err(WakeUpRejected::Replayed(_))
    ));
    // A saved guard larger than its capacity is cut down safely.
    let big = br#"{"capacity":1,"floor":0,"seen":{"a":10,"b":20}}"#;
    let mut g = ReplayGuard::from_json(big).unwrap();
    assert_eq!(g.len(), 1);
    assert!(g.admit("a", 10, 0).is_err());
    assert!(g.admit("b", 20, 0).is_err());
    assert!(ReplayGuard::from_json(b"{\"capacity\":1}").is_err());
}

#[test]
fn pending_wake_ups_merge_into_one_run() {
    let a = WakeUp {
        spread: 300,
        ..wakeup("pc-42")
    };
    let b = WakeUp {
        spread: 0,
        expires_at: NOW + 900,
        ..wakeup("pc-42").with_action("inventory")
    };
    let c = WakeUp {
        spread: 60,
        ..wakeup("pc-42")
    };
    let merged = WakeUp::merge(&[a.clone(), b.clone(), c.clone()]).unwrap();
    assert_eq!(merged.ids, [a.id, b.id, c.id]);
    assert_eq!(merged.actions, [None, Some("inventory".to_owned())]);
    assert_eq!(merged.reasons, ["policy-changed"]);
    assert_eq!(merged.spread, 0);
    assert_eq!(merged.expires_at, NOW + 900);
    assert_eq!(WakeUp::merge(&[]), None);
}

#[test]
fn acks_round_trip_and_bad_ones_are_refused() {
    let id = wakeup("pc-42").id;
    let received = Ack::received(&id, NOW_MS);
    assert_eq!(
        String::from_utf8(received.to_json()).unwrap(),
        format!(r#"{{"wakeup_id":"{id}","stage":"received","at":{NOW_MS}}}"#)
    );
    let finished = Ack::finished(&id, AckStatus::TimedOut, Some(137), 30_000, NOW_MS);
    let json = String::from_utf8(finished.to_json()).unwrap();
    assert!(json.contains(r#""status":"timed_out","exit_code":137,"duration_ms":30000"#));
    assert_eq!(Ack::from_json(json.as_bytes()), Ok(finished));
    assert_eq!(
        Ack::from_json(&Ack::started(&id, 1).to_json()),
        Ok(Ack::started(&id, 1))
    );
    for (bad, expected) in [
        (
            r#"{"wakeup_id":"x","stage":"finished","at":1}"#,
            "carries a status",
        ),
        (
            r#"{"wakeup_id":"x","stage":"received","status":"ok","at":1}"#,
            "only a finished",
        ),
        (r#"{"wakeup_id":"","stage":"received","at":1}"#, "wakeup_id"),
        (r#"{"wakeup_id":"x","stage":"done","at":1}"#, "malformed"),
        (
            r#"{"wakeup_id":"x","stage":"received","at":1,"x":2}"#,
            "malformed",
        ),
        ("nope", "malformed"),
    ] {
        let err = Ack::from_json(bad.as_bytes()).unwrap_err();
        assert!(err.to_string().contains(expected), "{bad}: {err}");
    }
    assert!(matches!(
        Ack::from_json(&vec![b' '; MAX_ACK_LEN + 1]),
        Err(AckError::TooLarge(_))
    ));
}

proptest! {
    #[test]
    fn arbitrary_payloads_never_verify_and_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..700)) {
        let mut f = fixture();
        prop_assert!(f.verifier.verify(&bytes, NOW, &mut f.guard).is_err());
        let _ = Ack::from_json(&bytes);
    }

    #[test]
    fn any_byte_change_of_a_signed_wake_up_is_refused(pos in 0usize..2000, byte in any::<u8>()) {
        let mut f = fixture();
        let payload = f.signer.sign(&wakeup("pc-42")).unwrap();
        let pos = pos % payload.len();
        prop_assume!(payload[pos] != byte);
        let mut changed = payload.clone();
        changed[pos] = byte;
        // Changes that keep the same JSON meaning (e.g. in the kid) are still refused or
        // give back exactly the signed wake-up.
        if let Ok(w) = f.verifier.verify(&changed, NOW, &mut f.guard) {
            let original: Envelope = serde_json::from_slice(&payload).unwrap();
            prop_assert_eq!(serde_json::to_string(&w).unwrap(), original.wakeup);
        }
    }
}

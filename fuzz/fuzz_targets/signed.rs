//! Fuzz target: what agents and the console read from MQTT: signed wake-ups and relay
//! requests (as received, or validly signed so that the checks after the signature run),
//! acks, relay results, the saved replay guard and tokens. Nothing may panic; what verifies
//! is well formed and verifies only once.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    beckon_identity::fuzzing::signed_messages(data);
});

//! Fuzz target: arbitrary bytes through the broker's TLS 1.3 record reader, as raw records or
//! sealed by a client with the reader's keys (so that the checks after decryption are
//! reached). Nothing may panic, and whatever the broker answers (a key update, an alert)
//! must decrypt as a record of its own.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    beckon_broker::fuzzing::tls13_records(data);
});

//! Fuzz target: the console API's request bodies and query strings through the extractor of
//! each route's request type. Nothing may panic; a refusal is a 4xx JSON error that says why.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    beckon_mqtt_fuzz::block_on(beckon_console::api::fuzzing::api_bodies(data));
});

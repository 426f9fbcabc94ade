//! Fuzz target: a client's bytes on the broker's shared HTTPS port after TLS: the HTTP
//! request head, the WebSocket upgrade and the frames after it. Nothing may panic, the
//! server finishes once the client closes, and every answer is HTTP.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    beckon_mqtt_fuzz::block_on(beckon_broker::fuzzing::shared_port(data));
});

//! Fuzz target: a server's answer read by the client side's HTTP parsers: an HTTP proxy's
//! answer to CONNECT, the HTTP client's response (whole or streamed, several on one
//! connection), the WebSocket upgrade answer and its frames. Nothing may panic or wait for
//! its time limit once the server has closed.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    beckon_mqtt_fuzz::block_on(beckon_net::fuzzing::http_answers(data));
});

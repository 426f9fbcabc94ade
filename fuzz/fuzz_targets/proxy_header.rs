//! Fuzz target: the PROXY protocol v1/v2 header the broker reads before TLS on listeners
//! behind a load balancer. Nothing may panic; a header is consumed exactly, no further.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    beckon_broker::fuzzing::proxy_header(data);
});

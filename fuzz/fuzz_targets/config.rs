//! Fuzz target: the broker's configuration file (with `BECKON_...` overrides after a NUL
//! byte, one `NAME=value` a line) when the first byte is even, a tenant file when it is odd.
//! Nothing may panic; a configuration that validates yields its derived settings.
#![no_main]

use std::path::Path;

use beckon_broker::BrokerConfig;
use libfuzzer_sys::fuzz_target;

fn broker_config(text: &str) {
    let (file, env) = text.split_once('\0').unwrap_or((text, ""));
    let Ok(mut config) = BrokerConfig::from_toml(file) else {
        return;
    };
    let env: Vec<(&str, &str)> = env.lines().filter_map(|l| l.split_once('=')).collect();
    let var = |name: &str| {
        env.iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| (*v).to_owned())
    };
    if config.apply_env(var).is_ok() && config.validate().is_ok() {
        let _ = config.core_config();
        let _ = config.min_tls_version();
        let _ = config.connect_timeout();
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let text = String::from_utf8_lossy(rest);
    if mode & 1 == 0 {
        broker_config(&text);
    } else {
        // `file` keys name CA files relative to a folder that does not exist.
        beckon_identity::fuzzing::tenant_file(&text, Path::new("/nonexistent/tenants"));
    }
});

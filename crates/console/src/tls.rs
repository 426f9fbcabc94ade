//! The console's HTTPS certificate: generated from the tenant CA or given as files, renewed
//! while running. Serving is in [`crate::http`].

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use beckon_pki::{CertificateAuthority, ReloadingServerConfig, ServerCertificate};
use tokio::sync::watch;

use crate::{ConsoleConfig, ConsoleError};

/// Validity of the HTTPS certificate the console generates (two years).
pub(crate) const HTTPS_CERT_VALIDITY: Duration = Duration::from_secs(2 * 365 * 24 * 3600);

/// The generated HTTPS certificate (`console-https.pem`, `console-https.key`).
fn generated(config: &ConsoleConfig) -> ServerCertificate {
    ServerCertificate {
        cert: config.data_dir.join("console-https.pem"),
        key: config.data_dir.join("console-https.key"),
        names: config.server_names.clone(),
        validity: config.https_certificate_validity,
    }
}

/// How often a running console checks its HTTPS certificate: renews the generated one
/// within 30 days of its end, and loads a `--tls-cert` file that was replaced.
const RENEW_CHECK: Duration = Duration::from_secs(3600);

/// The HTTPS configuration: the given files, or a certificate issued by the console's CA
/// for the configured names, issued again at start when the names changed or it ends within
/// 30 days.
pub(crate) fn server_config(
    config: &ConsoleConfig,
    ca: &CertificateAuthority,
) -> Result<Arc<ReloadingServerConfig>, ConsoleError> {
    let (cert, key) = match &config.tls_files {
        Some((c, k)) => (c.clone(), k.clone()),
        None => {
            let generated = generated(config);
            renew_generated(&generated, ca)?;
            (generated.cert, generated.key)
        }
    };
    let files = beckon_pki::TlsFiles {
        cert,
        key,
        client_ca: None,
    };
    let options = beckon_pki::ServerTlsOptions {
        alpn: vec![b"http/1.1".to_vec()],
        ..Default::default()
    };
    Ok(Arc::new(ReloadingServerConfig::new(files, options)?))
}

/// Issues the generated certificate when needed, with a log line; whether it did.
fn renew_generated(
    generated: &ServerCertificate,
    ca: &CertificateAuthority,
) -> Result<bool, ConsoleError> {
    let reason = generated.ensure(ca)?;
    if let Some(reason) = reason {
        tracing::info!(
            file = %generated.cert.display(),
            names = ?generated.names,
            "issued the console's HTTPS certificate: {reason}"
        );
    }
    Ok(reason.is_some())
}

/// One check of a running console's certificate: the generated one is issued again when it
/// nears its end, and the configuration reloads changed files (also a replaced `--tls-cert`).
fn renew_once(config: &ConsoleConfig, ca: &CertificateAuthority, tls: &ReloadingServerConfig) {
    if config.tls_files.is_none() {
        match renew_generated(&generated(config), ca) {
            Ok(true) => {
                let _ = tls.reload();
            }
            Ok(false) => {}
            Err(e) => tracing::warn!(error = %e, "cannot renew the console's HTTPS certificate"),
        }
    }
    // Errors are logged by the reload itself; the previous certificate stays in force.
    let _ = tls.reload_if_changed();
}

/// Checks the HTTPS certificate every hour until `shutdown`, so that a console that runs for
/// years renews it without a restart.
pub(crate) async fn renew(
    state: crate::AppState,
    tls: Arc<ReloadingServerConfig>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(RENEW_CHECK) => {}
            _ = crate::dispatch::stopped(&mut shutdown) => return,
        }
        let (config, ca, tls) = (state.config.clone(), state.ca.clone(), tls.clone());
        let _ = tokio::task::spawn_blocking(move || renew_once(&config, &ca, &tls)).await;
    }
}

/// Warnings about certificates that end within 30 days and that the console does not renew
/// itself: the broker certificate it knows of, and an HTTPS certificate given with
/// `--tls-cert`. Shown in the status and logged at start.
pub(crate) fn certificate_warnings(config: &ConsoleConfig) -> Vec<String> {
    let issued = config.data_dir.join(crate::ISSUED_BROKER_CERT);
    let broker = match &config.broker_certificate {
        Some(file) => Some(file.clone()),
        None => issued.exists().then_some(issued),
    };
    let mut warnings = Vec::new();
    let checks = [
        (
            broker,
            "the broker certificate",
            "issue a new one with `beckon console issue-broker-cert` and install it on the broker",
        ),
        (
            config.tls_files.as_ref().map(|(cert, _)| cert.clone()),
            "the console's HTTPS certificate",
            "replace the --tls-cert file and restart the console",
        ),
    ];
    for (file, what, fix) in checks {
        // Not made yet (`beckon up` issues its broker's after the console started).
        let Some(file) = file.filter(|f| f.exists()) else {
            continue;
        };
        let end = beckon_pki::load_certificates(&file).and_then(|certs| {
            let leaf = &certs[0];
            Ok((beckon_pki::ends_soon(leaf)?, beckon_pki::not_after(leaf)?))
        });
        match end {
            Ok((false, _)) => {}
            Ok((true, end)) => warnings.push(match end.duration_since(SystemTime::now()) {
                Ok(left) => format!(
                    "{what} {} ends in {} days: {fix}",
                    file.display(),
                    left.as_secs() / 86_400
                ),
                Err(_) => format!("{what} {} has expired: {fix}", file.display()),
            }),
            Err(e) => warnings.push(format!("{what}: {e}")),
        }
    }
    warnings
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(path: &std::path::Path) -> rustls::pki_types::CertificateDer<'static> {
        beckon_pki::load_certificates(path)
            .expect("certificate")
            .remove(0)
    }

    /// The generated certificate is kept across starts, issued again for new names, and
    /// issued again at every start once it is within 30 days of its end; the status warns
    /// about a broker certificate that ends soon.
    #[test]
    fn the_https_certificate_follows_the_names_and_renews_near_its_end() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = CertificateAuthority::generate("test", Duration::from_secs(900 * 24 * 3600))
            .expect("ca");
        let mut config = ConsoleConfig::new(dir.path());
        config.plain_http = false;
        let file = dir.path().join("console-https.pem");
        let read = || std::fs::read(&file).expect("read");

        server_config(&config, &ca).expect("first start");
        let first = read();
        server_config(&config, &ca).expect("second start");
        assert_eq!(read(), first, "kept while names and validity are fine");

        config.server_names = vec!["console.example.com".into(), "192.0.2.7".into()];
        server_config(&config, &ca).expect("renamed");
        let renamed = read();
        assert_ne!(renamed, first, "a new --server-name issues it again");
        let identity = beckon_pki::certificate_identity(&leaf(&file)).expect("identity");
        assert_eq!(identity.common_name.as_deref(), Some("console.example.com"));

        // Ten days of validity: within 30 days of its end from the start.
        config.https_certificate_validity = Duration::from_secs(10 * 24 * 3600);
        config.server_names.push("console".into());
        server_config(&config, &ca).expect("short");
        let short = read();
        assert!(beckon_pki::ends_soon(&leaf(&file)).expect("end"));
        server_config(&config, &ca).expect("near its end");
        assert_ne!(read(), short, "issued again near its end");

        // A running console renews it too.
        let tls = server_config(&config, &ca).expect("start");
        let before = read();
        renew_once(&config, &ca, &tls);
        assert_ne!(read(), before, "renewed while running");

        // The status warns about a broker certificate near its end, not about a fresh one.
        assert!(certificate_warnings(&config).is_empty());
        config.broker_certificate = Some(file.clone());
        let warnings = certificate_warnings(&config);
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(warnings[0].contains("ends in 9 days"), "{warnings:?}");
        assert!(warnings[0].contains("issue-broker-cert"), "{warnings:?}");
        config.broker_certificate = None;
        std::fs::write(dir.path().join(crate::ISSUED_BROKER_CERT), &renamed).expect("write");
        assert!(certificate_warnings(&config).is_empty(), "two years left");
    }
}

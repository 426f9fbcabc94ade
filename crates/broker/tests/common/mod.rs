//! What the broker's test programs share: a TLS client configuration for the broker.

use std::path::Path;
use std::sync::Arc;

use tokio_rustls::rustls;

/// A rustls client trusting the CA in `ca_pem`, offering the `alpn` protocols, with the
/// client certificate `identity` when given.
pub fn client_tls_config(
    ca_pem: &Path,
    alpn: &[&[u8]],
    identity: Option<&beckon_pki::IssuedCertificate>,
) -> rustls::ClientConfig {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in beckon_pki::load_certificates(ca_pem).expect("ca") {
        roots.add(c).expect("root");
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots);
    let mut config = match identity {
        None => builder.with_no_client_auth(),
        Some(id) => builder
            .with_client_auth_cert(
                vec![id.cert_der().expect("der")],
                rustls::pki_types::PrivateKeyDer::from_pem_slice(id.key_pem.as_bytes())
                    .expect("key"),
            )
            .expect("client cert"),
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    config
}

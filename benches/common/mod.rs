//! Shared by the load generators: a TLS client that accepts Parley's
//! certificate, and provisioning of numbered benchmark extensions.

use std::sync::Arc;

use parley::pbx::policy::EncryptionPolicy;

/// A load generator measures throughput, not trust: it accepts any
/// certificate, as baresip does.
pub fn tls_connector() -> tokio_rustls::TlsConnector {
    #[derive(Debug)]
    struct AcceptAll;
    impl rustls::client::danger::ServerCertVerifier for AcceptAll {
        fn verify_server_cert(
            &self,
            _: &rustls_pki_types::CertificateDer<'_>,
            _: &[rustls_pki_types::CertificateDer<'_>],
            _: &rustls_pki_types::ServerName<'_>,
            _: &[u8],
            _: rustls_pki_types::UnixTime,
        ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
            Ok(rustls::client::danger::ServerCertVerified::assertion())
        }
        fn verify_tls12_signature(
            &self,
            _: &[u8],
            _: &rustls_pki_types::CertificateDer<'_>,
            _: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
        }
        fn verify_tls13_signature(
            &self,
            _: &[u8],
            _: &rustls_pki_types::CertificateDer<'_>,
            _: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
        }
        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            rustls::crypto::ring::default_provider()
                .signature_verification_algorithms
                .supported_schemes()
        }
    }
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .dangerous()
    .with_custom_certificate_verifier(Arc::new(AcceptAll))
    .with_no_client_auth();
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
}

/// Creates extensions FIRST..FIRST+COUNT, password "pw<number>", in a
/// Parley data directory (skipping those that exist).
pub async fn provision(
    data_dir: &str,
    domain: &str,
    first: u32,
    count: u32,
    encryption: EncryptionPolicy,
) {
    use parley::pbx::directory::Extension;
    use parley::sip::digest::{Algorithm, ha1};
    let store = parley::store::Store::open(std::path::Path::new(data_dir))
        .await
        .unwrap();
    let realm = store.realm(Some(domain)).await.unwrap();
    let existing: std::collections::HashSet<String> = store
        .list_extensions()
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.number)
        .collect();
    let mut added = 0;
    for u in first..first + count {
        let number = u.to_string();
        if existing.contains(&number) {
            continue;
        }
        let pw = format!("pw{u}");
        store
            .add_extension(&Extension {
                ha1_md5: ha1(Algorithm::Md5, &number, &realm, &pw),
                ha1_sha256: ha1(Algorithm::Sha256, &number, &realm, &pw),
                number,
                name: None,
                realm: realm.clone(),
                encryption,
            })
            .await
            .unwrap();
        added += 1;
    }
    println!("provisioned {added} extensions in {data_dir} (realm {realm})");
}

//! Certificates: generated on first start, served over SIP-TLS and HTTPS,
//! replaceable by an admin without a restart and without dropping the
//! connections phones already hold.

mod support;

use std::time::Duration;

use parley::sip::ua::RegisterOutcome;
use rcgen::{CertificateParams, DnType, Issuer, KeyPair};
use support::phone::{Phone, tls_client_config};
use support::{DOMAIN, Parley};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_start_writes_a_ca_and_a_server_certificate_it_verifies_with() {
    let p = Parley::start("");
    let certs = p.data_dir().join("certs");
    for f in ["ca.crt", "ca.key", "server.crt", "server.key"] {
        assert!(certs.join(f).exists(), "{f} missing");
    }
    assert!(
        p.log()
            .contains(&certs.join("ca.crt").display().to_string()),
        "the log names the CA file"
    );
    // Verified against the CA, by DNS name and by IP address.
    Phone::tls(p.tls, &p.ca_cert(), DOMAIN, "x", "y").await;
    Phone::tls(p.tls, &p.ca_cert(), "localhost", "x", "y").await;
    Phone::tls(p.tls, &p.ca_cert(), "127.0.0.1", "x", "y").await;
    // A name the certificate does not carry is refused by the client.
    assert!(
        Phone::try_tls(p.tls, &p.ca_cert(), "evil.example", "x", "y")
            .await
            .is_err()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_1_2_and_1_3_are_both_offered() {
    let p = Parley::start("");
    for version in [&rustls::version::TLS12, &rustls::version::TLS13] {
        let mut roots = rustls::RootCertStore::empty();
        let pem = std::fs::read(p.ca_cert()).unwrap();
        for c in rustls_pki_types::pem::PemObject::pem_slice_iter(&pem) {
            roots.add(c.unwrap()).unwrap();
        }
        let cfg = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(&[version])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        let tcp = tokio::net::TcpStream::connect(p.tls).await.unwrap();
        let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg))
            .connect(DOMAIN.try_into().unwrap(), tcp)
            .await
            .unwrap();
        assert_eq!(tls.get_ref().1.protocol_version(), Some(version.version));
        assert_eq!(
            tls.get_ref().1.alpn_protocol(),
            None,
            "SIP over TLS negotiates no ALPN"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replaced_certificate_is_served_to_new_connections_while_old_ones_live_on() {
    let p = Parley::start("[tls]\nreload_interval_secs = 1\n");
    p.add_extension("100", "password100", "off");
    let mut old = Phone::tls(p.tls, &p.ca_cert(), DOMAIN, "100", "password100").await;
    assert!(matches!(
        old.register().await.0,
        RegisterOutcome::Registered { .. }
    ));
    let first_leaf = old.peer_certs[0].clone();

    // The admin installs a certificate from their own CA.
    let admin_ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "Admin CA");
    let admin_ca = ca_params.self_signed(&admin_ca_key).unwrap();
    let issuer = Issuer::new(ca_params, admin_ca_key);
    let key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec![DOMAIN.to_string()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    let certs = p.data_dir().join("certs");
    // Key first, then certificate: in between, the pair does not match and
    // the server must keep the old one.
    std::fs::write(certs.join("server.key"), key.serialize_pem()).unwrap();
    std::fs::write(certs.join("server.crt"), leaf.pem()).unwrap();
    let admin_ca_file = p.data_dir().join("admin-ca.pem");
    std::fs::write(&admin_ca_file, admin_ca.pem()).unwrap();
    assert!(
        p.wait_log("server certificate reloaded", Duration::from_secs(10)),
        "{}",
        p.log()
    );

    // New connections get the new certificate (verifiable with the admin's CA)...
    let fresh = Phone::tls(p.tls, &admin_ca_file, DOMAIN, "x", "y").await;
    assert_eq!(fresh.peer_certs[0].as_ref(), leaf.der().as_ref());
    assert_ne!(fresh.peer_certs[0], first_leaf);
    // ...while the phone that was already connected keeps its connection.
    let opts = old.options("after-swap");
    assert_eq!(old.request(opts).await.status(), Some(200));
    let mut udp = Phone::udp(p.udp, "100", "password100").await;
    assert_eq!(
        udp.fetch_bindings().await.len(),
        1,
        "the TLS registration is still there"
    );
    // The admin's file is never overwritten by Parley.
    assert_eq!(
        std::fs::read_to_string(certs.join("server.crt")).unwrap(),
        leaf.pem()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_serves_the_ca_certificate() {
    let p = Parley::start("");
    let cfg = tls_client_config(&p.ca_cert());
    let tcp = tokio::net::TcpStream::connect(p.https).await.unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(cfg)
        .connect(DOMAIN.try_into().unwrap(), tcp)
        .await
        .unwrap();
    tls.write_all(
        format!("GET /ca.crt HTTP/1.1\r\nHost: {DOMAIN}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut body = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut body)).await;
    let text = String::from_utf8_lossy(&body);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    let ca = std::fs::read_to_string(p.ca_cert()).unwrap();
    assert!(text.contains(ca.trim()), "{text}");
}

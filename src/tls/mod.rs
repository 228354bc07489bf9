//! Certificates and the TLS server configuration shared by SIP over TLS and
//! the web console.
//!
//! On first start Parley makes a local CA and a server certificate signed
//! by it (`DATA_DIR/certs/`). An admin may put their own PEM files in place
//! of the server's; the resolver notices and serves the new certificate to
//! new connections, while established ones carry on untouched.

use std::fs;
use std::io;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::crypto::ring::sign::any_supported_type;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path}: no PEM certificate found")]
    NoCertificate { path: PathBuf },
    #[error("{path}: no usable PEM private key found")]
    NoKey { path: PathBuf },
    #[error("{path}: unsupported private key: {reason}")]
    BadKey { path: PathBuf, reason: String },
    #[error(
        "{missing} is missing while {present} is there: put it back, or remove both to have Parley make new ones"
    )]
    Incomplete { present: PathBuf, missing: PathBuf },
    #[error("certificate {cert} does not match key {key}")]
    Mismatch { cert: PathBuf, key: PathBuf },
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

/// Where the local CA and the server certificate live.
#[derive(Debug, Clone)]
pub struct CertPaths {
    pub dir: PathBuf,
    pub ca_cert: PathBuf,
    pub ca_key: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    /// Fingerprint of the server certificate Parley made itself, so it can
    /// tell its own (which it may renew) from an admin's (which it never touches).
    pub generated_marker: PathBuf,
}

impl CertPaths {
    pub fn new(data_dir: &Path, server_cert: PathBuf, server_key: PathBuf) -> CertPaths {
        let dir = data_dir.join("certs");
        CertPaths {
            ca_cert: dir.join("ca.crt"),
            ca_key: dir.join("ca.key"),
            generated_marker: dir.join("server.generated"),
            server_cert,
            server_key,
            dir,
        }
    }
}

/// What the server certificate must name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub dns_names: Vec<String>,
    pub ips: Vec<IpAddr>,
}

impl Identity {
    pub fn new(domain: &str, extra_ips: impl IntoIterator<Item = IpAddr>) -> Identity {
        let mut dns_names = vec![];
        let mut ips: Vec<IpAddr> = vec![
            "127.0.0.1".parse().expect("literal"),
            "::1".parse().expect("literal"),
        ];
        match domain.parse::<IpAddr>() {
            Ok(ip) => ips.push(ip),
            Err(_) => dns_names.push(domain.to_ascii_lowercase()),
        }
        if !dns_names.iter().any(|d| d == "localhost") {
            dns_names.push("localhost".into());
        }
        for ip in extra_ips {
            if !ip.is_unspecified() && !ips.contains(&ip) {
                ips.push(ip);
            }
        }
        Identity { dns_names, ips }
    }

    fn sans(&self) -> Vec<SanType> {
        let mut s: Vec<SanType> = self
            .dns_names
            .iter()
            .filter_map(|d| d.clone().try_into().ok().map(SanType::DnsName))
            .collect();
        s.extend(self.ips.iter().map(|ip| SanType::IpAddress(*ip)));
        s
    }
}

/// How long before its end Parley's own server certificate is renewed.
pub const RENEW_BEFORE: time::Duration = time::Duration::days(30);

/// Of a certificate and its key, the one missing while the other is there:
/// Parley never writes over a lone file, which may be an admin's.
fn lone_file(cert: &Path, key: &Path) -> Result<bool, TlsError> {
    match (cert.exists(), key.exists()) {
        (true, false) => Err(TlsError::Incomplete {
            present: cert.to_owned(),
            missing: key.to_owned(),
        }),
        (false, true) => Err(TlsError::Incomplete {
            present: key.to_owned(),
            missing: cert.to_owned(),
        }),
        (both, _) => Ok(both),
    }
}

/// Makes the CA and the server certificate when both of a pair are
/// missing, and renews Parley's own server certificate when the names it
/// must carry changed or its end is less than [`RENEW_BEFORE`] away.
/// Returns true when a server certificate was written.
pub fn ensure_certificates(paths: &CertPaths, identity: &Identity) -> Result<bool, TlsError> {
    fs::create_dir_all(&paths.dir).map_err(|source| TlsError::Io {
        path: paths.dir.clone(),
        source,
    })?;
    // A lone CA file is not replaced: phones trust that CA. It is only an
    // error when a certificate must be signed.
    let ca = lone_file(&paths.ca_cert, &paths.ca_key);
    if matches!(ca, Ok(false)) {
        let (cert_pem, key_pem) = make_ca()?;
        write_file(&paths.ca_key, key_pem.as_bytes(), true)?;
        write_file(&paths.ca_cert, cert_pem.as_bytes(), false)?;
        tracing::info!(path = %paths.ca_cert.display(), "created a local certificate authority");
    }
    let present = lone_file(&paths.server_cert, &paths.server_key)?;
    let ours = match (
        fs::read(&paths.server_cert),
        fs::read_to_string(&paths.generated_marker),
    ) {
        (Ok(pem), Ok(marker)) => fingerprint(&pem) == marker.trim(),
        _ => false,
    };
    let why = if !present {
        "created"
    } else if !ours {
        // An admin's certificate: never touched.
        return Ok(false);
    } else if !cert_matches_identity(&paths.server_cert, identity) {
        "renewed for new names"
    } else if cert_ends_within(&paths.server_cert, RENEW_BEFORE) {
        "renewed before it expires"
    } else {
        return Ok(false);
    };
    ca?;
    let ca_cert = read_string(&paths.ca_cert)?;
    let ca_key = KeyPair::from_pem(&read_string(&paths.ca_key)?)?;
    let issuer = Issuer::from_ca_cert_pem(&ca_cert, ca_key)?;
    let (cert_pem, key_pem) = make_server_cert(identity, &issuer)?;
    write_file(&paths.server_key, key_pem.as_bytes(), true)?;
    write_file(&paths.server_cert, cert_pem.as_bytes(), false)?;
    write_file(
        &paths.generated_marker,
        fingerprint(cert_pem.as_bytes()).as_bytes(),
        false,
    )?;
    tracing::info!(
        path = %paths.server_cert.display(), names = ?identity.dns_names, ips = ?identity.ips,
        "server certificate {why}, signed by the local CA"
    );
    Ok(true)
}

fn make_ca() -> Result<(String, String), TlsError> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "Parley local CA");
    dn.push(DnType::OrganizationName, "Parley");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = rcgen::date_time_ymd(2024, 1, 1);
    params.not_after = days_from_now(3650);
    let cert = params.self_signed(&key)?;
    Ok((cert.pem(), key.serialize_pem()))
}

fn make_server_cert(
    identity: &Identity,
    issuer: &Issuer<'_, KeyPair>,
) -> Result<(String, String), TlsError> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    let mut dn = DistinguishedName::new();
    dn.push(
        DnType::CommonName,
        identity
            .dns_names
            .first()
            .cloned()
            .unwrap_or_else(|| "parley".into()),
    );
    params.distinguished_name = dn;
    params.subject_alt_names = identity.sans();
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.not_before = days_from_now(-1);
    // Under 398 days, the longest lifetime browsers and many phones accept.
    params.not_after = days_from_now(397);
    let cert = params.signed_by(&key, issuer)?;
    Ok((cert.pem(), key.serialize_pem()))
}

fn days_from_now(days: i64) -> time::OffsetDateTime {
    time::OffsetDateTime::now_utc() + time::Duration::days(days)
}

/// Whether the certificate at `path` ends within `margin` (or cannot be
/// read, which is as good as ended).
fn cert_ends_within(path: &Path, margin: time::Duration) -> bool {
    let Ok(der) = CertificateDer::from_pem_file(path) else {
        return true;
    };
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(&der) else {
        return true;
    };
    let ends = cert.validity().not_after.timestamp();
    ends <= (time::OffsetDateTime::now_utc() + margin).unix_timestamp()
}

fn cert_matches_identity(path: &Path, identity: &Identity) -> bool {
    let Ok(der) = CertificateDer::from_pem_file(path) else {
        return false;
    };
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(&der) else {
        return false;
    };
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return false;
    };
    let mut dns = vec![];
    let mut ips = vec![];
    for name in &san.value.general_names {
        match name {
            x509_parser::extensions::GeneralName::DNSName(d) => dns.push(d.to_ascii_lowercase()),
            x509_parser::extensions::GeneralName::IPAddress(b) => match b.len() {
                4 => ips.push(IpAddr::from(
                    <[u8; 4]>::try_from(*b).expect("length checked"),
                )),
                16 => ips.push(IpAddr::from(
                    <[u8; 16]>::try_from(*b).expect("length checked"),
                )),
                _ => {}
            },
            _ => {}
        }
    }
    identity.dns_names.iter().all(|d| dns.contains(d))
        && identity.ips.iter().all(|i| ips.contains(i))
}

fn fingerprint(pem: &[u8]) -> String {
    hex::encode(Sha256::digest(pem))
}

fn read_string(path: &Path) -> Result<String, TlsError> {
    fs::read_to_string(path).map_err(|source| TlsError::Io {
        path: path.to_owned(),
        source,
    })
}

/// Writes atomically (temp file + rename), keys readable by the owner only.
fn write_file(path: &Path, data: &[u8], secret: bool) -> Result<(), TlsError> {
    let err = |source| TlsError::Io {
        path: path.to_owned(),
        source,
    };
    let tmp = path.with_extension("tmp");
    {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(if secret { 0o600 } else { 0o644 })
            .open(&tmp)
            .map_err(err)?;
        f.write_all(data).map_err(err)?;
        f.sync_all().map_err(err)?;
    }
    fs::rename(&tmp, path).map_err(err)
}

/// Loads a PEM certificate chain and its private key, checking they match.
pub fn load_certified_key(cert: &Path, key: &Path) -> Result<CertifiedKey, TlsError> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| TlsError::Io {
            path: cert.to_owned(),
            source: io::Error::other(e.to_string()),
        })?
        .filter_map(|c| c.ok())
        .collect();
    if chain.is_empty() {
        return Err(TlsError::NoCertificate {
            path: cert.to_owned(),
        });
    }
    let key_der = PrivateKeyDer::from_pem_file(key).map_err(|_| TlsError::NoKey {
        path: key.to_owned(),
    })?;
    let signing = any_supported_type(&key_der).map_err(|e| TlsError::BadKey {
        path: key.to_owned(),
        reason: e.to_string(),
    })?;
    let ck = CertifiedKey::new(chain, signing);
    match ck.keys_match() {
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => Ok(ck),
        Err(_) => Err(TlsError::Mismatch {
            cert: cert.to_owned(),
            key: key.to_owned(),
        }),
    }
}

/// Serves whichever certificate is current; `reload_if_changed` swaps it.
#[derive(Debug)]
pub struct ReloadingResolver {
    cert_path: PathBuf,
    key_path: PathBuf,
    current: RwLock<Arc<CertifiedKey>>,
    stamp: RwLock<FileStamp>,
}

/// Modification times and sizes of the two files: enough to notice a copy.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
struct FileStamp(Option<(SystemTime, u64)>, Option<(SystemTime, u64)>);

impl FileStamp {
    fn read(cert: &Path, key: &Path) -> FileStamp {
        let one = |p: &Path| {
            fs::metadata(p)
                .ok()
                .and_then(|m| Some((m.modified().ok()?, m.len())))
        };
        FileStamp(one(cert), one(key))
    }
}

impl ReloadingResolver {
    pub fn new(cert_path: PathBuf, key_path: PathBuf) -> Result<Arc<ReloadingResolver>, TlsError> {
        let stamp = FileStamp::read(&cert_path, &key_path);
        let ck = load_certified_key(&cert_path, &key_path)?;
        Ok(Arc::new(ReloadingResolver {
            cert_path,
            key_path,
            current: RwLock::new(Arc::new(ck)),
            stamp: RwLock::new(stamp),
        }))
    }

    /// Loads the files again if they changed. A half-written or invalid
    /// pair leaves the current certificate in service (and is retried on
    /// the next call). Returns whether a new certificate is in use.
    pub fn reload_if_changed(&self) -> bool {
        let stamp = FileStamp::read(&self.cert_path, &self.key_path);
        if *self.stamp.read().expect("lock") == stamp {
            return false;
        }
        match load_certified_key(&self.cert_path, &self.key_path) {
            Ok(ck) => {
                *self.current.write().expect("lock") = Arc::new(ck);
                *self.stamp.write().expect("lock") = stamp;
                tracing::info!(path = %self.cert_path.display(), "server certificate reloaded");
                true
            }
            Err(e) => {
                tracing::warn!(
                    "new server certificate not usable yet, keeping the current one: {e}"
                );
                false
            }
        }
    }

    /// The certificate chain now in service (leaf first).
    pub fn current_chain(&self) -> Vec<CertificateDer<'static>> {
        self.current.read().expect("lock").cert.clone()
    }

    /// Checks for changes every `interval` until the process ends.
    pub fn spawn_watcher(self: &Arc<Self>, interval: Duration) {
        let me = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let r = me.clone();
                let _ = tokio::task::spawn_blocking(move || r.reload_if_changed()).await;
            }
        });
    }
}

impl ResolvesServerCert for ReloadingResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.read().expect("lock").clone())
    }
}

/// A rustls server config on the ring provider, TLS 1.2 and 1.3, no ALPN
/// (SIP over TLS negotiates none) unless given.
pub fn server_config(
    resolver: Arc<ReloadingResolver>,
    alpn: &[&[u8]],
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    // Small buffers keep idle connections cheap.
    cfg.send_tls13_tickets = 0;
    Ok(Arc::new(cfg))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn paths(dir: &Path) -> CertPaths {
        CertPaths::new(
            dir,
            dir.join("certs/server.crt"),
            dir.join("certs/server.key"),
        )
    }

    #[test]
    fn first_start_makes_ca_and_server_cert_then_leaves_them() {
        let dir = tempfile::tempdir().unwrap();
        let p = paths(dir.path());
        let id = Identity::new("pbx.example.com", ["192.0.2.10".parse().unwrap()]);
        assert!(ensure_certificates(&p, &id).unwrap());
        assert!(p.ca_cert.exists() && p.ca_key.exists());
        let mode = fs::metadata(&p.server_key).unwrap().permissions();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(mode.mode() & 0o777, 0o600);
        assert!(cert_matches_identity(&p.server_cert, &id));
        load_certified_key(&p.server_cert, &p.server_key).unwrap();
        // Nothing to do the second time.
        assert!(!ensure_certificates(&p, &id).unwrap());
        // A new domain renews Parley's own certificate.
        let id2 = Identity::new("phones.example.com", []);
        assert!(ensure_certificates(&p, &id2).unwrap());
        assert!(cert_matches_identity(&p.server_cert, &id2));
    }

    #[test]
    fn its_own_certificate_is_renewed_a_month_before_it_ends() {
        let dir = tempfile::tempdir().unwrap();
        let p = paths(dir.path());
        let id = Identity::new("pbx.example.com", []);
        ensure_certificates(&p, &id).unwrap();
        assert!(!cert_ends_within(&p.server_cert, RENEW_BEFORE));
        // Parley's certificate, ten days from its end.
        let ca_key = KeyPair::from_pem(&read_string(&p.ca_key).unwrap()).unwrap();
        let issuer = Issuer::from_ca_cert_pem(&read_string(&p.ca_cert).unwrap(), ca_key).unwrap();
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.subject_alt_names = id.sans();
        params.not_before = days_from_now(-387);
        params.not_after = days_from_now(10);
        let old = params.signed_by(&key, &issuer).unwrap();
        fs::write(&p.server_cert, old.pem()).unwrap();
        fs::write(&p.server_key, key.serialize_pem()).unwrap();
        fs::write(&p.generated_marker, fingerprint(old.pem().as_bytes())).unwrap();
        assert!(cert_ends_within(&p.server_cert, RENEW_BEFORE));
        assert!(ensure_certificates(&p, &id).unwrap());
        assert_ne!(fs::read_to_string(&p.server_cert).unwrap(), old.pem());
        assert!(!cert_ends_within(&p.server_cert, time::Duration::days(390)));
        load_certified_key(&p.server_cert, &p.server_key).unwrap();
        // An admin's certificate that ends soon is left to the admin.
        fs::write(&p.server_cert, old.pem()).unwrap();
        fs::write(&p.server_key, key.serialize_pem()).unwrap();
        fs::remove_file(&p.generated_marker).unwrap();
        assert!(!ensure_certificates(&p, &id).unwrap());
        assert_eq!(fs::read_to_string(&p.server_cert).unwrap(), old.pem());
    }

    /// A certificate without its key (or a CA without its key) may be an
    /// admin's file or the one phones trust: never written over.
    #[test]
    fn a_lone_certificate_or_key_is_never_written_over() {
        let dir = tempfile::tempdir().unwrap();
        let p = paths(dir.path());
        let id = Identity::new("pbx.example.com", []);
        ensure_certificates(&p, &id).unwrap();
        let (ca, server) = (
            fs::read_to_string(&p.ca_cert).unwrap(),
            fs::read_to_string(&p.server_cert).unwrap(),
        );
        // The CA key moved offline: fine while nothing must be signed.
        fs::rename(&p.ca_key, dir.path().join("offline.key")).unwrap();
        assert!(!ensure_certificates(&p, &id).unwrap());
        let renaming = ensure_certificates(&p, &Identity::new("new.example.com", []));
        assert!(
            matches!(&renaming, Err(TlsError::Incomplete { missing, .. }) if *missing == p.ca_key),
            "{renaming:?}"
        );
        assert_eq!(fs::read_to_string(&p.ca_cert).unwrap(), ca);
        assert_eq!(fs::read_to_string(&p.server_cert).unwrap(), server);
        fs::rename(dir.path().join("offline.key"), &p.ca_key).unwrap();
        // A server certificate whose key is not there yet.
        fs::remove_file(&p.server_key).unwrap();
        let e = ensure_certificates(&p, &id).unwrap_err();
        assert!(matches!(&e, TlsError::Incomplete { missing, .. } if *missing == p.server_key));
        assert!(e.to_string().contains("server.key"), "{e}");
        assert_eq!(fs::read_to_string(&p.server_cert).unwrap(), server);
    }

    #[test]
    fn an_admins_certificate_is_never_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let p = paths(dir.path());
        let id = Identity::new("pbx.example.com", []);
        ensure_certificates(&p, &id).unwrap();
        // The admin installs their own pair.
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec!["admin.example.com".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        fs::write(&p.server_cert, cert.pem()).unwrap();
        fs::write(&p.server_key, key.serialize_pem()).unwrap();
        assert!(!ensure_certificates(&p, &Identity::new("other.example.com", [])).unwrap());
        assert_eq!(fs::read_to_string(&p.server_cert).unwrap(), cert.pem());
    }

    #[test]
    fn mismatched_or_missing_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = paths(dir.path());
        ensure_certificates(&p, &Identity::new("a.example", [])).unwrap();
        let other = KeyPair::generate().unwrap();
        let stray = dir.path().join("other.key");
        fs::write(&stray, other.serialize_pem()).unwrap();
        assert!(matches!(
            load_certified_key(&p.server_cert, &stray),
            Err(TlsError::Mismatch { .. })
        ));
        assert!(matches!(
            load_certified_key(&stray, &p.server_key),
            Err(TlsError::NoCertificate { .. })
        ));
        assert!(load_certified_key(&dir.path().join("nope.crt"), &p.server_key).is_err());
    }

    #[test]
    fn resolver_swaps_only_for_a_valid_new_pair() {
        let dir = tempfile::tempdir().unwrap();
        let p = paths(dir.path());
        ensure_certificates(&p, &Identity::new("a.example", [])).unwrap();
        let r = ReloadingResolver::new(p.server_cert.clone(), p.server_key.clone()).unwrap();
        let before = r.current_chain();
        assert!(!r.reload_if_changed());
        // A half-written file: ignored, old certificate kept.
        fs::write(&p.server_cert, "-----BEGIN CERTIFICATE-----\nAAAA").unwrap();
        assert!(!r.reload_if_changed());
        assert_eq!(r.current_chain(), before);
        // A valid new pair is picked up.
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec!["b.example".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        fs::write(&p.server_key, key.serialize_pem()).unwrap();
        fs::write(&p.server_cert, cert.pem()).unwrap();
        assert!(r.reload_if_changed());
        assert_eq!(r.current_chain()[0].as_ref(), cert.der().as_ref());
    }
}

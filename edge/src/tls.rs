//! TLS for the HTTPS listener: TLS 1.2 and 1.3 only, ALPN h2 and http/1.1, with the configured certificate or,
//! when none is configured, a self-signed development certificate generated once into `dev_cert_dir`.
//!
//! The certificate is handed to each handshake from a [`CertStore`], so that a renewed certificate (cert-manager
//! rewriting the Secret's files, or an operator and SIGHUP) is served to new connections without a restart.
//! A pair is checked before it is used: the key must match the leaf, and the leaf must be valid now. At start a
//! bad pair stops the edge with the reason; on reload it is refused, logged and counted, and the old pair stays.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use openssl::asn1::Asn1Time;
use openssl::bn::{BigNum, MsbOption};
use openssl::ec::{EcGroup, EcKey};
use openssl::hash::MessageDigest;
use openssl::nid::Nid;
use openssl::pkey::{PKey, Private};
use openssl::ssl::SslVersion;
use openssl::x509::extension::{BasicConstraints, ExtendedKeyUsage, SubjectAlternativeName};
use openssl::x509::{X509, X509NameBuilder};
use pingora::listeners::tls::TlsSettings;

use crate::config::TlsConfig;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("tls: set both cert_path and key_path, or neither")]
    HalfConfigured,
    #[error("tls: {0} does not exist")]
    Missing(PathBuf),
    #[error("tls: generating the development certificate: {0}")]
    Generate(#[from] openssl::error::ErrorStack),
    #[error("tls: writing {0}: {1}")]
    Write(PathBuf, std::io::Error),
    #[error("tls: loading the certificate: {0}")]
    Load(String),
    #[error("tls: reading {0}: {1}")]
    Read(PathBuf, std::io::Error),
    #[error("tls: {0} holds no PEM certificate: {1}")]
    NoCertificate(PathBuf, String),
    #[error("tls: {0} holds no PEM private key: {1}")]
    NoKey(PathBuf, String),
    #[error("tls: the key {key} does not match the certificate {cert} (its public key differs)")]
    Mismatch { cert: PathBuf, key: PathBuf },
    #[error("tls: the certificate {0} expired on {1}")]
    Expired(PathBuf, String),
    #[error("tls: the certificate {0} is not valid before {1}")]
    NotYetValid(PathBuf, String),
}

/// A checked certificate chain (leaf first) and its key.
pub struct CertifiedKey {
    leaf: X509,
    chain: Vec<X509>,
    key: PKey<Private>,
    /// The leaf's `notAfter`, in Unix seconds (for the expiry metric).
    pub not_after_unix: i64,
    /// SHA-256 of the leaf (logs: which certificate is served).
    pub fingerprint: String,
}

/// Reads and checks `cert` (PEM chain, leaf first) and `key` (PEM private key).
pub fn load_pair(cert: &Path, key: &Path) -> Result<CertifiedKey, TlsError> {
    let pem = fs::read(cert).map_err(|e| TlsError::Read(cert.to_path_buf(), e))?;
    let mut certs =
        X509::stack_from_pem(&pem).map_err(|e| TlsError::NoCertificate(cert.to_path_buf(), e.to_string()))?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate(cert.to_path_buf(), "no CERTIFICATE block".into()));
    }
    let leaf = certs.remove(0);
    let key_pem = fs::read(key).map_err(|e| TlsError::Read(key.to_path_buf(), e))?;
    let pkey = PKey::private_key_from_pem(&key_pem).map_err(|e| TlsError::NoKey(key.to_path_buf(), e.to_string()))?;
    if !leaf.public_key().is_ok_and(|public| public.public_eq(&pkey)) {
        return Err(TlsError::Mismatch { cert: cert.to_path_buf(), key: key.to_path_buf() });
    }
    let now = Asn1Time::days_from_now(0)?;
    if leaf.not_after() < now {
        return Err(TlsError::Expired(cert.to_path_buf(), leaf.not_after().to_string()));
    }
    if leaf.not_before() > now {
        return Err(TlsError::NotYetValid(cert.to_path_buf(), leaf.not_before().to_string()));
    }
    let epoch = Asn1Time::from_unix(0)?;
    let not_after_unix =
        epoch.diff(leaf.not_after()).map(|d| i64::from(d.days) * 86_400 + i64::from(d.secs)).unwrap_or(0);
    let fingerprint = leaf.digest(MessageDigest::sha256()).map(|d| hex(&d)).unwrap_or_default();
    Ok(CertifiedKey { leaf, chain: certs, key: pkey, not_after_unix, fingerprint })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The pair handed to new handshakes, replaced by reloads.
pub struct CertStore {
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
    current: RwLock<Arc<CertifiedKey>>,
}

impl CertStore {
    /// Loads and checks the pair: an error here stops the edge.
    pub fn open(cert_path: PathBuf, key_path: PathBuf) -> Result<Arc<Self>, TlsError> {
        let pair = load_pair(&cert_path, &key_path)?;
        Ok(Arc::new(Self { cert_path, key_path, current: RwLock::new(Arc::new(pair)) }))
    }

    pub fn current(&self) -> Arc<CertifiedKey> {
        self.current.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// Loads the files again; a bad pair is refused and the served one stays.
    pub fn reload(&self) -> Result<Arc<CertifiedKey>, TlsError> {
        let pair = Arc::new(load_pair(&self.cert_path, &self.key_path)?);
        *self.current.write().unwrap_or_else(std::sync::PoisonError::into_inner) = pair.clone();
        Ok(pair)
    }
}

/// Gives each handshake the store's current pair.
struct Callbacks(Arc<CertStore>);

#[async_trait::async_trait]
impl pingora::listeners::TlsAccept for Callbacks {
    async fn certificate_callback(&self, ssl: &mut pingora::protocols::tls::TlsRef) {
        let pair = self.0.current();
        let result = pingora::tls::ext::ssl_use_certificate(ssl, &pair.leaf)
            .and_then(|()| pair.chain.iter().try_for_each(|c| pingora::tls::ext::ssl_add_chain_cert(ssl, c)))
            .and_then(|()| pingora::tls::ext::ssl_use_private_key(ssl, &pair.key));
        if let Err(e) = result {
            tracing::error!(error = %e, "could not hand the certificate to a TLS handshake");
        }
    }
}

/// The certificate and key files to serve, generating the development pair when nothing is configured.
pub fn resolve_files(config: &TlsConfig) -> Result<(PathBuf, PathBuf), TlsError> {
    match (&config.cert_path, &config.key_path) {
        (Some(cert), Some(key)) => {
            for p in [cert, key] {
                if !p.is_file() {
                    return Err(TlsError::Missing(p.clone()));
                }
            }
            Ok((cert.clone(), key.clone()))
        }
        (None, None) => ensure_dev_cert(&config.dev_cert_dir),
        _ => Err(TlsError::HalfConfigured),
    }
}

/// The file to give Pingora as its upstream connectors' trust store (`ServerConf::ca_file`, see `main`): the
/// edge's own certificate file, checked here by the same OpenSSL call Pingora makes with it, which Pingora unwraps
/// (a file OpenSSL cannot load would end the process in a panic instead of this error).
pub fn upstream_trust_file(cert: &Path) -> Result<String, TlsError> {
    let path = cert
        .to_str()
        .ok_or_else(|| TlsError::Load(format!("the certificate's path {} is not UTF-8", cert.display())))?;
    let mut ctx = openssl::ssl::SslContext::builder(openssl::ssl::SslMethod::tls())?;
    ctx.set_ca_file(path).map_err(|e| TlsError::Load(format!("{path} as a trust store: {e}")))?;
    Ok(path.to_owned())
}

/// Listener settings serving the pairs of `store`.
pub fn settings(store: Arc<CertStore>) -> Result<TlsSettings, TlsError> {
    let mut tls = TlsSettings::with_callbacks(Box::new(Callbacks(store))).map_err(|e| TlsError::Load(e.to_string()))?;
    tls.set_min_proto_version(Some(SslVersion::TLS1_2))?;
    tls.set_max_proto_version(Some(SslVersion::TLS1_3))?;
    tls.enable_h2();
    Ok(tls)
}

/// Generates `dev-cert.pem` / `dev-key.pem` in `dir` unless both exist: ECDSA P-256, valid for a year, for
/// `localhost` and `127.0.0.1`.
pub fn ensure_dev_cert(dir: &Path) -> Result<(PathBuf, PathBuf), TlsError> {
    let cert_path = dir.join("dev-cert.pem");
    let key_path = dir.join("dev-key.pem");
    if cert_path.is_file() && key_path.is_file() {
        return Ok((cert_path, key_path));
    }
    fs::create_dir_all(dir).map_err(|e| TlsError::Write(dir.to_path_buf(), e))?;
    let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1)?;
    let key = PKey::from_ec_key(EcKey::generate(&group)?)?;

    let mut name = X509NameBuilder::new()?;
    name.append_entry_by_nid(Nid::COMMONNAME, "localhost")?;
    name.append_entry_by_nid(Nid::ORGANIZATIONNAME, "orders-edge development")?;
    let name = name.build();

    let mut serial = BigNum::new()?;
    serial.rand(128, MsbOption::MAYBE_ZERO, false)?;
    let mut b = X509::builder()?;
    b.set_version(2)?;
    let serial = serial.to_asn1_integer()?;
    b.set_serial_number(&serial)?;
    b.set_subject_name(&name)?;
    b.set_issuer_name(&name)?;
    b.set_pubkey(&key)?;
    let (not_before, not_after) = (Asn1Time::days_from_now(0)?, Asn1Time::days_from_now(365)?);
    b.set_not_before(&not_before)?;
    b.set_not_after(&not_after)?;
    b.append_extension(BasicConstraints::new().critical().build()?)?;
    b.append_extension(ExtendedKeyUsage::new().server_auth().build()?)?;
    let san = SubjectAlternativeName::new().dns("localhost").ip("127.0.0.1").build(&b.x509v3_context(None, None))?;
    b.append_extension(san)?;
    b.sign(&key, MessageDigest::sha256())?;
    let cert = b.build();

    write_file(&key_path, &key.private_key_to_pem_pkcs8()?, 0o600)?;
    write_file(&cert_path, &cert.to_pem()?, 0o644)?;
    tracing::info!(cert = %cert_path.display(), "generated a self-signed development certificate");
    Ok((cert_path, key_path))
}

fn write_file(path: &Path, bytes: &[u8], mode: u32) -> Result<(), TlsError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .map_err(|e| TlsError::Write(path.to_path_buf(), e))?;
    f.write_all(bytes).map_err(|e| TlsError::Write(path.to_path_buf(), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dev_cert_is_generated_once_and_covers_loopback() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (cert, key) = ensure_dev_cert(dir.path()).expect("generate");
        let first = fs::read(&cert).expect("read");
        let x = X509::from_pem(&first).expect("pem");
        let sans: Vec<String> = x
            .subject_alt_names()
            .expect("sans")
            .iter()
            .map(|n| n.dnsname().map(str::to_owned).unwrap_or_else(|| format!("{:?}", n.ipaddress())))
            .collect();
        assert!(sans.iter().any(|s| s == "localhost"), "{sans:?}");
        assert!(sans.iter().any(|s| s.contains("127, 0, 0, 1")), "{sans:?}");
        let store = CertStore::open(cert.clone(), key.clone()).expect("load");
        assert_eq!(store.current().fingerprint.len(), 64);
        assert!(store.current().not_after_unix > 0);
        assert!(settings(store).is_ok());
        ensure_dev_cert(dir.path()).expect("again");
        assert_eq!(first, fs::read(&cert).expect("read"), "an existing certificate is kept");
    }

    #[test]
    fn the_upstream_trust_file_is_checked_as_pingora_loads_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (cert, key) = ensure_dev_cert(dir.path()).expect("generate");
        assert_eq!(upstream_trust_file(&cert).expect("a certificate file loads"), cert.to_str().expect("utf-8"));
        // A file OpenSSL finds no certificate in (here the key alone) is an error, where Pingora would panic.
        let err = upstream_trust_file(&key).expect_err("a key is no trust store");
        assert!(err.to_string().contains("as a trust store"), "{err}");
    }

    #[test]
    fn half_a_configuration_is_refused() {
        let c = TlsConfig {
            cert_path: Some("/x".into()),
            key_path: None,
            dev_cert_dir: "/tmp".into(),
            reload_interval_secs: 1,
        };
        assert!(matches!(resolve_files(&c), Err(TlsError::HalfConfigured)));
    }
}

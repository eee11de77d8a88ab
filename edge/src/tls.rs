//! TLS for the HTTPS listener: TLS 1.2 and 1.3 only, ALPN h2 and http/1.1, with the configured certificate or,
//! when none is configured, a self-signed development certificate generated once into `dev_cert_dir`.

use std::fs;
use std::path::{Path, PathBuf};

use openssl::asn1::Asn1Time;
use openssl::bn::{BigNum, MsbOption};
use openssl::ec::{EcGroup, EcKey};
use openssl::hash::MessageDigest;
use openssl::nid::Nid;
use openssl::pkey::PKey;
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

/// Listener settings for `cert` and `key`.
pub fn settings(cert: &Path, key: &Path) -> Result<TlsSettings, TlsError> {
    let mut tls = TlsSettings::intermediate(&cert.to_string_lossy(), &key.to_string_lossy())
        .map_err(|e| TlsError::Load(e.to_string()))?;
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
        assert!(settings(&cert, &key).is_ok());
        ensure_dev_cert(dir.path()).expect("again");
        assert_eq!(first, fs::read(&cert).expect("read"), "an existing certificate is kept");
    }

    #[test]
    fn half_a_configuration_is_refused() {
        let c = TlsConfig { cert_path: Some("/x".into()), key_path: None, dev_cert_dir: "/tmp".into() };
        assert!(matches!(resolve_files(&c), Err(TlsError::HalfConfigured)));
    }
}

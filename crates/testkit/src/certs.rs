//! Throwaway certificates for TLS tests: self-signed ECDSA P-256 for `127.0.0.1` and `localhost`, valid over a
//! chosen window (so that expired and not-yet-valid ones can be made too).

use std::path::{Path, PathBuf};

use openssl::asn1::Asn1Time;
use openssl::bn::{BigNum, MsbOption};
use openssl::ec::{EcGroup, EcKey};
use openssl::hash::MessageDigest;
use openssl::nid::Nid;
use openssl::pkey::PKey;
use openssl::x509::extension::{BasicConstraints, SubjectAlternativeName};
use openssl::x509::{X509, X509NameBuilder};

/// A certificate and key written as `{dir}/{name}.crt` and `{dir}/{name}.key`.
pub struct Pair {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// SHA-256 of the certificate (DER), lower-case hex.
    pub sha256: String,
}

/// A self-signed pair valid from `from_secs` to `to_secs` relative to now (negative: in the past).
pub fn self_signed(dir: &Path, name: &str, from_secs: i64, to_secs: i64) -> anyhow::Result<Pair> {
    let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1)?;
    let key = PKey::from_ec_key(EcKey::generate(&group)?)?;
    let mut subject = X509NameBuilder::new()?;
    subject.append_entry_by_nid(Nid::COMMONNAME, name)?;
    let subject = subject.build();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs() as i64;
    let mut serial = BigNum::new()?;
    serial.rand(120, MsbOption::MAYBE_ZERO, false)?;
    let mut b = X509::builder()?;
    b.set_version(2)?;
    b.set_serial_number(serial.to_asn1_integer()?.as_ref())?;
    b.set_subject_name(&subject)?;
    b.set_issuer_name(&subject)?;
    b.set_pubkey(&key)?;
    b.set_not_before(Asn1Time::from_unix(now + from_secs)?.as_ref())?;
    b.set_not_after(Asn1Time::from_unix(now + to_secs)?.as_ref())?;
    b.append_extension(BasicConstraints::new().critical().build()?)?;
    let san = SubjectAlternativeName::new().dns("localhost").ip("127.0.0.1").build(&b.x509v3_context(None, None))?;
    b.append_extension(san)?;
    b.sign(&key, MessageDigest::sha256())?;
    let cert = b.build();
    let pair = Pair {
        cert: dir.join(format!("{name}.crt")),
        key: dir.join(format!("{name}.key")),
        sha256: cert.digest(MessageDigest::sha256())?.iter().map(|b| format!("{b:02x}")).collect(),
    };
    std::fs::write(&pair.cert, cert.to_pem()?)?;
    std::fs::write(&pair.key, key.private_key_to_pem_pkcs8()?)?;
    Ok(pair)
}

/// The SHA-256 (hex) of the certificate the TLS server on `127.0.0.1:{port}` presents now (no verification).
pub fn served_certificate(port: u16) -> anyhow::Result<String> {
    let mut connector = openssl::ssl::SslConnector::builder(openssl::ssl::SslMethod::tls())?;
    connector.set_verify(openssl::ssl::SslVerifyMode::NONE);
    let connector = connector.build();
    let tcp = std::net::TcpStream::connect(("127.0.0.1", port))?;
    tcp.set_read_timeout(Some(std::time::Duration::from_secs(5)))?;
    let stream = connector.connect("localhost", tcp)?;
    let cert = stream.ssl().peer_certificate().ok_or_else(|| anyhow::anyhow!("no peer certificate"))?;
    Ok(cert.digest(MessageDigest::sha256())?.iter().map(|b| format!("{b:02x}")).collect())
}

//! TLS for wss: an openssl acceptor with Mozilla's "intermediate" profile (TLS 1.2 and 1.3
//! and its cipher suites), from configured PEM files or, when none are configured, from a
//! self-signed development certificate generated in the data directory.

use openssl::asn1::Asn1Time;
use openssl::bn::{BigNum, MsbOption};
use openssl::ec::{EcGroup, EcKey};
use openssl::hash::MessageDigest;
use openssl::nid::Nid;
use openssl::pkey::PKey;
use openssl::ssl::{SslAcceptor, SslAcceptorBuilder, SslFiletype, SslMethod};
use openssl::x509::extension::{
    AuthorityKeyIdentifier, BasicConstraints, ExtendedKeyUsage, KeyUsage, SubjectAlternativeName,
    SubjectKeyIdentifier,
};
use openssl::x509::{X509NameBuilder, X509};
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::config::Config;
use crate::error::StartError;

/// Mozilla's intermediate configuration: these groups and no others.
pub const GROUPS: &str = "X25519:P-256:P-384";

fn tls_error(context: &str, e: impl std::fmt::Display) -> StartError {
    StartError::Tls(format!("{context}: {e}"))
}

/// Where the certificate and key are: configured, or the generated pair in the data directory.
pub fn cert_paths(config: &Config) -> (PathBuf, PathBuf, bool) {
    if config.tls.cert.as_os_str().is_empty() {
        let dir = config.data_dir.join("tls");
        (dir.join("cert.pem"), dir.join("key.pem"), true)
    } else {
        (config.tls.cert.clone(), config.tls.key.clone(), false)
    }
}

/// The acceptor for `config`, generating the development certificate when needed.
pub fn acceptor(config: &Config) -> Result<SslAcceptorBuilder, StartError> {
    let (cert, key, generated) = cert_paths(config);
    if generated && !(cert.exists() && key.exists()) {
        generate_self_signed(&cert, &key)?;
    }
    for path in [&cert, &key] {
        if !path.exists() {
            return Err(tls_error("missing file", path.display()));
        }
    }
    crate::crypto::warn_if_readable_by_others(&key, "TLS key file");
    let mut builder = SslAcceptor::mozilla_intermediate_v5(SslMethod::tls())
        .map_err(|e| tls_error("acceptor", e))?;
    // The intermediate profile's key exchange groups; OpenSSL would offer X448 and P-521 too.
    builder
        .set_groups_list(GROUPS)
        .map_err(|e| tls_error("groups", e))?;
    builder
        .set_private_key_file(&key, SslFiletype::PEM)
        .map_err(|e| tls_error(&key.display().to_string(), e))?;
    builder
        .set_certificate_chain_file(&cert)
        .map_err(|e| tls_error(&cert.display().to_string(), e))?;
    builder
        .check_private_key()
        .map_err(|e| tls_error("key does not match certificate", e))?;
    // One read of the socket takes all that has arrived, where OpenSSL would read a record's
    // 5-byte header and its body apart, then a third time to find the socket empty.
    builder.set_read_ahead(true);
    let pem = std::fs::read(&cert)?;
    let x509 = X509::from_pem(&pem).map_err(|e| tls_error("certificate", e))?;
    log::info!(
        "TLS certificate {} SHA-256 fingerprint {}",
        cert.display(),
        fingerprint(&x509)?
    );
    Ok(builder)
}

/// SHA-256 of the DER certificate as colon-separated hex.
pub fn fingerprint(cert: &X509) -> Result<String, StartError> {
    let digest = cert
        .digest(MessageDigest::sha256())
        .map_err(|e| tls_error("fingerprint", e))?;
    Ok(digest
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":"))
}

/// A P-256 key and a one-year certificate for localhost, 127.0.0.1 and ::1; key file mode 0600.
pub fn generate_self_signed(cert_path: &Path, key_path: &Path) -> Result<(), StartError> {
    let build = || -> Result<(Vec<u8>, Vec<u8>), openssl::error::ErrorStack> {
        let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1)?;
        let key = PKey::from_ec_key(EcKey::generate(&group)?)?;
        let mut name = X509NameBuilder::new()?;
        name.append_entry_by_text("CN", "localhost")?;
        name.append_entry_by_text("O", "Rookery development")?;
        let name = name.build();
        let mut serial = BigNum::new()?;
        serial.rand(127, MsbOption::MAYBE_ZERO, false)?;
        let mut cert = X509::builder()?;
        cert.set_version(2)?;
        let serial = serial.to_asn1_integer()?;
        cert.set_serial_number(&serial)?;
        cert.set_subject_name(&name)?;
        cert.set_issuer_name(&name)?;
        cert.set_pubkey(&key)?;
        let not_before = Asn1Time::days_from_now(0)?;
        let not_after = Asn1Time::days_from_now(365)?;
        cert.set_not_before(&not_before)?;
        cert.set_not_after(&not_after)?;
        // An end-entity certificate (not a CA) that is its own issuer: strict verifiers (the
        // Web PKI profile of RFC 5280 as `cryptography` and rustls apply it) want the key
        // identifiers even on a certificate trusted directly.
        cert.append_extension(BasicConstraints::new().critical().build()?)?;
        cert.append_extension(KeyUsage::new().critical().digital_signature().build()?)?;
        cert.append_extension(ExtendedKeyUsage::new().server_auth().build()?)?;
        let ski = SubjectKeyIdentifier::new().build(&cert.x509v3_context(None, None))?;
        cert.append_extension(ski)?;
        let aki = AuthorityKeyIdentifier::new()
            .keyid(true)
            .build(&cert.x509v3_context(None, None))?;
        cert.append_extension(aki)?;
        let san = SubjectAlternativeName::new()
            .dns("localhost")
            .ip("127.0.0.1")
            .ip("::1")
            .build(&cert.x509v3_context(None, None))?;
        cert.append_extension(san)?;
        cert.sign(&key, MessageDigest::sha256())?;
        Ok((cert.build().to_pem()?, key.private_key_to_pem_pkcs8()?))
    };
    let (cert_pem, key_pem) = build().map_err(|e| tls_error("generating certificate", e))?;
    if let Some(dir) = cert_path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    if let Some(dir) = key_path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    write_private(key_path, &key_pem)?;
    std::fs::write(cert_path, cert_pem)?;
    log::warn!(
        "generated a self-signed TLS certificate for localhost in {} (development only; \
         configure tls.cert and tls.key for production)",
        cert_path.display()
    );
    Ok(())
}

fn write_private(path: &Path, data: &[u8]) -> Result<(), StartError> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(data)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_development_certificate_names_its_keys() {
        let dir = std::env::temp_dir().join(format!("rookery-tls-{}", uuid::Uuid::new_v4()));
        let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
        generate_self_signed(&cert, &key).unwrap();
        let x509 = X509::from_pem(&std::fs::read(&cert).unwrap()).unwrap();
        let ski = x509.subject_key_id().map(|id| id.as_slice().to_vec());
        let aki = x509.authority_key_id().map(|id| id.as_slice().to_vec());
        assert!(ski.as_ref().is_some_and(|id| !id.is_empty()));
        assert_eq!(ski, aki, "its own issuer");
        std::fs::remove_dir_all(dir).unwrap();
    }
}

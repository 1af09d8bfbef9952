//! The rustls `ClientConfig` keyward uses to dial upstream APIs: system roots plus a service's
//! optional `tls.ca_file`, certificate and host name verification always on.
//!
//! Owns the upstream trust decision. Must never: offer a flag, environment variable or custom
//! verifier that skips verification (tests trust a test CA instead); silently start with an
//! empty root store.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use rustls::{ClientConfig, RootCertStore};

use super::TlsError;

/// Builds the upstream `ClientConfig`: the system's roots (rustls-native-certs; unreadable
/// entries are logged and skipped) plus every certificate in `extra_ca`. No usable root at all is
/// an error. ALPN `h2`, `http/1.1`; session resumption on (rustls' default in-memory cache).
///
/// Call once per distinct `extra_ca` at startup or reload, not per request: reading the system
/// store touches hundreds of files.
pub fn client_config(extra_ca: Option<&Path>) -> Result<Arc<ClientConfig>, TlsError> {
    let mut roots = RootCertStore::empty();
    add_system_roots(&mut roots);
    if let Some(path) = extra_ca {
        add_pem_roots(&mut roots, path)?;
    }
    if roots.is_empty() {
        return Err(TlsError::NoRoots);
    }
    // SECURITY: `with_root_certificates` installs webpki verification (chain, validity, EKU and
    // the SNI/host name); this module exposes no other way to build a verifier.
    let mut config = ClientConfig::builder_with_provider(super::crypto_provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = super::alpn_protocols();
    Ok(Arc::new(config))
}

/// Whether `path` is a usable `tls.ca_file` (readable, one or more certificates, each usable as
/// a trust root): what `client_config` would refuse, found when the policy is checked.
pub fn check_ca_file(path: &Path) -> Result<(), TlsError> {
    add_pem_roots(&mut RootCertStore::empty(), path)
}

/// Adds what the platform store offers. Some systems ship a few certificates webpki cannot
/// parse, and a store directory may hold unreadable files: those are skipped with a warning,
/// because refusing to start over one bad root would be worse than trusting one root fewer.
fn add_system_roots(roots: &mut RootCertStore) {
    let native = rustls_native_certs::load_native_certs();
    for error in &native.errors {
        tracing::warn!(%error, "skipping part of the system certificate store");
    }
    let (added, ignored) = roots.add_parsable_certificates(native.certs);
    if ignored > 0 {
        tracing::warn!(
            added,
            ignored,
            "skipped system root certificates that cannot be parsed"
        );
    }
    tracing::debug!(added, "loaded system root certificates");
}

/// Adds every certificate of a PEM file. Unlike the system store, each one must be usable: the
/// operator named this file for this service, so a bad entry is a configuration error.
fn add_pem_roots(roots: &mut RootCertStore, path: &Path) -> Result<(), TlsError> {
    let pem = super::read_pem_file(path).map_err(|source| TlsError::ReadCaFile {
        path: path.to_owned(),
        source,
    })?;
    let invalid = |reason: String| TlsError::InvalidCaCertificate {
        path: path.to_owned(),
        reason,
    };
    let mut count = 0usize;
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|err| invalid(format!("not valid PEM: {err}")))?;
        roots.add(cert).map_err(|err| invalid(err.to_string()))?;
        count += 1;
    }
    if count == 0 {
        return Err(TlsError::NoCaCertificates {
            path: path.to_owned(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::fs;

    use rustls::CertificateError;

    use super::super::test_support::{handshake, rustls_error, temp_ca};
    use super::super::LeafCache;
    use super::*;

    #[tokio::test]
    async fn trusts_a_server_signed_by_the_extra_ca() {
        let (_dir, ca, ca_path) = temp_ca();
        let server = LeafCache::new(ca, 4)
            .expect("cache")
            .server_config("internal.test")
            .await
            .expect("leaf");
        let client = client_config(Some(&ca_path)).expect("client");
        assert_eq!(
            client.alpn_protocols,
            vec![b"h2".to_vec(), b"http/1.1".to_vec()]
        );
        handshake(server, client, "internal.test")
            .await
            .expect("verified handshake");
    }

    #[tokio::test]
    async fn rejects_a_server_signed_by_another_ca() {
        let (_dir, _trusted, trusted_path) = temp_ca();
        let (_other_dir, other, _) = temp_ca();
        let server = LeafCache::new(other, 4)
            .expect("cache")
            .server_config("internal.test")
            .await
            .expect("leaf");
        let client = client_config(Some(&trusted_path)).expect("client");
        let err = handshake(server, client, "internal.test")
            .await
            .expect_err("untrusted issuer");
        assert!(
            matches!(
                rustls_error(&err),
                Some(rustls::Error::InvalidCertificate(
                    CertificateError::UnknownIssuer
                ))
            ),
            "{err}"
        );
    }

    #[test]
    fn a_bundle_of_several_roots_is_accepted() {
        let (dir, first, _) = temp_ca();
        let (_other_dir, second, _) = temp_ca();
        let bundle = dir.path().join("bundle.pem");
        fs::write(
            &bundle,
            format!("# comment\n{}{}", first.cert_pem(), second.cert_pem()),
        )
        .expect("write");
        client_config(Some(&bundle)).expect("bundle");
    }

    #[test]
    fn unusable_ca_files_are_configuration_errors() {
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = dir.path().join("missing.pem");
        let err = client_config(Some(&missing)).expect_err("missing");
        assert!(matches!(err, TlsError::ReadCaFile { .. }), "{err}");
        assert!(err.to_string().contains("tls.ca_file"), "{err}");

        let empty = dir.path().join("empty.pem");
        fs::write(&empty, "no certificates here\n").expect("write");
        let err = client_config(Some(&empty)).expect_err("empty");
        assert!(matches!(err, TlsError::NoCaCertificates { .. }), "{err}");

        let junk = dir.path().join("junk.pem");
        fs::write(
            &junk,
            "-----BEGIN CERTIFICATE-----\nAAECAwQF\n-----END CERTIFICATE-----\n",
        )
        .expect("write");
        let err = client_config(Some(&junk)).expect_err("junk");
        assert!(
            matches!(err, TlsError::InvalidCaCertificate { .. }),
            "{err}"
        );

        // Named by mistake: read no further than a PEM file could be, and not at all when it
        // is not a regular file (a FIFO would hold the read, /dev/zero never ends).
        let big = dir.path().join("big.pem");
        let file = fs::File::create(&big).expect("create");
        file.set_len(64 * 1024 * 1024).expect("sparse file");
        let err = client_config(Some(&big)).expect_err("big");
        assert!(err.to_string().contains("larger than 4 MiB"), "{err}");
        let fifo = dir.path().join("fifo.pem");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .expect("mkfifo");
        assert!(made.success());
        for path in [fifo.as_path(), Path::new("/dev/zero")] {
            let err = client_config(Some(path)).expect_err("not a file");
            assert!(err.to_string().contains("not a regular file"), "{err}");
        }
    }

    #[test]
    fn system_roots_alone_either_load_or_say_how_to_fix_it() {
        // The result depends on the machine's store; both outcomes are acceptable, any other
        // error is not.
        match client_config(None) {
            Ok(config) => assert_eq!(config.alpn_protocols.len(), 2),
            Err(TlsError::NoRoots) => {}
            Err(other) => panic!("unexpected error: {other}"),
        }
    }
}

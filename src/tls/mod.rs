//! TLS for keyward: the CA that signs interception leaves (`ca`), the per-host leaf
//! `ServerConfig` cache used to accept an agent's TLS inside a CONNECT tunnel (`leaf`), and the
//! `ClientConfig` used to dial upstream APIs (`upstream`).
//!
//! Owns every rustls/rcgen configuration decision in one place. Must never: offer a way to turn
//! upstream certificate verification off, rely on a process-wide default `CryptoProvider`, or put
//! any byte of a private key into a log line or an error message.

pub mod ca;
mod der;
pub mod leaf;
pub mod upstream;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::crypto::CryptoProvider;

pub use ca::{CaError, CertAuthority};
pub use leaf::LeafCache;
pub use upstream::client_config;

/// The largest certificate file keyward reads (`ca.cert`, `tls.ca_file`): a bundle of every
/// public root is about 200 KiB.
const MAX_PEM_BYTES: u64 = 4 * 1024 * 1024;

/// Reads a certificate file named in the policy (`crate::files`: a regular file, opened
/// without blocking, bounded).
pub(crate) fn read_pem_file(path: &Path) -> std::io::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    crate::files::read_regular(path, MAX_PEM_BYTES, &mut bytes)?;
    Ok(bytes)
}

/// Everything that can go wrong while issuing leaves or building rustls configurations.
/// Messages say what to do; none carries key material.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The CONNECT host cannot be named in a certificate (not a DNS name, not an IP address).
    #[error(
        "cannot issue a certificate for {host:?}: it is neither a valid DNS name nor an IP address"
    )]
    InvalidHost { host: String },
    /// rcgen refused to sign a leaf (an internal error: the CA was validated when loaded).
    #[error("cannot sign a leaf certificate for `{host}`: {source}")]
    Sign {
        host: String,
        #[source]
        source: rcgen::Error,
    },
    /// The per-cache leaf key could not be generated (the system random source failed).
    #[error("cannot generate the leaf certificate key: {0}")]
    LeafKey(#[source] rcgen::Error),
    /// rustls refused a configuration (an internal error: inputs are built by this module).
    #[error("cannot build the TLS configuration: {0}")]
    Config(#[from] rustls::Error),
    /// A service's `tls.ca_file` cannot be read.
    #[error("cannot read `{}`: {source}; check the service's `tls.ca_file` path and that keyward may read it", path.display())]
    ReadCaFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A service's `tls.ca_file` holds no certificate.
    #[error("`{}` holds no PEM certificate; `tls.ca_file` must contain one or more `-----BEGIN CERTIFICATE-----` blocks", path.display())]
    NoCaCertificates { path: PathBuf },
    /// A certificate in a service's `tls.ca_file` cannot serve as a trust root.
    #[error("`{}` holds a certificate that cannot be used as a trusted root ({reason}); replace it with the PEM certificate of the CA that signed the upstream's certificate", path.display())]
    InvalidCaCertificate { path: PathBuf, reason: String },
    /// Neither the system store nor a `tls.ca_file` gave a single usable root.
    #[error("no trusted root certificates: the system certificate store is empty or unreadable and no `tls.ca_file` is set; install the system CA bundle (e.g. the `ca-certificates` package) or set `tls.ca_file` for the service")]
    NoRoots,
}

/// ALPN protocols offered (client) and accepted (server), in preference order. Both sides speak
/// HTTP/2 and HTTP/1.1 (SPEC §4.2, §4.6); nothing else is negotiated, so no `h2c` or other
/// protocol can be smuggled through ALPN.
fn alpn_protocols() -> Vec<Vec<u8>> {
    vec![b"h2".to_vec(), b"http/1.1".to_vec()]
}

/// The one crypto provider keyward uses. Built explicitly instead of relying on
/// `CryptoProvider::get_default()`, so a dependency installing another provider process-wide
/// cannot change which algorithms keyward accepts.
fn crypto_provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

#[cfg(test)]
pub(crate) mod test_support {
    //! Helpers shared by the tls tests: a full TLS handshake over an in-memory duplex stream,
    //! and a tiny DER reader to look inside issued certificates.

    use std::path::PathBuf;
    use std::sync::Arc;

    use rustls::pki_types::{CertificateDer, ServerName};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::CertAuthority;

    /// What the client saw of a completed handshake.
    #[derive(Debug)]
    pub(crate) struct Handshake {
        pub(crate) alpn: Option<Vec<u8>>,
        pub(crate) peer_certs: Vec<CertificateDer<'static>>,
    }

    /// A CA created in a fresh temporary directory; returns the directory (keep it alive), the
    /// CA and its certificate's path.
    pub(crate) fn temp_ca() -> (tempfile::TempDir, Arc<CertAuthority>, PathBuf) {
        let dir = tempfile::tempdir().expect("tempdir");
        let cert = dir.path().join("ca.pem");
        let ca = CertAuthority::create(&cert, &dir.path().join("ca-key.pem")).expect("create CA");
        (dir, Arc::new(ca), cert)
    }

    /// Runs a complete handshake between `server` and `client` (which verifies the server as
    /// `name`) over an in-memory stream and exchanges one byte each way.
    pub(crate) async fn handshake(
        server: Arc<rustls::ServerConfig>,
        client: Arc<rustls::ClientConfig>,
        name: &str,
    ) -> Result<Handshake, std::io::Error> {
        let name = ServerName::try_from(name.to_owned())
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        let acceptor = tokio_rustls::TlsAcceptor::from(server);
        let connector = tokio_rustls::TlsConnector::from(client);
        let server_task = tokio::spawn(async move {
            let mut tls = acceptor.accept(server_io).await?;
            let mut byte = [0u8; 1];
            tls.read_exact(&mut byte).await?;
            tls.write_all(&byte).await?;
            tls.flush().await?;
            Ok::<_, std::io::Error>(())
        });
        let client_result = async {
            let mut tls = connector.connect(name, client_io).await?;
            tls.write_all(b"x").await?;
            tls.flush().await?;
            let mut byte = [0u8; 1];
            tls.read_exact(&mut byte).await?;
            let conn = tls.get_ref().1;
            Ok::<_, std::io::Error>(Handshake {
                alpn: conn.alpn_protocol().map(<[u8]>::to_vec),
                peer_certs: conn
                    .peer_certificates()
                    .map(|certs| certs.iter().map(|c| c.clone().into_owned()).collect())
                    .unwrap_or_default(),
            })
        }
        .await;
        // When the client rejects the certificate the server sees an alert: its error is
        // expected then, so the client's result is the one that matters.
        let server_result = server_task.await.map_err(std::io::Error::other)?;
        let handshake = client_result?;
        server_result?;
        Ok(handshake)
    }

    /// The rustls error inside an I/O error from a failed handshake.
    pub(crate) fn rustls_error(err: &std::io::Error) -> Option<&rustls::Error> {
        err.get_ref()?.downcast_ref::<rustls::Error>()
    }

    /// One DER element: (tag, contents, rest of input). Test-only: panics on malformed input.
    pub(crate) fn tlv(input: &[u8]) -> (u8, &[u8], &[u8]) {
        super::der::der_next(input).expect("well-formed DER")
    }

    /// The elements of a DER SEQUENCE's contents, in order.
    pub(crate) fn elements(mut contents: &[u8]) -> Vec<(u8, &[u8])> {
        let mut out = Vec::new();
        while !contents.is_empty() {
            let (tag, value, rest) = tlv(contents);
            out.push((tag, value));
            contents = rest;
        }
        out
    }

    /// A certificate's serial number bytes and its extensions as (OID bytes, critical, value).
    pub(crate) struct CertView {
        pub(crate) serial: Vec<u8>,
        pub(crate) extensions: Vec<(Vec<u8>, bool, Vec<u8>)>,
    }

    pub(crate) fn view(cert_der: &[u8]) -> CertView {
        let (_, cert, _) = tlv(cert_der);
        let (_, tbs, _) = tlv(cert);
        let fields = elements(tbs);
        // fields: [0] version, serial, signature alg, issuer, validity, subject, spki, [3] exts
        assert_eq!(fields[0].0, 0xa0, "v3 certificate");
        let serial = fields[1].1.to_vec();
        let mut extensions = Vec::new();
        if let Some((_, exts)) = fields.iter().find(|(tag, _)| *tag == 0xa3) {
            let (_, seq, _) = tlv(exts);
            for (_, ext) in elements(seq) {
                let parts = elements(ext);
                let oid = parts[0].1.to_vec();
                let (critical, value) = match parts.len() {
                    3 => (parts[1].1 == [0xff], parts[2].1.to_vec()),
                    _ => (false, parts[1].1.to_vec()),
                };
                extensions.push((oid, critical, value));
            }
        }
        CertView { serial, extensions }
    }
}

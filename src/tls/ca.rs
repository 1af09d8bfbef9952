//! keyward's certificate authority: loads the CA certificate and key (or creates them once, when
//! both files are missing) and signs the leaf certificates used to intercept TLS.
//!
//! Owns the CA files on disk and the CA signing key in memory. Must never: log, print or put into
//! an error any byte of the key (key-parsing errors map to fixed sentences, never to a parser's
//! message); overwrite an existing CA file; use a key file that group or others can access.

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PublicKeyData, SanType, SerialNumber,
};
use rustls::client::danger::ServerCertVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{
    alg_id, CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime,
};
use rustls::{InconsistentKeys, RootCertStore};
use time::OffsetDateTime;

use super::der::{cert_facts, pem_encode, wrap_pkcs8, CertFacts};

/// Subject common name of a CA keyward creates.
const CA_COMMON_NAME: &str = "keyward CA";
/// Lifetime of a created CA. Long, because every agent's trust store must be updated to replace
/// it; the key never leaves the host it was created on.
const CA_VALIDITY: time::Duration = time::Duration::days(3650);
/// Created CAs and issued leaves start this far in the past, so a client whose clock is a little
/// behind does not reject a certificate as "not yet valid".
const CA_BACKDATE: time::Duration = time::Duration::days(1);
const LEAF_BACKDATE: time::Duration = time::Duration::hours(1);
/// Name the load-time self-test leaf is issued for (`.invalid` can never be a real host).
const PROBE_HOST: &str = "keyward-self-test.invalid";

/// Why the CA cannot be loaded or created.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("cannot read `{}`: {source}; check the CA file paths (`ca.cert` / `ca.key` in the policy, `--dir` of `ca init`) and that keyward may read them", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot write `{}`: {source}; check that its directory exists or can be created and is writable by keyward", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the CA certificate `{}` exists but its key `{}` does not; restore the key, or remove the certificate so that keyward creates a new CA", cert.display(), key.display())]
    KeyMissing { cert: PathBuf, key: PathBuf },
    #[error("the CA key `{}` exists but its certificate `{}` does not; restore the certificate, or remove the key so that keyward creates a new CA", key.display(), cert.display())]
    CertMissing { cert: PathBuf, key: PathBuf },
    #[error("`{}` already exists; keyward never overwrites a CA file: move it away first to create a new CA", path.display())]
    AlreadyExists { path: PathBuf },
    #[error("`{path}` can be read or written by group or others (mode {mode:03o}); run `chmod 600 {path}`", path = path.display())]
    KeyPermissions { path: PathBuf, mode: u32 },
    #[error("`{}` is not a file; point `ca.key` at the CA key file", path.display())]
    KeyNotAFile { path: PathBuf },
    #[error("`{}` holds no PEM certificate; point `ca.cert` at the CA certificate (a `-----BEGIN CERTIFICATE-----` block)", path.display())]
    NoCertificate { path: PathBuf },
    #[error("`{}` is not a usable CA certificate: {reason}", path.display())]
    InvalidCertificate { path: PathBuf, reason: String },
    #[error("`{}` holds no unencrypted PEM private key; point `ca.key` at the CA key as `PRIVATE KEY` (PKCS#8), `EC PRIVATE KEY` (SEC1) or `RSA PRIVATE KEY` (PKCS#1)", path.display())]
    NoKey { path: PathBuf },
    #[error("`{}` holds a private key keyward cannot sign with; use an ECDSA P-256 or P-384, Ed25519 or RSA key", path.display())]
    UnsupportedKey { path: PathBuf },
    #[error("the key `{}` does not belong to the certificate `{}`; use the key the CA certificate was issued for", key.display(), cert.display())]
    KeyMismatch { cert: PathBuf, key: PathBuf },
    #[error("cannot generate a new CA: {0}")]
    Generate(#[source] rcgen::Error),
}

/// The loaded CA: its certificate (PEM for `keyward ca init` output and agents' trust stores,
/// DER for chains) and the rcgen issuer holding the signing key.
pub struct CertAuthority {
    cert_pem: String,
    cert_der: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
    provider: Arc<CryptoProvider>,
    /// When the CA certificate expires: no leaf claims to outlive it (a leaf's validity
    /// should lie within its issuer's).
    not_after: OffsetDateTime,
}

// The key must never reach a log line, so Debug shows only what is public.
impl fmt::Debug for CertAuthority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertAuthority")
            .field("cert_der_len", &self.cert_der.len())
            .finish_non_exhaustive()
    }
}

impl CertAuthority {
    /// Loads the CA from `cert` and `key` (PEM). When BOTH files are missing it creates a new CA
    /// there (as `create`, but only in directories that exist) and returns `true`; when only
    /// one is missing it refuses, since silently replacing half a CA would break every agent
    /// that trusts the old one.
    pub fn load_or_create(cert: &Path, key: &Path) -> Result<(Self, bool), CaError> {
        match (exists(cert)?, exists(key)?) {
            (true, true) => Ok((Self::load(cert, key)?, false)),
            // SPEC §3: "created with its key on first start if both are missing", in a
            // directory made for it if need be (a fresh checkout of a policy has no `certs/`).
            (false, false) => Ok((Self::create(cert, key)?, true)),
            (true, false) => Err(CaError::KeyMissing {
                cert: cert.to_owned(),
                key: key.to_owned(),
            }),
            (false, true) => Err(CaError::CertMissing {
                cert: cert.to_owned(),
                key: key.to_owned(),
            }),
        }
    }

    /// What `keyward check` can say of the CA files, creating nothing: an error when `serve`
    /// would refuse them, a note when they cannot be checked here (both missing: `serve`
    /// creates them; unreadable by this user, as the key often is on a CI runner).
    pub fn check_files(cert: &Path, key: &Path) -> Result<Option<&'static str>, CaError> {
        match (exists(cert)?, exists(key)?) {
            (false, false) => Ok(Some(
                "the CA files do not exist yet; `keyward serve` creates them at its first start",
            )),
            // Both exist (loaded and checked) or one is missing (its error): nothing is
            // created, which `load_or_create` does only when both are missing.
            _ => match Self::load_or_create(cert, key) {
                Ok(_) => Ok(None),
                Err(CaError::Read { source, .. })
                    if source.kind() == io::ErrorKind::PermissionDenied =>
                {
                    Ok(Some(
                        "the CA files cannot be read by this user; not checked",
                    ))
                }
                Err(e) => Err(e),
            },
        }
    }

    /// Loads an existing CA. Accepts PKCS#8 (EC P-256/P-384, Ed25519, RSA), SEC1 EC and PKCS#1
    /// RSA keys. Checks, so that a broken CA fails at startup rather than at every agent's
    /// handshake: the key file's permissions, that the certificate is a CA (basicConstraints,
    /// keyUsage) within its validity period, that the key belongs to it, and that a leaf it
    /// signs verifies against it.
    pub fn load(cert: &Path, key: &Path) -> Result<Self, CaError> {
        let key_pem = read_key_file(key)?;
        let cert_pem = super::read_pem_file(cert).map_err(|source| CaError::Read {
            path: cert.to_owned(),
            source,
        })?;
        Self::from_pem(&cert_pem, cert, &key_pem, key)
    }

    /// Creates a new ECDSA P-256 CA ("keyward CA", valid 10 years), writing the key with mode
    /// 0600 and creating parent directories. Refuses when either file exists.
    pub fn create(cert: &Path, key: &Path) -> Result<Self, CaError> {
        for path in [cert, key] {
            if exists(path)? {
                return Err(CaError::AlreadyExists {
                    path: path.to_owned(),
                });
            }
        }
        let provider = super::crypto_provider();
        let key_pair = KeyPair::generate().map_err(CaError::Generate)?;
        let params = ca_params(OffsetDateTime::now_utc(), &provider);
        let ca_cert = params.self_signed(&key_pair).map_err(CaError::Generate)?;
        let cert_pem = ca_cert.pem();
        let key_pem = key_pair.serialize_pem();

        write_new_file(key, key_pem.as_bytes(), 0o600)?;
        if let Err(err) = write_new_file(cert, cert_pem.as_bytes(), 0o644) {
            // Leave no half CA behind: a lone key would make the next start refuse.
            let _ = fs::remove_file(key);
            return Err(err);
        }
        // Parse back what was written, so a created CA passes exactly the checks a loaded one does.
        Self::from_pem(cert_pem.as_bytes(), cert, key_pem.as_bytes(), key)
    }

    /// The CA certificate in PEM, for agents' trust stores.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA certificate in DER.
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    fn from_pem(
        cert_pem: &[u8],
        cert_path: &Path,
        key_pem: &[u8],
        key_path: &Path,
    ) -> Result<Self, CaError> {
        let cert_der = match CertificateDer::pem_slice_iter(cert_pem).next() {
            Some(Ok(der)) => der,
            Some(Err(err)) => {
                return Err(CaError::InvalidCertificate {
                    path: cert_path.to_owned(),
                    reason: format!("it is not valid PEM ({err})"),
                })
            }
            None => {
                return Err(CaError::NoCertificate {
                    path: cert_path.to_owned(),
                })
            }
        };
        let key_pair = parse_key(key_pem, key_path)?;
        let invalid = |reason: String| CaError::InvalidCertificate {
            path: cert_path.to_owned(),
            reason,
        };

        // webpki ignores a trust anchor's own validity and basicConstraints, so the self-test
        // below would pass an expired or non-CA certificate that agents' TLS stacks refuse.
        let facts = cert_facts(&cert_der);
        let not_after = facts.as_ref().map(|f| f.not_after);
        check_ca_facts(facts, OffsetDateTime::now_utc(), cert_path).map_err(invalid)?;
        let provider = super::crypto_provider();
        check_key_matches(&cert_der, &key_pair, &provider, cert_path, key_path)?;
        let issuer = Issuer::from_ca_cert_der(&cert_der, key_pair)
            .map_err(|err| invalid(format!("it cannot be parsed ({err})")))?;
        let usages = issuer.key_usages();
        if !usages.is_empty() && !usages.contains(&KeyUsagePurpose::KeyCertSign) {
            return Err(invalid(
                "its keyUsage does not allow signing certificates (keyCertSign)".to_owned(),
            ));
        }
        let cert_pem = pem_encode("CERTIFICATE", &cert_der);
        let ca = CertAuthority {
            cert_pem,
            cert_der,
            issuer,
            provider,
            not_after: not_after.unwrap_or(OffsetDateTime::UNIX_EPOCH),
        };
        ca.self_test().map_err(invalid)?;
        Ok(ca)
    }

    /// Signs a leaf for exactly one name (`san`) with `subject_key`'s public key: EKU serverAuth,
    /// `CA:FALSE`, a random serial, valid from `now - 1h` to `now + validity`.
    pub(crate) fn sign_leaf(
        &self,
        san: &SanType,
        common_name: &str,
        subject_key: &impl PublicKeyData,
        now: OffsetDateTime,
        validity: time::Duration,
    ) -> Result<CertificateDer<'static>, rcgen::Error> {
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        // RFC 5280 bounds a common name at 64 characters; a longer host goes in the SAN only
        // (which clients match on; with an empty subject it is marked critical, as required).
        if common_name.len() <= 64 {
            dn.push(DnType::CommonName, common_name);
        }
        params.distinguished_name = dn;
        params.subject_alt_names = vec![san.clone()];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        params.not_before = now - LEAF_BACKDATE;
        params.not_after = (now + validity).min(self.not_after);
        // SECURITY: every leaf shares one key, and rcgen's default serial is a hash of the key,
        // so without a random serial all leaves would share issuer+serial, which browsers reject
        // as a forged reissue (and which breaks revocation semantics).
        params.serial_number = Some(random_serial(&self.provider));
        Ok(params.signed_by(subject_key, &self.issuer)?.der().clone())
    }

    /// Issues a leaf for a reserved name and verifies it with webpki against this CA as the only
    /// root: proves the signing path works end to end (key, signature algorithm, a certificate
    /// webpki accepts as a trust anchor) before any agent depends on it.
    fn self_test(&self) -> Result<(), String> {
        let san = SanType::DnsName(
            PROBE_HOST
                .try_into()
                .map_err(|err| format!("internal error: {err}"))?,
        );
        let now = OffsetDateTime::now_utc();
        let leaf = self
            .sign_leaf(
                &san,
                PROBE_HOST,
                self.issuer.key(),
                now,
                time::Duration::hours(1),
            )
            .map_err(|err| format!("it cannot sign a leaf certificate ({err})"))?;
        let mut roots = RootCertStore::empty();
        roots
            .add(self.cert_der.clone())
            .map_err(|err| format!("it cannot be used as a trusted root ({err})"))?;
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            Arc::clone(&self.provider),
        )
        .build()
        .map_err(|err| format!("internal error: {err}"))?;
        let name =
            ServerName::try_from(PROBE_HOST).map_err(|err| format!("internal error: {err}"))?;
        verifier
            .verify_server_cert(&leaf, &[], &name, &[], UnixTime::now())
            .map(|_| ())
            .map_err(|err| format!("a leaf certificate it signs does not verify ({err})"))
    }
}

/// The subject and extensions of a CA keyward creates.
fn ca_params(now: OffsetDateTime, provider: &CryptoProvider) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, CA_COMMON_NAME);
    dn.push(DnType::OrganizationName, "keyward");
    // A random unit name keeps two keyward CAs' subjects distinct, so a client trusting both
    // never confuses them when building a chain by issuer name.
    let serial = random_serial(provider);
    let id: String = serial
        .to_bytes()
        .iter()
        .take(4)
        .map(|b| format!("{b:02x}"))
        .collect();
    dn.push(DnType::OrganizationalUnitName, format!("ca-{id}"));
    params.distinguished_name = dn;
    // pathlen 0: this CA signs leaves only, never another CA.
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = now - CA_BACKDATE;
    params.not_after = now + CA_VALIDITY;
    params.serial_number = Some(serial);
    params
}

/// 128 random bits, positive (top bit clear) as RFC 5280 requires of serial numbers.
fn random_serial(provider: &CryptoProvider) -> SerialNumber {
    let mut bytes = [0u8; 16];
    // A failing system RNG would fail key generation too; falling back to a time-based value
    // keeps serials distinct rather than identical.
    if provider.secure_random.fill(&mut bytes).is_err() {
        let nanos = OffsetDateTime::now_utc().unix_timestamp_nanos();
        bytes = nanos.to_be_bytes();
    }
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01; // never a leading zero byte, so the encoding is always 16 bytes
    SerialNumber::from_slice(&bytes)
}

/// Reads the key file after checking it is private. Opens once and checks the opened file's
/// mode, so the check and the read see the same file.
/// The bytes are wiped when dropped: the CA key signs what every agent trusts.
fn read_key_file(path: &Path) -> Result<zeroize::Zeroizing<Vec<u8>>, CaError> {
    let read_err = |source| CaError::Read {
        path: path.to_owned(),
        source,
    };
    let file = crate::files::open_regular(path).map_err(|e| match e {
        crate::files::ReadError::NotAFile => CaError::KeyNotAFile {
            path: path.to_owned(),
        },
        other => read_err(other.into()),
    })?;
    check_key_mode(&file, path)?;
    // Read into room made beforehand (a key is a few hundred bytes), so no copy left behind
    // by a reallocation holds key bytes.
    let mut bytes = zeroize::Zeroizing::new(Vec::with_capacity(4096));
    crate::files::read_bounded(file, super::MAX_PEM_BYTES, &mut bytes)
        .map_err(|e| read_err(e.into()))?;
    Ok(bytes)
}

#[cfg(unix)]
fn check_key_mode(file: &File, path: &Path) -> Result<(), CaError> {
    use std::os::unix::fs::PermissionsExt;
    let meta = file.metadata().map_err(|source| CaError::Read {
        path: path.to_owned(),
        source,
    })?;
    if !meta.is_file() {
        return Err(CaError::KeyNotAFile {
            path: path.to_owned(),
        });
    }
    let mode = meta.permissions().mode() & 0o777;
    // SECURITY: whoever can read the CA key can mint certificates every agent trusts.
    if mode & 0o077 != 0 {
        return Err(CaError::KeyPermissions {
            path: path.to_owned(),
            mode,
        });
    }
    Ok(())
}

#[cfg(not(unix))]
fn check_key_mode(_file: &File, _path: &Path) -> Result<(), CaError> {
    Ok(())
}

/// Parses the CA key into an rcgen `KeyPair`. rcgen with the ring backend takes only PKCS#8,
/// so SEC1 and PKCS#1 keys are wrapped into PKCS#8 first. Errors never carry a parser's message,
/// which could quote key bytes.
fn parse_key(pem_bytes: &[u8], path: &Path) -> Result<KeyPair, CaError> {
    let der = match PrivateKeyDer::from_pem_slice(pem_bytes) {
        Ok(der) => der,
        // Also "no key found": an encrypted key, or a certificate given as the key.
        Err(_) => {
            return Err(CaError::NoKey {
                path: path.to_owned(),
            })
        }
    };
    let unsupported = || CaError::UnsupportedKey {
        path: path.to_owned(),
    };
    match &der {
        PrivateKeyDer::Pkcs8(pkcs8) => KeyPair::try_from(pkcs8).map_err(|_| unsupported()),
        PrivateKeyDer::Sec1(sec1) => {
            // SEC1 does not have to name its curve, so try each supported one: ring checks the
            // key's length, any named curve, and that the public key matches.
            [alg_id::ECDSA_P256, alg_id::ECDSA_P384]
                .iter()
                .find_map(|alg| {
                    let pkcs8 = wrap_pkcs8(alg, sec1.secret_sec1_der());
                    KeyPair::try_from(&PrivatePkcs8KeyDer::from(pkcs8)).ok()
                })
                .ok_or_else(unsupported)
        }
        PrivateKeyDer::Pkcs1(pkcs1) => {
            let pkcs8 = wrap_pkcs8(&alg_id::RSA_ENCRYPTION, pkcs1.secret_pkcs1_der());
            KeyPair::try_from(&PrivatePkcs8KeyDer::from(pkcs8)).map_err(|_| unsupported())
        }
        _ => Err(unsupported()),
    }
}

/// A CA certificate should expire no sooner than this to start without a warning.
const CA_EXPIRY_WARNING: time::Duration = time::Duration::days(30);

fn check_ca_facts(
    facts: Option<CertFacts>,
    now: OffsetDateTime,
    path: &Path,
) -> Result<(), String> {
    let Some(facts) = facts else {
        return Err("it cannot be parsed as an X.509 v3 certificate".to_owned());
    };
    if !facts.is_ca {
        return Err("it is not a CA certificate (it lacks basicConstraints CA:TRUE); point `ca.cert` at a CA certificate, or move both CA files away so that keyward creates one".to_owned());
    }
    if now > facts.not_after {
        return Err("it has expired; move both CA files away so that keyward creates a new CA (or run `keyward ca init`), then give agents the new certificate".to_owned());
    }
    if now < facts.not_before {
        return Err("it is not valid yet; check the system clock".to_owned());
    }
    if facts.not_after - now < CA_EXPIRY_WARNING {
        tracing::warn!(
            path = %path.display(),
            expires = %facts.not_after,
            "the CA certificate expires soon; agents will reject intercepted TLS after that"
        );
    }
    Ok(())
}

/// Compares the key's public half with the certificate's, for a precise error instead of
/// "a leaf it signs does not verify".
fn check_key_matches(
    cert_der: &CertificateDer<'static>,
    key_pair: &KeyPair,
    provider: &CryptoProvider,
    cert_path: &Path,
    key_path: &Path,
) -> Result<(), CaError> {
    let pkcs8 = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key_pair.serialize_der()));
    let signing_key =
        provider
            .key_provider
            .load_private_key(pkcs8)
            .map_err(|_| CaError::UnsupportedKey {
                path: key_path.to_owned(),
            })?;
    let certified = rustls::sign::CertifiedKey::new(vec![cert_der.clone()], signing_key);
    match certified.keys_match() {
        Ok(()) | Err(rustls::Error::InconsistentKeys(InconsistentKeys::Unknown)) => Ok(()),
        Err(rustls::Error::InconsistentKeys(InconsistentKeys::KeyMismatch)) => {
            Err(CaError::KeyMismatch {
                cert: cert_path.to_owned(),
                key: key_path.to_owned(),
            })
        }
        Err(err) => Err(CaError::InvalidCertificate {
            path: cert_path.to_owned(),
            reason: format!("it cannot be parsed ({err})"),
        }),
    }
}

fn exists(path: &Path) -> Result<bool, CaError> {
    path.try_exists().map_err(|source| CaError::Read {
        path: path.to_owned(),
        source,
    })
}

/// Writes a file that must not exist yet (`create_new`: no race can overwrite a CA file),
/// creating its parent directory.
fn write_new_file(path: &Path, contents: &[u8], mode: u32) -> Result<(), CaError> {
    let write_err = |source| CaError::Write {
        path: path.to_owned(),
        source,
    };
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        // A directory made for the CA's key is the owner's alone, whatever the umask.
        let mut dirs = fs::DirBuilder::new();
        dirs.recursive(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::DirBuilderExt;
            dirs.mode(0o700);
        }
        dirs.create(parent).map_err(write_err)?;
    }
    let mut options = OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(mode);
    }
    #[cfg(not(unix))]
    let _ = mode;
    let mut file = options.open(path).map_err(|source| match source.kind() {
        io::ErrorKind::AlreadyExists => CaError::AlreadyExists {
            path: path.to_owned(),
        },
        _ => write_err(source),
    })?;
    file.write_all(contents).map_err(write_err)?;
    file.sync_all().map_err(write_err)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use rcgen::PKCS_ECDSA_P384_SHA384;

    use super::super::der::{der_tlv, pem_encode};
    use super::super::test_support::{elements, tlv, view};
    use super::*;

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).expect("metadata").permissions().mode() & 0o777
    }

    /// Writes a CA pair the way an operator (or the bench harness) would hand it over.
    fn write_pair(dir: &Path, cert_pem: &str, key_pem: &str) -> (PathBuf, PathBuf) {
        let cert = dir.join("ca.pem");
        let key = dir.join("ca-key.pem");
        fs::write(&cert, cert_pem).expect("write cert");
        fs::write(&key, key_pem).expect("write key");
        fs::set_permissions(&key, fs::Permissions::from_mode(0o600)).expect("chmod");
        (cert, key)
    }

    fn ca_cert_for(key: &KeyPair) -> String {
        let provider = super::super::crypto_provider();
        ca_params(OffsetDateTime::now_utc(), &provider)
            .self_signed(key)
            .expect("self-sign")
            .pem()
    }

    /// The SEC1 `ECPrivateKey` inside a PKCS#8 document (ring writes it without the optional
    /// curve parameters).
    fn sec1_of(pkcs8: &[u8]) -> Vec<u8> {
        let (_, info, _) = tlv(pkcs8);
        let fields = elements(info);
        assert_eq!(fields[2].0, 0x04);
        fields[2].1.to_vec()
    }

    #[test]
    fn create_writes_a_private_key_and_reloads_the_same_ca() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cert = dir.path().join("certs/ca.pem");
        let key = dir.path().join("certs/ca-key.pem");

        // The directory is not there yet (SPEC §3's `certs/` in a fresh checkout): made, the
        // owner's alone.
        let (created, was_created) = CertAuthority::load_or_create(&cert, &key).expect("create");
        assert!(was_created);
        assert_eq!(mode(&dir.path().join("certs")), 0o700);
        assert_eq!(mode(&key), 0o600);
        assert!(created
            .cert_pem()
            .starts_with("-----BEGIN CERTIFICATE-----\n"));
        let der = CertificateDer::from_pem_slice(created.cert_pem().as_bytes()).expect("pem");
        assert_eq!(&der, created.cert_der());
        assert_eq!(fs::read_to_string(&cert).expect("cert"), created.cert_pem());

        let (loaded, was_created) = CertAuthority::load_or_create(&cert, &key).expect("load");
        assert!(!was_created);
        assert_eq!(loaded.cert_pem(), created.cert_pem());

        // `ca init --dir` makes the directory itself: the owner's alone.
        let made = dir.path().join("made/here");
        CertAuthority::create(&made.join("ca.pem"), &made.join("ca-key.pem")).expect("create");
        assert_eq!(mode(&made), 0o700);
    }

    #[test]
    fn created_ca_is_a_ca_limited_to_signing_leaves() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = CertAuthority::create(&dir.path().join("c.pem"), &dir.path().join("k.pem"))
            .expect("create");
        let cert = view(ca.cert_der());
        let (_, critical, value) = cert
            .extensions
            .iter()
            .find(|(oid, _, _)| oid == &[0x55, 0x1d, 0x13])
            .expect("basicConstraints");
        assert!(critical);
        // SEQUENCE { cA TRUE, pathLenConstraint 0 }
        assert_eq!(value, &[0x30, 0x06, 0x01, 0x01, 0xff, 0x02, 0x01, 0x00]);
    }

    #[test]
    fn create_never_overwrites() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cert = dir.path().join("ca.pem");
        let key = dir.path().join("ca-key.pem");
        CertAuthority::create(&cert, &key).expect("create");
        let before = fs::read(&key).expect("key");

        let err = CertAuthority::create(&cert, &key).expect_err("second create");
        assert!(matches!(err, CaError::AlreadyExists { .. }), "{err}");
        assert!(err.to_string().contains("move it away"));
        assert_eq!(fs::read(&key).expect("key"), before);
    }

    #[test]
    fn one_missing_file_is_refused_not_replaced() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cert = dir.path().join("ca.pem");
        let key = dir.path().join("ca-key.pem");
        CertAuthority::create(&cert, &key).expect("create");

        let moved = dir.path().join("moved.pem");
        fs::rename(&key, &moved).expect("move key");
        let err = CertAuthority::load_or_create(&cert, &key).expect_err("no key");
        assert!(matches!(err, CaError::KeyMissing { .. }), "{err}");
        assert!(!key.exists());

        fs::rename(&moved, &key).expect("restore key");
        fs::remove_file(&cert).expect("remove cert");
        let err = CertAuthority::load_or_create(&cert, &key).expect_err("no cert");
        assert!(matches!(err, CaError::CertMissing { .. }), "{err}");
        assert!(!cert.exists());
    }

    #[test]
    fn key_accessible_by_others_is_refused_with_the_fix() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cert = dir.path().join("ca.pem");
        let key = dir.path().join("ca-key.pem");
        CertAuthority::create(&cert, &key).expect("create");

        for bad in [0o644, 0o640, 0o604, 0o620] {
            fs::set_permissions(&key, fs::Permissions::from_mode(bad)).expect("chmod");
            let err = CertAuthority::load(&cert, &key).expect_err("loose mode");
            assert!(matches!(err, CaError::KeyPermissions { mode, .. } if mode == bad));
            let message = err.to_string();
            assert!(message.contains(&format!("mode {bad:o}")), "{message}");
            assert!(
                message.contains(&format!("chmod 600 {}", key.display())),
                "{message}"
            );
        }
        fs::set_permissions(&key, fs::Permissions::from_mode(0o400)).expect("chmod");
        CertAuthority::load(&cert, &key).expect("0400 is private enough");
        // A directory is not a key, whatever its mode: say so, not "chmod".
        let err = CertAuthority::load(&cert, dir.path()).expect_err("a directory");
        assert!(matches!(err, CaError::KeyNotAFile { .. }), "{err}");
        assert!(err.to_string().contains("is not a file"), "{err}");
        // Nor is a certificate: `/dev/zero` named by mistake is refused, not read for ever.
        let err = CertAuthority::load(Path::new("/dev/zero"), &key).expect_err("/dev/zero");
        assert!(err.to_string().contains("not a regular file"), "{err}");
    }

    #[test]
    fn loads_a_pkcs8_p256_key_as_the_bench_harness_writes_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = KeyPair::generate().expect("key");
        let key_pem = key.serialize_pem();
        assert!(key_pem.starts_with("-----BEGIN PRIVATE KEY-----"));
        let (cert, key_path) = write_pair(dir.path(), &ca_cert_for(&key), &key_pem);

        let ca = CertAuthority::load(&cert, &key_path).expect("load PKCS#8");
        assert_eq!(ca.issuer.key().algorithm(), &rcgen::PKCS_ECDSA_P256_SHA256);
    }

    #[test]
    fn loads_sec1_keys_with_and_without_curve_parameters() {
        // prime256v1 OID, as OpenSSL puts it in `[0] parameters` of an "EC PRIVATE KEY".
        const P256_OID: &[u8] = &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
        let dir = tempfile::tempdir().expect("tempdir");
        let key = KeyPair::generate().expect("key");
        let cert_pem = ca_cert_for(&key);

        let bare = sec1_of(key.serialized_der());
        let (cert, key_path) =
            write_pair(dir.path(), &cert_pem, &pem_encode("EC PRIVATE KEY", &bare));
        CertAuthority::load(&cert, &key_path).expect("load SEC1 without parameters");

        // Rebuild as OpenSSL writes it: version, privateKey, [0] curve, [1] publicKey.
        let (_, body, _) = tlv(&bare);
        let fields = elements(body);
        let mut with_params = vec![0x02, 0x01, 0x01];
        with_params.extend(der_tlv(0x04, fields[1].1));
        with_params.extend(der_tlv(0xa0, P256_OID));
        with_params.extend(der_tlv(0xa1, fields[2].1));
        let openssl_style = der_tlv(0x30, &with_params);
        let (cert, key_path) = write_pair(
            dir.path(),
            &cert_pem,
            &pem_encode("EC PRIVATE KEY", &openssl_style),
        );
        CertAuthority::load(&cert, &key_path).expect("load SEC1 with parameters");
    }

    #[test]
    fn loads_a_sec1_p384_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = KeyPair::generate_for(&PKCS_ECDSA_P384_SHA384).expect("key");
        let sec1 = pem_encode("EC PRIVATE KEY", &sec1_of(key.serialized_der()));
        let (cert, key_path) = write_pair(dir.path(), &ca_cert_for(&key), &sec1);
        let ca = CertAuthority::load(&cert, &key_path).expect("load P-384 SEC1");
        assert_eq!(ca.issuer.key().algorithm(), &PKCS_ECDSA_P384_SHA384);
    }

    #[test]
    fn a_key_of_another_certificate_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let owner = KeyPair::generate().expect("key");
        let other = KeyPair::generate().expect("key");
        let (cert, key) = write_pair(dir.path(), &ca_cert_for(&owner), &other.serialize_pem());
        let err = CertAuthority::load(&cert, &key).expect_err("mismatch");
        assert!(matches!(err, CaError::KeyMismatch { .. }), "{err}");
    }

    #[test]
    fn an_expired_ca_is_refused_at_load() {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = KeyPair::generate().expect("key");
        let provider = super::super::crypto_provider();
        let mut params = ca_params(OffsetDateTime::now_utc(), &provider);
        params.not_before = OffsetDateTime::now_utc() - time::Duration::days(30);
        params.not_after = OffsetDateTime::now_utc() - time::Duration::days(1);
        let cert_pem = params.self_signed(&key).expect("sign").pem();
        let (cert, key_path) = write_pair(dir.path(), &cert_pem, &key.serialize_pem());
        let err = CertAuthority::load(&cert, &key_path).expect_err("expired");
        assert!(matches!(err, CaError::InvalidCertificate { .. }), "{err}");
        assert!(err.to_string().contains("expired"), "{err}");
    }

    #[test]
    fn a_certificate_that_is_not_a_ca_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = KeyPair::generate().expect("key");
        let provider = super::super::crypto_provider();
        for is_ca in [IsCa::ExplicitNoCa, IsCa::NoCa] {
            let mut params = ca_params(OffsetDateTime::now_utc(), &provider);
            params.is_ca = is_ca;
            let cert_pem = params.self_signed(&key).expect("sign").pem();
            let (cert, key_path) = write_pair(dir.path(), &cert_pem, &key.serialize_pem());
            let err = CertAuthority::load(&cert, &key_path).expect_err("not a CA");
            assert!(err.to_string().contains("not a CA certificate"), "{err}");
        }
    }

    #[test]
    fn unusable_files_get_errors_that_never_quote_the_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = KeyPair::generate().expect("key");
        let key_pem = key.serialize_pem();
        let cert_pem = ca_cert_for(&key);
        // A "PRIVATE KEY" block whose contents are not a key, and one that is not base64.
        let bogus_der = pem_encode("PRIVATE KEY", b"0123456789abcdef0123456789abcdef");
        let bad_base64 = "-----BEGIN PRIVATE KEY-----\nSECRET!!SECRET\n-----END PRIVATE KEY-----\n";

        type Expect = fn(&CaError) -> bool;
        let cases: [(&str, &str, Expect); 5] = [
            ("", &key_pem, |e| matches!(e, CaError::NoCertificate { .. })),
            (&cert_pem, &cert_pem, |e| matches!(e, CaError::NoKey { .. })),
            (&cert_pem, "", |e| matches!(e, CaError::NoKey { .. })),
            (&cert_pem, &bogus_der, |e| {
                matches!(e, CaError::UnsupportedKey { .. })
            }),
            (&cert_pem, bad_base64, |e| {
                matches!(e, CaError::NoKey { .. })
            }),
        ];
        for (cert_text, key_text, expected) in cases {
            let (cert, key_path) = write_pair(dir.path(), cert_text, key_text);
            let err = CertAuthority::load(&cert, &key_path).expect_err("unusable");
            assert!(expected(&err), "{err}");
            let message = format!("{err} {err:?}");
            for line in key_text.lines().filter(|l| !l.starts_with("-----")) {
                assert!(!message.contains(line), "key material in error: {message}");
            }
            assert!(!message.contains("SECRET"), "{message}");
        }
    }

    #[test]
    fn debug_output_never_shows_the_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = dir.path().join("ca-key.pem");
        let ca = CertAuthority::create(&dir.path().join("ca.pem"), &key).expect("create");
        let debug = format!("{ca:?}");
        let key_pem = fs::read_to_string(&key).expect("key");
        for line in key_pem.lines().filter(|l| !l.starts_with("-----")) {
            assert!(!debug.contains(line));
        }
        assert!(!debug.contains("PRIVATE"));
    }

    #[test]
    fn leaves_get_distinct_random_serials_despite_a_shared_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = CertAuthority::create(&dir.path().join("c.pem"), &dir.path().join("k.pem"))
            .expect("create");
        let key = KeyPair::generate().expect("key");
        let san = SanType::DnsName("a.example.test".try_into().expect("name"));
        let now = OffsetDateTime::now_utc();
        let one = ca.sign_leaf(&san, "a", &key, now, time::Duration::days(1));
        let two = ca.sign_leaf(&san, "a", &key, now, time::Duration::days(1));
        let (one, two) = (view(&one.expect("sign")), view(&two.expect("sign")));
        assert_eq!(one.serial.len(), 16);
        assert_ne!(one.serial, two.serial);
    }

    // A leaf never outlives its CA (agents would reject the chain while the cache served it),
    // and a host longer than a common name may be is named by the SAN alone, marked critical.
    #[test]
    fn a_leaf_ends_with_its_ca_and_a_long_host_has_no_common_name() {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = KeyPair::generate().expect("key");
        let provider = super::super::crypto_provider();
        let now = OffsetDateTime::now_utc();
        let mut params = ca_params(now, &provider);
        params.not_after = now + time::Duration::hours(2);
        let cert_pem = params.self_signed(&key).expect("sign").pem();
        let (cert, key_path) = write_pair(dir.path(), &cert_pem, &key.serialize_pem());
        let ca = CertAuthority::load(&cert, &key_path).expect("load");
        let ca_end = cert_facts(ca.cert_der()).expect("facts").not_after;

        let leaf_key = KeyPair::generate().expect("key");
        let san_of = |host: &str| SanType::DnsName(host.try_into().expect("name"));
        let short = ca
            .sign_leaf(
                &san_of("a.example.test"),
                "a.example.test",
                &leaf_key,
                now,
                time::Duration::days(7),
            )
            .expect("sign");
        assert_eq!(cert_facts(&short).expect("facts").not_after, ca_end);
        let san_critical = |der: &[u8]| {
            view(der)
                .extensions
                .iter()
                .find(|(oid, _, _)| oid == &[0x55, 0x1d, 0x11])
                .map(|(_, critical, _)| *critical)
        };
        assert_eq!(san_critical(&short), Some(false));
        let long = format!("{}.example.test", "a".repeat(60));
        let leaf = ca
            .sign_leaf(
                &san_of(&long),
                &long,
                &leaf_key,
                now,
                time::Duration::days(7),
            )
            .expect("sign");
        assert_eq!(
            san_critical(&leaf),
            Some(true),
            "an empty subject needs a critical SAN"
        );
    }

    #[test]
    fn a_ca_not_yet_valid_or_without_keycertsign_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = KeyPair::generate().expect("key");
        let provider = super::super::crypto_provider();
        let now = OffsetDateTime::now_utc();

        let mut future = ca_params(now, &provider);
        future.not_before = now + time::Duration::days(2);
        let mut no_cert_sign = ca_params(now, &provider);
        no_cert_sign.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        for (params, expected) in [(future, "not valid yet"), (no_cert_sign, "keyCertSign")] {
            let cert_pem = params.self_signed(&key).expect("sign").pem();
            let (cert, key_path) = write_pair(dir.path(), &cert_pem, &key.serialize_pem());
            let err = CertAuthority::load(&cert, &key_path).expect_err(expected);
            assert!(err.to_string().contains(expected), "{err}");
        }
    }
}

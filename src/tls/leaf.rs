//! Leaf certificates for intercepted tunnels: one rustls `ServerConfig` per CONNECT host, signed
//! by keyward's CA, cached, and issued once per host however many tunnels open at the same time.
//!
//! Owns the leaf key and the per-host cache. Must never: choose the name from SNI or a Host
//! header (the caller passes the CONNECT authority's host), issue a wildcard or CA certificate,
//! hold a lock across an `.await`, or sign more than one leaf for a burst of first requests.

use std::fmt;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use dashmap::DashMap;
use rcgen::string::Ia5String;
use rcgen::{KeyPair, SanType};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{DnsName, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::sign::{CertifiedKey, SigningKey, SingleCertAndKey};
use rustls::ServerConfig;
use time::OffsetDateTime;
use tokio::sync::OnceCell;

use super::{CertAuthority, TlsError};

/// How long a leaf is valid. Short, so a leaked leaf (its key is in memory only) is useless soon;
/// long enough that a busy host is signed about once a week.
const LEAF_VALIDITY: time::Duration = time::Duration::days(7);
/// A cached leaf this close to expiry is replaced, so no handshake gets a nearly expired one.
const RENEW_MARGIN: time::Duration = time::Duration::hours(1);
/// How many cache entries eviction compares, to drop the least recently used among them.
const EVICTION_SAMPLE: usize = 8;
/// Longest host echoed back in an `InvalidHost` error (the host comes from the client).
const MAX_HOST_IN_ERROR: usize = 256;
/// TLS sessions remembered for resumption, for all hosts together. rustls refuses to resume a
/// session under another SNI, so one store is as safe as one per host; and one per host (its
/// default, 256 sessions each) made every cached leaf cost ~37 KB, which let an agent calling
/// many names under a wildcard service grow keyward by hundreds of MiB.
const SESSIONS: usize = 4096;

/// Per-host rustls `ServerConfig`s (leaf for exactly that DNS name or IP, ALPN `h2` and
/// `http/1.1`), cached, with single-flight issuance.
pub struct LeafCache {
    ca: Arc<CertAuthority>,
    provider: Arc<CryptoProvider>,
    /// The public key every leaf certifies: generated once, so a leaf costs one signature.
    leaf_key: KeyPair,
    /// The same key, parsed once for rustls.
    signing_key: Arc<dyn SigningKey>,
    slots: DashMap<Box<str>, Arc<Slot>>,
    /// Shared by every leaf's config (see `SESSIONS`).
    sessions: Arc<dyn rustls::server::StoresServerSessions>,
    capacity: usize,
    validity: time::Duration,
    issued: AtomicU64,
    /// Logical clock for least-recently-used eviction (one tick per lookup).
    ticks: AtomicU64,
}

/// One host's entry. The cell makes issuance single-flight: concurrent first lookups of a host
/// all await the one initialisation instead of each signing a certificate.
#[derive(Default)]
struct Slot {
    leaf: OnceCell<Leaf>,
    last_used: AtomicU64,
}

struct Leaf {
    config: Arc<ServerConfig>,
    renew_at: OffsetDateTime,
}

/// A host as a certificate names it: the cache key (lowercase DNS name, or the IP's canonical
/// text) and the subjectAltName.
struct LeafName {
    key: Box<str>,
    san: SanType,
}

impl fmt::Debug for LeafCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LeafCache")
            .field("cached", &self.slots.len())
            .field("capacity", &self.capacity)
            .field("issued", &self.issued_total())
            .finish_non_exhaustive()
    }
}

impl LeafCache {
    /// A cache holding at most `capacity` hosts (at least 1). Generates the leaf key, which is
    /// why this can fail.
    pub fn new(ca: Arc<CertAuthority>, capacity: usize) -> Result<Self, TlsError> {
        Self::with_validity(ca, capacity, LEAF_VALIDITY)
    }

    fn with_validity(
        ca: Arc<CertAuthority>,
        capacity: usize,
        validity: time::Duration,
    ) -> Result<Self, TlsError> {
        let provider = super::crypto_provider();
        let leaf_key = KeyPair::generate().map_err(TlsError::LeafKey)?;
        let pkcs8 = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der()));
        let signing_key = provider.key_provider.load_private_key(pkcs8)?;
        Ok(LeafCache {
            ca,
            provider,
            leaf_key,
            signing_key,
            slots: DashMap::new(),
            sessions: rustls::server::ServerSessionMemoryCache::new(SESSIONS),
            capacity: capacity.max(1),
            validity,
            issued: AtomicU64::new(0),
            ticks: AtomicU64::new(0),
        })
    }

    /// The `ServerConfig` to accept a tunnel to `host` (the CONNECT authority's host, without
    /// port; IPv6 may be bracketed). Signs a leaf on first use or near expiry, else returns the
    /// cached `Arc`.
    pub async fn server_config(&self, host: &str) -> Result<Arc<ServerConfig>, TlsError> {
        let name = leaf_name(host)?;
        let slot = self.slot(&name.key);
        let mut issued_now = false;
        let leaf = slot
            .leaf
            .get_or_try_init(|| {
                issued_now = true;
                self.issue(&name)
            })
            .await?;
        if issued_now || OffsetDateTime::now_utc() < leaf.renew_at {
            return Ok(Arc::clone(&leaf.config));
        }
        // Near expiry: swap in a fresh slot, but only if nobody did already, so concurrent
        // renewals still sign one leaf. The new slot's leaf is returned whatever its age.
        self.slots
            .remove_if(&name.key, |_, current| Arc::ptr_eq(current, &slot));
        let slot = self.slot(&name.key);
        let leaf = slot.leaf.get_or_try_init(|| self.issue(&name)).await?;
        Ok(Arc::clone(&leaf.config))
    }

    /// Leaves signed so far (for `keyward_tls_leaf_certs_issued_total`).
    pub fn issued_total(&self) -> u64 {
        self.issued.load(Ordering::Relaxed)
    }

    /// The host's slot, inserting an empty one (after making room) on a miss.
    fn slot(&self, key: &str) -> Arc<Slot> {
        let tick = self.ticks.fetch_add(1, Ordering::Relaxed);
        // Bound first, so the map guard is released before `entry` locks a shard again.
        let existing = self.slots.get(key).map(|slot| Arc::clone(slot.value()));
        let slot = match existing {
            Some(slot) => slot,
            None => {
                // Not atomic with the insert: concurrent misses may overshoot the capacity by
                // the number of racing tasks, which is bounded and harmless.
                if self.slots.len() >= self.capacity {
                    self.evict_one();
                }
                Arc::clone(self.slots.entry(key.into()).or_default().value())
            }
        };
        slot.last_used.store(tick, Ordering::Relaxed);
        slot
    }

    /// Drops the least recently used of a few entries, sampled from a pseudo-random place so a
    /// flood of new hosts (a wildcard service) churns cold entries, not the hosts in use: the
    /// map's first entries, sampled every time, would lose their recently used hosts as soon as
    /// their idle ones were gone. Walking to that place is O(n): at the default capacity about
    /// as long as the signature this miss is about to make (~25 µs), and only on a miss with
    /// the cache full.
    fn evict_one(&self) {
        let len = self.slots.len().max(1) as u64;
        // No security role: the clock mixed, so successive evictions start far apart.
        let mixed = self
            .ticks
            .load(Ordering::Relaxed)
            .wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let start = usize::try_from((mixed >> 32) % len).unwrap_or(0);
        let victim = self
            .slots
            .iter()
            .skip(start)
            .chain(self.slots.iter())
            .take(EVICTION_SAMPLE)
            .min_by_key(|entry| entry.value().last_used.load(Ordering::Relaxed))
            .map(|entry| entry.key().clone());
        if let Some(key) = victim {
            self.slots.remove(&key);
        }
    }

    /// Signs a leaf for `name` and wraps it in a `ServerConfig`.
    async fn issue(&self, name: &LeafName) -> Result<Leaf, TlsError> {
        let now = OffsetDateTime::now_utc();
        let cert = self
            .ca
            .sign_leaf(&name.san, &name.key, &self.leaf_key, now, self.validity)
            .map_err(|source| TlsError::Sign {
                host: name.key.to_string(),
                source,
            })?;
        let certified = CertifiedKey::new(vec![cert], Arc::clone(&self.signing_key));
        let mut config = ServerConfig::builder_with_provider(Arc::clone(&self.provider))
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(SingleCertAndKey::from(certified)));
        config.alpn_protocols = super::alpn_protocols();
        config.session_storage = Arc::clone(&self.sessions);
        self.issued.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(host = %name.key, "issued leaf certificate");
        Ok(Leaf {
            config: Arc::new(config),
            renew_at: now + self.validity - RENEW_MARGIN,
        })
    }
}

/// Validates and normalises a host for a certificate: an IP literal (v6 optionally in brackets)
/// becomes an IP SAN; anything else must be a DNS name (no wildcard, no port, no empty label),
/// lowercased, trailing dot dropped.
fn leaf_name(host: &str) -> Result<LeafName, TlsError> {
    let invalid = || TlsError::InvalidHost {
        host: host.chars().take(MAX_HOST_IN_ERROR).collect(),
    };
    if let Some(inner) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        return match inner.parse::<IpAddr>() {
            Ok(ip @ IpAddr::V6(_)) => Ok(ip_name(ip)),
            _ => Err(invalid()),
        };
    }
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(ip_name(ip));
    }
    let name = host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase();
    // SECURITY: DnsName refuses '*', so no wildcard leaf can be minted, and refuses an
    // all-numeric last label, so "127.1"-style IP spellings never become DNS SANs.
    DnsName::try_from(name.as_str()).map_err(|_| invalid())?;
    let ia5 = Ia5String::try_from(name.as_str()).map_err(|_| invalid())?;
    Ok(LeafName {
        key: name.into(),
        san: SanType::DnsName(ia5),
    })
}

fn ip_name(ip: IpAddr) -> LeafName {
    LeafName {
        key: ip.to_string().into(),
        san: SanType::IpAddress(ip),
    }
}

#[cfg(test)]
mod tests {
    use super::super::client_config;
    use super::super::test_support::{elements, handshake, temp_ca, tlv, view};
    use super::*;

    /// The id-kp-serverAuth OID contents (1.3.6.1.5.5.7.3.1).
    const SERVER_AUTH: &[u8] = &[0x2b, 0x06, 0x01, 0x05, 0x05, 0x07, 0x03, 0x01];

    fn extension<'a>(cert: &'a super::super::test_support::CertView, oid: &[u8]) -> &'a [u8] {
        cert.extensions
            .iter()
            .find(|(id, _, _)| id == oid)
            .map(|(_, _, value)| value.as_slice())
            .expect("extension present")
    }

    #[tokio::test]
    async fn every_leaf_shares_one_bounded_session_store() {
        let (_dir, ca, _) = temp_ca();
        let cache = LeafCache::new(ca, 16).expect("cache");
        let a = cache.server_config("a.example.test").await.expect("leaf");
        let b = cache.server_config("b.example.test").await.expect("leaf");
        assert!(Arc::ptr_eq(&a.session_storage, &b.session_storage));
        assert!(Arc::ptr_eq(&a.session_storage, &cache.sessions));
    }

    #[tokio::test]
    async fn leaf_for_a_dns_name_verifies_against_the_ca_with_alpn() {
        let (_dir, ca, ca_path) = temp_ca();
        let cache = LeafCache::new(ca, 16).expect("cache");
        let server = cache.server_config("api.example.test").await.expect("leaf");
        let client = client_config(Some(&ca_path)).expect("client");

        let seen = handshake(Arc::clone(&server), Arc::clone(&client), "api.example.test")
            .await
            .expect("handshake");
        assert_eq!(seen.alpn.as_deref(), Some(&b"h2"[..]));

        let mut http1_only = (*client).clone();
        http1_only.alpn_protocols = vec![b"http/1.1".to_vec()];
        let seen = handshake(server, Arc::new(http1_only), "api.example.test")
            .await
            .expect("handshake");
        assert_eq!(seen.alpn.as_deref(), Some(&b"http/1.1"[..]));
    }

    #[tokio::test]
    async fn leaf_names_exactly_the_host_as_a_server_only_certificate() {
        let (_dir, ca, ca_path) = temp_ca();
        let cache = LeafCache::new(ca, 16).expect("cache");
        let server = cache.server_config("api.example.test").await.expect("leaf");
        let client = client_config(Some(&ca_path)).expect("client");

        let seen = handshake(Arc::clone(&server), Arc::clone(&client), "api.example.test")
            .await
            .expect("handshake");
        assert_eq!(seen.peer_certs.len(), 1, "leaf only; agents trust the CA");
        let cert = view(&seen.peer_certs[0]);

        // subjectAltName: exactly one dNSName ([2]) with exactly the host.
        let (_, names, _) = tlv(extension(&cert, &[0x55, 0x1d, 0x11]));
        assert_eq!(elements(names), vec![(0x82, &b"api.example.test"[..])]);
        // extendedKeyUsage: serverAuth only.
        let (_, purposes, _) = tlv(extension(&cert, &[0x55, 0x1d, 0x25]));
        assert_eq!(elements(purposes), vec![(0x06, SERVER_AUTH)]);
        // basicConstraints present and empty: cA defaults to FALSE.
        assert_eq!(extension(&cert, &[0x55, 0x1d, 0x13]), &[0x30, 0x00]);

        for other in ["other.example.test", "example.test", "x.api.example.test"] {
            let err = handshake(Arc::clone(&server), Arc::clone(&client), other)
                .await
                .expect_err("wrong name must fail");
            assert!(
                matches!(
                    super::super::test_support::rustls_error(&err),
                    Some(rustls::Error::InvalidCertificate(_))
                ),
                "{other}: {err}"
            );
        }
    }

    #[tokio::test]
    async fn leaves_for_ip_addresses_carry_ip_sans() {
        let (_dir, ca, ca_path) = temp_ca();
        let cache = LeafCache::new(ca, 16).expect("cache");
        let client = client_config(Some(&ca_path)).expect("client");
        for (host, name) in [("127.0.0.1", "127.0.0.1"), ("[::1]", "::1"), ("::1", "::1")] {
            let server = cache.server_config(host).await.expect("leaf");
            let seen = handshake(server, Arc::clone(&client), name)
                .await
                .expect("handshake");
            let cert = view(&seen.peer_certs[0]);
            let (_, names, _) = tlv(extension(&cert, &[0x55, 0x1d, 0x11]));
            let ip: IpAddr = name.parse().expect("ip");
            let octets = match ip {
                IpAddr::V4(v4) => v4.octets().to_vec(),
                IpAddr::V6(v6) => v6.octets().to_vec(),
            };
            assert_eq!(elements(names), vec![(0x87, octets.as_slice())]);
        }
        // "[::1]" and "::1" are one host: one leaf.
        assert_eq!(cache.issued_total(), 2);
    }

    #[tokio::test]
    async fn cache_hits_return_the_same_config() {
        let (_dir, ca, _) = temp_ca();
        let cache = LeafCache::new(ca, 16).expect("cache");
        let first = cache.server_config("api.example.test").await.expect("leaf");
        for spelling in ["api.example.test", "API.Example.TEST", "api.example.test."] {
            let again = cache.server_config(spelling).await.expect("leaf");
            assert!(Arc::ptr_eq(&first, &again), "{spelling}");
        }
        assert_eq!(cache.issued_total(), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_first_requests_sign_one_leaf() {
        let (_dir, ca, _) = temp_ca();
        let cache = Arc::new(LeafCache::new(ca, 16).expect("cache"));
        let start = Arc::new(tokio::sync::Barrier::new(20));
        let tasks: Vec<_> = (0..20)
            .map(|_| {
                let cache = Arc::clone(&cache);
                let start = Arc::clone(&start);
                tokio::spawn(async move {
                    start.wait().await;
                    cache.server_config("burst.example.test").await
                })
            })
            .collect();
        let mut configs = Vec::new();
        for task in tasks {
            configs.push(task.await.expect("join").expect("leaf"));
        }
        assert_eq!(cache.issued_total(), 1);
        assert!(configs.iter().all(|c| Arc::ptr_eq(c, &configs[0])));
    }

    #[tokio::test]
    async fn a_leaf_near_expiry_is_reissued() {
        let (_dir, ca, ca_path) = temp_ca();
        // Valid for less than the renewal margin: every lookup finds it due for renewal.
        let cache = LeafCache::with_validity(ca, 16, time::Duration::minutes(30)).expect("cache");
        let first = cache.server_config("api.example.test").await.expect("leaf");
        let second = cache.server_config("api.example.test").await.expect("leaf");
        assert!(!Arc::ptr_eq(&first, &second));
        assert_eq!(cache.issued_total(), 2);
        let client = client_config(Some(&ca_path)).expect("client");
        handshake(second, client, "api.example.test")
            .await
            .expect("renewed leaf verifies");
    }

    #[tokio::test]
    async fn the_cache_is_bounded_and_evicts_the_least_recently_used() {
        let (_dir, ca, _) = temp_ca();
        let cache = LeafCache::new(ca, 2).expect("cache");
        for host in ["a.test", "b.test", "a.test", "c.test"] {
            cache.server_config(host).await.expect("leaf");
        }
        assert_eq!(cache.slots.len(), 2);
        assert!(cache.slots.contains_key("a.test"), "recently used survives");
        assert!(cache.slots.contains_key("c.test"));
        assert!(!cache.slots.contains_key("b.test"));
        assert_eq!(cache.issued_total(), 3);

        for i in 0..10 {
            cache
                .server_config(&format!("h{i}.test"))
                .await
                .expect("leaf");
        }
        assert!(cache.slots.len() <= 2);
    }

    /// Eviction samples the whole cache: hosts in use keep their leaves while a stream of new
    /// names pushes out the ones nobody asked for again (with the sample taken from the map's
    /// start every time, 46 of these 100 evictions hit hosts in use).
    #[tokio::test]
    async fn eviction_keeps_the_hosts_in_use_across_the_whole_cache() {
        let (_dir, ca, _) = temp_ca();
        let cache = LeafCache::new(ca, 400).expect("cache");
        let host = |i: usize| format!("h{i}.test");
        for i in 0..400 {
            cache.server_config(&host(i)).await.expect("leaf");
        }
        // The second half is in use: looked up again after the first half.
        for i in 200..400 {
            cache.server_config(&host(i)).await.expect("leaf");
        }
        for i in 400..500 {
            cache.server_config(&host(i)).await.expect("leaf");
        }
        let kept = (200..400)
            .filter(|&i| cache.slots.contains_key(host(i).as_str()))
            .count();
        // Each eviction samples 8 of 400; while 100 or more of the idle half are left, all 8
        // are hosts in use less than 10 % of the time.
        assert!(kept >= 180, "hosts in use kept: {kept} of 200");
    }

    #[tokio::test]
    async fn hosts_a_certificate_cannot_name_are_refused_without_signing() {
        let (_dir, ca, _) = temp_ca();
        let cache = LeafCache::new(ca, 16).expect("cache");
        let long = "a".repeat(1000);
        for host in [
            "",
            ".",
            "*.example.test",
            "*",
            "a..example.test",
            "exa mple.test",
            "example.test:443",
            "-bad.example.test",
            "[example.test]",
            "[127.0.0.1]",
            "127.1",
            "1.2.3.4.5",
            "fe80::1%eth0",
            "caf\u{e9}.example.test",
            "a\u{0}.test",
            long.as_str(),
        ] {
            let err = cache.server_config(host).await.expect_err(host);
            assert!(matches!(err, TlsError::InvalidHost { .. }), "{host}: {err}");
            assert!(err.to_string().len() < MAX_HOST_IN_ERROR + 200);
        }
        assert_eq!(cache.issued_total(), 0);
        assert_eq!(cache.slots.len(), 0, "no slot for a refused host");
    }
}

//! TLS interception: the CONNECT authority decides, and SNI and Host/`:authority` must agree
//! with it (domain fronting); upstream certificates are always verified (wrong name, self-signed,
//! another CA, expired → 502 and nothing sent); a failed client handshake never becomes a blind
//! tunnel; a denied CONNECT offers no TLS and issues no leaf; CONNECT or absolute-form inside a
//! tunnel is refused; HTTP/2 pseudo-headers that disagree are refused (raw `h2` frames).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::common::{
    bounded, connect_raw, extend_policy, h1_over, h1_send, read_response, ring, tls_over, Fixture,
    Harness, RawResp, Task, TestCa,
};

const LEAVES: &str = "keyward_tls_leaf_certs_issued_total";

// ---------------------------------------------------------------------------------------------
// Upstreams that only count: how many connections, how many bytes after a handshake.

/// A listener that counts connections and the application bytes it receives (after its TLS
/// handshake, when it has a certificate); it echoes what it reads.
struct Sink {
    addr: SocketAddr,
    connections: Arc<AtomicUsize>,
    app_bytes: Arc<AtomicUsize>,
    accept: JoinHandle<()>,
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

impl Sink {
    async fn start(cert: Option<(CertificateDer<'static>, PrivateKeyDer<'static>)>) -> Sink {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let app_bytes = Arc::new(AtomicUsize::new(0));
        let acceptor = cert.map(|(c, k)| {
            let mut cfg = rustls::ServerConfig::builder_with_provider(ring())
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_no_client_auth()
                .with_single_cert(vec![c], k)
                .unwrap();
            cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
            tokio_rustls::TlsAcceptor::from(Arc::new(cfg))
        });
        let (conns, bytes) = (connections.clone(), app_bytes.clone());
        let accept = tokio::spawn(async move {
            loop {
                let Ok((mut tcp, _)) = listener.accept().await else {
                    continue;
                };
                conns.fetch_add(1, Ordering::SeqCst);
                let (acceptor, bytes) = (acceptor.clone(), bytes.clone());
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    match acceptor {
                        Some(a) => {
                            let Ok(mut tls) = a.accept(tcp).await else {
                                return;
                            };
                            while let Ok(n) = tls.read(&mut buf).await {
                                if n == 0 {
                                    break;
                                }
                                bytes.fetch_add(n, Ordering::SeqCst);
                                let _ = tls.write_all(&buf[..n]).await;
                            }
                        }
                        None => {
                            while let Ok(n) = tcp.read(&mut buf).await {
                                if n == 0 {
                                    break;
                                }
                                bytes.fetch_add(n, Ordering::SeqCst);
                                let _ = tcp.write_all(&buf[..n]).await;
                            }
                        }
                    }
                });
            }
        });
        Sink {
            addr,
            connections,
            app_bytes,
            accept,
        }
    }

    fn port(&self) -> u16 {
        self.addr.port()
    }

    fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    fn app_bytes(&self) -> usize {
        self.app_bytes.load(Ordering::SeqCst)
    }
}

/// A self-signed certificate for `name` (no CA at all).
fn self_signed(name: &str) -> (CertificateDer<'static>, PrivateKeyDer<'static>) {
    let key = rcgen::KeyPair::generate().unwrap();
    let params = rcgen::CertificateParams::new(vec![name.to_string()]).unwrap();
    let cert = params.self_signed(&key).unwrap();
    (
        cert.der().clone(),
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
    )
}

/// An https service `name` on `port` (through `connect_to`), trusting the fixture's test CA.
fn https_service(name: &str, port: u16) -> String {
    format!(
        r#"  {name}:
    hosts: [{name}.test]
    port: {port}
    connect_to: 127.0.0.1:{port}
    tls: {{ ca_file: upstream-ca.pem }}
    inject: {{ header: x-api-key, value: "${{credential}}", credential: tls_token }}
"#
    )
}

fn echo_capability(name: &str) -> String {
    format!("  {name}.read:\n    service: {name}\n    risk: low\n    routes: [GET /echo]\n")
}

/// The standard fixture plus https services `(name, port)` and agent `tlsbot` holding them.
async fn fixture_with_https_services(names: &[(&str, u16)]) -> Fixture {
    let services: String = names.iter().map(|(n, p)| https_service(n, *p)).collect();
    let caps: String = names.iter().map(|(n, _)| echo_capability(n)).collect();
    let list: Vec<String> = names.iter().map(|(n, _)| format!("{n}.read")).collect();
    let agents = format!(
        "  tlsbot:\n    owner: tests\n    capabilities: [{}, secure.read]\n    max_ttl: 1h\n",
        list.join(", ")
    );
    Fixture::start_with(move |p| extend_policy(&p, &services, &caps, &agents)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_certificate_that_is_expired_self_signed_or_from_another_ca_is_a_502() {
    let expired_ca = TestCa::new();
    let other_ca = TestCa::new();
    let expired = Sink::start(Some(expired_ca.leaf_with(&["expired.test"], |p| {
        p.not_before = rcgen::date_time_ymd(2020, 1, 1);
        p.not_after = rcgen::date_time_ymd(2021, 1, 1);
    })))
    .await;
    let notyet = Sink::start(Some(expired_ca.leaf_with(&["notyet.test"], |p| {
        p.not_before = rcgen::date_time_ymd(2090, 1, 1);
        p.not_after = rcgen::date_time_ymd(2091, 1, 1);
    })))
    .await;
    let selfsigned = Sink::start(Some(self_signed("selfsigned.test"))).await;
    let othersigned = Sink::start(Some(other_ca.leaf(&["othersigned.test"]))).await;
    let clientonly = Sink::start(Some(expired_ca.leaf_with(&["clientonly.test"], |p| {
        p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    })))
    .await;
    let f = fixture_with_https_services(&[
        ("expired", expired.port()),
        ("notyet", notyet.port()),
        ("selfsigned", selfsigned.port()),
        ("othersigned", othersigned.port()),
        ("clientonly", clientonly.port()),
    ])
    .await;
    let kw = &f.kw;
    // The expired, not-yet-valid and client-only certificates come from a CA the services
    // trust, so only their validity period or usage is wrong.
    std::fs::write(kw.path("bad-ca.pem"), &expired_ca.pem).unwrap();
    let text = std::fs::read_to_string(&kw.policy_path).unwrap();
    let mut new = text.clone();
    for name in ["expired", "notyet", "clientonly"] {
        let old = https_service(
            name,
            match name {
                "expired" => expired.port(),
                "notyet" => notyet.port(),
                _ => clientonly.port(),
            },
        );
        new = new.replacen(&old, &old.replace("upstream-ca.pem", "bad-ca.pem"), 1);
    }
    assert_ne!(new, text);
    std::fs::write(&kw.policy_path, new).unwrap();
    let (status, v) = kw.admin(http::Method::POST, "/v1/reload", None).await;
    assert_eq!(status, 200, "reload: {v}");

    let names = [
        "expired",
        "notyet",
        "selfsigned",
        "othersigned",
        "clientonly",
    ];
    let caps: Vec<String> = names.iter().map(|n| format!("{n}.read")).collect();
    let task = kw.mint("tlsbot", json!(caps)).await;
    let agent = kw.agent(&task);
    let sinks = [&expired, &notyet, &selfsigned, &othersigned, &clientonly];
    for (name, sink) in names.iter().zip(sinks) {
        let host = format!("{name}.test");
        // Intercepted HTTPS, and an https:// target on the plain listener.
        let url = format!("https://{host}:{}/echo", sink.port());
        let resp = kw.send(agent.get(&url)).await;
        assert_eq!(resp.status, 502, "{url}: {}", resp.body);
        let rec = kw
            .audit_for(resp.json()["request_id"].as_str().unwrap())
            .await;
        crate::common::assert_record(&rec);
        assert_eq!(rec["status"], 502, "{rec}");
        assert_eq!(rec["service"], *name, "{rec}");
        let raw = kw
            .raw(&format!(
                "GET {url} HTTP/1.1\r\nHost: {host}:{}\r\nProxy-Authorization: {}\r\nConnection: close\r\n\r\n",
                sink.port(),
                Harness::proxy_auth(&task)
            ))
            .await;
        assert_eq!(raw.status, 502, "plain-listener {url}: {}", raw.text());
        assert!(sink.connections() >= 1, "{name}: keyward never dialled");
        // SECURITY (I1): not one byte of the request (and its credential) went to the peer.
        assert_eq!(
            sink.app_bytes(),
            0,
            "{name}: bytes sent over an unverified TLS session"
        );
        let series = format!("keyward_upstream_errors_total{{kind=\"tls\",service=\"{name}\"}}");
        assert_eq!(kw.metric(&series).await, Some(2.0), "{series}");
    }
    // A certificate that names another host, for an https:// target on the plain listener
    // (the intercepted case is in tests/proxy_https.rs).
    let bot = kw.mint("bot", json!(["wrongname.read"])).await;
    let port = f.tls.port();
    let raw = kw
        .raw(&format!(
            "GET https://wrongname.test:{port}/echo HTTP/1.1\r\nHost: wrongname.test:{port}\r\nProxy-Authorization: {}\r\nConnection: close\r\n\r\n",
            Harness::proxy_auth(&bot)
        ))
        .await;
    assert_eq!(raw.status, 502, "{}", raw.text());
    assert_eq!(
        f.tls.hits(),
        0,
        "a request went to a peer whose certificate names another host"
    );
    kw.assert_no_leaks().await;
}

/// A TCP upstream behind an https service: if keyward ever tunnelled an agent's bytes blind,
/// they would arrive (and be echoed back).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_client_handshake_never_falls_back_to_a_blind_tunnel() {
    let blind = Sink::start(None).await;
    let f = fixture_with_https_services(&[("blind", blind.port())]).await;
    let kw = &f.kw;
    let task = kw.mint("tlsbot", json!(["blind.read"])).await;
    let authority = format!("blind.test:{}", blind.port());
    let probes: [&[u8]; 3] = [
        b"GET /echo HTTP/1.1\r\nHost: blind.test\r\n\r\n",
        b"\x00\x01\x02 not TLS, not HTTP \xff\r\n\r\n",
        // A TLS record header that announces a handshake and then stops making sense.
        b"\x16\x03\x01\x00\x05\x01\x00\x00\x01\x00\x16\x03\x01\x00\x00",
    ];
    for probe in probes {
        let (mut tcp, head) =
            connect_raw(kw.proxy_addr, &authority, Some(&Harness::proxy_auth(&task))).await;
        assert_eq!(head.status, 200, "{}", head.text());
        bounded("write", tcp.write_all(probe)).await.unwrap();
        let mut back = Vec::new();
        let _ = bounded("keyward closes", tcp.read_to_end(&mut back)).await;
        kw.saw(&String::from_utf8_lossy(&back));
        assert!(
            !back
                .windows(probe.len().min(8))
                .any(|w| w == &probe[..probe.len().min(8)]),
            "the probe came back: relayed blind: {back:?}"
        );
    }
    // A client that does not trust keyward's CA aborts; nothing flows after that either.
    let (tcp, head) =
        connect_raw(kw.proxy_addr, &authority, Some(&Harness::proxy_auth(&task))).await;
    assert_eq!(head.status, 200);
    let wrong_ca = TestCa::new();
    let tls = tls_over(tcp, "blind.test", wrong_ca.pem.as_bytes(), &[b"http/1.1"]).await;
    assert!(tls.is_err(), "the agent trusted a leaf it should not");
    assert_eq!(
        blind.connections(),
        0,
        "keyward dialled the upstream for a failed handshake"
    );
    assert_eq!(blind.app_bytes(), 0);
    // One record per CONNECT, none of them a request that went anywhere.
    let recs = kw.audit_count(4, |r| r["method"] == "CONNECT").await;
    assert_eq!(recs.len(), 4, "{recs:?}");
    for r in &recs {
        crate::common::assert_record(r);
        assert_eq!(r["host"], "blind.test", "{r}");
    }
    assert!(
        recs.iter()
            .filter(|r| r["outcome"] == "tls_handshake_failed")
            .count()
            >= 3,
        "{recs:?}"
    );
    assert_eq!(kw.audit_records().len(), 4);
    kw.assert_no_leaks().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn denied_connects_offer_no_tls_handshake_and_issue_no_leaf() {
    let f = Fixture::start().await;
    let kw = &f.kw;
    let task = kw.mint("bot", json!(["plain.issues.read"])).await;
    let revoked = kw.mint("bot", json!(["secure.read"])).await;
    kw.revoke(&revoked.id).await;
    let p = f.tls.port();
    let cases: [(String, Option<String>, u16, &str); 6] = [
        // The service's host on another port is not the service.
        (
            "secure.test:443".to_string(),
            Some(Harness::proxy_auth(&task)),
            403,
            "unknown_host",
        ),
        (
            format!("secure.test:{p}"),
            Some(Harness::proxy_auth(&task)),
            403,
            "route_not_in_intent",
        ),
        (
            format!("nowhere.test:{p}"),
            Some(Harness::proxy_auth(&task)),
            403,
            "unknown_host",
        ),
        (
            format!("secure.test:0{p}"),
            Some(Harness::proxy_auth(&task)),
            400,
            "ambiguous_request",
        ),
        (
            format!("secure.test:{p}"),
            Some(Harness::proxy_auth(&revoked)),
            407,
            "task_revoked",
        ),
        (format!("secure.test:{p}"), None, 407, "missing_credentials"),
    ];
    for (authority, auth, status, reason) in cases {
        let (mut tcp, head) = connect_raw(kw.proxy_addr, &authority, auth.as_deref()).await;
        kw.saw(&head.text());
        kw.assert_denied_raw(&head, status, reason).await;
        let tls = tls_over(&mut tcp, "secure.test", &kw.ca_pem(), &[b"http/1.1"]).await;
        assert!(
            tls.is_err(),
            "{authority} ({reason}): TLS offered after a denied CONNECT"
        );
    }
    assert_eq!(kw.metric(LEAVES).await, Some(0.0));
    assert_eq!(f.tls.hits(), 0);
    kw.assert_no_leaks().await;
}

/// Opens an intercepted tunnel: CONNECT `connect`, TLS with server name `sni`.
async fn tunnel(
    f: &Fixture,
    task: &Task,
    connect: &str,
    sni: &str,
    alpn: &[&[u8]],
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let authority = format!("{connect}:{}", f.tls.port());
    let (tcp, head) = connect_raw(
        f.kw.proxy_addr,
        &authority,
        Some(&Harness::proxy_auth(task)),
    )
    .await;
    assert_eq!(head.status, 200, "CONNECT {authority}: {}", head.text());
    tls_over(tcp, sni, &f.kw.ca_pem(), alpn).await
}

fn get(path: &str, host: &str) -> http::Request<Full<Bytes>> {
    http::Request::builder()
        .uri(path)
        .header("host", host)
        .body(Full::new(Bytes::new()))
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_sni_and_host_must_all_name_the_same_host() {
    let f = Fixture::start().await;
    let kw = &f.kw;
    // The task may reach both hosts, so only the disagreement can be the reason to refuse.
    let task = kw.mint("bot", json!(["secure.read", "other.read"])).await;
    let port = f.tls.port();
    // (CONNECT, SNI, Host): every disagreement is refused, whichever side names which host.
    let fronts = [
        ("other.test", "secure.test", "secure.test"),
        ("other.test", "secure.test", "other.test"),
        ("secure.test", "other.test", "other.test"),
        ("other.test", "other.test", "secure.test"),
        ("secure.test", "secure.test", "other.test"),
    ];
    for (connect, sni, host) in fronts {
        let what = format!("CONNECT {connect}, SNI {sni}, Host {host}");
        match tunnel(&f, &task, connect, sni, &[b"http/1.1"]).await {
            Err(_) => {
                assert_ne!(connect, sni, "{what}: handshake refused");
                let rec = kw
                    .audit_where(&what, |r| {
                        r["method"] == "CONNECT"
                            && r["reason"] == "host_mismatch"
                            && r["host"] == connect
                    })
                    .await;
                crate::common::assert_record(&rec);
            }
            Ok(tls) => {
                assert_eq!(connect, sni, "{what}: a TLS session for another name");
                let mut conn = h1_over(tls).await;
                let resp = h1_send(&mut conn, get("/echo", &format!("{host}:{port}"))).await;
                kw.saw(&resp.text());
                kw.assert_denied_raw(&resp, 403, "host_mismatch").await;
            }
        }
    }
    assert_eq!(f.tls.hits(), 0, "a fronted request reached the upstream");
    // The leaves issued are for CONNECT hosts whose SNI agreed, never for an SNI alone.
    assert!(kw.metric(LEAVES).await.unwrap() <= 2.0);
    // Control: all three agree, and the request carries that host's own credential.
    let tls = tunnel(&f, &task, "other.test", "other.test", &[b"http/1.1"])
        .await
        .unwrap();
    let mut conn = h1_over(tls).await;
    let resp = h1_send(&mut conn, get("/x", &format!("other.test:{port}"))).await;
    kw.saw(&resp.text());
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(
        f.tls.last().header_all("x-api-key"),
        vec![f.creds.other_token.clone()]
    );
    kw.assert_no_leaks().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_header_of_the_connect_request_never_moves_the_tunnel() {
    let f = Fixture::start().await;
    let kw = &f.kw;
    let task = kw.mint("bot", json!(["secure.read", "other.read"])).await;
    let port = f.tls.port();
    // CONNECT names secure.test; its Host names other.test.
    let (tcp, head) = crate::common::exchange_head(
        kw.proxy_addr,
        format!(
            "CONNECT secure.test:{port} HTTP/1.1\r\nHost: other.test:{port}\r\nProxy-Authorization: {}\r\n\r\n",
            Harness::proxy_auth(&task)
        )
        .as_bytes(),
    )
    .await;
    kw.saw(&head.text());
    match head.status {
        // Refusing the disagreement outright is as good as binding the tunnel to the authority.
        400 => {
            kw.assert_denied_raw(&head, 400, "ambiguous_request").await;
        }
        200 => {
            // The tunnel is secure.test's: TLS for other.test is refused...
            let (tcp2, head2) = crate::common::exchange_head(
                kw.proxy_addr,
                format!(
                    "CONNECT secure.test:{port} HTTP/1.1\r\nHost: other.test:{port}\r\nProxy-Authorization: {}\r\n\r\n",
                    Harness::proxy_auth(&task)
                )
                .as_bytes(),
            )
            .await;
            assert_eq!(head2.status, 200);
            let fronted = tls_over(tcp2, "other.test", &kw.ca_pem(), &[b"http/1.1"]).await;
            assert!(
                fronted.is_err(),
                "TLS for the CONNECT's Host instead of its authority"
            );
            // ...and requests inside are secure.test's, with its credential.
            let tls = tls_over(tcp, "secure.test", &kw.ca_pem(), &[b"http/1.1"])
                .await
                .unwrap();
            let mut conn = h1_over(tls).await;
            let resp = h1_send(&mut conn, get("/x", &format!("other.test:{port}"))).await;
            kw.saw(&resp.text());
            kw.assert_denied_raw(&resp, 403, "host_mismatch").await;
            let resp = h1_send(&mut conn, get("/echo", &format!("secure.test:{port}"))).await;
            kw.saw(&resp.text());
            assert_eq!(resp.status, 200, "{}", resp.text());
            assert_eq!(
                f.tls.last().header_all("x-api-key"),
                vec![f.creds.tls_token.clone()]
            );
            assert_eq!(f.tls.hits(), 1);
        }
        s => panic!("CONNECT with a disagreeing Host: {s}: {}", head.text()),
    }
    kw.assert_no_leaks().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passthrough_tunnel_to_a_service_address_never_carries_its_credential() {
    let f = Fixture::start().await;
    let kw = &f.kw;
    let task = kw.mint("bot", json!(["secure.read"])).await;
    // 127.0.0.1 is a passthrough host; the TLS upstream of `secure.test` listens there.
    let authority = format!("127.0.0.1:{}", f.tls.port());
    let (tcp, head) =
        connect_raw(kw.proxy_addr, &authority, Some(&Harness::proxy_auth(&task))).await;
    assert_eq!(head.status, 200, "{}", head.text());
    // The agent fronts secure.test through the blind tunnel (it trusts the upstream's CA).
    let tls = tls_over(
        tcp,
        "secure.test",
        f.upstream_ca.pem.as_bytes(),
        &[b"http/1.1"],
    )
    .await
    .unwrap();
    let mut conn = h1_over(tls).await;
    let resp = h1_send(
        &mut conn,
        get("/echo", &format!("secure.test:{}", f.tls.port())),
    )
    .await;
    kw.saw(&resp.text());
    assert_eq!(resp.status, 200);
    let seen = f.tls.last();
    assert!(
        seen.header("x-api-key").is_none(),
        "a credential in a blind tunnel: {seen:?}"
    );
    assert!(seen.header("proxy-authorization").is_none());
    drop(conn);
    let rec = kw
        .audit_where("the passthrough tunnel", |r| r["reason"] == "passthrough")
        .await;
    assert_eq!(rec["credential"], serde_json::Value::Null, "{rec}");
    assert_eq!(kw.metric(LEAVES).await, Some(0.0));
    kw.assert_no_leaks().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nested_connect_other_destinations_and_missing_host_inside_a_tunnel_are_refused() {
    let f = Fixture::start().await;
    let kw = &f.kw;
    let task = kw.mint("bot", json!(["secure.read", "other.read"])).await;
    let port = f.tls.port();
    let auth = Harness::proxy_auth(&task);
    let heads = [
        format!("CONNECT other.test:{port} HTTP/1.1\r\nHost: other.test:{port}\r\n\r\n"),
        format!("CONNECT secure.test:{port} HTTP/1.1\r\nHost: secure.test:{port}\r\n\r\n"),
        format!("CONNECT other.test:{port} HTTP/1.1\r\nHost: other.test:{port}\r\nProxy-Authorization: {auth}\r\n\r\n"),
        format!("GET https://other.test:{port}/x HTTP/1.1\r\nHost: secure.test:{port}\r\n\r\n"),
        format!("GET https://secure.test:{port}/x HTTP/1.1\r\nHost: other.test:{port}\r\n\r\n"),
        format!("GET https://user@secure.test:{port}/x HTTP/1.1\r\nHost: secure.test:{port}\r\n\r\n"),
        format!("GET http://other.test:{port}/x HTTP/1.1\r\nHost: other.test:{port}\r\n\r\n"),
        format!("GET http://plain.test:{}/echo HTTP/1.1\r\nHost: plain.test\r\n\r\n", f.plain.port()),
        // No Host at all: the request names no host to check against the tunnel's.
        "GET /echo HTTP/1.1\r\n\r\n".to_string(),
        format!("GET /echo HTTP/1.1\r\nHost: secure.test:{port}\r\nHost: secure.test:{port}\r\n\r\n"),
    ];
    for head in &heads {
        let mut tls = tunnel(&f, &task, "secure.test", "secure.test", &[b"http/1.1"])
            .await
            .unwrap();
        bounded("write", tls.write_all(head.as_bytes()))
            .await
            .unwrap();
        // rustls keeps what the socket did not take yet: flush before waiting for an answer.
        bounded("flush", tls.flush()).await.unwrap();
        let resp = read_response(&mut tls).await;
        kw.saw(&resp.text());
        let line = head.lines().next().unwrap();
        assert_eq!(resp.status, 400, "{line}: {}", resp.text());
        kw.assert_denied_raw(&resp, 400, "ambiguous_request").await;
        // Nothing after a refused CONNECT is treated as a new TLS session inside the tunnel.
        let inner = tls_over(&mut tls, "other.test", &kw.ca_pem(), &[b"http/1.1"]).await;
        assert!(inner.is_err(), "{line}: a TLS session inside the tunnel");
    }
    assert_eq!(f.tls.hits() + f.plain.hits(), 0);
    assert_eq!(
        kw.metric(LEAVES).await,
        Some(1.0),
        "one leaf: secure.test's"
    );
    // Absolute form that names the tunnel's own host over https is the same request (RFC 9112
    // §3.2.2: a server must accept it); the upstream gets origin form.
    let mut tls = tunnel(&f, &task, "secure.test", "secure.test", &[b"http/1.1"])
        .await
        .unwrap();
    let head = format!(
        "GET https://secure.test:{port}/echo HTTP/1.1\r\nHost: secure.test:{port}\r\nConnection: close\r\n\r\n"
    );
    bounded("write", tls.write_all(head.as_bytes()))
        .await
        .unwrap();
    bounded("flush", tls.flush()).await.unwrap();
    let resp = read_response(&mut tls).await;
    kw.saw(&resp.text());
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(f.tls.last().path, "/echo");
    kw.assert_no_leaks().await;
}

// ---------------------------------------------------------------------------------------------
// HTTP/2 frames with the `h2` crate: pseudo-headers exactly as the test writes them.

async fn h2_tunnel(f: &Fixture, task: &Task) -> h2::client::SendRequest<Bytes> {
    let tls = tunnel(f, task, "secure.test", "secure.test", &[b"h2"])
        .await
        .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (client, conn) = bounded("h2 handshake", h2::client::handshake(tls))
        .await
        .unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

/// Sends one request with no body; `Err` when the stream or connection was reset.
async fn h2_exchange(
    client: &h2::client::SendRequest<Bytes>,
    req: http::Request<()>,
) -> Result<RawResp, h2::Error> {
    let mut client = bounded("h2 ready", client.clone().ready()).await?;
    let (resp, _send) = client.send_request(req, true)?;
    let resp = bounded("h2 response", resp).await?;
    let status = resp.status().as_u16();
    let headers = resp
        .headers()
        .iter()
        .map(|(n, v)| {
            (
                n.to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let mut body = resp.into_body();
    let mut buf = Vec::new();
    while let Some(chunk) = bounded("h2 body", body.data()).await {
        let chunk = chunk?;
        let _ = body.flow_control().release_capacity(chunk.len());
        buf.extend_from_slice(&chunk);
    }
    Ok(RawResp {
        status,
        headers,
        body: buf,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_authority_host_and_scheme_that_disagree_are_refused() {
    let f = Fixture::start().await;
    let kw = &f.kw;
    let task = kw.mint("bot", json!(["secure.read", "other.read"])).await;
    let client = h2_tunnel(&f, &task).await;
    let port = f.tls.port();
    let secure = format!("secure.test:{port}");
    let other = format!("other.test:{port}");
    let req = |uri: String, hosts: &[&str], version: http::Version| {
        let mut b = http::Request::builder().uri(uri).version(version);
        for h in hosts {
            b = b.header("host", *h);
        }
        b.body(()).unwrap()
    };
    let h2v = http::Version::HTTP_2;
    let cases = [
        (
            "authority secure, host other",
            req(format!("https://{secure}/echo"), &[&other], h2v),
            400,
            "ambiguous_request",
        ),
        (
            "authority other, host secure",
            req(format!("https://{other}/x"), &[&secure], h2v),
            400,
            "ambiguous_request",
        ),
        (
            "authority other, no host",
            req(format!("https://{other}/x"), &[], h2v),
            403,
            "host_mismatch",
        ),
        (
            "authority secure, two hosts",
            req(format!("https://{secure}/echo"), &[&secure, &secure], h2v),
            400,
            "ambiguous_request",
        ),
        (
            "authority secure, hosts secure and other",
            req(format!("https://{secure}/echo"), &[&secure, &other], h2v),
            400,
            "ambiguous_request",
        ),
        (
            "scheme http",
            req(format!("http://{secure}/echo"), &[], h2v),
            400,
            "ambiguous_request",
        ),
        (
            "no authority, host secure",
            req("/echo".to_string(), &[&secure], http::Version::HTTP_11),
            400,
            "ambiguous_request",
        ),
        (
            "authority with userinfo",
            req(format!("https://user@{secure}/echo"), &[], h2v),
            400,
            "ambiguous_request",
        ),
        (
            "authority with another port",
            req(format!("https://secure.test:{}/echo", port + 1), &[], h2v),
            403,
            "host_mismatch",
        ),
    ];
    for (what, request, status, reason) in cases {
        let resp = h2_exchange(&client, request)
            .await
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        kw.saw(&resp.text());
        assert_eq!(resp.status, status, "{what}: {}", resp.text());
        kw.assert_denied_raw(&resp, status, reason).await;
    }
    assert_eq!(f.tls.hits(), 0);
    // CONNECT on an HTTP/2 stream: a nested tunnel, refused whatever it names.
    for (target, status, reason) in [
        (other.clone(), 400, "ambiguous_request"),
        (secure.clone(), 400, "ambiguous_request"),
    ] {
        let connect = http::Request::builder()
            .method("CONNECT")
            .uri(target.clone())
            .version(h2v)
            .body(())
            .unwrap();
        let resp = h2_exchange(&client, connect)
            .await
            .unwrap_or_else(|e| panic!("CONNECT {target}: {e}"));
        kw.saw(&resp.text());
        assert_eq!(
            resp.status,
            status,
            "CONNECT {target} on a stream: {}",
            resp.text()
        );
        kw.assert_denied_raw(&resp, status, reason).await;
    }
    assert_eq!(f.tls.hits(), 0);
    assert_eq!(kw.metric(LEAVES).await, Some(1.0));
    // The connection still serves a request whose pseudo-headers agree.
    let ok = h2_exchange(&client, req(format!("https://{secure}/echo"), &[], h2v))
        .await
        .unwrap();
    kw.saw(&ok.text());
    assert_eq!(ok.status, 200, "{}", ok.text());
    assert_eq!(
        f.tls.last().header_all("x-api-key"),
        vec![f.creds.tls_token.clone()]
    );
    kw.assert_no_leaks().await;
}

//! The standard fixture: keyward on the standard policy, with a plain and a TLS upstream, a
//! blind TCP echo, and random credential values.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use tokio::net::TcpListener;

use bytes::Bytes;
use http_body_util::Full;

use super::{
    connect_raw, h1_over, h2_over, tls_over, Harness, Setup, Task, TcpEcho, TestCa, Upstream,
};

// ---------------------------------------------------------------------------------------------
// The standard fixture

/// Credential values of the standard policy (random per run, so a leak is unambiguous).
pub struct Creds {
    pub api_token: String,
    pub query_key: String,
    pub basic_pw: String,
    pub local_token: String,
    pub gone_token: String,
    pub tls_token: String,
    pub other_token: String,
}

impl Creds {
    fn new() -> Creds {
        let v = |p: &str| format!("{p}_{}", keyward::tasks::random_hex(12));
        Creds {
            api_token: v("sk_live_api"),
            query_key: v("qk_live"),
            basic_pw: v("pw_live"),
            local_token: v("sk_live_local"),
            gone_token: v("sk_live_gone"),
            tls_token: v("sk_live_tls"),
            other_token: v("sk_live_other"),
        }
    }
}

/// keyward with the standard policy, a plain and a TLS upstream, and a TCP echo.
pub struct Fixture {
    pub kw: Harness,
    /// The port behind `dead.test`, where nothing listens.
    pub dead_port: u16,
    pub plain: Upstream,
    pub tls: Upstream,
    pub tcp: TcpEcho,
    pub creds: Creds,
    pub upstream_ca: TestCa,
}

/// The standard policy. `plain` serves `plain.test`, `query.test`, `basic.test`, `gone.test`
/// (and `localhost` without `connect_to`, which must be refused as a blocked address); `tls`
/// serves `secure.test` and `other.test` (and `wrongname.test`, whose certificate does not name
/// it, and `noca.test`, whose service does not trust the test CA); nothing listens behind
/// `dead.test`. Agent `bot` holds every capability, `reader` one.
pub fn standard_policy(plain: u16, tls: u16, dead: u16) -> String {
    format!(
        r#"
proxy:
  listen: 127.0.0.1:0
admin:
  listen: 127.0.0.1:0
  token: file:admin-token
ca:
  cert: ca.pem
  key: ca-key.pem
audit:
  path: audit.jsonl

credentials:
  api_token: {{ source: file:api-token }}
  query_key: {{ source: file:query-key }}
  basic_pw: {{ source: file:basic-pw }}
  local_token: {{ source: file:local-token }}
  gone_token: {{ source: file:gone-token }}
  tls_token: {{ source: file:tls-token }}
  other_token: {{ source: file:other-token }}

services:
  plain:
    hosts: [plain.test]
    scheme: http
    port: {plain}
    connect_to: 127.0.0.1:{plain}
    allow_cleartext: true
    inject: {{ header: Authorization, value: "Bearer ${{credential}}", credential: api_token }}
  query:
    hosts: [query.test]
    scheme: http
    port: {plain}
    connect_to: 127.0.0.1:{plain}
    allow_cleartext: true
    inject: {{ query: api_key, credential: query_key }}
  basic:
    hosts: [basic.test]
    scheme: http
    port: {plain}
    connect_to: 127.0.0.1:{plain}
    allow_cleartext: true
    inject: {{ basic: {{ username: bot }}, credential: basic_pw }}
  local:
    hosts: [localhost]
    scheme: http
    port: {plain}
    allow_cleartext: true
    inject: {{ header: Authorization, value: "Bearer ${{credential}}", credential: local_token }}
  gone:
    hosts: [gone.test]
    scheme: http
    port: {plain}
    connect_to: 127.0.0.1:{plain}
    allow_cleartext: true
    inject: {{ header: Authorization, value: "Bearer ${{credential}}", credential: gone_token }}
  dead:
    hosts: [dead.test]
    scheme: http
    port: {dead}
    connect_to: 127.0.0.1:{dead}
    allow_cleartext: true
    inject: {{ header: Authorization, value: "Bearer ${{credential}}", credential: api_token }}
  secure:
    hosts: [secure.test]
    port: {tls}
    connect_to: 127.0.0.1:{tls}
    tls: {{ ca_file: upstream-ca.pem }}
    inject: {{ header: x-api-key, value: "${{credential}}", credential: tls_token }}
  wrongname:
    hosts: [wrongname.test]
    port: {tls}
    connect_to: 127.0.0.1:{tls}
    tls: {{ ca_file: upstream-ca.pem }}
    inject: {{ header: x-api-key, value: "${{credential}}", credential: tls_token }}
  noca:
    hosts: [noca.test]
    port: {tls}
    connect_to: 127.0.0.1:{tls}
    inject: {{ header: x-api-key, value: "${{credential}}", credential: tls_token }}
  other:
    hosts: [other.test]
    port: {tls}
    connect_to: 127.0.0.1:{tls}
    tls: {{ ca_file: upstream-ca.pem }}
    inject: {{ header: x-api-key, value: "${{credential}}", credential: other_token }}

capabilities:
  plain.issues.read:
    service: plain
    risk: low
    routes:
      - GET /repos/{{owner}}/{{repo}}/issues
      - GET /repos/{{owner}}/{{repo}}/issues/{{number}}
      - GET /reflect-auth
      - GET /reflect-auth-base64
      - GET /big
      - GET /sse
      - GET /ticks
      - GET /slow
      - GET /stall
      - GET /endless
      - GET|POST /echo
  plain.labels.write:
    service: plain
    risk: medium
    routes:
      - POST /repos/{{owner}}/{{repo}}/labels
  plain.admin:
    service: plain
    risk: high
    routes:
      - DELETE /admin/{{thing}}
  query.search:
    service: query
    risk: low
    routes: [GET /search]
  basic.whoami:
    service: basic
    risk: low
    routes: [GET /whoami]
  local.ping:
    service: local
    risk: low
    routes: [GET /ping]
  gone.ping:
    service: gone
    risk: low
    routes: [GET /ping]
  dead.ping:
    service: dead
    risk: low
    routes: [GET /ping]
  secure.read:
    service: secure
    risk: low
    routes:
      - GET /repos/{{owner}}/{{repo}}/issues
      - GET /reflect-auth
      - GET /big
      - GET /sse
      - GET /endless
      - GET /stall
      - GET|POST /echo
  wrongname.read:
    service: wrongname
    risk: low
    routes: [GET /echo]
  noca.read:
    service: noca
    risk: low
    routes: [GET /echo]
  other.read:
    service: other
    risk: low
    routes: [GET /x]

agents:
  bot:
    owner: tests
    capabilities: [plain.issues.read, plain.labels.write, plain.admin, query.search, basic.whoami, local.ping, gone.ping, dead.ping, secure.read, other.read, wrongname.read, noca.read]
    max_ttl: 1h
  reader:
    owner: tests
    capabilities: [plain.issues.read]
    max_ttl: 10m

passthrough: [127.0.0.1]
"#
    )
}

impl Fixture {
    /// The standard fixture.
    pub async fn start() -> Fixture {
        Self::start_with(|p| p).await
    }

    /// The standard fixture with the policy text changed by `edit`.
    pub async fn start_with(edit: impl FnOnce(String) -> String) -> Fixture {
        let upstream_ca = TestCa::new();
        let plain = Upstream::plain().await;
        // `a.pair.test` (not `b.pair.test`) is for the per-host pool test.
        let tls = Upstream::tls(
            &upstream_ca,
            &["secure.test", "other.test", "noca.test", "a.pair.test"],
        )
        .await;
        let tcp = TcpEcho::start().await;
        let creds = Creds::new();
        let mut setup = Setup::new();
        setup.file("upstream-ca.pem", &upstream_ca.pem);
        for (file, value) in [
            ("api-token", &creds.api_token),
            ("query-key", &creds.query_key),
            ("basic-pw", &creds.basic_pw),
            ("local-token", &creds.local_token),
            ("gone-token", &creds.gone_token),
            ("tls-token", &creds.tls_token),
            ("other-token", &creds.other_token),
        ] {
            setup.secret_file(file, value);
        }
        // A port nothing listens on: bound, then released.
        let dead = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let kw = setup
            .start(&edit(standard_policy(plain.port(), tls.port(), dead)))
            .await;
        // The Basic credential keyward puts upstream must not come back either.
        kw.add_secret(&B64.encode(format!("bot:{}", creds.basic_pw)));
        Fixture {
            kw,
            dead_port: dead,
            plain,
            tls,
            tcp,
            creds,
            upstream_ca,
        }
    }

    pub fn plain_url(&self, host: &str, path: &str) -> String {
        format!("http://{host}:{}{path}", self.plain.port())
    }

    pub fn tls_url(&self, host: &str, path: &str) -> String {
        format!("https://{host}:{}{path}", self.tls.port())
    }
}

/// Adds YAML entries (already indented by two spaces, one entry per block) under `services:`,
/// `capabilities:` and `agents:` of a standard policy, for tests that need their own upstreams.
pub fn extend_policy(policy: &str, services: &str, capabilities: &str, agents: &str) -> String {
    policy
        .replacen("\nservices:\n", &format!("\nservices:\n{services}"), 1)
        .replacen(
            "\ncapabilities:\n",
            &format!("\ncapabilities:\n{capabilities}"),
            1,
        )
        .replacen("\nagents:\n", &format!("\nagents:\n{agents}"), 1)
}

// ---------------------------------------------------------------------------------------------
// Intercepted tunnels

/// CONNECT to `host` on the TLS upstream's port and a TLS session inside, offering `alpn`.
pub async fn tunnel_tls(
    f: &Fixture,
    task: &Task,
    host: &str,
    alpn: &[&[u8]],
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    tunnel_tls_at(f, task, host, f.tls.port(), alpn).await
}

/// The same to any port.
pub async fn tunnel_tls_at(
    f: &Fixture,
    task: &Task,
    host: &str,
    port: u16,
    alpn: &[&[u8]],
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let authority = format!("{host}:{port}");
    let (tcp, head) = connect_raw(
        f.kw.proxy_addr,
        &authority,
        Some(&Harness::proxy_auth(task)),
    )
    .await;
    assert_eq!(head.status, 200, "CONNECT {authority}: {}", head.text());
    tls_over(tcp, host, &f.kw.ca_pem(), alpn).await.unwrap()
}

/// An intercepted HTTP/1.1 connection to `host` through keyward for `task`.
pub async fn tunnel_h1(
    f: &Fixture,
    task: &Task,
    host: &str,
) -> hyper::client::conn::http1::SendRequest<Full<Bytes>> {
    h1_over(tunnel_tls(f, task, host, &[b"http/1.1"]).await).await
}

/// An intercepted HTTP/2 connection (ALPN `h2`) to `host` through keyward for `task`.
pub async fn tunnel_h2(
    f: &Fixture,
    task: &Task,
    host: &str,
) -> hyper::client::conn::http2::SendRequest<Full<Bytes>> {
    let tls = tunnel_tls(f, task, host, &[b"h2"]).await;
    assert_eq!(
        tls.get_ref().1.alpn_protocol(),
        Some(&b"h2"[..]),
        "keyward offers h2"
    );
    h2_over(tls).await
}

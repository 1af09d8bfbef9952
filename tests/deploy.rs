//! Keeps `deploy/` honest against keyward as built: the Kubernetes ConfigMap's policy passes
//! `keyward check` and, with the files it references stubbed, serves and is ready; the
//! Deployment wires that policy, its files, ports, probes and the agent's proxy settings the way
//! the policy says; every `keyward_*` metric, label and label value that the Prometheus rules and
//! the Grafana dashboard use exists in a real keyward's `/metrics` (and SPEC §8); the dashboard is
//! valid JSON with its data source as a template variable. When `promtool` is on PATH, the rules
//! and their unit tests are run through it too.
//!
//! Only loopback networking; no Kubernetes cluster or Prometheus server is involved.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use common::bounded;
use marked_yaml::Node;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};

const BIN: &str = env!("CARGO_BIN_EXE_keyward");

fn deploy(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy")
        .join(rel)
}

fn read(rel: &str) -> String {
    let p = deploy(rel);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("cannot read {}: {e}", p.display()))
}

// ---------------------------------------------------------------------------------------------
// YAML (marked-yaml, as keyward itself uses)

fn yaml(rel: &str) -> Node {
    marked_yaml::parse_yaml(0, read(rel))
        .unwrap_or_else(|e| panic!("deploy/{rel} is not one YAML mapping: {e}"))
}

/// The node at a dotted path (`spec.template.spec`); a numeric segment indexes a sequence.
fn at<'a>(node: &'a Node, path: &str) -> &'a Node {
    try_at(node, path).unwrap_or_else(|| panic!("no `{path}`"))
}

fn try_at<'a>(node: &'a Node, path: &str) -> Option<&'a Node> {
    let mut cur = node;
    for seg in path.split('.') {
        cur = match cur {
            Node::Mapping(m) => m.get_node(seg)?,
            Node::Sequence(s) => s.get(seg.parse::<usize>().ok()?)?,
            Node::Scalar(_) => return None,
        };
    }
    Some(cur)
}

/// The value of one key that may itself contain dots (`policy.yaml`, `prometheus.io/port`).
fn key<'a>(node: &'a Node, key: &str) -> &'a Node {
    node.as_mapping()
        .and_then(|m| m.get_node(key))
        .unwrap_or_else(|| panic!("no key `{key}`"))
}

fn scalar(node: &Node) -> String {
    node.as_scalar().expect("a scalar").as_str().to_string()
}

fn text_at(node: &Node, path: &str) -> String {
    at(node, path)
        .as_scalar()
        .unwrap_or_else(|| panic!("`{path}` is not a scalar"))
        .as_str()
        .to_string()
}

fn opt_text(node: &Node, path: &str) -> Option<String> {
    try_at(node, path)
        .and_then(Node::as_scalar)
        .map(|s| s.as_str().to_string())
}

fn items<'a>(node: &'a Node, path: &str) -> &'a [Node] {
    try_at(node, path)
        .and_then(Node::as_sequence)
        .map(|s| s.as_slice())
        .unwrap_or(&[])
}

fn strings(node: &Node, path: &str) -> Vec<String> {
    items(node, path)
        .iter()
        .map(|n| n.as_scalar().unwrap().as_str().to_string())
        .collect()
}

/// The entry of a `name:`-keyed list (containers, volumes, env, ports).
fn named<'a>(list: &'a [Node], name: &str) -> Option<&'a Node> {
    list.iter()
        .find(|n| opt_text(n, "name").as_deref() == Some(name))
}

// ---------------------------------------------------------------------------------------------
// deploy/kubernetes

struct Kube {
    configmap: Node,
    deployment: Node,
}

impl Kube {
    fn load() -> Kube {
        Kube {
            configmap: yaml("kubernetes/configmap.yaml"),
            deployment: yaml("kubernetes/deployment.yaml"),
        }
    }

    /// The policy exactly as the ConfigMap carries it.
    fn policy_text(&self) -> String {
        assert_eq!(text_at(&self.configmap, "kind"), "ConfigMap");
        scalar(key(at(&self.configmap, "data"), "policy.yaml"))
    }

    fn pod(&self) -> &Node {
        assert_eq!(text_at(&self.deployment, "kind"), "Deployment");
        at(&self.deployment, "spec.template.spec")
    }

    /// A container by name, among init containers (native sidecars) and containers.
    fn container(&self, name: &str) -> &Node {
        named(items(self.pod(), "initContainers"), name)
            .or_else(|| named(items(self.pod(), "containers"), name))
            .unwrap_or_else(|| panic!("no container `{name}` in deployment.yaml"))
    }

    fn volume(&self, name: &str) -> &Node {
        named(items(self.pod(), "volumes"), name)
            .unwrap_or_else(|| panic!("no volume `{name}` in deployment.yaml"))
    }

    /// (mountPath, volume) of every mount of `container`.
    fn mounts(&self, container: &str) -> Vec<(PathBuf, &Node)> {
        items(self.container(container), "volumeMounts")
            .iter()
            .map(|m| {
                (
                    PathBuf::from(text_at(m, "mountPath")),
                    self.volume(&text_at(m, "name")),
                )
            })
            .collect()
    }

    /// The volume mounted in `container` at the deepest mountPath that holds `path`.
    fn volume_holding(&self, container: &str, path: &Path) -> &Node {
        self.mounts(container)
            .into_iter()
            .filter(|(dir, _)| path.starts_with(dir))
            .max_by_key(|(dir, _)| dir.components().count())
            .map(|(_, v)| v)
            .unwrap_or_else(|| {
                panic!(
                    "{} (named by the policy) is on no volume mounted in container `{container}`",
                    path.display()
                )
            })
    }

    fn env(&self, container: &str, name: &str) -> Option<&Node> {
        named(items(self.container(container), "env"), name)
    }
}

/// The keys `kubectl create secret generic NAME --from-file=KEY=...` in deploy/README.md puts
/// into Secret `name` (the command may continue over `\` lines).
fn readme_secret_keys(name: &str) -> BTreeSet<String> {
    let readme = read("README.md");
    let start = readme
        .find(&format!("kubectl create secret generic {name} "))
        .unwrap_or_else(|| panic!("deploy/README.md does not create Secret {name}"));
    let mut command = String::new();
    for line in readme[start..].lines() {
        command.push_str(line.trim_end_matches('\\'));
        if !line.ends_with('\\') {
            break;
        }
    }
    command
        .split_whitespace()
        .filter_map(|w| w.strip_prefix("--from-file="))
        .map(|kv| kv.split_once('=').map_or(kv, |(k, _)| k).to_string())
        .collect()
}

fn load_policy(text: &str, dir: &Path) -> keyward::policy::Policy {
    std::fs::create_dir_all(dir).unwrap();
    let file = dir.join("policy.yaml");
    std::fs::write(&file, text).unwrap();
    keyward::policy::load(&file).unwrap_or_else(|e| panic!("the ConfigMap's policy:\n{e}"))
}

fn file_sources(policy: &keyward::policy::Policy) -> Vec<(String, PathBuf)> {
    policy
        .credentials
        .iter()
        .map(|c| match &c.source {
            keyward::policy::SecretSource::File(p) => (c.name.clone(), p.clone()),
            _ => panic!(
                "credential `{}`: the sidecar example reads credentials from the mounted Secret (`file:`)",
                c.name
            ),
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configmap_policy_passes_keyward_check() {
    let dir = tempfile::tempdir().unwrap();
    let etc = dir.path().join("etc-keyward");
    std::fs::create_dir_all(&etc).unwrap();
    let file = etc.join("policy.yaml");
    std::fs::write(&file, Kube::load().policy_text()).unwrap();
    let out = bounded(
        "keyward check",
        tokio::process::Command::new(BIN)
            .args(["check", "--config", file.to_str().unwrap()])
            .env_remove("KEYWARD_ADMIN_TOKEN")
            .kill_on_drop(true)
            .output(),
    )
    .await
    .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "keyward check on deploy/kubernetes/configmap.yaml's policy.yaml:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The Deployment mounts and wires what the ConfigMap's policy names.
#[test]
fn deployment_matches_the_policy() {
    let kube = Kube::load();
    let dir = tempfile::tempdir().unwrap();
    let policy = load_policy(&kube.policy_text(), dir.path());

    // keyward serve --config <the ConfigMap's policy.yaml>
    let kw = kube.container("keyward");
    let argv: Vec<String> = strings(kw, "command")
        .into_iter()
        .chain(strings(kw, "args"))
        .collect();
    assert_eq!(
        argv,
        ["keyward", "serve", "--config", "/etc/keyward/policy.yaml"]
    );
    let config = Path::new(&argv[3]);
    // SIGTERM's drain, the cut after it and the audit log's flush end before the kubelet's
    // SIGKILL: otherwise the records of what was cut are lost with the process.
    let grace: u64 = text_at(kube.pod(), "terminationGracePeriodSeconds")
        .parse()
        .unwrap();
    let shutdown = policy.proxy.shutdown_timeout
        + keyward::proxy::conn::CUT_GRACE
        + keyward::app::AUDIT_FLUSH_LIMIT;
    assert!(
        shutdown <= std::time::Duration::from_secs(grace),
        "proxy.shutdown_timeout + the 2 s cut + 5 s for the audit log ({shutdown:?}) exceed terminationGracePeriodSeconds ({grace} s)"
    );
    let policy_volume = kube.volume_holding("keyward", config);
    assert_eq!(
        opt_text(policy_volume, "configMap.name"),
        opt_text(&kube.configmap, "metadata.name"),
        "the policy must come from the keyward-policy ConfigMap"
    );
    assert_eq!(
        config.file_name().unwrap().to_str().unwrap(),
        "policy.yaml",
        "the ConfigMap key"
    );

    // Credentials: every `file:` source is a key of a Secret that deploy/README.md creates.
    for (name, path) in file_sources(&policy) {
        let v = kube.volume_holding("keyward", &path);
        let secret = opt_text(v, "secret.secretName").unwrap_or_else(|| {
            panic!(
                "credential `{name}` ({}) is not on a Secret volume",
                path.display()
            )
        });
        let file = path.file_name().unwrap().to_str().unwrap();
        assert!(
            readme_secret_keys(&secret).contains(file),
            "credential `{name}`: deploy/README.md does not put key `{file}` into Secret {secret}"
        );
    }

    // The CA pair: on the emptyDir the keyward-ca init container fills, the key chmod 0400,
    // from a Secret volume with defaultMode 0400.
    let ca_volume = kube.volume_holding("keyward", &policy.ca.key);
    assert!(
        try_at(ca_volume, "emptyDir").is_some(),
        "CA key volume must be the emptyDir"
    );
    assert!(std::ptr::eq(
        ca_volume,
        kube.volume_holding("keyward", &policy.ca.cert)
    ));
    let init = kube.container("keyward-ca");
    let script = strings(init, "command").join(" ");
    let key_name = policy.ca.key.file_name().unwrap().to_str().unwrap();
    let cert_name = policy.ca.cert.file_name().unwrap().to_str().unwrap();
    assert!(
        script.contains(&format!("chmod 0400 /ca/{key_name}")),
        "{script}"
    );
    assert!(script.contains(&format!("/ca/{cert_name}")), "{script}");
    let init_mounts = kube.mounts("keyward-ca");
    assert!(init_mounts
        .iter()
        .any(|(dir, v)| dir == Path::new("/ca") && std::ptr::eq(*v, ca_volume)));
    let (_, ca_secret) = init_mounts
        .iter()
        .find(|(dir, _)| dir == Path::new("/ca-secret"))
        .expect("the init container mounts the keyward-ca Secret at /ca-secret");
    assert_eq!(
        opt_text(ca_secret, "secret.secretName").as_deref(),
        Some("keyward-ca")
    );
    let ca_keys = readme_secret_keys("keyward-ca");
    for item in items(ca_secret, "secret.items") {
        assert!(ca_keys.contains(&text_at(item, "key")), "{ca_keys:?}");
    }
    assert!(
        matches!(
            opt_text(ca_secret, "secret.defaultMode").as_deref(),
            Some("0400" | "256")
        ),
        "the CA Secret volume's defaultMode must be 0400"
    );

    // Admin token from a Secret in the environment the policy names.
    match &policy.admin.token {
        keyward::policy::SecretSource::Env(var) => {
            let env = kube
                .env("keyward", var)
                .unwrap_or_else(|| panic!("the keyward container does not set {var}"));
            let secret = text_at(env, "valueFrom.secretKeyRef.name");
            let k = text_at(env, "valueFrom.secretKeyRef.key");
            assert!(
                readme_secret_keys(&secret).contains(&k),
                "deploy/README.md does not put key `{k}` into Secret {secret}"
            );
        }
        _ => panic!("the admin token should come from the environment"),
    }

    // Probes and scraping reach the admin listener through the pod IP.
    let admin = policy.admin.listen;
    assert!(
        admin.ip().is_unspecified(),
        "kubelet probes and Prometheus connect to the pod IP; admin.listen {admin} is not reachable there"
    );
    let port = named(items(kw, "ports"), "admin").expect("a port named admin");
    assert_eq!(text_at(port, "containerPort"), admin.port().to_string());
    for (probe, path) in [
        ("startupProbe", "/readyz"),
        ("readinessProbe", "/readyz"),
        ("livenessProbe", "/healthz"),
    ] {
        assert_eq!(text_at(kw, &format!("{probe}.httpGet.path")), path);
        assert_eq!(text_at(kw, &format!("{probe}.httpGet.port")), "admin");
    }
    let annotations = at(&kube.deployment, "spec.template.metadata.annotations");
    assert_eq!(scalar(key(annotations, "prometheus.io/scrape")), "true");
    assert_eq!(
        scalar(key(annotations, "prometheus.io/port")),
        admin.port().to_string()
    );
    assert_eq!(scalar(key(annotations, "prometheus.io/path")), "/metrics");
    assert!(read("prometheus/scrape-config.yml").contains("regex: keyward;admin"));
    assert_eq!(text_at(kw, "restartPolicy"), "Always", "a native sidecar");
    assert_eq!(text_at(kw, "resources.limits.cpu"), "1");

    // The agent: the proxy on loopback, keyward's CA certificate and nothing else of keyward's.
    let proxy = policy.proxy.listen;
    assert!(proxy.ip().is_loopback(), "the proxy stays inside the pod");
    for var in ["HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy"] {
        let v = kube
            .env("agent", var)
            .unwrap_or_else(|| panic!("agent {var}"));
        assert_eq!(text_at(v, "value"), format!("http://{proxy}"), "{var}");
    }
    for var in ["SSL_CERT_FILE", "NODE_EXTRA_CA_CERTS", "REQUESTS_CA_BUNDLE"] {
        let path = PathBuf::from(text_at(kube.env("agent", var).unwrap(), "value"));
        let v = kube.volume_holding("agent", &path);
        assert_eq!(
            opt_text(v, "secret.secretName").as_deref(),
            Some("keyward-ca"),
            "{var}"
        );
        let keys: Vec<String> = items(v, "secret.items")
            .iter()
            .map(|i| text_at(i, "key"))
            .collect();
        assert_eq!(keys, [cert_name], "the agent gets the CA certificate only");
        assert_eq!(path.file_name().unwrap().to_str().unwrap(), cert_name);
    }
    for (dir, v) in kube.mounts("agent") {
        let secret = opt_text(v, "secret.secretName");
        assert!(
            secret.is_none() || secret.as_deref() == Some("keyward-ca"),
            "the agent mounts Secret {secret:?} at {}",
            dir.display()
        );
    }
    assert!(kube.env("agent", "KEYWARD_ADMIN_TOKEN").is_none());
    // No volume keyward mounts is mounted in the agent (the pod's fsGroup makes the agent a
    // member of keyward's group, so only this keeps keyward's files from it).
    let names = |c: &str| -> BTreeSet<String> {
        items(kube.container(c), "volumeMounts")
            .iter()
            .map(|m| text_at(m, "name"))
            .collect()
    };
    let shared: Vec<_> = names("agent")
        .intersection(&names("keyward"))
        .cloned()
        .collect();
    assert!(shared.is_empty(), "the agent mounts keyward's {shared:?}");
    // The agent runs as another user than keyward (the pod's).
    let keyward_uid = text_at(kube.pod(), "securityContext.runAsUser");
    let agent_uid = text_at(kube.container("agent"), "securityContext.runAsUser");
    assert_ne!(agent_uid, keyward_uid, "the agent runs as keyward's uid");
    assert_ne!(
        text_at(kube.container("agent"), "securityContext.runAsGroup"),
        text_at(kube.pod(), "securityContext.runAsGroup")
    );

    // Hardening on every container.
    assert_eq!(text_at(kube.pod(), "securityContext.runAsNonRoot"), "true");
    for name in ["keyward-ca", "keyward", "agent"] {
        let c = kube.container(name);
        assert_eq!(
            text_at(c, "securityContext.allowPrivilegeEscalation"),
            "false",
            "{name}"
        );
        assert_eq!(
            text_at(c, "securityContext.readOnlyRootFilesystem"),
            "true",
            "{name}"
        );
        assert_eq!(
            strings(c, "securityContext.capabilities.drop"),
            ["ALL"],
            "{name}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// keyward on the ConfigMap's policy, files stubbed

/// `keyward serve` on the ConfigMap's policy with its absolute paths moved into a temporary
/// directory, its listeners on loopback port 0 and the audit log in a file.
struct Served {
    child: tokio::process::Child,
    proxy: SocketAddr,
    admin: SocketAddr,
    admin_token: String,
    stderr: tokio::task::JoinHandle<Vec<String>>,
    _dir: tempfile::TempDir,
}

/// Replaces `from` (which must occur) by `to`.
fn rewrite(text: String, from: &str, to: &str) -> String {
    assert!(
        text.contains(from),
        "the ConfigMap's policy no longer contains `{from}`; update tests/deploy.rs"
    );
    text.replace(from, to)
}

async fn serve_deploy_policy() -> Served {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_str().unwrap().to_string();
    let mut text = Kube::load().policy_text();
    text = rewrite(text, "/var/run/keyward/ca/", &format!("{root}/ca/"));
    text = rewrite(
        text,
        "/var/run/secrets/keyward/",
        &format!("{root}/secrets/"),
    );
    text = rewrite(text, "listen: 127.0.0.1:8480", "listen: 127.0.0.1:0");
    text = rewrite(text, "listen: 0.0.0.0:8481", "listen: 127.0.0.1:0");
    text = rewrite(text, "path: \"-\"", "path: audit.jsonl");
    let policy = load_policy(&text, &dir.path().join("etc"));
    let config = dir.path().join("etc/policy.yaml");

    // The CA as the keyward-ca init container leaves it: key 0400.
    let ca_dir = policy.ca.key.parent().unwrap();
    let out = std::process::Command::new(BIN)
        .args(["ca", "init", "--dir", ca_dir.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(policy.ca.cert, ca_dir.join("ca.pem"));
    assert_eq!(policy.ca.key, ca_dir.join("ca-key.pem"));
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&policy.ca.key, std::fs::Permissions::from_mode(0o400)).unwrap();
    }
    // The Secret's files, as `kubectl create secret --from-file` leaves them (trailing newline).
    for (name, path) in file_sources(&policy) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        let value = format!("stub_{name}_{}\n", keyward::tasks::random_hex(8));
        std::fs::write(&path, value).unwrap();
    }

    let admin_token = format!("adm_{}", keyward::tasks::random_hex(16));
    let mut child = tokio::process::Command::new(BIN)
        .args(["serve", "--config", config.to_str().unwrap()])
        .env("KEYWARD_ADMIN_TOKEN", &admin_token)
        .env("KEYWARD_WORKERS", "1")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut log = Vec::new();
    let line = bounded("the listening line", async {
        while let Some(line) = lines.next_line().await.unwrap() {
            log.push(line.clone());
            if line.starts_with("keyward listening ") {
                return line;
            }
        }
        panic!(
            "keyward serve on the ConfigMap's policy exited before listening:\n{}",
            log.join("\n")
        );
    })
    .await;
    let stderr = tokio::spawn(async move {
        while let Ok(Some(line)) = lines.next_line().await {
            log.push(line);
        }
        log
    });
    let field = |key: &str| -> SocketAddr {
        line.split(' ')
            .find_map(|kv| kv.strip_prefix(&format!("{key}=")))
            .unwrap_or_else(|| panic!("no {key}= in {line:?}"))
            .parse()
            .unwrap()
    };
    Served {
        proxy: field("proxy"),
        admin: field("admin"),
        child,
        admin_token,
        stderr,
        _dir: dir,
    }
}

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(common::NET_TIMEOUT)
        .build()
        .unwrap()
}

/// (status, body) of an admin request.
async fn admin(
    s: &Served,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
) -> (u16, String) {
    let mut rb = http()
        .request(method, format!("http://{}{path}", s.admin))
        .bearer_auth(&s.admin_token);
    if let Some(b) = body {
        rb = rb.json(&b);
    }
    let resp = bounded("admin request", rb.send()).await.unwrap();
    let status = resp.status().as_u16();
    (status, bounded("admin body", resp.text()).await.unwrap())
}

/// keyward serving the ConfigMap's policy: ready, mints the README's task, reloads, drains on
/// SIGTERM within the Deployment's grace period. Returns its `/metrics` after some traffic.
async fn exercise_deploy_policy() -> String {
    let s = serve_deploy_policy().await;

    let (status, body) = admin(&s, reqwest::Method::GET, "/readyz", None).await;
    assert_eq!(status, 200, "/readyz: {body}");
    let (status, _) = admin(&s, reqwest::Method::GET, "/healthz", None).await;
    assert_eq!(status, 200);

    // The mint of deploy/README.md.
    let (status, body) = admin(
        &s,
        reqwest::Method::POST,
        "/v1/tasks",
        Some(serde_json::json!({
            "agent": "triage-bot",
            "intent": [{"capability": "github.issues.read", "where": {"owner": "acme", "repo": "web"}}],
            "ttl": "30m",
            "max_requests": 100,
        })),
    )
    .await;
    assert_eq!(status, 201, "mint: {body}");
    let minted: Value = serde_json::from_str(&body).unwrap();
    let url = minted["proxy_url"].as_str().unwrap();
    assert!(
        url.starts_with("http://") && url.ends_with(&format!("@{}", s.proxy)),
        "proxy_url {url}"
    );

    // An agent without a task token is refused before anything leaves the pod.
    let refused = common::raw_exchange(
        s.proxy,
        b"GET http://api.github.com/repos/acme/web/issues HTTP/1.1\r\nHost: api.github.com\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(refused.status, 407);

    // What deploy/README.md says to do after changing the ConfigMap.
    let (status, body) = admin(&s, reqwest::Method::POST, "/v1/reload", None).await;
    assert_eq!(status, 200, "reload: {body}");

    let resp = bounded(
        "metrics",
        http().get(format!("http://{}/metrics", s.admin)).send(),
    )
    .await
    .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let metrics = bounded("metrics body", resp.text()).await.unwrap();

    // SIGTERM: drain and exit 0, well within terminationGracePeriodSeconds.
    let grace: u64 = text_at(Kube::load().pod(), "terminationGracePeriodSeconds")
        .parse()
        .unwrap();
    let pid = s.child.id().unwrap().to_string();
    let started = std::time::Instant::now();
    assert!(std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let Served {
        mut child, stderr, ..
    } = s;
    let status = bounded("keyward exit after SIGTERM", child.wait())
        .await
        .unwrap();
    let log = bounded("stderr", stderr).await.unwrap().join("\n");
    assert_eq!(status.code(), Some(0), "after SIGTERM:\n{log}");
    assert!(started.elapsed().as_secs() < grace);
    metrics
}

// ---------------------------------------------------------------------------------------------
// Metric names, labels and label values

/// SPEC §8 and src/metrics.rs: family → (type, label names).
fn spec_families() -> BTreeMap<&'static str, (&'static str, &'static [&'static str])> {
    BTreeMap::from([
        (
            "keyward_decisions_total",
            (
                "counter",
                &["decision", "reason", "service", "capability", "agent"][..],
            ),
        ),
        (
            "keyward_request_duration_seconds",
            ("histogram", &["service"][..]),
        ),
        (
            "keyward_upstream_errors_total",
            ("counter", &["service", "kind"][..]),
        ),
        ("keyward_tasks_active", ("gauge", &["agent"][..])),
        ("keyward_connections_open", ("gauge", &["kind"][..])),
        ("keyward_tls_leaf_certs_issued_total", ("counter", &[][..])),
        ("keyward_policy_reloads_total", ("counter", &["result"][..])),
        // The two operational counters src/metrics.rs adds to SPEC §8.
        (
            "keyward_secrets_redacted_total",
            ("counter", &["service"][..]),
        ),
        ("keyward_audit_records_total", ("counter", &[][..])),
    ])
}

/// Labels Prometheus adds (job, instance) or deploy/prometheus/scrape-config.yml does.
const TARGET_LABELS: [&str; 6] = ["job", "instance", "namespace", "pod", "container", "app"];

fn reasons() -> BTreeSet<&'static str> {
    use keyward::reason::Reason::{self, *};
    let all = [
        Allowed,
        Passthrough,
        MissingCredentials,
        InvalidToken,
        TaskExpired,
        TaskRevoked,
        UnknownHost,
        RouteNotInIntent,
        MethodNotAllowed,
        ConstraintMismatch,
        AmbiguousRequest,
        HostMismatch,
        BlockedAddress,
        BudgetExhausted,
        ApprovalRequired,
        SecretEgress,
        CredentialUnavailable,
    ];
    // A new reason fails to compile here, so the list cannot fall behind.
    let _exhaustive = |r: Reason| match r {
        Allowed
        | Passthrough
        | MissingCredentials
        | InvalidToken
        | TaskExpired
        | TaskRevoked
        | UnknownHost
        | RouteNotInIntent
        | MethodNotAllowed
        | ConstraintMismatch
        | AmbiguousRequest
        | HostMismatch
        | BlockedAddress
        | BudgetExhausted
        | ApprovalRequired
        | SecretEgress
        | CredentialUnavailable => (),
    };
    all.iter().map(|r| r.as_str()).collect()
}

/// Allowed values of the closed-enum labels, per (family, label).
fn enum_values(family: &str, label: &str) -> Option<BTreeSet<&'static str>> {
    use keyward::reason::Decision;
    Some(match (family, label) {
        (_, "decision") => [Decision::Allow, Decision::Deny, Decision::Tunnel]
            .iter()
            .map(|d| d.as_str())
            .collect(),
        (_, "reason") => reasons(),
        ("keyward_connections_open", "kind") => keyward::metrics::ConnKind::ALL
            .iter()
            .map(|k| k.as_str())
            .collect(),
        // src/upstream.rs ConnectError::kind and src/proxy/{forward,handle}.rs.
        ("keyward_upstream_errors_total", "kind") => {
            BTreeSet::from(["dns", "connect", "tls", "timeout", "protocol"])
        }
        ("keyward_policy_reloads_total", "result") => BTreeSet::from(["ok", "error"]),
        _ => return None,
    })
}

/// What a real `/metrics` says: family → type (from `# TYPE`), and the label names seen on
/// its samples.
fn parse_exposition(text: &str) -> BTreeMap<String, (String, BTreeSet<String>)> {
    let mut out: BTreeMap<String, (String, BTreeSet<String>)> = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            out.entry(name.to_string()).or_default().0 = kind.to_string();
        }
    }
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let name_end = line.find(['{', ' ']).unwrap();
        let mut name = &line[..name_end];
        for suffix in ["_bucket", "_sum", "_count"] {
            if let Some(base) = name.strip_suffix(suffix) {
                if out.get(base).is_some_and(|(k, _)| k == "histogram") {
                    name = base;
                }
            }
        }
        let labels = &mut out
            .get_mut(name)
            .unwrap_or_else(|| panic!("sample of a family without # TYPE: {line}"))
            .1;
        if line[name_end..].starts_with('{') {
            let body = &line[name_end + 1..line.rfind('}').unwrap()];
            for (k, _, _) in matchers(body) {
                if k != "le" {
                    labels.insert(k);
                }
            }
        }
    }
    out
}

/// `a="x", b=~"y|z"` → [(a, "=", x), (b, "=~", "y|z")]. Values are Prometheus strings.
fn matchers(body: &str) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    let mut rest = body.trim();
    while !rest.is_empty() {
        let op_at = rest
            .find(['=', '!'])
            .unwrap_or_else(|| panic!("bad matcher `{rest}`"));
        let name = rest[..op_at].trim().to_string();
        let after = &rest[op_at..];
        let op = ["=~", "!~", "!=", "="]
            .into_iter()
            .find(|op| after.starts_with(op))
            .unwrap();
        let value_part = after[op.len()..].trim_start();
        let quote = value_part.chars().next().unwrap();
        assert!(quote == '"' || quote == '\'', "unquoted value in `{body}`");
        let mut end = 1;
        let bytes = value_part.as_bytes();
        while bytes[end] as char != quote {
            end += if bytes[end] == b'\\' { 2 } else { 1 };
        }
        out.push((name, op.to_string(), value_part[1..end].to_string()));
        rest = value_part[end + 1..].trim_start();
        rest = rest.strip_prefix(',').unwrap_or(rest).trim_start();
    }
    out
}

/// One use of a keyward metric in a rule or panel: the name as written and its selector.
struct Use {
    name: String,
    selector: Option<String>,
}

/// Every `keyward_*` metric written in `text`, with the `{...}` that follows it, if any.
fn uses(text: &str) -> Vec<Use> {
    let mut out = Vec::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(found) = text[i..].find("keyward_") {
        let start = i + found;
        let word = |b: u8| b.is_ascii_alphanumeric() || b == b'_' || b == b':';
        let mut end = start;
        while end < bytes.len() && word(bytes[end]) {
            end += 1;
        }
        i = end;
        // Part of a longer identifier (`x_keyward_y`), a path (`deploy/keyward_...`) or a
        // file name (`keyward.rules.yml` has no underscore, so it never gets here).
        if start > 0 && (word(bytes[start - 1]) || bytes[start - 1] == b'/') {
            continue;
        }
        let selector = (bytes.get(end) == Some(&b'{')).then(|| {
            let close = text[end..].find('}').unwrap() + end;
            i = close + 1;
            text[end + 1..close].to_string()
        });
        out.push(Use {
            name: text[start..end].to_string(),
            selector,
        });
    }
    out
}

/// Label names in `by (...)`, `without (...)`, `on (...)`, `ignoring (...)` clauses.
fn grouping_labels(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    for kw in ["by", "without", "on", "ignoring"] {
        let mut i = 0;
        while let Some(found) = text[i..].find(&format!("{kw} (")) {
            let start = i + found;
            i = start + kw.len() + 2;
            if start > 0 && text.as_bytes()[start - 1].is_ascii_alphanumeric() {
                continue;
            }
            let close = text[i..].find(')').unwrap() + i;
            out.extend(
                text[i..close]
                    .split(',')
                    .map(|l| l.trim().to_string())
                    .filter(|l| !l.is_empty()),
            );
        }
    }
    out
}

/// Every PromQL expression of the rules file and the dashboard, named for error messages.
fn expressions() -> Vec<(String, String)> {
    let mut out = Vec::new();
    let rules = yaml("prometheus/keyward.rules.yml");
    for group in items(&rules, "groups") {
        for rule in items(group, "rules") {
            let name = opt_text(rule, "alert")
                .or_else(|| opt_text(rule, "record"))
                .unwrap();
            out.push((format!("rule {name}"), text_at(rule, "expr")));
        }
    }
    let dash = dashboard();
    fn walk(v: &Value, title: &str, out: &mut Vec<(String, String)>) {
        match v {
            Value::Object(m) => {
                let title = m
                    .get("title")
                    .and_then(Value::as_str)
                    .or_else(|| m.get("name").and_then(Value::as_str))
                    .unwrap_or(title);
                for key in ["expr", "definition"] {
                    if let Some(e) = m.get(key).and_then(Value::as_str) {
                        out.push((format!("dashboard `{title}`"), e.to_string()));
                    }
                }
                if let Some(q) = m.get("query").and_then(|q| q.get("query")) {
                    out.push((
                        format!("dashboard variable `{title}`"),
                        q.as_str().unwrap().to_string(),
                    ));
                }
                for (_, child) in m {
                    walk(child, title, out);
                }
            }
            Value::Array(a) => a.iter().for_each(|c| walk(c, title, out)),
            _ => {}
        }
    }
    walk(&dash, "", &mut out);
    out
}

fn dashboard() -> Value {
    serde_json::from_str(&read("grafana/keyward-dashboard.json"))
        .unwrap_or_else(|e| panic!("deploy/grafana/keyward-dashboard.json is not JSON: {e}"))
}

/// Checks every metric name, label and closed-enum label value in `exprs` against `families`
/// (family → (type, labels)); returns the problems.
fn check_expressions(
    exprs: &[(String, String)],
    families: &BTreeMap<String, (String, BTreeSet<String>)>,
) -> Vec<String> {
    let mut problems = Vec::new();
    let all_labels: BTreeSet<String> = families
        .values()
        .flat_map(|(_, l)| l.iter().cloned())
        .chain(TARGET_LABELS.iter().map(|s| s.to_string()))
        .chain(["le".to_string()])
        .collect();
    for (origin, expr) in exprs {
        let found = uses(expr);
        for u in &found {
            let (family, histogram_series) = match families.get(&u.name) {
                Some((kind, _)) => (u.name.clone(), kind == "histogram"),
                None => {
                    let base = ["_bucket", "_sum", "_count"]
                        .iter()
                        .find_map(|s| u.name.strip_suffix(s))
                        .filter(|b| families.get(*b).is_some_and(|(k, _)| k == "histogram"));
                    match base {
                        Some(b) => (b.to_string(), false),
                        None => {
                            problems.push(format!("{origin}: no metric `{}`", u.name));
                            continue;
                        }
                    }
                }
            };
            if histogram_series {
                problems.push(format!(
                    "{origin}: `{}` is a histogram; use its _bucket, _sum or _count series",
                    u.name
                ));
            }
            let Some(sel) = &u.selector else { continue };
            let labels = &families[&family].1;
            for (label, op, value) in matchers(sel) {
                let known = labels.contains(&label)
                    || TARGET_LABELS.contains(&label.as_str())
                    || (label == "le" && u.name.ends_with("_bucket"));
                if !known {
                    problems.push(format!(
                        "{origin}: `{}` has no label `{label}` (it has {labels:?})",
                        u.name
                    ));
                    continue;
                }
                let Some(allowed) = enum_values(&family, &label) else {
                    continue;
                };
                if value.is_empty() || value.contains('$') || value.contains(".*") {
                    continue;
                }
                let alternatives: Vec<&str> = if op.ends_with('~') {
                    value.split('|').collect()
                } else {
                    vec![value.as_str()]
                };
                for a in alternatives {
                    if !allowed.contains(a) {
                        problems.push(format!(
                            "{origin}: {}{{{label}{op}\"{value}\"}}: `{a}` is not a value of `{label}` ({allowed:?})",
                            u.name
                        ));
                    }
                }
            }
        }
        if !found.is_empty() {
            for l in grouping_labels(expr) {
                if !all_labels.contains(&l) {
                    problems.push(format!("{origin}: grouping by unknown label `{l}`"));
                }
            }
        }
    }
    problems
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_and_dashboard_use_only_metrics_keyward_exports() {
    let metrics = exercise_deploy_policy().await;
    let exposed = parse_exposition(&metrics);

    // What /metrics exposes agrees with SPEC §8 / src/metrics.rs: every family with its type,
    // and no sample carries a label outside the family's set. (Families without samples yet
    // show their # TYPE only; their labels are SPEC §8's.)
    let spec = spec_families();
    let mut families: BTreeMap<String, (String, BTreeSet<String>)> = BTreeMap::new();
    for (name, (kind, labels)) in &spec {
        let (seen_kind, seen_labels) = exposed
            .get(*name)
            .unwrap_or_else(|| panic!("/metrics has no family {name}:\n{metrics}"));
        assert_eq!(seen_kind, kind, "{name}");
        let labels: BTreeSet<String> = labels.iter().map(|s| s.to_string()).collect();
        assert!(
            seen_labels.is_subset(&labels),
            "{name}: /metrics shows labels {seen_labels:?}, SPEC §8 says {labels:?}"
        );
        families.insert(name.to_string(), (kind.to_string(), labels));
    }
    for name in exposed.keys().filter(|n| n.starts_with("keyward_")) {
        assert!(
            spec.contains_key(name.as_str()),
            "/metrics has {name}, which tests/deploy.rs does not know: add it to spec_families()"
        );
    }
    // The traffic above produced samples with the labels the rules and panels select on.
    for series in [
        "keyward_decisions_total{agent=\"\",capability=\"\",decision=\"deny\",reason=\"missing_credentials\",service=\"\"} 1",
        "keyward_policy_reloads_total{result=\"ok\"} 1",
        "keyward_policy_reloads_total{result=\"error\"} 0",
        "keyward_tasks_active{agent=\"triage-bot\"} 1",
        "keyward_connections_open{kind=\"intercepted\"} 0",
        "keyward_tls_leaf_certs_issued_total 0",
    ] {
        assert!(
            metrics.lines().any(|l| l == series),
            "no `{series}` in /metrics:\n{metrics}"
        );
    }

    let exprs = expressions();
    assert!(exprs.len() > 20, "found only {} expressions", exprs.len());
    let problems = check_expressions(&exprs, &families);
    assert!(problems.is_empty(), "{}", problems.join("\n"));

    // Every family of SPEC §8 is on the dashboard; the alerts cover the ones the brief names.
    let dash_text = exprs
        .iter()
        .filter(|(o, _)| o.starts_with("dashboard"))
        .map(|(_, e)| e.as_str())
        .collect::<Vec<_>>()
        .join("\n");
    for name in spec.keys() {
        assert!(dash_text.contains(name), "the dashboard never shows {name}");
    }
    let rules_text = read("prometheus/keyward.rules.yml");
    for needle in [
        "reason=\"secret_egress\"",
        "reason=\"blocked_address\"",
        "reason=\"host_mismatch\"",
        "reason=\"ambiguous_request\"",
        "reason=\"credential_unavailable\"",
        "keyward_upstream_errors_total",
        "keyward_policy_reloads_total{result=\"error\"}",
        "keyward_request_duration_seconds_bucket",
        "up{job=\"keyward\"}",
    ] {
        assert!(rules_text.contains(needle), "no alert uses {needle}");
    }
}

/// The checker itself catches the mistakes it exists for.
#[test]
fn the_metric_checker_catches_typos() {
    let families: BTreeMap<String, (String, BTreeSet<String>)> = spec_families()
        .into_iter()
        .map(|(n, (k, l))| {
            (
                n.to_string(),
                (k.to_string(), l.iter().map(|s| s.to_string()).collect()),
            )
        })
        .collect();
    let bad = [
        "rate(keyward_decision_total[5m])",
        "keyward_decisions_total{reason=\"secret_exfil\"}",
        "keyward_decisions_total{result=\"ok\"}",
        "keyward_upstream_errors_total{kind=~\"dns|refused\"}",
        "keyward_connections_open{kind=\"tls\"}",
        "histogram_quantile(0.9, rate(keyward_request_duration_seconds[5m]))",
        "sum by (tenant) (keyward_tasks_active)",
    ];
    for expr in bad {
        let problems = check_expressions(&[("t".into(), expr.into())], &families);
        assert!(!problems.is_empty(), "not caught: {expr}");
    }
    let good = [
        "sum by (namespace, pod, le) (rate(keyward_request_duration_seconds_bucket{service=~\"$service\"}[5m]))",
        "keyward_decisions_total{decision=\"deny\", reason=~\"host_mismatch|blocked_address\", agent!=\"\"}",
        "keyward_policy_reloads_total{result=\"error\"} unless on (namespace, pod) keyward_connections_open{kind=\"http\"}",
    ];
    for expr in good {
        let problems = check_expressions(&[("t".into(), expr.into())], &families);
        assert!(problems.is_empty(), "{expr}: {problems:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// Grafana

#[test]
fn dashboard_is_valid_json_with_a_datasource_variable() {
    let dash = dashboard();
    assert!(dash["title"].is_string() && dash["uid"].is_string());
    let vars = dash["templating"]["list"].as_array().unwrap();
    let ds = vars
        .iter()
        .find(|v| v["type"] == "datasource")
        .expect("a data source template variable");
    assert_eq!(ds["query"], "prometheus");
    let ds_ref = format!("${{{}}}", ds["name"].as_str().unwrap());
    let defined: BTreeSet<&str> = vars.iter().map(|v| v["name"].as_str().unwrap()).collect();

    let mut ids = BTreeSet::new();
    let panels = dash["panels"].as_array().unwrap();
    assert!(!panels.is_empty());
    for p in panels {
        let title = p["title"].as_str().unwrap();
        assert!(
            ids.insert(p["id"].as_u64().unwrap()),
            "duplicate id: {title}"
        );
        for k in ["h", "w", "x", "y"] {
            assert!(p["gridPos"][k].is_u64(), "{title}: gridPos.{k}");
        }
        if p["type"] == "row" {
            continue;
        }
        assert_eq!(p["datasource"]["uid"], ds_ref.as_str(), "{title}");
        let targets = p["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "{title} has no query");
        for t in targets {
            assert_eq!(t["datasource"]["uid"], ds_ref.as_str(), "{title}");
            let expr = t["expr"].as_str().unwrap();
            // Every $variable is defined (Grafana's own $__ variables aside).
            for (i, _) in expr.match_indices('$') {
                let name: String = expr[i + 1..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                assert!(
                    name.starts_with("__") || defined.contains(name.as_str()),
                    "{title}: ${name} is not a template variable"
                );
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// promtool, when installed

#[test]
fn promtool_accepts_the_rules_and_their_tests() {
    let Ok(version) = std::process::Command::new("promtool")
        .arg("--version")
        .output()
    else {
        eprintln!("promtool is not installed; skipping `promtool check rules` / `test rules`");
        return;
    };
    assert!(version.status.success());
    for args in [
        ["check", "rules", "keyward.rules.yml"],
        ["test", "rules", "keyward.rules.test.yml"],
    ] {
        let out = std::process::Command::new("promtool")
            .args(args)
            .current_dir(deploy("prometheus"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "promtool {args:?}:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// The dashboard's range counts see a series' first event: a pod's first (often only)
/// `secret_egress` appears as a series at 1, which `increase()` alone reads as no increase
/// (the stat read 0 while the alert fired). Checked by promtool on the panels' own
/// expressions, as recording rules over a one-hour range.
#[test]
fn dashboard_range_counts_see_a_series_first_event() {
    if std::process::Command::new("promtool")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("promtool is not installed; skipping the dashboard's range counts");
        return;
    }
    let dash = dashboard();
    let expr_of = |title: &str| -> String {
        let panel = dash["panels"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["title"] == title)
            .unwrap_or_else(|| panic!("no panel `{title}`"));
        panel["targets"][0]["expr"]
            .as_str()
            .unwrap()
            .replace("$namespace", ".*")
            .replace("$pod", ".*")
            .replace("$agent", ".*")
            .replace("$__range", "1h")
    };
    let rules = serde_json::json!({"groups": [{"name": "dashboard", "rules": [
        {"record": "dash:secret_egress", "expr": expr_of("secret_egress (range)")},
        {"record": "dash:top_denied", "expr": expr_of("Top denied capabilities (range)")},
    ]}]});
    let series = |labels: &str, values: &str| {
        serde_json::json!({
            "series": format!("keyward_decisions_total{{namespace=\"agents\",pod=\"p1\",decision=\"deny\",service=\"github\",agent=\"bot\",{labels}}}"),
            "values": values,
        })
    };
    let tests = serde_json::json!({
        "rule_files": ["dashboard.rules.yml"],
        "evaluation_interval": "1m",
        "tests": [{
            "interval": "1m",
            "input_series": [
                // One secret_egress at 30m, on a series that did not exist before.
                series("reason=\"secret_egress\",capability=\"\"", "_x29 1x100"),
                // A denial a minute since the start.
                series("reason=\"method_not_allowed\",capability=\"github.issues.read\"", "0+1x130"),
            ],
            "promql_expr_test": [
                {"expr": "dash:secret_egress", "eval_time": "60m",
                 "exp_samples": [{"labels": "dash:secret_egress", "value": 1}]},
                // An hour later it is out of the range.
                {"expr": "dash:secret_egress", "eval_time": "100m",
                 "exp_samples": [{"labels": "dash:secret_egress", "value": 0}]},
                {"expr": "dash:top_denied", "eval_time": "60m", "exp_samples": [
                    {"labels": "dash:top_denied{agent=\"bot\",capability=\"\",reason=\"secret_egress\"}", "value": 1},
                    {"labels": "dash:top_denied{agent=\"bot\",capability=\"github.issues.read\",reason=\"method_not_allowed\"}", "value": 60},
                ]},
            ],
        }],
    });
    let dir = tempfile::tempdir().unwrap();
    // (JSON is YAML.)
    std::fs::write(dir.path().join("dashboard.rules.yml"), rules.to_string()).unwrap();
    std::fs::write(dir.path().join("dashboard.test.yml"), tests.to_string()).unwrap();
    let out = std::process::Command::new("promtool")
        .args(["test", "rules", "dashboard.test.yml"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "promtool test rules:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

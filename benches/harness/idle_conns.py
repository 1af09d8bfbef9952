#!/usr/bin/env python3
"""Memory held by idle intercepted connections (issue 4: < 64 MiB RSS with 2,000 of them).

Starts `keyward serve` (release build) on a generated loopback-only policy, mints a task, then
opens N connections that each CONNECT to an intercepted host, finish the TLS handshake with
keyward's leaf and stay idle. Prints keyward's RSS before and after, and per connection.
Without `request` nothing is sent inside the tunnels. With `request` each tunnel first carries
one allowed request to an HTTPS upstream this script runs (its certificate made with `openssl`),
as an agent's connection between two requests is; `h2` does the same over HTTP/2 (ALPN `h2`,
with the `h2` Python package). Everything stops by itself.

    python3 benches/harness/idle_conns.py [N] [request|h2]   (default 2000; raises its own open-files limit)
"""
import asyncio
import base64
import json
import os
import re
import resource
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.environ.get("KEYWARD_BIN", os.path.join(ROOT, "target", "release", "keyward"))
N = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
REQUEST = len(sys.argv) > 2 and sys.argv[2] in ("request", "h2")
H2 = len(sys.argv) > 2 and sys.argv[2] == "h2"
TOKEN = "idle-bench-admin-token"

POLICY = """
proxy: {{ listen: 127.0.0.1:0, max_connections: {max_conns}, max_task_connections: {max_conns}, max_agent_connections: {max_conns}, idle_timeout: 10m }}
admin: {{ listen: 127.0.0.1:0, token: env:KEYWARD_ADMIN_TOKEN }}
ca: {{ cert: {d}/ca.pem, key: {d}/ca-key.pem }}
audit: {{ path: {d}/audit.jsonl }}
credentials:
  key: {{ source: env:IDLE_BENCH_KEY }}
services:
  api:
    hosts: [api.idle.test]
    connect_to: 127.0.0.1:{upstream_port}
    tls: {{ ca_file: {d}/upstream-ca.pem }}
    inject: {{ header: Authorization, value: "Bearer ${{credential}}", credential: key }}
capabilities:
  api.read: {{ service: api, risk: low, routes: [GET /x] }}
agents:
  bench: {{ owner: bench, capabilities: [api.read], max_ttl: 1h }}
"""


def upstream_certificate(d):
    """A CA and a leaf for api.idle.test signed by it, in `d`."""
    def openssl(*args):
        subprocess.run(["openssl", *args], check=True, capture_output=True)
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", f"{d}/upstream-ca.key", "-out", f"{d}/upstream-ca.pem", "-days", "1",
            "-subj", "/CN=idle bench upstream CA")
    openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", f"{d}/upstream.key", "-out", f"{d}/upstream.csr", "-subj", "/CN=api.idle.test")
    with open(f"{d}/upstream.ext", "w") as f:
        f.write("subjectAltName=DNS:api.idle.test\nbasicConstraints=CA:FALSE\n")
    openssl("x509", "-req", "-in", f"{d}/upstream.csr", "-CA", f"{d}/upstream-ca.pem",
            "-CAkey", f"{d}/upstream-ca.key", "-CAcreateserial", "-out", f"{d}/upstream.pem",
            "-days", "1", "-extfile", f"{d}/upstream.ext")


def start_upstream(d):
    """An HTTPS upstream on loopback answering every request `200 ok`, in a daemon thread;
    returns its port."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(f"{d}/upstream.pem", f"{d}/upstream.key")
    ready = threading.Event()
    port = []

    async def answer(reader, writer):
        try:
            while True:
                await reader.readuntil(b"\r\n\r\n")
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    async def serve():
        server = await asyncio.start_server(answer, "127.0.0.1", 0, ssl=ctx, backlog=4096)
        port.append(server.sockets[0].getsockname()[1])
        ready.set()
        await asyncio.Event().wait()

    threading.Thread(target=lambda: asyncio.run(serve()), daemon=True).start()
    if not ready.wait(10):
        sys.exit("the upstream did not start")
    return port[0]


def read_head(sock, size, what):
    """Reads `sock` `size` bytes at a time up to the end of a response head; returns all read."""
    answer = b""
    while b"\r\n\r\n" not in answer:
        chunk = sock.recv(size)
        if not chunk:
            sys.exit(f"{what}: closed before the answer's head: {answer!r}")
        answer += chunk
    return answer


def read_answer(tls):
    """One HTTP/1.1 response (Content-Length or chunked) from `tls`; returns its head."""
    head, body = read_head(tls, 4096, "the request").split(b"\r\n\r\n", 1)
    length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
    done = (lambda b: len(b) >= int(length.group(1))) if length else (lambda b: b.endswith(b"0\r\n\r\n"))
    while not done(body):
        chunk = tls.recv(4096)
        if not chunk:
            sys.exit(f"closed during the body: {answer!r}")
        body += chunk
    return head


def h2_get(tls, i):
    """One HTTP/2 GET /x on `tls` (ALPN h2), read to its end; the connection stays open."""
    import h2.connection
    import h2.events
    if tls.selected_alpn_protocol() != "h2":
        sys.exit(f"connection {i}: ALPN chose {tls.selected_alpn_protocol()!r}")
    conn = h2.connection.H2Connection()
    conn.initiate_connection()
    conn.send_headers(1, [(":method", "GET"), (":scheme", "https"), (":authority", "api.idle.test"),
                          (":path", "/x")], end_stream=True)
    tls.sendall(conn.data_to_send())
    status = None
    while True:
        data = tls.recv(65536)
        if not data:
            sys.exit(f"connection {i}: closed during the HTTP/2 answer")
        for event in conn.receive_data(data):
            if isinstance(event, h2.events.ResponseReceived):
                status = dict(event.headers).get(b":status")
            if isinstance(event, h2.events.DataReceived):
                conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            if isinstance(event, h2.events.StreamEnded):
                tls.sendall(conn.data_to_send())
                if status != b"200":
                    sys.exit(f"connection {i}: HTTP/2 status {status!r}")
                return
        tls.sendall(conn.data_to_send())


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1))


def main():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, 4 * N + 1024)), hard))
    d = tempfile.mkdtemp(prefix="keyward-idle.")
    upstream_certificate(d)
    upstream_port = start_upstream(d) if REQUEST else 9  # never dialled without `request`
    with open(f"{d}/policy.yaml", "w") as f:
        f.write(POLICY.format(d=d, max_conns=N + 100, upstream_port=upstream_port))
    env = dict(os.environ, KEYWARD_ADMIN_TOKEN=TOKEN, IDLE_BENCH_KEY="sk-idle-" + os.urandom(8).hex(),
               RUST_LOG="warn")
    kw = subprocess.Popen([BIN, "serve", "--config", f"{d}/policy.yaml"], env=env,
                          stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(20):  # warnings (the open-files limit, say) may come first
            line = kw.stderr.readline()
            m = re.search(r"proxy=(\S+) admin=(\S+) ca=(\S+)", line)
            if m:
                break
        if not m:
            sys.exit(f"keyward did not start: {line}")
        proxy, admin, ca = m.group(1), m.group(2), m.group(3)
        req = urllib.request.Request(
            f"http://{admin}/v1/tasks", method="POST",
            data=json.dumps({"agent": "bench", "intent": ["api.read"], "ttl": "1h"}).encode(),
            headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
        minted = json.load(urllib.request.urlopen(req, timeout=10))
        auth = base64.b64encode(f"{minted['task']}:{minted['token']}".encode()).decode()
        host, port = proxy.rsplit(":", 1)
        ctx = ssl.create_default_context(cafile=ca)
        if H2:
            ctx.set_alpn_protocols(["h2"])
        time.sleep(0.5)
        before = rss_kib(kw.pid)
        conns = []
        start = time.time()
        for i in range(N):
            s = socket.create_connection((host, int(port)), timeout=10)
            s.sendall(f"CONNECT api.idle.test:443 HTTP/1.1\r\nHost: api.idle.test:443\r\n"
                      f"Proxy-Authorization: Basic {auth}\r\n\r\n".encode())
            # One byte at a time: what follows the head is keyward's TLS, read by `ssl`.
            head = read_head(s, 1, f"connection {i}: the CONNECT")
            if not head.startswith(b"HTTP/1.1 200"):
                sys.exit(f"connection {i}: {head!r}")
            tls = ctx.wrap_socket(s, server_hostname="api.idle.test")
            if REQUEST:
                if H2:
                    h2_get(tls, i)
                else:
                    tls.sendall(b"GET /x HTTP/1.1\r\nHost: api.idle.test\r\n\r\n")
                    head = read_answer(tls)
                    if not head.startswith(b"HTTP/1.1 200"):
                        sys.exit(f"connection {i}: {head[:80]!r}")
            conns.append(tls)
        took = time.time() - start
        time.sleep(1.0)
        after = rss_kib(kw.pid)
        what = "CONNECT + TLS 1.3 handshake" + (" + one allowed request" if REQUEST else "") + (" over HTTP/2" if H2 else "")
        print(f"{N} idle intercepted connections ({what} each, {took:.1f} s to open)")
        print(f"keyward RSS: {before / 1024:.1f} MiB before, {after / 1024:.1f} MiB after, "
              f"{(after - before) / N:.1f} KiB per connection")
        for c in conns:
            c.close()
    finally:
        kw.terminate()
        try:
            kw.wait(timeout=15)
        except subprocess.TimeoutExpired:
            kw.kill()


if __name__ == "__main__":
    main()

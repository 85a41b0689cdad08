#!/usr/bin/python3
"""http.c against real HTTPS servers on 127.0.0.1, through tests/http-fetch.

Servers: nginx-light (Range, an access log that records each request's Range
header, a throttled location to kill a download midway, a location that
ignores Range) and a small TLS server in this file that misbehaves on
purpose (cuts the body, expires the URL, stalls, sends too much). Both use a
CA made here with the openssl CLI, passed to http-fetch as --ca-file.
Wanted ranges (test_ranges_*) meet nginx serving multipart/byteranges, nginx
serving one range per request (max_ranges 1) or none, the stand-in's S3
(tests/standin/httpsd.py: one range per GET, presigned URLs), and a server
in this file answering several ranges the ways servers get it wrong.

Run: /usr/bin/python3 tests/standin/tap.py tests/integration/test_http_fetch.py
(OTAD_BUILD_ROOT names the meson build directory; OTAD_BENCH_MIB (default 32) sizes
the throughput comparison with curl, 0 skips it.)
"""

import hashlib
import http.server
import os
import re
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import unittest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "standin"))

import httpsd  # noqa: E402
import record as record_mod  # noqa: E402
import wanted_ranges  # noqa: E402

BUILD = os.environ.get("OTAD_BUILD_ROOT", os.path.join(os.path.dirname(__file__), "../../build"))
FETCH = os.path.join(BUILD, "tests", "http-fetch")
MIB = 1 << 20


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def openssl(args, cwd):
    subprocess.run(["openssl"] + args, cwd=cwd, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def make_pki(d):
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    openssl(["req", "-x509"] + ec + ["-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
             "-subj", "/CN=http-test-CA", "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign"], d)
    openssl(["req"] + ec + ["-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost"], d)
    with open(os.path.join(d, "server.ext"), "w") as f:
        f.write("subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
    openssl(["x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
             "-CAcreateserial", "-days", "2", "-extfile", "server.ext", "-out", "server.crt"], d)
    # A second, unrelated CA: a client trusting only it must refuse the server.
    openssl(["req", "-x509"] + ec + ["-keyout", "other.key", "-out", "other-ca.crt", "-days", "2",
             "-subj", "/CN=other-CA"], d)
    for name in ("server.key", "server.crt"):
        os.chmod(os.path.join(d, name), 0o644)


NGINX_CONF = """
daemon off;
worker_processes 1;
pid {p}/nginx.pid;
error_log {p}/error.log warn;
events {{ worker_connections 64; }}
http {{
    types {{ application/octet-stream bin; }}
    default_type application/octet-stream;
    sendfile on;
    client_body_temp_path {p}/tmp/body;
    proxy_temp_path {p}/tmp/proxy;
    fastcgi_temp_path {p}/tmp/fastcgi;
    uwsgi_temp_path {p}/tmp/uwsgi;
    scgi_temp_path {p}/tmp/scgi;
    # The query string (a presigned URL's credential) stays out of the log.
    log_format ranges '$uri "$http_range" $status $body_bytes_sent';
    access_log {p}/access.log ranges;
    # Which connection served each request, for the one-connection checks.
    log_format conns '$uri "$http_range" $status $body_bytes_sent $connection';
    access_log {p}/conn.log conns;
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {p}/server.crt;
        ssl_certificate_key {p}/server.key;
        ssl_protocols TLSv1.2 TLSv1.3;
        location /files/ {{ alias {p}/www/; }}
        location /slow/ {{ alias {p}/www/; limit_rate 6m; }}
        location /norange/ {{ alias {p}/www/; max_ranges 0; }}
        location /onerange/ {{ alias {p}/www/; max_ranges 1; }}
    }}
}}
"""


def boot_id():
    """The running boot, as http.c writes it into its records."""
    with open("/proc/sys/kernel/random/boot_id") as f:
        return f.read().strip().replace("-", "")


class Nginx:
    def __init__(self, d):
        self.dir = d
        self.port = free_port()
        os.makedirs(os.path.join(d, "www"))
        os.makedirs(os.path.join(d, "tmp"))
        with open(os.path.join(d, "nginx.conf"), "w") as f:
            f.write(NGINX_CONF.format(p=d, port=self.port))
        self.proc = subprocess.Popen(["nginx", "-p", d, "-c", os.path.join(d, "nginx.conf")],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError("nginx did not start: %s" % open(os.path.join(d, "error.log")).read())

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def add(self, name, data):
        path = os.path.join(self.dir, "www", name)
        with open(path, "wb") as f:
            f.write(data)
        os.chmod(path, 0o644)
        return path

    def url(self, location, name):
        # Query strings like a presigned URL's: the server ignores them.
        return "https://127.0.0.1:%d/%s/%s?X-Amz-Signature=%s" % (
            self.port, location, name, secrets.token_hex(16))

    def plain_url(self, location, name):
        """A URL with a token that is not S3's presigned form: http.c may
        ask this server for several ranges per request."""
        return "https://127.0.0.1:%d/%s/%s?token=%s" % (self.port, location, name, secrets.token_hex(16))

    def conn_log(self, name):
        """[(range header or None, status, bytes sent, connection serial)]."""
        out = []
        with open(os.path.join(self.dir, "conn.log")) as f:
            for line in f:
                m = re.match(r'^(\S+) "([^"]*)" (\d+) (\d+) (\d+)$', line.strip())
                if m and m.group(1).endswith("/" + name):
                    out.append((None if m.group(2) == "-" else m.group(2), int(m.group(3)), int(m.group(4)),
                                int(m.group(5))))
        return out

    def log(self, name):
        """[(range header or None, status, bytes sent)] for one file."""
        out = []
        with open(os.path.join(self.dir, "access.log")) as f:
            for line in f:
                m = re.match(r'^(\S+) "([^"]*)" (\d+) (\d+)$', line.strip())
                if m and m.group(1).endswith("/" + name):
                    out.append((None if m.group(2) == "-" else m.group(2),
                                int(m.group(3)), int(m.group(4))))
        return out


class FaultyServer:
    """A TLS HTTP/1.1 server serving one file with a scripted fault per
    request. script: list of modes used in order, the last one repeating:
      "ok"      honour Range like S3
      "cut:N"   send headers for the whole range, N body bytes, then drop the
                connection, and expire the URL token in use
      "stall"   send headers and 1 KiB, then nothing for a long time
      "long"    200 without Content-Length, filesize + 4096 bytes, then close
      "403"     refuse like an expired presigned URL
    Tokens: only URLs from url() issued after the last expiry are valid."""

    def __init__(self, certdir, data, script):
        self.data = data
        self.script = list(script)
        self.log = []            # (token, range, status, bytes)
        self.valid = set()
        self.stop_event = threading.Event()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                path, _, query = self.path.partition("?")
                token = dict(p.split("=", 1) for p in query.split("&") if "=" in p).get("t")
                rng = self.headers.get("Range")
                with lock:
                    mode = server.script.pop(0) if len(server.script) > 1 else server.script[0]
                if mode == "403" or token not in server.valid:
                    body = b"<Error><Code>AccessDenied</Code><Message>Request has expired</Message></Error>"
                    self.send_response(403)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    server.log.append((token, rng, 403, 0))
                    return
                size = len(server.data)
                start = 0
                m = re.match(r"^bytes=(\d+)-$", rng or "")
                if m:
                    start = int(m.group(1))
                if start >= size:
                    self.send_response(416)
                    self.send_header("Content-Range", "bytes */%d" % size)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    server.log.append((token, rng, 416, 0))
                    return
                if mode == "long":
                    self.send_response(200)
                    self.send_header("Connection", "close")
                    self.end_headers()
                    payload = server.data + b"x" * 4096
                    self.wfile.write(payload)
                    self.close_connection = True
                    server.log.append((token, rng, 200, len(payload)))
                    return
                self.send_response(206 if m else 200)
                self.send_header("Content-Length", str(size - start))
                if m:
                    self.send_header("Content-Range", "bytes %d-%d/%d" % (start, size - 1, size))
                self.end_headers()
                body = server.data[start:]
                if mode.startswith("cut:"):
                    n = int(mode[4:])
                    self.wfile.write(body[:n])
                    self.wfile.flush()
                    server.valid.discard(token)       # the URL expires now
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    server.log.append((token, rng, 206, n))
                    return
                if mode == "stall":
                    self.wfile.write(body[:1024])
                    self.wfile.flush()
                    server.stop_event.wait(60)
                    self.close_connection = True
                    server.log.append((token, rng, 206, 1024))
                    return
                self.wfile.write(body)
                server.log.append((token, rng, 206 if m else 200, len(body)))

        lock = threading.Lock()
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(os.path.join(certdir, "server.crt"), os.path.join(certdir, "server.key"))
        self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self):
        token = secrets.token_hex(8)
        self.valid.add(token)
        return "https://localhost:%d/bucket/image.bin?X-Amz-Expires=60&t=%s" % (self.port, token)

    def stop(self):
        self.stop_event.set()
        self.httpd.shutdown()
        self.httpd.server_close()


class RangesServer:
    """A TLS HTTP/1.1 server of one file for requests of several ranges, with
    one behaviour per request from script (the last one repeating):
      "multipart"  as RFC 9110 says: multipart/byteranges, one part per range
      "first"      a plain 206 of the first range only (reported of S3)
      "fewer"      multipart with every other range left out (a hole)
      "one-part"   multipart holding the first range only
      "reverse"    multipart with the parts in reverse order
      "coalesce"   one part from the first range's start to the last one's end
      "garbage"    206 multipart/byteranges whose parts have no Content-Range
      "cut:N"      the answer "multipart" gives, cut after N body bytes; the
                   URL in use expires
      "403"        refuse like an expired presigned URL
    A request for one range always gets a plain 206 (or its cut). Only URLs
    from url() issued since the last expiry are valid.
    log: (token, range header, status, body bytes, connection serial), made
    before the body is sent (a client may hang up on a body it refuses)."""

    BOUNDARY = "3d6b6a416f9b5"

    def __init__(self, certdir, data, script):
        self.data = data
        self.script = list(script)
        self.log = []
        self.valid = set()
        self.connections = 0
        server = self
        lock = threading.Lock()

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self):
                super().setup()
                with lock:
                    server.connections += 1
                    self.serial = server.connections

            def log_message(self, *args):
                pass

            def do_GET(self):
                path, _, query = self.path.partition("?")
                token = dict(p.split("=", 1) for p in query.split("&") if "=" in p).get("t")
                rng = self.headers.get("Range") or ""
                with lock:
                    mode = server.script.pop(0) if len(server.script) > 1 else server.script[0]
                if mode == "403" or token not in server.valid:
                    body = b"<Error><Code>AccessDenied</Code><Message>Request has expired</Message></Error>"
                    self.send_response(403)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    server.log.append((token, rng, 403, 0, self.serial))
                    return
                spans = [(int(a), int(b) + 1) for a, b in re.findall(r"(\d+)-(\d+)", rng)]
                status, headers, body = server.answer(mode, spans)
                cut = int(mode[4:]) if mode.startswith("cut:") else None
                server.log.append((token, rng, status, len(body) if cut is None else cut, self.serial))
                self.send_response(status)
                for h in headers:
                    self.send_header(*h)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                try:
                    if cut is not None:
                        self.wfile.write(body[:cut])
                        self.wfile.flush()
                        server.valid.discard(token)
                        self.close_connection = True
                        self.connection.shutdown(socket.SHUT_RDWR)
                        return
                    self.wfile.write(body)
                except OSError:
                    self.close_connection = True  # the client stopped reading

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(os.path.join(certdir, "server.crt"), os.path.join(certdir, "server.key"))
        self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def multipart(self, parts):
        size = len(self.data)
        out = b""
        for a, b in parts:
            out += ("\r\n--%s\r\nContent-Type: application/octet-stream\r\nContent-Range: bytes %d-%d/%d\r\n\r\n"
                    % (self.BOUNDARY, a, b - 1, size)).encode() + self.data[a:b]
        return out + ("\r\n--%s--\r\n" % self.BOUNDARY).encode()

    def answer(self, mode, spans):
        size = len(self.data)
        ctype = ("Content-Type", "multipart/byteranges; boundary=%s" % self.BOUNDARY)
        if not spans:
            return 200, [], self.data
        if len(spans) == 1 or mode == "first":
            a, b = spans[0]
            return 206, [("Content-Range", "bytes %d-%d/%d" % (a, b - 1, size))], self.data[a:b]
        if mode == "fewer":
            return 206, [ctype], self.multipart(spans[::2])
        if mode == "one-part":
            return 206, [ctype], self.multipart(spans[:1])
        if mode == "reverse":
            return 206, [ctype], self.multipart(spans[::-1])
        if mode == "coalesce":
            return 206, [ctype], self.multipart([(spans[0][0], spans[-1][1])])
        if mode == "garbage":
            body = self.multipart(spans).replace(b"Content-Range:", b"X-Range:")
            return 206, [ctype], body
        return 206, [ctype], self.multipart(spans)

    def url(self):
        token = secrets.token_hex(8)
        self.valid.add(token)
        return "https://localhost:%d/bucket/image.bin?t=%s" % (self.port, token)

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def parse_result(line):
    out = {}
    for m in re.finditer(r"(\w+)=(\S*)", line.split(" reason=")[0]):
        out[m.group(1)] = m.group(2)
    out["reason"] = line.split(" reason=", 1)[1] if " reason=" in line else ""
    return out


class HttpFetchTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        if not os.access(FETCH, os.X_OK):
            raise unittest.SkipTest("no %s (build first)" % FETCH)
        cls.dir = tempfile.mkdtemp(prefix="otad-http-")
        os.chmod(cls.dir, 0o755)
        make_pki(cls.dir)
        cls.ca = os.path.join(cls.dir, "ca.crt")
        ngdir = os.path.join(cls.dir, "nginx")
        os.makedirs(ngdir)
        os.chmod(ngdir, 0o755)
        for name in ("server.crt", "server.key"):
            shutil.copy(os.path.join(cls.dir, name), ngdir)
        cls.nginx = Nginx(ngdir)
        cls.servers = []

    @classmethod
    def tearDownClass(cls):
        cls.nginx.stop()
        shutil.rmtree(cls.dir, ignore_errors=True)

    def setUp(self):
        self.work = tempfile.mkdtemp(dir=self.dir)
        self.out = os.path.join(self.work, "out.bin")
        self.state = os.path.join(self.work, "progress")
        self.servers = []

    def tearDown(self):
        for s in self.servers:
            s.stop()

    def faulty(self, data, script):
        s = FaultyServer(self.dir, data, script)
        self.servers.append(s)
        return s

    def fetch_args(self, url, size, *extra, ca=None):
        return [FETCH, "--url", url, "--output", self.out, "--size", str(size), "--state", self.state,
                "--job-id", "AFR_OTA-http-test", "--signature", "MEQCIF2Q==",
                "--ca-file", ca or self.ca] + list(extra)

    def fetch(self, url, size, *extra, fresh_urls=None, ca=None, timeout=120):
        """Runs http-fetch to the end; answers "need-url" from fresh_urls()."""
        p = subprocess.Popen(self.fetch_args(url, size, *extra, ca=ca), stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        result, asked = None, 0
        deadline = time.monotonic() + timeout
        try:
            for line in p.stdout:
                if line.startswith("need-url"):
                    asked += 1
                    p.stdin.write((fresh_urls() if fresh_urls else "") + "\n")
                    p.stdin.flush()
                elif line.startswith("result="):
                    result = parse_result(line)
                if time.monotonic() > deadline:
                    break
            p.wait(max(1, deadline - time.monotonic()))
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
        err = p.stderr.read()
        self.assertIsNotNone(result, "http-fetch printed no result; stderr:\n" + err)
        result["rc"] = p.returncode
        result["asked"] = asked
        result["stderr"] = err
        return result

    def output(self):
        with open(self.out, "rb") as f:
            return f.read()

    def assertBitExact(self, data):
        got = self.output()
        self.assertEqual(len(got), len(data))
        self.assertEqual(hashlib.sha256(got).hexdigest(), hashlib.sha256(data).hexdigest())

    # --- nginx ---------------------------------------------------------------

    def test_full_download_bit_exact(self):
        data = os.urandom(48 * MIB + 12345)
        self.nginx.add("full.bin", data)
        r = self.fetch(self.nginx.url("files", "full.bin"), len(data), "--verbose")
        self.assertEqual(r["rc"], 0, r)
        self.assertIn("GET https://127.0.0.1:%d/files/full.bin Range: bytes=0-" % self.nginx.port, r["stderr"])
        self.assertBitExact(data)
        self.assertEqual(int(r["requests"]), 1, "one streaming GET, not one per block")
        self.assertEqual(self.nginx.log("full.bin"), [("bytes=0-", 206, len(data))])
        self.assertNotIn("X-Amz-Signature", r["stderr"], "the query string is never logged")
        print("full download: %s MiB/s, %s syncs" % (r["mib_per_s"], r["syncs"]))

    def test_untrusted_server_certificate(self):
        data = os.urandom(4096)
        self.nginx.add("tls.bin", data)
        r = self.fetch(self.nginx.url("files", "tls.bin"), len(data),
                       ca=os.path.join(self.dir, "other-ca.crt"))
        self.assertEqual(r["rc"], 1)
        self.assertIn("certificate", r["reason"])
        self.assertEqual(int(r["retries"]), 0, "a trust failure is not retried")
        self.assertEqual(int(r["offset"]), 0)

    def test_resume_after_kill9(self):
        data = os.urandom(40 * MIB + 777)
        self.nginx.add("resume.bin", data)
        url = self.nginx.url("slow", "resume.bin")
        p = subprocess.Popen(self.fetch_args(url, len(data)), stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        persisted = 0
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and persisted < 8 * MIB:
            time.sleep(0.1)
            try:
                with open(self.state) as f:
                    persisted = int(re.search(r"^offset=(\d+)$", f.read(), re.M).group(1))
            except (OSError, AttributeError):
                pass
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
        self.assertGreaterEqual(persisted, 8 * MIB, "progress record advanced while downloading")
        self.assertLess(persisted, len(data), "killed before the end")
        with open(self.state) as f:
            record = f.read()
        # Killed, not powered off: the bytes written count, not only the
        # synced ones (offset=), which lag behind.
        synced = int(re.search(r"^offset=(\d+)$", record, re.M).group(1))
        persisted = int(re.search(r"^written=(\d+)$", record, re.M).group(1))
        self.assertGreaterEqual(persisted, synced)

        r = self.fetch(self.nginx.url("files", "resume.bin"), len(data))
        self.assertEqual(r["rc"], 0, r)
        self.assertEqual(int(r["resumed_from"]), persisted)
        self.assertEqual(int(r["bytes_received"]), len(data) - persisted, "only the rest was fetched")
        self.assertBitExact(data)
        second = [e for e in self.nginx.log("resume.bin")][-1]
        self.assertEqual(second, ("bytes=%d-" % persisted, 206, len(data) - persisted))

    def test_server_ignores_range(self):
        data = os.urandom(6 * MIB + 5)
        self.nginx.add("norange.bin", data)
        # A first run that stops halfway leaves a record at 3 MiB: cut by a
        # server that then stops answering with a usable URL.
        s = self.faulty(data, ["cut:%d" % (3 * MIB), "403"])
        r = self.fetch(s.url(), len(data), "--retries", "0", fresh_urls=lambda: "")
        self.assertEqual(r["rc"], 1)
        # The second run goes to a server that ignores Range: 200, from 0.
        r = self.fetch(self.nginx.url("norange", "norange.bin"), len(data))
        self.assertEqual(r["rc"], 0, r)
        self.assertEqual(int(r["resumed_from"]), 3 * MIB)
        self.assertEqual(int(r["restarts"]), 1)
        self.assertEqual(int(r["bytes_received"]), len(data))
        self.assertBitExact(data)
        self.assertEqual(self.nginx.log("norange.bin"), [("bytes=%d-" % (3 * MIB), 200, len(data))])

    def test_416_then_size_mismatch(self):
        # The record says 3 MiB of a 4 MiB file are here; the server's object
        # has only 2 MiB: 416, start again at 0, then the size check fails.
        data = os.urandom(4 * MIB)
        s = self.faulty(data, ["cut:%d" % (3 * MIB), "403"])
        self.fetch(s.url(), len(data), "--retries", "0", fresh_urls=lambda: "")
        self.nginx.add("short.bin", data[:2 * MIB])
        r = self.fetch(self.nginx.url("files", "short.bin"), len(data))
        self.assertEqual(r["rc"], 1)
        self.assertEqual(int(r["restarts"]), 1)
        self.assertIn("server has %d bytes, filesize is %d" % (2 * MIB, len(data)), r["reason"])
        self.assertEqual([e[:2] for e in self.nginx.log("short.bin")],
                         [("bytes=%d-" % (3 * MIB), 416), ("bytes=0-", 206)])

    def record(self, offset, job="AFR_OTA-http-test", index=0, size=None, signature="MEQCIF2Q==",
               written=None, boot=None):
        """The progress record http.c writes (its format, rebuilt here):
        version 2 with written= and boot_id= when written is given (boot
        defaults to the running one), else the version 1 of earlier otads."""
        sig = hashlib.sha256(signature.encode()).hexdigest()
        if written is None:
            body = ("# otad HTTPS download progress\nversion=1\njob_id=%s\nfile_index=%d\nsize=%d\n"
                    "signature_sha256=%s\noffset=%d\n" % (job, index, size, sig, offset))
        else:
            body = ("# otad HTTPS download progress\nversion=2\njob_id=%s\nfile_index=%d\nsize=%d\n"
                    "signature_sha256=%s\nboot_id=%s\nwritten=%d\noffset=%d\n"
                    % (job, index, size, sig, boot or boot_id(), written, offset))
        return body + "checksum=%s\n" % hashlib.sha256(body.encode()).hexdigest()

    def test_progress_record_identity(self):
        data = os.urandom(2 * MIB)
        self.nginx.add("ident.bin", data)
        size = len(data)
        with open(self.out, "wb") as f:
            f.write(data[:MIB])
        good = self.record(MIB, size=size)
        cases = [
            ("matching record", good, MIB),
            ("other job", self.record(MIB, job="AFR_OTA-other", size=size), 0),
            ("other file index", self.record(MIB, index=1, size=size), 0),
            ("other size", self.record(MIB, size=size + 1), 0),
            ("other signature", self.record(MIB, size=size, signature="MEUCIQ=="), 0),
            ("offset edited, checksum stale", good.replace("offset=%d" % MIB, "offset=%d" % (MIB + 4096)), 0),
            ("torn record", good[:len(good) // 2], 0),
            ("offset past size", self.record(size + 1, size=size), 0),
            ("written in this boot", self.record(MIB // 2, size=size, written=MIB), MIB),
            ("written in another boot: the synced bytes only",
             self.record(MIB // 2, size=size, written=MIB, boot="0" * 31 + "1"), MIB // 2),
            ("written below synced", self.record(MIB, size=size, written=MIB // 2), 0),
            ("written past size", self.record(MIB, size=size, written=size + 1), 0),
        ]
        for name, text, want in cases:
            with self.subTest(name):
                with open(self.state, "w") as f:
                    f.write(text)
                r = self.fetch(self.nginx.url("files", "ident.bin"), size)
                self.assertEqual(r["rc"], 0, r)
                self.assertEqual(int(r["resumed_from"]), want)
                self.assertEqual(int(r["bytes_received"]), size - want)
                self.assertBitExact(data)
                with open(self.state) as f:
                    self.assertEqual(f.read(), self.record(size, size=size, written=size),
                                     "record rewritten for this file")

    def test_size_mismatch_at_start(self):
        data = os.urandom(100000)
        self.nginx.add("small.bin", data)
        r = self.fetch(self.nginx.url("files", "small.bin"), len(data) + 1)
        self.assertEqual(r["rc"], 1)
        self.assertIn("filesize is %d" % (len(data) + 1), r["reason"])
        self.assertEqual(int(r["offset"]), 0, "nothing written")

    # --- the faulty server ----------------------------------------------------

    def test_expired_url_mid_download(self):
        data = os.urandom(5 * MIB + 3)
        s = self.faulty(data, ["cut:%d" % (2 * MIB), "ok"])
        r = self.fetch(s.url(), len(data), "--verbose", fresh_urls=s.url)
        self.assertEqual(r["rc"], 0, r)
        self.assertBitExact(data)
        self.assertNotIn("t=", r["stderr"], "no URL token in any log line")
        self.assertEqual(r["asked"], 1, "asked once for a fresh URL")
        self.assertEqual(int(r["url_refreshes"]), 1)
        statuses = [(e[1], e[2]) for e in s.log]
        self.assertEqual(statuses[0], ("bytes=0-", 206))
        self.assertIn(("bytes=%d-" % (2 * MIB), 403), statuses, "old URL refused at the cut")
        self.assertEqual(statuses[-1], ("bytes=%d-" % (2 * MIB), 206), "continued where it stopped")
        self.assertEqual(int(r["bytes_received"]), len(data), "nothing fetched twice")

    def test_expired_url_refreshes_bounded(self):
        data = os.urandom(1 * MIB)
        s = self.faulty(data, ["403"])
        r = self.fetch(s.url(), len(data), fresh_urls=s.url)
        self.assertEqual(r["rc"], 1)
        self.assertIn("fresh URLs", r["reason"])
        self.assertEqual(r["asked"], 3)
        self.assertEqual(len(s.log), 4)

    def test_short_body_resumes(self):
        data = os.urandom(3 * MIB)
        s = self.faulty(data, ["cut:1000000", "ok"])
        s.valid = type("always", (), {"__contains__": lambda self, t: True, "add": lambda self, t: None,
                                      "discard": lambda self, t: None})()
        r = self.fetch(s.url(), len(data))
        self.assertEqual(r["rc"], 0, r)
        self.assertBitExact(data)
        self.assertEqual(int(r["retries"]), 1)
        self.assertEqual([e[1] for e in s.log], ["bytes=0-", "bytes=1000000-"])

    def test_longer_body_refused(self):
        data = os.urandom(200000)
        s = self.faulty(data, ["long"])
        r = self.fetch(s.url(), len(data))
        self.assertEqual(r["rc"], 1)
        self.assertIn("more than filesize", r["reason"])
        self.assertLessEqual(os.path.getsize(self.out), len(data), "never written past filesize")

    def test_low_speed_abort_retried_and_bounded(self):
        data = os.urandom(1 * MIB)
        s = self.faulty(data, ["stall"])
        start = time.monotonic()
        r = self.fetch(s.url(), len(data), "--low-speed-limit", "1000", "--low-speed-time", "1",
                       "--retries", "2", timeout=60)
        elapsed = time.monotonic() - start
        self.assertEqual(r["rc"], 1)
        self.assertIn("gave up after 2 retries", r["reason"])
        self.assertEqual(int(r["requests"]), 3)
        # 3 stalls of ~1 s plus backoff 1 s + 2 s; far below the 60 s stall.
        self.assertLess(elapsed, 20)
        print("stall: gave up after %.1f s" % elapsed)

    # --- wanted ranges ----------------------------------------------------------

    def ranges_args(self, ranges):
        path = os.path.join(self.work, "ranges-%d" % time.monotonic_ns())
        wanted_ranges.write_file(path, ranges)
        return ["--ranges", path]

    def fetch_ranges(self, url, data, ranges, *extra, prefill=True, **kw):
        if prefill:
            wanted_ranges.prefill(self.out, len(data))
        return self.fetch(url, len(data), *self.ranges_args(ranges), *extra, **kw)

    def assert_ranges_written(self, r, data, ranges):
        self.assertEqual(r["rc"], 0, r)
        wanted_ranges.check_file(self, self.out, data, ranges)
        self.assertEqual((int(r["bytes_outside"]), int(r["bytes_twice"])), (0, 0), "download.h's write contract")
        self.assertEqual(int(r["bytes_wanted"]), wanted_ranges.total(ranges))
        self.assertEqual(int(r["bytes_resumed"]) + int(r["bytes_written"]), wanted_ranges.total(ranges))

    def test_ranges_nginx_several_per_request_on_one_connection(self):
        data = os.urandom(8 * MIB + 5)
        self.nginx.add("multi.bin", data)
        # Small chunks: some 300 ranges, more than one request holds.
        ranges = wanted_ranges.chunk_like(len(data), seed=21, mean=4 * 1024, missing=0.3, run=2)
        canon = wanted_ranges.canonical(ranges)
        r = self.fetch_ranges(self.nginx.plain_url("files", "multi.bin"), data, ranges)
        self.assert_ranges_written(r, data, ranges)
        log = self.nginx.conn_log("multi.bin")
        self.assertTrue(all(status == 206 for _, status, _, _ in log), log)
        self.assertGreater(len(log), 1)
        self.assertEqual(log[0][0].count(","), 99, "100 ranges in a full request")
        self.assertEqual(len({c for *_, c in log}), 1, "one connection for all requests")
        self.assertEqual(int(r["requests"]), len(log))
        self.assertLessEqual(len(log), -(-len(canon) // 100), "up to 100 ranges per request")
        self.assertEqual(int(r["multi_range_fallbacks"]), 0)
        body = sum(b for _, _, b, _ in log)
        want = wanted_ranges.total(ranges)
        self.assertEqual(int(r["bytes_received"]), body)
        self.assertLessEqual(body, want + len(canon) * 300, "short gaps fetched along, part headers ~100 bytes")
        print("nginx multipart: %d bytes wanted in %d ranges, %d body bytes (%.3f x) in %d requests, "
              "%s header bytes, %s sent" % (want, len(canon), body, body / want, len(log), r["header_bytes"],
                                            r["request_bytes"]))

    def test_ranges_s3_one_range_per_request(self):
        data = os.urandom(8 * MIB + 5)
        ranges = wanted_ranges.chunk_like(len(data), seed=22, mean=16 * 1024, missing=0.3, run=3)
        canon = wanted_ranges.canonical(ranges)
        rec = record_mod.Record()
        s3 = httpsd.PresignedServer(os.path.join(self.dir, "server.crt"), os.path.join(self.dir, "server.key"),
                                    rec).start()
        try:
            s3.add_file("ota/image.bin", data, thing="t")
            r = self.fetch_ranges(s3.presign("ota/image.bin"), data, ranges,
                                  fresh_urls=lambda: s3.presign("ota/image.bin"))
        finally:
            s3.stop()
        self.assert_ranges_written(r, data, ranges)
        reqs = rec.http_requests()
        self.assertTrue(all("," not in q["range"] and q["status"] == 206 for q in reqs),
                        "S3's presigned URL: one range per GET, never several")
        self.assertEqual((int(r["one_range_per_request"]), int(r["multi_range_fallbacks"])), (1, 0))
        self.assertEqual(int(r["requests"]), len(reqs))
        self.assertLessEqual(len(reqs), len(canon))
        served, want = rec.bytes_served(protocol="https"), wanted_ranges.total(ranges)
        self.assertEqual(served, int(r["bytes_received"]))
        per_request = (int(r["request_bytes"]) + int(r["header_bytes"])) / len(reqs)
        # A gap is fetched along only when shorter than what a request costs.
        self.assertLessEqual(served, want + (len(canon) - len(reqs)) * per_request)
        print("S3 stand-in: %d bytes wanted in %d ranges, %d body bytes (%.3f x) in %d requests of %.0f bytes "
              "overhead each" % (want, len(canon), served, served / want, len(reqs), per_request))

    def test_ranges_nginx_one_range_server(self):
        data = os.urandom(8 * MIB + 5)
        self.nginx.add("one.bin", data)
        ranges = wanted_ranges.chunk_like(len(data), seed=23, mean=16 * 1024, missing=0.3, run=3)
        r = self.fetch_ranges(self.nginx.plain_url("onerange", "one.bin"), data, ranges)
        self.assert_ranges_written(r, data, ranges)
        log = self.nginx.conn_log("one.bin")
        self.assertEqual(log[0][1], 200, "several ranges: nginx with max_ranges 1 sends the whole file")
        self.assertIn(",", log[0][0])
        self.assertTrue(all(st == 206 and "," not in rg for rg, st, _, _ in log[1:]), log[:5])
        self.assertEqual(int(r["multi_range_fallbacks"]), 1)
        self.assertEqual(len({c for *_, c in log[1:]}), 1, "then one connection, request after request")
        after = sum(b for _, _, b, _ in log[1:])
        self.assertLess(int(r["bytes_received"]) - after, 1 * MIB, "the whole file was not read")
        print("nginx max_ranges 1: the refused request cost %d bytes received of %d sent"
              % (int(r["bytes_received"]) - after, log[0][2]))

    def test_ranges_server_ignores_range(self):
        data = os.urandom(3 * MIB)
        self.nginx.add("norange2.bin", data)
        ranges = [(1000, 5000), (2 * MIB, 100)]
        r = self.fetch_ranges(self.nginx.plain_url("norange", "norange2.bin"), data, ranges)
        self.assert_ranges_written(r, data, ranges)
        log = self.nginx.log("norange2.bin")
        # Several ranges: refused (200), asked again for one: 200 again,
        # read through once, taking both ranges from it.
        self.assertEqual([(rg, st) for rg, st, _ in log], [("bytes=1000-5999,2097152-2097251", 200),
                                                           ("bytes=1000-5999", 200)])
        self.assertEqual(int(r["multi_range_fallbacks"]), 1)
        self.assertEqual(int(r["requests"]), 2)
        self.assertLess(int(r["bytes_received"]), len(data), "stopped reading once every wanted byte was in")

    def test_ranges_servers_that_answer_badly(self):
        data = os.urandom(2 * MIB + 99)
        ranges = wanted_ranges.chunk_like(len(data), seed=24, mean=8 * 1024, missing=0.3, run=2)
        for mode, fallback in (("multipart", 0), ("coalesce", 0), ("first", 1), ("one-part", 1), ("fewer", 1),
                               ("reverse", 1), ("garbage", 1)):
            with self.subTest(mode):
                if os.path.exists(self.state):
                    os.unlink(self.state)
                s = RangesServer(self.dir, data, [mode])
                self.servers.append(s)
                r = self.fetch_ranges(s.url(), data, ranges)
                self.assert_ranges_written(r, data, ranges)
                self.assertEqual(int(r["multi_range_fallbacks"]), fallback, s.log[:3])
                self.assertIn(",", s.log[0][1])
                if fallback:
                    self.assertTrue(all("," not in e[1] for e in s.log[1:]), "one range per request after it")
                self.assertEqual(int(r["retries"]), 0, "not a failure, an answer")

    def test_ranges_resume_after_kill9(self):
        data = os.urandom(40 * MIB + 777)
        self.nginx.add("rresume.bin", data)
        ranges = wanted_ranges.chunk_like(len(data), seed=25, mean=64 * 1024, missing=0.5, run=4)
        canon = wanted_ranges.canonical(ranges)
        wanted_ranges.prefill(self.out, len(data))
        args = self.fetch_args(self.nginx.plain_url("slow", "rresume.bin"), len(data)) + self.ranges_args(ranges)
        p = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        written = 0
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and written < 6 * MIB:
            time.sleep(0.1)
            try:
                with open(self.state) as f:
                    written = int(re.search(r"^written=(\d+)$", f.read(), re.M).group(1))
            except (OSError, AttributeError):
                pass
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
        with open(self.state) as f:
            record = f.read()
        written = int(re.search(r"^written=(\d+)$", record, re.M).group(1))
        self.assertGreaterEqual(written, 6 * MIB)
        self.assertIn("ranges_sha256=%s\n" % wanted_ranges.identity(ranges), record, "the record names the set")
        below = sum(max(0, min(o + n, written) - o) for o, n in canon)
        self.assertLess(below, wanted_ranges.total(ranges), "killed before the end")

        r = self.fetch_ranges(self.nginx.plain_url("files", "rresume.bin"), data, ranges, prefill=False)
        self.assert_ranges_written(r, data, ranges)
        self.assertEqual(int(r["resumed_from"]), written)
        self.assertEqual(int(r["bytes_resumed"]), below, "every wanted byte below the record's mark counts")
        first = self.nginx.log("rresume.bin")[-int(r["requests"])]
        self.assertTrue(first[0].startswith("bytes=%d-" % written), "resumed at the mark: %s" % first[0][:40])

    def ranges_record(self, ranges, written, offset, size, boot=None):
        sig = hashlib.sha256(b"MEQCIF2Q==").hexdigest()
        body = ("# otad HTTPS download progress\nversion=3\njob_id=AFR_OTA-http-test\nfile_index=0\nsize=%d\n"
                "signature_sha256=%s\nranges_sha256=%s\nboot_id=%s\nwritten=%d\noffset=%d\n"
                % (size, sig, wanted_ranges.identity(ranges), boot or boot_id(), written, offset))
        return body + "checksum=%s\n" % hashlib.sha256(body.encode()).hexdigest()

    def test_ranges_progress_record_identity(self):
        data = os.urandom(2 * MIB)
        self.nginx.add("rident.bin", data)
        size = len(data)
        ranges = [(0, 100000), (MIB, 200000), (MIB + 300000, 1000)]
        other = [(0, 100000), (MIB, 200000), (MIB + 300000, 1001)]
        below = lambda mark: sum(max(0, min(o + n, mark) - o) for o, n in ranges)  # noqa: E731
        cases = [
            ("this boot: the bytes written", self.ranges_record(ranges, MIB + 100000, 50000, size), MIB + 100000),
            ("another boot (a power cut): the synced ones",
             self.ranges_record(ranges, MIB + 100000, 50000, size, boot="0" * 31 + "1"), 50000),
            ("another set", self.ranges_record(other, MIB + 100000, MIB + 100000, size), 0),
            ("a record of the whole file", self.record(MIB, size=size, written=MIB), 0),
        ]
        for name, text, want in cases:
            with self.subTest(name):
                # The target holds the wanted bytes a record may count.
                wanted_ranges.prefill(self.out, size)
                with open(self.out, "r+b") as f:
                    for o, n in ranges:
                        f.seek(o)
                        f.write(data[o:o + n])
                with open(self.state, "w") as f:
                    f.write(text)
                r = self.fetch_ranges(self.nginx.plain_url("files", "rident.bin"), data, ranges, prefill=False)
                self.assert_ranges_written(r, data, ranges)
                self.assertEqual(int(r["resumed_from"]), want)
                self.assertEqual(int(r["bytes_resumed"]), below(want))
        # And a record of ranges is none of the whole file.
        with open(self.state, "w") as f:
            f.write(self.ranges_record(ranges, MIB, MIB, size))
        r = self.fetch(self.nginx.url("files", "rident.bin"), size)
        self.assertEqual((r["rc"], int(r["resumed_from"])), (0, 0))
        self.assertBitExact(data)

    def test_ranges_expired_url_mid_download(self):
        data = os.urandom(3 * MIB)
        ranges = wanted_ranges.chunk_like(len(data), seed=26, mean=16 * 1024, missing=0.5, run=3)
        s = RangesServer(self.dir, data, ["cut:300000", "multipart"])
        self.servers.append(s)
        r = self.fetch_ranges(s.url(), data, ranges, fresh_urls=s.url)
        self.assert_ranges_written(r, data, ranges)
        self.assertEqual((r["asked"], int(r["url_refreshes"])), (1, 1))
        self.assertIn(403, [e[2] for e in s.log], "the old URL was refused after the cut")
        self.assertEqual(int(r["bytes_written"]), wanted_ranges.total(ranges), "nothing written twice")

    def test_ranges_size_mismatch(self):
        data = os.urandom(2 * MIB)
        self.nginx.add("rshort.bin", data[:MIB])
        for ranges in ([(100, 1000), (MIB + 5, 10)], [(100, 1000)]):
            with self.subTest(len(ranges)):
                r = self.fetch_ranges(self.nginx.plain_url("files", "rshort.bin"), data, ranges)
                self.assertEqual(r["rc"], 1)
                self.assertIn("server has %d bytes, filesize is %d" % (MIB, 2 * MIB), r["reason"])

    def test_ranges_empty_set(self):
        data = os.urandom(100000)
        r = self.fetch_ranges("https://127.0.0.1:1/nothing?t=1", data, [])
        self.assertEqual((r["rc"], int(r["requests"]), int(r["writes"])), (0, 0, 0))

    # --- throughput, for the report ------------------------------------------

    def test_zz_throughput_vs_curl(self):
        mib = int(os.environ.get("OTAD_BENCH_MIB", "32"))
        if mib <= 0:
            self.skipTest("OTAD_BENCH_MIB=0")
        data = os.urandom(mib * MIB)
        self.nginx.add("bench.bin", data)
        del data
        url = self.nginx.url("files", "bench.bin")
        out = os.path.join(self.work, "curl.bin")
        t = time.monotonic()
        subprocess.run(["curl", "-sS", "--cacert", self.ca, "-o", "/dev/null", url], check=True)
        curl_null = time.monotonic() - t
        t = time.monotonic()
        subprocess.run(["curl", "-sS", "--cacert", self.ca, "-o", out, url], check=True)
        curl_file = time.monotonic() - t
        os.unlink(out)
        rates = {}
        for label, output, extra in (("engine to /dev/null", "/dev/null", ["--no-sync"]),
                                     ("to a file, no sync", self.out, ["--no-sync"]),
                                     ("to a file, durable progress", self.out, [])):
            for path in (self.out, self.state):
                if os.path.exists(path):
                    os.unlink(path)
            args = self.fetch_args(url, mib * MIB, *extra)
            args[args.index("--output") + 1] = output
            t = time.monotonic()
            p = subprocess.run(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            rates[label] = mib / (time.monotonic() - t)
            self.assertEqual(p.returncode, 0, p.stdout)
        print("throughput %d MiB: curl -o /dev/null %.0f MiB/s, curl -o file %.0f MiB/s; http-fetch %s"
              % (mib, mib / curl_null, mib / curl_file,
                 ", ".join("%s %.0f MiB/s (%.0f %% of curl -o /dev/null)" % (k, v, 100 * v * curl_null / mib)
                           for k, v in rates.items())))

if __name__ == "__main__":
    unittest.main()

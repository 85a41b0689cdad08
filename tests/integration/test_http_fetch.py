#!/usr/bin/python3
"""http.c against real HTTPS servers on 127.0.0.1, through tests/http-fetch.

Servers: nginx-light (Range, an access log that records each request's Range
header, a throttled location to kill a download midway, a location that
ignores Range) and a small TLS server in this file that misbehaves on
purpose (cuts the body, expires the URL, stalls, sends too much). Both use a
CA made here with the openssl CLI, passed to http-fetch as --ca-file.

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
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {p}/server.crt;
        ssl_certificate_key {p}/server.key;
        ssl_protocols TLSv1.2 TLSv1.3;
        location /files/ {{ alias {p}/www/; }}
        location /slow/ {{ alias {p}/www/; limit_rate 6m; }}
        location /norange/ {{ alias {p}/www/; max_ranges 0; }}
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

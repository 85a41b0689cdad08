#!/usr/bin/python3
"""Presigned-URL HTTPS file server standing in for S3 (protocol.md §4).

Owns: an HTTPS listener on 127.0.0.1, the files it serves by key, and the
URL signing (HMAC over key + issue time + lifetime, like S3's SigV4 query
string in spirit). Answers like S3: 200/206 with Range, 416, 403 with an XML
error when the URL expired or its signature is wrong, 404 for unknown keys.
"""

import calendar
import hashlib
import hmac
import http.server
import re
import secrets
import ssl
import threading
import time
import urllib.parse
from email.utils import formatdate

CHUNK = 1 << 20
RANGE_RE = re.compile(r"^bytes=(\d*)-(\d*)$")


def s3_error(code, message):
    return ('<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>%s</Code>'
            '<Message>%s</Message><RequestId>%s</RequestId></Error>'
            % (code, message, secrets.token_hex(8).upper())).encode()


class PresignedServer:
    """files: key -> bytes. presign(key) returns a fresh URL each call."""

    def __init__(self, cert_file, key_file, record, on_bytes=None):
        self._secret = secrets.token_bytes(32)
        self._files = {}
        self._owners = {}                 # key -> thing, for the record
        self._lock = threading.Lock()
        self._last_serial = 0
        self._revoked_upto = 0            # URLs with serial <= this expired
        self.record = record
        self.on_bytes = on_bytes          # callable(thing, n) after each write
        handler = self._make_handler()
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(cert_file, key_file)
        # Handshake in the handler thread, not in accept(): a client that
        # stalls its handshake must not block the whole server.
        self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True,
                                            do_handshake_on_connect=False)
        self.port = self.httpd.server_address[1]
        self._thread = None

    def start(self):
        self._thread = threading.Thread(target=self.httpd.serve_forever,
                                        name="standin-https", daemon=True)
        self._thread.start()
        return self

    def stop(self):
        if self._thread:
            self.httpd.shutdown()
            self._thread.join(5)
            self._thread = None
        self.httpd.server_close()

    def add_file(self, key, data, thing=None):
        key = key.lstrip("/")
        with self._lock:
            self._files[key] = data
            self._owners[key] = thing

    def presign(self, key, expires_in=1800):
        """Like the Jobs service substituting ${aws:iot:s3-presigned-url:…}:
        every call gives a distinct URL valid for expires_in seconds."""
        key = key.lstrip("/")
        issued = int(time.time())
        with self._lock:
            self._last_serial += 1
            serial = self._last_serial
        query = [("X-Amz-Algorithm", "AWS4-HMAC-SHA256"),
                 ("X-Amz-Date", time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(issued))),
                 ("X-Amz-Expires", str(expires_in)),
                 # Unique per delivery, like a session token.
                 ("X-Amz-Security-Token", "standin-%d-%s" % (serial, secrets.token_hex(4))),
                 ("X-Amz-SignedHeaders", "host")]
        query.append(("X-Amz-Signature", self._sign(key, query)))
        return "https://127.0.0.1:%d/%s?%s" % (self.port, urllib.parse.quote(key),
                                               urllib.parse.urlencode(query))

    def expire_all_now(self):
        """Every URL issued so far is refused from now on (as expired)."""
        with self._lock:
            self._revoked_upto = self._last_serial

    def _sign(self, key, query):
        msg = "\n".join([key] + ["%s=%s" % kv for kv in query
                                 if kv[0] != "X-Amz-Signature"])
        return hmac.new(self._secret, msg.encode(), hashlib.sha256).hexdigest()

    def check(self, key, query):
        """None if the URL is valid, else (status, S3 code, message)."""
        q = urllib.parse.parse_qsl(query, keep_blank_values=True)
        fields = dict(q)
        try:
            issued = calendar.timegm(time.strptime(fields["X-Amz-Date"], "%Y%m%dT%H%M%SZ"))
            lifetime = int(fields["X-Amz-Expires"])
            signature = fields["X-Amz-Signature"]
            serial = int(fields["X-Amz-Security-Token"].split("-")[1])
        except (KeyError, ValueError, IndexError):
            return 403, "AccessDenied", "Query-string authentication requires the Signature, Expires and Credential parameters"
        unsigned = [kv for kv in q if kv[0] != "X-Amz-Signature"]
        if not hmac.compare_digest(signature, self._sign(key, unsigned)):
            return 403, "SignatureDoesNotMatch", "The request signature we calculated does not match the signature you provided."
        if time.time() > issued + lifetime or serial <= self._revoked_upto:
            return 403, "AccessDenied", "Request has expired"
        with self._lock:
            if key not in self._files:
                return 404, "NoSuchKey", "The specified key does not exist."
        return None

    def file(self, key):
        with self._lock:
            return self._files.get(key), self._owners.get(key)

    def _make_handler(self):
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"      # keep-alive, like S3
            server_version = "AmazonS3"
            timeout = 30                       # idle keep-alive connections end

            def log_message(self, *args):
                pass

            def do_HEAD(self):
                self._serve(head=True)

            def do_GET(self):
                self._serve(head=False)

            def _error(self, status, code, message, key, rng, extra=()):
                body = s3_error(code, message)
                self.send_response(status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(body)))
                for h in extra:
                    self.send_header(*h)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)
                server.record.add_http(self.command, key, rng, status, 0)

            def _serve(self, head):
                path, _, query = self.path.partition("?")
                key = urllib.parse.unquote(path.lstrip("/"))
                rng = self.headers.get("Range")
                problem = server.check(key, query)
                if problem:
                    return self._error(*problem, key, rng)
                data, thing = server.file(key)
                size = len(data)
                start, end, status = 0, size - 1, 200
                m = RANGE_RE.match(rng or "")
                # S3 serves one range; anything it can't parse is ignored (200).
                if m and (m.group(1) or m.group(2)):
                    if m.group(1):
                        start = int(m.group(1))
                        end = min(int(m.group(2)), size - 1) if m.group(2) else size - 1
                    else:
                        start = max(0, size - int(m.group(2)))
                    if start >= size or start > end:
                        return self._error(416, "InvalidRange",
                                           "The requested range is not satisfiable",
                                           key, rng, [("Content-Range", "bytes */%d" % size)])
                    status = 206
                length = end - start + 1 if size else 0
                self.send_response(status)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(length))
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("ETag", '"%s"' % hashlib.md5(data).hexdigest())
                self.send_header("Last-Modified", formatdate(usegmt=True))
                if status == 206:
                    self.send_header("Content-Range", "bytes %d-%d/%d" % (start, end, size))
                self.end_headers()
                sent = 0
                if not head:
                    view = memoryview(data)
                    pos = start
                    while pos <= end:
                        n = min(CHUNK, end + 1 - pos)
                        try:
                            self.wfile.write(view[pos:pos + n])
                        except OSError:
                            break
                        pos += n
                        sent += n
                        server.record.add_bytes(thing, "https", n)
                        if server.on_bytes:
                            server.on_bytes(thing, n)
                server.record.add_http(self.command, key, rng, status, sent, thing)

        return Handler

#!/usr/bin/python3
"""OTA downloads through the real daemon (issue 5), end to end against the
local AWS IoT stand-in (tests/standin): afr_ota jobs over MQTT file streams
and presigned HTTPS into a `[target.NAME] type=file` target.

Each test checks what a user would check: the job's statuses and
statusDetails as the service recorded them, the bytes in the target
directory against the image, what the stand-in served, and otad's log.

Run: OTAD_BIN=build/src/otad /usr/bin/python3 tests/standin/tap.py \
         tests/integration/test_ota_download.py [-k PATTERN]
"""

import hashlib
import os
import random
import re
import secrets
import shutil
import signal
import socket
import struct
import sys
import tempfile
import threading
import time
import unittest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "standin"))

import harness  # noqa: E402
import streams as streams_mod  # noqa: E402
from pki import sign_bytes  # noqa: E402

KIB = 1024
MIB = 1024 * KIB
VERSION = "1.2.3"
ACCEPTED = "accepted  v" + VERSION          # two spaces, as the reference agent writes it (§2.4)
HTTP_BLOCK = 4096                           # otad counts HTTP progress in 4 KiB blocks (§2.4)
REQUEST_BYTES = 128 * KIB                   # AWS: at most 128 KiB per GetStream answer (§3.2)
CHECKPOINT_BYTES = 1 * MIB                  # stream.c/http.c make progress durable every 1 MiB (or 1 s)
RECEIVE_RE = re.compile(r"^(\d+)/(\d+)$")
REASON_RE = re.compile(r"^(0x[0-9a-f]{8}: 0x[0-9a-f]{8}|[a-z]+: 0x[0-9a-f]{8})$")

# Settings every test starts from: fast enough for a test run, still inside
# AWS's caps where they matter (block size, 128 KiB per request).
BASE_OTA = {
    "block_size": 32768,
    "window": 4,
    "max_requests_per_second": 100,
    "request_timeout": 3,
    "momentum": 32,
    "progress_interval": 1,
    "http_low_speed_time": 5,
}


def sha256(data):
    return hashlib.sha256(data).hexdigest()


def blocks(size, block_size):
    return (size + block_size - 1) // block_size


class Relay:
    """A TCP relay between otad and the stand-in's HTTPS server: the network
    in between. It can cut every open connection (a drop mid-download),
    limit the rate towards otad (a link of known speed) and counts what it
    forwarded to otad per connection (what otad downloaded, which the
    server's own count overstates by its socket buffers). TLS passes
    through untouched: the server certificate names 127.0.0.1."""

    def __init__(self, upstream_port, rate=None):
        self.upstream_port = upstream_port
        self.rate = rate                    # bytes/s towards otad, None: no limit
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.port = self.listener.getsockname()[1]
        self._lock = threading.Lock()
        self._conns = []
        self._closed = False
        self._clock = time.monotonic()
        self._hooks = []                    # [remaining bytes, callback]
        self.forwarded = []                 # bytes sent to otad, one entry per connection
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.socket()
            # A small receive buffer keeps what the server counts as served
            # close to what reached otad.
            server.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 128 * KIB)
            try:
                server.connect(("127.0.0.1", self.upstream_port))
            except OSError:
                client.close()
                server.close()
                continue
            with self._lock:
                if self._closed:
                    client.close()
                    server.close()
                    return
                self._conns += [client, server]
                self.forwarded.append(0)
                index = len(self.forwarded) - 1
            threading.Thread(target=self._pump, args=(client, server, None), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, index), daemon=True).start()

    def _pace(self, n):
        with self._lock:
            start = max(time.monotonic(), self._clock)
            self._clock = start + n / self.rate
        delay = self._clock - time.monotonic()
        if delay > 0:
            time.sleep(delay)

    def _count(self, index, n):
        fired = []
        with self._lock:
            self.forwarded[index] += n
            for hook in self._hooks:
                hook[0] -= n
                if hook[0] <= 0:
                    fired.append(hook)
            for hook in fired:
                self._hooks.remove(hook)
        for hook in fired:
            hook[1]()

    def when_forwarded(self, nbytes, callback):
        """Calls callback() once nbytes more have been forwarded to otad."""
        with self._lock:
            self._hooks.append([nbytes, callback])

    def _pump(self, src, dst, index):
        try:
            while True:
                data = src.recv(16 * KIB if self.rate else 64 * KIB)
                if not data:
                    break
                if index is not None and self.rate:
                    self._pace(len(data))
                dst.sendall(data)
                if index is not None:
                    self._count(index, len(data))
        except OSError:
            pass
        # Close, not just shut down: unread data then resets the other
        # side, so the server's write fails instead of blocking.
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def cut(self):
        """Resets every connection open now; new ones still get through."""
        with self._lock:
            conns, self._conns = self._conns, []
        for s in conns:
            try:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def close(self):
        with self._lock:
            self._closed = True
        self.listener.close()
        self.cut()


class OtaDownloadTest(unittest.TestCase):
    """One stack for the module; each test has its own thing, target
    directory and state directory, and its own otad."""

    @classmethod
    def setUpClass(cls):
        if not os.access(harness.otad_binary(), os.X_OK):
            raise unittest.SkipTest("%s not built" % harness.otad_binary())
        # A work dir of our own name: a sweep of the harness's default
        # /tmp/otad-standin-* by someone else must not pull it away mid-run.
        cls.workdir = tempfile.mkdtemp(prefix="otad-e2e-")
        cls.stack = harness.Stack(things=[], workdir=cls.workdir)
        cls.stack.__enter__()
        cls.service = cls.stack.service
        cls.trust = os.path.join(cls.stack.workdir, "trust")
        os.makedirs(cls.trust)
        # The job names its certificate "ota-signer.crt" (certfile); otad
        # looks it up in the trust dir by that name only.
        shutil.copy(cls.stack.pki.signer_cert, os.path.join(cls.trust, "ota-signer.crt"))
        cls.n = 0

    @classmethod
    def tearDownClass(cls):
        try:
            cls.stack.__exit__(None, None, None)
        finally:
            if os.environ.get("OTAD_KEEP_TMP") == "1":
                sys.stderr.write("OTAD_KEEP_TMP=1: kept %s\n" % cls.workdir)
            else:
                shutil.rmtree(cls.workdir, ignore_errors=True)

    def setUp(self):
        OtaDownloadTest.n += 1
        self.thing = "ota-thing-%d" % OtaDownloadTest.n
        self.stack.add_thing(self.thing)
        self.out = os.path.join(self.stack.workdir, self.thing + "-out")
        os.makedirs(self.out)
        self.state = self.stack.state_dir(self.thing)
        self.otad = None
        self.sections = None
        self.max_file = streams_mod.MAX_FILE

    def tearDown(self):
        streams_mod.MAX_FILE = self.max_file
        self.service.https.__dict__.pop("presign", None)
        if self.otad:
            self.otad.stop()

    # ---- helpers -------------------------------------------------------

    def start_otad(self, ota=None, sections=None):
        self.sections = {
            "ota": dict(BASE_OTA, trust_dir=self.trust, http_ca_file=self.stack.pki.ca_cert),
            "update": {"version": VERSION},
            "mqtt": {"reconnect_min": 1, "reconnect_max": 2},
            "target.app": {"type": "file", "directory": self.out},
        }
        self.sections["ota"].update(ota or {})
        self.sections.update(sections or {})
        self.otad = self.stack.start_otad(self.thing, self.sections)
        return self.otad

    def restart_otad(self):
        self.otad = self.stack.start_otad(self.thing, self.sections)
        return self.otad

    def queue(self, job_id, image, **kw):
        return self.service.queue_ota_job(self.thing, job_id, image, **kw)

    def wait_terminal(self, job_id, timeout=60):
        try:
            return self.service.wait_terminal(self.thing, job_id, timeout=timeout)
        except TimeoutError:
            self.fail("job %s not terminal after %d s; otad log:\n%s"
                      % (job_id, timeout, self.otad.log()[-4000:] if self.otad else ""))

    def updates(self, job_id):
        return self.service.record.status_updates(self.thing, job_id, outcome="accepted")

    def final_details(self, job_id):
        return self.updates(job_id)[-1]["statusDetails"] or {}

    def target_files(self):
        return sorted(os.listdir(self.out))

    def assert_landed(self, image):
        """The target holds exactly the image, under the target's name, and
        nothing else (no partial file left behind)."""
        self.assertEqual(self.target_files(), ["app"])
        with open(os.path.join(self.out, "app"), "rb") as f:
            got = f.read()
        self.assertEqual(len(got), len(image))
        self.assertTrue(got == image, "target file differs from the image")
        self.assertFalse([n for n in os.listdir(self.state) if n.endswith(".progress")],
                         "progress records left after the job ended")

    def assert_nothing_activated(self):
        self.assertEqual(self.target_files(), [], "a failed job left files in the target directory")
        self.assertFalse([n for n in os.listdir(self.state) if n.endswith(".progress")],
                         "progress records left after the job failed")
        self.assertFalse(self.otad.grep(r"installed .*/app"), "a failed job was installed")

    def assert_failed(self, job_id, reason, detail_re=None, timeout=60):
        """FAILED with the reference-form reason (and a sentence in detail)."""
        self.assertEqual(self.wait_terminal(job_id, timeout), "FAILED", self.otad.log()[-3000:])
        details = self.final_details(job_id)
        self.assertEqual(self.updates(job_id)[-1]["status"], "FAILED")
        self.assertEqual(details.get("reason"), reason, details)
        self.assertRegex(details["reason"], REASON_RE)
        if detail_re:
            self.assertRegex(details.get("detail", ""), detail_re)
        self.assert_nothing_activated()
        return details

    def assert_success_updates(self, job_id, total_blocks):
        """IN_PROGRESS without details when taken, then receive n/N with n
        rising to N, then SUCCEEDED with the reference agent's reason."""
        ups = self.updates(job_id)
        self.assertEqual(ups[0]["status"], "IN_PROGRESS")
        self.assertFalse(ups[0]["statusDetails"], "the first update only says the job was taken")
        self.assertEqual(ups[-1]["status"], "SUCCEEDED")
        self.assertEqual(ups[-1]["statusDetails"]["reason"], ACCEPTED)
        progress = []
        for u in ups[1:-1]:
            self.assertEqual(u["status"], "IN_PROGRESS")
            m = RECEIVE_RE.match((u["statusDetails"] or {}).get("receive", ""))
            self.assertTrue(m, "unexpected intermediate update %r" % u)
            progress.append((int(m.group(1)), int(m.group(2))))
        self.assertTrue(progress, "no receive progress was reported")
        self.assertTrue(all(t == total_blocks for _, t in progress), (progress, total_blocks))
        done = [n for n, _ in progress]
        self.assertEqual(done, sorted(done), "progress went backwards")
        self.assertGreaterEqual(done[0], 1)
        self.assertEqual(done[-1], total_blocks, "the last block is reported")
        return progress

    def assert_verified_log(self, image):
        self.assertTrue(self.otad.grep(r"verified: sha256 %s, signed by ota-signer\.crt" % sha256(image)),
                        "otad did not log the image's sha256 as verified")

    def stream_requests(self):
        return self.service.record.requests(self.thing, "streams/get")

    def data_messages(self):
        return [e for e in self.service.record.sent(self.thing) if e["topic"].endswith("/data/cbor")]

    def https_served(self):
        return self.service.record.bytes_served(self.thing, "https")

    def mqtt_served(self):
        return self.service.record.bytes_served(self.thing, "mqtt")

    def http_gets(self):
        """The HTTPS requests for this thing's files, refused ones included."""
        return [r for r in self.service.record.http_requests()
                if r["path"].startswith("ota/%s/" % self.thing)]

    def use_relay(self, rate=None):
        """Presigned URLs handed out from now on lead through a Relay."""
        https = self.service.https
        relay = Relay(https.port, rate)
        self.addCleanup(relay.close)
        presign = https.presign
        https.presign = lambda key, expires_in=1800: presign(key, expires_in).replace(
            "127.0.0.1:%d/" % https.port, "127.0.0.1:%d/" % relay.port)
        return relay

    def kill_when_served(self, nbytes, fired):
        """SIGKILLs the current otad from the stand-in's sending thread the
        moment nbytes more have been served: a power cut mid-transfer."""
        pid = self.otad.pid

        def kill():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            fired.set()

        self.service.when_bytes_served(self.thing, nbytes, kill)

    # ---- 1. clean transfers --------------------------------------------

    def test_mqtt_10mib_lands_bit_exact(self):
        image = secrets.token_bytes(10 * MIB)
        self.start_otad()
        self.queue("AFR_OTA-mqtt", image, protocols=["MQTT"])
        t0 = time.monotonic()
        self.assertEqual(self.wait_terminal("AFR_OTA-mqtt"), "SUCCEEDED", self.otad.log()[-3000:])
        elapsed = time.monotonic() - t0
        self.assert_landed(image)
        nblocks = blocks(len(image), 32768)
        progress = self.assert_success_updates("AFR_OTA-mqtt", nblocks)
        # At most one receive per progress_interval (1 s), plus first and last.
        self.assertLessEqual(len(progress), elapsed / BASE_OTA["progress_interval"] + 3, progress)
        self.assertEqual(self.final_details("AFR_OTA-mqtt")["detail"], "1 file(s) installed")
        self.assert_verified_log(image)
        # Served once, requests within AWS's caps. A loaded machine may
        # stall otad long enough for it to re-ask for a request's tail once
        # (stream.c's quiet-link rule), so allow one window of re-serving.
        window = BASE_OTA["window"] * REQUEST_BYTES
        self.assertGreaterEqual(self.mqtt_served(), len(image))
        self.assertLessEqual(self.mqtt_served(), len(image) + window)
        for q in self.stream_requests():
            f = q["fields"]
            self.assertNotIn("rejected", f)
            self.assertEqual(f["l"], 32768)
            self.assertLessEqual(f["n"] * f["l"], REQUEST_BYTES)
        self.assertLessEqual(len(self.stream_requests()), blocks(len(image), REQUEST_BYTES) + BASE_OTA["window"])
        self.assertTrue(self.otad.grep(r"Stream file 0 complete: %d new blocks, 0 resumed, \d+ duplicates, 0 bad"
                                       % nblocks))

    def test_https_10mib_lands_bit_exact(self):
        image = secrets.token_bytes(10 * MIB)
        self.start_otad()
        self.queue("AFR_OTA-https", image, protocols=["HTTP"])
        self.assertEqual(self.wait_terminal("AFR_OTA-https"), "SUCCEEDED", self.otad.log()[-3000:])
        self.assert_landed(image)
        self.assert_success_updates("AFR_OTA-https", blocks(len(image), HTTP_BLOCK))
        self.assert_verified_log(image)
        # One streaming GET, not one request per 4 KiB like the reference agent.
        gets = self.http_gets()
        self.assertEqual([(r["method"], r["status"], r["range"]) for r in gets], [("GET", 206, "bytes=0-")])
        self.assertEqual(self.https_served(), len(image))
        self.assertEqual(self.mqtt_served(), 0)

    def test_both_protocols_follow_the_configured_preference(self):
        image = secrets.token_bytes(1 * MIB + 17)
        self.start_otad(ota={"protocol": "http"})
        self.queue("AFR_OTA-both", image, protocols=["MQTT", "HTTP"])
        self.assertEqual(self.wait_terminal("AFR_OTA-both"), "SUCCEEDED", self.otad.log()[-3000:])
        self.assert_landed(image)
        self.assertEqual(self.https_served(), len(image))
        self.assertEqual(self.stream_requests(), [])

    # ---- 2. a lossy stream ----------------------------------------------

    def test_drops_duplicates_reordering(self):
        image = secrets.token_bytes(4 * MIB)
        block = 4096
        self.start_otad(ota={"block_size": block})
        info = self.queue("AFR_OTA-lossy", image, protocols=["MQTT"])
        self.service.set_faults(self.thing, info["stream_id"], drop=0.05, duplicate=0.05, reorder=0.3, seed=11)
        self.assertEqual(self.wait_terminal("AFR_OTA-lossy", 90), "SUCCEEDED", self.otad.log()[-3000:])
        self.assert_landed(image)
        self.assert_verified_log(image)
        nblocks = blocks(len(image), block)
        per_request = REQUEST_BYTES // block
        reqs = self.stream_requests()
        asked = sum(bin(int(q["fields"]["b"], 16)).count("1") for q in reqs)
        served = len(self.data_messages())
        m = re.search(r"Stream file 0 complete: (\d+) new blocks, \d+ resumed, (\d+) duplicates",
                      "\n".join(self.otad.grep("Stream file 0 complete")))
        self.assertTrue(m)
        self.assertEqual(int(m.group(1)), nblocks)
        duplicates = int(m.group(2))
        self.assertGreater(duplicates, nblocks * 0.03, "the stand-in duplicated ~5% of the blocks")
        # The bound. Every block is asked for once, a dropped one once more
        # per drop (5% of what is sent, so ~5.3% of N in expectation); a
        # re-request may also catch blocks still on their way (one window).
        # Asking 1.15 N (3x the expected loss) would still be fine; a storm
        # re-asks on each duplicate or re-sends whole bitmaps and blows it.
        self.assertLess(asked, nblocks * 1.15 + BASE_OTA["window"] * per_request, (asked, nblocks))
        # Requests: N/32 for the first pass; lost blocks are gathered into
        # full requests again, so at most as many again for the second pass
        # (drops ~ 0.05 N need ~ 0.05 N / 32 requests), plus the ones that
        # chase single tail blocks: bounded by 2 N/32 + momentum.
        self.assertLess(len(reqs), 2 * blocks(nblocks, per_request) + BASE_OTA["momentum"],
                        "request storm: %d requests for %d blocks (%d duplicates)" % (len(reqs), nblocks, duplicates))
        self.assertLess(len(reqs), duplicates + blocks(nblocks, per_request),
                        "more re-requests than duplicates: duplicates trigger requests")
        self.assertGreater(served, nblocks)
        sys.stderr.write("# lossy stream: %d blocks, %d requests, %d blocks asked for, %d data messages served, "
                         "%d duplicates seen\n" % (nblocks, len(reqs), asked, served, duplicates))

    # ---- 3. failures: FAILED with the documented reason, nothing activated

    def test_wrong_signature(self):
        image = secrets.token_bytes(256 * KIB)
        other = secrets.token_bytes(256 * KIB)
        self.start_otad()
        self.queue("AFR_OTA-badsig", image, protocols=["MQTT"],
                   signature=sign_bytes(other, self.stack.pki.signer_key))
        # 0xe3 SignatureCheckFailed, sub-code EBADMSG (74).
        self.assert_failed("AFR_OTA-badsig", "0x000000e3: 0x0000004a", r"files\[0\]: .*signature")
        self.assertEqual(self.mqtt_served(), len(image), "the whole file was fetched, then refused")

    def test_signed_by_untrusted_key(self):
        image = secrets.token_bytes(256 * KIB)
        self.start_otad()
        # The untrusted signer's signature, but the job names the trusted
        # certificate: the signature does not verify with it.
        self.queue("AFR_OTA-untrusted", image, protocols=["MQTT"],
                   signing_key=self.stack.pki.untrusted_signer_key)
        self.assert_failed("AFR_OTA-untrusted", "0x000000e3: 0x0000004a")

    def test_untrusted_signer_certificate(self):
        image = secrets.token_bytes(256 * KIB)
        self.start_otad()
        # The job names the untrusted signer's certificate: the trust dir
        # holds no such certificate (0xe7 BadSignerCert, ENOKEY).
        self.queue("AFR_OTA-nocert", image, protocols=["HTTP"],
                   signing_key=self.stack.pki.untrusted_signer_key, certfile="untrusted-signer.crt")
        self.assert_failed("AFR_OTA-nocert", "0x000000e7: 0x0000007e", r"untrusted-signer\.crt")

    def test_signer_certificate_outside_the_chain(self):
        image = secrets.token_bytes(256 * KIB)
        trust = os.path.join(self.stack.workdir, self.thing + "-trust")
        os.makedirs(trust)
        shutil.copy(self.stack.pki.signer_cert, os.path.join(trust, "ota-signer.crt"))
        shutil.copy(self.stack.pki.untrusted_signer_cert, os.path.join(trust, "untrusted-signer.crt"))
        # Both certificates are in the trust dir, but only the one the
        # signing CA issued (here: the self-signed trusted signer) counts.
        self.start_otad(ota={"trust_dir": trust, "signing_ca": self.stack.pki.signer_cert})
        self.queue("AFR_OTA-chain", image, protocols=["MQTT"],
                   signing_key=self.stack.pki.untrusted_signer_key, certfile="untrusted-signer.crt")
        self.assert_failed("AFR_OTA-chain", "0x000000e7: 0x00000081", r"not signed by")
        # The same otad takes a properly signed job afterwards.
        self.queue("AFR_OTA-chain-ok", image, protocols=["MQTT"])
        self.assertEqual(self.wait_terminal("AFR_OTA-chain-ok"), "SUCCEEDED", self.otad.log()[-3000:])
        self.assert_landed(image)

    def test_filesize_larger_than_stream_file(self):
        image = secrets.token_bytes(200 * KIB + 100)
        self.start_otad(ota={"request_timeout": 1, "momentum": 4})
        # Two blocks more than the stream file has: asking for them is
        # refused by the service (InvalidRequest, "out of the range of data
        # available", §3.4), which no retry can change.
        self.queue("AFR_OTA-big", None, files=[{"data": image, "filesize": len(image) + 64 * KIB}],
                   protocols=["MQTT"])
        self.assert_failed("AFR_OTA-big", "aborted: 0x00000008", r"files\[0\]: stream rejected: InvalidRequest")

    def test_filesize_larger_within_the_last_block(self):
        image = secrets.token_bytes(200 * KIB + 100)
        # The default timeouts: waiting for momentum would take minutes.
        self.start_otad(ota={"request_timeout": 10, "momentum": 32})
        # The same block count, but the last block is shorter than the job
        # promised: the length of the last block tells, fail at once.
        self.queue("AFR_OTA-big2", None, files=[{"data": image, "filesize": len(image) + 4096}],
                   protocols=["MQTT"])
        last = len(image) // 32768
        self.assert_failed("AFR_OTA-big2", "aborted: 0x00000008",
                           r"^files\[0\]: stream file 0 holds fewer bytes than the job's filesize of %d bytes: "
                           r"block %d is %d bytes, expected %d \(the stream file ends at byte %d\); "
                           r"the stream and the job document disagree$"
                           % (len(image) + 4096, last, len(image) % 32768, len(image) % 32768 + 4096, len(image)),
                           timeout=20)

    def test_filesize_smaller_than_stream_file(self):
        image = secrets.token_bytes(200 * KIB + 100)
        self.start_otad(ota={"request_timeout": 10, "momentum": 32})
        self.queue("AFR_OTA-small", None, files=[{"data": image, "filesize": len(image) - 1000}],
                   protocols=["MQTT"])
        # The last block is longer than the job promised: the stream file
        # is larger than filesize, fail at once rather than by momentum.
        last = len(image) // 32768
        self.assert_failed("AFR_OTA-small", "aborted: 0x00000008",
                           r"^files\[0\]: stream file 0 holds more than the job's filesize of %d bytes: "
                           r"block %d is %d bytes, expected %d; the stream and the job document disagree$"
                           % (len(image) - 1000, last, len(image) % 32768, len(image) % 32768 - 1000),
                           timeout=20)

    def test_filesize_smaller_by_blocks_than_stream_file(self):
        image = secrets.token_bytes(200 * KIB + 100)
        self.start_otad(ota={"request_timeout": 10, "momentum": 32})
        # filesize ends inside block 2: that block comes whole.
        self.queue("AFR_OTA-small2", None, files=[{"data": image, "filesize": 2 * 32768 + 5}],
                   protocols=["MQTT"])
        self.assert_failed("AFR_OTA-small2", "aborted: 0x00000008",
                           r"stream file 0 holds more than the job's filesize of %d bytes: block 2 is 32768 bytes, "
                           r"expected 5;" % (2 * 32768 + 5), timeout=20)

    def test_non_https_url_is_refused_with_its_reason(self):
        image = secrets.token_bytes(4 * KIB)
        for n, url in enumerate(["file:///etc/shadow", "http://127.0.0.1/fw.bin?X-Amz-Signature=secret", "ftp:x"]):
            info = self.queue("AFR_OTA-url%d" % n, image, protocols=["HTTP"])
            doc = info["document"]()
            self.service.cancel_job(self.thing, "AFR_OTA-url%d" % n)
            doc["afr_ota"]["files"][0]["update_data_url"] = url
            self.service.queue_job(self.thing, "AFR_OTA-url%db" % n, doc)
            if not self.otad:
                self.start_otad()
            details = self.assert_failed("AFR_OTA-url%db" % n, "aborted: 0x0000000d",
                                         r"^job document: files\[0\]\.update_data_url: only https:// URLs are "
                                         r"accepted, not ")
            self.assertNotIn("secret", details["detail"], "the URL's query is a credential")
        self.assertEqual(self.https_served(), 0)

    def test_filesize_smaller_than_https_object(self):
        image = secrets.token_bytes(200 * KIB + 100)
        self.start_otad(ota={"http_retries": 1})
        self.queue("AFR_OTA-hsmall", None, files=[{"data": image, "filesize": len(image) - 1000}],
                   protocols=["HTTP"])
        # More bytes than filesize are never written past it.
        self.assert_failed("AFR_OTA-hsmall", "aborted: 0x00000008", r"files\[0\]: .*filesize")

    def test_some_bad_blocks_are_dropped_and_fetched_again(self):
        image = secrets.token_bytes(2 * MIB + 333)
        block = 4096
        self.start_otad(ota={"block_size": block})
        info = self.queue("AFR_OTA-somebad", image, protocols=["MQTT"])
        self.service.set_faults(self.thing, info["stream_id"], corrupt_size=0.05, bad_index=0.05, seed=5)
        self.assertEqual(self.wait_terminal("AFR_OTA-somebad", 90), "SUCCEEDED", self.otad.log()[-3000:])
        self.assert_landed(image)
        self.assert_verified_log(image)
        m = re.search(r"Stream file 0 complete: .* (\d+) bad", "\n".join(self.otad.grep("Stream file 0 complete")))
        self.assertTrue(m)
        self.assertGreater(int(m.group(1)), 0, "the stand-in corrupted blocks, otad must have seen them")
        self.assertTrue(self.otad.grep(r"l differs from the payload length"))
        self.assertTrue(self.otad.grep(r"index beyond the file"))

    def test_only_bad_blocks_ends_by_momentum(self):
        image = secrets.token_bytes(256 * KIB)
        self.start_otad(ota={"request_timeout": 1, "momentum": 4})
        info = self.queue("AFR_OTA-allbad", image, protocols=["MQTT"])
        self.service.set_faults(self.thing, info["stream_id"], corrupt_size=0.5, bad_index=1.0, seed=2)
        t0 = time.monotonic()
        self.assert_failed("AFR_OTA-allbad", "aborted: 0x0000000e", r"no new block after 4 requests")
        self.assertLess(time.monotonic() - t0, 30)
        self.assertLessEqual(len(self.stream_requests()), 4)
        # otad gave up on the job, not on life: it still runs and takes jobs.
        self.assertTrue(self.otad.running())

    def test_window_wider_than_momentum(self):
        # Unpaced (a broker other than AWS IoT), a window of 16 requests
        # goes out before any block can arrive; a momentum limit of 4 must
        # not count that first window as requests without progress.
        image = secrets.token_bytes(2 * MIB)
        self.start_otad(ota={"block_size": 4096, "window": 16, "momentum": 4, "max_requests_per_second": 0})
        self.queue("AFR_OTA-wide", image, protocols=["MQTT"])
        self.assertEqual(self.wait_terminal("AFR_OTA-wide"), "SUCCEEDED", self.otad.log()[-3000:])
        self.assert_landed(image)

    def test_unknown_stream_is_rejected(self):
        image = secrets.token_bytes(64 * KIB)
        info = self.queue("AFR_OTA-nostream", image, protocols=["MQTT"])
        self.service.streams.delete(info["stream_id"])
        self.start_otad()
        self.assert_failed("AFR_OTA-nostream", "aborted: 0x00000008", r"ResourceNotFound")
        rejected = [q for q in self.stream_requests() if q["fields"].get("rejected")]
        self.assertEqual([q["fields"]["rejected"] for q in rejected], ["ResourceNotFound"],
                         "one rejection ends it: asking again cannot help")

    # protocol.md §4: a job listing only protocols the device cannot use
    # ends "aborted: 0x0000000d" (OTA-lib JOB_DOC_INVALID_PROTOCOL).
    def test_no_usable_protocol(self):
        image = secrets.token_bytes(4 * KIB)
        # A real document to start from; its own job is withdrawn at once.
        info = self.queue("AFR_OTA-xyz", image, protocols=["MQTT"])
        doc = info["document"]()
        self.service.cancel_job(self.thing, "AFR_OTA-xyz")
        doc["afr_ota"]["protocols"] = ["XYZ"]
        self.service.queue_job(self.thing, "AFR_OTA-xyz2", doc)
        self.start_otad()
        self.assert_failed("AFR_OTA-xyz2", "aborted: 0x0000000d", r"protocol")

    def test_files_are_routed_by_filepath_to_their_targets(self):
        config, payload = secrets.token_bytes(20 * KIB), secrets.token_bytes(300 * KIB)
        other = os.path.join(self.stack.workdir, self.thing + "-config")
        os.makedirs(other)
        self.start_otad(sections={
            "target.app": {"type": "file", "directory": self.out, "match_filepath": "app-*.bin"},
            "target.config": {"type": "file", "directory": other, "match_filepath": "*.json"},
        })
        self.queue("AFR_OTA-two", None, files=[{"data": payload, "filepath": "app-2.0.bin", "fileid": 0},
                                               {"data": config, "filepath": "settings.json", "fileid": 1}])
        self.assertEqual(self.wait_terminal("AFR_OTA-two"), "SUCCEEDED", self.otad.log()[-3000:])
        self.assertEqual(open(os.path.join(self.out, "app"), "rb").read(), payload)
        self.assertEqual(open(os.path.join(other, "config"), "rb").read(), config)
        # Two files for one target would overwrite each other: refused.
        self.queue("AFR_OTA-clash", None, files=[{"data": payload, "filepath": "app-2.0.bin", "fileid": 0},
                                                 {"data": config, "filepath": "app-2.1.bin", "fileid": 1}])
        self.assertEqual(self.wait_terminal("AFR_OTA-clash"), "FAILED")
        details = self.final_details("AFR_OTA-clash")
        self.assertEqual(details["reason"], "0x000000e4: 0x00000011")
        self.assertIn("both go to [target.app]", details["detail"])

    # ---- 4. kill -9 and resume ------------------------------------------

    def test_another_job_after_a_restart_discards_the_partial_file(self):
        image = secrets.token_bytes(8 * MIB)
        self.start_otad(ota={"block_size": 32768})
        self.queue("AFR_OTA-old", image, protocols=["MQTT"])
        fired = threading.Event()
        self.kill_when_served(2 * MIB, fired)
        self.assertTrue(fired.wait(60), "kill point not reached")
        self.assertEqual(self.otad.wait_exit(10), -signal.SIGKILL)
        self.assertTrue([n for n in os.listdir(self.out) if n.endswith(".otad-partial")], "a partial file to discard")
        self.service.cancel_job(self.thing, "AFR_OTA-old")
        new = secrets.token_bytes(64 * KIB)
        self.queue("AFR_OTA-new", new, protocols=["MQTT"])
        self.restart_otad()
        self.assertEqual(self.wait_terminal("AFR_OTA-new"), "SUCCEEDED")
        self.assert_landed(new)  # and nothing of the old job left beside it
        self.assertTrue(self.otad.grep("Discarding the progress of job AFR_OTA-old"))

    def test_kill9_three_times_during_50mib_mqtt(self):
        # A stream file holds at most 24 MB at AWS; one long transfer is
        # what this test needs (multi-part images have their own test).
        streams_mod.MAX_FILE = 64 * MIB
        image = secrets.token_bytes(50 * MIB)
        block = 32768
        self.start_otad(ota={"block_size": block})
        self.queue("AFR_OTA-kill", image, protocols=["MQTT"])
        kills = [10 * MIB, 15 * MIB, 15 * MIB]   # 10, ~25 and ~40 MiB served
        for n, nbytes in enumerate(kills):
            fired = threading.Event()
            self.kill_when_served(nbytes, fired)
            self.assertTrue(fired.wait(60), "kill point %d not reached" % n)
            self.assertEqual(self.otad.wait_exit(10), -signal.SIGKILL)
            self.assertEqual(self.target_files(), [".app-AFR_OTA-kill.otad-partial"])
            self.assertEqual(self.service.job_status(self.thing, "AFR_OTA-kill"), "IN_PROGRESS")
            self.restart_otad()
        self.assertEqual(self.wait_terminal("AFR_OTA-kill", 120), "SUCCEEDED", self.otad.log()[-3000:])
        self.assert_landed(image)
        self.assert_verified_log(image)
        # Each restart resumed with what the previous run had made durable.
        resumed = [int(m) for m in re.findall(r"Fetching stream \S+ file 0: \d+ bytes in \d+ blocks of \d+, "
                                              r"(\d+) already received", self.otad.log())]
        self.assertEqual(len(resumed), 4, resumed)
        self.assertEqual(resumed[0], 0)
        self.assertTrue(resumed[1] > 0 and resumed == sorted(resumed), resumed)
        self.assertEqual(len(self.otad.grep(r"Resuming job AFR_OTA-kill")), 3)
        # What a restart costs: the blocks in flight (one window of requests,
        # window x 128 KiB) plus those received since the last checkpoint
        # (< 1 MiB). Everything served beyond the image is that waste.
        nblocks = blocks(len(image), block)
        served_blocks = self.mqtt_served() // block
        per_restart = (BASE_OTA["window"] * REQUEST_BYTES + CHECKPOINT_BYTES) // block
        waste = served_blocks - nblocks
        sys.stderr.write("# kill -9 x3, MQTT: %d blocks served for %d (%d re-served, bound %d)\n"
                         % (served_blocks, nblocks, waste, len(kills) * per_restart))
        self.assertGreaterEqual(waste, 0)
        self.assertLess(waste, len(kills) * per_restart)

    def test_kill9_three_times_during_50mib_https(self):
        image = secrets.token_bytes(50 * MIB)
        # A 10 MiB/s link: on loopback the 50 MiB would pass in half a
        # second, faster than otad's checkpoints (http.c persists once a
        # second once 1 MiB came in, at most 10 s apart).
        rate = 10 * MIB
        relay = self.use_relay(rate)
        self.start_otad()
        self.queue("AFR_OTA-killh", image, protocols=["HTTP"])
        kills = [12 * MIB, 15 * MIB, 15 * MIB]   # each run lasts > 1 s
        for n, nbytes in enumerate(kills):
            fired = threading.Event()

            def kill(pid=self.otad.pid, fired=fired):
                os.kill(pid, signal.SIGKILL)
                fired.set()

            relay.when_forwarded(nbytes, kill)
            self.assertTrue(fired.wait(60), "kill point %d not reached" % n)
            self.assertEqual(self.otad.wait_exit(10), -signal.SIGKILL)
            self.assertEqual(self.target_files(), [".app-AFR_OTA-killh.otad-partial"])
            self.restart_otad()
        self.assertEqual(self.wait_terminal("AFR_OTA-killh", 120), "SUCCEEDED", self.otad.log()[-3000:])
        self.assert_landed(image)
        self.assert_verified_log(image)
        # A killed GET is recorded once the server notices the reset.
        self.service.record.wait_until(lambda rec: len(self.http_gets()) >= 4, 10)
        gets = self.http_gets()
        self.assertEqual([g["status"] for g in gets], [206] * 4, gets)
        starts = [int(re.match(r"bytes=(\d+)-", g["range"]).group(1)) for g in gets]
        self.assertEqual(starts[0], 0)
        self.assertTrue(all(a < b for a, b in zip(starts, starts[1:])), "each restart resumed further on: %r" % starts)
        # What a restart costs: what came in since the last checkpoint (at
        # most a second's worth at the link rate, plus the chunk being
        # written) and what was on its way (curl's 128 KiB buffer, the
        # socket): per restart < rate x 1 s + 1 MiB, counted at the relay.
        forwarded = list(relay.forwarded)
        self.assertEqual(len(forwarded), 4, forwarded)
        waste = [forwarded[i] - (starts[i + 1] - starts[i]) for i in range(3)]
        sys.stderr.write("# kill -9 x3, HTTPS at %d MiB/s: resumed at %s, re-downloaded %s bytes; "
                         "the server wrote %d bytes for %d\n"
                         % (rate // MIB, starts, waste, self.https_served(), len(image)))
        for w in waste:
            self.assertGreaterEqual(w, 0)
            self.assertLess(w, rate * 1 + CHECKPOINT_BYTES)
        # The relay counts TLS bytes: records add well under 1 %.
        self.assertAlmostEqual(sum(forwarded) - sum(waste), len(image), delta=len(image) // 100)

    # ---- 4b. kill -9 faster than any timed checkpoint -------------------

    def kill_every_second(self, job_id, image, protocols, kills, seed):
        """Kills otad kills times, each 0.3-1.6 s (seeded) after it was
        started, then lets the job finish. Returns the kills that were done
        (the loop stops early when the job ended)."""
        rng = random.Random(seed)
        self.queue(job_id, image, protocols=protocols)
        done = 0
        for _ in range(kills):
            time.sleep(rng.uniform(0.3, 1.6))
            if self.service.job_status(self.thing, job_id) != "IN_PROGRESS" and done > 0:
                break
            self.otad.kill9()
            done += 1
            self.restart_otad()
        self.assertEqual(self.wait_terminal(job_id, 240), "SUCCEEDED", self.otad.log()[-3000:])
        self.assert_landed(image)
        return done

    def report_refetched(self, what, kills, served, image, bound):
        refetched = served - len(image)
        sys.stderr.write("# kill -9 every 0.3-1.6 s, %s: %d kills, %d bytes served for %d, "
                         "re-fetched %d bytes = %d KiB per kill (bound %d KiB)\n"
                         % (what, kills, served, len(image), refetched, refetched // max(kills, 1) // KIB,
                            bound // KIB))
        self.assertGreater(kills, 5, "too few kills landed to measure anything")
        self.assertGreaterEqual(refetched, 0)
        self.assertLess(refetched, kills * bound)

    def test_kill9_every_second_mqtt_aws_caps(self):
        # The stand-in's AWS caps: 512 KiB/s and 100 publishes/s per
        # connection, so each run gets a few hundred KiB at most.
        self.service.set_aws_caps(self.thing)
        image = secrets.token_bytes(8 * MIB)
        self.start_otad()
        kills = self.kill_every_second("AFR_OTA-kcap", image, ["MQTT"], 20, seed=9)
        # Lost per kill: what was in flight and what arrived since the last
        # record (at most one request's worth). otad keeps the window full
        # and the cap drains it evenly, so on average half a window is
        # queued at a kill, which the stand-in still serves to no one (AWS
        # would drop it with the connection). Before records by amount, a
        # kill lost everything since the last timed checkpoint: 435 KiB.
        bound = BASE_OTA["window"] * REQUEST_BYTES // 2 + REQUEST_BYTES
        self.report_refetched("MQTT with AWS caps", kills, self.mqtt_served(), image, bound)

    def test_kill9_every_second_mqtt_uncapped(self):
        image = secrets.token_bytes(24 * MIB)
        # otad's default pace, 20 requests/s: about 2.5 MiB/s.
        self.start_otad(ota={"max_requests_per_second": 20})
        kills = self.kill_every_second("AFR_OTA-kfree", image, ["MQTT"], 20, seed=11)
        # Uncapped, each request is answered at once: about one in flight,
        # plus at most one request's worth since the last record. Before:
        # 554 KiB per kill.
        bound = 2 * REQUEST_BYTES
        self.report_refetched("MQTT uncapped", kills, self.mqtt_served(), image, bound)

    def test_kill9_every_second_https(self):
        image = secrets.token_bytes(24 * MIB)
        # A 4 MiB/s link, so that each run gets a few MiB.
        relay = self.use_relay(4 * MIB)
        self.start_otad()
        kills = self.kill_every_second("AFR_OTA-khttp", image, ["HTTP"], 10, seed=13)
        # Lost per kill: what came since the last record (256 KiB at most)
        # and what was on its way (curl's 128 KiB buffer, the sockets).
        # Counted at the relay: the server's count overstates by its socket
        # buffers. TLS records add well under 1 %. Before: 942 KiB per kill,
        # every run started from 0.
        bound = 512 * KIB
        self.report_refetched("HTTPS at 4 MiB/s", kills, sum(relay.forwarded) - len(image) // 100, image, bound)

    # ---- 5. an expired presigned URL ------------------------------------

    def test_expired_url_is_refreshed_and_download_continues(self):
        image = secrets.token_bytes(20 * MIB)
        relay = self.use_relay(20 * MIB)
        self.start_otad()
        self.queue("AFR_OTA-expire", image, protocols=["HTTP"])
        fired = threading.Event()

        def expire_and_cut():
            # The URL expires while the GET runs; then the connection drops,
            # so the retry meets the expiry.
            self.service.expire_urls()
            relay.cut()
            fired.set()

        relay.when_forwarded(4 * MIB, expire_and_cut)
        self.assertTrue(fired.wait(60))
        self.assertEqual(self.wait_terminal("AFR_OTA-expire", 90), "SUCCEEDED", self.otad.log()[-3000:])
        self.assert_landed(image)
        gets = self.http_gets()
        self.assertEqual([g["status"] for g in gets], [206, 403, 206], gets)
        start = int(re.match(r"bytes=(\d+)-", gets[2]["range"]).group(1))
        self.assertEqual(gets[1]["range"], gets[2]["range"], "the refused range was asked for again")
        # Continued where it stopped: what reached otad before the cut,
        # less what the reset connection dropped on the floor.
        forwarded = list(relay.forwarded)
        sys.stderr.write("# expired URL: %d bytes reached otad before the cut, resumed at %d\n"
                         % (forwarded[0], start))
        self.assertGreater(start, 1 * MIB, "the download continued, not from zero")
        self.assertLessEqual(start, forwarded[0])
        self.assertLess(sum(forwarded), len(image) + 1 * MIB)
        self.assertTrue(self.otad.grep(r"Presigned URL refused, asking the service for the job again"))
        nexts = [q for q in self.service.record.requests(self.thing, "jobs/describe") if "$next" in q["topic"]]
        self.assertGreaterEqual(len(nexts), 1, "otad asked for the job (and a fresh URL) again")

    # ---- 6. a multi-part image ------------------------------------------

    def test_60mib_image_in_parts(self):
        image = secrets.token_bytes(60 * MIB)
        part = 16 * MIB          # the OTA Update Manager's cap per file
        block = 131072
        self.start_otad(ota={"block_size": block})
        self.queue("AFR_OTA-parts", image, protocols=["MQTT"], split_bytes=part,
                   part_fields=lambda i, off, data: {"filepath": "rootfs.img#part=%d/%d" % (off, len(image))})
        # A power cut in the second part: the first stays done, the second
        # resumes from its own block map.
        fired = threading.Event()
        self.kill_when_served(24 * MIB, fired)
        self.assertTrue(fired.wait(60), "kill point not reached")
        self.assertEqual(self.otad.wait_exit(10), -signal.SIGKILL)
        self.restart_otad()
        self.assertEqual(self.wait_terminal("AFR_OTA-parts", 120), "SUCCEEDED", self.otad.log()[-3000:])
        self.assert_landed(image)
        self.assertTrue(self.otad.grep(r"Resuming job AFR_OTA-parts at files\[1\]"))
        nparts = blocks(len(image), part)
        for i in range(nparts):
            data = image[i * part:(i + 1) * part]
            self.assertTrue(self.otad.grep(r"files\[%d\] verified: sha256 %s" % (i, sha256(data))))
        self.assertEqual(self.final_details("AFR_OTA-parts")["detail"], "%d file(s) installed" % nparts)
        # Each part fetched once, plus what one restart costs (one window of
        # requests and one checkpoint interval, as in the kill -9 tests).
        self.assertGreaterEqual(self.mqtt_served(), len(image))
        self.assertLess(self.mqtt_served(), len(image) + BASE_OTA["window"] * REQUEST_BYTES + CHECKPOINT_BYTES)
        self.assertEqual(sorted({q["fields"]["f"] for q in self.stream_requests()}), list(range(nparts)))
        # One "installed" for the one image.
        self.assertEqual(len(self.otad.grep(r"installed .*/app")), 1)

    # ---- 7. cancel mid-transfer -----------------------------------------

    def test_cancel_mid_transfer_then_next_job(self):
        first = secrets.token_bytes(10 * MIB)
        second = secrets.token_bytes(1 * MIB + 5)
        self.start_otad(ota={"max_requests_per_second": 20})
        self.queue("AFR_OTA-cancel", first, protocols=["MQTT"])
        self.queue("AFR_OTA-after", second, protocols=["MQTT"])
        self.service.cancel_job_after(self.thing, "AFR_OTA-cancel", 2 * MIB)
        self.assertEqual(self.wait_terminal("AFR_OTA-cancel"), "CANCELED")
        self.assertEqual(self.wait_terminal("AFR_OTA-after"), "SUCCEEDED", self.otad.log()[-3000:])
        self.assert_landed(second)
        self.assertTrue(self.otad.grep(r"Job AFR_OTA-cancel was cancelled or removed; stopping its update"))
        # The first download stopped: far less than its 10 MiB was served.
        self.assertLess(self.mqtt_served(), 5 * MIB + len(second))
        # Nothing of the cancelled job was reported after the cancel.
        ups = self.updates("AFR_OTA-cancel")
        self.assertFalse([u for u in ups if u["status"] in ("SUCCEEDED", "FAILED")])
        self.assert_success_updates("AFR_OTA-after", blocks(len(second), 32768))


if __name__ == "__main__":
    unittest.main()

#!/usr/bin/python3
"""src/stream.c alone, through tests/stream-fetch, over a real TLS MQTT
session to the local AWS IoT stand-in (tests/standin): the bytes that land
must be the stream file's bytes whatever the service does to the blocks,
rejections end the transfer with the documented reason, and a kill -9
mid-way costs at most one request window plus one checkpoint interval.

Run: /usr/bin/python3 tests/standin/tap.py tests/integration/test_stream_fetch.py
(OTAD_BUILD_ROOT names the meson build directory.)
"""

import os
import re
import secrets
import subprocess
import sys
import time
import unittest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "standin"))

import harness  # noqa: E402
import streams as streams_mod  # noqa: E402

BUILD = os.environ.get("OTAD_BUILD_ROOT", os.path.join(os.path.dirname(__file__), "../../build"))
FETCH = os.path.join(BUILD, "tests", "stream-fetch")
KIB = 1024
MIB = 1024 * KIB
SIG = "MEQCIF2QDvww1G/kpRGZ8FYvQrok1bSZvXjXefRk7sqNcyPTAiB4dvGt8fozIY5NC0vUDJ2MY42ZERYEcrbwA4n6q7vrBg=="
RESULT_RE = re.compile(r"^stream-fetch: result=(-?\d+) reason=(.*?) blocks_received=(\d+) blocks_resumed=(\d+) "
                       r"duplicates=(\d+) bad_blocks=(\d+) requests=(\d+) timeouts=(\d+) rejections=(\d+) "
                       r"block_size=(\d+)$", re.M)


def parse_result(text):
    m = RESULT_RE.search(text)
    if not m:
        raise AssertionError("no result line in:\n" + text[-3000:])
    keys = ("result", "reason", "blocks_received", "blocks_resumed", "duplicates", "bad_blocks",
            "requests", "timeouts", "rejections", "block_size")
    out = dict(zip(keys, m.groups()))
    for k in keys:
        if k != "reason":
            out[k] = int(out[k])
    return out


class StreamFetchBase(unittest.TestCase):
    """One stack per class; every test has its own thing and stream."""

    n = 0

    @classmethod
    def setUpClass(cls):
        if not os.access(FETCH, os.X_OK):
            raise unittest.SkipTest("%s not built" % FETCH)
        cls.stack = harness.Stack(things=[])
        cls.stack.__enter__()

    @classmethod
    def tearDownClass(cls):
        cls.stack.__exit__(None, None, None)

    def setUp(self):
        StreamFetchBase.n += 1
        self.thing = "sf-thing-%d" % StreamFetchBase.n
        self.stack.add_thing(self.thing)
        self.service = self.stack.service
        self.dir = os.path.join(self.stack.workdir, self.thing)
        os.makedirs(self.dir)
        self.out = os.path.join(self.dir, "file.bin")
        self.state = os.path.join(self.dir, "progress")
        self.max_block = streams_mod.MAX_BLOCK
        self.select_blocks = streams_mod.select_blocks

    def tearDown(self):
        streams_mod.MAX_BLOCK = self.max_block
        streams_mod.select_blocks = self.select_blocks

    def reject_requests(self, code, message, count):
        """The stand-in answers the next `count` GetStream requests of this
        test's thing's stream with a rejection instead of blocks."""
        real, left = self.select_blocks, [count]

        def select(stream, req):
            if stream is not None and stream.id.startswith("AFR_OTA-sf-%d" % StreamFetchBase.n) and left[0] > 0:
                left[0] -= 1
                raise streams_mod.StreamError(code, message, req.get("c"))
            return real(stream, req)
        streams_mod.select_blocks = select

    def make_stream(self, size, file_id=0):
        data = secrets.token_bytes(size)
        stream_id = "AFR_OTA-sf-%d" % StreamFetchBase.n
        self.service.create_stream(stream_id, {file_id: data})
        return stream_id, data

    def argv(self, stream_id, size, ota=None, file_id=0, signature=SIG, job_id="AFR_OTA-job", mqtt=None):
        sections = {"ota": dict({"block_size": 4096, "window": 4, "max_requests_per_second": 100,
                                 "request_timeout": 2, "momentum": 32}, **(ota or {})),
                    "mqtt": dict({"reconnect_min": 1, "reconnect_max": 2}, **(mqtt or {}))}
        config = self.stack.write_otad_config(self.thing, sections)
        return [FETCH, "-c", config, "--stream", stream_id, "--file-id", str(file_id), "--size", str(size),
                "--out", self.out, "--state", self.state, "--job-id", job_id, "--signature", signature]

    def fetch(self, argv, timeout=120):
        p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        with open(os.path.join(self.dir, "fetch-%d.log" % time.monotonic_ns()), "w") as f:
            f.write(p.stderr)
        r = parse_result(p.stdout)
        self.assertEqual(p.returncode, 0 if r["result"] == 0 else 1, p.stdout)
        r["stderr"] = p.stderr
        return r

    def data_messages(self):
        return [e for e in self.service.record.sent(self.thing) if e["topic"].endswith("/data/cbor")]

    def assert_file(self, data):
        with open(self.out, "rb") as f:
            got = f.read()
        self.assertEqual(len(got), len(data))
        self.assertTrue(got == data, "file content differs from the stream file")



class StreamFetchTest(StreamFetchBase):
    # ---- clean transfers -------------------------------------------------

    def test_plain_transfer(self):
        stream_id, data = self.make_stream(1 * MIB + 1234)
        r = self.fetch(self.argv(stream_id, len(data)))
        self.assertEqual(r["result"], 0, r["reason"])
        self.assert_file(data)
        nblocks = (len(data) + 4095) // 4096
        self.assertEqual(r["blocks_received"], nblocks)
        self.assertEqual(r["bad_blocks"], 0)
        self.assertEqual(len(self.data_messages()), nblocks, "each block served exactly once")
        # Requests follow the reference agent's shape and AWS's caps.
        reqs = self.service.record.requests(self.thing, "streams/get")
        self.assertTrue(reqs)
        for q in reqs:
            f = q["fields"]
            self.assertEqual(f["c"], "rdy")
            self.assertEqual(f["l"], 4096)
            self.assertLessEqual(f["n"] * f["l"], 128 * KIB)
            self.assertNotIn("rejected", f)
        self.assertEqual(len(reqs), r["requests"])

    def test_file_id_and_large_blocks(self):
        stream_id, data = self.make_stream(300 * KIB + 7, file_id=3)
        r = self.fetch(self.argv(stream_id, len(data), ota={"block_size": 131072}, file_id=3))
        self.assertEqual(r["result"], 0, r["reason"])
        self.assertEqual(r["block_size"], 131072)
        self.assert_file(data)
        for q in self.service.record.requests(self.thing, "streams/get"):
            self.assertEqual(q["fields"]["f"], 3)
            self.assertEqual(q["fields"]["n"], 1)

    def test_aws_caps_no_spurious_requests(self):
        # 512 KiB/s and 100 publishes/s: blocks queue up behind each other,
        # which must not look like loss (no duplicates, no re-requests).
        self.service.set_aws_caps(self.thing)
        try:
            stream_id, data = self.make_stream(1 * MIB)
            t0 = time.monotonic()
            r = self.fetch(self.argv(stream_id, len(data), ota={"block_size": 65536, "request_timeout": 10}))
            elapsed = time.monotonic() - t0
        finally:
            self.service.set_aws_caps(self.thing, enabled=False)
        self.assertEqual(r["result"], 0, r["reason"])
        self.assert_file(data)
        self.assertEqual((r["duplicates"], r["timeouts"], r["requests"]), (0, 0, 8), r)
        sys.stdout.write("# AWS caps, 64 KiB blocks: %.0f KiB/s (cap 512)\n" % (len(data) / elapsed / KIB))

    # ---- faults ------------------------------------------------------------

    def test_drop_duplicate_reorder(self):
        stream_id, data = self.make_stream(2 * MIB)
        self.service.set_faults(self.thing, stream_id, drop=0.05, duplicate=0.05, reorder=0.3, seed=7)
        r = self.fetch(self.argv(stream_id, len(data)))
        self.assertEqual(r["result"], 0, r["reason"])
        self.assert_file(data)
        self.assertGreater(r["duplicates"], 0)
        nblocks = len(data) // 4096
        # Duplicates cause no request storm: requests stay near the minimum.
        self.assertLess(r["requests"], 3 * nblocks / 32 + 20, r)

    def test_bad_blocks_dropped_never_written(self):
        stream_id, data = self.make_stream(1 * MIB)
        self.service.set_faults(self.thing, stream_id, corrupt_size=0.05, bad_index=0.05, wrong_file=0.05,
                                seed=3)
        r = self.fetch(self.argv(stream_id, len(data)))
        self.assertEqual(r["result"], 0, r["reason"])
        self.assertGreater(r["bad_blocks"], 0)
        self.assert_file(data)

    def test_tail_loss_recovered_before_timeout(self):
        stream_id, data = self.make_stream(1 * MIB)
        nblocks = len(data) // 4096
        # The last block and a whole request's worth in the middle get lost once.
        self.service.set_faults(self.thing, stream_id, drop_once=[nblocks - 1] + list(range(96, 128)))
        t0 = time.monotonic()
        r = self.fetch(self.argv(stream_id, len(data), ota={"request_timeout": 20}))
        elapsed = time.monotonic() - t0
        self.assertEqual(r["result"], 0, r["reason"])
        self.assert_file(data)
        self.assertEqual(r["timeouts"], 0, r)
        self.assertLess(elapsed, 10, "lost blocks were re-requested without waiting for request_timeout")

    def test_every_block_bad_ends_by_momentum(self):
        stream_id, data = self.make_stream(64 * KIB)
        self.service.set_faults(self.thing, stream_id, corrupt_size=1.0)
        t0 = time.monotonic()
        r = self.fetch(self.argv(stream_id, len(data), ota={"request_timeout": 1, "momentum": 6}), timeout=60)
        self.assertNotEqual(r["result"], 0)
        self.assertIn("no new block after 6 requests", r["reason"])
        self.assertEqual(r["blocks_received"], 0)
        self.assertLess(time.monotonic() - t0, 30)
        with open(self.out, "rb") as f:
            self.assertEqual(f.read(), b"", "nothing written from bad blocks")

    # ---- rejections ----------------------------------------------------------

    def test_unknown_stream_rejected(self):
        r = self.fetch(self.argv("AFR_OTA-no-such-stream", 10000))
        self.assertNotEqual(r["result"], 0)
        # What the service said, and what it could not match.
        self.assertEqual(r["reason"], "stream rejected: ResourceNotFound: Stream not found (the job names file 0 of "
                         "stream AFR_OTA-no-such-stream, which the service does not have)")

    def test_unknown_file_rejected(self):
        stream_id, data = self.make_stream(10000)
        r = self.fetch(self.argv(stream_id, len(data), file_id=9))
        self.assertNotEqual(r["result"], 0)
        self.assertIn("stream rejected: ResourceNotFound", r["reason"])

    def test_unauthorized_ends_with_reason(self):
        stream_id, data = self.make_stream(64 * KIB)
        self.reject_requests("Unauthorized", "Role cannot read the S3 object", 1000)
        r = self.fetch(self.argv(stream_id, len(data)))
        self.assertNotEqual(r["result"], 0)
        self.assertEqual(r["reason"], "stream rejected: Unauthorized: Role cannot read the S3 object "
                         "(the stream's role cannot read the file it names)")
        self.assertEqual(r["blocks_received"], 0)

    def test_throttled_backs_off_and_completes(self):
        stream_id, data = self.make_stream(256 * KIB)
        self.reject_requests("RequestThrottled", "Rate exceeded", 3)
        t0 = time.monotonic()
        r = self.fetch(self.argv(stream_id, len(data)))
        self.assertEqual(r["result"], 0, r["reason"])
        self.assert_file(data)
        self.assertEqual(r["rejections"], 3)
        # Requests are paced, so each retry meets the next rejection: backed
        # off at least 1 s each (backoff.h: up to 1, 2, 4 s with jitter)
        # instead of hammering the service.
        elapsed = time.monotonic() - t0
        self.assertGreater(elapsed, 2.9)
        self.assertLess(elapsed, 15)
        self.assertLess(r["requests"], 20, r)

    def test_block_size_out_of_bounds_halves(self):
        streams_mod.MAX_BLOCK = 8192
        stream_id, data = self.make_stream(512 * KIB + 100)
        r = self.fetch(self.argv(stream_id, len(data), ota={"block_size": 32768}))
        self.assertEqual(r["result"], 0, r["reason"])
        self.assertEqual(r["block_size"], 8192)
        self.assertGreaterEqual(r["rejections"], 2)
        self.assert_file(data)
        sizes = [q["fields"]["l"] for q in self.service.record.requests(self.thing, "streams/get")]
        self.assertEqual(sizes[0], 32768)
        self.assertEqual(sizes[-1], 8192)

    # ---- resume --------------------------------------------------------------

    def test_kill9_resumes_with_bounded_rework(self):
        size = 8 * MIB
        stream_id, data = self.make_stream(size)
        # Slow enough to kill mid-way: 100 requests/s of 128 KiB at most.
        argv = self.argv(stream_id, size, ota={"max_requests_per_second": 20})
        nblocks = size // 4096
        for kill_at in (2 * MIB, 5 * MIB):
            served = self.service.record.bytes_served(self.thing, "mqtt")
            p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            try:
                self.assertTrue(self.service.record.wait_until(
                    lambda rec: rec.bytes_served(self.thing, "mqtt") >= kill_at, 60))
                # Let the checkpoint timer fire at least once after the burst.
                time.sleep(0.3)
            finally:
                p.kill()
                p.wait()
            self.assertGreater(served + 0, -1)
        r = self.fetch(argv)
        self.assertEqual(r["result"], 0, r["reason"])
        self.assert_file(data)
        self.assertGreater(r["blocks_resumed"], 0)
        served_blocks = len(self.data_messages())
        rework = served_blocks - nblocks
        # Per restart at most one window (4 requests of 32 blocks) plus one
        # checkpoint interval (1 MiB = 256 blocks; 1 s holds more at 20 requests/s).
        per_restart = 4 * 32 + 256
        self.assertLessEqual(rework, 2 * per_restart, "re-downloaded %d blocks" % rework)
        sys.stdout.write("# kill -9 twice: %d of %d blocks served again\n" % (rework, nblocks))

    def test_record_of_another_job_is_discarded(self):
        stream_id, data = self.make_stream(256 * KIB)
        r = self.fetch(self.argv(stream_id, len(data)))
        self.assertEqual(r["result"], 0)
        # Same state path, other signature: the old progress must not count.
        r = self.fetch(self.argv(stream_id, len(data), signature="MEUCIQ=="))
        self.assertEqual(r["result"], 0)
        self.assertEqual(r["blocks_resumed"], 0)
        self.assertIn("Discarding progress record", r["stderr"])
        # Same identity again: complete record, nothing fetched.
        before = len(self.data_messages())
        r = self.fetch(self.argv(stream_id, len(data), signature="MEUCIQ=="))
        self.assertEqual(r["result"], 0)
        self.assertEqual(r["blocks_resumed"], 64)
        self.assertEqual(len(self.data_messages()), before)
        self.assert_file(data)


class StreamReconnectTest(StreamFetchBase):
    """A broker restart mid-transfer, on a stack of its own: the stand-in's
    own reconnect must not take the other tests down with it."""

    def test_broker_restart_mid_transfer(self):
        stream_id, data = self.make_stream(4 * MIB)
        argv = self.argv(stream_id, len(data), ota={"max_requests_per_second": 10})
        p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            self.assertTrue(self.service.record.wait_until(
                lambda rec: rec.bytes_served(self.thing, "mqtt") >= 1 * MIB, 60))
            self.service.restart_broker(down_seconds=1.0)
            out, err = p.communicate(timeout=120)
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
        r = parse_result(out)
        self.assertEqual(r["result"], 0, r["reason"] + err[-2000:])
        self.assert_file(data)
        self.assertGreater(r["blocks_received"], 0)


if __name__ == "__main__":
    unittest.main()

#!/usr/bin/python3
"""src/stream.c alone, through tests/stream-fetch, over a real TLS MQTT
session to the local AWS IoT stand-in (tests/standin): the bytes that land
must be the stream file's bytes whatever the service does to the blocks,
rejections end the transfer with the documented reason, and a kill -9
mid-way costs at most one request window plus one checkpoint interval.
With wanted ranges (StreamRangesTest): only the wanted bytes are written,
the GetStream bitmaps name exactly the blocks that hold them, and a kill -9
costs at most one window and one record interval of them.

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
import wanted_ranges  # noqa: E402

BUILD = os.environ.get("OTAD_BUILD_ROOT", os.path.join(os.path.dirname(__file__), "../../build"))
FETCH = os.path.join(BUILD, "tests", "stream-fetch")
KIB = 1024
MIB = 1024 * KIB
SIG = "MEQCIF2QDvww1G/kpRGZ8FYvQrok1bSZvXjXefRk7sqNcyPTAiB4dvGt8fozIY5NC0vUDJ2MY42ZERYEcrbwA4n6q7vrBg=="
RESULT_RE = re.compile(r"^stream-fetch: result=(-?\d+) reason=(.*?) blocks_received=(\d+) blocks_resumed=(\d+) "
                       r"duplicates=(\d+) bad_blocks=(\d+) requests=(\d+) timeouts=(\d+) rejections=(\d+) "
                       r"block_size=(\d+)$", re.M)


def parse_bytes(text):
    """The second result line: bytes_wanted=... bytes_outside=... as ints."""
    m = re.search(r"^stream-fetch: (bytes_wanted=.*)$", text, re.M)
    if not m:
        raise AssertionError("no bytes line in:\n" + text[-3000:])
    return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", m.group(1))}


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
        # Two requests a second: each rejection is back before the next
        # request leaves, also on a loaded machine (at 100 a second a second
        # request could leave first, and its rejection then rightly counts
        # as the same news, not as another back-off).
        r = self.fetch(self.argv(stream_id, len(data), ota={"max_requests_per_second": 2}))
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


class StreamRangesTest(StreamFetchBase):
    """Wanted ranges (download.h): the transport half of adaptive updates."""

    def ranges_argv(self, stream_id, size, ranges, **kw):
        path = os.path.join(self.dir, "ranges-%d" % time.monotonic_ns())
        wanted_ranges.write_file(path, ranges)
        return self.argv(stream_id, size, **kw) + ["--ranges", path]

    def fetch_ranges(self, argv, timeout=120):
        p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        with open(os.path.join(self.dir, "fetch-%d.log" % time.monotonic_ns()), "w") as f:
            f.write(p.stderr)
        r = parse_result(p.stdout)
        r.update(parse_bytes(p.stdout))
        self.assertEqual(p.returncode, 0 if r["result"] == 0 else 1, p.stdout)
        r["stderr"] = p.stderr
        return r

    def asked(self):
        """Per GetStream request of this thing: the blocks its bitmap names."""
        out = []
        for q in self.service.record.requests(self.thing, "streams/get"):
            f = q["fields"]
            b = bytes.fromhex(f["b"])
            out.append((f, [f["o"] + k for k in range(len(b) * 8) if b[k >> 3] & (1 << (k & 7))]))
        return out

    def assert_request_shape(self):
        for f, blocks in self.asked():
            self.assertEqual(f["n"], len(blocks), "n is the number of blocks asked for")
            self.assertLessEqual(f["n"] * f["l"], 128 * KIB, "at most 128 KiB per request")
            self.assertLess(len(bytes.fromhex(f["b"])), 12288)
            self.assertTrue(blocks and blocks[0] == f["o"] and blocks[-1] < f["o"] + 8 * len(bytes.fromhex(f["b"])))
            self.assertNotIn("rejected", f)

    def test_only_wanted_bytes_from_exactly_the_covering_blocks(self):
        size = 3 * MIB + 777
        stream_id, data = self.make_stream(size)
        # Chunk-like ranges, touching ones among them, and the file's last byte.
        ranges = wanted_ranges.chunk_like(size - 8192, seed=11, mean=12 * KIB, missing=0.3, run=2)
        ranges.append((size - 1, 1))
        wanted_ranges.prefill(self.out, size)
        r = self.fetch_ranges(self.ranges_argv(stream_id, size, ranges, ota={"block_size": 32768}))
        self.assertEqual(r["result"], 0, r["reason"])
        wanted_ranges.check_file(self, self.out, data, ranges)
        self.assertEqual((r["bytes_outside"], r["bytes_twice"]), (0, 0), "download.h's write contract")
        want = wanted_ranges.total(ranges)
        self.assertEqual((r["bytes_wanted"], r["bytes_written"], r["bytes_resumed"]), (want, want, 0))
        block = r["block_size"]
        self.assertIn(block, (4096, 8192, 16384, 32768), "a power of two from the floor to the configured size")
        blocks, cover_bytes = wanted_ranges.cover(ranges, size, block)
        asked = [b for _, bl in self.asked() for b in bl]
        self.assertEqual(sorted(asked), sorted(blocks), "the bitmaps name exactly the covering blocks, each once")
        self.assert_request_shape()
        self.assertEqual(len(self.data_messages()), len(blocks))
        self.assertEqual(self.service.record.bytes_served(self.thing, "mqtt"), cover_bytes)
        self.assertEqual(r["bytes_fetched"], cover_bytes)
        wire = sum(e["size"] for e in self.data_messages())
        self.assertEqual(r["bytes_on_wire"], wire, "the data messages as the stand-in sent them")
        sys.stdout.write("# %d bytes wanted in %d ranges: %d-byte blocks fetch %d bytes (%.3f x), %d with CBOR\n"
                         % (want, len(wanted_ranges.canonical(ranges)), block, cover_bytes, cover_bytes / want, wire))

    def test_sparse_wants_fill_each_request(self):
        # One byte every 64 KiB: 96 blocks far apart, 32 (128 KiB) per request.
        size = 6 * MIB
        stream_id, data = self.make_stream(size)
        ranges = [(i * 64 * KIB + 1000, 1) for i in range(96)]
        r = self.fetch_ranges(self.ranges_argv(stream_id, size, ranges, ota={"block_size": 4096}))
        self.assertEqual(r["result"], 0, r["reason"])
        self.assertEqual(r["block_size"], 4096)
        asked = self.asked()
        self.assertEqual(len(asked), 3, "96 wanted blocks in three requests of 32")
        for f, blocks in asked:
            self.assertEqual(f["n"], 32)
            self.assertGreater(len(bytes.fromhex(f["b"])), 32 // 8, "one bitmap spans the sparse blocks")
        self.assert_request_shape()
        with open(self.out, "rb") as f:
            got = f.read()
        for off, _ in ranges:
            self.assertEqual(got[off], data[off])

    def test_faults_with_ranges(self):
        size = 2 * MIB
        stream_id, data = self.make_stream(size)
        ranges = wanted_ranges.chunk_like(size, seed=3, mean=8 * KIB, missing=0.4, run=3)
        self.service.set_faults(self.thing, stream_id, drop=0.05, duplicate=0.05, reorder=0.3, corrupt_size=0.03,
                                bad_index=0.03, wrong_file=0.03, seed=9)
        wanted_ranges.prefill(self.out, size)
        r = self.fetch_ranges(self.ranges_argv(stream_id, size, ranges, ota={"block_size": 4096}))
        self.assertEqual(r["result"], 0, r["reason"])
        wanted_ranges.check_file(self, self.out, data, ranges)
        self.assertEqual((r["bytes_outside"], r["bytes_twice"]), (0, 0))
        self.assertGreater(r["duplicates"], 0)
        self.assertGreater(r["bad_blocks"], 0)
        blocks, _ = wanted_ranges.cover(ranges, size, 4096)
        for _, bl in self.asked():
            self.assertTrue(set(bl) <= blocks, "re-requests name wanted blocks only")

    def test_block_size_out_of_bounds_halves_with_ranges(self):
        streams_mod.MAX_BLOCK = 8192
        size = 1 * MIB + 100
        stream_id, data = self.make_stream(size)
        # Long ranges: the configured 32 KiB fits them, the service refuses it.
        ranges = [(5000, 200 * KIB), (300 * KIB, 300 * KIB), (size - 50 * KIB, 50 * KIB)]
        wanted_ranges.prefill(self.out, size)
        r = self.fetch_ranges(self.ranges_argv(stream_id, size, ranges, ota={"block_size": 32768}))
        self.assertEqual(r["result"], 0, r["reason"])
        self.assertEqual(r["block_size"], 8192)
        wanted_ranges.check_file(self, self.out, data, ranges)
        self.assertEqual((r["bytes_outside"], r["bytes_twice"]), (0, 0))
        sizes = [f["l"] for f, _ in self.asked()]
        self.assertEqual((sizes[0], sizes[-1]), (32768, 8192))

    def test_kill9_resumes_without_fetching_written_blocks_again(self):
        size = 8 * MIB
        stream_id, data = self.make_stream(size)
        ranges = wanted_ranges.chunk_like(size, seed=5, mean=24 * KIB, missing=0.5, run=4)
        # 4 KiB blocks, 20 requests/s: about 2.5 s for the wanted half.
        argv = self.ranges_argv(stream_id, size, ranges, ota={"block_size": 4096, "max_requests_per_second": 20})
        blocks, _ = wanted_ranges.cover(ranges, size, 4096)
        wanted_ranges.prefill(self.out, size)
        for kill_at in (1 * MIB, 2500 * KIB):
            p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            try:
                self.assertTrue(self.service.record.wait_until(
                    lambda rec: rec.bytes_served(self.thing, "mqtt") >= kill_at, 60))
            finally:
                p.kill()
                p.wait()
        r = self.fetch_ranges(argv)
        self.assertEqual(r["result"], 0, r["reason"])
        wanted_ranges.check_file(self, self.out, data, ranges)
        self.assertEqual((r["bytes_outside"], r["bytes_twice"]), (0, 0))
        self.assertGreater(r["bytes_resumed"], 0)
        self.assertEqual(r["bytes_resumed"] + r["bytes_written"], wanted_ranges.total(ranges))
        asked = [b for _, bl in self.asked() for b in bl]
        self.assertTrue(set(asked) <= blocks, "nothing unwanted asked for, before or after the kills")
        rework = len(self.data_messages()) - len(blocks)
        # Per kill at most one window in flight (4 requests of 32 blocks)
        # and the blocks since the last record of written blocks (one
        # request's worth, download.h).
        per_kill = 4 * 32 + 32
        self.assertLessEqual(rework, 2 * per_kill, "re-fetched %d blocks" % rework)
        sys.stdout.write("# ranges, kill -9 twice: %d of %d wanted blocks served again\n" % (rework, len(blocks)))

    def test_record_of_another_set_is_discarded(self):
        size = 512 * KIB
        stream_id, data = self.make_stream(size)
        a = [(0, 10000), (100 * KIB, 50 * KIB)]
        b = [(0, 10000), (100 * KIB, 50 * KIB + 1)]
        r = self.fetch_ranges(self.ranges_argv(stream_id, size, a, ota={"block_size": 4096}))
        self.assertEqual(r["result"], 0, r["reason"])
        r = self.fetch_ranges(self.ranges_argv(stream_id, size, b, ota={"block_size": 4096}))
        self.assertEqual(r["result"], 0, r["reason"])
        self.assertEqual(r["bytes_resumed"], 0, "a record of another set is not resumed")
        self.assertIn("Discarding progress record", r["stderr"])
        before = len(self.data_messages())
        r = self.fetch_ranges(self.ranges_argv(stream_id, size, b, ota={"block_size": 4096}))
        self.assertEqual(r["result"], 0, r["reason"])
        self.assertEqual((r["bytes_resumed"], r["bytes_written"]), (wanted_ranges.total(b), 0))
        self.assertEqual(len(self.data_messages()), before, "complete record: nothing fetched")
        # The whole file after a record of ranges: starts over.
        r = self.fetch(self.argv(stream_id, size))
        self.assertEqual((r["result"], r["blocks_resumed"]), (0, 0))
        self.assert_file(data)

    def test_empty_set_finishes_at_once(self):
        size = 100 * KIB
        stream_id, _ = self.make_stream(size)
        wanted_ranges.prefill(self.out, size)
        r = self.fetch_ranges(self.ranges_argv(stream_id, size, []))
        self.assertEqual((r["result"], r["bytes_wanted"], r["writes"], r["requests"]), (0, 0, 0, 0))
        self.assertEqual(self.asked(), [])
        wanted_ranges.check_file(self, self.out, bytes(size), [])


if __name__ == "__main__":
    unittest.main()

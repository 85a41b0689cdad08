#!/usr/bin/python3
"""The stand-in's own tests: an independent device client (device.py, paho +
hand-written requests) against the real TLS mosquitto, checked against the
documented vectors of protocol.md §8 and the rules of §1-§4.

Run: /usr/bin/python3 tests/standin/tap.py tests/standin/test_standin.py
"""

import base64
import http.client
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import textwrap
import time
import unittest
import urllib.parse

import cbor2

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from device import Device  # noqa: E402
from harness import Process, Stack, render_config, merge_sections  # noqa: E402
from pki import verify_bytes  # noqa: E402

PY = "/usr/bin/python3"


def pattern(n, seed=0):
    """Deterministic test bytes: block boundaries are visible in the data."""
    return bytes((i * 7 + seed + (i >> 12)) & 0xFF for i in range(n))


class StackTest(unittest.TestCase):
    """One Stack (broker + stand-in) per test class, torn down even on failure."""

    things = ("thing-A", "thing-B")

    @classmethod
    def setUpClass(cls):
        cls.stack = Stack(things=cls.things)
        cls.stack.__enter__()
        cls.service = cls.stack.service

    @classmethod
    def tearDownClass(cls):
        cls.stack.close()

    def device(self, thing, subscribe=()):
        d = Device(self.stack, thing)
        self.assertTrue(d.connect(), "%s could not connect" % thing)
        self.addCleanup(d.close)
        for f in subscribe:
            d.subscribe(f)
        return d

    def fresh_thing(self):
        """A thing of its own for this test, so job queues don't mix."""
        name = "t-" + self.id().rsplit(".", 1)[-1].replace("_", "-")[:60]
        self.stack.add_thing(name)
        return name


# ---------------------------------------------------------------------------
class StreamTests(StackTest):
    """GetStream / DescribeStream (§3) and the vectors of §8.3-§8.5."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.file0 = pattern(10000)             # the §8.6 transcript's file
        cls.file1 = pattern(40 * 4096, 1)      # 40 blocks of 4 KiB
        cls.small = pattern(64 * 256, 2)       # 64 blocks of 256 B
        cls.service.create_stream("AFR_OTA-1234", {0: cls.file0, 1: cls.file1,
                                                   2: cls.small})
        cls.service.create_stream("tiny", {0: b"\0" * 512 + bytes.fromhex("deadbeef")})
        cls.service.create_stream("big", {0: pattern(1 << 20, 3)})

    def setUp(self):
        # What a device subscribes to: answers, not its own requests.
        self.dev = self.device("thing-A", ["$aws/things/thing-A/streams/+/data/+",
                                           "$aws/things/thing-A/streams/+/rejected/+",
                                           "$aws/things/thing-A/streams/+/description/+"])
        self.base = "$aws/things/thing-A/streams/"
        self.fence = 0

    def get(self, stream, payload, fmt="cbor", timeout=5):
        """Sends one GetStream request and returns every answer to it (data
        and rejected payloads, in arrival order). A DescribeStream sent right
        after is the fence: the stand-in answers one thing in order."""
        self.dev.clear()
        self.fence += 1
        token = "fence-%d" % self.fence
        self.dev.publish(self.base + "%s/get/%s" % (stream, fmt), payload, qos=0)
        # {"c": token}, written by hand: a1 (map of 1), 61 63 ("c"), 6N (text of N)
        self.dev.publish(self.base + "%s/describe/cbor" % stream,
                         bytes.fromhex("a16163") + bytes([0x60 + len(token)]) + token.encode(),
                         qos=0)
        fence = "%s%s/+/cbor" % (self.base, stream)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for _, topic, reply in self.dev.received(fence):
                if topic.endswith(("description/cbor", "rejected/cbor")) and \
                        cbor2.loads(reply).get("c") == token:
                    answers = self.dev.received(self.base + stream + "/+/" + fmt)
                    return [p for _, _, p in answers if p is not reply]
            time.sleep(0.01)
        self.fail("no answer to the fence within %.0f s" % timeout)

    def blocks(self, raw_messages):
        return [cbor2.loads(m) for m in raw_messages]

    def test_golden_getstream_request_8_3_is_answered(self):
        # c="ThisIsAClientToken", f=1, l=4096, o=0, b=aaaaaaaa, n=4: the
        # bitmap asks for the odd blocks 1..31, n caps the answer at 4.
        req = bytes.fromhex("a661637254686973497341436c69656e74546f6b656e616601"
                            "616c191000616f00616244aaaaaaaa616e04")
        got = self.blocks(self.get("AFR_OTA-1234", req))
        self.assertEqual([b["i"] for b in got], [1, 3, 5, 7])
        for b in got:
            self.assertEqual(b["c"], "ThisIsAClientToken")
            self.assertEqual((b["f"], b["l"]), (1, 4096))
            self.assertEqual(b["p"], self.file1[b["i"] * 4096:(b["i"] + 1) * 4096])

    def test_reference_agent_request_gets_whole_file_as_indefinite_maps(self):
        # What the agent actually sends for a fresh 10 000-byte file (§8.3).
        req = bytes.fromhex("a6616363726479616600616c191000616f0061624107616e04")
        raw = self.get("AFR_OTA-1234", req)
        self.assertEqual(len(raw), 3)
        by_index = {cbor2.loads(m)["i"]: m for m in raw}
        self.assertEqual(sorted(by_index), [0, 1, 2])
        # §8.4: block 0 of 4096 B with c:"rdy" is 4120 bytes, 0xBF ... 0xFF.
        m0 = by_index[0]
        self.assertEqual(len(m0), 4120)
        self.assertEqual(m0[:23], bytes.fromhex(
            "bf616363726479616600616900616c1910006170591000"))
        self.assertEqual(m0[23:-1], self.file0[:4096])
        self.assertEqual(m0[-1:], b"\xff")
        last = by_index[2]           # l = 10000 - 2*4096 = 1808 = 0x0710
        self.assertEqual(last[:23], bytes.fromhex(
            "bf616363726479616600616902616c1907106170590710"))
        self.assertEqual(cbor2.loads(last)["p"], self.file0[8192:])

    def test_indefinite_map_vector_8_4(self):
        # o=2 with 256-byte blocks lands on the 4 bytes de ad be ef.
        req = cbor2.dumps({"c": "rdy", "f": 0, "l": 256, "o": 2, "n": 1})
        raw = self.get("tiny", req)
        self.assertEqual(raw[0].hex(), "bf616363726479616600616902616c04617044deadbeefff")

    def test_bitmap_example_o20_returns_exactly_20_21_24_43(self):
        req = bytes.fromhex("a5616363726479616602616c190100616f14616243130080")
        got = self.blocks(self.get("AFR_OTA-1234", req))
        self.assertEqual([b["i"] for b in got], [20, 21, 24, 43])
        for b in got:
            self.assertEqual(b["p"], self.small[b["i"] * 256:(b["i"] + 1) * 256])

    def test_reject_8_5_text_bitmap_is_invalid_cbor_with_both_spellings(self):
        # The captured device request: 5-pair map whose b is a text string.
        req = (bytes.fromhex("a5616600616c191000616f006162") + b"\x72"
               + b"0xFFFFFFFFFFFFFF7F" + bytes.fromhex("616e01"))
        raw = self.get("AFR_OTA-1234", req)
        self.assertEqual(raw[0].hex(),
                         "bf64636f64656b496e76616c696443626f72616f6b496e76616c6964"
                         "43626f72676d65737361676574496e76616c69642043424f52206d65"
                         "7373616765616d74496e76616c69642043424f52206d657373616765ff")

    def rejected(self, stream, payload, fmt="cbor"):
        got = self.get(stream, payload, fmt)
        self.assertEqual(len(got), 1, "expected one rejected message, got %r" % got)
        self.assertEqual(self.dev.received(self.base + stream + "/data/+"), [])
        return cbor2.loads(got[0]) if fmt == "cbor" else json.loads(got[0])

    def test_block_size_out_of_bounds(self):
        for size in (255, 131073):
            r = self.rejected("AFR_OTA-1234", cbor2.dumps({"c": "rdy", "f": 0, "l": size, "n": 1}))
            self.assertEqual((r["o"], r["code"]), ("BlockSizeOutOfBounds",) * 2)
            self.assertEqual((r["c"], r["clientToken"]), ("rdy", "rdy"))
            self.assertEqual(r["m"], r["message"])
        ok = self.get("AFR_OTA-1234", cbor2.dumps({"f": 0, "l": 256, "n": 1}))
        self.assertEqual(cbor2.loads(ok[0])["l"], 256)

    def test_other_rejections(self):
        cases = [
            ("AFR_OTA-1234", {"c": "x", "f": 9, "l": 4096}, "ResourceNotFound"),
            ("no-such-stream", {"c": "x", "f": 0, "l": 4096}, "ResourceNotFound"),
            ("AFR_OTA-1234", {"c": "x", "f": 0, "l": 4096, "o": 3}, "OffsetOutOfBounds"),
            ("AFR_OTA-1234", {"c": "x", "f": 0, "l": 4096, "b": b"\xff" * 12288},
             "BlockBitmapLimitExceeded"),
            ("AFR_OTA-1234", {"c": "x", "f": 0, "l": 4096, "b": b"\x0f"}, "InvalidRequest"),
            ("AFR_OTA-1234", {"c": "x", "f": 0, "l": 4096, "s": 7}, "VersionMismatch"),
        ]
        for stream, req, code in cases:
            with self.subTest(code=code, req=str(req)[:60]):
                r = self.rejected(stream, cbor2.dumps(req))
                self.assertEqual((r["o"], r["code"], r["c"]), (code, code, "x"))
        # An over-long token is itself invalid: no c in the answer (§3.6).
        r = self.rejected("AFR_OTA-1234", cbor2.dumps({"c": "x" * 65, "f": 0, "l": 4096}))
        self.assertEqual(r["o"], "InvalidRequest")
        self.assertNotIn("c", r)

    def test_json_rejection_has_both_spellings(self):
        r = self.rejected("no-such-stream", json.dumps({"c": "rdy", "f": 0, "l": 4096}), "json")
        self.assertEqual(r, {"clientToken": "rdy", "c": "rdy", "code": "ResourceNotFound",
                             "o": "ResourceNotFound", "message": r["m"], "m": r["m"]})

    def test_at_most_128_kib_per_request(self):
        req = cbor2.dumps({"c": "rdy", "f": 0, "l": 4096, "o": 0, "n": 64})
        got = self.blocks(self.get("big", req))
        self.assertEqual([b["i"] for b in got], list(range(32)))
        self.assertEqual(sum(len(b["p"]) for b in got), 128 * 1024)

    def test_json_get_and_describe(self):
        got = self.get("AFR_OTA-1234", json.dumps(
            {"c": "j", "f": 2, "l": 256, "o": 20, "b": "0x130080"}), fmt="json")
        blocks = [json.loads(m) for m in got]
        self.assertEqual([b["i"] for b in blocks], [20, 21, 24, 43])
        self.assertEqual(base64.b64decode(blocks[0]["p"]), self.small[20 * 256:21 * 256])
        self.dev.clear()
        self.dev.publish(self.base + "AFR_OTA-1234/describe/cbor", cbor2.dumps({"c": "d"}), 0)
        desc = self.dev.wait(self.base + "AFR_OTA-1234/description/cbor")
        self.assertEqual(desc[0][:1], b"\xbf")
        d = cbor2.loads(desc[0])
        self.assertEqual(d["c"], "d")
        self.assertEqual(d["r"], [{"f": 0, "z": 10000}, {"f": 1, "z": len(self.file1)},
                                  {"f": 2, "z": len(self.small)}])

    def test_fault_knobs(self):
        req = cbor2.dumps({"c": "rdy", "f": 0, "l": 4096, "o": 0, "n": 4})
        thing = "thing-A"
        try:
            self.service.set_faults(thing, "big", duplicate=1.0)
            self.assertEqual([b["i"] for b in self.blocks(self.get("big", req))],
                             [0, 0, 1, 1, 2, 2, 3, 3])
            self.service.set_faults(thing, "big", reorder=1.0)
            self.assertEqual([b["i"] for b in self.blocks(self.get("big", req))],
                             [1, 0, 3, 2])
            self.service.set_faults(thing, "big", drop_once={1, 2})
            self.assertEqual([b["i"] for b in self.blocks(self.get("big", req))], [0, 3])
            self.assertEqual(len(self.get("big", req)), 4)   # dropped once only
            self.service.set_faults(thing, "big", corrupt_size=1.0, bad_index=1.0,
                                    wrong_file=1.0)
            for b in self.blocks(self.get("big", req)):
                self.assertNotEqual(b["l"], len(b["p"]))
                self.assertGreaterEqual(b["i"], 256)
                self.assertEqual(b["f"], 1)
            self.service.set_faults(thing, "big", drop=0.5, seed=7)
            first = [b["i"] for b in self.blocks(self.get("big", req))]
            self.service.set_faults(thing, "big", drop=0.5, seed=7)
            again = [b["i"] for b in self.blocks(self.get("big", req))]
            self.assertEqual(first, again, "a seed must replay the same drops")
            self.assertLess(len(first), 4)
            self.service.set_faults(thing, "big", delay=0.8)
            t0 = time.monotonic()
            self.get("big", req)
            self.assertGreaterEqual(time.monotonic() - t0, 0.8)
        finally:
            self.service.set_faults(thing, "big")

    def test_record_has_decoded_requests_and_bytes(self):
        before = self.service.record.bytes_served("thing-A", "mqtt")
        self.get("AFR_OTA-1234", bytes.fromhex("a6616363726479616600616c191000616f0061624107616e04"))
        reqs = self.service.record.requests("thing-A", "streams/get")
        self.assertEqual(reqs[-1]["fields"], {"c": "rdy", "f": 0, "l": 4096, "o": 0,
                                              "b": "07", "n": 4})
        self.assertTrue(self.service.record.wait_until(
            lambda r: r.bytes_served("thing-A", "mqtt") - before == 10000, 2))

    def test_24mb_file_limit(self):
        with self.assertRaises(ValueError):
            self.service.create_stream("too-big", {0: bytes(24 * 1024 * 1024 + 1)})


# ---------------------------------------------------------------------------
class JobsTests(StackTest):
    """The Jobs MQTT API (§1); every test uses a thing of its own."""

    def setUp(self):
        self.thing = self.fresh_thing()
        self.jobs = "$aws/things/%s/jobs/" % self.thing
        self.dev = self.device(self.thing, [self.jobs + "notify-next",
                                            self.jobs + "notify",
                                            self.jobs + "+/accepted",
                                            self.jobs + "+/rejected",
                                            self.jobs + "+/+/accepted",
                                            self.jobs + "+/+/rejected"])

    def call(self, suffix, body):
        """Publishes a Jobs request; returns ('accepted'|'rejected', reply)."""
        self.dev.clear()
        self.dev.publish(self.jobs + suffix, json.dumps(body))
        got = self.dev.wait(self.jobs + suffix + "/+")
        self.assertTrue(got, "no reply to " + suffix)
        topic = self.dev.received(self.jobs + suffix + "/+")[0][1]
        return topic.rsplit("/", 1)[1], json.loads(got[0])

    def update(self, job_id, **body):
        return self.call(job_id + "/update", body)

    def notify_next(self, count=1, timeout=5):
        return [json.loads(p) for p in self.dev.wait(self.jobs + "notify-next", count, timeout)]

    def test_next_get_on_empty_queue_has_no_execution(self):
        outcome, reply = self.call("$next/get", {"clientToken": ":" + self.thing})
        self.assertEqual(outcome, "accepted")
        self.assertEqual(set(reply), {"clientToken", "timestamp"})
        self.assertEqual(reply["clientToken"], ":" + self.thing)

    def test_notify_next_on_queueing_and_when_queue_empties(self):
        self.service.queue_job(self.thing, "job-1", {"operation": "demo"})
        n = self.notify_next()[0]
        self.assertNotIn("clientToken", n)
        e = n["execution"]
        for key in ("jobId", "thingName", "jobDocument", "status", "queuedAt",
                    "lastUpdatedAt", "versionNumber", "executionNumber"):
            self.assertIn(key, e)
        self.assertEqual((e["jobId"], e["thingName"], e["status"], e["versionNumber"]),
                         ("job-1", self.thing, "QUEUED", 1))
        self.assertEqual(e["jobDocument"], {"operation": "demo"})
        self.dev.clear()
        self.assertEqual(self.update("job-1", status="SUCCEEDED")[0], "accepted")
        n = self.notify_next()[0]
        self.assertEqual(set(n), {"timestamp"})

    def test_status_transitions(self):
        self.service.queue_job(self.thing, "job-1", {"x": 1})
        outcome, reply = self.update("job-1", status="IN_PROGRESS", clientToken="t1",
                                     statusDetails={"receive": "1/3"},
                                     includeJobExecutionState=True)
        self.assertEqual(outcome, "accepted")
        self.assertEqual(reply["clientToken"], "t1")
        self.assertEqual(reply["executionState"], {"status": "IN_PROGRESS",
                                                   "statusDetails": {"receive": "1/3"},
                                                   "versionNumber": 2})
        outcome, reply = self.update("job-1", status="REJECTED", clientToken="t2")
        self.assertEqual(outcome, "rejected")
        self.assertEqual(reply["code"], "InvalidStateTransition")
        self.assertEqual(reply["clientToken"], "t2")
        self.assertEqual(reply["executionState"]["status"], "IN_PROGRESS")
        self.assertIn("message", reply)
        self.assertIn("timestamp", reply)
        self.assertEqual(self.update("job-1", status="SUCCEEDED")[0], "accepted")
        outcome, reply = self.update("job-1", status="IN_PROGRESS")
        self.assertEqual((outcome, reply["code"]), ("rejected", "InvalidStateTransition"))
        self.assertEqual(reply["executionState"]["status"], "SUCCEEDED")
        self.assertEqual(self.service.job_status(self.thing, "job-1"), "SUCCEEDED")
        # QUEUED -> REJECTED is what DC does with an invalid document.
        self.service.queue_job(self.thing, "job-2", {"x": 2})
        self.assertEqual(self.update("job-2", status="REJECTED")[0], "accepted")
        recorded = self.service.record.status_updates(self.thing, "job-1")
        self.assertEqual([(u["status"], u["outcome"], u["code"]) for u in recorded],
                         [("IN_PROGRESS", "accepted", None),
                          ("REJECTED", "rejected", "InvalidStateTransition"),
                          ("SUCCEEDED", "accepted", None),
                          ("IN_PROGRESS", "rejected", "InvalidStateTransition")])
        self.assertEqual(recorded[0]["statusDetails"], {"receive": "1/3"})

    def test_version_mismatch_and_expected_version_forms(self):
        self.service.queue_job(self.thing, "job-1", {"x": 1})
        outcome, reply = self.update("job-1", status="IN_PROGRESS", expectedVersion=5)
        self.assertEqual((outcome, reply["code"]), ("rejected", "VersionMismatch"))
        self.assertEqual(reply["executionState"]["versionNumber"], 1)
        # Jobs-lib quotes the number (§1.3).
        self.assertEqual(self.update("job-1", status="IN_PROGRESS", expectedVersion="1")[0],
                         "accepted")
        self.assertEqual(self.update("job-1", status="IN_PROGRESS", expectedVersion=2)[0],
                         "accepted")
        self.assertEqual(self.service.job_execution(self.thing, "job-1")["versionNumber"], 3)

    def test_status_details_validation(self):
        self.service.queue_job(self.thing, "job-1", {"x": 1})
        bad = [{"k%d" % i: "v" for i in range(11)}, {"bad key": "v"}, {"k": ""},
               {"k": "x" * 1025}, {"k": "a\nb"}, {"k" * 129: "v"}, {"k": 5}]
        for details in bad:
            with self.subTest(details=str(details)[:40]):
                outcome, reply = self.update("job-1", status="IN_PROGRESS",
                                             statusDetails=details)
                self.assertEqual((outcome, reply["code"]), ("rejected", "InvalidRequest"))
        good = {"k%d" % i: "v" for i in range(10)}
        good["k0"] = "x" * 1024
        good["self_test:ready-1_x"] = good.pop("k9")
        self.assertEqual(self.update("job-1", status="IN_PROGRESS",
                                     statusDetails=good)[0], "accepted")
        outcome, reply = self.update("job-1", status="BOGUS")
        self.assertEqual((outcome, reply["code"]), ("rejected", "InvalidRequest"))
        self.dev.clear()
        self.dev.publish(self.jobs + "job-1/update", b"not json")
        reply = json.loads(self.dev.wait(self.jobs + "job-1/update/rejected")[0])
        self.assertEqual(reply["code"], "InvalidJson")

    def test_cancel_gives_notify_next_without_the_job(self):
        self.service.queue_job(self.thing, "job-1", {"x": 1})
        self.service.queue_job(self.thing, "job-2", {"x": 2})
        self.assertEqual(self.notify_next()[0]["execution"]["jobId"], "job-1")
        self.update("job-1", status="IN_PROGRESS")
        self.dev.clear()
        self.service.cancel_job(self.thing, "job-1")
        self.assertEqual(self.notify_next()[0]["execution"]["jobId"], "job-2")
        self.assertEqual(self.service.job_status(self.thing, "job-1"), "CANCELED")
        outcome, reply = self.update("job-1", status="SUCCEEDED")
        self.assertEqual((outcome, reply["code"]), ("rejected", "InvalidStateTransition"))

    def test_several_jobs_in_order_and_notify_only_when_next_changes(self):
        for j in ("job-1", "job-2", "job-3"):
            self.service.queue_job(self.thing, j, {"n": j})
        # Queueing behind the first job does not change which job is next.
        self.assertEqual([n["execution"]["jobId"] for n in self.notify_next(2, 1)], ["job-1"])
        self.dev.clear()
        self.update("job-2", status="IN_PROGRESS")    # IN_PROGRESS goes first
        self.assertEqual(self.notify_next()[0]["execution"]["jobId"], "job-2")
        listing = json.loads(self.dev.wait(self.jobs + "notify")[-1])["jobs"]
        self.assertEqual({s: [j["jobId"] for j in l] for s, l in listing.items()},
                         {"IN_PROGRESS": ["job-2"], "QUEUED": ["job-1", "job-3"]})
        outcome, reply = self.call("get", {"clientToken": "g"})
        self.assertEqual([j["jobId"] for j in reply["inProgressJobs"]], ["job-2"])
        self.assertEqual([j["jobId"] for j in reply["queuedJobs"]], ["job-1", "job-3"])
        self.dev.clear()
        self.update("job-2", status="IN_PROGRESS", statusDetails={"receive": "2/3"})
        outcome, reply = self.call("start-next", {"clientToken": "s"})
        self.assertEqual(reply["execution"]["jobId"], "job-2")   # already started
        self.assertEqual(reply["execution"]["statusDetails"], {"receive": "2/3"})
        self.assertEqual(self.dev.received(self.jobs + "notify-next"), [],
                         "a status change of the current job must not notify")
        self.update("job-2", status="SUCCEEDED")
        self.assertEqual(self.notify_next()[0]["execution"]["jobId"], "job-1")
        outcome, reply = self.call("start-next", {"statusDetails": {"a": "b"}})
        e = reply["execution"]
        self.assertEqual((e["jobId"], e["status"], e["statusDetails"]),
                         ("job-1", "IN_PROGRESS", {"a": "b"}))
        self.assertIn("startedAt", e)
        outcome, reply = self.call("job-1/get", {"includeJobDocument": False})
        self.assertNotIn("jobDocument", reply["execution"])
        self.assertEqual(self.call("job-2/get", {})[1]["code"], "TerminalStateReached")
        self.assertEqual(self.call("nope/get", {})[1]["code"], "ResourceNotFound")

    def test_wait_for_status_from_the_service_side(self):
        self.service.queue_job(self.thing, "job-1", {"x": 1})
        self.update("job-1", status="FAILED", statusDetails={"reason": "aborted: 0x0000000d"})
        self.assertEqual(self.service.wait_terminal(self.thing, "job-1", 2), "FAILED")
        with self.assertRaises(TimeoutError):
            self.service.queue_job(self.thing, "job-2", {"x": 2})
            self.service.wait_terminal(self.thing, "job-2", 0.2)


# ---------------------------------------------------------------------------
class OtaAndHttpsTests(StackTest):
    """afr_ota documents (§2) and the presigned HTTPS server (§4)."""

    def setUp(self):
        self.thing = self.fresh_thing()
        self.jobs = "$aws/things/%s/jobs/" % self.thing
        self.dev = self.device(self.thing, [self.jobs + "$next/get/accepted"])
        self.ctx = ssl.create_default_context(cafile=self.stack.pki.ca_cert)

    def next_document(self):
        self.dev.clear()
        self.dev.publish(self.jobs + "$next/get", json.dumps({"clientToken": ":x"}))
        got = self.dev.wait(self.jobs + "$next/get/accepted")
        self.assertTrue(got)
        return json.loads(got[0])["execution"]["jobDocument"]["afr_ota"]

    def fetch(self, url, headers=None, method="GET", conn=None):
        u = urllib.parse.urlsplit(url)
        conn = conn or http.client.HTTPSConnection(u.hostname, u.port, context=self.ctx)
        conn.request(method, u.path + "?" + u.query, headers=headers or {})
        r = conn.getresponse()
        return r, r.read()

    def test_mqtt_job_document_and_signature(self):
        image = pattern(10000, 5)
        info = self.service.queue_ota_job(self.thing, "AFR_OTA-m1", image,
                                          filepath="/opt/fw.bin")
        ota = self.next_document()
        self.assertEqual(ota["protocols"], ["MQTT"])
        self.assertEqual(ota["streamname"], info["stream_id"])
        f = ota["files"][0]
        self.assertEqual({k: f[k] for k in ("filepath", "filesize", "fileid", "certfile", "fileType")},
                         {"filepath": "/opt/fw.bin", "filesize": 10000, "fileid": 0,
                          "certfile": "ota-signer.crt", "fileType": 0})
        self.assertNotIn("update_data_url", f)
        sig = f["sig-sha256-ecdsa"]
        self.assertTrue(verify_bytes(image, sig, self.stack.pki.signer_cert))
        self.assertFalse(verify_bytes(image, sig, self.stack.pki.untrusted_signer_cert))
        self.assertFalse(verify_bytes(image + b"x", sig, self.stack.pki.signer_cert))
        # Untrusted key and raw signatures, for otad's negative tests.
        self.service.queue_ota_job(self.thing, "AFR_OTA-m2", image,
                                   signing_key=self.stack.pki.untrusted_signer_key)
        self.service.queue_ota_job(self.thing, "AFR_OTA-m3", image, signature="Zg===")
        execs = [self.service.job_document(self.thing, j) for j in ("AFR_OTA-m2", "AFR_OTA-m3")]
        sig2 = execs[0]["afr_ota"]["files"][0]["sig-sha256-ecdsa"]
        self.assertTrue(verify_bytes(image, sig2, self.stack.pki.untrusted_signer_cert))
        self.assertEqual(execs[1]["afr_ota"]["files"][0]["sig-sha256-ecdsa"], "Zg===")

    def test_split_image_into_signed_parts(self):
        image = pattern(10000, 6)
        self.service.queue_ota_job(self.thing, "AFR_OTA-s1", image, split_bytes=4096,
                                   part_fields=lambda i, off, part: {"offset": off})
        files = self.next_document()["files"]
        self.assertEqual([(f["fileid"], f["filesize"], f["offset"]) for f in files],
                         [(0, 4096, 0), (1, 4096, 4096), (2, 1808, 8192)])
        for f in files:
            part = image[f["offset"]:f["offset"] + f["filesize"]]
            self.assertTrue(verify_bytes(part, f["sig-sha256-ecdsa"], self.stack.pki.signer_cert))

    def test_presigned_https_range_expiry_and_fresh_urls(self):
        image = os.urandom(3 * 1024 * 1024 + 17)
        first_http = len(self.service.record.http_requests())
        self.service.queue_ota_job(self.thing, "AFR_OTA-h1", image, protocols=["HTTP"])
        f1 = self.next_document()["files"][0]
        f2 = self.next_document()["files"][0]
        self.assertEqual(f1["auth_scheme"], "aws.s3.presigned")
        self.assertNotEqual(f1["update_data_url"], f2["update_data_url"],
                            "each delivery must carry a fresh presigned URL")
        url = f1["update_data_url"]
        u = urllib.parse.urlsplit(url)
        conn = http.client.HTTPSConnection(u.hostname, u.port, context=self.ctx)
        r, body = self.fetch(url, conn=conn)
        self.assertEqual((r.status, body), (200, image))
        self.assertEqual(r.getheader("Accept-Ranges"), "bytes")
        # Keep-alive: the same connection serves the next requests.
        r, body = self.fetch(url, {"Range": "bytes=4096-8191"}, conn=conn)
        self.assertEqual((r.status, r.getheader("Content-Range"), body),
                         (206, "bytes 4096-8191/%d" % len(image), image[4096:8192]))
        r, body = self.fetch(url, {"Range": "bytes=%d-" % (len(image) - 5)}, conn=conn)
        self.assertEqual((r.status, body), (206, image[-5:]))
        r, body = self.fetch(url, {"Range": "bytes=%d-" % len(image)}, conn=conn)
        self.assertEqual((r.status, r.getheader("Content-Range")),
                         (416, "bytes */%d" % len(image)))
        r, body = self.fetch(url, method="HEAD", conn=conn)
        self.assertEqual((r.status, r.getheader("Content-Length"), body),
                         (200, str(len(image)), b""))
        tampered = url[:-1] + ("0" if url[-1] != "0" else "1")
        r, body = self.fetch(tampered)
        self.assertEqual(r.status, 403)
        self.assertIn(b"<Code>SignatureDoesNotMatch</Code>", body)
        self.service.expire_urls()
        r, body = self.fetch(url)
        self.assertEqual(r.status, 403)
        self.assertIn(b"<Code>AccessDenied</Code>", body)
        fresh = self.next_document()["files"][0]["update_data_url"]
        self.assertEqual(self.fetch(fresh, {"Range": "bytes=0-0"})[0].status, 206)
        served = self.service.record.http_requests()[first_http:]
        self.assertEqual([h["status"] for h in served], [200, 206, 206, 416, 200, 403, 403, 206])
        self.assertEqual(served[1]["range"], "bytes=4096-8191")
        self.assertEqual(served[1]["bytes"], 4096)

    def test_presigned_url_lifetime(self):
        self.service.queue_ota_job(self.thing, "AFR_OTA-h2", b"abc" * 100,
                                   protocols=["HTTP", "MQTT"], url_lifetime=3)
        url = self.next_document()["files"][0]["update_data_url"]
        # X-Amz-Date has whole seconds: a 1 s URL may be expired at once on
        # a loaded machine, so give it 3 and wait 4 past them.
        self.assertEqual(self.fetch(url)[0].status, 200)
        time.sleep(4.1)
        r, body = self.fetch(url)
        self.assertEqual(r.status, 403)
        self.assertIn(b"Request has expired", body)

    def test_cancel_mid_transfer(self):
        image = pattern(64 * 1024, 9)
        info = self.service.queue_ota_job(self.thing, "AFR_OTA-c1", image)
        self.service.cancel_job_after(self.thing, "AFR_OTA-c1", 16 * 1024)
        self.dev.subscribe("$aws/things/%s/streams/+/data/cbor" % self.thing)
        self.dev.publish("$aws/things/%s/streams/%s/get/cbor" % (self.thing, info["stream_id"]),
                         cbor2.dumps({"c": "rdy", "f": 0, "l": 4096, "n": 16}), 0)
        self.assertEqual(self.service.wait_for_status(self.thing, "AFR_OTA-c1",
                                                      "CANCELED", 5), "CANCELED")
        self.assertGreaterEqual(self.service.record.bytes_served(self.thing, "mqtt"), 16 * 1024)

    def test_https_throughput(self):
        """Prints the figure for the report; asserts only a generous floor."""
        size = 64 * 1024 * 1024
        self.service.https.add_file("bench/64M", bytes(size))
        url = self.service.https.presign("bench/64M")
        t0 = time.monotonic()
        r = subprocess.run(["curl", "-sS", "--cacert", self.stack.pki.ca_cert, "-o", "/dev/null",
                            "-w", "%{http_code} %{size_download}", url],
                           capture_output=True, text=True, timeout=60)
        elapsed = time.monotonic() - t0
        self.assertEqual(r.stdout, "200 %d" % size, r.stderr)
        rate = size / elapsed / 2 ** 20
        sys.stderr.write("HTTPS: 64 MiB in %.2f s = %.0f MiB/s\n" % (elapsed, rate))
        self.assertGreater(rate, 20)


# ---------------------------------------------------------------------------
class SecurityTests(StackTest):
    """The broker enforces the AWS device policy (harness.md §1)."""

    def test_thing_cannot_see_or_use_another_things_topics(self):
        a = self.device("thing-A", ["$aws/things/thing-A/jobs/#"])
        b = self.device("thing-B", ["$aws/things/thing-A/jobs/#",
                                    "$aws/things/thing-A/streams/#",
                                    "$aws/things/thing-B/jobs/notify-next"])
        # thing-B asks for thing-A's next job: dropped by the ACL, so the
        # service never sees it and nothing comes back to either thing.
        b.publish("$aws/things/thing-A/jobs/$next/get", json.dumps({"clientToken": "spy"}))
        self.service.queue_job("thing-A", "secret-job", {"secret": 1})
        self.service.queue_job("thing-B", "own-job", {"x": 1})
        self.assertTrue(a.wait("$aws/things/thing-A/jobs/notify-next"),
                        "positive control: thing-A gets its own notification")
        self.assertTrue(b.wait("$aws/things/thing-B/jobs/notify-next"),
                        "positive control: thing-B gets its own notification")
        time.sleep(0.3)
        self.assertEqual(b.received("$aws/things/thing-A/#"), [])
        self.assertEqual([r for r in self.service.record.requests("thing-A")
                          if r["fields"].get("clientToken") == "spy"], [])
        self.assertEqual(a.received("$aws/things/thing-A/jobs/$next/get/+"), [])

    def mqtt_connect_with(self, cert, key, tls_max=None):
        """Raw TLS + MQTT CONNECT; returns the CONNACK bytes, or the error."""
        ctx = ssl.create_default_context(cafile=self.stack.pki.ca_cert)
        if cert:
            ctx.load_cert_chain(cert, key)
        if tls_max:
            ctx.maximum_version = tls_max
        # CONNECT, MQTT 3.1.1, clean session, keepalive 60, client id "rogue"
        connect = bytes.fromhex("1011" "00044d515454" "04" "02" "003c" "0005") + b"rogue"
        try:
            with socket.create_connection(("127.0.0.1", self.stack.broker.port), 3) as s:
                with ctx.wrap_socket(s, server_hostname="localhost") as t:
                    t.sendall(connect)
                    return t.recv(4)
        except (OSError, ssl.SSLError) as err:
            return err

    def test_rogue_certificate_is_refused(self):
        pki = self.stack.pki
        self.assertEqual(self.mqtt_connect_with(pki.client_cert("thing-A"),
                                                pki.client_key("thing-A")),
                         b"\x20\x02\x00\x00", "positive control: CONNACK accepted")
        for tls_max in (ssl.TLSVersion.TLSv1_2, None):
            with self.subTest(tls_max=tls_max):
                got = self.mqtt_connect_with(pki.rogue_cert, pki.rogue_key, tls_max)
                self.assertFalse(isinstance(got, bytes) and got.startswith(b"\x20"),
                                 "rogue certificate got a CONNACK: %r" % got)
                got = self.mqtt_connect_with(None, None, tls_max)
                self.assertFalse(isinstance(got, bytes) and got.startswith(b"\x20"),
                                 "no certificate got a CONNACK: %r" % got)

    def test_thing_keys_are_private(self):
        for thing in self.things:
            mode = os.stat(self.stack.pki.client_key(thing)).st_mode & 0o777
            self.assertEqual(mode, 0o600, thing)


# ---------------------------------------------------------------------------
class CapsAndRestartTests(StackTest):
    things = ("thing-C",)

    def setUp(self):
        self.thing = "thing-C"
        self.base = "$aws/things/thing-C/streams/caps/"
        self.service.create_stream("caps", {0: bytes(4 * 1024 * 1024)})

    def pull(self, dev, block, seconds):
        """Keeps one 128 KiB request outstanding for `seconds`; returns the
        (time, size) of every data message."""
        dev.clear()
        per_request = 131072 // block
        deadline = time.monotonic() + seconds
        asked = 0
        while time.monotonic() < deadline:
            got = len(dev.received(self.base + "data/cbor"))
            if got >= asked - per_request // 2:
                dev.publish(self.base + "get/cbor", cbor2.dumps(
                    {"c": "r", "f": 0, "l": block, "o": (asked // per_request) % 16}), 0)
                asked += per_request
            time.sleep(0.01)
        return [(t, len(p)) for t, _, p in dev.received(self.base + "data/cbor")]

    @staticmethod
    def rate(samples, skip=0.5):
        """Per-second rates after the first `skip` seconds (the initial burst
        of the first request is not what a cap is about)."""
        t0 = samples[0][0] + skip
        window = [s for s in samples if s[0] >= t0]
        # N arrivals span N-1 intervals: count what came after the first.
        span = window[-1][0] - window[0][0]
        return sum(n for _, n in window[1:]) / span, (len(window) - 1) / span

    def test_aws_caps_bytes_and_publishes_per_second(self):
        dev = self.device(self.thing, [self.base + "data/cbor"])
        self.service.set_aws_caps(self.thing)
        try:
            bytes_per_s, _ = self.rate(self.pull(dev, 65536, 3.5))
            _, msgs_per_s = self.rate(self.pull(dev, 1024, 3))
        finally:
            self.service.set_aws_caps(self.thing, enabled=False)
        sys.stderr.write("AWS caps: %.0f KiB/s with 64 KiB blocks, %.0f msg/s with 1 KiB blocks\n"
                         % (bytes_per_s / 1024, msgs_per_s))
        self.assertLessEqual(bytes_per_s, 512 * 1024 * 1.1)
        self.assertGreater(bytes_per_s, 512 * 1024 * 0.7, "the cap, not something else, limits")
        self.assertLessEqual(msgs_per_s, 100 * 1.1)
        self.assertGreater(msgs_per_s, 60)
        uncapped, _ = self.rate(self.pull(dev, 65536, 1), skip=0.2)
        sys.stderr.write("uncapped stream: %.1f MiB/s\n" % (uncapped / 2 ** 20))
        self.assertGreater(uncapped, 2 * 512 * 1024)

    def test_broker_restart_keeps_the_service(self):
        dev = Device(self.stack, self.thing)
        self.assertTrue(dev.connect())
        dev.close()
        old_pid = self.stack.broker.pid
        self.service.restart_broker()
        self.assertNotEqual(self.stack.broker.pid, old_pid)
        dev = self.device(self.thing, ["$aws/things/thing-C/jobs/notify-next"])
        self.service.queue_job(self.thing, "after-restart", {"x": 1})
        self.assertTrue(dev.wait("$aws/things/thing-C/jobs/notify-next"))


# ---------------------------------------------------------------------------
INNER = textwrap.dedent("""
    import json, os, sys, time, unittest
    sys.path.insert(0, %(here)r)
    from harness import Stack
    info_path, mode = sys.argv[1], sys.argv[2]
    fake = os.path.join(os.path.dirname(info_path), "fake-otad")
    with open(fake, "w") as f:
        f.write("#!/bin/sh\\nexec /bin/sleep 300\\n")
    os.chmod(fake, 0o755)
    os.environ["OTAD_BIN"] = fake

    def scenario(s):
        otad = s.start_otad("thing-A", {"jobs": {"handler": "demo"}})
        helper = s.start_process(["/bin/sleep", "300"], "helper")
        with open(info_path + ".tmp", "w") as f:
            json.dump({"workdir": s.workdir, "pids": [s.broker.pid, otad.pid, helper.pid],
                       "ports": [s.broker.port, s.service.https.port],
                       "config": open(os.path.join(s.workdir, "otad-thing-A.conf")).read()}, f)
        os.rename(info_path + ".tmp", info_path)
        if mode == "fail":
            raise AssertionError("inner test failed on purpose")
        time.sleep(60)        # ended by SIGTERM from the outer test

    class ClassLevelStack(unittest.TestCase):
        # The pattern of tests sharing one Stack per class: a SIGTERM
        # aborts the run before tearDownClass.
        @classmethod
        def setUpClass(cls):
            cls.stack = Stack(things=["thing-A"]).__enter__()

        @classmethod
        def tearDownClass(cls):
            cls.stack.close()

        def test_scenario(self):
            scenario(self.stack)

    if mode == "unittest":
        unittest.main(argv=["inner"])
    with Stack(things=["thing-A"]) as s:
        scenario(s)
""")


class HarnessTests(unittest.TestCase):
    """The harness stops everything and leaves no directory behind."""

    def run_inner(self, mode):
        tmp = tempfile.mkdtemp(prefix="standin-cleanup-")
        self.addCleanup(lambda: subprocess.run(["rm", "-rf", tmp]))
        info_path = os.path.join(tmp, "info.json")
        script = os.path.join(tmp, "inner.py")
        with open(script, "w") as f:
            f.write(INNER % {"here": HERE})
        env = dict(os.environ)
        env.pop("OTAD_KEEP_TMP", None)
        proc = subprocess.Popen([PY, script, info_path, mode], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env=env)
        deadline = time.monotonic() + 20
        while not os.path.exists(info_path) and proc.poll() is None \
                and time.monotonic() < deadline:
            time.sleep(0.05)
        self.assertTrue(os.path.exists(info_path), proc.stderr.read() if proc.poll() is not None else "")
        with open(info_path) as f:
            info = json.load(f)
        if mode in ("sigterm", "unittest"):
            proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        return proc.returncode, err.decode(), info

    def assert_all_gone(self, info):
        for pid in info["pids"]:
            self.assertFalse(os.path.exists("/proc/%d" % pid), "pid %d still exists" % pid)
        for port in info["ports"]:
            with socket.socket() as s:
                self.assertNotEqual(s.connect_ex(("127.0.0.1", port)), 0,
                                    "port %d still listening" % port)
        self.assertFalse(os.path.exists(info["workdir"]), info["workdir"])

    def test_failing_test_leaves_nothing_behind(self):
        rc, err, info = self.run_inner("fail")
        self.assertNotEqual(rc, 0)
        self.assertIn("inner test failed on purpose", err)
        self.assert_all_gone(info)

    def test_sigterm_leaves_nothing_behind(self):
        rc, err, info = self.run_inner("sigterm")
        self.assertNotEqual(rc, 0)
        self.assert_all_gone(info)

    def test_sigterm_during_class_level_stack_leaves_nothing_behind(self):
        rc, err, info = self.run_inner("unittest")
        self.assertNotEqual(rc, 0)
        self.assert_all_gone(info)

    def test_generated_otad_config(self):
        rc, err, info = self.run_inner("fail")
        wd = info["workdir"]
        config = info["config"].replace(wd, "WD")
        port = info["ports"][0]
        self.assertEqual(config, textwrap.dedent("""\
            # generated by tests/standin/harness.py
            [mqtt]
            endpoint = localhost
            port = %d
            thing_name = thing-A
            ca_file = WD/pki/ca.crt
            cert_file = WD/pki/thing-A.crt
            key_file = WD/pki/thing-A.key
            keepalive = 30

            [state]
            directory = WD/state-thing-A

            [log]
            level = debug

            [jobs]
            handler = demo
            """ % port))

    def test_process_handle(self):
        tmp = tempfile.mkdtemp(prefix="standin-proc-")
        self.addCleanup(lambda: subprocess.run(["rm", "-rf", tmp]))
        p = Process(["/bin/sh", "-c", "echo 'otad: info: ready' >&2; exit 3"],
                    os.path.join(tmp, "a.log"))
        self.assertEqual(p.wait_exit(5), 3)
        self.assertEqual(p.grep(r"info: ready$"), ["otad: info: ready"])
        p = Process(["/bin/sleep", "30"], os.path.join(tmp, "b.log"))
        with self.assertRaises(TimeoutError):
            p.wait_exit(0.2)
        p.kill9()
        self.assertEqual(p.wait_exit(1), -signal.SIGKILL)
        p = Process(["/bin/sleep", "30"], os.path.join(tmp, "c.log"))
        self.assertEqual(p.stop(), -signal.SIGTERM)

    def test_merge_sections(self):
        base = {"mqtt": {"port": 1, "keepalive": 30}, "log": {"level": "debug"}}
        merged = merge_sections(base, {"mqtt": {"keepalive": None, "port": 2},
                                       "log": None, "ota": {"verify": True}})
        self.assertEqual(merged, {"mqtt": {"port": 2}, "ota": {"verify": True}})
        self.assertEqual(render_config(merged), "[mqtt]\nport = 2\n\n[ota]\nverify = true\n")

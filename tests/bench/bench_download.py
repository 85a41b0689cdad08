#!/usr/bin/python3
"""Download benchmarks of otad (issue 5), measured side by side in one run
against the local TLS broker and AWS IoT stand-in (tests/standin).

Prints figures and ratios; asserts nothing about timing (a figure below its
target is marked MISS, the exit status stays 0 unless a job fails):

  * MQTT: 16 MiB through otad at 4 KiB and 128 KiB blocks, against a plain
    paho publisher/subscriber pair on the same broker with the same
    messages (the stand-in's own CBOR data messages) - target >= 90 %.
  * The same under the stand-in's AWS caps (512 KiB/s and 100 publishes/s
    per connection) against 512 KiB/s - target >= 90 %.
  * HTTPS: 256 MiB through otad against `curl -o /dev/null` on the same
    file of the same server - target >= 95 %.
  * Peak RSS (VmHWM) of otad for 16 MiB and 256 MiB images - target
    <= 8 MiB and not growing with the image.

Run: OTAD_BIN=build/src/otad /usr/bin/python3 tests/bench/bench_download.py
     meson test -C build --benchmark -v
Options: --quick (smaller HTTPS image, no caps runs), --target-dir DIR
(where otad writes the images; default the work dir, on disk).
"""

import argparse
import json
import os
import secrets
import shutil
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "standin"))

import paho.mqtt.client as mqtt  # noqa: E402

import harness  # noqa: E402
import streams as streams_mod  # noqa: E402
from pki import SERVICE  # noqa: E402

KIB = 1024
MIB = 1024 * KIB
AWS_RATE = 512 * KIB

# otad's settings for the uncapped runs: the most the configuration allows
# (100 GetStream requests/s, each asking for up to 128 KiB). The capped runs
# use otad's defaults, which are chosen for AWS's caps.
UNCAPPED = {"max_requests_per_second": 100, "window": 8}


def mib_s(nbytes, seconds):
    return nbytes / MIB / seconds if seconds > 0 else float("inf")


class Bench:
    def __init__(self, args):
        self.args = args
        self.stack = harness.Stack(things=[])
        self.rows = []
        self.n = 0

    def __enter__(self):
        self.stack.__enter__()
        self.service = self.stack.service
        self.trust = os.path.join(self.stack.workdir, "trust")
        os.makedirs(self.trust)
        shutil.copy(self.stack.pki.signer_cert, os.path.join(self.trust, "ota-signer.crt"))
        return self

    def __exit__(self, *exc):
        self.stack.__exit__(*exc)
        return False

    def new_thing(self, label):
        self.n += 1
        thing = "bench-%d-%s" % (self.n, label)
        self.stack.add_thing(thing)
        return thing

    # ---- otad ----------------------------------------------------------

    def run_otad(self, label, image, protocol, ota=None, caps=False, timeout=600):
        """One job in a fresh otad; returns (download seconds, VmHWM KiB,
        stand-in bytes served). Download time: from the job's first
        IN_PROGRESS (otad took it) to the `receive N/N` update, both as
        the stand-in received them, so the signature check is not in it."""
        thing = self.new_thing(label)
        out = os.path.join(self.args.target_dir or self.stack.workdir, thing + "-out")
        os.makedirs(out)
        if caps:
            self.service.set_aws_caps(thing)
        sections = {
            "ota": dict({"trust_dir": self.trust, "http_ca_file": self.stack.pki.ca_cert,
                         "progress_interval": 5}, **(ota or {})),
            "update": {"version": "1.0.0"},
            "log": {"level": "info"},
            "target.app": {"type": "file", "directory": out},
        }
        otad = self.stack.start_otad(thing, sections)
        job = "AFR_OTA-bench-%d" % self.n
        try:
            otad.wait_for_log(r"Connected to", 20)
            self.service.queue_ota_job(thing, job, image, protocols=[protocol])
            status = self.service.wait_terminal(thing, job, timeout)
            if status != "SUCCEEDED":
                raise RuntimeError("%s: job ended %s:\n%s" % (label, status, otad.log()[-3000:]))
            hwm = vm_hwm_kib(otad.pid)
        finally:
            otad.stop()
        shutil.rmtree(out, ignore_errors=True)
        ups = self.service.record.status_updates(thing, job, outcome="accepted")
        start = ups[0]["time"]
        end = None
        for u in ups:
            r = (u["statusDetails"] or {}).get("receive", "")
            if r and r.split("/")[0] == r.split("/")[1]:
                end = u["time"]
        if end is None:
            raise RuntimeError("%s: no final receive update" % label)
        served = self.service.record.bytes_served(thing, "mqtt" if protocol == "MQTT" else "https")
        return end - start, hwm, served

    # ---- the raw broker path -------------------------------------------

    def raw_pubsub(self, block, total, caps=False):
        """A paho publisher (the stand-in's service identity, QoS 1, 100 in
        flight, as the stand-in publishes) and a paho subscriber (a thing,
        QoS 0, as otad subscribes) through the same broker, with the
        stand-in's own data messages. Returns seconds from the first publish
        to the last message received."""
        thing = self.new_thing("raw")
        pki = self.stack.pki
        topic = "$aws/things/%s/streams/bench-raw/data/cbor" % thing
        data = secrets.token_bytes(block)
        count = (total + block - 1) // block
        messages = [streams_mod.encode_block("cbor", "rdy", streams_mod.Block(0, i, block, data))
                    for i in range(count)]
        got = threading.Event()
        received = [0]
        subscribed = threading.Event()

        def on_message(client, userdata, msg):
            received[0] += 1
            if received[0] == count:
                got.set()

        sub = mqtt.Client(client_id=thing, protocol=mqtt.MQTTv311)
        sub.tls_set(ca_certs=pki.ca_cert, certfile=pki.client_cert(thing), keyfile=pki.client_key(thing))
        sub.on_message = on_message
        sub.on_subscribe = lambda *a: subscribed.set()
        sub.on_connect = lambda c, u, f, rc: c.subscribe(topic, 0)
        sub.connect("localhost", self.stack.broker.port, 30)
        sub.loop_start()
        pub = mqtt.Client(client_id="bench-pub-%d" % self.n, protocol=mqtt.MQTTv311)
        pub.tls_set(ca_certs=pki.ca_cert, certfile=pki.client_cert(SERVICE), keyfile=pki.client_key(SERVICE))
        pub.max_inflight_messages_set(100)
        pub.max_queued_messages_set(0)
        connected = threading.Event()
        pub.on_connect = lambda *a: connected.set()
        pub.connect("localhost", self.stack.broker.port, 30)
        pub.loop_start()
        try:
            if not (subscribed.wait(10) and connected.wait(10)):
                raise RuntimeError("raw publisher/subscriber could not connect")
            pacer = None
            if caps:
                from faults import Pacer
                pacer = Pacer()
            t0 = time.monotonic()
            for m in messages:
                if pacer:
                    # The stand-in's outbox applies the caps exactly so.
                    not_before = pacer.reserve(len(topic) + len(m))
                    while time.monotonic() < not_before:
                        time.sleep(min(0.1, not_before - time.monotonic()))
                pub.publish(topic, m, qos=1)
            if not got.wait(600):
                raise RuntimeError("raw subscriber got %d of %d messages" % (received[0], count))
            return time.monotonic() - t0
        finally:
            pub.loop_stop()
            pub.disconnect()
            sub.loop_stop()
            sub.disconnect()

    # ---- curl ------------------------------------------------------------

    def curl(self, image):
        key = "bench/curl-%d.bin" % self.n
        self.service.https.add_file(key, image)
        url = self.service.https.presign(key, 3600)
        p = subprocess.run(["curl", "-sS", "--cacert", self.stack.pki.ca_cert, "-o", "/dev/null",
                            "-w", "%{time_total} %{size_download}", url],
                           capture_output=True, text=True, check=True)
        seconds, size = p.stdout.split()
        if int(size) != len(image):
            raise RuntimeError("curl downloaded %s of %d bytes" % (size, len(image)))
        return float(seconds)

    # ---- output ----------------------------------------------------------

    def row(self, what, mine, ref, ratio, target, note=""):
        ok = ratio >= target
        line = "%-46s %10s  %-28s %6.1f %%  target >= %3.0f %%  %s%s" % (
            what, mine, ref, ratio * 100, target * 100, "PASS" if ok else "MISS", note)
        print(line, flush=True)
        self.rows.append({"what": what, "otad": mine, "reference": ref, "ratio": round(ratio, 3),
                          "target": target, "pass": ok})


def vm_hwm_kib(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise RuntimeError("no VmHWM for pid %d" % pid)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="64 MiB HTTPS image, no AWS-caps runs")
    ap.add_argument("--target-dir", help="where otad writes images (default: the work dir)")
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args()
    if not os.access(harness.otad_binary(), os.X_OK):
        sys.stderr.write("otad not found at %s (set OTAD_BIN)\n" % harness.otad_binary())
        return 77
    mqtt_size = 16 * MIB
    https_size = 64 * MIB if args.quick else 256 * MIB
    hwm = []

    with Bench(args) as b:
        print("otad %s; %d CPUs; stand-in and broker on 127.0.0.1; otad writes to %s"
              % (harness.otad_binary(), os.cpu_count(), args.target_dir or b.stack.workdir), flush=True)
        image16 = secrets.token_bytes(mqtt_size)

        # MQTT, uncapped, against the raw broker path.
        for block in (4 * KIB, 128 * KIB):
            raw = b.raw_pubsub(block, mqtt_size)
            secs, kib, served = b.run_otad("mqtt%dk" % (block // KIB), image16, "MQTT",
                                           dict(UNCAPPED, block_size=block))
            hwm.append(("MQTT 16 MiB, %d KiB blocks" % (block // KIB), kib))
            b.row("MQTT 16 MiB, %3d KiB blocks, no caps" % (block // KIB),
                  "%.2f MiB/s" % mib_s(mqtt_size, secs), "raw pub/sub %.2f MiB/s" % mib_s(mqtt_size, raw),
                  raw / secs, 0.90, "  (served %.1f MiB)" % (served / MIB))

        # MQTT under AWS's per-connection caps, against 512 KiB/s.
        if not args.quick:
            for block in (4 * KIB, 128 * KIB):
                raw = b.raw_pubsub(block, mqtt_size, caps=True)
                secs, kib, _ = b.run_otad("caps%dk" % (block // KIB), image16, "MQTT",
                                          {"block_size": block}, caps=True)
                b.row("MQTT 16 MiB, %3d KiB blocks, AWS caps" % (block // KIB),
                      "%.0f KiB/s" % (mqtt_size / KIB / secs), "512 KiB/s (raw capped %.0f KiB/s)"
                      % (mqtt_size / KIB / raw), mqtt_size / secs / AWS_RATE, 0.90)

        # HTTPS, against curl on the same server and file.
        secs16, kib16, _ = b.run_otad("https16", image16, "HTTP")
        hwm.append(("HTTPS 16 MiB", kib16))
        del image16
        image = secrets.token_bytes(https_size)
        curl_s = b.curl(image)
        secs, kib, _ = b.run_otad("https%d" % (https_size // MIB), image, "HTTP")
        hwm.append(("HTTPS %d MiB" % (https_size // MIB), kib))
        b.row("HTTPS %d MiB" % (https_size // MIB), "%.1f MiB/s" % mib_s(https_size, secs),
              "curl -o /dev/null %.1f MiB/s" % mib_s(https_size, curl_s), curl_s / secs, 0.95)

        # Peak RSS: bounded, and not growing with the image.
        for what, kib in hwm:
            print("%-46s %10s  %-28s %s" % ("peak RSS (VmHWM), " + what, "%.1f MiB" % (kib / 1024), "target <= 8 MiB",
                                          "PASS" if kib <= 8 * 1024 else "MISS"), flush=True)
            b.rows.append({"what": "VmHWM " + what, "kib": kib, "pass": kib <= 8 * 1024})
        growth = kib - kib16
        print("%-46s %10s  %-28s %s" % ("peak RSS growth, HTTPS 16 -> %d MiB" % (https_size // MIB),
                                      "%+d KiB" % growth, "target: does not grow", "PASS" if growth < 512 else "MISS"))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(b.rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

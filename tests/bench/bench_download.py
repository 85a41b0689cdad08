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
import tempfile
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

# otad's settings for the uncapped runs, as otad.conf(5) suggests for a
# broker other than AWS IoT: no request pacing, 64 requests of up to 128 KiB
# in flight. The capped runs use otad's defaults (chosen for AWS's caps).
UNCAPPED = {"max_requests_per_second": 0, "window": 64}


def mib_s(nbytes, seconds):
    return nbytes / MIB / seconds if seconds > 0 else float("inf")


class Bench:
    def __init__(self, args):
        self.args = args
        # A work dir of our own name: a sweep of the harness's default
        # /tmp/otad-standin-* by someone else must not pull it away mid-run.
        self.workdir = tempfile.mkdtemp(prefix="otad-bench-")
        self.stack = harness.Stack(things=[], workdir=self.workdir)
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
        try:
            self.stack.__exit__(*exc)
        finally:
            if os.environ.get("OTAD_KEEP_TMP") == "1":
                sys.stderr.write("OTAD_KEEP_TMP=1: kept %s\n" % self.workdir)
            else:
                shutil.rmtree(self.workdir, ignore_errors=True)
        return False

    def new_thing(self, label):
        self.n += 1
        thing = "bench-%d-%s" % (self.n, label)
        self.stack.add_thing(thing)
        return thing

    # ---- otad ----------------------------------------------------------

    def run_otad(self, label, image, protocol, ota=None, caps=False, timeout=600):
        """One job in a fresh otad. Returns a dict: seconds (download time,
        from the first GetStream request (MQTT) or the job's first
        IN_PROGRESS (HTTPS: otad took it; curl's time_total includes its
        connect and handshake too) to the `receive N/N` update, as the
        stand-in received them, so the signature check is not in it), cpu (otad's user+system seconds for the whole
        job), hwm_kib (VmHWM), anon_kib (peak RssAnon, sampled every 20 ms:
        otad's own memory without shared library pages), pss_kib (Pss at the
        end), served (stand-in bytes)."""
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
        sampler = RssSampler(otad.pid)
        try:
            otad.wait_for_log(r"Connected to", 20)
            cpu0 = cpu_seconds(otad.pid)
            py0 = sum(os.times()[:2])
            sampler.start()
            self.service.queue_ota_job(thing, job, image, protocols=[protocol])
            status = self.service.wait_terminal(thing, job, timeout)
            if status != "SUCCEEDED":
                raise RuntimeError("%s: job ended %s:\n%s" % (label, status, otad.log()[-3000:]))
            result = {"cpu": cpu_seconds(otad.pid) - cpu0, "standin_cpu": sum(os.times()[:2]) - py0, "hwm_kib": proc_kib(otad.pid, "status", "VmHWM"),
                      "pss_kib": proc_kib(otad.pid, "smaps_rollup", "Pss")}
        finally:
            sampler.stop()
            otad.stop()
        result["anon_kib"] = sampler.peak_anon
        shutil.rmtree(out, ignore_errors=True)
        ups = self.service.record.status_updates(thing, job, outcome="accepted")
        start = ups[0]["time"]
        if protocol == "MQTT":
            # From the first GetStream, like the raw pair's first publish:
            # the job's subscriptions before it are not download time.
            start = self.service.record.requests(thing, "streams/get")[0]["time"]
        end = None
        for u in ups:
            r = (u["statusDetails"] or {}).get("receive", "")
            if r and r.split("/")[0] == r.split("/")[1]:
                end = u["time"]
        if end is None:
            raise RuntimeError("%s: no final receive update" % label)
        result["seconds"] = end - start
        result["served"] = self.service.record.bytes_served(thing, "mqtt" if protocol == "MQTT" else "https")
        return result

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
        data = secrets.token_bytes(total)
        count = (total + block - 1) // block
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
            for i in range(count):
                # Encoded as it goes, as the stand-in answers a request.
                p = data[i * block:(i + 1) * block]
                m = streams_mod.encode_block("cbor", "rdy", streams_mod.Block(0, i, len(p), p))
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

    def raw_stream(self, block, data):
        """The stand-in's own streams capacity: a minimal paho GetStream
        client that asks for every block at once (one request per 128 KiB,
        no window, no checks) and counts the data messages. Seconds from the
        first request to the last block."""
        import cbor2
        thing = self.new_thing("rawstream")
        pki = self.stack.pki
        stream_id = "bench-raw-%d" % self.n
        self.service.create_stream(stream_id, {0: data})
        base = "$aws/things/%s/streams/%s/" % (thing, stream_id)
        count = (len(data) + block - 1) // block
        per_request = max(1, 131072 // block)
        got = threading.Event()
        seen = set()
        subscribed = threading.Event()

        def on_message(client, userdata, msg):
            seen.add(cbor2.loads(msg.payload)["i"])
            if len(seen) == count:
                got.set()

        c = mqtt.Client(client_id=thing, protocol=mqtt.MQTTv311)
        c.tls_set(ca_certs=pki.ca_cert, certfile=pki.client_cert(thing), keyfile=pki.client_key(thing))
        c.on_message = on_message
        c.on_subscribe = lambda *a: subscribed.set()
        c.on_connect = lambda cl, u, f, rc: cl.subscribe(base + "data/cbor", 0)
        c.connect("localhost", self.stack.broker.port, 30)
        c.loop_start()
        try:
            if not subscribed.wait(10):
                raise RuntimeError("raw stream client could not subscribe")
            t0 = time.monotonic()
            for o in range(0, count, per_request):
                c.publish(base + "get/cbor", cbor2.dumps({"c": "rdy", "f": 0, "l": block, "o": o,
                                                          "n": min(per_request, count - o)}), qos=0)
            if not got.wait(600):
                raise RuntimeError("raw stream client got %d of %d blocks" % (len(seen), count))
            return time.monotonic() - t0
        finally:
            c.loop_stop()
            c.disconnect()

    # ---- curl ------------------------------------------------------------

    def curl(self, image, dest="/dev/null"):
        """curl's own time_total for one GET of image from the stand-in's
        HTTPS server, written to dest."""
        key = "bench/curl-%d.bin" % len(image)
        if self.service.https.file(key)[0] is None:
            self.service.https.add_file(key, image)
        url = self.service.https.presign(key, 3600)
        p = subprocess.run(["curl", "-sS", "--cacert", self.stack.pki.ca_cert, "-o", dest,
                            "-w", "%{time_total} %{size_download}", url],
                           capture_output=True, text=True, check=True)
        seconds, size = p.stdout.split()
        if int(size) != len(image):
            raise RuntimeError("curl downloaded %s of %d bytes" % (size, len(image)))
        if dest != "/dev/null":
            os.unlink(dest)
        return float(seconds)

    # ---- output ----------------------------------------------------------

    def row(self, what, mine, ref, ratio, target, note=""):
        ok = ratio >= target
        line = "%-46s %10s  %-28s %6.1f %%  target >= %3.0f %%  %s%s" % (
            what, mine, ref, ratio * 100, target * 100, "PASS" if ok else "MISS", note)
        print(line, flush=True)
        self.rows.append({"what": what, "otad": mine, "reference": ref, "ratio": round(ratio, 3),
                          "target": target, "pass": ok})


def proc_kib(pid, name, field):
    with open("/proc/%d/%s" % (pid, name)) as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError("no %s in /proc/%d/%s" % (field, pid, name))


def cpu_seconds(pid):
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class RssSampler:
    """Samples RssAnon of a process every 20 ms: the kernel keeps a peak of
    the whole RSS (VmHWM) only, which is mostly shared library pages."""

    def __init__(self, pid):
        self.pid = pid
        self.peak_anon = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self):
        self._thread.start()

    def _run(self):
        while not self._stop.wait(0.02):
            try:
                self.peak_anon = max(self.peak_anon, proc_kib(self.pid, "status", "RssAnon"))
            except (OSError, RuntimeError):
                return

    def stop(self):
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()


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
    repeats = 1 if args.quick else 3
    best_of = "" if repeats == 1 else " (best of %d)" % repeats
    mem = []

    with Bench(args) as b:
        print("otad %s; %d CPUs; stand-in and broker on 127.0.0.1; otad writes to %s"
              % (harness.otad_binary(), os.cpu_count(), args.target_dir or b.stack.workdir), flush=True)
        image16 = secrets.token_bytes(mqtt_size)

        # MQTT, uncapped, against the raw broker path.
        # Interleaved, best of `repeats` each: runs of a fraction of a second
        # on a small machine shared with the Python stand-in are noisy.
        for block in (4 * KIB, 128 * KIB):
            raw, rs, r = None, None, None
            for _ in range(repeats):
                t = b.raw_pubsub(block, mqtt_size)
                raw = t if raw is None else min(raw, t)
                t = b.raw_stream(block, image16)
                rs = t if rs is None else min(rs, t)
                o = b.run_otad("mqtt%dk" % (block // KIB), image16, "MQTT", dict(UNCAPPED, block_size=block))
                r = o if r is None or o["seconds"] < r["seconds"] else r
            mem.append(("MQTT 16 MiB, %d KiB blocks" % (block // KIB), r))
            b.row("MQTT 16 MiB, %3d KiB blocks, no caps%s" % (block // KIB, best_of),
                  "%.2f MiB/s" % mib_s(mqtt_size, r["seconds"]), "raw pub/sub %.2f MiB/s" % mib_s(mqtt_size, raw),
                  raw / r["seconds"], 0.90, "  (cpu: otad %.2f s, stand-in %.2f s; served %.1f MiB)"
                  % (r["cpu"], r["standin_cpu"], r["served"] / MIB))
            b.row("  the same against the stand-in's streams", "%.2f MiB/s" % mib_s(mqtt_size, r["seconds"]),
                  "all-at-once client %.2f MiB/s" % mib_s(mqtt_size, rs), rs / r["seconds"], 0.90)

        # The same at 128 MiB (one stream file beyond AWS's 24 MB, lifted
        # here): 16 MiB at 128 KiB blocks is 128 messages, a fraction of a
        # second in which the first round trip weighs heavily.
        if not args.quick:
            streams_mod.MAX_FILE = 256 * MIB
            big = secrets.token_bytes(128 * MIB)
            raw = b.raw_pubsub(128 * KIB, len(big))
            rs = b.raw_stream(128 * KIB, big)
            r = b.run_otad("mqtt128m", big, "MQTT", dict(UNCAPPED, block_size=128 * KIB))
            b.row("MQTT 128 MiB, 128 KiB blocks, no caps", "%.2f MiB/s" % mib_s(len(big), r["seconds"]),
                  "raw pub/sub %.2f MiB/s" % mib_s(len(big), raw), raw / r["seconds"], 0.90,
                  "  (cpu: otad %.2f s, stand-in %.2f s)" % (r["cpu"], r["standin_cpu"]))
            b.row("  the same against the stand-in's streams", "%.2f MiB/s" % mib_s(len(big), r["seconds"]),
                  "all-at-once client %.2f MiB/s" % mib_s(len(big), rs), rs / r["seconds"], 0.90)
            del big

        # MQTT under AWS's per-connection caps, against 512 KiB/s, with
        # otad's defaults but the block size.
        if not args.quick:
            for block in (4 * KIB, 128 * KIB):
                raw = b.raw_pubsub(block, mqtt_size, caps=True)
                r = b.run_otad("caps%dk" % (block // KIB), image16, "MQTT", {"block_size": block}, caps=True)
                b.row("MQTT 16 MiB, %3d KiB blocks, AWS caps" % (block // KIB),
                      "%.0f KiB/s" % (mqtt_size / KIB / r["seconds"]), "512 KiB/s (raw capped %.0f KiB/s)"
                      % (mqtt_size / KIB / raw), mqtt_size / r["seconds"] / AWS_RATE, 0.90,
                      "  (vs raw capped %.0f %%, served %.1f MiB)" % (100 * raw / r["seconds"], r["served"] / MIB))

        # HTTPS, against curl on the same server. Interleaved, best of
        # `repeats` each: a 2-CPU machine shared with the Python server is noisy.
        r16 = b.run_otad("https16", image16, "HTTP")
        mem.append(("HTTPS 16 MiB", r16))
        del image16
        image = secrets.token_bytes(https_size)
        target = args.target_dir or b.stack.workdir
        best = {}
        for _ in range(repeats):
            for name, run in (("null", lambda: b.curl(image)),
                              ("file", lambda: b.curl(image, os.path.join(target, "curl.bin"))),
                              ("otad", lambda: b.run_otad("https%d" % (https_size // MIB), image, "HTTP"))):
                r = run()
                secs = r["seconds"] if isinstance(r, dict) else r
                if name not in best or secs < best[name][0]:
                    best[name] = (secs, r)
        r = best["otad"][1]
        mem.append(("HTTPS %d MiB" % (https_size // MIB), r))
        b.row("HTTPS %d MiB%s" % (https_size // MIB, best_of), "%.1f MiB/s" % mib_s(https_size, r["seconds"]),
              "curl -o /dev/null %.1f MiB/s" % mib_s(https_size, best["null"][0]), best["null"][0] / r["seconds"], 0.95,
              "  (otad cpu %.2f s)" % r["cpu"])
        b.row("HTTPS %d MiB, both writing the file" % (https_size // MIB), "%.1f MiB/s" % mib_s(https_size, r["seconds"]),
              "curl -o FILE %.1f MiB/s" % mib_s(https_size, best["file"][0]), best["file"][0] / r["seconds"], 0.95)

        # Peak RSS: bounded, and not growing with the image.
        for what, r in mem:
            print("%-46s %10s  %-28s %s   (peak RssAnon %.1f MiB, Pss %.1f MiB)"
                  % ("peak RSS (VmHWM), " + what, "%.1f MiB" % (r["hwm_kib"] / 1024), "target <= 8 MiB",
                     "PASS" if r["hwm_kib"] <= 8 * 1024 else "MISS", r["anon_kib"] / 1024, r["pss_kib"] / 1024),
                  flush=True)
            b.rows.append({"what": "memory " + what, "vmhwm_kib": r["hwm_kib"], "peak_rssanon_kib": r["anon_kib"],
                           "pss_kib": r["pss_kib"], "pass": r["hwm_kib"] <= 8 * 1024})
        growth = r["hwm_kib"] - r16["hwm_kib"]
        print("%-46s %10s  %-28s %s" % ("peak RSS growth, HTTPS 16 -> %d MiB" % (https_size // MIB),
                                      "%+d KiB" % growth, "target: does not grow", "PASS" if growth < 512 else "MISS"))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(b.rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

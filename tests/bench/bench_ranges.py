#!/usr/bin/python3
"""The transport half of adaptive updates (issue 13), measured: what otad
puts on the wire to fetch only the missing chunks of a zchunk payload, side
by side with zck_delta_size on the same pair of images, over MQTT streams
and over HTTPS, and what the block size costs at the chunks' edges.

Two tables:

  1. Edge cost: bytes fetched / bytes wanted when the wanted ranges are
     covered by stream blocks of 1 to 128 KiB, with the MQTT framing of each
     block, and the time AWS IoT's caps (512 KiB/s, 100 publishes/s) allow
     for it; for the real pair's missing chunks and for synthetic chunk
     distributions (content-defined chunks of 4 to 64 KiB compressed,
     missing alone or in runs). The block size otad picks for each
     (ranges_stream_block_size()) is marked.
  2. The real pair through otad's transports (tests/stream-fetch and
     tests/http-fetch with --ranges) against the stand-in's streams, the
     stand-in's S3 (one range per GET) and nginx (multipart/byteranges):
     bytes on the wire against zck_delta_size's "Would download" figure,
     target within 1.25x.

The pair: a tar of files from /usr/lib (binaries and Python), and the same
tar after an "update" in which a tenth of the files changed (binaries
throughout, as a rebuild changes them; Python files by one inserted line),
both compressed with zck's default content-defined chunking.

Run: meson test -C build --benchmark -v bench-ranges   (or directly, with
OTAD_BUILD_ROOT set; --quick: a smaller pair, no runs under the AWS caps).
Asserts only that every transfer is correct; figures are printed.
"""

import argparse
import io
import os
import random
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "standin"))
sys.path.insert(0, os.path.join(HERE, "..", "integration"))

import harness  # noqa: E402
import streams as streams_mod  # noqa: E402
import wanted_ranges  # noqa: E402
from test_http_fetch import Nginx  # noqa: E402

KIB = 1024
MIB = 1024 * KIB
BUILD = os.environ.get("OTAD_BUILD_ROOT", os.path.join(HERE, "..", "..", "build"))
STREAM_FETCH = os.path.join(BUILD, "tests", "stream-fetch")
HTTP_FETCH = os.path.join(BUILD, "tests", "http-fetch")

AWS_BYTES_PER_S = 512 * KIB
AWS_PUBLISHES_PER_S = 100
BLOCK_SIZES = [1 << k for k in range(10, 18)]
# ranges.h: RANGES_BLOCK_FRAMING, RANGES_BLOCK_SIZE_FLOOR, the 1/8 budget.
FRAMING, FLOOR = 120, 4096
TARGET = 1.25


# ---- the pair of images --------------------------------------------------------

def corpus(limit_bin, limit_py):
    out = []
    for top, limit in (("/usr/lib/x86_64-linux-gnu", limit_bin), ("/usr/lib/python3", limit_py)):
        total = 0
        for root, dirs, files in os.walk(top):
            dirs.sort()
            for name in sorted(files):
                path = os.path.join(root, name)
                if os.path.islink(path) or not os.path.isfile(path):
                    continue
                size = os.path.getsize(path)
                if size == 0 or size > 4 * MIB or total + size > limit:
                    continue
                out.append(path)
                total += size
    return out


def updated(data, rng, path):
    """A new version: a rebuilt binary differs throughout (a byte in every
    2 KiB, and a few bytes more); a Python file by one inserted line."""
    if path.endswith(".py"):
        pos = rng.randrange(len(data) + 1)
        return data[:pos] + b"# patched %d\n" % rng.randrange(1 << 30) + data[pos:]
    b = bytearray(data)
    for i in range(0, len(b), 2048):
        j = i + rng.randrange(min(2048, len(b) - i))
        b[j] ^= 1 + rng.randrange(255)
    pos = rng.randrange(len(b) + 1)
    return bytes(b[:pos]) + bytes(rng.randrange(256) for _ in range(rng.randrange(200))) + bytes(b[pos:])


def make_tar(paths, out, changed, rng):
    with tarfile.open(out, "w", format=tarfile.GNU_FORMAT) as t:
        for path in paths:
            with open(path, "rb") as f:
                data = f.read()
            info = tarfile.TarInfo(path.lstrip("/"))
            info.mode, info.mtime = 0o644, 1700000000
            if path in changed:
                data = updated(data, rng, path)
                info.mtime = 1800000000
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))


def zck_chunks(path):
    """(header size, [(checksum, start, compressed size)]) from zck_read_header."""
    out = subprocess.run(["zck_read_header", "-c", path], capture_output=True, text=True, check=True).stdout
    header = int(re.search(r"^Header size: (\d+)", out, re.M).group(1))
    rows = [(m.group(1), int(m.group(2)), int(m.group(3)))
            for m in re.finditer(r"^\s+\d+ ([0-9a-f]+)\s+(\d+)\s+(\d+)\s+\d+$", out, re.M)]
    return header, rows


def make_pair(workdir, quick):
    paths = corpus(12 * MIB if quick else 36 * MIB, 4 * MIB if quick else 12 * MIB)
    rng = random.Random(1)
    changed = {p for p in paths if rng.random() < 0.1}
    old_tar, new_tar = os.path.join(workdir, "old.tar"), os.path.join(workdir, "new.tar")
    make_tar(paths, old_tar, set(), rng)
    make_tar(paths, new_tar, changed, random.Random(2))
    for tar in (old_tar, new_tar):
        subprocess.run(["zck", "-o", tar[:-4] + ".zck", tar], check=True, stdout=subprocess.DEVNULL)
    old_zck, new_zck = old_tar[:-4] + ".zck", new_tar[:-4] + ".zck"
    delta = subprocess.run(["zck_delta_size", old_zck, new_zck], capture_output=True, text=True, check=True).stdout
    m = re.search(r"Would download (\d+) of (\d+) bytes", delta)
    # What the device lacks: the header, and every chunk whose checksum the
    # old payload does not have (what zck_delta_size counts).
    header, new_rows = zck_chunks(new_zck)
    have = {c for c, _, _ in zck_chunks(old_zck)[1]}
    wanted = [(0, header)] + [(start, size) for c, start, size in new_rows if size > 0 and c not in have]
    with open(new_zck, "rb") as f:
        payload = f.read()
    chunk_sizes = [size for _, _, size in new_rows if size > 0]
    return {
        "image": os.path.getsize(new_tar), "files": len(paths), "changed": len(changed),
        "payload": payload, "wanted": sorted(wanted), "delta_size": int(m.group(1)),
        "chunks": len(chunk_sizes), "chunk_mean": sum(chunk_sizes) / len(chunk_sizes),
    }


# ---- edge cost --------------------------------------------------------------------

def stream_cost(ranges, size, block):
    blocks, nbytes = wanted_ranges.cover(ranges, size, block)
    wire = nbytes + len(blocks) * FRAMING
    # Under the caps a transfer is bound by bytes or by publishes.
    seconds = max(wire / AWS_BYTES_PER_S, len(blocks) / AWS_PUBLISHES_PER_S)
    return nbytes, wire, seconds


def chosen_block_size(ranges, size, max_block):
    """ranges_stream_block_size(), for the table (the real runs report what
    otad chose, and the bench checks the two agree)."""
    want = wanted_ranges.total(ranges)
    if max_block <= FLOOR:
        return max_block
    b = 1 << (max_block.bit_length() - 1)
    while b > FLOOR:
        blocks, nbytes = wanted_ranges.cover(ranges, size, b)
        if nbytes + len(blocks) * FRAMING <= want + want // 8:
            return b
        b //= 2
    return FLOOR


def edge_table(rows):
    print("\nEdge cost: bytes fetched / wanted over MQTT streams (block payloads + %d bytes of framing each), "
          "and the time AWS IoT's caps allow (512 KiB/s, 100 publishes/s); * = the block size otad picks "
          "(configured block_size 128 KiB)" % FRAMING)
    head = "%-46s %9s %7s" % ("wanted ranges", "wanted", "ranges")
    for b in BLOCK_SIZES:
        head += " %13s" % ("%d KiB" % (b // KIB))
    print(head)
    for name, ranges, size in rows:
        want = wanted_ranges.total(ranges)
        pick = chosen_block_size(ranges, size, 128 * KIB)
        line = "%-46s %8.1fM %7d" % (name, want / MIB, len(wanted_ranges.canonical(ranges)))
        for b in BLOCK_SIZES:
            _, wire, seconds = stream_cost(ranges, size, b)
            line += " %s%5.3f %5.0fs" % ("*" if b == pick else " ", wire / want, seconds)
        print(line)


def synthetic_rows(quick):
    size = (32 if quick else 96) * MIB
    rows = []
    for mean in (4 * KIB, 16 * KIB, 64 * KIB):
        for run in (1, 4):
            ranges = wanted_ranges.chunk_like(size, seed=mean + run, mean=mean, missing=0.1, run=run, lo=mean // 4)
            rows.append(("synthetic: chunks ~%2d KiB, %s" % (mean // KIB, "missing alone" if run == 1
                                                              else "missing in runs of ~%d" % run), ranges, size))
    return rows


# ---- the real transfers ------------------------------------------------------------

class Runs:
    def __init__(self, workdir, pair):
        self.workdir = workdir
        self.pair = pair
        self.size = len(pair["payload"])
        self.ranges_file = os.path.join(workdir, "wanted")
        wanted_ranges.write_file(self.ranges_file, pair["wanted"])
        self.payload_file = os.path.join(workdir, "payload.zck")
        with open(self.payload_file, "wb") as f:
            f.write(pair["payload"])
        self.n = 0

    def check(self, out, label):
        # Only wanted bytes, all of them right (download.h).
        class Check:
            def assertEqual(self, a, b, msg=None):
                if a != b:
                    raise AssertionError("%s: %s" % (label, msg or "%r != %r" % (a, b)))

            def assertTrue(self, a, msg=None):
                if not a:
                    raise AssertionError("%s: %s" % (label, msg))
        wanted_ranges.check_file(Check(), out, self.pair["payload"], self.pair["wanted"])

    def output(self):
        self.n += 1
        out = os.path.join(self.workdir, "out-%d" % self.n)
        wanted_ranges.prefill(out, self.size)
        return out

    def mqtt(self, stack, block_size, caps=False):
        thing = "bench-%d" % self.n
        stack.add_thing(thing)
        stream_id = "AFR_OTA-bench-%d" % self.n
        stack.service.create_stream(stream_id, {0: self.pair["payload"]})
        if caps:
            stack.service.set_aws_caps(thing)
            ota = {"block_size": block_size}  # otad's defaults otherwise: paced for AWS
        else:
            ota = {"block_size": block_size, "max_requests_per_second": 0, "window": 16}
        config = stack.write_otad_config(thing, {"ota": ota, "log": {"level": "info"}})
        out = self.output()
        argv = [STREAM_FETCH, "-c", config, "--stream", stream_id, "--file-id", "0", "--size", str(self.size),
                "--out", out, "--state", out + ".progress", "--job-id", "AFR_OTA-bench", "--ranges",
                self.ranges_file]
        t0 = time.monotonic()
        p = subprocess.run(argv, capture_output=True, text=True, timeout=1200)
        seconds = time.monotonic() - t0
        if caps:
            stack.service.set_aws_caps(thing, enabled=False)
        fields = dict(re.findall(r"(\w+)=(\S*)", p.stdout))
        if p.returncode != 0 or fields.get("result") != "0":
            raise AssertionError("stream-fetch failed: %s\n%s" % (p.stdout, p.stderr[-2000:]))
        self.check(out, "mqtt")
        if fields["bytes_outside"] != "0" or fields["bytes_twice"] != "0":
            raise AssertionError("stream-fetch broke the write contract: %s" % p.stdout)
        sent = [e for e in stack.service.record.sent(thing) if e["topic"].endswith("/data/cbor")]
        topic = len(sent[0]["topic"]) if sent else 0
        # MQTT PUBLISH framing: fixed header, remaining length, topic.
        down = sum(e["size"] + topic + 2 + 1 + (2 if e["size"] + topic + 2 < 16384 else 3) for e in sent)
        requests = stack.service.record.requests(thing, "streams/get")
        # GetStream payloads as published, and their PUBLISH framing.
        up = int(fields["request_bytes"]) + sum(len(q["topic"]) + 2 + 2 for q in requests)
        return {"down": down, "up": up,
                "requests": len(requests), "seconds": seconds, "block": int(fields["block_size"]),
                "blocks": int(fields["blocks_received"]), "fetched": int(fields["bytes_fetched"])}

    def https(self, url, ca):
        out = self.output()
        argv = [HTTP_FETCH, "--url", url, "--output", out, "--size", str(self.size), "--state", out + ".progress",
                "--job-id", "AFR_OTA-bench", "--ca-file", ca, "--ranges", self.ranges_file]
        t0 = time.monotonic()
        p = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=600)
        seconds = time.monotonic() - t0
        line = [ln for ln in p.stdout.splitlines() if ln.startswith("result=")]
        fields = dict(re.findall(r"(\w+)=(\S*)", line[0].split(" reason=")[0])) if line else {}
        if p.returncode != 0 or fields.get("result") != "0":
            raise AssertionError("http-fetch failed: %s\n%s" % (p.stdout, p.stderr[-2000:]))
        self.check(out, "https")
        if fields["bytes_outside"] != "0" or fields["bytes_twice"] != "0":
            raise AssertionError("http-fetch broke the write contract: %s" % p.stdout)
        return {"down": int(fields["bytes_received"]) + int(fields["header_bytes"]),
                "up": int(fields["request_bytes"]), "requests": int(fields["requests"]), "seconds": seconds,
                "body": int(fields["bytes_received"]), "one_range": fields["one_range_per_request"] == "1"}


def row(label, r, delta, extra=""):
    ratio = r["down"] / delta
    print("%-52s %10d %6.3f  %s  %5d requests %7d up %6.1f s%s"
          % (label, r["down"], ratio, "PASS" if ratio <= TARGET else "MISS", r["requests"], r["up"], r["seconds"],
             extra))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="a smaller pair, no runs under the AWS caps")
    args = ap.parse_args()
    for tool in ("zck", "zck_read_header", "zck_delta_size"):
        if not shutil.which(tool):
            print("SKIP: %s not installed (Debian package zchunk, tests/install-deps.sh)" % tool)
            return 0
    for exe in (STREAM_FETCH, HTTP_FETCH):
        if not os.access(exe, os.X_OK):
            print("SKIP: %s not built" % exe)
            return 0

    workdir = tempfile.mkdtemp(prefix="otad-bench-ranges-")
    os.chmod(workdir, 0o755)
    try:
        t0 = time.monotonic()
        pair = make_pair(workdir, args.quick)
        size, want, delta = len(pair["payload"]), wanted_ranges.total(pair["wanted"]), pair["delta_size"]
        print("Pair: %d files, %.1f MiB tar, %d changed; zchunk payload %.1f MiB in %d chunks (%.1f KiB mean "
              "compressed); made in %.0f s" % (pair["files"], pair["image"] / MIB, pair["changed"], size / MIB,
                                               pair["chunks"], pair["chunk_mean"] / KIB, time.monotonic() - t0))
        print("zck_delta_size: would download %d bytes; the wanted ranges (header + missing chunks): %d bytes in "
              "%d ranges" % (delta, want, len(wanted_ranges.canonical(pair["wanted"]))))

        edge_table([("the pair: header + missing chunks", pair["wanted"], size)] + synthetic_rows(args.quick))

        print("\nBytes on the wire (server to device; MQTT: PUBLISH packets of data messages, HTTPS: response "
              "headers and bodies; TLS framing not counted) vs zck_delta_size, target <= %.2fx" % TARGET)
        print("%-52s %10s %6s" % ("", "bytes", "ratio"))
        print("%-52s %10d %6.3f" % ("zck_delta_size", delta, 1.0))
        runs = Runs(workdir, pair)
        old_max = streams_mod.MAX_FILE
        streams_mod.MAX_FILE = max(old_max, size)  # a payload above 24 MB would be parts
        try:
            with harness.Stack(things=[], workdir=os.path.join(workdir, "stack")) as stack:
                auto = runs.mqtt(stack, 128 * KIB)
                expect = chosen_block_size(pair["wanted"], size, 128 * KIB)
                if auto["block"] != expect:
                    raise AssertionError("otad chose %d-byte blocks, the table %d" % (auto["block"], expect))
                row("MQTT streams, block size otad picks (%d KiB)" % (auto["block"] // KIB), auto, delta,
                    "  (%d blocks, %d payload bytes)" % (auto["blocks"], auto["fetched"]))
                for b in (4 * KIB, 1 * KIB):
                    r = runs.mqtt(stack, b)
                    row("MQTT streams, %d KiB blocks" % (b // KIB), r, delta,
                        "  (%d blocks, %d payload bytes)" % (r["blocks"], r["fetched"]))
                if not args.quick:
                    r = runs.mqtt(stack, 128 * KIB, caps=True)
                    _, _, estimate = stream_cost(pair["wanted"], size, r["block"])
                    row("MQTT streams, AWS caps, %d KiB blocks" % (r["block"] // KIB), r, delta,
                        "  (%.0f KiB/s of wanted bytes; the table's estimate %.1f s)"
                        % (want / KIB / r["seconds"], estimate))

                stack.service.https.add_file("ota/payload.zck", pair["payload"])
                r = runs.https(stack.service.https.presign("ota/payload.zck"), stack.pki.ca_cert)
                row("HTTPS, stand-in S3 (one range per GET)", r, delta, "  (%d body bytes)" % r["body"])

                ngdir = os.path.join(workdir, "nginx")
                os.makedirs(ngdir)
                os.chmod(ngdir, 0o755)
                shutil.copy(stack.pki.server_cert, os.path.join(ngdir, "server.crt"))
                shutil.copy(stack.pki.server_key, os.path.join(ngdir, "server.key"))
                nginx = Nginx(ngdir)
                try:
                    nginx.add("payload.zck", pair["payload"])
                    r = runs.https(nginx.plain_url("files", "payload.zck"), stack.pki.ca_cert)
                    row("HTTPS, nginx (multipart/byteranges)", r, delta, "  (%d body bytes)" % r["body"])
                    r = runs.https(nginx.url("files", "payload.zck"), stack.pki.ca_cert)
                    row("HTTPS, nginx, an S3-signed URL (one range per GET)", r, delta,
                        "  (%d body bytes)" % r["body"])
                finally:
                    nginx.stop()
        finally:
            streams_mod.MAX_FILE = old_max
        print("\nFull payload for comparison: %d bytes (%.2fx zck_delta_size)" % (size, size / delta))
    finally:
        if os.environ.get("OTAD_KEEP_TMP") == "1":
            sys.stderr.write("OTAD_KEEP_TMP=1: kept %s\n" % workdir)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

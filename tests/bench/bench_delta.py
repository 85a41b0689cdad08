#!/usr/bin/python3
"""Adaptive updates, the device side (issue 13): figures side by side from
one run. A benchmark, not a test: it never fails on a figure, it marks a
figure off its target MISS.

Two real root file systems: bench_bundle.py's debootstrap minbase+systemd
tree (built once, cached in <build>/bench-bundle/) and a copy of it with one
more package installed by apt in a chroot (PACKAGE, which pulls in its one
library; also cached), as 400 MiB ext4 images. The old image plays the
active slot; the new one is bundled with `otad bundle create` (cached, with
its key). Pairs:
  reproducible  both built with the README's recipe (fixed UUID and hash
                seed, E2FSPROGS_FAKE_TIME, clamped mtimes and atimes, every
                ctime set with debugfs); also built twice and compared
  plain         both `mkfs.ext4 -d` as is: random UUID and hash seed, the
                time of the build in the superblock and in every inode
  derived       the new image made from the old reproducible one (README:
                loop mount, rsync of what differs, journal and times reset)
  same tree, plain   the old tree built twice with plain mkfs.ext4 -d

Measured per pair:
  * what the plan fetches (tests/delta-plan: delta.c on the image files)
    next to `zck_delta_size OLD.zck NEW.zck` on the two bundles' payloads
    (zchunk files cut with the same gear64 chunking), the full bundle and
    the raw image; otad counts the payload header it fetches before it
    plans, as zck_delta_size does (target: within 1.25x of zck_delta_size);
  * bytes on the wire: MQTT streams at 4/8/16/32 KiB blocks (whole blocks
    covering the header and the fetch ranges within each part file, plus
    RANGES_BLOCK_FRAMING per block, as the transport's ranges.h counts
    them) and HTTPS Range requests coalesced over gaps below 0/4/16/64 KiB
    (bytes and requests, one span a request as S3 serves);
  * time to install under AWS IoT's caps (512 KiB/s and 100 publishes/s per
    connection, protocol.md §7): transfer computed from the MQTT wire bytes
    and blocks, plus the measured local work (scan, copy, decoding the
    fetched chunks, the read-back); the full bundle with bundle-decode's
    measured decode; raw as its transfer alone (target: the reproducible
    pair's adaptive transfer under 10 s);
  * the scan (reading the active slot, cutting it with gear64, SHA-256 of
    each piece) against `zck --compression-format=none -h sha256` cutting
    and hashing the same image into tmpfs, both from the page cache, best
    of 3 (target: >= 90 % of zck's rate); look-up 3 on and off, look-up 1
    on a target half written (resume) and on one holding the old image (a
    first install into a slot that still holds an older release);
  * peak RssAnon of the scan for the 400 MiB and a 1 GiB image (flat).
Needs root (debootstrap, chroot, loop mounts) and Debian's mirror once.
Run: meson test -C build --benchmark -v delta   (or this file directly with
OTAD_BUILD_ROOT set). BENCH_DELTA_QUICK=1 skips the 1 GiB image.
"""

import json
import resource
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_bundle as bb  # noqa: E402

PLAN = os.path.join(bb.BUILD, "tests", "delta-plan")
DECODE = bb.DECODE
PACKAGE = "nano"
EPOCH = 1700000000
UUID = "6f7c2a3e-0b1d-4e5f-8a9b-0c1d2e3f4a5b"
HASH_SEED = "1b2c3d4e-5f60-4172-8394-a5b6c7d8e9f0"
MIB = 1024 * 1024
KIB = 1024
CAP_BYTES = 512 * KIB       # AWS IoT, per connection
CAP_PUBLISHES = 100         # per second, per connection
FRAMING = 120               # ranges.h RANGES_BLOCK_FRAMING: CBOR keys + PUBLISH header per block
SIZES = (400, 1024)


def sh(cmd, **kw):
    return bb.sh(cmd, **kw)


def tree_plus(base):
    """base with PACKAGE installed by apt in a chroot, built once."""
    tree = base + "+" + PACKAGE
    if os.path.isdir(tree):
        return tree
    tmp = tree + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    sh(["cp", "-a", base, tmp])
    shutil.copy("/etc/resolv.conf", os.path.join(tmp, "etc/resolv.conf.bench"))
    os.rename(os.path.join(tmp, "etc/resolv.conf"), os.path.join(tmp, "etc/resolv.conf.orig"))
    os.rename(os.path.join(tmp, "etc/resolv.conf.bench"), os.path.join(tmp, "etc/resolv.conf"))
    sh(["mount", "-t", "proc", "proc", os.path.join(tmp, "proc")])
    try:
        # The package lists debootstrap left: no `apt-get update`, so that
        # the trees differ by the package and what installing it writes.
        sh(["chroot", tmp, "apt-get", "install", "-y", "-q", "--no-install-recommends", PACKAGE],
           env={**os.environ, "DEBIAN_FRONTEND": "noninteractive", "LC_ALL": "C"})
        sh(["chroot", tmp, "apt-get", "clean"])
    finally:
        sh(["umount", os.path.join(tmp, "proc")])
    os.replace(os.path.join(tmp, "etc/resolv.conf.orig"), os.path.join(tmp, "etc/resolv.conf"))
    os.rename(tmp, tree)
    return tree


def ext4(tree, mib, reproducible, path):
    """tree as an ext4 image, built once: reproducibly (the README's
    recipe) or with plain `mkfs.ext4 -d`."""
    if os.path.exists(path):
        return path
    tmp = path + ".tmp"
    if not reproducible:
        sh(["mkfs.ext4", "-q", "-F", "-L", "rootfs", "-d", tree, tmp, "%dM" % mib])
        os.rename(tmp, path)
        return path
    env = {**os.environ, "E2FSPROGS_FAKE_TIME": str(EPOCH)}
    with clamped_copy(tree) as (copy, ctimes):
        sh(["mkfs.ext4", "-q", "-F", "-L", "rootfs", "-U", UUID, "-E", "hash_seed=" + HASH_SEED, "-d", copy, tmp,
            "%dM" % mib], env=env)
        sh(["debugfs", "-w", "-f", ctimes, tmp], env=env)
    os.rename(tmp, path)
    return path


class clamped_copy:
    """A copy of tree with every mtime clamped to EPOCH, and the debugfs
    script that sets every inode's ctime and atime to EPOCH: mke2fs -d
    copies both from the tree, the kernel sets ctime to now whenever a file
    is written or copied, and reading a file (mke2fs reading it, a symlink's
    readlink) may move its atime under relatime, in whichever order it
    happens to stat and read."""

    def __init__(self, tree):
        self.tree = tree

    def __enter__(self):
        self.work = tempfile.mkdtemp(prefix="tree-", dir=bb.CACHE)
        copy = os.path.join(self.work, "root")
        sh(["cp", "-a", self.tree, copy])
        sh("find '%s' -newermt @%d -print0 | xargs -0r touch -h -d @%d" % (copy, EPOCH, EPOCH))
        cmds = os.path.join(self.work, "ctime.debugfs")
        with open(cmds, "w") as f:
            for root, dirs, files in os.walk(copy):
                for name in [""] + dirs + files:
                    p = os.path.join(root, name)[len(copy):] or "/"
                    f.write('sif "%s" ctime @%d\nsif "%s" atime @%d\n' % (p, EPOCH, p, EPOCH))
        return copy, cmds

    def __exit__(self, *exc):
        shutil.rmtree(self.work, ignore_errors=True)


def derived(old, tree, path):
    """The README's other recipe: the new image made from a copy of the old
    one, mounted, with rsync writing only what differs (unchanged files keep
    their inodes and blocks); then the journal made again and every time
    the mount left set back."""
    if os.path.exists(path):
        return path
    tmp = path + ".tmp"
    shutil.copyfile(old, tmp)
    env = {**os.environ, "E2FSPROGS_FAKE_TIME": str(EPOCH)}
    mnt = tempfile.mkdtemp(prefix="mnt-", dir=bb.CACHE)
    with clamped_copy(tree) as (copy, ctimes):
        sh(["mount", "-o", "loop,noatime", tmp, mnt])
        try:
            sh(["rsync", "-aHAXc", "--delete", "--exclude=/dev/", "--exclude=/lost+found/", copy + "/", mnt + "/"])
        finally:
            sh(["umount", mnt])
            os.rmdir(mnt)
        sh(["tune2fs", "-O", "^has_journal", tmp], env=env)
        sh(["tune2fs", "-O", "has_journal", "-J", "size=8", tmp], env=env)
        with open(ctimes, "a") as f:
            f.write('ssv mtime 0\nssv mnt_count 0\nssv last_mounted ""\nssv lastcheck @%d\n' % EPOCH)
        sh(["debugfs", "-w", "-f", ctimes, tmp], env=env)
    sh(["e2fsck", "-fn", tmp])
    os.rename(tmp, path)
    return path


def keys():
    d = os.path.join(bb.CACHE, "delta-keys")
    if not os.path.exists(os.path.join(d, "signer.crt")):
        os.makedirs(d, exist_ok=True)
        sh("openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout signer.key "
           "-out signer.crt -days 3650 -subj /CN=signer", cwd=d)
    return os.path.join(d, "signer.key"), os.path.join(d, "signer.crt")


def bundle(image, version):
    """(manifest path, manifest, payload.zck path) of image's bundle, cached."""
    out = image + ".bundle"
    manifest = os.path.join(out, "bundle-%s.manifest" % version)
    if not os.path.exists(manifest):
        key, cert = keys()
        shutil.rmtree(out, ignore_errors=True)
        sh([bb.OTAD, "bundle", "create", "--key", key, "--cert", cert, "--version", version,
            "--compatible", "bench", image, out])
    with open(manifest) as f:
        m = json.load(f)
    zck = os.path.join(out, "payload.zck")
    if not os.path.exists(zck):
        with open(zck + ".tmp", "wb") as z:
            for part in m["parts"]:
                with open(os.path.join(out, part["file"]), "rb") as f:
                    shutil.copyfileobj(f, z, 4 * MIB)
        os.rename(zck + ".tmp", zck)
    return manifest, m, zck


def plan(manifest, active, *args):
    r = subprocess.run([PLAN, *args, manifest, active], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError("delta-plan: %s" % r.stderr[-2000:])
    out = {}
    for field in r.stdout.split()[1:]:
        k, _, v = field.partition("=")
        out[k] = float(v) if v.replace(".", "", 1).isdigit() else v
    return out


def warm(path):
    sh("cat '%s' > /dev/null" % path)


# ---- wire bytes -------------------------------------------------------------

def per_part(m, ranges):
    """ranges (payload offsets) cut into each part file's own offsets."""
    out, a = [], 0
    for part in m["parts"]:
        b = a + part["size"]
        rs = [(max(o, a) - a, min(o + n, b) - a) for o, n in ranges if o < b and o + n > a]
        out.append((part["size"], rs))
        a = b
    return out


def mqtt_bytes(m, ranges, block, manifest_size):
    blocks = -(-manifest_size // block)
    wire = manifest_size + blocks * FRAMING
    for size, rs in per_part(m, ranges):
        covered = set()
        for a, b in rs:
            covered.update(range(a // block, (b - 1) // block + 1))
        for i in covered:
            wire += min(block, size - i * block) + FRAMING
        blocks += len(covered)
    return wire, blocks


def https_bytes(m, ranges, gap, manifest_size):
    wire, requests = manifest_size, 1
    for _, rs in per_part(m, ranges):
        spans = []
        for a, b in rs:
            if spans and (a <= spans[-1][1] or a - spans[-1][1] < gap):
                spans[-1][1] = b
            else:
                spans.append([a, b])
        wire += sum(b - a for a, b in spans)
        requests += len(spans)
    return wire, requests


def cap_seconds(wire, blocks):
    return max(wire / CAP_BYTES, blocks / CAP_PUBLISHES)


def measure(name, old, new, mib, full):
    """The plan for new's bundle with old as the active slot; with full, also
    zck_delta_size, the other look-ups, an install and the full decode."""
    manifest, m, new_zck = bundle(new, "2.0")
    r = {"name": name, "mib": mib, "m": m, "image": os.path.getsize(new), "manifest_size": os.path.getsize(manifest)}
    work = tempfile.mkdtemp(prefix="otad-bench-delta-", dir=bb.CACHE)
    try:
        warm(old)
        ranges_file = os.path.join(work, "ranges")
        runs = [plan(manifest, old, "--ranges", ranges_file) for _ in range(3)]
        r["plan"] = min(runs, key=lambda f: f["scan_s"])
        with open(ranges_file) as f:
            r["ranges"] = [tuple(int(x) for x in line.split()) for line in f]
        _, _, old_zck = bundle(old, "1.0")
        z = sh(["zck_delta_size", old_zck, new_zck]).stdout
        r["zck_delta"] = int(z.split("Would download ")[1].split()[0])
        if not full:
            return r
        r["plan_offsets"] = plan(manifest, old, "--offset-lookup")
        # An install interrupted halfway: the target holds the new image's
        # first half, then what it held before (here: the old image).
        target = os.path.join(work, "target.img")
        half = (r["image"] // 2) // 4096 * 4096
        sh("head -c %d '%s' > '%s' && tail -c +%d '%s' >> '%s'" % (half, new, target, half + 1, old, target))
        r["plan_resume"] = plan(manifest, old, "--target", target)
        os.unlink(target)
        # A first install into an inactive slot that still holds an older
        # image (here: the old one too, as after an A/B update to it).
        r["plan_older"] = plan(manifest, old, "--target", old)
        out = os.path.join(work, "slot.img")
        r["install"] = plan(manifest, old, "--install", out)
        os.unlink(out)
        sh("sync")
        t = time.monotonic()
        sh([DECODE, manifest, out])
        r["decode_s"] = time.monotonic() - t
        os.unlink(out)
        return r
    finally:
        shutil.rmtree(work, ignore_errors=True)


def best_of_3(cmd):
    """(wall, CPU) seconds of the fastest of 3 runs."""
    runs = []
    for _ in range(3):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t = time.monotonic()
        sh(cmd)
        wall = time.monotonic() - t
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        runs.append((wall, after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime))
    return min(runs)


def zck_rate(image):
    """zck cutting the same image and hashing its chunks with SHA-256, no
    compression, into tmpfs; and `openssl dgst -sha256` reading and hashing
    it whole with the same SHA-256 code as otad, the floor of any chunk
    finder's work (no cutting). Best of 3."""
    out = "/dev/shm/otad-bench-delta.zck"
    warm(image)
    zck = best_of_3(["zck", "--compression-format=none", "-h", "sha256", "-o", out, image])
    os.unlink(out)
    return zck, best_of_3(["openssl", "dgst", "-sha256", image])


def main():
    for tool in (bb.OTAD, PLAN, DECODE):
        if not os.access(tool, os.X_OK):
            print("# skip: %s not built" % tool)
            return 0
    for prog in ("zck", "zck_delta_size", "mkfs.ext4", "debugfs", "chroot", "rsync"):
        if not shutil.which(prog):
            print("# skip: %s missing (tests/install-deps.sh)" % prog)
            return 0
    base = bb.rootfs_tree()
    if os.geteuid() != 0:
        print("# skip: the trees and images need root (chroot, loop mounts)")
        return 0
    t = time.monotonic()
    plus = tree_plus(base)
    key = bb.recipe_key()
    sizes = SIZES[:1] if os.environ.get("BENCH_DELTA_QUICK") else SIZES
    mib = sizes[0]
    img = lambda which, mode, size=mib: os.path.join(bb.CACHE, "delta-%s-%s-%s-%dM.ext4" % (key, which, mode, size))  # noqa: E731
    print("# trees ready (%.0f s): %s and +%s" % (time.monotonic() - t, base, PACKAGE))

    t = time.monotonic()
    old_r = ext4(base, mib, True, img("old", "reproducible"))
    old_p = ext4(base, mib, False, img("old", "plain"))
    pairs = [
        ("reproducible", old_r, ext4(plus, mib, True, img("new", "reproducible")), True),
        ("plain", old_p, ext4(plus, mib, False, img("new", "plain")), True),
        ("derived", old_r, derived(old_r, plus, img("new", "derived")), True),
        ("same tree, plain", old_p, ext4(base, mib, False, img("again", "plain")), False),
    ]
    # The recipe's proof: the same tree twice, byte for byte.
    again = ext4(base, mib, True, img("again", "reproducible"))
    identical = subprocess.run(["cmp", "-s", old_r, again]).returncode == 0
    print("# images ready (%.0f s)" % (time.monotonic() - t))

    rows = []
    for name, old, new, full in pairs:
        t = time.monotonic()
        rows.append(measure(name, old, new, mib, full))
        print("# %s measured (%.0f s, bundles included)" % (name, time.monotonic() - t))
    scans = []
    for size in sizes:
        old = old_r if size == mib else ext4(base, size, True, img("old", "reproducible", size))
        new = rows[0] if size == mib else measure("reproducible", old, ext4(plus, size, True, img("new", "reproducible", size)),
                                                 size, False)
        scans.append((size, new, zck_rate(old)))
    report(rows, scans, identical)
    return 0


def mark(ok):
    return "PASS" if ok else "MISS"


def fetched(r):
    return [(0, r["m"]["payload"]["header_size"])] + r["ranges"]


def report(rows, scans, identical):
    mib = rows[0]["mib"]
    print("\nAdaptive update, debootstrap minbase+systemd -> +%s, %d MiB ext4, one run. The reproducible recipe"
          " builds the same tree twice into identical images: %s.\n" % (PACKAGE, mib, "yes" if identical else "NO"))
    print("| pair | chunks fetched | plan fetches (header + chunks) | zck_delta_size | ratio (target <= 1.25x) |"
          " full bundle | raw |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        p, m = r["plan"], r["m"]
        mine = p["header_bytes"] + p["fetch_payload_bytes"]
        ratio = mine / r["zck_delta"]
        print("| %s | %d of %d | %.3f MB | %.3f MB | %.2fx %s | %.1f MB | %.1f MB |"
              % (r["name"], p["fetch"], p["chunks"], mine / 1e6, r["zck_delta"] / 1e6, ratio, mark(ratio <= 1.25),
                 (r["manifest_size"] + m["payload"]["size"]) / 1e6, r["image"] / 1e6))

    print("\nBytes on the wire: manifest + payload header + the chunks to fetch (MQTT: whole blocks of each part"
          " file + %d B framing a block; HTTPS: bytes and Range requests, gaps below the threshold fetched along):\n"
          % FRAMING)
    print("| pair | MQTT 4 KiB | 8 KiB | 16 KiB | 32 KiB | HTTPS gap 0 | 4 KiB | 16 KiB | 64 KiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        m = r["m"]
        cells = ["%.3f MB (%d blocks)" % (w / 1e6, b) for w, b in
                 (mqtt_bytes(m, fetched(r), k * KIB, r["manifest_size"]) for k in (4, 8, 16, 32))]
        cells += ["%.3f MB (%d req)" % (w / 1e6, q) for w, q in
                  (https_bytes(m, fetched(r), g * KIB, r["manifest_size"]) for g in (0, 4, 16, 64))]
        print("| %s | %s |" % (r["name"], " | ".join(cells)))

    print("\nTime to install under AWS IoT's caps (512 KiB/s and 100 publishes/s per connection; MQTT transfer"
          " computed from the wire bytes above, local work measured on this machine):\n")
    print("| pair | adaptive transfer (16 KiB blocks) | local: scan + copy + fetched chunks + read-back |"
          " adaptive total | full bundle: transfer (128 KiB) + decode | raw: transfer |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        if "install" not in r:
            continue
        m, i = r["m"], r["install"]
        transfer = cap_seconds(*mqtt_bytes(m, fetched(r), 16 * KIB, r["manifest_size"]))
        local = i["scan_s"] + i["copy_s"] + i["fetch_s"] + i["verify_s"]
        full = cap_seconds(*mqtt_bytes(m, [(0, m["payload"]["size"])], 128 * KIB, r["manifest_size"]))
        blocks = -(-r["image"] // (128 * KIB))
        raw = cap_seconds(r["image"] + blocks * FRAMING, blocks)
        goal = " (target < 10 s: %s)" % mark(transfer < 10) if r["name"] in ("reproducible", "derived") else ""
        print("| %s | %.1f s%s | %.1f + %.1f + %.1f + %.1f s | %.1f s | %.0f + %.1f s = %.1f min | %.1f min |"
              % (r["name"], transfer, goal, i["scan_s"], i["copy_s"], i["fetch_s"], i["verify_s"], transfer + local,
                 full, r["decode_s"], (full + r["decode_s"]) / 60, raw / 60))

    print("\nFinding chunks: reading the active slot (the old reproducible image, from the page cache), best of 3:\n")
    print("| image | otad scan: wall, CPU | zck (cut + SHA-256, no compression): wall, CPU |"
          " otad / zck rate, wall (target >= 90 %) | CPU | openssl dgst -sha256 (read + hash only): wall, CPU |"
          " otad / openssl, CPU | peak RssAnon |")
    print("|---|---|---|---|---|---|---|---|")
    for size, r, ((zck_s, zck_cpu), (sum_s, sum_cpu)) in scans:
        p = r["plan"]
        mb = r["image"] / MIB
        pct = 100.0 * zck_s / p["scan_s"]
        print("| %d MiB | %.2f s (%.0f MiB/s), %.2f s | %.2f s (%.0f MiB/s), %.2f s | %.0f %% %s | %.0f %% |"
              " %.2f s, %.2f s | %.0f %% | %.1f MiB |"
              % (size, p["scan_s"], mb / p["scan_s"], p["scan_cpu_s"], zck_s, mb / zck_s, zck_cpu, pct,
                 mark(pct >= 90), 100.0 * zck_cpu / p["scan_cpu_s"], sum_s, sum_cpu, 100.0 * sum_cpu / p["scan_cpu_s"],
                 p["rss_anon_max_kib"] / 1024))

    print("\nWhich look-ups pay off:\n")
    print("| pair | 2: active slot, content-defined | 2 + 3: missing chunks at their own offset |"
          " reused chunks taken from their own offset (identical chunks, e.g. zeros, all come from the first) |"
          " resume after 50 %: 1 (target at its offsets) + 2 |"
          " first install, the target holding the old image: 1 + 2 |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        if "plan_offsets" not in r:
            continue
        p, o, s, t = r["plan"], r["plan_offsets"], r["plan_resume"], r["plan_older"]
        print("| %s | %d fetched, %.2f s | %d fetched (%d found, %.0f KB less), %.2f s | %d of %d | "
              "%d in place, %d copied, %d fetched, %.2f s | %d in place (%.0f MB not written), %d copied, "
              "%d fetched, %.2f s |"
              % (r["name"], p["fetch"], p["scan_s"], o["fetch"], o["by_offset"],
                 (p["fetch_payload_bytes"] - o["fetch_payload_bytes"]) / 1e3, o["scan_s"], p["same_offset"],
                 p["active"], s["in_place"], s["active"], s["fetch"], s["scan_s"], t["in_place"],
                 t["in_place_bytes"] / 1e6, t["active"], t["fetch"], t["scan_s"]))
    print("\nEvery install (delta-plan --install) ended with the slot matching the manifest's image SHA-256.")


if __name__ == "__main__":
    sys.exit(main())

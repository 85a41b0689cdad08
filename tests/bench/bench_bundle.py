#!/usr/bin/python3
"""Update bundles on a real root file system (issue 12): figures and ratios
side by side from one run. A benchmark, not a test.

The root file system is Debian bookworm, debootstrap --variant=minbase with
systemd, as a reproducible ext4 image (tests/rootfs.py, the demo's builder),
in two sizes: fitted (~250 MB) and the same tree in a 1 GiB file system. It
is built once into the build directory (<build>/rootfs/, or
$OTAD_ROOTFS_CACHE; keyed by its recipe) and reused; building it needs root
and Debian's mirror.

Measured:
  * bytes on the wire for the raw image and for the bundle (manifest +
    payload parts), and what they cost at AWS IoT's 512 KiB/s per connection;
  * decompress-and-write throughput of the payload decoder (tests/bundle-decode,
    the daemon's code: checksums of both kinds, zstd, pwrite, fdatasync) next
    to `zstd -d` and `unzck` unpacking the same payload into the same file
    system, each followed by an fsync;
  * peak RssAnon and CPU seconds of the decoder for both image sizes;
  * `otad bundle create` time.
Run: meson test -C build --benchmark -v bundle   (or this file directly with
OTAD_BUILD_ROOT set); BENCH_BUNDLE_SIZES=250 limits the sizes.
"""

import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import rootfs  # noqa: E402

BUILD = os.path.abspath(os.environ.get("OTAD_BUILD_ROOT", os.path.join(os.path.dirname(__file__), "../../build")))
OTAD = os.environ.get("OTAD_BIN") or os.path.join(BUILD, "src", "otad")
DECODE = os.path.join(BUILD, "tests", "bundle-decode")
CACHE = os.path.join(BUILD, "bench-bundle")
ROOTFS_CACHE = rootfs.cache_dir(BUILD)
rootfs.log = lambda text: print("# rootfs: " + text, flush=True)
CAP = 512 * 1024
MIB = 1024 * 1024


def sh(cmd, **kw):
    return subprocess.run(cmd, shell=isinstance(cmd, str), check=True, capture_output=True, text=True, **kw)


def recipe_key():
    return rootfs.tree_key()


def rootfs_tree():
    """The debootstrapped tree (tests/rootfs.py), built once; CACHE exists
    after it (bench_delta.py keeps its images there)."""
    os.makedirs(CACHE, exist_ok=True)
    try:
        return rootfs.tree(ROOTFS_CACHE)
    except PermissionError:
        print("# skip: building the root file system needs root (debootstrap)")
        sys.exit(0)


def ext4_image(tree, mib):
    """tree as a reproducible ext4 image of mib MiB (0: fitted, 10 % free),
    built once (tests/rootfs.py)."""
    if not mib:
        mib = int(rootfs.tree_mib(tree) * 1.10) + 16
    return rootfs.image(tree, mib)


def timed(cmd, **kw):
    t = time.monotonic()
    r = subprocess.run(cmd, shell=isinstance(cmd, str), capture_output=True, text=True, **kw)
    if r.returncode != 0:
        raise RuntimeError("%s: %s" % (cmd, r.stderr[-2000:]))
    return time.monotonic() - t, r


def decode_figures(line):
    out = {}
    for field in line.split()[1:]:
        k, _, v = field.partition("=")
        out[k] = v
    return out


def main():
    for tool in (OTAD, DECODE):
        if not os.access(tool, os.X_OK):
            print("# skip: %s not built" % tool)
            return 0
    for prog in ("zstd", "unzck", "mkfs.ext4"):
        if not shutil.which(prog):
            print("# skip: %s missing (tests/install-deps.sh)" % prog)
            return 0
    sizes = [int(s) for s in os.environ.get("BENCH_BUNDLE_SIZES", "0,1024").split(",")]
    tree = rootfs_tree()
    work = tempfile.mkdtemp(prefix="otad-bench-bundle-", dir=CACHE)
    keys = os.path.join(work, "keys")
    os.makedirs(keys)
    sh("openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout signer.key "
       "-out signer.crt -days 30 -subj /CN=signer", cwd=keys)
    rows = []
    try:
        for mib in sizes:
            image = ext4_image(tree, mib)
            size = os.path.getsize(image)
            out = os.path.join(work, "bundle-%d" % mib)
            create_s, _ = timed([OTAD, "bundle", "create", "--key", os.path.join(keys, "signer.key"),
                                 "--cert", os.path.join(keys, "signer.crt"), "--version", "2.0.0",
                                 "--compatible", "bench", image, out])
            manifest = os.path.join(out, "bundle-2.0.0.manifest")
            with open(manifest) as f:
                m = json.load(f)
            wire = os.path.getsize(manifest) + m["payload"]["size"]
            payload = os.path.join(work, "payload.zck")
            body = os.path.join(work, "payload.zst")
            with open(payload, "wb") as p:
                for part in m["parts"]:
                    with open(os.path.join(out, part["file"]), "rb") as f:
                        shutil.copyfileobj(f, p, 4 * MIB)
            # zstd -d needs the frames alone: the payload after its header.
            sh("tail -c +%d '%s' > '%s'" % (m["payload"]["header_size"] + 1, payload, body))
            target = os.path.join(work, "slot.img")
            figures = {}
            for name, cmd in (("otad", [DECODE, manifest, target]),
                              # --no-sparse: a slot is a block device, where
                              # zstd cannot skip writing zeros either.
                              ("zstd -d", "zstd -d -q -f --no-sparse -o '%s' '%s' && sync '%s'" % (target, body, target)),
                              ("unzck", "unzck -c '%s' > '%s' && sync '%s'" % (payload, target, target))):
                if os.path.exists(target):
                    os.unlink(target)
                sh("sync")
                before = resource.getrusage(resource.RUSAGE_CHILDREN)
                seconds, r = timed(cmd)
                after = resource.getrusage(resource.RUSAGE_CHILDREN)
                figures[name + " cpu"] = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
                if name == "otad":
                    figures["decode"] = decode_figures(r.stdout.strip())
                figures[name] = seconds
                if sh(["cmp", image, target]).returncode != 0:
                    raise RuntimeError("%s did not reproduce the image" % name)
            os.unlink(payload)
            os.unlink(body)
            os.unlink(target)
            rows.append({"mib": size // MIB, "size": size, "wire": wire, "create_s": create_s,
                         "chunks": m["payload"]["chunk_count"], "parts": len(m["parts"]),
                         "manifest": os.path.getsize(manifest), **figures})
            shutil.rmtree(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print("\nUpdate bundles on a debootstrap minbase+systemd root file system (ext4), one run:\n")
    print("| image | raw on the wire | bundle on the wire | ratio | at 512 KiB/s: raw / bundle | create |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print("| %d MiB ext4 | %.1f MB | %.1f MB (%d parts, %d chunks) | %.1f %% | %.1f min / %.1f min | %.0f s |"
              % (r["mib"], r["size"] / 1e6, r["wire"] / 1e6, r["parts"], r["chunks"], 100.0 * r["wire"] / r["size"],
                 r["size"] / CAP / 60, r["wire"] / CAP / 60, r["create_s"]))
    print("\n| image | otad decoder | zstd -d | unzck | otad / zstd -d | otad / unzck | otad peak RssAnon |"
          " CPU s: otad / zstd -d / unzck |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        mbs = lambda s: r["size"] / s / MIB  # noqa: E731
        d = r["decode"]
        print("| %d MiB | %.0f MiB/s | %.0f MiB/s | %.0f MiB/s | %.0f %% | %.0f %% | %.1f MiB | %.2f / %.2f / %.2f |"
              % (r["mib"], mbs(r["otad"]), mbs(r["zstd -d"]), mbs(r["unzck"]),
                 100.0 * r["zstd -d"] / r["otad"], 100.0 * r["unzck"] / r["otad"],
                 int(d["rss_anon_max_kib"]) / 1024, float(d["cpu"]), r["zstd -d cpu"], r["unzck cpu"]))
    print("\nRefused downgrade: the decision needs the manifest only, %d bytes (the raw image: %.1f MB)."
          % (rows[0]["manifest"], rows[0]["size"] / 1e6))
    return 0


if __name__ == "__main__":
    sys.exit(main())

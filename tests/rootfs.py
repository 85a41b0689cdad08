#!/usr/bin/python3
"""Debian root file systems as ext4 images, built reproducibly and cached:
the one builder of the demo, the benchmarks and the tests.

    import rootfs
    cache = rootfs.cache_dir(build_root)          # <build>/rootfs, or $OTAD_ROOTFS_CACHE
    base = rootfs.tree(cache)                     # debootstrap minbase + systemd
    plus = rootfs.tree(cache, ["less"])           # the same tree + one package
    v1 = rootfs.image(base, 400, version="1.0.0")
    v2 = rootfs.image(plus, 400, version="2.0.0", previous=v1)

tree(): `debootstrap --variant=minbase --include=systemd,systemd-sysv
bookworm` from deb.debian.org, then each extra package installed by apt in a
chroot, one at a time, each on a copy of the tree before it: a one-package
change is the same tree with what installing that package writes. Every
stage is kept in the cache under a key of its recipe; needs root and
Debian's mirror the first time.

image(): the tree as an ext4 image that is the same bytes whenever the same
tree is built again (README, "Reproducible images"): a fixed file system
UUID and directory hash seed, E2FSPROGS_FAKE_TIME for mke2fs's own idea of
"now", file mtimes clamped to EPOCH, and the ctime, atime and crtime of
every inode set to EPOCH with debugfs (mke2fs -d copies ctime and atime from
the tree, where the kernel sets them whenever a file is written, copied or
read). mke2fs 1.47 reads directories with scandir()+alphasort, so the
order of the tree's directories on disk does not matter. With previous=, the
image is made from that older image instead of from scratch (mounted, rsync
of what differs, journal and times reset): unchanged files keep their
inodes and blocks, so a device running the older image finds most of the
new one in place. EPOCH is the same for every release on purpose: a new one
would change every inode, and so every inode table block.

Needs e2fsprogs; tree() and image(previous=) need root (debootstrap,
chroot, loop mounts) and rsync.
"""

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
BASE_PACKAGES = ("systemd", "systemd-sysv")
# Any fixed values of one's own, the same for every release of a product.
EPOCH = 1700000000
FS_UUID = "6f7c2a3e-0b1d-4e5f-8a9b-0c1d2e3f4a5b"
HASH_SEED = "1b2c3d4e-5f60-4172-8394-a5b6c7d8e9f0"
LABEL = "rootfs"
# Bumped whenever a change here changes the bytes of a tree, or of an image.
TREE_RECIPE = 1
IMAGE_RECIPE = 2


def log(text):
    """Progress lines; a caller may replace this."""
    print("rootfs: " + text, file=sys.stderr, flush=True)


def sh(argv, **kw):
    r = subprocess.run(argv, capture_output=True, text=True, **kw)
    if r.returncode != 0:
        raise RuntimeError("%s failed (%d): %s" % (" ".join(argv) if isinstance(argv, list) else argv,
                                                   r.returncode, (r.stderr or r.stdout)[-3000:]))
    return r


def cache_dir(build_root):
    """Where trees and images are kept: $OTAD_ROOTFS_CACHE (to share one
    cache between build directories) or <build_root>/rootfs."""
    return os.path.abspath(os.environ.get("OTAD_ROOTFS_CACHE") or os.path.join(build_root, "rootfs"))


def _key(obj):
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:12]


_lock_depth = 0


@contextlib.contextmanager
def _locked(cache):
    """One builder at a time per cache (the demo and a benchmark may share
    one); re-entrant within this process."""
    global _lock_depth
    os.makedirs(cache, exist_ok=True)
    if _lock_depth:
        _lock_depth += 1
        try:
            yield
        finally:
            _lock_depth -= 1
        return
    with open(os.path.join(cache, ".lock"), "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        _lock_depth = 1
        try:
            yield
        finally:
            _lock_depth = 0


def _unmount_below(path):
    """What a killed debootstrap or chroot left mounted under path (proc,
    sys): unmounted before the directory is removed, deepest first, so that
    removing it never reaches into them."""
    path = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    for point in sorted((p for p in points if p.startswith(path + "/")), key=len, reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True)


def _remove(path, ignore_errors=False):
    if os.path.lexists(path):
        _unmount_below(path)
        shutil.rmtree(path, ignore_errors=ignore_errors)


def _need_root(what):
    if os.geteuid() != 0:
        raise PermissionError("building %s needs root" % what)


# ---- trees ------------------------------------------------------------------

def tree_recipe(packages=()):
    return {"recipe": TREE_RECIPE, "suite": SUITE, "mirror": MIRROR, "variant": "minbase",
            "include": list(BASE_PACKAGES), "packages": list(packages)}


def tree_key(packages=()):
    return _key(tree_recipe(packages))


def tree(cache, packages=()):
    """The debootstrapped tree with `packages` installed on top, one at a
    time in this order; built once per recipe, then taken from the cache."""
    packages = list(packages)
    path = os.path.join(cache, "tree-" + tree_key(packages))
    if os.path.isdir(path):
        return path
    with _locked(cache):
        if os.path.isdir(path):
            return path
        _need_root("a root file system tree")
        tmp = path + ".tmp"
        _remove(tmp)
        t = time.monotonic()
        if not packages:
            sh(["debootstrap", "--variant=minbase", "--include=" + ",".join(BASE_PACKAGES), SUITE, tmp, MIRROR])
            # The downloaded .debs: an image does not ship them.
            shutil.rmtree(os.path.join(tmp, "var/cache/apt/archives"), ignore_errors=True)
            os.makedirs(os.path.join(tmp, "var/cache/apt/archives/partial"))
            log("debootstrap %s minbase + %s: %.0f s" % (SUITE, ", ".join(BASE_PACKAGES), time.monotonic() - t))
        else:
            below = tree(cache, packages[:-1])
            t = time.monotonic()
            sh(["cp", "-a", below, tmp])
            _apt_install(tmp, packages[-1])
            log("+ %s: %.0f s" % (packages[-1], time.monotonic() - t))
        with open(path + ".json", "w") as f:
            json.dump(tree_recipe(packages), f, indent=1)
        os.rename(tmp, path)
        return path


def _apt_install(root, package):
    """apt-get install in a chroot of root, with the package lists
    debootstrap left (the trees then differ by the package and what
    installing it writes); `apt-get update` first only if the mirror no
    longer has those versions."""
    resolv = os.path.join(root, "etc/resolv.conf")
    saved = resolv + ".rootfs-saved"
    if os.path.lexists(resolv):
        os.rename(resolv, saved)
    shutil.copy("/etc/resolv.conf", resolv)
    # No daemon of the package is started in the chroot.
    policy = os.path.join(root, "usr/sbin/policy-rc.d")
    with open(policy, "w") as f:
        f.write("#!/bin/sh\nexit 101\n")
    os.chmod(policy, 0o755)
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "DEBIAN_FRONTEND": "noninteractive", "LC_ALL": "C"}
    install = ["chroot", root, "apt-get", "install", "-y", "-q", "--no-install-recommends", package]
    proc = os.path.join(root, "proc")
    sh(["mount", "-t", "proc", "proc", proc])
    try:
        r = subprocess.run(install, capture_output=True, text=True, env=env)
        if r.returncode != 0:
            log("apt-get install %s failed (%s); apt-get update and again" % (package, r.stderr.strip()[-200:]))
            sh(["chroot", root, "apt-get", "update", "-q"], env=env)
            sh(install, env=env)
        sh(["chroot", root, "apt-get", "clean"], env=env)
    finally:
        sh(["umount", proc])
    os.unlink(policy)
    os.unlink(resolv)
    if os.path.lexists(saved):
        os.rename(saved, resolv)


# ---- images -----------------------------------------------------------------

def _set_version(root, version):
    """VERSION_ID= (what otad reads as the running version) and
    IMAGE_VERSION= in the image's os-release; /etc/os-release stays
    Debian's link to it."""
    path = os.path.join(root, "usr/lib/os-release")
    with open(path) as f:
        lines = [line for line in f.read().splitlines() if not line.startswith(("VERSION_ID=", "IMAGE_VERSION="))]
    lines += ['VERSION_ID="%s"' % version, 'IMAGE_VERSION="%s"' % version]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def _staged_copy(tree, work, version):
    """A copy of tree to build from, with the version set and every mtime
    after EPOCH clamped to it, and the debugfs script that sets the ctime,
    atime and crtime (and their nanoseconds) of each of its inodes."""
    root = os.path.join(work, "root")
    sh(["cp", "-a", tree, root])
    if version:
        _set_version(root, version)
    sh("find '%s' -newermt @%d -print0 | xargs -0r touch -h -d @%d" % (root, EPOCH, EPOCH), shell=True)
    paths = ["/"]
    for top, dirs, files in os.walk(root):
        for name in dirs + files:
            p = os.path.join(top, name)[len(root):]
            if '"' in p or "\n" in p:
                raise ValueError("path %r cannot be quoted for debugfs" % p)
            paths.append(p)
    # In a fixed order: how many blocks debugfs writes back (counted in the
    # superblock's s_kbytes_written) depends on the order of its edits.
    script = os.path.join(work, "times.debugfs")
    with open(script, "w") as f:
        for p in sorted(paths, key=lambda p: p.encode()):
            for field in ("ctime", "atime", "crtime"):
                f.write('sif "%s" %s @%d\nsif "%s" %s_extra 0\n' % (p, field, EPOCH, p, field))
    return root, script


def _fake_time_env():
    # mke2fs 1.47.0 ignores SOURCE_DATE_EPOCH; E2FSPROGS_FAKE_TIME is its
    # "now" (superblock times, new inodes), and debugfs's and tune2fs's.
    return dict(os.environ, E2FSPROGS_FAKE_TIME=str(EPOCH), SOURCE_DATE_EPOCH=str(EPOCH))


def _journal_mib(image):
    out = sh(["dumpe2fs", "-h", image], env=_fake_time_env()).stdout
    blocks = re.search(r"^Total journal blocks:\s+(\d+)$", out, re.M)
    block_size = re.search(r"^Block size:\s+(\d+)$", out, re.M)
    if not blocks or not block_size or (int(blocks.group(1)) * int(block_size.group(1))) % (1 << 20):
        raise RuntimeError("no journal of whole MiB in %s" % image)
    return int(blocks.group(1)) * int(block_size.group(1)) >> 20


def build_ext4(tree, out, mib, version=None, previous=None):
    """Writes tree as an ext4 image of mib MiB to out (not cached): from
    scratch, reproducibly, or derived from the image `previous`."""
    env = _fake_time_env()
    work = tempfile.mkdtemp(prefix="build-", dir=os.path.dirname(os.path.abspath(out)))
    try:
        root, script = _staged_copy(tree, work, version)
        if previous is None:
            # lazy_itable_init=0: the inode tables are written now, never
            # zeroed later by the kernel (a mounted image stays the same).
            # -b 4096 -T default: a root file system's geometry also
            # below 512 MiB, where mke2fs would pick 1 KiB blocks.
            sh(["mkfs.ext4", "-q", "-F", "-b", "4096", "-T", "default", "-L", LABEL, "-U", FS_UUID,
                "-E", "hash_seed=%s,lazy_itable_init=0,lazy_journal_init=0" % HASH_SEED,
                "-d", root, out, "%dM" % mib], env=env)
        else:
            _need_root("an image derived from another")
            if os.path.getsize(previous) != mib << 20:
                raise ValueError("%s is not %d MiB" % (previous, mib))
            sh(["cp", "--sparse=always", previous, out])
            journal = _journal_mib(out)
            mnt = os.path.join(work, "mnt")
            os.mkdir(mnt)
            sh(["mount", "-t", "ext4", "-o", "loop,noatime,noinit_itable,nodiscard", out, mnt])
            try:
                # -c: clamped mtimes and equal sizes say nothing about the
                # content. Unchanged files are not touched.
                sh(["rsync", "-aHAXc", "--delete", "--exclude=/lost+found/", root + "/", mnt + "/"])
            finally:
                sh(["umount", mnt])
            # What the mount wrote: a journal (made again, the same size)
            # and the superblock's traces of the mount.
            sh(["tune2fs", "-O", "^has_journal", out], env=env)
            sh(["tune2fs", "-O", "has_journal", "-J", "size=%d" % journal, out], env=env)
            with open(script, "a") as f:
                f.write('ssv mtime 0\nssv mnt_count 0\nssv last_mounted ""\nssv lastcheck @%d\n'
                        'ssv kbytes_written 0\n' % EPOCH)
        sh(["debugfs", "-w", "-f", script, out], env=env)
        sh(["e2fsck", "-fn", out], env=env)
    finally:
        _remove(work, ignore_errors=True)
    return out


def image_path(tree, mib, version=None, previous=None):
    key = _key({"recipe": IMAGE_RECIPE, "tree": os.path.basename(tree), "mib": mib, "version": version,
                "uuid": FS_UUID, "hash_seed": HASH_SEED, "epoch": EPOCH,
                "previous": os.path.basename(previous) if previous else None})
    return os.path.join(os.path.dirname(os.path.abspath(tree)), "%s-%s-%s%dM-%s.ext4" % (
        os.path.basename(tree), version or "none", "derived-" if previous else "", mib, key))


def image(tree, mib, version=None, previous=None):
    """build_ext4() once per (tree, size, version, previous image), kept
    next to the tree in its cache."""
    path = image_path(tree, mib, version, previous)
    if os.path.exists(path):
        return path
    with _locked(os.path.dirname(path)):
        if not os.path.exists(path):
            t = time.monotonic()
            build_ext4(tree, path + ".tmp", mib, version, previous)
            os.rename(path + ".tmp", path)
            log("%s: %.0f s" % (os.path.basename(path), time.monotonic() - t))
    return path


def identical_builds(tree, mib, version=None):
    """The recipe's proof: tree built twice, from two copies made at
    different times, gives the same bytes (cmp). Returns (identical,
    seconds for one build)."""
    work = tempfile.mkdtemp(prefix="check-", dir=os.path.dirname(os.path.abspath(tree)))
    try:
        a, b = os.path.join(work, "a.ext4"), os.path.join(work, "b.ext4")
        t = time.monotonic()
        build_ext4(tree, a, mib, version)
        seconds = time.monotonic() - t
        time.sleep(1.1)  # another second for whatever would leak the time of the build
        build_ext4(tree, b, mib, version)
        return subprocess.run(["cmp", "-s", a, b]).returncode == 0, seconds
    finally:
        shutil.rmtree(work, ignore_errors=True)


def tree_mib(tree):
    return int(sh(["du", "-s", "--block-size=1M", tree]).stdout.split()[0])


def main(argv):
    import argparse
    parser = argparse.ArgumentParser(description="Build (or find in the cache) a root file system image.")
    parser.add_argument("--cache", default=cache_dir(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..",
                                                                  "build")))
    parser.add_argument("--size", type=int, default=400, help="image size in MiB (default 400)")
    parser.add_argument("--version", help="VERSION_ID of the image's os-release")
    parser.add_argument("--previous", help="derive the image from this older image")
    parser.add_argument("--check", action="store_true", help="build the image twice and compare (cmp)")
    parser.add_argument("packages", nargs="*", help="packages installed on top of minbase + systemd, in order")
    args = parser.parse_args(argv)
    t = tree(args.cache, args.packages)
    print(t)
    if args.check:
        same, seconds = identical_builds(t, args.size, args.version)
        print("two builds of %s: %s (%.0f s each)" % (t, "identical" if same else "DIFFERENT", seconds))
        return 0 if same else 1
    print(image(t, args.size, args.version, args.previous))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

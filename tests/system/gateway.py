#!/usr/bin/python3
"""The gateway the system tests boot, built from Debian packages.

Owns: a root file system made by debootstrap --variant=minbase with systemd,
udev, D-Bus and the shared libraries otad links (read from the binary), the
kernel of Debian's linux-image-amd64 with a busybox initramfs, otad installed
by `meson install --destdir` from the tree under test and otad.service
enabled as shipped; the slot images and the GPT disk of the VM scenarios.

The root file system is built once per run into the build directory, keyed
by a hash of its inputs (packages, suite, and the code below that builds
it), under a lock: test programs running in parallel share one build, the
second waits for the first. Never changes the host beyond loop devices and
mounts it undoes itself.
"""

import contextlib
import fcntl
import hashlib
import inspect
import json
import os
import re
import shutil
import subprocess
import tempfile
import time

SOURCE = os.environ.get("OTAD_SOURCE_ROOT",
                        os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
BUILD = os.environ.get("OTAD_BUILD_ROOT", os.path.join(SOURCE, "build"))
OTAD = os.environ.get("OTAD_BIN", os.path.join(BUILD, "src", "otad"))
CACHE = os.path.join(BUILD, "system-gateway")

SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
# systemd as PID 1; udev, so that the VM's fstab mounts get their device
# units; busybox-static is the initramfs's shell. No D-Bus: nothing on the
# gateway needs it (systemctl talks to systemd directly as root), and its
# daemon does not start under nspawn on this machine's kernel.
BASE_PACKAGES = ["systemd", "systemd-sysv", "udev", "busybox-static"]
# What the Debian kernel has as modules and the VM needs before its root is
# mounted (virtio disk, ext4) or before udev could load them (virtio NIC:
# the rootfs carries no /lib/modules).
INITRAMFS_MODULES = ["virtio_pci", "virtio_blk", "ext4", "virtio_net"]

INIT_SCRIPT = r"""#!/bin/busybox sh
# The gateway's initramfs: load the drivers, mount root= (LABEL=..., as the
# documented grub.cfg passes it) and hand over to systemd. A root that cannot
# be mounted powers the VM off, so that a test sees it at once.
B=/bin/busybox
$B mkdir -p /proc /sys /newroot
$B mount -t proc proc /proc
$B mount -t sysfs sysfs /sys
$B mount -t devtmpfs devtmpfs /dev
for m in $($B cat /modules); do $B insmod /lib/modules/$m || echo "initramfs: insmod $m failed"; done
root=
mode=ro
for arg in $($B cat /proc/cmdline); do
        case "$arg" in
        root=*) root=${arg#root=} ;;
        rw) mode=rw ;;
        esac
done
dev=
for i in $($B seq 100); do
        dev=$($B findfs "$root" 2>/dev/null) && break
        $B sleep 0.1
done
if [ -z "$dev" ] || ! $B mount -o "$mode" "$dev" /newroot; then
        echo "initramfs: cannot mount root=$root"
        $B poweroff -f
fi
$B mount -o move /dev /newroot/dev
$B umount /proc /sys
exec $B switch_root /newroot /sbin/init
"""


class BuildError(RuntimeError):
    pass


def sh(argv, log=None, **kw):
    """Runs argv (a list, or a string for /bin/sh); raises BuildError with
    the tail of its output when it fails. Returns stdout."""
    shell = isinstance(argv, str)
    if "input" not in kw:
        kw["stdin"] = subprocess.DEVNULL
    r = subprocess.run(argv, shell=shell, capture_output=True, text=True, errors="replace", **kw)
    if log:
        with open(log, "a") as f:
            f.write("$ %s\n%s%s" % (argv if shell else " ".join(argv), r.stdout, r.stderr))
    if r.returncode != 0:
        raise BuildError("%s: exit status %d\n%s" % (argv if shell else " ".join(argv), r.returncode,
                                                     (r.stdout + r.stderr)[-3000:]))
    return r.stdout


def copy_tree(src, dst):
    """cp -a, sharing blocks where the file system can."""
    sh(["cp", "-a", "--reflink=auto", src, dst])


# ---- what otad needs at run time -------------------------------------------

def runtime_packages(binary=OTAD):
    """The Debian packages of the shared libraries binary links (DT_NEEDED),
    so that the rootfs follows the tree: a library added to meson.build is
    in the next build without a list to keep in step."""
    needed = re.findall(r"^\s*NEEDED\s+(\S+)$", sh(["objdump", "-p", binary]), re.M)
    paths = {}
    for line in sh(["ldconfig", "-p"]).splitlines():
        m = re.match(r"\s*(\S+) \(([^)]*)\) => (\S+)$", line)
        if m and "x86-64" in m.group(2):
            paths.setdefault(m.group(1), m.group(3))
    packages = set()
    for soname in needed:
        if soname not in paths:
            raise BuildError("%s needs %s, which ldconfig does not know" % (binary, soname))
        for path in (os.path.realpath(paths[soname]), paths[soname]):
            r = subprocess.run(["dpkg", "-S", path], capture_output=True, text=True)
            if r.returncode == 0:
                packages.add(r.stdout.split(":", 1)[0])
                break
        else:
            raise BuildError("no Debian package owns %s (%s)" % (paths[soname], soname))
    # Both are in every systemd rootfs already.
    return sorted(packages - {"libc6", "libsystemd0"})


# ---- the base: Debian packages, kernel, initramfs ----------------------------

def _debootstrap(rootfs, packages, log):
    sh(["debootstrap", "--variant=minbase", "--include=" + ",".join(packages), SUITE, rootfs, MIRROR], log)


def _fetch_kernel(rootfs, out, log):
    """The kernel of Debian's linux-image-amd64, fetched by the rootfs's own
    apt (so it matches the suite), and the initramfs modules with their
    dependencies. Nothing of the package stays in the rootfs."""
    dl = os.path.join(rootfs, "tmp", "otad-kernel")
    os.makedirs(dl, exist_ok=True)
    depends = sh(["chroot", rootfs, "apt-cache", "depends", "linux-image-amd64"], log)
    m = re.search(r"Depends: (linux-image-\S+-amd64)", depends)
    if not m:
        raise BuildError("linux-image-amd64 depends on no kernel:\n" + depends)
    sh(["chroot", rootfs, "sh", "-c", "cd /tmp/otad-kernel && apt-get download -q " + m.group(1)], log)
    deb = os.path.join(dl, [f for f in os.listdir(dl) if f.endswith(".deb")][0])
    tree = os.path.join(out, "kernel")
    os.makedirs(tree)
    sh("dpkg-deb --fsys-tarfile '%s' | tar -x -C '%s' --wildcards './boot/vmlinuz-*' './lib/modules/*/modules.*'"
       " './lib/modules/*/kernel/drivers/virtio/*' './lib/modules/*/kernel/drivers/block/virtio_blk.ko'"
       " './lib/modules/*/kernel/drivers/net/*' './lib/modules/*/kernel/net/core/*' './lib/modules/*/kernel/fs/*'"
       " './lib/modules/*/kernel/lib/*' './lib/modules/*/kernel/crypto/*'" % (deb, tree), log)
    shutil.rmtree(dl)
    version = os.listdir(os.path.join(tree, "lib", "modules"))[0]
    sh(["depmod", "-b", tree, version], log)
    boot = os.path.join(tree, "boot")
    shutil.copy(os.path.join(boot, [f for f in os.listdir(boot) if f.startswith("vmlinuz-")][0]),
                os.path.join(out, "vmlinuz"))
    return tree, version


def _make_initramfs(rootfs, tree, version, out, log):
    d = tempfile.mkdtemp(prefix="otad-initramfs-")
    try:
        for sub in ("bin", "dev", "lib/modules"):
            os.makedirs(os.path.join(d, sub))
        shutil.copy(os.path.join(rootfs, "bin", "busybox"), os.path.join(d, "bin", "busybox"))
        # The kernel opens /dev/console of the initramfs for /init's stdio.
        os.mknod(os.path.join(d, "dev", "console"), 0o600 | 0o020000, os.makedev(5, 1))
        order = []
        for module in INITRAMFS_MODULES:
            deps = sh(["modprobe", "-d", tree, "-S", version, "--show-depends", module], log)
            for path in re.findall(r"^insmod (\S+)", deps, re.M):
                if path not in order:
                    order.append(path)
        names = []
        for n, path in enumerate(order):
            names.append("%02d-%s" % (n, os.path.basename(path)))
            shutil.copy(path, os.path.join(d, "lib", "modules", names[-1]))
        with open(os.path.join(d, "modules"), "w") as f:
            f.write("\n".join(names) + "\n")
        with open(os.path.join(d, "init"), "w") as f:
            f.write(INIT_SCRIPT)
        os.chmod(os.path.join(d, "init"), 0o755)
        sh("cd '%s' && find . | cpio -o -H newc --quiet | gzip -1 > '%s'" % (d, out), log)
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _trim(rootfs):
    """What a gateway image does not ship: documentation, translations, apt's
    caches and lists, udev's hardware database (no hardware to name)."""
    for sub in ("usr/share/doc", "usr/share/man", "usr/share/info", "usr/share/locale",
                "var/cache/apt", "var/lib/apt/lists", "usr/lib/udev/hwdb.d"):
        path = os.path.join(rootfs, sub)
        for name in os.listdir(path):
            p = os.path.join(path, name)
            if os.path.isdir(p) and not os.path.islink(p):
                shutil.rmtree(p)
            else:
                os.unlink(p)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(rootfs, "usr/lib/udev/hwdb.bin"))


def _base_recipe():
    return [_debootstrap, _fetch_kernel, _make_initramfs, _trim]


def _build_base(dest, packages):
    log = os.path.join(dest, "build.log")
    rootfs = os.path.join(dest, "rootfs")
    _debootstrap(rootfs, packages, log)
    tree, version = _fetch_kernel(rootfs, dest, log)
    _make_initramfs(rootfs, tree, version, os.path.join(dest, "initrd.img"), log)
    shutil.rmtree(tree)
    _trim(rootfs)


# ---- the gateway: a configured system with otad from the tree under test ------

def _configure(rootfs):
    """What the system's installer would set: names, and no logins (logind
    needs D-Bus; gettys on the nspawn pipe or the VM's serial console would
    only compete with what the tests read there)."""
    with open(os.path.join(rootfs, "etc", "hostname"), "w") as f:
        f.write("gateway\n")
    with open(os.path.join(rootfs, "etc", "hosts"), "w") as f:
        f.write("127.0.0.1\tlocalhost\n127.0.1.1\tgateway\n::1\tlocalhost ip6-localhost ip6-loopback\n")
    sh(["systemctl", "--root", rootfs, "mask", "systemd-logind.service", "console-getty.service",
        "getty@.service", "serial-getty@.service", "getty-static.service"])


def _install_otad(staged, rootfs):
    """What `meson install --destdir` staged goes into the rootfs (tar keeps
    the rootfs's merged-/usr symlinks), and the unit is enabled by its own
    [Install] section, as `systemctl enable otad` does on a device."""
    sh("tar -C '%s' -cf - . | tar -C '%s' -xf - --keep-directory-symlink" % (staged, rootfs))
    sh(["systemctl", "--root", rootfs, "enable", "otad.service"])


def _tree_digest(path):
    h = hashlib.sha256()
    for root, dirs, files in sorted(os.walk(path)):
        dirs.sort()
        for name in sorted(files):
            p = os.path.join(root, name)
            h.update(os.path.relpath(p, path).encode() + b"\0%o\0" % os.lstat(p).st_mode)
            if os.path.islink(p):
                h.update(os.readlink(p).encode())
            else:
                with open(p, "rb") as f:
                    h.update(f.read())
    return h.hexdigest()


@contextlib.contextmanager
def _locked():
    os.makedirs(CACHE, exist_ok=True)
    with open(os.path.join(CACHE, "lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _digest(*parts):
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode() if isinstance(part, str) else part)
        h.update(b"\0")
    return h.hexdigest()[:16]


def _drop_stale(prefix, keep):
    for name in os.listdir(CACHE):
        if name.startswith(prefix) and name != keep:
            shutil.rmtree(os.path.join(CACHE, name), ignore_errors=True)


class Gateway:
    """The built gateway: .rootfs (do not modify: copy it), .vmlinuz,
    .initrd, .packages; .built_seconds says how long this call took to
    build what the cache did not have (0: all cached)."""

    def __init__(self, base, rootfs, packages, built_seconds):
        self.rootfs = rootfs
        self.vmlinuz = os.path.join(base, "vmlinuz")
        self.initrd = os.path.join(base, "initrd.img")
        self.packages = packages
        self.built_seconds = built_seconds


def gateway():
    """The gateway rootfs of this build tree, built if the cache has none."""
    started = time.monotonic()
    built = False
    packages = sorted(set(BASE_PACKAGES + runtime_packages()))
    with _locked():
        base_key = _digest(json.dumps([SUITE, MIRROR, packages, INITRAMFS_MODULES]), INIT_SCRIPT,
                           *(inspect.getsource(f) for f in _base_recipe() + [_build_base]))
        base = os.path.join(CACHE, "base-" + base_key)
        if not os.path.exists(os.path.join(base, "done")):
            _drop_stale("base-", None)
            tmp = base + ".tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
            _build_base(tmp, packages)
            built = True
            open(os.path.join(tmp, "done"), "w").close()
            os.rename(tmp, base)
        staged = tempfile.mkdtemp(prefix="otad-destdir-")
        try:
            sh(["meson", "install", "-C", BUILD, "--no-rebuild", "--quiet", "--destdir", staged])
            key = _digest(base_key, _tree_digest(staged), inspect.getsource(_configure),
                          inspect.getsource(_install_otad))
            path = os.path.join(CACHE, "gateway-" + key)
            if not os.path.exists(os.path.join(path, "done")):
                _drop_stale("gateway-", None)
                tmp = path + ".tmp"
                os.makedirs(tmp)
                copy_tree(os.path.join(base, "rootfs"), os.path.join(tmp, "rootfs"))
                _configure(os.path.join(tmp, "rootfs"))
                _install_otad(staged, os.path.join(tmp, "rootfs"))
                built = True
                open(os.path.join(tmp, "done"), "w").close()
                os.rename(tmp, path)
        finally:
            shutil.rmtree(staged, ignore_errors=True)
    return Gateway(base, os.path.join(path, "rootfs"), packages,
                   time.monotonic() - started if built else 0)

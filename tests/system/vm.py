#!/usr/bin/python3
"""The gateway as a QEMU machine: an A/B GPT disk booted by GRUB.

Owns: the slot images (the gateway rootfs of gateway.py plus what a VM
needs: kernel and initramfs in /boot, fstab, DHCP on the virtio NIC), the
disk {bios_grub; boot: GRUB, grub.cfg, grubenv; rootA; rootB; data:
/var/lib/otad}, reading its grubenv back, and QEMU processes (TCG, serial
console to a file, HMP monitor on a socket, user networking: the host is
10.0.2.2). Every loop device, mount and QEMU it starts it also stops.

The grub.cfg is the one of otad.conf(5), taken from the page, and the
grubenv is provisioned as the page says (provision_grubenv): when the
documentation changes, the VM follows it.
"""

import atexit
import contextlib
import glob
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time

from gateway import SOURCE, BuildError, copy_tree, sh

MIB = 1 << 20
GRUB_MAN_PAGE = os.path.join(SOURCE, "man", "otad.conf.5")
# The disk: partition name, size in MiB (None: a root slot) and GPT type.
BIOS_BOOT = "21686148-6449-6E6F-744E-656564454649"
LINUX = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"
DATA_MIB = 64
BOOT_MIB = 32


# ---- the bootloader, as otad.conf(5) documents it ------------------------------

def _unroff(line):
    for esc, text in (("\\-", "-"), ("\\(dq", '"'), ("\\(aq", "'"), ("\\(ga", "`"), ("\\&", ""),
                      ("\\e", "\\"), ("\\\\", "\\")):
        line = line.replace(esc, text)
    return line


def documented_grub_cfg(page=GRUB_MAN_PAGE):
    """The grub.cfg example of otad.conf(5): the no-fill block of its
    BOOTLOADER SCHEMES section that loads the environment."""
    text = open(page).read()
    section = re.search(r"^\.SH BOOTLOADER SCHEMES$(.*?)^\.SH ", text, re.M | re.S)
    if not section:
        raise BuildError("otad.conf(5) has no BOOTLOADER SCHEMES section")
    for block in re.findall(r"^\.nf$(.*?)^\.fi$", section.group(1), re.M | re.S):
        if "load_env" in block:
            lines = [_unroff(line) for line in block.strip("\n").splitlines() if not line.startswith(".")]
            return "\n".join(lines) + "\n"
    raise BuildError("otad.conf(5) shows no grub.cfg with load_env")


def vm_grub_cfg():
    """The documented grub.cfg with what this board adds: GRUB and the kernel
    talk on the serial port, and GRUB does not wait at its menu."""
    cfg, n = re.subn(r"^(\s*linux\s.*)$", r"\1 console=ttyS0 quiet", documented_grub_cfg(), flags=re.M)
    if n != 1:
        raise BuildError("the documented grub.cfg has %d linux lines, expected 1" % n)
    return ("set timeout=0\nserial --unit=0 --speed=115200\nterminal_input serial\nterminal_output serial\n"
            + cfg)


def provision_grubenv(path):
    """The grubenv a gateway leaves the factory with, as otad.conf(5)'s
    FACTORY PROVISIONING says: an empty block (the documented grub.cfg
    sets each variable's default before it loads the block). The one place
    to follow the page when it says otherwise."""
    sh(["grub-editenv", path, "create"])


def read_grubenv(disk, replay=True):
    """The boot partition's grubenv of a disk image (not running), as a
    dict; read with debugfs from a copy of the partition, without loop
    devices or mounts. replay: first replay the ext4 journal on the copy,
    as the next mount would; without, it is what GRUB reads, which replays
    no journal."""
    start, size = partitions(disk)["boot"]
    with tempfile.NamedTemporaryFile(prefix="otad-boot-") as part:
        sh(["dd", "if=" + disk, "of=" + part.name, "bs=1M", "skip=%d" % (start // MIB),
            "count=%d" % (size // MIB), "status=none"])
        if replay:
            r = subprocess.run(["e2fsck", "-y", "-E", "journal_only", part.name], capture_output=True, text=True)
            if r.returncode not in (0, 1):
                raise BuildError("e2fsck of the boot partition: exit status %d\n%s"
                                 % (r.returncode, r.stdout + r.stderr))
        text = sh(["debugfs", "-R", "cat /grub/grubenv", part.name])
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line and not line.startswith("#"))


# ---- images -------------------------------------------------------------------

REPORT_SCRIPT = r"""#!/bin/sh
# System test instrumentation: which slot GRUB booted (otad.slot= of the
# documented menu entry), the version and root device, on the serial console.
. /etc/os-release
slot=$(sed -n 's/.*otad\.slot=\([A-Za-z0-9]*\).*/\1/p' /proc/cmdline)
echo "OTAD-TEST: booted slot=$slot version=$VERSION_ID root=$(findmnt -no SOURCE /)" > /dev/ttyS0
"""

REPORT_UNIT = """[Unit]
Description=System test: report the booted slot on the serial console
After=otad.service network-online.target

[Service]
Type=oneshot
ExecStart=/usr/local/sbin/otad-test-report

[Install]
WantedBy=multi-user.target
"""


def _write(root, path, content, mode=0o644):
    full = os.path.join(root, path.lstrip("/"))
    os.makedirs(os.path.dirname(full), exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(full)   # e.g. a symlink of the package, such as /etc/os-release
    with open(full, "wb") as f:
        f.write(content.encode() if isinstance(content, str) else content)
    os.chmod(full, mode)


def _strip(root):
    """What a gateway image does not carry: a package manager and what only
    it needs (perl, debconf), character set converters, time zones. A
    smaller image is a shorter download in every scenario."""
    for pattern in ("usr/bin/apt*", "usr/lib/apt", "usr/lib/x86_64-linux-gnu/libapt-*", "etc/apt",
                    "var/lib/apt", "var/cache/apt", "usr/bin/perl*", "usr/lib/x86_64-linux-gnu/perl*",
                    "usr/share/perl*", "var/cache/debconf", "usr/share/debconf", "var/lib/dpkg/info",
                    "usr/lib/x86_64-linux-gnu/gconv", "usr/share/zoneinfo",
                    "etc/systemd/system/timers.target.wants/*"):
        for path in glob.glob(os.path.join(root, pattern)):
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.unlink(path)


def _vm_layer(gw, root, label):
    """What turns the gateway rootfs into a bootable slot of this VM."""
    _strip(root)
    shutil.copy(gw.vmlinuz, os.path.join(root, "boot", "vmlinuz"))
    shutil.copy(gw.initrd, os.path.join(root, "boot", "initrd.img"))
    # The data partition outlives both slots; the boot partition holds
    # GRUB and the grubenv otad edits (its default path /boot/grub/grubenv).
    _write(root, "/etc/fstab", "LABEL=%s / ext4 rw,noatime 0 0\n"
                               "/dev/vda2 /boot ext4 rw,noatime 0 0\n"
                               "/dev/vda5 /var/lib/otad ext4 rw,noatime 0 0\n" % label)
    _write(root, "/etc/systemd/network/50-dhcp.network", "[Match]\nName=en*\n\n[Network]\nDHCP=ipv4\n")
    # The slot is small and read by the tests on the serial console.
    _write(root, "/etc/systemd/journald.conf.d/50-console.conf",
           "[Journal]\nStorage=volatile\nForwardToConsole=yes\nTTYPath=/dev/ttyS0\nMaxLevelConsole=info\n")
    _write(root, "/usr/local/sbin/otad-test-report", REPORT_SCRIPT, 0o755)
    _write(root, "/etc/systemd/system/otad-test-report.service", REPORT_UNIT)
    sh(["systemctl", "--root", root, "enable", "systemd-networkd.service", "otad-test-report.service"])
    # Stamps of an up-to-date /etc and /var, as the first boot would leave
    # them: every scenario boots a fresh copy, and ldconfig/hwdb at each
    # boot cost seconds under TCG.
    usr = os.stat(os.path.join(root, "usr")).st_mtime_ns
    for stamp in ("etc/.updated", "var/.updated"):
        _write(root, stamp, "TIMESTAMP_NSEC=%d\n" % (usr // 1000))
        os.utime(os.path.join(root, stamp), ns=(usr, usr))


def _du(root):
    total, files = 0, 0
    for dirpath, dirs, names in os.walk(root):
        for name in names + dirs:
            st = os.lstat(os.path.join(dirpath, name))
            total += (st.st_blocks * 512) if not os.path.islink(os.path.join(dirpath, name)) else 4096
            files += 1
    return total, files


def make_slot_image(gw, out, label, version, files):
    """An ext4 image of a root slot: the gateway, the VM layer, os-release
    VERSION_ID=version (what otad reports and compares), files {path:
    content or (content, mode)} on top. The file system is as small as the
    contents allow, so that an OTA image of it stays small."""
    staging = tempfile.mkdtemp(prefix="otad-slot-")
    try:
        root = os.path.join(staging, "root")
        copy_tree(gw.rootfs, root)
        _vm_layer(gw, root, label)
        _write(root, "/usr/lib/os-release",
               'NAME="otad test gateway"\nID=otad-gateway\nID_LIKE=debian\nVERSION_ID=%s\n'
               'PRETTY_NAME="otad test gateway %s"\n' % (version, version))
        os.symlink("../usr/lib/os-release", os.path.join(root, "etc", "os-release.new"))
        os.replace(os.path.join(root, "etc", "os-release.new"), os.path.join(root, "etc", "os-release"))
        for path, content in files.items():
            content, mode = content if isinstance(content, tuple) else (content, 0o644)
            _write(root, path, content, mode)
        used, count = _du(root)
        # ext4 metadata, a 4 MiB journal and room for the machine's own
        # writes (the journal is volatile, the state is on the data partition).
        size = (used * 21 // 20 + 16 * MIB + MIB - 1) // MIB * MIB
        sh(["mkfs.ext4", "-q", "-F", "-L", label, "-d", root, "-b", "4096", "-m", "0", "-J", "size=4",
            "-N", str(count * 5 // 4 + 2048), out, str(size // 1024) + "k"])
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return size


def partitions(disk):
    """{name: (start, size)} in bytes, from the GPT."""
    table = json.loads(sh(["sfdisk", "--json", disk]))["partitiontable"]
    sector = table.get("sectorsize", 512)
    return {p["name"]: (p["start"] * sector, p["size"] * sector) for p in table["partitions"]}


@contextlib.contextmanager
def _attached(image):
    """A loop device with its partitions: this kernel reads no partition
    tables, so partx adds them (harness.md §4)."""
    loop = sh(["losetup", "-f", "--show", image]).strip()
    try:
        sh(["partx", "-a", loop])
        yield loop
    finally:
        # Also after a partx -a that added only some.
        subprocess.run(["partx", "-d", loop], capture_output=True)
        subprocess.run(["losetup", "-d", loop], capture_output=True)


@contextlib.contextmanager
def _mounted(device, where):
    sh(["mount", device, where])
    try:
        yield where
    finally:
        if subprocess.run(["umount", where], capture_output=True).returncode != 0:
            time.sleep(1)
            subprocess.run(["umount", "-l", where], capture_output=True)


def _write_at(image, disk, offset):
    sh(["dd", "if=" + image, "of=" + disk, "bs=4M", "seek=%d" % offset, "oflag=seek_bytes",
        "conv=notrunc,sparse", "status=none"])


def make_disk(path, slot_a_image, slot_bytes):
    """The factory state of the gateway's disk: GRUB with the documented
    grub.cfg and a provisioned grubenv on the boot partition, slot A
    written, slot B empty, an empty data partition."""
    slot_mib = (slot_bytes + MIB - 1) // MIB
    layout = [("bios", 1, BIOS_BOOT), ("boot", BOOT_MIB, LINUX), ("rootA", slot_mib, LINUX),
              ("rootB", slot_mib, LINUX), ("data", DATA_MIB, LINUX)]
    with open(path, "wb") as f:
        f.truncate((2 + sum(size for _, size, _ in layout)) * MIB)
    sh(["sfdisk", "-q", path], input="label: gpt\n" + "".join(
        "size=%dMiB, type=%s, name=%s\n" % (size, kind, name) for name, size, kind in layout))
    parts = partitions(path)
    with tempfile.TemporaryDirectory(prefix="otad-disk-") as tmp:
        data = os.path.join(tmp, "data.img")
        sh(["mkfs.ext4", "-q", "-F", "-L", "otad-data", data, "%dM" % DATA_MIB])
        _write_at(data, path, parts["data"][0])
        os.unlink(data)
        _write_at(slot_a_image, path, parts["rootA"][0])
        mnt = os.path.join(tmp, "mnt")
        os.mkdir(mnt)
        with _attached(path) as loop:
            sh(["mkfs.ext4", "-q", "-F", "-L", "boot", loop + "p2"])
            with _mounted(loop + "p2", mnt):
                sh(["grub-install", "--target=i386-pc", "--boot-directory=" + mnt,
                    "--modules=part_gpt ext2", loop])
                with open(os.path.join(mnt, "grub", "grub.cfg"), "w") as f:
                    f.write(vm_grub_cfg())
                provision_grubenv(os.path.join(mnt, "grub", "grubenv"))
    return parts


def copy_disk(src, dst):
    sh(["cp", "--sparse=always", src, dst])


# ---- QEMU ------------------------------------------------------------------------

# Machines not stopped yet: a SIGTERM (meson's timeout) ends a unittest run
# without its cleanups; the interpreter's exit still kills them.
_machines = []


@atexit.register
def _kill_machines():
    for machine in list(_machines):
        machine.kill()


class Vm:
    """A QEMU TCG machine booting disk. Its serial console goes to
    <workdir>/<name>.serial (appended across power cycles), QEMU's own output
    to <name>.qemu.log; the HMP monitor listens on <name>.monitor."""

    def __init__(self, disk, workdir, name="vm", memory_mib=512):
        self.disk = disk
        self.name = name
        self.memory_mib = memory_mib
        self.serial_path = os.path.join(workdir, name + ".serial")
        self.log_path = os.path.join(workdir, name + ".qemu.log")
        self.monitor_path = os.path.join(workdir, name + ".monitor")
        self.proc = None
        self.cpu_seconds = 0.0  # QEMU's CPU time over all power-ons

    def start(self):
        assert not self.running()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.monitor_path)
        argv = ["qemu-system-x86_64", "-accel", "tcg", "-smp", "1", "-m", str(self.memory_mib),
                "-nodefaults", "-display", "none",
                "-chardev", "file,id=console,path=%s,append=on" % self.serial_path, "-serial", "chardev:console",
                "-monitor", "unix:%s,server=on,wait=off" % self.monitor_path,
                "-drive", "file=%s,format=raw,if=virtio,id=disk" % self.disk,
                # The host's loopback is 10.0.2.2; no option ROM: no network boot.
                "-netdev", "user,id=net", "-device", "virtio-net-pci,netdev=net,romfile="]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                         start_new_session=True)
        _machines.append(self)
        return self

    def running(self):
        return self.proc is not None and self.proc.poll() is None

    def monitor(self, command, timeout=10):
        """Runs an HMP command; returns its output."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                s = socket.socket(socket.AF_UNIX)
                s.settimeout(timeout)
                s.connect(self.monitor_path)
                break
            except OSError:
                s.close()
                if time.monotonic() > deadline or not self.running():
                    raise
                time.sleep(0.1)
        with s:
            out = b""
            while not out.endswith(b"(qemu) "):
                out += s.recv(4096)
            s.sendall(command.encode() + b"\n")
            out = b""
            try:
                while not out.endswith(b"(qemu) "):
                    chunk = s.recv(4096)
                    if not chunk:
                        break
                    out += chunk
            except OSError:
                pass
        text = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", out.decode(errors="replace"))
        return text.replace("\r", "").rsplit("(qemu) ", 1)[0]

    def _account_cpu(self):
        """Adds QEMU's user+system time (a figure the host's load does not
        inflate, unlike wall time) before it exits."""
        try:
            with open("/proc/%d/stat" % self.proc.pid) as f:
                fields = f.read().rsplit(")", 1)[1].split()
            self.cpu_seconds += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError):
            pass

    def power_cut(self):
        """QEMU quits at once: no shutdown, the guest's unwritten page cache
        is lost, what it wrote to the disk stays."""
        if not self.running():
            return
        self._account_cpu()
        with contextlib.suppress(OSError):
            self.monitor("quit", timeout=5)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
        self.kill()

    def kill(self):
        if self.proc is None:
            return
        if self.running():
            self._account_cpu()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        if self in _machines:
            _machines.remove(self)

    def serial(self):
        try:
            with open(self.serial_path, "rb") as f:
                return f.read().decode(errors="replace").replace("\r", "")
        except FileNotFoundError:
            return ""

    def boots(self):
        """(slot, version, root device) of every boot, in order, as the
        guest's report on the serial console says."""
        return re.findall(r"OTAD-TEST: booted slot=(\S*) version=(\S*) root=(\S*)", self.serial())

    def wait_serial(self, pattern, timeout, count=1):
        """Waits until the serial console shows pattern count times; returns
        the matches. Raises TimeoutError, or RuntimeError when QEMU exits."""
        rx = re.compile(pattern, re.M)
        deadline = time.monotonic() + timeout
        while True:
            found = rx.findall(self.serial())
            if len(found) >= count:
                return found
            if not self.running():
                raise RuntimeError("QEMU exited (%s) before the console showed %r; console ends:\n%s"
                                   % (self.proc.returncode, pattern, self.serial()[-3000:]))
            if time.monotonic() > deadline:
                raise TimeoutError("no %r on the console after %.0f s; it ends:\n%s"
                                   % (pattern, timeout, self.serial()[-3000:]))
            time.sleep(0.2)

    def wait_boots(self, n, timeout):
        """Waits for the n-th boot report; returns boots()."""
        self.wait_serial(r"OTAD-TEST: booted slot=", timeout, count=n)
        return self.boots()

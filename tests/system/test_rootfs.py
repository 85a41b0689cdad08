#!/usr/bin/python3
"""The reproducible-image recipe of tests/rootfs.py (README, "Reproducible
images") on a small tree of its own: the same tree built twice, from copies
made at different times and read in between, gives byte-identical ext4
images (cmp), where plain `mkfs.ext4 -d` does not; the version lands in
os-release; an image derived from an older one (root: loop mount, rsync)
is a clean file system holding the new tree and leaves the older image's
blocks where they were."""

import os
import shutil
import subprocess
import sys
import tempfile
import time
import unittest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import rootfs  # noqa: E402

MIB = 1 << 20
SIZE_MIB = 16


def make_tree(root, seed=1, reverse=False):
    """Directories, files of several sizes, a symlink, a hard link, an empty
    directory, an mtime after rootfs.EPOCH and one before, os-release as
    Debian has it. reverse: the same tree, its files created in the other
    order (another order of readdir())."""
    os.makedirs(os.path.join(root, "usr/lib"))
    os.makedirs(os.path.join(root, "etc/empty.d"))
    os.makedirs(os.path.join(root, "var/lib/pkg"))
    with open(os.path.join(root, "usr/lib/os-release"), "w") as f:
        f.write('PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\nVERSION_ID="12"\nID=debian\n')
    os.symlink("../usr/lib/os-release", os.path.join(root, "etc/os-release"))
    for i in (reversed(range(40)) if reverse else range(40)):
        with open(os.path.join(root, "var/lib/pkg", "file-%02d" % i), "wb") as f:
            f.write(bytes([(i * seed) % 251]) * (i * 3001 + 17))
    os.link(os.path.join(root, "var/lib/pkg/file-03"), os.path.join(root, "etc/hardlink"))
    old = os.path.join(root, "etc/old")
    with open(old, "w") as f:
        f.write("from 2001\n")
    os.utime(old, (1000000000, 1000000000))


def cmp(a, b):
    return subprocess.run(["cmp", "-s", a, b]).returncode == 0


def debugfs(image, request):
    return subprocess.run(["debugfs", "-R", request, image], capture_output=True, text=True).stdout


class ReproducibleImages(unittest.TestCase):
    def setUp(self):
        for tool in ("mkfs.ext4", "debugfs", "e2fsck", "dumpe2fs"):
            if not shutil.which(tool):
                self.skipTest("%s missing (e2fsprogs)" % tool)
        self.dir = tempfile.mkdtemp(prefix="otad-test-rootfs-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.tree = os.path.join(self.dir, "tree")
        make_tree(self.tree)

    def path(self, name):
        return os.path.join(self.dir, name)

    def test_the_same_tree_twice_is_the_same_image(self):
        a = rootfs.build_ext4(self.tree, self.path("a.ext4"), SIZE_MIB, "1.0.0")
        # Another copy, made a second later (new ctimes), read through
        # (atimes), in another directory order.
        time.sleep(1.1)
        again = self.path("again")
        os.mkdir(again)
        # One cp, so that hard links stay links.
        subprocess.run(["cp", "-a"] + [os.path.join(self.tree, name) for name in
                                       sorted(os.listdir(self.tree), reverse=True)] + [again], check=True)
        subprocess.run("find '%s' -type f -exec cat {} + > /dev/null" % again, shell=True, check=True)
        b = rootfs.build_ext4(again, self.path("b.ext4"), SIZE_MIB, "1.0.0")
        # The same tree made again, each file created in the other order.
        remade = self.path("remade")
        make_tree(remade, reverse=True)
        c = rootfs.build_ext4(remade, self.path("c.ext4"), SIZE_MIB, "1.0.0")
        self.assertEqual(os.path.getsize(a), SIZE_MIB * MIB)
        self.assertTrue(cmp(a, b), "two builds of the same tree differ")
        self.assertTrue(cmp(a, c), "two builds of the same tree, made in another order, differ")
        fsck = subprocess.run(["e2fsck", "-fn", a], capture_output=True, text=True)
        self.assertEqual(fsck.returncode, 0, fsck.stdout + fsck.stderr)

    def test_plain_mkfs_is_not_reproducible(self):
        """The control: what the recipe is needed for."""
        for name in ("a", "b"):
            subprocess.run(["mkfs.ext4", "-q", "-F", "-d", self.tree, self.path(name), "%dM" % SIZE_MIB], check=True)
            time.sleep(1.1)
        self.assertFalse(cmp(self.path("a"), self.path("b")))

    def test_version_and_times(self):
        image = rootfs.build_ext4(self.tree, self.path("v.ext4"), SIZE_MIB, "2.0.0")
        text = debugfs(image, "cat /usr/lib/os-release")
        self.assertIn('VERSION_ID="2.0.0"\n', text)
        self.assertNotIn('VERSION_ID="12"', text)
        self.assertIn("ID=debian", text)
        self.assertIn("../usr/lib/os-release", debugfs(image, "stat /etc/os-release"))
        stat = debugfs(image, "stat /var/lib/pkg/file-07")
        for field in ("ctime", "atime", "mtime", "crtime"):
            self.assertRegex(stat, r"\b%s: 0x%08x:00000000" % (field, rootfs.EPOCH))
        # Clamped, not raised: a file older than the epoch keeps its mtime.
        self.assertRegex(debugfs(image, "stat /etc/old"), r"\bmtime: 0x%08x:" % 1000000000)
        # The tree itself is not touched.
        with open(os.path.join(self.tree, "usr/lib/os-release")) as f:
            self.assertIn('VERSION_ID="12"', f.read())
        self.assertIn("Filesystem UUID:          %s" % rootfs.FS_UUID,
                      subprocess.run(["dumpe2fs", "-h", image], capture_output=True, text=True).stdout)

    def test_derived_image_keeps_the_old_blocks(self):
        if os.geteuid() != 0 or not shutil.which("rsync"):
            self.skipTest("needs root (loop mount) and rsync")
        old = rootfs.build_ext4(self.tree, self.path("old.ext4"), SIZE_MIB, "1.0.0")
        # One more "package": new files, one changed file, one removed.
        newer = self.path("newer")
        subprocess.run(["cp", "-a", self.tree, newer], check=True)
        os.makedirs(os.path.join(newer, "usr/share/pkg2"))
        for i in range(5):
            with open(os.path.join(newer, "usr/share/pkg2", "f%d" % i), "wb") as f:
                f.write(os.urandom(20000))
        with open(os.path.join(newer, "var/lib/pkg/file-10"), "ab") as f:
            f.write(b"status of pkg2\n")
        os.unlink(os.path.join(newer, "var/lib/pkg/file-20"))
        derived = rootfs.build_ext4(newer, self.path("derived.ext4"), SIZE_MIB, "2.0.0", previous=old)
        scratch = rootfs.build_ext4(newer, self.path("scratch.ext4"), SIZE_MIB, "2.0.0")
        fsck = subprocess.run(["e2fsck", "-fn", derived], capture_output=True, text=True)
        self.assertEqual(fsck.returncode, 0, fsck.stdout + fsck.stderr)
        self.assertIn('VERSION_ID="2.0.0"', debugfs(derived, "cat /usr/lib/os-release"))
        self.assertTrue(debugfs(derived, "cat /var/lib/pkg/file-10").endswith("status of pkg2\n"))
        self.assertIn("File not found", subprocess.run(["debugfs", "-R", "stat /var/lib/pkg/file-20", derived],
                                                       capture_output=True, text=True).stderr)
        with open(os.path.join(newer, "usr/share/pkg2/f3"), "rb") as f:
            want = f.read()
        got = subprocess.run(["debugfs", "-R", "cat /usr/share/pkg2/f3", derived], capture_output=True).stdout
        self.assertEqual(got, want)
        stat = debugfs(derived, "stat /usr/share/pkg2/f3")
        for field in ("ctime", "atime", "crtime"):
            self.assertRegex(stat, r"\b%s: 0x%08x:00000000" % (field, rootfs.EPOCH))

        def changed_blocks(image):
            n = 0
            with open(old, "rb") as a, open(image, "rb") as b:
                while True:
                    x, y = a.read(4096), b.read(4096)
                    if not x:
                        return n
                    n += x != y

        d, s = changed_blocks(derived), changed_blocks(scratch)
        print("# 4 KiB blocks changed from the old image: derived %d, from scratch %d" % (d, s))
        self.assertLess(d, s, "deriving keeps more of the old image than building from scratch")


if __name__ == "__main__":
    unittest.main()

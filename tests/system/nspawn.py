#!/usr/bin/python3
"""The gateway as a container: systemd-nspawn -b with systemd as PID 1.

Owns: one nspawn process on a rootfs directory the caller made for it,
commands run inside it through nsenter, and the cgroups nspawn leaves behind.
The host runs no systemd, so nspawn neither registers nor asks for a scope
(--register=no --keep-unit, harness.md §2); it is started in a cgroup of its
own, whose payload/supervisor children nspawn creates and never removes: stop()
removes them. The container shares the host's network: 127.0.0.1 is the
host's, where the broker and the stand-in listen.
"""

import atexit
import contextlib
import json
import os
import signal
import subprocess
import time

CGROUP_ROOTS = ("/sys/fs/cgroup/unified", "/sys/fs/cgroup/systemd")


# Containers not stopped yet: a SIGTERM (meson's timeout) ends a unittest
# run without tearDownClass; the interpreter's exit still stops them.
_containers = []


@atexit.register
def _stop_containers():
    for container in list(_containers):
        container.stop()


class Container:
    def __init__(self, rootfs, workdir, name="gateway"):
        self.rootfs = rootfs
        self.name = name
        self.log_path = os.path.join(workdir, name + ".nspawn.log")
        self.cgroup = "otad-system-test-%d-%s" % (os.getpid(), name)
        self.proc = None
        self.leader = None

    def _cgroup_dirs(self):
        return [os.path.join(root, self.cgroup) for root in CGROUP_ROOTS
                if os.path.exists(os.path.join(root, "cgroup.procs"))]

    def start(self, timeout=120):
        dirs = self._cgroup_dirs()
        for d in dirs:
            os.makedirs(d, exist_ok=True)

        def enter_cgroup():
            for d in dirs:
                with open(os.path.join(d, "cgroup.procs"), "w") as f:
                    f.write("0\n")

        argv = ["systemd-nspawn", "--register=no", "--keep-unit", "--quiet", "-D", self.rootfs,
                "--machine=" + self.name, "-b", "--console=pipe"]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                         preexec_fn=enter_cgroup, start_new_session=True)
        _containers.append(self)
        deadline = time.monotonic() + timeout
        # The container's PID 1 as the host sees it; nspawn's short-lived
        # intermediate child is not called systemd.
        while self.leader is None:
            r = subprocess.run(["pgrep", "-x", "systemd", "-P", str(self.proc.pid)],
                               capture_output=True, text=True)
            if r.stdout.split():
                self.leader = int(r.stdout.split()[0])
                break
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("no systemd in the container; nspawn says:\n" + self.log())
            time.sleep(0.1)
        # Until systemd listens on its private socket, systemctl cannot ask.
        while True:
            state = self.run(["systemctl", "is-system-running", "--wait"],
                             timeout=max(1, deadline - time.monotonic())).stdout.strip()
            if state:
                return state
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the container's systemd does not answer; nspawn says:\n" + self.log())
            time.sleep(0.1)

    def log(self):
        with open(self.log_path, errors="replace") as f:
            return f.read()[-3000:]

    def run(self, argv, timeout=60, input=None, check=False):
        """argv inside the container, in all its namespaces."""
        r = subprocess.run(["nsenter", "-t", str(self.leader), "-a"] + list(argv), input=input,
                           capture_output=True, text=True, errors="replace", timeout=timeout)
        if check and r.returncode != 0:
            raise RuntimeError("%s: exit status %d\n%s%s" % (" ".join(argv), r.returncode, r.stdout, r.stderr))
        return r

    def sh(self, script, **kw):
        return self.run(["/bin/sh", "-c", script], **kw)

    def show(self, unit, *props):
        """systemctl show's properties of unit as a dict."""
        out = self.run(["systemctl", "show", unit] + ["-p" + p for p in props], check=True).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def journal(self, *matches):
        """Entries of this boot's journal matching journalctl arguments, as
        dicts (journalctl -o json)."""
        out = self.run(["journalctl", "-b", "--no-pager", "-o", "json"] + list(matches), check=True).stdout
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def stop(self, timeout=30):
        """Halts the container (SIGTERM to nspawn: systemd shuts down), kills
        what is left, and removes the cgroups."""
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    pass
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self._remove_cgroups()
        if self in _containers:
            _containers.remove(self)
        return self.proc.returncode if self.proc else None

    def _remove_cgroups(self):
        for d in self._cgroup_dirs():
            for _ in range(50):
                for root, dirs, _files in os.walk(d, topdown=False):
                    with contextlib.suppress(OSError):
                        os.rmdir(root)
                if not os.path.exists(d):
                    break
                time.sleep(0.1)

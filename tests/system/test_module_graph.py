#!/usr/bin/python3
"""The shape of the source tree (issue 9): no two modules depend on each
other in a loop, directly or through others; nothing but the daemon's own
files includes daemon.h (status flows up through callbacks). A module is a
header in include/ and the source files that implement it (src/X.c, or the
backends of src/installers/ and src/bootloaders/ behind their interface);
a module depends on every module whose header one of its files includes.
Prints the module graph from the top (main) to the bottom."""

import os
import re
import unittest

SOURCE = os.environ.get("OTAD_SOURCE_ROOT", os.path.join(os.path.dirname(__file__), "..", ".."))
INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"', re.M)

# Backends implement their folder's interface; "backends.h" is the
# folder's private table header.
FOLDERS = {"installers": "installer", "bootloaders": "bootloader"}


def module_of(path):
    rel = os.path.relpath(path, SOURCE)
    parts = rel.split(os.sep)
    if parts[0] == "src" and len(parts) == 3 and parts[1] in FOLDERS:
        return FOLDERS[parts[1]] if parts[2] != "grubenv.c" else "grubenv"
    return os.path.splitext(parts[-1])[0]


def header_module(name, including):
    base = os.path.splitext(os.path.basename(name))[0]
    if base == "backends":
        return module_of(including)
    return base


def graph():
    edges = {}
    for folder in ("src", "include"):
        for root, _, files in os.walk(os.path.join(SOURCE, folder)):
            for f in files:
                if not f.endswith((".c", ".h")):
                    continue
                path = os.path.join(root, f)
                mod = module_of(path)
                with open(path, errors="replace") as fh:
                    for inc in INCLUDE.findall(fh.read()):
                        dep = header_module(inc, path)
                        if dep != mod:
                            edges.setdefault(mod, set()).add(dep)
                edges.setdefault(mod, set())
    return edges


def cycles(edges):
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def layers(edges):
    """Modules by depth from the bottom: 0 depends on nothing of ours."""
    depth = {}

    def d(v, seen=()):
        if v in depth:
            return depth[v]
        if v in seen:
            return 0
        depth[v] = 1 + max((d(w, seen + (v,)) for w in edges.get(v, ())), default=-1)
        return depth[v]

    for v in edges:
        d(v)
    by = {}
    for v, n in depth.items():
        by.setdefault(n, []).append(v)
    return [sorted(by[n]) for n in sorted(by, reverse=True)]


class ModuleGraph(unittest.TestCase):
    def test_no_import_circles(self):
        edges = graph()
        for i, layer in enumerate(layers(edges)):
            print("# %2d  %s" % (i, "  ".join(layer)))
        self.assertEqual(cycles(edges), [], "modules that depend on each other in a loop")

    def test_only_the_daemon_includes_daemon_h(self):
        users = sorted(m for m, deps in graph().items() if "daemon" in deps)
        self.assertEqual([m for m in users if m not in ("main", "daemon")], [],
                         "status flows up through callbacks, never through daemon.h")


if __name__ == "__main__":
    unittest.main()

#!/usr/bin/python3
"""Runs one Python unittest module and reports in TAP for `meson test`.

Usage: /usr/bin/python3 tests/standin/tap.py path/to/test_module.py [-k PATTERN]
Prints `1..N`, then `ok N - name`, `not ok N - name` with the traceback as
`# ` lines, `ok N - name # SKIP reason`; exits 1 if any test failed.
This directory and the module's directory are put on sys.path, so tests can
`import harness` wherever they live.
"""

import importlib.util
import os
import sys
import time
import traceback
import unittest


class TapResult(unittest.TestResult):
    def __init__(self, out):
        super().__init__()
        self.out = out
        self.n = 0
        self.failed = False
        self._started = 0.0

    def _line(self, text):
        self.out.write(text + "\n")
        self.out.flush()

    def _diag(self, text):
        for line in text.rstrip("\n").splitlines():
            self._line("# " + line)

    @staticmethod
    def _name(test):
        return test.id().split(".", 1)[-1]

    def startTest(self, test):
        super().startTest(test)
        self._started = time.monotonic()

    def _elapsed(self):
        return " (%.1f s)" % (time.monotonic() - self._started)

    def addSuccess(self, test):
        self.n += 1
        self._line("ok %d - %s%s" % (self.n, self._name(test), self._elapsed()))

    def _not_ok(self, test, err):
        self.n += 1
        self.failed = True
        self._line("not ok %d - %s%s" % (self.n, self._name(test), self._elapsed()))
        self._diag("".join(traceback.format_exception(*err)))

    def addFailure(self, test, err):
        super().addFailure(test, err)
        self._not_ok(test, err)

    def addError(self, test, err):
        super().addError(test, err)
        # setUpClass/module errors arrive as a pseudo-test without a number
        # of their own; report them as a failed point so the plan stays honest.
        self._not_ok(test, err)

    def addSkip(self, test, reason):
        self.n += 1
        self._line("ok %d - %s # SKIP %s" % (self.n, self._name(test), reason))

    def addExpectedFailure(self, test, err):
        self.n += 1
        # TAP: a failing TODO point is "not ok ... # TODO"; harnesses (meson:
        # EXPECTEDFAIL) count it as passing. "ok ... # TODO" would be an
        # unexpected pass. A test function's `todo` attribute names the
        # defect it waits for.
        method = getattr(test, getattr(test, "_testMethodName", ""), None)
        reason = getattr(method, "todo", None) or "expected failure"
        self._line("not ok %d - %s%s # TODO %s" % (self.n, self._name(test), self._elapsed(), reason))
        self._diag("".join(traceback.format_exception_only(*err[:2])))

    def addUnexpectedSuccess(self, test):
        self.n += 1
        self.failed = True
        self._line("not ok %d - %s # unexpected success" % (self.n, self._name(test)))

    def addSubTest(self, test, subtest, err):
        if err is not None:
            self._not_ok(subtest, err)


def load(path):
    here = os.path.dirname(os.path.abspath(__file__))
    for d in (here, os.path.dirname(os.path.abspath(path))):
        if d not in sys.path:
            sys.path.insert(0, d)
    name = os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def main(argv):
    if len(argv) < 2 or argv[1] in ("-h", "--help"):
        sys.stderr.write(__doc__)
        return 2
    # TAP owns stdout: anything else the tests print goes to stderr.
    tap_out, sys.stdout = sys.stdout, sys.stderr
    loader = unittest.TestLoader()
    if len(argv) > 3 and argv[2] == "-k":
        loader.testNamePatterns = ["*%s*" % argv[3]]
    try:
        suite = loader.loadTestsFromModule(load(argv[1]))
    except Exception:
        tap_out.write("1..1\nnot ok 1 - load %s\n" % argv[1])
        for line in traceback.format_exc().splitlines():
            tap_out.write("# %s\n" % line)
        return 1
    result = TapResult(tap_out)
    tap_out.write("1..%d\n" % suite.countTestCases())
    tap_out.flush()
    suite.run(result)
    if result.n != suite.countTestCases():
        # Errors outside tests (setUpClass) change the count; say so.
        tap_out.write("# ran %d points for a plan of %d\n"
                      % (result.n, suite.countTestCases()))
        result.failed = True
    return 1 if result.failed or not result.wasSuccessful() else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

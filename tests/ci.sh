#!/bin/sh
# The test command of README.md: on a fresh Debian 12 machine, as root,
# installs what it needs, builds otad with warnings as errors and runs every
# test (unit, stand-in, integration). Exits non-zero when any test fails.
set -eu

cd "$(dirname "$0")/.."
build=${OTAD_BUILD_DIR:-build-ci}

./tests/install-deps.sh
rm -rf "$build"
meson setup "$build" -Dwerror=true
meson compile -C "$build"

status=0
meson test -C "$build" --print-errorlogs --num-processes 2 || status=$?

# One closing line that any CI reads: "N passed, N failed".
/usr/bin/python3 - "$build/meson-logs/testlog.json" <<'PY'
import json, sys
results = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
passed = sum(r["result"] in ("OK", "EXPECTEDFAIL") for r in results)
skipped = sum(r["result"] == "SKIP" for r in results)
failed = len(results) - passed - skipped
print(f"{passed} passed, {failed} failed, {skipped} skipped")
PY
exit $status

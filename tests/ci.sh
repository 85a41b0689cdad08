#!/bin/sh
# The test command of README.md: on a fresh Debian 12 machine, as root,
# installs what it needs and builds otad three ways, each from scratch with
# warnings as errors, for four runs:
#   gcc     build-ci/        -O2 (debugoptimized), the whole suite
#   clang   build-ci-clang/  --buildtype=debug (libm and every other library
#                            linked for real, nothing inlined away), the unit
#                            tests; the same build holds the fuzz targets
#   fuzz    build-ci-clang/  each libFuzzer target for OTAD_FUZZ_SECONDS (60)
#   asan    build-ci-asan/   gcc with ASan+UBSan, the whole suite once under
#                            `meson test --setup sanitize`: a sanitizer report
#                            of any process a test starts (otad, the helpers)
#                            fails the test (tests/sanitizer-wrap.sh), leaks
#                            included. Left out: the 'guest' suite, whose
#                            tests run otad inside an nspawn container or a
#                            QEMU guest that has no libasan.
# Every run goes on when an earlier one failed; the end is one line per run,
# each phase's time, and a closing `N passed, N failed, N skipped` over all
# runs. Exits non-zero when anything failed (a build counts as a test).
set -u

cd "$(dirname "$0")/.."
build=${OTAD_BUILD_DIR:-build-ci}
export OTAD_FUZZ_SECONDS="${OTAD_FUZZ_SECONDS:-60}"
results=$(mktemp -d "${TMPDIR:-/tmp}/otad-ci-XXXXXX")
trap 'rm -rf "$results"' EXIT
started=$(date +%s)

# phase NAME: starts timing a phase; phase_done records its time.
phase() {
        phase_name=$1
        phase_start=$(date +%s)
        echo
        echo "=== ci.sh: $phase_name ($(date -u +%H:%M:%S))"
}
phase_done() {
        s=$(($(date +%s) - phase_start))
        printf '%-36s %4d s\n' "$phase_name" "$s" >> "$results/times"
        echo "=== ci.sh: $phase_name took $s s"
}

# run_tests RUN DIR [meson test args]: one run's results go to
# DIR/meson-logs/RUN.json (RUN-SETUP.json with --setup), listed in
# $results/runs.
run_tests() {
        run=$1 dir=$2
        shift 2
        echo "$run $dir/meson-logs $run" >> "$results/runs"
        meson test -C "$dir" --logbase "$run" --print-errorlogs --num-processes 2 "$@"
}

# setup_build RUN DIR [meson setup args]: a failed build is one failed test
# of that run.
setup_build() {
        run=$1 dir=$2
        shift 2
        rm -rf "$dir"
        if meson setup "$dir" -Dwerror=true "$@" && meson compile -C "$dir"; then
                return 0
        fi
        echo "$run build FAILED" >> "$results/failed-builds"
        return 1
}

phase "install-deps"
./tests/install-deps.sh || echo "deps install FAILED" >> "$results/failed-builds"
phase_done

phase "gcc build"
gcc_ok=false
setup_build gcc "$build" && gcc_ok=true
phase_done
if $gcc_ok; then
        phase "gcc tests (whole suite)"
        run_tests gcc "$build"
        phase_done
fi

if command -v clang >/dev/null; then
        phase "clang debug build + fuzz targets"
        clang_ok=false
        (CC=clang && export CC && setup_build clang "$build-clang" --buildtype=debug -Dfuzz=true) && clang_ok=true
        phase_done
        if $clang_ok; then
                phase "clang tests (unit)"
                run_tests clang "$build-clang" --suite unit
                phase_done
                phase "fuzz (${OTAD_FUZZ_SECONDS} s a target, 2 at a time)"
                run_tests fuzz "$build-clang" --suite fuzz
                phase_done
        fi
else
        echo "clang: not installed, no clang build and no fuzzing" >> "$results/skipped-runs"
fi

phase "asan+ubsan build"
asan_ok=false
setup_build asan "$build-asan" -Db_sanitize=address,undefined && asan_ok=true
phase_done
if $asan_ok; then
        phase "asan+ubsan tests (whole suite)"
        run_tests asan "$build-asan" --setup sanitize
        phase_done
fi

echo
echo "=== ci.sh: time per phase"
cat "$results/times"
printf '%-36s %4d s\n' "total" "$(($(date +%s) - started))"
echo
echo "=== ci.sh: results"
# One line per run, then the closing line that any CI reads.
/usr/bin/python3 - "$results" <<'PY'
import glob, json, os, sys

results = sys.argv[1]

def lines(name):
    path = os.path.join(results, name)
    return open(path).read().splitlines() if os.path.exists(path) else []

total = [0, 0, 0]
for entry in lines("runs"):
    run, logdir, logbase = entry.split(" ")
    counts = [0, 0, 0]
    failed_names = []
    logs = glob.glob(os.path.join(logdir, logbase + ".json")) + \
        glob.glob(os.path.join(logdir, logbase + "-*.json"))
    tests = [json.loads(l) for log in logs for l in open(log) if l.strip()]
    if not logs:
        counts[1] += 1
        failed_names.append("(no test log %s/%s.json)" % (logdir, logbase))
    for t in tests:
        if t["result"] in ("OK", "EXPECTEDFAIL"):
            counts[0] += 1
        elif t["result"] == "SKIP":
            counts[2] += 1
        else:
            counts[1] += 1
            failed_names.append("%s (%s)" % (t["name"], t["result"]))
    print("%-6s %d passed, %d failed, %d skipped" % (run + ":", *counts))
    for name in failed_names:
        print("         failed: %s" % name)
    total = [a + b for a, b in zip(total, counts)]
for line in lines("failed-builds"):
    print(line)
    total[1] += 1
for line in lines("skipped-runs"):
    print(line)
    total[2] += 1
print("%d passed, %d failed, %d skipped" % tuple(total))
sys.exit(1 if total[1] else 0)
PY

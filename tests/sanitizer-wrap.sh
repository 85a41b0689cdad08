#!/bin/sh
# sanitizer-wrap.sh TEST ARGS...: the wrapper of `meson test --setup
# sanitize` (meson.build). Runs one test with every ASan, UBSan and
# LeakSanitizer report of every process it starts (the test program, otad,
# the helpers in the build dir) written to a directory of its own, and fails
# the test when any report is there afterwards. A report of a child whose
# exit status the test does not look at (otad stopped with SIGTERM at the end
# of a test, a helper killed on purpose, a leak at exit) thus still fails it;
# the reports are printed to stderr, which meson keeps in its log.
set -u
dir=$(mktemp -d "${TMPDIR:-/tmp}/otad-sanitizer-XXXXXX")
# Root's children that drop privileges must still be able to write here.
chmod 1777 "$dir"
ASAN_OPTIONS="${ASAN_OPTIONS:+$ASAN_OPTIONS:}log_path=$dir/asan"
UBSAN_OPTIONS="${UBSAN_OPTIONS:+$UBSAN_OPTIONS:}log_path=$dir/ubsan"
LSAN_OPTIONS="${LSAN_OPTIONS:+$LSAN_OPTIONS:}log_path=$dir/lsan"
export ASAN_OPTIONS UBSAN_OPTIONS LSAN_OPTIONS

"$@"
status=$?

for report in "$dir"/*; do
        [ -e "$report" ] || continue
        echo "sanitizer-wrap.sh: a sanitizer report of a process of this test: $report" >&2
        cat "$report" >&2
        status=1
done
rm -rf "$dir"
exit $status

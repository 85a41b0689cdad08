#!/bin/sh
# run-fuzzer.sh FUZZER SEED_DIR WORK_DIR: runs one libFuzzer target for
# OTAD_FUZZ_SECONDS (60) from the seed corpus, never writing into it (new
# inputs go to WORK_DIR, libFuzzer's first corpus directory). Exits non-zero
# on a crash, a leak, a UBSan finding or an input running over 10 s.
set -eu
fuzzer=$1 seeds=$2 work=$3
mkdir -p "$work"
exec "$fuzzer" -max_total_time="${OTAD_FUZZ_SECONDS:-60}" -timeout=10 -print_final_stats=1 \
        -artifact_prefix="$work-" "$work" "$seeds"

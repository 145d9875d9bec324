#!/usr/bin/env bash
# cargo-fuzz targets for every parser (fuzz/, issue 12).
#
#   scripts/fuzz.sh build                 build every target (installs cargo-fuzz if missing)
#   scripts/fuzz.sh smoke SECS            run every target SECS seconds (KEYBROKER_FUZZ_JOBS
#                                         at once, default: the number of CPUs); fail on any crash
#   scripts/fuzz.sh long SECS TARGET...   run the targets one after another, SECS each, niced
#   scripts/fuzz.sh cmin TARGET...        minimize seeds + what long runs found into
#                                         fuzz/target/cmin/TARGET (pick from there what to commit)
#   scripts/fuzz.sh list                  the targets
#
# Runs start from the committed seeds in fuzz/corpus/TARGET (and replay the past
# findings kept in fuzz/artifacts-keep/TARGET) and write what they
# find to fuzz/target/corpus/TARGET, so the committed corpora stay small; crash
# inputs land in fuzz/artifacts/TARGET/. Per target the summary prints execs/s,
# total execs and the corpus size (files/bytes) before and after.
#
# Build flags: release with debug assertions and overflow checks (-O -a), and no
# sanitizer by default: the parsers are safe Rust, and AddressSanitizer only
# makes the build and every exec slower (KEYBROKER_FUZZ_SANITIZER=address to
# use it anyway). Toolchain: nightly (KEYBROKER_FUZZ_TOOLCHAIN).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
FUZZ=$ROOT/fuzz
TOOLCHAIN=${KEYBROKER_FUZZ_TOOLCHAIN:-nightly}
SANITIZER=${KEYBROKER_FUZZ_SANITIZER:-none}
TRIPLE=$(rustc -vV | sed -n 's/^host: //p')
BIN_DIR=$FUZZ/target/$TRIPLE/release
# Where runs keep what they find, and their logs (another place for a second
# run beside a long one).
OUT=${KEYBROKER_FUZZ_OUT:-$FUZZ/target}
WORK=$OUT/corpus
LOGS=$OUT/logs

die() { echo "fuzz.sh: $*" >&2; exit 1; }

ensure_tools() {
    if ! rustup toolchain list | grep -q "^$TOOLCHAIN"; then
        rustup toolchain install "$TOOLCHAIN" --profile minimal
    fi
    if ! command -v cargo-fuzz >/dev/null; then
        cargo install cargo-fuzz --locked
    fi
}

targets() {
    sed -n 's/^name = "\(.*\)"$/\1/p' "$FUZZ/Cargo.toml" | grep -v '^keybroker-fuzz$'
}

build() {
    ensure_tools
    local start=$SECONDS
    (cd "$ROOT" && cargo "+$TOOLCHAIN" fuzz build -O -a --sanitizer "$SANITIZER")
    echo "fuzz.sh: built $(targets | wc -l) targets in $((SECONDS - start)) s (sanitizer: $SANITIZER)"
}

# files/bytes of the given directories together
corpus_size() {
    local files bytes
    files=$(find "$@" -type f 2>/dev/null | wc -l)
    bytes=$(find "$@" -type f -printf '%s\n' 2>/dev/null | awk '{s+=$1} END {print s+0}')
    echo "$files/$bytes"
}

# The audit target's scratch directories, once their process is gone.
clean_scratch() {
    local d
    for d in /dev/shm/keybroker-fuzz-audit-* "${TMPDIR:-/tmp}"/keybroker-fuzz-audit-*; do
        if [ -d "$d" ] && ! kill -0 "${d##*-}" 2>/dev/null; then rm -rf "$d"; fi
    done
}

# run_one TARGET SECS: fuzz one target; prints one summary line, returns non-zero on a crash
run_one() {
    local t=$1 secs=$2 bin=$BIN_DIR/$1
    [ -x "$bin" ] || die "$bin is missing: run scripts/fuzz.sh build"
    mkdir -p "$WORK/$t" "$FUZZ/artifacts/$t" "$LOGS"
    local before log=$LOGS/$t.log rc=0
    before=$(corpus_size "$FUZZ/corpus/$t" "$WORK/$t")
    # -timeout is wall time: one input running for a minute is a finding (the
    # exponential glob matcher ran for minutes), while the slowest real input
    # (scrypt at N=2^16, twice, ~0.5 s alone) took over 10 s once on a busy
    # machine, niced. -rss_limit_mb: scrypt at the largest accepted N takes 128 MiB.
    local seeds=() start=$SECONDS
    [ -d "$FUZZ/corpus/$t" ] && seeds=("$FUZZ/corpus/$t")
    # Past findings (fixed since) are replayed by every run.
    [ -d "$FUZZ/artifacts-keep/$t" ] && seeds+=("$FUZZ/artifacts-keep/$t")
    "$bin" "$WORK/$t" "${seeds[@]}" \
        -max_total_time="$secs" -timeout=60 -rss_limit_mb=2048 -max_len=65536 \
        -print_final_stats=1 -artifact_prefix="$FUZZ/artifacts/$t/" >"$log" 2>&1 || rc=$?
    local took=$((SECONDS - start))
    clean_scratch
    local execs per_sec after
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    per_sec=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
    after=$(corpus_size "$FUZZ/corpus/$t" "$WORK/$t")
    printf '%-14s %6s s %10s execs %8s execs/s  corpus %12s -> %-12s %s\n' \
        "$t" "$took" "${execs:-?}" "${per_sec:-?}" "$before" "$after" \
        "$([ "$rc" = 0 ] && echo ok || echo "CRASH (exit $rc, see $log and fuzz/artifacts/$t/)")"
    return "$rc"
}

smoke() {
    local secs=$1 jobs=${KEYBROKER_FUZZ_JOBS:-$(nproc)} failed=0 t
    [ -x "$BIN_DIR/$(targets | head -1)" ] || build
    local start=$SECONDS pids=() names=()
    mkdir -p "$LOGS"
    for t in $(targets); do
        while [ "$(jobs -rp | wc -l)" -ge "$jobs" ]; do sleep 0.2; done
        run_one "$t" "$secs" >"$LOGS/$t.summary" &
        pids+=($!)
        names+=("$t")
    done
    for i in "${!pids[@]}"; do
        wait "${pids[$i]}" || failed=1
        cat "$LOGS/${names[$i]}.summary"
    done
    echo "fuzz.sh: smoke of $(targets | wc -l) targets, ${secs} s each, $jobs at a time: $((SECONDS - start)) s"
    if [ "$failed" != 0 ]; then
        for t in "${names[@]}"; do
            grep -q CRASH "$LOGS/$t.summary" && { echo "== $t"; tail -n 60 "$LOGS/$t.log"; }
        done
        die "a target crashed"
    fi
}

long() {
    local secs=$1 failed=0 t
    shift
    [ $# -gt 0 ] || set -- $(targets)
    for t in "$@"; do
        targets | grep -qx "$t" || die "no target $t (scripts/fuzz.sh list)"
    done
    for t in "$@"; do
        # One at a time, below everything else on the machine.
        nice -n 15 "$0" _one "$t" "$secs" || failed=1
    done
    [ "$failed" = 0 ] || die "a target crashed"
}

cmin() {
    local t bin
    for t in "$@"; do
        bin=$BIN_DIR/$t
        rm -rf "$FUZZ/target/cmin/$t"
        mkdir -p "$FUZZ/target/cmin/$t"
        "$bin" -merge=1 -timeout=10 -rss_limit_mb=2048 "$FUZZ/target/cmin/$t" "$FUZZ/corpus/$t" "$WORK/$t" \
            >"$LOGS/$t.cmin.log" 2>&1
        echo "$t: $(corpus_size "$FUZZ/corpus/$t" "$WORK/$t") -> $(corpus_size "$FUZZ/target/cmin/$t") in fuzz/target/cmin/$t"
    done
    clean_scratch
}

case "${1:-}" in
    build) build ;;
    smoke) [ $# = 2 ] || die "usage: $0 smoke SECS"; smoke "$2" ;;
    long) [ $# -ge 2 ] || die "usage: $0 long SECS [TARGET...]"; shift; long "$@" ;;
    cmin) [ $# -ge 2 ] || die "usage: $0 cmin TARGET..."; shift; cmin "$@" ;;
    list) targets ;;
    _one) run_one "$2" "$3" ;;
    *) die "usage: $0 build | smoke SECS | long SECS [TARGET...] | cmin TARGET... | list" ;;
esac

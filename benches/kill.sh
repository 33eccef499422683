#!/usr/bin/env bash
# Benchmark and soak: SIGKILL cdpd N times under a writing NBD client (issue 12).
#
#   bash benches/kill.sh                 # 1000 cycles, release build
#   CYCLES=200 bash benches/kill.sh
#
# Each cycle: a client writes numbered 4 KiB blocks through cdpd's NBD socket
# (WRITERS connections, DEPTH requests in flight each, a FLUSH every FLUSH_EVERY writes),
# cdpd is SIGKILLed after a random number of acknowledgements (mid-stream), started
# again (recovery: start to READY is timed), every block is read back through it (no
# acknowledged-and-flushed write lost, nothing older than what was read before), cdpd is
# stopped and `cdpctl journal replay` of the whole journal onto a copy of the initial
# image must equal the image. The program is tests/src/bin/kill-cycles.rs, the same one
# tests/tests/kill_cycles.rs runs for 10 cycles in CI; its header lists every knob
# (CYCLES, DISK_MIB, WRITERS, DEPTH, FLUSH_EVERY, KILL_MIN, KILL_MAX, ROTATE, SEED).
#
# Prints the JSON summary (cycles, failures, recovery_ms_mean, records_redone,
# torn_bytes, ...) and the facts BENCHMARKS.md records; exits 1 if any cycle failed.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
export CYCLES="${CYCLES:-1000}"
BENCH_DIR="${BENCH_DIR:-/var/tmp/cdpd-bench}"

if [ "${SKIP_BUILD:-0}" != 1 ]; then
    cargo build --release --bins
fi
export CDP_BIN_DIR="${CDP_BIN_DIR:-$ROOT/target/release}"
mkdir -p "$BENCH_DIR"
export CDP_TEST_TMPDIR="$BENCH_DIR"

echo "== $CYCLES kill cycles, binaries from $CDP_BIN_DIR, under $BENCH_DIR" >&2
rc=0
summary=$("$CDP_BIN_DIR/kill-cycles") || rc=$?
echo "$summary" | python3 -m json.tool

echo
echo "date:     $(date -u +%Y-%m-%dT%H:%M:%SZ)"
echo "commit:   $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (dirty)')"
echo "machine:  nproc=$(nproc), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //'), kernel $(uname -r)"
echo "disk:     $(findmnt -no SOURCE,FSTYPE -T "$BENCH_DIR" | tr '\n' ' ')"
echo "load avg: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "command:  CYCLES=$CYCLES bash benches/kill.sh"
exit "$rc"

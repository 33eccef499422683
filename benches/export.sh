#!/usr/bin/env bash
# Benchmark: `cdpctl export` (instant recovery), a read-only NBD export of a
# point served straight from the repository.
#
#   bash benches/export.sh            # SIZE_GIB=10 DATA_GIB=1 JOURNAL_GIB=1 RUNS=3
#   REUSE=1 bash benches/export.sh    # keep the repository of the previous run
#
# 1. Builds the repository once: a sparse SIZE_GIB raw disk with DATA_GIB of
#    random data (4 extents), served by cdpd; `cdpctl baseline`; JOURNAL_GIB of
#    4 KiB random writes (incompressible) through cdpd with fio's nbd engine;
#    cdpd stopped; `cdp-shipper run --once` to a file:// repository.
# 2. Starts `cdpctl export … --at latest --no-local` (repository only) RUNS
#    times and measures, from the moment it is started: READY on --ready-fd,
#    and the first 4 KiB read answered (python3-libnbd, connecting as soon as
#    READY arrives); then cold 4 KiB reads from a baseline chunk and from the
#    journal.
# 3. Sequential read of the whole export with `nbdcopy URI null:` (4
#    connections, the export advertises multi-conn), with the default cache
#    (256 MiB) and with a cache larger than the journal, against `cat` of the
#    raw image of the same size (same contents, same holes) to /dev/null.
#    Both read warm files: the repository and the image were just written
#    and fit in the page cache. `qemu-img compare` then checks the export
#    against the image (CHECK=0 skips it).
# 4. In the same run, `cdpctl restore --at latest --no-local` of the same
#    point from the same repository to a fresh file (+ its fsync): issue 13
#    asks the export's full read for >= 0.5x the restore's throughput.
# Every timing of 3. and 4. is the median of READS runs (default 3).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
SIZE_GIB="${SIZE_GIB:-10}"
DATA_GIB="${DATA_GIB:-1}"
JOURNAL_GIB="${JOURNAL_GIB:-1}"
RUNS="${RUNS:-3}"
READS="${READS:-3}"
BIG_CACHE_MIB="${BIG_CACHE_MIB:-2048}"
CHECK="${CHECK:-1}"
W="${BENCH_DIR:-/var/tmp/cdpd-export-bench}"

[ "${SKIP_BUILD:-0}" = 1 ] || cargo build --release --bins
BIN="${BIN_DIR:-$ROOT/target/release}" # BIN_DIR: a copy of the binaries (before/after runs)
for t in fio nbdcopy qemu-img python3; do
    command -v $t >/dev/null || { echo "missing $t: bash scripts/install-deps" >&2; exit 1; }
done
# python3-libnbd is the distribution's: a python3 first on PATH (pyenv) may not see it.
PY=python3
$PY -c 'import nbd' 2>/dev/null || PY=/usr/bin/python3
$PY -c 'import nbd' || { echo "missing python3-libnbd" >&2; exit 1; }

U=5e1f0c2a-7b3d-4e8f-a1b2-c3d4e5f60718
IMG="$W/disk.raw"
CFG="$W/cdp.toml"
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
}
trap cleanup EXIT

if [ "${REUSE:-0}" = 1 ] && [ -f "$W/built" ]; then
    echo "== reusing the repository in $W" >&2
else
    rm -rf "$W"
    mkdir -p "$W/repo" "$W/run" "$W/state"
    cat >"$CFG" <<EOF
[target.primary]
url = "file://$W/repo"
[policy.default]
targets = ["primary"]
EOF
    echo "== 1. building the repository: ${SIZE_GIB} GiB disk, ${DATA_GIB} GiB data, ${JOURNAL_GIB} GiB journal" >&2
    truncate -s "${SIZE_GIB}G" "$IMG"
    per=$((DATA_GIB * 1024 / 4))
    for i in 0 1 2 3; do
        dd if=/dev/urandom of="$IMG" bs=1M count=$per seek=$((i * SIZE_GIB * 1024 / 4)) \
            conv=notrunc status=none
    done
    mkfifo "$W/ready"
    "$BIN/cdpd" run --vm-uuid $U --vm-name bench --disk "vda=$IMG" --state-dir "$W/state" \
        --run-dir "$W/run" --ready-fd 3 3>"$W/ready" 2>>"$W/cdpd.log" &
    CDPD=$!
    PIDS+=($CDPD)
    read -r line <"$W/ready"
    rm -f "$W/ready"
    [ "$line" = READY ] || { cat "$W/cdpd.log"; exit 1; }
    t0=$(date +%s.%N)
    "$BIN/cdpctl" baseline $U --state-dir "$W/state" --run-dir "$W/run" --config "$CFG" >&2
    t1=$(date +%s.%N)
    fio --name=journal --ioengine=nbd --uri="nbd+unix:///vda?socket=$W/run/$U/vda.sock" \
        --rw=randwrite --bs=4k --iodepth=16 --size="${SIZE_GIB}g" --io_size="${JOURNAL_GIB}g" \
        --refill_buffers --output-format=terse >/dev/null 2>&1
    t2=$(date +%s.%N)
    kill -TERM $CDPD
    wait $CDPD
    "$BIN/cdp-shipper" run --once --no-auto-baseline --vm-uuid $U --state-dir "$W/state" \
        --run-dir "$W/run" --config "$CFG" >&2
    t3=$(date +%s.%N)
    python3 -c "print(f'baseline {$t1-$t0:.1f} s, fio {$t2-$t1:.1f} s, stop + ship {$t3-$t2:.1f} s')" >&2
    touch "$W/built"
fi
jbytes=$(find "$W/repo" -path '*/journal/*.seg.zst' -printf '%s\n' | awk '{s+=$1} END {print s}')
ibytes=$(find "$W/repo" -path '*/journal/*.idx' -printf '%s\n' | awk '{s+=$1} END {print s}')
nseg=$(find "$W/repo" -path '*/journal/*.seg.zst' | wc -l)

echo "== 2. time to READY and to the first read (${RUNS} runs)" >&2
sync
$PY - "$BIN/cdpctl" "$U" "$W" "$CFG" "$RUNS" <<'EOF' >"$W/startup.txt"
import os, subprocess, sys, time, nbd
cdpctl, u, w, cfg, runs = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
sock = f"{w}/export.sock"
uri = f"nbd+unix:///vda?socket={sock}"
size = os.path.getsize(f"{w}/disk.raw")
gib = 1 << 30
for run in range(runs):
    r, wfd = os.pipe()
    t0 = time.monotonic()
    p = subprocess.Popen([cdpctl, "export", u, "--disk", "vda", "--at", "latest", "--no-local",
                          "--socket", sock, "--ready-fd", str(wfd), "--state-dir", f"{w}/state",
                          "--run-dir", f"{w}/run", "--config", cfg],
                         pass_fds=(wfd,), stderr=open(f"{w}/export.log", "a"))
    os.close(wfd)
    line = os.read(r, 100).decode().strip()
    t_ready = time.monotonic()
    assert line == "READY", line
    h = nbd.NBD()
    h.connect_uri(uri)
    h.pread(4096, 0)
    t_first = time.monotonic()
    # Cold reads: 4 KiB in the middle of the second data extent (a baseline
    # chunk), 1 MiB in a hole of the baseline (~25 random 4 KiB journal
    # writes land in any MiB: ~25 segment frames to fetch).
    t = time.monotonic(); h.pread(4096, size // 4 + 64 * (1 << 20)); t_chunk = time.monotonic() - t
    t = time.monotonic(); h.pread(1 << 20, size // 8 + 12345 * 4096); t_hole = time.monotonic() - t
    h.shutdown()
    p.terminate(); p.wait()
    print(f"{(t_ready - t0) * 1000:.0f} {(t_first - t0) * 1000:.0f} {t_chunk * 1000:.1f} {t_hole * 1000:.1f}")
EOF
cat "$W/startup.txt" >&2

echo "== 3. sequential read of the whole export" >&2
start_export() { # cache-mib
    mkfifo "$W/ready"
    "$BIN/cdpctl" export $U --disk vda --at latest --no-local --socket "$W/export.sock" \
        --cache-mib "$1" --ready-fd 3 --state-dir "$W/state" --run-dir "$W/run" \
        --config "$CFG" 3>"$W/ready" 2>>"$W/export.log" &
    EXPORT=$!
    PIDS+=($EXPORT)
    read -r line <"$W/ready"
    rm -f "$W/ready"
    [ "$line" = READY ] || { cat "$W/export.log"; exit 1; }
}
stop_export() {
    kill -TERM $EXPORT
    wait $EXPORT
}
secs() { # command… → elapsed seconds
    local t0 t1
    t0=$(date +%s.%N)
    "$@" >/dev/null
    t1=$(date +%s.%N)
    python3 -c "print(round($t1 - $t0, 2))"
}
URI="nbd+unix:///vda?socket=$W/export.sock"
median() { python3 -c 'import sys,statistics; print(statistics.median(map(float, sys.argv[1:])))' "$@"; }
cat "$IMG" >/dev/null # warm, like the repository
ts=(); for _ in $(seq "$READS"); do ts+=("$(secs cat "$IMG")"); done
echo "   cat: ${ts[*]} s" >&2
cat_s=$(median "${ts[@]}")
ts=()
for _ in $(seq "$READS"); do
    rm -f "$W/restored.raw"
    ts+=("$(secs "$BIN/cdpctl" restore $U --disk vda --at latest --output "$W/restored.raw" \
        --repo "file://$W/repo" --no-local --state-dir "$W/state" --config "$CFG")")
done
rm -f "$W/restored.raw"
echo "   restore: ${ts[*]} s" >&2
restore_s=$(median "${ts[@]}")
ts=()
for _ in $(seq "$READS"); do
    start_export 256
    ts+=("$(secs nbdcopy "$URI" null:)")
    stop_export
done
echo "   export, default cache: ${ts[*]} s" >&2
def_s=$(median "${ts[@]}")
ts=()
for _ in $(seq "$READS"); do
    start_export "$BIG_CACHE_MIB"
    ts+=("$(secs nbdcopy "$URI" null:)")
    stop_export
done
echo "   export, cache $BIG_CACHE_MIB MiB: ${ts[*]} s" >&2
big_s=$(median "${ts[@]}")
if [ "$CHECK" = 1 ]; then
    start_export 256
    qemu-img compare -U -f raw -F raw "$IMG" "$URI" >&2
    stop_export
fi
tail -n 2 "$W/export.log" >&2

echo "date:     $(date -u +%Y-%m-%dT%H:%M:%SZ)"
echo "commit:   $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (dirty)')"
echo "machine:  nproc=$(nproc), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //'), kernel $(uname -r), load $(cut -d' ' -f1-3 /proc/loadavg)"
echo "repository: ${SIZE_GIB} GiB disk, ${DATA_GIB} GiB of data in the baseline, $nseg segments, journal $((jbytes >> 20)) MiB compressed + $((ibytes >> 20)) MiB of indexes"
echo
python3 - "$W/startup.txt" "$SIZE_GIB" "$cat_s" "$def_s" "$big_s" "$BIG_CACHE_MIB" "$restore_s" "$READS" <<'EOF'
import statistics, sys
rows = [list(map(float, l.split())) for l in open(sys.argv[1]) if l.strip()]
size = int(sys.argv[2]) * (1 << 30) / 1e6
cat, d, big = map(float, sys.argv[3:6])
rs = float(sys.argv[7])
print("| run | start → READY | start → first 4 KiB read answered | then a cold 4 KiB read in a baseline chunk | then a cold 1 MiB read of journal data (~25 records) |")
print("|---|---|---|---|---|")
for i, r in enumerate(rows, 1):
    print(f"| {i} | {r[0]:.0f} ms | {r[1]:.0f} ms | {r[2]:.1f} ms | {r[3]:.1f} ms |")
print(f"| median | {statistics.median(r[0] for r in rows):.0f} ms | {statistics.median(r[1] for r in rows):.0f} ms | | |")
print()
print(f"| whole disk, {size/1000:.1f} GB (median of {sys.argv[8]}) | time | MB/s | / cat | / restore |")
print("|---|---|---|---|---|")
print(f"| `cat disk.raw` (warm) | {cat:.2f} s | {size/cat:.0f} | 1.00× | {rs/cat:.2f}× |")
print(f"| `cdpctl restore --no-local` to a new file | {rs:.2f} s | {size/rs:.0f} | {cat/rs:.2f}× | 1.00× |")
print(f"| export, `nbdcopy URI null:`, cache 256 MiB (default) | {d:.2f} s | {size/d:.0f} | {cat/d:.2f}× | {rs/d:.2f}× |")
print(f"| export, `nbdcopy URI null:`, cache {sys.argv[6]} MiB | {big:.2f} s | {size/big:.0f} | {cat/big:.2f}× | {rs/big:.2f}× |")
EOF

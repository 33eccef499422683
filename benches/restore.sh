#!/usr/bin/env bash
# Benchmark: restore from a file:// repository.
#
#   bash benches/restore.sh          # defaults below; SIZE_MB=1024 REGION_MB=64 LOOPS=10 RUNS=3 …
#
# For LOOPS=1 and LOOPS=10: a SIZE_MB disk of random data under cdpd, an online
# baseline, then fio random 4 KiB writes over the first REGION_MB of it: LOOPS full
# passes, each a random permutation of the region's blocks (fio's random map), so
# both journals touch exactly the same blocks and the longer one is LOOPS× longer.
# cdpd is stopped, the shipper ships the journal, and `cdpctl restore --at latest
# --no-local` rebuilds the disk from the repository alone (checked with cmp against
# the image). Reported:
# (a) restore time for the short and the long journal (target: long ≤ 1.5× short);
# (b) restore throughput against a plain sequential copy of a raw image of the same
#     size (`cp` then `sync FILE`, and `dd conv=fsync`), target ≥ 0.7×.
# RANDOM_MAP=0 drops fio's random map (--norandommap): writes then repeat blocks within
# a pass, so old segments keep a few surviving records each and the touched sets of the
# two journals differ (the short one touches ~63% of the region).
# Each timing is the median of RUNS; page caches are left warm for both sides
# (DROP_CACHES=1 drops them before every timed run: both then read from disk).
# BIN_DIR_B=DIR (A/B in one run): the 1-pass journal is restored by $BIN_DIR's cdpctl
# ("A", e.g. a copy of the old binaries) and by DIR's ("B") over the same repository,
# both checked with cmp; each of RUNS rounds times A, B, cp+sync and dd back to back,
# so all four see the same load; (c) prints the medians and B/A. LOOPS=1: the 1-pass
# case only.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
SIZE_MB="${SIZE_MB:-1024}"
REGION_MB="${REGION_MB:-64}"
LOOPS="${LOOPS:-10}"
RUNS="${RUNS:-3}"
DROP_CACHES="${DROP_CACHES:-0}"
RANDOM_MAP="${RANDOM_MAP:-1}"
BENCH_DIR="${BENCH_DIR:-/var/tmp/cdpd-restore-bench}"

[ "${SKIP_BUILD:-0}" = 1 ] || cargo build --release --bins
BIN="${BIN_DIR:-$ROOT/target/release}" # BIN_DIR: a copy of the binaries (before/after runs)
BIN_B="${BIN_DIR_B:-}"                 # BIN_DIR_B: a second cdpctl, timed interleaved with BIN's
for t in fio cmp python3; do command -v $t >/dev/null || { echo "needs $t" >&2; exit 1; }; done

rm -rf "$BENCH_DIR"
mkdir -p "$BENCH_DIR"
W=$(mktemp -d "$BENCH_DIR/run.XXXXXX")
CDPD=
cleanup() {
    [ -z "$CDPD" ] || kill "$CDPD" 2>/dev/null || true
    wait 2>/dev/null || true
    [ "${KEEP:-0}" = 1 ] || rm -rf "$W"
}
trap cleanup EXIT

U=5d0c3a51-7e2b-4f4a-9a61-0c1d2e3f4a5b
URI="nbd+unix:///vda?socket=$W/run/$U/vda.sock"
echo "== $(date -u +%FT%TZ) commit $(git rev-parse --short HEAD), $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg)" >&2

settle() {
    sync
    if [ "$DROP_CACHES" = 1 ]; then echo 3 >/proc/sys/vm/drop_caches; fi
}
secs() { # command… → elapsed seconds
    local t0 t1
    t0=$(date +%s.%N)
    "$@" >/dev/null
    t1=$(date +%s.%N)
    python3 -c "print(round($t1 - $t0, 3))"
}
median() { python3 -c 'import sys,statistics; print(statistics.median(map(float, sys.argv[1:])))' "$@"; }

echo "== a ${SIZE_MB} MiB disk of random data" >&2
head -c "${SIZE_MB}M" /dev/urandom >"$W/disk.raw"

# One case: a disk with a baseline and $1 passes of 4 KiB random writes over the region.
declare -A T JOURNAL RECORDS
AB_A=() AB_B=() AB_CP=() AB_DD=()
CASES=(1)
[ "$LOOPS" = 1 ] || CASES+=("$LOOPS")
for loops in "${CASES[@]}"; do
    C="$W/case-$loops"
    mkdir -p "$C/repo" "$W/run"
    cp --sparse=never "$W/disk.raw" "$C/disk.raw"
    cat >"$C/cdp.toml" <<EOF
[target.primary]
url = "file://$C/repo"
[policy.default]
targets = ["primary"]
EOF
    mkfifo "$W/ready"
    "$BIN/cdpd" run --vm-uuid $U --vm-name bench --disk "vda=$C/disk.raw" --state-dir "$C/state" \
        --run-dir "$W/run" --ready-fd 3 3>"$W/ready" 2>>"$W/cdpd.log" &
    CDPD=$!
    read -r line <"$W/ready"
    rm -f "$W/ready"
    [ "$line" = READY ] || { cat "$W/cdpd.log"; exit 1; }
    "$BIN/cdpctl" baseline $U --state-dir "$C/state" --run-dir "$W/run" --config "$C/cdp.toml" >&2
    echo "== $loops pass(es) of random 4 KiB writes over ${REGION_MB} MiB" >&2
    fio --name=journal --ioengine=nbd --uri="$URI" --rw=randwrite --bs=4k --iodepth=16 \
        --size="${REGION_MB}m" --loops="$loops" --randrepeat=0 --refill_buffers \
        $([ "$RANDOM_MAP" = 1 ] || echo --norandommap) \
        --output-format=terse >/dev/null
    kill -TERM $CDPD
    wait $CDPD
    CDPD=
    "$BIN/cdp-shipper" run --once --no-auto-baseline --vm-uuid $U --state-dir "$C/state" \
        --run-dir "$W/run" --config "$C/cdp.toml" >/dev/null
    JOURNAL[$loops]=$(du -sb "$C/repo/cdp/v1/vms/$U/vda/journal" | cut -f1)
    restore() { # [cdpctl's directory]
        "${1:-$BIN}/cdpctl" restore $U --disk vda --at latest --output "$C/restored.raw" \
            --repo "file://$C/repo" --no-local --state-dir "$C/state" --config "$C/cdp.toml" --json
    }
    # Once for the numbers and a byte-for-byte check, then the timed runs.
    restore >"$C/restore.json"
    RECORDS[$loops]=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["journal_records"])' "$C/restore.json")
    cmp "$C/restored.raw" "$C/disk.raw" || { echo "restore differs from the image" >&2; exit 1; }
    if [ -n "$BIN_B" ] && [ "$loops" = 1 ]; then
        rm -f "$C/restored.raw"
        restore "$BIN_B" >/dev/null
        cmp "$C/restored.raw" "$C/disk.raw" || { echo "B's restore differs from the image" >&2; exit 1; }
        for r in $(seq "$RUNS"); do
            rm -f "$C/restored.raw"
            settle
            AB_A+=("$(secs restore)")
            rm -f "$C/restored.raw"
            settle
            AB_B+=("$(secs restore "$BIN_B")")
            rm -f "$C/restored.raw"
            settle
            AB_CP+=("$(secs bash -c "cp --sparse=never '$C/disk.raw' '$W/copy.raw' && sync '$W/copy.raw'")")
            rm -f "$W/copy.raw"
            settle
            AB_DD+=("$(secs dd if="$C/disk.raw" of="$W/copy.raw" bs=4M conv=fsync status=none)")
            rm -f "$W/copy.raw"
            echo "   round $r (load $(cut -d' ' -f1 /proc/loadavg)): A ${AB_A[-1]} s, B ${AB_B[-1]} s, cp+sync ${AB_CP[-1]} s, dd ${AB_DD[-1]} s" >&2
        done
    fi
    times=()
    [ "$loops" != 1 ] || times=("${AB_A[@]}")
    [ "${#times[@]}" -gt 0 ] || for _ in $(seq "$RUNS"); do
        rm -f "$C/restored.raw"
        settle
        times+=("$(secs restore)")
    done
    rm -f "$C/restored.raw"
    echo "   restore times: ${times[*]} s" >&2
    T[$loops]=$(median "${times[@]}")
    rm -f "$C/disk.raw"
done

if [ -n "$BIN_B" ]; then
    python3 - "$SIZE_MB" "$(median "${AB_A[@]}")" "$(median "${AB_B[@]}")" "$(median "${AB_CP[@]}")" \
        "$(median "${AB_DD[@]}")" <<'EOF'
import sys
size = int(sys.argv[1])
a, b, cp, dd = map(float, sys.argv[2:6])
mb = size * 2**20 / 1e6
print(f"(c) A/B, interleaved rounds, 1-pass journal, {size} MiB (medians)")
print()
print("| | time | MB/s | / cp+sync | / dd |")
print("|---|---|---|---|---|")
for name, t in (("restore A", a), ("restore B", b), ("cp + sync FILE", cp), ("dd bs=4M conv=fsync", dd)):
    print(f"| {name} | {t:.2f} s | {mb/t:.0f} | {cp/t:.2f}× | {dd/t:.2f}× |")
print()
print(f"B / A: {a/b:.2f}× the throughput; target restore ≥ 0.9× cp+sync")
EOF
fi
[ "$LOOPS" != 1 ] || exit 0

echo "== plain sequential copies of the ${SIZE_MB} MiB raw image" >&2
cps=()
dds=()
for _ in $(seq "$RUNS"); do
    settle
    cps+=("$(secs bash -c "cp --sparse=never '$W/disk.raw' '$W/copy.raw' && sync '$W/copy.raw'")")
    rm -f "$W/copy.raw"
    settle
    dds+=("$(secs dd if="$W/disk.raw" of="$W/copy.raw" bs=4M conv=fsync status=none)")
    rm -f "$W/copy.raw"
done
echo "   cp+sync: ${cps[*]} s; dd conv=fsync: ${dds[*]} s" >&2
CP=$(median "${cps[@]}")
DD=$(median "${dds[@]}")

python3 - "$SIZE_MB" "$REGION_MB" "$LOOPS" "${T[1]}" "${T[$LOOPS]}" "${JOURNAL[1]}" "${JOURNAL[$LOOPS]}" \
    "${RECORDS[1]}" "${RECORDS[$LOOPS]}" "$CP" "$DD" <<'EOF'
import sys
size, region, loops = map(int, sys.argv[1:4])
t1, tn = float(sys.argv[4]), float(sys.argv[5])
j1, jn, r1, rn = map(int, sys.argv[6:10])
cp, dd = float(sys.argv[10]), float(sys.argv[11])
mb = size * 2**20 / 1e6
print(f"(a) restore at latest of a {size} MiB disk, baseline + random 4 KiB writes over {region} MiB")
print()
print("| journal | journal objects | records in the plan | restore time | MB/s |")
print("|---|---|---|---|---|")
print(f"| 1 pass | {j1/1e6:.0f} MB | {r1} | {t1:.2f} s | {mb/t1:.0f} |")
print(f"| {loops} passes | {jn/1e6:.0f} MB | {rn} | {tn:.2f} s | {mb/tn:.0f} |")
print()
print(f"{loops}× longer journal: {tn/t1:.2f}× the time (target ≤ 1.5×)")
print()
print(f"(b) restore vs a plain sequential copy of a {size} MiB raw image")
print()
print("| | time | MB/s | restore / copy |")
print("|---|---|---|---|")
print(f"| restore (1 pass) | {t1:.2f} s | {mb/t1:.0f} | |")
print(f"| cp + sync FILE | {cp:.2f} s | {mb/cp:.0f} | {cp/t1:.2f}× |")
print(f"| dd bs=4M conv=fsync | {dd:.2f} s | {mb/dd:.0f} | {dd/t1:.2f}× |")
print()
print("target ≥ 0.7×")
EOF

#!/usr/bin/env bash
# Benchmark: the shipper.
#
#   bash benches/ship.sh            # defaults below; RUNTIME=20 RATE=50m GB=2 …
#
# 1. Throughput: fio writes GB of 1 MiB blocks through cdpd (shipper stopped), then
#    `cdp-shipper run --once` ships the sealed segments to a file:// target and to a
#    real S3 server on loopback (moto); compared with `cp -r` of the same journal
#    directory (the plain file copy peer).
# 2. RPO under load: fio writes RATE of 64 KiB random writes for RUNTIME seconds
#    while the shipper runs; `cdpctl status --json` is sampled every 100 ms for the
#    disk's rpo_ms (age of the oldest record no target has). Prints p50/p99/max.
# S3=0 skips the S3 target of 1. (no moto needed), RPO=0 skips 2.; ROUNDS=n
# repeats the fill, cp and file:// timings of 1. (medians shown).
# BIN_B=DIR: A/B in one run: each round also ships the same journal with
# DIR/cdp-shipper (before or after BIN_DIR's, alternating), and 2. runs
# once with each (BIN_DIR's first); the load average is printed per round.
# RPO_AGES="1s 500ms": run 2. with each segment_age (set in the policy cdpd
# and the shipper read; "default" = cdpd's built-in one, the default).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
RUNTIME="${RUNTIME:-20}"
RATE="${RATE:-50m}"
GB="${GB:-2}"
BENCH_DIR="${BENCH_DIR:-/var/tmp/cdpd-ship-bench}"
S3="${S3:-1}"
RPO="${RPO:-1}"
ROUNDS="${ROUNDS:-1}"

[ "${SKIP_DEPS:-0}" = 1 ] || bash scripts/install-deps
[ "${SKIP_BUILD:-0}" = 1 ] || cargo build --release --bins
BIN="${BIN_DIR:-$ROOT/target/release}" # BIN_DIR: a copy of the binaries (before/after runs)
[ "$S3" = 0 ] && [ "$RPO" = 0 ] || MOTO="$(bash scripts/s3-server install)"

rm -rf "$BENCH_DIR"
mkdir -p "$BENCH_DIR"
W=$(mktemp -d "$BENCH_DIR/run.XXXXXX")
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$W"
}
trap cleanup EXIT

U=8a3c1f0e-2b4d-4c6e-9f80-1a2b3c4d5e6f
IMG="$W/disk.raw"
# IMAGE=sparse (default: a 4 GiB sparse file, as `qemu-img create -f raw`
# makes) or IMAGE=written (every block written first: the guest's writes
# are overwrites, no block allocation in the image while it runs).
if [ "${IMAGE:-sparse}" = written ]; then
    dd if=/dev/zero of="$IMG" bs=4M count=1024 conv=fsync status=none
else
    truncate -s 4G "$IMG"
fi

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
if [ -n "${MOTO:-}" ]; then
    "$MOTO" -H 127.0.0.1 -p "$port" >"$W/moto.log" 2>&1 &
    PIDS+=($!)
    until curl -s -o /dev/null "http://127.0.0.1:$port/"; do sleep 0.1; done
    curl -s -X PUT "http://127.0.0.1:$port/bench" >/dev/null
fi
export AWS_ACCESS_KEY_ID=bench AWS_SECRET_ACCESS_KEY=bench

cat >"$W/file.toml" <<EOF
[target.primary]
url = "file://$W/repo-file"
[policy.default]
targets = ["primary"]
EOF
cat >"$W/s3.toml" <<EOF
[target.primary]
url = "s3://bench/cdp?endpoint=http://127.0.0.1:$port&region=us-east-1"
[policy.default]
targets = ["primary"]
EOF
mkdir -p "$W/repo-file"

start_cdpd() { # state-dir
    mkfifo "$W/ready"
    "$BIN/cdpd" run --vm-uuid $U --vm-name bench --disk "vda=$IMG" --state-dir "$1" \
        --run-dir "$W/run" --ready-fd 3 3>"$W/ready" 2>>"$W/cdpd.log" &
    CDPD=$!
    read -r line <"$W/ready"
    rm -f "$W/ready"
    [ "$line" = READY ] || { cat "$W/cdpd.log"; exit 1; }
}
URI="nbd+unix:///vda?socket=$W/run/$U/vda.sock"

echo "== 1. throughput: ${GB} GiB of journal" >&2
fill() { # state-dir
    start_cdpd "$1"
    fio --name=fill --ioengine=nbd --uri="$URI" --rw=write --bs=1m --iodepth=8 \
        --size="${GB}g" --output-format=terse >/dev/null 2>&1
    kill -TERM $CDPD
    wait $CDPD
}
secs() { # command… → elapsed seconds
    local t0 t1
    t0=$(date +%s.%N)
    "$@" >/dev/null || return 1
    t1=$(date +%s.%N)
    python3 -c "print(round($t1 - $t0, 3))"
}
median() { python3 -c 'import sys,statistics; print(statistics.median(map(float, sys.argv[1:])))' "$@"; }
ship_file() { # bin-dir state-dir → elapsed seconds
    # SHIP_WRAP: a command prefix for profiling, e.g. "perf record -g -o /tmp/ship.perf --".
    secs ${SHIP_WRAP:-} "$1/cdp-shipper" run --once --no-auto-baseline --vm-uuid $U \
        --state-dir "$2" --run-dir "$W/run" --config "$W/file.toml"
}
cps=(); files=(); files_b=()
for r in $(seq "$ROUNDS"); do
    # A fresh journal each round (the shipper trims what it shipped).
    rm -rf "$W/state" "$W/state-b" "$W/repo-file"/*
    fill "$W/state"
    raw=$(du -sb "$W/state/vms" | cut -f1)
    [ -z "${BIN_B:-}" ] || cp -a "$W/state" "$W/state-b"
    sync
    cps+=("$(secs bash -c "cp -r '$W/state/vms' '$W/cp-copy' && sync")")
    rm -rf "$W/cp-copy"
    sync
    # (The catalog names the segments by path: the second shipper gets the
    # saved copy back in place.)
    again() { rm -rf "$W/repo-file"/* "$W/state"; mv "$W/state-b" "$W/state"; sync; }
    if [ -z "${BIN_B:-}" ]; then
        files+=("$(ship_file "$BIN" "$W/state")")
    elif [ $((r % 2)) = 1 ]; then
        files+=("$(ship_file "$BIN" "$W/state")")
        again
        files_b+=("$(ship_file "$BIN_B" "$W/state")")
    else
        files_b+=("$(ship_file "$BIN_B" "$W/state")")
        again
        files+=("$(ship_file "$BIN" "$W/state")")
    fi
    for v in "${cps[-1]}" "${files[-1]}" ${BIN_B:+"${files_b[-1]}"}; do
        [ -n "$v" ] || { echo "round $r: a command failed" >&2; exit 1; }
    done
    echo "   round $r: cp ${cps[-1]} s, file:// ${files[-1]} s${BIN_B:+, B ${files_b[-1]} s}; load $(cut -d' ' -f1-3 /proc/loadavg)" >&2
done
echo "   cp -r + sync: ${cps[*]} s; ship to file://: ${files[*]} s${BIN_B:+; B: ${files_b[*]} s}" >&2
cp_s=$(median "${cps[@]}")
file_s=$(median "${files[@]}")
s3_s=0
if [ "$S3" = 1 ]; then
    fill "$W/state-s3"
    sync
    s3_s=$(secs "$BIN/cdp-shipper" run --once --no-auto-baseline --vm-uuid $U \
        --state-dir "$W/state-s3" --run-dir "$W/run" --config "$W/s3.toml")
fi
python3 - "$raw" "$cp_s" "$file_s" "$s3_s" "$ROUNDS" <<'EOF'
import sys
raw, cp, f, s3 = int(sys.argv[1]), *map(float, sys.argv[2:5])
print(f"(median of {sys.argv[5]} round(s) for cp and file://)")
mb = raw / 1e6
print(f"| journal bytes | cp -r + sync | ship to file:// | ship to S3 (moto) | file:// / cp |")
print(f"|---|---|---|---|---|")
s3c = f"{mb/s3:.0f} MB/s ({s3:.1f} s)" if s3 > 0 else "not run"
print(f"| {mb:.0f} MB | {mb/cp:.0f} MB/s ({cp:.2f} s) | {mb/f:.0f} MB/s ({f:.2f} s) | {s3c} | {cp/f:.2f}× |")
EOF
if [ -n "${BIN_B:-}" ]; then
    fb=$(median "${files_b[@]}")
    python3 -c "import sys; mb,cp,f=int(sys.argv[1])/1e6,*map(float,sys.argv[2:]); print(f'| B: {mb:.0f} MB | {mb/cp:.0f} MB/s ({cp:.2f} s) | {mb/f:.0f} MB/s ({f:.2f} s) | not run | {cp/f:.2f}× |')" "$raw" "$cp_s" "$fb"
fi
rm -rf "$W/cp-copy" "$W/state-s3" "$W/state" "$W/state-b" "$W/repo-file"/*
[ "$RPO" = 1 ] || exit 0

AGES="${RPO_AGES:-default}" # segment_age values to run 2. with ("default": the built-in one)
rpo_run() { # bin-dir segment_age n
    local bin=$1 age=$2 n=$3 ship fio
    rm -rf "$W/state" "$W/repo-file"/*
    cat >"$W/both.toml" <<EOF
[target.primary]
url = "file://$W/repo-file"
[target.offsite]
url = "s3://bench/rpo$n?endpoint=http://127.0.0.1:$port&region=us-east-1"
[policy.default]
targets = ["primary", "offsite"]
EOF
    [ "$age" = default ] || echo "segment_age = \"$age\"" >>"$W/both.toml"
    mkfifo "$W/ready"
    "$bin/cdpd" run --vm-uuid $U --vm-name bench --disk "vda=$IMG" --state-dir "$W/state" \
        --run-dir "$W/run" --config "$W/both.toml" --ready-fd 3 3>"$W/ready" 2>>"$W/cdpd.log" &
    CDPD=$!
    read -r line <"$W/ready"
    rm -f "$W/ready"
    [ "$line" = READY ] || { cat "$W/cdpd.log"; exit 1; }
    "$bin/cdp-shipper" run --vm-uuid $U --state-dir "$W/state" --run-dir "$W/run" \
        --config "$W/both.toml" --no-auto-baseline 2>>"$W/shipper.log" &
    ship=$!
    PIDS+=($ship)
    fio --name=rpo --ioengine=nbd --uri="$URI" --rw=randwrite --bs=64k --iodepth=4 \
        --rate="$RATE" --size=4g --time_based --runtime="$RUNTIME" --output-format=terse >/dev/null 2>&1 &
    fio=$!
    # One JSON line per sample, parsed after the run (a python3 start per
    # sample cost the machine more CPU than the shipper's wait it measures).
    : >"$W/rpo.jsonl"
    while kill -0 $fio 2>/dev/null; do
        { "$bin/cdpctl" status --vm-uuid $U --run-dir "$W/run" --state-dir "$W/state" --json \
            | tr -d '\n' && echo; } >>"$W/rpo.jsonl" || true
        sleep 0.1
    done
    local load
    load=$(cut -d' ' -f1-3 /proc/loadavg)
    kill -TERM $ship; wait $ship || true
    kill -TERM $CDPD; wait $CDPD
    # Where each segment's time went (the catalog's timestamps): its first
    # and last record, and when each target recorded it shipped.
    sqlite3 -separator ' ' "$W/state/vms/$U/catalog.sqlite" \
        "SELECT s.first_ts_ns, s.last_ts_ns, h.target, h.shipped_ns FROM segments s
         JOIN shipments h USING (vm_uuid, disk, first_seq) ORDER BY s.first_seq" >"$W/segs.txt"
    python3 - "$W/rpo.jsonl" "$RATE" "$RUNTIME" "$bin" "$age" "$load" "$W/segs.txt" <<'EOF'
import json, sys
rows = []
for l in open(sys.argv[1]):
    try:
        d = json.loads(l)["disks"][0]
    except (ValueError, KeyError, IndexError):
        continue
    rows.append((d["rpo_ms"], max([t["lag_ms"] for t in d["targets"]] or [0])))
def pct(v, p):
    v = sorted(v); return v[min(len(v) - 1, int(len(v) * p))] if v else -1
rpo = [r[0] for r in rows]; lag = [r[1] for r in rows]
print(f"| {sys.argv[4]} | {sys.argv[5]} | {sys.argv[2]}B/s for {sys.argv[3]} s | {len(rows)} | {pct(rpo,.5)} ms | {pct(rpo,.99)} ms | {max(rpo)} ms | {pct(lag,.99)} ms | {sys.argv[6]} |")
segs = {}
for l in open(sys.argv[7]):
    first, last, target, shipped = l.split()
    segs.setdefault((int(first), int(last)), {})[target] = int(shipped)
ms = lambda ns: ns // 1_000_000
opened = [ms(l - f) for (f, l) in segs]
fastest = [ms(min(t.values()) - l) for (f, l), t in segs.items()]
per = {n: [ms(t[n] - l) for (f, l), t in segs.items() if n in t] for n in ("primary", "offsite")}
exposed = [ms(min(t.values()) - f) for (f, l), t in segs.items()]
def s(v): return f"{pct(v,.5)} / {pct(v,.99)} / {max(v) if v else -1}"
print(f"|   {len(segs)} segments, p50 / p99 / max: first→last record {s(opened)} ms; last record→shipped: fastest {s(fastest)} ms,"
      f" file:// {s(per['primary'])} ms, S3 {s(per['offsite'])} ms; first record→shipped {s(exposed)} ms |")
EOF
}
echo "== 2. RPO at $RATE of guest writes for ${RUNTIME}s (shipper to file:// and S3)" >&2
echo "| binaries | segment_age | guest writes | samples | RPO p50 | RPO p99 | RPO max | slowest target lag p99 | load |"
echo "|---|---|---|---|---|---|---|---|---|"
n=0
for age in $AGES; do
    for bin in "$BIN" ${BIN_B:+"$BIN_B"}; do
        n=$((n + 1))
        rpo_run "$bin" "$age" $n
    done
done

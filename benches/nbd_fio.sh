#!/usr/bin/env bash
# Benchmark: cdpd (journaling every write) against qemu-nbd and nbdkit's file plugin,
# each serving the SAME raw file on the work disk, driven by fio's nbd engine.
#
#   bash benches/nbd_fio.sh                 # 15 s per workload, 1 GiB file in /var/tmp
#   RUNTIME=5 BENCH_DIR=/srv/x bash benches/nbd_fio.sh
#
# Workloads: 4 KiB random write at iodepth 16, 4 KiB random write at iodepth 1,
# 1 MiB sequential write at iodepth 16. Every server gets a fresh start (and cdpd a fresh,
# empty journal on the same disk) for every workload, after a `sync`.
# Prints a table with IOPS, MB/s and the ratios cdpd/qemu-nbd and cdpd/nbdkit, and
# writes the raw fio JSON and results.json under $BENCH_DIR/out.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD

RUNTIME="${RUNTIME:-15}"
RAMP="${RAMP:-2}"
SIZE_MIB="${SIZE_MIB:-1024}"
BENCH_DIR="${BENCH_DIR:-/var/tmp/cdpd-bench}"
SERVERS="${SERVERS:-cdpd qemu-nbd nbdkit}"
WORKLOADS="${WORKLOADS:-randwrite-4k-qd16 randwrite-4k-qd1 write-1m-qd16}"

case "$(stat -f -c %T "$(dirname "$BENCH_DIR")" 2>/dev/null || echo unknown)" in
tmpfs | ramfs)
    echo "BENCH_DIR=$BENCH_DIR is on tmpfs; put it on a real disk" >&2
    exit 1
    ;;
esac

if [ "${SKIP_DEPS:-0}" != 1 ]; then
    bash scripts/install-deps
fi
if [ "${SKIP_BUILD:-0}" != 1 ]; then
    cargo build --release --bins
fi
CDPD="${CDPD:-$ROOT/target/release/cdpd}"

mkdir -p "$BENCH_DIR"
WORK=$(mktemp -d "$BENCH_DIR/run.XXXXXX")
OUT="$BENCH_DIR/out"
mkdir -p "$OUT"
IMG="$WORK/disk.raw"
SOCK="$WORK/nbd.sock"
SERVER_PID=""

cleanup() {
    stop_server || true
    rm -rf "$WORK"
}
trap cleanup EXIT

echo "== creating $IMG ($SIZE_MIB MiB, fully written so every run overwrites)" >&2
dd if=/dev/zero of="$IMG" bs=1M count="$SIZE_MIB" conv=fsync status=none

VM_UUID=6d0b3a5e-7c4e-4b8e-9d51-2f0c5b8a1e01

start_server() {
    local server=$1
    rm -f "$SOCK"
    case $server in
    cdpd)
        rm -rf "$WORK/state" "$WORK/run"
        mkdir -p "$WORK/state" "$WORK/run"
        local fifo="$WORK/ready"
        rm -f "$fifo"
        mkfifo "$fifo"
        "$CDPD" run --vm-uuid "$VM_UUID" --vm-name bench --disk "vda=$IMG" \
            --state-dir "$WORK/state" --run-dir "$WORK/run" --ready-fd 3 \
            3>"$fifo" 2>"$OUT/cdpd.log" &
        SERVER_PID=$!
        local line=""
        # Blocks until cdpd writes READY (or exits: EOF).
        read -r -t 60 line <"$fifo" || true
        rm -f "$fifo"
        if [ "$line" != READY ]; then
            echo "cdpd did not become ready:" >&2
            cat "$OUT/cdpd.log" >&2
            exit 1
        fi
        URI="nbd+unix:///vda?socket=$WORK/run/$VM_UUID/vda.sock"
        ;;
    qemu-nbd)
        # --fork: the parent exits once the socket listens.
        qemu-nbd -f raw -t -x vda -k "$SOCK" --cache=writeback --aio=threads \
            --discard=unmap --fork --pid-file="$WORK/server.pid" "$IMG"
        SERVER_PID=$(cat "$WORK/server.pid")
        URI="nbd+unix:///vda?socket=$SOCK"
        ;;
    nbdkit)
        # Without -f, nbdkit forks into the background once the socket listens.
        nbdkit -U "$SOCK" -P "$WORK/server.pid" file "$IMG"
        SERVER_PID=$(cat "$WORK/server.pid")
        URI="nbd+unix:///vda?socket=$SOCK"
        ;;
    esac
}

stop_server() {
    [ -n "$SERVER_PID" ] || return 0
    kill -TERM "$SERVER_PID" 2>/dev/null || true
    # Our own child (cdpd) can be waited for; the daemonized ones are polled.
    wait "$SERVER_PID" 2>/dev/null || true
    while kill -0 "$SERVER_PID" 2>/dev/null; do sleep 0.05; done
    SERVER_PID=""
}

fio_args() {
    case $1 in
    randwrite-4k-qd16) echo "--rw=randwrite --bs=4k --iodepth=16 --norandommap --randrepeat=0" ;;
    randwrite-4k-qd1) echo "--rw=randwrite --bs=4k --iodepth=1 --norandommap --randrepeat=0" ;;
    write-1m-qd16) echo "--rw=write --bs=1m --iodepth=16" ;;
    *)
        echo "unknown workload $1" >&2
        exit 1
        ;;
    esac
}

echo "== fio nbd engine, ${RUNTIME}s per run (+${RAMP}s ramp), servers: $SERVERS" >&2
for wl in $WORKLOADS; do
    for server in $SERVERS; do
        sync
        start_server "$server"
        # shellcheck disable=SC2046
        cmd=(fio --name="$wl" --ioengine=nbd --uri="$URI" $(fio_args "$wl")
            --size="${SIZE_MIB}m" --time_based --runtime="$RUNTIME" --ramp_time="$RAMP"
            --output-format=json)
        echo "-- $server $wl: ${cmd[*]}" >&2
        "${cmd[@]}" >"$OUT/$server.$wl.json" 2>"$OUT/$server.$wl.err"
        if [ "$server" = cdpd ]; then
            du -sh "$WORK/state" | awk '{print "   journal: " $1}' >&2
        fi
        stop_server
    done
done

python3 "$ROOT/benches/fio_table.py" "$OUT" "$SERVERS" "$WORKLOADS"

# The facts BENCHMARKS.md records with the numbers.
echo
echo "date:     $(date -u +%Y-%m-%dT%H:%M:%SZ)"
echo "commit:   $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (dirty)')"
echo "machine:  nproc=$(nproc), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //'), kernel $(uname -r)"
echo "disk:     $(findmnt -no SOURCE,FSTYPE -T "$BENCH_DIR" | tr '\n' ' ')"
echo "load avg: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "command:  RUNTIME=$RUNTIME RAMP=$RAMP SIZE_MIB=$SIZE_MIB bash benches/nbd_fio.sh"

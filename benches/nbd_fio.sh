#!/usr/bin/env bash
# Benchmark: cdpd (journaling every write) against its peers, each serving the SAME raw
# file on the work disk, driven by fio's nbd engine, with the disk itself measured in
# the same run.
#
#   bash benches/nbd_fio.sh                                  # full run (see defaults)
#   RUNTIME=3 RAMP=1 ROUNDS=1 SIZE_MIB=256 bash benches/nbd_fio.sh   # a short check
#   SERVERS="cdpd nbdkit" WORKLOADS="write-1m-qd16" bash benches/nbd_fio.sh
#   PRETOUCH_GIB=8 bash benches/nbd_fio.sh                   # guest memory touched before each run (below)
#
# Servers (SERVERS):
#   cdpd      `cdpd run`, journal on the same disk, default settings;
#   qemu-nbd  `qemu-nbd --cache=writeback --aio=threads`;
#   nbdkit    nbdkit's file plugin;
#   qsd-blk   qemu-storage-daemon with the blklogwrites filter (the peer that journals
#             too: every write also appended to a log file; image and log on the same
#             disk), exported over NBD;
#   cdpd-before  cdpd again from the binary $CDPD_BEFORE (an older build, e.g. copied
#             from target/release before a change): before/after in the same run.
# Workloads (WORKLOADS; names are <rw>-<bs>-qd<depth>[-f<N>], -f<N> = fio --fsync=N, a
# FLUSH every N writes as databases do):
#   randwrite-4k-qd16 randwrite-4k-qd1 write-1m-qd16        (the original three)
#   randread-4k-qd1 randread-4k-qd16 read-1m-qd16
#   randwrite-4k-qd16-f$FSYNC randwrite-4k-qd1-f$FSYNC write-1m-qd16-f$FSYNC
# Every server is started fresh for every (workload, round), after a `sync` (cdpd with an
# empty journal, qsd-blk with an empty log). Rounds interleave the servers; the tables
# show the median of ROUNDS.
#
# Next to fio's throughput and latency, per run: the server's CPU seconds (utime+stime
# of the server process from /proc/<pid>/stat, all its threads; sampled after the ramp
# and when fio ends) per GB of guest I/O, the bytes it caused to be written
# (/proc/<pid>/io write_bytes, same window) per guest byte written, and the whole
# device's written sectors (/sys/class/block/<dev>/stat, from the end of the ramp to a
# `sync` after the server stopped: includes writeback of what the ramp dirtied and
# anything else writing to that device) per guest byte written.
#
# The disk is measured first: fio O_DIRECT 1 MiB sequential write bandwidth (libaio,
# iodepth 16) and 4 KiB write + fdatasync latency (psync, iodepth 1), on a file beside
# the image.
#
# Writes the raw fio JSON, counters and results.json under $BENCH_DIR/out; prints the
# tables (benches/fio_table.py) and the machine facts BENCHMARKS.md records.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD

RUNTIME="${RUNTIME:-15}"
RAMP="${RAMP:-2}"
ROUNDS="${ROUNDS:-3}"
SIZE_MIB="${SIZE_MIB:-1024}"
FSYNC="${FSYNC:-16}"
BENCH_DIR="${BENCH_DIR:-/var/tmp/cdpd-bench}"
SERVERS="${SERVERS:-cdpd qemu-nbd nbdkit qsd-blk}"
WORKLOADS="${WORKLOADS:-randwrite-4k-qd16 randwrite-4k-qd1 write-1m-qd16 randread-4k-qd1 randread-4k-qd16 read-1m-qd16 randwrite-4k-qd16-f$FSYNC randwrite-4k-qd1-f$FSYNC write-1m-qd16-f$FSYNC}"
DISK_TEST="${DISK_TEST:-1}"

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
for t in fio python3 $(for s in $SERVERS; do case $s in qemu-nbd) echo qemu-nbd ;; nbdkit) echo nbdkit ;; qsd-blk) echo qemu-storage-daemon ;; esac; done); do
    command -v "$t" >/dev/null || {
        echo "needs $t" >&2
        exit 1
    }
done

mkdir -p "$BENCH_DIR"
WORK=$(mktemp -d "$BENCH_DIR/run.XXXXXX")
OUT="$BENCH_DIR/out"
rm -rf "$OUT"
mkdir -p "$OUT"
IMG="$WORK/disk.raw"
SOCK="$WORK/nbd.sock"
SERVER_PID=""
FIO_PID=""

cleanup() {
    [ -z "$FIO_PID" ] || kill "$FIO_PID" 2>/dev/null || true
    stop_server || true
    rm -rf "$WORK"
}
trap cleanup EXIT

# The block device under BENCH_DIR, for its written-sector counter.
DEV_STAT="/sys/class/block/$(basename "$(findmnt -no SOURCE -T "$BENCH_DIR")")/stat"
[ -r "$DEV_STAT" ] || DEV_STAT=""
dev_written() { # bytes written to the device so far (sectors of 512 bytes)
    if [ -n "$DEV_STAT" ]; then awk '{print $7 * 512}' "$DEV_STAT"; else echo 0; fi
}
TICK=$(getconf CLK_TCK)
cpu_ticks() { # utime+stime of a process, all threads
    sed 's/.*) //' "/proc/$1/stat" | awk '{print $12 + $13}'
}
io_written() { # bytes the process caused to be written to storage
    awk '/^write_bytes:/ {print $2}' "/proc/$1/io"
}

if [ "$DISK_TEST" = 1 ]; then
    echo "== the disk itself (O_DIRECT 1 MiB writes; 4 KiB write + fdatasync)" >&2
    sync
    fio --name=disk-direct-1m --filename="$WORK/direct.dat" --size="${SIZE_MIB}m" \
        --direct=1 --ioengine=libaio --rw=write --bs=1m --iodepth=16 \
        --time_based --runtime="$RUNTIME" --ramp_time="$RAMP" --output-format=json \
        >"$OUT/disk.direct-1m.json" 2>"$OUT/disk.direct-1m.err"
    rm -f "$WORK/direct.dat"
    sync
    fio --name=disk-fdatasync-4k --filename="$WORK/sync.dat" --size=64m \
        --ioengine=psync --rw=write --bs=4k --fdatasync=1 \
        --time_based --runtime="$RUNTIME" --ramp_time="$RAMP" --output-format=json \
        >"$OUT/disk.fdatasync-4k.json" 2>"$OUT/disk.fdatasync-4k.err"
    rm -f "$WORK/sync.dat"
fi

echo "== creating $IMG ($SIZE_MIB MiB, fully written so every run overwrites)" >&2
dd if=/dev/zero of="$IMG" bs=1M count="$SIZE_MIB" conv=fsync status=none

VM_UUID=6d0b3a5e-7c4e-4b8e-9d51-2f0c5b8a1e01

start_server() {
    local server=$1
    rm -f "$SOCK" "$WORK/server.pid"
    case $server in
    cdpd | cdpd-before)
        local bin=$CDPD
        [ "$server" = cdpd ] || bin=${CDPD_BEFORE:?cdpd-before needs CDPD_BEFORE=path of the older cdpd}
        rm -rf "$WORK/state" "$WORK/run"
        mkdir -p "$WORK/state" "$WORK/run"
        local fifo="$WORK/ready"
        rm -f "$fifo"
        mkfifo "$fifo"
        "$bin" run --vm-uuid "$VM_UUID" --vm-name bench --disk "vda=$IMG" \
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
    qsd-blk)
        # The log is a fresh file on the same disk; blklogwrites appends every write
        # (and a log superblock update per FLUSH) to it before the image write.
        rm -f "$WORK/blk.log"
        : >"$WORK/blk.log"
        # --daemonize: the parent exits once the export listens.
        qemu-storage-daemon \
            --blockdev "driver=file,node-name=img,filename=$IMG,aio=threads,cache.direct=off" \
            --blockdev "driver=file,node-name=log,filename=$WORK/blk.log,aio=threads,cache.direct=off" \
            --blockdev "driver=blklogwrites,node-name=blk,file=img,log=log,log-sector-size=4096" \
            --nbd-server "addr.type=unix,addr.path=$SOCK" \
            --export "type=nbd,id=exp,node-name=blk,name=vda,writable=on" \
            --pidfile "$WORK/server.pid" --daemonize
        SERVER_PID=$(cat "$WORK/server.pid")
        URI="nbd+unix:///vda?socket=$SOCK"
        ;;
    *)
        echo "unknown server $server" >&2
        exit 1
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
    local wl=$1 base fs=""
    base=${wl%-f[0-9]*}
    if [ "$base" != "$wl" ]; then
        fs="--fsync=${wl##*-f}"
    fi
    case $base in
    randwrite-4k-qd16) echo "--rw=randwrite --bs=4k --iodepth=16 --norandommap --randrepeat=0 $fs" ;;
    randwrite-4k-qd1) echo "--rw=randwrite --bs=4k --iodepth=1 --norandommap --randrepeat=0 $fs" ;;
    write-1m-qd16) echo "--rw=write --bs=1m --iodepth=16 $fs" ;;
    randread-4k-qd1) echo "--rw=randread --bs=4k --iodepth=1 --norandommap --randrepeat=0" ;;
    randread-4k-qd16) echo "--rw=randread --bs=4k --iodepth=16 --norandommap --randrepeat=0" ;;
    read-1m-qd16) echo "--rw=read --bs=1m --iodepth=16" ;;
    *)
        echo "unknown workload $wl" >&2
        exit 1
        ;;
    esac
}

# PRETOUCH_GIB=N: before every run (every server alike), write N GiB of zeros to a file in
# /dev/shm and remove it, so that the guest memory the run's new page cache will take has
# been touched. On this VM (virtio-balloon/virtio-mem, free pages handed back to the host)
# the first touch of a guest page costs ~1.4 µs (an 8 GiB write to /dev/shm: 11.9 s the
# first time, 4.3 s right after): a server whose writes allocate new page cache (cdpd's
# journal) pays it per 4 KiB, one that overwrites a cached image (nbdkit) does not. A host
# running cdpd on bare metal does not pay it; the tables are printed with and without.
PRETOUCH_GIB="${PRETOUCH_GIB:-0}"
pretouch() {
    [ "$PRETOUCH_GIB" != 0 ] || return 0
    dd if=/dev/zero of=/dev/shm/cdpd-bench-pretouch bs=1M count=$((PRETOUCH_GIB * 1024)) status=none
    rm -f /dev/shm/cdpd-bench-pretouch
}

# One run: fio against a fresh server; counters sampled after the ramp and at the end.
run_one() { # server workload round
    local server=$1 wl=$2 round=$3 tag="$1.$2.$3"
    sync
    pretouch
    start_server "$server"
    # shellcheck disable=SC2046
    local cmd=(fio --name="$wl" --ioengine=nbd --uri="$URI" $(fio_args "$wl")
        --size="${SIZE_MIB}m" --time_based --runtime="$RUNTIME" --ramp_time="$RAMP"
        --output-format=json)
    echo "-- round $round $server $wl: ${cmd[*]}" >&2
    "${cmd[@]}" >"$OUT/$tag.json" 2>"$OUT/$tag.err" &
    FIO_PID=$!
    sleep "$RAMP"
    local c0 w0 d0 c1 w1
    c0=$(cpu_ticks "$SERVER_PID")
    w0=$(io_written "$SERVER_PID")
    d0=$(dev_written)
    wait "$FIO_PID" || {
        echo "fio failed:" >&2
        cat "$OUT/$tag.err" >&2
        exit 1
    }
    FIO_PID=""
    c1=$(cpu_ticks "$SERVER_PID")
    w1=$(io_written "$SERVER_PID")
    if [ "${server%-before}" = cdpd ]; then
        du -sh "$WORK/state" | awk '{print "   journal: " $1}' >&2
    fi
    stop_server
    sync
    cat >"$OUT/$tag.counters" <<EOF
{"cpu_ticks": $((c1 - c0)), "tick": $TICK, "proc_write_bytes": $((w1 - w0)), "dev_write_bytes": $(($(dev_written) - d0))}
EOF
}

echo "== fio nbd engine, ${RUNTIME}s per run (+${RAMP}s ramp), $ROUNDS round(s), servers: $SERVERS" >&2
for wl in $WORKLOADS; do
    for round in $(seq "$ROUNDS"); do
        for server in $SERVERS; do
            run_one "$server" "$wl" "$round"
        done
    done
done

python3 "$ROOT/benches/fio_table.py" "$OUT" "$SERVERS" "$WORKLOADS" "$ROUNDS"

# The facts BENCHMARKS.md records with the numbers.
echo
echo "date:     $(date -u +%Y-%m-%dT%H:%M:%SZ)"
echo "commit:   $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (dirty tree)'), cdpd binary $CDPD${CDPD_BEFORE:+, cdpd-before binary $CDPD_BEFORE}"
echo "machine:  nproc=$(nproc), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //'), $(awk '/MemTotal/ {printf "%.0f GiB RAM", $2/1048576}' /proc/meminfo), kernel $(uname -r)"
echo "disk:     $(findmnt -no SOURCE,FSTYPE -T "$BENCH_DIR" | tr '\n' ' ')"
echo "versions: $(fio --version), $(qemu-nbd --version 2>/dev/null | head -1), $(nbdkit --version 2>/dev/null | head -1), $(qemu-storage-daemon --version 2>/dev/null | head -1)"
echo "load avg: $(cut -d' ' -f1-3 /proc/loadavg) (at the end)"
echo "command:  RUNTIME=$RUNTIME RAMP=$RAMP ROUNDS=$ROUNDS SIZE_MIB=$SIZE_MIB FSYNC=$FSYNC PRETOUCH_GIB=$PRETOUCH_GIB SERVERS=\"$SERVERS\" bash benches/nbd_fio.sh"

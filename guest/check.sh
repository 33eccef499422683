#!/usr/bin/env bash
# Boots the tiny test guest under QEMU (TCG) and checks what it prints and what it writes.
#
#   guest/check.sh [-o OUTDIR] [CHECK...]      (default OUTDIR: target/guest; default: all)
#
# CHECKs:
#   file    64 MiB raw file as -drive if=virtio: serial lines, poweroff, disk == expected
#   nbd     the same disk served by qemu-nbd (export "vda") over a unix socket, -blockdev nbd
#   phases  cdp.phases=5 on a file disk
#   wait    cdp.wait: wait for CDP-MARKER 3, kill QEMU, check markers and disk
#   flush   the disk served by nbdkit with its log filter: each phase's writes are followed
#           by a FLUSH before the next phase's writes (skipped when nbdkit is missing)
#
# Builds the guest (scripts/build-guest, cached) and installs qemu-system-x86 when missing
# (guest/install-qemu-system). Exits non-zero on any mismatch. Env: GUEST_TIMEOUT (s, 120),
# KEEP=1 keeps the work directory, NO_BUILD=1 checks OUTDIR as it is (no build-guest).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=$ROOT/target/guest
if [ "${1:-}" = -o ]; then
    OUT=$2
    shift 2
fi
CHECKS=("$@")
[ "${#CHECKS[@]}" -gt 0 ] || CHECKS=(file nbd phases wait flush)
TIMEOUT=${GUEST_TIMEOUT:-120}
MIB=1048576
DISK_SIZE=$((64 * MIB))

FAILED=()
SUMMARY=()
say() { echo "check: $*" >&2; }
bad() {
    echo "check: FAIL: $*" >&2
    FAILED+=("$*")
}

if [ "${NO_BUILD:-0}" = 1 ]; then
    if [ ! -f "$OUT/vmlinuz" ] || [ ! -f "$OUT/initramfs.gz" ]; then
        say "no guest in $OUT"
        exit 1
    fi
else
    "$ROOT/scripts/build-guest" "$OUT"
fi
"$ROOT/guest/install-qemu-system"
KERNEL=$OUT/vmlinuz
INITRD=$OUT/initramfs.gz

WORK=$(mktemp -d "${TMPDIR:-/tmp}/cdp-guest-check.XXXXXX")
PIDS=()
cleanup() {
    local p
    for p in "${PIDS[@]}"; do
        kill "$p" 2>/dev/null || true
    done
    for p in "${PIDS[@]}"; do
        wait "$p" 2>/dev/null || true
    done
    if [ "${KEEP:-0}" = 1 ]; then
        say "kept $WORK"
    else
        rm -rf "$WORK"
    fi
}
trap cleanup EXIT

QEMU=(qemu-system-x86_64 -accel tcg -machine q35 -m 256 -nographic -no-reboot -nic none
    -kernel "$KERNEL" -initrd "$INITRD")

now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", b - a }'; }

# pattern BYTE SIZE: SIZE bytes of value BYTE on stdout.
pattern() { head -c "$2" /dev/zero | tr '\0' "\\$(printf %03o "$1")"; }
# put IMAGE OFFSET BYTE SIZE
put() { pattern "$3" "$4" | dd of="$1" bs=4096 seek="$2" oflag=seek_bytes conv=notrunc status=none; }

# expected_default IMAGE N: what the default mode writes with cdp.phases=N.
expected_default() {
    truncate -s "$DISK_SIZE" "$1"
    local k
    for ((k = 1; k <= $2; k++)); do
        put "$1" $((k * MIB)) "$k" $MIB
        put "$1" $((16 * MIB + k * 4096)) $((0xA0 + k)) 4096
    done
}
# expected_wait IMAGE K: what cdp.wait writes in phases 1..K.
expected_wait() {
    truncate -s "$DISK_SIZE" "$1"
    local k
    for ((k = 1; k <= $2; k++)); do
        put "$1" $((k % 8 * MIB)) $((k % 250 + 1)) $MIB
    done
}

# lines LOG: the CDP-* lines of a serial log, without CR, uptimes dropped.
lines() {
    tr -d '\r' <"$1" | grep -a -o 'CDP-[A-Z]*.*' | sed -E 's/^(CDP-MARKER [0-9]+) uptime=[0-9]+\.[0-9]+$/\1/' || true
}
# expected_lines N [poweroff]
expected_lines() {
    echo CDP-BOOT
    local k
    for ((k = 1; k <= $1; k++)); do echo "CDP-MARKER $k"; done
    [ "${2:-}" != poweroff ] || echo CDP-DONE
}
# check_lines NAME LOG N [poweroff]
check_lines() {
    local got want
    got=$(lines "$2")
    want=$(expected_lines "$3" "${4:-}")
    if [ "$got" != "$want" ]; then
        bad "$1: serial lines differ (log: $2)"
        diff <(echo "$want") <(echo "$got") | sed 's/^/    /' >&2 || true
        return 1
    fi
    # The marker format, exactly: "CDP-MARKER k uptime=S.SS".
    if tr -d '\r' <"$2" | grep -a '^CDP-MARKER' | grep -avqE '^CDP-MARKER [0-9]+ uptime=[0-9]+\.[0-9]+$'; then
        bad "$1: a marker line is malformed"
        return 1
    fi
}
# check_disk NAME DISK EXPECTED
check_disk() {
    if ! cmp "$2" "$3" >&2; then
        bad "$1: the disk differs from the expected image"
        return 1
    fi
}

# boot NAME APPEND DRIVE-ARGS...: runs QEMU to its end (or the timeout); sets RC and SECS.
boot() {
    local name=$1 append=$2
    shift 2
    local t0
    t0=$(now)
    set +e
    timeout "$TIMEOUT" "${QEMU[@]}" -append "console=ttyS0 quiet panic=-1 $append" "$@" \
        </dev/null >"$WORK/$name.serial" 2>"$WORK/$name.qemu-stderr"
    RC=$?
    set -e
    SECS=$(elapsed "$t0" "$(now)")
    if [ "$RC" -eq 124 ]; then
        bad "$name: QEMU did not exit within ${TIMEOUT}s"
    elif [ "$RC" -ne 0 ]; then
        bad "$name: QEMU exited with $RC: $(head -c 500 "$WORK/$name.qemu-stderr")"
    fi
}

wait_socket() {
    local i
    for ((i = 0; i < 100; i++)); do
        [ -S "$1" ] && return 0
        sleep 0.1
    done
    return 1
}

check_file() {
    local disk=$WORK/file.raw
    truncate -s "$DISK_SIZE" "$disk"
    expected_default "$WORK/expected3.raw" 3
    boot file "" -drive "file=$disk,format=raw,if=virtio"
    check_lines file "$WORK/file.serial" 3 poweroff || true
    check_disk file "$disk" "$WORK/expected3.raw" || true
    SUMMARY+=("file: boot to poweroff ${SECS}s")
}

check_nbd() {
    local disk=$WORK/nbd.raw sock=$WORK/nbd.sock pid
    truncate -s "$DISK_SIZE" "$disk"
    [ -f "$WORK/expected3.raw" ] || expected_default "$WORK/expected3.raw" 3
    qemu-nbd -k "$sock" -f raw -x vda -t "$disk" 2>"$WORK/qemu-nbd.stderr" &
    pid=$!
    PIDS+=("$pid")
    if ! wait_socket "$sock"; then
        bad "nbd: qemu-nbd did not create $sock: $(cat "$WORK/qemu-nbd.stderr")"
        return
    fi
    boot nbd "" -blockdev "{\"driver\":\"nbd\",\"server\":{\"type\":\"unix\",\"path\":\"$sock\"},\"export\":\"vda\",\"node-name\":\"d0\"}" \
        -device virtio-blk-pci,drive=d0
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    check_lines nbd "$WORK/nbd.serial" 3 poweroff || true
    check_disk nbd "$disk" "$WORK/expected3.raw" || true
    SUMMARY+=("nbd: boot to poweroff ${SECS}s")
}

check_phases() {
    local disk=$WORK/phases.raw
    truncate -s "$DISK_SIZE" "$disk"
    expected_default "$WORK/expected5.raw" 5
    boot phases "cdp.phases=5" -drive "file=$disk,format=raw,if=virtio"
    check_lines phases "$WORK/phases.serial" 5 poweroff || true
    check_disk phases "$disk" "$WORK/expected5.raw" || true
    SUMMARY+=("phases (cdp.phases=5): boot to poweroff ${SECS}s")
}

check_wait() {
    local disk=$WORK/wait.raw log=$WORK/wait.serial pid t0 i k next old new stray
    truncate -s "$DISK_SIZE" "$disk"
    : >"$log"
    t0=$(now)
    "${QEMU[@]}" -append "console=ttyS0 quiet panic=-1 cdp.wait" \
        -drive "file=$disk,format=raw,if=virtio" </dev/null >"$log" 2>"$WORK/wait.qemu-stderr" &
    pid=$!
    PIDS+=("$pid")
    for ((i = 0; i < TIMEOUT * 10; i++)); do
        tr -d '\r' <"$log" | grep -aq '^CDP-MARKER 3 ' && break
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    SECS=$(elapsed "$t0" "$(now)")
    k=$(lines "$log" | sed -n 's/^CDP-MARKER \([0-9]*\)$/\1/p' | tail -n 1)
    if [ -z "$k" ] || [ "$k" -lt 3 ]; then
        bad "wait: no CDP-MARKER 3 within ${TIMEOUT}s (log: $log)"
        return
    fi
    check_lines wait "$log" "$k" || true
    # Phases 1..k are complete. Phase k+1 may have started: its region holds the old bytes,
    # the new bytes, or a mix.
    expected_wait "$WORK/expected-wait.raw" "$k"
    next=$(((k + 1) % 8))
    old=$(od -An -tu1 -N1 -j $((next * MIB)) "$WORK/expected-wait.raw" | tr -d ' ')
    new=$(((k + 1) % 250 + 1))
    stray=$(dd if="$disk" bs=$MIB skip="$next" count=1 status=none \
        | tr -d "\\$(printf %03o "$old")\\$(printf %03o "$new")" | wc -c)
    [ "$stray" -eq 0 ] || bad "wait: region $next MiB holds bytes other than $old and $new"
    # Everything else must be exactly as expected: copy the live region into the expected image.
    dd if="$disk" of="$WORK/expected-wait.raw" bs=$MIB skip="$next" seek="$next" count=1 conv=notrunc status=none
    check_disk wait "$disk" "$WORK/expected-wait.raw" || true
    SUMMARY+=("wait (cdp.wait): killed after CDP-MARKER $k, ${SECS}s")
}

check_flush() {
    if ! command -v nbdkit >/dev/null; then
        say "flush: skipped (nbdkit is not installed)"
        SUMMARY+=("flush: skipped, no nbdkit")
        return
    fi
    local disk=$WORK/flush.raw sock=$WORK/nbdkit.sock nlog=$WORK/nbdkit.log pid
    truncate -s "$DISK_SIZE" "$disk"
    [ -f "$WORK/expected3.raw" ] || expected_default "$WORK/expected3.raw" 3
    nbdkit -f -U "$sock" --filter=log file "$disk" logfile="$nlog" 2>"$WORK/nbdkit.stderr" &
    pid=$!
    PIDS+=("$pid")
    if ! wait_socket "$sock"; then
        bad "flush: nbdkit did not create $sock: $(cat "$WORK/nbdkit.stderr")"
        return
    fi
    boot flush "" -blockdev "{\"driver\":\"nbd\",\"server\":{\"type\":\"unix\",\"path\":\"$sock\"},\"export\":\"vda\",\"node-name\":\"d0\"}" \
        -device virtio-blk-pci,drive=d0
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    check_lines flush "$WORK/flush.serial" 3 poweroff || true
    check_disk flush "$disk" "$WORK/expected3.raw" || true
    # Requests in order: each Write belongs to a phase (1 MiB at k MiB, 4 KiB at 16 MiB+k*4K);
    # phases must not interleave, and a Flush must come between a phase's last write and the
    # next phase's first write, and after the last phase.
    local verdict
    verdict=$(awk -v MIB=$MIB '
        function hex(s,   n, i) {
            s = tolower(s); sub(/^0x/, "", s); n = 0
            for (i = 1; i <= length(s); i++) n = n * 16 + index("0123456789abcdef", substr(s, i, 1)) - 1
            return n
        }
        / Write id=/ {
            off = count = -1
            for (i = 1; i <= NF; i++) {
                if ($i ~ /^offset=/) off = hex(substr($i, 8))
                if ($i ~ /^count=/) count = hex(substr($i, 7))
            }
            if (off >= MIB && off + count <= 16 * MIB) { p = int(off / MIB); q = int((off + count - 1) / MIB) }
            else if (off >= 16 * MIB && off + count <= 16 * MIB + 16 * 4096) { p = int((off - 16 * MIB) / 4096); q = int((off + count - 1 - 16 * MIB) / 4096) }
            else { print "write outside the pattern regions: " $0; bad = 1; next }
            if (p != q) { print "write spans two phases: " $0; bad = 1; next }
            if (p < cur) { print "phase " p " written after phase " cur ": " $0; bad = 1 }
            if (p > cur) {
                if (cur > 0 && !flushed) { print "no FLUSH between phase " cur " and phase " p; bad = 1 }
                cur = p
            }
            flushed = 0
            next
        }
        / Flush id=/ { flushed = 1; flushes++ }
        END {
            if (cur != 3) { print "last phase written: " cur ", want 3"; bad = 1 }
            if (!flushed) { print "no FLUSH after the last phase"; bad = 1 }
            if (!bad) print "ok " flushes
        }' "$nlog")
    case "$verdict" in
        ok*) SUMMARY+=("flush: every phase flushed (${verdict#ok } FLUSH requests), boot to poweroff ${SECS}s") ;;
        *) bad "flush: $(echo "$verdict" | tr '\n' ';') (log: $nlog)" ;;
    esac
}

for c in "${CHECKS[@]}"; do
    case "$c" in
        file | nbd | phases | wait | flush)
            say "$c"
            "check_$c"
            ;;
        *)
            echo "check: unknown check $c (file, nbd, phases, wait, flush)" >&2
            exit 2
            ;;
    esac
done

for s in "${SUMMARY[@]}"; do
    say "$s"
done
if [ "${#FAILED[@]}" -gt 0 ]; then
    KEEP=1
    say "${#FAILED[@]} failure(s)"
    exit 1
fi
say "all passed"

#!/usr/bin/env bash
# Benchmark: many protected disks on one host (issue 13, "Scale").
#
#   bash benches/scale.sh                       # N=50 cdpd + 50 cdp-shipper, defaults below
#   N=10 IDLE=10 RUNTIME=10 bash benches/scale.sh   # a short check
#   RATE=2m bash benches/scale.sh               # fio rate-limited per disk instead of flat out
#
# N cdpd processes, each serving one disk (a SIZE_MIB sparse raw image) over NBD with its
# own journal, started standalone as the test harness starts them (`cdpd run --ready-fd`),
# all under one state directory and one run directory as on a host (per-VM subdirectories,
# one catalog per VM). With SHIPPERS=1 (default) each VM also gets its `cdp-shipper run`
# (--follow-pid its cdpd, as cdp-qemu's supervisor starts it; default --poll; a shared
# file:// target; --no-auto-baseline so that 50 first-boot baselines do not run during the
# idle window; they would read 50 images once and then stop).
#
# Measured, per process, from /proc/PID/{status,smaps_rollup,fd,stat}:
#   1. idle: after SETTLE seconds with no I/O, RSS (VmRSS), PSS, USS (Private_*), open
#      descriptors, threads; CPU (utime+stime, all threads) over IDLE seconds, reported as
#      core-seconds per minute, per process and for all N together;
#   2. load: one fio (nbd engine) job per disk, all at once: RW (default randwrite), BS
#      (4k), QD (4) per job, RATE per job (empty: unlimited), RUNTIME seconds after a RAMP.
#      Total throughput, per-disk throughput (min/median/max, Jain's fairness index
#      (sum x)^2 / (n * sum x^2)), per-disk p99 completion latency, RSS in the middle and
#      at the end of the run, the peak RSS (VmHWM), CPU seconds per GB written.
#
# Scratch in BENCH_DIR (default /var/tmp/cdp-scale), removed at the end; results (fio JSON,
# snapshots, results.json) in $BENCH_DIR-out. BIN_DIR: the binaries (default target/release,
# built unless SKIP_BUILD=1).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

N="${N:-50}"
SIZE_MIB="${SIZE_MIB:-256}"
SETTLE="${SETTLE:-5}"
IDLE="${IDLE:-30}"
RW="${RW:-randwrite}"
BS="${BS:-4k}"
QD="${QD:-4}"
RATE="${RATE:-}"
RAMP="${RAMP:-2}"
RUNTIME="${RUNTIME:-30}"
SHIPPERS="${SHIPPERS:-1}"
BENCH_DIR="${BENCH_DIR:-/var/tmp/cdp-scale}"
OUT="${OUT:-$BENCH_DIR-out}"

case "$(stat -f -c %T "$(dirname "$BENCH_DIR")" 2>/dev/null || echo unknown)" in
tmpfs | ramfs)
    echo "BENCH_DIR=$BENCH_DIR is on tmpfs; put it on a real disk" >&2
    exit 1
    ;;
esac
[ "${SKIP_BUILD:-0}" = 1 ] || cargo build --release -p cdpd -p cdp-shipper --bins
BIN="${BIN_DIR:-$ROOT/target/release}" # BIN_DIR: a copy of the binaries (before/after runs)
for t in fio python3 "$BIN/cdpd" "$BIN/cdp-shipper"; do
    command -v "$t" >/dev/null || {
        echo "needs $t" >&2
        exit 1
    }
done
# N servers, N shippers, N fio connections, each a few descriptors.
ulimit -n 65536 2>/dev/null || true

rm -rf "$BENCH_DIR" "$OUT"
mkdir -p "$BENCH_DIR" "$OUT"
W=$BENCH_DIR
CDPDS=()
SHIPS=()
FIO_PID=""
cleanup() {
    [ -z "$FIO_PID" ] || kill "$FIO_PID" 2>/dev/null || true
    for p in "${CDPDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    for p in "${SHIPS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$W"
}
trap cleanup EXIT

uuid() { printf '5ca1e000-0000-4000-8000-%012x' "$1"; }
mkdir -p "$W/state" "$W/run" "$W/img" "$W/repo" "$W/log"
cat >"$W/cdp.toml" <<EOF
[target.primary]
url = "file://$W/repo"
[policy.default]
targets = ["primary"]
EOF

# Snapshot of every process: "snap LABEL" writes $OUT/snap.LABEL.json.
snap() {
    python3 - "$OUT/snap.$1.json" "${CDPDS[*]}" "${SHIPS[*]}" <<'EOF'
import json, os, sys, time
def proc(pid):
    p = f"/proc/{pid}"
    st = {}
    for line in open(f"{p}/status"):
        k, _, v = line.partition(":")
        st[k] = v.split()
    roll = {}
    for line in open(f"{p}/smaps_rollup").readlines()[1:]:
        k, _, v = line.partition(":")
        roll[k] = int(v.split()[0])
    fields = open(f"{p}/stat").read().rsplit(")", 1)[1].split()
    return {
        "pid": pid,
        "rss_kib": int(st["VmRSS"][0]),
        "hwm_kib": int(st["VmHWM"][0]),
        "pss_kib": roll.get("Pss", 0),
        "uss_kib": roll.get("Private_Clean", 0) + roll.get("Private_Dirty", 0),
        "threads": int(st["Threads"][0]),
        "fds": len(os.listdir(f"{p}/fd")),
        "cpu_ticks": int(fields[11]) + int(fields[12]),
    }
out, cdpds, ships = sys.argv[1], sys.argv[2].split(), sys.argv[3].split()
snap = {"t": time.monotonic(), "cdpd": [proc(p) for p in cdpds], "shipper": [proc(p) for p in ships]}
json.dump(snap, open(out, "w"))
EOF
}

echo "== starting $N cdpd (one ${SIZE_MIB} MiB sparse disk each)$([ "$SHIPPERS" = 1 ] && echo " and $N cdp-shipper")" >&2
free_before=$(awk '/MemAvailable/ {print $2}' /proc/meminfo)
t0=$(date +%s.%N)
for i in $(seq "$N"); do
    u=$(uuid "$i")
    img="$W/img/disk$i.raw"
    truncate -s "${SIZE_MIB}M" "$img"
    fifo="$W/ready$i"
    mkfifo "$fifo"
    "$BIN/cdpd" run --vm-uuid "$u" --vm-name "scale$i" --disk "vda=$img" \
        --state-dir "$W/state" --run-dir "$W/run" --config "$W/cdp.toml" --ready-fd 3 \
        3>"$fifo" 2>"$W/log/cdpd$i.log" &
    CDPDS+=($!)
    line=""
    read -r -t 60 line <"$fifo" || true
    rm -f "$fifo"
    [ "$line" = READY ] || {
        echo "cdpd $i did not become ready:" >&2
        cat "$W/log/cdpd$i.log" >&2
        exit 1
    }
    if [ "$SHIPPERS" = 1 ]; then
        "$BIN/cdp-shipper" run --vm-uuid "$u" --state-dir "$W/state" --run-dir "$W/run" \
            --config "$W/cdp.toml" --no-auto-baseline --follow-pid "${CDPDS[-1]}" \
            2>"$W/log/shipper$i.log" &
        SHIPS+=($!)
    fi
done
t1=$(date +%s.%N)
start_s=$(python3 -c "print(round($t1 - $t0, 2))")
echo "   all ready in $start_s s; settling ${SETTLE}s" >&2
sleep "$SETTLE"
free_idle=$(awk '/MemAvailable/ {print $2}' /proc/meminfo)
state_idle_kib=$(du -sk "$W/state" | cut -f1)
load_idle="$(cut -d' ' -f1-3 /proc/loadavg)"

echo "== idle: ${IDLE}s with no I/O (load avg $load_idle)" >&2
snap idle0
sleep "$IDLE"
snap idle1

echo "== load: fio $RW bs=$BS iodepth=$QD${RATE:+ rate=$RATE} x $N disks, ${RUNTIME}s (+${RAMP}s ramp)" >&2
{
    echo "[global]"
    echo "ioengine=nbd"
    echo "rw=$RW"
    echo "bs=$BS"
    echo "iodepth=$QD"
    echo "size=${SIZE_MIB}m"
    echo "time_based"
    echo "runtime=$RUNTIME"
    echo "ramp_time=$RAMP"
    [ -z "$RATE" ] || echo "rate=$RATE"
    for i in $(seq "$N"); do
        echo "[disk$i]"
        echo "uri=nbd+unix:///vda?socket=$W/run/$(uuid "$i")/vda.sock"
    done
} >"$OUT/scale.fio"
fio --output-format=json "$OUT/scale.fio" >"$OUT/fio.json" 2>"$OUT/fio.err" &
FIO_PID=$!
sleep "$RAMP"
snap load0
sleep $((RUNTIME / 2))
snap loadmid
load_mid="$(cut -d' ' -f1-3 /proc/loadavg)"
wait "$FIO_PID" || {
    echo "fio failed:" >&2
    cat "$OUT/fio.err" >&2
    exit 1
}
FIO_PID=""
snap load1
state_load_kib=$(du -sk "$W/state" | cut -f1)
repo_load_kib=$(du -sk "$W/repo" | cut -f1)

echo "== stopping" >&2
t0=$(date +%s.%N)
for p in "${CDPDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
for p in "${CDPDS[@]}"; do wait "$p" || echo "cdpd $p exited with $?" >&2; done
t1=$(date +%s.%N)
stop_s=$(python3 -c "print(round($t1 - $t0, 2))")
CDPDS=()
# The shippers follow their cdpd: they ship what is left and exit.
for p in "${SHIPS[@]}"; do wait "$p" || echo "cdp-shipper $p exited with $?" >&2; done
SHIPS=()

python3 - "$OUT" <<EOF
import json, statistics, sys
out = sys.argv[1]
tick = $(getconf CLK_TCK)
n, idle_s, runtime = $N, $IDLE, $RUNTIME
snap = {k: json.load(open(f"{out}/snap.{k}.json")) for k in ("idle0", "idle1", "load0", "loadmid", "load1")}
text = open(f"{out}/fio.json").read()
fio = json.loads(text[text.find("{"):])  # fio prints "connected" lines first

def col(label, kind, key):
    return [p[key] for p in snap[label][kind]]

def stats(xs):
    return {"min": min(xs), "median": statistics.median(xs), "max": max(xs)} if xs else None

def cpu(kind, a, b):  # per process core-seconds per minute between snapshots a and b
    dt = snap[b]["t"] - snap[a]["t"]
    return [(y["cpu_ticks"] - x["cpu_ticks"]) / tick / dt * 60
            for x, y in zip(snap[a][kind], snap[b][kind])], dt

res = {"n": n, "size_mib": $SIZE_MIB, "start_s": $start_s, "stop_s": $stop_s,
       "mem_available_drop_kib": $free_before - $free_idle,
       "state_kib_idle": $state_idle_kib, "state_kib_after_load": $state_load_kib,
       "repo_kib_after_load": $repo_load_kib,
       "loadavg_idle": "$load_idle", "loadavg_load_mid": "$load_mid",
       "workload": {"rw": "$RW", "bs": "$BS", "qd": $QD, "rate": "$RATE", "runtime": runtime}}
for kind in ("cdpd", "shipper"):
    if not snap["idle1"][kind]:
        continue
    r = {}
    for key in ("rss_kib", "pss_kib", "uss_kib", "threads", "fds"):
        r["idle_" + key] = stats(col("idle1", kind, key))
        r["load_" + key] = stats(col("loadmid", kind, key))
    r["peak_hwm_kib"] = stats(col("load1", kind, "hwm_kib"))
    r["idle_pss_total_kib"] = sum(col("idle1", kind, "pss_kib"))
    c, dt = cpu(kind, "idle0", "idle1")
    r["idle_cpu_core_s_per_min"] = stats(c)
    r["idle_cpu_core_s_per_min_total"] = sum(c)
    r["idle_window_s"] = dt
    c, dt = cpu(kind, "load0", "load1")
    r["load_cpu_core_s_per_min_total"] = sum(c)
    r["load_cpu_s"] = sum(c) * dt / 60
    res[kind] = r

jobs = fio["jobs"]
bw = [j["write"]["bw_bytes"] + j["read"]["bw_bytes"] for j in jobs]
iops = [j["write"]["iops"] + j["read"]["iops"] for j in jobs]
p99 = [max(j[d]["clat_ns"].get("percentile", {}).get("99.000000", 0) for d in ("read", "write")) / 1e6 for j in jobs]
written = sum(j["write"]["io_bytes"] for j in jobs)
res["fio"] = {"total_mb_s": sum(bw) / 1e6, "total_iops": sum(iops),
              "per_disk_mb_s": stats([b / 1e6 for b in bw]),
              "per_disk_iops": stats(iops),
              "jain": sum(bw) ** 2 / (len(bw) * sum(b * b for b in bw)) if any(bw) else 0,
              "per_disk_p99_ms": stats(p99),
              "written_gb": written / 1e9}
if written:
    res["cdpd"]["load_cpu_s_per_gb"] = res["cdpd"]["load_cpu_s"] / (written / 1e9)
json.dump(res, open(f"{out}/results.json", "w"), indent=1)

mib = lambda k: f"{k / 1024:.1f}"
def row(name, s, f=lambda x: f"{x}"):
    print(f"| {name} | {f(s['min'])} | {f(s['median'])} | {f(s['max'])} |")
for kind in ("cdpd", "shipper"):
    if kind not in res:
        continue
    r = res[kind]
    print(f"\n{kind} ×{n}: per process (min / median / max)\n")
    print("| | min | median | max |")
    print("|---|---:|---:|---:|")
    row("RSS idle (MiB)", r["idle_rss_kib"], mib)
    row("PSS idle (MiB)", r["idle_pss_kib"], mib)
    row("USS idle (MiB)", r["idle_uss_kib"], mib)
    row("RSS under load (MiB)", r["load_rss_kib"], mib)
    row("peak RSS, VmHWM (MiB)", r["peak_hwm_kib"], mib)
    row("open descriptors idle", r["idle_fds"])
    row("open descriptors under load", r["load_fds"])
    row("threads idle", r["idle_threads"])
    row("threads under load", r["load_threads"])
    row("idle CPU (core-ms per minute)", r["idle_cpu_core_s_per_min"], lambda x: f"{x * 1000:.0f}")
    print(f"\nall {n} {kind}: idle CPU {r['idle_cpu_core_s_per_min_total']:.2f} core-s per minute "
          f"(over {r['idle_window_s']:.0f} s), PSS {r['idle_pss_total_kib'] / 1024:.0f} MiB; "
          f"under load {r['load_cpu_core_s_per_min_total'] / 60:.2f} cores")
f = res["fio"]
print(f"\nload: fio {res['workload']} on all {n} disks at once\n")
print("| | total | per disk min | median | max |")
print("|---|---:|---:|---:|---:|")
pd = f["per_disk_mb_s"]
print(f"| MB/s | {f['total_mb_s']:.1f} | {pd['min']:.2f} | {pd['median']:.2f} | {pd['max']:.2f} |")
pi = f["per_disk_iops"]
print(f"| IOPS | {f['total_iops']:.0f} | {pi['min']:.0f} | {pi['median']:.0f} | {pi['max']:.0f} |")
pp = f["per_disk_p99_ms"]
print(f"| p99 completion latency (ms) | | {pp['min']:.2f} | {pp['median']:.2f} | {pp['max']:.2f} |")
print(f"\nJain's fairness index {f['jain']:.3f}; {f['written_gb']:.2f} GB written; "
      f"cdpd CPU {res['cdpd'].get('load_cpu_s_per_gb', 0):.2f} s per GB")
print(f"start of all {n}: {res['start_s']} s; stop of all: {res['stop_s']} s; MemAvailable drop after start "
      f"{res['mem_available_drop_kib'] / 1024:.0f} MiB; state dir {res['state_kib_idle'] / 1024:.0f} MiB idle, "
      f"{res['state_kib_after_load'] / 1024:.0f} MiB after load; repository {res['repo_kib_after_load'] / 1024:.0f} MiB")
EOF

echo
echo "date:     $(date -u +%Y-%m-%dT%H:%M:%SZ)"
echo "commit:   $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (dirty tree)'), binaries $BIN"
echo "machine:  nproc=$(nproc), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //'), $(awk '/MemTotal/ {printf "%.0f GiB RAM", $2/1048576}' /proc/meminfo), kernel $(uname -r)"
echo "disk:     $(findmnt -no SOURCE,FSTYPE -T "$BENCH_DIR" | tr '\n' ' ')"
echo "versions: $(fio --version)"
echo "load avg: idle window $load_idle; mid-load $load_mid; end $(cut -d' ' -f1-3 /proc/loadavg)"
echo "command:  N=$N SIZE_MIB=$SIZE_MIB IDLE=$IDLE RW=$RW BS=$BS QD=$QD RATE=$RATE RUNTIME=$RUNTIME SHIPPERS=$SHIPPERS bash benches/scale.sh"
echo "results:  $OUT/results.json"

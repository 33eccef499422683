#!/usr/bin/env python3
"""Summarise the fio JSON files and counters written by benches/nbd_fio.sh.

usage: fio_table.py OUT_DIR "SERVERS" "WORKLOADS" [ROUNDS]
Reads OUT_DIR/<server>.<workload>.<round>.json (fio) and .counters (server CPU ticks,
/proc/<pid>/io write_bytes, device bytes written), and OUT_DIR/disk.*.json (the disk
measured alone). Prints markdown tables of the median over rounds:
  1. per workload and server: IOPS, MB/s, mean and p99 completion latency; then cdpd's
     ratio against each peer (IOPS; for a workload with a FLUSH cadence the FLUSHes are
     not counted in IOPS, the same for every server);
  2. per workload and server: server CPU seconds per GB of guest I/O, and device bytes
     written per guest byte written (the whole device, so noisy on a shared machine).
     FLUSHes per 1000 writes as fio counted them: with --fsync=N at iodepth > 1 fio's
     count differs between servers (not one per N writes), so compare those runs with
     their FLUSH rate in view.
     /proc/<pid>/io write_bytes is kept in results.json only: it counts pages as they
     are dirtied (0 for a page dirty already) and, on kernel 6.18, several GB per
     second for a process calling fdatasync, so it is no measure of disk bytes.
Also writes OUT_DIR/results.json with every round's figures.
"""

import json
import statistics
import sys
from pathlib import Path


def load_json(path: Path):
    text = path.read_text()
    start = text.find("{")  # fio may print warnings before the JSON
    if start < 0:
        raise SystemExit(f"{path}: no JSON in fio output")
    job = json.loads(text[start:])["jobs"][0]
    if job.get("error"):
        raise SystemExit(f"{path}: fio job error {job['error']}")
    return job


def pct(lat: dict, p: str) -> float:
    return lat.get("percentile", {}).get(p, 0) / 1e3


def load_run(path: Path, counters: Path):
    job = load_json(path)
    d = "write" if job["write"]["io_bytes"] > 0 else "read"
    x = job[d]
    r = {
        "dir": d,
        "iops": x["iops"],
        "mb_s": x["bw_bytes"] / 1e6,
        "lat_us": x["clat_ns"]["mean"] / 1e3,
        "p99_us": pct(x["clat_ns"], "99.000000"),
        "guest_bytes": x["io_bytes"],
        "flushes": job.get("sync", {}).get("total_ios", 0),
    }
    if x["total_ios"] > 0:
        r["flushes_per_1k"] = 1000 * r["flushes"] / x["total_ios"]
    if counters.exists():
        c = json.loads(counters.read_text())
        cpu_s = c["cpu_ticks"] / c["tick"]
        r["cpu_s"] = cpu_s
        gb = x["io_bytes"] / 1e9
        r["cpu_s_per_gb"] = cpu_s / gb if gb > 0 else 0.0
        if d == "write" and x["io_bytes"] > 0:
            r["proc_wr_per_byte"] = c["proc_write_bytes"] / x["io_bytes"]
            r["dev_wr_per_byte"] = c["dev_write_bytes"] / x["io_bytes"]
    return r


def med(rows, key):
    v = [r[key] for r in rows if key in r]
    return statistics.median(v) if v else None


def fmt_iops(v: float) -> str:
    return f"{v / 1000:.1f}k" if v >= 1000 else f"{v:.0f}"


def disk_table(out: Path):
    d1, d2 = out / "disk.direct-1m.json", out / "disk.fdatasync-4k.json"
    if not (d1.exists() and d2.exists()):
        return
    w = load_json(d1)["write"]
    s = load_json(d2)
    sync = s.get("sync", {}).get("lat_ns", {})
    wl = s["write"]["clat_ns"]
    print("The disk alone (fio on a file beside the image):")
    print()
    print("| O_DIRECT 1 MiB write, QD16 | 4 KiB write + fdatasync, QD1 |")
    print("|---|---|")
    print(
        f"| {w['bw_bytes'] / 1e6:.0f} MB/s | {s['write']['iops']:.0f} per s; "
        f"fdatasync mean {sync.get('mean', 0) / 1e3:.0f} µs, p99 {pct(sync, '99.000000'):.0f} µs; "
        f"write mean {wl['mean'] / 1e3:.0f} µs |"
    )
    print()


def main() -> None:
    out = Path(sys.argv[1])
    servers = sys.argv[2].split()
    workloads = sys.argv[3].split()
    rounds = int(sys.argv[4]) if len(sys.argv) > 4 else 1
    runs = {}
    for wl in workloads:
        for s in servers:
            rows = []
            for n in range(1, rounds + 1):
                f = out / f"{s}.{wl}.{n}.json"
                if f.exists():
                    rows.append(load_run(f, out / f"{s}.{wl}.{n}.counters"))
            if rows:
                runs.setdefault(wl, {})[s] = rows

    print()
    disk_table(out)
    peers = [p for p in servers if p != "cdpd"] if "cdpd" in servers else []
    print(f"Throughput and completion latency (median of {rounds} round(s)):")
    print()
    print("| workload | " + " | ".join(servers) + "".join(f" | cdpd/{p}" for p in peers) + " |")
    print("|" + "---|" * (1 + len(servers) + len(peers)))
    for wl, row in runs.items():
        cells = []
        for s in servers:
            rs = row.get(s)
            if not rs:
                cells.append("-")
                continue
            cells.append(
                f"{fmt_iops(med(rs, 'iops'))} IOPS, {med(rs, 'mb_s'):.0f} MB/s, "
                f"{med(rs, 'lat_us'):.0f} µs (p99 {med(rs, 'p99_us'):.0f})"
            )
        for p in peers:
            a, b = row.get("cdpd"), row.get(p)
            if a and b and med(b, "iops"):
                cells.append(f"{med(a, 'iops') / med(b, 'iops'):.2f}×")
            else:
                cells.append("-")
        print(f"| {wl} | " + " | ".join(cells) + " |")
    print()
    print("cells: IOPS, MB/s (10^6 bytes/s), mean completion latency (p99), in µs")
    print()
    print("Server CPU and bytes written (median of rounds):")
    print()
    print(
        "| workload | "
        + " | ".join(f"{s} CPU s/GB" for s in servers)
        + " | "
        + " | ".join(f"{s} device bytes/guest byte" for s in servers)
        + " | FLUSHes per 1000 writes ("
        + ", ".join(servers)
        + ") |"
    )
    print("|" + "---|" * (2 + 2 * len(servers)))
    for wl, row in runs.items():
        cpu, wr = [], []
        for s in servers:
            rs = row.get(s)
            c = med(rs, "cpu_s_per_gb") if rs else None
            cpu.append(f"{c:.2f}" if c is not None else "-")
            d = med(rs, "dev_wr_per_byte") if rs else None
            wr.append(f"{d:.2f}" if d is not None else "-")
        fl = []
        for s in servers:
            f = med(row[s], "flushes_per_1k") if row.get(s) else None
            fl.append(f"{f:.0f}" if f else "-")
        print(f"| {wl} | " + " | ".join(cpu) + " | " + " | ".join(wr) + " | " + ", ".join(fl) + " |")
    print()
    (out / "results.json").write_text(json.dumps(runs, indent=2) + "\n")


if __name__ == "__main__":
    main()

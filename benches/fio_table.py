#!/usr/bin/env python3
"""Summarise the fio JSON files written by benches/nbd_fio.sh.

usage: fio_table.py OUT_DIR "SERVERS" "WORKLOADS"
Reads OUT_DIR/<server>.<workload>.json, prints a markdown table with IOPS, MB/s and
mean completion latency per server, and the ratios cdpd/qemu-nbd and cdpd/nbdkit
(IOPS for 4 KiB workloads, bandwidth for the others, which is the same ratio).
Also writes OUT_DIR/results.json.
"""

import json
import sys
from pathlib import Path


def load(path: Path):
    text = path.read_text()
    start = text.find("{")  # fio may print warnings before the JSON
    if start < 0:
        raise SystemExit(f"{path}: no JSON in fio output")
    job = json.loads(text[start:])["jobs"][0]
    if job.get("error"):
        raise SystemExit(f"{path}: fio job error {job['error']}")
    w = job["write"]
    return {
        "iops": w["iops"],
        "mb_s": w["bw_bytes"] / 1e6,
        "lat_us": w["clat_ns"]["mean"] / 1e3,
        "p99_us": w["clat_ns"].get("percentile", {}).get("99.000000", 0) / 1e3,
    }


def fmt_iops(v: float) -> str:
    return f"{v / 1000:.1f}k" if v >= 1000 else f"{v:.0f}"


def main() -> None:
    out = Path(sys.argv[1])
    servers = sys.argv[2].split()
    workloads = sys.argv[3].split()
    results = {}
    for wl in workloads:
        for s in servers:
            f = out / f"{s}.{wl}.json"
            if f.exists():
                results.setdefault(wl, {})[s] = load(f)

    print()
    head = "| workload | " + " | ".join(servers)
    ratios = [p for p in ("qemu-nbd", "nbdkit") if p in servers and "cdpd" in servers]
    head += "".join(f" | cdpd/{p}" for p in ratios) + " |"
    print(head)
    print("|" + "---|" * (1 + len(servers) + len(ratios)))
    for wl, row in results.items():
        cells = []
        for s in servers:
            r = row.get(s)
            cells.append(
                f"{fmt_iops(r['iops'])} IOPS, {r['mb_s']:.0f} MB/s, {r['lat_us']:.0f} µs"
                if r
                else "-"
            )
        for p in ratios:
            if "cdpd" in row and p in row and row[p]["iops"] > 0:
                cells.append(f"{row['cdpd']['iops'] / row[p]['iops']:.2f}×")
            else:
                cells.append("-")
        print(f"| {wl} | " + " | ".join(cells) + " |")
    print()
    print("cells: write IOPS, MB/s (10^6 bytes), mean completion latency")
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()

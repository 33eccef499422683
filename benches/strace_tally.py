#!/usr/bin/env python3
"""Sum the time each thread spent per system call in an `strace -f -T -o FILE` log.

    strace -f -T -p "$(pgrep -x cdpd)" -o /tmp/st.txt   # for a few seconds of a bench
    python3 benches/strace_tally.py /tmp/st.txt

Prints one line per thread: its 7 costliest calls as name:seconds/calls (blocked time
included: `-T` is the time spent in the call). Used for BENCHMARKS.md, "Issue 13: where
the 1 MiB write time goes".
"""
import collections
import re
import sys

tot = collections.defaultdict(lambda: collections.defaultdict(float))
cnt = collections.defaultdict(lambda: collections.defaultdict(int))
pat = re.compile(r"(\d+)\s+(?:<\.\.\. )?(\w+)(?: resumed>|\().*<([\d.]+)>$")
for line in open(sys.argv[1]):
    m = pat.match(line.strip())
    if not m:
        continue
    tid, call, t = m.group(1), m.group(2), float(m.group(3))
    tot[tid][call] += t
    cnt[tid][call] += 1
for tid, calls in tot.items():
    top = sorted(calls.items(), key=lambda x: -x[1])[:7]
    print(tid, " ".join(f"{c}:{t:.2f}s/{cnt[tid][c]}" for c, t in top))

#!/usr/bin/env python3
"""Write the seed corpora (corpus/<target>/seed-*): a few valid encodings of
each object a target parses, so libFuzzer starts behind the magic numbers,
checksums and JSON syntax. Run from fuzz/: `python3 seeds.py` (needs the
`zstd` command for the zstd seeds).

The layouts follow core/src/journal/format.rs (segment header, record header,
seal trailer, 48-byte index entries) and repo/src/format.rs (index object:
magic, u32 JSON length, JSON metadata, u32 frame count, frames, entries,
CRC32). Targets whose first input byte selects a mode (journal_segment,
repo_index: odd = "prefix a valid segment header / IDX_MAGIC and append the
CRC") get seeds in that form: 0x01 followed by the body.
"""
import json, os, struct, subprocess, zlib

CHUNK_SIZE = 1 << 20
FRAME_RAW = 1 << 20
RECORD_MAGIC = 0x52504443
TRAILER_MAGIC = b"CDPSEAL1"
KINDS = {"write": 1, "zero": 2, "trim": 3, "flush": 4, "mark": 5,
         "session_start": 6, "session_end": 7, "gap": 8, "index": 127}
VM = "0b7e3f52-8d7c-4c1e-9a55-2f0c9d1e6a10"
T0 = 1_700_000_000_000_000_000


def write(target, name, data):
    os.makedirs(f"corpus/{target}", exist_ok=True)
    with open(f"corpus/{target}/seed-{name}", "wb") as f:
        f.write(data)


def h(i):
    # A well-formed BLAKE3 hex name (is_chunk_hash: 64 lowercase hex).
    return format(zlib.crc32(bytes([i])), "08x") * 8


def entry(seq, ts, offset, length, payload_pos, kind, flags=0):
    return struct.pack("<QQQQQBB6x", seq, ts, offset, length, payload_pos,
                       KINDS[kind], flags)


def index_body(records, raw_size, object_size):
    meta = {"vm_uuid": VM, "disk": "vda", "first_seq": 10,
            "last_seq": 10 + max(records - 1, 0), "record_base": 9,
            "records": records, "first_ts_ns": T0, "last_ts_ns": T0 + 10**9,
            "raw_size": raw_size, "object_size": object_size,
            "object_blake3": h(0)}
    js = json.dumps(meta, separators=(",", ":")).encode()
    nframes = -(-raw_size // FRAME_RAW)
    out = struct.pack("<I", len(js)) + js + struct.pack("<I", nframes)
    for i in range(nframes):
        out += struct.pack("<QQ", i * FRAME_RAW, i * 1000)
    for i in range(records):
        kind = ["write", "flush", "zero"][i % 3]
        out += entry(10 + i, T0 + i, 4096 * i, 65536 if kind == "zero" else 512,
                     64 + 48 + i * (512 + 48), kind)
    return out


def index_seeds():
    for n, args in enumerate([(0, 0, 0), (3, 2000, 900), (4, (2 << 20) + 7, 5000)]):
        write("repo_index", str(n), b"\x01" + index_body(*args))


def baseline_seeds():
    for n, (size, cs) in enumerate([(0, CHUNK_SIZE), (3 * CHUNK_SIZE + 5, CHUNK_SIZE),
                                   (10_000, 4096)]):
        chunks = [h(i) if i % 2 == 0 else None for i in range(-(-size // cs))]
        b = {"vm_uuid": VM, "disk": "vda", "size": size, "chunk_size": cs,
             "s0": 41, "s1": 57, "started_ns": T0, "finished_ns": T0 + 9 * 10**9,
             "chunks": chunks}
        write("repo_baseline", str(n), json.dumps(b).encode())


def point(seq, marks, why):
    p = {"seq": seq, "ts_ns": T0 + seq}
    if seq % 2 == 0:
        p["until_ns"] = T0 + 100 + seq
    if marks:
        p["marks"] = marks
    if why:
        p["why"] = why
    return p


def manifest_seeds():
    full = {"vm_uuid": VM, "written_ns": T0 + 10**11, "now_ns": T0 + 10**11,
            "any_point_ns": 86_400 * 10**9,
            "thin": [[3_600 * 10**9, 24], [86_400 * 10**9, 7]],
            "window": point(90, [], ["window"]),
            "points": [point(12, ["before-upgrade"], ["mark"]),
                       point(40, [], ["every 1h"])],
            "disks": [{"disk": "vda", "journal_from_seq": 12, "from_ts_ns": 5,
                       "record_base": 11},
                      {"disk": "vdb", "journal_from_seq": 30, "from_ts_ns": 6,
                       "record_base": 29}]}
    empty = dict(full, thin=[], points=[], disks=[])
    write("repo_manifest", "0", json.dumps(full).encode())
    write("repo_manifest", "1", json.dumps(empty).encode())


def vm_json_seeds():
    vm = {"uuid": VM, "name": "web1", "disks": [
        {"name": "vda", "size": 10 << 30,
         "source_path": "/var/lib/libvirt/images/web1.qcow2"},
        {"name": "vdb", "size": 1 << 20, "source_path": "/dev/vg0/web1-data"}]}
    lease = {"holder": "cdpctl restore", "host": "host1", "pid": 4242,
             "created_ns": T0, "expires_ns": T0 + 600 * 10**9,
             "what": "vda at seq:42"}
    write("repo_vm_json", "vm", json.dumps(vm).encode())
    write("repo_vm_json", "lease", json.dumps(lease).encode())
    write("repo_vm_json", "format", b'{"format":"cdp","version":1}')


def zstd(data):
    return subprocess.run(["zstd", "-1", "--check", "-c", "-q"], input=data,
                          stdout=subprocess.PIPE, check=True).stdout


def zstd_seeds():
    data = bytes(i * 7 % 251 for i in range(6000))
    write("repo_zstd_frame", "chunk", zstd(data))
    write("repo_zstd_frame", "segment", zstd(data[:3000]))
    write("repo_zstd_frame", "empty", zstd(b""))


def record(kind, seq, offset, payload, length):
    hdr = struct.pack("<IBBxxQQQQI", RECORD_MAGIC, KINDS[kind], 0, seq, T0 + seq,
                      offset, length, len(payload))
    return hdr + struct.pack("<I", zlib.crc32(hdr + payload)) + payload


def journal_seeds():
    recs = [("session_start", 1, 0, b"", 0), ("write", 2, 4096, b"\xa5" * 512, 512),
            ("zero", 3, 8192, b"", 65536), ("flush", 4, 0, b"", 0)]
    pos = 64  # after the segment header the target prefixes
    body, entries = b"", b""
    for kind, seq, off, payload, length in recs:
        entries += entry(seq, T0 + seq, off, length, pos + 48, kind)
        r = record(kind, seq, off, payload, length)
        body += r
        pos += len(r)
    write("journal_segment", "open", b"\x01" + body)
    seal = record("index", 4, 0, entries, 0)
    t = TRAILER_MAGIC + struct.pack("<QQI", pos, 4, len(recs))
    t += struct.pack("<I", zlib.crc32(t))
    write("journal_segment", "sealed", b"\x01" + body + seal + t)


def nbd_seeds():
    # nbd_request: u64 LE export size, then a 28-byte request
    # (magic 0x25609513, flags u16, type u16, handle u64, offset u64, len u32).
    for n, (kind, off, ln) in enumerate([(0, 0, 4096), (1, 8192, 512), (3, 0, 0)]):
        req = struct.pack(">IHHQQI", 0x25609513, 0, kind, 7, off, ln)
        write("nbd_request", str(n), struct.pack("<Q", 1 << 20) + req)


if __name__ == "__main__":
    index_seeds()
    baseline_seeds()
    manifest_seeds()
    vm_json_seeds()
    zstd_seeds()
    journal_seeds()
    nbd_seeds()

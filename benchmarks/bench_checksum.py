#!/usr/bin/env python
"""Cost of verifying shard member checksums: `IndexSource` reads of every sample of a shard set with
CRC32C verification on vs off, alternating in one run; prints the medians and their ratio.

    .venv/bin/python benchmarks/bench_checksum.py --checksums [--data shards] [--rounds 15]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time


from apt_data.sources.index import open_shards


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="shards", help="shard folder[:split] or index (default: %(default)s)")
    ap.add_argument("--checksums", action="store_true", help="compare verification on vs off (the only mode)")
    ap.add_argument("--rounds", type=int, default=15, help="timed passes of each mode (default: %(default)s)")
    ap.add_argument("--read", default="read_record", choices=["read_record", "read_scores", "read"],
                    help="IndexSource read timed (default: %(default)s)")
    args = ap.parse_args(argv)
    src = open_shards(args.data)
    if src is None:
        ap.error(f"--data {args.data}: not a shard set")
    on, off = dict(src._crc), {}
    if not on:
        ap.error(f"--data {args.data}: its index has no checksum columns")
    read = getattr(src, args.read)
    n = len(src)

    def one_pass(checksums: dict) -> float:
        src._crc = checksums  # the member checksums IndexSource passes to the reader (none: not verified)
        t0 = time.perf_counter()
        for i in range(n):
            read(i)
        return time.perf_counter() - t0

    for checksums in (on, off, on, off):  # warm the page cache
        one_pass(checksums)
    times = {"on": [], "off": []}
    for r in range(args.rounds):
        for mode in (("on", "off") if r % 2 == 0 else ("off", "on")):
            times[mode].append(one_pass(on if mode == "on" else off))
    src._crc = on
    med = {k: statistics.median(v) for k, v in times.items()}
    for k in ("off", "on"):
        print(f"verification {k:3s}: median {med[k] * 1e3:8.2f} ms per pass of {n} samples "
              f"({med[k] / n * 1e6:6.1f} us/sample, {args.rounds} passes, {args.read})")
    print(f"ratio on/off: {med['on'] / med['off']:.4f} ({(med['on'] / med['off'] - 1) * 100:+.2f}%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

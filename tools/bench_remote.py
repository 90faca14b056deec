#!/usr/bin/env python
"""Benchmark: APTLoader reading shards from local disk against the same shards over HTTP, same run.

    python tools/bench_remote.py [--shards shards] [--latency 0.01] [--workers 2] [--epochs 5]
        [--max-tokens 4096] [--inflight 16] [--drop-rate 0] [--cache-dir DIR]

Starts the loopback object store of the tests (tests/http_server.py: Range requests, keep-alive,
``--latency`` seconds slept before every answer) over ``--shards`` in a child process on 127.0.0.1,
then times planned evaluation epochs (``packing="plan"``, ``train=False``: every sample once per
epoch; worker start included) of the loader over the local folder, over
``http://127.0.0.1:PORT/`` with the default requests in flight (``--inflight``, 16), and with none
(one blocking ranged read per sample), alternating, ``--epochs`` passes each after a warm-up
pass. Prints the median images/s of each, their ratio to local disk, the loader's CPU time per
image (main process + workers; not the server's), and the HTTP reader's counters (requests,
retries, bytes, merged reads). With ``--cache-dir`` also HTTP through the local cache
(`open_remote(..., cache_dir=...)`, in a fresh folder under DIR, removed at the end): its first pass
(filling the cache) and its later passes (read from the cache). Target (issue 16): >= 0.8x local disk.
On a machine whose cores are
busy (the server shares them with the loader) images/s varies from pass to pass; the CPU time per
image is steadier.
"""
from __future__ import annotations

import argparse
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from apt_data import APTConfig  # noqa: E402
from apt_data.loader import APTLoader  # noqa: E402
from apt_data.sources import open_remote, open_source  # noqa: E402


def _cpu() -> float:
    """CPU seconds of this process and its finished children (the loader's workers of past epochs;
    the server child is not waited for until the end, so it is not counted)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def timed_epoch(loader: APTLoader) -> tuple[float, float]:
    """(images/s, loader CPU ms per image: main process + workers) of one epoch."""
    t0, c0, n = time.perf_counter(), _cpu(), 0
    for batch, _ in loader:
        n += len(batch.keys)
    wall = time.perf_counter() - t0
    return n / wall, (_cpu() - c0) / n * 1e3


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", default=str(ROOT / "shards"), help="shard folder to serve and read (default: %(default)s)")
    ap.add_argument("--split", default="train", help="index to read (default: %(default)s)")
    ap.add_argument("--latency", type=float, default=0.01, help="seconds per request (default: %(default)s)")
    ap.add_argument("--drop-rate", type=float, default=0.0, help="share of requests failed (default: %(default)s)")
    ap.add_argument("--workers", type=int, default=2, help="loader workers (default: %(default)s)")
    ap.add_argument("--epochs", type=int, default=5, help="timed passes per loader (default: %(default)s)")
    ap.add_argument("--max-tokens", type=int, default=4096, help="batch budget (default: %(default)s)")
    ap.add_argument("--inflight", type=int, default=16, help="HTTP requests in flight per worker (default: %(default)s)")
    ap.add_argument("--cache-dir", help="also time HTTP through a local cache in a fresh folder under this one")
    a = ap.parse_args(argv)

    if a.cache_dir:
        Path(a.cache_dir).mkdir(parents=True, exist_ok=True)
    cache = tempfile.mkdtemp(prefix="bench-cache-", dir=a.cache_dir) if a.cache_dir else None
    server = subprocess.Popen([sys.executable, str(ROOT / "tests" / "http_server.py"), a.shards, "--latency",
                               str(a.latency), "--drop-rate", str(a.drop_rate)], stdout=subprocess.PIPE, text=True)
    try:
        url = server.stdout.readline().strip()
        sources = {"local disk": open_source(f"{a.shards}:{a.split}"),
                   f"http, {a.inflight} in flight": open_remote(url, split=a.split, inflight=a.inflight),
                   "http, 0 in flight": open_remote(url, split=a.split, inflight=0)}
        if cache:
            sources["http, cached epochs"] = open_remote(url, split=a.split, inflight=a.inflight, cache_dir=cache,
                                                         cache_size="100GB")
        loaders = {k: APTLoader(s, APTConfig(), max_tokens=a.max_tokens, num_workers=a.workers, train=False,
                                packing="plan", seed=0) for k, s in sources.items()}
        times: dict[str, list] = {k: [] for k in loaders}
        for e in range(a.epochs + 1):
            for k, loader in loaders.items():
                loader.set_epoch(e)
                result = timed_epoch(loader)
                if e:  # the first pass warms up
                    times[k].append(result)
                elif k == "http, cached epochs":  # ... and fills the cache: its own row
                    times["http, cache filling (first epoch)"] = [result]
        print(f"{len(sources['local disk'])} images from {a.shards} ({a.split}), {a.workers} workers, "
              f"max_tokens {a.max_tokens}, HTTP latency {a.latency * 1e3:.0f} ms per request, "
              f"median of {a.epochs} planned epochs")
        print("| source | images/s | vs local disk | CPU ms/image (loader) | images/s per pass |")
        print("|---|---|---|---|---|")
        base = statistics.median(x for x, _ in times["local disk"])
        for k, v in times.items():
            med = statistics.median(x for x, _ in v)
            cpu = statistics.median(c for _, c in v)
            print(f"| {k} | {med:.0f} | {med / base:.2f}x | {cpu:.2f} | {', '.join(f'{x:.0f}' for x, _ in v)} |")
        for k, s in sources.items():
            if hasattr(s, "io_stats"):
                print(f"{k}: {s.io_stats()}")
    finally:
        server.terminate()
        server.wait()
        if cache:
            shutil.rmtree(cache, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

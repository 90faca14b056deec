#!/usr/bin/env python
"""Benchmark: APTLoader reading shards from local disk against the same shards over HTTP, same run.

    python benchmarks/bench_remote.py [--shards shards] [--latency 0.01] [--workers 2] [--epochs 5]
        [--max-tokens 4096] [--inflight 16] [--drop-rate 0] [--pipelines eval train] [--cache-dir DIR]
    python benchmarks/bench_loader.py --remote --source shards ...   # the same (--source: --shards)

Starts the loopback object store of the tests (tests/http_server.py: Range requests, keep-alive,
``--latency`` seconds waited before every answer) over ``--shards`` in a child process on 127.0.0.1,
then times two pipelines (``--pipelines``), each over the local folder, over
``http://127.0.0.1:PORT/`` with the default requests in flight (``--inflight``, 16), and with none
(one blocking ranged read per sample):

- ``eval``: planned evaluation epochs (``packing="plan"``, ``train=False``, the index's stored scores:
  the cheapest work per image, so the one where reading costs the most in proportion);
- ``train``: the trainer's augmented epochs (RandomResizedCrop + flip + RandAugment + random erasing,
  scored after the augmentation, ``packing="stream"``, shuffled: one request per sample).

The loaders alternate, ``--epochs`` passes each after a warm-up pass (worker start included).
Prints the median images/s of each, its ratio to local disk in the same pipeline, the loader's CPU
time per image (main process + workers) and the server's (a real object store does not run on the
loader's cores; this one does), and the HTTP reader's counters (requests, retries, bytes, merged
reads). With ``--cache-dir`` also HTTP through the local cache (`open_remote(..., cache_dir=...)`, in
a fresh folder under DIR, removed at the end; eval only): its first pass (filling the cache) and its
later passes (read from the cache). ``--client-cpu N`` first prints the HTTP client's CPU per ranged
read (N sequential reads, the server idle otherwise). With ``--baseline-client FILE`` also HTTP through another client
module (one with the old ``HTTPRanges(headers).get(url, start, end)`` interface, e.g. the hand-written
HTTP/1.1 client that urllib3 replaced: ``git show f59d2e3:apt_data/sources/http.py > /tmp/old_http.py``)
under the same read-ahead and retries, alternating with the others. Target (issue 16): >= 0.8x local disk. On a machine whose cores
are busy images/s varies from pass to pass; the CPU times per image are steadier.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

from apt_data import APTConfig
from apt_data.loader import APTLoader
from apt_data.sources import open_remote, open_source
from bench_common import ROOT, CpuClock


#: the loaders timed: planned evaluation epochs, and the trainer's augmented streamed epochs
PIPELINES = {"eval": "eval (resize only, planned)", "train": "training (augmented, streamed)"}


def _cpu_of(pid: int) -> float:
    """CPU seconds (user + system) of process ``pid`` so far (Linux /proc; 0 elsewhere)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def timed_epoch(loader: APTLoader, server_pid: int) -> tuple[float, float, float]:
    """(images/s, loader CPU ms per image: main process + workers, the server's CPU ms per image) of one epoch."""
    clock = CpuClock()  # this process and its children, live (kept workers, the server) or finished
    clock.start()
    t0, s0, n = time.perf_counter(), _cpu_of(server_pid), 0
    for batch, _ in loader:
        n += len(batch.keys)
    wall = time.perf_counter() - t0
    server = _cpu_of(server_pid) - s0
    return n / wall, (clock.stop() - server) / n * 1e3, server / n * 1e3


def _baseline_reader(path: str):
    """A range reader over ``HTTPRanges`` of the module file ``path`` (the old client's interface)."""
    import importlib.util

    from apt_data.sources import RangeReader

    spec = importlib.util.spec_from_file_location("baseline_http", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    class Baseline(RangeReader):
        def __init__(self):
            self.http = module.HTTPRanges()

        def read(self, name, start, end):
            return self.http.get(name, start, end)

        def read_all(self, name):
            return self.http.get(name)

    return Baseline()


def _baseline_source(path: str, url: str, split: str, inflight: int):
    """`open_remote` with the plain HTTP reader replaced by `_baseline_reader` (the workers fork)."""
    import apt_data.sources.remote as remote

    plain = remote._base_reader
    remote._base_reader = lambda *_: _baseline_reader(path)
    try:
        return open_remote(url, split=split, inflight=inflight)
    finally:
        remote._base_reader = plain


def client_cpu(url: str, shards: str, split: str, baseline: Optional[str], n: int) -> None:
    """Print each client's CPU per ranged read of 20 kB: ``n`` sequential reads at random offsets of
    the split's first shard (no read-ahead, no loader; best of 3 rounds, the clients alternating)."""
    import random

    from apt_data.sources.http import HTTPReader

    name = open_source(f"{shards}:{split}").span(0)[0]
    size = os.path.getsize(name)
    target = f"{url.rstrip('/')}/{os.path.basename(name)}"
    rng = random.Random(0)
    spans = [(s, s + 20_000) for s in (rng.randrange(max(1, size - 20_000)) for _ in range(n))]
    readers = {"urllib3 reader": HTTPReader()}
    if baseline:
        readers["baseline client"] = _baseline_reader(baseline)
    best = {k: float("inf") for k in readers}
    for _ in range(3):
        for k, r in readers.items():
            r.read(target, 0, 10)  # connected
            t0 = time.process_time()
            for start, end in spans:
                r.read(target, start, end)
            best[k] = min(best[k], (time.process_time() - t0) / n * 1e3)
    print(f"client CPU per ranged read of 20 kB ({n} sequential reads, best of 3): "
          + ", ".join(f"{k} {v:.3f} ms" for k, v in best.items()))


def _sources(a: argparse.Namespace, pipeline: str, url: str, cache: Optional[str]) -> dict:
    """The sources timed in ``pipeline``: local disk, HTTP with and without read-ahead, and as asked the
    baseline client and (evaluation) the cache."""
    sources = {"local disk": open_source(f"{a.shards}:{a.split}"),
               f"http, {a.inflight} in flight": open_remote(url, split=a.split, inflight=a.inflight),
               "http, 0 in flight": open_remote(url, split=a.split, inflight=0)}
    if a.baseline_client:
        sources[f"http, baseline client, {a.inflight} in flight"] = _baseline_source(
            a.baseline_client, url, a.split, a.inflight)
    if cache and pipeline == "eval":
        sources["http, cached epochs"] = open_remote(url, split=a.split, inflight=a.inflight, cache_dir=cache,
                                                     cache_size="100GB")
    return sources


def _loader_kw(pipeline: str) -> dict:
    if pipeline == "eval":  # resize only, planned from the index's exact counts (stored scores)
        return dict(train=False, packing="plan")
    # what the trainer runs: augmented, scored after the augmentation, streamed by real counts
    from bench_fill import augmented_transform

    return dict(transform=augmented_transform(224), packing="stream")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", "--source", default=str(ROOT / "shards"),
                    help="shard folder to serve and read (default: %(default)s)")
    ap.add_argument("--split", default="train", help="index to read (default: %(default)s)")
    ap.add_argument("--latency", type=float, default=0.01, help="seconds per request (default: %(default)s)")
    ap.add_argument("--drop-rate", type=float, default=0.0, help="share of requests failed (default: %(default)s)")
    ap.add_argument("--workers", type=int, default=2, help="loader workers (default: %(default)s)")
    ap.add_argument("--epochs", type=int, default=5, help="timed passes per loader (default: %(default)s)")
    ap.add_argument("--max-tokens", type=int, default=4096, help="batch budget (default: %(default)s)")
    ap.add_argument("--inflight", type=int, default=16, help="HTTP requests in flight per worker (default: %(default)s)")
    ap.add_argument("--pipelines", nargs="+", choices=list(PIPELINES), default=list(PIPELINES),
                    help="loaders to time (default: both)")
    ap.add_argument("--cache-dir", help="also time HTTP through a local cache in a fresh folder under this one")
    ap.add_argument("--baseline-client", metavar="FILE",
                    help="also time HTTP through the HTTPRanges class of this module file (see above)")
    ap.add_argument("--client-cpu", type=int, default=0, metavar="N",
                    help="also print each client's CPU per ranged read, over N sequential reads")
    a = ap.parse_args(argv)

    if a.cache_dir:
        Path(a.cache_dir).mkdir(parents=True, exist_ok=True)
    cache = tempfile.mkdtemp(prefix="bench-cache-", dir=a.cache_dir) if a.cache_dir else None
    server = subprocess.Popen([sys.executable, str(ROOT / "tests" / "http_server.py"), a.shards, "--latency",
                               str(a.latency), "--drop-rate", str(a.drop_rate)], stdout=subprocess.PIPE, text=True)
    try:
        url = server.stdout.readline().strip()
        if a.client_cpu:
            client_cpu(url, a.shards, a.split, a.baseline_client, a.client_cpu)
            if a.epochs == 0:  # only that
                return 0
        times: dict[tuple[str, str], list] = {}
        runs, counters = {}, {}
        for pipeline in a.pipelines:
            for k, src in _sources(a, pipeline, url, cache).items():
                runs[pipeline, k] = APTLoader(src, APTConfig(), max_tokens=a.max_tokens, num_workers=a.workers,
                                              seed=0, **_loader_kw(pipeline))
                if k == "http, cached epochs":
                    times[pipeline, "http, cache filling (first epoch)"] = []
                times[pipeline, k] = []
                if src.io_stats():  # the remote readers' counters (local files count nothing)
                    counters[pipeline, k] = src
        for e in range(a.epochs + 1):
            for (pipeline, k), loader in runs.items():
                loader.set_epoch(e)
                result = timed_epoch(loader, server.pid)
                if e:  # the first pass warms up
                    times[pipeline, k].append(result)
                elif k == "http, cached epochs":  # ... and fills the cache: its own row
                    times[pipeline, "http, cache filling (first epoch)"].append(result)
        n = len(open_source(f"{a.shards}:{a.split}"))
        print(f"{n} images from {a.shards} ({a.split}), {a.workers} workers, max_tokens {a.max_tokens}, HTTP latency "
              f"{a.latency * 1e3:.0f} ms per request, median of {a.epochs} epochs after a warm-up; the server (the "
              f"stand-in for the object store) runs on the same {os.cpu_count()} cores")
        print("| pipeline | source | images/s | vs local disk | CPU ms/image (loader) | CPU ms/image (server) "
              "| images/s per pass |")
        print("|---|---|---|---|---|---|---|")
        for (pipeline, k), v in times.items():
            base = statistics.median(x[0] for x in times[pipeline, "local disk"])
            med, cpu, srv = (statistics.median(x[j] for x in v) for j in range(3))
            print(f"| {PIPELINES[pipeline]} | {k} | {med:.0f} | {med / base:.2f}x | {cpu:.2f} | {srv:.2f} | "
                  f"{', '.join(f'{x[0]:.0f}' for x in v)} |")
        for (pipeline, k), src in counters.items():
            print(f"{pipeline}, {k}: {src.io_stats()}")
    finally:
        server.terminate()
        server.wait()
        if cache:
            shutil.rmtree(cache, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

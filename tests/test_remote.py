"""Shards read by byte range from URLs (`apt_data.sources.remote`), over a loopback HTTP server
(tests/http_server.py) with injected latency and failures, over ``file://``, against local disk."""
from __future__ import annotations

import pickle
import sys
from pathlib import Path

import pytest
import torch

from apt_data import APTConfig  # noqa: E402
from apt_data.loader import APTLoader  # noqa: E402
from apt_data.shards import ShardDataError  # noqa: E402
from apt_data.sources import IndexSource, ReadAhead, has_split, open_remote, open_source  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from http_server import RangeServer  # noqa: E402

SHARDS = Path(__file__).resolve().parents[1] / "shards"


def epoch(source, **kw):
    """One planned evaluation epoch as comparable values (tensors copied: the workers reuse slots)."""
    loader = APTLoader(source, APTConfig(), max_tokens=4096, num_workers=2, seed=1, train=False, packing="plan",
                       **kw)
    out = [(b.keys, b.seqlens, b.image_sizes, [t.clone() for t in (*b.pixels, *b.coords, b.labels)])
           for b, _ in loader]
    return out, loader


def assert_same(got, want):
    assert len(got) == len(want)
    for (ka, sa, ia, ta), (kb, sb, ib, tb) in zip(got, want):
        assert ka == kb and sa == sb and ia == ib
        assert all(torch.equal(x, y) for x, y in zip(ta, tb))


@pytest.fixture(scope="module")
def local_epoch():
    return epoch("shards")[0]


def test_http_and_file_urls_give_the_batches_of_local_disk(local_epoch):
    with RangeServer(SHARDS, latency=(0.005, 0.02)) as srv:
        got, loader = epoch(srv.url())
        assert isinstance(loader.source, IndexSource) and isinstance(loader.source.reader, ReadAhead)
        stats = loader.source.io_stats()
    assert_same(got, local_epoch)
    assert stats["failed"] == 0 and stats["requests"] >= 1 and srv.ranged >= stats["requests"] - stats["merged"] - 1
    # an unshuffled plan reads runs of samples lying next to each other: the read-ahead merges them
    assert stats["requests"] + stats["merged"] >= 400 and stats["requests"] <= 400 / 4, stats
    pytest.importorskip("fsspec")
    got, _ = epoch(SHARDS.as_uri())  # file:///.../shards
    assert_same(got, local_epoch)


def test_transient_failures_are_retried_and_every_sample_comes_once(local_epoch):
    with RangeServer(SHARDS, latency=0.005, drop_rate=0.05, seed=3) as srv:
        got, loader = epoch(srv.url(), strict=True)
        stats = loader.source.io_stats()
    assert_same(got, local_epoch)
    keys = [k for b in got for k in b[0]]
    assert sorted(keys) == sorted(loader.source.keys) and len(keys) == 400
    # every 503 is retried by the source
    assert srv.dropped["503"] > 0 and stats["retries"] >= srv.dropped["503"] and stats["failed"] == 0
    assert loader.stats.num_skipped == 0


def test_a_missing_shard_is_a_counted_skip_per_sample_or_raises_when_strict(local_epoch):
    with RangeServer(SHARDS, missing={"train-000002.tar"}) as srv:
        got, loader = epoch(srv.url(), max_skip_fraction=1.0)
        src = loader.source
        lost = {k for k, i in zip(src.keys, src._shard_of) if src._shard_names[i] == "train-000002.tar"}
        assert len(lost) == 100
        assert loader.stats.num_skipped == 100 and set(loader.stats.skipped_keys) == lost
        assert src.io_stats()["retries"] == 0  # a 404 is not retried
        assert sorted(k for b in got for k in b[0]) == sorted(set(src.keys) - lost)
        with pytest.raises(ValueError, match="train-000002.tar"):
            epoch(srv.url(), strict=True)
        with pytest.raises(ShardDataError, match="unreadable_shard"):
            src.read(next(i for i, k in enumerate(src.keys) if k in lost))


def test_addresses_readahead_merging_and_pickling():
    local = open_source("shards")
    with RangeServer(SHARDS) as srv:
        pattern = open_source(srv.url("train-{000001..000002}.tar"))
        assert len(pattern) == 200 and set(pattern._shard_names) == {"train-000001.tar", "train-000002.tar"}
        val = open_remote(srv.url(), split="val")
        assert len(val) == 100 and len(open_source(srv.url("val.parquet"))) == 100
        apart = open_remote(srv.url("train-000003.tar"), index=str(SHARDS / "train.parquet"))
        assert len(apart) == 100
        src = open_source(srv.url())
        src.prefetch(range(0, 12))  # samples 0..11: in one shard, next to each other -> one request
        for i in range(12):
            assert src.read_scores(i)[0] == local.read_scores(i)[0]
        st = src.io_stats()
        assert st["merged"] >= 10 and st["requests"] <= 3
        clone = pickle.loads(pickle.dumps(src))  # no open filesystem or threads travel
        assert clone.read(5) == local.read(5)
        # the val split beside the train index, as for a local folder (`--data URL` finds it)
        assert has_split(srv.url(), "val") and has_split(srv.url() + ":val", "val") and not has_split(srv.url(), "test")
        assert len(open_source(srv.url() + ":val")) == 100
    assert has_split("shards", "val") and not has_split("shards", "test")


def test_the_read_ahead_and_the_retries_wrap_any_reader(tmp_path):
    """The layers are readers over readers: local files read ahead by a thread pool, with the counters."""
    from apt_data.shards import read_index
    from apt_data.sources import FileReader, Retrying

    local = open_source("shards")
    src = IndexSource(read_index(SHARDS), reader=ReadAhead(Retrying(FileReader()), inflight=4))
    order = list(range(399, -1, -1))  # backwards: each chunk read ahead is sorted and merged
    src.read_order(order)
    assert all(src.read_scores(i)[0] == local.read_scores(i)[0] for i in order)
    st = src.io_stats()
    assert st["requests"] + st["merged"] >= len(order) and st["requests"] < len(order) and st["failed"] == 0


def test_bench_remote_prints_local_and_http_in_one_run(tmp_path):
    import subprocess

    # benchmarks/bench_loader.py --remote: benchmarks/bench_remote.py
    r = subprocess.run([sys.executable, str(SHARDS.parent / "benchmarks" / "bench_loader.py"), "--remote", "--split", "val",
                        "--epochs", "1", "--latency", "0.005", "--cache-dir", str(tmp_path)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [line.split(" | ") for line in r.stdout.splitlines() if line.startswith("| ") and "images/s" not in line]
    sources = ["local disk", "http, 16 in flight", "http, 0 in flight"]
    assert [row[1] for row in rows] == [*sources, "http, cache filling (first epoch)", "http, cached epochs", *sources]
    assert [row[0] for row in rows] == ["| eval (resize only, planned)"] * 5 + ["| training (augmented, streamed)"] * 3
    assert all(row[3] == "1.00x" and float(row[5]) == 0 for row in rows if row[1] == "local disk")
    assert all(float(row[5]) >= 0 for row in rows)  # the server's CPU (in clock ticks: 0 for a short pass)
    assert r.stdout.count("'failed': 0") == 5 and "'cache_hits': 100" in r.stdout
    assert not list(tmp_path.iterdir())  # the bench's cache folder is removed


def test_a_server_ignoring_range_is_logged_once_over_all_workers(local_epoch, capfd):
    """The loader's workers share the source's counters: the first answer without Range support is
    logged once for the whole loader (not per worker or per read), and the batches are those of local disk."""
    import logging

    handler = logging.StreamHandler()  # on fd 2: the forked workers inherit it, capfd sees their lines
    logger = logging.getLogger("apt_data.sources")
    logger.addHandler(handler)
    propagate, logger.propagate = logger.propagate, False  # this handler's lines only (not a command's root one)
    try:
        with RangeServer(SHARDS, ignore_range=True) as srv:
            got, loader = epoch(srv.url())
            stats = loader.source.io_stats()
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate
    assert_same(got, local_epoch)
    assert stats["range_ignored"] == stats["requests"] > 10 and stats["failed"] == 0
    assert capfd.readouterr().err.count("ignores HTTP Range") == 1


def test_a_span_served_elsewhere_does_not_cancel_its_merged_neighbours():
    """A cache hit inside a merged read-ahead (``passed``) leaves the read its neighbours wait on."""
    import threading

    from apt_data.sources import FileReader, RangeReader

    class Gated(RangeReader):  # the first read waits for the gate: the second stays queued
        def __init__(self):
            self.gate, self.plain = threading.Event(), FileReader()

        def read(self, name, start, end):
            self.gate.wait(30)
            return self.plain.read(name, start, end)

    local = open_source("shards")
    inner = Gated()
    reader = ReadAhead(inner, inflight=1)
    first, second = [local.span(i) for i in range(4)], [local.span(i) for i in range(100, 104)]
    assert first[0][0] != second[0][0]  # two shards: two merged reads, the second queued behind the first
    reader.prefetch(first + second)
    reader.passed(second[1])  # served elsewhere
    inner.gate.set()
    for s in first + second[:1] + second[2:]:
        assert reader.read(*s) == FileReader().read(*s)

"""The local cache of remote byte ranges (`apt_data.sources.cache`, ``open_remote(..., cache_dir=...)``):
a second epoch reads no shard bytes from the store, the size bound holds, damaged entries are never used."""
from __future__ import annotations

import os
import pickle
import sys
from pathlib import Path

import pytest
import torch

from apt_data import APTConfig  # noqa: E402
from apt_data.loader import APTLoader  # noqa: E402
from apt_data.sources import CachedReader, RangeCache, open_remote, open_source  # noqa: E402
from apt_data.sources.cache import parse_size  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from http_server import RangeServer  # noqa: E402

SHARDS = Path(__file__).resolve().parents[1] / "shards"


def epoch(source, num_workers: int = 2):
    """One planned evaluation epoch as comparable values (tensors copied: the workers reuse slots)."""
    loader = APTLoader(source, APTConfig(), max_tokens=4096, num_workers=num_workers, seed=1, train=False,
                       packing="plan", strict=True)
    return [(b.keys, b.seqlens, [t.clone() for t in (*b.pixels, *b.coords, b.labels)]) for b, _ in loader]


def assert_same(got, want):
    assert len(got) == len(want)
    for (ka, sa, ta), (kb, sb, tb) in zip(got, want):
        assert ka == kb and sa == sb
        assert all(torch.equal(x, y) for x, y in zip(ta, tb))


def entries(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.bin"))


@pytest.fixture(scope="module")
def local_val():
    return epoch("shards:val")


def test_second_epoch_reads_the_cache_not_the_store(tmp_path, local_val):
    with RangeServer(SHARDS, latency=0.002) as srv:
        src = open_remote(srv.url(), split="val", cache_dir=tmp_path, cache_size="1GB")
        before = srv.requests
        first = epoch(src)
        st = src.io_stats()
        assert st["cache_misses"] == 100 and st["cache_hits"] == 0 and st["requests"] > 0
        assert len(entries(tmp_path)) == 100
        after_first = srv.requests
        assert after_first > before
        second = epoch(src)
        st = src.io_stats()
        assert srv.requests == after_first  # not one request: every span came from the cache
        assert st["cache_hits"] == 100 and st["cache_bytes"] > 0 and st["cache_corrupt"] == 0
        # another source (another rank, or the next run) sharing the folder: only its index is read
        again = open_remote(srv.url(), split="val", cache_dir=tmp_path, cache_size="1GB")
        third = epoch(again, num_workers=0)
        assert srv.requests == after_first + 1 and again.io_stats()["cache_hits"] == 100
    for got in (first, second, third):
        assert_same(got, local_val)


def test_the_size_bound_holds_and_least_recently_used_go_first(tmp_path, local_val):
    with RangeServer(SHARDS) as srv:
        src = open_remote(srv.url(), split="val", cache_dir=tmp_path, cache_size=300_000)
        for _ in range(2):
            assert_same(epoch(src), local_val)
            assert src.reader.cache.disk_usage() <= 300_000
        st = src.io_stats()
        assert st["cache_evicted"] > 0 and st["cache_corrupt"] == 0
        assert st["cache_hits"] + st["cache_misses"] == 200 and st["cache_misses"] > 100
        # one process: a read keeps an entry young, so the oldest go first
        cache = RangeCache(tmp_path / "lru", 20_000)
        for k in range(3):
            cache.put("u", k, k + 1, bytes(5_000))
            os.utime(cache.path("u", k, k + 1), (1_000 + k, 1_000 + k))
        assert cache.get("u", 0, 1) is not None  # now the newest
        cache.put("u", 3, 4, bytes(5_000))  # 4 entries are over 90% of the bound: the oldest (1) goes
        assert ("u", 1, 2) not in cache and all(("u", k, k + 1) in cache for k in (0, 2, 3))
        assert cache.disk_usage() <= 18_000


def test_damaged_entries_are_deleted_read_again_and_counted(tmp_path):
    local = open_source("shards:val")
    with RangeServer(SHARDS) as srv:
        src = open_remote(srv.url(), split="val", cache_dir=tmp_path, cache_size="1GB", inflight=0)
        for i in range(4):
            src.read_scores(i)
        n = srv.requests
        # a flipped byte (a bad disk, a torn write): the entry's own CRC32C catches it
        cache = src.reader.cache
        path = cache.path(*src.span(1))
        raw = bytearray(path.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        path.write_bytes(bytes(raw))
        # bytes that pass that CRC but not the index (cached from an older version of the shard)
        k = 2
        url, start, end = src.span(k)
        stale = bytearray(cache.get(url, start, end))
        stale[int(src._spans["jpg"][0][k]) - start + 100] ^= 0xFF  # inside its JPEG
        cache.put(url, start, end, bytes(stale))
        for i in range(4):
            assert src.read_scores(i)[0] == local.read_scores(i)[0]
        st = src.io_stats()
        assert st["cache_corrupt"] == 2 and srv.requests == n + 2 and st["failed"] == 0
        for i in range(4):  # the store's bytes replaced both entries
            assert src.read_scores(i)[0] == local.read_scores(i)[0]
        assert srv.requests == n + 2 and src.io_stats()["cache_corrupt"] == 2
        clone = pickle.loads(pickle.dumps(src))  # a copy (a spawned worker) reads the same cache
        assert clone.read(3) == local.read(3) and srv.requests == n + 2


def test_default_off_sizes_and_vanishing_entries(tmp_path):
    with RangeServer(SHARDS) as srv:
        src = open_remote(srv.url(), split="val")
        assert not isinstance(src.reader, CachedReader)
        src.read(0)
        assert src.io_stats()["cache_misses"] == 0
    assert parse_size("20GB") == 20 * 10**9 and parse_size("1.5 GiB") == int(1.5 * 2**30) and parse_size(4096) == 4096
    for bad in ("lots", "-1", 0, "5 parsecs"):
        with pytest.raises(ValueError, match="cache_size"):
            parse_size(bad)
    mine = [tmp_path / "notes.txt", tmp_path / "ab" / "notes.txt"]  # a folder with other files in it
    for p in mine:
        p.parent.mkdir(exist_ok=True)
        p.write_bytes(bytes(60_000))
    a, b = RangeCache(tmp_path, 50_000), RangeCache(tmp_path, 50_000)  # two processes sharing a folder
    for k in range(10):
        a.put("u", k, k + 1, bytes(4_000))
    for p in entries(tmp_path)[:5]:
        p.unlink()  # evicted by b meanwhile
    for k in range(10, 30):
        a.put("u", k, k + 1, bytes(4_000))
        b.put("v", k, k + 1, bytes(4_000))
    assert a.disk_usage() <= 50_000 and not list(tmp_path.rglob("*.tmp"))
    assert all(p.stat().st_size == 60_000 for p in mine)  # never counted, never evicted


def test_train_py_caches_url_data_with_data_cache(tmp_path, capsys):
    from test_train_cli import train_main

    cache = tmp_path / "cache"
    with RangeServer(SHARDS, latency=0.0) as srv:
        flags = ["--data", srv.url() + ":val", "--no-eval", "--quiet", "--workers", "0", "--max-tokens", "2048",
                 "--recipe", "short", "--epochs", "1", "--steps", "2", "--data-cache", str(cache),
                 "--data-cache-size", "200MB"]
        assert train_main(flags + ["--output", str(tmp_path / "a")]) == 0
        cached, first = len(entries(cache)), srv.sent
        assert cached >= 20  # the samples of the 2 steps (read-ahead beyond them is not kept)
        assert train_main(flags + ["--output", str(tmp_path / "b")]) == 0  # the same 2 steps again
        # their samples came from the cache (nothing new kept): what the run read from the server was
        # its index and the read-ahead of samples past the 2 steps, not the cached ones
        assert len(entries(cache)) == cached and srv.sent - first < 0.8 * first
    with pytest.raises(SystemExit) as e:
        train_main(flags + ["--data-cache-size", "ten gigs", "--output", str(tmp_path / "c")])
    assert e.value.code == 2 and "--data-cache-size" in capsys.readouterr().err

"""The HTTP(S) range reader of remote shards (`apt_data.sources.http.HTTPReader`, urllib3), over the
loopback servers of tests/http_server.py and the real shards of ``shards/``: ranges, errors, redirects
without credentials elsewhere, a deadline slow and endless servers cannot stretch, and answers that
cannot make it buffer more than the range asked for (plus a small constant)."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import pytest

from apt_data.sources.http import HEADER_BYTES, HTTPReader, HTTPReadError, HTTPStatusError, redirect_headers

sys.path.insert(0, str(Path(__file__).parent))
from http_server import RangeServer, RawServer, endless, trickle  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARDS = ROOT / "shards"
TAR = "train-000001.tar"
#: what a read may buffer beyond the range it asked for: the headers (at most HEADER_BYTES) parsed by
#: http.client and the e-mail parser (a few copies), buffers, objects: half a MiB
SLACK = 16 * HEADER_BYTES


def connections(http: HTTPReader, url: str) -> int:
    return http._pool().connection_from_url(url).num_connections


def test_a_range_past_the_end_of_the_file_is_cut_there():
    with RawServer([b"HTTP/1.1 206 Partial Content\r\nContent-Range: bytes 95-99/100\r\n\r\nabcde" + RawServer.CLOSE,
                    b"HTTP/1.1 206 Partial Content\r\nContent-Range: bytes 95-99/100\r\n\r\nabc" + RawServer.CLOSE,
                    b"HTTP/1.1 206 Partial Content\r\nContent-Range: bytes 95-99/*\r\n\r\nabcde" + RawServer.CLOSE,
                    ]) as srv:
        http = HTTPReader()
        assert http.read(srv.url(), 95, 110) == b"abcde"
        with pytest.raises(HTTPReadError, match="short answer"):  # closed before the bytes it announced
            http.read(srv.url(), 95, 110)
        with pytest.raises(HTTPReadError, match="answered bytes 95-99"):  # less than asked, size unknown
            http.read(srv.url(), 95, 110)


def test_ranges_match_the_file_and_reuse_one_connection():
    data = (SHARDS / TAR).read_bytes()
    http = HTTPReader(headers={"Authorization": "Bearer t0ken"})
    with RangeServer(SHARDS) as srv:
        for start, end in [(0, 512), (1000, 70_000), (len(data) - 100, len(data)), (len(data) - 10, len(data) + 50)]:
            assert http.read(srv.url(TAR), start, end) == data[start:end]
        assert http.read_all(srv.url(TAR)) == data  # the whole object
        assert http.read(srv.url(TAR), len(data) + 10, len(data) + 20) == b""  # past the end: 416
        assert srv.last_headers.get("Authorization") == "Bearer t0ken"
        assert connections(http, srv.url(TAR)) == 1  # one keep-alive connection for all of it
        assert srv.requests == 6
        assert http.exists(srv.url(TAR)) and not http.exists(srv.url("no-such.tar"))


def test_errors_are_permanent_or_transient_as_the_retry_loop_expects():
    http = HTTPReader()
    with RangeServer(SHARDS, missing={TAR}) as srv:
        with pytest.raises(FileNotFoundError, match="404"):
            http.read(srv.url(TAR), 0, 10)
    with RangeServer(SHARDS, drop_rate=1.0) as srv:  # every request fails: 503, then a reset, ...
        with pytest.raises(HTTPStatusError) as e:
            http.read(srv.url(TAR), 0, 10)
        assert e.value.status == 503 and isinstance(e.value, OSError)
        with pytest.raises(HTTPReadError, match=srv.url(TAR)):  # a connection closed without an answer
            http.read(srv.url(TAR), 0, 10)
    with pytest.raises(ValueError, match="ftp"):
        http.read("ftp://example.org/x.tar", 0, 1)


def test_a_server_ignoring_range_gives_the_right_bytes_and_is_logged_once(caplog):
    from apt_data.sources import open_source

    data = (SHARDS / TAR).read_bytes()
    local = open_source("shards:val")
    with RangeServer(SHARDS, ignore_range=True) as srv, caplog.at_level(logging.WARNING, "apt_data.sources"):
        http = HTTPReader()
        assert http.read(srv.url(TAR), 2048, 4096) == data[2048:4096]
        assert http.read(srv.url(TAR), 100, 200) == data[100:200]
        assert http.counters.snapshot()["range_ignored"] == 2
        src = open_source(srv.url() + ":val", remote={"inflight": 0})  # one request per sample
        assert all(src.read(i) == local.read(i) for i in range(100))
        assert src.io_stats()["range_ignored"] == 100 and src.io_stats()["failed"] == 0
    warned = [r for r in caplog.records if "ignores HTTP Range" in r.getMessage()]
    assert len(warned) == 2  # once per reader (a source's processes share one): the bare one and the source's
    assert "docs/scale-out.md" in warned[0].getMessage()


def test_redirects_drop_credentials_on_another_host_and_from_https_to_http():
    data = (SHARDS / TAR).read_bytes()
    http = HTTPReader(headers={"Authorization": "Bearer t0ken", "Cookie": "s=1", "X-Trace": "7"})
    with RangeServer(SHARDS) as other, RangeServer(SHARDS, redirect_base=other.url()) as first, \
            RangeServer(SHARDS) as same:
        assert http.read(first.url(f"redirect/{TAR}"), 100, 200) == data[100:200]
        assert first.seen[-1]["Authorization"] == "Bearer t0ken"  # the host asked
        hop = other.seen[-1]  # another loopback port: another origin
        assert "Authorization" not in hop and "Cookie" not in hop and hop["X-Trace"] == "7" and hop["Range"]
        assert http.read(same.url(f"redirect/{TAR}"), 100, 200) == data[100:200]  # same origin: kept
        assert [h.get("Authorization") for h in same.seen] == ["Bearer t0ken"] * 2
    h = {"Authorization": "a", "cookie": "c", "Proxy-Authorization": "p", "Range": "bytes=0-1"}
    assert redirect_headers(h, "https://a.org/x", "http://a.org/x") == {"Range": "bytes=0-1"}  # downgrade
    assert redirect_headers(h, "https://a.org/x", "https://b.org/x") == {"Range": "bytes=0-1"}
    assert redirect_headers(h, "https://a.org/x", "https://a.org:8443/x") == {"Range": "bytes=0-1"}
    assert redirect_headers(h, "http://a.org/x", "https://a.org/y") == h  # same host, upgraded: kept
    assert redirect_headers(h, "https://a.org/x", "https://a.org/y") == h


def test_a_keep_alive_connection_the_server_closed_is_replaced():
    data = (SHARDS / TAR).read_bytes()
    http = HTTPReader()
    with RangeServer(SHARDS, idle_timeout=0.2) as srv:
        assert http.read(srv.url(TAR), 0, 100) == data[:100]
        time.sleep(0.6)  # the server closes the idle connection
        assert http.read(srv.url(TAR), 100, 200) == data[100:200]
        assert srv.requests == 2


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_opens_its_own_connections():
    data = (SHARDS / TAR).read_bytes()
    http = HTTPReader()
    with RangeServer(SHARDS) as srv:
        assert http.read(srv.url(TAR), 0, 10) == data[:10]
        parent_pool = http._pool()
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            ok = http.read(srv.url(TAR), 10, 20) == data[10:20] and http._pool() is not parent_pool
            os.write(w, b"1" if ok else b"0")
            os._exit(0)
        os.waitpid(pid, 0)
        assert os.read(r, 1) == b"1"
        assert http.read(srv.url(TAR), 20, 30) == data[20:30]  # the parent's connection still works
        assert http._pool() is parent_pool and connections(http, srv.url(TAR)) == 1


def test_http_shards_need_no_fsspec():
    """An http:// source (index and samples) reads through urllib3 alone."""
    code = f"""
import sys
sys.modules["fsspec"] = None  # importing it fails
sys.path.insert(0, {str(ROOT / 'tests')!r})
from http_server import RangeServer
from apt_data.sources import open_source
with RangeServer({str(SHARDS)!r}) as srv:
    src = open_source(srv.url())
    local = open_source({str(SHARDS)!r})
    assert len(src) == 400 and all(src.read(i) == local.read(i) for i in (0, 123, 399))
    print("ok", src.io_stats()["requests"])
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0 and r.stdout.startswith("ok 3"), r.stderr[-2000:]


def test_chunked_close_delimited_and_interim_answers_are_read_whole():
    http = HTTPReader()
    with RawServer([
        b"HTTP/1.1 206 Partial Content\r\nContent-Range: bytes 0-6/100\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"4;ext=1\r\nabcd\r\n3\r\nefg\r\n0\r\nTrailer: x\r\n\r\n",
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 206 Partial Content\r\nContent-Range: bytes 7-9/100\r\n"
        b"Content-Length: 3\r\n\r\nxyz",
        b"HTTP/1.0 206 Partial Content\r\nContent-Range: bytes 10-19/100\r\n\r\nto the end" + RawServer.CLOSE,
        b"HTTP/1.1 206 Partial Content\r\nContent-Range: bytes 0-9/100\r\nContent-Length: 10\r\n\r\nshort"
        + RawServer.CLOSE,
        b"HTTP/1.1 206 Partial Content\r\nContent-Length: 10\r\n\r\n0123456789",  # no Content-Range
        b"HTTP/1.1 206 Partial Content\r\nContent-Range: bytes 0-4/100\r\n\r\n01234",  # less than asked
        b"HTTP/1.1 206 Partial Content\r\nContent-Range: bytes 3-12/100\r\n\r\n0123456789",  # elsewhere
        b"garbage\r\n\r\n" + RawServer.CLOSE,
    ]) as srv:
        assert http.read(srv.url(), 0, 7) == b"abcdefg"
        assert http.read(srv.url(), 7, 10) == b"xyz"  # the same connection, after a 100
        assert http.read(srv.url(), 10, 20) == b"to the end"  # HTTP/1.0, no length: up to the close
        for match in ("short answer|IncompleteRead", "without a valid Content-Range", "answered bytes 0-4/100",
                      "answered bytes 3-12/100", "BadStatusLine|ProtocolError"):
            with pytest.raises(HTTPReadError, match=match):
                http.read(srv.url(), 0, 10)
        assert [r.split("\r\n")[0] for r in srv.requests] == ["GET /x.tar HTTP/1.1"] * 8
        assert "Range: bytes=0-6" in srv.requests[0] and f"Host: 127.0.0.1:{srv.port}" in srv.requests[0]


# ----------------------------------------------------------------------------- deadline
@pytest.mark.parametrize("answer", [
    trickle(b"HTTP/1.1 206 Partial Content\r\nContent-Range: bytes 0-999/5000\r\nContent-Length: 1000\r\n\r\n"),
    trickle(b"HTTP/1.1 206 Partial Content\r\n", byte=b"X-A: b\r\n"),  # header lines that never end
    trickle(b"", byte=b"H"),  # a status line that never ends
], ids=["slow body", "endless headers", "endless status line"])  # one byte or line every 0.2 s
def test_slow_and_endless_servers_fail_at_the_deadline(answer):
    http = HTTPReader(deadline=1.0, read_timeout=30.0)  # every receive is quick: only the deadline ends it
    with RawServer([answer]) as srv:
        t0 = time.monotonic()
        with pytest.raises(HTTPReadError, match=f"{srv.url()}: no whole answer within the request's deadline of 1 s"):
            http.read(srv.url(), 0, 1000)
        assert time.monotonic() - t0 < 5.0  # the bound: the deadline (1 s) plus one trickle period and slack


def test_the_deadline_is_a_setting_of_open_remote_and_storage_options():
    from apt_data.sources.remote import _base_reader
    from apt_data.sources.readers import IOCounters

    r = _base_reader("https://h/x", {"headers": {"A": "b"}, "deadline": 7, "connect_timeout": 2}, IOCounters())
    assert isinstance(r, HTTPReader) and r.deadline == 7 and r.connect_timeout == 2 and r.headers == {"A": "b"}
    with RangeServer(SHARDS) as srv:
        from apt_data.sources import open_remote

        src = open_remote(srv.url(), split="val", deadline=3.5)
        assert src.reader.inner.inner.deadline == 3.5  # ReadAhead -> Retrying -> HTTPReader
    with pytest.raises(ValueError, match="positive"):
        HTTPReader(deadline=0)


# ----------------------------------------------------------------------------- hostile answers
CR = b"Content-Range: bytes 0-1023/400000000\r\n"  # a valid one: the caps, not this check, stop the answers
HOSTILE = {
    "negative length": endless(b"HTTP/1.1 206 Partial Content\r\n" + CR + b"Content-Length: -1\r\n\r\n"),
    "length over the range": endless(b"HTTP/1.1 206 Partial Content\r\n" + CR + b"Content-Length: 400000000\r\n\r\n"),
    "two lengths": endless(b"HTTP/1.1 206 Partial Content\r\n" + CR + b"Content-Length: 10, 400000000\r\n\r\n"),
    "no length, endless body": endless(b"HTTP/1.1 206 Partial Content\r\n" + CR + b"\r\n"),
    "endless chunked body": endless(b"HTTP/1.1 206 Partial Content\r\n" + CR + b"Transfer-Encoding: chunked\r\n\r\n",
                                    b"10000\r\n" + b"\0" * 0x10000 + b"\r\n"),
    "a huge chunk": endless(b"HTTP/1.1 206 Partial Content\r\n" + CR + b"Transfer-Encoding: chunked\r\n\r\nfffffffffff\r\n"),
    "20,000 headers of 60 kB": endless(b"HTTP/1.1 206 Partial Content\r\n",
                                       b"X-Big: " + b"a" * 60_000 + b"\r\n"),
    "one endless header line": endless(b"HTTP/1.1 206 Partial Content\r\nX-Big: "),
    "whole file past the range": endless(b"HTTP/1.1 200 OK\r\n\r\n"),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_answers_buffer_no_more_than_the_range_and_a_constant(name):
    n = 1024  # a 1 kB range
    http = HTTPReader(deadline=20.0)
    with RawServer([HOSTILE[name]]) as srv:
        http.read  # noqa: B018 - the pool manager is made below, before measuring
        http._pool()
        tracemalloc.start()
        try:
            t0 = time.monotonic()
            try:
                got = http.read(srv.url(), 0, n)
            except HTTPReadError as e:
                got, error = None, e
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert time.monotonic() - t0 < 15.0  # failed on its own, not at the deadline
    if name == "whole file past the range":  # a server ignoring Range: the first n bytes of its body
        assert got == b"\0" * n
    else:
        assert got is None and srv.url() in str(error), name
    assert peak < n + SLACK, f"{name}: {peak} bytes buffered for a {n}-byte range"


def test_pythons_http_server_ignores_range_is_logged_once_and_still_read_right(caplog):
    """`python -m http.server` (what a reader of docs/scale-out.md tries first) answers every GET with
    the whole file: the first answer is logged once, with its cost, and the bytes are right."""
    import functools
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    from apt_data.sources import open_source

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(SHARDS)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    local = open_source("shards:val")
    try:
        with caplog.at_level(logging.WARNING, "apt_data.sources"):
            src = open_source(f"http://127.0.0.1:{server.server_address[1]}/:val", remote={"inflight": 4})
            order = [(37 * k) % 100 for k in range(40)]
            src.read_order(order)
            assert all(src.read(i) == local.read(i) for i in order)
    finally:
        server.shutdown()
        server.server_close()
    assert src.io_stats()["range_ignored"] >= 1 and src.io_stats()["failed"] == 0
    assert sum("ignores HTTP Range" in r.getMessage() for r in caplog.records) == 1

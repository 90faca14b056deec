"""The standard-library HTTP client of remote shards (`apt_data.sources.http.HTTPRanges`), over the
loopback server of tests/http_server.py and the real shards of ``shards/``."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from apt_data.sources.http import HTTPRanges, HTTPStatusError

sys.path.insert(0, str(Path(__file__).parent))
from http_server import RangeServer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARDS = ROOT / "shards"
TAR = "train-000001.tar"


def test_ranges_match_the_file_and_reuse_one_connection():
    data = (SHARDS / TAR).read_bytes()
    http = HTTPRanges(headers={"Authorization": "Bearer t0ken"})
    with RangeServer(SHARDS) as srv:
        for start, end in [(0, 512), (1000, 70_000), (len(data) - 100, len(data)), (len(data) - 10, len(data) + 50)]:
            assert http.get(srv.url(TAR), start, end) == data[start:end]
        assert http.get(srv.url(TAR)) == data  # the whole object
        assert http.get(srv.url(TAR), len(data) + 10, len(data) + 20) == b""  # past the end: 416
        assert srv.last_headers.get("Authorization") == "Bearer t0ken"
        assert len(http._pool()) == 1  # one keep-alive connection for all of it
        assert srv.requests == 6


def test_errors_are_permanent_or_transient_as_the_retry_loop_expects():
    http = HTTPRanges()
    with RangeServer(SHARDS, missing={TAR}) as srv:
        with pytest.raises(FileNotFoundError, match="404"):
            http.get(srv.url(TAR), 0, 10)
        with pytest.raises(FileNotFoundError):
            http.get(srv.url("no-such.tar"), 0, 10)
    with RangeServer(SHARDS, drop_rate=1.0) as srv:  # every request fails: 503, then a reset, ...
        with pytest.raises(HTTPStatusError) as e:
            http.get(srv.url(TAR), 0, 10)
        assert e.value.status == 503 and isinstance(e.value, OSError)
        with pytest.raises(OSError):  # a connection closed without an answer, on a new connection
            http.get(srv.url(TAR), 0, 10)
    with pytest.raises(ValueError, match="ftp"):
        http.get("ftp://example.org/x.tar", 0, 1)


def test_a_server_ignoring_range_and_redirects_still_give_the_bytes_asked():
    data = (SHARDS / TAR).read_bytes()
    http = HTTPRanges()
    with RangeServer(SHARDS, ignore_range=True) as srv:
        assert http.get(srv.url(TAR), 2048, 4096) == data[2048:4096]
    with RangeServer(SHARDS) as srv:
        assert http.get(srv.url(f"redirect/{TAR}"), 100, 200) == data[100:200]


def test_a_keep_alive_connection_the_server_closed_is_replaced_at_once():
    data = (SHARDS / TAR).read_bytes()
    http = HTTPRanges()
    with RangeServer(SHARDS, idle_timeout=0.2) as srv:
        assert http.get(srv.url(TAR), 0, 100) == data[:100]
        time.sleep(0.6)  # the server closes the idle connection
        t0 = time.perf_counter()
        assert http.get(srv.url(TAR), 100, 200) == data[100:200]
        assert time.perf_counter() - t0 < 0.5 and srv.requests == 2


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_opens_its_own_connection():
    data = (SHARDS / TAR).read_bytes()
    http = HTTPRanges()
    with RangeServer(SHARDS) as srv:
        assert http.get(srv.url(TAR), 0, 10) == data[:10]
        parent_conn = next(iter(http._pool().values()))
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            ok = http.get(srv.url(TAR), 10, 20) == data[10:20] and next(iter(http._pool().values())) is not parent_conn
            os.write(w, b"1" if ok else b"0")
            os._exit(0)
        os.waitpid(pid, 0)
        assert os.read(r, 1) == b"1"
        assert http.get(srv.url(TAR), 20, 30) == data[20:30]  # the parent's connection still works
        assert next(iter(http._pool().values())) is parent_conn


def test_http_shards_need_no_fsspec():
    """An http:// source (index and samples) reads through the standard library alone."""
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


class CannedServer:
    """A loopback server answering each request with the next of ``answers`` (raw bytes; after an
    answer ending in ``CLOSE`` it closes the connection), recording the requests it read."""

    CLOSE = b"<close>"

    def __init__(self, answers):
        import socket
        import threading

        self.answers, self.requests = list(answers), []
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self):
        while self.answers:
            conn, _ = self.sock.accept()
            f = conn.makefile("rb")
            with conn, f:  # (the socket closes once its file is closed too)
                while self.answers:
                    req = b""
                    while not req.endswith(b"\r\n\r\n"):
                        line = f.readline()
                        if not line:
                            break
                        req += line
                    if not req:
                        break
                    self.requests.append(req.decode("latin-1"))
                    answer = self.answers.pop(0)
                    conn.sendall(answer.replace(self.CLOSE, b""))
                    if answer.endswith(self.CLOSE):
                        break

    def url(self, name="x.tar"):
        return f"http://127.0.0.1:{self.port}/{name}"


def test_chunked_close_delimited_and_interim_answers_are_read_whole():
    http = HTTPRanges(timeout=10)
    srv = CannedServer([
        b"HTTP/1.1 206 Partial Content\r\nTransfer-Encoding: chunked\r\n\r\n4;ext=1\r\nabcd\r\n3\r\nefg\r\n0\r\n"
        b"Trailer: x\r\n\r\n",
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 206 Partial Content\r\nContent-Length: 3\r\n\r\nxyz",
        b"HTTP/1.0 206 Partial Content\r\n\r\nto the end" + CannedServer.CLOSE,
        b"HTTP/1.1 206 Partial Content\r\nContent-Length: 10\r\n\r\nshort" + CannedServer.CLOSE,
        b"garbage\r\n\r\n" + CannedServer.CLOSE,
    ])
    assert http.get(srv.url(), 0, 7) == b"abcdefg"
    assert http.get(srv.url(), 7, 10) == b"xyz"  # the same connection, after a 100
    assert http.get(srv.url(), 10, 20) == b"to the end"  # HTTP/1.0, no length: up to the close
    with pytest.raises(OSError, match="short HTTP body"):
        http.get(srv.url(), 0, 10)
    with pytest.raises(OSError, match="malformed HTTP status"):
        http.get(srv.url(), 0, 10)
    assert [r.split("\r\n")[0] for r in srv.requests] == ["GET /x.tar HTTP/1.1"] * 5
    assert "Range: bytes=0-6" in srv.requests[0] and f"Host: 127.0.0.1:{srv.port}" in srv.requests[0]

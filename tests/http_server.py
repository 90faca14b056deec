"""A loopback object store for the tests: a threaded HTTP server on 127.0.0.1 that serves a folder and
honours ``Range`` requests, with injected latency and transient failures.

    with RangeServer("shards", latency=0.01, drop_rate=0.05) as srv:
        srv.url("train.parquet")   # http://127.0.0.1:PORT/train.parquet

``latency``: seconds slept before answering each request (a float, or a ``(lo, hi)`` range drawn
per request); ``drop_rate``: the share of requests that fail transiently, alternately with a 503
and by closing the connection without an answer (a reset); ``missing``: names answered 404 whatever
is on disk. ``requests``, ``ignore_range``: answer every GET with the whole object (200), as some servers do;
``idle_timeout``: close a keep-alive connection idle that long (seconds), as object stores do;
``/redirect/NAME`` answers 302 to ``/NAME``. ``last_headers``: the headers of the last request.
``drops`` (``dropped`` by kind), ``ranged``, ``sent`` (body bytes) count what the server saw (a client
may retry a reset connection by itself: aiohttp does for GETs on a reused connection). Also runnable:
``python tests/http_server.py DIR [--latency 0.01] [--drop-rate 0.05]``.
"""
from __future__ import annotations

import os
import random
import re
import socket
import threading
import time
from http.server import ThreadingHTTPServer
from socketserver import StreamRequestHandler
from pathlib import Path
from typing import Iterable, Optional, Union
from urllib.parse import unquote

__all__ = ["RangeServer"]


class _Handler(StreamRequestHandler):
    """A minimal HTTP/1.1 handler (GET and HEAD, keep-alive, Range): lean on purpose, because the
    benchmarks run it on the loader's own cores, where a real object store would not be; parsing by
    `http.server` costs several times as much CPU per request."""

    disable_nagle_algorithm = True

    def handle(self) -> None:
        srv: RangeServer = self.server.owner  # type: ignore[attr-defined]
        while True:
            try:
                line = self.rfile.readline(65537)
                head: dict[str, str] = {}
                while True:
                    h = self.rfile.readline(65537)
                    if h in (b"\r\n", b"\n", b""):
                        break
                    k, _, v = h.decode("latin-1").partition(":")
                    head[k.strip()] = v.strip()
            except OSError:  # an idle connection timed out (idle_timeout), or the client went away
                return
            if not line:
                return
            try:
                method, target, _ = line.decode("latin-1").split()
            except ValueError:
                return self._answer(400, b"bad request", close=True)
            if method not in ("GET", "HEAD"):
                self._answer(405, b"")
            elif not self._serve(srv, target, head, method == "HEAD"):
                return
            if head.get("Connection", head.get("connection", "")).lower() == "close":
                return

    def _answer(self, status: int, body: bytes, extra: str = "", close: bool = False, send_body: bool = True) -> None:
        text = f"HTTP/1.1 {status} {_REASONS.get(status, 'Status')}\r\nContent-Length: {len(body)}\r\n{extra}"
        if close:
            text += "Connection: close\r\n"
        self.connection.sendall(text.encode("latin-1") + b"\r\n" + (body if send_body else b""))

    def _serve(self, srv: "RangeServer", target: str, headers: dict, head: bool) -> bool:
        """Answer one request; False: the connection is closed."""
        srv.last_headers = headers
        drop = srv._before_request()
        if drop == "503":
            self._answer(503, b"try again")
            return True
        if drop == "reset":
            try:
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
            except OSError:
                pass
            self.connection.close()
            return False
        name = unquote(target.split("?", 1)[0]).lstrip("/")
        if name.startswith("redirect/"):
            self._answer(302, b"", f"Location: /{name[len('redirect/'):]}\r\n")
            return True
        path = (srv.root / name).resolve()
        if name in srv.missing or srv.root not in path.parents or not path.is_file():
            self._answer(404, b"not found")
            return True
        size = path.stat().st_size
        start, end = 0, size  # [start, end)
        rng = None if srv.ignore_range else headers.get("Range", headers.get("range"))
        if rng:
            m = re.fullmatch(r"bytes=(\d*)-(\d*)", rng.strip())
            if not m or (not m.group(1) and not m.group(2)):
                self._answer(416, b"")
                return True
            if m.group(1):
                start = int(m.group(1))
                end = min(size, int(m.group(2)) + 1) if m.group(2) else size
            else:  # suffix: the last N bytes
                start = max(0, size - int(m.group(2)))
            if start >= size:
                self._answer(416, b"", f"Content-Range: bytes */{size}\r\n")
                return True
            with srv._lock:
                srv.ranged += 1
        with open(path, "rb") as f:
            f.seek(start)
            body = f.read(end - start)
        extra = "Accept-Ranges: bytes\r\nContent-Type: application/octet-stream\r\n"
        if rng:
            extra += f"Content-Range: bytes {start}-{end - 1}/{size}\r\n"
        self._answer(206 if rng else 200, body, extra, send_body=not head)
        if not head:
            with srv._lock:
                srv.sent += len(body)
        return True


_REASONS = {200: "OK", 206: "Partial Content", 302: "Found", 400: "Bad Request", 404: "Not Found",
            405: "Method Not Allowed", 416: "Range Not Satisfiable", 503: "Service Unavailable"}


class _Server(ThreadingHTTPServer):
    # socketserver's default listen backlog is 5: with many clients connecting at once (workers x
    # requests in flight) the kernel drops SYNs and the clients retry after a second, a stall an
    # object store does not have
    request_queue_size = 256


class RangeServer:
    """Serve ``root`` on ``http://127.0.0.1:PORT/`` (port 0: any free one) in a background thread."""

    def __init__(self, root: Union[str, os.PathLike], *, latency: Union[float, tuple] = 0.0, drop_rate: float = 0.0,
                 missing: Iterable[str] = (), seed: int = 0, port: int = 0, ignore_range: bool = False,
                 idle_timeout: Optional[float] = None):
        self.root = Path(root).resolve()
        self.latency, self.drop_rate = latency, float(drop_rate)
        self.missing = set(missing)
        self.ignore_range = bool(ignore_range)
        self.last_headers: dict = {}
        self.requests = self.drops = self.ranged = self.sent = 0
        self.dropped = {"503": 0, "reset": 0}
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        handler = type("_IdleHandler", (_Handler,), {"timeout": idle_timeout}) if idle_timeout else _Handler
        self._httpd = _Server(("127.0.0.1", port), handler)
        self._httpd.daemon_threads = True
        self._httpd.owner = self  # type: ignore[attr-defined]
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()

    def _before_request(self):
        with self._lock:
            self.requests += 1
            lat = self._rng.uniform(*self.latency) if isinstance(self.latency, tuple) else self.latency
            drop = None
            if self.drop_rate and self._rng.random() < self.drop_rate:
                self.drops += 1
                drop = "503" if self.drops % 2 else "reset"
                self.dropped[drop] += 1
        if lat:
            time.sleep(lat)
        return drop

    def url(self, name: str = "") -> str:
        return f"http://127.0.0.1:{self.port}/{name}"

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> "RangeServer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="serve a folder on 127.0.0.1 with Range support")
    ap.add_argument("root")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--latency", type=float, default=0.0)
    ap.add_argument("--drop-rate", type=float, default=0.0)
    a = ap.parse_args()
    srv = RangeServer(a.root, latency=a.latency, drop_rate=a.drop_rate, port=a.port)
    print(srv.url(), flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        srv.close()

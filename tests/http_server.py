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
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterable, Optional, Union
from urllib.parse import unquote

__all__ = ["RangeServer"]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: clients reuse connections
    disable_nagle_algorithm = True  # headers and body are two writes: no 40 ms delayed-ACK stall

    def log_message(self, *args):  # quiet
        pass

    def _fail(self, status: int, body: bytes = b"") -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_HEAD(self):
        self._serve(head=True)

    def do_GET(self):
        self._serve(head=False)

    def _serve(self, head: bool) -> None:
        srv: RangeServer = self.server.owner  # type: ignore[attr-defined]
        drop = srv._before_request()
        if drop == "503":
            return self._fail(503, b"try again")
        if drop == "reset":
            self.close_connection = True
            try:
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
            except OSError:
                pass
            self.connection.close()
            return
        srv.last_headers = dict(self.headers)
        name = unquote(self.path.split("?", 1)[0]).lstrip("/")
        if name.startswith("redirect/"):
            self.send_response(302)
            self.send_header("Location", "/" + name[len("redirect/"):])
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        path = (srv.root / name).resolve()
        if name in srv.missing or srv.root not in path.parents or not path.is_file():
            return self._fail(404, b"not found")
        size = path.stat().st_size
        start, end = 0, size  # [start, end)
        rng = None if srv.ignore_range else self.headers.get("Range")
        if rng:
            m = re.fullmatch(r"bytes=(\d*)-(\d*)", rng.strip())
            if not m or (not m.group(1) and not m.group(2)):
                return self._fail(416)
            if m.group(1):
                start = int(m.group(1))
                end = min(size, int(m.group(2)) + 1) if m.group(2) else size
            else:  # suffix: the last N bytes
                start = max(0, size - int(m.group(2)))
            if start >= size:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            with srv._lock:
                srv.ranged += 1
        with open(path, "rb") as f:
            f.seek(start)
            body = f.read(end - start)
        self.send_response(206 if rng else 200)
        if rng:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)
            with srv._lock:
                srv.sent += len(body)


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

"""A loopback object store for the tests: an HTTP/1.1 server on 127.0.0.1 that serves a folder and
honours ``Range`` requests, with injected latency and transient failures.

    with RangeServer("shards", latency=0.01, drop_rate=0.05) as srv:
        srv.url("train.parquet")   # http://127.0.0.1:PORT/train.parquet

``latency``: seconds waited before answering each request (a float, or a ``(lo, hi)`` range drawn
per request); ``drop_rate``: the share of requests that fail transiently, alternately with a 503
and by closing the connection without an answer (a reset); ``missing``: names answered 404 whatever
is on disk; ``ignore_range``: answer every GET with the whole object (200), as some servers do;
``idle_timeout``: close a keep-alive connection idle that long (seconds), as object stores do;
``/redirect/NAME`` answers 302 to ``/NAME`` (on ``redirect_base``, another server's URL, when given).
``last_headers``: the headers of the last request; ``seen``: the headers of every request.
``requests``, ``drops`` (``dropped`` by kind), ``ranged``, ``sent`` (body bytes) count what the
server saw. Also runnable: ``python tests/http_server.py DIR [--latency 0.01] [--drop-rate 0.05]``.

It runs on one asyncio event loop in a background thread (latency is a timer, not a sleeping
thread) and parses just what a ranged GET needs: lean on purpose, because the benchmarks run it on
the loader's own cores, where a real object store would not be (a thread per connection and
`http.server`'s parsing cost several times as much CPU per request).
"""
from __future__ import annotations

import asyncio
import os
import random
import re
import socket
import threading
from pathlib import Path
from typing import Iterable, Optional, Union
from urllib.parse import unquote

__all__ = ["RangeServer", "RawServer"]

_REASONS = {200: "OK", 206: "Partial Content", 302: "Found", 400: "Bad Request", 404: "Not Found",
            405: "Method Not Allowed", 416: "Range Not Satisfiable", 503: "Service Unavailable"}
_RANGE = re.compile(r"bytes=(\d*)-(\d*)")


class RangeServer:
    """Serve ``root`` on ``http://127.0.0.1:PORT/`` (port 0: any free one) in a background thread."""

    def __init__(self, root: Union[str, os.PathLike], *, latency: Union[float, tuple] = 0.0, drop_rate: float = 0.0,
                 missing: Iterable[str] = (), seed: int = 0, port: int = 0, ignore_range: bool = False,
                 idle_timeout: Optional[float] = None, redirect_base: str = ""):
        self.root = Path(root).resolve()
        self.latency, self.drop_rate = latency, float(drop_rate)
        self.missing = set(missing)
        self.ignore_range = bool(ignore_range)
        self.idle_timeout = idle_timeout
        self.redirect_base = redirect_base.rstrip("/")
        self.last_headers: dict = {}
        self.seen: list[dict] = []
        self.requests = self.drops = self.ranged = self.sent = 0
        self.dropped = {"503": 0, "reset": 0}
        self._rng = random.Random(seed)
        self._loop = asyncio.new_event_loop()
        sock = socket.create_server(("127.0.0.1", port), backlog=256)
        self.port = sock.getsockname()[1]
        self._server = self._loop.run_until_complete(asyncio.start_server(self._client, sock=sock))
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ one connection
    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            while True:
                try:
                    raw = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self.idle_timeout)
                except (asyncio.TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError):
                    return  # idle too long, the client went away, or an oversized request
                lines = raw.decode("latin-1").split("\r\n")
                try:
                    method, target, _ = lines[0].split()
                except ValueError:
                    writer.write(self._answer(400, b"bad request", close=True))
                    return
                head = {}
                for line in lines[1:]:
                    k, sep, v = line.partition(":")
                    if sep:
                        head[k.strip()] = v.strip()
                if not await self._serve(writer, method, target, head):
                    return
                await writer.drain()
                if head.get("Connection", head.get("connection", "")).lower() == "close":
                    return
        except (OSError, asyncio.CancelledError):  # the client went away, or the server is closing
            return
        finally:
            writer.close()

    @staticmethod
    def _answer(status: int, body: bytes = b"", extra: str = "", close: bool = False, send_body: bool = True) -> bytes:
        text = f"HTTP/1.1 {status} {_REASONS.get(status, 'Status')}\r\nContent-Length: {len(body)}\r\n{extra}"
        if close:
            text += "Connection: close\r\n"
        return text.encode("latin-1") + b"\r\n" + (body if send_body else b"")

    async def _serve(self, writer: asyncio.StreamWriter, method: str, target: str, headers: dict) -> bool:
        """Answer one request; False: the connection is to be closed."""
        self.last_headers = headers
        self.seen.append(headers)
        self.requests += 1
        lat = self._rng.uniform(*self.latency) if isinstance(self.latency, tuple) else self.latency
        drop = None
        if self.drop_rate and self._rng.random() < self.drop_rate:
            self.drops += 1
            drop = "503" if self.drops % 2 else "reset"
            self.dropped[drop] += 1
        if lat:
            await asyncio.sleep(lat)
        if drop == "503":
            writer.write(self._answer(503, b"try again"))
            return True
        if drop == "reset":  # close with a RST, no answer
            sock = writer.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
            writer.transport.abort()
            return False
        if method not in ("GET", "HEAD"):
            writer.write(self._answer(405))
            return True
        name = unquote(target.split("?", 1)[0]).lstrip("/")
        if name.startswith("redirect/"):
            writer.write(self._answer(302, b"", f"Location: {self.redirect_base}/{name[len('redirect/'):]}\r\n"))
            return True
        path = (self.root / name).resolve()
        if name in self.missing or self.root not in path.parents or not path.is_file():
            writer.write(self._answer(404, b"not found"))
            return True
        size = path.stat().st_size
        start, end = 0, size  # [start, end)
        rng = None if self.ignore_range else headers.get("Range", headers.get("range"))
        if rng:
            m = _RANGE.fullmatch(rng.strip())
            if not m or (not m.group(1) and not m.group(2)):
                writer.write(self._answer(416))
                return True
            if m.group(1):
                start = int(m.group(1))
                end = min(size, int(m.group(2)) + 1) if m.group(2) else size
            else:  # suffix: the last N bytes
                start = max(0, size - int(m.group(2)))
            if start >= size:
                writer.write(self._answer(416, b"", f"Content-Range: bytes */{size}\r\n"))
                return True
            self.ranged += 1
        with open(path, "rb") as f:
            f.seek(start)
            body = f.read(end - start)
        extra = "Accept-Ranges: bytes\r\nContent-Type: application/octet-stream\r\n"
        if rng:
            extra += f"Content-Range: bytes {start}-{end - 1}/{size}\r\n"
        writer.write(self._answer(206 if rng else 200, body, extra, send_body=method != "HEAD"))
        if method != "HEAD":
            self.sent += len(body)
        return True

    # ------------------------------------------------------------------ life
    def url(self, name: str = "") -> str:
        return f"http://127.0.0.1:{self.port}/{name}"

    def close(self) -> None:
        async def stop():
            self._server.close()
            if hasattr(self._server, "close_clients"):  # Python 3.13+
                self._server.close_clients()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)  # let them finish closing

        if self._loop.is_running():
            asyncio.run_coroutine_threadsafe(stop(), self._loop).result(10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        self._loop.close()

    def __enter__(self) -> "RangeServer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class RawServer:
    """A loopback server for malformed and hostile answers: each request (read up to its blank line) gets
    the next of ``answers``: bytes, sent as they are (the connection then stays open for the next
    request, unless they end with ``CLOSE``), or a function ``answer(sock, stop)`` that writes what it
    likes until it returns or ``stop`` (a threading.Event) is set (then the connection closes). One
    thread per connection; ``requests``: the raw requests read."""

    CLOSE = b"<close>"

    def __init__(self, answers: Iterable = ()):
        self.answers, self.requests = list(answers), []
        self.stop = threading.Event()
        self._lock = threading.Lock()
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(30)
        f = conn.makefile("rb")
        with conn, f:
            try:
                while not self.stop.is_set():
                    req = b""
                    while not req.endswith(b"\r\n\r\n"):
                        line = f.readline(65536)
                        if not line:
                            return
                        req += line
                    with self._lock:
                        self.requests.append(req.decode("latin-1"))
                        answer = self.answers.pop(0) if self.answers else b"HTTP/1.1 500 No answer left\r\n\r\n"
                    if callable(answer):
                        answer(conn, self.stop)
                        return
                    close = answer.endswith(self.CLOSE)  # (a view, not a copy: the client's memory is measured)
                    conn.sendall(memoryview(answer)[:len(answer) - len(self.CLOSE)] if close else answer)
                    if close:
                        return
            except OSError:
                return

    def url(self, name: str = "x.tar") -> str:
        return f"http://127.0.0.1:{self.port}/{name}"

    def close(self) -> None:
        self.stop.set()
        self.sock.close()

    def __enter__(self) -> "RawServer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def trickle(head: bytes, every: float = 0.2, byte: bytes = b"x"):
    """An answer: ``head``, then one ``byte`` every ``every`` seconds, for ever (a slow or endless server)."""
    def answer(sock: socket.socket, stop: threading.Event) -> None:
        sock.sendall(head)
        while not stop.wait(every):
            sock.sendall(byte)
    return answer


def endless(head: bytes, chunk: bytes = b"\0" * (1 << 20)):
    """An answer: ``head``, then ``chunk`` again and again until the client goes away."""
    def answer(sock: socket.socket, stop: threading.Event) -> None:
        sock.sendall(head)
        while not stop.is_set():
            sock.sendall(chunk)
    return answer


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

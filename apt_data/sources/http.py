"""`HTTPRanges`: ranged GETs over plain keep-alive HTTP/1.1 connections (sockets of the standard library).

Why not fsspec's HTTP file system for the per-sample reads: its synchronous calls hand every request
to an asyncio event-loop thread and wait for it, which costs a loader worker about 1 ms of CPU and
GIL hand-offs per request. Why not `http.client`: its header parsing (the e-mail parser) costs twice
the CPU of the whole request here. A loader worker makes one request per sample of a shuffled epoch,
on the same cores that decode, so each read-ahead thread owns one blocking connection per host, kept
alive and reused, speaks just the HTTP/1.1 a ranged GET needs (Content-Length, chunked and
close-delimited bodies, redirects, TLS through `ssl`), and its socket waits release the GIL. The bytes
it returns are checked by the shard reader against the index's sizes and CRC32C checksums.
`apt_data.sources.remote_files.RemoteFiles` uses it for ``http://`` and ``https://`` shard URLs (unless
``storage_options`` hold more than ``headers``); other schemes go through fsspec.

Errors, as `remote_files._retrying` expects them: 404/410 raise `FileNotFoundError`, 401/403
`PermissionError` (permanent: not retried); other statuses `HTTPStatusError` (an OSError with
``status``); a broken connection, a malformed answer or a short body an `OSError` (transient: retried
by the caller). A request on a reused connection that the server had closed meanwhile (idle
keep-alive) is sent once more on a new connection at once, as browsers and urllib3 do. Redirects
(301/302/303/307/308) are followed, at most 5.
"""
from __future__ import annotations

import os
import socket
import ssl
import threading
from typing import Optional
from urllib.parse import urljoin, urlsplit

__all__ = ["HTTPRanges", "HTTPStatusError"]

_REDIRECTS = (301, 302, 303, 307, 308)
_MAX_LINE = 65536


class _Stale(ConnectionResetError):
    """The server closed the connection before answering (on a reused connection: it was idle)."""


class _Connection:
    """One blocking HTTP/1.1 connection: `request` sends a GET and reads the whole answer."""

    def __init__(self, scheme: str, netloc: str, timeout: float):
        parts = urlsplit(f"{scheme}://{netloc}")
        host = parts.hostname or ""
        port = parts.port or (443 if scheme == "https" else 80)
        sock = socket.create_connection((host, port), timeout=timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if scheme == "https":
            sock = ssl.create_default_context().wrap_socket(sock, server_hostname=host)
        self.sock, self.rfile = sock, sock.makefile("rb")
        self.host = netloc.rsplit("@", 1)[-1]

    def close(self) -> None:
        self.rfile.close()
        self.sock.close()

    def _line(self) -> bytes:
        line = self.rfile.readline(_MAX_LINE + 1)
        if len(line) > _MAX_LINE:
            raise OSError("HTTP answer line too long")
        return line

    def request(self, target: str, headers: dict) -> tuple[int, str, dict, bytes, bool]:
        """(status, reason, headers (lower-case names), body, the server closes the connection)."""
        text = f"GET {target} HTTP/1.1\r\nHost: {self.host}\r\nAccept-Encoding: identity\r\n"
        text += "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        try:
            self.sock.sendall((text + "\r\n").encode("latin-1"))
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError) as e:
            raise _Stale(f"connection closed before the request was sent: {e}") from e
        first = True
        while True:  # skip interim (1xx) answers
            try:
                line = self._line()
            except ConnectionResetError as e:
                if first:
                    raise _Stale(str(e)) from e
                raise
            if not line:
                raise _Stale("the server closed the connection without an answer")
            first = False
            try:
                version, status_text, *rest = line.decode("latin-1").split(None, 2)
                status = int(status_text)
            except ValueError:
                raise OSError(f"malformed HTTP status line {line[:80]!r}") from None
            if not version.startswith("HTTP/"):
                raise OSError(f"malformed HTTP status line {line[:80]!r}")
            head: dict[str, str] = {}
            while True:
                h = self._line()
                if not h:
                    raise OSError("connection closed in the answer's headers")
                if h in (b"\r\n", b"\n"):
                    break
                k, _, v = h.decode("latin-1").partition(":")
                head[k.strip().lower()] = v.strip()
            if not 100 <= status < 200:
                break
        close = head.get("connection", "").lower() == "close" or (
            version == "HTTP/1.0" and head.get("connection", "").lower() != "keep-alive")
        if "chunked" in head.get("transfer-encoding", "").lower():
            body = self._chunked()
        elif "content-length" in head:
            n = int(head["content-length"])
            body = self.rfile.read(n)
            if len(body) != n:
                raise OSError(f"short HTTP body: {len(body)} of {n} bytes")
        elif status in (204, 304):
            body = b""
        else:  # the body runs to the end of the connection
            body, close = self.rfile.read(), True
        return status, rest[0].strip() if rest else "", head, body, close

    def _chunked(self) -> bytes:
        parts = []
        while True:
            line = self._line()
            try:
                n = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                raise OSError(f"malformed chunk size {line[:40]!r}") from None
            if n == 0:
                while self._line() not in (b"\r\n", b"\n", b""):  # trailers
                    pass
                return b"".join(parts)
            chunk = self.rfile.read(n + 2)
            if len(chunk) != n + 2:
                raise OSError("short HTTP chunk")
            parts.append(chunk[:n])


class HTTPStatusError(OSError):
    """An HTTP answer other than 200/206 (``status``: its code)."""

    def __init__(self, url: str, status: int, reason: str = ""):
        super().__init__(f"{url}: HTTP {status} {reason}".rstrip())
        self.status = status


class HTTPRanges:
    """``get(url, start, end)``: bytes ``[start, end)`` of ``url`` (fewer at its end), over one
    keep-alive connection per thread and host, made in the process that reads (never inherited
    through a fork). ``headers``: sent with every request (e.g. an ``Authorization``)."""

    def __init__(self, headers: Optional[dict] = None, timeout: float = 60.0):
        self.headers = {str(k): str(v) for k, v in (headers or {}).items()}
        self.timeout = float(timeout)
        self._local = threading.local()

    def __getstate__(self):
        return {"headers": self.headers, "timeout": self.timeout}

    def __setstate__(self, state):
        self.__init__(**state)

    def _pool(self) -> dict:
        loc = self._local
        if getattr(loc, "pid", None) != os.getpid():  # a forked child: its parent's sockets are not its own
            loc.pid, loc.conns = os.getpid(), {}
        return loc.conns

    def _connection(self, scheme: str, netloc: str) -> tuple[_Connection, bool]:
        """(connection, reused) for ``scheme://netloc`` in this thread."""
        if scheme not in ("http", "https"):
            raise ValueError(f"HTTPRanges reads http:// and https:// URLs, not {scheme}://")
        pool = self._pool()
        conn = pool.get((scheme, netloc))
        if conn is not None:
            return conn, True
        conn = pool[(scheme, netloc)] = _Connection(scheme, netloc, self.timeout)
        return conn, False

    def _discard(self, scheme: str, netloc: str) -> None:
        conn = self._pool().pop((scheme, netloc), None)
        if conn is not None:
            conn.close()

    def _request(self, url: str, headers: dict) -> tuple[int, str, dict, bytes]:
        """One GET of ``url``: (status, reason, headers (lower-case names), body), read to its end."""
        parts = urlsplit(url)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        for attempt in (0, 1):
            conn, reused = self._connection(parts.scheme, parts.netloc)
            try:
                status, reason, head, body, close = conn.request(target, headers)
            except _Stale:
                self._discard(parts.scheme, parts.netloc)
                if reused and attempt == 0:  # the server closed it while idle: once more, on a new one
                    continue
                raise
            except BaseException:
                self._discard(parts.scheme, parts.netloc)
                raise
            if close:
                self._discard(parts.scheme, parts.netloc)
            return status, reason, head, body
        raise AssertionError("unreachable")

    def get(self, url: str, start: Optional[int] = None, end: Optional[int] = None) -> bytes:
        """Bytes ``[start, end)`` of ``url`` (the whole object when both are None)."""
        headers = dict(self.headers)
        if start is not None or end is not None:
            lo = int(start or 0)
            if end is not None and int(end) <= lo:
                return b""
            headers["Range"] = f"bytes={lo}-" + ("" if end is None else str(int(end) - 1))
        where = url
        for _ in range(6):
            status, reason, head, body = self._request(where, headers)
            if status in _REDIRECTS and "location" in head:
                where = urljoin(where, head["location"])
                continue
            if status == 206:
                return body
            if status == 200:  # the server ignored the Range header: it sent the whole object
                return body if "Range" not in headers else body[int(start or 0):None if end is None else int(end)]
            if status == 416:  # the range starts at or past the end
                return b""
            error = HTTPStatusError(url, status, reason)
            if status in (404, 410):
                raise FileNotFoundError(str(error))
            if status in (401, 403):
                raise PermissionError(str(error))
            raise error
        raise HTTPStatusError(url, 310, "too many redirects")

    def close(self) -> None:
        """Close this thread's connections."""
        for key in list(self._pool()):
            self._discard(*key)

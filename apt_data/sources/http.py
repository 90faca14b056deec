"""`HTTPRanges`: ranged GETs over plain keep-alive connections (the standard library's `http.client`).

Why not fsspec's HTTP file system for the per-sample reads: its synchronous calls hand every request
to an asyncio event-loop thread and wait for it, which costs a loader worker about 1 ms of CPU and
GIL hand-offs per request. Here each read-ahead thread owns one blocking connection per host, kept
alive and reused; the socket waits release the GIL. `apt_data.sources.remote.RemoteFiles` uses it for
``http://`` and ``https://`` shard URLs (unless ``storage_options`` hold more than ``headers``); other
schemes go through fsspec.

Errors, as `remote._retrying` expects them: 404/410 raise `FileNotFoundError`, 401/403
`PermissionError` (permanent: not retried); other statuses `HTTPStatusError` (an OSError with
``status``); a broken connection or a short body the `OSError` / `http.client.HTTPException` it is
(transient: retried by the caller). A request on a reused connection that the server had closed
meanwhile (idle keep-alive) is sent once more on a new connection at once, as browsers and urllib3
do. Redirects (301/302/303/307/308) are followed, at most 5.
"""
from __future__ import annotations

import http.client
import os
import ssl
import threading
from typing import Optional
from urllib.parse import urljoin, urlsplit

__all__ = ["HTTPRanges", "HTTPStatusError"]

_REDIRECTS = (301, 302, 303, 307, 308)
#: what a reused connection raises when the server closed it while it idled
_STALE = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError, ConnectionAbortedError)


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

    def _connection(self, scheme: str, netloc: str) -> tuple[http.client.HTTPConnection, bool]:
        """(connection, reused) for ``scheme://netloc`` in this thread."""
        pool = self._pool()
        conn = pool.get((scheme, netloc))
        if conn is not None:
            return conn, True
        if scheme == "https":
            conn = http.client.HTTPSConnection(netloc, timeout=self.timeout, context=ssl.create_default_context())
        elif scheme == "http":
            conn = http.client.HTTPConnection(netloc, timeout=self.timeout)
        else:
            raise ValueError(f"HTTPRanges reads http:// and https:// URLs, not {scheme}://")
        pool[(scheme, netloc)] = conn
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
                conn.request("GET", target, headers=headers)
                resp = conn.getresponse()
                body = resp.read()
            except _STALE:
                self._discard(parts.scheme, parts.netloc)
                if reused and attempt == 0:  # the server closed it while idle: once more, on a new one
                    continue
                raise
            except BaseException:
                self._discard(parts.scheme, parts.netloc)
                raise
            if resp.will_close:
                self._discard(parts.scheme, parts.netloc)
            return resp.status, resp.reason, {k.lower(): v for k, v in resp.getheaders()}, body
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
            if status in (404, 410):
                raise FileNotFoundError(f"{url}: HTTP {status} {reason}".rstrip())
            if status in (401, 403):
                raise PermissionError(f"{url}: HTTP {status} {reason}".rstrip())
            raise HTTPStatusError(url, status, reason)
        raise HTTPStatusError(url, 310, "too many redirects")

    def close(self) -> None:
        """Close this thread's connections."""
        for key in list(self._pool()):
            self._discard(*key)

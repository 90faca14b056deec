"""`HTTPReader`: ranged GETs through urllib3's connection pool, with a deadline and caps on what a server sends.

The range reader for ``http://`` and ``https://`` shards. urllib3's pools (keep-alive connections shared
by the read-ahead threads, TLS) and http.client (HTTP/1.1, chunked bodies) do the protocol (`_GetOnly`);
this module adds what a loader needs from a server it does not control (docs/scale-out.md, "What a server
can cost"): a deadline per request that every receive keeps to (`_GuardedIO`), caps on the headers
(`HEADER_BYTES`) and the body (the range asked; ``max_object`` for a whole object), a 206's Content-Range
checked, redirects followed here with credentials dropped on a hop elsewhere (`redirect_headers`), and a
server that ignores Range logged once and still read right (`HTTPReader._from_whole_file`). Why urllib3
and its cost per request: docs/benchmarks.md, "Shards over HTTP vs local disk".

Errors, as `apt_data.sources.readers.retrying` expects them: 404/410 raise `FileNotFoundError`,
401/403 `PermissionError` (permanent: not retried); other statuses `HTTPStatusError` (an OSError
with ``status``; 5xx, 408, 429 retried); a broken connection, a timeout, the deadline, a cap or a
malformed answer an `HTTPReadError` (an OSError, transient: retried). Every message names the URL.
"""
from __future__ import annotations

import http.client
import io
import logging
import re
import socket
import time
from dataclasses import dataclass
from typing import Optional
from urllib.parse import urljoin, urlsplit

import urllib3
from urllib3.util import Retry, parse_url

from .readers import IOCounters, PerProcess, RangeReader

log = logging.getLogger("apt_data.sources")

__all__ = ["HEADER_BYTES", "HTTPReadError", "HTTPReader", "HTTPStatusError"]

#: the cap on an answer's status line and headers together (bytes)
HEADER_BYTES = 32 * 1024
#: the read buffer of an answer (bytes)
BUFFER = 64 * 1024
_REDIRECTS = (301, 302, 303, 307, 308)
_DEFAULT_HEADERS = {"Accept-Encoding": "identity", "User-Agent": f"python-urllib3/{urllib3.__version__}"}
#: headers never sent to another origin or from https to http (urllib3's list for cross-host redirects)
_PRIVATE = frozenset(h.lower() for h in Retry.DEFAULT_REMOVE_HEADERS_ON_REDIRECT) | {"cookie", "authorization"}
#: statuses raised as the errors a missing or forbidden local file raises (permanent: not retried)
_PERMANENT = {404: FileNotFoundError, 410: FileNotFoundError, 401: PermissionError, 403: PermissionError}
_CONTENT_RANGE = re.compile(r"\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*", re.I)


class HTTPStatusError(OSError):
    """An HTTP answer other than 200/206 (``status``: its code)."""

    def __init__(self, url: str, status: int, reason: str = ""):
        super().__init__(f"{url}: HTTP {status} {reason}".rstrip())
        self.status = status


class HTTPReadError(OSError):
    """No usable answer: a broken connection, a timeout, the deadline, a cap or a malformed answer."""


@dataclass(slots=True)
class _Limits:
    """What the answer to one request may still cost: seconds (``deadline``, monotonic) and bytes."""

    deadline: float
    budget: int
    read_timeout: float


class _GuardedIO(io.RawIOBase):
    """The socket under one answer: each receive waits at most until the deadline and reads at most
    the bytes left in the budget. ``makefile`` is what http.client's response reads from: this, buffered
    by `BUFFER` bytes (an answer's headers and a sample's bytes in one receive, where they have arrived).
    The socket's timeout is set once per answer (the read timeout), and on each receive near the deadline."""

    def __init__(self, sock: socket.socket, limits: _Limits):
        self.sock, self.raw, self.limits = sock, sock.makefile("rb", buffering=0), limits  # (raw: keeps it open)
        self.timeout = sock.gettimeout()

    def makefile(self, mode: str = "rb") -> io.BufferedReader:
        return io.BufferedReader(self, BUFFER)

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        lim = self.limits
        left = lim.deadline - time.monotonic()
        timeout = lim.read_timeout if lim.read_timeout < left else left
        if timeout != self.timeout:
            if timeout <= 0:
                raise TimeoutError("the request's deadline passed")
            self.sock.settimeout(timeout)
            self.timeout = timeout
        if lim.budget <= 0:
            raise HTTPReadError("the answer is larger than its cap")
        n = self.sock.recv_into(b, min(len(b), lim.budget))
        lim.budget -= n
        return n

    def close(self) -> None:
        self.raw.close()
        super().close()


class _GetOnly:
    """A connection pool's plain GET: urllib3's pooled connection (TLS, certificates), the request and its
    answer through http.client's own `request` and `getresponse`. Skipped: `urlopen`'s retries, redirects,
    proxies and response wrapper (the reader does what it needs itself): half the CPU per request."""

    def get(self, target: str, headers: dict, limits: _Limits, connect_timeout: float):
        """(http.client's answer to ``GET target``, read within ``limits``, its body unread; the connection
        it holds until `done`)."""
        conn = self._get_conn()
        try:
            self.num_requests += 1
            conn.timeout = connect_timeout  # connecting and sending (the answer: `_GuardedIO`)
            if conn.sock is not None:
                conn.sock.settimeout(connect_timeout)
            try:
                http.client.HTTPConnection.request(conn, "GET", target, headers=headers)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the server closed its side after answering (as in urlopen: the answer is still read)
            conn.response_class = lambda sock, **kw: http.client.HTTPResponse(_GuardedIO(sock, limits), **kw)
            return http.client.HTTPConnection.getresponse(conn), conn
        except BaseException:
            conn.close()
            self._put_conn(conn)
            raise

    def done(self, conn, resp) -> None:
        """Hand ``conn`` back to the pool: reusable when ``resp`` was read to its end, else closed."""
        if not resp.isclosed():
            resp.close()  # an answer not read to its end (a redirect, an error, a cap): the connection goes
            conn.close()
        self._put_conn(conn)


class _HTTPPool(_GetOnly, urllib3.HTTPConnectionPool):
    pass


class _HTTPSPool(_GetOnly, urllib3.HTTPSConnectionPool):
    pass


def _origin(url: str) -> tuple:
    p = urlsplit(url)
    return p.scheme, p.hostname, p.port or (443 if p.scheme == "https" else 80)


def redirect_headers(headers: dict, old: str, new: str) -> dict:
    """``headers`` for the hop from ``old`` to ``new``: without credentials when ``new`` is on another
    host or port (an upgrade from http on port 80 to https on 443 keeps them, as in requests) or the
    hop goes from https to http."""
    o, n = _origin(old), _origin(new)
    upgrade = o == ("http", n[1], 80) and n[0] == "https" and n[2] == 443
    if (o[1:] != n[1:] and not upgrade) or (o[0] == "https" and n[0] != "https"):
        return {k: v for k, v in headers.items() if k.lower() not in _PRIVATE}
    return headers


def _content_length(resp, url: str, most: int) -> Optional[int]:
    """The answer's Content-Length (None: none given); a malformed, negative or longer-than-``most`` one raises."""
    raw = resp.headers.get_all("content-length")  # (every one, when repeated)
    if raw is None or resp.chunked:  # (http.client's reading of Transfer-Encoding)
        return None
    values = {v.strip() for line in raw for v in line.split(",")}
    value = values.pop() if len(values) == 1 else ""
    if not (value.isascii() and value.isdigit()):
        raise HTTPReadError(f"{url}: malformed Content-Length {', '.join(raw)[:40]!r}")
    n = int(value)
    if n > most:
        raise HTTPReadError(f"{url}: Content-Length {n} is more than the {most} bytes asked for")
    return n


def _content_range(resp, url: str, start: int, end: int) -> int:
    """The bytes a 206 answer to ``bytes=start-(end-1)`` holds, from its Content-Range (RFC 9110: required):
    from ``start``, up to ``end`` or the end of the file."""
    raw = ", ".join(resp.headers.get_all("content-range") or ())  # (two: invalid)
    m = _CONTENT_RANGE.fullmatch(raw)
    if m is None:
        raise HTTPReadError(f"{url}: a 206 answer without a valid Content-Range ({raw[:60]!r})")
    first, last, total = int(m.group(1)), int(m.group(2)), m.group(3)
    ends_file = total != "*" and last == int(total) - 1
    if first != start or not first <= last <= end - 1 or (last < end - 1 and not ends_file):
        raise HTTPReadError(f"{url}: answered bytes {first}-{last}/{total} for bytes {start}-{end - 1}")
    return last - first + 1


def _read_body(resp, n: int, url: str) -> bytes:
    """At most ``n`` bytes of the body, which must end there: more is an error, never read."""
    parts, got = [], 0
    while got <= n:
        ask = min(n + 1 - got, 1 << 20)
        chunk = resp.read(ask)
        parts.append(chunk)
        got += len(chunk)
        if len(chunk) < ask:  # (http.client returns fewer bytes than asked only at the end of the body)
            break
    if got > n:
        raise HTTPReadError(f"{url}: the answer is longer than the {n} bytes asked for")
    return b"".join(parts)


class HTTPReader(PerProcess, RangeReader):
    """``read(url, start, end)``: bytes ``[start, end)`` of ``url`` (fewer at its end) over urllib3's
    pools, one pool manager per process (never inherited through a fork). ``headers``: sent with every
    request (e.g. an ``Authorization``; dropped on redirects elsewhere). ``counters``: where a server
    that ignores Range is counted (``range_ignored``; logged at the first). See the module doc."""

    def __init__(self, headers: Optional[dict] = None, *, deadline: float = 120.0, connect_timeout: float = 10.0,
                 read_timeout: float = 30.0, max_object: int = 4 << 30, pool_size: int = 32,
                 counters: Optional[IOCounters] = None):
        self.headers = {str(k): str(v) for k, v in (headers or {}).items()}
        own = {k.lower() for k in self.headers}  # what every request sends: these, and defaults they do not set
        self._headers = {k: v for k, v in _DEFAULT_HEADERS.items() if k.lower() not in own} | self.headers
        self.deadline, self.connect_timeout = float(deadline), float(connect_timeout)
        self.read_timeout, self.max_object, self.pool_size = float(read_timeout), int(max_object), int(pool_size)
        if min(self.deadline, self.connect_timeout, self.read_timeout) <= 0:
            raise ValueError("HTTPReader: deadline, connect_timeout and read_timeout must be positive seconds")
        self.counters = counters if counters is not None else IOCounters()

    def _new_state(self) -> tuple[urllib3.PoolManager, dict]:
        """(this process's pool manager, URL -> (its origin's connection pool, the request target))."""
        pm = urllib3.PoolManager(num_pools=16, maxsize=self.pool_size, block=False, retries=False)
        pm.pool_classes_by_scheme = {"http": _HTTPPool, "https": _HTTPSPool}
        return pm, {}

    def _pool(self) -> urllib3.PoolManager:
        return self._state()[0]

    def close(self) -> None:
        st = self._made_here()
        if st is not None:
            st[0].clear()
            st[1].clear()

    def _route(self, url: str) -> tuple:
        """(the connection pool of ``url``'s scheme, host and port; the request target, percent-encoded):
        parsed once per URL (a shard is read many times), not per request."""
        pm, routes = self._state()
        route = routes.get(url)
        if route is None or route[0].pool is None:  # (or a pool the manager closed: over 16 origins in use)
            p = parse_url(url)
            if p.scheme not in ("http", "https"):
                raise ValueError(f"{url}: HTTPReader reads http:// and https:// URLs, not {p.scheme}://")
            if len(routes) >= 4096:  # (then all are dropped and parsed again)
                routes.clear()
            route = routes[url] = (pm.connection_from_host(p.host, p.port, p.scheme), p.request_uri)
        return route

    # -------------------------------------------------------------- requests
    def _get(self, url: str, start: Optional[int] = None, end: Optional[int] = None) -> bytes:
        """Bytes ``[start, end)`` of ``url`` (the whole object when ``start`` is None), redirects followed."""
        headers = self._headers if start is None else {**self._headers, "Range": f"bytes={start}-{end - 1}"}
        deadline = time.monotonic() + self.deadline
        where = url
        for _ in range(6):
            resp, limits = None, _Limits(deadline, HEADER_BYTES, self.read_timeout)
            try:
                pool, target = self._route(where)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("the request's deadline passed")
                resp, conn = pool.get(target, headers, limits, min(self.connect_timeout, left))
                if resp.status in _REDIRECTS and resp.headers.get("location"):
                    nxt = urljoin(where, resp.headers["location"])
                    headers, where = redirect_headers(headers, where, nxt), nxt
                    continue
                return self._answer(resp, limits, url, where, start, end)
            except (HTTPStatusError, FileNotFoundError, PermissionError):
                raise
            except Exception as e:  # noqa: BLE001 - urllib3, http.client and socket errors alike
                if isinstance(e, ValueError) and not isinstance(e, OSError):  # (ssl's errors are both)
                    raise  # a URL that cannot work (not http(s), malformed): permanent
                raise self._failure(e, url, deadline, limits) from e
            finally:
                if resp is not None:
                    pool.done(conn, resp)
        raise HTTPStatusError(url, 310, "too many redirects")

    def _failure(self, e: BaseException, url: str, deadline: float, limits: _Limits) -> HTTPReadError:
        """The error to raise for ``e`` (the deadline, a cap, or what went wrong), naming ``url``."""
        if time.monotonic() >= deadline:
            return HTTPReadError(f"{url}: no whole answer within the request's deadline of {self.deadline:g} s")
        if limits.budget <= 0:
            return HTTPReadError(f"{url}: the answer is larger than its cap (headers at most {HEADER_BYTES} bytes, "
                                 f"the body at most the bytes asked for)")
        if isinstance(e, HTTPReadError):
            return e
        return HTTPReadError(f"{url}: {type(e).__name__}: {e}")

    def _answer(self, resp, limits: _Limits, url: str, where: str, start: Optional[int], end: Optional[int]) -> bytes:
        status = resp.status
        if status == 416 and start is not None:  # the range starts at or past the end
            return b""
        if status not in (200, 206):
            error = HTTPStatusError(where if where == url else f"{url} (redirected to {where})", status, resp.reason)
            raise _PERMANENT[status](str(error)) if status in _PERMANENT else error
        if start is None:  # the whole object
            size = _content_length(resp, url, self.max_object)
            limits.budget += self.max_object + HEADER_BYTES
            data = _read_body(resp, self.max_object, url)
        elif status == 206:
            size = _content_range(resp, url, start, end)
            if _content_length(resp, url, end - start) not in (None, size):
                raise HTTPReadError(f"{url}: Content-Length {resp.headers['content-length']} for a Content-Range of "
                                    f"{size} bytes")
            limits.budget += size + max(65536, size // 8)  # the body, plus chunked framing
            data = _read_body(resp, size, url)
        else:  # 200 to a ranged request: the server ignored Range and sends the whole file
            data, size = self._from_whole_file(resp, limits, url, start, end)
        if size is not None and len(data) != size:
            raise HTTPReadError(f"{url}: a short answer ({len(data)} of {size} bytes)")
        return data

    def _from_whole_file(self, resp, limits: _Limits, url: str, start: int, end: int) -> tuple[bytes, Optional[int]]:
        """(bytes ``[start, end)`` of a whole file sent for a ranged request, their number when known):
        the file's start read and dropped, its rest left unread (the connection is then closed)."""
        if self.counters.add("range_ignored") == 1:
            log.warning("%s: the server ignores HTTP Range requests (it answered 200 with the whole file): every "
                        "sample read now downloads its shard from the first byte up to the sample (half a shard per "
                        "sample on average) on a new connection; serve the shards with a server that supports Range "
                        "(docs/scale-out.md lists some)", url)
        total = _content_length(resp, url, self.max_object)
        limits.budget += end + max(65536, end // 8)
        skipped = 0
        while skipped < start:
            chunk = resp.read(min(start - skipped, 1 << 20))
            if not chunk:
                break
            skipped += len(chunk)
        data = resp.read(end - start) if skipped == start else b""
        return data, None if total is None else max(0, min(end, total) - start)

    # -------------------------------------------------------------- the reader
    def read(self, name: str, start: int, end: int) -> bytes:
        if end <= start:
            return b""
        return self._get(name, int(start), int(end))

    def read_all(self, name: str) -> bytes:
        """The whole object ``name`` (at most ``max_object`` bytes)."""
        return self._get(name)

    def exists(self, name: str) -> bool:
        """Is there an object at ``name`` (its first byte read; 404 or 410: no)?"""
        try:
            self._get(name, 0, 1)
        except FileNotFoundError:
            return False
        return True

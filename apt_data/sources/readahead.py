"""`ReadAhead`: reads the spans a process will need next (`read_order`) in a small thread pool, up to
``readahead`` spans ahead, in chunks so that neighbouring spans of one file share a request."""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Optional, Sequence, Union

import numpy as np

from ..shards.reader import BLOCK
from .cache import parse_size
from .readers import IOCounters, PerProcess, RangeReader, Span

__all__ = ["ReadAhead"]


class ReadAhead(PerProcess, RangeReader):
    """Read ahead along `read_order` (or `prefetch`); ``merge_gap``: spans of one file at most this far
    apart share a request; ``readahead`` defaults to ``8 * inflight``."""

    def __init__(self, inner: RangeReader, inflight: int = 16, readahead: Optional[int] = None,
                 readahead_bytes: Union[int, str] = "64MB", merge_gap: int = 4 * BLOCK,
                 counters: Optional[IOCounters] = None):
        self.inner = inner
        self.inflight = max(0, int(inflight))
        self.readahead = 8 * self.inflight if readahead is None else int(readahead)
        self.readahead_bytes = parse_size(readahead_bytes)
        self.merge_gap = int(merge_gap)
        self.counters = counters if counters is not None else getattr(inner, "counters", None)

    @property
    def reads_ahead(self) -> bool:
        return self.inflight > 0 and self.readahead > 0

    def _new_state(self) -> dict:
        # pending: span -> (merged span, future); order: (spans, {span: position}, [read ahead up to], skip)
        return {"pool": None, "pending": {}, "order": None}

    def close(self) -> None:
        st = self._made_here()
        if st is not None and st["pool"] is not None:
            st["pool"].shutdown(wait=False, cancel_futures=True)
            st["pool"] = None
        self.inner.close()

    # -------------------------------------------------------------- scheduling
    def read_order(self, spans: Sequence[Span], skip: Optional[Callable[[Span], bool]] = None) -> None:
        st = self._state()
        where = {s: k for k, s in reversed(list(enumerate(spans)))}  # (a span's first place)
        for s in [s for s in st["pending"] if s not in where]:  # a new epoch's order: drop the rest
            self._drop(st, s)
        st["order"] = (list(spans), where, [0], skip)

    def prefetch(self, spans: Sequence[Span], skip: Optional[Callable[[Span], bool]] = None) -> None:
        """Start reading ``spans`` (those ``skip`` accepts: not) in the background, neighbours merged."""
        if not self.inflight:
            return
        st = self._state()
        pending = st["pending"]
        todo = [s for s in dict.fromkeys(spans) if s not in pending and (skip is None or not skip(s))]
        if not todo:
            return
        if st["pool"] is None:
            st["pool"] = ThreadPoolExecutor(self.inflight, thread_name_prefix="apt-readahead")
        first = {s: k for k, s in enumerate(todo)}
        groups: list[list[Span]] = []
        for s in sorted(todo, key=lambda s: (s[0], s[1])):
            g = groups[-1] if groups else None
            if g is not None and g[-1][0] == s[0] and s[1] - max(x[2] for x in g) <= self.merge_gap:
                g.append(s)
            else:
                groups.append([s])
        groups.sort(key=lambda g: min(first[x] for x in g))  # submitted in the order they are needed
        for g in groups:
            merged = (g[0][0], g[0][1], max(x[2] for x in g))
            fut: Future = st["pool"].submit(self.inner.read, *merged)
            if len(g) > 1 and self.counters is not None:
                self.counters.add("merged", len(g) - 1)
            for s in g:
                pending[s] = (merged, fut)

    def _advance(self, st: dict, span: Span) -> None:
        """``span`` is read now: keep the next chunk of the order read ahead."""
        order = st["order"]
        if order is None or not self.reads_ahead:
            return
        spans, where, upto, skip = order
        k = where.get(span)
        # read ahead in chunks (when half the read-ahead is used up), not one span a time: the spans of
        # a chunk lying next to each other in a file (an unshuffled plan) share a request
        if k is not None and k + 1 + self.readahead // 2 > upto[0]:
            chunk = spans[k:k + 1 + self.readahead]
            size = np.cumsum([s[2] - s[1] for s in chunk])
            chunk = chunk[:max(1, int(np.searchsorted(size, self.readahead_bytes, side="right")))]
            self.prefetch(chunk, skip)
            upto[0] = k + len(chunk)

    @staticmethod
    def _drop(st: dict, span: Span) -> None:
        """Forget the read-ahead of ``span``; cancel its read unless it is merged with spans still pending."""
        ahead = st["pending"].pop(span, None)
        if ahead is not None and not any(v[1] is ahead[1] for v in st["pending"].values()):
            ahead[1].cancel()

    # -------------------------------------------------------------- reads
    def passed(self, span: Span) -> None:
        st = self._state()
        self._advance(st, span)
        self._drop(st, span)
        self.inner.passed(span)

    def read(self, name: str, start: int, end: int) -> bytes:
        """From the read-ahead when it covers the span, else one read now."""
        st = self._state()
        span = (name, start, end)
        self._advance(st, span)
        ahead = st["pending"].pop(span, None)
        if ahead is not None:
            (_, a_start, a_end), fut = ahead
            if a_start <= start and end <= a_end and not fut.cancelled():
                data = fut.result()  # raises the read's OSError after its retries
                return data[start - a_start:end - a_start]
        return self.inner.read(name, start, end)

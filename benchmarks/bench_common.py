"""What the benchmarks share: the checkout's root (for the sample data) and a CPU clock over a
process and its loader workers.

Each benchmark runs as ``python benchmarks/bench_x.py`` from the checkout: Python puts the script's
folder first on the import path, so ``from bench_common import ...`` finds this module without any
path editing, and ``apt_*`` come from the installed packages.
"""
from __future__ import annotations

import os
import resource
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the checkout: shards/, tests/data/images, ../shared


def _live_children() -> dict[int, float]:
    """CPU seconds (user + system) of this process's live child processes, by pid (Linux /proc)."""
    me, tick, out = os.getpid(), os.sysconf("SC_CLK_TCK"), {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == me:  # fields[0] is the state; then ppid, ...; utime, stime are fields 14, 15 of stat
            out[int(d)] = (int(fields[11]) + int(fields[12])) / tick
    return out


class CpuClock:
    """CPU time of this process and its children (the loaders' workers) between `start` and `stop`:
    finished children through getrusage, live ones (persistent workers) through /proc."""

    @staticmethod
    def _own() -> tuple[float, float]:
        me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return me.ru_utime + me.ru_stime, kids.ru_utime + kids.ru_stime

    def start(self) -> None:
        self.me, self.reaped = self._own()
        self.live = _live_children()

    def stop(self) -> float:
        me, reaped = self._own()
        live = _live_children()
        # a child alive at start and reaped since counts in `reaped` with its CPU before `start` too
        gone = sum(c for pid, c in self.live.items() if pid not in live)
        return (me - self.me) + (reaped - self.reaped - gone) + sum(c - self.live.get(pid, 0.0)
                                                                     for pid, c in live.items())

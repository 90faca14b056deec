"""Bad data in shards: one error type, one counter, and the single place that decides between them
(``strict``: raise `ShardDataError`; else log, count in `ShardStats` and skip)."""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional

log = logging.getLogger("apt_data.shards")

__all__ = ["ShardDataError", "ShardStats", "Skipped", "report_bad"]


class ShardDataError(ValueError):
    """Bad data in a shard or source (``strict=True``): names the shard (or file) and the key."""

    def __init__(self, shard: str, key: Optional[str], reason: str, detail: str = ""):
        self.shard, self.key, self.reason, self.detail = shard, key, reason, detail
        super().__init__(f"{shard}: sample {key!r}: {reason}" + (f" ({detail})" if detail else ""))

    def __reduce__(self):  # survives a multiprocessing round trip
        return (self.__class__, (self.shard, self.key, self.reason, self.detail))


@dataclass(frozen=True)
class Skipped:
    """One sample left out: where, which, why."""

    shard: str
    key: Optional[str]
    reason: str
    detail: str = ""


@dataclass
class ShardStats:
    """What a non-strict reader or build left out: ``skipped`` by reason, ``events`` one `Skipped` each."""

    samples: int = 0
    skipped: Counter = field(default_factory=Counter)
    events: list = field(default_factory=list)

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    def skip(self, shard: str, key: Optional[str], reason: str, detail: str = "") -> None:
        self.skipped[reason] += 1
        self.events.append(Skipped(str(shard), key, reason, detail))

    def summary(self) -> str:
        """One line: ``kept N, skipped M (reason=count, ...)``."""
        reasons = ", ".join(f"{r}={n}" for r, n in sorted(self.skipped.items()))
        return f"kept {self.samples}, skipped {self.num_skipped}" + (f" ({reasons})" if reasons else "")


def report_bad(shard: str, key: Optional[str], reason: str, detail: str, strict: bool,
               stats: Optional[ShardStats]) -> None:
    """Raise `ShardDataError` (``strict``) or log and count one bad sample; returns None for the caller to return."""
    if strict:
        raise ShardDataError(str(shard), key, reason, detail)
    where = f"sample {key!r} in {shard}" if key is not None else f"the rest of {shard}"
    log.warning("skipping %s: %s%s", where, reason, f" ({detail})" if detail else "")
    if stats is not None:
        stats.skip(str(shard), key, reason, detail)

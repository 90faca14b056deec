"""metrics.jsonl: the run's records, one JSON object per line, written as they happen and read back."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional, Union

from .checkpoint import atomic_write_text

PathLike = Union[str, os.PathLike]

__all__ = ["MetricsWriter", "read_jsonl"]

def read_jsonl(path: PathLike) -> list[dict]:
    """Every object of a JSONL file."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


class MetricsWriter:
    """Append-only JSONL, one object per line, flushed per line (a killed run loses at most the line
    being written). On resume, records past the resumed step are dropped first (atomic rewrite), so
    the file reads as one uninterrupted run."""

    def __init__(self, path: PathLike, resume_step: Optional[int] = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():
            keep = []
            with open(self.path) as f:
                for line in f:
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError:  # a line cut by the kill
                        continue
                    if int(rec.get("step", 0)) <= resume_step:
                        keep.append(json.dumps(rec) + "\n")
            atomic_write_text(self.path, "".join(keep))
        elif resume_step is None and self.path.exists():
            self.path.unlink()
        self._f = open(self.path, "a")

    def write(self, record: dict) -> None:
        self._f.write(json.dumps(record, allow_nan=True) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()

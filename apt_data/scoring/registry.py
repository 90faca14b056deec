"""The scorer registry: one `Scorer` record per name, the only place the rest of apt_data learns about scorers.

A scorer's module calls `register_scorer` with its pyramid kernel, NumPy reference, optional fused
layout kernel and default thresholds; so a new scorer is one module. Registrations are per process:
with the spawn start method, workers must import the registering module too.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Callable, Optional

import numpy as np

#: ``pyramid(image, patch_size, num_scales, first, flat, offsets) -> None``: write scale ``s``'s
#: map (float32, row-major, shape ``(H // (p*2**s), W // (p*2**s))``) to ``flat[offsets[s]:offsets[s+1]]``
#: for every ``s >= first`` (``first`` is 0 or 1; scale 0 is never read by the selection).
#: ``image`` is a checked uint8 HxW or HxWx3 array (`check_image`) with at least one whole base patch.
PyramidKernel = Callable[[np.ndarray, int, int, int, np.ndarray, np.ndarray], None]
#: ``reference(image, patch_size, num_scales) -> list of float32 maps`` in plain NumPy (tests only).
ReferenceScorer = Callable[[np.ndarray, int, int], "list[np.ndarray]"]
#: ``layout_kernel(image, patch_size, num_scales, thresholds, hs, ws, offsets) -> flat`` (float32,
#: ``offsets[-1]`` entries): for every scale >= 1 patch the coarsest-first selection reads, a score on
#: the same side of its threshold as the exact score; other entries are never read. ``thresholds``
#: is float64 ``[max(1, num_scales - 1)]``; ``hs``, ``ws``, ``offsets``: int64 grid shapes and offsets.
LayoutKernel = Callable[..., np.ndarray]


@dataclass(frozen=True)
class Scorer:
    """One registered scorer (see the module docstring and the kernel type aliases for the contracts)."""

    name: str
    pyramid: PyramidKernel
    reference: ReferenceScorer
    #: ``{num_scales: thresholds}`` in the scorer's units; ``num_scales == 1`` needs none (always ``()``).
    default_thresholds: Mapping[int, tuple[float, ...]]
    layout_kernel: Optional[LayoutKernel] = None
    units: str = ""
    description: str = ""
    builtin: bool = field(default=False, repr=False)

    def thresholds_for(self, num_scales: int) -> tuple[float, ...]:
        """Default thresholds for ``num_scales`` scales; ValueError when the scorer has none."""
        if num_scales == 1:
            return ()
        t = self.default_thresholds.get(num_scales)
        if t is None:
            known = ", ".join(str(n) for n in sorted(self.default_thresholds)) or "none"
            units = f" ({self.units})" if self.units else ""
            raise ValueError(
                f"scorer {self.name!r} has no default thresholds for num_scales={num_scales} (defaults exist for "
                f"num_scales: {known}); pass thresholds explicitly: {num_scales - 1} values in its units{units}")
        return t


_REGISTRY: dict[str, Scorer] = {}
_REFERENCES: dict[str, ReferenceScorer] = {}  # name -> reference, kept beside _REGISTRY


def as_numbers(value) -> Optional[tuple[float, ...]]:
    """``value`` as a tuple of floats; None for a string, a scalar or a sequence holding a non-number
    (strings too: ``float("5.5")`` would take one)."""
    if isinstance(value, (str, bytes)):
        return None
    try:
        items = tuple(value)
        return None if any(isinstance(v, (str, bytes)) for v in items) else tuple(float(v) for v in items)
    except (TypeError, ValueError):
        return None


def _check_thresholds(name: str, table: Mapping[int, Sequence[float]]) -> dict[int, tuple[float, ...]]:
    out = {}
    for n, t in dict(table).items():
        if isinstance(n, bool) or not isinstance(n, int) or n < 2:
            raise ValueError(f"scorer {name!r}: default thresholds are keyed by num_scales >= 2, got {n!r}")
        vals = as_numbers(t)
        if vals is None:
            raise ValueError(f"scorer {name!r}: default thresholds for num_scales={n} must be numbers, got {t!r}")
        if len(vals) != n - 1 or any(math.isnan(v) for v in vals):
            raise ValueError(f"scorer {name!r}: default thresholds for num_scales={n} need {n - 1} numbers, got {t!r}")
        out[n] = vals
    return out


def register_scorer(name: str, pyramid: PyramidKernel, reference: ReferenceScorer,
                    default_thresholds: Mapping[int, Sequence[float]], layout_kernel: Optional[LayoutKernel] = None,
                    units: str = "", description: str = "", replace: bool = False,
                    builtin: bool = False) -> Scorer:
    """Register a scorer under ``name`` and return its record; ``default_thresholds``: ``num_scales`` ->
    thresholds (e.g. ``{3: (5.5, 4.0)}``). A taken name is a ValueError unless ``replace`` (not built-ins)."""
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"scorer name must be an identifier-like string, got {name!r}")
    old = _REGISTRY.get(name)
    if old is not None and (old.builtin or not replace):
        raise ValueError(f"scorer {name!r} is already registered" + (" (built-in)" if old.builtin else
                                                                     "; pass replace=True to replace it"))
    for what, fn in (("pyramid", pyramid), ("reference", reference), ("layout_kernel", layout_kernel)):
        if fn is not None and not callable(fn):
            raise ValueError(f"scorer {name!r}: {what} must be callable, got {fn!r}")
    if pyramid is None or reference is None:
        raise ValueError(f"scorer {name!r}: pyramid and reference are required")
    scorer = Scorer(name=name, pyramid=pyramid, reference=reference,
                    default_thresholds=_check_thresholds(name, default_thresholds), layout_kernel=layout_kernel,
                    units=units, description=description, builtin=builtin)
    _REGISTRY[name], _REFERENCES[name] = scorer, reference
    return scorer


def unregister_scorer(name: str) -> Scorer:
    """Remove a registered (non built-in) scorer and return its record (tests use it to clean up)."""
    scorer = get_scorer(name)
    if scorer.builtin:
        raise ValueError(f"scorer {name!r} is built in and cannot be unregistered")
    del _REFERENCES[name]
    return _REGISTRY.pop(name)


def get_scorer(name: str) -> Scorer:
    """The record of a registered scorer; ValueError naming the registered ones otherwise."""
    scorer = _REGISTRY.get(name) if isinstance(name, str) else None
    if scorer is None:
        raise ValueError(f"unknown scorer {name!r}; choose one of {scorer_names()}")
    return scorer


def scorer_names() -> tuple[str, ...]:
    """Names of the registered scorers, in registration order (built-ins first)."""
    return tuple(_REGISTRY)


class _ScorerNames(Sequence):
    """Live, read-only view of `scorer_names()` that behaves like the tuple ``SCORER_NAMES`` used to be
    (``in``, iteration, indexing, ``==`` a tuple), e.g. as argparse ``choices``."""

    def __getitem__(self, i):
        return scorer_names()[i]

    def __len__(self) -> int:
        return len(_REGISTRY)

    def __eq__(self, other) -> bool:
        if isinstance(other, (_ScorerNames, tuple, list)):
            return scorer_names() == tuple(other)
        return NotImplemented

    __hash__ = None  # mutable contents

    def __repr__(self) -> str:
        return repr(scorer_names())


#: Live view of the registered names (kept for ``from apt_data import SCORER_NAMES``).
SCORER_NAMES: Sequence[str] = _ScorerNames()
#: Live ``{name: NumPy reference}`` view (tests).
REFERENCE_SCORERS: Mapping[str, ReferenceScorer] = MappingProxyType(_REFERENCES)

__all__ = ["Scorer", "register_scorer", "unregister_scorer", "get_scorer", "scorer_names", "SCORER_NAMES",
           "REFERENCE_SCORERS", "PyramidKernel", "ReferenceScorer", "LayoutKernel"]

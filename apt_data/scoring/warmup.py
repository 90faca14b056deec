"""`warmup()`: load every compiled kernel of the data side once, before worker processes fork."""
from __future__ import annotations

import numpy as np

from ..assemble import extract_tokens
from ..config import APTConfig
from ..layout import patchify
from . import score_maps, scorer_names

__all__ = ["warmup"]


def warmup() -> None:
    """Run every kernel (scorers, selection, token extraction) once on a tiny image, writable and
    read-only, so that forked workers inherit the compiled code instead of each loading it."""
    img = np.zeros((64, 64, 3), np.uint8)
    img[::2] = 200
    readonly = img.copy()
    readonly.flags.writeable = False
    for im in (img, readonly):
        lay = patchify(im, APTConfig(thresholds=(-np.inf, -np.inf)))
        outs = tuple(np.empty((len(lay) if s == 0 else 0, 3, 16 << s, 16 << s), np.uint8) for s in range(3))
        extract_tokens(im, lay.y, lay.x, lay.scale, 16, outs, np.zeros(3, np.int64))
        for scorer in scorer_names():  # every registered scorer, built-in or not
            cfg = APTConfig(patch_size=16, num_scales=3, thresholds=(1.0, 1.0), scorer=scorer)
            patchify(im, cfg).scale_grid()
            score_maps(im, 16, 3, scorer)
    for scorer in scorer_names():
        score_maps(img[:, :, 0], 16, 3, scorer)

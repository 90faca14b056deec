"""Pictures of dense predictions: image | APT layout | prediction | ground truth, in the dataset's class
colours, with a legend (matplotlib, imported when drawing)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from apt_data.io import atomic_write
from apt_data.visualize import draw_layout

#: CamVid's 11 classes (SegNet's version; label 11 = void) and their standard colours.
CAMVID_CLASSES = ("sky", "building", "pole", "road", "pavement", "tree", "sign/symbol", "fence", "car",
                  "pedestrian", "bicyclist")
CAMVID_PALETTE = np.array([[128, 128, 128], [128, 0, 0], [192, 192, 128], [128, 64, 128], [60, 40, 222],
                           [128, 128, 0], [192, 128, 128], [64, 64, 128], [64, 0, 128], [64, 64, 0],
                           [0, 128, 192]], np.uint8)
VOID_COLOUR = (0, 0, 0)


def colourise(labels: np.ndarray, palette: np.ndarray, ignore_index: Optional[int] = None,
              void: Sequence[int] = VOID_COLOUR) -> np.ndarray:
    """A label map ``[H, W]`` as RGB uint8: class k in ``palette[k]``, the ignore value (and anything
    outside the palette) in ``void``."""
    labels = np.asarray(labels)
    ok = (labels >= 0) & (labels < len(palette))
    if ignore_index is not None:
        ok &= labels != ignore_index
    out = np.empty(labels.shape + (3,), np.uint8)
    out[...] = np.asarray(void, np.uint8)
    out[ok] = palette[labels[ok]]
    return out


def save_dense_panels(path: Path, rows: Sequence[dict], palette: np.ndarray = CAMVID_PALETTE,
                      class_names: Sequence[str] = CAMVID_CLASSES, ignore_index: Optional[int] = 11,
                      title: Optional[str] = None, dpi: int = 80) -> None:
    """Write a PNG of one row per entry of ``rows`` (dicts with ``image`` uint8 HxWx3, ``layout`` its
    `PatchLayout` (or None: the image alone), ``pred`` and ``gt`` label maps, optional ``label``):
    image | APT layout | prediction | ground truth, and a legend of the classes (void in black).
    The label maps may have another size than the image (shown at their own)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    cols = ("image", "APT layout", "prediction", "ground truth")
    fig, axes = plt.subplots(len(rows), 4, figsize=(4 * 3.2, len(rows) * 2.5 + 0.9), squeeze=False)
    for i, r in enumerate(rows):
        lay = draw_layout(r["image"], r["layout"]) if r.get("layout") is not None else r["image"]
        panels = (r["image"], lay, colourise(r["pred"], palette, ignore_index),
                  colourise(r["gt"], palette, ignore_index))
        for j, (ax, im) in enumerate(zip(axes[i], panels)):
            ax.imshow(im)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(cols[j], fontsize=9)
        if r.get("label"):
            axes[i, 0].set_ylabel(r["label"], fontsize=8)
    handles = [Patch(color=np.asarray(c) / 255, label=n) for c, n in zip(palette, class_names)]
    handles.append(Patch(color=np.asarray(VOID_COLOUR) / 255, label="void (ignored)"))
    fig.legend(handles=handles, loc="lower center", ncol=min(6, len(handles)), fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.07 if len(rows) > 1 else 0.12, 1, 0.97 if title else 1))
    atomic_write(Path(path), lambda tmp: fig.savefig(tmp, dpi=dpi, format="png"))
    plt.close(fig)

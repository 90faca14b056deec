"""Semantic segmentation: the task (loss with an ignore index, confusion-matrix metrics, its state for
checkpoints), the evaluation loop, and the dense baselines at equal tokens (random dropping filled from
the nearest kept token, the lower-resolution grid and short side, token and FLOP counts of a run).

Metrics follow mmseg: a confusion matrix over the labelled pixels (``torch.bincount``), per-class IoU
``TP / (TP + FP + FN)`` (NaN for a class absent from both prediction and ground truth), mIoU their
NaN-mean, pixel accuracy ``trace / sum``. Per-image matrices are kept, so two methods on the same images
compare by a paired bootstrap over images (mIoU is a ratio of sums, not a mean over images).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from apt_model.dense import to_dense

from .evaluation import progress_bar, sync_device
from .flops import vit_flops

Logits = Union[torch.Tensor, Sequence[torch.Tensor]]
Masks = Union[torch.Tensor, Sequence[torch.Tensor]]


# ----------------------------------------------------------------------------------- metrics
def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int) -> torch.Tensor:
    """``[K, K]`` int64 counts (row: ground truth, column: prediction) of the pixels whose target is a
    class (``ignore_index`` and anything outside ``[0, K)`` left out). One ``bincount``, no sync."""
    t = target.reshape(-1).long()
    p = pred.reshape(-1).long()
    keep = (t != ignore_index) & (t >= 0) & (t < num_classes)
    idx = torch.where(keep, t * num_classes + p, torch.full_like(t, num_classes * num_classes))
    return torch.bincount(idx, minlength=num_classes * num_classes + 1)[:-1].reshape(num_classes, num_classes)


@dataclass
class SegMetrics:
    """What a confusion matrix says: per-class IoU (NaN where a class is absent from both), mIoU (their
    NaN-mean) and pixel accuracy, as fractions."""

    iou: np.ndarray
    miou: float
    pixel_accuracy: float

    @classmethod
    def from_confusion(cls, cm: Union[np.ndarray, torch.Tensor]) -> "SegMetrics":
        cm = np.asarray(cm.cpu() if isinstance(cm, torch.Tensor) else cm, np.float64)
        tp = np.diag(cm)
        union = cm.sum(0) + cm.sum(1) - tp
        with np.errstate(invalid="ignore", divide="ignore"):
            iou = np.where(union > 0, tp / np.where(union > 0, union, 1), np.nan)
        total = cm.sum()
        return cls(iou=iou, miou=float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan"),
                   pixel_accuracy=float(tp.sum() / total) if total else float("nan"))

    def as_dict(self, class_names: Optional[Sequence[str]] = None) -> dict:
        names = class_names or [str(k) for k in range(len(self.iou))]
        return dict(miou=self.miou, pixel_accuracy=self.pixel_accuracy,
                    per_class_iou={n: (None if math.isnan(v) else float(v)) for n, v in zip(names, self.iou)})


def miou_of(per_image: np.ndarray, index: Optional[np.ndarray] = None) -> float:
    """mIoU of the summed per-image confusion matrices ``[N, K, K]`` (of the images ``index`` picks)."""
    cms = per_image if index is None else per_image[index]
    return SegMetrics.from_confusion(cms.sum(0)).miou


def paired_bootstrap(per_image_a: np.ndarray, per_image_b: np.ndarray, reps: int = 1000,
                     seed: int = 0) -> tuple[float, float]:
    """mIoU(a) - mIoU(b) on the same images and its bootstrap SE: ``reps`` resamples of the images (the same
    draw for both), the sd of the resampled differences. Image-to-image spread cancels, as in a paired test."""
    a, b = np.asarray(per_image_a, np.int64), np.asarray(per_image_b, np.int64)
    if a.shape != b.shape:
        raise ValueError(f"paired bootstrap needs the same images: {a.shape} vs {b.shape}")
    rng = np.random.default_rng(seed)
    n = a.shape[0]
    diffs = [miou_of(a, ix) - miou_of(b, ix) for ix in rng.integers(0, n, size=(reps, n))]
    return miou_of(a) - miou_of(b), float(np.std(diffs, ddof=1))


def bootstrap_se(per_image: np.ndarray, reps: int = 1000, seed: int = 0) -> float:
    """Bootstrap SE over images of one method's mIoU."""
    rng = np.random.default_rng(seed)
    n = per_image.shape[0]
    return float(np.std([miou_of(per_image, ix) for ix in rng.integers(0, n, size=(reps, n))], ddof=1))


# ----------------------------------------------------------------------------------- the task
@dataclass
class SegmentationTask:
    """Loss, metrics and checkpoint state of semantic segmentation, for a trainer's ``--task segmentation``.

    ``loss(logits, masks)``: mean cross-entropy over the labelled pixels (``ignore_index`` left out);
    logits ``[B, K, H, W]`` or a list of ``[K, H_b, W_b]`` at their masks' sizes (`SegmentationModel`).
    ``update`` / ``compute``: a running confusion matrix (and one per image, for paired comparisons).
    ``head``: the kind of head the model was built with (`apt_model.heads.SEG_HEADS`), kept in the checkpoint's
    task state so the model is rebuilt as it was trained.
    """

    num_classes: int
    ignore_index: int = 255
    class_names: Optional[list[str]] = None
    head: str = "linear"
    _cm: list = field(default_factory=list, repr=False)

    def loss(self, logits: Logits, masks: Masks) -> torch.Tensor:
        if isinstance(logits, torch.Tensor) and isinstance(masks, torch.Tensor):
            return F.cross_entropy(logits.float(), masks.long(), ignore_index=self.ignore_index)
        # mixed sizes: sum over every labelled pixel of every image, / their count (the same mean)
        total, count = 0.0, 0
        for lg, m in zip(logits, masks):
            m = m.long()
            total = total + F.cross_entropy(lg[None].float(), m[None], ignore_index=self.ignore_index,
                                            reduction="sum")
            count = count + (m != self.ignore_index).sum()
        return total / torch.clamp(torch.as_tensor(count, device=m.device), min=1)

    def reset(self) -> None:
        self._cm = []

    def update(self, logits: Logits, masks: Masks) -> None:
        """Add the argmax predictions of ``logits`` against ``masks``, one matrix per image."""
        for lg, m in zip(logits, masks):
            self._cm.append(confusion_matrix(lg.argmax(0), m, self.num_classes, self.ignore_index))

    def per_image(self) -> np.ndarray:
        if not self._cm:
            return np.zeros((0, self.num_classes, self.num_classes), np.int64)
        return torch.stack(self._cm).cpu().numpy()

    def compute(self) -> SegMetrics:
        return SegMetrics.from_confusion(self.per_image().sum(0))

    def state_dict(self) -> dict:
        return dict(task="segmentation", num_classes=self.num_classes, ignore_index=self.ignore_index,
                    class_names=list(self.class_names) if self.class_names else None, head=self.head)

    @classmethod
    def from_state_dict(cls, state: dict) -> "SegmentationTask":
        if state.get("task") != "segmentation":
            raise ValueError(f"checkpoint task is {state.get('task')!r}, not 'segmentation'")
        return cls(num_classes=int(state["num_classes"]), ignore_index=int(state["ignore_index"]),
                   class_names=state.get("class_names"), head=state.get("head", "linear"))


@dataclass
class SegEvalResult:
    metrics: SegMetrics
    per_image: np.ndarray          # [N, K, K] confusion matrices
    images: int
    seconds: float                 # forward time (first batch left out when there are several: warm-up)
    timed_images: int

    @property
    def images_per_s(self) -> float:
        return self.timed_images / self.seconds if self.seconds > 0 else float("nan")


@torch.no_grad()
def evaluate_segmentation(model: nn.Module, batches: Iterable, task: SegmentationTask, device: torch.device,
                          caption: Optional[str] = "eval", amp: bool = False) -> SegEvalResult:
    """Run ``model`` (a `SegmentationModel`) over ``batches`` of ``(packed batch, masks)`` (masks: a list of
    ``[H_b, W_b]`` label tensors, the logits are upsampled to them) and return the metrics, per-image
    confusion matrices and forward images/s. A tqdm progress bar shows on a terminal."""
    model.eval()
    task.reset()
    bar = progress_bar(batches, caption, True, None)
    times = []
    try:
        for batch, masks in batches:
            masks = [torch.as_tensor(m).to(device) for m in masks]
            sync_device(device)
            t0 = time.perf_counter()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                logits = model(batch.to(device), [tuple(m.shape) for m in masks])
            sync_device(device)
            times.append((time.perf_counter() - t0, len(masks)))
            task.update([lg.float() for lg in logits], masks)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(mIoU=f"{task.compute().miou:.3f}")
    finally:
        if bar is not None:
            bar.close()
    timed = times[1:] if len(times) > 1 else times
    per = task.per_image()
    return SegEvalResult(SegMetrics.from_confusion(per.sum(0)), per, len(per), sum(t for t, _ in timed),
                         sum(k for _, k in timed))


# ----------------------------------------------------------------------------------- baselines
def covered_cells(batch) -> Union[torch.Tensor, list[torch.Tensor]]:
    """Which base cells of each image a token covers, ``[B, h, w]`` bool (a list for mixed sizes): `to_dense`
    of ones, so it follows whatever layout the batch has (APT, uniform, randomly dropped)."""
    ones = torch.ones(batch.seq_len, 1, device=batch.coords[0].device)
    dense = to_dense(ones, batch)
    return dense[:, 0] > 0 if isinstance(dense, torch.Tensor) else [d[0] > 0 for d in dense]


def fill_from_nearest(fmap: torch.Tensor, covered: torch.Tensor) -> torch.Tensor:
    """``fmap`` ``[D, h, w]`` with every uncovered cell given the feature of its nearest covered cell
    (Euclidean distance between cell centres; ties: the first in raster order). Vectorised over cells
    (a ``[h*w, h*w]`` distance matrix; no host sync)."""
    D, h, w = fmap.shape
    yy, xx = torch.meshgrid(torch.arange(h, device=fmap.device), torch.arange(w, device=fmap.device), indexing="ij")
    cells = torch.stack([yy.reshape(-1), xx.reshape(-1)], 1).float()
    dist = torch.cdist(cells, cells)
    dist = dist.masked_fill(~covered.reshape(1, -1), float("inf"))
    src = dist.argmin(1)
    return fmap.reshape(D, -1)[:, src].reshape(D, h, w)


class NearestFill(nn.Module):
    """A backbone wrapper for the random-drop baseline: ``forward_dense`` with every dropped cell filled from
    its nearest kept token (APT's large tokens already cover their cells, so on APT layouts it changes
    nothing)."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone

    def forward_dense(self, batch):
        fmap = self.backbone.forward_dense(batch)
        cov = covered_cells(batch)
        return (torch.stack([fill_from_nearest(f, c) for f, c in zip(fmap, cov)])
                if isinstance(fmap, torch.Tensor) else [fill_from_nearest(f, c) for f, c in zip(fmap, cov)])


def lowres_grid(tokens: float, grid: tuple[int, int]) -> tuple[int, int]:
    """The lower-resolution grid (rows, cols) of ``grid``'s aspect whose token count is closest to ``tokens``:
    each side ``round(sqrt(tokens * its share of the aspect))`` cells, at most the full grid."""
    gh, gw = grid
    rows = max(1, min(gh, int(round(math.sqrt(tokens * gh / gw)))))
    cols = max(1, min(gw, int(round(math.sqrt(tokens * gw / gh)))))
    return rows, cols


@dataclass
class TokenCount:
    """What an evaluation's batches held: patch tokens, full-grid cells and encoder FLOPs (`vit_flops`) over its
    images, and each image's (H, W) as evaluated."""

    tokens: int = 0
    grid: int = 0
    flops: float = 0.0
    sizes: list = field(default_factory=list)


def counting(pairs: Iterable, backbone: nn.Module, count: TokenCount) -> Iterable:
    """``(batch, masks)`` pairs passed on unchanged, each batch's tokens, full-grid cells and FLOPs added to
    ``count`` (host-side integers of the batch; nothing read back from the device)."""
    for batch, masks in pairs:
        p = batch.patch_size
        count.tokens += sum(batch.seqlens) - batch.num_images * backbone.num_prefix_tokens
        count.grid += sum((h // p) * (w // p) for h, w in batch.image_sizes)
        count.flops += vit_flops(batch, backbone)
        count.sizes += [tuple(int(v) for v in hw) for hw in batch.image_sizes]
        yield batch, masks


def lowres_short_side(sizes: Sequence[tuple[int, int]], image_size: int, patch_size: int, tokens: float) -> int:
    """The evaluation short side (``segmentation_transform(side)``: a multiple of ``patch_size``, at most
    ``image_size``) whose full grid over images evaluated at ``sizes`` (H, W, at ``image_size``) holds the total
    closest to ``tokens`` (APT's): the lower-resolution baseline at APT's token count. Binary search over the
    multiples (the total grows with the side)."""
    from apt_data.transforms import segmentation_transform

    def total(k: int) -> int:
        tf = segmentation_transform(k * patch_size, augment=False, multiple=patch_size, keep_mask_size=True)
        return sum((h // patch_size) * (w // patch_size) for h, w in (tf.output_size(w0, h0) for h0, w0 in sizes))

    lo, hi = 1, max(1, int(image_size) // patch_size)
    while lo < hi:  # the smallest multiple whose total reaches ``tokens``
        mid = (lo + hi) // 2
        lo, hi = (mid + 1, hi) if total(mid) < tokens else (lo, mid)
    k = lo if lo == 1 or abs(total(lo) - tokens) <= abs(total(lo - 1) - tokens) else lo - 1
    return k * patch_size

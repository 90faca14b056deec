"""Evaluation: top-1/top-5, model images/s, tokens per image and GFLOPs, for APT and the paper's baselines.

Baselines (``mode``), all on the same images, batches and token budget:

- ``"none"``: APT as configured.
- ``"resize"``: the same layouts with ``model.resize_only = True`` (a large patch is only resized to
  the base patch; no detail path).
- ``"random"``: as many tokens per image as APT keeps, but base-scale (16-px) cells of the uniform
  grid chosen at random; the other cells are dropped. `RandomBaseLayout` is the loader's
  ``layout_fn`` (scale-0 `PatchLayout` objects), so the loader's own workers, packing and
  skip accounting build these batches and positions come from each token's coordinates as usual.
- ``"uniform"``: the plain ViT grid (thresholds ``-inf``: every token at the base scale), which
  computes exactly what the timm model computes.
"""
from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass, replace
from typing import Iterable, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from apt_data import APTConfig, ImageTransform, PatchLayout, patchify
from apt_data.loader import APTLoader

from .dist import DistInfo
from .flops import vit_flops

MODES = ("none", "resize", "random", "uniform")


@dataclass
class EvalResult:
    """Totals over every image evaluated (all ranks)."""

    images: int
    top1: float
    top5: float
    loss: float
    tokens: int            # patch tokens (class/register tokens and padding excluded)
    uniform_tokens: int    # tokens of the uniform ViT grid for the same images
    flops: float           # encoder FLOPs (`vit_flops`)
    seconds: float         # model forward time (data loading excluded; the first batch too when there are more)
    timed_images: int

    @property
    def tokens_per_image(self) -> float:
        return self.tokens / max(1, self.images)

    @property
    def token_fraction(self) -> float:
        return self.tokens / max(1, self.uniform_tokens)

    @property
    def images_per_s(self) -> float:
        return self.timed_images / self.seconds if self.seconds > 0 else float("nan")

    @property
    def gflops_per_image(self) -> float:
        return self.flops / max(1, self.images) / 1e9

    def as_dict(self) -> dict:
        d = asdict(self)
        d.update(tokens_per_image=self.tokens_per_image, uniform_tokens_per_image=self.uniform_tokens / max(1, self.images),
                 token_fraction=self.token_fraction, images_per_s=self.images_per_s,
                 gflops_per_image=self.gflops_per_image)
        return d


def sync_device(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def progress_bar(batches, caption: Optional[str], is_main: bool, max_batches: Optional[int]):
    """A tqdm bar over the evaluation's batches (their count: ``len(batches)``, an estimate for a
    streamed loader), or None."""
    if caption is None or not is_main:
        return None
    from tqdm import tqdm

    try:
        total = len(batches)
    except TypeError:
        total = None
    if total is not None and max_batches is not None:
        total = min(total, max_batches)
    return tqdm(total=total, desc=caption, unit="batch", leave=False, dynamic_ncols=True,
                disable=not sys.stderr.isatty())


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: Iterable, device: torch.device, amp: bool = False,
             info: Optional[DistInfo] = None, max_batches: Optional[int] = None,
             progress: Optional[str] = None) -> EvalResult:
    """Run ``model`` (an `APTViT`, unwrapped) over ``(batch, labels)`` pairs; sums are reduced over ranks.

    Runs with the RNG forked, so evaluating inside a training run does not shift its random stream.
    ``progress``: the caption of a progress bar on rank 0 (shown on a terminal; it closes when done).
    """
    info = info or DistInfo(device=device)
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # correct1, correct5, loss sum, images
    host = np.zeros(5, np.float64)                             # tokens, uniform, flops, seconds, timed images
    times = []
    bar = progress_bar(batches, progress, info.is_main, max_batches)
    try:
        with torch.random.fork_rng(devices=[]):
            for k, (batch, _) in enumerate(batches):
                if max_batches is not None and k >= max_batches:
                    break
                b = batch.to(device, non_blocking=True)
                sync_device(device)
                t0 = time.perf_counter()
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                    logits = model(b)
                sync_device(device)
                dt = time.perf_counter() - t0
                labels = b.labels
                top = logits.topk(min(5, logits.shape[1]), dim=1).indices
                hit = top == labels[:, None]
                sums[0] += hit[:, 0].sum()
                sums[1] += hit.any(dim=1).sum()
                sums[2] += F.cross_entropy(logits.float(), labels, reduction="sum").double()
                sums[3] += labels.shape[0]
                p = batch.patch_size
                host[0] += batch.num_real_tokens - batch.num_images * batch.num_prefix_tokens
                host[1] += sum((h // p) * (w // p) for h, w in batch.image_sizes)
                host[2] += vit_flops(batch, model)
                times.append((dt, batch.num_images))
                if bar is not None:
                    bar.update(1)
    finally:
        model.train(was_training)
        if bar is not None:
            bar.close()
    timed = times[1:] if len(times) > 1 else times  # the first batch is a warm-up when there are more
    host[3], host[4] = sum(t for t, _ in timed), sum(n for _, n in timed)
    tot = torch.cat([sums, torch.as_tensor(host[[0, 1, 2, 4]], dtype=torch.float64, device=device)])
    secs = torch.tensor([host[3]], dtype=torch.float64, device=device)
    if info.enabled:
        dist.all_reduce(tot)
        dist.all_reduce(secs, op=dist.ReduceOp.MAX)
    c1, c5, loss, n, tokens, uniform, flops, timed = tot.tolist()
    n = max(n, 1.0)
    return EvalResult(images=int(n), top1=c1 / n, top5=c5 / n, loss=loss / n, tokens=int(tokens),
                      uniform_tokens=int(uniform), flops=flops, seconds=float(secs.item()), timed_images=int(timed))


# ------------------------------------------------------------------------------------- baselines
def uniform_config(cfg: APTConfig) -> APTConfig:
    """The same patch size and scales with every larger scale disabled: the plain ViT grid."""
    return replace(cfg, thresholds=(float("-inf"),) * (cfg.num_scales - 1))


def random_base_layout(image_size: tuple[int, int], cfg: APTConfig, num_tokens: int,
                       rng: np.random.Generator) -> PatchLayout:
    """``num_tokens`` base cells of the image's uniform grid chosen at random, as scale-0 tokens in raster order."""
    H, W = image_size
    p = cfg.patch_size
    gh, gw = H // p, W // p
    if not 0 < num_tokens <= gh * gw:
        raise ValueError(f"cannot keep {num_tokens} of the {gh * gw} base cells of a {H}x{W} image")
    cells = np.sort(rng.choice(gh * gw, size=num_tokens, replace=False))
    return PatchLayout(y=((cells // gw) * p).astype(np.int32), x=((cells % gw) * p).astype(np.int32),
                       scale=np.zeros(num_tokens, np.int8), image_size=(H, W), patch_size=p,
                       num_scales=cfg.num_scales)


@dataclass(frozen=True)
class RandomBaseLayout:
    """The ``random`` baseline as an `APTLoader` ``layout_fn``: sample ``index`` keeps APT's token count
    (``counts[index]``, the index's exact count, else its `patchify` layout's) as random base-scale
    cells drawn with ``np.random.default_rng([seed, index])``."""

    seed: int = 0
    counts: Optional[np.ndarray] = None

    def __call__(self, image: np.ndarray, cfg: APTConfig, index: int) -> PatchLayout:
        n = int(self.counts[index]) if self.counts is not None else len(patchify(image, cfg))
        return random_base_layout(image.shape[:2], cfg, n, np.random.default_rng([self.seed, index]))


def random_token_batches(loader: APTLoader, seed: int = 0) -> APTLoader:
    """The ``random`` baseline: ``loader``'s batches (same images, same order, this rank's share), each
    image keeping exactly APT's token count as random base-scale cells (`RandomBaseLayout`). Bad
    samples are skipped and counted in ``loader.stats``, as the loader does."""
    counts = loader.token_counts() - loader.num_prefix_tokens if loader.exact_counts else None
    return loader.with_layout_fn(RandomBaseLayout(seed, counts))


def eval_loader(source, cfg: APTConfig, *, max_tokens: int, image_size: int, num_prefix_tokens: int,
                max_images: Optional[int] = None, num_workers: int = 2, crop_pct: float = 1.0,
                strict: bool = False, rank: Optional[int] = None, world_size: Optional[int] = None) -> APTLoader:
    """An `APTLoader` over ``source`` in eval order with timm's eval transform (resize + centre crop)."""
    transform = ImageTransform(size=image_size, multiple=cfg.patch_size, crop_pct=crop_pct)
    return APTLoader(source, cfg, max_tokens=max_tokens, max_images=max_images, num_workers=num_workers,
                     shuffle=False, train=False, transform=transform, num_prefix_tokens=num_prefix_tokens,
                     strict=strict, rank=rank, world_size=world_size)


def evaluate_mode(model, source, cfg: APTConfig, mode: str, *, device: torch.device, amp: bool = False,
                  info: Optional[DistInfo] = None, seed: int = 0, max_batches: Optional[int] = None,
                  progress: Optional[str] = None, **loader_kw) -> tuple[EvalResult, APTLoader]:
    """`evaluate` one of `MODES` on ``source`` (``loader_kw``: see `eval_loader`); returns the loader too
    (its ``stats`` hold the skipped samples). ``progress``: see `evaluate`."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    loader = eval_loader(source, uniform_config(cfg) if mode == "uniform" else cfg, **loader_kw)
    if mode == "random":
        loader = random_token_batches(loader, seed)
    old = model.resize_only
    model.resize_only = mode == "resize"
    try:
        return evaluate(model, loader, device, amp=amp, info=info, max_batches=max_batches,
                        progress=progress), loader
    finally:
        model.resize_only = old

"""The pieces of `studies/study.py`: the split, features, linear head, evaluation rows at equal tokens, paired
speed, calibration to a token count, lower resolution, fine-tunes, and the table and plot."""
from __future__ import annotations

import math
import os
import time
from pathlib import Path

import numpy as np
import torch

from apt_data import APTConfig, decode_image, pack_images, patchify, score_maps
from apt_data.io import atomic_write, atomic_write_bytes
from apt_data.calibrate import ScoredImage
from apt_train.flops import timm_vit_flops, vit_flops

MODEL = "vit_small_patch14_dinov2"
PATCH = 14
SIZE = 224
ROOT = Path(__file__).resolve().parents[1]  # the checkout (../shared beside it holds the data)
DEFAULT_WEIGHTS = ROOT.parent / "shared" / "models" / "vit_small_patch14_dinov2.imgfocus.fp16.safetensors"
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "imagenette-224-train"
SCORER_BASE = {"laplacian": (4.4, 1.2), "upsample": (6.8, 0.7)}  # the scorers' default thresholds: search directions
NEG = (float("-inf"), float("-inf"))


def log(msg: str) -> None:
    print(msg, flush=True)


def se(p: float, n: int) -> float:
    return math.sqrt(max(p * (1 - p), 0.0) / max(n, 1))


# --------------------------------------------------------------------------------------- data
def stratified_split(labels: np.ndarray, n_val: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Per class a seeded shuffle, then the classes interleaved round-robin: the first ``n_val`` of that
    order are val (equal per class, +-1), the rest train, in the same interleaved order (so any prefix
    of train is stratified too)."""
    rng = np.random.default_rng(seed)
    per = [rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)]
    order = []
    for k in range(max(len(p) for p in per)):
        order.extend(int(p[k]) for p in per if k < len(p))
    order = np.asarray(order)
    return order[:n_val], order[n_val:]


def load_images(paths, size: int = SIZE) -> list[np.ndarray]:
    return [np.ascontiguousarray(decode_image(str(p), size, multiple=PATCH)) for p in paths]


# ------------------------------------------------------------------------------ model and head
def backbone(weights: Path, num_classes: int = 0):
    import timm
    from safetensors.torch import load_file

    m = timm.create_model(MODEL, pretrained=False, img_size=SIZE, num_classes=num_classes)
    missing, unexpected = m.load_state_dict({k: v.float() for k, v in load_file(str(weights)).items()}, strict=False)
    assert not unexpected and set(missing) <= {"head.weight", "head.bias"}, (missing, unexpected)
    return m.eval()


def model_device(model) -> torch.device:
    return next(model.parameters()).device


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (timings on a GPU measure the work, not its launch)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def cls_features(model, images: list[np.ndarray], bs: int) -> np.ndarray:
    """Final CLS features of the timm ``model`` (fp32, on the model's device) for 224-px uint8 images."""
    dev = model_device(model)
    cfg = model.pretrained_cfg
    mean = torch.tensor(cfg["mean"], device=dev).view(1, 3, 1, 1)
    std = torch.tensor(cfg["std"], device=dev).view(1, 3, 1, 1)
    out = []
    for i in range(0, len(images), bs):
        x = torch.from_numpy(np.stack(images[i:i + bs])).to(dev).permute(0, 3, 1, 2).float() / 255
        out.append(model((x - mean) / std).float().cpu().numpy())
    return np.concatenate(out).astype(np.float32)


def fit_head(x: np.ndarray, y: np.ndarray, classes: int, wd: float, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression (LBFGS, L2 ``wd``) on raw features: the head applies as is."""
    torch.manual_seed(0)
    X, Y = torch.from_numpy(x).double(), torch.from_numpy(y).long()
    W = torch.zeros(classes, X.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([W, b], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe", tolerance_grad=1e-9)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(X @ W.T + b, Y) + wd * (W ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return W.detach().float(), b.detach().float()


# ------------------------------------------------------------------------------------ evaluation
SPEED = dict(images=None, reps=2, n=16)  # set in main: the vanilla images paired with every row's timing


def forward(model, batch) -> torch.Tensor:
    """Logits of ``model`` for a packed batch, on the model's device (bf16 autocast on a GPU, as the
    trainer evaluates)."""
    dev = model_device(model)
    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
        return model(batch.to(dev, non_blocking=True)).float()


def paired_speed(model, images, cfg: APTConfig, layouts, resize_only: bool) -> dict:
    """Forward time of the row's batch of the first ``SPEED['n']`` images against the vanilla 224-px batch of
    the same images, alternated ``SPEED['reps']`` times; the minimum of each (robust to other jobs' load)."""
    n, reps = SPEED["n"], SPEED["reps"]
    uni = APTConfig(patch_size=PATCH, num_scales=3, thresholds=NEG)
    vb = pack_images(SPEED["images"][:n], uni, num_prefix_tokens=model.num_prefix_tokens)
    mb = pack_images(images[:n], cfg, num_prefix_tokens=model.num_prefix_tokens,
                     layouts=layouts[:n] if layouts is not None else None)
    tv, tm = [], []
    dev = model_device(model)
    vb, mb = vb.to(dev), mb.to(dev)
    with torch.no_grad():
        forward(model, vb)  # warm-up (kernels, allocator) before anything is timed
        for _ in range(reps):
            for b, ro, ts in ((vb, False, tv), (mb, resize_only, tm)):
                model.resize_only = ro
                sync(dev)
                t0 = time.perf_counter()
                forward(model, b)
                sync(dev)
                ts.append(time.perf_counter() - t0)
    model.resize_only = False
    return dict(images_per_s=mb.num_images / min(tm), vanilla_images_per_s=vb.num_images / min(tv),
                speedup=min(tv) / min(tm))


def eval_rows(model, images, labels, cfg: APTConfig, *, layouts=None, resize_only=False, bs=32) -> dict:
    """Top-1, tokens, FLOPs and forward images/s of ``model`` (an `APTViT`) on in-memory images."""
    model.eval()
    model.resize_only = resize_only
    correct = tokens = 0
    flops, times, hits = 0.0, [], []
    try:
        with torch.no_grad():
            for i in range(0, len(images), bs):
                imgs = images[i:i + bs]
                lays = layouts[i:i + bs] if layouts is not None else [patchify(im, cfg) for im in imgs]
                batch = pack_images(imgs, cfg, labels=labels[i:i + bs], num_prefix_tokens=model.num_prefix_tokens,
                                    layouts=lays)
                dev = model_device(model)
                sync(dev)
                t0 = time.perf_counter()
                logits = forward(model, batch)
                sync(dev)
                times.append((time.perf_counter() - t0, len(imgs)))
                hit = logits.argmax(1).cpu() == batch.labels
                hits += hit.int().tolist()
                correct += int(hit.sum())
                tokens += batch.num_real_tokens - batch.num_images * batch.num_prefix_tokens
                flops += vit_flops(batch, model)
    finally:
        model.resize_only = False
    n = len(images)
    timed = times[1:] if len(times) > 1 else times
    ref = timm_vit_flops(model, n, (SIZE // PATCH) ** 2)
    p = correct / n
    return dict(top1=p, se=se(p, n), n=n, hits=hits, tokens_per_image=tokens / n, fraction=tokens / (n * (SIZE // PATCH) ** 2),
                flop_ratio=flops / ref, eval_images_per_s=sum(k for _, k in timed) / sum(t for t, _ in timed),
                **paired_speed(model, images, cfg, layouts, resize_only))


def scored(images, scorer: str) -> list[ScoredImage]:
    out = []
    for im in images:
        maps = score_maps(im, PATCH, 3, scorer)
        out.append(ScoredImage(np.concatenate([m.ravel() for m in maps]), im.shape[:2]))
    return out


def lowres_side(tokens: float, grid: int) -> int:
    """The multiple of 14 px (at most ``grid`` cells a side) whose uniform grid is closest to ``tokens``."""
    return max(1, min(grid, int(round(math.sqrt(tokens))))) * PATCH


def lowres_size(tokens_per_image: float) -> int:
    """The multiple of 14 px (< 224) whose uniform grid is closest to ``tokens_per_image``."""
    return lowres_side(tokens_per_image, SIZE // PATCH - 1)


def subset_folder(root: Path, entries, dest: Path) -> Path:
    """An ImageNet-layout folder of symlinks to ``entries`` ((path, label, class)); every class of
    ``root`` gets its folder (so labels keep their indices)."""
    import shutil

    if dest.exists():
        shutil.rmtree(dest)
    for d in sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        (dest / d).mkdir(parents=True)
    for path, _, cls in entries:
        os.symlink(os.path.abspath(path), dest / cls / Path(path).name)
    return dest


def finetune(start: Path, data: Path, thresholds, out: Path, *, lr=None, steps=None, max_tokens=4096,
             image_size: int = SIZE, device: str = "cpu", workers: int = 0):
    """1 epoch of the ``short`` recipe from ``start`` (`apt_train.Trainer`): ``(model, seconds, steps)``.
    A finished run in ``out`` (its ``done.json`` and checkpoint) is read back instead of trained again
    (the runs are deterministic: seed 0; the model is returned on ``device``)."""
    import json

    from apt_train.build import build_model
    from apt_train.checkpoint import list_checkpoints
    from apt_train.config import TrainConfig
    from apt_train.trainer import Trainer

    done = out / "done.json"
    if done.is_file() and list_checkpoints(out):
        info = json.loads(done.read_text())
        model = build_model(MODEL, checkpoint=str(list_checkpoints(out)[-1]), image_size=image_size).to(device)
        log(f"fine-tune {out.name}: read back ({info['steps']} steps, trained in {info['seconds']:.0f} s)")
        return model, info["seconds"], info["steps"]
    cfg = TrainConfig.from_flat(dict(model=MODEL, checkpoint=str(start), data=str(data), val_data=None,
                                     image_size=image_size, patch_size=PATCH, thresholds=tuple(thresholds),
                                     recipe="short", lr=lr, steps=steps, max_tokens=max_tokens, workers=workers,
                                     output=str(out), device=device, save_every=0, keep_checkpoints=1, quiet=True,
                                     log_every=10 ** 6, seed=0))
    t0 = time.perf_counter()
    res = Trainer(cfg).fit()
    model = res.model
    model = getattr(model, "module", model)
    seconds = time.perf_counter() - t0
    write_text(done, json.dumps({"seconds": seconds, "steps": res.global_step}))
    return model, seconds, res.global_step


# ------------------------------------------------------------------------------------ reporting
HEADER = ("| stage | method | setting | tokens kept (per image) | top-1 ± SE | Δ vs vanilla / control ± paired SE | "
          "images/s (vanilla, paired) | speed vs vanilla | FLOPs vs vanilla |\n|---|---|---|---|---|---|---|---|---|")


def mean_se(values) -> tuple[float, float]:
    """Mean of ``values`` and its standard error, sample sd / sqrt(n)."""
    v = np.asarray(values, np.float64)
    return float(v.mean()), float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else 0.0


def paired_delta(hits: list, ref: list) -> tuple[float, float]:
    """Top-1 difference of two methods on the same images and its paired standard error: `mean_se` of the
    per-image differences d in {-1, 0, 1}, far smaller than two binomial SEs when they agree on most."""
    return mean_se(np.asarray(hits, np.float64) - np.asarray(ref, np.float64))


def fmt_row(r: dict) -> str:
    delta = "" if r.get("delta") is None else f"{r['delta'] * 100:+.1f} ± {r['delta_se'] * 100:.1f} pt"
    return (f"| {r['stage']} | {r['method']} | {r['setting']} | {r['fraction']:.1%} ({r['tokens_per_image']:.0f}) | "
            f"{r['top1']:.1%} ± {r['se']:.1%} | {delta} | {r['images_per_s']:.2f} ({r['vanilla_images_per_s']:.2f}) | "
            f"{r['speedup']:.2f}x | "
            f"{r['flop_ratio']:.2f} |")


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.2))
    styles = {"APT entropy": "o-", "APT laplacian": "s--", "APT upsample": "^--", "random drop": "x:",
              "lower resolution": "D-", "resize-only": "v:"}
    zs = [r for r in rows if r["stage"] == "zero-shot"]
    for m, st in styles.items():
        pts = sorted((r for r in zs if r["method"] == m), key=lambda r: r["fraction"])
        if pts:
            ax.errorbar([r["fraction"] * 100 for r in pts], [r["top1"] * 100 for r in pts],
                        yerr=[r["se"] * 100 for r in pts], fmt=st, capsize=3, label=f"{m} (zero-shot)", alpha=0.85)
    for r in rows:
        if r["method"] == "vanilla" and r["stage"] == "zero-shot":
            ax.errorbar([100], [r["top1"] * 100], yerr=[r["se"] * 100], fmt="k*", ms=12, capsize=3, label="vanilla 224 px")
    ft = [r for r in rows if r["stage"].startswith("fine-tuned")]
    for r in ft:
        mk = "P" if r["method"].startswith("APT") else "X"
        ax.errorbar([r["fraction"] * 100], [r["top1"] * 100], yerr=[r["se"] * 100], fmt=mk, ms=10, capsize=3,
                    label=f"{r['stage']}: {r['method']} {r['setting']}")
    ax.set_xlabel("patch tokens kept (% of the 224-px uniform grid)")
    ax.set_ylabel("top-1 (%), ± binomial SE")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


def write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


# ------------------------------------------------------------------------------------ main
def parse_pair(s: str) -> tuple[float, float]:
    a, b = s.split(",")
    return float(a), float(b)

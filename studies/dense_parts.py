"""The pieces of `studies/study_dense.py`: CamVid in memory, the model and its head (``--head``: linear or conv),
evaluation rows at equal tokens, the fine-tune arms (with the study's minimal augmentation), paired bootstrap comparisons and the
report (table, plot, overlays, JSON)."""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from apt_data import APTConfig, pack_images, patchify
from apt_data.io import atomic_write
from apt_model import from_timm
from apt_model.heads import SegmentationModel, create_seg_head, freeze_norm_stats
from apt_train.dense_vis import CAMVID_CLASSES
from apt_train.flops import timm_vit_flops, vit_flops
from apt_train.optim import WarmupCosine, param_groups
from apt_train.segmentation import (NearestFill, SegmentationTask, bootstrap_se, evaluate_segmentation, lowres_grid,
                                    paired_bootstrap)

from study_parts import NEG, PATCH, backbone, log, write_text

CLASSES = CAMVID_CLASSES
NUM_CLASSES = len(CLASSES)
IGNORE = 11
DETAIL_PATH = ("patch_embed.down.", "patch_embed.zero_linear.")
SCALE_RANGE = (0.75, 1.5)


# ------------------------------------------------------------------------------------------ data
def load_camvid(root: Path, args) -> dict:
    """Both splits in memory at their native size: ``{split: {names, images, masks}}`` (masks: uint8 label maps,
    ``IGNORE`` = void). A mask that is missing or of another size than its image is an error naming it."""
    out = {}
    for split, limit in (("train", max(args.head_train, args.ft_train) if args.quick else 0), ("val", args.val)):
        files = sorted((root / "images" / split).glob("*.jpg")) + sorted((root / "images" / split).glob("*.png"))
        if limit and limit < len(files):  # a seeded choice across the split's sequences, in name order
            pick = np.sort(np.random.default_rng(args.seed).choice(len(files), limit, replace=False))
            files = [files[i] for i in pick]
        imgs, masks = [], []
        for f in files:
            mp = root / "annotations" / split / (f.stem + ".png")
            if not mp.is_file():
                raise SystemExit(f"{f}: no mask {mp}")
            im = np.asarray(Image.open(f).convert("RGB"))
            mk = np.asarray(Image.open(mp))
            if mk.ndim != 2 or mk.shape != im.shape[:2]:
                raise SystemExit(f"{mp}: mask {mk.shape} does not match its image {im.shape[:2]}")
            imgs.append(im)
            masks.append(mk.astype(np.uint8))
        out[split] = dict(names=[f.stem for f in files], images=imgs, masks=masks)
    return out


def resize_image(im: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bicubic resize to ``size`` (W, H)."""
    if (im.shape[1], im.shape[0]) == tuple(size):
        return im
    return np.asarray(Image.fromarray(im).resize(tuple(size), Image.BICUBIC))


def resize_mask(mk: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a label map to ``size`` (W, H)."""
    if (mk.shape[1], mk.shape[0]) == tuple(size):
        return mk
    return np.asarray(Image.fromarray(mk).resize(tuple(size), Image.NEAREST))


def augment(im: np.ndarray, mk: np.ndarray, size: tuple[int, int], rng: np.random.Generator):
    """The study's minimal training augmentation (mmseg's recipe in small): resize to ``size`` times a random
    scale in ``SCALE_RANGE``, horizontal flip with p 0.5, a random ``size`` crop (padding: black image,
    ``IGNORE`` mask). Image bicubic, mask nearest, the same geometry for both."""
    W, H = size
    r = rng.uniform(*SCALE_RANGE)
    sw, sh = int(round(W * r)), int(round(H * r))
    im, mk = resize_image(im, (sw, sh)), resize_mask(mk, (sw, sh))
    if rng.random() < 0.5:
        im, mk = im[:, ::-1], mk[:, ::-1]
    ph, pw = max(0, H - sh), max(0, W - sw)
    if ph or pw:
        im = np.pad(im, ((0, ph), (0, pw), (0, 0)))
        mk = np.pad(mk, ((0, ph), (0, pw)), constant_values=IGNORE)
    y0 = int(rng.integers(0, im.shape[0] - H + 1))
    x0 = int(rng.integers(0, im.shape[1] - W + 1))
    return np.ascontiguousarray(im[y0:y0 + H, x0:x0 + W]), np.ascontiguousarray(mk[y0:y0 + H, x0:x0 + W])


# ------------------------------------------------------------------------------------------ model
HEAD_NAMES = {"linear": "`LinearSegHead` (BatchNorm + 1x1 conv)",
              "conv": "`ConvSegHead` (1x1 conv to 128, two 3x3 convs, each with BatchNorm + GELU, 1x1 classifier)"}


def head_of(row: dict) -> str:
    """The head a row was computed with (rows cached before ``--head`` existed: linear)."""
    return row.get("head", "linear")


def cache_tag(size, head: str) -> str:
    """``WxH`` for the linear head (the cache names from before ``--head``), ``WxH-conv`` for the conv head: the
    cache of one head is never read for another."""
    return f"{size[0]}x{size[1]}" + ("" if head == "linear" else f"-{head}")


def build_model(weights: Path, device: str, head: str = "linear") -> SegmentationModel:
    """`from_timm` of the DINOv2 weights (APT at init) with a fresh head of kind ``head`` (`create_seg_head`)."""
    apt = from_timm(backbone(weights))
    return SegmentationModel(apt, create_seg_head(head, apt.num_features, NUM_CLASSES)).to(device).eval()


def uniform() -> APTConfig:
    return APTConfig(patch_size=PATCH, num_scales=3, thresholds=NEG)


@torch.no_grad()
def fit_head(model: SegmentationModel, train: dict, size, args, path: Path, n: int) -> dict:
    """The head (``args.head``) on frozen full-grid features of ``n`` train images (0: all) at ``size``: AdamW (lr 1e-3,
    wd 1e-4, batch 16, ``args.head_epochs``), cross-entropy of the logits upsampled to the half-size mask.
    Cached in ``path``."""
    if path.is_file():
        return torch.load(path)
    dev = torch.device(args.device)
    pick = (np.sort(np.random.default_rng(args.seed).choice(len(train["images"]), n, replace=False))
            if n and n < len(train["images"]) else np.arange(len(train["images"])))
    imgs = [train["images"][i] for i in pick]  # a seeded choice across the split's sequences
    half = [resize_mask(train["masks"][i], (train["masks"][i].shape[1] // 2, train["masks"][i].shape[0] // 2))
            for i in pick]
    t0 = time.perf_counter()
    feats = []
    for i in range(0, len(imgs), args.eval_batch):
        b = pack_images([resize_image(im, size) for im in imgs[i:i + args.eval_batch]], uniform(), num_prefix_tokens=1)
        feats.append(model.backbone.forward_dense(b.to(dev)).to(torch.float16).cpu())
        if (i // args.eval_batch) % 8 == 7:
            log(f"  head {size[0]}x{size[1]}: features {i + len(b.seqlens)}/{len(imgs)} ({time.perf_counter() - t0:.0f} s)")
    feats = torch.cat(feats)
    log(f"  head {size[0]}x{size[1]}: features of {len(imgs)} train images in {time.perf_counter() - t0:.0f} s")
    head = create_seg_head(args.head, model.backbone.num_features, NUM_CLASSES).to(dev).train()
    opt = torch.optim.AdamW(head.parameters(), lr=1e-3, weight_decay=1e-4)
    masks = torch.from_numpy(np.stack(half)).long()
    task = SegmentationTask(NUM_CLASSES, IGNORE)
    g = torch.Generator().manual_seed(args.seed)
    with torch.enable_grad():
        for ep in range(args.head_epochs):
            tot = 0.0
            for ix in torch.randperm(len(feats), generator=g).split(16):
                loss = task.loss(head(feats[ix].float().to(dev), tuple(masks.shape[1:])), masks[ix].to(dev))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                tot += float(loss.detach()) * len(ix)
            if ep in (0, args.head_epochs - 1):
                log(f"  head epoch {ep + 1}/{args.head_epochs}: train loss {tot / len(feats):.4f}")
    state = {k: v.cpu() for k, v in head.state_dict().items()}
    atomic_write(path, lambda tmp: torch.save(state, tmp))
    return state


# ------------------------------------------------------------------------------------------ rows
def _batches(model, imgs, masks, cfg, layouts, bs, stats):
    """``(packed batch, masks)`` for `evaluate_segmentation`, counting tokens and FLOPs in ``stats``."""
    for i in range(0, len(imgs), bs):
        lays = layouts[i:i + bs] if layouts is not None else [patchify(im, cfg) for im in imgs[i:i + bs]]
        b = pack_images(imgs[i:i + bs], cfg, num_prefix_tokens=1, layouts=lays)
        stats["tokens"] += sum(b.seqlens) - b.num_images
        stats["flops"] += vit_flops(b, model.backbone)
        yield b, [torch.from_numpy(np.ascontiguousarray(m)) for m in masks[i:i + bs]]


def eval_row(model, task, imgs, masks, cfg, layouts, args, *, stage, method, setting, size, pair=None, fill=False,
             grid=None, ref_size=None) -> dict:
    """One row: mIoU (logits upsampled to the native masks), per-class IoU, pixel accuracy, tokens, FLOPs and
    inference images/s of ``model`` on ``imgs`` with ``cfg`` (``layouts`` given: those; ``fill``: dropped cells
    from their nearest kept token). Per-image confusion matrices in ``per_image`` for the paired comparisons."""
    m = SegmentationModel(NearestFill(model.backbone), model.head) if fill else model
    stats = dict(tokens=0, flops=0.0)
    res = evaluate_segmentation(m, _batches(model, imgs, masks, cfg, layouts, args.eval_batch, stats), task,
                                torch.device(args.device), caption=f"{stage} {method} {setting}",
                                amp=args.device.startswith("cuda"))
    W, H = ref_size or size
    G2 = (W // PATCH) * (H // PATCH)
    n = len(imgs)
    return dict(stage=stage, size=f"{size[0]}x{size[1]}", head=args.head, method=method, setting=setting,
                pair=list(pair) if pair else None, grid=list(grid) if grid else None, n=n,
                tokens_per_image=stats["tokens"] / n, fraction=stats["tokens"] / (n * G2),
                flop_ratio=stats["flops"] / timm_vit_flops(model.backbone, n, G2),
                miou=res.metrics.miou, se=bootstrap_se(res.per_image, args.bootstrap, args.seed),
                pixel_accuracy=res.metrics.pixel_accuracy, per_class_iou=res.metrics.as_dict(CLASSES)["per_class_iou"],
                infer_images_per_s=res.images_per_s, per_image=res.per_image.tolist())


def lowres_row(model, task, native_imgs, masks, tokens, grid_hw, args, *, stage, size, pair, grid=None) -> dict:
    """Lower resolution: every image resized to the grid of the full grid's aspect closest to ``tokens`` (or
    ``grid``), through the full-grid model; logits upsampled to the native masks."""
    rows, cols = grid or lowres_grid(tokens, grid_hw)
    small = [resize_image(im, (cols * PATCH, rows * PATCH)) for im in native_imgs]
    st = f"({pair[0]:g}, {pair[1]:g})" if pair else ""
    return eval_row(model, task, small, masks, uniform(), None, args, stage=stage, method="lower resolution",
                    setting=f"{cols * PATCH}x{rows * PATCH} (APT {st}'s count)", size=size, pair=pair,
                    grid=(rows, cols), ref_size=size)


def add_paired(rows: list[dict], reps: int, seed: int = 0) -> None:
    """Δ to the full grid of the same stage, size and head, and APT - lower resolution at the same pair (paired
    bootstrap over images)."""
    for r in rows:
        peers = [q for q in rows if q["stage"] == r["stage"] and q["size"] == r["size"] and head_of(q) == head_of(r)]
        ref = next((q for q in peers if q["method"] == "full grid"), None)
        if ref is not None and ref is not r:
            r["delta"], r["delta_se"] = paired_bootstrap(np.array(r["per_image"]), np.array(ref["per_image"]), reps, seed)
        low = next((q for q in peers if q["method"] == "lower resolution" and q["pair"] == r["pair"]), None)
        if r["method"].startswith("APT") and low is not None:
            r["vs_low"], r["vs_low_se"] = paired_bootstrap(np.array(r["per_image"]), np.array(low["per_image"]),
                                                           reps, seed)


@torch.no_grad()
def predict(model, imgs, masks, cfg, layouts=None) -> list[np.ndarray]:
    """Argmax label maps at the masks' sizes (for the overlays)."""
    model.eval()
    out = []
    dev = next(model.parameters()).device
    for k, (im, mk) in enumerate(zip(imgs, masks)):
        lay = layouts[k] if layouts is not None else patchify(im, cfg)
        b = pack_images([im], cfg, num_prefix_tokens=1, layouts=[lay]).to(dev)
        out.append(model(b, [mk.shape])[0].argmax(0).to(torch.uint8).cpu().numpy())
    return out


# ------------------------------------------------------------------------------------------ fine-tunes
def arm_name(method: str, pair) -> str:
    return "ft-" + method.replace(" ", "-") + ("" if pair is None else f"-{pair[0]:g}-{pair[1]:g}")


def optimizer(model: SegmentationModel, args) -> torch.optim.Optimizer:
    """AdamW groups: the backbone's by layer decay (`param_groups`), APT's detail path (zero at init, new
    parameters) and the head at the full lr."""
    groups = param_groups(model.backbone, weight_decay=0.05, layer_decay=args.layer_decay)
    detail = {"params": [], "param_names": [], "weight_decay": 0.0, "lr_scale": 1.0}
    for g in groups:
        keep = [(n, p) for n, p in zip(g["param_names"], g["params"]) if not n.startswith(DETAIL_PATH)]
        detail["params"] += [p for n, p in zip(g["param_names"], g["params"]) if n.startswith(DETAIL_PATH)]
        g["param_names"], g["params"] = [n for n, _ in keep], [p for _, p in keep]
    head = {"params": list(model.head.parameters()), "weight_decay": 0.0, "lr_scale": 1.0}
    groups = [g for g in groups + [detail, head] if g["params"]]
    return torch.optim.AdamW([{k: v for k, v in g.items() if k != "param_names"} for g in groups], lr=args.lr)


def arm_input(im: np.ndarray, method: str, cfg: APTConfig, low):
    """The arm's view of an (augmented) image: (image, config)."""
    if method == "lower resolution":
        return resize_image(im, (low[1] * PATCH, low[0] * PATCH)), uniform()
    return im, cfg


def train_arm(model: SegmentationModel, data: dict, size, method: str, cfg: APTConfig, low, args) -> dict:
    """One recipe for every arm: the same seeded crops and order; returns the training figures."""
    dev = torch.device(args.device)
    train = data["train"]
    n = min(args.ft_train or len(train["images"]), len(train["images"]))
    steps = args.ft_steps or max(1, int(round(args.epochs * n / args.batch)))
    opt = optimizer(model, args)
    sched = WarmupCosine(opt, args.lr, steps, warmup_steps=max(1, steps // 10))
    task = SegmentationTask(NUM_CLASSES, IGNORE)
    model.train()
    freeze_norm_stats(model.head)  # frozen BatchNorm statistics (small batches), affine trained
    order = np.concatenate([np.random.default_rng([args.seed, e]).permutation(n)
                            for e in range(int(np.ceil(steps * args.batch / n)) + 1)])
    seconds = tokens = flops = ref_flops = 0.0
    losses = []
    G2 = (size[0] // PATCH) * (size[1] // PATCH)
    for step in range(steps):
        ims, mks = [], []
        for k in order[step * args.batch:(step + 1) * args.batch]:
            a, m = augment(train["images"][k], train["masks"][k], size,
                           np.random.default_rng([args.seed, step, int(k)]))
            ims.append(a)
            mks.append(m)
        views = [arm_input(a, method, cfg, low) for a in ims]
        b = pack_images([v for v, _ in views], views[0][1], num_prefix_tokens=1)
        masks = torch.from_numpy(np.stack(mks)).long().to(dev)
        t0 = time.perf_counter()
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            logits = model(b.to(dev), [tuple(masks.shape[1:])] * len(ims))
        loss = task.loss(logits, masks)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        seconds += time.perf_counter() - t0
        losses.append(float(loss.detach()))
        tokens += sum(b.seqlens) - b.num_images
        flops += vit_flops(b, model.backbone)
        ref_flops += timm_vit_flops(model.backbone, len(ims), G2)
        if step % 10 == 0 or step == steps - 1:
            log(f"  {method} {step + 1}/{steps}: loss {np.mean(losses[-10:]):.4f}, {seconds:.0f} s")
    model.eval()
    return dict(steps=steps, train_images=steps * args.batch, train_seconds=seconds,
                train_images_per_s=steps * args.batch / seconds, train_flop_ratio=flops / ref_flops,
                train_tokens_per_image=tokens / (steps * args.batch), first_loss=losses[0], last_loss=float(np.mean(losses[-10:])))


def finetune_arm(weights: Path, head_path: Path, data: dict, size, method: str, pair, low, args, cache: Path) -> dict:
    """Fine-tune one arm from the frozen start (weights + fitted head), evaluate it on val; cached as JSON (its row,
    with the overlay predictions in an .npz beside it)."""
    path = cache / f"{arm_name(method, pair)}-{cache_tag(size, args.head)}.json"
    if path.is_file():
        log(f"fine-tune {path.stem}: read back")
        return json.loads(path.read_text())
    model = build_model(weights, args.device, args.head)
    model.head.load_state_dict(torch.load(head_path))
    cfg = uniform() if pair is None else APTConfig(patch_size=PATCH, num_scales=3, thresholds=tuple(pair))
    log(f"fine-tune {method} {pair or ''} {low or ''} at {size[0]}x{size[1]}, {args.head} head")
    fig = train_arm(model, data, size, method, cfg, low, args)
    task = SegmentationTask(NUM_CLASSES, IGNORE)
    val = data["val"]
    st = f"({pair[0]:g}, {pair[1]:g})" if pair else f"{size[0]}x{size[1]}"
    if method == "lower resolution":
        row = lowres_row(model, task, val["images"], val["masks"], 0, None, args, stage="fine-tuned", size=size,
                         pair=pair, grid=low)
        imgs = [resize_image(im, (low[1] * PATCH, low[0] * PATCH)) for im in val["images"][:args.overlays]]
    else:
        imgs_all = [resize_image(im, size) for im in val["images"]]
        row = eval_row(model, task, imgs_all, val["masks"], cfg, None, args, stage="fine-tuned", method=method,
                       setting=st, size=size, pair=pair)
        imgs = imgs_all[:args.overlays]
    row.update(fig)
    preds = predict(model, imgs, val["masks"][:args.overlays], uniform() if method == "lower resolution" else cfg)
    save_npz(path.with_suffix(".npz"), preds)
    write_text(path, json.dumps(row))
    log(fmt_row(row))
    return row


def save_npz(path: Path, arrays: list) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, *arrays)
    atomic_write(path, write)


def load_npz(path: Path) -> list:
    with np.load(path) as z:
        return [z[f"arr_{i}"] for i in range(len(z.files))]


def cached_finetunes(cache: Path, size, head: str = "linear") -> list[dict]:
    rows = [json.loads(p.read_text()) for p in sorted(cache.glob(f"ft-*-{cache_tag(size, head)}.json"))]
    order = {"full grid": 0, "APT entropy": 1, "lower resolution": 2}
    rows.sort(key=lambda r: (order.get(r["method"], 9), -(r["fraction"])))
    return rows


# ------------------------------------------------------------------------------------------ report
HEADER = ("| stage | size | method | head | setting | tokens kept (per image) | mIoU ± SE | Δ vs full grid ± paired SE | "
          "APT - lower res ± paired SE | pixel acc | infer img/s | train img/s | FLOPs vs full grid |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def fmt_row(r: dict) -> str:
    d = f"{r['delta'] * 100:+.1f} ± {r['delta_se'] * 100:.1f}" if "delta" in r else ""
    v = f"{r['vs_low'] * 100:+.1f} ± {r['vs_low_se'] * 100:.1f}" if "vs_low" in r else ""
    tr = f"{r['train_images_per_s']:.2f}" if "train_images_per_s" in r else ""
    return (f"| {r['stage']} | {r['size']} | {r['method']} | {head_of(r)} | {r['setting']} | {r['fraction']:.1%} "
            f"({r['tokens_per_image']:.0f}) | {r['miou'] * 100:.1f} ± {r['se'] * 100:.1f} | {d} | {v} | "
            f"{r['pixel_accuracy']:.1%} | {r['infer_images_per_s']:.2f} | {tr} | {r['flop_ratio']:.2f} |")

#!/usr/bin/env python
"""APT on a real pretrained ViT (DINOv2 ViT-S/14) against vanilla and the honest baselines (issue 14).

    python studies/study.py [--weights ../shared/models/vit_small_patch14_dinov2.imgfocus.fp16.safetensors]
        [--data ../shared/data/imagenette-224-train] [--output docs/results] [--cache out/study]
        [--val 1000] [--head-train 2000] [--finetune 1000] [--grid 5.5,4.0 6.0,4.5 6.5,5.0 7.0,5.5]
        [--ft-grid 6.0,4.5 6.5,5.0] [--extra-lr 1e-5] [--quick]

Stages (fixed seed; every figure printed and written by this command):

1. **Starting classifier.** A stratified, seeded split of the image folder into val (``--val``) and
   train; a linear head (multinomial logistic regression, LBFGS) fitted on the frozen vanilla
   backbone's final class-token features of ``--head-train`` train images (features cached in
   ``--cache``). Backbone + head is saved as a timm checkpoint (``vit_small_patch14_dinov2``,
   ``num_classes=10``, ``img_size=224``): ``CACHE/start-classifier.pth``, read back through
   ``apt_train.build.build_model`` (the path of ``tools/train.py`` / ``tools/evaluate.py
   --checkpoint``; those need ``--model vit_small_patch14_dinov2 --image-size 224``).
2. **Zero-shot at equal tokens**, for each threshold pair of ``--grid``: vanilla (uniform grid); APT
   (entropy); APT with the Laplacian and upsample scorers, thresholds calibrated
   (`apt_data.calibrate`) on the val images to entropy APT's token fraction; random base-cell
   dropping at APT's count per image (`random_base_layout`); lower resolution (the whole image
   resized to the multiple of 14 px whose uniform grid is closest to APT's mean token count;
   positions resampled as timm's ``dynamic_img_size``); resize-only (APT's layouts without the
   detail path: APT at init would be this plus the zero-initialised path, i.e. identical).
3. **After fine-tuning**: the paper's 1-epoch recipe (``recipe="short"``, lr 1e-6) with
   `apt_train.Trainer` from the starting classifier on ``--finetune`` train images, at each pair of
   ``--ft-grid``, and the control (the same recipe on the uniform grid). ``--extra-lr`` adds the same
   runs at a larger lr (labelled). ``--ft-lowres`` (on by default) adds lower resolution fine-tuned by the same
   recipe at each pair's APT token count (the baseline a user would try instead). A finished fine-tune
   in ``--cache`` is read back, not trained again.
4. **Speed**: every row's images/s of the model forward (packing excluded, first batch excluded),
   measured in this run on this machine, its ratio to vanilla's, and the analytic FLOP ratio
   (`apt_train.flops.vit_flops` / `timm_vit_flops` of the 224-px uniform grid).

``--device cuda`` runs the features, evaluations, speed and fine-tunes on a GPU (bf16 autocast, the fastest
attention backend there: flash-attn varlen where installed); ``--workers`` gives the fine-tunes loader
processes and ``--finetune -1`` the whole train split (the GPU command is in docs/results/README.md).

Every accuracy is given with its binomial standard error ``sqrt(p (1 - p) / n)``, n = val images.
Writes ``OUTPUT/study.md`` (command, settings, table), ``OUTPUT/study.png`` (top-1 against tokens
kept) and ``OUTPUT/study.json``. ``--quick``: a few images and one or two steps of every stage (the
test).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

from apt_data import APTConfig, list_image_folder, patchify
from apt_data.calibrate import calibrate
from apt_train.evaluation import random_base_layout

from study_parts import (
    ROOT, DEFAULT_DATA, DEFAULT_WEIGHTS, HEADER, MODEL, NEG, PATCH, SCORER_BASE, SIZE, SPEED, backbone, cls_features, eval_rows, finetune, fit_head, fmt_row, load_images, log, lowres_size, paired_delta, parse_pair, plot, scored, stratified_split, subset_folder, write_text)


def parse_args(argv=None) -> argparse.Namespace:
    """The study's flags (``--quick``: a few images, one step per fine-tune); a missing weights file exits 2."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", default=str(DEFAULT_WEIGHTS))
    ap.add_argument("--data", default=str(DEFAULT_DATA), help="ImageNet-layout folder of 224-px images")
    ap.add_argument("--output", default=str(ROOT / "docs" / "results"))
    ap.add_argument("--cache", default=str(ROOT / "out" / "study"), help="features, checkpoints, fine-tune runs")
    ap.add_argument("--val", type=int, default=1000)
    ap.add_argument("--eval-images", type=int, default=None,
                    help="evaluate on the first N val images only (a stratified prefix; the split is unchanged)")
    ap.add_argument("--head-train", type=int, default=2000)
    ap.add_argument("--finetune", type=int, default=1000,
                    help="train images of the 1-epoch fine-tunes (0: skip; -1: the whole train split)")
    ap.add_argument("--grid", nargs="+", type=parse_pair, default=[(5.5, 4.0), (6.0, 4.5), (6.5, 5.0), (7.0, 5.5)])
    ap.add_argument("--ft-grid", nargs="*", type=parse_pair, default=[(6.0, 4.5), (6.5, 5.0)])
    ap.add_argument("--ft-lowres", action=argparse.BooleanOptionalAction, default=True,
                    help="also fine-tune lower resolution at each --ft-grid pair's APT token count")
    ap.add_argument("--extra-lr", type=float, default=None, help="also fine-tune at this lr (labelled extra)")
    ap.add_argument("--ft-lr", type=float, default=None, help="lr of the main fine-tunes (default: the short recipe's 1e-6)")
    ap.add_argument("--zero-shot", action=argparse.BooleanOptionalAction, default=True,
                    help="the zero-shot sweep (--no-zero-shot: vanilla and the fine-tunes only)")
    ap.add_argument("--scorers", nargs="*", default=["laplacian", "upsample"])
    ap.add_argument("--head-wd", type=float, default=1e-4)
    ap.add_argument("--batch", type=int, default=32, help="images per forward")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu or cuda: features, evaluation, speed and fine-tunes")
    ap.add_argument("--workers", type=int, default=0, help="loader worker processes of the fine-tunes")
    ap.add_argument("--max-tokens", type=int, default=4096, help="token budget of a fine-tune batch")
    ap.add_argument("--speed-images", type=int, default=16, help="images of each row's paired speed measurement")
    ap.add_argument("--speed-reps", type=int, default=2, help="alternations of vanilla and the row (minimum kept)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="a few images, one step per fine-tune (the test)")
    args = ap.parse_args(argv)
    if args.quick:
        args.val, args.head_train, args.finetune = 6, 10, 10
        args.grid, args.ft_grid, args.batch = args.grid[:1], args.ft_grid[:1], 6
        args.scorers = args.scorers[:1]
        args.speed_images, args.speed_reps = 6, 1
    if not Path(args.weights).is_file():
        ap.error(f"weights {args.weights} not found")
    return args


def cached_features(vit, entries, head_idx, val_idx, val_images, args, cache: Path) -> tuple[np.ndarray, np.ndarray]:
    """The backbone's CLS features of the head-train and val images, read from ``cache`` when there."""
    t0 = time.perf_counter()
    fpath = cache / f"feat-{len(entries)}-v{len(val_idx)}-h{len(head_idx)}-s{args.seed}.npz"
    if fpath.is_file():
        z = np.load(fpath)
        log(f"features: read {fpath}")
        return z["train"], z["val"]
    ftrain = cls_features(vit, load_images([entries[i][0] for i in head_idx]), args.batch)
    fval = cls_features(vit, val_images, args.batch)
    np.savez(fpath.with_suffix(".tmp.npz"), train=ftrain, val=fval)
    os.replace(fpath.with_suffix(".tmp.npz"), fpath)
    log(f"features: {len(head_idx) + len(val_idx)} images in {time.perf_counter() - t0:.0f} s -> {fpath}")
    return ftrain, fval


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    weights, data, out, cache = Path(args.weights), Path(args.data), Path(args.output), Path(args.cache)
    out.mkdir(parents=True, exist_ok=True)
    cache.mkdir(parents=True, exist_ok=True)
    command = "python studies/study.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    t_all = time.perf_counter()
    timings = {}

    # ---- 1. split, features, head, checkpoint
    entries = list_image_folder(data)
    labels_all = np.array([e[1] for e in entries])
    classes = int(labels_all.max()) + 1
    val_idx, train_idx = stratified_split(labels_all, args.val, args.seed)
    head_idx, ft_idx = train_idx[:args.head_train], (train_idx if args.finetune < 0 else train_idx[:args.finetune])
    log(f"study: {MODEL} from {weights.name}; {data}: {len(entries)} images, {classes} classes; val {len(val_idx)}, "
        f"head-train {len(head_idx)}, fine-tune {len(ft_idx)} (stratified, seed {args.seed}); "
        f"{torch.get_num_threads()} threads")
    t0 = time.perf_counter()
    val_images = load_images([entries[i][0] for i in val_idx])
    val_labels = labels_all[val_idx].tolist()
    vit = backbone(weights).to(args.device)
    ftrain, fval = cached_features(vit, entries, head_idx, val_idx, val_images, args, cache)
    if args.eval_images and args.eval_images < len(val_idx):  # evaluate on a (still stratified) prefix of val
        val_idx, fval, val_images = val_idx[:args.eval_images], fval[:args.eval_images], val_images[:args.eval_images]
        val_labels = val_labels[:args.eval_images]
    W, b = fit_head(ftrain, labels_all[head_idx], classes, args.head_wd, 300)
    train_acc = float(((torch.from_numpy(ftrain) @ W.T + b).argmax(1).numpy() == labels_all[head_idx]).mean())
    feat_val_acc = float(((torch.from_numpy(fval) @ W.T + b).argmax(1).numpy() == np.array(val_labels)).mean())
    clf = backbone(weights, num_classes=classes)
    clf.head.weight.data.copy_(W)
    clf.head.bias.data.copy_(b)
    start = cache / "start-classifier.pth"
    torch.save(clf.state_dict(), start.with_suffix(".tmp"))
    os.replace(start.with_suffix(".tmp"), start)
    del clf, vit
    from apt_train.build import build_model

    model = build_model(MODEL, checkpoint=str(start), image_size=SIZE).to(args.device)  # as train.py / evaluate.py
    timings["classifier"] = time.perf_counter() - t0
    log(f"head: train top-1 {train_acc:.1%}, val top-1 on cached features {feat_val_acc:.1%}; saved {start} "
        f"({timings['classifier']:.0f} s)")

    # ---- 2. zero-shot
    t0 = time.perf_counter()
    rows = []

    def add(stage, method, setting, r):
        """Record a row; its Δ is against vanilla (zero-shot) or its stage's control, on the same images."""
        ref = next((q for q in rows if q["stage"] == stage and q["method"] in ("vanilla", "vanilla control")), None)
        r.update(stage=stage, method=method, setting=setting, delta=None, delta_se=None)
        if ref is not None:
            r["delta"], r["delta_se"] = paired_delta(r["hits"], ref["hits"])
        rows.append(r)
        log(fmt_row(r))

    uni = APTConfig(patch_size=PATCH, num_scales=3, thresholds=NEG)
    SPEED.update(images=val_images, reps=args.speed_reps, n=args.speed_images)
    log(HEADER)
    add("zero-shot", "vanilla", "224 px", eval_rows(model, val_images, val_labels, uni, bs=args.batch))
    vanilla = rows[0]
    if abs(vanilla["top1"] - feat_val_acc) > 1.5 / len(val_idx):
        log(f"WARNING: vanilla APT top-1 {vanilla['top1']:.4f} != timm features + head {feat_val_acc:.4f}")
    scores = {s: scored(val_images, s) for s in (args.scorers if args.zero_shot else [])}
    for th in (args.grid if args.zero_shot else []):
        cfg = APTConfig(patch_size=PATCH, num_scales=3, thresholds=th)
        lays = [patchify(im, cfg) for im in val_images]
        r = eval_rows(model, val_images, val_labels, cfg, layouts=lays, bs=args.batch)
        add("zero-shot", "APT entropy", f"({th[0]:g}, {th[1]:g})", r)
        frac, tpi = r["fraction"], r["tokens_per_image"]
        for s in args.scorers:
            c = calibrate(scores[s], APTConfig(patch_size=PATCH, num_scales=3, thresholds=SCORER_BASE[s], scorer=s),
                          frac, SCORER_BASE[s])
            cs = APTConfig(patch_size=PATCH, num_scales=3, thresholds=c.thresholds, scorer=s)
            add("zero-shot", f"APT {s}", f"({c.thresholds[0]:.3g}, {c.thresholds[1]:.3g})",
                eval_rows(model, val_images, val_labels, cs, bs=args.batch))
        rnd = [random_base_layout(im.shape[:2], cfg, len(l), np.random.default_rng([args.seed, k]))
               for k, (im, l) in enumerate(zip(val_images, lays))]
        add("zero-shot", "random drop", f"APT's count, ({th[0]:g}, {th[1]:g})",
            eval_rows(model, val_images, val_labels, cfg, layouts=rnd, bs=args.batch))
        px = lowres_size(tpi)
        small = load_images([entries[i][0] for i in val_idx], px)
        add("zero-shot", "lower resolution", f"{px} px", eval_rows(model, small, val_labels, uni, bs=args.batch))
        add("zero-shot", "resize-only", f"({th[0]:g}, {th[1]:g})",
            eval_rows(model, val_images, val_labels, cfg, layouts=lays, resize_only=True, bs=args.batch))
    timings["zero-shot"] = time.perf_counter() - t0

    # ---- 3. fine-tune
    ft_info = []
    if args.finetune and args.ft_grid:
        t0 = time.perf_counter()
        ftdir = subset_folder(data, [entries[i] for i in ft_idx], cache / "finetune-data")
        steps = 1 if args.quick else None
        max_tokens = 600 if args.quick else args.max_tokens
        run_on = dict(device=args.device, workers=args.workers)
        lrs = [(args.ft_lr, f"fine-tuned (short, lr {args.ft_lr or 1e-6:g})")]
        if args.extra_lr:
            lrs.append((args.extra_lr, f"EXTRA fine-tuned (short, lr {args.extra_lr:g})"))
        for lr, stage in lrs:
            for th in [NEG] + list(args.ft_grid):
                tag = "uniform" if th == NEG else f"{th[0]:g}-{th[1]:g}"
                ftm, secs, nsteps = finetune(start, ftdir, th, cache / f"ft-{tag}-lr{lr or 'short'}", lr=lr,
                                             steps=steps, max_tokens=max_tokens, **run_on)
                ft_info.append(dict(stage=stage, thresholds=tag, seconds=secs, steps=nsteps))
                log(f"fine-tune {stage} {tag}: {nsteps} steps in {secs:.0f} s")
                if th == NEG:
                    add(stage, "vanilla control", "224 px", eval_rows(ftm, val_images, val_labels, uni, bs=args.batch))
                    del ftm
                    continue
                cfg = APTConfig(patch_size=PATCH, num_scales=3, thresholds=th)
                r = eval_rows(ftm, val_images, val_labels, cfg, bs=args.batch)
                add(stage, "APT entropy", f"({th[0]:g}, {th[1]:g})", r)
                del ftm
                if args.ft_lowres:  # the same recipe at the lower resolution with APT's token count
                    px = lowres_size(r["tokens_per_image"])
                    ftm, secs, nsteps = finetune(start, ftdir, NEG, cache / f"ft-lowres{px}-lr{lr or 'short'}", lr=lr,
                                                 steps=steps, max_tokens=max_tokens, image_size=px, **run_on)
                    ft_info.append(dict(stage=stage, thresholds=f"lower resolution {px} px", seconds=secs, steps=nsteps))
                    log(f"fine-tune {stage} lower resolution {px} px: {nsteps} steps in {secs:.0f} s")
                    small = load_images([entries[i][0] for i in val_idx], px)
                    add(stage, "lower resolution", f"{px} px", eval_rows(ftm, small, val_labels, uni, bs=args.batch))
                    del ftm
        timings["fine-tune"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - t_all

    # ---- 4. report
    table = "\n".join([HEADER] + [fmt_row(r) for r in rows])
    where = f"{torch.get_num_threads()} CPU threads"
    if str(args.device).startswith("cuda"):
        from apt_model import resolve_backend

        where = (f"{torch.cuda.get_device_name(args.device)}, bf16 autocast, attention backend "
                 f"`{resolve_backend('auto', torch.device(args.device), torch.bfloat16)}`")
    title = (f"DINOv2 ViT-S/14 + linear head, Imagenette val ({len(val_idx)} images), zero-shot and after 1 epoch")
    plot(rows, out / "study.png", title)
    settings = (f"- model: `{MODEL}` (DINOv2 ViT-S/14, `{weights.name}`), 224 px (16x16 grid of 14-px patches, 256 "
                f"patch tokens), APT scales 14/28/56 px\n"
                f"- data: `{data.name}`, {len(entries)} images, {classes} classes; stratified seeded split "
                f"(seed {args.seed}): {len(val_idx)} val, linear head fitted on {len(head_idx)} train images "
                f"(LBFGS, L2 {args.head_wd:g}; train top-1 {train_acc:.1%}), fine-tunes on the first "
                f"{len(ft_idx)} of those (1 epoch)\n"
                f"- laplacian/upsample thresholds: calibrated on the val images' score maps to entropy APT's "
                f"token fraction (search directions {SCORER_BASE})\n"
                f"- lower resolution: the image resized (bicubic) to the multiple of 14 px whose grid is closest to "
                f"APT's mean token count; positions resampled (bicubic) as timm's `dynamic_img_size`\n"
                f"- speed: model forward only (packing excluded), {where}, the first "
                f"{args.speed_images} val images of each row alternated with the vanilla 224-px batch of the same "
                f"images {args.speed_reps} times after one warm-up, the fastest of each kept (pairing and the minimum "
                f"reduce, but do not remove, the noise of other jobs on the machine); speed vs vanilla = vanilla "
                f"time / row time; FLOPs vs vanilla = `vit_flops` / `timm_vit_flops` of the 224-px grid (analytic)\n"
                f"- SE: binomial, sqrt(p(1-p)/n), n = {len(val_idx)}; Δ: the top-1 difference to vanilla (zero-shot) "
                f"or to the same stage's vanilla control, on the same images, ± its paired SE (sd of the per-image "
                f"differences / sqrt(n)), which is what says whether two rows differ beyond noise\n"
                f"- run times: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()) + "\n")
    md = (f"# APT on a real pretrained ViT: the study (generated by `studies/study.py`)\n\n"
          f"Command (from the repository root, with `../shared` present):\n\n```bash\n.venv/bin/{command}\n```\n\n"
          f"{settings}\n{table}\n\n![top-1 against tokens kept](study.png)\n")
    write_text(out / "study.md", md)
    write_text(out / "study.json", json.dumps(dict(command=command, args={k: str(v) for k, v in vars(args).items()},
                                                   rows=rows, finetune=ft_info, timings=timings,
                                                   head=dict(train_top1=train_acc, val_top1=feat_val_acc)), indent=1))
    log("\n" + table)
    log(f"wrote {out / 'study.md'}, {out / 'study.png'}, {out / 'study.json'}; total {timings['total']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

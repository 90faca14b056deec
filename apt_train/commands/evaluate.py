"""``apt-eval`` (``tools/evaluate.py``): evaluate an APT model and the paper's baselines on the same images (logic: apt_train/evaluation.py).

    apt-eval [--model vit_tiny_patch16_224] [--checkpoint out/train/checkpoint-0000100.pt]
        [--data shards:val] [--baseline none resize random] [--uniform] [--thresholds 5.5 4.0]
        [--max-tokens 4096] [--output results.json]

Per method: top-1 / top-5, images/s of the model forward (data loading and the first batch
excluded), patch tokens per image against the uniform ViT grid, and analytic encoder GFLOPs per
image. ``--baseline``: ``none`` = APT as configured; ``resize`` = the same layouts without the detail
path (``model.resize_only``); ``random`` = APT's token count per image, but random base-scale cells
of the uniform grid. ``--uniform`` adds the plain ViT (every token at the base scale).

``--task segmentation`` (docs/dense.md): mIoU, pixel accuracy and per-class IoU at the masks' original
sizes per method; ``random`` fills each dropped cell from its nearest kept token, and ``lowres`` is the
full grid at the short side whose tokens match APT's (logits upsampled to the masks).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys

from ..checkpoint import atomic_write_text
from ..cli import add_eval_args, add_task_args, eval_setup
from ..dist import cleanup
from ..evaluation import evaluate_mode
from .common import Argv, prog_name, run_command, sample_data, setup_logging

log = logging.getLogger(__name__)

COMMAND = "apt-eval"


def row(name: str, r) -> str:
    return (f"| {name} | {r.top1:.2%} | {r.top5:.2%} | {r.images_per_s:.1f} | {r.tokens_per_image:.1f} | "
            f"{r.uniform_tokens / max(1, r.images):.0f} | {r.token_fraction:.1%} | {r.gflops_per_image:.3f} |")


HEADER = ("| method | top-1 | top-5 | images/s | tokens/img | uniform tokens/img | kept | GFLOPs/img |\n"
          "|---|---|---|---|---|---|---|---|")


def plain(value):
    """A flag's value as JSON: numbers, booleans, null, strings and lists as they are; anything else as text."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return str(value)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog_name(COMMAND), description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_eval_args(ap, default_data=sample_data("val") or "shards:val")
    ap.add_argument("--baseline", "--baselines", dest="baseline", nargs="+", default=["none"],
                    choices=["none", "resize", "random", "lowres"],
                    help="methods to run (several allowed; default: none); lowres: --task segmentation only")
    ap.add_argument("--uniform", action="store_true", help="also the plain ViT on the uniform grid")
    ap.add_argument("--output", "--json", dest="output", default=None, help="write the results here as JSON (atomic)")
    add_task_args(ap.add_argument_group("task"))
    return ap


SEG_NAMES = {"none": "APT", "resize": "resize", "random": "random (nearest fill)", "lowres": "lower resolution",
             "uniform": "uniform"}
SEG_HEADER = ("| method | mIoU | pixel acc | images/s | tokens/img | full-grid tokens/img | kept | GFLOPs/img |\n"
              "|---|---|---|---|---|---|---|---|")


def seg_modes(args: argparse.Namespace) -> list[str]:
    """The segmentation rows to run, APT first when ``lowres`` needs its token count."""
    modes = list(dict.fromkeys(args.baseline)) + (["uniform"] if args.uniform else [])
    return ["none"] + [m for m in modes if m != "none"] if "lowres" in modes else modes


def _seg_mode(mode: str, model, source, cfg, size: int, task, device, amp: bool, args, apt_count):
    """One row of ``apt-eval --task segmentation``: ``(SegEvalResult, TokenCount, short side, loader)``. ``none``:
    APT; ``resize``: its layouts without the detail path; ``random``: APT's count per image as random base cells,
    dropped cells filled from their nearest kept token; ``lowres``: the full grid at the short side whose tokens
    match APT's (``apt_count``); ``uniform``: the full grid. Logits are upsampled to the masks' original sizes."""
    from apt_model.heads import SegmentationModel

    from ..evaluation import random_token_batches, uniform_config
    from ..segmentation import NearestFill, TokenCount, counting, evaluate_segmentation, lowres_short_side
    from ..tasks import mask_pairs, segmentation_loader

    side = size
    if mode == "lowres":
        side = lowres_short_side(apt_count.sizes, size, cfg.patch_size, apt_count.tokens)
    loader = segmentation_loader(source, uniform_config(cfg) if mode in ("lowres", "uniform") else cfg, model, side,
                                 train=False, max_tokens=args.max_tokens, max_images=args.max_images,
                                 workers=args.workers)
    run_model = model
    if mode == "random":
        loader = random_token_batches(loader, args.seed)
        run_model = SegmentationModel(NearestFill(model.backbone), model.head)
    count = TokenCount()
    model.backbone.resize_only = mode == "resize"
    try:
        res = evaluate_segmentation(run_model, counting(mask_pairs(loader), model.backbone, count), task, device,
                                    caption=mode, amp=amp)
    finally:
        model.backbone.resize_only = False
    return res, count, side, loader


def _evaluate_segmentation(args: argparse.Namespace) -> int:
    """``--task segmentation``: mIoU, per-class IoU and pixel accuracy at the masks' original sizes of APT and the
    ``--baseline`` rows (``--uniform``: the full grid), with tokens, kept fraction and GFLOPs per image."""
    import torch

    from ..build import model_image_size, model_patch_size
    from ..config import check_device, loader_config
    from ..tasks import open_segmentation, segmentation_model

    check_device(args.device)
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    torch.manual_seed(args.seed)
    source = open_segmentation(args.data, args.masks, "val", "--data", args.reduce_zero_label, args.void)
    model, task = segmentation_model(args.model, args.checkpoint, args.num_classes, image_size=args.image_size,
                                     num_scales=args.num_scales, attn_backend=args.attn_backend, head=args.head)
    model = model.to(device).eval()
    size = model_image_size(model.backbone)
    cfg = loader_config(patch_size=model_patch_size(model.backbone, args.patch_size, args.num_scales),
                        num_scales=args.num_scales, thresholds=args.thresholds, scorer=args.scorer,
                        max_tokens=args.max_tokens, max_images=args.max_images)
    amp = device.type == "cuda" if args.amp is None else bool(args.amp)
    log.info(f"evaluate segmentation: {args.model}{' from ' + args.checkpoint if args.checkpoint else ' (random init)'} "
             f"on {args.data} ({len(source)} images), short side {size} px, {cfg}, {task.num_classes} classes, "
             f"{task.head} head, {device}")
    print(SEG_HEADER)
    results, counts, skipped, per_class = {}, {}, {}, []
    for mode in seg_modes(args):
        res, count, side, loader = _seg_mode(mode, model, source, cfg, size, task, device, amp, args, counts.get("none"))
        counts[mode] = count
        ref = counts["none"].grid if mode == "lowres" else count.grid  # the full grid at the full size
        n = max(1, res.images)
        row = dict(res.metrics.as_dict(task.class_names), images=res.images, images_per_s=res.images_per_s,
                   tokens_per_image=count.tokens / n, full_grid_tokens_per_image=ref / n,
                   token_fraction=count.tokens / max(1, ref), gflops_per_image=count.flops / n / 1e9, short_side=side)
        results[mode] = row
        skipped[mode] = dict(loader.stats.skipped)
        name = SEG_NAMES[mode] + (f" ({side} px)" if mode == "lowres" else "")
        print(f"| {name} | {row['miou']:.2%} | {row['pixel_accuracy']:.2%} | {row['images_per_s']:.1f} | "
              f"{row['tokens_per_image']:.1f} | {row['full_grid_tokens_per_image']:.0f} | {row['token_fraction']:.1%} | "
              f"{row['gflops_per_image']:.3f} |", flush=True)
        per_class.append(f"per-class IoU, {name}: " + ", ".join(
            f"{k} {'-' if v is None else f'{v:.2%}'}" for k, v in row["per_class_iou"].items()))
    print("\n".join(per_class))
    bad = {m: s for m, s in skipped.items() if s}
    log.info(f"skipped bad samples: {bad if bad else 'none'}")
    if args.output:
        atomic_write_text(args.output, json.dumps({"args": {k: plain(v) for k, v in vars(args).items()},
                                                   "config": str(cfg), "results": results}, indent=1))
    return 0


def _evaluate(argv: Argv) -> int:
    ap = parser()
    args = ap.parse_args(argv)
    if args.task == "segmentation":
        return _evaluate_segmentation(args)
    if "lowres" in args.baseline:
        ap.error("--baseline lowres: --task segmentation only")
    setup = eval_setup(args)
    model, cfg, source, info, kw, amp = setup.model, setup.cfg, setup.source, setup.info, setup.loader_kw, setup.amp
    modes = list(dict.fromkeys(args.baseline)) + (["uniform"] if args.uniform else [])
    results, skipped = {}, {}
    try:
        if info.is_main:
            log.info(f"evaluate: {args.model}{' from ' + setup.checkpoint if setup.checkpoint else ' (random init)'} on "
                     f"{args.data} ({len(source)} images) at {kw['image_size']} px, {cfg}, <= {args.max_tokens} "
                     f"tokens per batch, {info.device}{', bf16' if amp else ''}")
            print(HEADER)
        for mode in modes:
            res, loader = evaluate_mode(model, source, cfg, mode, device=info.device, amp=amp, info=info,
                                        seed=args.seed, max_batches=args.max_batches, progress=mode, **kw)
            results[mode] = res.as_dict()
            skipped[mode] = dict(loader.stats.skipped)
            if info.is_main:
                print(row({"none": "APT", "resize": "resize", "random": "random", "uniform": "uniform"}[mode], res),
                      flush=True)
        if info.is_main:
            bad = {m: s for m, s in skipped.items() if s}
            log.info(f"skipped bad samples: {bad if bad else 'none'}")
            if args.output:
                flags = {**vars(args), "checkpoint": setup.checkpoint}  # a folder's newest checkpoint: the file read
                atomic_write_text(args.output, json.dumps({"args": {k: plain(v) for k, v in flags.items()},
                                                           "config": str(cfg), "results": results}, indent=1))
    finally:
        cleanup(info)
    return 0


def main(argv: Argv = None) -> int:
    """Evaluate; 0 when done, 2 on a bad flag, setting or input (one ``error:`` line)."""
    setup_logging()
    return run_command(COMMAND, _evaluate, argv)


if __name__ == "__main__":
    sys.exit(main())

"""``apt-sweep`` (``tools/sweep.py``): speed-accuracy sweep over APT thresholds: a CSV and a plot (logic: apt_train/evaluation.py).

    apt-sweep [--model ... --checkpoint ...] [--data shards:val]
        [--scales 0.6 0.8 1.0 1.2 1.5] [--grid 5.5,4.0 6.0,4.5 ...] [--baseline resize random]
        [--output out/sweep]

Evaluates APT at every thresholds setting (``--grid`` pairs, or ``--scales`` factors on
``--thresholds``, default the paper's 5.5 4.0), optionally the ``resize`` / ``random`` baselines at
each setting, and the uniform ViT once as the reference; writes ``OUTPUT/sweep.csv`` and
``OUTPUT/sweep.png`` (top-1 against model images/s and against GFLOPs per image), both atomically.
"""
from __future__ import annotations

import argparse
import csv
import io
import logging
import sys
from dataclasses import replace
from pathlib import Path

from apt_data.io import atomic_write

from ..checkpoint import atomic_write_text
from ..cli import add_eval_args, eval_setup
from ..config import SetupError
from ..dist import cleanup
from ..evaluation import evaluate_mode
from .common import Argv, prog_name, run_command, sample_data, setup_logging

log = logging.getLogger(__name__)

COMMAND = "apt-sweep"

FIELDS = ["method", "thresholds", "top1", "top5", "images_per_s", "tokens_per_image", "token_fraction",
          "gflops_per_image", "images"]


def parse_grid(values: list[str], n: int) -> list[tuple[float, ...]]:
    """``--grid`` values (``5.5,4.0``) as threshold tuples of ``n`` values; `SetupError` otherwise."""
    out = []
    for v in values:
        try:
            t = tuple(float(x) for x in v.split(","))
        except ValueError:
            raise SetupError(f"--grid {v!r}: expected {n} comma-separated numbers") from None
        if len(t) != n:
            raise SetupError(f"--grid {v!r}: expected {n} thresholds (one per scale above the base), got {len(t)}")
        out.append(t)
    return out


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    styles = {"APT": ("o-", "C0"), "resize": ("s--", "C1"), "random": ("^:", "C2"), "uniform": ("*", "k")}
    for ax, x, label in ((axes[0], "images_per_s", "images/s (model forward)"), (axes[1], "gflops_per_image", "GFLOPs / image")):
        for method, (style, color) in styles.items():
            pts = sorted((r for r in rows if r["method"] == method), key=lambda r: r[x])
            if not pts:
                continue
            ax.plot([r[x] for r in pts], [100 * r["top1"] for r in pts], style, color=color, label=method,
                    markersize=12 if method == "uniform" else 6)
            if method == "APT":
                for r in pts:
                    ax.annotate(f"{r['token_fraction']:.0%}", (r[x], 100 * r["top1"]), textcoords="offset points",
                                xytext=(4, 4), fontsize=7)
        ax.set_xlabel(label)
        ax.set_ylabel("top-1 (%)")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle("APT speed-accuracy sweep (labels: tokens kept vs the uniform grid)")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(buf.getvalue()))


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog_name(COMMAND), description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_eval_args(ap, default_data=sample_data("val") or "shards:val")
    ap.add_argument("--scales", type=float, nargs="+", default=[0.6, 0.8, 1.0, 1.2, 1.5],
                    help="factors on --thresholds (ignored with --grid)")
    ap.add_argument("--grid", nargs="+", default=None, help="thresholds settings, e.g. 5.5,4.0 6,4.5")
    ap.add_argument("--baseline", "--baselines", dest="baseline", nargs="*", default=[],
                    choices=["none", "resize", "random"],
                    help="baselines to run at each setting besides APT (none: APT is always run)")
    ap.add_argument("--output", "--out", dest="output", default="out/sweep",
                    help="folder for sweep.csv and sweep.png (default: %(default)s)")
    return ap


def _sweep(argv: Argv) -> int:
    args = parser().parse_args(argv)
    setup = eval_setup(args)
    model, cfg, source, info, kw, amp = setup.model, setup.cfg, setup.source, setup.info, setup.loader_kw, setup.amp
    n = cfg.num_scales - 1
    settings = parse_grid(args.grid, n) if args.grid else [tuple(s * t for t in cfg.thresholds) for s in args.scales]
    rows = []
    try:
        todo = [("uniform", cfg)] + [(m, replace(cfg, thresholds=t)) for t in settings
                                     for m in list(dict.fromkeys(["none"] + args.baseline))]
        for mode, c in todo:
            res, _ = evaluate_mode(model, source, c, mode, device=info.device, amp=amp, info=info, seed=args.seed,
                                   max_batches=args.max_batches, progress=mode, **kw)
            r = {"method": {"none": "APT"}.get(mode, mode),
                 "thresholds": "-inf" if mode == "uniform" else " ".join(f"{t:g}" for t in c.thresholds),
                 **{k: v for k, v in res.as_dict().items() if k in FIELDS}}
            rows.append(r)
            if info.is_main:
                log.info(f"{r['method']:8s} thresholds {r['thresholds']:>12s}: top-1 {r['top1']:.2%} "
                         f"{r['images_per_s']:.1f} images/s {r['tokens_per_image']:.1f} tokens/image "
                         f"({r['token_fraction']:.1%}) {r['gflops_per_image']:.3f} GFLOPs/image")
        if info.is_main:
            out = Path(args.output)
            buf = io.StringIO()
            w = csv.DictWriter(buf, fieldnames=FIELDS)
            w.writeheader()
            w.writerows(rows)
            atomic_write_text(out / "sweep.csv", buf.getvalue())
            plot(rows, out / "sweep.png")
            log.info(f"wrote {out / 'sweep.csv'} and {out / 'sweep.png'}")
    finally:
        cleanup(info)
    return 0


def main(argv: Argv = None) -> int:
    """Sweep; 0 when done, 2 on a bad flag, setting or input (one ``error:`` line)."""
    setup_logging()
    return run_command(COMMAND, _sweep, argv)


if __name__ == "__main__":
    sys.exit(main())

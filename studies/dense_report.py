"""The report of `studies/study_dense.py`: the Markdown table, the mIoU-against-tokens plot, the overlays and
the JSON (split from `dense_parts`, which computes the rows)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from apt_data import APTConfig, patchify
from apt_data.io import atomic_write
from apt_train.dense_vis import CAMVID_PALETTE, save_dense_panels

from study_parts import PATCH, log, write_text

from dense_parts import (HEADER, HEAD_NAMES, fmt_row, resize_image, arm_name, load_npz, cache_tag, head_of, CLASSES,
                         IGNORE, SCALE_RANGE)


def summary(rows: list[dict], size: str, head: str = "linear") -> str:
    """The issue's table for one size and head: per pair, each APT scorer, random drop and lower resolution (mIoU, Δ vs
    the full grid ± paired SE), and APT entropy - lower resolution ± paired SE."""
    fz = [r for r in rows if r["stage"] == "frozen" and r["size"] == size and head_of(r) == head]
    full = next((r for r in fz if r["method"] == "full grid"), None)
    if full is None:
        return ""
    methods = ["APT entropy", "APT laplacian", "APT upsample", "random drop", "lower resolution"]
    methods = [m for m in methods if any(r["method"] == m for r in fz)]
    out = [f"| tokens kept (APT entropy pair) | {' | '.join(methods)} | APT entropy - lower res |",
           "|---" * (len(methods) + 2) + "|", f"| 100% (full grid) | {full['miou'] * 100:.1f}" + " |" * (len(methods) + 1)]
    for pair in sorted({tuple(r["pair"]) for r in fz if r["pair"]}):
        cells, apt = [], None
        for m in methods:
            r = next((q for q in fz if q["method"] == m and tuple(q["pair"] or ()) == pair), None)
            if r is None:
                cells.append("")
                continue
            apt = r if m == "APT entropy" else apt
            extra = f"; {r['setting'].split(' ')[0]}" if m == "lower resolution" else ""
            cells.append(f"{r['miou'] * 100:.1f} ({r['fraction']:.0%}, Δ {r['delta'] * 100:+.1f} ± "
                         f"{r['delta_se'] * 100:.1f}{extra})")
        v = f"{apt['vs_low'] * 100:+.1f} ± {apt['vs_low_se'] * 100:.1f}" if apt and "vs_low" in apt else ""
        frac = f"{apt['fraction']:.0%}" if apt else ""
        out.append(f"| {frac} ({pair[0]:g}, {pair[1]:g}) | " + " | ".join(cells) + f" | {v} |")
    return "\n".join(out)


COLOURS = {"APT entropy": "C0", "APT laplacian": "C1", "APT upsample": "C2", "random drop": "C3",
           "lower resolution": "C4"}


def plot(rows: list[dict], path: Path, title: str) -> None:
    """mIoU against tokens kept, one panel per size and head; fine-tuned arms as large markers on the first size's."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = list(dict.fromkeys((r["size"], head_of(r)) for r in rows))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.6 * len(panels), 4.6), squeeze=False)
    styles = {"APT entropy": "o-", "APT laplacian": "s--", "APT upsample": "^--", "random drop": "x:",
              "lower resolution": "D-"}
    for ax, (size, head) in zip(axes[0], panels):
        for stage, alpha in (("frozen", 0.85), ("fine-tuned", 1.0)):
            pts_all = [r for r in rows if r["size"] == size and head_of(r) == head and r["stage"] == stage]
            for m, st in styles.items():
                pts = sorted((r for r in pts_all if r["method"] == m), key=lambda r: r["fraction"])
                if pts:
                    fmt = st if stage == "frozen" else st[0] + "-"
                    ax.errorbar([r["fraction"] * 100 for r in pts], [r["miou"] * 100 for r in pts],
                                yerr=[r["se"] * 100 for r in pts], fmt=fmt, capsize=3, alpha=alpha, color=COLOURS[m],
                                ms=5 if stage == "frozen" else 9, label=f"{m} ({stage})")
            for r in pts_all:
                if r["method"] == "full grid":
                    ax.errorbar([100], [r["miou"] * 100], yerr=[r["se"] * 100], fmt="k*" if stage == "frozen" else "r*",
                                ms=12, capsize=3, label=f"full grid ({stage})")
        ax.set_xlabel(f"patch tokens kept (% of the {size} full grid)")
        ax.set_ylabel("CamVid val mIoU (%), ± bootstrap SE")
        ax.set_title(f"{size}, {head} head", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, loc="best")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)


def overlays(out: Path, rows: list[dict], data: dict, cache: Path, size, args) -> list[str]:
    """image | APT layout | prediction | ground truth for the first ``args.overlays`` val images: the fine-tuned
    control and each fine-tuned APT arm of every head (small, CamVid research-use images)."""
    val = data["val"]
    panels = []
    for k in range(min(args.overlays, len(val["images"]))):
        img = resize_image(val["images"][k], size)
        for r in rows:
            f = cache / f"{arm_name(r['method'], r['pair'])}-{cache_tag(size, head_of(r))}.npz"
            if r["stage"] != "fine-tuned" or r["method"] == "lower resolution" or not f.is_file():
                continue
            lay = None if r["pair"] is None else patchify(img, APTConfig(patch_size=PATCH, num_scales=3,
                                                                           thresholds=tuple(r["pair"])))
            panels.append(dict(image=img, layout=lay, pred=load_npz(f)[k], gt=val["masks"][k],
                               label=f"{val['names'][k]}\n{r['method']} {r['setting']}, {head_of(r)} head"))
    if not panels:
        return []
    name = "overlays.png"
    save_dense_panels(out / name, panels, CAMVID_PALETTE, CLASSES, IGNORE, dpi=50,
                      title=f"fine-tuned DINOv2 ViT-S/14 + {' / '.join(dict.fromkeys(head_of(r) for r in rows))} head, "
                            "CamVid val (research use only)")
    return [name]


def write_report(out: Path, rows: list[dict], args, command: str, data: dict, weights: Path, cache: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    table = "\n".join([HEADER] + [fmt_row(r) for r in rows])
    heads = list(dict.fromkeys(head_of(r) for r in rows))
    sums = "\n\n".join(f"### Frozen, {s}, {h} head\n\n{summary(rows, s, h)}" for s, h in dict.fromkeys(
        (r["size"], head_of(r)) for r in rows if r["stage"] == "frozen"))
    plot(rows, out / "dense.png", f"CamVid val (val images per size: dense.md), DINOv2 ViT-S/14 + {' / '.join(heads)} head")
    pics = overlays(out, rows, data, cache, args.sizes[0], args)
    ft = [r for r in rows if r["stage"] == "fine-tuned"]
    recipe = ""
    if ft:
        f0 = ft[0]
        recipe = (f"- fine-tune: {f0['steps']} steps of {args.batch} images ({f0['train_images']} crops, "
                  f"{f0['train_images'] / len(data['train']['images']):.2f} epochs of {len(data['train']['images'])}), "
                  f"AdamW lr {args.lr:g}, wd 0.05, layer decay {args.layer_decay:g} (APT's detail path and the head at "
                  f"the full lr), warmup 10% + cosine, grad clip 1.0, head BatchNorm statistics frozen; augmentation: "
                  f"scale {SCALE_RANGE[0]}-{SCALE_RANGE[1]}x of {args.sizes[0][0]}x{args.sizes[0][1]}, flip, random "
                  f"crop (the same crops in every arm)\n")
    md = (f"# Dense: CamVid segmentation, APT vs lower resolution at equal tokens (generated by "
          f"`studies/study_dense.py`)\n\nCommand (from the repository root, with `../shared` present):\n\n"
          f"```bash\n.venv/bin/{command}\n```\n\n"
          f"- model: DINOv2 ViT-S/14 (`{weights.name}`) as `from_timm` (APT scales 14/28/56 px, at init = "
          f"resize-only) + {'; or '.join(f'{h}: {HEAD_NAMES[h]}' for h in heads)} (the table's head column), "
          f"logits upsampled bilinearly to the native "
          f"480x360 masks; mIoU over the 11 classes, void ignored\n"
          f"- frozen head: fitted on the full-grid features of {args.head_train or 'all'} train images "
          f"({args.hires_head_train or 'all'} above 480 px; a seeded choice), {args.head_epochs} epochs AdamW\n"
          f"{recipe}"
          f"- val images per size (a seeded choice from the val split; every row of a size uses the same ones): "
          f"{', '.join(f'{n} at {sz}' for sz, n in dict((r['size'], r['n']) for r in rows).items())}\n"
          f"- SE: bootstrap over the row's val images ({args.bootstrap} resamples); Δ and "
          f"APT - lower res: paired bootstrap (the same resampled images for both)\n"
          f"- speeds: {args.device.upper()} with {torch.get_num_threads()} threads, shared with other jobs: "
          f"compare them with the FLOP ratios\n\n"
          f"{sums}\n\n### Every row\n\n{table}\n\n![mIoU against tokens kept](dense.png)\n"
          + "".join(f"\n![overlays]({p})\n" for p in pics))
    write_text(out / "dense.md", md)
    slim = [{k: v for k, v in r.items() if k != "per_image"} for r in rows]
    write_text(out / "dense.json", json.dumps(dict(command=command, args={k: str(v) for k, v in vars(args).items()},
                                                   rows=slim), indent=1))
    log("\n" + sums + "\n\n" + table)
    log(f"wrote {out / 'dense.md'}, {out / 'dense.png'}, {out / 'dense.json'}" + "".join(f", {out / p}" for p in pics))

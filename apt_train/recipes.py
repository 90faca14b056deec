"""Training recipes: default hyper-parameters that every flag can override.

- ``short`` (the paper's): 1 epoch from a fine-tuned checkpoint at lr 1e-6 (absolute, not scaled),
  layer decay 0.99, no data augmentation (so token counts and score maps come from the shard
  index), no warmup, cosine to 0. AdamW, weight decay, label smoothing and drop path as ``full``.
- ``full`` (MAE fine-tuning): AdamW (betas 0.9/0.999, weight decay 0.05, none on norms, biases,
  positions, class tokens), base lr 1.5e-3 per 256 images, ``lr = blr * images_per_step / 256``
  with ``images_per_step`` the MEAN images of a global step in the loader's plan of epoch 0 (fixed
  for the run, so the lr does not jitter with the batch sizes), layer decay 0.75, 5 warmup epochs
  then cosine per step to 1e-6, 100 epochs, label smoothing 0.1, drop path 0.1, RandAugment
  ``rand-m9-mstd0.5-inc1`` and random erasing 0.25 (before patchify).
- ``sample``: ``full`` shortened for the 400-image sample shards on a CPU (5 epochs, 1 of warmup):
  the default, what ``python tools/train.py`` runs.
"""
from __future__ import annotations

RAND_AUGMENT = "rand-m9-mstd0.5-inc1"

_FULL = dict(epochs=100, lr=None, blr=1.5e-3, min_lr=1e-6, warmup_epochs=5.0, weight_decay=0.05, layer_decay=0.75,
             label_smoothing=0.1, drop_path=0.1, augment=True, auto_augment=RAND_AUGMENT, re_prob=0.25,
             clip_grad=None)

RECIPES: dict[str, dict] = {
    "short": dict(_FULL, epochs=1, lr=1e-6, blr=None, min_lr=0.0, warmup_epochs=0.0, layer_decay=0.99,
                  augment=False, auto_augment=None, re_prob=0.0),
    "full": dict(_FULL),
    "sample": dict(_FULL, epochs=5, warmup_epochs=1.0),
}


def apply_recipe(args) -> None:
    """Fill every hyper-parameter flag left at None with the recipe's value (in place). An explicit
    ``--blr`` beats the recipe's absolute lr; an explicit ``--lr`` beats everything."""
    explicit_blr, explicit_lr = args.blr is not None, args.lr is not None
    for key, value in RECIPES[args.recipe].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if explicit_blr and not explicit_lr:
        args.lr = None

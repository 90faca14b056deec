"""Training recipes: default hyper-parameters that fill the `TrainConfig` settings the user left unset.

- ``short`` (the paper's): 1 epoch from a fine-tuned checkpoint at lr 1e-6 (absolute, not scaled),
  layer decay 0.99, no data augmentation (so token counts and score maps come from the shard
  index), no warmup, cosine to 0. AdamW, weight decay, label smoothing and drop path as ``full``.
- ``full`` (MAE fine-tuning): AdamW (betas 0.9/0.999, weight decay 0.05, none on norms, biases,
  positions, class tokens), base lr 1.5e-3 per 256 images, ``lr = blr * images_per_step / 256``
  with ``images_per_step`` the mean images of a global step (`APTLoader.mean_images_per_batch`; fixed
  for the run, so the lr does not jitter with the batch sizes), layer decay 0.75, 5 warmup epochs
  then cosine per step to 1e-6, 100 epochs, label smoothing 0.1, drop path 0.1, RandAugment
  ``rand-m9-mstd0.5-inc1``, random erasing 0.25, Mixup 0.8 and CutMix 1.0 (switch probability 0.5;
  all before patchify).
- ``sample``: ``full`` shortened for the 400-image sample shards on a CPU (8 epochs, 1 of warmup,
  no Mixup / CutMix: regularisers for long runs, which 8 epochs from scratch would only slow):
  the default, what ``python tools/train.py`` runs.
"""
from __future__ import annotations

RAND_AUGMENT = "rand-m9-mstd0.5-inc1"

_FULL = dict(epochs=100, lr=None, blr=1.5e-3, min_lr=1e-6, warmup_epochs=5.0, weight_decay=0.05, layer_decay=0.75,
             label_smoothing=0.1, drop_path=0.1, augment=True, auto_augment=RAND_AUGMENT, re_prob=0.25,
             mixup=0.8, cutmix=1.0, clip_grad=None)

RECIPES: dict[str, dict] = {
    "short": dict(_FULL, epochs=1, lr=1e-6, blr=None, min_lr=0.0, warmup_epochs=0.0, layer_decay=0.99,
                  augment=False, auto_augment=None, re_prob=0.0, mixup=0.0, cutmix=0.0),
    "full": dict(_FULL),
    "sample": dict(_FULL, epochs=8, warmup_epochs=1.0, mixup=0.0, cutmix=0.0),
}


def apply_recipe(values: dict) -> dict:
    """A copy of the flat settings ``values`` (`TrainConfig.to_dict`'s names) whose hyper-parameters left
    at None take ``values["recipe"]``'s values. An explicit ``blr`` beats the recipe's absolute lr; an
    explicit ``lr`` beats everything. Applying it twice gives the same values; an unknown recipe is a
    ValueError. `TrainConfig`'s constructor applies it."""
    recipe = values.get("recipe")
    if recipe not in RECIPES:
        raise ValueError(f"--recipe {recipe!r}: not one of {sorted(RECIPES)}")
    filled = {key: value for key, value in RECIPES[recipe].items() if values.get(key) is None}
    if values.get("blr") is not None and values.get("lr") is None:
        filled["lr"] = None
    return {**values, **filled}

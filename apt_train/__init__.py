"""apt_train: the trainer and evaluation tools of Adaptive Patch Transformers.

`tools/train.py`, `tools/evaluate.py`, `tools/sweep.py` and `tools/calibrate.py` are thin wrappers
around this package. It builds on `apt_data` (APTLoader, pack_images) and `apt_model` (from_timm).
"""
from .evaluation import MODES, EvalResult, evaluate, evaluate_mode, random_base_layout, random_token_batches
from .flops import vit_flops
from .loss import loss_scale, scaled_cross_entropy
from .optim import WarmupCosine, layer_id, param_groups

__all__ = ["EvalResult", "MODES", "evaluate", "evaluate_mode", "random_base_layout", "random_token_batches",
           "vit_flops", "loss_scale", "scaled_cross_entropy", "WarmupCosine", "layer_id", "param_groups"]

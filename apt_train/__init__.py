"""apt_train: the trainer and evaluation tools of Adaptive Patch Transformers.

`Trainer(TrainConfig(...)).fit()` trains from Python; `apt_train.commands` holds the user's commands
(the console scripts ``apt-train``, ``apt-eval``, ...; `apt_train.cli` turns their flags into configs).
It builds on `apt_data` (APTLoader, pack_images) and `apt_model` (from_timm).
"""
from .config import DataSettings, ModelSettings, OptimSettings, RunSettings, SetupError, TrainConfig
from .evaluation import MODES, EvalResult, evaluate, evaluate_mode, random_base_layout, random_token_batches
from .flops import vit_flops
from .loss import loss_scale, scaled_cross_entropy
from .optim import WarmupCosine, layer_id, param_groups
from .recipes import RECIPES, apply_recipe
from .interrupt import TrainingInterrupted
from .trainer import Trainer, TrainResult

__all__ = ["EvalResult", "MODES", "evaluate", "evaluate_mode", "random_base_layout", "random_token_batches",
           "vit_flops", "loss_scale", "scaled_cross_entropy", "WarmupCosine", "layer_id", "param_groups",
           "SetupError", "TrainConfig", "ModelSettings", "DataSettings", "OptimSettings", "RunSettings", "RECIPES", "apply_recipe", "Trainer", "TrainResult", "TrainingInterrupted"]

"""What a training run's task changes in the `Trainer`: its data sources, model, loaders, parameter
groups, loss, evaluation and checkpoint state, behind one small interface (`make_task`).

`ClassificationTask` is the default and does exactly what the trainer always did. `SegmentTrainTask`
(``--task segmentation``) reads image + mask folders (ADE20K's ``images/<split>`` +
``annotations/<split>``, or ``--data IMAGES --masks MASKS``) or shards with masks, trains ``SegmentationModel(APT backbone,
head)`` (``--head linear``: `LinearSegHead`, ``conv``: `ConvSegHead`) with mmseg's ADE20K recipe (`apt_data.transforms.segmentation_transform`), the
recipe's layer decay on the backbone and the head and APT's detail path at the full lr, and evaluates
mIoU, per-class IoU and pixel accuracy at the masks' original sizes (`evaluate_segmentation`).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import torch

from .config import SetupError

log = logging.getLogger("apt_train")

TASKS = ("classification", "segmentation")
DETAIL_PATH = ("patch_embed.down.", "patch_embed.zero_linear.")  # APT's new, zero-initialised parameters

__all__ = ["ClassificationTask", "SegmentTrainTask", "TASKS", "backbone_of", "make_task", "segmentation_model"]


def backbone_of(model: torch.nn.Module) -> torch.nn.Module:
    """The APT ViT of a run's model (itself for classification, ``model.backbone`` for segmentation)."""
    return getattr(model, "backbone", model)


def make_task(config):
    """The task object of a `TrainConfig` (``model.task``)."""
    return SegmentTrainTask(config) if config.model.task == "segmentation" else ClassificationTask()


class ClassificationTask:
    """Image classification: today's behaviour of the trainer, unchanged."""

    name = "classification"

    def open_train(self, c):
        from .data import open_data

        return open_data(c.data.train, "--data", c.data.remote_options())

    def default_val(self, c) -> tuple[Optional[str], str]:
        from .data import default_val_data

        return default_val_data(c.data.train, c.data.remote_options())

    def build_model(self, c, train_source, device):
        from .build import build_run_model

        return build_run_model(c, train_source.labels, device)

    def build_loaders(self, c, model, cfg, image_size: int, train_source):
        from .data import build_loaders

        return build_loaders(c, model, cfg, image_size, train_source)

    def param_groups(self, model, weight_decay: float, layer_decay: float) -> list[dict]:
        from .optim import param_groups

        return param_groups(model, weight_decay, layer_decay)

    def loss(self, forward, b, c, global_images, world_size: int, amp: bool, device: torch.device) -> torch.Tensor:
        from .loss import scaled_cross_entropy

        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = forward(b)
        if b.mixed:  # soft targets, smoothed as timm's Mixup smooths them
            target, smoothing = b.soft_targets(forward_classes(forward), c.optim.label_smoothing), 0.0
        else:
            target, smoothing = b.labels, c.optim.label_smoothing
        return scaled_cross_entropy(logits, target, label_smoothing=smoothing, global_images=global_images,
                                    world_size=world_size)

    def evaluate(self, model, loader, device, amp: bool, info, progress: Optional[str]):
        from .evaluation import evaluate

        return evaluate(model, loader, device, amp=amp, info=info, progress=progress)

    def log_eval(self, run_log, res, step: int, epoch: int, out: Path) -> None:
        run_log.eval_result(res, step, epoch, out)

    def class_count(self, source) -> str:
        from .data import class_count

        return f"{class_count(source)} classes"

    def augmentation_line(self, c, mix) -> str:
        """The header's line on augmentation (``c``: the run's flags by name, ``mix``: the loader's)."""
        return ("augmentation: " + (f"RandomResizedCrop + flip, RandAugment {c.auto_augment or 'off'}, random "
                                    f"erasing {c.re_prob}" if c.augment else "none")
                + (f"; Mixup {mix.mixup_alpha} / CutMix {mix.cutmix_alpha}"
                   f"{f' (box sides {mix.cutmix_minmax})' if mix.cutmix_minmax else ''}, prob {mix.prob}, "
                   f"switch {mix.switch_prob}, soft targets" if mix is not None else "; no Mixup / CutMix")
                + f"; label smoothing {c.label_smoothing}")

    def final_line(self, res) -> str:
        return f"final val: top-1 {res.top1:.2%}, top-5 {res.top5:.2%} on {res.images} images"

    def state_dict(self) -> Optional[dict]:
        return None


def forward_classes(forward) -> int:
    """The head's class count of a model, or of the model a DDP wrapper holds."""
    return getattr(forward, "module", forward).num_classes


# ------------------------------------------------------------------------------------ segmentation
def _segmentation_state(checkpoint: Optional[str]) -> tuple[Optional[dict], Optional[dict]]:
    """(model state, task state) of a segmentation trainer checkpoint; (None, None) for other weights."""
    if checkpoint is None or checkpoint.endswith(".safetensors"):
        return None, None
    from .checkpoint import read_checkpoint_file, resolve_checkpoint, verify_checkpoint

    try:
        path = resolve_checkpoint(checkpoint)
    except FileNotFoundError as e:
        raise SetupError(f"--initial-checkpoint {checkpoint}: {e}") from None
    raw = read_checkpoint_file(path)
    task = raw.get("task") if isinstance(raw, dict) else None
    if not (isinstance(task, dict) and task.get("task") == "segmentation"):
        return None, None
    verify_checkpoint(path, raw)
    return raw["model"], task


def segmentation_model(name: str, checkpoint: Optional[str], num_classes: Optional[int], *,
                       image_size: Optional[int] = None, num_scales: int = 3, drop_path: Optional[float] = None,
                       attn_backend: str = "auto", pretrained: bool = False, head: Optional[str] = None):
    """``SegmentationModel(APT backbone, head)`` and its `SegmentationTask`. ``checkpoint``: a segmentation
    trainer checkpoint (backbone and head, its class count and head kind unless ``num_classes`` or ``head``
    differ: then a new head) or any weights `build_model` reads (a classification head dropped). ``head``:
    a key of `apt_model.heads.SEG_HEADS`; None: the checkpoint's, else linear."""
    from apt_model.heads import SEG_HEADS, SegmentationModel, create_seg_head

    from .build import build_model
    from .segmentation import SegmentationTask

    state, task_state = _segmentation_state(checkpoint)
    saved_head = task_state.get("head", "linear") if task_state else None
    kind = head or saved_head or "linear"
    if kind not in SEG_HEADS:
        raise SetupError(f"--head {kind!r}: not one of {', '.join(SEG_HEADS)}")
    k = num_classes or (int(task_state["num_classes"]) if task_state else None)
    if not k:
        raise SetupError("--task segmentation: pass --num-classes K (the masks hold class ids 0..K-1, 255 ignored)")
    backbone = build_model(name, checkpoint=None if state is not None else checkpoint, num_classes=0,
                           image_size=image_size, num_scales=num_scales, drop_path=drop_path,
                           attn_backend=attn_backend, pretrained=pretrained, reset_head=True)
    model = SegmentationModel(backbone, create_seg_head(kind, backbone.num_features, k))
    if state is not None:
        same = int(task_state["num_classes"]) == k and saved_head == kind
        if not same:
            log.info("checkpoint %s: its %s-class %s head is dropped, a new %d-class %s head is trained", checkpoint,
                     task_state["num_classes"], saved_head, k, kind)
        try:
            model.load_state_dict(state if same else {n: v for n, v in state.items() if not n.startswith("head.")},
                                  strict=same)
        except RuntimeError as e:
            raise SetupError(f"checkpoint {checkpoint}: not a {name} segmentation model: "
                             f"{str(e).strip().splitlines()[0][:300]}") from None
    model.num_classes = k
    names = task_state.get("class_names") if task_state and int(task_state["num_classes"]) == k else None
    return model, SegmentationTask(num_classes=k, class_names=names, head=kind)


def open_segmentation(data: str, masks: Optional[str], split: str, flag: str, reduce_zero_label: bool = False,
                      void=None):
    """The image + mask source of ``--data`` / ``--masks``: local shards with masks (``.seg.png`` members;
    `open_mask_shards`) or `apt_data.sources.open_mask_folder`; errors as a `SetupError` naming ``flag``."""
    from apt_data.masks import MaskLabels
    from apt_data.sources import open_mask_folder

    if masks is None and is_shard_data(data):
        return open_mask_shards(data, split, flag, bool(reduce_zero_label or void))
    try:
        labels = MaskLabels(reduce_zero_label=bool(reduce_zero_label), void=tuple(int(v) for v in void or ()))
        return open_mask_folder(data, masks, split=split, mask_labels=labels)
    except (ValueError, OSError) as e:
        raise SetupError(f"{flag} {data}: {e}") from None


def is_shard_data(data: str) -> bool:
    """Whether ``data`` names local shards: a folder with Parquet indexes (``DIR`` or ``DIR:split``), an index
    file, or tar files (``train-{0..3}.tar``)."""
    base = data.rsplit(":", 1)[0] if ":" in data and not Path(data).exists() and "://" not in data else data
    p = Path(base)
    return "://" not in data and (base.endswith((".parquet", ".tar")) or "{" in base
                                  or (p.is_dir() and any(p.glob("*.parquet"))))


def open_mask_shards(data: str, split: str, flag: str, relabel: bool = False):
    """The ``split`` of a shard folder (``DIR:split`` names another) whose every sample has a mask member
    (`apt_data.sources.IndexSource.read_with_mask`). The masks hold the ids they were built with (the build's
    ``mask_labels``), so ``relabel`` (``--void`` / ``--reduce-zero-label`` given) is an error."""
    from apt_data.sources import open_shards

    try:
        source = open_shards(data, split)
    except (ValueError, OSError) as e:
        raise SetupError(f"{flag} {data}: {e}") from None
    if not source.has_masks:
        raise SetupError(f"{flag} {data}: these shards have no mask member (.seg.png) in every sample; build them with "
                         f"masks (apt_data.shards.build_shards(..., masks=DIR, crop=False))")
    if relabel:
        built = source.index.settings.get("masks", {}).get("labels")
        raise SetupError(f"{flag} {data}: --void / --reduce-zero-label map mask ids of image + mask folders; shards "
                         f"hold their masks' ids as built (labels {built}): map them when building the shards")
    return source


def segmentation_loader(source, cfg, model, image_size: int, *, train: bool, max_tokens: int,
                        max_images: Optional[int] = None, workers: int = 0, seed: int = 0, strict: bool = False,
                        augment: bool = True, max_skip_fraction: float = 0.01):
    """An `APTLoader` with mmseg's recipe (train: random resize, crop ``image_size``, flip, photometric;
    eval: resized to fit, masks kept at their original size for the metrics)."""
    from apt_data.loader import APTLoader
    from apt_data.transforms import segmentation_transform

    bb = backbone_of(model)
    fill = tuple(int(round(float(v))) for v in bb.patch_embed.pixel_mean.flatten())
    tf = (segmentation_transform(image_size, augment=augment, multiple=cfg.patch_size, fill=fill) if train else
          segmentation_transform(image_size, augment=False, multiple=cfg.patch_size, fill=fill, keep_mask_size=True))
    kw = dict(seed=seed, max_skip_fraction=max_skip_fraction) if train else {}
    return APTLoader(source, cfg, max_tokens=max_tokens, max_images=max_images, num_workers=workers, shuffle=train,
                     train=train, transform=tf, num_prefix_tokens=bb.num_prefix_tokens, strict=strict, **kw)


def mask_pairs(loader):
    """``(batch, [its masks])`` of a loader's batches, as `evaluate_segmentation` takes them."""
    for batch, _ in loader:
        yield batch, [batch.mask(b) for b in range(batch.num_images)]


class SegmentTrainTask:
    """Semantic segmentation (``--task segmentation``): see the module's docstring."""

    name = "segmentation"

    def __init__(self, config):
        self.seg = None  # the SegmentationTask, once the model is built

    def open_train(self, c):
        d = c.data
        return open_segmentation(d.train, d.masks, "train", "--data", d.reduce_zero_label, d.void)

    def default_val(self, c) -> tuple[Optional[str], str]:
        if c.data.masks is None and is_shard_data(c.data.train):  # shards: the val split beside, as classification's
            from .data import default_val_data

            return default_val_data(c.data.train, c.data.remote_options())
        root = Path(c.data.train)
        if c.data.masks is None and (root / "images" / "val").is_dir() and (root / "annotations" / "val").is_dir():
            return str(root), f"validation data: {root}/images/val + annotations/val (--no-eval to skip)"
        return None, f"validation data: none (--data {root} has no images/val + annotations/val); pass --val-data"

    def build_model(self, c, train_source, device):
        from .build import model_image_size, model_patch_size

        m, d = c.model, c.data
        model, self.seg = segmentation_model(m.name, m.checkpoint, m.num_classes, image_size=m.image_size,
                                             num_scales=d.num_scales, drop_path=m.drop_path,
                                             attn_backend=m.attn_backend, pretrained=m.pretrained, head=m.head)
        if m.grad_checkpointing:
            model.backbone.set_grad_checkpointing(True)
        cfg = c.batching_for(model_patch_size(model.backbone, d.patch_size, d.num_scales))
        return model.to(device), cfg, model_image_size(model.backbone)

    def build_loaders(self, c, model, cfg, image_size: int, train_source):
        d = c.data
        try:
            loader = segmentation_loader(train_source, cfg, model, image_size, train=True, max_tokens=d.max_tokens,
                                         max_images=d.max_images, workers=d.workers, seed=c.run.seed,
                                         strict=d.strict, augment=d.augment is not False,
                                         max_skip_fraction=d.max_skip_fraction)
            loader.set_epoch(0)
            loader.steps_per_epoch()
            val_loader = None
            if d.val:
                val = open_segmentation(d.val, None, "val", "--val-data", d.reduce_zero_label, d.void)
                val_loader = segmentation_loader(val, cfg, model, image_size, train=False, max_tokens=d.max_tokens,
                                                 max_images=d.max_images, workers=d.workers, strict=d.strict)
        except (ValueError, OSError) as e:
            raise SetupError(str(e)) from None
        return loader, val_loader

    def param_groups(self, model, weight_decay: float, layer_decay: float) -> list[dict]:
        """The backbone's groups by layer decay; APT's detail path and the head at the full lr."""
        from .optim import param_groups

        groups = param_groups(model.backbone, weight_decay, layer_decay)
        detail = {"params": [], "weight_decay": 0.0, "lr_scale": 1.0}
        for g in groups:
            names = g.pop("param_names")
            detail["params"] += [p for n, p in zip(names, g["params"]) if n.startswith(DETAIL_PATH)]
            g["params"] = [p for n, p in zip(names, g["params"]) if not n.startswith(DETAIL_PATH)]
        head = {"params": [p for p in model.head.parameters() if p.requires_grad], "weight_decay": 0.0,
                "lr_scale": 1.0}
        return [g for g in groups + [detail, head] if g["params"]]

    def loss(self, forward, b, c, global_images, world_size: int, amp: bool, device: torch.device) -> torch.Tensor:
        """Pixel-mean cross-entropy of this rank's images (255 ignored); DDP averages the gradients."""
        sizes = list(b.mask_sizes)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = forward(b, sizes)
        masks = (b.padded_masks(self.seg.ignore_index) if isinstance(logits, torch.Tensor)
                 else [b.mask(i) for i in range(b.num_images)])
        return self.seg.loss(logits, masks)

    def evaluate(self, model, loader, device, amp: bool, info, progress: Optional[str]):
        from .segmentation import evaluate_segmentation

        try:
            return evaluate_segmentation(model, mask_pairs(loader), self.seg, device, caption=progress, amp=amp)
        finally:
            model.train()

    def log_eval(self, run_log, res, step: int, epoch: int, out: Path) -> None:
        m = res.metrics
        run_log.record({"split": "val", "step": step, "epoch": epoch, "miou": m.miou,
                        "pixel_accuracy": m.pixel_accuracy, "images": res.images,
                        "images_per_s": res.images_per_s, **{"per_class_iou": m.as_dict(self.seg.class_names)[
                            "per_class_iou"]}})
        run_log.info(f"eval step {step} epoch {epoch}: {self.final_line(res)[len('final val: '):]}")

    def class_count(self, source) -> str:
        return "masks" + (f" of {self.seg.num_classes} classes, {self.seg.head} head" if self.seg is not None else "")

    def augmentation_line(self, c, mix) -> str:
        return ("augmentation: " + ("mmseg's ADE20K recipe (random resize 0.5-2x, crop with cat_max_ratio 0.75, "
                                    "flip, photometric distortion)" if c.augment is not False else "none (resize to fit)")
                + "; no Mixup / CutMix, RandAugment, random erasing or label smoothing (segmentation)")

    def final_line(self, res) -> str:
        m = res.metrics
        return f"final val: mIoU {m.miou:.2%}, pixel accuracy {m.pixel_accuracy:.2%} on {res.images} images"

    def state_dict(self) -> Optional[dict]:
        return self.seg.state_dict()

#!/usr/bin/env python
"""Fine-tune a timm ViT as an Adaptive Patch Transformer (flags: apt_train/cli.py; loop: apt_train/trainer.py).

    python tools/train.py                       # the demo: vit_tiny (random init) on shards/, recipe 'sample'
    python tools/train.py --model vit_base_patch16_384 --initial-checkpoint W.pth --data IMAGENET_SHARDS \\
        --val-data IMAGENET_SHARDS:val --recipe short --max-tokens 16384
    torchrun --nproc_per_node=8 tools/train.py ...   # DDP (nccl on CUDA, gloo on the CPU)

``--help`` lists every flag; README.md ("Training and evaluation") explains the recipes, the loss scaling and the metrics.
"""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from apt_train import cli  # noqa: E402

SAMPLE_DATA = ROOT / "shards"  # the sample dataset of this checkout: --data defaults to it (and so --val-data
# to its val split: --val-data defaults to the val split beside whatever --data is)


def main(argv=None) -> int:
    return cli.main(argv, default_data=str(SAMPLE_DATA))


if __name__ == "__main__":
    sys.exit(main())

"""``apt-train`` (``tools/train.py``): fine-tune a timm ViT as an Adaptive Patch Transformer.

    apt-train                                   # the demo: vit_tiny (random init) on ./shards, recipe 'sample'
    apt-train --model vit_base_patch16_384 --initial-checkpoint W.pth --data IMAGENET_SHARDS \\
        --val-data IMAGENET_SHARDS:val --recipe short --max-tokens 16384
    torchrun --nproc_per_node=8 -m apt_train.commands.train ...   # DDP (nccl on CUDA, gloo on the CPU)

Flags: `apt_train.cli.build_parser`; the loop: `apt_train.trainer`. ``--data`` defaults to the sample
dataset ``shards/`` (of the working directory, or of the checkout ``tools/train.py`` runs from).
"""
from __future__ import annotations

import sys

from ..cli import interrupted_line, run
from ..interrupt import TrainingInterrupted
from .common import Argv, prog_name, run_command, sample_data, setup_logging

COMMAND = "apt-train"


def _train(argv: Argv) -> int:
    # no sample data here: "shards" all the same, so that a run without --data says which path is missing
    try:
        run(argv, default_data=sample_data() or "shards", prog=prog_name(COMMAND))
    except TrainingInterrupted as e:  # SIGINT / SIGTERM: a checkpoint was written (or a second signal aborted)
        print(interrupted_line(e, sys.argv[1:] if argv is None else list(argv)), file=sys.stderr, flush=True)
        return e.exit_status
    except KeyboardInterrupt:  # before the first step: nothing was saved
        print(f"{prog_name(COMMAND)}: interrupted while setting up, before the first step: nothing to resume",
              file=sys.stderr)
        return 130
    return 0


def main(argv: Argv = None) -> int:
    """Train; 0 when done, 2 on a bad flag, setting or input (one ``error:`` line)."""
    setup_logging()
    return run_command(COMMAND, _train, argv)


if __name__ == "__main__":
    sys.exit(main())

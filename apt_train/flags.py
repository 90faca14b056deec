"""`add_loader_args`: the same token-budget batching flags for every tool (scorers and their
default thresholds come from the scorer registry)."""
from __future__ import annotations

import argparse
import os
from typing import Optional

from .config import SCORER_NAMES, APTConfig
from .scoring import get_scorer, scorer_names


def add_loader_args(parser: argparse.ArgumentParser, max_tokens: int = 4096) -> argparse.ArgumentParser:
    """Add ``--max-tokens --max-images --patch-size --num-scales --thresholds --scorer
    --static-shapes --workers --image-size`` (in an "APT batching" group) to ``parser``."""
    g = parser.add_argument_group("APT batching")
    g.add_argument("--max-tokens", type=int, default=max_tokens,
                   help="token budget per batch, class/prefix tokens included (default: %(default)s)")
    g.add_argument("--max-images", type=int, default=None, help="optional cap on images per batch")
    g.add_argument("--patch-size", type=int, default=16, help="base patch size in pixels (default: %(default)s)")
    g.add_argument("--num-scales", type=int, default=3, help="patch sizes p, 2p, 4p, ... (default: %(default)s)")
    g.add_argument("--thresholds", type=float, nargs="*", default=None,
                   help="one per scale above the base, in the scorer's units; a scale-s patch is kept where its "
                        f"score is below thresholds[s-1] (default: the scorer's, for 3 scales {_defaults_help()}); "
                        "-inf disables a scale")
    g.add_argument("--scorer", choices=SCORER_NAMES, default="entropy")
    g.add_argument("--static-shapes", action="store_true",
                   help="pad every batch to exactly --max-tokens (torch.compile, CUDA graphs)")
    g.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="loader worker processes (default: %(default)s)")
    g.add_argument("--image-size", type=int, default=None, help="image side in pixels (default: the model's)")
    return parser


def _defaults_help() -> str:
    """``entropy 5.5 4.0 (bits); ...`` for the registered scorers with defaults for 3 scales."""
    parts = []
    for name in scorer_names():
        sc = get_scorer(name)
        t = sc.default_thresholds.get(3)
        if t is not None:
            parts.append(f"{name} {' '.join(f'{v:g}' for v in t)}" + (f" ({sc.units})" if sc.units else ""))
    return "; ".join(parts).replace("%", "%%")


def apt_config_from_flags(args: argparse.Namespace) -> APTConfig:
    """`APTConfig` from ``--patch-size``, ``--num-scales``, ``--thresholds`` (None: the scorer's
    registered defaults for ``--num-scales``) and ``--scorer``; ValueError when they do not fit."""
    thresholds = None if args.thresholds is None else tuple(args.thresholds)
    return APTConfig(patch_size=args.patch_size, num_scales=args.num_scales, thresholds=thresholds,
                     scorer=args.scorer)


def config_from_args(args: argparse.Namespace, parser: Optional[argparse.ArgumentParser] = None) -> APTConfig:
    """`APTConfig` from the flags (`apt_config_from_flags`) and checked budget flags; a bad
    combination exits with the parser's usage message."""
    try:
        cfg = apt_config_from_flags(args)
    except ValueError as e:
        if parser:
            parser.error(str(e).replace("APTConfig.thresholds", "--thresholds").replace("APTConfig.", "--"))
        raise
    if args.max_tokens <= 0:
        msg = f"--max-tokens must be positive, got {args.max_tokens}"
        parser.error(msg) if parser else None
        raise ValueError(msg)
    if args.max_images is not None and args.max_images <= 0:
        msg = f"--max-images must be positive, got {args.max_images}"
        parser.error(msg) if parser else None
        raise ValueError(msg)
    return cfg

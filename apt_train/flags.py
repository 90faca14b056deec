"""Command-line flags shared by the tools, and the one table that names a library setting by its flag.

`add_loader_args` gives every tool the same token-budget batching flags (scorers and their default
thresholds come from the scorer registry). The library validates values where they are made and
raises ``ValueError``s that carry the parameter's name as ``setting`` (``"max_tokens"``,
``"thresholds"``); `flag_message` is the only place that turns that name into a flag.
"""
from __future__ import annotations

import argparse
import os
from typing import Mapping, Optional

from apt_data.config import SCORER_NAMES, APTConfig, TokenBudget
from apt_data.scoring import get_scorer, scorer_names

#: library parameter -> command-line flag, where the flag is not ``--`` + the name with ``-`` for ``_``
FLAGS: dict[str, str] = {
    "image_size": "--img-size",
    "auto_augment": "--aa",
    "re_prob": "--reprob",
    "checkpoint": "--initial-checkpoint",
    "label_smoothing": "--smoothing",
    "log_every": "--log-interval",
    "num_workers": "--workers",
    "cache_dir": "--data-cache",
    "cache_size": "--data-cache-size",
}


def flag_of(setting: str, overrides: Optional[Mapping[str, str]] = None) -> str:
    """The flag that sets the library parameter ``setting`` (``max_tokens`` -> ``--max-tokens``)."""
    if overrides and setting in overrides:
        return overrides[setting]
    return FLAGS.get(setting, "--" + setting.replace("_", "-"))


def flag_message(error: BaseException, overrides: Optional[Mapping[str, str]] = None) -> str:
    """``error``'s text, led by the flag of its ``setting`` when it has one (``--max-tokens: ...``).
    ``overrides``: a tool's own flag for a setting (calibrate's ``thresholds`` is ``--base-thresholds``)."""
    # a wrapper raised ``from`` the library's error (or ``from None``, which keeps it as the context)
    setting = next((getattr(e, "setting") for e in (error, error.__cause__, error.__context__)
                    if getattr(e, "setting", None)), None)
    text = str(error)
    if not setting:
        return text
    flag = flag_of(setting, overrides)
    return text if text.startswith(flag) else f"{flag}: {text}"


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
    registered defaults for ``--num-scales``) and ``--scorer``; the library's ValueError when they do not fit."""
    thresholds = None if args.thresholds is None else tuple(args.thresholds)
    return APTConfig(patch_size=args.patch_size, num_scales=args.num_scales, thresholds=thresholds,
                     scorer=args.scorer)


def config_from_args(args: argparse.Namespace, parser: Optional[argparse.ArgumentParser] = None) -> APTConfig:
    """`APTConfig` from the flags (`apt_config_from_flags`) with the budget flags checked; a bad value
    raises a ValueError with ``setting`` (or, given ``parser``, exits with its usage and the flag's name)."""
    try:
        cfg = apt_config_from_flags(args)
        if getattr(args, "max_tokens", None) is not None:  # the budget's own checks (`TokenBudget`)
            TokenBudget(max_tokens=args.max_tokens, max_images=getattr(args, "max_images", None))
    except ValueError as e:
        if parser is not None:
            parser.error(flag_message(e))
        raise
    return cfg

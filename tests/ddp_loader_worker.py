"""Run by tests/test_loader_ddp.py under torchrun: APTLoader epochs on each rank (gloo, CPU).

    ddp_loader_worker.py SOURCE OUT EPOCHS [plan|stream]

``plan``: planned packing of the plain (resize-only) pipeline. ``stream``: streaming packing of the
augmented training pipeline (RandomResizedCrop + flip + RandAugment + random erasing). Each rank
writes ``OUT/rank{R}.json``: per epoch its batches (keys), steps, ``len(loader)`` before the epoch,
and for streams the samples carried over and the loader's ``state_dict()`` after the epoch.
"""
import json
import sys
from datetime import timedelta

import torch
import torch.distributed as dist

from apt_data import APTConfig
from apt_data.loader import APTLoader
from apt_data.transforms import ImageTransform

SEED = 11
MAX_TOKENS = 700
# streams: small enough batches that 24 samples a worker stream (an epoch ends mid-pass) rather than
# playing one whole pass per epoch (apt_data.loader.stream.MAX_CARRY)
STREAM_MAX_TOKENS = 500
WORKERS = 2
AUGMENT = dict(size=224, augment=True, auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.25)


def main(source: str, out: str, epochs: int, packing: str = "plan") -> None:
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank = dist.get_rank()
    kw = dict(transform=ImageTransform(**AUGMENT)) if packing == "stream" else {}
    max_tokens = STREAM_MAX_TOKENS if packing == "stream" else MAX_TOKENS
    loader = APTLoader(source, APTConfig(), max_tokens=max_tokens, num_workers=WORKERS, seed=SEED, packing=packing,
                       pin_memory=False, **kw)
    assert loader.packing == packing
    result = {"rank": rank, "world": dist.get_world_size(), "keys": list(loader.source.keys),
              "steps_per_epoch": loader.steps_per_epoch(), "epochs": []}
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        expected = len(loader)
        batches, steps = [], 0
        for batch, targets in loader:
            assert batch.num_real_tokens <= max_tokens and len(targets) == len(batch.keys)
            batches.append(list(batch.keys))
            # a collective every step, as DDP does: unequal batch counts would hang here
            t = torch.tensor([float(len(batch.keys))])
            dist.all_reduce(t)
            steps += 1
        ep = {"keys": [k for b in batches for k in b], "batches": batches, "steps": steps, "len": expected}
        if packing == "stream":
            ep["carried_over"] = loader.stats.carried_over.get(epoch)
            ep["state"] = loader.state_dict()
        result["epochs"].append(ep)
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), *sys.argv[4:5])

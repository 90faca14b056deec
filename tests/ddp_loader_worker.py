"""Run by tests/test_loader_ddp.py under torchrun: one epoch of APTLoader per rank (gloo, CPU)."""
import json
import sys
from datetime import timedelta

import torch
import torch.distributed as dist

from apt_data import APTConfig
from apt_data.loader import APTLoader


def main(source: str, out: str, epochs: int) -> None:
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank = dist.get_rank()
    loader = APTLoader(source, APTConfig(), max_tokens=700, num_workers=2, seed=11)
    result = {"rank": rank, "world": dist.get_world_size(), "epochs": []}
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        keys, steps = [], 0
        for batch, targets in loader:
            keys.extend(batch.keys)
            # a collective every step, as DDP does: unequal batch counts would hang here
            t = torch.tensor([float(len(batch.keys))])
            dist.all_reduce(t)
            steps += 1
        result["epochs"].append({"keys": keys, "steps": steps, "len": len(loader)})
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))

"""Run by tests/test_train_ddp.py under torchrun (2 ranks, gloo): a real DDP gradient against the
global-mean reference, then the trainer itself; each rank dumps its final weights."""
import json
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from apt_data import APTConfig
from apt_data.loader import APTLoader
from apt_model import from_timm
from apt_train.loss import scaled_cross_entropy
from apt_train.cli import run


def gradient_check(data: str) -> dict:
    """DDP's averaged gradient of the scaled loss == the gradient of the mean over both ranks' images."""
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = from_timm("vit_tiny_patch16_224", num_classes=10).train()
    with torch.no_grad():
        for p in model.patch_embed.zero_linear.parameters():
            p.normal_(0, 0.02)
    ref = from_timm("vit_tiny_patch16_224", num_classes=10).train()
    ref.load_state_dict(model.state_dict())
    # every rank builds both ranks' first batches (the loader's plan is the same on every rank)
    batches = [next(iter(APTLoader(data, APTConfig(), max_tokens=1200, num_workers=0, seed=5, rank=r, world_size=world,
                                   pin_memory=False)))[0] for r in range(world)]
    ddp = DDP(model, find_unused_parameters=True)
    mine = batches[rank]
    n = torch.tensor([float(mine.num_images)])
    dist.all_reduce(n)
    scaled_cross_entropy(ddp(mine), mine.labels, global_images=n[0], world_size=world).backward()
    total = sum(F.cross_entropy(ref(b), b.labels, reduction="sum") for b in batches)
    (total / sum(b.num_images for b in batches)).backward()
    want = {k: p.grad for k, p in ref.named_parameters()}
    scale = max(g.abs().max().item() for g in want.values())
    err = max((p.grad - want[k]).abs().max().item() for k, p in model.named_parameters()) / scale
    return {"images": [b.num_images for b in batches], "rel_err": err}


def main(data: str, out: str, argv: list) -> None:
    dist.init_process_group("gloo", timeout=timedelta(seconds=120))
    rank = dist.get_rank()
    check = gradient_check(data)
    result = run(argv)  # joins the existing process group, leaves it at the end
    torch.save(result.model.state_dict(), f"{out}/rank{rank}.pt")
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump({"check": check, "steps": result.global_step,
                   "top1": result.final_eval.top1 if result.final_eval else None}, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])

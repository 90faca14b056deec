"""torchrun with 2 CPU processes (gloo): DDP steps finish, both ranks end with identical weights, the
logged images are the global step's, and the DDP gradient is the global-mean gradient."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

from test_train import subset_index

HERE = Path(__file__).parent
ROOT = HERE.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_ranks(tmp_path):
    sys.path.insert(0, str(ROOT))
    from apt_data import APTConfig
    from apt_data.loader import APTLoader
    from apt_train.metrics import read_jsonl

    train, val = subset_index(tmp_path, "train", 40), subset_index(tmp_path, "val", 20)
    out = tmp_path / "out"
    out.mkdir()
    argv = ["--data", train, "--val-data", val, "--recipe", "short", "--lr", "1e-3", "--max-tokens", "1200",
            "--steps", "3", "--workers", "1", "--quiet", "--output", str(out / "run"), "--dist-timeout", "120"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(HERE)]), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           str(HERE / "ddp_train_worker.py"), train, str(out), *argv]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]

    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    for r in ranks:
        assert r["steps"] == 3 and r["check"]["rel_err"] < 1e-4, r
    assert ranks[0]["check"]["images"][0] != ranks[0]["check"]["images"][1]  # unequal rank batches
    assert ranks[0]["top1"] == ranks[1]["top1"]  # the evaluation is reduced over ranks

    w0, w1 = (torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2))
    init = torch.load(sorted((out / "run").glob("checkpoint-*.pt"))[-1], weights_only=True)["model"]
    assert w0.keys() == w1.keys()
    for k in w0:
        assert torch.equal(w0[k], w1[k]), k
        assert torch.equal(w0[k], init[k]), k  # rank 0's checkpoint holds the same weights

    # the logged images of each step are both ranks' batches: bins 2k and 2k+1 of the shared plan
    loader = APTLoader(train, APTConfig(), max_tokens=1200, num_workers=0, seed=0, rank=0, world_size=2)
    plan = loader.plan(0)
    recs = [r for r in read_jsonl(out / "run" / "metrics.jsonl") if r["split"] == "train"]
    assert [r["images"] for r in recs] == [len(plan[2 * k]) + len(plan[2 * k + 1]) for k in range(3)]
    evals = [r for r in read_jsonl(out / "run" / "metrics.jsonl") if r["split"] == "val"]
    assert evals and evals[-1]["images"] == 20

"""2 ranks x 2 workers under torchrun (gloo on CPU): disjoint, complete epochs; equal batch counts."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import IMAGE_PATHS

HERE = Path(__file__).parent


def test_torchrun_two_ranks_two_workers(tmp_path):
    root = tmp_path / "folder"
    for k, p in enumerate(IMAGE_PATHS):
        d = root / f"c{k % 4}"
        d.mkdir(parents=True, exist_ok=True)
        shutil.copy(p, d / p.name)
    out = tmp_path / "out"
    out.mkdir()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE.parent), str(HERE)]), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533",
           str(HERE / "ddp_loader_worker.py"), str(root), str(out), "2"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    all_keys = sorted(f"{p.parent.name}/{p.name}" for p in root.glob("*/*.JPEG"))
    for e in range(2):
        eps = [r["epochs"][e] for r in ranks]
        assert eps[0]["steps"] == eps[1]["steps"] == eps[0]["len"] == eps[1]["len"]
        assert not set(eps[0]["keys"]) & set(eps[1]["keys"])
        assert sorted(eps[0]["keys"] + eps[1]["keys"]) == all_keys
    assert ranks[0]["epochs"][0]["keys"] != ranks[0]["epochs"][1]["keys"]

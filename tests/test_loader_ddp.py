"""2 ranks x 2 workers under torchrun (gloo on CPU): equal batch counts on every rank, disjoint epochs.

Planned packing: complete epochs. Streaming packing of augmented training: no sample twice in an
epoch, every sample once per pass (what is not emitted is carried over), and the same batches
when the same command runs again.
"""
import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

from conftest import IMAGE_PATHS

from apt_data.loader.stream import SampleStream, WorkerState, partition

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
import ddp_loader_worker as worker  # noqa: E402


def make_folder(root: Path, copies: int = 1) -> list[str]:
    """The real photos in 4 class folders (``copies`` of each, under other names); their keys."""
    for c in range(copies):
        for k, p in enumerate(IMAGE_PATHS):
            d = root / f"c{(k + c) % 4}"
            d.mkdir(parents=True, exist_ok=True)
            shutil.copy(p, d / (p.name if c == 0 else f"{p.stem}_{c}{p.suffix}"))
    return sorted(f"{p.parent.name}/{p.name}" for p in root.glob("*/*.JPEG"))


def launch(root: Path, out: Path, epochs: int, packing: str, port: int) -> list[dict]:
    out.mkdir()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE.parent), str(HERE)]), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
           str(HERE / "ddp_loader_worker.py"), str(root), str(out), str(epochs), packing]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def test_torchrun_two_ranks_two_workers(tmp_path):
    root = tmp_path / "folder"
    all_keys = make_folder(root)
    ranks = launch(root, tmp_path / "out", 2, "plan", 29533)
    for e in range(2):
        eps = [r["epochs"][e] for r in ranks]
        assert eps[0]["steps"] == eps[1]["steps"] == eps[0]["len"] == eps[1]["len"]
        assert not set(eps[0]["keys"]) & set(eps[1]["keys"])
        assert sorted(eps[0]["keys"] + eps[1]["keys"]) == all_keys
    assert ranks[0]["epochs"][0]["keys"] != ranks[0]["epochs"][1]["keys"]


def emitted_by_passes(state: dict, num_samples: int) -> tuple[Counter, int]:
    """From a rank's streamed ``state_dict()``: how often each sample index has been emitted since the
    run began if every sample is emitted once per pass (the passes drawn so far, less the samples
    deferred or still pending in open batches), and how many samples the passes begun hold."""
    W, rank, world = state["num_workers"], state["rank"], state["world_size"]
    counts, begun = Counter(), 0
    for role in range(W):
        st = WorkerState.from_dict(state["progress"][role] or state["starts"][role])
        assert not st.resets  # one pass per epoch always sufficed: nothing drawn twice in an epoch
        part = partition(num_samples, worker.SEED, rank, world, role, W)
        stream = SampleStream(part, worker.SEED, rank * W + role)
        for p in range(st.pass_):
            counts.update(stream.order(p).tolist())
        counts.update(stream.order(st.pass_)[:st.index].tolist())
        counts.subtract(s for _, s in st.deferred)
        counts.subtract(s for _, s in st.pending())
        begun += len(part) * (st.pass_ + (st.index > 0))
    return +counts, begun


def test_torchrun_streamed_augmented_epochs(tmp_path):
    """Augmented training, streaming packing, 3 epochs: equal fixed step counts on both ranks; no sample
    on two ranks or twice in an epoch; every sample once per pass; reproducible batches."""
    epochs = 3
    root = tmp_path / "folder"
    all_keys = make_folder(root, copies=3)  # 96 photos: 24 per worker, several 500-token batches each
    ranks = launch(root, tmp_path / "out", epochs, "stream", 29541)
    keys = ranks[0]["keys"]
    assert sorted(keys) == all_keys and ranks[1]["keys"] == keys
    index = {k: i for i, k in enumerate(keys)}
    steps = ranks[0]["steps_per_epoch"]
    assert steps == ranks[1]["steps_per_epoch"] and steps >= 4
    seen = Counter()
    for e in range(epochs):
        eps = [r["epochs"][e] for r in ranks]
        for ep in eps:
            assert ep["steps"] == ep["len"] == steps == len(ep["batches"])
            assert all(ep["batches"]) and len(set(ep["keys"])) == len(ep["keys"])  # no sample twice in an epoch
        assert not set(eps[0]["keys"]) & set(eps[1]["keys"])  # nor on two ranks
        seen.update(eps[0]["keys"] + eps[1]["keys"])
        # every sample once per pass: what was emitted so far is exactly the passes drawn so far less
        # the samples deferred or pending, and with what is carried over it is the passes begun
        so_far, begun = Counter(), 0
        for r in ranks:
            c, b = emitted_by_passes(r["epochs"][e]["state"], len(keys))
            so_far += c
            begun += b
        assert +Counter({index[k]: n for k, n in seen.items()}) == so_far
        carried = sum(r["epochs"][e]["carried_over"] for r in ranks)
        assert sum(seen.values()) + carried == begun
    assert sum(ranks[0]["epochs"][e]["carried_over"] for e in range(epochs)) > 0  # epochs end mid-pass
    # over the run: at most once per epoch (guaranteed); and with ~1.9 passes emitted in these 3 epochs
    # (the accounting above, exact for this data and seed) every sample came at least once
    assert max(seen.values()) <= epochs and set(seen) == set(all_keys)
    assert ranks[0]["epochs"][0]["keys"] != ranks[0]["epochs"][1]["keys"]

    again = launch(root, tmp_path / "again", epochs, "stream", 29542)
    for r, a in zip(ranks, again):
        assert [ep["batches"] for ep in r["epochs"]] == [ep["batches"] for ep in a["epochs"]]

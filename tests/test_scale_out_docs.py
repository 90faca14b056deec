"""Every command of docs/scale-out.md runs, as written, on loopback and local paths.

Each fenced block of the page is taken from the page itself; only what a test machine cannot have is
replaced (named in `LOCAL`): the cluster's paths by temporary folders, the object store by the test
HTTP server over the sample shards, 16 parts by 4, 4 nodes of 8 GPUs by 1 node of 2 CPU processes,
ViT-B/384 by ViT-Ti/224, and ssh by a local shell. `pip install` lines are not run (no network).
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from conftest import IMAGE_PATHS  # noqa: E402
from http_server import RangeServer  # noqa: E402
from test_train_ddp import free_port  # noqa: E402

DOC = (ROOT / "docs" / "scale-out.md").read_text()


def blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", DOC, flags=re.S)


def block_with(lang: str, text: str) -> str:
    found = [b for b in blocks(lang) if text in b]
    assert len(found) == 1, f"docs/scale-out.md: expected one {lang} block with {text!r}"
    return found[0]


def local(block: str, subs: dict[str, str], must: tuple[str, ...] = ()) -> str:
    """``block`` with each key of ``subs`` replaced; each of ``must`` has to occur (the page and the
    test agree on what the command is)."""
    for old in must:
        assert old in block, f"{old!r} is no longer in docs/scale-out.md: update the test with the page"
    if not subs:
        return block
    keys = sorted(subs, key=len, reverse=True)  # one pass, longest first: a replacement is never replaced again
    return re.sub("|".join(map(re.escape, keys)), lambda m: subs[m.group(0)], block)


def bash(script: str, env: dict | None = None, timeout: int = 600) -> str:
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ, **(env or {})))
    assert proc.returncode == 0, script + "\n" + proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr  # what the commands print and log


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    """A tiny ImageNet-layout folder of the shipped photos: 3 classes of 4."""
    import shutil

    root = tmp_path_factory.mktemp("imagenet") / "train"
    for k, path in enumerate(IMAGE_PATHS[:12]):
        d = root / f"n0000000{k % 3}"
        d.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, d / path.name)
    return root


def build_subs(src: Path, out: Path) -> dict[str, str]:
    return {"python tools/": f"{sys.executable} tools/", "/shared/imagenet/train": str(src),
            "--image-size 384": "--image-size 64", "--shard-size 1000": "--shard-size 2"}


def test_slurm_array_then_merge(image_folder, tmp_path):
    script = block_with("bash", "#SBATCH")
    merge = block_with("bash", "sbatch --dependency")
    out = tmp_path / "apt-in1k-384"
    subs = {**build_subs(image_folder, out), "/shared/apt-in1k-384": str(out), "--num-parts 16": "--num-parts 4"}
    assert "--array=0-15" in script
    task = local(script, subs, must=("--part \"$SLURM_ARRAY_TASK_ID\" --num-parts 16", "/shared/apt-in1k-384"))
    for k in range(4):  # the array's tasks, one after another
        bash(task, {"SLURM_ARRAY_TASK_ID": str(k), "SLURM_CPUS_PER_TASK": "1"})
    wrapped = re.search(r'--wrap "(.*)"', local(merge, subs, must=("--merge",)), flags=re.S).group(1)
    wrapped = wrapped.replace("\\\n", " ")
    printed = bash(wrapped)
    assert "12 images" in printed or "12 samples" in printed, printed
    assert len(list(out.glob("*.tar"))) == 6 and (out / "train.parquet").is_file()


def test_multi_machine_loop_without_a_scheduler(image_folder, tmp_path):
    block = block_with("bash", "ssh node$k")
    out = tmp_path / "out"
    script = local(block, {'ssh node$k "cd apt && .venv/bin/python': f'bash -c "{sys.executable}',
                           ".venv/bin/python tools/": f"{sys.executable} tools/",
                           **build_subs(image_folder, out), "/shared/out": str(out)},
                   must=('ssh node$k "cd apt && .venv/bin/python', "--merge"))
    bash(script)
    assert len(list(out.glob("*.tar"))) == 6 and (out / "train.parquet").is_file()


def test_index_existing_webdataset_tars(tmp_path):
    from test_index_shards import make_webdataset

    laion = tmp_path / "laion"
    laion.mkdir()
    make_webdataset(laion, label_in_json=True)
    block = block_with("bash", "tools/index_shards.py")
    printed = bash(local(block, {"python tools/": f"{sys.executable} tools/",
                                 "/data/laion/shard-{000000..000999}.tar": str(laion / "data-{000000..000003}.tar"),
                                 "/data/laion/train.parquet": str(laion / "train.parquet"), "--workers 32": "--workers 1"},
                           must=("/data/laion/shard-{000000..000999}.tar", "--label-field label")))
    assert "160 samples in 4 shards" in printed and (laion / "train.parquet").is_file()


def test_python_snippets_over_the_test_server(tmp_path):
    with RangeServer(ROOT / "shards") as srv:
        url = srv.url().rstrip("/")
        env = {"epochs": 1}
        for block in blocks("python"):
            code = local(block, {"https://host/apt-in1k": url})
            code = code.replace("s3://bucket/apt-in1k/train-{000000..000099}.tar",
                                f"{url}/train-{{000000..000003}}.tar")
            code = code.replace('"/data/train.parquet"', repr(str(ROOT / "shards" / "train.parquet")))
            code = code.replace('storage_options={"anon": False}', "storage_options={}")  # an s3fs option
            code = code.replace('"s3://bucket/apt-in1k"', repr(url)).replace("/local/nvme/apt-cache", str(tmp_path))
            code = code.replace("num_workers=8", "num_workers=0").replace("max_tokens=16384", "max_tokens=4096")
            assert "s3://" not in code and "https://host" not in code, code
            exec(compile(code, "docs/scale-out.md", "exec"), env)
        assert env["src"].io_stats()["cache_misses"] == 400  # the cache snippet ran one epoch through the cache


def test_torchrun_multi_node_command_on_one_machine(tmp_path):
    block = block_with("bash", "torchrun --nnodes")
    with RangeServer(ROOT / "shards") as srv:
        url = srv.url().rstrip("/")
        cmd = local(block, {"torchrun ": f"{sys.executable} -m torch.distributed.run ", "--nnodes 4": "--nnodes 1",
                            "--nproc_per_node 8": "--nproc_per_node 2", "--node_rank $NODE_RANK": "--node_rank 0",
                            "node0:29500": f"127.0.0.1:{free_port()}", "--model vit_base_patch16_384":
                            "--model vit_tiny_patch16_224", "s3://bucket/apt-in1k-384": url,
                            "--max-tokens 16384": "--max-tokens 2048", "--workers 8": "--workers 1",
                            "/shared/out/run1": str(tmp_path / "run1")},
                    must=("--nnodes 4", "s3://bucket/apt-in1k-384:val", "--rdzv_endpoint node0:29500"))
        cmd = cmd.rstrip().rstrip("\\") + " --steps 2 --recipe short --quiet --dist-timeout 120"
        printed = bash(cmd, {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    assert "2 process(es)" in printed and "final val: top-1" in printed, printed
    assert list((tmp_path / "run1").glob("checkpoint-*.pt"))

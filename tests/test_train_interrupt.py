"""Ctrl-C and SIGTERM through the main job (tools/train.py): the step finishes, a checkpoint is written,
one line says how to resume, and the resumed run ends with the uninterrupted run's weights."""
from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
from apt_train.checkpoint import list_checkpoints, load_checkpoint  # noqa: E402
from conftest import LOG_PREFIX, log_messages  # noqa: E402
from test_train import subset_index  # noqa: E402

pytestmark = pytest.mark.skipif(not hasattr(os, "killpg"), reason="process groups (POSIX)")


def flags(tmp_path: Path, steps: int = 5, max_tokens: int = 1024) -> list[str]:
    return ["--data", subset_index(tmp_path, "train", 40), "--no-eval", "--recipe", "sample", "--max-tokens",
            str(max_tokens), "--steps", str(steps), "--workers", "1", "--seed", "3", "--log-every", "1"]


def train(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "tools/train.py"), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)


def start(args: list[str]) -> subprocess.Popen:
    """The main job in its own process group, as a shell runs it (Ctrl-C reaches every process of it)."""
    return subprocess.Popen([sys.executable, str(ROOT / "tools/train.py"), *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def wait_for(stream, pattern: str, timeout: float = 300) -> list[str]:
    """Lines of ``stream`` up to the first that matches ``pattern``."""
    seen, t0 = [], time.monotonic()
    for line in stream:
        seen.append(line)
        if re.search(pattern, line):
            return seen
        assert time.monotonic() - t0 < timeout, seen
    raise AssertionError(f"{pattern!r} never appeared: {seen}")


def done_counts(stderr: str) -> tuple[int, int, int]:
    m = re.search(r"^done: (\d+) steps \((\d+) images, (\d+) patch tokens\)", log_messages(stderr), re.M)
    assert m, stderr
    return int(m.group(1)), int(m.group(2)), int(m.group(3))


def test_ctrl_c_checkpoints_the_step_and_the_resume_ends_with_the_uninterrupted_weights(tmp_path):
    ref = train(flags(tmp_path) + ["--output", str(tmp_path / "a")])
    assert ref.returncode == 0, ref.stderr

    out = tmp_path / "b"
    proc = start(flags(tmp_path) + ["--output", str(out)])
    wait_for(proc.stderr, rf"^{LOG_PREFIX}step 1/5 ")
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the main process and its loader worker
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.startswith("interrupted at step")]
    assert len(lines) == 1, stderr
    step = int(re.match(r"interrupted at step (\d+); resume with: ", lines[0]).group(1))
    assert 1 <= step < 5
    assert [p.name for p in list_checkpoints(out)] == [f"checkpoint-{step:07d}.pt"]  # --save-every is 500
    assert load_checkpoint(out)["global_step"] == step

    command = shlex.split(lines[0].split("resume with: ", 1)[1])
    assert command[-2:] == ["--resume", str(out)] and command.count("--resume") == 1
    resumed = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert re.search(rf"^resuming .*checkpoint-{step:07d}\.pt: continuing after step {step} of 5 ",
                     log_messages(resumed.stderr), re.M), resumed.stderr
    # the whole run counted, as the uninterrupted run counts it
    assert done_counts(resumed.stderr) == done_counts(ref.stderr)
    a = load_checkpoint(tmp_path / "a")["model"]
    b = load_checkpoint(out)["model"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k


def test_sigterm_stops_with_status_143_and_a_second_ctrl_c_aborts_at_once(tmp_path):
    proc = start(flags(tmp_path, steps=50) + ["--output", str(tmp_path / "t")])
    wait_for(proc.stderr, rf"^{LOG_PREFIX}step 1/")
    proc.send_signal(signal.SIGTERM)  # a scheduler's stop: the main process only
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 143 and "Traceback" not in stderr, stderr
    assert re.search(r"^interrupted at step \d+; resume with: .* --resume ", stderr, re.M), stderr

    out = tmp_path / "c"
    proc = start(flags(tmp_path, steps=50, max_tokens=4096) + ["--output", str(out)])
    wait_for(proc.stderr, rf"^{LOG_PREFIX}step 1/")
    os.killpg(proc.pid, signal.SIGINT)
    wait_for(proc.stderr, r"SIGINT: stopping after this step")
    os.killpg(proc.pid, signal.SIGINT)  # the second: do not wait for the step
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 130 and "Traceback" not in stderr, stderr
    assert re.search(r"^aborted at step \d+ by a second SIGINT: no checkpoint written", stderr, re.M), stderr
    assert list_checkpoints(out) == [] and not list(out.glob("*.tmp"))

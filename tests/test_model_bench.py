"""benchmarks/bench_model.py runs and prints its tables; apt_model stands alone (never imports apt_data)."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_model_prints_the_comparison_table():
    proc = subprocess.run([sys.executable, "benchmarks/bench_model.py", "--models", "vit_tiny_patch16_224", "--sizes", "224",
                           "--batch", "2", "--iters", "1", "--attention"], cwd=ROOT, capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = [l for l in proc.stdout.splitlines() if l.startswith("| vit_tiny_patch16_224 | 224 |")]
    assert len(rows) == 2, proc.stdout  # the model table and the attention-backend table
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    assert len(cells) == 12 and "(196)" in cells[2]
    apt_tokens = float(cells[2].split()[0])
    assert 0 < apt_tokens < 196  # the shipped photos do get larger patches
    assert all(float(c) > 0 for c in cells[3:11])
    attn = [c.strip() for c in rows[1].strip("|").split("|")]
    assert len(attn) == 10 and all(float(c) > 0 for c in attn[4:])


def test_apt_model_does_not_import_apt_data():
    code = "import sys, apt_model; assert not any(m.startswith('apt_data') for m in sys.modules), 'apt_data imported'"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr

"""Bad flags stop the tools early with a clear message and exit status 2, never a traceback."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from test_evaluate import load_tool  # noqa: E402

train_main = load_tool("train").main  # tools/train.py: the sample shards are its default data

FAST = ["--steps", "1", "--workers", "0", "--no-eval", "--quiet"]


@pytest.mark.parametrize("flags,message", [
    (["--thresholds", "5.5"], "one value per scale"),
    (["--thresholds", "5.5", "4.0", "3.0"], "one value per scale"),
    (["--max-tokens", "5"], "cannot hold a single image"),
    (["--max-tokens", "150"], "more than the batch budget max_tokens=150"),
    (["--max-tokens", "0"], "--max-tokens must be positive"),
    (["--checkpoint", "/nonexistent/vit.pth"], "checkpoint /nonexistent/vit.pth does not exist"),
    (["--model", "vit_not_a_model"], "unknown timm model 'vit_not_a_model'"),
    (["--model", "resnet18"], "supports timm VisionTransformer"),
    (["--patch-size", "14"], "--patch-size 14 but the model's patch size is 16"),
    (["--data", "/nonexistent/shards"], "not a shard folder"),
    (["--resume", "/nonexistent/ckpt.pt"], "does not exist"),
    (["--steps", "0"], "--steps must be positive"),
])
def test_train_rejects_bad_flags(flags, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        train_main(FAST + ["--output", str(tmp_path)] + flags)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_checkpoint_that_does_not_fit_the_model(tmp_path, capsys):
    import timm
    import torch

    path = tmp_path / "vit_1000.pth"
    torch.save(timm.create_model("vit_tiny_patch16_224", pretrained=False).state_dict(), path)  # 1000 classes
    with pytest.raises(SystemExit) as e:
        train_main(FAST + ["--output", str(tmp_path), "--checkpoint", str(path)])
    assert e.value.code == 2 and "1000-class head but the data has 10 classes" in capsys.readouterr().err
    path_s = tmp_path / "vit_small.pth"
    torch.save(timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=10).state_dict(), path_s)
    with pytest.raises(SystemExit) as e:
        train_main(FAST + ["--output", str(tmp_path), "--checkpoint", str(path_s)])
    assert e.value.code == 2 and "does not fit the model" in capsys.readouterr().err


@pytest.mark.parametrize("flags,message", [
    (["--thresholds", "1", "2", "3"], "one value per scale"),
    (["--model", "nope_vit"], "unknown timm model"),
    (["--max-tokens", "100"], "more than the batch budget max_tokens=100"),
])
def test_evaluate_rejects_bad_flags(flags, message, capsys):
    with pytest.raises(SystemExit) as e:
        load_tool("evaluate").main(["--workers", "0"] + flags)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_bad_config_raises_in_the_library_and_exits_2_on_the_command_line(tmp_path):
    """The library raises SetupError (a ValueError, never SystemExit); only the CLI turns it into
    ``train.py: error: ...`` and status 2."""
    from apt_train import SetupError, TrainConfig, Trainer

    data = str(ROOT / "shards")
    for config, message in [(TrainConfig(data=data, steps=0), "--steps must be positive, got 0"),
                            (TrainConfig(), "no training data"),
                            (TrainConfig(data=data, thresholds=(5.5,)), "one value per scale"),
                            (TrainConfig(data=data, patch_size=14, workers=0), "but the model's patch size is 16"),
                            (TrainConfig(data=data, resume=tmp_path / "none.pt"), "does not exist")]:
        with pytest.raises(SetupError, match=message) as e:
            Trainer(config)
        assert isinstance(e.value, ValueError)
    proc = subprocess.run([sys.executable, str(ROOT / "tools/train.py"), "--steps", "0", "--output", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert [l for l in proc.stderr.splitlines() if "error" in l] == ["train.py: error: --steps must be positive, got 0"]


def test_script_exit_has_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "tools/train.py"), "--checkpoint", str(tmp_path / "missing.pt"),
                           "--output", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "does not exist" in proc.stderr and "Traceback" not in proc.stderr

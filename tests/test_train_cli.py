"""Bad flags stop the tools early with a clear message and exit status 2, never a traceback."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from apt_train.commands import evaluate as evaluate_command
from apt_train.commands import sweep as sweep_command
from apt_train.commands import train as train_command

ROOT = Path(__file__).resolve().parents[1]


def train_main(argv):
    """``apt-train`` as its script runs it (``sys.exit(main())``): a status other than 0 is a SystemExit.
    Its default data is the sample ``shards/``."""
    code = train_command.main(argv)
    if code:
        raise SystemExit(code)
    return code


def exit_status(main, argv) -> int:
    """A command's status: what ``main`` returns, or the code of argparse's SystemExit (wrong flags)."""
    try:
        return main(argv)
    except SystemExit as e:
        return e.code

FAST = ["--steps", "1", "--workers", "0", "--no-eval", "--quiet"]


@pytest.mark.parametrize("flags,message", [
    (["--thresholds", "5.5"], "one value per scale"),
    (["--thresholds", "5.5", "4.0", "3.0"], "one value per scale"),
    (["--max-tokens", "5"], "cannot hold a single image"),
    (["--max-tokens", "150"], "more than the batch budget max_tokens=150"),
    (["--max-tokens", "0"], "--max-tokens: max_tokens must be a positive int, got 0"),
    (["--checkpoint", "/nonexistent/vit.pth"], "checkpoint /nonexistent/vit.pth does not exist"),
    (["--model", "vit_not_a_model"], "unknown timm model 'vit_not_a_model'"),
    (["--model", "resnet18"], "supports timm VisionTransformer"),
    (["--patch-size", "14"], "--patch-size 14 but the model's patch size is 16"),
    (["--data", "/nonexistent/shards"], "--data /nonexistent/shards: /nonexistent/shards does not exist"),
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
    (["--data", "/nonexistent/x:val"], "--data /nonexistent/x:val: /nonexistent/x does not exist"),
])
def test_evaluate_rejects_bad_flags(flags, message, capsys):
    assert exit_status(evaluate_command.main, ["--workers", "0"] + flags) == 2
    err = capsys.readouterr().err  # the log's lines before it (the evaluation's header), then the error
    errors = [line for line in err.splitlines() if "error" in line]
    assert message in err and "usage:" not in err and len(errors) == 1 and errors[0] == err.strip().splitlines()[-1]


def test_bad_config_raises_in_the_library_and_exits_2_on_the_command_line(tmp_path):
    """The library raises SetupError (a ValueError, never SystemExit); only the CLI turns it into
    ``train.py: error: ...`` and status 2."""
    from apt_train import SetupError, TrainConfig, Trainer

    data = str(ROOT / "shards")
    for flat, message in [(dict(data=data, steps=0), "--steps must be positive, got 0"),
                          (dict(), "no training data"),
                          (dict(data=data, thresholds=(5.5,)), "one value per scale"),
                          (dict(data=data, patch_size=14, workers=0), "but the model's patch size is 16"),
                          (dict(data=data, resume=tmp_path / "none.pt"), "does not exist"),
                          (dict(data=data, val_data="/nonexistent/v:val", workers=0, max_tokens=2048),
                           "--val-data /nonexistent/v:val: /nonexistent/v does not exist")]:
        with pytest.raises(SetupError, match=message) as e:
            Trainer(TrainConfig.from_flat(flat))
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


# ------------------------------------------------------------------ your own data, your own checkpoint (issue 15)
def image_folder(root: Path, val_classes: int = 3) -> Path:
    """``root/photos/{train,val}/<class>/``: 3 training classes of 4 images, val ``val_classes`` of 2."""
    import shutil

    images = sorted((ROOT / "tests/data/images").glob("*.JPEG"))
    names = ["cat", "dog", "fish", "zebra"]
    for c in range(max(3, val_classes)):
        for i, img in enumerate(images[6 * c:6 * c + 6]):
            split = "val" if i >= 4 else "train"
            if split == "train" and c >= 3 or split == "val" and c >= val_classes:
                continue
            d = root / "photos" / split / names[c]
            d.mkdir(parents=True, exist_ok=True)
            shutil.copy(img, d / img.name)
    return root / "photos" / "train"


TINY = ["--steps", "1", "--workers", "0", "--quiet", "--max-tokens", "2048"]


def test_own_image_folder_trains_and_evaluates_on_the_val_folder_beside_it(tmp_path, capsys):
    train = image_folder(tmp_path)
    out = tmp_path / "out"
    assert train_main(TINY + ["--data", str(train), "--output", str(out), "--log-tensorboard"]) == 0
    printed = capsys.readouterr().err
    assert f"validation data: {tmp_path / 'photos' / 'val'} (the val split beside --data" in printed
    assert f"train data {train}: 12 images, 3 classes; val data {tmp_path / 'photos' / 'val'}: 6 images, 3 classes; " \
           "head: 3 classes" in printed
    assert "final val: top-1" in printed
    assert (out / "checkpoint-0000001.pt").is_file() and (out / "curves.png").stat().st_size > 1000
    import json

    recs = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["images"] for r in recs if r["split"] == "val"] == [6]
    # --log-tensorboard (tensorboard is a dev extra): the metrics' scalars, read back from the event file
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert {"train/loss", "train/lr", "train/fill", "val/top1", "val/loss"} <= set(tags), tags
    val = [r for r in recs if r["split"] == "val"][0]
    (top1,) = events.Scalars("val/top1")
    assert (top1.step, top1.value) == (val["step"], pytest.approx(val["top1"]))


def test_log_tensorboard_without_the_package_warns_and_goes_on(tmp_path, monkeypatch, caplog):
    from apt_train.curves import TensorBoardLogger

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if tensorboard were not installed
    assert TensorBoardLogger.create(tmp_path) is None
    assert "the tensorboard package is not installed" in caplog.text and not (tmp_path / "tensorboard").exists()


def test_a_failing_evaluation_keeps_the_checkpoint(tmp_path):
    from apt_train import TrainConfig, Trainer

    train = image_folder(tmp_path)
    out = tmp_path / "out"
    trainer = Trainer(TrainConfig.from_flat(dict(data=str(train), val_data="auto", steps=2, eval_every=1, save_every=0,
                                                 workers=0, max_tokens=2048, quiet=True, output=str(out))))
    assert trainer.config.data.val == str(tmp_path / "photos" / "val")

    def broken():
        raise IndexError("Target 7 is out of bounds")

    trainer.run_eval = broken
    with pytest.raises(IndexError):
        trainer.fit()
    assert [p.name for p in out.glob("checkpoint-*.pt")] == ["checkpoint-0000001.pt"]


def test_curves_png_from_a_metrics_file(tmp_path):
    import json

    from PIL import Image

    from apt_train.curves import write_curves

    recs = [{"split": "train", "step": s, "loss": 2.0 / s, "lr": 1e-3 * s} for s in range(1, 6)]
    recs += [{"split": "val", "step": 5, "top1": 0.4}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs) + '{"cut')
    png = write_curves(tmp_path / "metrics.jsonl")
    assert png == tmp_path / "curves.png" and not list(tmp_path.glob("*.tmp"))
    with Image.open(png) as im:
        assert im.width > 600


def test_sweep_and_evaluate_share_the_baseline_and_output_flags(tmp_path):
    out = tmp_path / "sweep"
    assert sweep_command.main(["--grid", "5.5,4", "--baseline", "random", "--max-batches", "1", "--workers", "0",
                                    "--output", str(out)]) == 0
    rows = (out / "sweep.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["uniform", "APT", "random"] and (out / "sweep.png").is_file()


def test_val_labels_beyond_the_head_stop_before_the_first_step(tmp_path, capsys):
    train = image_folder(tmp_path, val_classes=4)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        train_main(TINY + ["--data", str(train), "--output", str(out)])
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert "--val-data " in err and "label 3 does not fit the model's 3-class head (--val-data has 4 classes); " \
                                    "pass --num-classes 4" in err
    assert not list(out.glob("checkpoint-*"))


def test_default_val_data_is_the_split_beside_the_training_data(tmp_path):
    from apt_train.data import default_val_data

    shards = ROOT / "shards"
    assert default_val_data(str(shards))[0] == f"{shards}:val"
    assert default_val_data(f"{shards}:train")[0] == f"{shards}:val"
    assert default_val_data(str(shards / "train.parquet"))[0] == str(shards / "val.parquet")
    assert default_val_data(f"{shards}:val")[0] is None
    train = image_folder(tmp_path)
    assert default_val_data(str(train))[0] == str(tmp_path / "photos" / "val")
    val, line = default_val_data(str(tmp_path / "photos" / "val"))
    assert val is None and "validation data: none" in line and "--val-data" in line


def test_finetune_a_1000_class_checkpoint_on_10_classes(tmp_path, capsys):
    import timm
    import torch

    path = tmp_path / "in1k.pth"
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=1000)
    torch.save(vit.state_dict(), path)
    with pytest.raises(SystemExit) as e:  # the head size from the data: say what to pass
        train_main(FAST + ["--output", str(tmp_path), "--initial-checkpoint", str(path)])
    assert e.value.code == 2
    assert "1000-class head but the data has 10 classes; pass --num-classes 10 to drop" in capsys.readouterr().err
    from apt_train.cli import run

    result = run(FAST + ["--data", str(ROOT / "shards"), "--max-tokens", "2048", "--output", str(tmp_path / "out"),
                 "--initial-checkpoint", str(path), "--num-classes", "10"])
    model = result.model
    assert model.num_classes == 10 and result.global_step == 1
    # the checkpoint's body was loaded (the embedding is frozen by nothing but moved by one tiny step)
    assert torch.allclose(model.pos_embed.detach(), vit.pos_embed.detach(), atol=1e-3)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("tool", ["train", "evaluate"])
def test_device_cuda_without_cuda_is_one_line_and_status_2(tool, tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / f"tools/{tool}.py"), "--device", "cuda", "--workers", "0"]
                          + (["--output", str(tmp_path)] if tool == "train" else []),
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert [l for l in proc.stderr.splitlines() if "error" in l] == \
        [f"{tool}.py: error: --device cuda but CUDA is not available on this machine "
         f"(torch {__import__('torch').__version__}); use --device cpu or --device auto"]


def test_a_warmup_longer_than_the_run_warns(tmp_path, caplog):
    from apt_train import cli

    train = image_folder(tmp_path)
    with caplog.at_level("WARNING", logger="apt_train"):
        trainer = cli.make_trainer(TINY + ["--steps", "10", "--epochs", "20", "--warmup-steps", "15", "--data", str(train),
                                           "--no-eval", "--output", str(tmp_path / "out")])
    assert trainer.total_steps == 10
    assert "warmup of 15 steps >= the run's 10 steps: the lr never reaches its peak" in caplog.text


def test_timm_flag_names_and_yaml_config(tmp_path):
    from apt_train.cli import build_parser, parse_args

    ap = build_parser("shards")
    text = " ".join(ap.format_help().split())
    assert "--patch-size PATCH_SIZE base patch size in pixels (default: the model's)" in text
    for flag in ("--img-size", "--smoothing", "--log-interval", "--pretrained", "--initial-checkpoint", "-c YAML"):
        assert flag in text
    args = parse_args(ap, ["--img-size", "192", "--smoothing", "0.2", "--log-interval", "3", "--checkpoint", "w.pth"])
    assert (args.image_size, args.label_smoothing, args.log_every, args.checkpoint) == (192, 0.2, 3, "w.pth")
    cfg = tmp_path / "run.yaml"
    cfg.write_text("lr: 0.001\nwarmup-steps: 2\nsmoothing: 0.3\nimg_size: 160\npretrained: true\n")
    args = parse_args(build_parser("shards"), ["-c", str(cfg), "--lr", "0.002"])
    assert (args.lr, args.warmup_steps, args.label_smoothing, args.image_size, args.pretrained) == \
        (0.002, 2, 0.3, 160, True)  # the command line beats the file
    cfg.write_text("no_such_flag: 1\n")
    with pytest.raises(SystemExit) as e:
        parse_args(build_parser("shards"), ["--config", str(cfg)])
    assert e.value.code == 2


@pytest.mark.parametrize("columns", [160, 100])
def test_the_progress_bar_keeps_loss_and_lr_when_the_terminal_cuts_it(tmp_path, monkeypatch, columns):
    """tqdm trims the bar to the terminal's width: loss and lr come first, so a narrow terminal cuts the rest."""
    import fcntl
    import os
    import pty
    import struct
    import termios

    from apt_train.run_log import RunLog

    master, slave = pty.openpty()  # a real terminal of `columns` columns
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, columns, 0, 0))
    terminal = os.fdopen(slave, "w")
    monkeypatch.setattr(sys, "stderr", terminal)
    log = RunLog(is_main=True)
    log.open(tmp_path, total_steps=128000, step=0, resume=False, tensorboard=False)
    log.step({"step": 1234, "epoch": 12, "loss": 2.2596, "lr": 0.000178, "images_per_s": 1234.5,
              "tokens_per_s": 1512345, "tokens_per_image": 1225.9, "fill": 0.998})
    line = str(log.bar)  # the bar as tqdm draws it on this terminal (whatever its row)
    log.close()
    terminal.close()
    os.close(master)
    assert 0 < len(line) <= columns and "loss 2.2596 lr 0.000178" in line, line


def test_a_parent_folder_of_splits_trains_on_its_train_folder(tmp_path, capsys, caplog):
    """``--data mydata`` holding ``train/`` and ``val/`` (each a folder of class folders) is not a 2-class
    "train vs val" set: the train folder trains, the val folder beside it validates, and a line says so."""
    image_folder(tmp_path)
    parent = tmp_path / "photos"
    with caplog.at_level("INFO", logger="apt_train"):  # the run's header is a log record (INFO) too
        assert train_main(TINY + ["--data", str(parent), "--output", str(tmp_path / "out")]) == 0
    assert f"--data {parent} holds the splits train, val, not classes: --data uses {parent / 'train'}" in caplog.text
    assert f"train data {parent / 'train'}: 12 images, 3 classes; val data {parent / 'val'}: 6 images" in caplog.text
    capsys.readouterr()  # the first run's log lines
    (parent / "train").rename(parent / "test")  # no train split: say which folder to pass
    assert exit_status(train_command.main, TINY + ["--data", str(parent), "--output", str(tmp_path / "o2")]) == 2
    assert capsys.readouterr().err.strip() == (
        f"apt-train: error: --data {parent}: its folders test, val look like splits (a class folder per split), "
        f"not classes; pass --data {parent / 'test'}")
    from apt_train.cli import split_folder

    assert split_folder(str(parent / "val"), "train") == str(parent / "val")  # a folder of classes stays
    assert split_folder(str(ROOT / "shards"), "train") == str(ROOT / "shards")


def test_an_image_size_the_model_rounds_is_logged_once(tmp_path, caplog):
    with caplog.at_level("WARNING", logger="apt_train"):
        assert train_main(TINY + ["--img-size", "100", "--no-eval", "--output", str(tmp_path)]) == 0
    lines = [r.getMessage() for r in caplog.records if "--img-size" in r.getMessage()]
    assert lines == ["--img-size 100 is not a multiple of the patch size 16: the model runs at 96 px"]


def test_runtime_errors_are_one_line_naming_the_path_and_the_reason(tmp_path, capsys):
    from apt_train.commands import calibrate, make_shards, visualize

    missing = tmp_path / "nothing-here"
    assert make_shards.main([str(missing), str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == f"apt-make-shards: error: {missing}: no such file or folder\n"
    assert visualize.main([str(missing / "a.jpg"), "--out", str(tmp_path / "v")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[-1] == "apt-visualize: error: none of the 1 images could be drawn (see the warnings above)"
    assert calibrate.main(["--target-fraction", "0.5", "--data", str(missing)]) == 2
    assert capsys.readouterr().err.startswith(f"apt-calibrate: error: {missing}")
    assert exit_status(make_shards.main, ["--no-such-flag"]) == 2  # wrong flags: argparse's usage
    assert "usage: apt-make-shards" in capsys.readouterr().err


def test_a_library_setting_error_is_named_by_its_flag(capsys):
    from apt_train.commands.common import error_text, run_command
    from apt_data.config import SettingError

    e = SettingError("sample x needs 300 tokens, more than the batch budget max_tokens=150", "max_tokens")
    assert error_text(e) == "--max-tokens: sample x needs 300 tokens, more than the batch budget max_tokens=150"
    assert error_text(SettingError("must be positive", "image_size")) == "--img-size: must be positive"
    assert error_text(SettingError("one value per scale", "thresholds"), {"thresholds": "--base-thresholds"}) == \
        "--base-thresholds: one value per scale"
    try:  # a wrapper raised from the library's error keeps its setting
        try:
            raise SettingError("max_images must be positive, got 0", "max_images")
        except ValueError as inner:
            raise ValueError(str(inner)) from None
    except ValueError as outer:
        assert error_text(outer) == "--max-images: max_images must be positive, got 0"

    def body(argv):
        raise FileNotFoundError(2, "No such file or directory", "/data/x.tar")

    assert run_command("apt-eval", body) == 2
    assert capsys.readouterr().err == "apt-eval: error: /data/x.tar: no such file or folder\n"

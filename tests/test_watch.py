"""Runs you can watch (common.RunLog): log.jsonl, loss.png beside the sample grids, TensorBoard with --tensorboard."""
import json
import os

import numpy as np
import pytest
from PIL import Image

import common
import train
from helpers import tiny_training_folder

pytestmark = pytest.mark.usefixtures("one_thread")


def test_smoothing_is_a_bias_corrected_moving_average():
    assert common.smooth([3.0, 3.0, 3.0], 5) == pytest.approx([3.0, 3.0, 3.0])  # no pull towards 0 at the start
    w = 1 - 2 / (3 + 1)
    assert common.smooth([0.0, 1.0], 3)[1] == pytest.approx((1 - w) / (w * (1 - w) + (1 - w)))
    assert common.nice_ticks(0.13, 0.27) == pytest.approx([0.15, 0.2, 0.25])
    assert common.nice_ticks(1, 60, 8) == pytest.approx([10, 20, 30, 40, 50, 60])


def test_the_loss_curve_falls_where_the_loss_falls(tmp_path):
    """A loss of 1 for the first half, 0 for the second: the average's dark pixels are high on the left and low on
    the right of the plot."""
    steps = list(range(1, 201))
    common.plot_loss(steps, [1.0] * 100 + [0.0] * 100, tmp_path / "loss.png")
    a = np.asarray(Image.open(tmp_path / "loss.png").convert("RGB")).astype(int)
    dark = (a[..., 2] > 120) & (a[..., 0] < 60)  # the average's colour (20, 70, 160)
    rows = lambda x: np.nonzero(dark[:, x])[0]
    left, right = rows(150), rows(800)
    assert len(left) and len(right) and left.mean() < 100 < 300 < right.mean()


def test_a_run_leaves_loss_png_and_tensorboard_scalars_and_grids(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    ckpt, data = tiny_training_folder(tmp_path, 4, (32, 32))
    out = tmp_path / "run"
    train.main(["--ckpt", ckpt, "--data", data, "--out", str(out), "--resolution", "32", "--batch-size", "2",
                "--workers", "0", "--steps", "3", "--sample-every", "2", "--save-every", "0", "--warmup", "1",
                "--tensorboard"])
    assert (out / "samples" / "loss.png").exists() and (out / "samples" / "step_000002.png").exists()
    with open(out / "log.jsonl") as f:
        logged = [json.loads(line) for line in f]
    ev = EventAccumulator(str(out / "tensorboard")).Reload()
    tags = set(ev.Tags()["scalars"])
    assert {f"train/{k}" for k in ("loss", "lr", "grad_norm", "step_time", "images_per_s")} <= tags
    assert [e.value for e in ev.Scalars("train/loss")] == pytest.approx([r["loss"] for r in logged])
    assert [e.step for e in ev.Images("samples")] == [2, 3] and os.listdir(out / "tensorboard")


def test_tensorboard_missing_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(__import__("sys").modules, "torch.utils.tensorboard", None)  # as if not installed
    with pytest.raises(SystemExit) as e:
        common.RunLog(str(tmp_path), 0, 1, tensorboard=True)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 1 and len(err) == 1 and "pip install tensorboard" in err[0]

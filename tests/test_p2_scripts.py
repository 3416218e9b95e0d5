"""The P2 scripts run as the grader runs them: on the toy world and on a full-size course-format checkpoint."""

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from p2_unet import FaceUNet

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def run(*args):
    return subprocess.run([sys.executable, *[str(a) for a in args]], cwd=REPO, env=ENV, capture_output=True,
                          text=True)


def test_toy_face_layout(toy_world):
    face = toy_world / "face"
    state = torch.load(face / "UNet.pt", weights_only=True)  # a plain state_dict, as the course ships it
    assert type(state).__name__ == "OrderedDict" and state["down1.weight"].shape == (32, 3, 3, 3)
    for i in range(10):
        noise = torch.load(face / "noise" / f"{i:02d}.pt", weights_only=True)
        assert noise.shape == (1, 3, 64, 64) and noise.dtype == torch.float32
        assert Image.open(face / "GT" / f"{i:02d}.png").size == (64, 64)


def test_grader_command_with_gt_and_figures_on_the_toy_world(toy_world, tmp_path):
    face = toy_world / "face"
    result = run("p2_ddim.py", face / "noise", tmp_path / "out", face / "UNet.pt", "--steps", "1", "--gt",
                 face / "GT", "--figures", tmp_path / "figures")
    assert result.returncode == 0, result.stderr
    assert "Toy world:" in result.stdout
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [f"{i:02d}.png" for i in range(10)]
    assert Image.open(tmp_path / "out" / "00.png").size == (64, 64)
    # each line is the MSE of the written PNG against GT on the 0-255 scale, and the mean line their mean: fails on
    # an MSE taken in [0, 1] or [-1, 1], on uint8 wrap-around, or on images compared out of order
    lines = dict(re.findall(r"^(\d\d)\.png  MSE ([\d.]+)$", result.stdout, re.M))
    assert sorted(lines) == [f"{i:02d}" for i in range(10)], result.stdout
    for name, value in lines.items():
        ours = np.asarray(Image.open(tmp_path / "out" / f"{name}.png"), dtype=np.float64)
        gt = np.asarray(Image.open(face / "GT" / f"{name}.png").convert("RGB"), dtype=np.float64)
        assert float(value) == pytest.approx(((ours - gt) ** 2).mean(), abs=1e-4), name
    mean = float(re.search(r"^mean MSE over 10 images \(0-255 scale\): ([\d.]+)$", result.stdout, re.M).group(1))
    assert mean == pytest.approx(np.mean([float(v) for v in lines.values()]), abs=1e-3)
    grid = Image.open(tmp_path / "figures" / "eta_grid.png")
    assert grid.width > 4 * 64 and grid.height > 5 * 64  # 5 eta rows x 4 noise columns plus labels


def test_a_bad_input_exits_1_with_one_line(toy_world, tmp_path):
    face = toy_world / "face"
    result = run("p2_ddim.py", face / "noise", tmp_path / "out", face / "GT" / "00.png")
    assert result.returncode == 1
    assert result.stderr.startswith("error: cannot load") and result.stderr.count("\n") == 1, result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_interpolation_writes_strips_and_frames(toy_world, tmp_path):
    """The script as the grader's shell runs it (slow: test_p2_interpolate.py checks the same main's noises in-process).
    alpha = 0 and 1 are p2_ddim.py's own samples of 00.pt and 01.pt (fails on alpha running the wrong way, an
    endpoint that is not exact, or another sampler); the frames between are neither."""
    face = toy_world / "face"
    result = run("p2_interpolate.py", face / "noise", tmp_path / "interp", face / "UNet.pt", "--steps", "2")
    assert result.returncode == 0, result.stderr
    samples = run("p2_ddim.py", face / "noise", tmp_path / "samples", face / "UNet.pt", "--steps", "2")
    assert samples.returncode == 0, samples.stderr

    def pixels(path):
        return np.asarray(Image.open(path), dtype=np.int16)

    for method in ["slerp", "linear"]:
        frames = sorted(p.name for p in (tmp_path / "interp" / method).iterdir())
        assert frames == [f"{i:02d}.png" for i in range(11)]
        assert Image.open(tmp_path / "interp" / f"{method}.png").width > 11 * 64
        first, last = pixels(tmp_path / "interp" / method / "00.png"), pixels(tmp_path / "interp" / method / "10.png")
        # at most one grey level apart: the batches differ, and so may a convolution's last bit
        assert np.abs(first - pixels(tmp_path / "samples" / "00.png")).max() <= 1, method
        assert np.abs(last - pixels(tmp_path / "samples" / "01.png")).max() <= 1, method
        middle = pixels(tmp_path / "interp" / method / "05.png")
        assert np.abs(middle - first).max() > 10 and np.abs(middle - last).max() > 10, method


@pytest.mark.parametrize("script", ["p2_ddim.py", "p2_interpolate.py"])
def test_the_unet_passed_as_out_dir_is_one_clear_line(toy_world, tmp_path, script):
    """The old p2_interpolate order (NOISE_DIR UNET_PT OUT_DIR) is refused by name, before anything is read."""
    face = toy_world / "face"
    result = run(script, face / "noise", face / "UNet.pt", tmp_path / "out")
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert "the arguments are NOISE_DIR OUT_DIR UNET_PT" in result.stderr and str(face / "UNet.pt") in result.stderr
    assert not (tmp_path / "out").exists()


def test_grader_command_on_a_full_size_course_format_checkpoint(tmp_path):
    """A randomly initialised base-128 model saved as a plain state_dict, as the course ships UNet.pt."""
    torch.manual_seed(0)
    torch.save(FaceUNet(base=128).state_dict(), tmp_path / "UNet.pt")
    (tmp_path / "noise").mkdir()
    torch.save(torch.randn(1, 3, 64, 64), tmp_path / "noise" / "00.pt")
    result = run("p2_ddim.py", tmp_path / "noise", tmp_path / "out", tmp_path / "UNet.pt", "--steps", "1")
    assert result.returncode == 0, result.stderr
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["00.png"]


@pytest.mark.slow
def test_grader_command_reproduces_all_toy_ground_truth(toy_world, tmp_path):
    face = toy_world / "face"
    result = run("p2_ddim.py", face / "noise", tmp_path / "out", face / "UNet.pt", "--gt", face / "GT")
    assert result.returncode == 0, result.stderr
    mean = float(re.search(r"mean MSE over 10 images \(0-255 scale\): ([\d.]+)", result.stdout).group(1))
    assert mean < 1, result.stdout

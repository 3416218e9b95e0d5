"""The course's entry scripts, run as the grader runs them: from another folder, with relative paths."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from p1_model import Diffusion, P1Config
from utils import load_rgb, save_checkpoint

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHON": sys.executable}


def bash(script, *args, cwd):
    return subprocess.run(["bash", str(script), *[str(a) for a in args]], cwd=cwd, env=ENV, capture_output=True,
                          text=True, timeout=600)


@pytest.fixture()
def elsewhere(tmp_path):
    folder = tmp_path / "elsewhere"
    folder.mkdir()
    return folder


def test_hw2_1_samples_with_the_repositorys_checkpoint_from_any_folder(tmp_path, elsewhere):
    """A copy of the repository's scripts with a small checkpoint in its checkpoints/p1/; OUT_DIR is relative to the
    caller's folder. One DDIM step (a flag passed through) keeps the 1,000 guided samples quick on a CPU."""
    repo = tmp_path / "repo"
    repo.mkdir()
    for path in [*REPO.glob("*.py"), REPO / "hw2_1.sh"]:
        shutil.copy(path, repo / path.name)
    config = P1Config(unshuffle=2, widths=(8, 16), blocks_per_level=1, attention_heads=2, embed_dim=16)
    save_checkpoint(repo / "checkpoints" / "p1" / "ddpm.safetensors",
                    {"config": config.to_dict(), "train": {"guidance": 2.0}, "ema": Diffusion(config).net.state_dict(),
                     "epoch": 1})
    result = bash(repo / "hw2_1.sh", "out", "--steps", "1", cwd=elsewhere)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"from {repo / 'checkpoints' / 'p1' / 'ddpm.safetensors'}" in result.stdout
    assert "guidance w = 2.0" in result.stdout
    for name in ("mnistm", "svhn"):
        assert sorted(p.name for p in (elsewhere / "out" / name).iterdir()) == sorted(
            f"{digit}_{i:03d}.png" for digit in range(10) for i in range(1, 51))
    usage = bash(repo / "hw2_1.sh", cwd=elsewhere)
    assert usage.returncode == 1 and usage.stderr.strip() == "usage: bash hw2_1.sh OUT_DIR [p1_inference.py flags]"


def test_hw2_2_runs_p2_ddim_from_any_folder(toy_world, elsewhere):
    """Relative NOISE_DIR, OUT_DIR and UNET_PT in another folder: the toy ground truth (made with diffusers) within
    MSE 1 on the 0-255 scale, for the one noise copied there."""
    (elsewhere / "noise").mkdir()
    shutil.copy(toy_world / "face" / "noise" / "00.pt", elsewhere / "noise" / "00.pt")
    shutil.copy(toy_world / "face" / "UNet.pt", elsewhere / "UNet.pt")
    result = bash(REPO / "hw2_2.sh", "noise", "out", "UNet.pt", cwd=elsewhere)
    assert result.returncode == 0, result.stderr[-2000:]
    assert re.search(r"Wrote 1 images to out", result.stdout), result.stdout
    ours = np.asarray(load_rgb(elsewhere / "out" / "00.png")).astype(np.float64)
    truth = np.asarray(load_rgb(toy_world / "face" / "GT" / "00.png")).astype(np.float64)
    assert np.mean((ours - truth) ** 2) < 1
    swapped = bash(REPO / "hw2_2.sh", "noise", "UNet.pt", "out2", cwd=elsewhere)
    assert swapped.returncode == 1 and "NOISE_DIR OUT_DIR UNET_PT" in swapped.stderr
    usage = bash(REPO / "hw2_2.sh", "noise", cwd=elsewhere)
    assert usage.returncode == 1 and usage.stderr.strip() == "usage: bash hw2_2.sh NOISE_DIR OUT_DIR UNET_PT"


def test_hw2_3_reads_the_embeddings_from_the_repositorys_checkpoints_by_default(tmp_path, elsewhere):
    """Without HW2_P3_EMBEDS the grader's call passes REPO/checkpoints/p3_ti (beside the script, not the caller's
    folder) to `p3_textual_inversion.py generate`, with the caller's relative paths and the extra flags after it.
    A stand-in p3_textual_inversion.py prints the arguments it gets, so no Stable Diffusion runs."""
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copy(REPO / "hw2_3.sh", repo / "hw2_3.sh")
    (repo / "p3_textual_inversion.py").write_text("import sys\nprint(sys.argv[1:])\n")
    env = {key: value for key, value in ENV.items() if key != "HW2_P3_EMBEDS"}
    result = subprocess.run(["bash", str(repo / "hw2_3.sh"), "input.json", "out", "model.ckpt", "--steps", "50"],
                            cwd=elsewhere, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    expected = ["generate", "input.json", "out", "model.ckpt", "--embeds", str(repo / "checkpoints" / "p3_ti"),
                "--steps", "50"]
    assert result.stdout.strip() == str(expected)

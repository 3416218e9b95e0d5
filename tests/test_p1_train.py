"""P1 training: bad data through the CLI, exact resume, DDP on 2 CPU processes (gloo), and the helpers."""

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import p1_train
from utils import Hw2Error, load_checkpoint

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def test_bad_data_through_the_cli(small_digits, tmp_path):
    data = small_digits()
    (data / "mnistm" / "train.csv").write_text("image_name,label\n00000.png,x\n")
    result = subprocess.run([sys.executable, "p1_train.py", "--data", str(data), "--out", str(tmp_path / "out")],
                            cwd=REPO, env=ENV, capture_output=True, text=True)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and "mnistm/train.csv" in last and "Traceback" not in result.stderr


def test_epoch_order_is_a_function_of_seed_and_epoch_and_shards_disjointly():
    a, b = p1_train.epoch_order(3, 5, 101), p1_train.epoch_order(3, 5, 101)
    assert torch.equal(a, b) and not torch.equal(a, p1_train.epoch_order(3, 6, 101))
    shards = [p1_train.epoch_order(3, 5, 101, rank, 2) for rank in range(2)]
    assert len(shards[0]) == len(shards[1]) == 50
    assert set(shards[0].tolist()).isdisjoint(shards[1].tolist())


def test_lr_factor_warmup_then_cosine():
    assert p1_train.lr_factor(0, 10, 110) == pytest.approx(0.1)
    assert p1_train.lr_factor(9, 10, 110) == pytest.approx(1.0)
    assert p1_train.lr_factor(60, 10, 110) == pytest.approx(0.5)
    assert p1_train.lr_factor(110, 10, 110) == pytest.approx(0.0)


def test_ema_update():
    ema, model = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    expected = 0.9 * ema.weight.detach().clone() + 0.1 * model.weight.detach()
    p1_train.ema_update(ema, model, 0.9)
    torch.testing.assert_close(ema.weight, expected)


TINY = ["--limit", "16", "--batch-size", "8", "--epochs", "2", "--preset", "toy", "--device", "cpu"]


def test_resume_is_exact(toy_world, tmp_path):
    """2 epochs straight == 1 epoch (as if killed) + --resume for the 2nd, bit for bit; grids on the side."""
    data = str(toy_world / "digits")
    p1_train.main(["--data", data, "--out", str(tmp_path / "straight"), *TINY, "--grid-every", "1"])
    p1_train.main(["--data", data, "--out", str(tmp_path / "split"), *TINY, "--grid-every", "0", "--stop-after", "1"])
    first = load_checkpoint(tmp_path / "split" / p1_train.CHECKPOINT_NAME)
    assert first["epoch"] == 1
    p1_train.main(["--data", data, "--out", str(tmp_path / "split"),
                   "--resume", str(tmp_path / "split" / p1_train.CHECKPOINT_NAME)])
    straight = load_checkpoint(tmp_path / "straight" / p1_train.CHECKPOINT_NAME)
    resumed = load_checkpoint(tmp_path / "split" / p1_train.CHECKPOINT_NAME)
    assert straight["epoch"] == resumed["epoch"] == 2 and straight["step"] == resumed["step"] == 8
    for key in ("model", "ema"):
        for name, tensor in straight[key].items():
            assert torch.equal(tensor, resumed[key][name]), f"{key}.{name} differs after resume"
    assert not torch.equal(first["model"]["conv_in.weight"], straight["model"]["conv_in.weight"])  # it trained
    assert sorted(p.name for p in (tmp_path / "straight" / "samples").iterdir()) == ["epoch_001.png",
                                                                                     "epoch_002.png"]
    assert straight["config"]["schedule"] == "cosine" and straight["train"]["lr"] == 2e-3  # toy preset


def test_resume_refuses_a_foreign_checkpoint(tmp_path):
    from utils import save_checkpoint
    save_checkpoint(tmp_path / "other.safetensors", {"config": {"depth": 3}, "model": {}})
    with pytest.raises(Hw2Error, match="not a P1 diffusion checkpoint"):
        p1_train.main(["--resume", str(tmp_path / "other.safetensors")])


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_cpu_processes_hold_identical_weights(toy_world, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
         "p1_train.py", "--data", str(toy_world / "digits"), "--out", str(tmp_path), "--limit", "16",
         "--batch-size", "4", "--epochs", "1", "--grid-every", "0", "--device", "cpu"],
        cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    digests = dict(re.findall(r"rank (\d): weights sha256 ([0-9a-f]{64})", result.stdout))
    assert sorted(digests) == ["0", "1"], result.stdout[-2000:]
    assert digests["0"] == digests["1"]
    state = load_checkpoint(tmp_path / p1_train.CHECKPOINT_NAME)  # rank 0 wrote it
    assert state["step"] == 4  # 32 images / 2 ranks / batch 4

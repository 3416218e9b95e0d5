"""P1 training: data validation, exact resume, DDP on 2 CPU processes (gloo), and the helpers."""

import os
import re
import shutil
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


def small_digits(toy_world, tmp_path, rows=8):
    """A copy of the toy digits with only the first `rows` training images per dataset (tests may damage it)."""
    root = tmp_path / "hw2_data"
    (root / "TOY").parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(toy_world / "TOY", root / "TOY")
    for name in ("mnistm", "svhn"):
        src, dst = toy_world / "digits" / name, root / "digits" / name
        (dst / "data").mkdir(parents=True)
        lines = (src / "train.csv").read_text().splitlines()[: rows + 1]
        (dst / "train.csv").write_text("\n".join(lines) + "\n")
        for line in lines[1:]:
            file_name = line.split(",")[0]
            shutil.copy(src / "data" / file_name, dst / "data" / file_name)
    return root / "digits"


def test_load_split_of_the_toy_world(toy_world):
    images, digits, dataset_ids = p1_train.load_split(toy_world / "digits", "train", limit=20)
    assert images.shape == (40, 3, 28, 28) and images.dtype == torch.uint8
    assert dataset_ids.tolist() == [0] * 20 + [1] * 20
    assert 0 <= digits.min() and digits.max() <= 9
    x = p1_train.to_model_range(images)
    assert -1 <= x.min() and x.max() <= 1


@pytest.mark.parametrize("damage,message", [
    (lambda d: (d / "svhn" / "train.csv").unlink(), "label file not found"),
    (lambda d: (d / "svhn" / "train.csv").write_text("name,digit\n00000.png,1\n"), "header"),
    (lambda d: (d / "svhn" / "train.csv").write_text("image_name,label\n00000.png\n"), "line 2 is malformed"),
    (lambda d: (d / "svhn" / "train.csv").write_text("image_name,label\n00000.png,10\n"), "not a digit 0..9"),
    (lambda d: (d / "svhn" / "train.csv").write_text("image_name,label\n00000.png,-1\n"), "not a digit 0..9"),
    (lambda d: (d / "svhn" / "train.csv").write_text("image_name,label\n"), "lists no images"),
    (lambda d: (d / "svhn" / "train.csv").write_bytes(b"image_name,label\n\xff\xfe,1\n"), "cannot read"),
    (lambda d: (d / "svhn" / "train.csv").write_text("image_name,label\nnope.png,1\n"), "does not exist"),
    (lambda d: (d / "svhn" / "data" / "00000.png").write_bytes(b"not a png"), "cannot read image"),
])
def test_bad_data_is_one_clear_error(toy_world, tmp_path, damage, message):
    data = small_digits(toy_world, tmp_path)
    first = (data / "svhn" / "train.csv").read_text().splitlines()[1].split(",")[0]
    if first != "00000.png":  # the damage above assumes the first listed file
        os.replace(data / "svhn" / "data" / first, data / "svhn" / "data" / "00000.png")
        text = (data / "svhn" / "train.csv").read_text()
        (data / "svhn" / "train.csv").write_text(text.replace(first, "00000.png", 1))
    damage(data)
    with pytest.raises(Hw2Error, match=message) as err:
        p1_train.load_split(data, "train")
    assert "svhn" in str(err.value)


def test_bad_data_through_the_cli(toy_world, tmp_path):
    data = small_digits(toy_world, tmp_path)
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

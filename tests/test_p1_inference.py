"""P1 inference (grader's folder layout, figures, bad input) and the evaluator (scores, course LeNet)."""

import os
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from PIL import Image

import p1_eval
import p1_inference
import p1_train
from benchmarks import p1_bench
from utils import Hw2Error, save_checkpoint, save_png

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def run(*args):
    return subprocess.run([sys.executable, *args], cwd=REPO, env=ENV, capture_output=True, text=True)


@pytest.fixture(scope="module")
def tiny_checkpoint(toy_world, tmp_path_factory):
    """A toy-preset checkpoint after two optimizer steps (untrained, but written by the real training script)."""
    out = tmp_path_factory.mktemp("p1_ckpt")
    p1_train.main(["--data", str(toy_world / "digits"), "--out", str(out), "--limit", "8", "--batch-size", "8",
                   "--epochs", "1", "--grid-every", "0", "--device", "cpu"])
    return out / p1_train.CHECKPOINT_NAME


def test_inference_writes_the_grader_layout_and_figures(tiny_checkpoint, tmp_path):
    out, figures = tmp_path / "out", tmp_path / "figures"
    result = run("p1_inference.py", str(out), "--ckpt", str(tiny_checkpoint), "--steps", "2", "--guidance", "0",
                 "--batch-size", "500", "--figures", str(figures))
    assert result.returncode == 0, result.stderr[-2000:]
    expected = sorted(f"{digit}_{i:03d}.png" for digit in range(10) for i in range(1, 51))
    for name in ("mnistm", "svhn"):
        files = sorted(os.listdir(out / name))  # hidden temp files would show here too
        assert files == expected
        with Image.open(out / name / "7_050.png") as image:
            assert image.size == (28, 28) and image.mode == "RGB"
    assert sorted(os.listdir(figures)) == ["p1_grid_mnistm.png", "p1_grid_svhn.png", "p1_reverse_mnistm.png",
                                           "p1_reverse_svhn.png"]
    with Image.open(figures / "p1_grid_svhn.png") as grid:
        assert grid.size == (10 * 30 + 2, 10 * 30 + 2)  # 10x10 tiles of 28 px, 2 px padding
    # same seed -> same images (deterministic DDIM, same device)
    again = run("p1_inference.py", str(tmp_path / "again"), "--ckpt", str(tiny_checkpoint), "--steps", "2",
                "--guidance", "0", "--batch-size", "500")
    assert again.returncode == 0, again.stderr[-2000:]
    for file_name in ("0_001.png", "9_050.png"):
        assert (out / "svhn" / file_name).read_bytes() == (tmp_path / "again" / "svhn" / file_name).read_bytes()


def test_snapshot_positions_are_even_and_include_both_ends():
    assert p1_inference.snapshot_positions(26) == [0, 5, 10, 15, 20, 25]
    assert p1_inference.snapshot_positions(1001) == [0, 200, 400, 600, 800, 1000]


def test_sample_plan_covers_50_per_digit_per_dataset():
    plan = p1_inference.sample_plan()
    assert len(plan) == 1000 and len(set(plan)) == 1000
    assert plan[0] == (0, 0, 1) and plan[500] == (1, 0, 1) and plan[-1] == (1, 9, 50)


def test_latest_checkpoint(tmp_path):
    with pytest.raises(Hw2Error, match="no checkpoint"):
        p1_inference.find_latest_checkpoint(tmp_path)
    for name in ("ddpm_old.safetensors", "ddpm.safetensors"):
        (tmp_path / name).write_bytes(b"x")
        time.sleep(0.02)
    (tmp_path / "evaluator.safetensors").write_bytes(b"x")
    assert p1_inference.find_latest_checkpoint(tmp_path).name == "ddpm.safetensors"


def test_out_dir_with_foreign_files_is_refused_not_cleaned(tmp_path):
    (tmp_path / "mnistm").mkdir()
    (tmp_path / "mnistm" / "notes.txt").write_text("mine")
    with pytest.raises(Hw2Error, match="notes.txt"):
        p1_inference.check_out_dir(tmp_path)
    assert (tmp_path / "mnistm" / "notes.txt").read_text() == "mine"


def test_unwritable_out_dir_is_one_line(tiny_checkpoint, tmp_path):
    (tmp_path / "file").write_text("x")
    out = tmp_path / "file" / "out"  # a folder below a file cannot be created, even by root
    result = run("p1_inference.py", str(out), "--ckpt", str(tiny_checkpoint))
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert str(out) in lines[0]


@pytest.mark.parametrize("case", ["foreign_checkpoint", "evaluator_checkpoint", "missing_checkpoint", "bad_steps"])
def test_bad_input_is_refused_before_writing(tiny_checkpoint, tmp_path, case):
    ckpt, extra = str(tiny_checkpoint), []
    if case == "foreign_checkpoint":
        state = p1_train.load_checkpoint(tiny_checkpoint)
        state["config"]["widths"] = [16, 32]  # another config: the weights do not fit it
        ckpt = str(tmp_path / "other.safetensors")
        save_checkpoint(ckpt, state)
    elif case == "evaluator_checkpoint":
        ckpt = str(tmp_path / "evaluator.safetensors")
        save_checkpoint(ckpt, {"config": {"widths": [16, 32], "hidden": 128}, "model": {}})
    elif case == "missing_checkpoint":
        ckpt = str(tmp_path / "nope.safetensors")
    else:
        extra = ["--steps", "0"]
    expected = {"foreign_checkpoint": "other.safetensors", "evaluator_checkpoint": "evaluator.safetensors",
                "missing_checkpoint": "nope.safetensors", "bad_steps": "--steps"}[case]
    with pytest.raises(Hw2Error, match=expected):
        p1_inference.main([str(tmp_path / "out"), "--ckpt", ckpt, *extra])
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------ evaluator


def write_fake_outputs(toy_world, out, per_digit=3):
    """Real toy val digits under the grader's names: a stand-in for generated images with known labels."""
    for name in ("mnistm", "svhn"):
        (out / name).mkdir(parents=True)
        counts = {}
        for file_name, digit in p1_train.read_labels(toy_world / "digits" / name / "val.csv"):
            if counts.get(digit, 0) < per_digit:
                counts[digit] = counts.get(digit, 0) + 1
                with Image.open(toy_world / "digits" / name / "data" / file_name) as image:
                    image.save(out / name / p1_inference.image_name(digit, counts[digit]))


def test_eval_train_and_score_smoke(toy_world, tmp_path):
    data = tmp_path / "digits"
    for name in ("mnistm", "svhn"):  # a small copy: 200 training images, the full val split
        src = toy_world / "digits" / name
        (data / name).mkdir(parents=True)
        (data / name / "data").symlink_to(src / "data")
        (data / name / "train.csv").write_text("\n".join((src / "train.csv").read_text().splitlines()[:201]) + "\n")
        (data / name / "val.csv").write_text((src / "val.csv").read_text())
    result = run("p1_eval.py", "--device", "cpu", "train", "--data", str(data), "--out", str(tmp_path), "--epochs",
                 "1")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "MNIST-M: held-out val acc = " in result.stdout and "SVHN: held-out val acc = " in result.stdout
    out = tmp_path / "generated"
    write_fake_outputs(toy_world, out)
    result = run("p1_eval.py", "--device", "cpu", "score", str(out), "--evaluator",
                 str(tmp_path / p1_eval.EVALUATOR_NAME))
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.strip().splitlines()
    assert lines[0].startswith("MNIST-M acc = 0.") and "(correct/total = " in lines[0] and lines[0].endswith("/30)")
    assert lines[1].startswith("SVHN acc = ") and lines[2].startswith("acc = ")
    accs = [float(line.split("=")[1].split()[0]) for line in lines[:2]]
    assert float(lines[2].split("=")[1]) == pytest.approx(sum(accs) / 2, abs=1e-4)


def test_lenet_scores_and_bad_files(toy_world, tmp_path):
    torch.manual_seed(0)
    lenet = p1_eval.LeNet()
    assert lenet(torch.zeros(2, 3, 28, 28)).shape == (2, 10)
    path = tmp_path / "Classifier.pth"
    torch.save({"state_dict": lenet.state_dict()}, path)
    loaded = p1_eval.load_lenet(path)
    x = torch.randn(4, 3, 28, 28)
    torch.testing.assert_close(loaded(x), lenet(x))
    torch.save({"weights": lenet.state_dict()}, tmp_path / "wrong.pth")
    with pytest.raises(Hw2Error, match="not the course's LeNet"):
        p1_eval.load_lenet(tmp_path / "wrong.pth")
    images = torch.rand(5, 3, 28, 28) * 2 - 1
    folder = tmp_path / "gen" / "mnistm"
    for i, image in enumerate(images):
        save_png(image, folder / p1_inference.image_name(i, 1))
    read, labels = p1_eval.read_generated(folder)
    assert labels.tolist() == [0, 1, 2, 3, 4] and read.shape == (5, 3, 28, 28)
    (folder / "notes.txt").write_text("x")
    with pytest.raises(Hw2Error, match="must start with its digit"):
        p1_eval.read_generated(folder)


@pytest.mark.slow
def test_evaluator_scores_at_least_096_on_toy_val(toy_world, tmp_path):
    result = run("p1_eval.py", "--device", "cpu", "train", "--data", str(toy_world / "digits"), "--out",
                 str(tmp_path))
    assert result.returncode == 0, result.stderr[-2000:]
    accs = [float(line.split("= ")[1].split()[0]) for line in result.stdout.splitlines() if "held-out" in line]
    assert len(accs) == 2 and min(accs) >= 0.96, result.stdout


# ------------------------------------------------------------------------------------------------ benchmark


def test_benchmark_runs_end_to_end(toy_world, tiny_checkpoint, tmp_path, one_torch_thread):
    """benchmarks/p1_bench.py on the tiny checkpoint: every section runs and the report lists what was asked."""
    torch.manual_seed(0)
    evaluator = tmp_path / "evaluator.safetensors"
    save_checkpoint(evaluator, {"config": asdict(p1_eval.ClassifierConfig()),
                                "model": p1_eval.DigitClassifier(p1_eval.ClassifierConfig()).state_dict()})
    report = tmp_path / "bench.md"
    text = p1_bench.main(["--ckpt", str(tiny_checkpoint), "--data", str(toy_world / "digits"), "--evaluator",
                          str(evaluator), "--train-images", "8", "--batch-size", "4", "--train-steps", "1",
                          "--train-repeats", "1", "--speed-images", "1", "--runs", "ddim:2:0:1,ddim:2:5:1",
                          "--report", str(report), "--device", "cpu"])
    assert report.read_text() == text
    assert "fp32" in text and "images/s" in text
    for row in ("| DDPM-1000 (guided, w = 5.0) |", "| DDIM-25 (guided, w = 5.0) |", "| DDIM-2 | 0 | 10 |",
                "| DDIM-2 | 5 | 10 |"):
        assert row in text

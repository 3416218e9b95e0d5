"""P1 end to end on the toy world, as a student runs it: train, sample the grader's 1,000 images, score them."""

import os
import subprocess
import sys

import pytest
from conftest import REPO

ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def run(*args):
    result = subprocess.run([sys.executable, *[str(a) for a in args]], cwd=REPO, env=ENV, capture_output=True,
                            text=True)
    assert result.returncode == 0, f"{args[0]}: {result.stderr[-2000:]}"
    return result.stdout


@pytest.mark.slow
def test_train_sample_and_score(toy_world, tmp_path):
    """A few epochs of the toy preset already draw the requested digits far above chance (0.1) under guidance:
    fails if the digit label does not reach the network, guidance points away from the label, the sampler or the
    images are scrambled, or the grader's file names do not match the digits drawn."""
    digits, ckpt = toy_world / "digits", tmp_path / "p1"
    run("p1_train.py", "--data", digits, "--out", ckpt, "--epochs", "3", "--grid-every", "0", "--device", "cpu")
    run("p1_eval.py", "--device", "cpu", "train", "--data", digits, "--out", tmp_path / "evaluator", "--epochs", "2")
    run("p1_inference.py", tmp_path / "out", "--ckpt", ckpt / "ddpm.safetensors", "--steps", "10", "--device", "cpu")
    scores = run("p1_eval.py", "--device", "cpu", "score", tmp_path / "out", "--evaluator",
                 tmp_path / "evaluator" / "evaluator.safetensors")
    accuracies = {line.split(" acc = ")[0]: float(line.split("= ")[1].split()[0])
                  for line in scores.splitlines() if " acc = " in line}
    assert sorted(accuracies) == ["MNIST-M", "SVHN"] and min(accuracies.values()) >= 0.3, scores

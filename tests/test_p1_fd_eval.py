"""FD_eval of `p1_eval.py score`: the Fréchet distance against closed forms and scipy's matrix square root.

    python -m pytest -q tests/test_p1_fd_eval.py
"""

import math

import numpy as np
import pytest
import scipy.linalg
import torch

import p1_eval
from utils import Hw2Error


def with_moments(mean, cov, n, seed=0):
    """n points [n, D] whose sample mean and sample covariance (n - 1 denominator) are exactly `mean` and `cov`."""
    z = torch.randn(n, len(mean), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    z = z - z.mean(0)
    z = z @ torch.linalg.inv(torch.linalg.cholesky(torch.cov(z.T))).T  # sample covariance I
    return z @ torch.linalg.cholesky(cov).T + mean


def test_frechet_distance_matches_the_2x2_closed_form():
    """For 2x2 PSD M, Tr(M^(1/2)) = sqrt(Tr M + 2 sqrt(det M)), so with M = S_a S_b (not symmetric: S_a and S_b do
    not commute) the Fréchet distance has a closed form. A missing factor 2, an element-wise square root or the
    trace of the square root of a sum would all miss it."""
    cov_a = torch.tensor([[2.0, 0.8], [0.8, 1.0]], dtype=torch.float64)
    cov_b = torch.tensor([[0.5, -0.3], [-0.3, 1.5]], dtype=torch.float64)
    mean_a, mean_b = torch.tensor([1.0, -2.0], dtype=torch.float64), torch.tensor([0.5, 0.5], dtype=torch.float64)
    product = cov_a @ cov_b
    root_trace = math.sqrt(float(product.trace()) + 2 * math.sqrt(float(torch.det(product))))
    expected = float((mean_a - mean_b).square().sum() + cov_a.trace() + cov_b.trace()) - 2 * root_trace
    got = p1_eval.frechet_distance(with_moments(mean_a, cov_a, 40), with_moments(mean_b, cov_b, 60, seed=1))
    assert got == pytest.approx(expected, rel=1e-9), f"FD {got}, closed form {expected}"


def test_frechet_distance_matches_scipys_sqrtm_on_random_features():
    """pytorch-fid's formula with scipy.linalg.sqrtm and numpy's sample covariance (ddof 1) on 30 points in 8
    dimensions, where the ddof and the mean term both matter."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(30, 8, generator=generator, dtype=torch.float64)
    mixing = torch.rand(8, 8, generator=generator, dtype=torch.float64)
    b = torch.randn(30, 8, generator=generator, dtype=torch.float64) @ mixing + 0.3
    mu_a, mu_b, cov_a, cov_b = a.numpy().mean(0), b.numpy().mean(0), np.cov(a.numpy().T), np.cov(b.numpy().T)
    root = scipy.linalg.sqrtm(cov_a @ cov_b).real
    expected = float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(root))
    assert p1_eval.frechet_distance(a, b) == pytest.approx(expected, rel=1e-7)
    assert p1_eval.frechet_distance(b, a) == pytest.approx(expected, rel=1e-7)


def test_frechet_distance_is_zero_for_equal_sets_and_finite_with_dead_units():
    """Dead ReLU units give a singular covariance; the distance must stay finite and count only the live units."""
    a = torch.randn(50, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    b = torch.randn(50, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert abs(p1_eval.frechet_distance(a, a)) < 1e-9
    dead = torch.zeros(50, 3, dtype=torch.float64)
    live = p1_eval.frechet_distance(a, b)
    assert p1_eval.frechet_distance(torch.cat([a, dead], 1), torch.cat([b, dead], 1)) == pytest.approx(live, rel=1e-9)


def test_fd_eval_compares_with_the_reference_half_and_the_floor_uses_as_many_images():
    """A one-layer stand-in evaluator: FD_eval is FD(generated, reference half), the floor FD(other half cut to the
    generated count, reference half); a collapsed set (one image repeated) scores far above the floor."""
    model = p1_eval.DigitClassifier(p1_eval.ClassifierConfig(widths=(4, 4), hidden=8)).eval()
    generator = torch.Generator().manual_seed(0)
    real = torch.rand(400, 3, 28, 28, generator=generator) * 2 - 1
    features = p1_eval.penultimate_features(model, real)
    halves = (features[:200], features[200:])
    fd, floor = p1_eval.fd_eval(model, real[:100], halves)
    assert fd == pytest.approx(p1_eval.frechet_distance(features[:100], features[:200]))
    assert floor == pytest.approx(p1_eval.frechet_distance(features[200:300], features[:200]))
    collapsed, _ = p1_eval.fd_eval(model, real[300:301].repeat(100, 1, 1, 1), halves)
    assert collapsed > 3 * floor, f"one repeated image: FD {collapsed:.4f}, floor {floor:.4f}"


def test_a_missing_data_folder_is_refused_before_scoring(tmp_path):
    with pytest.raises(Hw2Error, match="--data .*nope is not a folder"):
        p1_eval.main(["--device", "cpu", "score", str(tmp_path), "--data", str(tmp_path / "nope")])

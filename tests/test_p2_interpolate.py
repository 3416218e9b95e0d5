"""slerp against closed forms (endpoints, norm, angle, clamping, parallel fallback) and linear interpolation."""

import math

import numpy as np
import pytest
import torch

import p2_interpolate
from p2_interpolate import ALPHAS, clamped_cosine, lerp, slerp


def orthogonal_pair(norm=3.0):
    x0 = torch.zeros(1, 3, 4, 4)
    x1 = torch.zeros(1, 3, 4, 4)
    x0[0, 0, 0, 0] = norm
    x1[0, 1, 2, 3] = norm
    return x0, x1


def closed_form_slerp(x0, x1, alpha):
    """Shoemake's formula in numpy float64, for comparison."""
    v0, v1 = x0.double().numpy().ravel(), x1.double().numpy().ravel()
    theta = np.arccos(v0 @ v1 / (np.linalg.norm(v0) * np.linalg.norm(v1)))
    return (np.sin((1 - alpha) * theta) * v0 + np.sin(alpha * theta) * v1) / np.sin(theta)


def test_the_script_samples_alpha_0_to_1_in_tenths_by_both_methods(toy_world, tmp_path, monkeypatch):
    """main() hands the sampler 11 noises per method: slerp and lerp of 00.pt, 01.pt at alpha = k / 10, in order."""
    sampled = {}

    def record(model, noises, *args, desc, **kwargs):
        sampled[desc] = noises.clone()
        return noises

    monkeypatch.setattr(p2_interpolate, "sample_all", record)
    face = toy_world / "face"
    p2_interpolate.main([str(face / "noise"), str(tmp_path / "out"), str(face / "UNet.pt"), "--device", "cpu"])
    x0, x1 = (torch.load(face / "noise" / name, weights_only=True) for name in ("00.pt", "01.pt"))
    assert sorted(sampled) == ["linear", "slerp"] and all(len(noises) == 11 for noises in sampled.values())
    for k in range(11):
        expected = closed_form_slerp(x0, x1, k / 10)
        np.testing.assert_allclose(sampled["slerp"][k].double().numpy().ravel(), expected, rtol=1e-5, atol=1e-5,
                                   err_msg=f"slerp frame {k}")
        torch.testing.assert_close(sampled["linear"][k], (1 - k / 10) * x0[0] + k / 10 * x1[0])
    assert sorted(p.name for p in (tmp_path / "out" / "slerp").iterdir()) == [f"{k:02d}.png" for k in range(11)]


def test_endpoints_are_exact():
    generator = torch.Generator().manual_seed(0)
    x0, x1 = torch.randn(1, 3, 32, 32, generator=generator), torch.randn(1, 3, 32, 32, generator=generator)
    assert torch.equal(slerp(x0, x1, 0.0), x0)
    assert torch.equal(slerp(x0, x1, 1.0), x1)


@pytest.mark.parametrize("alpha", ALPHAS)
def test_orthogonal_equal_norm_inputs_keep_their_norm_and_turn_evenly(alpha):
    x0, x1 = orthogonal_pair()
    x = slerp(x0, x1, alpha)
    assert float(x.norm()) == pytest.approx(3.0, rel=1e-6)
    # on the quarter circle, the point at alpha is at angle alpha * pi / 2: (cos, sin) of it
    assert float(x[0, 0, 0, 0]) == pytest.approx(3.0 * math.cos(alpha * math.pi / 2), abs=1e-6)
    assert float(x[0, 1, 2, 3]) == pytest.approx(3.0 * math.sin(alpha * math.pi / 2), abs=1e-6)


def test_linear_interpolation_shrinks_the_midpoint_of_orthogonal_inputs():
    x0, x1 = orthogonal_pair()
    assert float(lerp(x0, x1, 0.5).norm()) == pytest.approx(3.0 / math.sqrt(2), rel=1e-6)


def test_cosine_is_clamped_to_minus_one_one():
    """For x = y, <x, y> / (|x| |y|) rounds to 1 +- a few ulp depending on the vector (and on the machine's BLAS);
    among 120 random vectors some step above 1, where math.acos raises. Clamped, those give exactly 1 (and -1)."""
    candidates = [torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(seed))
                  for size in (4, 7, 32) for seed in range(40)]
    raw = [float((v @ v) / (v.norm() * v.norm())) for v in (x.double().flatten() for x in candidates)]
    assert max(raw) > 1.0, f"no candidate rounds above 1 (largest {max(raw)!r}): the clamp is not exercised"
    for x, unclamped in zip(candidates, raw):
        same, opposite = clamped_cosine(x, x), clamped_cosine(x, -x)
        assert -1.0 <= opposite <= -1 + 1e-12 and 1 - 1e-12 <= same <= 1.0, (unclamped, same, opposite)
        if unclamped > 1.0:
            assert same == 1.0 and opposite == -1.0, (unclamped, same, opposite)
        for alpha in ALPHAS:
            assert torch.isfinite(slerp(x, x, alpha)).all() and torch.isfinite(slerp(x, -x, alpha)).all()
    assert clamped_cosine(torch.zeros_like(candidates[0]), candidates[0]) == 1.0


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_near_parallel_inputs_fall_back_to_linear(sign):
    x0 = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    x1 = sign * 2 * x0 + 1e-6 * torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    for alpha in ALPHAS:
        x = slerp(x0, x1, alpha)
        assert torch.isfinite(x).all()
        torch.testing.assert_close(x, lerp(x0, x1, alpha))


def test_zero_input_falls_back_to_linear():
    x1 = torch.ones(1, 3, 4, 4)
    torch.testing.assert_close(slerp(torch.zeros_like(x1), x1, 0.3), 0.3 * x1)

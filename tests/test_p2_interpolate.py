"""slerp against closed forms (endpoints, norm, angle, clamping, parallel fallback) and linear interpolation."""

import math

import pytest
import torch

from p2_interpolate import ALPHAS, clamped_cosine, lerp, slerp


def orthogonal_pair(norm=3.0):
    x0 = torch.zeros(1, 3, 4, 4)
    x1 = torch.zeros(1, 3, 4, 4)
    x0[0, 0, 0, 0] = norm
    x1[0, 1, 2, 3] = norm
    return x0, x1


def test_alphas_are_0_to_1_in_tenths():
    assert ALPHAS == pytest.approx([i / 10 for i in range(11)]) and ALPHAS[0] == 0.0 and ALPHAS[-1] == 1.0


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
    x = torch.full((1, 3, 7, 7), 0.1)
    v = x.double().flatten()
    assert float((v @ v) / (v.norm() * v.norm())) > 1.0  # rounding: math.acos of this raises
    assert clamped_cosine(x, x) == 1.0 and clamped_cosine(x, -x) == -1.0
    assert clamped_cosine(torch.zeros_like(x), x) == 1.0
    for alpha in ALPHAS:
        assert torch.isfinite(slerp(x, x, alpha)).all() and torch.isfinite(slerp(x, -x, alpha)).all()


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

"""P1's sampling entry points: the clipping policy of `run_sampler`, DDPM's full loop, guidance's timesteps.

The single steps are checked against diffusers in test_p1_model.py; these tests check that the loops hand each
step what the documentation says (prediction type, clipping, timesteps, seeded noise).
"""

import pytest
import torch

import p1_model as pm
from ddim import ddim_step, ddim_timesteps

T = 40  # a short schedule keeps DDPM's full loop quick


def schedule():
    betas = pm.make_betas(pm.P1Config(schedule="cosine", timesteps=T))
    return betas, pm.alpha_bar_from_betas(betas)


def denoiser(x, t):
    """A fixed stand-in network that depends on x and t, large enough that clipping x0_pred matters."""
    return 3 * torch.tanh(x + 0.3) + t.to(x.dtype).reshape(-1, 1, 1, 1) / T


def x_T():
    return torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))


def generator():
    return torch.Generator().manual_seed(1)


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_ddim_clips_x0_for_eps_prediction_only(prediction):
    """Fails if the clipping policy is inverted or dropped, or the prediction type is not passed on."""
    betas, alpha_bar = schedule()
    ours = pm.final(pm.run_sampler(denoiser, x_T(), betas, alpha_bar, prediction, "ddim", 5, 0.5, generator()))
    clip = prediction == "eps"
    expected = pm.final(pm.ddim_sample(denoiser, x_T(), alpha_bar, prediction, 5, 0.5, generator(), clip=clip))
    other = pm.final(pm.ddim_sample(denoiser, x_T(), alpha_bar, prediction, 5, 0.5, generator(), clip=not clip))
    assert torch.equal(ours, expected) and not torch.allclose(ours, other)


@pytest.mark.parametrize("prediction, clip", [("eps", True), ("v", True), ("v", False)])
def test_ddpm_runs_every_step_with_its_prediction_and_clipping(prediction, clip):
    """DDPM's loop is ddpm_step at t = T-1 ... 0 with fresh noise from the generator at every t > 0; fails if the
    prediction type or the clipping flag is not passed on, or a timestep is skipped or repeated."""
    betas, alpha_bar = schedule()
    ours = pm.final(pm.ddpm_sample(denoiser, x_T(), betas, alpha_bar, prediction, generator(), clip=clip))
    x, g = x_T(), generator()
    for t in reversed(range(T)):
        noise = torch.randn(x.shape, generator=g) if t > 0 else None
        x = pm.ddpm_step(denoiser(x, torch.full((2,), t)), x, t, betas, alpha_bar, noise, prediction, clip)
    torch.testing.assert_close(ours, x, atol=0, rtol=0)
    if clip:  # run_sampler's DDPM clips, whatever the prediction type
        via_run_sampler = pm.run_sampler(denoiser, x_T(), betas, alpha_bar, prediction, "ddpm", generator=generator())
        assert torch.equal(pm.final(via_run_sampler), ours)


def test_run_sampler_accepts_eta_from_0_to_1_only():
    betas, alpha_bar = schedule()
    for eta in (0.0, 1.0):
        assert pm.final(pm.run_sampler(denoiser, x_T(), betas, alpha_bar, "eps", "ddim", 2, eta, generator())) \
            is not None
    for eta in (-0.01, 1.01):
        with pytest.raises(ValueError, match="eta must be between 0 and 1"):
            pm.run_sampler(denoiser, x_T(), betas, alpha_bar, "eps", "ddim", 2, eta)


def test_guidance_passes_each_branch_its_timesteps():
    """With a network that depends on t, the guided output is (1 + w) f(x, t, digit) - w f(x, t, null), each term
    at the batch's own t; fails if the doubled batch gets no or other timesteps."""
    def net(x, t, digit, dataset):
        return x + t.to(x.dtype).reshape(-1, 1, 1, 1) * 0.1 + (digit + 2 * dataset).to(x.dtype).reshape(-1, 1, 1, 1)

    x, t = torch.randn(3, 3, 2, 2), torch.tensor([4, 17, 30])
    digit, dataset = torch.tensor([1, 2, 3]), torch.tensor([0, 1, 0])
    null = torch.full_like(digit, pm.NULL_DIGIT)
    expected = 4 * net(x, t, digit, dataset) - 3 * net(x, t, null, dataset)
    torch.testing.assert_close(pm.guided_output(net, x, t, digit, dataset, 3.0), expected)
    torch.testing.assert_close(pm.guided_output(net, x, t, digit, dataset, 0.0), net(x, t, digit, dataset))


def test_the_defaults_are_the_documented_ones():
    """Course betas 1e-4..0.02; a config's own beta_end is used; DDIM defaults to eta = 0 with clipping, and
    run_sampler to DDIM-50; fails on a changed default."""
    torch.testing.assert_close(pm.linear_beta_schedule(1000), torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64))
    assert pm.make_betas(pm.P1Config(beta_end=0.03))[-1].item() == pytest.approx(0.03)
    betas, alpha_bar = schedule()
    explicit = pm.ddim_sample(denoiser, x_T(), alpha_bar, "eps", 4, eta=0.0, clip=True)
    assert torch.equal(pm.final(pm.ddim_sample(denoiser, x_T(), alpha_bar, "eps", 4)), pm.final(explicit))
    betas = pm.make_betas(pm.P1Config(schedule="cosine"))
    alpha_bar = pm.alpha_bar_from_betas(betas)
    steps = [t for t, _ in pm.run_sampler(denoiser, x_T(), betas, alpha_bar, "v")]
    assert len(steps) == 51 and steps == [t for t, _ in pm.ddim_sample(denoiser, x_T(), alpha_bar, "v", 50)]
    deterministic = pm.ddim_sample(denoiser, x_T(), alpha_bar, "v", 50, eta=0.0, clip=False)
    assert torch.equal(pm.final(pm.run_sampler(denoiser, x_T(), betas, alpha_bar, "v")), pm.final(deterministic))
    x = x_T()  # ddpm_step clips x0_pred unless told otherwise
    betas, alpha_bar = schedule()
    out = denoiser(x, torch.full((2,), 10))
    clipped = pm.ddpm_step(out, x, 10, betas, alpha_bar, x, "eps", clip=True)
    assert torch.equal(pm.ddpm_step(out, x, 10, betas, alpha_bar, x, "eps"), clipped)


def test_ddim_defaults_are_leading_spacing_and_eta_zero():
    """ddim_timesteps defaults to diffusers' "leading" spacing and ddim_step to deterministic DDIM (eta = 0)."""
    assert ddim_timesteps(1000, 4) == [750, 500, 250, 0]
    with pytest.raises(ValueError, match="spacing must be 'leading' or 'trailing', got 'middle'"):
        ddim_timesteps(1000, 4, "middle")
    x0, eps = torch.ones(2), torch.full((2,), 0.5)
    torch.testing.assert_close(ddim_step(x0, eps, 0.5, 0.8), 0.8**0.5 * x0 + 0.2**0.5 * eps)

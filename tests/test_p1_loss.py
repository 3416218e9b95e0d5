"""P1's training objective against diffusers' DDPMScheduler and Hang et al.'s min-SNR weights, with a stub network.

The stub sees what `diffusion_loss` feeds the network (x_t, t, labels), recovers the noise from x_t with diffusers'
alpha_bar and returns diffusers' own target (eps, or `get_velocity`'s v) plus a known offset delta per image. The
loss must then be mean_i(w_i * delta_i^2) with w_i the min-SNR weight of image i's timestep: 0 for the exact target.
"""

import pytest
import torch
from diffusers import DDPMScheduler

import p1_model as pm

DIFFUSERS = {"linear": "linear", "cosine": "squaredcos_cap_v2"}
BATCH = 64


def diffusers_scheduler(config):
    return DDPMScheduler(num_train_timesteps=config.timesteps, beta_start=config.beta_start, beta_end=config.beta_end,
                         beta_schedule=DIFFUSERS[config.schedule],
                         prediction_type={"eps": "epsilon", "v": "v_prediction"}[config.prediction])


class StubNetwork:
    """Returns diffusers' training target for the x_t it is given, plus delta[i] on image i; records its inputs."""

    def __init__(self, x0, config, delta):
        self.x0, self.config, self.delta = x0, config, delta
        self.sched = diffusers_scheduler(config)
        self.calls = []

    def __call__(self, x_t, t, digit, dataset):
        self.calls.append((x_t, t, digit, dataset))
        a = self.sched.alphas_cumprod.double()[t].reshape(-1, 1, 1, 1)
        eps = (x_t.double() - a.sqrt() * self.x0) / (1 - a).sqrt()
        if self.config.prediction == "eps":
            target = eps
        else:
            target = self.sched.get_velocity(self.x0, eps, t)
        return (target + self.delta.reshape(-1, 1, 1, 1)).float()


def min_snr_weight(alpha_bar, prediction, gamma):
    """Hang et al. 2023, eq. 7 and sec. 3.4: min(SNR, gamma) / SNR for eps, min(SNR, gamma) / (SNR + 1) for v."""
    snr = alpha_bar / (1 - alpha_bar)
    if gamma == 0:
        return torch.ones_like(snr)
    return torch.minimum(snr, torch.tensor(gamma, dtype=snr.dtype)) / (snr if prediction == "eps" else snr + 1)


def run_loss(config, delta, seed=0, global_seed=0):
    torch.manual_seed(global_seed)  # the global RNG, which the loss must not use
    generator = torch.Generator().manual_seed(seed)
    x0 = torch.rand(BATCH, 3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(7)) * 2 - 1
    digit, dataset = torch.arange(BATCH) % 10, torch.arange(BATCH) % 2
    net = StubNetwork(x0, config, delta)
    loss = pm.diffusion_loss(net, x0, digit, dataset, config, pm.alpha_bar_from_betas(pm.make_betas(config)),
                             generator)
    return loss, net


# gamma 1 and 2: min-SNR also for gammas at or below 1 (only gamma = 0 means plain MSE)
CASES = [("cosine", "v", 5.0), ("cosine", "eps", 5.0), ("linear", "eps", 0.0), ("linear", "v", 2.0),
         ("cosine", "eps", 1.0)]


@pytest.mark.parametrize("schedule, prediction, gamma", CASES)
def test_the_exact_target_gives_zero_loss(schedule, prediction, gamma):
    """Fails if the eps and v targets are swapped, or v's sign or its sqrt(alpha_bar) / sqrt(1 - alpha_bar) are
    exchanged, or x_t is not q(x_t | x_0) (the stub's recovered noise would then not be the loss's)."""
    config = pm.P1Config(schedule=schedule, prediction=prediction, min_snr_gamma=gamma)
    loss, net = run_loss(config, torch.zeros(BATCH))
    assert loss.item() == pytest.approx(0.0, abs=1e-8), f"{prediction} target, loss {loss.item()}"
    assert len(net.calls) == 1


@pytest.mark.parametrize("schedule, prediction, gamma", CASES)
def test_an_offset_gives_the_min_snr_weighted_mean_of_its_square(schedule, prediction, gamma):
    """Fails if the min-SNR weight is dropped, uses SNR where v needs SNR + 1, is not clamped at gamma, or the loss
    is a plain mean over the batch of unweighted squares, or the per-image mean is taken over the wrong axes."""
    config = pm.P1Config(schedule=schedule, prediction=prediction, min_snr_gamma=gamma)
    delta = torch.linspace(-0.5, 1.5, BATCH, dtype=torch.float64)
    loss, net = run_loss(config, delta)
    t = net.calls[0][1]
    weights = min_snr_weight(net.sched.alphas_cumprod.double()[t], prediction, gamma)
    expected = (weights * delta**2).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4), f"weights {weights[:4]}..."
    if gamma > 0:
        assert not torch.allclose(weights, torch.ones_like(weights)), "the draw should cover SNRs on both sides"


def test_timesteps_noise_and_label_dropout_are_drawn_as_documented():
    """t covers 0..T-1 uniformly (not 1..T), labels are nulled independently with p = label_dropout, and the same
    generator seed gives the same loss; fails on an off-by-one in randint or a dropout applied to both labels."""
    config = pm.P1Config(schedule="cosine", prediction="v", min_snr_gamma=5.0, timesteps=8, label_dropout=0.5)
    delta = torch.ones(BATCH)
    draws = [run_loss(config, delta, seed) for seed in range(12)]
    t = torch.cat([net.calls[0][1] for _, net in draws])
    assert set(t.tolist()) == set(range(8)), f"timesteps drawn {sorted(set(t.tolist()))}"
    digits = torch.cat([net.calls[0][2] for _, net in draws])
    datasets = torch.cat([net.calls[0][3] for _, net in draws])
    assert 0.35 < (digits == pm.NULL_DIGIT).float().mean() < 0.65
    assert 0.35 < (datasets == pm.NULL_DATASET).float().mean() < 0.65
    both = ((digits == pm.NULL_DIGIT) & (datasets == pm.NULL_DATASET)).float().mean()
    assert 0.1 < both < 0.4, f"both labels nulled together {both:.2f} of the time, independent draws give 0.25"
    again, net = run_loss(config, delta, seed=3, global_seed=123)  # every draw must come from `generator`
    assert again.item() == draws[3][0].item()
    for recorded, first in zip(net.calls[0], draws[3][1].calls[0]):
        assert torch.equal(recorded, first), "x_t, timesteps or dropped labels follow the global RNG"

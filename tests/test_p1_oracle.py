"""P1's samplers driven by the exact denoiser of Gaussian data: every (schedule, prediction, sampler) P1 allows.

For data x0 ~ N(mu, s^2 I), x_t = sqrt(a) x0 + sqrt(1 - a) eps is Gaussian and the ideal network outputs are
closed forms (a = alpha_bar_t, c = a s^2 + 1 - a):

    E[eps | x_t] = sqrt(1 - a) (x_t - sqrt(a) mu) / c        E[x0 | x_t] = mu + sqrt(a) s^2 (x_t - sqrt(a) mu) / c
    E[v | x_t]   = sqrt(a) E[eps | x_t] - sqrt(1 - a) E[x0 | x_t]

Driven by them, every sampler step is affine in x_t plus Gaussian noise, so the mean and variance of its output
follow exactly from a scalar recursion over the paper's step (DDPM eqs. 6-7; DDIM eqs. 12 and 16) on
diffusers' timesteps. The mean is mu exactly. The variance is not s^2 exactly: DDIM is a first-order solver and
DDPM uses the posterior variance beta_tilde, so with s = 0.25 DDIM-50 ends 10-30 % low (diffusers' own
DDIMScheduler gives the same), DDPM-1000 a few percent low. The samples must match those exact moments within
sampling error; a wrong coefficient, timestep, clipping rule or noise scale moves them by many standard errors.

The high-order solvers (DPM-Solver++ 2M, UniPC) are deterministic: they integrate the probability-flow ODE, whose
exact solution maps x_T to mu + s (x_T - sqrt(a_T) mu) / sqrt(c_T) (a_T = alpha_bar at t = T - 1), so their samples
must have that map's mean and variance s^2 / c_T, up to the solver's own error (at 100 steps, under 2 % of the
variance) and sampling error.
"""

import math

import pytest
import torch
from diffusers import DDIMScheduler

import p1_model as pm
from p1_solvers import solver_sample

MU, S = 0.1, 0.25  # data N(0.1, 0.25^2): beyond +-1 only 3.6 sigma out, so clipping x0 to [-1, 1] costs nothing
SAMPLES = 40_000  # independent scalars (shape [N, 1, 1, 1]) in float32, as at inference
SAMPLERS = [("ddpm", 1000, 0.0), ("ddim", 50, 0.0), ("ddim", 50, 1.0)]
SOLVERS = [("dpmpp", 100), ("unipc", 100)]
SOLVER_VARIANCE_ERROR = 0.03  # relative; measured 0.5-1.5 % at 100 steps, DDIM-100 is 5-11 % low


def schedule_of(name):
    betas = pm.make_betas(pm.P1Config(schedule=name))
    return betas, pm.alpha_bar_from_betas(betas)


def oracle(alpha_bar, prediction, error=0.0):
    """The exact denoiser of N(MU, S^2) data for array indices t; `error` is added to it (an imperfect network)."""
    def denoise(x_t, t):
        a = alpha_bar[t].to(x_t.dtype).reshape(-1, 1, 1, 1)
        c = a * S**2 + 1 - a
        eps = (1 - a).sqrt() * (x_t - a.sqrt() * MU) / c
        x0 = MU + a.sqrt() * S**2 * (x_t - a.sqrt() * MU) / c
        return (eps if prediction == "eps" else a.sqrt() * eps - (1 - a).sqrt() * x0) + error
    return denoise


def exact_moments(sampler, steps, eta, betas, alpha_bar):
    """Mean and variance of the sampler's output per coordinate, from x_T ~ N(0, 1), by the affine recursion.

    At level a, E[x0 | x] = p x + q and E[eps | x] = r x + u; a step maps x -> A x + B + sigma z, hence
    m -> A m + B and v -> A^2 v + sigma^2.
    """
    m, v = 0.0, 1.0
    if sampler == "ddpm":
        pairs = [(t, t - 1) for t in reversed(range(len(betas)))]
    else:
        scheduler = DDIMScheduler(num_train_timesteps=len(betas), timestep_spacing="trailing")
        scheduler.set_timesteps(steps)
        sequence = scheduler.timesteps.tolist()
        pairs = list(zip(sequence, sequence[1:] + [-1]))
    for t, t_prev in pairs:
        a, a_prev = float(alpha_bar[t]), float(alpha_bar[t_prev]) if t_prev >= 0 else 1.0
        c = a * S**2 + 1 - a
        p, r = math.sqrt(a) * S**2 / c, math.sqrt(1 - a) / c
        q, u = MU - p * math.sqrt(a) * MU, -r * math.sqrt(a) * MU
        if sampler == "ddpm":  # posterior mean k1 x0 + k2 x_t, variance beta_tilde (DDPM eqs. 6-7)
            beta = float(betas[t])
            k1, k2 = beta * math.sqrt(a_prev) / (1 - a), (1 - a_prev) * math.sqrt(1 - beta) / (1 - a)
            A, B, variance = k1 * p + k2, k1 * q, beta * (1 - a_prev) / (1 - a)
        else:  # sqrt(a_prev) x0 + sqrt(1 - a_prev - sigma^2) eps + sigma z, sigma from eq. 16
            variance = eta**2 * (1 - a_prev) / (1 - a) * (1 - a / a_prev)
            d = math.sqrt(max(0.0, 1 - a_prev - variance))
            A, B = math.sqrt(a_prev) * p + d * r, math.sqrt(a_prev) * q + d * u
        m, v = A * m + B, A * A * v + variance
    return m, v


def sample(denoise, sampler, steps, eta, betas, alpha_bar, prediction, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x_T = torch.randn(SAMPLES, 1, 1, 1, generator=generator)
    return pm.final(pm.run_sampler(denoise, x_T, betas, alpha_bar, prediction, sampler, steps, eta, generator))


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("sampler,steps,eta", SAMPLERS)
def test_the_oracle_samples_the_data_distribution(schedule, prediction, sampler, steps, eta, one_torch_thread):
    betas, alpha_bar = schedule_of(schedule)
    x = sample(oracle(alpha_bar, prediction), sampler, steps, eta, betas, alpha_bar, prediction)
    mean, var = float(x.mean()), float(x.var())
    m, v = exact_moments(sampler, steps, eta, betas, alpha_bar)
    mean_se, var_se = math.sqrt(v / SAMPLES), v * math.sqrt(2 / (SAMPLES - 1))
    label = f"{schedule}/{prediction}/{sampler.upper()}-{steps} eta {eta}"
    assert abs(m - MU) < 1e-3, f"{label}: the recursion's mean {m:.5f} should be mu = {MU}"
    assert 0.6 * S**2 < v <= S**2, f"{label}: the recursion's variance {v:.5f} vs s^2 = {S**2}"
    assert abs(mean - MU) < 5 * mean_se, f"{label}: sample mean {mean:.5f}, mu = {MU}, standard error {mean_se:.5f}"
    assert abs(var - v) < 5 * var_se, (f"{label}: sample variance {var:.5f}, exact {v:.5f} for this sampler "
                                       f"(s^2 = {S**2}), standard error {var_se:.5f}")


def ode_moments(alpha_bar):
    """Mean and variance of the exact probability-flow ODE map from x_T ~ N(0, 1) at t = T - 1 to x_0."""
    a = float(alpha_bar[-1])
    c = a * S**2 + 1 - a
    return MU - S * math.sqrt(a) * MU / math.sqrt(c), S**2 / c


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("sampler,steps", SOLVERS)
def test_the_oracle_solvers_sample_the_data_distribution(schedule, prediction, sampler, steps, one_torch_thread):
    betas, alpha_bar = schedule_of(schedule)
    x = sample(oracle(alpha_bar, prediction), sampler, steps, 0.0, betas, alpha_bar, prediction)
    mean, var = float(x.mean()), float(x.var())
    m, v = ode_moments(alpha_bar)
    mean_se, var_se = math.sqrt(v / SAMPLES), v * math.sqrt(2 / (SAMPLES - 1))
    label = f"{schedule}/{prediction}/{sampler}-{steps}"
    assert abs(mean - m) < 5 * mean_se, f"{label}: sample mean {mean:.5f}, exact {m:.5f}, standard error {mean_se:.5f}"
    assert abs(var - v) < 5 * var_se + SOLVER_VARIANCE_ERROR * v, \
        f"{label}: sample variance {var:.5f}, the ODE's {v:.5f}, standard error {var_se:.5f}"


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp", "unipc"])
def test_clipping_keeps_cosine_eps_sampling_sane_for_an_imperfect_network(sampler, one_torch_thread):
    """At the cosine schedule's first trailing step alpha_bar = 2.4e-9: an eps error of 0.01 becomes an x0 error
    of 0.01 / sqrt(alpha_bar) = 200 unless x0 is clipped. P1 clips (DDIM re-derives eps; the solvers clamp their
    x_0 prediction by diffusers' thresholding) and stays within 0.05 of the data's moments; unclipped, the samples'
    mean is off by more than 0.5 (ten times the tolerance)."""
    betas, alpha_bar = schedule_of("cosine")
    denoise = oracle(alpha_bar, "eps", error=0.01)
    clipped = sample(denoise, sampler, 50, 0.0, betas, alpha_bar, "eps")
    assert abs(float(clipped.mean()) - MU) < 0.05 and abs(float(clipped.std()) - S) < 0.05, \
        f"clipped: mean {float(clipped.mean()):.3f}, std {float(clipped.std()):.3f}; data N({MU}, {S}^2)"
    x_T = torch.randn(SAMPLES, 1, 1, 1, generator=torch.Generator().manual_seed(0))
    if sampler == "ddim":
        unclipped = pm.final(pm.ddim_sample(denoise, x_T, alpha_bar, "eps", 50, clip=False))
    else:
        unclipped = pm.final(solver_sample(denoise, x_T, betas, "eps", sampler, 50, clip=False))
    assert abs(float(unclipped.mean()) - MU) > 0.5, f"unclipped: mean {float(unclipped.mean()):.3f}, mu = {MU}"

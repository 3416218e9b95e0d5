"""p1_solvers: diffusers' DPM-Solver++ / UniPC configured from P1's schedule, checked against independent references.

    python -m pytest -q tests/test_p1_solvers.py

The schedule must be ours (the scheduler's alphas_cumprod against our alpha_bar and against diffusers' own named
schedules), the timesteps DDIM's trailing ones, and the solver second order: driven by the exact denoiser of
Gaussian data (tests/test_p1_oracle.py), its error against the exact ODE map is a small fraction of DDIM's.
"""

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler
from test_p1_oracle import MU, S, oracle, schedule_of

import p1_model as pm
from p1_solvers import SOLVERS, make_solver, solver_class, solver_sample

DIFFUSERS_SCHEDULE = {"linear": "linear", "cosine": "squaredcos_cap_v2"}


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("sampler", sorted(SOLVERS))
def test_the_solver_runs_on_our_schedule_and_diffusers_named_one(schedule, sampler):
    betas, alpha_bar = schedule_of(schedule)
    ours = make_solver(sampler, betas, "v", 10, clip=False)
    named = solver_class(sampler)(num_train_timesteps=1000, beta_schedule=DIFFUSERS_SCHEDULE[schedule])
    torch.testing.assert_close(ours.alphas_cumprod.double(), alpha_bar, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(ours.alphas_cumprod, named.alphas_cumprod, rtol=1e-5, atol=1e-9)
    assert ours.config.prediction_type == "v_prediction" and ours.config.solver_order == 2


@pytest.mark.parametrize("steps", [5, 8, 10, 15])
@pytest.mark.parametrize("sampler", sorted(SOLVERS))
def test_the_solver_steps_on_ddims_trailing_timesteps(sampler, steps):
    betas, _ = schedule_of("cosine")
    ddim = DDIMScheduler(num_train_timesteps=1000, timestep_spacing="trailing")
    ddim.set_timesteps(steps)
    assert make_solver(sampler, betas, "eps", steps, clip=True).timesteps.tolist() == ddim.timesteps.tolist()


def affine_map(sampler, steps, schedule, prediction="v"):
    """(A, B) of the sampler's map x_T -> A x_T + B under the exact Gaussian denoiser (every step is affine)."""
    betas, alpha_bar = schedule_of(schedule)
    x_T = torch.tensor([0.0, 1.0], dtype=torch.float64).reshape(2, 1, 1, 1)
    x0 = pm.final(pm.run_sampler(oracle(alpha_bar, prediction), x_T, betas, alpha_bar, prediction, sampler, steps))
    return float(x0[1] - x0[0]), float(x0[0])


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("sampler", sorted(SOLVERS))
def test_the_solver_is_second_order(schedule, sampler):
    """The exact probability-flow ODE maps x_T to mu + s (x_T - sqrt(a_T) mu) / sqrt(c_T). DDIM is DPM-Solver's
    first-order member; at 100 steps a second-order update is at least 4x closer to the exact slope (measured
    7-100x), a first-order one (solver_order=1) would match DDIM."""
    _, alpha_bar = schedule_of(schedule)
    a = float(alpha_bar[-1])
    slope = S / math.sqrt(a * S**2 + 1 - a)
    solver_error = abs(affine_map(sampler, 100, schedule)[0] - slope)
    ddim_error = abs(affine_map("ddim", 100, schedule)[0] - slope)
    assert solver_error < ddim_error / 4, f"{sampler}-100 slope error {solver_error:.5f}, DDIM-100 {ddim_error:.5f}"
    intercept = affine_map(sampler, 100, schedule)[1]
    assert abs(intercept - (MU - slope * math.sqrt(a) * MU)) < 1e-4, f"{sampler}-100 intercept {intercept:.6f}"


def test_eps_and_v_prediction_give_the_same_samples():
    """The same exact denoiser as eps or as v: a wrong prediction_type mapping would tell them apart (the
    schedulers compute in float32: 2e-4 apart at most)."""
    for sampler in SOLVERS:
        eps, v = affine_map(sampler, 10, "cosine", "eps"), affine_map(sampler, 10, "cosine", "v")
        assert eps == pytest.approx(v, rel=1e-3, abs=1e-5), f"{sampler}: eps {eps}, v {v}"


def test_training_the_evaluator_and_ddim_sampling_do_not_import_diffusers():
    """diffusers (with torch._dynamo and scipy, ~5 s) is imported when a solver is made, not by importing P1."""
    check = "import sys, p1_train, p1_eval, p1_inference; print(sorted(m for m in sys.modules if 'diffusers' in m))"
    result = subprocess.run([sys.executable, "-c", check], cwd=Path(__file__).resolve().parents[1],
                            capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stdout + result.stderr
    assert solver_class("dpmpp").__name__ == "DPMSolverMultistepScheduler"


def test_bad_solver_arguments_are_refused():
    betas, alpha_bar = schedule_of("cosine")
    with pytest.raises(ValueError, match="solver must be one of"):
        make_solver("plms", betas, "v", 10, clip=False)
    with pytest.raises(ValueError, match="steps must be between 1 and 1000"):
        make_solver("dpmpp", betas, "v", 0, clip=False)
    with pytest.raises(ValueError, match="sampler must be ddpm, ddim or one of"):
        pm.run_sampler(oracle(alpha_bar, "v"), torch.zeros(1, 1, 1, 1), betas, alpha_bar, "v", "heun")


def test_the_solver_yields_the_reverse_process_from_T_to_0():
    betas, alpha_bar = schedule_of("cosine")
    states = list(solver_sample(oracle(alpha_bar, "v"), torch.zeros(2, 1, 1, 1), betas, "v", "dpmpp", 5, False))
    assert [t for t, _ in states] == [1000, 800, 600, 400, 200, 0]

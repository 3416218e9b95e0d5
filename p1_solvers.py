"""P1's high-order ODE solvers: DPM-Solver++ 2M (Lu et al. 2022) and UniPC (Zhao et al. 2023), by diffusers.

    python p1_inference.py OUT_DIR --sampler dpmpp --steps 10
    python -m pytest -q tests/test_p1_oracle.py tests/test_p1_solvers.py

Both solve the probability-flow ODE of the model's own noise schedule in the log-SNR variable lambda_t =
log(sqrt(alpha_bar_t) / sqrt(1 - alpha_bar_t)), reusing the previous step's x_0 prediction for a second-order
update: about 10 steps reach what DDIM needs 50 for (CIFAR-10 at 10 evaluations: DPM-Solver 4.70 FID, UniPC 3.87,
DDIM 13.36). The update is diffusers' `DPMSolverMultistepScheduler` / `UniPCMultistepScheduler`, configured here
from our betas and prediction type; this module only maps P1's conventions onto them:
- the schedule: `trained_betas` are our betas, so the scheduler's alphas_cumprod is our alpha_bar;
- order 2 (the schedulers' advice under classifier-free guidance), first order at the last steps
  (`lower_order_final`), the last step lands at sigma = 0 (`final_sigmas_type="zero"`, x_0 itself);
- "trailing" timesteps, as P1's DDIM: the first step is at t = T - 1, where x_T ~ N(0, I) belongs;
- clipping as P1's DDIM (p1_model.run_sampler): the x_0 prediction is clamped to [-1, 1] for eps-prediction
  (diffusers' thresholding with sample_max_value = 1 is exactly that clamp) and left alone for v-prediction.
Both are deterministic (no noise is drawn), so an image does not depend on the batch it is sampled in.
diffusers is imported when a solver is first made, not with this module: it brings torch._dynamo and scipy.stats,
about 5 s of start-up (`python -X importtime`) that training, the evaluator and the DDIM / DDPM samplers do not need.
"""

import torch

SOLVERS = {"dpmpp": "DPMSolverMultistepScheduler", "unipc": "UniPCMultistepScheduler"}  # name -> diffusers class
PREDICTION_TYPES = {"eps": "epsilon", "v": "v_prediction"}


def solver_class(sampler):
    """diffusers' scheduler class for `sampler` ("dpmpp" or "unipc")."""
    if sampler not in SOLVERS:
        raise ValueError(f"solver must be one of {sorted(SOLVERS)}, got {sampler!r}")
    import diffusers  # here, not at the top: see the module's docstring

    return getattr(diffusers, SOLVERS[sampler])


def make_solver(sampler, betas, prediction, steps, clip):
    """A fresh diffusers scheduler for `sampler` ("dpmpp" or "unipc") on our betas, set to `steps` steps; with
    `clip`, every x_0 prediction is clamped to [-1, 1]."""
    scheduler_class = solver_class(sampler)
    if not 1 <= steps <= len(betas):
        raise ValueError(f"the number of {sampler} steps must be between 1 and {len(betas)}, got {steps}")
    scheduler = scheduler_class(num_train_timesteps=len(betas), trained_betas=betas.double().cpu().numpy(),
                                prediction_type=PREDICTION_TYPES[prediction], solver_order=2,
                                thresholding=clip, sample_max_value=1.0,
                                timestep_spacing="trailing", lower_order_final=True, final_sigmas_type="zero")
    scheduler.set_timesteps(steps)
    return scheduler


def solver_sample(denoise, x_T, betas, prediction, sampler, steps, clip):
    """Sample with a high-order solver; yields (paper t, x_t) from (T, x_T) down to (0, x_0), as P1's samplers.

    `denoise(x_t, t)` returns the (guided) network output, eps or v as `prediction` says, for a [B] tensor of
    array indices t. `clip` clamps the x_0 predictions to [-1, 1] (P1 does it for eps-prediction only).
    """
    scheduler = make_solver(sampler, betas, prediction, steps, clip)
    sequence = [int(t) for t in scheduler.timesteps]
    x = x_T
    yield sequence[0] + 1, x
    for t, t_prev in zip(sequence, sequence[1:] + [-1]):
        output = denoise(x, torch.full((x.shape[0],), t, device=x.device, dtype=torch.long))
        x = scheduler.step(output, t, x).prev_sample.to(x_T.dtype)
        yield t_prev + 1, x

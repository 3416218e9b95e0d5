"""The DDIM update (Song et al. 2021, "Denoising Diffusion Implicit Models"), shared by P1's sampler and P2's.

alpha_bar_t is the cumulative product of (1 - beta) (the paper's alpha_t), x0_pred the "predicted x_0" and eps the
noise estimate of eq. (12). Which x0_pred to use (clipped or not) and where the last step lands are each caller's.
"""

import math


def ddim_timesteps(num_train_timesteps, steps, spacing="leading", offset=0):
    """The DDIM timesteps, largest first, as diffusers' DDIMScheduler.set_timesteps makes them.

    "leading": i * (T // steps) + offset; the course's offset 1 gives 981, 961, ..., 1 for 50 steps.
    "trailing": round(T - i * T / steps) - 1, which starts at T - 1, where x_T ~ N(0, I) belongs (Lin et al. 2024).
    The step after the last timestep goes to "before timestep 0"; what alpha_bar that is, is the caller's choice.
    """
    most = num_train_timesteps - offset if spacing == "leading" else num_train_timesteps
    if spacing not in ("leading", "trailing"):
        raise ValueError(f"spacing must be 'leading' or 'trailing', got {spacing!r}")
    if not 1 <= steps <= most:
        raise ValueError(f"the number of DDIM steps must be between 1 and {most}, got {steps}")
    if spacing == "leading":
        return [i * (num_train_timesteps // steps) + offset for i in reversed(range(steps))]
    return [round(num_train_timesteps - i * num_train_timesteps / steps) - 1 for i in range(steps)]


def ddim_sigma(alpha_bar_t, alpha_bar_prev, eta):
    """sigma_t(eta) of DDIM eq. (16): eta sqrt((1 - a_prev) / (1 - a_t)) sqrt(1 - a_t / a_prev).

    eta = 0 is deterministic DDIM; eta = 1 is the DDPM posterior standard deviation.
    """
    return eta * math.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar_t) * (1 - alpha_bar_t / alpha_bar_prev))


def ddim_step(x0_pred, eps, alpha_bar_t, alpha_bar_prev, eta=0.0, noise=None):
    """One DDIM update x_t -> x_{t_prev} (DDIM eq. 12) from the pair (x0_pred, eps); the alpha_bars are floats.

    x_prev = sqrt(a_prev) x0_pred                    "predicted x_0"
           + sqrt(1 - a_prev - sigma_t^2) eps        "direction pointing to x_t"
           + sigma_t noise                           "random noise", noise ~ N(0, I), needed when eta > 0
    """
    sigma_t = ddim_sigma(alpha_bar_t, alpha_bar_prev, eta)
    # 1 - a_prev - sigma^2 = (1 - a_prev)^2 a_t / (a_prev (1 - a_t)) at eta = 1: >= 0, up to rounding
    x_prev = math.sqrt(alpha_bar_prev) * x0_pred + math.sqrt(max(0.0, 1 - alpha_bar_prev - sigma_t**2)) * eps
    if eta > 0:
        if noise is None:
            raise ValueError(f"eta = {eta} > 0 needs the per-step noise: pass noise=")
        x_prev = x_prev + sigma_t * noise
    return x_prev

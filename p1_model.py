"""P1: the DDPM / DDIM math around the conditional U-Net of p1_unet.py (no file I/O, no argparse).

Used by p1_train.py, p1_inference.py and benchmarks/p1_bench.py; the tests call the pure functions directly:

    python -m pytest -q tests/test_p1_model.py tests/test_p1_oracle.py


Notation (Ho et al. 2020, "DDPM"; Song et al. 2021, "DDIM"):
    beta_t       noise variance added at step t            alpha_t = 1 - beta_t
    alpha_bar_t  prod_{s<=t} alpha_s                        x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps
    v            sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x_0   (Salimans & Ho 2022, "v-prediction")
    sigma_t      standard deviation of the noise a sampler step adds; eta scales it in DDIM (eta = 1: DDPM's)
Timesteps are array indices 0..T-1 into the schedule, as in diffusers: index t holds the noise level of the
paper's x_{t+1}. The samplers yield (paper t, x_t) pairs, from (T, x_T) down to (0, x_0), for figures.

Classifier-free guidance (Ho & Salimans 2022) uses a learned null id for each label (each is dropped independently
in training); the guided output is (1 + w) * f(x, digit, dataset) - w * f(x, null digit, dataset), so w = 0 is the
plain conditional model. Guidance is linear in the output, so applying it to v is the same as applying it to eps.
"""

import math
from dataclasses import asdict, dataclass, fields, replace

import torch
from torch import nn

from ddim import ddim_step, ddim_timesteps
from p1_solvers import SOLVERS, solver_sample
from p1_unet import NUM_DATASETS, NUM_DIGITS, ConditionalUNet
from utils import standard_normal

DATASETS = ("mnistm", "svhn")  # dataset id = index here
NULL_DIGIT = NUM_DIGITS  # learned "no digit" id used for classifier-free guidance
NULL_DATASET = NUM_DATASETS


@dataclass(frozen=True)
class P1Config:
    """Everything needed to rebuild the network and its noise schedule; saved inside every checkpoint.

    The defaults are the course's DDPM (linear betas 1e-4..0.02 over T = 1000, eps-prediction); the presets
    below change what the measurements (BENCHMARKS.md, P1) say is worth changing.
    """

    image_size: int = 28
    channels: int = 3
    unshuffle: int = 1  # pixel-unshuffle factor: 2 packs 3x28x28 into 12x14x14 (4x fewer conv FLOPs per width)
    widths: tuple = (64, 128, 256)  # channels per resolution level; each level after the first halves H and W
    blocks_per_level: int = 2
    attention_heads: int = 4  # self-attention at the lowest resolution only
    groups: int = 8  # GroupNorm groups
    embed_dim: int = 256  # width of the fused time + digit + dataset embedding
    dropout: float = 0.0
    timesteps: int = 1000
    schedule: str = "linear"  # "linear" (DDPM) or "cosine" (Nichol & Dhariwal 2021, diffusers' squaredcos_cap_v2)
    beta_start: float = 1e-4
    beta_end: float = 0.02
    prediction: str = "eps"  # what the network predicts: "eps" or "v"
    min_snr_gamma: float = 0.0  # > 0: min-SNR-gamma loss weighting (Hang et al. 2023); 0: plain MSE
    label_dropout: float = 0.1  # probability of replacing each label by its null id during training

    def __post_init__(self):
        object.__setattr__(self, "widths", tuple(self.widths))  # JSON round trips give lists
        if self.schedule not in ("linear", "cosine"):
            raise ValueError(f"schedule must be 'linear' or 'cosine', got {self.schedule!r}")
        if self.prediction not in ("eps", "v"):
            raise ValueError(f"prediction must be 'eps' or 'v', got {self.prediction!r}")
        if (self.image_size // self.unshuffle) % 2 ** (len(self.widths) - 1):
            raise ValueError(f"image size {self.image_size} / unshuffle {self.unshuffle} cannot be halved "
                             f"{len(self.widths) - 1} times")

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, values):
        """Rebuild from a checkpoint's dict; unknown or badly typed fields raise ValueError/TypeError."""
        unknown = set(values) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown config fields {sorted(unknown)}")
        return cls(**values)


PRESETS = {
    # 2 CPU cores: pack 2x2 pixels into channels, two narrow levels (14x14, 7x7), one residual block per level
    # down and two up, attention at 7x7: 0.73 M parameters, 0.09 GFLOP per image (forward). Cosine schedule +
    # v-prediction + min-SNR-5 learned faster than the course's linear/eps schedule in the same CPU minutes.
    "toy": P1Config(unshuffle=2, widths=(32, 64), blocks_per_level=1, embed_dim=128, schedule="cosine",
                    prediction="v", min_snr_gamma=5.0),
    # GPU: full resolution 28 -> 14 -> 7, widths 64/128/256, two residual blocks per level, attention at 7x7.
    "full": P1Config(unshuffle=1, widths=(64, 128, 256), blocks_per_level=2, embed_dim=256, dropout=0.1,
                     schedule="cosine", prediction="v", min_snr_gamma=5.0),
}


def preset(name, **overrides):
    """A preset config ("toy" or "full") with some fields replaced (e.g. schedule="linear", prediction="eps")."""
    return replace(PRESETS[name], **overrides)


# ------------------------------------------------------------------------------------------- schedules


def linear_beta_schedule(timesteps, beta_start=1e-4, beta_end=0.02):
    """DDPM's betas: evenly spaced from beta_start to beta_end (Ho et al. 2020, sec. 4), float64."""
    return torch.linspace(beta_start, beta_end, timesteps, dtype=torch.float64)


def cosine_beta_schedule(timesteps, s=0.008, max_beta=0.999):
    """Betas of alpha_bar(t) = cos^2(((t/T + s) / (1 + s)) * pi/2) (Nichol & Dhariwal 2021, eq. 17), float64.

    beta_t = 1 - alpha_bar((t+1)/T) / alpha_bar(t/T), capped at max_beta so the last step is not singular;
    this is diffusers' "squaredcos_cap_v2".
    """
    def alpha_bar(u):
        return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2

    betas = [min(1 - alpha_bar((i + 1) / timesteps) / alpha_bar(i / timesteps), max_beta) for i in range(timesteps)]
    return torch.tensor(betas, dtype=torch.float64)


def make_betas(config):
    if config.schedule == "linear":
        return linear_beta_schedule(config.timesteps, config.beta_start, config.beta_end)
    return cosine_beta_schedule(config.timesteps)


def alpha_bar_from_betas(betas):
    """alpha_bar_t = prod_{s<=t} (1 - beta_s)."""
    return torch.cumprod(1 - betas, dim=0)


def _at(values, t, x):
    """values[t] for a batch of timesteps t, shaped [B, 1, 1, 1] in x's dtype for broadcasting over images."""
    t = torch.as_tensor(t, device=values.device).reshape(-1)
    return values[t].to(device=x.device, dtype=x.dtype).reshape(-1, *([1] * (x.dim() - 1)))


def q_sample(x0, t, alpha_bar, noise):
    """Sample from q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I) with the given noise (DDPM eq. 4)."""
    a = _at(alpha_bar, t, x0)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def v_target(x0, noise, alpha_bar_t):
    """v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x_0 (Salimans & Ho 2022, sec. 4); alpha_bar_t broadcast."""
    return alpha_bar_t.sqrt() * noise - (1 - alpha_bar_t).sqrt() * x0


def to_x0_eps(output, x_t, alpha_bar_t, prediction):
    """The network output (eps or v) as the pair (x0_pred, eps) at noise level alpha_bar_t (a float or broadcast)."""
    a, b = alpha_bar_t**0.5, (1 - alpha_bar_t) ** 0.5
    if prediction == "eps":
        return (x_t - b * output) / a, output
    return a * x_t - b * output, a * output + b * x_t  # v: x_0 = a x_t - b v, eps = a v + b x_t


def q_posterior(x0, x_t, t, betas, alpha_bar):
    """Mean and variance of q(x_{t-1} | x_t, x_0) (DDPM eqs. 6-7), for array index t (alpha_bar_prev = 1 at t = 0)."""
    a_t = _at(alpha_bar, t, x_t)
    a_prev = _at(torch.cat([alpha_bar.new_ones(1), alpha_bar[:-1]]), t, x_t)
    beta_t = _at(betas, t, x_t)
    mean = (beta_t * a_prev.sqrt() / (1 - a_t)) * x0 + ((1 - a_prev) * (1 - beta_t).sqrt() / (1 - a_t)) * x_t
    variance = beta_t * (1 - a_prev) / (1 - a_t)
    return mean, variance


def ddpm_step(output, x_t, t, betas, alpha_bar, noise, prediction, clip=True):
    """One ancestral step x_t -> x_{t-1} ~ N(posterior mean, sigma_t^2 I), sigma_t^2 the posterior variance.

    x_0 is predicted from the network output and (clip=True) clamped to the data range [-1, 1] before the
    posterior mean is formed; no noise is added at t = 0. `t` is one int for the whole batch.
    """
    x0, _ = to_x0_eps(output, x_t, _at(alpha_bar, t, x_t), prediction)
    if clip:
        x0 = x0.clamp(-1, 1)
    mean, variance = q_posterior(x0, x_t, t, betas, alpha_bar)
    return mean if t == 0 else mean + variance.sqrt() * noise


def guided_output(model, x_t, t, digit, dataset, w):
    """Classifier-free guidance in ONE batched forward: (1 + w) f(x, digit, dataset) - w f(x, null, dataset).

    The reference branch drops the digit only: guidance then amplifies what tells the digits apart within the
    requested dataset, not the dataset's style as well. Nulling both labels exaggerated MNIST-M's background
    textures: on five toy-world checkpoints (DDIM-25, w = 5, 200-300 images per set) keeping the dataset raised
    MNIST-M accuracy by 9, 9 and 3 points on the three weaker ones (e.g. 0.725 -> 0.810), was within noise on the
    two stronger ones, and left SVHN unchanged within noise.
    The combination is formed in float32 whatever the autocast dtype of the forward: in bf16, (1 + w) c - w u
    with w = 5 loses about three of bf16's eight significant bits to cancellation.
    """
    if w == 0:
        return model(x_t, t, digit, dataset)
    batch = x_t.shape[0]
    out = model(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([digit, torch.full_like(digit, NULL_DIGIT)]),
                torch.cat([dataset, dataset]))
    out_c, out_u = out[:batch].float(), out[batch:].float()
    return (1 + w) * out_c - w * out_u


def drop_labels(digit, dataset, p, generator=None):
    """Replace each label by its null id independently with probability p (classifier-free guidance training)."""
    drop_digit = torch.rand(digit.shape, generator=generator, device=digit.device) < p
    drop_dataset = torch.rand(dataset.shape, generator=generator, device=dataset.device) < p
    return digit.masked_fill(drop_digit, NULL_DIGIT), dataset.masked_fill(drop_dataset, NULL_DATASET)


def loss_weight(alpha_bar_t, prediction, gamma):
    """min-SNR-gamma weights (Hang et al. 2023): min(SNR, gamma)/SNR for eps, min(SNR, gamma)/(SNR + 1) for v.

    Both make the loss an x_0-MSE weighted by min(SNR, gamma); gamma = 0 gives plain (weight 1) MSE.
    """
    if gamma <= 0:
        return torch.ones_like(alpha_bar_t)
    snr = alpha_bar_t / (1 - alpha_bar_t)
    return snr.clamp(max=gamma) / (snr if prediction == "eps" else snr + 1)


def diffusion_loss(model, x0, digit, dataset, config, alpha_bar, generator=None):
    """The training loss for a batch: t ~ U{0..T-1}, eps ~ N(0, I), labels dropped with p = label_dropout,
    (weighted) MSE between the network output and its target (eps, or v). Randomness from `generator`."""
    batch = x0.shape[0]
    t = torch.randint(0, config.timesteps, (batch,), generator=generator, device=x0.device)
    noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    x_t = q_sample(x0, t, alpha_bar, noise)
    digit, dataset = drop_labels(digit, dataset, config.label_dropout, generator)
    a_t = _at(alpha_bar, t, x0)
    target = noise if config.prediction == "eps" else v_target(x0, noise, a_t)
    output = model(x_t, t, digit, dataset).float()
    per_image = (output - target).pow(2).mean(dim=(1, 2, 3))
    return (loss_weight(a_t.reshape(-1), config.prediction, config.min_snr_gamma) * per_image).mean()


# -------------------------------------------------------------------------------------------- samplers


def ddpm_sample(denoise, x_T, betas, alpha_bar, prediction, generator=None, clip=True):
    """Ancestral DDPM sampling over all T steps (DDPM Algorithm 2). Yields (paper t, x_t): (T, x_T) ... (0, x_0).

    `denoise(x_t, t)` returns the (guided) network output for a batch and a [B] tensor of array indices.
    `generator` is None, one generator, or one per image (see `utils.standard_normal`).
    """
    x = x_T
    yield len(betas), x
    for t in reversed(range(len(betas))):
        output = denoise(x, torch.full((x.shape[0],), t, device=x.device, dtype=torch.long))
        noise = standard_normal(x.shape, generator, x.device, x.dtype) if t > 0 else None
        x = ddpm_step(output, x, t, betas, alpha_bar, noise, prediction, clip)
        yield t, x


def ddim_sample(denoise, x_T, alpha_bar, prediction, steps, eta=0.0, generator=None, clip=True,
                spacing="trailing"):
    """DDIM sampling over `steps` sub-sampled timesteps (DDIM eqs. 12 and 16). Yields (paper t, x_t), x_T first.

    The step after the last timestep goes to alpha_bar = 1 (diffusers' set_alpha_to_one). With `clip`, x0_pred is
    clamped to [-1, 1] and eps re-derived from the clamped x0_pred, so the pair stays a consistent decomposition
    of x_t (diffusers' use_clipped_model_output); clamping x0_pred alone would leave eps pointing elsewhere.
    """
    sequence = ddim_timesteps(len(alpha_bar), steps, spacing)
    x = x_T
    yield sequence[0] + 1, x
    for t, t_prev in zip(sequence, sequence[1:] + [-1]):
        output = denoise(x, torch.full((x.shape[0],), t, device=x.device, dtype=torch.long))
        a_t, a_prev = float(alpha_bar[t]), float(alpha_bar[t_prev]) if t_prev >= 0 else 1.0
        x0, eps = to_x0_eps(output, x, a_t, prediction)
        if clip:
            x0 = x0.clamp(-1, 1)
            eps = (x - a_t**0.5 * x0) / (1 - a_t) ** 0.5
        noise = standard_normal(x.shape, generator, x.device, x.dtype) if eta > 0 else None
        x = ddim_step(x0, eps, a_t, a_prev, eta, noise)
        yield t_prev + 1, x


def run_sampler(denoise, x_T, betas, alpha_bar, prediction, sampler="ddim", steps=50, eta=0.0, generator=None):
    """The sampler P1 runs (ddpm, ddim, or a p1_solvers solver) with its clipping policy; yields (paper t, x_t).

    DDPM clips x0_pred to [-1, 1]; DDIM and the solvers only for eps, where x0_pred = (x_t - sqrt(1 - a) eps) / sqrt(a)
    scales eps errors by up to 2e4 (cosine); v's x0_pred has no division (clamped, it ruined guided toy samples)."""
    if sampler == "ddpm":
        return ddpm_sample(denoise, x_T, betas, alpha_bar, prediction, generator)
    if sampler in SOLVERS:
        return solver_sample(denoise, x_T, betas, prediction, sampler, steps, clip=prediction == "eps")
    if sampler != "ddim":
        raise ValueError(f"sampler must be ddpm, ddim or one of {sorted(SOLVERS)}, got {sampler!r}")
    if not 0 <= eta <= 1:
        raise ValueError(f"DDIM eta must be between 0 and 1, got {eta}")
    return ddim_sample(denoise, x_T, alpha_bar, prediction, steps, eta, generator, clip=prediction == "eps")


def final(samples):
    """Run a sampler generator to the end and return x_0."""
    x = None
    for _, x in samples:
        pass
    return x


class Diffusion(nn.Module):
    """The network plus its noise schedule, computed once from the config in float64 on the CPU.

    `betas` and `alpha_bar` are plain attributes, not buffers: every move of the module (.to, .cuda, ...) places
    them on the network's device, in float64 on the CPU and CUDA and in float32 elsewhere (MPS has no float64, and
    moving a float64 tensor there raises), cast before they leave the CPU.
    """

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.net = ConditionalUNet(config)
        betas = make_betas(config)
        self.schedule_cpu = betas, alpha_bar_from_betas(betas)
        self.betas, self.alpha_bar = self.schedule_cpu

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        device = self.net.conv_in.weight.device
        dtype = torch.float64 if device.type in ("cpu", "cuda") else torch.float32
        self.betas, self.alpha_bar = (values.to(dtype).to(device) for values in self.schedule_cpu)
        return self

    def loss(self, x0, digit, dataset, generator=None):
        return diffusion_loss(self.net, x0, digit, dataset, self.config, self.alpha_bar, generator)

    def sample(self, x_T, digit, dataset, w=0.0, sampler="ddim", steps=50, eta=0.0, generator=None):
        """Generator of (paper t, x_t) from x_T to x_0 for the given labels and guidance w (see `run_sampler`)."""
        def denoise(x_t, t):
            return guided_output(self.net, x_t, t, digit, dataset, w).to(x_t.dtype)

        return run_sampler(denoise, x_T, self.betas, self.alpha_bar, self.config.prediction, sampler, steps, eta,
                           generator)

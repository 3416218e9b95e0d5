"""DDIM sampling with the course's face UNet: the grader's images, their MSE against ground truth, the eta grid.

    python p2_ddim.py hw2_data/face/noise outputs/p2/face hw2_data/face/UNet.pt
    python p2_ddim.py hw2_data/face/noise outputs/p2/face hw2_data/face/UNet.pt --gt hw2_data/face/GT \\
        --figures outputs/p2/figures

Reads NOISE_DIR/00.pt, 01.pt, ... (each 1x3xHxW, H and W divisible by 32) in that order, runs DDIM (Song et
al., "Denoising Diffusion Implicit Models", 2021) with the course's schedule, and writes OUT_DIR/00.png, ...
Each image is normalised to its own min..max and rounded like torchvision's `save_image`, which is how the
course saved its ground truth (`--postprocess clamp` maps (x + 1) / 2 and clamps instead).
`--gt GT_DIR` prints each image's MSE against GT_DIR/NN.png on the 0-255 scale and their mean, then the mean under
each convention, x0 clipped or not (`--clip-x0`, the default, or `--no-clip-x0`) by `--postprocess`, marking the
one in use, so that the real ground truth tells which one the course used (this samples a second time, with the
other clipping);
`--figures DIR` also writes DIR/eta_grid.png (rows eta = 0, 0.25, 0.5, 0.75, 1; columns noises 00..03).
Every input is checked before anything is written: a bad file stops the run with one line and exit status 1.

Symbols follow the DDIM paper: x_t the noisy image at timestep t, eps = eps_theta(x_t, t) the model's noise
prediction, alpha_bar_t the cumulative product of (1 - beta) (the paper's alpha_t), sigma_t(eta) the
per-step noise scale of eq. (16), x0_pred the "predicted x_0" of eq. (12).
"""

import argparse
import contextlib
import math
import re
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ddim import ddim_step, ddim_timesteps
from p2_unet import load_face_unet
from utils import (
    Hw2Error,
    announce_toy_world,
    ensure_writable_dir,
    get_device,
    image_generators,
    labelled_grid,
    load_rgb,
    load_torch_file,
    run_cli,
    save_pil,
    save_png,
    standard_normal,
    to_uint8,
)

NUM_TRAIN_TIMESTEPS = 1000
BETA_START, BETA_END = 1e-4, 2e-2  # the course's linear beta schedule
DEFAULT_STEPS = 50
DOWNSAMPLING = 32  # the UNet halves the resolution five times
NOISE_NAME = re.compile(r"^(\d\d)\.pt$")
FIGURE_ETAS = (0.0, 0.25, 0.5, 0.75, 1.0)
FIGURE_NOISES = 4  # eta grid columns: noises 00..03
PRECISIONS = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}
POSTPROCESS = ("minmax", "clamp")
# diffusers' DDIMScheduler with these settings follows the same schedule: tests and the toy world use it as
# the independent reference for our sampler.
DIFFUSERS_DDIM_CONFIG = dict(num_train_timesteps=NUM_TRAIN_TIMESTEPS, beta_schedule="linear", beta_start=BETA_START,
                             beta_end=BETA_END, clip_sample=True, set_alpha_to_one=False, steps_offset=1,
                             timestep_spacing="leading")

# ------------------------------------------------------------------------------------------ DDIM math


def linear_alpha_bar(num_train_timesteps=NUM_TRAIN_TIMESTEPS, beta_start=BETA_START, beta_end=BETA_END):
    """alpha_bar_t = prod_{s <= t} (1 - beta_s) for linearly spaced betas, in float64 like the course's helper."""
    betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64)
    return torch.cumprod(1 - betas, dim=0)


def course_timesteps(num_steps):
    """The course's DDIM timesteps, high to low: 981, 961, ..., 1 for 50 steps ("leading" spacing, offset 1)."""
    return ddim_timesteps(NUM_TRAIN_TIMESTEPS, num_steps, "leading", offset=1)


def predict_x0(x_t, eps, alpha_bar_t):
    """The "predicted x_0" of DDIM eq. (12): (x_t - sqrt(1 - a_t) eps) / sqrt(a_t)."""
    return (x_t - math.sqrt(1 - alpha_bar_t) * eps) / math.sqrt(alpha_bar_t)


@torch.no_grad()
def ddim_sample_progressive(model, x_T, num_steps=DEFAULT_STEPS, eta=0.0, generator=None, clip_x0=True):
    """Run DDIM from x_T (N x 3 x H x W), yielding (t, x_{t_prev}, x0_pred) after each step, t = 981 ... 1.

    As the course does: x0_pred is clamped to [-1, 1] (`clip_x0`, diffusers' clip_sample), eps stays the model's
    unclamped prediction, and the step after the last timestep goes to alpha_bar[0], not to 1 (diffusers'
    set_alpha_to_one=False). `model(x_t, t)` predicts eps for a batch of timesteps and may run under autocast; the
    DDIM arithmetic is kept in float32.
    Noise for eta > 0 is drawn with `generator` (None, one, or one per image: see `utils.standard_normal`).
    """
    alpha_bar = linear_alpha_bar()
    x_t = x_T.float()
    sequence = course_timesteps(num_steps)
    for t, t_prev in zip(sequence, sequence[1:] + [0]):  # after t = 1 comes alpha_bar[0], not 1
        eps = model(x_t, torch.full((x_t.shape[0],), float(t), device=x_t.device)).float()
        alpha_bar_t = float(alpha_bar[t])
        x0_pred = predict_x0(x_t, eps, alpha_bar_t)
        x0_pred = x0_pred.clamp(-1, 1) if clip_x0 else x0_pred
        noise = standard_normal(x_t.shape, generator, x_t.device) if eta > 0 else None
        x_t = ddim_step(x0_pred, eps, alpha_bar_t, float(alpha_bar[t_prev]), eta, noise)
        yield t, x_t, x0_pred


def ddim_sample(model, x_T, num_steps=DEFAULT_STEPS, eta=0.0, generator=None, clip_x0=True):
    """x_0 sampled by DDIM from x_T (N x 3 x H x W); see `ddim_sample_progressive`."""
    x_t = x_T.float()
    for _, x_t, _ in ddim_sample_progressive(model, x_T, num_steps, eta, generator, clip_x0):
        pass
    return x_t


@contextlib.contextmanager
def fp32_without_tf32():
    """Full fp32 on CUDA: TF32 off for matmuls and cuDNN convolutions (cuDNN allows it by default, which rounds
    convolution inputs to 10 mantissa bits), the earlier settings restored on exit."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def precision_context(device, precision):
    """Autocast for fp16/bf16 on CUDA; fp32 on CUDA without TF32; fp32 elsewhere as is. Reduced precision off
    CUDA is refused."""
    dtype = PRECISIONS[precision]
    if dtype is None:
        return fp32_without_tf32() if torch.device(device).type == "cuda" else contextlib.nullcontext()
    if torch.device(device).type != "cuda":
        raise Hw2Error(f"--precision {precision} runs the UNet under CUDA autocast, but this run is on {device}: "
                       f"use --precision fp32 (the default) or a CUDA --device")
    return torch.autocast(device_type="cuda", dtype=dtype)


def sample_all(model, noises, num_steps, eta, seed, batch_size, device, precision, desc="DDIM", clip_x0=True):
    """Sample every noise (N x 3 x H x W) in batches; returns the N x 3 x H x W x_0 on the CPU."""
    generators = image_generators(seed, len(noises), device)
    samples = []
    with tqdm(total=math.ceil(len(noises) / batch_size) * num_steps, desc=desc, unit="step") as progress:
        for start in range(0, len(noises), batch_size):
            x_T = noises[start:start + batch_size].to(device)
            with precision_context(device, precision):
                for _, x_t, _ in ddim_sample_progressive(model, x_T, num_steps, eta,
                                                         generators[start:start + batch_size], clip_x0):
                    progress.update(1)
            samples.append(x_t.cpu())
    return torch.cat(samples)


# ---------------------------------------------------------------------------------------------- images


def minmax_normalize(x):
    """Map each image of N x C x H x W to [0, 1] by its own min and max, as `save_image(normalize=True)` does."""
    low = x.flatten(1).min(dim=1).values[:, None, None, None]
    high = x.flatten(1).max(dim=1).values[:, None, None, None]
    return (x - low) / (high - low).clamp_min(1e-5)  # torchvision's guard against a constant image


def to_display(x, postprocess="minmax"):
    """Samples (N x 3 x H x W) as images in [-1, 1] for `save_png` / `to_uint8`: min-max normalised or clamped."""
    if postprocess == "minmax":
        return minmax_normalize(x) * 2 - 1
    return x.clamp(-1, 1)


def mse_255(image, reference):
    """MSE between two uint8 images on the 0-255 scale, in float (uint8 subtraction would wrap around)."""
    return float(np.mean((image.astype(np.float64) - reference.astype(np.float64)) ** 2))


def mean_mse_by_convention(samples, ground_truth):
    """{(clip_x0, postprocess): mean MSE (0-255 scale) against `ground_truth`} for `samples` = {clip_x0: N x 3 x H x
    W samples}, under each post-processing of POSTPROCESS."""
    return {(clip_x0, postprocess): float(np.mean([mse_255(ours, theirs) for ours, theirs in
                                                   zip(to_uint8(to_display(x, postprocess)), ground_truth)]))
            for clip_x0, x in samples.items() for postprocess in POSTPROCESS}


# ------------------------------------------------------------------------------------- input checking


def noise_paths(noise_dir):
    """NOISE_DIR/00.pt, 01.pt, ... in numeric order; a gap in the numbering is an error naming the missing file."""
    folder = Path(noise_dir)
    if not folder.is_dir():
        raise Hw2Error(f"noise folder not found: {folder} (pass the folder holding 00.pt, 01.pt, ...)")
    numbers = sorted(int(match.group(1)) for path in folder.iterdir() if (match := NOISE_NAME.match(path.name)))
    if not numbers:
        raise Hw2Error(f"{folder} holds no noise files named 00.pt, 01.pt, ...")
    for expected, found in enumerate(numbers):
        if found != expected:
            raise Hw2Error(f"{folder / f'{expected:02d}.pt'} is missing: noise files must be numbered 00.pt, 01.pt, "
                           f"... without gaps (found {len(numbers)} files up to {numbers[-1]:02d}.pt)")
    return [folder / f"{number:02d}.pt" for number in numbers]


def load_noise(path):
    """A 1 x 3 x H x W floating-point noise tensor from a course `.pt` file (H, W divisible by 32), as float32."""
    x = load_torch_file(path)
    if not isinstance(x, torch.Tensor):
        raise Hw2Error(f"{path} holds a {type(x).__name__}, not a noise tensor of shape 1x3xHxW")
    if not x.is_floating_point():
        raise Hw2Error(f"{path} has dtype {x.dtype}; noise must be floating point (float32 in the course files)")
    if x.ndim != 4 or x.shape[:2] != (1, 3) or x.shape[2] % DOWNSAMPLING or x.shape[3] % DOWNSAMPLING:
        raise Hw2Error(f"{path} has shape {tuple(x.shape)}; noise must be 1x3xHxW with H and W divisible by "
                       f"{DOWNSAMPLING} (1x3x256x256 in the course files)")
    if not torch.isfinite(x).all():
        raise Hw2Error(f"{path} contains NaN or infinite values")
    return x.float()


def load_noises(noise_dir):
    """(paths, N x 3 x H x W tensor) for every noise file of NOISE_DIR; all must share one size."""
    paths = noise_paths(noise_dir)
    noises = [load_noise(path) for path in paths]
    for path, x in zip(paths, noises):
        if x.shape != noises[0].shape:
            raise Hw2Error(f"{path} has shape {tuple(x.shape)} but {paths[0]} has {tuple(noises[0].shape)}: "
                           f"all noise files must have the same size")
    return paths, torch.cat(noises)


def load_ground_truth(gt_dir, names, size):
    """GT_DIR/<name>.png for each name, as uint8 H x W x 3 arrays; each must be `size` = (H, W)."""
    folder = Path(gt_dir)
    if not folder.is_dir():
        raise Hw2Error(f"--gt folder not found: {folder}")
    images = []
    for name in names:
        path = folder / f"{name}.png"
        if not path.is_file():
            raise Hw2Error(f"ground truth {path} is missing: --gt needs one NN.png per noise file")
        image = np.asarray(load_rgb(path))
        if image.shape[:2] != tuple(size):
            raise Hw2Error(f"ground truth {path} is {image.shape[1]}x{image.shape[0]} but the noise is "
                           f"{size[1]}x{size[0]}: pass the GT folder that belongs to this noise folder")
        images.append(image)
    return images


def check_out_dir_argument(out_dir):
    """Refuse an OUT_DIR named like a checkpoint: every P2 script takes NOISE_DIR OUT_DIR UNET_PT, in that order."""
    if Path(out_dir).suffix == ".pt":
        raise Hw2Error(f"OUT_DIR {out_dir} is a .pt file: the arguments are NOISE_DIR OUT_DIR UNET_PT, in that order "
                       f"(the UNet checkpoint comes last)")


def check_sampling_flags(steps, batch_size, eta=0.0):
    """Refuse --steps / --batch-size / --eta values the sampler cannot use, naming the flag."""
    if not 1 <= steps < NUM_TRAIN_TIMESTEPS:
        raise Hw2Error(f"--steps must be between 1 and {NUM_TRAIN_TIMESTEPS - 1}, got {steps}")
    if batch_size < 1:
        raise Hw2Error(f"--batch-size must be at least 1, got {batch_size}")
    if not 0 <= eta <= 1:
        raise Hw2Error(f"--eta must be between 0 and 1, got {eta}")


# ------------------------------------------------------------------------------------------------ main


def eta_grid(model, noises, args, device):
    """The figure: rows eta in FIGURE_ETAS, columns the first FIGURE_NOISES noises, labelled."""
    columns = noises[:FIGURE_NOISES]
    rows = []
    for eta in FIGURE_ETAS:
        samples = sample_all(model, columns, args.steps, eta, args.seed, args.batch_size, device, args.precision,
                             desc=f"eta grid, eta = {eta}")
        rows.append(list(to_uint8(to_display(samples, args.postprocess))))
    return labelled_grid(rows, [f"eta = {eta}" for eta in FIGURE_ETAS], [f"{i:02d}.pt" for i in range(len(columns))])


def main(argv=None):
    args = build_parser().parse_args(argv)
    check_out_dir_argument(args.out_dir)
    check_sampling_flags(args.steps, args.batch_size, args.eta)
    device = get_device(args.device)
    precision_context(device, args.precision)  # refuse fp16/bf16 off CUDA before any work
    announce_toy_world(args.noise_dir)
    paths, noises = load_noises(args.noise_dir)
    names = [path.stem for path in paths]
    ground_truth = load_ground_truth(args.gt, names, noises.shape[2:]) if args.gt else None
    model = load_face_unet(args.unet, device)
    out_dir = ensure_writable_dir(args.out_dir, "OUT_DIR")
    figures_dir = ensure_writable_dir(args.figures, "--figures") if args.figures else None

    print(f"Sampling {len(noises)} images of {noises.shape[3]}x{noises.shape[2]} with DDIM, {args.steps} steps, "
          f"eta = {args.eta}, on {device} ({args.precision}).")
    samples = sample_all(model, noises, args.steps, args.eta, args.seed, args.batch_size, device, args.precision,
                         clip_x0=args.clip_x0)
    images = to_display(samples, args.postprocess)
    for name, image in zip(names, images):
        save_png(image, out_dir / f"{name}.png")
    print(f"Wrote {len(images)} images to {out_dir}.")

    if ground_truth is not None:
        errors = [mse_255(ours, theirs) for ours, theirs in zip(to_uint8(images), ground_truth)]
        for name, error in zip(names, errors):
            print(f"{name}.png  MSE {error:.4f}")
        print(f"mean MSE over {len(errors)} images (0-255 scale): {np.mean(errors):.4f}")
        other = sample_all(model, noises, args.steps, args.eta, args.seed, args.batch_size, device, args.precision,
                           desc="DDIM, the other x0 clipping", clip_x0=not args.clip_x0)
        means = mean_mse_by_convention({args.clip_x0: samples, not args.clip_x0: other}, ground_truth)
        print("mean MSE (0-255 scale) under each convention:")
        for (clip_x0, postprocess), mean in sorted(means.items(), key=lambda item: (not item[0][0], item[0][1])):
            flags = f"{'--clip-x0' if clip_x0 else '--no-clip-x0'} --postprocess {postprocess}"
            in_use = (clip_x0, postprocess) == (args.clip_x0, args.postprocess)
            print(f"  {flags:<36} {mean:.4f}{'  <- in use' if in_use else ''}")
    if figures_dir is not None:
        save_pil(eta_grid(model, noises, args, device), figures_dir / "eta_grid.png")
        print(f"Wrote {figures_dir / 'eta_grid.png'}.")


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("noise_dir", type=Path, help="Folder holding the noise files 00.pt, 01.pt, ... (1x3xHxW each).")
    parser.add_argument("out_dir", type=Path, help="Folder to write 00.png, 01.png, ... to (created if needed).")
    parser.add_argument("unet", type=Path, help="The course's face UNet.pt (a state_dict).")
    parser.add_argument("--eta", type=float, default=0.0,
                        help="DDIM eta in [0, 1]: 0 is deterministic DDIM, 1 is DDPM-like (default: 0).")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS,
                        help=f"Number of DDIM steps; 50 gives the course's timesteps 981, 961, ..., 1 "
                             f"(default: {DEFAULT_STEPS}).")
    parser.add_argument("--batch-size", type=int, default=10,
                        help="How many noises to sample at once; results do not depend on it (default: 10).")
    parser.add_argument("--seed", type=int, default=0,
                        help="Seed for the per-step noise when eta > 0; each image gets its own stream (default: 0).")
    parser.add_argument("--gt", type=Path, default=None,
                        help="Folder of ground-truth NN.png images; prints each image's MSE (0-255 scale) and the "
                             "mean (default: none).")
    parser.add_argument("--figures", type=Path, default=None,
                        help="Folder to write eta_grid.png to: rows eta = 0, 0.25, 0.5, 0.75, 1, columns noises "
                             "00..03 (default: no figure).")
    parser.add_argument("--postprocess", choices=POSTPROCESS, default="minmax",
                        help="minmax: normalise each image to its own min..max like the course's ground truth; "
                             "clamp: (x + 1) / 2 clamped to [0, 1] (default: minmax).")
    parser.add_argument("--clip-x0", action=argparse.BooleanOptionalAction, default=True,
                        help="Clamp each step's predicted x_0 to [-1, 1], as the course's sampler does (diffusers' "
                             "clip_sample); --no-clip-x0 leaves it as predicted (default: clip).")
    parser.add_argument("--device", type=str, default=None,
                        help="Device to run on (cpu, cuda, cuda:N, mps); the best available one by default.")

    parser.add_argument("--precision", choices=list(PRECISIONS), default="fp32",
                        help="fp32, or fp16/bf16 autocast for the UNet (CUDA only; refused on other devices) "
                             "(default: fp32).")
    return parser


if __name__ == "__main__":
    run_cli(main)

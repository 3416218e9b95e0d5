"""Interpolate between two DDIM noises, by slerp and linearly, and sample each with DDIM (eta = 0).

    python p2_interpolate.py hw2_data/face/noise outputs/p2/interpolation hw2_data/face/UNet.pt

Takes NOISE_DIR/00.pt -> 01.pt at alpha = 0.0, 0.1, ..., 1.0 and writes, in OUT_DIR:
  slerp.png, linear.png         one labelled strip per method (11 images, alpha above each)
  slerp/00.png .. slerp/10.png  the frames (and the same under linear/)
Images are post-processed like p2_ddim.py's (per-image min-max by default). Spherical interpolation keeps the
interpolated noise at the norm a Gaussian sample of this size has; linear interpolation shrinks it towards the
middle (to ~0.71x for independent noises), which the sampler turns into flat, washed-out images.
"""

import argparse
import math
from pathlib import Path

import torch

from p2_ddim import (
    DEFAULT_STEPS,
    POSTPROCESS,
    PRECISIONS,
    check_out_dir_argument,
    check_sampling_flags,
    load_noise,
    noise_paths,
    precision_context,
    sample_all,
    to_display,
)
from p2_unet import load_face_unet
from utils import (
    Hw2Error,
    announce_toy_world,
    ensure_writable_dir,
    get_device,
    labelled_grid,
    run_cli,
    save_pil,
    save_png,
    to_uint8,
)

ALPHAS = [i / 10 for i in range(11)]  # 0.0, 0.1, ..., 1.0
PARALLEL_DOT_THRESHOLD = 0.9995  # |cos theta| above this: slerp's 1 / sin(theta) is ill-conditioned, use lerp

# ----------------------------------------------------------------------------------------- interpolation


def lerp(x0, x1, alpha):
    """(1 - alpha) x0 + alpha x1."""
    return (1 - alpha) * x0 + alpha * x1


def clamped_cosine(x0, x1):
    """cos of the angle between two tensors taken as vectors, clamped to [-1, 1] (rounding can step outside,
    where arccos is undefined); 1 when either is zero, so that case counts as parallel."""
    v0, v1 = x0.double().flatten(), x1.double().flatten()
    if v0.norm() == 0 or v1.norm() == 0:
        return 1.0
    return min(1.0, max(-1.0, float((v0 @ v1) / (v0.norm() * v1.norm()))))


def slerp(x0, x1, alpha, dot_threshold=PARALLEL_DOT_THRESHOLD):
    """Spherical interpolation, each tensor taken as one vector (Shoemake, 1985):

        slerp = sin((1 - alpha) theta) / sin(theta) x0 + sin(alpha theta) / sin(theta) x1,
        theta = arccos(<x0, x1> / (|x0| |x1|))

    The cosine is clamped to [-1, 1] (see `clamped_cosine`). For (near-)parallel or anti-parallel inputs,
    |cos theta| >= dot_threshold, sin(theta) is ~0 and the formula loses all precision: there it falls back
    to linear interpolation. alpha = 0 and 1 give x0 and x1 exactly, since the weights are then exactly
    (1, 0) and (0, 1).
    """
    cos_theta = clamped_cosine(x0, x1)
    if abs(cos_theta) >= dot_threshold:
        return lerp(x0, x1, alpha)
    theta = math.acos(cos_theta)
    w0 = math.sin((1 - alpha) * theta) / math.sin(theta)
    w1 = math.sin(alpha * theta) / math.sin(theta)
    return w0 * x0 + w1 * x1


INTERPOLATIONS = {"slerp": slerp, "linear": lerp}

# ------------------------------------------------------------------------------------------------ main


def main(argv=None):
    args = build_parser().parse_args(argv)
    check_out_dir_argument(args.out_dir)
    check_sampling_flags(args.steps, args.batch_size)
    device = get_device(args.device)
    precision_context(device, args.precision)  # refuse fp16/bf16 off CUDA before any work
    announce_toy_world(args.noise_dir)
    paths = noise_paths(args.noise_dir)
    if len(paths) < 2:
        raise Hw2Error(f"{args.noise_dir} holds only {paths[0].name}; interpolation needs 00.pt and 01.pt")
    x0, x1 = load_noise(paths[0]), load_noise(paths[1])
    if x0.shape != x1.shape:
        raise Hw2Error(f"{paths[0]} is {tuple(x0.shape)} but {paths[1]} is {tuple(x1.shape)}: they must match")
    model = load_face_unet(args.unet, device)
    out_dir = ensure_writable_dir(args.out_dir, "OUT_DIR")

    labels = [f"alpha = {alpha:.1f}" for alpha in ALPHAS]
    for method, interpolate in INTERPOLATIONS.items():
        noises = torch.cat([interpolate(x0, x1, alpha) for alpha in ALPHAS])  # 11 x 3 x H x W
        # eta = 0 is deterministic, so the seed is irrelevant here
        images = to_display(sample_all(model, noises, args.steps, 0.0, 0, args.batch_size, device, args.precision,
                                       desc=method), args.postprocess)
        for index, image in enumerate(images):
            save_png(image, out_dir / method / f"{index:02d}.png")
        strip = labelled_grid([list(to_uint8(images))], [method], labels)
        save_pil(strip, out_dir / f"{method}.png")
        print(f"Wrote {out_dir / method}.png and {len(images)} frames in {out_dir / method}.")


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("noise_dir", type=Path, help="Folder holding the noise files; 00.pt and 01.pt are used.")
    parser.add_argument("out_dir", type=Path, help="Folder to write the strips and frames to (created if needed).")
    parser.add_argument("unet", type=Path, help="The course's face UNet.pt (a state_dict).")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS,
                        help=f"Number of DDIM steps (default: {DEFAULT_STEPS}, the course's).")
    parser.add_argument("--batch-size", type=int, default=11,
                        help="How many interpolated noises to sample at once (default: 11, one strip).")
    parser.add_argument("--postprocess", choices=POSTPROCESS, default="minmax",
                        help="minmax: normalise each image to its own min..max; clamp: (x + 1) / 2 clamped "
                             "(default: minmax).")
    parser.add_argument("--device", type=str, default=None,
                        help="Device to run on (cpu, cuda, cuda:N, mps); the best available one by default.")
    parser.add_argument("--precision", choices=list(PRECISIONS), default="fp32",
                        help="fp32, or fp16/bf16 autocast for the UNet (CUDA only) (default: fp32).")
    return parser


if __name__ == "__main__":
    run_cli(main)

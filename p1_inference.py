"""P1: sample 50 images per digit for MNIST-M and SVHN from a trained checkpoint (the grader's folder layout).

    python p1_inference.py OUT_DIR                                  # newest checkpoints/p1/ddpm*.safetensors
    python p1_inference.py OUT_DIR --sampler ddpm --figures outputs/p1_figures
    python p1_inference.py OUT_DIR --sampler ddim --steps 25

Writes OUT_DIR/mnistm/ and OUT_DIR/svhn/, each with exactly 500 28x28 RGB PNGs named {digit}_{index:03d}.png
(index 001..050): the grader reads the label from the first character and every file in the folder as an image.
All 1,000 images are sampled in batches, in full fp32 unless `--autocast`, then written; a folder that holds other
files is refused, never cleaned.
The default sampler is DPM-Solver++ 2M with 10 steps: how it was chosen is in BENCHMARKS.md (P1, samplers).
`--figures DIR` also writes per dataset the 10x10 grid (row = digit, column = noise) and the reverse process of
the first "0" (six snapshots from x_T to x_0, labelled with t).
"""

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from p1_model import DATASETS, NUM_DIGITS
from p1_train import DEFAULT_OUT, load_model_checkpoint
from utils import (
    Hw2Error,
    amp_dtype,
    autocast,
    ensure_writable_dir,
    get_device,
    image_generators,
    labelled_grid,
    run_cli,
    save_grid,
    save_pil,
    save_png,
    standard_normal,
    to_uint8,
)

PER_DIGIT = 50
DEFAULT_SAMPLER, DEFAULT_STEPS = "dpmpp", 10  # chosen by measurement: BENCHMARKS.md, P1, samplers side by side
SNAPSHOTS = 6  # reverse-process figure: x_T, four intermediate x_t, x_0
FIGURE_SCALE = 4  # 28x28 -> 112x112 in the reverse-process figure


def image_name(digit, index):
    """The grader's file name: label first, then a 1-based index (0_001.png .. 9_050.png)."""
    return f"{digit}_{index:03d}.png"


def sample_plan(per_digit=PER_DIGIT):
    """(dataset id, digit, index) of every image, dataset-major then digit-major: row k is image k."""
    return [(d, digit, i) for d in range(len(DATASETS)) for digit in range(NUM_DIGITS)
            for i in range(1, per_digit + 1)]


def snapshot_positions(num_states, count=SNAPSHOTS):
    """Evenly spaced positions (first and last included) in a sampler's sequence of `num_states` states."""
    return sorted({round(p) for p in np.linspace(0, num_states - 1, count)})


def find_latest_checkpoint(folder):
    """The most recently written ddpm*.safetensors in `folder` (p1_train.py writes ddpm.safetensors)."""
    candidates = sorted(Path(folder).glob("ddpm*.safetensors"), key=lambda p: p.stat().st_mtime)
    if not candidates:
        raise Hw2Error(f"no checkpoint ddpm*.safetensors in {folder}: train one with p1_train.py or pass --ckpt")
    return candidates[-1]


def check_out_dir(out_dir):
    """Refuse folders the grader would misread, and find an unwritable OUT_DIR before sampling, not after."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise Hw2Error(f"OUT_DIR {out_dir} is a file: pass a folder")
    ours = {image_name(digit, i) for digit in range(NUM_DIGITS) for i in range(1, PER_DIGIT + 1)}
    for name in DATASETS:
        folder = out_dir / name
        if folder.exists():
            others = sorted(p.name for p in folder.iterdir() if p.name not in ours)
            if others:
                raise Hw2Error(f"{folder} holds files this script does not write ({', '.join(others[:3])}...); the "
                               f"grader reads every file there: empty it or choose another OUT_DIR")
        ensure_writable_dir(folder, "OUT_DIR folder")


@torch.no_grad()
def generate(diffusion, args, device, per_digit=PER_DIGIT, keep_rows=()):
    """The images of `sample_plan(per_digit)` in [-1, 1], row by row, and for each row in `keep_rows` the
    reverse-process snapshots [(t, x_t)] at evenly spaced positions of the sampler's sequence.

    `args` carries sampler, steps, eta, guidance, seed and batch_size (this script's flags), and may carry
    autocast: True samples under the device's autocast (`utils.autocast` with native CPU bf16); without it, or
    False, sampling runs in full fp32, the network included. On a CPU the network's weights are put in
    channels_last (in place), oneDNN's fast layout for convolutions: 1.1-1.2x the guided forward, 1.1-1.4x the
    whole sampling (BENCHMARKS.md, P1, the sampling forward); it moves images by float rounding only."""
    if torch.device(device).type == "cpu":
        diffusion.to(memory_format=torch.channels_last)
    plan = sample_plan(per_digit)
    digit = torch.tensor([p[1] for p in plan], device=device)
    dataset = torch.tensor([p[0] for p in plan], device=device)
    # one generator per image draws its x_T and its sampler noise: an image does not depend on --batch-size
    generators = image_generators(args.seed, len(plan), device)
    x_T = standard_normal((len(plan), 3, 28, 28), generators, device)
    num_states = (diffusion.config.timesteps if args.sampler == "ddpm" else args.steps) + 1
    positions = set(snapshot_positions(num_states))
    images, snapshots = torch.empty_like(x_T), {row: [] for row in keep_rows}
    bar = tqdm(total=len(plan) * (num_states - 1), desc=f"sampling ({args.sampler})", unit="img-step")
    for start in range(0, len(plan), args.batch_size):
        rows = slice(start, start + args.batch_size)
        with autocast(device, enabled=getattr(args, "autocast", False), cpu_bf16=True):
            states = diffusion.sample(x_T[rows], digit[rows], dataset[rows], w=args.guidance,
                                      sampler=args.sampler, steps=args.steps, eta=args.eta, generator=generators[rows])
            for position, (t, x) in enumerate(states):
                if position in positions:
                    for row in keep_rows:
                        if start <= row < start + args.batch_size:
                            snapshots[row].append((t, x[row - start].float().cpu()))
                bar.update(x.shape[0] if position else 0)
        images[rows] = x
    bar.close()
    return images.cpu(), snapshots


def reverse_process_figure(snapshots, path):
    """One row of snapshots (t = T ... 0), each upscaled FIGURE_SCALE x with nearest neighbours, labelled with t."""
    size = 28 * FIGURE_SCALE
    tiles = [np.asarray(Image.fromarray(to_uint8(x)).resize((size, size), Image.NEAREST)) for _, x in snapshots]
    save_pil(labelled_grid([tiles], [""], [f"t = {t}" for t, _ in snapshots]), path)


def write_figures(images, snapshots, figures_dir):
    figures_dir = Path(figures_dir)
    for d, name in enumerate(DATASETS):
        first = d * NUM_DIGITS * PER_DIGIT  # row of this dataset's "0_001"
        # row = digit, column = the first 10 noises of that digit
        grid = torch.stack([images[first + digit * PER_DIGIT + i] for digit in range(NUM_DIGITS) for i in range(10)])
        save_grid(grid, figures_dir / f"p1_grid_{name}.png", nrow=10)
        reverse_process_figure(snapshots[first], figures_dir / f"p1_reverse_{name}.png")


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.batch_size < 1:
        raise Hw2Error(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.sampler != "ddpm" and not 1 <= args.steps <= 1000:
        raise Hw2Error(f"--steps must be in 1..1000 for {args.sampler}, got {args.steps}")
    if not 0 <= args.eta <= 1:
        raise Hw2Error(f"--eta must be between 0 and 1 (0 = deterministic DDIM, 1 = DDPM's noise), got {args.eta}")
    if args.eta > 0 and args.sampler != "ddim":
        raise Hw2Error(f"--eta is DDIM's noise scale; --sampler {args.sampler} does not use it: pass --sampler ddim "
                       f"or leave --eta out")
    ckpt = Path(args.ckpt) if args.ckpt else find_latest_checkpoint(DEFAULT_OUT)
    diffusion, state = load_model_checkpoint(ckpt)
    if args.sampler != "ddpm" and args.steps > diffusion.config.timesteps:
        raise Hw2Error(f"--steps {args.steps} exceeds the checkpoint's T = {diffusion.config.timesteps}")
    if args.guidance is None:
        args.guidance = state.get("train", {}).get("guidance", 0.0)
    check_out_dir(args.out_dir)
    if args.figures:
        ensure_writable_dir(args.figures, "--figures folder")
    device = get_device(args.device)
    diffusion = diffusion.to(device).eval()
    eta = f" eta {args.eta}," if args.sampler == "ddim" else ""
    steps = "" if args.sampler == "ddpm" else f" {args.steps} steps,{eta}"
    dtype = amp_dtype(device, cpu_bf16=True) if args.autocast else None
    print(f"P1 sampling from {ckpt} (epoch {state.get('epoch')}): {args.sampler},{steps} guidance w = "
          f"{args.guidance}, seed {args.seed}, on {device} in {'autocast ' + str(dtype)[6:] if dtype else 'fp32'}")
    start = time.perf_counter()
    plan = sample_plan()
    keep = [d * NUM_DIGITS * PER_DIGIT for d in range(len(DATASETS))] if args.figures else []
    images, snapshots = generate(diffusion, args, device, keep_rows=keep)
    seconds = time.perf_counter() - start
    for row, (d, digit, index) in enumerate(plan):
        save_png(images[row], Path(args.out_dir) / DATASETS[d] / image_name(digit, index))
    if args.figures:
        write_figures(images, snapshots, args.figures)
    print(f"Wrote {len(plan)} images to {args.out_dir}/{{{','.join(DATASETS)}}} in {seconds:.0f} s of sampling "
          f"({len(plan) / seconds:.1f} images/s)" + (f"; figures in {args.figures}" if args.figures else ""))


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=str, help="Folder to write mnistm/ and svhn/ into (created if missing).")
    parser.add_argument("--ckpt", type=str, default=None,
                        help=f"Checkpoint from p1_train.py; default: the newest ddpm*.safetensors in {DEFAULT_OUT}.")
    parser.add_argument("--sampler", type=str, default=DEFAULT_SAMPLER, choices=["dpmpp", "unipc", "ddim", "ddpm"],
                        help="dpmpp (DPM-Solver++ 2M) or unipc (UniPC, order 2): the high-order ODE solvers of "
                             "p1_solvers.py; ddim (--eta sets its noise); ddpm (ancestral, all T steps).")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS,
                        help=f"Number of solver or DDIM steps (ignored by ddpm); default {DEFAULT_STEPS}.")
    parser.add_argument("--eta", type=float, default=0.0,
                        help="DDIM eta in [0, 1]: 0 = deterministic, 1 = DDPM's posterior noise (DDIM only).")
    parser.add_argument("--guidance", type=float, default=None,
                        help="Classifier-free guidance weight w in (1 + w) eps(x, digit, dataset) - w eps(x, null, "
                             "dataset); 0 = plain conditional model; default: the value saved with the checkpoint's "
                             "training preset.")
    parser.add_argument("--seed", type=int, default=0,
                        help="Seed of the noise x_T and of the DDPM/eta noise; each image has its own stream.")
    parser.add_argument("--batch-size", type=int, default=250,
                        help="Images sampled at once; the images do not depend on it.")
    parser.add_argument("--figures", type=str, default=None,
                        help="Also write the report's P1 figures (10x10 grids, reverse processes) into this folder.")
    parser.add_argument("--autocast", action="store_true",
                        help="Run the network under autocast (bf16 on GPUs and CPUs with native bf16, fp16 on older "
                             "GPUs) instead of full fp32; faster on a GPU, and guidance then combines reduced-"
                             "precision outputs (BENCHMARKS.md compares the two).")
    parser.add_argument("--device", type=str, default=None, help="cpu, cuda, cuda:N or mps; default: the best.")
    return parser


if __name__ == "__main__":
    run_cli(main)

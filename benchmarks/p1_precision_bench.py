"""P1 guided sampling in full fp32 (p1_inference.py's default) against autocast (`--autocast`), side by side.

    python benchmarks/p1_precision_bench.py --ckpt checkpoints/p1/ddpm.safetensors \\
        --evaluator checkpoints/p1/evaluator.safetensors --per-digit 20

Both variants sample the same images (p1_inference.generate: the same seed, noise and labels); the autocast one
runs under `torch.autocast(device, --dtype)`, which is what `--autocast` gives on a GPU (bf16 from compute
capability 8.0 on, fp16 before); on a CPU without native bf16 the bf16 arithmetic is emulated, so only the
accuracy carries over from a CPU run, not the speed. Printed: images/s of each (median of --repeats interleaved
runs on --speed-per-digit images per digit after a warm-up), the evaluator's accuracy per dataset on the images
as the grader sees them (8-bit PNG values), how many images get another label, and the pixels that differ.
"""

import argparse
import sys
from argparse import Namespace
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.timing import interleaved_medians  # noqa: E402
from p1_data import to_model_range  # noqa: E402
from p1_eval import accuracy, load_evaluator, predict  # noqa: E402
from p1_inference import generate, sample_plan  # noqa: E402
from p1_model import DATASETS  # noqa: E402
from p1_train import load_model_checkpoint  # noqa: E402
from utils import get_device, run_cli, to_uint8  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def sample(diffusion, args, device, per_digit, dtype):
    """uint8 [N, 28, 28, 3] images of `sample_plan(per_digit)` in fp32 (dtype None) or under autocast to `dtype`."""
    settings = Namespace(sampler="ddim", steps=args.steps, eta=0.0, guidance=args.guidance, seed=args.seed,
                         batch_size=args.batch_size)
    with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        images, _ = generate(diffusion, settings, device, per_digit=per_digit)
    return to_uint8(images)


def main(argv=None):
    args = build_parser().parse_args(argv)
    device = get_device(args.device)
    diffusion, state = load_model_checkpoint(args.ckpt)
    diffusion = diffusion.to(device).eval()
    args.guidance = state["train"]["guidance"] if args.guidance is None else args.guidance
    evaluator = load_evaluator(args.evaluator, device)
    variants = {"fp32 (default)": None, f"autocast {args.dtype} (--autocast)": DTYPES[args.dtype]}

    seconds = interleaved_medians([lambda dtype=dtype: sample(diffusion, args, device, args.speed_per_digit, dtype)
                                   for dtype in variants.values()], device, args.repeats)
    speed_count = len(sample_plan(args.speed_per_digit))
    images = {name: sample(diffusion, args, device, args.per_digit, dtype) for name, dtype in variants.items()}
    plan = sample_plan(args.per_digit)
    dataset, digit = torch.tensor([p[0] for p in plan]), torch.tensor([p[1] for p in plan])
    predictions = {name: predict(evaluator, to_model_range(torch.from_numpy(x).permute(0, 3, 1, 2)).to(device)).cpu()
                   for name, x in images.items()}

    print(f"P1 guided sampling, DDIM-{args.steps}, w = {args.guidance}, seed {args.seed}, on {device}; "
          f"{args.per_digit} images per digit and dataset for accuracy, {speed_count} images for speed")
    print("| sampling | images/s | MNIST-M | SVHN | mean |")
    print("|---|---|---|---|---|")
    for (name, prediction), time_s in zip(predictions.items(), seconds):
        accs = [accuracy(prediction[dataset == d], digit[dataset == d])[0] for d in range(len(DATASETS))]
        print(f"| {name} | {speed_count / time_s:.2f} | {accs[0]:.3f} | {accs[1]:.3f} | {sum(accs) / 2:.3f} |")
    (fp32, fp32_pred), (reduced, reduced_pred) = [(images[n], predictions[n]) for n in variants]
    difference = abs(reduced.astype(int) - fp32.astype(int))
    print(f"autocast / fp32 speed: {seconds[0] / seconds[1]:.2f}x; labels that differ: "
          f"{int((fp32_pred != reduced_pred).sum())} of {len(plan)}; pixels that differ: {(difference > 0).mean():.4f} "
          f"(largest difference {difference.max()} of 255)")


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", type=str, required=True, help="P1 checkpoint from p1_train.py.")
    parser.add_argument("--evaluator", type=str, required=True, help="Evaluator from `python p1_eval.py train`.")
    parser.add_argument("--per-digit", type=int, default=20, help="Images per digit and dataset for the accuracy.")
    parser.add_argument("--speed-per-digit", type=int, default=2, help="Images per digit and dataset for the timing.")
    parser.add_argument("--repeats", type=int, default=3, help="Interleaved timing rounds (median).")
    parser.add_argument("--steps", type=int, default=25, help="DDIM steps (p1_inference.py's default: 25).")
    parser.add_argument("--guidance", type=float, default=None, help="Guidance w; default: the checkpoint's.")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="Autocast dtype (default: bf16).")
    parser.add_argument("--batch-size", type=int, default=250, help="Images sampled at once.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the noise.")
    parser.add_argument("--device", type=str, default=None, help="cpu, cuda, cuda:N or mps; default: the best.")
    return parser


if __name__ == "__main__":
    run_cli(main)

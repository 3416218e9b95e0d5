"""P2 benchmark: DDIM sampler overhead over bare UNet forwards, throughput by batch size, fp16/bf16 vs fp32.

    python benchmarks/p2_bench.py                                  # toy width (base 32) at 64x64, 20 steps
    python benchmarks/p2_bench.py --base 128 --size 64 --steps 3   # the course's width, a few steps
    python benchmarks/p2_bench.py --base 128 --size 256 --device cuda --batch-sizes 1 5 10

The model is a randomly initialised FaceUNet given the toy world's eps ~ x_t path (toy_data.wire_noise_path), so
that DDIM is not chaotic and the precisions' images can be compared; timing does not depend on the weights.
Every ratio is measured side by side in one run (one warm-up call each, then the variants alternate; median of
--repeats rounds), so it holds on a busy machine too; absolute CPU times do not.
  overhead    = time of `ddim_sample` / time of the same number of bare `model(x, t)` calls on the same batch
                (target <= 1.05: the DDIM arithmetic should cost next to nothing). On a loaded machine this
                ratio is noisy, so the sampler is also timed with a free model (eps given): the DDIM
                arithmetic alone, and 1 + arithmetic / bare, the overhead without the noise.
  throughput  = images x steps per second of sampling, by batch size
  precision   = with CUDA only: fp16 / bf16 autocast time and MSE (0-255 scale, min-max images) against fp32
"""

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.timing import interleaved_medians  # noqa: E402
from p2_ddim import ddim_sample, mse_255, precision_context, to_display  # noqa: E402
from p2_unet import FaceUNet  # noqa: E402
from toy_data import wire_noise_path  # noqa: E402
from utils import get_device, to_uint8  # noqa: E402


def bare_forwards(model, x, steps):
    """`steps` UNet calls on the same batch, no DDIM arithmetic: the floor the sampler cannot beat."""
    t = torch.full((x.shape[0],), 981.0, device=x.device)
    with torch.no_grad():
        for _ in range(steps):
            model(x, t)


def precision_comparison(model, x, steps, device, repeats, precisions=("fp32", "fp16", "bf16")):
    """{precision: (median seconds, mean MSE against fp32 on the 0-255 scale)} of DDIM from the noises `x` with
    p2_ddim's --precision contexts (fp32 without TF32); the images are min-max post-processed as p2_ddim writes them."""
    def sampler_at(precision):
        def sample():
            with precision_context(device, precision):
                return ddim_sample(model, x, steps)
        return sample

    samplers = [sampler_at(precision) for precision in precisions]
    seconds = interleaved_medians(samplers, device, repeats)
    images = {precision: to_uint8(to_display(sample().cpu())) for precision, sample in zip(precisions, samplers)}
    return {precision: (time_s, float(np.mean([mse_255(a, b) for a, b in zip(images[precision], images["fp32"])])))
            for precision, time_s in zip(precisions, seconds)}


def main(argv=None):
    args = build_parser().parse_args(argv)
    device = get_device(args.device)
    torch.manual_seed(args.seed)
    model = wire_noise_path(FaceUNet(base=args.base)).eval().to(device)
    print(f"FaceUNet base {args.base}, {args.size}x{args.size}, {args.steps} DDIM steps, on {device} "
          f"({torch.get_num_threads()} CPU threads), median of {args.repeats}.\n")
    print("| batch | sampler s | bare forwards s | overhead | DDIM arithmetic s | 1 + arithmetic / bare "
          "| images x steps / s |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for batch in args.batch_sizes:
        x = torch.randn(batch, 3, args.size, args.size, device=device)
        eps = torch.randn_like(x)
        sampler, bare, arithmetic = interleaved_medians([
            lambda: ddim_sample(model, x, args.steps),
            lambda: bare_forwards(model, x, args.steps),
            lambda: ddim_sample(lambda x_t, t: eps, x, args.steps),  # the sampler with a free model
        ], device, args.repeats)
        print(f"| {batch} | {sampler:.3f} | {bare:.3f} | {sampler / bare:.3f} | {arithmetic:.4f} "
              f"| {1 + arithmetic / bare:.4f} | {batch * args.steps / sampler:.1f} |")

    if device.type != "cuda":
        print("\nfp16/bf16 vs fp32: skipped, autocast precision is only measured with CUDA (pass --device cuda).")
        return
    batch = args.batch_sizes[-1]
    x = torch.randn(batch, 3, args.size, args.size, device=device)
    print(f"\n| precision (batch {batch}) | time s | speed-up vs fp32 | MSE vs fp32 (0-255) |")
    print("|---|---:|---:|---:|")
    results = precision_comparison(model, x, args.steps, device, args.repeats)
    for precision, (seconds, mse) in results.items():
        print(f"| {precision} | {seconds:.3f} | {results['fp32'][0] / seconds:.2f} | {mse:.3f} |")


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", type=int, default=32, help="UNet base width: 32 (toy) or 128 (course) (default: 32).")
    parser.add_argument("--size", type=int, default=64, help="Image side, a multiple of 32 (default: 64).")
    parser.add_argument("--steps", type=int, default=20, help="DDIM steps per sample (default: 20).")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2, 4, 10],
                        help="Batch sizes to time, in order (default: 1 2 4 10).")
    parser.add_argument("--repeats", type=int, default=3,
                        help="Timed rounds per measurement after one warm-up call; the median counts (default: 3).")
    parser.add_argument("--device", type=str, default=None, help="Device (cpu, cuda, mps); the best available by "
                                                                 "default.")
    parser.add_argument("--seed", type=int, default=0, help="Seed for the random weights and inputs (default: 0).")
    return parser


if __name__ == "__main__":
    main()

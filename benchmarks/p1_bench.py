"""P1 benchmark: training and sampling throughput, and evaluator accuracy and FD_eval per sampler and guidance weight.

    python benchmarks/p1_bench.py --ckpt checkpoints/p1/ddpm.safetensors --data hw2_data/digits \
        --report outputs/p1_bench.md

Everything is measured side by side in one run on one device: each timed variant is called once to warm up, then
the variants alternate for --repeats rounds and each reports its median, so the ratios hold on a busy machine.
Training times p1_train.train_step (fp32 against p1_train.py's autocast); sampling speed is timed on a small
batch and reported per image; accuracy uses `--per-digit` images per digit and dataset (one standard error is
about sqrt(p (1 - p) / (10 * per_digit)) per dataset) scored by the evaluator of `p1_eval.py train`, and FD_eval
(`p1_eval.fd_eval`: the Fréchet distance to the real val images in the evaluator's features, beside the floor of
two real halves with as many images). `--train-steps 0` and `--speed-images 0` skip the two speed measurements.
"""

import argparse
import copy
import sys
import time
from argparse import Namespace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.timing import interleaved_medians  # noqa: E402
from p1_data import load_split, to_model_range  # noqa: E402
from p1_eval import EVALUATOR_NAME, accuracy, fd_eval, load_evaluator, predict, real_halves  # noqa: E402
from p1_inference import find_latest_checkpoint, generate, sample_plan  # noqa: E402
from p1_model import DATASETS, SOLVERS, Diffusion, final  # noqa: E402
from p1_train import (  # noqa: E402
    DEFAULT_DATA,
    DEFAULT_OUT,
    TRAIN_PRESETS,
    TrainSettings,
    build_optimization,
    load_model_checkpoint,
    train_step,
)
from utils import Hw2Error, amp_dtype, atomic_write_text, get_device, run_cli, to_uint8  # noqa: E402

SAMPLER_NAMES = {"ddpm": "DDPM", "ddim": "DDIM", "dpmpp": "DPM-Solver++", "unipc": "UniPC"}


def training_steps(config, images, digits, dataset_ids, batch_size, steps, device, dtype):
    """A function that runs `steps` of p1_train.train_step on random batches of a fresh model, at `dtype`
    (torch.float32, or None for p1_train.py's autocast)."""
    diffusion = Diffusion(config).to(device).train()
    ema = copy.deepcopy(diffusion).requires_grad_(False)
    settings = TrainSettings(**{**TRAIN_PRESETS["toy"], "batch_size": batch_size, "limit": 0, "seed": 0})
    optimization = build_optimization(diffusion, settings, 10**6, device)
    generator = torch.Generator().manual_seed(0)

    def run():
        for _ in range(steps):
            idx = torch.randint(0, len(images), (batch_size,), generator=generator)
            batch = (to_model_range(images[idx]).to(device), digits[idx].to(device), dataset_ids[idx].to(device))
            train_step(diffusion.net, diffusion, ema, optimization, batch, settings, dtype=dtype)
    return run


def sampling(diffusion, sampler, steps, guidance, count, device):
    """A function that samples `count` guided images (x_T to x_0) with `sampler`."""
    x_T = torch.randn(count, 3, 28, 28, generator=torch.Generator().manual_seed(0)).to(device)
    labels = torch.arange(count, device=device) % 10

    @torch.no_grad()
    def run():
        final(diffusion.sample(x_T, labels, labels % 2, w=guidance, sampler=sampler, steps=steps))
    return run


def sampler_accuracy(diffusion, evaluator, halves, sampler, steps, guidance, per_digit, batch_size, device, tta=False):
    """Per dataset the evaluator accuracy and (FD_eval, floor) of `per_digit` images per digit (`halves`: the real
    val features of `p1_eval.real_halves`), and the seconds the sampling took."""
    settings = Namespace(sampler=sampler, steps=steps, eta=0.0, guidance=guidance, seed=0, batch_size=batch_size)
    start = time.perf_counter()
    images, _ = generate(diffusion, settings, device, per_digit=per_digit)
    seconds = time.perf_counter() - start
    # score what the grader sees: images rounded to 8-bit PNG values (clamped to [-1, 1])
    images = to_model_range(torch.from_numpy(to_uint8(images)).permute(0, 3, 1, 2))
    plan = sample_plan(per_digit)
    dataset = torch.tensor([p[0] for p in plan])
    digit = torch.tensor([p[1] for p in plan])
    accs = [accuracy(predict(evaluator, images[dataset == d].to(device), tta=tta), digit[dataset == d])[0]
            for d in range(len(DATASETS))]
    fds = [fd_eval(evaluator, images[dataset == d].to(device), halves[d]) for d in range(len(DATASETS))]
    return accs, fds, seconds


def training_speed(args, config, state, device):
    """The report lines of p1_train.train_step's speed, fp32 against p1_train.py's autocast, side by side."""
    images, digits, dataset_ids = load_split(args.data, "train", limit=args.train_images)
    batch_size = args.batch_size or state.get("train", {}).get("batch_size", 64)
    fp32, mixed = interleaved_medians([
        training_steps(config, images, digits, dataset_ids, batch_size, args.train_steps, device, dtype)
        for dtype in (torch.float32, None)], device, args.repeats)
    rate = {name: args.train_steps * batch_size / seconds for name, seconds in (("fp32", fp32), ("mixed", mixed))}
    dtype = amp_dtype(device, cpu_bf16=True)
    line = (f"- Training (batch {batch_size}, {args.train_steps} steps of p1_train.train_step, median of "
            f"{args.repeats}): fp32 {rate['fp32']:.0f} images/s; as p1_train.py runs it "
            f"({'autocast ' + str(dtype).replace('torch.', '') if dtype else 'fp32: no native bf16'}) "
            f"{rate['mixed']:.0f} images/s = {rate['mixed'] / rate['fp32']:.2f}x.")
    print(line, flush=True)
    return [line, ""]


def accuracy_row(sampler, steps, guidance, images, accs, fds, images_per_s):
    """One row of the accuracy table (read back by report_p1.guidance_sweep): accs per dataset, fds per dataset as
    (FD_eval, floor), `images` per dataset."""
    return (f"| {SAMPLER_NAMES[sampler]}-{steps} | {guidance:g} | {images} | {accs[0]:.3f} | {accs[1]:.3f} | "
            f"{sum(accs) / 2:.3f} | {fds[0][0]:.1f} ({fds[0][1]:.1f}) | {fds[1][0]:.1f} ({fds[1][1]:.1f}) | "
            f"{images_per_s:.2f} |")


def parse_runs(text, per_digit):
    """"ddim:25:0,ddpm:1000:4:2" -> [("ddim", 25, 0.0, per_digit), ("ddpm", 1000, 4.0, 2)]."""
    runs = []
    for item in text.split(","):
        try:
            sampler, steps, guidance, *count = item.split(":")
            runs.append((sampler, int(steps), float(guidance), int(count[0]) if count else per_digit))
        except (ValueError, IndexError) as err:
            raise Hw2Error(f"--runs item {item!r} is not sampler:steps:guidance[:per_digit] (e.g. ddim:50:4)") from err
        if sampler not in ("ddim", "ddpm", *SOLVERS) or len(count) > 1:
            raise Hw2Error(f"--runs item {item!r}: the sampler must be ddim, ddpm, {', '.join(SOLVERS)}, then "
                           f"steps:guidance[:per_digit]")
    return runs


def main(argv=None):
    args = build_parser().parse_args(argv)
    device = get_device(args.device)
    ckpt = Path(args.ckpt) if args.ckpt else find_latest_checkpoint(DEFAULT_OUT)
    diffusion, state = load_model_checkpoint(ckpt, args.weights)
    diffusion = diffusion.to(device).eval()
    config = diffusion.config
    lines = [f"## P1 benchmark ({args.machine})", "",
             f"Checkpoint `{ckpt}` ({args.weights} weights, epoch {state.get('epoch')}, schedule {config.schedule}, "
             f"prediction {config.prediction}, {sum(p.numel() for p in diffusion.parameters()) / 1e6:.2f} M "
             f"parameters), device {device}, {torch.get_num_threads()} torch threads.", ""]

    if args.train_steps > 0:
        lines += training_speed(args, config, state, device)
    samplers = [("ddpm", config.timesteps), ("ddim", 100), ("ddim", 50), ("ddim", 25), ("dpmpp", 10), ("unipc", 10)]
    if args.speed_images > 0:
        seconds = interleaved_medians([sampling(diffusion, sampler, steps, args.guidance, args.speed_images, device)
                                       for sampler, steps in samplers], device, args.repeats)
        lines += [f"Sampling {args.speed_images} images per call (guided, w = {args.guidance}), median of "
                  f"{args.repeats}:", "", "| sampler | images/s | s per image | speed-up vs DDPM-1000 |",
                  "|---|---|---|---|"]
        for (sampler, steps), time_s in zip(samplers, seconds):
            lines.append(f"| {SAMPLER_NAMES[sampler]}-{steps} | {args.speed_images / time_s:.2f} | "
                         f"{time_s / args.speed_images:.3f} | {seconds[0] / time_s:.1f}x |")
            print(lines[-1], flush=True)

    if args.runs:
        evaluator = load_evaluator(args.evaluator, device)
        halves = real_halves(evaluator, args.data, device)
        lines += ["", f"Evaluator accuracy and FD_eval (seed 0; images = per dataset; FD_eval against "
                  f"{len(halves[0][0])} / {len(halves[1][0])} real MNIST-M / SVHN val images, in brackets two "
                  f"real halves with as many images{'; --tta' if args.tta else ''}):", "",
                  "| sampler | guidance w | images | MNIST-M | SVHN | mean | FD_eval MNIST-M | FD_eval SVHN | "
                  "images/s |", "|---|---|---|---|---|---|---|---|---|"]
        for sampler, steps, guidance, per_digit in parse_runs(args.runs, args.per_digit):
            accs, fds, seconds = sampler_accuracy(diffusion, evaluator, halves, sampler, steps, guidance, per_digit,
                                                  args.sample_batch, device, args.tta)
            lines.append(accuracy_row(sampler, steps, guidance, 10 * per_digit, accs, fds, 20 * per_digit / seconds))
            print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    if args.report:
        atomic_write_text(args.report, text)
        print(f"Wrote {args.report}")
    return text


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", type=str, default=None,
                        help=f"Diffusion checkpoint; default: the newest ddpm*.safetensors in {DEFAULT_OUT}.")
    parser.add_argument("--weights", type=str, default="ema", choices=["ema", "model"],
                        help="Sample with the checkpoint's EMA weights (as p1_inference.py does) or its training "
                             "weights (for a short run, whose EMA still holds much of the initial network).")
    parser.add_argument("--data", type=str, default=DEFAULT_DATA, help="Digits folder for the training timing.")
    parser.add_argument("--evaluator", type=str, default=str(Path(DEFAULT_OUT) / EVALUATOR_NAME),
                        help="Evaluator checkpoint from `p1_eval.py train`.")
    parser.add_argument("--train-images", type=int, default=256, help="Training images per dataset to load.")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="Batch size of the training timing; default: the checkpoint's training batch size.")
    parser.add_argument("--train-steps", type=int, default=10,
                        help="Optimizer steps per timed call; 0 skips the training-speed measurement.")
    parser.add_argument("--repeats", type=int, default=3,
                        help="Timed rounds of every training and sampling variant, after one warm-up call each; "
                             "the median is shown.")
    parser.add_argument("--speed-images", type=int, default=8,
                        help="Images per sampling-speed measurement; 0 skips it.")
    parser.add_argument("--guidance", type=float, default=5.0, help="Guidance weight of the speed measurements.")
    parser.add_argument("--runs", type=str,
                        default="dpmpp:10:0,dpmpp:10:1,dpmpp:10:2,dpmpp:10:3,dpmpp:10:5,dpmpp:10:7,dpmpp:10:10,"
                                "unipc:10:5,ddim:25:5,ddim:50:5,ddpm:1000:5",
                        help="Accuracy runs as sampler:steps:guidance[:per_digit], comma-separated; empty to skip.")
    parser.add_argument("--per-digit", type=int, default=10, help="Images per digit and dataset per accuracy run.")
    parser.add_argument("--sample-batch", type=int, default=250, help="Batch size of the accuracy runs.")
    parser.add_argument("--tta", action="store_true",
                        help="Score with the evaluator's test-time augmentation (as `p1_eval.py score --tta`) "
                             "instead of one plain argmax per image.")
    parser.add_argument("--machine", type=str, default="2-core CPU, no GPU",
                        help="Description of the machine, for the report's heading.")
    parser.add_argument("--report", type=str, default=None, help="Also write the markdown table to this file.")
    parser.add_argument("--device", type=str, default=None, help="cpu, cuda, cuda:N or mps; default: the best.")
    return parser


if __name__ == "__main__":
    run_cli(main)

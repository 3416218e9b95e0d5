"""P1 sampling speed: the levers of the guided network forward that p1_inference.py runs, side by side, and the
start-up that every `python p1_inference.py` pays before it.

    python benchmarks/p1_sampling_bench.py --ckpt checkpoints/p1/ddpm.safetensors
    python benchmarks/p1_sampling_bench.py --levers default "torch.compile" --startup 0

Every variant computes p1_model.guided_output (one batched forward of the conditional and the digit-dropped half,
guidance w = 5) for the same `--images` noisy images at the timestep of a DPM-Solver++ step, in batches as
p1_inference.py cuts them:

    default         p1_inference.py's forward: eager, fp32, `--batch-size` images (2 x as many network rows)
    channels_last   the model and the images in channels_last memory format
    jit.freeze      torch.jit.trace, then torch.jit.freeze + optimize_for_inference (oneDNN: folded, prepacked
                    weights); TorchScript is deprecated in torch 2.x, so this is a yardstick, not a candidate
    torch.compile   the network under torch.compile (Inductor); its first call compiles, from an empty cache (a
                    fresh TORCHINDUCTOR_CACHE_DIR) as on a grader's machine
    half batch      half of `--batch-size` per forward, twice the forwards
    double batch    twice `--batch-size` per forward, half the forwards
    2 workers       the batches shared between two Python threads of one torch thread each, instead of every
                    forward split across torch's threads (CPU only: batches in parallel rather than each op)

The variants alternate (benchmarks/timing.interleaved_medians); each reports network evaluations per second, its
ratio to the default, its first call, and the largest difference of its output from the default's (a lever may
change an image by float rounding only). `--startup N` also times N fresh interpreters that import p1_inference and
its default solver's diffusers class against N that `import torch`: what the grader waits for before the first step.
"""

import argparse
import copy
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from unittest import mock

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.timing import interleaved_medians  # noqa: E402
from p1_inference import find_latest_checkpoint  # noqa: E402
from p1_model import guided_output  # noqa: E402
from p1_train import DEFAULT_OUT, load_model_checkpoint  # noqa: E402
from utils import Hw2Error, get_device, run_cli  # noqa: E402

GUIDANCE = 5.0
TIMESTEP = 899  # the second of DPM-Solver++-10's trailing timesteps; the forward's cost does not depend on it
LEVERS = {"default": {}, "channels_last": {"channels_last": True}, "jit.freeze": {"freeze": True},
          "torch.compile": {"compile": True}, "half batch": {"batch_factor": 0.5},
          "double batch": {"batch_factor": 2}, "2 workers": {"workers": 2}}


def sampling_inputs(count, device, seed=0):
    """`count` noisy images with their timestep, digits 0-9 and dataset ids (first half 0, then 1), as one step of
    p1_inference.py sees them."""
    generator = torch.Generator().manual_seed(seed)
    x_t = torch.randn(count, 3, 28, 28, generator=generator).to(device)
    digit = torch.arange(count, device=device) % 10
    return x_t, torch.full((count,), TIMESTEP, device=device), digit, torch.arange(count, device=device) * 2 // count


def lever_forward(net, inputs, batch_size, channels_last=False, freeze=False, compile=False, batch_factor=1,
                  workers=1):
    """A function that returns the guided output of `inputs` through `net` (eval mode) with one lever applied,
    in batches of `batch_size` * `batch_factor` images, on `workers` Python threads (more than one: each with one
    torch thread)."""
    batch_size = max(1, int(batch_size * batch_factor))
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    net = copy.deepcopy(net).to(memory_format=memory_format)
    x_t, t, digit, dataset = inputs
    x_t = x_t.contiguous(memory_format=memory_format)
    if freeze:
        doubled = [torch.cat([values[:batch_size]] * 2) for values in (x_t, t, digit, dataset)]
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)  # GroupNorm's shape check, fixed for the trace
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated: measured here, not adopted
            net = torch.jit.optimize_for_inference(torch.jit.freeze(torch.jit.trace(net, doubled)))
    if compile:
        net = torch.compile(net)

    @torch.no_grad()
    def batch(i):
        return guided_output(net, x_t[i:i + batch_size], t[i:i + batch_size], digit[i:i + batch_size],
                             dataset[i:i + batch_size], GUIDANCE)

    def run():
        starts = range(0, len(x_t), batch_size)
        if workers == 1:
            return torch.cat([batch(i) for i in starts])
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            with ThreadPoolExecutor(workers) as pool:
                return torch.cat(list(pool.map(batch, starts)))
        finally:
            torch.set_num_threads(threads)
    return run


def compare_levers(net, inputs, batch_size, device, repeats, names=tuple(LEVERS)):
    """{lever: (network evaluations/s, seconds of its first call, largest |output - default output|)} for the
    LEVERS `names` ("default" first), interleaved."""
    names = ["default", *(name for name in names if name != "default")]
    runs = [lever_forward(net, inputs, batch_size, **LEVERS[name]) for name in names]
    first_seconds = []
    seconds = interleaved_medians(runs, device, repeats, first_seconds)
    reference = runs[0]()
    evaluations = 2 * len(inputs[0])
    return {name: (evaluations / time_s, first_s, float((run() - reference).abs().max()))
            for name, run, time_s, first_s in zip(names, runs, seconds, first_seconds)}


def startup_seconds(statement, count):
    """Median wall seconds of `count` fresh interpreters that run `statement` in the repository root."""
    seconds = []
    for _ in range(count):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", statement], cwd=REPO, check=True)
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.images < 1 or args.batch_size < 1 or args.repeats < 1:
        raise Hw2Error("--images, --batch-size and --repeats must be >= 1")
    device = get_device(args.device)
    ckpt = Path(args.ckpt) if args.ckpt else find_latest_checkpoint(DEFAULT_OUT)
    diffusion, _ = load_model_checkpoint(ckpt)
    net = diffusion.net.to(device).eval()
    # torch.compile's first call compiles from an empty cache, as on a machine that never ran it
    with tempfile.TemporaryDirectory(prefix="p1_sampling_bench_") as cache, \
            mock.patch.dict(os.environ, {"TORCHINDUCTOR_CACHE_DIR": cache}):
        results = compare_levers(net, sampling_inputs(args.images, device), args.batch_size, device, args.repeats,
                                 args.levers)
    print(f"P1 guided forward (w = {GUIDANCE:g}), {args.images} images per call in batches of {args.batch_size}, "
          f"median of {args.repeats}, on {device} with {torch.get_num_threads()} threads, checkpoint {ckpt}:")
    for name, (rate, first_s, difference) in results.items():
        print(f"  {name:<14} {rate:8.1f} evaluations/s  {rate / results['default'][0]:5.2f}x   first call "
              f"{first_s:5.1f} s   largest output difference {difference:.1e}")
    if args.startup > 0:
        torch_s = startup_seconds("import torch", args.startup)
        script_s = startup_seconds("import p1_inference, p1_solvers; "
                                   "p1_solvers.solver_class(p1_inference.DEFAULT_SAMPLER)", args.startup)
        print(f"Start-up, median of {args.startup} fresh interpreters: import torch {torch_s:.1f} s, import "
              f"p1_inference and its default solver (torch, diffusers, PIL) {script_s:.1f} s")
    return results


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", type=str, default=None,
                        help=f"Diffusion checkpoint; default: the newest ddpm*.safetensors in {DEFAULT_OUT}.")
    parser.add_argument("--images", type=int, default=500, help="Images per timed call (default: 500).")
    parser.add_argument("--batch-size", type=int, default=250,
                        help="Images per forward of the default, as p1_inference.py's --batch-size (default: 250).")
    parser.add_argument("--levers", nargs="+", choices=list(LEVERS), default=list(LEVERS),
                        help="The variants to time against the default (default: all).")
    parser.add_argument("--repeats", type=int, default=5, help="Interleaved timed rounds (default: 5).")
    parser.add_argument("--startup", type=int, default=3,
                        help="Fresh interpreters per start-up measurement; 0 skips it (default: 3).")
    parser.add_argument("--device", type=str, default=None, help="cpu, cuda, cuda:N or mps; default: the best.")
    return parser


if __name__ == "__main__":
    run_cli(main)

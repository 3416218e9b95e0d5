"""Benchmark p3_textual_inversion: training step time and peak memory, fp32 vs mixed precision and gradient
checkpointing, and generation images/s.

    python -m benchmarks.p3_ti_bench                        # from the repository root; tiny toy SD on CPU
    python -m benchmarks.p3_ti_bench --model sd14-config    # SD v1.4's architecture (random weights), for a GPU

Each training configuration runs `p3_textual_inversion.train_step` (VAE encode, text encoder, UNet forward and
backward, AdamW, row restore) in a fresh process, so each peak memory is its own: on CUDA
`torch.cuda.max_memory_allocated` over the steps; on CPU the resident set (/proc/self/statm) sampled every 2 ms
during the steps -- its peak, and that peak minus the resident set just before the first step (what the steps
add to the loaded model) -- next to the process's `ru_maxrss` (the whole run, model loading included). Neither
tracemalloc (blind to torch's C++ allocations) nor ru_maxrss alone (dominated by loading) shows a step's peak.
Speed and memory do not depend on the weights, so SD v1.4's
architecture with random weights stands in for the real checkpoint. The tiny toy model (32 px) checks the code
path only: its ratios say little about SD.
"""

import argparse
import ctypes
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from diffusers import DDPMScheduler

import p3_textual_inversion as ti
from p3_concepts import add_placeholder_tokens, sample_images, set_scheduler
from p3_training import prepare_for_training
from sd_v1 import SD_V1_CONFIG, load_sd_pipeline, random_pipeline
from toy_data import TINY_SD_DIR, build_tiny_sd
from utils import Hw2Error, get_device, run_cli, seed_everything

REPO = Path(__file__).resolve().parents[1]


def load_bench_pipeline(model, dtype=torch.float32):
    return random_pipeline(SD_V1_CONFIG).to(dtype=dtype) if model == "sd14-config" else load_sd_pipeline(model, dtype)


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def resident_mb():
    """The current resident set of this process in MB (Linux /proc)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * resource.getpagesize() / 2**20


class PeakRss:
    """Sample this process's resident set every `interval` seconds in a thread; `peak_mb` is the highest seen.

    On CPU torch frees activations straight back to the allocator, so the peak of a training step shows only
    while it runs: sampling catches it, where ru_maxrss would still hold the (larger) model-loading peak.
    """

    def __init__(self, interval=0.002):
        self.interval, self.peak_mb = interval, resident_mb()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._done.wait(self.interval):
            self.peak_mb = max(self.peak_mb, resident_mb())

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._done.set()
        self._thread.join()
        self.peak_mb = max(self.peak_mb, resident_mb())


def train_worker(job):
    """Time `steps` optimizer steps of one configuration (`grad_accum` forward passes of `batch_size` images each,
    1 unless given); return the median step time, peak memory and last loss."""
    device = torch.device(job["device"])
    seed_everything(0)
    pipe = load_bench_pipeline(job["model"])
    resolution = job["resolution"] or pipe.unet.config.sample_size * pipe.vae_scale_factor
    new_ids = add_placeholder_tokens(pipe.tokenizer, pipe.text_encoder, "<bench>", 1, "dog")
    embedding, autocast, scaler = prepare_for_training(pipe, device, job["mixed_precision"], job["checkpointing"])
    original = embedding.weight.detach().clone()
    optimizer = torch.optim.AdamW([embedding.weight], lr=1e-3)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    pixels = torch.rand(job["batch_size"], 3, resolution, resolution) * 2 - 1
    input_ids = pipe.tokenizer(["a photo of a <bench>"] * job["batch_size"], padding="max_length", max_length=77,
                               return_tensors="pt").input_ids

    losses = []

    def step():
        losses.append(ti.train_step(pipe, noise_scheduler, lambda: (pixels, input_ids), job.get("grad_accum", 1),
                                    optimizer, scaler, autocast, original, new_ids))

    return {**timed_steps(step, job["steps"], device), "resolution": resolution, "loss": losses[-1]}


def timed_steps(step, steps, device):
    """Run `step()` steps + 1 times; the median time of all but the first, and the peak memory (see the docstring)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    ctypes.CDLL(None).malloc_trim(0)  # glibc: hand freed model-loading memory back, so RSS starts from the model
    rss_before = resident_mb()
    times = []
    with PeakRss() as rss:
        for _ in range(steps + 1):  # the first step warms up kernels and the allocator and is not timed
            start = time.perf_counter()
            step()
            synchronize(device)
            times.append(time.perf_counter() - start)
    if device.type == "cuda":
        memory = {"peak_mb": torch.cuda.max_memory_allocated(device) / 2**20}
    else:
        memory = {"peak_mb": rss.peak_mb, "step_mb": rss.peak_mb - rss_before,
                  "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    return {"step_s": statistics.median(times[1:]), **memory}


def generate_worker(job):
    """Images/s of p3_concepts.sample_images (DPM-Solver++, the generate default); the last batch's shape, whether
    all its pixels are finite, and the weights' dtype."""
    device = torch.device(job["device"])
    dtype = torch.float16 if device.type == "cuda" else torch.float32  # what generate uses
    pipe = load_bench_pipeline(job["model"], dtype).to(device)
    set_scheduler(pipe, "dpm")
    seeds = list(range(job["batch_size"]))
    sample_images(pipe, "a photo of a dog", seeds, 2, 7.5, job["resolution"])  # warm-up
    synchronize(device)
    start = time.perf_counter()
    for _ in range(job["repeats"]):
        images = sample_images(pipe, "a photo of a dog", seeds, job["steps"], 7.5, job["resolution"])
    synchronize(device)
    return {"images_per_s": job["repeats"] * job["batch_size"] / (time.perf_counter() - start),
            "shape": list(images.shape), "finite": bool(torch.isfinite(images).all()),
            "dtype": str(dtype).removeprefix("torch.")}


def run_worker(job, module="benchmarks.p3_ti_bench"):
    """Run one job in a fresh Python process of `module` (its own peak memory) and return its JSON result."""
    result = subprocess.run([sys.executable, "-m", module, "--worker", json.dumps(job)], cwd=REPO,
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise Hw2Error(f"benchmark worker failed for {job}: {result.stderr.strip().splitlines()[-1]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.worker:
        job = json.loads(args.worker)
        if job["threads"]:
            torch.set_num_threads(job["threads"])
        print(json.dumps(train_worker(job) if job["kind"] == "train" else generate_worker(job)))
        return
    device = get_device(args.device)
    args.model = args.model or ("sd14-config" if device.type == "cuda" else "tiny")
    mixed = "fp16" if device.type == "cuda" else "bf16"  # CPU autocast's fast half type is bf16
    with tempfile.TemporaryDirectory() as tmp:
        if args.model == "tiny":
            build_tiny_sd(Path(tmp), 0)
            model = str(Path(tmp) / TINY_SD_DIR)
        else:
            model = args.model
        base = {"device": str(device), "model": model, "batch_size": args.batch_size, "threads": args.threads,
                "resolution": args.resolution}
        configs = [("fp32", "no", False), ("fp32 + checkpointing", "no", True), (mixed, mixed, False),
                   (f"{mixed} + checkpointing", mixed, True)]
        rows = []
        for name, precision, checkpointing in configs:
            result = run_worker({**base, "kind": "train", "mixed_precision": precision, "checkpointing": checkpointing,
                                 "steps": args.steps})
            rows.append((name, result))
            print(f"{name}: {result}", file=sys.stderr)
        generation = run_worker({**base, "kind": "generate", "batch_size": args.gen_batch_size, "steps": 25,
                                 "repeats": args.gen_repeats})
    fp32 = rows[0][1]
    label = "tiny toy SD" if args.model == "tiny" else args.model
    print(f"### Textual inversion, {label} ({rows[0][1]['resolution']} px), {device}, batch {args.batch_size}, "
          f"{args.threads or torch.get_num_threads()} torch thread(s)\n")
    if device.type == "cuda":
        print("| configuration | step time (s) | x fp32 | peak memory (MB, torch.cuda.max_memory_allocated) |")
        print("|---|---|---|---|")
        for name, result in rows:
            print(f"| {name} | {result['step_s']:.3f} | {result['step_s'] / fp32['step_s']:.2f} | "
                  f"{result['peak_mb']:.0f} |")
    else:
        print("| configuration | step time (s) | x fp32 | peak RSS in steps (MB) | of which the steps (MB) | "
              "process ru_maxrss (MB) |")
        print("|---|---|---|---|---|---|")
        for name, result in rows:
            print(f"| {name} | {result['step_s']:.3f} | {result['step_s'] / fp32['step_s']:.2f} | "
                  f"{result['peak_mb']:.0f} | {result['step_mb']:.0f} | {result['maxrss_mb']:.0f} |")
    print(f"\nGeneration (DPM-Solver++, 25 steps, guidance 7.5, batch {args.gen_batch_size}, same size): "
          f"{generation['images_per_s']:.2f} images/s")


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None,
                        help="tiny (the toy model, built in a temp folder), sd14-config (SD v1.4's architecture, "
                             "random weights), or a diffusers folder / .ckpt (default: sd14-config with CUDA, "
                             "else tiny).")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: the best available).")
    parser.add_argument("--resolution", type=int, default=None,
                        help="Image size in pixels (default: the model's own, 512 for SD v1.4, 32 for the toy).")
    parser.add_argument("--batch-size", type=int, default=1, help="Training images per step.")
    parser.add_argument("--steps", type=int, default=5, help="Timed training steps per configuration.")
    parser.add_argument("--gen-batch-size", type=int, default=5, help="Images per generation call.")
    parser.add_argument("--gen-repeats", type=int, default=2, help="Timed generation calls.")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads (0: torch's default); 1 avoids spinning threads on a busy machine.")
    parser.add_argument("--worker", default=None, help="Internal: run one JSON job and print its result.")
    return parser


if __name__ == "__main__":
    run_cli(main)

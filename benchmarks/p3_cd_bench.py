"""Benchmark Custom Diffusion beside textual inversion: trainable parameters, training step time and peak memory
measured side by side in one run, and an estimate for a GPU.

    python -m benchmarks.p3_cd_bench --resolution 128 --threads 1 --steps 1     # SD v1.4's architecture on CPU
    python -m benchmarks.p3_cd_bench --model tiny --steps 5                      # the toy model: the code path only

1. Trainable parameters, counted on SD v1.4's architecture built on the meta device (shapes only): textual inversion
   (TI) learns 768 numbers per token; Custom Diffusion (CD) also learns W_k and W_v of every cross-attention layer.
2. Step time and peak memory of each configuration in a fresh process (p3_ti_bench's workers and memory sampling),
   SD v1.4's architecture with random weights (speed and memory do not depend on the weights): TI's and CD's own
   `train_step` -- TI at batch 1, CD at batch 1 without prior preservation (the method's own cost) and at batch 1
   + 1 class image (prior preservation doubles the UNet's batch) -- in fp32 and under bf16 autocast.
3. An ESTIMATE for a GPU at 512 px with fp16 weights, both methods at their default batch (TI 4; CD 2 + 2 class
   images): the FLOPs of one step counted by torch.utils.flop_counter on the meta device (VAE encoding, text encoder
   and UNet forward and backward), as time at an assumed sustained throughput; memory as the weights, the trained
   parameters' gradients and AdamW state, and the tensors autograd keeps for backward, also counted on the meta
   device. The N x N self-attention probabilities are listed apart: a fused attention kernel (flash or memory-
   efficient SDPA, the GPU default) does not keep them. The same counter is printed for the CPU configuration, next
   to what part 2 measured there, as a check of the estimator.
4. The same ESTIMATE for the training defaults, former and current: textual inversion in fp32 at batch 4 (its former
   default) against fp16 with gradient checkpointing at batch 1 x 4 accumulation steps (its default on CUDA), and
   Custom Diffusion in fp32 against fp16 with checkpointing at 2 + 2 class images. Checkpointing is counted by
   handing diffusers a checkpointing function that counts (`CheckpointedBlocks`): a block keeps its inputs, and
   backward recomputes one block at a time.
5. Custom Diffusion's class images in RAM: 200 per concept held as the 640 px fp32 tensors training crops from
   (computed), and measured as the process's resident set after loading them all (`load_concept_images`) against
   `p3_concepts.LazyImages`, which reads an image when a batch draws it (also timed per image).

    python -m benchmarks.p3_cd_bench --parts defaults class-images     # parts 4 and 5 only (about 2 minutes)
"""

import argparse
import ctypes
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode
from transformers import CLIPTextConfig, CLIPTextModel

import p3_custom_diffusion as cd
from benchmarks.p3_ti_bench import load_bench_pipeline, resident_mb, run_worker, timed_steps
from benchmarks.p3_ti_bench import train_worker as ti_train_worker
from custom_diffusion_io import set_processors, trainable_processors
from p3_concepts import PRE_RESIZE, LazyImages, add_placeholder_tokens, load_concept_images
from p3_training import prepare_for_training
from sd_v1 import SD_V1_CONFIG
from toy_data import TINY_SD_DIR, build_tiny_sd
from utils import get_device, run_cli, seed_everything

MODULE = "benchmarks.p3_cd_bench"
GPU_RESOLUTION = 512
GPU_BATCH = {"TI": (4, 0), "CD": (2, 2)}  # (concept images, class images) per forward pass, in fp16 (part 3)
# part 4: (name, method, concept images, class images, accumulation steps, weight dtype, gradient checkpointing)
DEFAULTS = [("TI, fp32, batch 4 (former default)", "TI", 4, 0, 1, torch.float32, False),
            ("TI, fp16, batch 4", "TI", 4, 0, 1, torch.float16, False),
            ("TI, fp16 + checkpointing, batch 4", "TI", 4, 0, 1, torch.float16, True),
            ("TI, fp16 + checkpointing, batch 1 x 4 accumulation (default on CUDA)", "TI", 1, 0, 4, torch.float16,
             True),
            ("CD, fp32, 2 + 2 class images (former default)", "CD", 2, 2, 1, torch.float32, False),
            ("CD, fp16 + checkpointing, 2 + 2 class images (default on CUDA)", "CD", 2, 2, 1, torch.float16, True)]
CLASS_IMAGES = 200  # per concept: cd.train's --num-class-images default
CONCEPTS = 3  # the course's two input.json concepts and the cat photos, trained jointly
PARTS = ("steps", "estimate", "defaults", "class-images")
# an A100's dense fp16/bf16 tensor-core peak, and the fractions of it assumed sustained (an assumption, not measured)
GPU_PEAK_TFLOPS = 312
GPU_UTILISATION = (0.2, 0.5)
CONTEXT_LENGTH = 77


def cd_train_worker(job):
    """Time `steps` Custom Diffusion steps (p3_custom_diffusion.train_step) of one configuration: the median step
    time, peak memory and last loss."""
    device = torch.device(job["device"])
    seed_everything(0)
    pipe = load_bench_pipeline(job["model"])
    resolution = job["resolution"] or pipe.unet.config.sample_size * pipe.vae_scale_factor
    new_ids = add_placeholder_tokens(pipe.tokenizer, pipe.text_encoder, "<bench>", 1, "dog")
    processors = trainable_processors(pipe.unet)
    embedding, autocast, scaler = prepare_for_training(pipe, device, job["mixed_precision"], job["checkpointing"])
    set_processors(pipe.unet, {name: p.to(device).requires_grad_(True) for name, p in processors.items()})
    original = embedding.weight.detach().clone()
    optimizer = torch.optim.AdamW([embedding.weight, *[p for q in processors.values() for p in q.parameters()]],
                                  lr=1e-5)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    images = job["batch_size"] * (2 if job["prior"] else 1)
    pixels = torch.rand(images, 3, resolution, resolution) * 2 - 1
    texts = ["a photo of a <bench>"] * job["batch_size"] + ["a photo of a dog"] * (images - job["batch_size"])
    input_ids = pipe.tokenizer(texts, padding="max_length", max_length=CONTEXT_LENGTH, return_tensors="pt").input_ids

    losses = []

    def step():
        losses.append(cd.train_step(pipe, noise_scheduler, lambda: (pixels, input_ids, job["batch_size"]), 1,
                                    optimizer, scaler, autocast, original, new_ids, 1.0))

    return {**timed_steps(step, job["steps"], device), "resolution": resolution, "loss": losses[-1]}


# ------------------------------------------------------------------------------------- meta-device counts


def meta_models(config=SD_V1_CONFIG):
    """SD v1.4's UNet, VAE and text encoder on the meta device: shapes and dtypes, no memory, no weights."""
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(config / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(config / "vae"))
        text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(config / "text_encoder"))
    return unet, vae, text_encoder


class SavedForBackward:
    """Counts the bytes of the distinct tensors autograd keeps for backward; `attention` is the part that is
    B x heads x N x N self-attention probabilities. A saved view counts as the tensor it views (its storage), so
    the transposed weights a linear layer saves count as the parameters they are, which are left out."""

    def __init__(self, parameters, heads):
        self.parameters = {id(p) for p in parameters}
        self.heads = heads
        self.seen = {}  # id -> tensor: keeps each counted tensor alive, so ids stay unique
        self.total = self.attention = 0

    def pack(self, tensor):
        base = tensor if tensor._base is None else tensor._base
        if id(base) not in self.parameters and id(base) not in self.seen:
            self.seen[id(base)] = base
            size = base.numel() * base.element_size()
            self.total += size
            if base.dim() == 4 and base.shape[1] == self.heads and base.shape[2] == base.shape[3] > 1:
                self.attention += size
        return tensor

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, lambda tensor: tensor)


class CheckpointedBlocks:
    """diffusers' `gradient_checkpointing_func`, counting instead of checkpointing. diffusers checkpoints every
    resnet and transformer block of the UNet: through the step a block keeps only its inputs (counted in `saved`);
    backward recomputes one block at a time, which adds that block's own saved tensors (the largest block sets the
    peak) and runs its forward FLOPs once more."""

    def __init__(self, saved, flops):
        self.saved, self.flops = saved, flops
        self.largest = self.largest_attention = 0  # the block whose recompute peaks highest with a fused kernel
        self.recompute_flops = 0

    def __call__(self, module, *args):
        for arg in args:
            if isinstance(arg, torch.Tensor):
                self.saved.pack(arg)  # torch.utils.checkpoint keeps its inputs
        inner = SavedForBackward([], self.saved.heads)
        inner.parameters = self.saved.parameters
        before = self.flops.get_total_flops()
        with inner.hooks():  # the innermost hooks apply: the block's tensors are counted apart
            output = module(*args)
        self.recompute_flops += self.flops.get_total_flops() - before
        if inner.total - inner.attention > self.largest - self.largest_attention:
            self.largest, self.largest_attention = inner.total, inner.attention
        return output


def step_counts(method, resolution, images, class_images, weight_dtype, checkpointing=False):
    """FLOPs and memory of one training step of `method` (TI or CD) on the meta device; sizes in bytes. With
    `checkpointing` (the UNet's; the text encoder's 77-token activations are small), "saved" is what the step keeps
    and "recompute" / "recompute_attention" the largest block's tensors during its recomputation in backward."""
    unet, vae, text_encoder = meta_models()
    for module in (unet, vae, text_encoder):
        module.requires_grad_(False)
    with torch.device("meta"):
        processors = trainable_processors(unet) if method == "CD" else {}  # fp32, as in training
    unet.to(weight_dtype)
    vae.to(weight_dtype)
    embedding = text_encoder.get_input_embeddings().weight.requires_grad_(True)
    set_processors(unet, {name: p.requires_grad_(True) for name, p in processors.items()})
    trained = [embedding, *[p for q in processors.values() for p in q.parameters()]]
    frozen = [p for m in (unet, vae, text_encoder) for p in m.parameters() if p.requires_grad is False]
    batch = images + class_images
    pixels = torch.zeros(batch, 3, resolution, resolution, device="meta", dtype=weight_dtype)
    input_ids = torch.zeros(batch, CONTEXT_LENGTH, device="meta", dtype=torch.long)
    saved = SavedForBackward([*frozen, *trained], unet.config.attention_head_dim)
    flops = FlopCounterMode(display=False)
    blocks = CheckpointedBlocks(saved, flops)
    if checkpointing:
        unet.train().enable_gradient_checkpointing(blocks)
    with flops:
        with torch.no_grad():
            z_0 = vae.encode(pixels).latent_dist.mean  # the sample adds noise of the same shape: no FLOPs to speak of
        with saved.hooks():
            c = text_encoder(input_ids)[0]
            prediction = unet(z_0, torch.zeros(batch, device="meta", dtype=torch.long), c.to(weight_dtype)).sample
        prediction.float().pow(2).mean().backward()
    nbytes = lambda params: sum(p.numel() * p.element_size() for p in params)  # noqa: E731
    return {"tflops": (flops.get_total_flops() + blocks.recompute_flops) / 1e12,
            "weights": nbytes(frozen) + nbytes(trained),
            # gradients and AdamW's two moments, all fp32 like the trained parameters
            "trained_state": 3 * nbytes(trained), "saved": saved.total, "attention": saved.attention,
            "recompute": blocks.largest, "recompute_attention": blocks.largest_attention,
            "trained_params": sum(p.numel() for p in trained[1:])}


def fused_peak(counts):
    """Estimated peak bytes with a fused attention kernel, which keeps no N x N probabilities: weights, trained
    state, what the step keeps for backward, and the largest block recomputed in backward (checkpointing only)."""
    return (counts["weights"] + counts["trained_state"] + counts["saved"] - counts["attention"] + counts["recompute"]
            - counts["recompute_attention"])


# ------------------------------------------------------------------------------------------------- report


def gib(size):
    return f"{size / 2**30:.2f}"


def print_gpu_estimate():
    print(f"\n### GPU estimate (not measured): SD v1.4 at {GPU_RESOLUTION} px, fp16 weights\n")
    print("Counted on the meta device (`torch.utils.flop_counter`, autograd's saved tensors); time = FLOPs / "
          f"({', '.join(f'{u:.0%}' for u in GPU_UTILISATION)} of {GPU_PEAK_TFLOPS} TFLOP/s, an A100's dense fp16 "
          "peak), an assumed utilisation.\n")
    print("| method | images per step | TFLOPs per step | est. step time (s) | weights (GiB) | grads + AdamW (GiB) | "
          "saved activations (GiB) | of which self-attention N x N (GiB) | est. memory with a fused attention "
          "kernel (GiB) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for method, (images, class_images) in GPU_BATCH.items():
        counts = step_counts(method, GPU_RESOLUTION, images, class_images, torch.float16)
        times = [counts["tflops"] / (GPU_PEAK_TFLOPS * u) for u in GPU_UTILISATION]
        fused = fused_peak(counts)
        print(f"| {method} | {images} + {class_images} class | {counts['tflops']:.2f} | "
              f"{times[1]:.3f}-{times[0]:.3f} | {gib(counts['weights'])} | {gib(counts['trained_state'])} | "
              f"{gib(counts['saved'])} | {gib(counts['attention'])} | {gib(fused)} |")


def print_defaults_estimate():
    print(f"\n### GPU estimate of the training defaults (not measured): SD v1.4 at {GPU_RESOLUTION} px\n")
    print("Counted on the meta device as above; per optimizer step. The peak is the weights, the trained parameters' "
          "gradients and AdamW state, the tensors the step keeps for backward and, with checkpointing, the largest "
          "block recomputed in backward; with a fused attention kernel (no N x N probabilities kept) and with "
          "attention written out.\n")
    print("| configuration | images per step | TFLOPs per step | weights (GiB) | grads + AdamW (GiB) | kept for "
          "backward, fused attention (GiB) | largest recomputed block (GiB) | est. peak, fused attention (GiB) | "
          "est. peak, N x N kept (GiB) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, method, images, class_images, accumulation, dtype, checkpointing in DEFAULTS:
        counts = step_counts(method, GPU_RESOLUTION, images, class_images, dtype, checkpointing)
        whole = counts["weights"] + counts["trained_state"] + counts["saved"] + counts["recompute"]
        batch = f"{images} + {class_images} class" if class_images else f"{images} x {accumulation}"
        print(f"| {name} | {batch} | {counts['tflops'] * accumulation:.2f} | {gib(counts['weights'])} | "
              f"{gib(counts['trained_state'])} | {gib(counts['saved'] - counts['attention'])} | "
              f"{gib(counts['recompute'] - counts['recompute_attention'])} | {gib(fused_peak(counts))} | "
              f"{gib(whole)} |")


def write_class_images(folder, count, size, seed=0):
    """`count` smooth random RGB PNGs of size x size (upsampled noise: they compress and decode like photos)."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for k in range(count):
        small = Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
        small.resize((size, size), Image.BICUBIC).save(folder / f"{k:04d}.png")


def print_class_image_memory(count=CLASS_IMAGES, size=GPU_RESOLUTION, draws=20):
    """Part 5: the RAM of a concept's class images, all loaded (as before) against read when drawn."""
    side = round(size * PRE_RESIZE)
    computed = count * 3 * side * side * 4
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "class_images"
        write_class_images(folder, count, size)
        ctypes.CDLL(None).malloc_trim(0)
        before = resident_mb()
        lazy = LazyImages(folder, size)
        start = time.perf_counter()
        drawn = [lazy[k] for k in range(draws)][-2:]  # a step at batch 2 holds two at a time
        per_image = (time.perf_counter() - start) / draws
        ctypes.CDLL(None).malloc_trim(0)  # both measured as what stays held, not the allocator's high-water mark
        lazy_mb = resident_mb() - before
        del drawn
        ctypes.CDLL(None).malloc_trim(0)
        before = resident_mb()
        eager = load_concept_images(folder, size)
        ctypes.CDLL(None).malloc_trim(0)
        eager_mb = resident_mb() - before
        assert len(eager) == len(lazy) == count
    print(f"\n### Custom Diffusion's class images in RAM: {count} per concept at {size} px (held at {side} px)\n")
    print("| class images | per concept (MiB) | 3 concepts (GiB) |")
    print("|---|---|---|")
    print(f"| all loaded, computed ({count} x 3 x {side} x {side} x 4 bytes) | {computed / 2**20:.0f} | "
          f"{CONCEPTS * computed / 2**30:.2f} |")
    print(f"| all loaded, measured (resident set, `load_concept_images`) | {eager_mb:.0f} | "
          f"{CONCEPTS * eager_mb / 1024:.2f} |")
    print(f"| read when drawn, measured (`LazyImages`, {draws} draws, 2 held) | {lazy_mb:.0f} | "
          f"{CONCEPTS * lazy_mb / 1024:.2f} |")
    print(f"\nReading one class image when drawn: {1000 * per_image:.0f} ms (PNG decode and resize, the "
          f"mean of {draws} reads).")


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.worker:
        job = json.loads(args.worker)
        if job["threads"]:
            torch.set_num_threads(job["threads"])
        print(json.dumps(cd_train_worker(job) if job["kind"] == "cd" else ti_train_worker(job)))
        return
    if "steps" in args.parts:
        measure_steps(args)
    if "estimate" in args.parts:
        print_gpu_estimate()
    if "defaults" in args.parts:
        print_defaults_estimate()
    if "class-images" in args.parts:
        print_class_image_memory()


def measure_steps(args):
    """Parts 1 and 2, and the estimator's check against them on the CPU."""
    device = get_device(args.device)
    mixed = "fp16" if device.type == "cuda" else "bf16"
    counts = step_counts("CD", 64, 1, 0, torch.float32)  # parameter counts do not depend on the image size
    print("### Trainable parameters (SD v1.4 architecture)\n")
    print("| method | trained parameters | file (fp32) |")
    print("|---|---|---|")
    print("| textual inversion | 768 per token | 3 KB per token |")
    print(f"| Custom Diffusion | {counts['trained_params']:,} (W_k, W_v of 16 cross-attention layers) + 768 per "
          f"token | {counts['trained_params'] * 4 / 1e6:.1f} MB + 3 KB per token |")
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model == "tiny":
            build_tiny_sd(Path(tmp), 0)
            model = str(Path(tmp) / TINY_SD_DIR)
        base = {"device": str(device), "model": model, "threads": args.threads, "resolution": args.resolution,
                "checkpointing": False, "steps": args.steps, "batch_size": 1}
        configs = [("TI, batch 1", "ti", "no", False), ("CD, batch 1, no prior", "cd", "no", False),
                   ("CD, batch 1 + 1 class image", "cd", "no", True), (f"TI, batch 1, {mixed}", "ti", mixed, False),
                   (f"CD, batch 1 + 1 class image, {mixed}", "cd", mixed, True)]
        rows = []
        for name, kind, precision, prior in configs:
            result = run_worker({**base, "kind": kind, "mixed_precision": precision, "prior": prior}, MODULE)
            rows.append((name, kind, precision, prior, result))
            print(f"{name}: {result}", file=sys.stderr)
    first = rows[0][-1]
    label = "tiny toy SD" if args.model == "tiny" else "SD v1.4 architecture (random weights)"
    print(f"\n### Training step, {label} at {first['resolution']} px, {device}, "
          f"{args.threads or torch.get_num_threads()} torch thread(s), median of {args.steps} step(s) after one "
          f"warm-up\n")
    on_cpu = device.type == "cpu"
    print("| configuration | step time (s) | x TI fp32 | peak memory (MB) |"
          + (" of which the steps (MB) |" if on_cpu else ""))
    print("|---|---|---|---|" + ("---|" if on_cpu else ""))
    for name, _, _, _, result in rows:
        print(f"| {name} | {result['step_s']:.2f} | {result['step_s'] / first['step_s']:.2f} | "
              f"{result['peak_mb']:.0f} |" + (f" {result['step_mb']:.0f} |" if on_cpu else ""))
    if args.model == "sd14-config" and on_cpu:
        print("\nThe estimator of part 3 at the fp32 configurations above (autograd's saved tensors + gradients and "
              "AdamW state of the trained parameters) beside the measured \"of which the steps\":\n")
        for name, kind, precision, prior, result in rows:
            if precision == "no":
                counts = step_counts(kind.upper(), first["resolution"], 1, 1 if prior else 0, torch.float32)
                print(f"- {name}: estimated {(counts['saved'] + counts['trained_state']) / 2**20:.0f} MB, measured "
                      f"{result['step_mb']:.0f} MB")


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="sd14-config",
                        help="sd14-config (SD v1.4's architecture, random weights; default), tiny (the toy model, "
                             "built in a temp folder), or a diffusers folder / .ckpt.")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: the best available).")
    parser.add_argument("--resolution", type=int, default=None,
                        help="Image size in pixels (default: the model's own, 512 for SD v1.4, 32 for the toy).")
    parser.add_argument("--steps", type=int, default=2, help="Timed training steps per configuration.")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads (0: torch's default); 1 avoids spinning threads on a busy machine.")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS),
                        help="What to run: steps (parts 1-2, minutes), estimate (3), defaults (4), class-images (5); "
                             "default: all.")
    parser.add_argument("--worker", default=None, help="Internal: run one JSON job and print its result.")
    return parser


if __name__ == "__main__":
    run_cli(main)

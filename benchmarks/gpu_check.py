"""GPU check: exercise and time every GPU path of the homework in one command, on a machine with CUDA.

    python benchmarks/gpu_check.py                          # -> outputs/gpu_check/gpu_check.json and gpu_check.md
    python benchmarks/gpu_check.py --sections p2_precision  # only some sections
    python benchmarks/gpu_check.py --smoke --out /tmp/gc    # a tiny version of every section on the CPU

Sections, in order (each returns rows of measurement, value and verdict; a failing section is reported and the
others still run):
  p1_train      The GPU's compute capability and the autocast dtype and loss scaling p1_train.py picks for it (bf16
                from 8.0 on, else fp16 + GradScaler). P1 full preset, batch 128: 300 optimizer steps of
                p1_train.train_step in bf16 autocast and in fp16 autocast + GradScaler: images/s, peak GPU memory,
                last loss finite; then benchmarks/p1_train_bench.py's images/s with the former data path and EMA
                (batches gathered on the CPU, one lerp_ per parameter) against p1_train.py's (data on the GPU,
                one _foreach_lerp_), 100 steps each.
  p1_ddp        p1_train.py under torchrun on 2 GPUs (NCCL) when at least 2 are visible: exit status, identical
                weights on both ranks, wall time.
  p1_sample     p1_inference.py's default sampler (DPM-Solver++ 2M, 10 steps) on the grader's 1,000 guided images
                with p1_inference.generate, in full fp32 (the default) and under --autocast: images/s of each, how
                far the autocast images are from the fp32 ones; and DDIM-25 in fp32 beside them (the former
                default), so that the two speeds are measured in one run.
  p1_resume     p1_train.py --deterministic on the GPU: 2 epochs straight against 1 epoch + --resume, bit for bit.
  p2_precision  The course-size face UNet (base 128, random weights plus toy_data.wire_noise_path's eps ~ x_t
                path, so that DDIM is not chaotic), 10 noises at 256 px, 50 DDIM steps: time and MSE (0-255
                scale) of fp32 without TF32, fp16 and bf16, with fp32 as the reference.
  p3_ti_step    SD v1.4's architecture, 512 px: optimizer step time (median of 10 after a warm-up), peak GPU
                memory and last loss of p3_textual_inversion.train_step in fp32 at batch 4 (its former default), in
                fp16 (frozen UNet and VAE in fp16, autocast, GradScaler) at batch 4 with and without gradient
                checkpointing, and at its CUDA default (fp16 + checkpointing, batch 1 x 4 accumulation steps); and
                of p3_custom_diffusion.train_step at 2 + 2 class images in fp16 with and without checkpointing.
  p3_generate   p3_concepts.sample_images after set_scheduler(pipe, "dpm"): 30 DPM-Solver++ steps, guidance 7.5,
                fp16, 512 px, batches of 5: images/s; the images come out with the right shape, all finite.
  p3_zeroshot   p3_clip_zeroshot.classify over its DataLoader (the script's default batch size, workers, prompts
                and precision, fp32), 2,500 32-px PNGs (the course's count), ViT-B-32 and ViT-L-14 from open_clip:
                images/s, beside the bare image encoder on the same decoded batches; every image classified, finite.
P1's and P3's timings use random images and random weights (SD v1.4's and CLIP's architectures, built as
sd_v1.random_pipeline and open_clip with pretrained=None): speed does not depend on either. Without CUDA, and
without --smoke, it prints one skip line and exits 0. The exit status is 1 when any check fails.
"""

import argparse
import gc
import json
import math
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from argparse import Namespace
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import p3_clip_zeroshot as zeroshot  # noqa: E402
from benchmarks.p1_bench import SAMPLER_NAMES  # noqa: E402
from benchmarks.p1_train_bench import compare as compare_data_paths  # noqa: E402
from benchmarks.p2_bench import precision_comparison  # noqa: E402
from benchmarks.p3_cd_bench import cd_train_worker  # noqa: E402
from benchmarks.p3_ti_bench import generate_worker  # noqa: E402
from benchmarks.p3_ti_bench import train_worker as ti_train_worker  # noqa: E402
from benchmarks.p3_zeroshot_bench import COURSE_IMAGES, bench_model  # noqa: E402
from benchmarks.timing import synchronize  # noqa: E402
from p1_inference import DEFAULT_SAMPLER, DEFAULT_STEPS, generate, sample_plan  # noqa: E402
from p1_model import DATASETS, Diffusion, preset  # noqa: E402
from p1_train import TRAIN_PRESETS, TrainSettings, build_optimization, train_step  # noqa: E402
from p1_train import main as p1_train_main  # noqa: E402
from p2_unet import FaceUNet  # noqa: E402
from p3_clip_models import TINY_CLIP_DIR, TINY_CLIP_NAME, load_clip, resolve_model  # noqa: E402
from toy_data import (  # noqa: E402
    TINY_SD_DIR,
    TINY_SD_RESOLUTION,
    build_clip_zeroshot,
    build_tiny_clip,
    build_tiny_sd,
    wire_noise_path,
)
from utils import amp_dtype, atomic_write_text, load_checkpoint, make_grad_scaler, to_uint8  # noqa: E402

DEFAULT_OUT = REPO / "outputs" / "gpu_check"


@dataclass(frozen=True)
class Scale:
    """How big each section runs: the real check on a GPU, or a tiny smoke version on the CPU."""

    p1_preset: str
    p1_overrides: dict
    train_batch: int
    train_steps: int
    data_path_steps: int  # steps of each p1_train_bench variant
    sample_per_digit: int
    sample_steps: int  # steps of p1_inference.py's default sampler
    ddim_steps: int  # steps of the DDIM row beside it
    data_per_set: int  # synthetic training images per digit set, for the p1_train.py runs
    run_batch: int  # batch size of those runs, per process
    p2_base: int
    p2_size: int
    p2_noises: int
    p2_steps: int
    p2_precisions: tuple
    repeats: int
    sd_model: str  # sd14-config (SD v1.4's architecture, random weights) or tiny (the toy world's tiny SD)
    sd_resolution: int
    ti_batch: int  # images per training step; Custom Diffusion's are half concept, half class images
    ti_steps: int
    generate_steps: int
    generate_batch: int
    generate_repeats: int
    clip_models: tuple  # open_clip model names (random weights), or "tiny" for the toy world's tiny CLIP
    clip_images: int


GPU = Scale(p1_preset="full", p1_overrides={}, train_batch=128, train_steps=300, data_path_steps=100,
            sample_per_digit=50, sample_steps=DEFAULT_STEPS, ddim_steps=25, data_per_set=512, run_batch=64,
            p2_base=128, p2_size=256, p2_noises=10, p2_steps=50,
            p2_precisions=("fp32", "fp16", "bf16"), repeats=3, sd_model="sd14-config", sd_resolution=512,
            ti_batch=4, ti_steps=10, generate_steps=30, generate_batch=5, generate_repeats=2,
            clip_models=("ViT-B-32", "ViT-L-14"), clip_images=COURSE_IMAGES)
SMOKE = Scale(p1_preset="toy", p1_overrides=dict(widths=(8, 16), embed_dim=16, attention_heads=2), train_batch=4,
              train_steps=2, data_path_steps=2, sample_per_digit=1, sample_steps=2, ddim_steps=2, data_per_set=8,
              run_batch=4, p2_base=32, p2_size=32, p2_noises=2, p2_steps=2, p2_precisions=("fp32",), repeats=1,
              sd_model="tiny",
              sd_resolution=TINY_SD_RESOLUTION, ti_batch=2, ti_steps=1, generate_steps=2, generate_batch=2,
              generate_repeats=1, clip_models=("tiny",), clip_images=16)


@dataclass
class Run:
    """What every section gets: the device, the scale, a scratch folder."""

    device: torch.device
    scale: Scale
    scratch: Path


def row(measurement, value, unit="", ok=None, note=""):
    return {"measurement": measurement, "value": value, "unit": unit, "ok": ok, "note": note}


def peak_memory_gb(device):
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def synthetic_digits(root, per_set, seed=0):
    """A digits tree in the course layout (train.csv, data/*.png) of random 28x28 images."""
    rng = np.random.default_rng(seed)
    for name in DATASETS:
        (root / name / "data").mkdir(parents=True)
        lines = ["image_name,label"]
        for i in range(per_set):
            Image.fromarray(rng.integers(0, 256, (28, 28, 3), dtype=np.uint8)).save(root / name / "data" / f"{i}.png")
            lines.append(f"{i}.png,{i % 10}")
        (root / name / "train.csv").write_text("\n".join(lines) + "\n")
    return root


def p1_config(scale):
    return preset(scale.p1_preset, **scale.p1_overrides)


def synthetic_data(run):
    """The synthetic digits of this run (written on first use)."""
    data = run.scratch / "digits"
    if not data.exists():
        synthetic_digits(data, run.scale.data_per_set)
    return data


def p1_run_flags(run, out):
    """p1_train.py flags for a short run of this scale's preset on the synthetic digits."""
    return ["--data", str(synthetic_data(run)), "--out", str(out), "--preset", run.scale.p1_preset, "--batch-size",
            str(run.scale.run_batch), "--grid-every", "0", "--seed", "0"]


# ------------------------------------------------------------------------------------------------ sections


def precision_rows(device):
    """The device's compute capability and the autocast dtype and loss scaling that utils picks for it."""
    dtype, scaler = amp_dtype(device), make_grad_scaler(device).is_enabled()
    if device.type != "cuda":
        return [row("autocast dtype", str(dtype), note="not a GPU: no autocast unless the CPU has native bf16")]
    major, minor = torch.cuda.get_device_capability(device)
    expected = torch.bfloat16 if major >= 8 else torch.float16
    return [row("compute capability", f"{major}.{minor}"),
            row("autocast dtype, GradScaler", f"{str(dtype)[6:]}, {'on' if scaler else 'off'}", "",
                dtype == expected and scaler == (dtype == torch.float16), "bf16 from 8.0 on, else fp16 + GradScaler")]


def p1_train_section(run):
    """Optimizer steps of the P1 model in bf16 and in fp16 + GradScaler: images/s, peak memory, finite loss; the
    former data path and EMA against p1_train.py's."""
    scale, device = run.scale, run.device
    rows = precision_rows(device)
    config = p1_config(scale)
    settings = TrainSettings(**{**TRAIN_PRESETS[scale.p1_preset], "batch_size": scale.train_batch, "limit": 0,
                                "seed": 0})
    batch = (torch.rand(scale.train_batch, 3, 28, 28, device=device) * 2 - 1,
             torch.randint(0, 10, (scale.train_batch,), device=device),
             torch.randint(0, 2, (scale.train_batch,), device=device))
    for dtype in (torch.bfloat16, torch.float16):
        torch.manual_seed(0)
        diffusion = Diffusion(config).to(device).train()
        ema = Diffusion(config).to(device).requires_grad_(False)
        optimizer, scheduler, _ = build_optimization(diffusion, settings, scale.train_steps, device)
        scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        train_step(diffusion.net, diffusion, ema, (optimizer, scheduler, scaler), batch, settings, dtype=dtype)
        synchronize(device)
        start = time.perf_counter()
        for _ in range(scale.train_steps):
            loss = train_step(diffusion.net, diffusion, ema, (optimizer, scheduler, scaler), batch, settings,
                              dtype=dtype)
        synchronize(device)
        seconds = time.perf_counter() - start
        name = "bf16" if dtype == torch.bfloat16 else "fp16 + GradScaler"
        last = float(loss)
        rows += [row(f"{name}: {scale.train_steps} steps at batch {scale.train_batch}",
                     round(scale.train_steps * scale.train_batch / seconds, 1), "images/s"),
                 row(f"{name}: peak memory", None if peak_memory_gb(device) is None else
                     round(peak_memory_gb(device), 2), "GiB"),
                 row(f"{name}: last loss", round(last, 4), "", math.isfinite(last))]
    paths = compare_data_paths(config, settings, device, scale.data_path_steps, 64 * scale.train_batch)
    for name, note in (("before", "batches gathered on the CPU, one lerp_ per parameter"),
                       ("after", "data on the device once, one _foreach_lerp_ (p1_train.py)")):
        rate, loss = paths[name]
        ratio = f"; {rate / paths['before'][0]:.2f}x before" if name == "after" else ""
        rows.append(row(f"data path and EMA {name}: {scale.data_path_steps} steps", round(rate, 1), "images/s",
                        math.isfinite(loss), note + ratio))
    return rows


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def p1_ddp_section(run):
    """p1_train.py in 2 processes under torchrun (NCCL on 2 GPUs; gloo on the CPU for --smoke)."""
    if run.device.type == "cuda" and torch.cuda.device_count() < 2:
        return [row("2-process torchrun", None, ok=None, note=f"skipped: {torch.cuda.device_count()} GPU visible")]
    flags = p1_run_flags(run, run.scratch / "ddp") + ["--epochs", "1"]
    flags += ["--device", "cpu"] if run.device.type == "cpu" else []
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                             f"--master_port={free_port()}", str(REPO / "p1_train.py"), *flags],
                            capture_output=True, text=True, timeout=600)
    seconds = time.perf_counter() - start
    digests = dict(re.findall(r"rank (\d): weights sha256 ([0-9a-f]{64})", result.stdout))
    same = result.returncode == 0 and len(digests) == 2 and len(set(digests.values())) == 1
    note = "" if result.returncode == 0 else result.stderr.strip().splitlines()[-1][:200]
    return [row("2-process torchrun, 1 epoch: exit status", result.returncode, ok=result.returncode == 0, note=note),
            row("identical weights on both ranks", same, ok=same),
            row("wall time including start-up", round(seconds, 1), "s")]


def p1_sample_section(run):
    """The grader's 1,000 guided images as p1_inference.py samples them (its default sampler, fp32 and --autocast),
    and with DDIM in fp32 beside them."""
    scale = run.scale
    torch.manual_seed(0)
    diffusion = Diffusion(p1_config(scale)).to(run.device).eval()
    count, rows, images = len(sample_plan(scale.sample_per_digit)), [], {}
    variants = (("fp32 (default)", DEFAULT_SAMPLER, scale.sample_steps, False),
                ("--autocast", DEFAULT_SAMPLER, scale.sample_steps, True),
                ("fp32", "ddim", scale.ddim_steps, False))
    for name, sampler, steps, autocast in variants:
        settings = Namespace(sampler=sampler, steps=steps, eta=0.0, guidance=TRAIN_PRESETS[scale.p1_preset][
            "guidance"], seed=0, batch_size=500, autocast=autocast)
        synchronize(run.device)
        start = time.perf_counter()
        images[name, sampler], _ = generate(diffusion, settings, run.device, per_digit=scale.sample_per_digit)
        synchronize(run.device)
        seconds = time.perf_counter() - start
        rows.append(row(f"{name}: {SAMPLER_NAMES[sampler]}-{steps}, {count} images, w = {settings.guidance}",
                        round(count / seconds, 1), "images/s", bool(torch.isfinite(images[name, sampler]).all()),
                        f"{seconds:.1f} s"))
    difference = (to_uint8(images["--autocast", DEFAULT_SAMPLER]).astype(int)
                  - to_uint8(images["fp32 (default)", DEFAULT_SAMPLER]).astype(int))
    rows.append(row("--autocast against fp32: pixels that differ (0-255)", round(float((difference != 0).mean()), 4),
                    "", note=f"largest difference {abs(difference).max()}, random weights"))
    return rows


def p1_resume_section(run):
    """p1_train.py --deterministic: 2 epochs straight == 1 epoch, stop, --resume, bit for bit."""
    device_flag = ["--device", str(run.device)]
    straight, split = run.scratch / "straight", run.scratch / "split"
    try:
        p1_train_main([*p1_run_flags(run, straight), "--epochs", "2", "--deterministic", *device_flag])
        p1_train_main([*p1_run_flags(run, split), "--epochs", "2", "--stop-after", "1", "--deterministic",
                       *device_flag])
        p1_train_main(["--resume", str(split / "ddpm.safetensors"), "--data", str(synthetic_data(run)), "--out",
                       str(split), "--deterministic", *device_flag])
    finally:
        torch.use_deterministic_algorithms(False)
    a, b = load_checkpoint(straight / "ddpm.safetensors"), load_checkpoint(split / "ddpm.safetensors")
    worst = max(float((a[key][name].double() - b[key][name].double()).abs().max())
                for key in ("model", "ema") for name in a[key])
    return [row("resumed == uninterrupted (model and EMA weights)", worst == 0, ok=worst == 0,
                note=f"largest difference {worst:.3g}; steps {a['step']} and {b['step']}")]


def p2_precision_section(run):
    """DDIM with the course-size face UNet under each --precision, against fp32 (TF32 off)."""
    scale = run.scale
    torch.manual_seed(0)
    model = wire_noise_path(FaceUNet(base=scale.p2_base)).eval().to(run.device)
    noises = torch.randn(scale.p2_noises, 3, scale.p2_size, scale.p2_size,
                         generator=torch.Generator().manual_seed(0)).to(run.device)
    results = precision_comparison(model, noises, scale.p2_steps, run.device, scale.repeats, scale.p2_precisions)
    fp32_seconds = results["fp32"][0]
    return [row(f"{precision}: {scale.p2_noises} x {scale.p2_size} px, {scale.p2_steps} steps", round(seconds, 2),
                "s", math.isfinite(mse), f"{fp32_seconds / seconds:.2f}x fp32's speed; MSE vs fp32 {mse:.3f} (0-255)")
            for precision, (seconds, mse) in results.items()]


def sd_model(run):
    """The Stable Diffusion that P3's sections load: SD v1.4's architecture with random weights, or for --smoke the
    toy world's tiny SD (written on first use)."""
    if run.scale.sd_model != "tiny":
        return run.scale.sd_model
    if not (run.scratch / TINY_SD_DIR).exists():
        build_tiny_sd(run.scratch, 0)
    return str(run.scratch / TINY_SD_DIR)


def free_memory(device):
    """Collect the previous configuration's models, so that they do not count in the next one's peak memory."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def p3_training_configurations(scale):
    """(name, worker, job) of p3_ti_step: textual inversion's former default (fp32, batch 4), fp16 at batch 4 with and
    without checkpointing, its default on CUDA (fp16 + checkpointing, batch 1 x 4 accumulation steps: the same 4
    images per optimizer step), and Custom Diffusion's default batch in fp16 with and without checkpointing."""
    b, half = scale.ti_batch, scale.ti_batch // 2
    fp16 = {"mixed_precision": "fp16"}
    return [(f"TI, fp32, batch {b} (the former default)", ti_train_worker,
             {"mixed_precision": "no", "checkpointing": False, "batch_size": b}),
            (f"TI, fp16, batch {b}", ti_train_worker, {**fp16, "checkpointing": False, "batch_size": b}),
            (f"TI, fp16 + checkpointing, batch {b}", ti_train_worker, {**fp16, "checkpointing": True, "batch_size": b}),
            (f"TI, fp16 + checkpointing, batch 1 x {b} accumulation (the default on CUDA)", ti_train_worker,
             {**fp16, "checkpointing": True, "batch_size": 1, "grad_accum": b}),
            (f"CD, fp16, {half} + {half} class images", cd_train_worker,
             {**fp16, "checkpointing": False, "batch_size": half, "prior": True}),
            (f"CD, fp16 + checkpointing, {half} + {half} class images (the default on CUDA)", cd_train_worker,
             {**fp16, "checkpointing": True, "batch_size": half, "prior": True})]


def p3_ti_step_section(run):
    """Optimizer steps of textual inversion and Custom Diffusion (their own train_step, through the benchmarks'
    workers) in each configuration of `p3_training_configurations`: step time, peak memory, finite loss."""
    scale, rows = run.scale, []
    base = {"device": str(run.device), "model": sd_model(run), "resolution": scale.sd_resolution,
            "steps": scale.ti_steps}
    memory = "torch.cuda.max_memory_allocated" if run.device.type == "cuda" else "the process's resident set (CPU)"
    first = {}  # method -> (name, step time) of its first configuration
    for name, worker, job in p3_training_configurations(scale):
        free_memory(run.device)
        result = worker({**base, **job})
        method = name.split(",")[0]
        base_name, base_seconds = first.setdefault(method, (name, result["step_s"]))
        ratio = "" if base_name == name else f"; {result['step_s'] / base_seconds:.2f}x the step of {base_name}"
        name = f"{name}, {result['resolution']} px"
        rows += [row(f"{name}: optimizer step time", round(result["step_s"], 3), "s",
                     note=f"median of {scale.ti_steps} after a warm-up{ratio}"),
                 row(f"{name}: peak memory", round(result["peak_mb"] / 1024, 2), "GiB", result["peak_mb"] > 0, memory),
                 row(f"{name}: last loss", round(result["loss"], 4), "", math.isfinite(result["loss"]))]
    return rows


def p3_generate_section(run):
    """Images/s of p3_concepts.sample_images with DPM-Solver++, in generate's dtype (fp16 on CUDA)."""
    scale = run.scale
    free_memory(run.device)
    result = generate_worker({"device": str(run.device), "model": sd_model(run), "resolution": scale.sd_resolution,
                              "batch_size": scale.generate_batch, "steps": scale.generate_steps,
                              "repeats": scale.generate_repeats})
    expected = [scale.generate_batch, 3, scale.sd_resolution, scale.sd_resolution]
    produced = result["shape"] == expected and result["finite"]
    return [row(f"DPM-Solver++ {scale.generate_steps} steps, {result['dtype']}, {scale.sd_resolution} px, "
                f"{scale.generate_repeats} x {scale.generate_batch} images", round(result["images_per_s"], 2),
                "images/s", produced, f"last batch {result['shape']} (expected {expected}), "
                                      f"{'all finite' if result['finite'] else 'NOT all finite'}")]


def clip_model(run, name):
    """(model, preprocess, tokenizer) through p3_clip_models.load_clip: `name` with random weights, or the toy
    world's tiny CLIP (written on first use)."""
    if name != "tiny":
        return load_clip(name, None, run.device)
    config = run.scratch / TINY_CLIP_DIR / f"{TINY_CLIP_NAME}.json"
    if not config.exists():
        build_tiny_clip(run.scratch, 0)
    name, weights, quick_gelu = resolve_model(str(config), None, run.scratch)
    return load_clip(name, weights, run.device, quick_gelu)


def p3_zeroshot_section(run):
    """Images/s of p3_clip_zeroshot.classify with the script's defaults, beside the bare image encoder."""
    scale, rows = run.scale, []
    defaults = zeroshot.build_parser().parse_args([])  # the script's batch size, workers and prompts
    build_clip_zeroshot(run.scratch, 0)
    id2label = zeroshot.read_id2label(run.scratch / "clip_zeroshot")
    paths, _ = zeroshot.list_images(run.scratch / "clip_zeroshot", id2label)
    paths = (paths * math.ceil(scale.clip_images / len(paths)))[:scale.clip_images]  # the toy's 32-px PNGs, repeated
    classnames = [zeroshot.clean_class_name(name) for name in id2label.values()]
    templates = zeroshot.load_templates(defaults.prompts)
    precision = zeroshot.precision_name(run.device, defaults.autocast)
    for name in scale.clip_models:
        free_memory(run.device)
        model, preprocess, tokenizer = clip_model(run, name)
        result = bench_model(name, model, preprocess, tokenizer, paths, classnames, templates, scale.repeats, defaults,
                             run.device)
        ok = result["classified"] == len(paths) and result["finite"]
        label = "tiny toy CLIP" if name == "tiny" else f"{name} (random weights)"
        rows.append(row(f"{label}: classify loop, {len(paths)} images", round(result["loop"], 1), "images/s", ok,
                        f"bare encoder {result['bare']:.1f} images/s (loop/bare {result['ratio']:.2f}); batch "
                        f"{defaults.batch_size}, {defaults.workers} workers, {precision}; {result['classified']} "
                        f"classified{'' if result['finite'] else ', NOT all finite'}"))
    return rows


SECTIONS = {"p1_train": p1_train_section, "p1_ddp": p1_ddp_section, "p1_sample": p1_sample_section,
            "p1_resume": p1_resume_section, "p2_precision": p2_precision_section, "p3_ti_step": p3_ti_step_section,
            "p3_generate": p3_generate_section, "p3_zeroshot": p3_zeroshot_section}


# ------------------------------------------------------------------------------------------------ report


def markdown(report):
    lines = [f"# GPU check ({report['device']}, torch {report['torch']}, CUDA {report['cuda']})", "",
             f"`{report['command']}`", "", "| section | measurement | value | ok | note |", "|---|---|---|---|---|"]
    for name, rows in report["sections"].items():
        for r in rows:
            value = "-" if r["value"] is None else f"{r['value']} {r['unit']}".strip()
            ok = {True: "yes", False: "**FAILED**", None: ""}[r["ok"]]
            lines.append(f"| {name} | {r['measurement']} | {value} | {ok} | {r['note']} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    args = build_parser().parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        print("gpu_check: skipped, no CUDA device here (pass --smoke for a tiny CPU run of every section).")
        return 0
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before any cuBLAS use: the resume check's kernels
    device = torch.device("cpu") if args.smoke else torch.device(args.device)
    scale = SMOKE if args.smoke else GPU
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
              "torch": torch.__version__, "cuda": torch.version.cuda, "smoke": args.smoke,
              "command": " ".join(["python benchmarks/gpu_check.py", *(argv if argv is not None else sys.argv[1:])]),
              "sections": {}}
    failed = False
    with tempfile.TemporaryDirectory(prefix="gpu_check.") as scratch:
        for name in args.sections:
            print(f"gpu_check: {name} ...", flush=True)
            start = time.perf_counter()
            try:
                rows = SECTIONS[name](Run(device, scale, Path(scratch) / name))
            except Exception as err:  # report it and go on with the other sections
                traceback.print_exc()
                rows = [row("section", None, ok=False, note=f"{type(err).__name__}: {err}"[:300])]
            rows.append(row("section wall time", round(time.perf_counter() - start, 1), "s"))
            report["sections"][name] = rows
            failed |= any(r["ok"] is False for r in rows)
    out = Path(args.out)
    atomic_write_text(out / "gpu_check.json", json.dumps(report, indent=2) + "\n")
    text = markdown(report)
    atomic_write_text(out / "gpu_check.md", text)
    print(text + f"\nWrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'}.")
    return 1 if failed else 0


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=str, default=str(DEFAULT_OUT),
                        help="Folder for gpu_check.json and gpu_check.md (default: outputs/gpu_check in the repo).")
    parser.add_argument("--sections", nargs="+", choices=list(SECTIONS), default=list(SECTIONS),
                        help="Sections to run, in the order given (default: all).")
    parser.add_argument("--device", type=str, default="cuda", help="CUDA device to check (default: cuda).")
    parser.add_argument("--smoke", action="store_true",
                        help="Run every section tiny, on the CPU: checks that the script works, measures nothing.")
    return parser


if __name__ == "__main__":
    sys.exit(main())

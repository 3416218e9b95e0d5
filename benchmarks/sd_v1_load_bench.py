"""Benchmark sd_v1.load_sd_pipeline: the original single-file checkpoint against the same weights as a diffusers folder.

    python -m benchmarks.sd_v1_load_bench --dir /tmp/sd_v1_bench     # from the repository root; needs ~13 GB there

SD v1.4's architecture (configs/sd_v1) with random weights is written twice: as a diffusers folder
(`save_pretrained`, safetensors) and in the original CompVis layout as a PyTorch-Lightning-era `model.ckpt`
(`write_lightning_checkpoint`). Each load then runs in a fresh process, offline with an empty Hugging Face cache,
interleaved over `--rounds` rounds: `load_sd_pipeline(folder)` (diffusers' from_pretrained);
`load_sd_pipeline(model.ckpt)` with no cache (guarded unpickling, the architecture check, diffusers'
from_single_file and the one-time write of the diffusers-folder cache); and `load_sd_pipeline(model.ckpt)` again
(cached). The medians are printed as ratios to from_pretrained. The files are in the page cache for every load
(written just before), so disk speed is not measured. `--dir` is deleted after the run unless `--keep`.
"""

import argparse
import contextlib
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np
import torch

from sd_v1 import (
    SD_V1_CONFIG,
    TEXT_PREFIX,
    UNET_PREFIX,
    VAE_PREFIX,
    cache_dir,
    load_sd_pipeline,
    original_state_dict,
    random_pipeline,
)
from utils import Hw2Error, run_cli

REPO = Path(__file__).resolve().parents[1]
LIGHTNING_MODULE = "pytorch_lightning.callbacks.model_checkpoint"


@contextlib.contextmanager
def lightning_model_checkpoint_class():
    """A class pickled as pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint, without Lightning installed:
    empty modules of those names are put in sys.modules for the duration (pickle looks classes up by name)."""
    names = ["pytorch_lightning", "pytorch_lightning.callbacks", LIGHTNING_MODULE]
    saved = {name: sys.modules.get(name) for name in names}
    modules = {name: types.ModuleType(name) for name in names}
    model_checkpoint = type("ModelCheckpoint", (), {"__module__": LIGHTNING_MODULE})
    modules[LIGHTNING_MODULE].ModelCheckpoint = model_checkpoint
    sys.modules.update(modules)
    try:
        yield model_checkpoint
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


def write_lightning_checkpoint(state_dict, path):
    """`state_dict` saved as PyTorch Lightning 1.x saved the original SD v1 files: with the trainer's bookkeeping,
    the ModelCheckpoint *class* as a key of "callbacks", and numpy scalars in its record."""
    with lightning_model_checkpoint_class() as model_checkpoint:
        record = {"monitor": None, "best_model_score": None, "best_model_path": "", "dirpath": "logs/checkpoints",
                  "current_score": np.float64(0.125), "last_global_step_saved": np.int64(470000)}
        torch.save({"epoch": 6, "global_step": 470000, "pytorch-lightning_version": "1.4.2",
                    "callbacks": {model_checkpoint: record}, "state_dict": state_dict}, path)


def architecture_summary(state):
    """Key counts per model and the UNet's parameter count of an original-layout state dict."""
    counts = {name: sum(key.startswith(prefix) for key in state)
              for name, prefix in (("unet", UNET_PREFIX), ("vae", VAE_PREFIX), ("text_encoder", TEXT_PREFIX))}
    unet_params = sum(math.prod(value.shape) for key, value in state.items() if key.startswith(UNET_PREFIX))
    return {**counts, "unet_params": unet_params}


def worker(job):
    """Time one load_sd_pipeline call in this fresh process."""
    start = time.perf_counter()
    pipe = load_sd_pipeline(job["model"])
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "unet_params": sum(p.numel() for p in pipe.unet.parameters())}


def run_worker(model, hf_home):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(hf_home)}
    result = subprocess.run([sys.executable, "-m", "benchmarks.sd_v1_load_bench", "--worker",
                             json.dumps({"model": str(model)})], cwd=REPO, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise Hw2Error(f"benchmark worker failed for {model}: {result.stderr.strip().splitlines()[-1]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def write_files(folder):
    """The random SD v1.4 pipeline as a diffusers folder and as a Lightning-era original-layout model.ckpt."""
    start = time.perf_counter()
    pipe = random_pipeline(SD_V1_CONFIG)
    pipe.save_pretrained(folder / "diffusers")
    state = original_state_dict(pipe.unet, pipe.vae, pipe.text_encoder)
    write_lightning_checkpoint(state, folder / "model.ckpt")
    summary = architecture_summary(state)
    print(f"Wrote {folder} in {time.perf_counter() - start:.0f} s; original layout: {summary}", file=sys.stderr)
    return summary


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    folder = Path(args.dir)
    if folder.exists() and any(folder.iterdir()):
        raise Hw2Error(f"--dir {folder} is not empty; pass a new folder (the benchmark deletes it afterwards)")
    folder.mkdir(parents=True, exist_ok=True)
    try:
        summary = write_files(folder)
        ckpt, cache = folder / "model.ckpt", cache_dir(folder / "model.ckpt")
        times = {"from_pretrained": [], "single file, first run": [], "single file, cached": []}
        with tempfile.TemporaryDirectory() as hf_home:
            for round_index in range(args.rounds):
                times["from_pretrained"].append(run_worker(folder / "diffusers", hf_home)["seconds"])
                shutil.rmtree(cache, ignore_errors=True)
                times["single file, first run"].append(run_worker(ckpt, hf_home)["seconds"])
                times["single file, cached"].append(run_worker(ckpt, hf_home)["seconds"])
                print(f"round {round_index + 1}: {({k: round(v[-1], 1) for k, v in times.items()})}", file=sys.stderr)
            sizes = {"model.ckpt": ckpt.stat().st_size, "cache": sum(f.stat().st_size for f in cache.rglob("*"))}
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    print(f"### SD v1.4 architecture (random weights), load_sd_pipeline on CPU, median of {args.rounds} interleaved "
          f"rounds, each load in a fresh process (HF_HUB_OFFLINE=1, empty HF_HOME)\n")
    print(f"Original layout written: {summary['unet']} UNet / {summary['vae']} VAE / {summary['text_encoder']} text "
          f"encoder keys, UNet {summary['unet_params']:,} parameters; model.ckpt {sizes['model.ckpt'] / 1e9:.2f} GB, "
          f"cache {sizes['cache'] / 1e9:.2f} GB.\n")
    base = statistics.median(times["from_pretrained"])
    print("| load | seconds (median) | x from_pretrained |")
    print("|---|---|---|")
    for name, values in times.items():
        print(f"| {name} | {statistics.median(values):.1f} | {statistics.median(values) / base:.2f} |")


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default=str(Path(tempfile.gettempdir()) / "sd_v1_load_bench"),
                        help="Empty or new folder for the ~13 GB of files (default: a folder in the temp dir).")
    parser.add_argument("--rounds", type=int, default=3, help="Interleaved rounds of the three loads.")
    parser.add_argument("--keep", action="store_true", help="Keep --dir after the run.")
    parser.add_argument("--worker", default=None, help="Internal: run one JSON job and print its result.")
    return parser


if __name__ == "__main__":
    run_cli(main)

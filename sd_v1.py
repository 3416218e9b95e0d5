"""Stable Diffusion v1 loading, shared by textual inversion, Custom Diffusion, the report and the benchmarks.

    from sd_v1 import load_sd_pipeline
    pipe = load_sd_pipeline("CompVis/stable-diffusion-v1-4")        # a hub id
    pipe = load_sd_pipeline("models/sd-v1-4-diffusers")              # a diffusers folder
    pipe = load_sd_pipeline("stable-diffusion/models/ldm/stable-diffusion-v1/model.ckpt")  # the original file

On a toy world (built by toy_data.py) `default_model` points at the tiny random model under `hw2_data/toy_models/`.
"""

from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline

from utils import Hw2Error, find_toy_root

DEFAULT_MODEL = "CompVis/stable-diffusion-v1-4"
TOY_SD = Path("toy_models") / "tiny-sd"  # inside a toy hw2_data (see toy_data.build_tiny_sd)
SINGLE_FILE_SUFFIXES = (".ckpt", ".safetensors")


def default_model(anchor):
    """The toy SD folder when `anchor` lies in a toy world, else SD v1.4 from the hub."""
    toy_root = find_toy_root(anchor)
    return str(toy_root / TOY_SD) if toy_root is not None else DEFAULT_MODEL


def load_sd_pipeline(model, dtype=torch.float32):
    """A StableDiffusionPipeline from a hub id, a diffusers folder, or a single .ckpt/.safetensors file."""
    path = Path(model)
    kwargs = dict(dtype=dtype, safety_checker=None, requires_safety_checker=False)
    try:
        if path.is_dir():
            pipe = StableDiffusionPipeline.from_pretrained(path, **kwargs)
        elif path.is_file() and path.suffix in SINGLE_FILE_SUFFIXES:
            # the original CompVis checkpoint; diffusers reads it with torch.load(weights_only=True)
            pipe = StableDiffusionPipeline.from_single_file(str(path), **kwargs)
        elif path.exists() or path.suffix in (*SINGLE_FILE_SUFFIXES, ".pt") or model.startswith((".", "/", "~")):
            raise Hw2Error(f"model {model} does not exist or is not a diffusers folder / .ckpt / .safetensors "
                           f"file; pass the SD v1.4 checkpoint path or a hub id such as {DEFAULT_MODEL}")
        else:
            pipe = StableDiffusionPipeline.from_pretrained(model, **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        hint = ("a single checkpoint file also needs SD v1's small config files from the hub once (run online once)"
                if path.is_file() else "offline, pass a local diffusers folder or the .ckpt file")
        raise Hw2Error(f"cannot load Stable Diffusion from {model} ({reason}); {hint}") from err
    pipe.set_progress_bar_config(disable=True)
    return pipe

"""P3: textual inversion on Stable Diffusion v1.4 -- learn new words, generate the grader's folders, score them.

    # learn one concept (a few photos of it) as a new word, initialised from a word close to it
    python p3_textual_inversion.py train hw2_data/textual_inversion/0 --token "<new1>" --init-token dog \\
        --out checkpoints/p3_ti/0
    # or learn every concept of an input.json (one sub-folder of --out per concept)
    python p3_textual_inversion.py train --input-json hw2_data/textual_inversion/input.json --out checkpoints/p3_ti
    # the grader's call: 25 images per concept and prompt in OUT_DIR/{c}/{p}/source{c}_prompt{p}_{i}.png
    python p3_textual_inversion.py generate hw2_data/textual_inversion/input.json out/p3 MODEL
    # the grader's CLIP scores (top 5 of 25 by CLIP-I + 2.5 CLIP-T) against input.json's baselines
    python p3_textual_inversion.py score hw2_data/textual_inversion/input.json out/p3

Textual inversion (Gal et al., 2022) freezes the whole text-to-image model and learns only the input embedding
v* of a new token S*:  v* = argmin_v E_{x, eps, t} || eps - eps_theta(z_t, t, c_theta(y(S*))) ||^2  (their eq. 2),
with z_t = sqrt(alpha_bar_t) z_0 + sqrt(1 - alpha_bar_t) eps and z_0 the VAE latent of a training photo x, and
y(S*) a neutral template such as "a photo of a S*" (objects) or "a painting in the style of S*" (styles).

MODEL (and `--model`) is a hub id (CompVis/stable-diffusion-v1-4), a diffusers folder, or one `.ckpt` /
`.safetensors` file such as the course's SD v1.4 `model.ckpt`. On a toy world (built by toy_data.py) every
subcommand defaults to the tiny random models under `hw2_data/toy_models/`.
"""

import argparse
import json
import re
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, PNDMScheduler, StableDiffusionPipeline
from diffusers.utils import logging as diffusers_logging
from safetensors.torch import save as safetensors_save
from torchvision.transforms import v2
from tqdm import tqdm
from transformers import CLIPModel, CLIPProcessor

from utils import (
    Hw2Error,
    announce_toy_world,
    atomic_dir,
    atomic_write_bytes,
    atomic_write_text,
    find_toy_root,
    get_device,
    load_checkpoint,
    load_rgb,
    run_cli,
    save_checkpoint,
    save_grid,
    save_png,
    seed_everything,
)

DEFAULT_MODEL = "CompVis/stable-diffusion-v1-4"
DEFAULT_CLIP = "openai/clip-vit-base-patch32"  # the grader's CLIP
DEFAULT_EMBEDS_DIR = Path(__file__).resolve().parent / "checkpoints" / "p3_ti"  # train --out, generate --embeds
TOY_SD = Path("toy_models") / "tiny-sd"  # inside a toy hw2_data (see toy_data.build_tiny_sd)
TOY_CLIP = Path("toy_models") / "tiny-clip-scorer"
EMBEDS_FILE = "learned_embeds.safetensors"  # diffusers' name and format: {token: [num_vectors, D] tensor}
STATE_FILE = "train_state.safetensors"  # everything needed to resume training
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
GRADER_IMAGES = 25  # the grader refuses any other count per prompt folder
GRADER_TOP_K = 5  # it keeps the 5 images with the highest CLIP-I + 2.5 CLIP-T
GRADER_TEXT_WEIGHT = 2.5
INPUT_FIELDS = ("token_name", "src_image", "prompt", "prompt_4_clip_eval", "baseline")
TOKEN_PATTERN = re.compile(r"<[^<>\s]+>")  # placeholder tokens in prompts: "<new1>"
ADAM_WEIGHT_DECAY = 1e-2  # diffusers' textual-inversion default
# random square crops covering this fraction of the (pre-resized) photo's area: an object should stay mostly
# in frame; a style is a texture, so smaller crops still show it
CROP_SCALE = {"object": (0.7, 1.0), "style": (0.4, 1.0)}
PRE_RESIZE = 1.25  # photos are first resized to 1.25x the training resolution (short side) so crops stay sharp
DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# The prompt templates of the textual-inversion paper's code (rinongal/textual_inversion, also used by diffusers).
OBJECT_TEMPLATES = [
    "a photo of a {}", "a rendering of a {}", "a cropped photo of the {}", "the photo of a {}",
    "a photo of a clean {}", "a photo of a dirty {}", "a dark photo of the {}", "a photo of my {}",
    "a photo of the cool {}", "a close-up photo of a {}", "a bright photo of the {}", "a cropped photo of a {}",
    "a photo of the {}", "a good photo of the {}", "a photo of one {}", "a close-up photo of the {}",
    "a rendition of the {}", "a photo of the clean {}", "a rendition of a {}", "a photo of a nice {}",
    "a good photo of a {}", "a photo of the nice {}", "a photo of the small {}", "a photo of the weird {}",
    "a photo of the large {}", "a photo of a cool {}", "a photo of a small {}",
]
STYLE_TEMPLATES = [
    "a painting in the style of {}", "a rendering in the style of {}", "a cropped painting in the style of {}",
    "the painting in the style of {}", "a clean painting in the style of {}", "a dirty painting in the style of {}",
    "a dark painting in the style of {}", "a picture in the style of {}", "a cool painting in the style of {}",
    "a close-up painting in the style of {}", "a bright painting in the style of {}",
    "a cropped painting in the style of {}", "a good painting in the style of {}",
    "a close-up painting in the style of {}", "a rendition in the style of {}", "a nice painting in the style of {}",
    "a small painting in the style of {}", "a weird painting in the style of {}", "a large painting in the style of {}",
]
VALIDATION_PROMPT = {"object": "a photo of a {}", "style": "a painting in the style of {}"}
VALIDATION_IMAGES = 4
VALIDATION_STEPS = 25

# ------------------------------------------------------------------------------------------------ input.json


def read_input_json(path, fields):
    """input.json as {concept: entry}; every entry must hold `fields`, with one prompt per eval prompt/baseline."""
    path = Path(path)
    if not path.is_file():
        raise Hw2Error(f"input.json not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise Hw2Error(f"{path} is not valid JSON ({err}); pass the course's input.json") from err
    if not isinstance(data, dict) or not data:
        raise Hw2Error(f"{path} must map concept folders (\"0\", \"1\", ...) to entries; it holds no concept")
    for concept, entry in data.items():
        missing = [field for field in fields if not isinstance(entry, dict) or field not in entry]
        if missing:
            raise Hw2Error(f"{path}: concept {concept!r} lacks the field(s) {', '.join(missing)}")
        if not isinstance(entry["token_name"], str) or not TOKEN_PATTERN.fullmatch(entry["token_name"]):
            raise Hw2Error(f"{path}: concept {concept!r} has token_name {entry['token_name']!r}; "
                           f"use a word in angle brackets such as \"<new1>\"")
        if not isinstance(entry["prompt"], list) or not all(isinstance(p, str) for p in entry["prompt"]):
            raise Hw2Error(f"{path}: concept {concept!r} needs \"prompt\" to be a list of strings")
        for field in ("prompt_4_clip_eval", "baseline"):
            if field in fields and (not isinstance(entry[field], list) or len(entry[field]) != len(entry["prompt"])):
                raise Hw2Error(f"{path}: concept {concept!r} needs one {field} entry per prompt "
                               f"({len(entry['prompt'])})")
        if "baseline" in fields and not all(isinstance(b, list) and len(b) == 2 for b in entry["baseline"]):
            raise Hw2Error(f"{path}: concept {concept!r} needs each baseline to be [CLIP-I, CLIP-T]")
    return data


def concept_property(entry):
    """'style' when the concept's prompts use its token as "in the style of <token>", else 'object'."""
    style = re.compile(r"style\s+of\s+" + re.escape(entry["token_name"]), re.IGNORECASE)
    return "style" if any(style.search(prompt) for prompt in entry["prompt"]) else "object"


def list_images(folder):
    """The image files of `folder` (the grader's extensions), sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise Hw2Error(f"image folder not found: {folder}")
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


# ---------------------------------------------------------------------------------------------- models


def default_model(anchor):
    """The toy SD folder when `anchor` lies in a toy world, else SD v1.4 from the hub."""
    toy_root = find_toy_root(anchor)
    return str(toy_root / TOY_SD) if toy_root is not None else DEFAULT_MODEL


def load_pipeline(model, dtype=torch.float32):
    """A StableDiffusionPipeline from a hub id, a diffusers folder, or a single .ckpt/.safetensors file."""
    path = Path(model)
    kwargs = dict(dtype=dtype, safety_checker=None, requires_safety_checker=False)
    try:
        if path.is_dir():
            pipe = StableDiffusionPipeline.from_pretrained(path, **kwargs)
        elif path.is_file() and path.suffix in (".ckpt", ".safetensors"):
            # the original CompVis checkpoint; diffusers reads it with torch.load(weights_only=True)
            pipe = StableDiffusionPipeline.from_single_file(str(path), **kwargs)
        elif path.exists() or path.suffix in (".ckpt", ".safetensors", ".pt") or model.startswith((".", "/", "~")):
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


# ----------------------------------------------------------------------------------- new tokens (train)


def placeholder_tokens(token, num_vectors):
    """The tokens that carry a multi-vector concept, named as diffusers does: <t>, <t>_1, ..., <t>_{N-1}."""
    return [token] + [f"{token}_{i}" for i in range(1, num_vectors)]


def expand_placeholder(text, token, num_vectors):
    """Write `token` in `text` as all its vectors' tokens (what diffusers' pipeline does at generation)."""
    return text.replace(token, " ".join(placeholder_tokens(token, num_vectors)))


def add_placeholder_tokens(tokenizer, text_encoder, token, num_vectors, init_text):
    """Add the concept's tokens, grow the embedding table, and start each new row at the init text's embedding.

    A one-token init text gives that token's row (the paper's choice); a longer one ("David Revoltella") gives
    the mean of its tokens' rows. Returns the new rows' ids.
    """
    vocab = tokenizer.get_vocab()
    tokens = placeholder_tokens(token, num_vectors)
    for name in tokens:
        # "dog" is in CLIP's vocabulary as "dog</w>": adding it again would hijack the real word
        if name in vocab or f"{name}</w>" in vocab:
            raise Hw2Error(f"--token {token!r}: {name!r} is already in the tokenizer's vocabulary; "
                           f"pick a new word such as \"<new1>\"")
    init_ids = tokenizer(init_text, add_special_tokens=False).input_ids
    if not init_ids:
        raise Hw2Error(f"--init-token {init_text!r} gives no token; pass a word such as \"dog\"")
    tokenizer.add_tokens(tokens)
    new_ids = tokenizer.convert_tokens_to_ids(tokens)
    text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)  # rows set just below
    weight = text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        weight[new_ids] = weight[init_ids].mean(0, keepdim=True)
    return new_ids


def restore_frozen_rows(weight, original, trainable_ids):
    """Copy every row but `trainable_ids` back from `original`, so the rest of the vocabulary stays bit-identical.

    AdamW's weight decay and the gradients of the template words would otherwise move them.
    """
    frozen = torch.ones(weight.shape[0], dtype=torch.bool, device=weight.device)
    frozen[trainable_ids] = False
    with torch.no_grad():
        weight[frozen] = original[frozen]


def slice_rows(state, ids, num_rows):
    """Keep only rows `ids` of every [num_rows, ...] tensor in a nested optimizer state (the others are reset each
    step anyway, and AdamW is elementwise): the saved state is a few KB instead of two copies of the vocabulary."""
    if isinstance(state, torch.Tensor):
        return state[ids] if state.dim() > 0 and state.shape[0] == num_rows else state
    if isinstance(state, dict):
        return {key: slice_rows(value, ids, num_rows) for key, value in state.items()}
    if isinstance(state, list):
        return [slice_rows(value, ids, num_rows) for value in state]
    return state


def expand_rows(state, ids, like):
    """Inverse of `slice_rows`: put the kept rows back into zero tensors shaped like the parameter `like`."""
    if isinstance(state, torch.Tensor):
        if state.dim() == like.dim() and state.shape[1:] == like.shape[1:] and state.shape[0] == len(ids):
            full = torch.zeros_like(like, dtype=state.dtype)
            full[ids] = state.to(like.device)
            return full
        return state
    if isinstance(state, dict):
        return {key: expand_rows(value, ids, like) for key, value in state.items()}
    if isinstance(state, list):
        return [expand_rows(value, ids, like) for value in state]
    return state


# ------------------------------------------------------------------------------------------- loss (train)


def augment(image, resolution, prop):
    """One training view of a CxHxW photo in [-1, 1]: a random square crop, resized; flipped half the time for
    objects only (a style may not survive mirroring: writing, lighting direction)."""
    crop = v2.RandomResizedCrop(resolution, scale=CROP_SCALE[prop], ratio=(1.0, 1.0), antialias=True)
    image = crop(image)
    if prop == "object" and torch.rand(()) < 0.5:
        image = image.flip(-1)
    return image


def sample_batch(images, tokenizer, templates, concept_text, resolution, prop, batch_size):
    """Random views of random photos, each with a random template around the concept's token(s)."""
    picks = torch.randint(len(images), (batch_size,)).tolist()
    words = torch.randint(len(templates), (batch_size,)).tolist()
    pixels = torch.stack([augment(images[i], resolution, prop) for i in picks])  # B x 3 x res x res
    texts = [templates[w].format(concept_text) for w in words]
    input_ids = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                          return_tensors="pt").input_ids  # B x 77
    return pixels, input_ids


def diffusion_target(noise_scheduler, z_0, eps, t):
    """What the UNet predicts under the model's own parameterisation: eps, v = sqrt(a) eps - sqrt(1-a) z_0, or z_0."""
    kind = noise_scheduler.config.prediction_type
    if kind == "epsilon":
        return eps
    if kind == "v_prediction":
        return noise_scheduler.get_velocity(z_0, eps, t)
    if kind == "sample":
        return z_0
    raise Hw2Error(f"the model's scheduler has prediction_type {kind!r}; textual inversion here handles "
                   f"epsilon, v_prediction and sample")


def ti_loss(unet, text_encoder, noise_scheduler, z_0, input_ids, eps, t):
    """The textual-inversion objective (paper eq. 2): MSE between the UNet's prediction at z_t and its target.

    z_0: B x 4 x h x w VAE latents (already x scaling_factor); eps: noise like z_0; t: B integer timesteps.
    """
    z_t = noise_scheduler.add_noise(z_0, eps, t)  # q(z_t | z_0) = N(sqrt(alpha_bar_t) z_0, (1 - alpha_bar_t) I)
    c = text_encoder(input_ids)[0]  # B x 77 x D, the conditioning c_theta(y)
    prediction = unet(z_t.to(unet.dtype), t, c.to(unet.dtype)).sample
    return F.mse_loss(prediction.float(), diffusion_target(noise_scheduler, z_0, eps, t).float())


def encode_latents(vae, pixels):
    """z_0 ~ the VAE posterior of images in [-1, 1], times the VAE's scaling factor (0.18215 for SD v1)."""
    with torch.no_grad():
        return vae.encode(pixels.to(vae.dtype)).latent_dist.sample() * vae.config.scaling_factor


# ----------------------------------------------------------------------------------------- save / resume


def save_learned_embeds(path, token, rows):
    """diffusers' textual-inversion file: {token: [num_vectors, D] float32}, written atomically."""
    atomic_write_bytes(path, safetensors_save({token: rows.detach().float().cpu().contiguous()}))


def rng_state(device):
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state, device):
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def run_config(args, token, init_text, prop, model):
    """The settings a resumed run must share with the saved one (steps may grow, the rest may not change)."""
    return {"token": token, "init_text": init_text, "property": prop, "model": str(model),
            "num_vectors": args.num_vectors, "lr": args.lr, "batch_size": args.batch_size,
            "grad_accum": args.grad_accum, "resolution": args.resolution, "seed": args.seed,
            "mixed_precision": args.mixed_precision}


# ---------------------------------------------------------------------------------------------- training


def concept_image_paths(folder):
    paths = list_images(folder)
    if not paths:
        raise Hw2Error(f"concept folder {folder} holds no image ({', '.join(IMAGE_EXTENSIONS)})")
    return paths


def load_concept_images(folder, resolution):
    """The concept's photos as 3 x H x W tensors in [-1, 1], short side resized to PRE_RESIZE x resolution."""
    paths = concept_image_paths(folder)
    side = round(resolution * PRE_RESIZE)
    resize = v2.Compose([v2.PILToTensor(), v2.Resize(side, antialias=True), v2.ToDtype(torch.float32, scale=True)])
    return [resize(load_rgb(path)) * 2 - 1 for path in paths]


def validation_images(pipe, prompt, resolution, autocast, seed):
    """A few images of the concept with the weights as they are now (fixed seeds: comparable across steps)."""
    with autocast:
        return sample_images(pipe, prompt, [seed + i for i in range(VALIDATION_IMAGES)], VALIDATION_STEPS, 7.5,
                             resolution)


def prepare_for_training(pipe, device, mixed_precision, gradient_checkpointing):
    """Freeze VAE, UNet and text encoder and move them to `device`; only the input embedding table learns.

    The VAE and UNet (93% of SD's weights) run in the mixed-precision dtype. The text encoder stays fp32, as in
    diffusers' example: it holds the trainable table (small updates would vanish in fp16), and CPU autocast would
    feed its fp32 activations to half-precision LayerNorm weights.

    Returns (the embedding module, the autocast context, the GradScaler)."""
    weight_dtype = DTYPES[mixed_precision]
    for module in (pipe.vae, pipe.unet, pipe.text_encoder):
        module.requires_grad_(False)
    pipe.vae.to(device, weight_dtype).eval()
    pipe.unet.to(device, weight_dtype).train()  # train(): gradient checkpointing is active only in training mode
    pipe.text_encoder.to(device, torch.float32).train()
    embedding = pipe.text_encoder.get_input_embeddings()
    embedding.weight.requires_grad_(True)
    if gradient_checkpointing:
        pipe.unet.enable_gradient_checkpointing()
        pipe.text_encoder.activation_checkpointing_enable()
    autocast = torch.autocast(torch.device(device).type, dtype=weight_dtype, enabled=mixed_precision != "no")
    # loss scaling only for fp16 (bf16 has fp32's range); utils.make_grad_scaler picks its own dtype, so not used
    scaler = torch.amp.GradScaler(torch.device(device).type, enabled=mixed_precision == "fp16")
    return embedding, autocast, scaler


def train_step(pipe, noise_scheduler, next_batch, grad_accum, optimizer, scaler, autocast, original, new_ids):
    """One optimizer step over `grad_accum` micro-batches from `next_batch()`; then the frozen rows are restored.

    Noise and timesteps come from torch's global RNG (saved with the resume state). Returns the last loss."""
    device = pipe.unet.device
    for _ in range(grad_accum):
        pixels, input_ids = next_batch()
        z_0 = encode_latents(pipe.vae, pixels.to(device))
        eps = torch.randn_like(z_0)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (z_0.shape[0],), device=device)
        with autocast:
            loss = ti_loss(pipe.unet, pipe.text_encoder, noise_scheduler, z_0, input_ids.to(device), eps, t)
        scaler.scale(loss / grad_accum).backward()
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    restore_frozen_rows(pipe.text_encoder.get_input_embeddings().weight, original, new_ids)
    return loss.item()


def train_concept(args, concept_dir, token, init_text, prop, out_dir, model, device):
    """Learn `token` from the photos in `concept_dir`; write out_dir/learned_embeds.safetensors (and resume state).

    Returns the pipeline whose text encoder holds the learned rows (tests compare it with the original)."""
    out_dir = Path(out_dir)
    state_path = out_dir / STATE_FILE
    pipe = load_pipeline(model)
    tokenizer = pipe.tokenizer
    # the model's own training noise schedule (its scheduler config, e.g. SD v1's scaled-linear betas)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    resolution = args.resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
    images = load_concept_images(concept_dir, resolution)
    new_ids = add_placeholder_tokens(tokenizer, pipe.text_encoder, token, args.num_vectors, init_text)
    concept_text = expand_placeholder(token, token, args.num_vectors)
    templates = STYLE_TEMPLATES if prop == "style" else OBJECT_TEMPLATES

    embedding, autocast, scaler = prepare_for_training(pipe, device, args.mixed_precision,
                                                       args.gradient_checkpointing)
    original = embedding.weight.detach().clone()
    optimizer = torch.optim.AdamW([embedding.weight], lr=args.lr, weight_decay=ADAM_WEIGHT_DECAY)

    config = run_config(args, token, init_text, prop, model)
    start = 0
    seed_everything(args.seed)
    if state_path.exists():
        state = load_checkpoint(state_path)
        changed = [key for key, value in config.items() if state["config"].get(key) != value]
        if changed:
            raise Hw2Error(f"{state_path} is from a run with other settings ({', '.join(changed)}); "
                           f"pass another --out or delete that folder to start over")
        start = state["step"]
        with torch.no_grad():
            embedding.weight[new_ids] = state["embeds"].to(device)
        optimizer.load_state_dict(expand_rows(state["optimizer"], new_ids, embedding.weight))
        scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"], device)
        if start >= args.steps:
            print(f"{token} is already trained to {start} steps in {out_dir}; raise --steps to train further.")
            return pipe
        print(f"Resuming {token} from step {start} ({state_path}).")

    def save(step):
        rows = embedding.weight[new_ids]
        save_checkpoint(state_path, {
            "step": step, "config": config, "embeds": rows, "scaler": scaler.state_dict(), "rng": rng_state(device),
            "optimizer": slice_rows(optimizer.state_dict(), new_ids, embedding.weight.shape[0])})
        save_learned_embeds(out_dir / EMBEDS_FILE, token, rows)

    def next_batch():
        return sample_batch(images, tokenizer, templates, concept_text, resolution, prop, args.batch_size)

    progress = tqdm(range(start, args.steps), initial=start, total=args.steps, desc=f"train {token}")
    for step in progress:
        if args.validate_every and step % args.validate_every == 0:
            validation = validation_images(pipe, VALIDATION_PROMPT[prop].format(concept_text), resolution, autocast,
                                           args.seed)
            save_grid(validation * 2 - 1, out_dir / "validation" / f"step{step:06d}.png", nrow=VALIDATION_IMAGES)
        loss = train_step(pipe, noise_scheduler, next_batch, args.grad_accum, optimizer, scaler, autocast, original,
                          new_ids)
        progress.set_postfix(loss=f"{loss:.4f}")
        if (step + 1) % args.save_every == 0 or step + 1 == args.steps:
            save(step + 1)
    print(f"Wrote {out_dir / EMBEDS_FILE} ({token}, {args.num_vectors} vector(s), {args.steps} steps).")
    return pipe  # its tokenizer and text encoder now hold the learned token(s)


def run_train(args):
    if args.input_json is None and args.concept_dir is None:
        raise Hw2Error("train needs a CONCEPT_DIR (with --token and --init-token) or --input-json FILE")
    if args.input_json is not None and args.concept_dir is not None:
        raise Hw2Error("train takes either a CONCEPT_DIR or --input-json, not both")
    for flag, value in (("--steps", args.steps), ("--batch-size", args.batch_size), ("--grad-accum", args.grad_accum),
                        ("--num-vectors", args.num_vectors), ("--save-every", args.save_every)):
        if value < 1:
            raise Hw2Error(f"{flag} must be at least 1, got {value}")
    anchor = Path(args.input_json or args.concept_dir)
    announce_toy_world(anchor)
    model = args.model or default_model(anchor)
    device = get_device(args.device)
    if args.mixed_precision == "fp16" and device.type == "cpu":
        print("note: fp16 autocast on CPU is slow and partial; bf16 is the CPU choice.")
    if args.input_json is None:
        if args.token is None or args.init_token is None:
            raise Hw2Error("training one CONCEPT_DIR needs --token (e.g. \"<new1>\") and --init-token (e.g. dog)")
        prop = "object" if args.property == "auto" else args.property
        jobs = [(Path(args.concept_dir), args.token, args.init_token, prop, Path(args.out))]
    else:
        entries = read_input_json(args.input_json, ("token_name", "src_image", "prompt"))
        jobs = [(Path(args.input_json).parent / concept, entry["token_name"], args.init_token or entry["src_image"],
                 concept_property(entry) if args.property == "auto" else args.property, Path(args.out) / concept)
                for concept, entry in entries.items()]
    for concept_dir, _, _, _, _ in jobs:  # every folder is checked before any training starts
        concept_image_paths(concept_dir)
    pipes = []
    for concept_dir, token, init_text, prop, out_dir in jobs:
        print(f"Concept {concept_dir}: {token} ({prop}), initialised from {init_text!r}.")
        pipes.append(train_concept(args, concept_dir, token, init_text, prop, out_dir, model, device))
    return pipes


# -------------------------------------------------------------------------------------------- generation

SCHEDULERS = {"ddim": DDIMScheduler, "pndm": PNDMScheduler, "dpm": DPMSolverMultistepScheduler}


def image_seed(seed, *index):
    """A per-image seed from (seed, concept, prompt, image): an image does not depend on batch size or order."""
    return int(np.random.SeedSequence([seed, *index]).generate_state(1)[0])


def sample_images(pipe, prompt, seeds, steps, guidance, resolution=None):
    """len(seeds) images of `prompt` (N x 3 x H x W in [0, 1]); image k starts from CPU noise seeded seeds[k]."""
    generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    with torch.no_grad():
        return pipe([prompt] * len(seeds), num_inference_steps=steps, guidance_scale=guidance, generator=generators,
                    height=resolution, width=resolution, output_type="pt").images.float().cpu()


def find_embeds(paths):
    """The learned_embeds files named by --embeds (files, or folders searched recursively), sorted."""
    found = []
    for path in map(Path, paths):
        if path.is_file():
            found.append(path)
        elif path.is_dir():
            found.extend(sorted(path.rglob(EMBEDS_FILE)))
        else:
            raise Hw2Error(f"--embeds {path} does not exist; pass learned_embeds.safetensors files or their folder")
    if not found:
        raise Hw2Error(f"no {EMBEDS_FILE} under {', '.join(map(str, paths))}; train first or pass --embeds")
    return found


def load_embeds(pipe, files):
    """Add every learned token to the pipeline with diffusers' own loader."""
    for path in files:
        try:
            pipe.load_textual_inversion(str(path))
        except (ValueError, OSError, KeyError, RuntimeError) as err:
            raise Hw2Error(f"cannot load embeddings {path}: {str(err).strip().splitlines()[0]}") from err


def check_tokens(pipe, prompts, source):
    missing = sorted({t for p in prompts for t in TOKEN_PATTERN.findall(p)} - set(pipe.tokenizer.get_vocab()))
    if missing:
        raise Hw2Error(f"{source} uses {', '.join(missing)} but no loaded embedding file provides it; "
                       f"pass the matching learned_embeds.safetensors with --embeds")


def output_jobs(data, out_dir, free_prompts):
    """(folder, file stem, prompt, seed index) for every prompt folder to write."""
    if free_prompts:
        return [(out_dir / "free" / str(k), f"free{k}", prompt, (1, k)) for k, prompt in enumerate(free_prompts)]
    return [(out_dir / concept / str(p), f"source{concept}_prompt{p}", prompt, (0, c, p))
            for c, (concept, entry) in enumerate(data.items()) for p, prompt in enumerate(entry["prompt"])]


def check_destination(folder, stem):
    """An existing prompt folder may be replaced only when it holds nothing but our own earlier images."""
    ours = re.compile(re.escape(stem) + r"_\d+\.png|prompt\.txt")
    if folder.exists():
        strays = [p.name for p in folder.iterdir() if not ours.fullmatch(p.name)] if folder.is_dir() else [""]
        if strays:
            raise Hw2Error(f"{folder} exists and holds other files ({', '.join(strays[:3])}); "
                           f"pass another OUT_DIR or move them away")


def run_generate(args):
    announce_toy_world(args.input_json)
    data = read_input_json(args.input_json, ("token_name", "prompt"))
    if args.num_images < 1 or args.batch_size < 1 or args.steps < 1:
        raise Hw2Error("--num-images, --batch-size and --steps must be at least 1")
    if args.num_images != GRADER_IMAGES and not args.prompt:
        print(f"note: the grader needs exactly {GRADER_IMAGES} images per prompt, not {args.num_images}.")
    out_dir = Path(args.out_dir)
    jobs = output_jobs(data, out_dir, args.prompt)
    for folder, stem, _, _ in jobs:
        check_destination(folder, stem)
    files = find_embeds(args.embeds or [DEFAULT_EMBEDS_DIR])
    device = get_device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32  # fp16 halves SD's time and memory on a GPU
    model = args.model or default_model(args.input_json)
    pipe = load_pipeline(model, dtype)
    if args.scheduler != "model":
        pipe.scheduler = SCHEDULERS[args.scheduler].from_config(pipe.scheduler.config)
    load_embeds(pipe, files)
    check_tokens(pipe, [prompt for _, _, prompt, _ in jobs], "--prompt" if args.prompt else args.input_json)
    pipe.to(device)
    print(f"Model {model}; embeddings {', '.join(map(str, files))}; {args.scheduler} scheduler, {args.steps} steps.")

    start = time.perf_counter()
    progress = tqdm(total=len(jobs) * args.num_images, desc="generate", unit="img")
    for folder, stem, prompt, index in jobs:
        # the prompt's images go to a temp folder that replaces `folder` (our own earlier images only, see
        # check_destination) once all are written
        with atomic_dir(folder) as tmp:
            for first in range(0, args.num_images, args.batch_size):
                batch = range(first, min(first + args.batch_size, args.num_images))
                images = sample_images(pipe, prompt, [image_seed(args.seed, *index, i) for i in batch], args.steps,
                                       args.guidance)
                for i, image in zip(batch, images):
                    save_png(image * 2 - 1, tmp / f"{stem}_{i}.png")
                progress.update(len(batch))
            if args.prompt:  # a free prompt's folder records its prompt; the grader's folders hold images only
                atomic_write_text(tmp / "prompt.txt", prompt + "\n")
    progress.close()
    seconds = time.perf_counter() - start
    count = len(jobs) * args.num_images
    print(f"Wrote {count} images to {out_dir} in {seconds:.1f} s ({count / seconds:.2f} images/s on {device}).")


# ------------------------------------------------------------------------------------------------ scoring


def clip_scores(image_features, reference_features, text_features):
    """The grader's per-image scores: CLIP-I = mean over reference photos of 100 cos(image, reference),
    CLIP-T = 100 cos(image, eval prompt). image_features N x D, reference_features R x D, text_features D."""
    image = F.normalize(image_features.float(), dim=-1)
    clip_i = 100 * (image @ F.normalize(reference_features.float(), dim=-1).T).mean(1)  # N
    clip_t = 100 * image @ F.normalize(text_features.float(), dim=-1)  # N
    return clip_i, clip_t


def top_k_means(clip_i, clip_t, k=GRADER_TOP_K, text_weight=GRADER_TEXT_WEIGHT):
    """Mean CLIP-I and CLIP-T of the k images with the highest CLIP-I + text_weight * CLIP-T."""
    keep = torch.topk(clip_i + text_weight * clip_t, k).indices
    return clip_i[keep].mean().item(), clip_t[keep].mean().item()


def image_features(model, processor, paths, device, batch_size=32):
    features = []
    for first in range(0, len(paths), batch_size):
        images = [load_rgb(path) for path in paths[first:first + batch_size]]
        pixels = processor(images=images, return_tensors="pt").pixel_values.to(device)
        with torch.no_grad():
            features.append(model.get_image_features(pixel_values=pixels).pooler_output.cpu())
    return torch.cat(features)


def text_features(model, processor, text, device):
    tokens = processor(text=[text], padding=True, truncation=True, return_tensors="pt").to(device)
    with torch.no_grad():
        return model.get_text_features(**tokens).pooler_output[0].cpu()


def load_clip(name):
    try:
        return CLIPModel.from_pretrained(name).eval(), CLIPProcessor.from_pretrained(name)
    except (OSError, ValueError) as err:
        raise Hw2Error(f"cannot load CLIP {name} ({str(err).strip().splitlines()[0]}); offline, pass --clip "
                       f"with a local folder") from err


def run_score(args):
    announce_toy_world(args.input_json)
    data = read_input_json(args.input_json, INPUT_FIELDS)
    concepts = Path(args.concepts) if args.concepts else Path(args.input_json).parent
    out_dir = Path(args.out_dir)
    # every folder is checked before the (slow) CLIP model is loaded
    for concept, entry in data.items():
        if not list_images(concepts / concept):
            raise Hw2Error(f"reference folder {concepts / concept} holds no image; pass --concepts "
                           f"hw2_data/textual_inversion")
        for p in range(len(entry["prompt"])):
            count = len(list_images(out_dir / concept / str(p)))
            if count != GRADER_IMAGES:
                raise Hw2Error(f"{out_dir / concept / str(p)} holds {count} images; the grader needs exactly "
                               f"{GRADER_IMAGES} (run generate with --num-images {GRADER_IMAGES})")
    toy_root = find_toy_root(args.input_json)
    clip = args.clip or (str(toy_root / TOY_CLIP) if toy_root is not None else DEFAULT_CLIP)
    device = get_device(args.device)
    model, processor = load_clip(clip)
    model.to(device)
    rows = []
    print(f"{'concept':>7} {'prompt':>6} {'CLIP-I':>7} {'base':>5} {'CLIP-T':>7} {'base':>5}  result")
    for concept, entry in data.items():
        references = image_features(model, processor, list_images(concepts / concept), device)
        for p, (eval_prompt, (base_i, base_t)) in enumerate(zip(entry["prompt_4_clip_eval"], entry["baseline"])):
            generated = image_features(model, processor, list_images(out_dir / concept / str(p)), device)
            clip_i, clip_t = clip_scores(generated, references, text_features(model, processor, eval_prompt, device))
            mean_i, mean_t = top_k_means(clip_i, clip_t)
            ok = mean_i >= base_i and mean_t >= base_t
            rows.append({"concept": concept, "prompt": p, "clip_i": mean_i, "baseline_i": base_i,
                         "clip_t": mean_t, "baseline_t": base_t, "passed": ok})
            print(f"{concept:>7} {p:>6} {mean_i:7.2f} {base_i:5} {mean_t:7.2f} {base_t:5}  {'PASS' if ok else 'FAIL'}")
    passed = sum(row["passed"] for row in rows)
    print(f"passed {passed}/{len(rows)} (CLIP {clip}; mean of the top {GRADER_TOP_K} of {GRADER_IMAGES} by "
          f"CLIP-I + {GRADER_TEXT_WEIGHT} CLIP-T)")
    return rows


# --------------------------------------------------------------------------------------------------- CLI


def main(argv=None):
    args = build_parser().parse_args(argv)
    diffusers_logging.set_verbosity_error()  # hide load-time chatter (e.g. "install accelerate"); errors still show
    return {"train": run_train, "generate": run_generate, "score": run_score}[args.command](args)


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="Learn new token embeddings from a concept's photos.")
    train.add_argument("concept_dir", nargs="?", default=None,
                       help="Folder of one concept's photos (omit it when --input-json is given).")
    train.add_argument("--input-json", default=None,
                       help="Train every concept of this input.json; its photos are in the sub-folders beside it.")
    train.add_argument("--token", default=None, help="The new word to learn, e.g. \"<new1>\" (CONCEPT_DIR mode).")
    train.add_argument("--init-token", default=None,
                       help="Text whose embedding starts the new word (mean of its tokens); with --input-json the "
                            "default is each concept's src_image.")
    train.add_argument("--property", choices=["auto", "object", "style"], default="auto",
                       help="Prompt templates and augmentation: object or style; auto means style for input.json "
                            "concepts whose prompts say \"style of <token>\", object otherwise (and for CONCEPT_DIR).")
    train.add_argument("--model", default=None,
                       help=f"Hub id, diffusers folder or .ckpt/.safetensors file (default: {DEFAULT_MODEL}, or "
                            f"the tiny toy model on a toy world).")
    train.add_argument("--num-vectors", type=int, default=1, help="Embedding vectors per new word.")
    train.add_argument("--steps", type=int, default=3000, help="Optimizer steps per concept.")
    train.add_argument("--lr", type=float, default=2e-3, help="AdamW learning rate (constant).")
    train.add_argument("--batch-size", type=int, default=4, help="Images per forward pass.")
    train.add_argument("--grad-accum", type=int, default=1, help="Forward passes accumulated per optimizer step.")
    train.add_argument("--resolution", type=int, default=None,
                       help="Training image size in pixels (default: the model's own, 512 for SD v1.4).")
    train.add_argument("--mixed-precision", choices=list(DTYPES), default="no",
                       help="Run the frozen VAE/UNet/text encoder in fp16 or bf16 under autocast (no: fp32).")
    train.add_argument("--gradient-checkpointing", action="store_true",
                       help="Recompute UNet and text-encoder activations in backward to save memory.")
    train.add_argument("--validate-every", type=int, default=0,
                       help="Save a grid of sample images every N steps under OUT/validation (0: never).")
    train.add_argument("--save-every", type=int, default=500,
                       help="Write the embeddings and the resume state every N steps.")
    train.add_argument("--seed", type=int, default=0, help="Seed for crops, templates, noise and timesteps.")
    train.add_argument("--device", default=None, help="cpu, cuda, cuda:N or mps (default: the best available).")
    train.add_argument("--out", default=str(DEFAULT_EMBEDS_DIR),
                       help="Output folder (learned_embeds.safetensors, train_state.safetensors; default: "
                            "checkpoints/p3_ti in this repository); a run there is resumed from its last save.")

    generate = commands.add_parser("generate", help="Generate the grader's image folders (or free prompts).")
    generate.add_argument("input_json", help="The course's input.json (concepts, tokens, prompts).")
    generate.add_argument("out_dir", help="Output folder: OUT_DIR/{concept}/{prompt}/source{c}_prompt{p}_{i}.png.")
    generate.add_argument("model", nargs="?", default=None,
                          help="SD v1.4 .ckpt/.safetensors file, diffusers folder or hub id (default: the toy model "
                               f"on a toy world, else {DEFAULT_MODEL}).")
    generate.add_argument("--embeds", nargs="+", default=None,
                          help="learned_embeds files or folders searched for them (default: checkpoints/p3_ti "
                               "in this repository).")
    generate.add_argument("--prompt", action="append", default=None,
                          help="A free prompt instead of input.json's (repeatable), e.g. \"A <new1> next to a cat "
                               "in the style of <new2>\"; images go to OUT_DIR/free/{k}/.")
    generate.add_argument("--num-images", type=int, default=GRADER_IMAGES, help="Images per prompt.")
    generate.add_argument("--steps", type=int, default=30, help="Sampling steps.")
    generate.add_argument("--guidance", type=float, default=7.5, help="Classifier-free guidance scale.")
    generate.add_argument("--scheduler", choices=["model", *SCHEDULERS], default="dpm",
                          help="Sampler: DPM-Solver++ (dpm), ddim, pndm, or the model's own.")
    generate.add_argument("--batch-size", type=int, default=5, help="Images per pipeline call.")
    generate.add_argument("--seed", type=int, default=0, help="Base seed; each image's seed derives from it.")
    generate.add_argument("--device", default=None, help="cpu, cuda, cuda:N or mps (default: the best available).")

    score = commands.add_parser("score", help="The grader's CLIP-I / CLIP-T check of generated folders.")
    score.add_argument("input_json", help="The course's input.json (eval prompts and baselines).")
    score.add_argument("out_dir", help="Folder written by generate.")
    score.add_argument("--concepts", default=None,
                       help="Folder of the concepts' reference photos (default: the folder of INPUT_JSON).")
    score.add_argument("--clip", default=None,
                       help=f"transformers CLIP model (default: {DEFAULT_CLIP}, or the tiny toy scorer on a toy "
                            f"world).")
    score.add_argument("--device", default=None, help="cpu, cuda, cuda:N or mps (default: the best available).")
    return parser


if __name__ == "__main__":
    run_cli(main)

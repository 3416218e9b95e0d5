"""P3: textual inversion on Stable Diffusion v1.4 -- learn new words, generate the grader's folders, score them.

    # learn one concept (a few photos of it) as a new word, initialised from a word close to it
    python p3_textual_inversion.py train hw2_data/textual_inversion/0 --token "<new1>" --init-token dog \\
        --out checkpoints/p3_ti/0
    # or learn every concept of an input.json (one sub-folder of --out per concept)
    python p3_textual_inversion.py train --input-json hw2_data/textual_inversion/input.json --out checkpoints/p3_ti
    # the grader's call: 25 images per concept and prompt in OUT_DIR/{c}/{p}/source{c}_prompt{p}_{i}.png
    python p3_textual_inversion.py generate hw2_data/textual_inversion/input.json outputs/p3_ti MODEL
    # the grader's CLIP scores (top 5 of 25 by CLIP-I + 2.5 CLIP-T) against input.json's baselines
    python p3_textual_inversion.py score hw2_data/textual_inversion/input.json outputs/p3_ti

Textual inversion (Gal et al., 2022) freezes the whole text-to-image model and learns only the input embedding
v* of a new token S*:  v* = argmin_v E_{x, eps, t} || eps - eps_theta(z_t, t, c_theta(y(S*))) ||^2  (their eq. 2),
with z_t = sqrt(alpha_bar_t) z_0 + sqrt(1 - alpha_bar_t) eps and z_0 the VAE latent of a training photo x, and
y(S*) a neutral template such as "a photo of a S*" (objects) or "a painting in the style of S*" (styles).

MODEL (and `--model`) is a hub id (CompVis/stable-diffusion-v1-4), a diffusers folder, or one `.ckpt` /
`.safetensors` file such as the course's SD v1.4 `model.ckpt`. On a toy world (built by toy_data.py) every
subcommand defaults to the tiny random models under `hw2_data/toy_models/`.
"""

import argparse
import copy
from pathlib import Path

import torch
from diffusers import DDPMScheduler
from diffusers.utils import logging as diffusers_logging
from tqdm import tqdm

from p3_concepts import (
    TEMPLATES,
    add_generation_arguments,
    add_placeholder_tokens,
    concept_image_paths,
    concept_property,
    expand_placeholder,
    generate_command,
    load_concept_images,
    load_embeds,
    read_input_json,
    sample_batch,
    save_a1111_embedding,
    save_learned_embeds,
    token_file_path,
)
from p3_score import add_score_command, run_score
from p3_training import (
    VALIDATION_IMAGES,
    add_precision_arguments,
    denoising_loss,
    describe_precision,
    encode_latents,
    expand_rows,
    prepare_for_training,
    resolve_precision,
    restore_frozen_rows,
    rng_state,
    set_rng_state,
    slice_rows,
    validation_images,
    validation_prompt,
)
from sd_v1 import DEFAULT_MODEL, default_model, load_sd_pipeline
from utils import (
    Hw2Error,
    announce_toy_world,
    get_device,
    load_checkpoint,
    run_cli,
    save_checkpoint,
    save_grid,
    seed_everything,
)

DEFAULT_EMBEDS_DIR = Path(__file__).resolve().parent / "checkpoints" / "p3_ti"  # train --out, generate --embeds
EMBEDS_FILE = "learned_embeds.safetensors"  # diffusers' name and format: {token: [num_vectors, D] tensor}
STATE_FILE = "train_state.safetensors"  # everything needed to resume training
ADAM_WEIGHT_DECAY = 1e-2  # diffusers' textual-inversion default
EFFECTIVE_BATCH = 4  # images per optimizer step by default: diffusers' example, 1 x 4 accumulation steps on a GPU

# ---------------------------------------------------------------------------------------------- training


def run_config(args, token, init_text, prop, model):
    """The settings a resumed run must share with the saved one (steps may grow, the rest may not change)."""
    return {"token": token, "init_text": init_text, "property": prop, "model": str(model),
            "num_vectors": args.num_vectors, "lr": args.lr, "batch_size": args.batch_size,
            "grad_accum": args.grad_accum, "resolution": args.resolution, "seed": args.seed,
            "mixed_precision": args.mixed_precision}


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
            loss = denoising_loss(pipe.unet, pipe.text_encoder, noise_scheduler, z_0, input_ids.to(device), eps, t)
        scaler.scale(loss / grad_accum).backward()
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    restore_frozen_rows(pipe.text_encoder.get_input_embeddings().weight, original, new_ids)
    return loss.item()


def train_concept(args, pipe, concept_dir, token, init_text, prop, out_dir, model, device):
    """Learn `token` from the photos in `concept_dir` with `pipe` (loaded from `model`), whose tokenizer and text
    encoder then hold the learned rows; write out_dir/learned_embeds.safetensors, its A1111 copy and resume state."""
    out_dir = Path(out_dir)
    state_path = out_dir / STATE_FILE
    tokenizer = pipe.tokenizer
    # the model's own training noise schedule (its scheduler config, e.g. SD v1's scaled-linear betas)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    resolution = args.resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
    images = load_concept_images(concept_dir, resolution)
    new_ids = add_placeholder_tokens(tokenizer, pipe.text_encoder, token, args.num_vectors, init_text)
    concept_text = expand_placeholder(token, token, args.num_vectors)
    templates = TEMPLATES[prop]

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
            return
        print(f"Resuming {token} from step {start} ({state_path}).")

    def save(step):
        # the outputs first, the resume state last: a run killed in between redoes these steps instead of leaving
        # files older than the state that says they are done
        rows = embedding.weight[new_ids]
        save_learned_embeds(out_dir / EMBEDS_FILE, token, rows)
        save_a1111_embedding(token_file_path(out_dir, token), rows)
        save_checkpoint(state_path, {
            "step": step, "config": config, "embeds": rows, "scaler": scaler.state_dict(), "rng": rng_state(device),
            "optimizer": slice_rows(optimizer.state_dict(), new_ids, embedding.weight.shape[0])})

    def next_batch():
        return sample_batch(images, tokenizer, templates, concept_text, resolution, prop, args.batch_size)

    progress = tqdm(range(start, args.steps), initial=start, total=args.steps, desc=f"train {token}")
    for step in progress:
        if args.validate_every and step % args.validate_every == 0:
            # the plain token: the pipeline itself writes a multi-vector token as all its vectors' tokens
            validation = validation_images(pipe, validation_prompt(token, prop), resolution, autocast, args.seed)
            save_grid(validation * 2 - 1, out_dir / "validation" / f"step{step:06d}.png", nrow=VALIDATION_IMAGES)
        loss = train_step(pipe, noise_scheduler, next_batch, args.grad_accum, optimizer, scaler, autocast, original,
                          new_ids)
        progress.set_postfix(loss=f"{loss:.4f}")
        if (step + 1) % args.save_every == 0 or step + 1 == args.steps:
            save(step + 1)
    print(f"Wrote {out_dir / EMBEDS_FILE} ({token}, {args.num_vectors} vector(s), {args.steps} steps).")


def resolve_memory_defaults(args, device):
    """Fill in the flags left unset for `device`. With CUDA: fp16, gradient checkpointing, batch 1 x 4 accumulation
    steps (diffusers' example; SD v1.4 at 512 px then fits a 12-16 GB card). Elsewhere: fp32, batch 4 x 1. Either
    way an optimizer step sees EFFECTIVE_BATCH images unless --batch-size or --grad-accum say otherwise."""
    resolve_precision(args, device)
    if args.batch_size is None:
        args.batch_size = 1 if device.type == "cuda" else EFFECTIVE_BATCH
    if args.grad_accum is None:
        args.grad_accum = max(1, EFFECTIVE_BATCH // args.batch_size)


def run_train(args):
    if args.input_json is None and args.concept_dir is None:
        raise Hw2Error("train needs a CONCEPT_DIR (with --token and --init-token) or --input-json FILE")
    if args.input_json is not None and args.concept_dir is not None:
        raise Hw2Error("train takes either a CONCEPT_DIR or --input-json, not both")
    for flag, value in (("--steps", args.steps), ("--batch-size", args.batch_size), ("--grad-accum", args.grad_accum),
                        ("--num-vectors", args.num_vectors), ("--save-every", args.save_every)):
        if value is not None and value < 1:
            raise Hw2Error(f"{flag} must be at least 1, got {value}")
    anchor = Path(args.input_json or args.concept_dir)
    announce_toy_world(anchor)
    model = args.model or default_model(anchor)
    device = get_device(args.device)
    resolve_memory_defaults(args, device)
    print(f"Training on {device}: {describe_precision(args)}, batch {args.batch_size} x {args.grad_accum} "
          f"accumulation step(s) = {args.batch_size * args.grad_accum} images per optimizer step.")
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
    pipe = load_sd_pipeline(model)  # once for all concepts; each starts from the model's own vocabulary
    tokenizer, vocab_size = copy.deepcopy(pipe.tokenizer), len(pipe.tokenizer)
    for concept_dir, token, init_text, prop, out_dir in jobs:
        print(f"Concept {concept_dir}: {token} ({prop}), initialised from {init_text!r}.")
        pipe.tokenizer = copy.deepcopy(tokenizer)
        pipe.text_encoder.resize_token_embeddings(vocab_size)  # drops the previous concept's rows
        train_concept(args, pipe, concept_dir, token, init_text, prop, out_dir, model, device)
    return pipe  # its tokenizer and text encoder hold the last concept's learned token(s)


# -------------------------------------------------------------------------------------------- generation


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


def run_generate(args):
    files = find_embeds(args.embeds or [DEFAULT_EMBEDS_DIR])
    generate_command(args, lambda pipe: load_embeds(pipe, files), f"embeddings {', '.join(map(str, files))}")


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
    train.add_argument("--batch-size", type=int, default=None,
                       help=f"Images per forward pass (default: 1 with CUDA, {EFFECTIVE_BATCH} elsewhere).")
    train.add_argument("--grad-accum", type=int, default=None,
                       help=f"Forward passes accumulated per optimizer step (default: enough for {EFFECTIVE_BATCH} "
                            f"images per step, {EFFECTIVE_BATCH} // --batch-size, at least 1).")
    train.add_argument("--resolution", type=int, default=None,
                       help="Training image size in pixels (default: the model's own, 512 for SD v1.4).")
    add_precision_arguments(train)
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
    add_generation_arguments(generate)
    add_score_command(commands)
    return parser


if __name__ == "__main__":
    run_cli(main)
